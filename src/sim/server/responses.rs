//! OpenAI's Responses API as vLLM 0.32 serves it without a store (the default: no
//! VLLM_ENABLE_RESPONSES_API_STORE): `store` is taken as false and a `previous_response_id`
//! is not found (404). The request becomes a chat request as vLLM builds its messages
//! (entrypoints/openai/responses/utils.py, `construct_input_messages`: instructions as the
//! system message, a string input as one user message, message items by role; the first
//! text of a content list), runs as chat does, and its answer is converted back: one
//! response object with one message item, or the events `response.created`,
//! `.in_progress`, `.output_item.added`, `.content_part.added`, `.output_text.delta`...,
//! `.output_text.done`, `.content_part.done`, `.output_item.done`, `.completed` (each with
//! its `sequence_number`; no `[DONE]`). The response's id is the body's `request_id`.
//! Text only: tool-call and reasoning items, and structured output (`text.format`), are
//! refused with a 400 saying so; `tools` are not applied (as vLLM without a tool parser).

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde_json::{json, Map, Value};

use super::generate::{generate, hex16};
use super::http::{Sim, MAX_BODY};
use crate::api::body::{parse_object, read_limited, require_json};
use crate::api::{ApiError, ErrorKind};
use crate::sim::engine::request::Api;

pub(crate) async fn responses(State(sim): State<Arc<Sim>>, headers: HeaderMap, body: Body) -> Response {
    let answer = async {
        require_json(&headers)?;
        let body = parse_object(&read_limited(&headers, body, MAX_BODY).await?)?;
        if let Some(id) = body.get("previous_response_id").and_then(Value::as_str) {
            let err = ApiError {
                status: StatusCode::NOT_FOUND,
                ..ApiError::new(ErrorKind::InvalidRequest, format!("Response with id '{id}' not found."))
            };
            return Err(err.param("response_id"));
        }
        let chat = chat_request(&body)?;
        let resp = generate(sim, Api::Chat, headers, Body::from(serde_json::to_vec(&chat).expect("a map serialises"))).await?;
        Ok::<_, ApiError>((resp, Shell::of(&body)))
    }
    .await;
    match answer {
        Ok((resp, _)) if !resp.status().is_success() => resp,
        Ok((resp, shell)) if shell.stream => events(resp, shell),
        Ok((resp, shell)) => whole(resp, shell).await,
        Err(e) => e.into_response(),
    }
}

fn unsupported(what: &str) -> ApiError {
    ApiError::bad_request(format!("the simulator serves text messages only, not {what}"))
}

/// The text of a message's content: a string, or its first part's text (as vLLM reads an
/// assistant item).
fn text_of(content: &Value) -> Result<String, ApiError> {
    match content {
        Value::String(s) => Ok(s.clone()),
        Value::Array(parts) => parts
            .first()
            .and_then(|p| p.get("text"))
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| unsupported("content parts without text")),
        _ => Err(ApiError::bad_request("a message's content must be a string or a list of parts")),
    }
}

/// The chat request vLLM runs for a Responses request (also for /v1/responses/render).
pub(crate) fn chat_request(body: &Map<String, Value>) -> Result<Map<String, Value>, ApiError> {
    let format = body.get("text").and_then(|t| t.get("format")).and_then(|f| f.get("type")).and_then(Value::as_str);
    if format.is_some_and(|f| f != "text") {
        return Err(unsupported("structured output (text.format)"));
    }
    let mut messages = Vec::new();
    if let Some(instructions) = body.get("instructions").and_then(Value::as_str).filter(|s| !s.is_empty()) {
        messages.push(json!({"role": "system", "content": instructions}));
    }
    match body.get("input") {
        Some(Value::String(s)) => messages.push(json!({"role": "user", "content": s})),
        Some(Value::Array(items)) => {
            for item in items {
                let kind = item.get("type").and_then(Value::as_str).unwrap_or("message");
                let role = item.get("role").and_then(Value::as_str);
                match (kind, role) {
                    ("message", Some(role)) => {
                        messages.push(json!({"role": role, "content": text_of(item.get("content").unwrap_or(&Value::Null))?}))
                    }
                    (kind, _) => return Err(unsupported(&format!("{kind} items"))),
                }
            }
        }
        other => {
            return Err(crate::api::fields::validation_error("body.input", "missing", "Field required", other.unwrap_or(&Value::Null)))
        }
    }
    let mut chat = Map::new();
    chat.insert("messages".into(), Value::Array(messages));
    for (from, to) in [
        ("model", "model"),
        ("max_output_tokens", "max_tokens"),
        ("temperature", "temperature"),
        ("top_p", "top_p"),
        ("top_k", "top_k"),
        ("seed", "seed"),
        ("stop", "stop"),
        ("ignore_eos", "ignore_eos"),
        ("kv_transfer_params", "kv_transfer_params"),
    ] {
        if let Some(v) = body.get(from).filter(|v| !v.is_null()) {
            chat.insert(to.into(), v.clone());
        }
    }
    if body.get("stream").and_then(Value::as_bool) == Some(true) {
        chat.insert("stream".into(), Value::Bool(true));
        chat.insert("stream_options".into(), json!({"include_usage": true}));
    }
    Ok(chat)
}

/// The fields of the response object that come from the request.
struct Shell {
    id: String,
    stream: bool,
    request: Value,
}

impl Shell {
    fn of(body: &Map<String, Value>) -> Shell {
        let id = body.get("request_id").and_then(Value::as_str).map_or_else(|| format!("resp_{}", hex16()), str::to_owned);
        let stream = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
        Shell { id, stream, request: Value::Object(body.clone()) }
    }

    /// The response object (vLLM's `ResponsesResponse.from_request`).
    fn response(&self, model: &Value, status: &str, output: Value, usage: Value, kv: Value) -> Value {
        let r = &self.request;
        let field = |k: &str| r.get(k).cloned().unwrap_or(Value::Null);
        json!({
            "id": self.id, "created_at": now(), "incomplete_details": if status == "incomplete" { json!({"reason": "max_output_tokens"}) } else { Value::Null },
            "instructions": field("instructions"), "metadata": field("metadata"), "model": model, "object": "response",
            "output": output, "parallel_tool_calls": r.get("parallel_tool_calls").cloned().unwrap_or(Value::Bool(true)),
            "temperature": r.get("temperature").cloned().unwrap_or(json!(1.0)), "tool_choice": "none", "tools": [],
            "top_p": r.get("top_p").cloned().unwrap_or(json!(1.0)), "background": false,
            "max_output_tokens": field("max_output_tokens"), "max_tool_calls": null, "previous_response_id": null, "prompt": null,
            "reasoning": null, "service_tier": "auto", "status": status, "text": null, "top_logprobs": null, "truncation": "disabled",
            "usage": usage, "user": field("user"), "kv_transfer_params": kv,
        })
    }
}

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn message_item(id: &str, text: &str, status: &str) -> Value {
    let content = if status == "in_progress" { json!([]) } else { json!([output_text(text)]) };
    json!({"id": id, "content": content, "role": "assistant", "status": status, "type": "message"})
}

fn output_text(text: &str) -> Value {
    json!({"annotations": [], "text": text, "type": "output_text", "logprobs": null})
}

/// Chat usage as the Responses API's.
fn usage(chat: Option<&Value>) -> Value {
    let u = chat.filter(|u| !u.is_null()).cloned().unwrap_or(json!({}));
    let input = u.get("prompt_tokens").and_then(Value::as_u64).unwrap_or(0);
    let output = u.get("completion_tokens").and_then(Value::as_u64).unwrap_or(0);
    let cached = u.get("prompt_tokens_details").and_then(|d| d.get("cached_tokens")).and_then(Value::as_u64).unwrap_or(0);
    json!({"input_tokens": input, "input_tokens_details": {"cached_tokens": cached}, "output_tokens": output,
        "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": input + output})
}

fn status_of(finish: Option<&str>) -> &'static str {
    if finish == Some("length") {
        "incomplete"
    } else {
        "completed"
    }
}

async fn whole(resp: Response, shell: Shell) -> Response {
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX).await.unwrap_or_default();
    let Ok(chat) = serde_json::from_slice::<Value>(&bytes) else {
        return ApiError::internal("the chat answer is not JSON").into_response();
    };
    let choice = &chat["choices"][0];
    let text = choice["message"]["content"].as_str().unwrap_or("");
    let output = json!([message_item(&format!("msg_{}", hex16()), text, "completed")]);
    let kv = chat.get("kv_transfer_params").cloned().unwrap_or(Value::Null);
    axum::Json(shell.response(&chat["model"], status_of(choice["finish_reason"].as_str()), output, usage(chat.get("usage")), kv))
        .into_response()
}

/// The chat stream's chunks as Responses events, one by one.
struct Converter {
    shell: Shell,
    item: String,
    sequence: u64,
    text: String,
    model: Value,
    started: bool,
    finish: Option<String>,
}

impl Converter {
    fn event(&mut self, kind: &str, mut data: Value) -> Bytes {
        data["type"] = json!(kind);
        data["sequence_number"] = json!(self.sequence);
        self.sequence += 1;
        Bytes::from(format!("event: {kind}\ndata: {data}\n\n"))
    }

    fn convert(&mut self, data: &str) -> Vec<Bytes> {
        if data == "[DONE]" {
            return Vec::new();
        }
        let Ok(chunk) = serde_json::from_str::<Value>(data) else { return Vec::new() };
        if let Some(err) = chunk.get("error") {
            let message = err.get("message").cloned().unwrap_or(Value::Null);
            return vec![self.event("error", json!({"code": "internal_error", "message": message, "param": null}))];
        }
        let mut out = Vec::new();
        if !self.started {
            self.started = true;
            self.model = chunk["model"].clone();
            let initial = self.shell.response(&self.model, "in_progress", json!([]), Value::Null, Value::Null);
            out.push(self.event("response.created", json!({"response": initial})));
            out.push(self.event("response.in_progress", json!({"response": initial})));
            let (item, added) = (self.item.clone(), message_item(&self.item, "", "in_progress"));
            out.push(self.event("response.output_item.added", json!({"item": added, "output_index": 0})));
            out.push(self.event(
                "response.content_part.added",
                json!({"item_id": item, "output_index": 0, "content_index": 0, "part": output_text("")}),
            ));
        }
        let Some(choice) = chunk["choices"].as_array().and_then(|c| c.first()) else {
            // The usage chunk: the message is done and the response complete.
            let item = self.item.clone();
            let text = std::mem::take(&mut self.text);
            out.push(self.event(
                "response.output_text.done",
                json!({"item_id": item, "output_index": 0, "content_index": 0, "text": text, "logprobs": []}),
            ));
            out.push(self.event(
                "response.content_part.done",
                json!({"item_id": item, "output_index": 0, "content_index": 0, "part": output_text(&text)}),
            ));
            let done = message_item(&item, &text, "completed");
            out.push(self.event("response.output_item.done", json!({"item": done, "output_index": 0})));
            let status = status_of(self.finish.as_deref());
            let resp = self.shell.response(&self.model, status, json!([done]), usage(chunk.get("usage")), Value::Null);
            out.push(self.event("response.completed", json!({"response": resp})));
            return out;
        };
        if let Some(finish) = choice["finish_reason"].as_str() {
            self.finish = Some(finish.to_string());
        }
        if let Some(delta) = choice["delta"]["content"].as_str().filter(|t| !t.is_empty()) {
            self.text.push_str(delta);
            let item = self.item.clone();
            out.push(self.event(
                "response.output_text.delta",
                json!({"item_id": item, "output_index": 0, "content_index": 0, "delta": delta, "logprobs": []}),
            ));
        }
        out
    }
}

fn events(resp: Response, shell: Shell) -> Response {
    let mut converter = Converter {
        shell,
        item: format!("msg_{}", hex16()),
        sequence: 0,
        text: String::new(),
        model: Value::Null,
        started: false,
        finish: None,
    };
    super::response::chat_stream_converted(resp, move |data| converter.convert(data))
}
