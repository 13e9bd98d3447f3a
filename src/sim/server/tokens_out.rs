//! vLLM's token-in / token-out `/inference/v1/generate` (entrypoints/scale_out/
//! token_in_token_out, with `--enable-scale-out`): `token_ids` and `sampling_params` in,
//! the generated token ids out, `kv_transfer_params` at the top level both ways. The
//! request runs as a completions prompt of token ids does (the same checks and engine
//! jobs); without `sampling_params.max_tokens` the output may fill the model's length, as
//! vLLM defaults it. Streamed: one chunk per token, the last with its finish, `[DONE]`.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde_json::{json, Map, Value};

use super::generate::{crash_now, start, Started};
use super::http::{not_serving, Sim, MAX_BODY};
use crate::api::body::{parse_object, read_limited, require_json};
use crate::api::{sse, ApiError};
use crate::sim::engine::request::Api;
use crate::sim::engine::tokens::EOS;
use crate::sim::engine::{Event, Finish, Output};

/// `sampling_params` fields read, as a completions body spells them.
const SAMPLING: &[&str] = &["max_tokens", "min_tokens", "ignore_eos", "stop_token_ids", "temperature", "seed", "n"];

pub(crate) async fn generate(axum::extract::State(sim): axum::extract::State<Arc<Sim>>, headers: HeaderMap, body: Body) -> Response {
    if !sim.args.enable_scale_out {
        return super::render::forbidden();
    }
    let answer = async {
        if let Some(e) = not_serving(&sim) {
            return Err(e);
        }
        require_json(&headers)?;
        let body = parse_object(&read_limited(&headers, body, MAX_BODY).await?)?;
        let completion = as_completion(&body, sim.args.max_model_len as usize)?;
        let started = start(&sim, Api::Completions, &headers, &completion)?;
        Ok(if started.req.stream { stream(started) } else { whole(started).await? })
    }
    .await;
    answer.unwrap_or_else(IntoResponse::into_response)
}

/// The completions body the request amounts to.
fn as_completion(body: &Map<String, Value>, max_model_len: usize) -> Result<Map<String, Value>, ApiError> {
    let ids = match body.get("token_ids") {
        Some(Value::Array(ids)) if !ids.is_empty() => ids,
        other => {
            let input = other.unwrap_or(&Value::Null);
            return Err(crate::api::fields::validation_error("body.token_ids", "too_short", "List should have at least 1 item", input));
        }
    };
    let sampling = match body.get("sampling_params") {
        Some(Value::Object(m)) => m,
        other => {
            let input = other.unwrap_or(&Value::Null);
            return Err(crate::api::fields::validation_error("body.sampling_params", "missing", "Field required", input));
        }
    };
    let mut out = Map::new();
    out.insert("prompt".into(), Value::Array(ids.clone()));
    for k in SAMPLING {
        if let Some(v) = sampling.get(*k).filter(|v| !v.is_null()) {
            out.insert((*k).into(), v.clone());
        }
    }
    if !out.contains_key("max_tokens") {
        out.insert("max_tokens".into(), json!(max_model_len.saturating_sub(ids.len()).max(1)));
    }
    for k in ["model", "stream", "stream_options", "kv_transfer_params"] {
        if let Some(v) = body.get(k).filter(|v| !v.is_null()) {
            out.insert(k.into(), v.clone());
        }
    }
    Ok(out)
}

/// One generation's token ids, how it ended, its KV params and cached prompt tokens.
struct Generated {
    ids: Vec<u32>,
    /// The token that came with the finish (not sent in a chunk before).
    last: Option<u32>,
    finish: &'static str,
    stop_reason: Value,
    kv: Option<Value>,
    cached: usize,
}

/// Where one output's next event leaves it.
enum Step {
    Token(u32),
    End(Generated),
}

/// The generation's next token, or its end (ids so far in `ids`).
async fn step(out: &mut Output, ids: &mut Vec<u32>, cached: &mut usize, stop_ids: &[u32]) -> Result<Step, ApiError> {
    loop {
        match out.next().await {
            Some(Event::Prefilled { cached_tokens }) => *cached = cached_tokens,
            Some(Event::Token(t)) => {
                ids.push(t);
                return Ok(Step::Token(t));
            }
            Some(Event::Finished { reason, last_token, kv_transfer_params }) => {
                // EOS is generated and kept in the ids (the text would hide it).
                let last = last_token.or((reason == Finish::Stopped).then_some(EOS));
                ids.extend(last);
                let stop_reason = last.filter(|t| stop_ids.contains(t)).map_or(Value::Null, |t| json!(t));
                let finish = if reason == Finish::Length { "length" } else { "stop" };
                return Ok(Step::End(Generated {
                    ids: std::mem::take(ids),
                    last,
                    finish,
                    stop_reason,
                    kv: kv_transfer_params,
                    cached: *cached,
                }));
            }
            Some(Event::Failed(e)) => return Err(e),
            None => return Err(ApiError::internal("engine dropped the request")),
        }
    }
}

fn usage(prompt: usize, completion: usize, cached: Option<usize>) -> Value {
    let mut u = json!({"prompt_tokens": prompt, "total_tokens": prompt + completion, "completion_tokens": completion});
    if let Some(c) = cached {
        u["prompt_tokens_details"] = json!({"cached_tokens": c});
    }
    u
}

async fn whole(started: Started) -> Result<Response, ApiError> {
    let Started { meta, req, outs, .. } = started;
    let mut choices = Vec::new();
    let (mut kv, mut cached, mut completion) = (None, 0, 0);
    for (index, mut out) in outs.into_iter().enumerate() {
        let (mut ids, mut c) = (Vec::new(), 0);
        let g = loop {
            if let Step::End(g) = step(&mut out, &mut ids, &mut c, &req.stop_token_ids).await? {
                break g;
            }
        };
        completion += g.ids.len();
        (kv, cached) = (g.kv, g.cached);
        choices.push(json!({"index": index, "finish_reason": g.finish, "stop_reason": g.stop_reason, "token_ids": g.ids}));
    }
    let prompt = req.prompts.iter().map(Vec::len).sum();
    Ok(axum::Json(json!({"request_id": meta.id, "model": meta.model, "created": meta.created, "choices": choices,
        "usage": usage(prompt, completion, meta.details.then_some(cached)), "kv_transfer_params": kv}))
    .into_response())
}

fn stream(started: Started) -> Response {
    let Started { meta, req, mut outs, doomed, in_flight } = started;
    // One generation streams (vLLM's generate clients send n = 1).
    let out = outs.swap_remove(0);
    let prompt = req.prompts.iter().map(Vec::len).sum::<usize>();
    let (stop_ids, include_usage, details) = (req.stop_token_ids.clone(), req.include_usage, meta.details);
    let chunk = move |choice: Value| json!({"request_id": meta.id, "model": meta.model, "created": meta.created, "choices": [choice]});
    let state = (out, Vec::new(), 0usize, Some(in_flight), 0usize);
    let body = futures_util::stream::unfold(state, move |(mut out, mut ids, mut cached, held, sent)| {
        let (chunk, stop_ids) = (chunk.clone(), stop_ids.clone());
        async move {
            let held = held?;
            if doomed && sent > 0 {
                crash_now();
            }
            let tail = match step(&mut out, &mut ids, &mut cached, &stop_ids).await {
                Ok(Step::Token(t)) => {
                    let piece = sse::event(&chunk(json!({"index": 0, "token_ids": [t], "finish_reason": null})));
                    return Some((Ok::<Bytes, std::convert::Infallible>(piece), (out, ids, cached, Some(held), sent + 1)));
                }
                Ok(Step::End(g)) => {
                    let last: Vec<u32> = g.last.into_iter().collect();
                    let end = json!({"index": 0, "token_ids": last, "finish_reason": g.finish, "stop_reason": g.stop_reason});
                    let mut tail = sse::event(&chunk(end)).to_vec();
                    if include_usage {
                        let u = usage(prompt, g.ids.len(), details.then_some(g.cached));
                        tail.extend_from_slice(&sse::event(&json!({"choices": [], "usage": u})));
                    }
                    tail
                }
                Err(e) => sse::event(&e.body()).to_vec(),
            };
            let mut tail = tail;
            tail.extend_from_slice(sse::DONE);
            drop(held);
            Some((Ok(Bytes::from(tail)), (out, ids, cached, None, sent + 1)))
        }
    });
    ([(header::CONTENT_TYPE, sse::CONTENT_TYPE)], Body::from_stream(body)).into_response()
}
