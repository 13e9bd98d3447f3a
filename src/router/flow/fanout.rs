//! A request that makes several generations (a list of prompts, or `n` > 1) runs one
//! generation each (in PD mode one pair each: a prefill's KV serves exactly one decode of
//! exactly one prompt), and their answers are merged into the one answer vLLM gives:
//! choices indexed `prompt * n + choice`, usage summed with each prompt counted once, one
//! id, one final usage chunk and one `[DONE]` when streamed. Choice `j` of `n` is sampled
//! with `seed + j`, as vLLM seeds its child requests, so seeded output is vLLM's too.

use std::sync::Arc;

use axum::body::Body;
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use bytes::{Bytes, BytesMut};
use futures_util::stream::{self, BoxStream, SelectAll};
use futures_util::StreamExt;
use serde_json::{json, Value};

use crate::api::sse::{self, EventSplitter};
use crate::api::{ApiError, ErrorKind};
use crate::router::flow::relay::{Held, Piece, Upstream};
use crate::router::flow::{info_for, Router};
use crate::router::metrics::Cause;
use crate::router::pair::failure::Failure;
use crate::router::pair::{Delivery, Job, LegTemplate};
use crate::router::request::body::ClientBody;
use crate::router::request::{self, LegBodies, Shape};
use crate::router::upstream::legs::StartedBody;

/// What flow control gave the request: its claim on the engines' room (shared by its
/// generations) and what its legs say of its priority.
pub(crate) struct Marks {
    pub(crate) transit: Option<Arc<crate::router::workers::room::Transit>>,
    pub(crate) priority: request::LegPriority,
}

/// Runs every generation and merges their answers; on failure, hands the held request
/// back with the failure (the first generation to fail decides it; the others are dropped).
pub(crate) async fn run(
    router: &Arc<Router>,
    headers: &HeaderMap,
    body: &ClientBody,
    shape: &Shape,
    leg: &LegTemplate,
    mut held: Held,
    marks: Marks,
) -> Result<Response, (Failure, Held)> {
    let base_id = leg.request_id.to_str().unwrap_or_default().to_string();
    let mut jobs = Vec::new();
    for (k, sub) in request::split(body, shape).into_iter().enumerate() {
        let body = match ClientBody::parse(sub) {
            Ok(body) => body,
            Err(e) => return Err((Failure::bad_request(e), held)),
        };
        let info = info_for(router, headers, &body, crate::api::dialect::Dialect::OpenAi).await;
        let id = HeaderValue::from_str(&format!("{base_id}-{k}")).expect("an id plus digits is a header value");
        let bodies = LegBodies::new(body).with_priority(marks.priority.clone());
        let delivery = Delivery::from(shape.gen.stream);
        jobs.push(Arc::new(Job {
            bodies,
            info,
            leg: leg.with_id(id),
            delivery,
            transit: marks.transit.clone(),
            prediction: Default::default(),
            admitted: Some(held.permit.clone() as Arc<dyn Send + Sync>),
        }));
    }
    let answers = match futures_util::future::try_join_all(jobs.into_iter().map(|job| router.pairs.run(job))).await {
        Ok(answers) => answers,
        Err(f) => return Err((f, held)),
    };
    let n = shape.gen.n as usize;
    held.record.status(200);
    held.record.first_output();
    held.started = answers.iter().map(|a| a.since).min().expect("at least two generations");
    let mut wholes = Vec::new();
    let mut streams = Vec::new();
    for a in answers {
        match a.started.body {
            StartedBody::Whole(b) => wholes.push(a.rename.as_ref().map_or(b.clone(), |r| r.whole(b))),
            StartedBody::Events { head, rest } => {
                let mut up = Upstream::new(head, rest, router.cfg.timeouts.stream_idle, &router.drain);
                up.rename = a.rename;
                streams.push(up);
            }
        }
        held.leases.push(a.lease);
    }
    let (content_type, body) = if streams.is_empty() {
        let parts = wholes.iter().map(|b| serde_json::from_slice::<Value>(b)).collect::<Result<Vec<_>, _>>();
        let Ok(parts) = parts else {
            let broken = crate::api::ApiError::new(crate::api::ErrorKind::BadGateway, "decode leg failed: the worker's answer was broken");
            return Err((Failure::api(broken, Cause::DecodeFailed), held));
        };
        let merged = serde_json::to_vec(&merge_whole(parts, n)).expect("JSON serialises");
        ("application/json", crate::router::flow::relay::whole(Bytes::from(merged), held, None))
    } else if wholes.is_empty() {
        (sse::CONTENT_TYPE, merged_stream(streams, n, held))
    } else {
        return Err((Failure::internal("the generations of one request answered in different forms"), held));
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = StatusCode::OK;
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    Ok(resp)
}

/// The id of the whole request: a generation's id without its `-k` suffix.
fn request_id_of(part: &Value) -> Option<Value> {
    part.get("id").and_then(Value::as_str).map(|id| Value::from(id.strip_suffix("-0").unwrap_or(id)))
}

fn usage_of(part: &Value, key: &str) -> u64 {
    part.get("usage").and_then(|u| u.get(key)).and_then(Value::as_u64).unwrap_or(0)
}

/// Merges whole answers given in generation order (prompt-major, choice-minor).
fn merge_whole(parts: Vec<Value>, n: usize) -> Value {
    let (mut prompt, mut completion) = (0, 0);
    let mut choices = Vec::with_capacity(parts.len());
    for (k, part) in parts.iter().enumerate() {
        for c in part.get("choices").and_then(Value::as_array).into_iter().flatten() {
            let mut c = c.clone();
            c["index"] = json!(k);
            choices.push(c);
        }
        if k % n == 0 {
            prompt += usage_of(part, "prompt_tokens");
        }
        completion += usage_of(part, "completion_tokens");
    }
    let last_details = parts.last().and_then(|p| p.get("usage")).and_then(|u| u.get("prompt_tokens_details")).cloned();
    let mut out = parts.into_iter().next().expect("at least two generations");
    if let Some(id) = request_id_of(&out) {
        out["id"] = id;
    }
    out["choices"] = Value::Array(choices);
    if let Some(usage) = out.get_mut("usage").and_then(Value::as_object_mut) {
        usage.insert("prompt_tokens".into(), json!(prompt));
        usage.insert("completion_tokens".into(), json!(completion));
        usage.insert("total_tokens".into(), json!(prompt + completion));
        if let Some(d) = last_details {
            usage.insert("prompt_tokens_details".into(), d);
        }
    }
    if out.get("metrics").is_some() {
        // vLLM leaves per-request metrics out when they cannot belong to one stream.
        out["metrics"] = Value::Null;
    }
    out
}

struct Merge {
    pieces: SelectAll<BoxStream<'static, (usize, Piece)>>,
    splitters: Vec<EventSplitter>,
    /// Each generation's final usage chunk (sent once, merged, at the end).
    usage: Vec<Option<Value>>,
    n: usize,
    id: Option<Value>,
    held: Held,
}

enum Step {
    Merging(Box<Merge>),
    Done(Held),
    End,
}

/// The generations' streams as one: each event re-indexed as it arrives.
fn merged_stream(streams: Vec<Upstream>, n: usize, held: Held) -> Body {
    let count = streams.len();
    let pieces = stream::select_all(
        streams
            .into_iter()
            .enumerate()
            .map(|(k, up)| stream::unfold(up, move |mut up| async move { up.next().await.map(|p| ((k, p), up)) }).boxed()),
    );
    let merge =
        Merge { pieces, splitters: (0..count).map(|_| EventSplitter::default()).collect(), usage: vec![None; count], n, id: None, held };
    let s = stream::unfold(Step::Merging(Box::new(merge)), |step| async move {
        match step {
            Step::Merging(mut m) => loop {
                match m.pieces.next().await {
                    Some((k, Piece::Bytes(chunk))) => match m.rewrite(k, &chunk) {
                        Ok(out) if out.is_empty() => {}
                        Ok(out) => return Some((out, Step::Merging(m))),
                        Err(too_long) => {
                            tracing::warn!("a generation's stream failed: {too_long}");
                            m.held.record.fail(Cause::DecodeMidstream);
                            if let Some(lease) = m.held.leases.get_mut(k) {
                                lease.failed();
                            }
                            let err = ApiError::new(ErrorKind::BadGateway, format!("decode leg failed mid-stream: {too_long}"));
                            return Some((sse::event(&err.body()), Step::Done(m.held)));
                        }
                    },
                    Some((k, Piece::Broken { event, why, worker_fault })) => {
                        tracing::warn!("a generation's stream failed: {why}");
                        m.held.record.fail(Cause::DecodeMidstream);
                        if let Some(lease) = m.held.leases.get_mut(k).filter(|_| worker_fault) {
                            lease.failed();
                        }
                        return Some((event, Step::Done(m.held)));
                    }
                    None => {
                        let usage = m.final_usage();
                        return Some((usage, Step::Done(m.held)));
                    }
                }
            },
            Step::Done(mut held) => {
                held.finish();
                Some((Bytes::from_static(sse::DONE), Step::End))
            }
            Step::End => None,
        }
    });
    Body::from_stream(s.map(Ok::<_, std::convert::Infallible>))
}

impl Merge {
    /// The events a chunk of generation `k` completes, re-indexed; its `[DONE]` and final
    /// usage chunk are held back.
    fn rewrite(&mut self, k: usize, chunk: &[u8]) -> Result<Bytes, sse::EventTooLong> {
        let mut out = BytesMut::new();
        for event in self.splitters[k].push(chunk)? {
            let Some(data) = sse::data_of(&event) else {
                out.extend_from_slice(&event);
                out.extend_from_slice(b"\n\n");
                continue;
            };
            if data == "[DONE]" {
                continue;
            }
            let Ok(mut v) = serde_json::from_str::<Value>(&data) else {
                out.extend_from_slice(&event);
                out.extend_from_slice(b"\n\n");
                continue;
            };
            let has_choices = v.get("choices").and_then(Value::as_array).is_some_and(|c| !c.is_empty());
            if !has_choices && v.get("usage").is_some_and(|u| !u.is_null()) {
                self.usage[k] = Some(v);
                continue;
            }
            if let Some(choices) = v.get_mut("choices").and_then(Value::as_array_mut) {
                for c in choices {
                    c["index"] = json!(k);
                }
            }
            if self.id.is_none() {
                self.id = request_id_of(&v);
            }
            if let Some(id) = &self.id {
                v["id"] = id.clone();
            }
            out.extend_from_slice(&sse::event(&v));
        }
        Ok(out.freeze())
    }

    /// One usage chunk for the whole request (when the client asked for usage).
    fn final_usage(&mut self) -> Bytes {
        let parts: Vec<&Value> = self.usage.iter().flatten().collect();
        let Some(last) = parts.last() else { return Bytes::new() };
        let mut out = (*last).clone();
        let (mut prompt, mut completion) = (0, 0);
        for (k, part) in self.usage.iter().enumerate() {
            let Some(part) = part else { continue };
            if k % self.n.max(1) == 0 {
                prompt += usage_of(part, "prompt_tokens");
            }
            completion += usage_of(part, "completion_tokens");
        }
        out["usage"]["prompt_tokens"] = json!(prompt);
        out["usage"]["completion_tokens"] = json!(completion);
        out["usage"]["total_tokens"] = json!(prompt + completion);
        if let Some(id) = &self.id {
            out["id"] = id.clone();
        }
        sse::event(&out)
    }
}
