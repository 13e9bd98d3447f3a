//! What the router reads from a generation request, and the body each leg gets.
//!
//! - `check`: the fields a decode would reject but a prefill never sees (the prefill leg
//!   overrides them) are checked first, with vLLM's messages, so no prefill KV is made for
//!   a request the decode will refuse. It also finds a list of prompts and `n`.
//! - `LegBodies`: the prefill body (PROTOCOLS.md §1), the decode body (the client's bytes
//!   plus the prefill's params), the colocated body. None of them carries a client's
//!   `kv_transfer_params` or `ec_transfer_params` (nor one smuggled in `vllm_xargs`): what
//!   a client sends never decides which host an engine connects to or which blocks it reads.
//! - `request_info`: what policies read (session key, prompt start).

pub mod body;
mod scan;

use std::ops::Range;

use axum::http::HeaderMap;
use bytes::Bytes;
use serde_json::value::RawValue;
use serde_json::Value;

use crate::api::fields::{check_generation, validation_error, Api, Fields, Generation};
use crate::api::ApiError;
use crate::router::policy::{PromptStart, RequestInfo};
use crate::router::request::body::{ClientBody, Pieces};

/// Fields through which a client could steer a KV (or encoder cache) transfer.
const STEERING: &[&str] = &["kv_transfer_params", "ec_transfer_params"];

/// Fields the prefill leg replaces or drops (PROTOCOLS.md §1). `ignore_eos` is set and
/// `stop_token_ids` dropped so that the prefill's one token never finishes it as
/// FINISHED_STOPPED: the engine then always holds the prompt's KV for the decode, which
/// samples its own first token (and stops on EOS as the client asked). vLLM 0.32's
/// Mooncake prefill frees the KV on FINISHED_STOPPED, and its sender can wedge when the
/// decode already asked for it.
const PREFILL_OVERRIDES: &[&str] = &[
    "kv_transfer_params",
    "ec_transfer_params",
    "stream",
    "max_tokens",
    "max_completion_tokens",
    "stream_options",
    "min_tokens",
    "min_completion_tokens",
    "ignore_eos",
    "stop_token_ids",
];

/// The prefill leg's six-key params, serialised once.
pub(crate) static NIXL_PREFILL_PARAMS: std::sync::LazyLock<Vec<u8>> = std::sync::LazyLock::new(crate::api::kv_params::nixl_prefill);

/// The checked facts of a request.
#[derive(Debug)]
pub(crate) struct Shape {
    pub(crate) gen: Generation,
    /// A completions prompt given as a list of prompts: the byte range of each in the body.
    pub(crate) prompts: Option<Vec<Range<usize>>>,
}

impl Shape {
    /// How many generations (pairs, in PD mode) the request makes.
    pub(crate) fn generations(&self) -> usize {
        self.prompts.as_ref().map_or(1, Vec::len) * self.gen.n as usize
    }
}

const GENERATION_FIELDS: &[&str] =
    &["max_tokens", "max_completion_tokens", "min_tokens", "n", "seed", "temperature", "stream", "stream_options", "kv_transfer_params"];

pub(crate) fn check(api: Api, body: &ClientBody) -> Result<Shape, ApiError> {
    let gen = check_generation(api, &body.subset(GENERATION_FIELDS)?)?;
    // Decoded for every leg (steering keys are taken out of it): it must decode.
    body.value("vllm_xargs")?;
    let prompts = match api {
        Api::Completions => prompt_list(body),
        Api::Chat => None,
    };
    Ok(Shape { gen, prompts })
}

/// What PD cannot answer as one instance would: a decode takes the prompt's KV from the
/// prefill and computes none of the prompt, so it has no prompt logprobs to give
/// (`prompt_logprobs`, or completions' `echo` with `logprobs`). Refused before any prefill.
pub(crate) fn check_pd(body: &ClientBody) -> Result<(), ApiError> {
    let fields = body.subset(&["prompt_logprobs", "echo", "logprobs"])?;
    let f = Fields::body(&fields);
    let why = "in PD serving the decode takes the prompt's KV from the prefill and computes no prompt logprobs; \
               send it to a colocated instance, or drop the field";
    if f.get("prompt_logprobs").is_some() {
        return Err(ApiError::bad_request(format!("prompt_logprobs: {why}")).param("prompt_logprobs"));
    }
    if f.boolean("echo")? == Some(true) && f.get("logprobs").is_some_and(|v| v != &Value::Bool(false)) {
        return Err(ApiError::bad_request(format!("echo with logprobs asks for the prompt's logprobs: {why}")).param("echo"));
    }
    Ok(())
}

/// A Messages request (vLLM's AnthropicMessagesRequest): the fields the prefill leg
/// overrides or vLLM skips on it are checked first: `max_tokens` (required, positive; the
/// prefill leg sends 1) and the thinking budget (below `max_tokens`; vLLM does not check
/// it on a leg with `do_remote_decode`). One generation, always.
pub(crate) fn check_messages(body: &ClientBody) -> Result<Shape, ApiError> {
    let fields = body.subset(&["max_tokens", "stream", "thinking", "kv_transfer_params"])?;
    let f = Fields::body(&fields);
    let max_tokens = f.int("max_tokens")?.ok_or_else(|| validation_error("body.max_tokens", "missing", "Field required", &Value::Null))?;
    if max_tokens <= 0 {
        let input = &fields["max_tokens"];
        return Err(validation_error("body.max_tokens", "value_error", "Value error, max_tokens must be positive", input));
    }
    let stream = f.boolean("stream")?.unwrap_or(false);
    f.dict("kv_transfer_params")?;
    if let Some(thinking) = f.model("thinking")? {
        let thinking = Fields { map: thinking.map, loc: "body.thinking" };
        if thinking.get("type").and_then(Value::as_str) == Some("enabled") {
            let budget = thinking.int("budget_tokens")?.unwrap_or(0);
            if budget >= max_tokens {
                return Err(validation_error(
                    "body",
                    "value_error",
                    "Value error, thinking.budget_tokens must be less than max_tokens",
                    &Value::Object(fields.clone()),
                ));
            }
        }
    }
    body.value("vllm_xargs")?;
    let gen = Generation { stream, n: 1, max_tokens: Some(max_tokens), seed: None, include_usage: false, continuous_usage: false };
    Ok(Shape { gen, prompts: None })
}

/// A Responses request (vLLM's ResponsesRequest), after the router wrote its history in
/// (router/responses/): `max_output_tokens` (the prefill leg sends 1) must be at least 1,
/// as vLLM's SamplingParams checks it on the decode. One generation, always.
pub(crate) fn check_responses(body: &ClientBody) -> Result<Shape, ApiError> {
    let fields = body.subset(&["max_output_tokens", "stream", "kv_transfer_params"])?;
    let f = Fields::body(&fields);
    let max_tokens = f.int("max_output_tokens")?;
    if let Some(m) = max_tokens.filter(|m| *m < 1) {
        return Err(ApiError::bad_request(format!("max_tokens must be at least 1, got {m}.")).param("max_output_tokens"));
    }
    let stream = f.boolean("stream")?.unwrap_or(false);
    f.dict("kv_transfer_params")?;
    body.value("vllm_xargs")?;
    let gen = Generation { stream, n: 1, max_tokens, seed: None, include_usage: false, continuous_usage: false };
    Ok(Shape { gen, prompts: None })
}

/// Which API's fields the prefill leg overrides.
pub(crate) enum LegShape {
    /// Completions and chat: `max_tokens` 1, `ignore_eos`.
    OpenAi,
    /// Messages: `max_tokens` 1; no `ignore_eos` (vLLM builds its chat request field by field).
    Anthropic,
    /// Responses: `max_output_tokens` 1, `ignore_eos`.
    Responses,
    /// `/inference/v1/generate`: the caps live in `sampling_params`, rewritten once here.
    TokensOut { prefill_sampling: Vec<u8> },
}

/// Sampling fields the tokens-out prefill leg drops.
const PREFILL_SAMPLING_DROPS: &[&str] = &["min_tokens", "stop_token_ids", "n", "output_kind"];

/// `/inference/v1/generate` (vLLM's GenerateRequest): `sampling_params` must be an object;
/// its `max_tokens` (the prefill leg sends 1), `min_tokens` and `n` are checked as vLLM's
/// SamplingParams does, and `n` above 1 is refused (PD runs one generation per request
/// here). Returns the shape and the prefill leg's `sampling_params`.
pub(crate) fn check_tokens_out(body: &ClientBody) -> Result<(Shape, LegShape), ApiError> {
    let top = body.subset(&["stream", "stream_options", "kv_transfer_params"])?;
    let f = Fields::body(&top);
    let stream = f.boolean("stream")?.unwrap_or(false);
    f.dict("kv_transfer_params")?;
    let mut sampling = match body.value("sampling_params")? {
        Some(Value::Object(m)) => m,
        other => {
            let input = other.unwrap_or(Value::Null);
            return Err(validation_error(
                "body.sampling_params",
                "model_attributes_type",
                "Input should be a valid dictionary or object to extract fields from",
                &input,
            ));
        }
    };
    let s = Fields { map: &sampling, loc: "body.sampling_params" };
    let max_tokens = s.int("max_tokens")?;
    let min_tokens = s.int("min_tokens")?.unwrap_or(0);
    let n = s.int("n")?.unwrap_or(1);
    if let Some(m) = max_tokens.filter(|m| *m < 1) {
        return Err(ApiError::bad_request(format!("max_tokens must be at least 1, got {m}.")));
    }
    if let Some(m) = max_tokens.filter(|m| min_tokens > *m) {
        return Err(ApiError::bad_request(format!("min_tokens must be less than or equal to max_tokens={m}, got {min_tokens}.")));
    }
    if n != 1 {
        return Err(ApiError::bad_request(format!(
            "sampling_params.n is {n}: disagg route runs one generation per /inference/v1/generate request; send n = 1 (or one request per sample)"
        ))
        .param("sampling_params.n"));
    }
    body.value("vllm_xargs")?;
    for k in PREFILL_SAMPLING_DROPS {
        sampling.remove(*k);
    }
    sampling.insert("max_tokens".into(), Value::from(1));
    sampling.insert("ignore_eos".into(), Value::Bool(true));
    let prefill_sampling = serde_json::to_vec(&sampling).expect("a map serialises");
    let gen = Generation { stream, n: 1, max_tokens, seed: None, include_usage: false, continuous_usage: false };
    Ok((Shape { gen, prompts: None }, LegShape::TokensOut { prefill_sampling }))
}

/// The prompts of `prompt: [A, B, ...]` (strings or token-id lists), when more than one.
fn prompt_list(body: &ClientBody) -> Option<Vec<Range<usize>>> {
    let raw = body.get("prompt")?;
    if raw.first() != Some(&b'[') || first_item_is_number(raw) {
        // One prompt of token ids: not scanned item by item (it may be 100k of them).
        return None;
    }
    let items: Vec<&RawValue> = serde_json::from_slice(raw).ok()?;
    let is_prompt = |r: &&RawValue| matches!(r.get().as_bytes().first(), Some(b'"' | b'['));
    if items.len() < 2 || !items.iter().all(is_prompt) {
        return None;
    }
    let base = body.raw().as_ptr() as usize;
    Some(items.iter().map(|r| (r.get().as_ptr() as usize - base)..(r.get().as_ptr() as usize - base + r.get().len())).collect())
}

/// Whether a JSON array's first item is a number (`[12, ...`).
fn first_item_is_number(raw: &[u8]) -> bool {
    raw.iter().skip(1).find(|b| !b.is_ascii_whitespace()).is_some_and(|b| b.is_ascii_digit() || *b == b'-')
}

/// The first `max` token ids of a prompt that is one flat array of non-negative integers
/// (`[12, 7, ...]`), read without decoding the rest; None for any other shape.
pub(crate) fn leading_token_ids(raw: &[u8], max: usize) -> Option<Vec<u32>> {
    if raw.first() != Some(&b'[') || !first_item_is_number(raw) {
        return None;
    }
    let mut ids = Vec::with_capacity(max.min(raw.len() / 2));
    let mut i = 1;
    loop {
        while raw.get(i).is_some_and(u8::is_ascii_whitespace) {
            i += 1;
        }
        let start = i;
        while raw.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        ids.push(std::str::from_utf8(&raw[start..i]).ok()?.parse::<u32>().ok()?);
        if ids.len() >= max {
            return Some(ids);
        }
        while raw.get(i).is_some_and(u8::is_ascii_whitespace) {
            i += 1;
        }
        match raw.get(i) {
            Some(b',') => i += 1,
            Some(b']') => return Some(ids),
            _ => return None,
        }
    }
}

/// How each leg's body is written from one (sub-)request.
pub struct LegBodies {
    body: ClientBody,
    /// Which API's fields the prefill leg overrides.
    shape: LegShape,
    /// `vllm_xargs` with the steering keys taken out, when it had any.
    xargs: Option<Vec<u8>>,
    priority: LegPriority,
}

/// What the legs say of the request's `priority` (flow control).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) enum LegPriority {
    /// The client's field as it is (the router does not order by priority).
    #[default]
    AsSent,
    /// The priority the router resolved for the request's tenant, its JSON.
    Set(Vec<u8>),
}

impl LegBodies {
    pub fn new(body: ClientBody) -> Self {
        LegBodies::shaped(body, LegShape::OpenAi)
    }

    pub(crate) fn shaped(body: ClientBody, shape: LegShape) -> Self {
        // `check` refused a request whose vllm_xargs does not decode.
        let xargs = body.hint("vllm_xargs").and_then(|v| match v {
            Value::Object(mut m) if STEERING.iter().any(|k| m.contains_key(*k)) => {
                for k in STEERING {
                    m.remove(*k);
                }
                Some(serde_json::to_vec(&m).expect("a map serialises"))
            }
            _ => None,
        });
        LegBodies { body, shape, xargs, priority: LegPriority::AsSent }
    }

    /// The legs with `priority` as flow control resolved it.
    pub(crate) fn with_priority(mut self, priority: LegPriority) -> Self {
        self.priority = priority;
        self
    }

    fn write<'a>(&'a self, drop: &[&str], set: &mut Vec<(&'a str, &'a [u8])>) -> Pieces {
        let mut drop = std::borrow::Cow::Borrowed(drop);
        if let Some(x) = &self.xargs {
            drop.to_mut().push("vllm_xargs");
            set.push(("vllm_xargs", x));
        }
        if let LegPriority::Set(p) = &self.priority {
            set.push(("priority", p));
        }
        self.body.pieces_with(&drop, set)
    }

    /// The prefill leg: `stream:false`, `max_tokens:1`, `max_completion_tokens:1` only if
    /// present, `ignore_eos:true`, no `stream_options`/`min_tokens`/`min_completion_tokens`/
    /// `stop_token_ids`, the six-key params.
    pub fn prefill(&self) -> Pieces {
        self.prefill_leg(Some(&NIXL_PREFILL_PARAMS))
    }

    /// The prefill leg as `prefill`, with the connector's params (NIXL's six keys,
    /// Mooncake's transfer id) or none (P2pNccl's engines find their peer by request id).
    pub(crate) fn prefill_leg(&self, params: Option<&[u8]>) -> Pieces {
        let mut set: Vec<(&str, &[u8])> = vec![("stream", b"false")];
        match &self.shape {
            LegShape::OpenAi => set.extend([("max_tokens", b"1".as_slice()), ("ignore_eos", b"true")]),
            LegShape::Anthropic => set.push(("max_tokens", b"1")),
            // A field set here replaces the client's (`pieces_with`): nothing more to drop.
            LegShape::Responses => set.extend([("max_output_tokens", b"1".as_slice()), ("ignore_eos", b"true")]),
            LegShape::TokensOut { prefill_sampling } => set.push(("sampling_params", prefill_sampling)),
        }
        if let Some(p) = params {
            set.push(("kv_transfer_params", p));
        }
        if self.body.has("max_completion_tokens") {
            set.push(("max_completion_tokens", b"1"));
        }
        self.write(PREFILL_OVERRIDES, &mut set)
    }

    /// The decode leg: the client's bytes, with the prefill's params (copied unchanged)
    /// when it returned any.
    pub fn decode(&self, params: Option<&[u8]>) -> Pieces {
        let mut set = Vec::new();
        if let Some(p) = params {
            set.push(("kv_transfer_params", p));
        }
        self.write(STEERING, &mut set)
    }

    /// The one leg of colocated mode.
    pub fn colocated(&self) -> Pieces {
        self.write(STEERING, &mut Vec::new())
    }
}

/// The session key and prompt start a policy may use (at most `max_units` of it).
pub(crate) fn request_info(
    headers: &HeaderMap,
    body: &ClientBody,
    tokenizer: Option<&tokenizers::Tokenizer>,
    max_units: usize,
) -> RequestInfo {
    let session = ["x-session-id", "x-user-id"]
        .iter()
        .find_map(|h| headers.get(*h).and_then(|v| v.to_str().ok()).filter(|s| !s.is_empty()).map(str::to_owned))
        .or_else(|| body.hint("user").and_then(|v| v.as_str().filter(|s| !s.is_empty()).map(str::to_owned)));
    let mut text = String::new();
    let mut ids: Vec<u32> = Vec::new();
    // Characters beyond what is indexed are never looked at (a tokenizer may need a few more).
    let char_cap = max_units.saturating_mul(if tokenizer.is_some() { 8 } else { 1 });
    let push = |text: &mut String, s: &str| {
        let room = char_cap.saturating_sub(text.len());
        let mut end = s.len().min(room);
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        text.push_str(&s[..end]);
    };
    // A flat list of token ids: only the ids indexed are read; other prompts are decoded.
    // (/inference/v1/generate names its prompt `token_ids`.)
    let prompt = match body.get("prompt").or_else(|| body.get("token_ids")).and_then(|raw| leading_token_ids(raw, max_units)) {
        Some(leading) => {
            ids = leading;
            None
        }
        None => body.hint("prompt"),
    };
    match prompt {
        Some(Value::String(s)) => push(&mut text, &s),
        Some(Value::Array(items)) => {
            for item in items {
                match item {
                    Value::String(s) => push(&mut text, &s),
                    Value::Number(n) => ids.extend(n.as_u64().map(|n| n as u32)),
                    Value::Array(inner) => ids.extend(inner.iter().filter_map(Value::as_u64).map(|n| n as u32)),
                    _ => {}
                }
                if ids.len() >= max_units {
                    break;
                }
            }
        }
        _ => {}
    }
    // Responses: the instructions, then `input` (a string, or items as messages).
    if let Some(Value::String(s)) = body.hint("instructions") {
        push(&mut text, &s);
    }
    let messages = match body.hint("input") {
        Some(Value::String(s)) => {
            push(&mut text, &s);
            None
        }
        Some(Value::Array(items)) => Some(items),
        _ => body.hint("messages").and_then(|m| match m {
            Value::Array(m) => Some(m),
            _ => None,
        }),
    };
    if let Some(msgs) = messages {
        for m in &msgs {
            if let Some(role) = m.get("role").and_then(Value::as_str) {
                push(&mut text, role);
                push(&mut text, "\n");
            }
            match m.get("content") {
                Some(Value::String(s)) => push(&mut text, s),
                Some(Value::Array(parts)) => {
                    for p in parts {
                        if let Some(t) = p.get("text").and_then(Value::as_str) {
                            push(&mut text, t);
                        }
                    }
                }
                _ => {}
            }
            push(&mut text, "\n");
        }
    }
    if let Some(tok) = tokenizer {
        if !text.is_empty() {
            if let Ok(enc) = tok.encode(text.as_str(), false) {
                ids.extend_from_slice(enc.get_ids());
            }
        }
    }
    ids.truncate(max_units);
    if ids.is_empty() {
        let mut prompt = text.into_bytes();
        prompt.truncate(max_units);
        RequestInfo::new(session, PromptStart::Text(prompt))
    } else {
        RequestInfo::new(session, PromptStart::Tokens(ids))
    }
}

/// The sub-request bodies of a request that fans out: one per prompt of a list and per
/// choice of `n`, each with one prompt and `n` 1. vLLM seeds choice `j` with `seed + j`,
/// so a sub-request gets that seed and samples what the choice would have.
pub(crate) fn split(body: &ClientBody, shape: &Shape) -> Vec<Bytes> {
    let n = shape.gen.n as i128;
    let prompts: Vec<Option<&[u8]>> = match &shape.prompts {
        Some(ranges) => ranges.iter().map(|r| Some(&body.raw()[r.clone()])).collect(),
        None => vec![None],
    };
    let mut out = Vec::with_capacity(prompts.len() * n as usize);
    for prompt in &prompts {
        for j in 0..n {
            let seed = shape.gen.seed.filter(|_| n > 1).map(|s| (i128::from(s) + j).to_string());
            let mut set: Vec<(&str, &[u8])> = Vec::new();
            if let Some(p) = prompt {
                set.push(("prompt", p));
            }
            if let Some(s) = &seed {
                set.push(("seed", s.as_bytes()));
            }
            out.push(body.with_fields(&["n"], &set));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leading_token_ids_read_only_what_is_asked_and_only_flat_integer_lists() {
        assert_eq!(leading_token_ids(b"[5, 6 ,7]", 10), Some(vec![5, 6, 7]));
        assert_eq!(leading_token_ids(b"[ 5,6,7,8]", 2), Some(vec![5, 6]));
        assert_eq!(leading_token_ids(b"[5, 6, \"x\"]", 10), None, "not all integers");
        assert_eq!(leading_token_ids(b"[5, 6, \"x\"]", 2), Some(vec![5, 6]), "the rest is not read");
        assert_eq!(leading_token_ids(b"[-1, 2]", 10), None);
        assert_eq!(leading_token_ids(b"[[1, 2]]", 10), None);
        assert_eq!(leading_token_ids(b"[\"a\", \"b\"]", 10), None);
        assert_eq!(leading_token_ids(b"[99999999999]", 10), None, "beyond u32");
        assert_eq!(leading_token_ids(b"\"text\"", 10), None);
    }
    use crate::api::fields::Api;
    use serde_json::json;

    fn body(v: Value) -> ClientBody {
        ClientBody::parse(Bytes::from(serde_json::to_vec(&v).unwrap())).unwrap()
    }

    #[test]
    fn prefill_leg_is_the_toy_proxys() {
        let b = body(json!({"model":"m","prompt":"p","max_tokens":50,"max_completion_tokens":50,"stream":true,
            "stream_options":{"include_usage":true},"min_tokens":3,"min_completion_tokens":2,"temperature":0.5,"x_custom":[1]}));
        let out: Value = serde_json::from_slice(&LegBodies::new(b).prefill().to_bytes()).unwrap();
        assert_eq!(out["stream"], false);
        assert_eq!(out["max_tokens"], 1);
        assert_eq!(out["max_completion_tokens"], 1);
        assert!(out.get("stream_options").is_none() && out.get("min_tokens").is_none() && out.get("min_completion_tokens").is_none());
        assert_eq!(out["kv_transfer_params"].as_object().unwrap().len(), 6);
        assert_eq!(out["kv_transfer_params"]["do_remote_decode"], true);
        assert_eq!(out["temperature"], 0.5);
        assert_eq!(out["x_custom"], json!([1]));
        let plain: Value = serde_json::from_slice(&LegBodies::new(body(json!({"prompt": "p"}))).prefill().to_bytes()).unwrap();
        assert!(plain.get("max_completion_tokens").is_none(), "only if the client sent it");
    }

    #[test]
    fn no_leg_carries_a_clients_transfer_params() {
        let evil = json!({"remote_host": "10.9.9.9", "remote_port": 7, "do_remote_prefill": true});
        let b = LegBodies::new(body(json!({"prompt": "p", "kv_transfer_params": evil, "ec_transfer_params": {"x": 1},
            "vllm_xargs": {"kv_transfer_params": "x", "keep": 1}})));
        for leg in [b.prefill(), b.decode(None), b.colocated()].map(|p| p.to_bytes()) {
            let v: Value = serde_json::from_slice(&leg).unwrap();
            assert!(!leg.windows(8).any(|w| w == b"10.9.9.9"), "{v}");
            assert!(v.get("ec_transfer_params").is_none());
            assert_eq!(v["vllm_xargs"], json!({"keep": 1}));
        }
        let params = br#"{"do_remote_prefill":true,"remote_host":"127.0.0.1"}"#;
        let v: Value = serde_json::from_slice(&b.decode(Some(params)).to_bytes()).unwrap();
        assert_eq!(v["kv_transfer_params"]["remote_host"], "127.0.0.1");
    }

    #[test]
    fn prompt_lists_and_n_split_into_single_generations() {
        let b = body(json!({"prompt": ["a b", [1, 2]], "n": 2, "seed": 7, "temperature": 0.8}));
        let shape = check(Api::Completions, &b).unwrap();
        assert_eq!(shape.generations(), 4);
        let subs: Vec<Value> = split(&b, &shape).iter().map(|s| serde_json::from_slice(s).unwrap()).collect();
        assert_eq!(subs[0]["prompt"], "a b");
        assert_eq!(subs[1]["prompt"], "a b");
        assert_eq!(subs[2]["prompt"], json!([1, 2]));
        assert_eq!((subs[0]["seed"].clone(), subs[1]["seed"].clone(), subs[3]["seed"].clone()), (json!(7), json!(8), json!(8)));
        assert!(subs.iter().all(|s| s.get("n").is_none()));
        // One prompt in a list, or token ids, is one generation.
        for p in [json!(["a"]), json!([1, 2, 3]), json!("a")] {
            assert_eq!(check(Api::Completions, &body(json!({"prompt": p}))).unwrap().generations(), 1);
        }
    }
}
