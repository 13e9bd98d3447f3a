//! Typed reads of request fields with vLLM's (pydantic's lax mode) coercions and its
//! error messages, shared by the simulator and the router (which checks the fields a
//! decode would reject before it runs a prefill). Every message here was read off a real
//! vLLM 0.32 (tests/vllm.rs compares them).

use serde_json::{Map, Value};

use super::{ApiError, ErrorKind};

/// A pydantic-style schema error, as vLLM reports it (type "Bad Request", `param` = loc).
pub(crate) fn validation_error(loc: &str, kind: &str, msg: &str, input: &Value) -> ApiError {
    ApiError::new(
        ErrorKind::Validation,
        format!("1 validation error:\n  {{'type': '{kind}', 'loc': '{loc}', 'msg': '{msg}', 'input': {}}}", python_input(input)),
    )
    .param(loc)
}

/// How vLLM prints a rejected input: a scalar as its Python `str()` in quotes.
fn python_input(v: &Value) -> String {
    match v {
        Value::Object(m) => format!("<dict of {} items>", m.len()),
        Value::Array(a) => format!("<list of {} items>", a.len()),
        Value::String(s) => format!("'{s}'"),
        Value::Bool(true) => "'True'".into(),
        Value::Bool(false) => "'False'".into(),
        Value::Null => "'None'".into(),
        Value::Number(n) => format!("'{n}'"),
    }
}

/// A semantic error of vLLM's (`VLLMValidationError`): type "BadRequestError"; with a
/// parameter, vLLM adds `(parameter=.., value=..)` and fills `param`.
pub(crate) fn semantic_error(message: impl Into<String>, parameter: Option<(&str, &str)>) -> ApiError {
    let message = message.into();
    match parameter {
        Some((name, value)) => ApiError::bad_request(format!("{message} (parameter={name}, value={value})")).param(name),
        None => ApiError::bad_request(message),
    }
}

/// Typed reads of the fields of one JSON object; `null` counts as absent, as in vLLM's
/// schema. `loc` is where the object sits (`body`, `body.stream_options`).
pub(crate) struct Fields<'a> {
    pub(crate) map: &'a Map<String, Value>,
    pub(crate) loc: &'a str,
}

impl<'a> Fields<'a> {
    pub(crate) fn body(map: &'a Map<String, Value>) -> Self {
        Fields { map, loc: "body" }
    }

    pub(crate) fn get(&self, name: &str) -> Option<&'a Value> {
        self.map.get(name).filter(|v| !v.is_null())
    }

    fn loc_of(&self, name: &str) -> String {
        format!("{}.{name}", self.loc)
    }

    /// pydantic's lax int: integers, floats without a fraction, numeric strings, booleans.
    pub(crate) fn int(&self, name: &str) -> Result<Option<i64>, ApiError> {
        let Some(v) = self.get(name) else { return Ok(None) };
        let err = |kind: &str, msg: &str| Err(validation_error(&self.loc_of(name), kind, msg, v));
        match v {
            Value::Bool(b) => Ok(Some(i64::from(*b))),
            Value::Number(n) => match n.as_i64() {
                Some(i) => Ok(Some(i)),
                None => match n.as_f64() {
                    Some(f) if f.fract() == 0.0 && f.abs() < 9.2e18 => Ok(Some(f as i64)),
                    Some(f) if f.fract() != 0.0 => {
                        err("int_from_float", "Input should be a valid integer, got a number with a fractional part")
                    }
                    _ => err("int_parsing_size", "Unable to parse input string as an integer, exceeded maximum size"),
                },
            },
            Value::String(s) => match s.trim().parse::<i64>() {
                Ok(i) => Ok(Some(i)),
                Err(_) => err("int_parsing", "Input should be a valid integer, unable to parse string as an integer"),
            },
            _ => err("int_type", "Input should be a valid integer"),
        }
    }

    /// pydantic's lax float: numbers, numeric strings, booleans.
    pub(crate) fn float(&self, name: &str) -> Result<Option<f64>, ApiError> {
        let Some(v) = self.get(name) else { return Ok(None) };
        match v {
            Value::Bool(b) => Ok(Some(f64::from(u8::from(*b)))),
            Value::Number(n) => Ok(n.as_f64()),
            Value::String(s) => s.trim().parse::<f64>().map(Some).map_err(|_| {
                validation_error(
                    &self.loc_of(name),
                    "float_parsing",
                    "Input should be a valid number, unable to parse string as a number",
                    v,
                )
            }),
            _ => Err(validation_error(&self.loc_of(name), "float_type", "Input should be a valid number", v)),
        }
    }

    /// pydantic's lax bool: booleans, 0/1, and the usual words.
    pub(crate) fn boolean(&self, name: &str) -> Result<Option<bool>, ApiError> {
        let Some(v) = self.get(name) else { return Ok(None) };
        let parsed = match v {
            Value::Bool(b) => Some(*b),
            Value::Number(n) if n.as_f64() == Some(0.0) => Some(false),
            Value::Number(n) if n.as_f64() == Some(1.0) => Some(true),
            Value::String(s) => match s.to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" | "on" | "t" | "y" => Some(true),
                "false" | "0" | "no" | "off" | "f" | "n" => Some(false),
                _ => None,
            },
            _ => None,
        };
        parsed.map(Some).ok_or_else(|| {
            if v.is_string() || v.is_number() {
                validation_error(&self.loc_of(name), "bool_parsing", "Input should be a valid boolean, unable to interpret input", v)
            } else {
                validation_error(&self.loc_of(name), "bool_type", "Input should be a valid boolean", v)
            }
        })
    }

    /// A nested model (e.g. `stream_options`): must be an object.
    pub(crate) fn model(&self, name: &str) -> Result<Option<Fields<'a>>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Object(m)) => Ok(Some(Fields { map: m, loc: self.loc })),
            Some(v) => Err(validation_error(
                &self.loc_of(name),
                "model_attributes_type",
                "Input should be a valid dictionary or object to extract fields from",
                v,
            )),
        }
    }

    /// A free-form `dict` field (e.g. `kv_transfer_params`).
    pub(crate) fn dict(&self, name: &str) -> Result<Option<&'a Map<String, Value>>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Object(m)) => Ok(Some(m)),
            Some(v) => Err(validation_error(&self.loc_of(name), "dict_type", "Input should be a valid dictionary", v)),
        }
    }

    pub(crate) fn strings(&self, name: &str) -> Result<Vec<String>, ApiError> {
        match self.get(name) {
            None => Ok(Vec::new()),
            Some(Value::String(s)) => Ok(vec![s.clone()]),
            Some(Value::Array(items)) => items
                .iter()
                .map(|i| {
                    i.as_str()
                        .map(str::to_owned)
                        .ok_or_else(|| validation_error(&self.loc_of(name), "string_type", "Input should be a valid string", i))
                })
                .collect(),
            Some(v) => Err(validation_error(&self.loc_of(name), "string_type", "Input should be a valid string or list of strings", v)),
        }
    }

    pub(crate) fn token_ids(&self, name: &str) -> Result<Vec<u32>, ApiError> {
        match self.get(name) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|i| {
                    i.as_u64()
                        .and_then(|n| u32::try_from(n).ok())
                        .ok_or_else(|| validation_error(&self.loc_of(name), "int_type", "Input should be a valid integer", i))
                })
                .collect(),
            Some(v) => Err(validation_error(&self.loc_of(name), "list_type", "Input should be a valid list", v)),
        }
    }
}

/// The checks vLLM makes of the fields that decide how a request generates: `n`, the
/// output length, `min_tokens` and streaming. A PD router runs them before its prefill
/// leg, because the prefill leg overrides these fields and so cannot reject them.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Generation {
    pub(crate) stream: bool,
    pub(crate) n: u32,
    /// The requested output cap (chat: `max_completion_tokens` first), if any.
    pub(crate) max_tokens: Option<i64>,
    pub(crate) seed: Option<i64>,
    pub(crate) include_usage: bool,
    pub(crate) continuous_usage: bool,
}

/// Which API a body is for: chat reads `max_completion_tokens` first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Api {
    Completions,
    Chat,
}

/// vLLM's default most `n` (VLLM_MAX_N_SEQUENCES).
pub(crate) const MAX_N: i64 = 16384;
/// Below this temperature vLLM samples greedily (`_SAMPLING_EPS`).
const SAMPLING_EPS: f64 = 1e-5;

pub(crate) fn check_generation(api: Api, body: &Map<String, Value>) -> Result<Generation, ApiError> {
    let f = Fields::body(body);
    let max_field = match api {
        Api::Chat if f.get("max_completion_tokens").is_some() => "max_completion_tokens",
        _ => "max_tokens",
    };
    let max_tokens = f.int(max_field)?;
    let min_tokens = f.int("min_tokens")?.unwrap_or(0);
    let n = f.int("n")?.unwrap_or(1);
    let seed = f.int("seed")?;
    let temperature = f.float("temperature")?;
    let stream = f.boolean("stream")?.unwrap_or(false);
    let opts = f.model("stream_options")?;
    let (include_usage, continuous_usage) = match &opts {
        Some(o) => {
            let o = Fields { map: o.map, loc: "body.stream_options" };
            (o.boolean("include_usage")?.unwrap_or(false), o.boolean("continuous_usage_stats")?.unwrap_or(false))
        }
        None => (false, false),
    };
    f.dict("kv_transfer_params")?;
    if opts.is_some() && !stream {
        return Err(ApiError::bad_request("Stream options can only be defined when `stream=True`. (parameter=stream_options)")
            .param("stream_options"));
    }
    if n < 1 {
        return Err(semantic_error(format!("n must be at least 1, got {n}."), None));
    }
    if n > MAX_N {
        return Err(semantic_error(
            format!("n must be at most {MAX_N}, got {n}. To increase this limit, set the VLLM_MAX_N_SEQUENCES environment variable."),
            None,
        ));
    }
    if n > 1 && temperature.is_some_and(|t| t < SAMPLING_EPS) {
        return Err(semantic_error(format!("n must be 1 when using greedy sampling, got {n}."), None));
    }
    if let Some(m) = max_tokens.filter(|m| *m < 1) {
        return Err(semantic_error(format!("max_tokens must be at least 1, got {m}."), Some(("max_tokens", &m.to_string()))));
    }
    if min_tokens < 0 {
        return Err(semantic_error(format!("min_tokens must be greater than or equal to 0, got {min_tokens}."), None));
    }
    if let Some(m) = max_tokens.filter(|m| min_tokens > *m) {
        return Err(semantic_error(format!("min_tokens must be less than or equal to max_tokens={m}, got {min_tokens}."), None));
    }
    Ok(Generation { stream, n: n as u32, max_tokens, seed, include_usage, continuous_usage })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn check(v: Value) -> Result<Generation, ApiError> {
        check_generation(Api::Completions, v.as_object().unwrap())
    }

    /// The messages a real vLLM 0.32 gave for these bodies (tests/vllm.rs checks again).
    #[test]
    fn messages_are_vllms() {
        let msg = |v| check(v).unwrap_err().message;
        assert_eq!(msg(json!({"max_tokens": 0})), "max_tokens must be at least 1, got 0. (parameter=max_tokens, value=0)");
        assert_eq!(
            msg(json!({"max_tokens": "abc"})),
            "1 validation error:\n  {'type': 'int_parsing', 'loc': 'body.max_tokens', 'msg': 'Input should be a valid integer, unable to parse string as an integer', 'input': 'abc'}"
        );
        assert_eq!(
            msg(json!({"max_tokens": 2.5})),
            "1 validation error:\n  {'type': 'int_from_float', 'loc': 'body.max_tokens', 'msg': 'Input should be a valid integer, got a number with a fractional part', 'input': '2.5'}"
        );
        assert_eq!(msg(json!({"max_tokens": 2, "min_tokens": 5})), "min_tokens must be less than or equal to max_tokens=2, got 5.");
        assert_eq!(msg(json!({"min_tokens": -1})), "min_tokens must be greater than or equal to 0, got -1.");
        assert_eq!(
            msg(json!({"stream": "abc"})),
            "1 validation error:\n  {'type': 'bool_parsing', 'loc': 'body.stream', 'msg': 'Input should be a valid boolean, unable to interpret input', 'input': 'abc'}"
        );
        assert_eq!(
            msg(json!({"stream_options": {"include_usage": true}})),
            "Stream options can only be defined when `stream=True`. (parameter=stream_options)"
        );
        assert_eq!(
            msg(json!({"stream": true, "stream_options": {"include_usage": "x"}})),
            "1 validation error:\n  {'type': 'bool_parsing', 'loc': 'body.stream_options.include_usage', 'msg': 'Input should be a valid boolean, unable to interpret input', 'input': 'x'}"
        );
        assert_eq!(msg(json!({"n": 0})), "n must be at least 1, got 0.");
        assert_eq!(msg(json!({"n": 2, "temperature": 0})), "n must be 1 when using greedy sampling, got 2.");
        assert_eq!(
            msg(json!({"kv_transfer_params": 5})),
            "1 validation error:\n  {'type': 'dict_type', 'loc': 'body.kv_transfer_params', 'msg': 'Input should be a valid dictionary', 'input': '5'}"
        );
        let chat = check_generation(Api::Chat, json!({"max_completion_tokens": 0, "max_tokens": 5}).as_object().unwrap()).unwrap_err();
        assert_eq!(chat.message, "max_tokens must be at least 1, got 0. (parameter=max_tokens, value=0)");
    }

    #[test]
    fn lax_values_pass_as_vllm_takes_them() {
        let g = check(json!({"max_tokens": "3", "stream": "yes", "n": true, "seed": 3.0, "temperature": "0.5"})).unwrap();
        assert_eq!((g.max_tokens, g.stream, g.n, g.seed), (Some(3), true, 1, Some(3)));
        let g = check(json!({"stream": true, "stream_options": {}})).unwrap();
        assert!(!g.include_usage, "include_usage defaults to false (vLLM's StreamOptions)");
        assert_eq!(check(json!({})).unwrap().max_tokens, None);
    }
}
