//! Whose API shape a request, its errors and its stream take: OpenAI's (completions, chat,
//! and every path but Messages and Responses), OpenAI's Responses API (errors as OpenAI's;
//! streams of typed events that end with `response.completed`, errors as an `error` event)
//! or Anthropic's (`/v1/messages`). vLLM 0.32's Anthropic
//! errors are `{"type":"error","error":{"type","message"}}` with the OpenAI error's type
//! (anthropic/api_router.py, `translate_error_response`); its streams end with a
//! `message_stop` event and no `[DONE]` (anthropic/serving.py, `message_stream_converter`).

use bytes::Bytes;
use serde_json::{json, Value};

use super::{sse, ApiError};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Dialect {
    OpenAi,
    /// `/v1/responses`: its stream's end is the `response.completed` event, which the
    /// router reads as it passes (router/responses/capture.rs), not the stream's last bytes.
    Responses,
    Anthropic,
}

impl Dialect {
    /// An error's JSON body in this dialect's shape.
    pub(crate) fn error_body(self, err: &ApiError) -> Value {
        match self {
            Dialect::OpenAi | Dialect::Responses => err.body(),
            Dialect::Anthropic => anthropic(&err.body()).unwrap_or_else(|| json!({"type": "error", "error": {"message": err.message}})),
        }
    }

    /// A stream's error event.
    pub(crate) fn error_event(self, err: &ApiError) -> Bytes {
        match self {
            Dialect::OpenAi => sse::event(&err.body()),
            Dialect::Responses => {
                let event =
                    json!({"type": "error", "code": err.kind_name(), "message": err.message, "param": err.param, "sequence_number": 0});
                Bytes::from(format!("event: error\ndata: {event}\n\n"))
            }
            Dialect::Anthropic => Bytes::from(format!("event: error\ndata: {}\n\n", self.error_body(err))),
        }
    }

    /// What follows a stream's error event: OpenAI's `[DONE]`; nothing after Anthropic's.
    pub(crate) fn after_error(self) -> &'static [u8] {
        match self {
            Dialect::OpenAi => sse::DONE,
            Dialect::Anthropic | Dialect::Responses => b"",
        }
    }

    /// Whether a stream whose last bytes are `tail` ended as it should.
    pub(crate) fn stream_ended(self, tail: &str) -> bool {
        let tail = tail.trim_end();
        match self {
            Dialect::OpenAi => tail.ends_with("data: [DONE]"),
            Dialect::Anthropic => tail.ends_with(r#"{"type":"message_stop"}"#),
            Dialect::Responses => false,
        }
    }

    /// An error body in OpenAI's shape (the router's own, or an engine's) rewritten in this
    /// dialect; None when it is not one (an engine's answer already in this shape stays).
    pub(crate) fn translate_error(self, body: &[u8]) -> Option<Vec<u8>> {
        match self {
            Dialect::OpenAi | Dialect::Responses => None,
            Dialect::Anthropic => {
                let v: Value = serde_json::from_slice(body).ok()?;
                serde_json::to_vec(&anthropic(&v)?).ok()
            }
        }
    }
}

/// `{"error":{"message","type",..}}` -> `{"type":"error","error":{"type","message"}}`.
fn anthropic(openai: &Value) -> Option<Value> {
    if openai.get("type").and_then(Value::as_str) == Some("error") {
        return None;
    }
    let err = openai.get("error")?;
    let message = err.get("message").and_then(Value::as_str).map_or_else(|| err.to_string(), str::to_owned);
    let kind = err.get("type").and_then(Value::as_str).unwrap_or("api_error");
    Some(json!({"type": "error", "error": {"type": kind, "message": message}}))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::ErrorKind;

    #[test]
    fn anthropic_errors_and_stream_ends() {
        let err = ApiError::new(ErrorKind::ServiceUnavailable, "no healthy decode worker");
        let body = Dialect::Anthropic.error_body(&err);
        assert_eq!(body, json!({"type": "error", "error": {"type": "ServiceUnavailableError", "message": "no healthy decode worker"}}));
        let event = Dialect::Anthropic.error_event(&err);
        assert!(event.starts_with(b"event: error\ndata: {") && event.ends_with(b"\n\n"));
        assert_eq!(Dialect::OpenAi.error_body(&err), err.body());
        // An engine's Anthropic error stays as it is; an OpenAI one is rewritten.
        let already = serde_json::to_vec(&body).unwrap();
        assert_eq!(Dialect::Anthropic.translate_error(&already), None);
        let rewritten = Dialect::Anthropic.translate_error(&serde_json::to_vec(&err.body()).unwrap()).unwrap();
        assert_eq!(serde_json::from_slice::<Value>(&rewritten).unwrap(), body);
        assert_eq!(Dialect::OpenAi.translate_error(&already), None);
        assert!(Dialect::Anthropic.stream_ended("event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"));
        assert!(!Dialect::Anthropic.stream_ended("data: [DONE]\n\n"));
        assert!(Dialect::OpenAi.stream_ended("data: [DONE]\n\n"));
    }
}
