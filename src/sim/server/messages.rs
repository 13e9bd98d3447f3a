//! Anthropic's Messages API as vLLM 0.32 serves it (entrypoints/anthropic/serving.py): the
//! request becomes a chat request (system first, text blocks joined, `max_tokens`,
//! `stop_sequences` as `stop`, the sampling fields, `kv_transfer_params`; streamed with
//! usage on every chunk), runs as chat does, and its answer is converted back: one message
//! with a text block, or the events `message_start`, `content_block_start`/`_delta`/
//! `_stop`, `message_delta`, `message_stop` (no `[DONE]`). Errors in Anthropic's shape,
//! with the OpenAI error's type, as vLLM's `translate_error_response`. Text content only:
//! the simulator refuses images, tools and thinking with a 400 saying so.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde_json::{json, Map, Value};

use super::generate::generate;
use super::http::{Sim, MAX_BODY};
use crate::api::body::{parse_object, read_limited, require_json};
use crate::api::dialect::Dialect;
use crate::api::ApiError;
use crate::sim::engine::request::Api;

pub(crate) async fn messages(State(sim): State<Arc<Sim>>, headers: HeaderMap, body: Body) -> Response {
    let answer = async {
        require_json(&headers)?;
        let body = parse_object(&read_limited(&headers, body, MAX_BODY).await?)?;
        let chat = to_chat(&body, Purpose::Generate)?;
        let stream = chat.get("stream").and_then(Value::as_bool).unwrap_or(false);
        let resp = generate(sim, Api::Chat, headers, Body::from(serde_json::to_vec(&chat).expect("a map serialises"))).await?;
        Ok::<_, ApiError>((resp, stream))
    }
    .await;
    match answer {
        Ok((resp, _)) if !resp.status().is_success() => anthropic_error(resp).await,
        Ok((resp, true)) => events(resp),
        Ok((resp, false)) => message(resp).await,
        Err(e) => (e.status, axum::Json(Dialect::Anthropic.error_body(&e))).into_response(),
    }
}

/// `/v1/messages/count_tokens`: the prompt's tokens, as the chat template renders it.
pub(crate) async fn count_tokens(State(sim): State<Arc<Sim>>, headers: HeaderMap, body: Body) -> Response {
    let result = async {
        require_json(&headers)?;
        let body = parse_object(&read_limited(&headers, body, MAX_BODY).await?)?;
        let chat = to_chat(&body, Purpose::CountTokens)?;
        let tokens = crate::sim::engine::request::prompt_tokens(Api::Chat, &chat, sim.tokenizer.as_deref())?.swap_remove(0);
        Ok::<_, ApiError>(json!({"input_tokens": tokens.len(), "context_management": {"original_input_tokens": tokens.len()}}))
    }
    .await;
    match result {
        Ok(v) => axum::Json(v).into_response(),
        Err(e) => (e.status, axum::Json(Dialect::Anthropic.error_body(&e))).into_response(),
    }
}

fn unsupported(what: &str) -> ApiError {
    ApiError::bad_request(format!("the simulator serves text content only, not {what}"))
}

/// The text of a `system` or `content` value: a string, or text blocks joined.
fn text_of(v: &Value, loc: &str) -> Result<String, ApiError> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Array(blocks) => blocks
            .iter()
            .map(|b| match (b.get("type").and_then(Value::as_str), b.get("text").and_then(Value::as_str)) {
                (Some("text"), Some(t)) => Ok(t.to_string()),
                (kind, _) => Err(unsupported(&format!("{} blocks in {loc}", kind.unwrap_or("untyped")))),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(|parts| parts.concat()),
        _ => Err(ApiError::bad_request(format!("{loc} must be a string or a list of content blocks"))),
    }
}

/// A Messages request as the chat request vLLM runs (for /v1/messages/render).
pub(crate) fn chat_request(body: &Map<String, Value>) -> Result<Map<String, Value>, ApiError> {
    to_chat(body, Purpose::Generate)
}

/// What a converted request is for: count_tokens takes no `max_tokens`.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Purpose {
    Generate,
    CountTokens,
}

/// The chat request vLLM builds from a Messages request (`_build_base_request`).
fn to_chat(body: &Map<String, Value>, purpose: Purpose) -> Result<Map<String, Value>, ApiError> {
    for field in ["tools", "tool_choice", "thinking"] {
        if body.get(field).is_some_and(|v| !v.is_null()) {
            return Err(unsupported(field));
        }
    }
    let mut messages = Vec::new();
    if let Some(system) = body.get("system").filter(|v| !v.is_null()) {
        messages.push(json!({"role": "system", "content": text_of(system, "system")?}));
    }
    let Some(Value::Array(turns)) = body.get("messages") else {
        return Err(crate::api::fields::validation_error("body.messages", "missing", "Field required", &Value::Null));
    };
    for turn in turns {
        let role = turn.get("role").and_then(Value::as_str).ok_or_else(|| ApiError::bad_request("every message needs a role"))?;
        messages.push(json!({"role": role, "content": text_of(turn.get("content").unwrap_or(&Value::Null), "content")?}));
    }
    let mut chat = Map::new();
    chat.insert("messages".into(), Value::Array(messages));
    for (from, to) in [
        ("model", "model"),
        ("max_tokens", "max_tokens"),
        ("max_tokens", "max_completion_tokens"),
        ("stop_sequences", "stop"),
        ("temperature", "temperature"),
        ("top_p", "top_p"),
        ("top_k", "top_k"),
        ("kv_transfer_params", "kv_transfer_params"),
    ] {
        if let Some(v) = body.get(from).filter(|v| !v.is_null()) {
            chat.insert(to.into(), v.clone());
        }
    }
    match body.get("max_tokens") {
        _ if purpose == Purpose::CountTokens => {}
        Some(Value::Number(n)) if n.as_i64().is_some_and(|m| m <= 0) => {
            return Err(crate::api::fields::validation_error(
                "body.max_tokens",
                "value_error",
                "Value error, max_tokens must be positive",
                &Value::Number(n.clone()),
            ))
        }
        None | Some(Value::Null) => {
            return Err(crate::api::fields::validation_error("body.max_tokens", "missing", "Field required", &Value::Null))
        }
        _ => {}
    }
    if body.get("stream").and_then(Value::as_bool) == Some(true) {
        chat.insert("stream".into(), Value::Bool(true));
        chat.insert("stream_options".into(), json!({"include_usage": true, "continuous_usage_stats": true}));
    }
    Ok(chat)
}

/// `(stop_reason, stop_sequence)` for a chat choice's finish (`_to_anthropic_stop_reason`).
fn stop_reason(finish: Option<&str>, matched: &Value) -> (Value, Value) {
    match finish {
        Some("length") => (json!("max_tokens"), Value::Null),
        Some("stop") if matched.is_string() => (json!("stop_sequence"), matched.clone()),
        Some("stop") => (json!("end_turn"), Value::Null),
        _ => (Value::Null, Value::Null),
    }
}

/// Chat usage as Anthropic's: input tokens exclude the cached ones, shown apart.
fn usage(chat: Option<&Value>) -> Value {
    let Some(u) = chat.filter(|u| !u.is_null()) else { return json!({"input_tokens": 0, "output_tokens": 0}) };
    let prompt = u.get("prompt_tokens").and_then(Value::as_u64).unwrap_or(0);
    let output = u.get("completion_tokens").and_then(Value::as_u64).unwrap_or(0);
    match u.get("prompt_tokens_details").and_then(|d| d.get("cached_tokens")).and_then(Value::as_u64) {
        Some(cached) => json!({"input_tokens": prompt.saturating_sub(cached), "output_tokens": output, "cache_read_input_tokens": cached}),
        None => json!({"input_tokens": prompt, "output_tokens": output}),
    }
}

async fn anthropic_error(resp: Response) -> Response {
    let (parts, body) = resp.into_parts();
    let bytes = axum::body::to_bytes(body, MAX_BODY).await.unwrap_or_default();
    let body = Dialect::Anthropic.translate_error(&bytes).map_or(bytes, Bytes::from);
    let mut out = (parts.status, body).into_response();
    out.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
    out
}

async fn message(resp: Response) -> Response {
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX).await.unwrap_or_default();
    let Ok(chat) = serde_json::from_slice::<Value>(&bytes) else {
        let e = ApiError::internal("the chat answer is not JSON");
        return (StatusCode::INTERNAL_SERVER_ERROR, axum::Json(Dialect::Anthropic.error_body(&e))).into_response();
    };
    let choice = &chat["choices"][0];
    let text = choice["message"]["content"].as_str().unwrap_or("");
    let (stop, sequence) = stop_reason(choice["finish_reason"].as_str(), &choice["stop_reason"]);
    axum::Json(json!({
        "id": chat["id"], "type": "message", "role": "assistant",
        "content": [{"type": "text", "text": text}],
        "model": chat["model"], "stop_reason": stop, "stop_sequence": sequence,
        "usage": usage(chat.get("usage")), "kv_transfer_params": chat.get("kv_transfer_params").cloned().unwrap_or(Value::Null),
    }))
    .into_response()
}

fn event(kind: &str, data: &Value) -> Bytes {
    Bytes::from(format!("event: {kind}\ndata: {data}\n\n"))
}

/// The chat stream's events as Anthropic's, one by one (`message_stream_converter`).
#[derive(Default)]
struct Converter {
    started: bool,
    block_open: bool,
    finish: Option<String>,
    matched: Value,
}

impl Converter {
    fn convert(&mut self, data: &str) -> Vec<Bytes> {
        if data == "[DONE]" {
            let mut out = self.close_block();
            out.push(event("message_stop", &json!({"type": "message_stop"})));
            return out;
        }
        let Ok(chunk) = serde_json::from_str::<Value>(data) else { return vec![self.error("Invalid data format received")] };
        if let Some(err) = chunk.get("error") {
            return vec![self.error(err.get("message").and_then(Value::as_str).unwrap_or("the engine failed"))];
        }
        if !self.started {
            self.started = true;
            let message = json!({"id": chunk["id"], "type": "message", "role": "assistant", "content": [], "model": chunk["model"],
                "stop_reason": null, "stop_sequence": null, "usage": usage(chunk.get("usage"))});
            return vec![event("message_start", &json!({"type": "message_start", "message": message}))];
        }
        let Some(choice) = chunk["choices"].as_array().and_then(|c| c.first()) else {
            // The usage chunk: the block ends and the message's end is told.
            let mut out = self.close_block();
            let (stop, sequence) = stop_reason(Some(self.finish.as_deref().unwrap_or("stop")), &self.matched);
            out.push(event(
                "message_delta",
                &json!({"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": sequence}, "usage": usage(chunk.get("usage"))}),
            ));
            return out;
        };
        if let Some(finish) = choice["finish_reason"].as_str() {
            self.finish = Some(finish.to_string());
            self.matched = choice["stop_reason"].clone();
        }
        let mut out = Vec::new();
        if let Some(text) = choice["delta"]["content"].as_str().filter(|t| !t.is_empty()) {
            if !self.block_open {
                self.block_open = true;
                out.push(event(
                    "content_block_start",
                    &json!({"type": "content_block_start", "content_block": {"type": "text", "text": ""}, "index": 0}),
                ));
            }
            out.push(event(
                "content_block_delta",
                &json!({"type": "content_block_delta", "delta": {"type": "text_delta", "text": text}, "index": 0}),
            ));
        }
        out
    }

    fn close_block(&mut self) -> Vec<Bytes> {
        if !std::mem::take(&mut self.block_open) {
            return Vec::new();
        }
        vec![event("content_block_stop", &json!({"type": "content_block_stop", "index": 0}))]
    }

    fn error(&self, message: &str) -> Bytes {
        event("error", &json!({"type": "error", "error": {"type": "internal_error", "message": message}}))
    }
}

/// The chat stream converted as it comes: each chat event becomes the Anthropic events it
/// completes.
fn events(resp: Response) -> Response {
    let mut converter = Converter::default();
    super::response::chat_stream_converted(resp, move |data| converter.convert(data))
}
