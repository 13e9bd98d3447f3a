//! vLLM's response shapes for completions and chat, streamed and not, and the text
//! assembly (stop strings held back until they can no longer match, as vLLM does).

use serde::Serialize;
use serde_json::{json, Value};

use crate::sim::engine::request::Api;
use crate::sim::engine::tokens::token_text;
use crate::sim::engine::Finish;

pub(crate) const FINGERPRINT: &str = "disagg-sim";

/// Identity shared by every chunk of one response.
pub(crate) struct Meta {
    pub(crate) api: Api,
    pub(crate) id: String,
    pub(crate) created: u64,
    pub(crate) model: String,
    /// Report cached prompt tokens (--enable-prompt-tokens-details).
    pub(crate) details: bool,
}

/// Why a choice ended, as vLLM reports it.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Ending {
    Length,
    Eos,
    StopString(String),
    StopToken(u32),
}

/// Whether a chat chunk names the speaker (vLLM's first chunk of each choice does).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RoleField {
    Assistant,
    Omitted,
}

impl Ending {
    /// The ending the engine reports (a stop token's is TextOut's, from the token itself).
    pub(crate) fn from_finish(f: Finish) -> Self {
        match f {
            Finish::Length => Ending::Length,
            Finish::Stopped => Ending::Eos,
        }
    }
    fn finish_reason(&self) -> &'static str {
        match self {
            Ending::Length => "length",
            _ => "stop",
        }
    }
    fn stop_reason(&self) -> Value {
        match self {
            Ending::StopString(s) => Value::String(s.clone()),
            Ending::StopToken(t) => json!(t),
            _ => Value::Null,
        }
    }
}

/// Detokenises the output and applies `stop` / `stop_token_ids`.
pub(crate) struct TextOut {
    stops: Vec<String>,
    stop_ids: Vec<u32>,
    hold: usize,
    pub(crate) text: String,
    emitted: usize,
    pub(crate) tokens: usize,
}

impl TextOut {
    pub(crate) fn new(stops: Vec<String>, stop_ids: Vec<u32>) -> Self {
        let hold = stops.iter().map(String::len).max().unwrap_or(1) - 1;
        TextOut { stops, stop_ids, hold, text: String::new(), emitted: 0, tokens: 0 }
    }

    /// Adds one token. Returns the text that may be shown now and, if a stop condition
    /// hit, how the output ended (the text is then final).
    pub(crate) fn push(&mut self, token: u32) -> (String, Option<Ending>) {
        self.tokens += 1;
        if self.stop_ids.contains(&token) {
            return (self.flush(), Some(Ending::StopToken(token)));
        }
        let from = self.emitted;
        self.text.push_str(&token_text(token));
        let hit = self.stops.iter().filter_map(|s| self.text[from..].find(s.as_str()).map(|p| (from + p, s))).min_by_key(|(p, _)| *p);
        if let Some((pos, stop)) = hit {
            let stop = stop.clone();
            self.text.truncate(pos);
            return (self.flush(), Some(Ending::StopString(stop)));
        }
        let mut safe = self.text.len().saturating_sub(self.hold).max(self.emitted);
        while !self.text.is_char_boundary(safe) {
            safe -= 1;
        }
        let delta = self.text[self.emitted..safe].to_string();
        self.emitted = safe;
        (delta, None)
    }

    /// Whatever is still held back.
    pub(crate) fn flush(&mut self) -> String {
        let rest = self.text[self.emitted..].to_string();
        self.emitted = self.text.len();
        rest
    }
}

#[derive(Serialize, Clone, Copy)]
pub(crate) struct Usage {
    pub(crate) prompt_tokens: usize,
    pub(crate) total_tokens: usize,
    pub(crate) completion_tokens: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) prompt_tokens_details: Option<Details>,
}

#[derive(Serialize, Clone, Copy)]
pub(crate) struct Details {
    pub(crate) cached_tokens: usize,
}

impl Usage {
    pub(crate) fn new(prompt_tokens: usize, completion_tokens: usize) -> Self {
        Usage { prompt_tokens, total_tokens: prompt_tokens + completion_tokens, completion_tokens, prompt_tokens_details: None }
    }

    /// With the cached prompt tokens, when they are reported.
    pub(crate) fn cached(mut self, report: bool, cached_tokens: usize) -> Self {
        self.prompt_tokens_details = report.then_some(Details { cached_tokens });
        self
    }
}

/// One finished choice of a non-streamed answer.
pub(crate) struct Finished {
    pub(crate) text: String,
    pub(crate) ending: Ending,
    pub(crate) tokens: usize,
    pub(crate) kv: Option<Value>,
    /// Prompt tokens found cached.
    pub(crate) cached: usize,
}

impl Meta {
    fn choice(&self, index: usize, f: &Finished) -> Value {
        match self.api {
            Api::Completions => json!({"index": index, "text": f.text, "logprobs": null, "finish_reason": f.ending.finish_reason(),
                "stop_reason": f.ending.stop_reason(), "token_ids": null, "prompt_logprobs": null,
                "prompt_token_ids": null, "routed_experts": null}),
            Api::Chat => json!({"index": index, "message": {"role": "assistant", "content": f.text, "refusal": null,
                "annotations": null, "audio": null, "function_call": null, "reasoning": null},
                "logprobs": null, "finish_reason": f.ending.finish_reason(), "stop_reason": f.ending.stop_reason(),
                "token_ids": null, "routed_experts": null}),
        }
    }

    /// The whole non-streamed response (vLLM 0.32's shape), choices in order.
    pub(crate) fn full_response(&self, choices: &[Finished], usage: Usage) -> Value {
        let usage = json!({
            "prompt_tokens": usage.prompt_tokens,
            "total_tokens": usage.total_tokens,
            "completion_tokens": usage.completion_tokens,
            "prompt_tokens_details": usage.prompt_tokens_details.map(|d| json!({"cached_tokens": d.cached_tokens,
                "created_cache_tokens": null, "multimodal_tokens": null})),
            "completion_tokens_details": null,
        });
        let kv = choices.first().and_then(|c| c.kv.clone());
        let list: Vec<Value> = choices.iter().enumerate().map(|(i, c)| self.choice(i, c)).collect();
        match self.api {
            Api::Completions => json!({
                "id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": list, "service_tier": null, "system_fingerprint": FINGERPRINT, "usage": usage,
                "kv_transfer_params": kv, "ec_transfer_params": null, "metrics": null,
            }),
            Api::Chat => json!({
                "id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": list, "service_tier": null, "system_fingerprint": FINGERPRINT, "usage": usage,
                "prompt_logprobs": null, "prompt_token_ids": null, "prompt_text": null, "kv_transfer_params": kv,
                "ec_transfer_params": null, "metrics": null,
            }),
        }
    }

    /// One streamed chunk of choice `index` with `delta` text; `ending` on its last one.
    pub(crate) fn chunk(&self, index: u32, delta: &str, ending: Option<&Ending>, role: RoleField, usage: Option<Usage>) -> bytes::Bytes {
        let finish_reason = ending.map(Ending::finish_reason);
        let stop_reason = ending.map(Ending::stop_reason);
        match self.api {
            Api::Completions => crate::api::sse::event(&CompletionChunk {
                id: &self.id,
                object: "text_completion",
                created: self.created,
                model: &self.model,
                choices: &[CompletionChoice {
                    index,
                    text: delta,
                    logprobs: None,
                    finish_reason,
                    stop_reason: stop_reason.unwrap_or(Value::Null),
                }],
                usage,
            }),
            Api::Chat => crate::api::sse::event(&ChatChunk {
                id: &self.id,
                object: "chat.completion.chunk",
                created: self.created,
                model: &self.model,
                choices: &[ChatChoice {
                    index,
                    delta: Delta { role: (role == RoleField::Assistant).then_some("assistant"), content: delta },
                    logprobs: None,
                    finish_reason,
                    stop_reason,
                }],
                usage,
            }),
        }
    }

    /// The `choices: []` chunk carrying usage (`stream_options.include_usage`).
    pub(crate) fn usage_chunk(&self, usage: Usage) -> bytes::Bytes {
        let object = match self.api {
            Api::Completions => "text_completion",
            Api::Chat => "chat.completion.chunk",
        };
        crate::api::sse::event(&json!({
            "id": self.id, "object": object, "created": self.created, "model": self.model,
            "choices": [], "usage": usage, "system_fingerprint": FINGERPRINT,
        }))
    }
}

#[derive(Serialize)]
struct CompletionChunk<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: &'a [CompletionChoice<'a>],
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Usage>,
}

#[derive(Serialize)]
struct CompletionChoice<'a> {
    index: u32,
    text: &'a str,
    logprobs: Option<()>,
    finish_reason: Option<&'static str>,
    stop_reason: Value,
}

#[derive(Serialize)]
struct ChatChunk<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: &'a [ChatChoice<'a>],
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Usage>,
}

#[derive(Serialize)]
struct ChatChoice<'a> {
    index: u32,
    delta: Delta<'a>,
    logprobs: Option<()>,
    finish_reason: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stop_reason: Option<Value>,
}

#[derive(Serialize)]
struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    content: &'a str,
}

/// A chat stream converted as it comes into another API's events (Anthropic's Messages,
/// OpenAI's Responses): `convert` turns each chat event's data into the events it completes.
pub(crate) fn chat_stream_converted<C>(resp: axum::response::Response, convert: C) -> axum::response::Response
where
    C: FnMut(&str) -> Vec<bytes::Bytes> + Send + 'static,
{
    use axum::response::IntoResponse;
    use futures_util::StreamExt;
    struct State<C> {
        chat: axum::body::BodyDataStream,
        splitter: crate::api::sse::EventSplitter,
        convert: C,
        ready: std::collections::VecDeque<bytes::Bytes>,
    }
    let state = State {
        chat: resp.into_body().into_data_stream(),
        splitter: crate::api::sse::EventSplitter::new(super::http::MAX_BODY),
        convert,
        ready: Default::default(),
    };
    let body = futures_util::stream::unfold(state, |mut s| async move {
        loop {
            if let Some(b) = s.ready.pop_front() {
                return Some((Ok::<bytes::Bytes, std::convert::Infallible>(b), s));
            }
            let chunk = s.chat.next().await?.ok()?;
            for e in s.splitter.push(&chunk).ok()? {
                if let Some(data) = crate::api::sse::data_of(&e) {
                    let events = (s.convert)(&data);
                    s.ready.extend(events);
                }
            }
        }
    });
    ([(axum::http::header::CONTENT_TYPE, crate::api::sse::CONTENT_TYPE)], axum::body::Body::from_stream(body)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::engine::tokens::tokenize;

    #[test]
    fn stop_string_truncates_and_is_never_shown() {
        // Find a token whose text we can use as part of a stop string.
        let tok = 100;
        let word = token_text(tok);
        let mut out = TextOut::new(vec![word.clone()], vec![]);
        let (d1, e1) = out.push(101);
        assert!(e1.is_none());
        let (d2, e2) = out.push(tok);
        assert_eq!(e2, Some(Ending::StopString(word.clone())));
        assert_eq!(format!("{d1}{d2}"), token_text(101));
        assert!(!out.text.contains(&word));
    }

    #[test]
    fn text_is_held_back_only_as_long_as_a_stop_could_still_match() {
        let mut out = TextOut::new(vec!["zzzzzzzz-never".into()], vec![]);
        let mut shown = String::new();
        for t in 10..30 {
            shown.push_str(&out.push(t).0);
        }
        shown.push_str(&out.flush());
        assert_eq!(shown, out.text);
        assert_eq!(out.tokens, 20);
        let _ = tokenize(&shown);
    }

    #[test]
    fn stop_token_ends_with_its_id() {
        let mut out = TextOut::new(vec![], vec![7]);
        assert_eq!(out.push(7).1, Some(Ending::StopToken(7)));
    }
}
