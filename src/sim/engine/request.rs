//! Turns a completions or chat body into what the engine needs, with vLLM's checks and
//! vLLM's messages. Fields the simulator does not model are ignored, as vLLM ignores
//! unknown fields.

use serde_json::{Map, Value};

use super::tokens::{self, Generator, BOS};
pub(crate) use crate::api::connector::Connector;
pub(crate) use crate::api::fields::Api;
use crate::api::fields::{check_generation, Fields};
use crate::api::{validation_error, ApiError, ErrorKind};

/// Where the prompt's KV comes from and goes to (docs/PROTOCOLS.md §1-§3).
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum KvRequest {
    /// Plain serving.
    Local,
    /// `do_remote_decode` (P2pNccl: any request to a producer): compute the prompt, then
    /// hand its blocks over.
    RemoteDecode(Handoff),
    /// `do_remote_prefill` (P2pNccl: any request to a consumer): get the prompt's blocks
    /// from a prefill, then decode.
    RemotePrefill(RemoteKv),
}

/// How a prefill hands its prompt's blocks to a decode.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Handoff {
    /// NIXL: hold them under the engine's request id and answer the params a decode
    /// pulls them with.
    Nixl,
    /// Mooncake: hold them under the router's transfer id until a decode takes them by it.
    Mooncake { transfer_id: String },
    /// P2pNccl: push them, once computed, to the decode's KV address under `key`.
    Push { host: String, port: u16, key: String },
}

/// Where a decode gets its prompt's blocks.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum RemoteKv {
    /// NIXL: read the named blocks from the prefill's side channel.
    Nixl(NixlRemote),
    /// Mooncake: find the engine's worker address on the prefill's bootstrap server, then
    /// take the blocks held under the transfer id (waiting until the prefill holds them).
    Mooncake { bootstrap_addr: String, engine_id: String, transfer_id: String },
    /// P2pNccl: wait for a prefill to push them under `key` (the engine request id).
    Pushed { key: String },
}

/// The NIXL prefill's answer that a decode pulls from.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct NixlRemote {
    pub(crate) engine_id: String,
    pub(crate) request_id: String,
    pub(crate) block_ids: Vec<u32>,
    pub(crate) host: String,
    pub(crate) port: u16,
    pub(crate) num_tokens: Option<usize>,
    /// The prefill's prefix-cache hits (`remote_prefill_cached_tokens`).
    pub(crate) cached_tokens: Option<usize>,
}

/// One request: one or more prompts (a completions list), each sampled `n` times.
pub(crate) struct GenRequest {
    pub(crate) prompts: Vec<Vec<u32>>,
    pub(crate) n: usize,
    /// One per generation, prompt-major: choice `j` of a seeded request uses `seed + j`,
    /// as vLLM seeds its child requests.
    pub(crate) generators: Vec<Generator>,
    /// Per prompt (the default depends on the prompt's length).
    pub(crate) max_tokens: Vec<usize>,
    pub(crate) min_tokens: usize,
    pub(crate) ignore_eos: bool,
    pub(crate) priority: i64,
    pub(crate) stop: Vec<String>,
    pub(crate) stop_token_ids: Vec<u32>,
    pub(crate) stream: bool,
    pub(crate) include_usage: bool,
    pub(crate) continuous_usage: bool,
    pub(crate) kv: KvRequest,
}

impl GenRequest {
    /// The prompt of generation `k`.
    pub(crate) fn prompt_of(&self, k: usize) -> &[u32] {
        &self.prompts[k / self.n]
    }

    pub(crate) fn max_tokens_of(&self, k: usize) -> usize {
        self.max_tokens[k / self.n]
    }

    pub(crate) fn generations(&self) -> usize {
        self.prompts.len() * self.n
    }
}

pub(crate) struct Limits<'a> {
    pub(crate) model: &'a str,
    pub(crate) max_model_len: usize,
    /// A real model's tokenizer (--tokenizer); else the simulator's word pieces.
    pub(crate) tokenizer: Option<&'a crate::tokenize::ModelTokenizer>,
    /// Whose `kv_transfer_params` the engine reads (--kv-connector).
    pub(crate) connector: Connector,
}

/// Checks the `model` field against the served model (vLLM answers 404).
pub(crate) fn check_model(body: &Map<String, Value>, served: &str) -> Result<(), ApiError> {
    match body.get("model") {
        None | Some(Value::Null) => Ok(()),
        Some(Value::String(m)) if m == served => Ok(()),
        Some(Value::String(m)) => {
            Err(ApiError::new(ErrorKind::NotFound, format!("The model `{m}` does not exist. Valid aliases: {served}.")).param("model"))
        }
        Some(v) => Err(validation_error("body.model", "string_type", "Input should be a valid string", v)),
    }
}

/// The prompts' token ids: completions take a string, token ids, or a list of either;
/// chat applies a fixed chat template to `messages`.
pub(crate) fn prompt_tokens(
    api: Api,
    body: &Map<String, Value>,
    tok: Option<&crate::tokenize::ModelTokenizer>,
) -> Result<Vec<Vec<u32>>, ApiError> {
    match (api, tok) {
        (Api::Completions, _) => completion_prompts(body, tok),
        (Api::Chat, None) => Ok(vec![text_tokens(&chat_text(body)?, None)?]),
        (Api::Chat, Some(t)) => {
            chat_text(body)?;
            t.encode_chat(body).map(|ids| vec![ids]).map_err(|e| ApiError::bad_request(e.to_string()))
        }
    }
}

fn text_tokens(text: &str, tok: Option<&crate::tokenize::ModelTokenizer>) -> Result<Vec<u32>, ApiError> {
    match tok {
        Some(t) => t.encode(text).map_err(|e| ApiError::bad_request(e.to_string())),
        None => {
            let mut t = vec![BOS];
            t.extend(tokens::tokenize(text));
            Ok(t)
        }
    }
}

/// vLLM's cap on the prompts of one completions request (VLLM_MAX_COMPLETION_PROMPTS).
const MAX_PROMPTS: usize = 1024;

fn completion_prompts(body: &Map<String, Value>, tok: Option<&crate::tokenize::ModelTokenizer>) -> Result<Vec<Vec<u32>>, ApiError> {
    let missing =
        || ApiError::bad_request("Either prompt or prompt_embeds must be provided and non-empty. (parameter=prompt)").param("prompt");
    let one_prompt = |v: &Value| -> Result<Vec<u32>, ApiError> {
        match v {
            Value::String(s) => text_tokens(s, tok),
            Value::Array(ids) if ids.iter().all(Value::is_u64) && !ids.is_empty() => ids.iter().map(token_id).collect(),
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
            if items.len() > MAX_PROMPTS {
                return Err(ApiError::bad_request(format!("Too many prompts: {} (max {MAX_PROMPTS}). (parameter=prompt)", items.len()))
                    .param("prompt"));
            }
            items.iter().map(one_prompt).collect()
        }
        Some(v) => Ok(vec![one_prompt(v)?]),
    }
}

fn token_id(v: &Value) -> Result<u32, ApiError> {
    v.as_u64()
        .and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| validation_error("body.prompt", "int_type", "Input should be a valid integer", v))
}

/// The chat template of the simulator: `<|role|>\ncontent\n` per message, then
/// `<|assistant|>\n` (the shape of the tiny test model's template).
fn chat_text(body: &Map<String, Value>) -> Result<String, ApiError> {
    let msgs = match body.get("messages") {
        None | Some(Value::Null) => return Err(validation_error("body.messages", "missing", "Field required", &Value::Null)),
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
            other => return Err(validation_error(&format!("{loc}.role"), "missing", "Field required", other.unwrap_or(&Value::Null))),
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
            Some(v) => return Err(validation_error(&format!("{loc}.content"), "string_type", "Input should be a valid string", v)),
        }
        text.push('\n');
    }
    text.push_str("<|assistant|>\n");
    Ok(text)
}

/// Parses and checks a generation request; `Err` carries vLLM's status and message.
pub(crate) fn parse(api: Api, body: &Map<String, Value>, limits: &Limits<'_>) -> Result<GenRequest, ApiError> {
    let f = Fields::body(body);
    check_model(body, limits.model)?;
    let gen = check_generation(api, body)?;
    let prompts = prompt_tokens(api, body, limits.tokenizer)?;
    if let Some(m) = gen.max_tokens.filter(|m| *m as u64 > limits.max_model_len as u64) {
        let field = if api == Api::Chat && f.get("max_completion_tokens").is_some() { "max_completion_tokens" } else { "max_tokens" };
        return Err(ApiError::bad_request(format!(
            "{field}={m} cannot be greater than max_model_len={}. Please request fewer \
             output tokens. (parameter={field}, value={m})",
            limits.max_model_len
        ))
        .param(field));
    }
    // vLLM's completions default to 16 output tokens; an explicit null (and chat) means
    // whatever the context has left.
    let default_max = (api == Api::Completions && !body.contains_key("max_tokens")).then_some(16);
    let mut max_tokens = Vec::with_capacity(prompts.len());
    for prompt in &prompts {
        if prompt.len() >= limits.max_model_len {
            return Err(ApiError::bad_request(format!(
                "This model's maximum context length is {} tokens. However, your request has {} input \
                 tokens. Please reduce the length of the input messages.",
                limits.max_model_len,
                prompt.len()
            )));
        }
        let wanted = gen.max_tokens.map(|m| m as usize).or(default_max).unwrap_or(limits.max_model_len - prompt.len());
        if prompt.len() + wanted > limits.max_model_len {
            return Err(ApiError::bad_request(format!(
                "This model's maximum context length is {} tokens. However, you requested {} tokens \
                 ({} in the messages, {} in the completion). Please reduce the length of the messages \
                 or completion.",
                limits.max_model_len,
                prompt.len() + wanted,
                prompt.len(),
                wanted
            )));
        }
        max_tokens.push(wanted);
    }
    let n = gen.n as usize;
    let kv = kv_request(body, limits.connector)?;
    let forced = forced_by_logit_bias(body)?;
    let generators = prompts
        .iter()
        .flat_map(|p| {
            let fp = tokens::fingerprint(p);
            (0..n).map(move |j| (fp, j))
        })
        .map(|(fp, j)| Generator::for_choice(fp, body, gen.seed, j, n).with_forced(forced))
        .collect();
    Ok(GenRequest {
        prompts,
        n,
        generators,
        max_tokens,
        min_tokens: f.int("min_tokens")?.unwrap_or(0) as usize,
        ignore_eos: f.boolean("ignore_eos")?.unwrap_or(false),
        priority: f.int("priority")?.unwrap_or(0),
        stop: f.strings("stop")?.into_iter().filter(|s| !s.is_empty()).collect(),
        stop_token_ids: f.token_ids("stop_token_ids")?,
        stream: gen.stream,
        include_usage: gen.include_usage,
        continuous_usage: gen.continuous_usage,
        kv,
    })
}

/// `logit_bias` as vLLM checks it (keys integer token ids in the vocabulary, biases
/// clamped to ±100); the simulator's model of its effect: the token with the largest bias
/// of at least FORCING_BIAS is sampled at every step (a bias that large outweighs any
/// logit under greedy sampling); smaller biases change nothing.
fn forced_by_logit_bias(body: &Map<String, Value>) -> Result<Option<u32>, ApiError> {
    const FORCING_BIAS: f64 = 30.0;
    let Some(map) = Fields::body(body).dict("logit_bias")? else { return Ok(None) };
    let mut bad_keys = Vec::new();
    let mut out_of_vocab = Vec::new();
    let mut best: Option<(f64, u32)> = None;
    for (k, v) in map {
        let Ok(id) = k.trim().parse::<i64>() else {
            bad_keys.push(format!("'{k}'"));
            continue;
        };
        if !(0..i64::from(tokens::VOCAB)).contains(&id) {
            out_of_vocab.push(id.to_string());
            continue;
        }
        let bias = v
            .as_f64()
            .ok_or_else(|| validation_error(&format!("body.logit_bias.{k}"), "float_type", "Input should be a valid number", v))?
            .clamp(-100.0, 100.0);
        if bias >= FORCING_BIAS && best.is_none_or(|(b, _)| bias > b) {
            best = Some((bias, id as u32));
        }
    }
    if !bad_keys.is_empty() {
        return Err(ApiError::bad_request(format!(
            "logit_bias contains key(s) that cannot be converted to integer token IDs: [{}] (parameter=logit_bias, value=[{}])",
            bad_keys.join(", "),
            bad_keys.join(", ")
        )));
    }
    if !out_of_vocab.is_empty() {
        let ids = out_of_vocab.join(", ");
        return Err(ApiError::bad_request(format!(
            "token_id(s) [{ids}] in logit_bias contain out-of-vocab token ids. Vocabulary size: {} (parameter=logit_bias, value=[{ids}])",
            tokens::VOCAB
        )));
    }
    Ok(best.map(|(_, id)| id))
}

/// The KV transfer a request asks for: `kv_transfer_params`, or (as vLLM takes it) the
/// same key in `vllm_xargs`, which vLLM passes on unchecked.
fn kv_request(body: &Map<String, Value>, connector: Connector) -> Result<KvRequest, ApiError> {
    let f = Fields::body(body);
    if let Some(p) = f.dict("kv_transfer_params")? {
        return kv_params(p, connector);
    }
    match f.dict("vllm_xargs")?.and_then(|x| x.get("kv_transfer_params")) {
        None | Some(Value::Null) => Ok(KvRequest::Local),
        Some(Value::Object(_)) => {
            Err(validation_error("body.vllm_xargs.kv_transfer_params", "string_type", "Input should be a valid string", &Value::Null))
        }
        // vLLM then calls .get() on a string and answers 500 with an empty message.
        Some(_) => Err(ApiError::internal("")),
    }
}

/// A request's `kv_transfer_params` as the connector reads them. P2pNccl reads none: its
/// engines go by the request id (the HTTP layer decides, generate.rs).
pub(crate) fn kv_params(p: &Map<String, Value>, connector: Connector) -> Result<KvRequest, ApiError> {
    match connector {
        Connector::Nixl => nixl_params(p),
        Connector::Mooncake => Ok(mooncake_params(p)),
        Connector::P2pNccl => Ok(KvRequest::Local),
    }
}

/// MooncakeConnector's reading: a prefill needs `transfer_id`, a decode also the
/// bootstrap address and engine id; params without them only log a warning in vLLM and
/// the request is served without a transfer.
fn mooncake_params(p: &Map<String, Value>) -> KvRequest {
    let text = |k: &str| p.get(k).and_then(Value::as_str).filter(|s| !s.is_empty()).map(str::to_owned);
    let flag = |k: &str| p.get(k).and_then(Value::as_bool).unwrap_or(false);
    if flag("do_remote_prefill") {
        if let (Some(bootstrap_addr), Some(engine_id), Some(transfer_id)) =
            (text("remote_bootstrap_addr"), text("remote_engine_id"), text("transfer_id"))
        {
            return KvRequest::RemotePrefill(RemoteKv::Mooncake { bootstrap_addr, engine_id, transfer_id });
        }
        tracing::warn!("Got invalid KVTransferParams: {p:?}. This request will not utilize KVTransfer");
    } else if flag("do_remote_decode") {
        if let Some(transfer_id) = text("transfer_id") {
            return KvRequest::RemoteDecode(Handoff::Mooncake { transfer_id });
        }
        tracing::warn!("Missing transfer_id in kv_transfer_params from router!");
    }
    KvRequest::Local
}

fn nixl_params(p: &Map<String, Value>) -> Result<KvRequest, ApiError> {
    let f = Fields { map: p, loc: "body.kv_transfer_params" };
    if f.boolean("do_remote_decode")?.unwrap_or(false) {
        return Ok(KvRequest::RemoteDecode(Handoff::Nixl));
    }
    if !f.boolean("do_remote_prefill")?.unwrap_or(false) {
        return Ok(KvRequest::Local);
    }
    let bad = |what: &str| ApiError::bad_request(format!("kv_transfer_params: {what}")).param("kv_transfer_params");
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
    Ok(KvRequest::RemotePrefill(RemoteKv::Nixl(NixlRemote {
        engine_id: string("remote_engine_id")?,
        request_id: p.get("remote_request_id").and_then(Value::as_str).unwrap_or_default().to_owned(),
        block_ids,
        host: string("remote_host")?,
        port,
        num_tokens: p.get("remote_num_tokens").and_then(Value::as_u64).map(|n| n as usize),
        cached_tokens: p.get("remote_prefill_cached_tokens").and_then(Value::as_u64).map(|n| n as usize),
    })))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn body(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }
    const LIMITS: Limits<'static> = Limits { model: "m", max_model_len: 100, tokenizer: None, connector: Connector::Nixl };

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
        assert_eq!(r.prompts, vec![vec![5, 6, 7]]);
        assert_eq!(r.max_tokens, vec![3]);
        assert!(r.ignore_eos);
        assert_eq!(r.kv, KvRequest::Local);
    }

    #[test]
    fn chat_prefers_max_completion_tokens_and_defaults_to_the_context_left() {
        let msgs = json!([{"role": "user", "content": "hi"}]);
        let r = parse(Api::Chat, &body(json!({"messages": msgs, "max_tokens": 9, "max_completion_tokens": 4})), &LIMITS).unwrap();
        assert_eq!(r.max_tokens, vec![4]);
        let r = parse(Api::Chat, &body(json!({"messages": msgs})), &LIMITS).unwrap();
        assert_eq!(r.max_tokens[0] + r.prompts[0].len(), 100);
    }

    #[test]
    fn completions_default_to_16_tokens_and_lists_are_several_prompts() {
        let r =
            parse(Api::Completions, &body(json!({"prompt": ["a", [5, 6], "b c"], "n": 2, "seed": 3, "temperature": 1})), &LIMITS).unwrap();
        assert_eq!(r.generations(), 6);
        assert_eq!(r.prompt_of(2), &[5, 6]);
        assert_eq!(r.max_tokens, vec![16, 16, 16]);
        let r = parse(Api::Completions, &body(json!({"prompt": "a", "max_tokens": null})), &LIMITS).unwrap();
        assert_eq!(r.max_tokens[0] + r.prompts[0].len(), 100, "an explicit null means the context left");
        assert!(parse(Api::Completions, &body(json!({"prompt": "a", "n": 2, "temperature": 0})), &LIMITS).is_err());
    }

    #[test]
    fn a_seeded_choice_samples_as_a_request_seeded_seed_plus_its_index() {
        let many = parse(Api::Completions, &body(json!({"prompt": "x", "n": 3, "seed": 10, "temperature": 0.5})), &LIMITS).unwrap();
        let one = parse(Api::Completions, &body(json!({"prompt": "x", "seed": 12, "temperature": 0.5})), &LIMITS).unwrap();
        let seq = |g: &Generator| (0..20).map(|i| g.token(i)).collect::<Vec<_>>();
        assert_eq!(seq(&many.generators[2]), seq(&one.generators[0]));
        assert_ne!(seq(&many.generators[0]), seq(&many.generators[1]));
    }

    #[test]
    fn reads_both_block_id_layouts() {
        let params = |ids: Value| {
            json!({"prompt": "x", "kv_transfer_params": {"do_remote_prefill": true, "remote_engine_id": "e",
                "remote_request_id": "r", "remote_block_ids": ids, "remote_host": "127.0.0.1", "remote_port": 5600}})
        };
        for ids in [json!([[1, 2, 3]]), json!([1, 2, 3])] {
            let r = parse(Api::Completions, &body(params(ids)), &LIMITS).unwrap();
            let KvRequest::RemotePrefill(RemoteKv::Nixl(kv)) = r.kv else { panic!("not remote prefill") };
            assert_eq!(kv.block_ids, vec![1, 2, 3]);
            assert_eq!(kv.port, 5600);
        }
    }

    #[test]
    fn mooncake_reads_its_own_params_and_serves_incomplete_ones_without_a_transfer() {
        let kv = |params: Value| {
            let lim = Limits { connector: Connector::Mooncake, ..LIMITS };
            parse(Api::Completions, &body(json!({"prompt": "x", "kv_transfer_params": params})), &lim).unwrap().kv
        };
        assert_eq!(
            kv(json!({"do_remote_decode": true, "transfer_id": "xfer-1"})),
            KvRequest::RemoteDecode(Handoff::Mooncake { transfer_id: "xfer-1".into() })
        );
        let full = json!({"do_remote_prefill": true, "remote_bootstrap_addr": "http://127.0.0.1:8998", "remote_engine_id": "e", "transfer_id": "xfer-1"});
        assert_eq!(
            kv(full),
            KvRequest::RemotePrefill(RemoteKv::Mooncake {
                bootstrap_addr: "http://127.0.0.1:8998".into(),
                engine_id: "e".into(),
                transfer_id: "xfer-1".into()
            })
        );
        assert_eq!(kv(json!({"do_remote_decode": true})), KvRequest::Local);
        assert_eq!(kv(json!({"do_remote_prefill": true, "transfer_id": "xfer-1"})), KvRequest::Local);
        // NIXL's params mean nothing to a Mooncake engine.
        assert_eq!(
            kv(json!({"do_remote_prefill": true, "remote_engine_id": "e", "remote_block_ids": [1], "remote_host": "h", "remote_port": 1})),
            KvRequest::Local
        );
    }
}
