//! Turns a completions or chat body into what the engine needs, with vLLM's checks and
//! vLLM's messages. Fields the simulator does not model are ignored, as vLLM ignores
//! unknown fields.

use serde_json::{Map, Value};

use super::tokens::{self, Generator, BOS};
use crate::api::{validation_error, ApiError, ErrorKind};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Api {
    Completions,
    Chat,
}

/// Where the prompt's KV comes from and goes to (PROTOCOLS.md §1).
#[derive(Clone, Debug, PartialEq)]
pub enum KvRequest {
    /// Plain serving.
    Local,
    /// `do_remote_decode`: compute the prompt, then hold its blocks for a decode to pull.
    RemoteDecode,
    /// `do_remote_prefill`: pull the prompt's blocks from a prefill, then decode.
    RemotePrefill(RemoteKv),
}

/// The prefill's answer that a decode pulls from.
#[derive(Clone, Debug, PartialEq)]
pub struct RemoteKv {
    pub engine_id: String,
    pub request_id: String,
    pub block_ids: Vec<u32>,
    pub host: String,
    pub port: u16,
    pub num_tokens: Option<usize>,
}

pub struct GenRequest {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub min_tokens: usize,
    pub ignore_eos: bool,
    pub stop: Vec<String>,
    pub stop_token_ids: Vec<u32>,
    pub stream: bool,
    pub include_usage: bool,
    pub continuous_usage: bool,
    pub kv: KvRequest,
    pub generator: Generator,
}

pub struct Limits<'a> {
    pub model: &'a str,
    pub max_model_len: usize,
}

/// Typed reads of optional fields; `null` counts as absent, as in vLLM's schema.
struct Fields<'a>(&'a Map<String, Value>);

impl<'a> Fields<'a> {
    fn get(&self, name: &str) -> Option<&'a Value> {
        self.0.get(name).filter(|v| !v.is_null())
    }

    fn int(&self, name: &str) -> Result<Option<i64>, ApiError> {
        let Some(v) = self.get(name) else { return Ok(None) };
        let parsed = match v {
            Value::Number(n) => n.as_i64().or_else(|| {
                n.as_f64().filter(|f| f.fract() == 0.0 && f.abs() < 9e15).map(|f| f as i64)
            }),
            Value::String(s) => s.trim().parse::<i64>().ok(),
            _ => None,
        };
        parsed.map(Some).ok_or_else(|| {
            validation_error(
                &format!("body.{name}"),
                if v.is_string() { "int_parsing" } else { "int_type" },
                "Input should be a valid integer",
                v,
            )
        })
    }

    fn boolean(&self, name: &str) -> Result<Option<bool>, ApiError> {
        let Some(v) = self.get(name) else { return Ok(None) };
        let parsed = match v {
            Value::Bool(b) => Some(*b),
            Value::Number(n) if n.as_i64() == Some(0) => Some(false),
            Value::Number(n) if n.as_i64() == Some(1) => Some(true),
            Value::String(s) => match s.to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" | "on" | "t" | "y" => Some(true),
                "false" | "0" | "no" | "off" | "f" | "n" => Some(false),
                _ => None,
            },
            _ => None,
        };
        parsed.map(Some).ok_or_else(|| {
            validation_error(&format!("body.{name}"), "bool_parsing", "Input should be a valid boolean", v)
        })
    }

    fn object(&self, name: &str) -> Result<Option<&'a Map<String, Value>>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Object(m)) => Ok(Some(m)),
            Some(v) => Err(validation_error(
                &format!("body.{name}"),
                "model_type",
                "Input should be a valid dictionary",
                v,
            )),
        }
    }

    fn strings(&self, name: &str) -> Result<Vec<String>, ApiError> {
        match self.get(name) {
            None => Ok(Vec::new()),
            Some(Value::String(s)) => Ok(vec![s.clone()]),
            Some(Value::Array(items)) => items
                .iter()
                .map(|i| {
                    i.as_str().map(str::to_owned).ok_or_else(|| {
                        validation_error(&format!("body.{name}"), "string_type", "Input should be a valid string", i)
                    })
                })
                .collect(),
            Some(v) => Err(validation_error(
                &format!("body.{name}"),
                "string_type",
                "Input should be a valid string or list of strings",
                v,
            )),
        }
    }

    fn token_ids(&self, name: &str) -> Result<Vec<u32>, ApiError> {
        match self.get(name) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|i| {
                    i.as_u64().and_then(|n| u32::try_from(n).ok()).ok_or_else(|| {
                        validation_error(&format!("body.{name}"), "int_type", "Input should be a valid integer", i)
                    })
                })
                .collect(),
            Some(v) => Err(validation_error(&format!("body.{name}"), "list_type", "Input should be a valid list", v)),
        }
    }
}

/// Checks the `model` field against the served model (vLLM answers 404).
pub fn check_model(body: &Map<String, Value>, served: &str) -> Result<(), ApiError> {
    match body.get("model") {
        None | Some(Value::Null) => Ok(()),
        Some(Value::String(m)) if m == served => Ok(()),
        Some(Value::String(m)) => Err(ApiError::new(
            ErrorKind::NotFound,
            format!("The model `{m}` does not exist. Valid aliases: {served}."),
        )
        .param("model")),
        Some(v) => Err(validation_error("body.model", "string_type", "Input should be a valid string", v)),
    }
}

/// The prompt's token ids: completions take a string or token ids (or a one-element
/// list of either); chat applies a fixed chat template to `messages`.
pub fn prompt_tokens(api: Api, body: &Map<String, Value>) -> Result<Vec<u32>, ApiError> {
    match api {
        Api::Completions => completion_prompt(body),
        Api::Chat => Ok(text_tokens(&chat_text(body)?)),
    }
}

fn text_tokens(text: &str) -> Vec<u32> {
    let mut t = vec![BOS];
    t.extend(tokens::tokenize(text));
    t
}

fn completion_prompt(body: &Map<String, Value>) -> Result<Vec<u32>, ApiError> {
    let missing = || {
        ApiError::bad_request("Either prompt or prompt_embeds must be provided and non-empty. (parameter=prompt)")
            .param("prompt")
    };
    let one_prompt = |v: &Value| -> Result<Vec<u32>, ApiError> {
        match v {
            Value::String(s) => Ok(text_tokens(s)),
            Value::Array(ids) if ids.iter().all(Value::is_u64) && !ids.is_empty() => {
                ids.iter().map(|i| token_id(i)).collect()
            }
            other => Err(validation_error(
                "body.prompt",
                "union_type",
                "Input should be a valid string, list of integers, or list of strings",
                other,
            )),
        }
    };
    match body.get("prompt") {
        None | Some(Value::Null) => Err(missing()),
        Some(Value::Array(items)) if items.is_empty() => Err(missing()),
        Some(Value::Array(items)) if items.iter().all(|i| i.is_string() || i.is_array()) => {
            if items.len() > 1 {
                return Err(ApiError::bad_request(
                    "disagg sim serves one prompt per request; send the batch as separate requests",
                )
                .param("prompt"));
            }
            one_prompt(&items[0])
        }
        Some(v) => one_prompt(v),
    }
}

fn token_id(v: &Value) -> Result<u32, ApiError> {
    v.as_u64().and_then(|n| u32::try_from(n).ok()).ok_or_else(|| {
        validation_error("body.prompt", "int_type", "Input should be a valid integer", v)
    })
}

/// The chat template of the simulator: `<|role|>\ncontent\n` per message, then
/// `<|assistant|>\n` (the shape of the tiny test model's template).
fn chat_text(body: &Map<String, Value>) -> Result<String, ApiError> {
    let msgs = match body.get("messages") {
        None | Some(Value::Null) => {
            return Err(validation_error("body.messages", "missing", "Field required", &Value::Null))
        }
        Some(Value::Array(m)) => m,
        Some(v) => return Err(validation_error("body.messages", "list_type", "Input should be a valid list", v)),
    };
    let mut text = String::new();
    for (i, m) in msgs.iter().enumerate() {
        let loc = format!("body.messages.{i}");
        let Some(obj) = m.as_object() else {
            return Err(validation_error(&loc, "model_type", "Input should be a valid dictionary", m));
        };
        let role = match obj.get("role") {
            Some(Value::String(r)) => r.as_str(),
            other => {
                return Err(validation_error(
                    &format!("{loc}.role"),
                    "missing",
                    "Field required",
                    other.unwrap_or(&Value::Null),
                ))
            }
        };
        text.push_str("<|");
        text.push_str(role);
        text.push_str("|>\n");
        match obj.get("content") {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) => text.push_str(s),
            Some(Value::Array(parts)) => {
                for p in parts {
                    if let Some(t) = p.get("text").and_then(Value::as_str) {
                        text.push_str(t);
                    }
                }
            }
            Some(v) => {
                return Err(validation_error(
                    &format!("{loc}.content"),
                    "string_type",
                    "Input should be a valid string",
                    v,
                ))
            }
        }
        text.push('\n');
    }
    text.push_str("<|assistant|>\n");
    Ok(text)
}

/// Parses and checks a generation request; `Err` carries vLLM's status and message.
pub fn parse(api: Api, body: &Map<String, Value>, limits: &Limits<'_>) -> Result<GenRequest, ApiError> {
    let f = Fields(body);
    check_model(body, limits.model)?;
    let prompt = prompt_tokens(api, body)?;

    let max_field = match api {
        Api::Chat if f.get("max_completion_tokens").is_some() => "max_completion_tokens",
        _ => "max_tokens",
    };
    let max_tokens = match f.int(max_field)? {
        Some(m) if m < 1 => {
            return Err(ApiError::bad_request(format!(
                "{max_field} must be at least 1, got {m}. (parameter={max_field}, value={m})"
            ))
            .param(max_field))
        }
        Some(m) if m as u64 > limits.max_model_len as u64 => {
            return Err(ApiError::bad_request(format!(
                "{max_field}={m} cannot be greater than max_model_len={}. Please request fewer \
                 output tokens. (parameter={max_field}, value={m})",
                limits.max_model_len
            ))
            .param(max_field))
        }
        Some(m) => Some(m as usize),
        None => None,
    };
    if prompt.len() >= limits.max_model_len {
        return Err(ApiError::bad_request(format!(
            "This model's maximum context length is {} tokens. However, your request has {} input \
             tokens. Please reduce the length of the input messages.",
            limits.max_model_len,
            prompt.len()
        )));
    }
    let max_tokens = max_tokens.unwrap_or(limits.max_model_len - prompt.len());
    if prompt.len() + max_tokens > limits.max_model_len {
        return Err(ApiError::bad_request(format!(
            "This model's maximum context length is {} tokens. However, you requested {} tokens \
             ({} in the messages, {} in the completion). Please reduce the length of the messages \
             or completion.",
            limits.max_model_len,
            prompt.len() + max_tokens,
            prompt.len(),
            max_tokens
        )));
    }
    let min_tokens = match f.int("min_tokens")? {
        Some(m) if m < 0 => {
            return Err(ApiError::bad_request(format!("min_tokens must be greater than or equal to 0, got {m}.")))
        }
        Some(m) if m as usize > max_tokens => {
            return Err(ApiError::bad_request(format!(
                "min_tokens must be less than or equal to max_tokens={max_tokens}, got {m}."
            )))
        }
        Some(m) => m as usize,
        None => 0,
    };
    if let Some(n) = f.int("n")? {
        if n != 1 {
            return Err(ApiError::bad_request(format!(
                "disagg sim serves n=1 only, got n={n}; send separate requests"
            ))
            .param("n"));
        }
    }
    let stream = f.boolean("stream")?.unwrap_or(false);
    let opts = f.object("stream_options")?;
    if opts.is_some() && !stream {
        return Err(ApiError::bad_request("Stream options can only be defined when `stream=True`."));
    }
    let (include_usage, continuous_usage) = match opts {
        Some(o) => {
            let of = Fields(o);
            (
                of.boolean("include_usage")?.unwrap_or(false),
                of.boolean("continuous_usage_stats")?.unwrap_or(false),
            )
        }
        None => (false, false),
    };
    let kv = kv_request(f.object("kv_transfer_params")?)?;
    let generator = Generator::new(tokens::fingerprint(&prompt), body);
    Ok(GenRequest {
        max_tokens,
        min_tokens,
        ignore_eos: f.boolean("ignore_eos")?.unwrap_or(false),
        stop: f.strings("stop")?.into_iter().filter(|s| !s.is_empty()).collect(),
        stop_token_ids: f.token_ids("stop_token_ids")?,
        stream,
        include_usage,
        continuous_usage,
        kv,
        generator,
        prompt,
    })
}

fn kv_request(params: Option<&Map<String, Value>>) -> Result<KvRequest, ApiError> {
    let Some(p) = params else { return Ok(KvRequest::Local) };
    let f = Fields(p);
    if f.boolean("do_remote_decode")?.unwrap_or(false) {
        return Ok(KvRequest::RemoteDecode);
    }
    if !f.boolean("do_remote_prefill")?.unwrap_or(false) {
        return Ok(KvRequest::Local);
    }
    let bad = |what: &str| {
        ApiError::bad_request(format!("kv_transfer_params: {what}")).param("kv_transfer_params")
    };
    let string = |k: &str| -> Result<String, ApiError> {
        p.get(k).and_then(Value::as_str).map(str::to_owned).ok_or_else(|| bad(&format!("`{k}` must be a string")))
    };
    // vLLM 0.32 nests block ids per KV-cache group ([[1,2]]); older builds send a flat list.
    let mut block_ids = Vec::new();
    let ids = p.get("remote_block_ids").and_then(Value::as_array).ok_or_else(|| bad("`remote_block_ids` must be a list"))?;
    for item in ids {
        match item {
            Value::Array(group) => {
                for b in group {
                    block_ids.push(b.as_u64().and_then(|b| u32::try_from(b).ok()).ok_or_else(|| bad("block ids must be integers"))?);
                }
            }
            b => block_ids.push(b.as_u64().and_then(|b| u32::try_from(b).ok()).ok_or_else(|| bad("block ids must be integers"))?),
        }
    }
    let port = p
        .get("remote_port")
        .and_then(Value::as_u64)
        .and_then(|v| u16::try_from(v).ok())
        .ok_or_else(|| bad("`remote_port` must be a port number"))?;
    Ok(KvRequest::RemotePrefill(RemoteKv {
        engine_id: string("remote_engine_id")?,
        request_id: p.get("remote_request_id").and_then(Value::as_str).unwrap_or_default().to_owned(),
        block_ids,
        host: string("remote_host")?,
        port,
        num_tokens: p.get("remote_num_tokens").and_then(Value::as_u64).map(|n| n as usize),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn body(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }
    const LIMITS: Limits<'static> = Limits { model: "m", max_model_len: 100 };

    #[test]
    fn rejects_what_vllm_rejects_with_its_messages() {
        let err = |v| parse(Api::Completions, &body(v), &LIMITS).err().unwrap();
        let e = err(json!({"prompt": "x", "max_tokens": -1}));
        assert_eq!(e.status.as_u16(), 400);
        assert!(e.message.starts_with("max_tokens must be at least 1, got -1."), "{}", e.message);
        let e = err(json!({"prompt": "x", "max_tokens": "abc"}));
        assert_eq!(e.param.as_deref(), Some("body.max_tokens"));
        assert!(e.message.contains("int_parsing"));
        assert_eq!(err(json!({"model": "other", "prompt": "x"})).status.as_u16(), 404);
        assert!(err(json!({"max_tokens": 2})).message.starts_with("Either prompt or prompt_embeds"));
        assert!(err(json!({"prompt": "x", "max_tokens": 2, "min_tokens": 5}))
            .message
            .starts_with("min_tokens must be less than or equal to max_tokens=2"));
        assert!(err(json!({"prompt": "x", "max_tokens": 200})).message.contains("cannot be greater than max_model_len=100"));
        assert!(err(json!({"prompt": "x", "stream_options": {"include_usage": true}}))
            .message
            .contains("only be defined when `stream=True`"));
    }

    #[test]
    fn accepts_lax_types_and_ignores_unknown_fields() {
        let r = parse(
            Api::Completions,
            &body(json!({"prompt": [5, 6, 7], "max_tokens": "3", "ignore_eos": "true", "whatever": {"x": 1}})),
            &LIMITS,
        )
        .unwrap();
        assert_eq!(r.prompt, vec![5, 6, 7]);
        assert_eq!(r.max_tokens, 3);
        assert!(r.ignore_eos);
        assert_eq!(r.kv, KvRequest::Local);
    }

    #[test]
    fn chat_prefers_max_completion_tokens_and_defaults_to_the_context_left() {
        let msgs = json!([{"role": "user", "content": "hi"}]);
        let r = parse(Api::Chat, &body(json!({"messages": msgs, "max_tokens": 9, "max_completion_tokens": 4})), &LIMITS).unwrap();
        assert_eq!(r.max_tokens, 4);
        let r = parse(Api::Chat, &body(json!({"messages": msgs})), &LIMITS).unwrap();
        assert_eq!(r.max_tokens + r.prompt.len(), 100);
    }

    #[test]
    fn reads_both_block_id_layouts() {
        let params = |ids: Value| {
            json!({"prompt": "x", "kv_transfer_params": {"do_remote_prefill": true, "remote_engine_id": "e",
                "remote_request_id": "r", "remote_block_ids": ids, "remote_host": "127.0.0.1", "remote_port": 5600}})
        };
        for ids in [json!([[1, 2, 3]]), json!([1, 2, 3])] {
            let r = parse(Api::Completions, &body(params(ids)), &LIMITS).unwrap();
            let KvRequest::RemotePrefill(kv) = r.kv else { panic!("not remote prefill") };
            assert_eq!(kv.block_ids, vec![1, 2, 3]);
            assert_eq!(kv.port, 5600);
        }
    }
}
