//! One benchmark request, timed as `vllm bench serve` times it: TTFT at the first SSE
//! message with non-empty `choices`, ITL between such messages, E2EL at the last one;
//! output tokens from `usage.completion_tokens`, which also corrects the prompt length.
//! Anthropic's Messages stream (`--backend anthropic-messages`) the same way: its
//! `message_start` (written from the chat stream's role delta) and `content_block_delta`
//! events are the chunks, `message_delta`'s usage the counts. The Responses stream
//! (`--backend openai-responses`) as vLLM's bench reads it: text and reasoning deltas are
//! the chunks, `response.completed`'s usage the counts, and a stream without that terminal
//! event fails.

use std::time::Instant;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::args::Backend;
use super::dataset::{Prompt, SampleRequest};
use crate::api::sse::{data_of, EventSplitter};

/// The result of one request, as vLLM's RequestFuncOutput.
#[derive(Debug, Clone, Default)]
pub(crate) struct Output {
    pub(crate) success: bool,
    /// Seconds from the run's start to this request's send.
    pub(crate) start_time: f64,
    pub(crate) ttft: f64,
    pub(crate) itl: Vec<f64>,
    pub(crate) latency: f64,
    pub(crate) prompt_len: usize,
    pub(crate) output_tokens: Option<usize>,
    /// `usage.prompt_tokens_details.cached_tokens`, where the server reports it.
    pub(crate) cached_tokens: Option<usize>,
    /// The workers that served it, where the router names them (`disagg route
    /// --worker-headers`: `x-disagg-prefill`, `x-disagg-decode`).
    pub(crate) prefill: Option<String>,
    pub(crate) decode: Option<String>,
    pub(crate) generated_text: String,
    pub(crate) error: String,
}

impl Output {
    /// Multiplies every time by `k`: wall time against a simulator sped up K times back
    /// to simulated time.
    pub(crate) fn scale_time(&mut self, k: f64) {
        self.start_time *= k;
        self.ttft *= k;
        self.latency *= k;
        self.itl.iter_mut().for_each(|g| *g *= k);
    }

    /// When each output chunk arrived, in seconds from the run's start.
    pub(crate) fn token_times(&self) -> impl Iterator<Item = f64> + '_ {
        let first = self.start_time + self.ttft;
        std::iter::once(first).chain(self.itl.iter().scan(first, |t, gap| {
            *t += gap;
            Some(*t)
        }))
    }
}

/// What every request of a run shares.
pub(crate) struct RequestConfig {
    pub(crate) api_url: String,
    pub(crate) backend: Backend,
    pub(crate) model: String,
    pub(crate) ignore_eos: bool,
    pub(crate) sampling: Map<String, Value>,
    pub(crate) headers: Vec<(String, String)>,
}

#[derive(Deserialize)]
struct Chunk {
    #[serde(default)]
    choices: Vec<Choice>,
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct Choice {
    text: Option<String>,
    delta: Option<Delta>,
}

#[derive(Deserialize)]
struct Delta {
    content: Option<String>,
}

#[derive(Deserialize)]
struct Usage {
    completion_tokens: Option<usize>,
    prompt_tokens: Option<usize>,
    prompt_tokens_details: Option<Details>,
}

#[derive(Deserialize)]
struct Details {
    cached_tokens: Option<usize>,
}

/// One event of Anthropic's Messages stream, as far as the bench reads it.
#[derive(Deserialize)]
struct MessagesEvent {
    #[serde(rename = "type")]
    kind: String,
    delta: Option<MessagesDelta>,
    usage: Option<MessagesUsage>,
    error: Option<Value>,
}

#[derive(Deserialize)]
struct MessagesDelta {
    text: Option<String>,
}

#[derive(Deserialize)]
struct MessagesUsage {
    input_tokens: Option<usize>,
    output_tokens: Option<usize>,
    cache_read_input_tokens: Option<usize>,
}

#[derive(Deserialize)]
struct ResponsesEvent {
    #[serde(rename = "type")]
    kind: String,
    delta: Option<String>,
    response: Option<ResponsesObject>,
}

#[derive(Deserialize)]
struct ResponsesObject {
    usage: Option<ResponsesUsage>,
}

#[derive(Deserialize)]
struct ResponsesUsage {
    input_tokens: Option<usize>,
    output_tokens: Option<usize>,
    input_tokens_details: Option<Details>,
}

/// What one stream event brings: output text (a token chunk), usage, the end of a
/// Responses stream (with its usage), or an error.
enum Seen {
    Text(String),
    Usage { output: Option<usize>, prompt: Option<usize>, cached: Option<usize> },
    Finished { output: Option<usize>, prompt: Option<usize>, cached: Option<usize> },
    Failed(String),
    Nothing,
}

/// An event's data as the backend's stream shapes it.
fn read_event(backend: Backend, data: &str) -> Seen {
    if backend == Backend::AnthropicMessages {
        let Ok(e) = serde_json::from_str::<MessagesEvent>(data) else { return Seen::Nothing };
        let prompt = |u: &MessagesUsage| u.input_tokens.map(|i| i + u.cache_read_input_tokens.unwrap_or(0));
        return match e.kind.as_str() {
            "content_block_delta" => e.delta.and_then(|d| d.text).map_or(Seen::Nothing, Seen::Text),
            "message_delta" => e.usage.map_or(Seen::Nothing, |u| Seen::Usage {
                output: u.output_tokens,
                prompt: prompt(&u),
                cached: u.cache_read_input_tokens,
            }),
            // vLLM writes it from the chat stream's first chunk (the role delta, which is
            // where vllm bench serve takes a chat request's TTFT): the first chunk here too.
            "message_start" => Seen::Text(String::new()),
            "error" => Seen::Failed(e.error.map_or_else(|| "an error event".into(), |v| v.to_string())),
            _ => Seen::Nothing,
        };
    }
    if backend == Backend::OpenaiResponses {
        // vLLM bench's async_request_openai_responses: token deltas (text and reasoning)
        // time the stream; completed / incomplete end it with usage; error / failed fail it.
        let Ok(e) = serde_json::from_str::<ResponsesEvent>(data) else { return Seen::Nothing };
        return match e.kind.as_str() {
            "response.output_text.delta" => Seen::Text(e.delta.unwrap_or_default()),
            "response.reasoning_text.delta" => Seen::Text(String::new()),
            "response.completed" | "response.incomplete" => {
                let u = e.response.and_then(|r| r.usage);
                Seen::Finished {
                    output: u.as_ref().and_then(|u| u.output_tokens),
                    prompt: u.as_ref().and_then(|u| u.input_tokens),
                    cached: u.and_then(|u| u.input_tokens_details).and_then(|d| d.cached_tokens),
                }
            }
            "error" | "response.failed" => Seen::Failed(data.to_string()),
            _ => Seen::Nothing,
        };
    }
    if data == "[DONE]" {
        return Seen::Nothing;
    }
    let Ok(c) = serde_json::from_str::<Chunk>(data) else { return Seen::Nothing };
    if let Some(choice) = c.choices.first() {
        let text = choice.text.as_deref().or(choice.delta.as_ref().and_then(|d| d.content.as_deref()));
        return Seen::Text(text.unwrap_or("").to_string());
    }
    match c.usage {
        Some(u) => Seen::Usage {
            output: u.completion_tokens,
            prompt: u.prompt_tokens,
            cached: u.prompt_tokens_details.and_then(|d| d.cached_tokens),
        },
        None => Seen::Nothing,
    }
}

pub(crate) fn payload(cfg: &RequestConfig, req: &SampleRequest) -> Value {
    let mut p = match cfg.backend {
        Backend::OpenaiChat => json!({
            "model": cfg.model, "messages": [{"role": "user", "content": match &req.prompt {
                Prompt::Text(t) => t.as_str(),
                Prompt::Tokens(_) => unreachable!("token-id prompts are refused for chat at start"),
            }}],
            "max_completion_tokens": req.output_len, "stream": true, "stream_options": {"include_usage": true},
        }),
        Backend::AnthropicMessages => json!({
            "model": cfg.model, "messages": [{"role": "user", "content": match &req.prompt {
                Prompt::Text(t) => t.as_str(),
                Prompt::Tokens(_) => unreachable!("token-id prompts are refused for messages at start"),
            }}],
            "max_tokens": req.output_len, "stream": true,
        }),
        Backend::OpenaiResponses => json!({
            "model": cfg.model, "input": match &req.prompt {
                Prompt::Text(t) => t.as_str(),
                Prompt::Tokens(_) => unreachable!("token-id prompts are refused for responses at start"),
            },
            "max_output_tokens": req.output_len, "stream": true, "store": false,
        }),
        Backend::Openai | Backend::Vllm => json!({
            "model": cfg.model, "prompt": req.prompt, "repetition_penalty": 1.0, "max_tokens": req.output_len,
            "logprobs": null, "stream": true, "stream_options": {"include_usage": true},
        }),
    };
    if cfg.ignore_eos {
        p["ignore_eos"] = json!(true);
    }
    for (k, v) in &cfg.sampling {
        p[k] = v.clone();
    }
    p
}

pub(crate) async fn send(
    client: &reqwest::Client,
    cfg: &RequestConfig,
    req: &SampleRequest,
    request_id: &str,
    run_start: Instant,
) -> Output {
    let body = Bytes::from(serde_json::to_vec(&payload(cfg, req)).expect("JSON"));
    let mut out = Output { prompt_len: req.prompt_len, ..Output::default() };
    let mut b = client.post(&cfg.api_url).header("content-type", "application/json").header("x-request-id", request_id).body(body);
    for (k, v) in &cfg.headers {
        b = b.header(k, v);
    }
    let st = Instant::now();
    out.start_time = st.duration_since(run_start).as_secs_f64();
    let mut last = st;
    let mut first = false;
    let mut finished = false;
    let result: Result<(), String> = async {
        let mut resp = b.send().await.map_err(|e| e.to_string())?;
        if !resp.status().is_success() {
            return Err(resp.status().canonical_reason().unwrap_or("error").to_string());
        }
        let header = |name: &str| resp.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
        (out.prefill, out.decode) = (header("x-disagg-prefill"), header("x-disagg-decode"));
        let mut splitter = EventSplitter::default();
        while let Some(chunk) = resp.chunk().await.map_err(|e| e.to_string())? {
            for event in splitter.push(&chunk).map_err(|e| e.to_string())? {
                let Some(data) = data_of(&event) else { continue };
                match read_event(cfg.backend, &data) {
                    Seen::Text(text) => {
                        let now = Instant::now();
                        if first {
                            out.itl.push(now.duration_since(last).as_secs_f64());
                        } else {
                            first = true;
                            out.ttft = now.duration_since(st).as_secs_f64();
                        }
                        last = now;
                        out.generated_text.push_str(&text);
                    }
                    Seen::Usage { output, prompt, cached } => {
                        out.output_tokens = output.or(out.output_tokens);
                        out.cached_tokens = cached.or(out.cached_tokens);
                        if let Some(p) = prompt {
                            out.prompt_len = p;
                        }
                    }
                    Seen::Finished { output, prompt, cached } => {
                        finished = true;
                        out.output_tokens = output.or(out.output_tokens);
                        out.cached_tokens = cached.or(out.cached_tokens);
                        if let Some(p) = prompt {
                            out.prompt_len = p;
                        }
                    }
                    Seen::Failed(e) => return Err(e),
                    Seen::Nothing => {}
                }
            }
        }
        Ok(())
    }
    .await;
    match result {
        Ok(()) if first && cfg.backend == Backend::OpenaiResponses && !finished => {
            out.error = "Stream ended without a terminal event.This response will be marked as failed!".into()
        }
        Ok(()) if first => out.success = true,
        Ok(()) => out.error = "Never received a valid chunk to calculate TTFT. This response will be marked as failed!".into(),
        Err(e) => out.error = e,
    }
    out.latency = last.duration_since(st).as_secs_f64();
    out
}
