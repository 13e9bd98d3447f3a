//! The two legs of a disaggregated request, each one HTTP request to one worker: the
//! prefill leg returns the prefill's `kv_transfer_params`; a generating leg returns the
//! start of its answer (status, and the first SSE event or the whole body).

use std::time::Duration;

use axum::http::header::{AUTHORIZATION, CONTENT_TYPE};
use axum::http::{HeaderValue, StatusCode};
use bytes::{Bytes, BytesMut};
use futures_util::stream::BoxStream;
use futures_util::StreamExt;
use serde_json::Value;

use super::workers::Lease;
use crate::api::sse::{self, EventSplitter};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Leg {
    Prefill,
    Decode,
}

/// How a leg failed.
#[derive(Debug)]
pub enum LegError {
    /// No connection could be made: the worker is marked down at once.
    Connect(String),
    Timeout(Duration),
    /// The worker answered an error status. A 4xx is the client's to see, as is.
    Status { status: StatusCode, content_type: Option<HeaderValue>, body: Bytes },
    /// A broken answer: reset mid-way, not JSON, or an error event before any output.
    Broken(String),
}

impl LegError {
    pub fn is_client_error(&self) -> bool {
        matches!(self, LegError::Status { status, .. } if status.is_client_error())
    }

    /// A short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            LegError::Connect(_) => "connect",
            LegError::Timeout(_) => "timeout",
            LegError::Status { status, .. } if status.is_client_error() => "4xx",
            LegError::Status { .. } => "5xx",
            LegError::Broken(_) => "broken",
        }
    }
}

impl std::fmt::Display for LegError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LegError::Connect(e) => write!(f, "cannot connect: {e}"),
            LegError::Timeout(d) => write!(f, "no answer within {:.1}s", d.as_secs_f64()),
            LegError::Status { status, body, .. } => {
                let text = String::from_utf8_lossy(&body[..body.len().min(300)]);
                write!(f, "answered {status}: {text}")
            }
            LegError::Broken(e) => write!(f, "{e}"),
        }
    }
}

/// Error text with its causes (reqwest's Display alone hides them).
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

fn classify(e: reqwest::Error, timeout: Duration) -> LegError {
    if e.is_connect() {
        LegError::Connect(chain(&e))
    } else if e.is_timeout() {
        LegError::Timeout(timeout)
    } else {
        LegError::Broken(chain(&e))
    }
}

/// What every leg sends besides its body.
#[derive(Clone)]
pub struct LegRequest {
    pub path: &'static str,
    pub request_id: HeaderValue,
    pub authorization: Option<HeaderValue>,
    pub body: Bytes,
    pub timeout: Duration,
}

fn send(client: &reqwest::Client, lease: &Lease, req: &LegRequest) -> reqwest::RequestBuilder {
    let mut b = client
        .post(format!("{}{}", lease.url(), req.path))
        .header(CONTENT_TYPE, "application/json")
        .header("x-request-id", req.request_id.clone())
        .body(req.body.clone());
    if let Some(rank) = lease.dp_rank() {
        b = b.header("x-data-parallel-rank", rank);
    }
    if let Some(auth) = &req.authorization {
        b = b.header(AUTHORIZATION, auth.clone());
    }
    b
}

async fn error_status(resp: reqwest::Response, timeout: Duration) -> LegError {
    let status = resp.status();
    let content_type = resp.headers().get(CONTENT_TYPE).cloned();
    match resp.bytes().await {
        Ok(body) => LegError::Status { status, content_type, body },
        Err(e) => classify(e, timeout),
    }
}

/// The prefill leg: returns the prefill's `kv_transfer_params` (None when it returned
/// none, e.g. it stopped on EOS: the decode then prefills locally).
pub async fn prefill(client: &reqwest::Client, lease: &Lease, req: &LegRequest) -> Result<Option<Value>, LegError> {
    let run = async {
        let resp = send(client, lease, req).send().await.map_err(|e| classify(e, req.timeout))?;
        if !resp.status().is_success() {
            return Err(error_status(resp, req.timeout).await);
        }
        let body = resp.bytes().await.map_err(|e| classify(e, req.timeout))?;
        let v: Value = serde_json::from_slice(&body)
            .map_err(|e| LegError::Broken(format!("prefill answer is not JSON ({e})")))?;
        Ok(v.get("kv_transfer_params").filter(|p| p.as_object().is_some_and(|m| !m.is_empty())).cloned())
    };
    tokio::time::timeout(req.timeout, run).await.unwrap_or(Err(LegError::Timeout(req.timeout)))
}

/// The start of a decode (or colocated) answer.
pub struct Started {
    pub status: StatusCode,
    pub content_type: Option<HeaderValue>,
    pub body: StartedBody,
}

pub enum StartedBody {
    /// A JSON answer, read whole.
    Whole(Bytes),
    /// An SSE answer: the bytes up to and including its first event, and the rest.
    Events { head: Bytes, rest: BoxStream<'static, reqwest::Result<Bytes>> },
}

/// Sends a generating leg (decode, or a colocated worker's) and returns its start: the
/// whole JSON answer, or the SSE answer up to its first event. Bounded by the leg timeout.
pub async fn answer(client: &reqwest::Client, lease: &Lease, req: &LegRequest) -> Result<Started, LegError> {
    tokio::time::timeout(req.timeout, start(client, lease, req)).await.unwrap_or(Err(LegError::Timeout(req.timeout)))
}

async fn start(client: &reqwest::Client, lease: &Lease, req: &LegRequest) -> Result<Started, LegError> {
    let resp = send(client, lease, req).send().await.map_err(|e| classify(e, req.timeout))?;
    let status = resp.status();
    if !status.is_success() {
        return Err(error_status(resp, req.timeout).await);
    }
    let content_type = resp.headers().get(CONTENT_TYPE).cloned();
    let is_sse = content_type.as_ref().and_then(|v| v.to_str().ok()).is_some_and(|v| v.starts_with("text/event-stream"));
    if !is_sse {
        let body = resp.bytes().await.map_err(|e| classify(e, req.timeout))?;
        return Ok(Started { status, content_type, body: StartedBody::Whole(body) });
    }
    let mut rest = resp.bytes_stream().boxed();
    let mut head = BytesMut::new();
    let mut splitter = EventSplitter::default();
    loop {
        match rest.next().await {
            Some(Ok(chunk)) => {
                head.extend_from_slice(&chunk);
                if let Some(first) = splitter.push(&chunk).into_iter().next() {
                    // An error event before any output is a failed start, not a stream.
                    if let Some(err) = sse::data_of(&first)
                        .and_then(|d| serde_json::from_str::<Value>(&d).ok())
                        .and_then(|v| v.get("error").cloned())
                    {
                        let msg = err.get("message").and_then(Value::as_str).map_or_else(|| err.to_string(), str::to_owned);
                        return Err(LegError::Broken(format!("the stream opened with an error: {msg}")));
                    }
                    return Ok(Started { status, content_type, body: StartedBody::Events { head: head.freeze(), rest } });
                }
            }
            Some(Err(e)) => return Err(classify(e, req.timeout)),
            None => return Err(LegError::Broken("the stream ended before its first event".into())),
        }
    }
}
