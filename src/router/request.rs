//! What the router reads from, and writes into, a generation request body. The body is
//! parsed once; fields the router does not need pass through untouched.

use axum::http::HeaderMap;
use bytes::{BufMut, Bytes, BytesMut};
use serde::ser::{Serialize, SerializeMap, Serializer};
use serde_json::{json, Map, Value};

use super::policy::RequestInfo;

/// Fields the prefill leg replaces or drops (PROTOCOLS.md §1).
const PREFILL_OVERRIDES: &[&str] = &[
    "kv_transfer_params",
    "stream",
    "max_tokens",
    "max_completion_tokens",
    "stream_options",
    "min_tokens",
    "min_completion_tokens",
];

/// The prefill leg's body: the client's, with `stream:false`, `max_tokens:1`,
/// `max_completion_tokens:1` only if present, no `stream_options`/`min_tokens`/
/// `min_completion_tokens`, and the six-key `kv_transfer_params`. Serialised straight
/// from the parsed body, without copying it.
pub struct PrefillBody<'a>(pub &'a Map<String, Value>);

impl Serialize for PrefillBody<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(None)?;
        for (k, v) in self.0 {
            if !PREFILL_OVERRIDES.contains(&k.as_str()) {
                m.serialize_entry(k, v)?;
            }
        }
        m.serialize_entry(
            "kv_transfer_params",
            &json!({"do_remote_decode": true, "do_remote_prefill": false, "remote_engine_id": null,
                    "remote_block_ids": null, "remote_host": null, "remote_port": null}),
        )?;
        m.serialize_entry("stream", &false)?;
        m.serialize_entry("max_tokens", &1)?;
        if self.0.contains_key("max_completion_tokens") {
            m.serialize_entry("max_completion_tokens", &1)?;
        }
        m.end()
    }
}

pub fn prefill_body(body: &Map<String, Value>) -> Bytes {
    Bytes::from(serde_json::to_vec(&PrefillBody(body)).expect("a parsed JSON body serialises"))
}

/// The decode leg's body: the client's own bytes, with the prefill's params added. The
/// prompt reaches the decode byte for byte as the client sent it (the decode checks it
/// against the KV it pulls).
pub fn decode_body(raw: &Bytes, body: &Map<String, Value>, params: Option<&Value>) -> Bytes {
    let Some(params) = params else { return raw.clone() };
    if body.contains_key("kv_transfer_params") {
        let mut b = body.clone();
        b.insert("kv_transfer_params".into(), params.clone());
        return Bytes::from(serde_json::to_vec(&b).expect("a parsed JSON body serialises"));
    }
    // Splice `,"kv_transfer_params":{..}` before the object's closing brace.
    let end = raw.iter().rposition(|b| *b == b'}').expect("a parsed JSON object ends with }");
    let mut out = BytesMut::with_capacity(raw.len() + 512);
    out.put_slice(&raw[..end]);
    if !body.is_empty() {
        out.put_u8(b',');
    }
    out.put_slice(b"\"kv_transfer_params\":");
    serde_json::to_writer((&mut out).writer(), params).expect("params serialise");
    out.put_u8(b'}');
    out.freeze()
}

/// The session key and prompt a policy may use.
pub fn request_info(headers: &HeaderMap, body: &Map<String, Value>, tokenizer: Option<&tokenizers::Tokenizer>) -> RequestInfo {
    let session = ["x-session-id", "x-user-id"]
        .iter()
        .find_map(|h| headers.get(*h).and_then(|v| v.to_str().ok()).filter(|s| !s.is_empty()).map(str::to_owned))
        .or_else(|| body.get("user").and_then(Value::as_str).filter(|s| !s.is_empty()).map(str::to_owned));
    let mut text = String::new();
    let mut ids: Vec<u32> = Vec::new();
    match body.get("prompt") {
        Some(Value::String(s)) => text.push_str(s),
        Some(Value::Array(items)) => {
            for item in items {
                match item {
                    Value::String(s) => text.push_str(s),
                    Value::Number(n) => ids.extend(n.as_u64().map(|n| n as u32)),
                    Value::Array(inner) => ids.extend(inner.iter().filter_map(Value::as_u64).map(|n| n as u32)),
                    _ => {}
                }
            }
        }
        _ => {}
    }
    if let Some(Value::Array(msgs)) = body.get("messages") {
        for m in msgs {
            if let Some(role) = m.get("role").and_then(Value::as_str) {
                text.push_str(role);
                text.push('\n');
            }
            match m.get("content") {
                Some(Value::String(s)) => text.push_str(s),
                Some(Value::Array(parts)) => {
                    for p in parts {
                        if let Some(t) = p.get("text").and_then(Value::as_str) {
                            text.push_str(t);
                        }
                    }
                }
                _ => {}
            }
            text.push('\n');
        }
    }
    if let Some(tok) = tokenizer {
        if !text.is_empty() {
            if let Ok(enc) = tok.encode(text.as_str(), false) {
                ids.extend_from_slice(enc.get_ids());
            }
        }
    }
    if ids.is_empty() {
        RequestInfo { session, prompt: text.into_bytes(), unit: 1 }
    } else {
        RequestInfo { session, prompt: ids.iter().flat_map(|t| t.to_le_bytes()).collect(), unit: 4 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(s: &str) -> Map<String, Value> {
        serde_json::from_str(s).unwrap()
    }

    #[test]
    fn prefill_leg_is_the_toy_proxys() {
        let b = map(r#"{"model":"m","prompt":"p","max_tokens":50,"max_completion_tokens":50,"stream":true,
            "stream_options":{"include_usage":true},"min_tokens":3,"min_completion_tokens":2,"temperature":0.5,"x_custom":[1]}"#);
        let out: Value = serde_json::from_slice(&prefill_body(&b)).unwrap();
        assert_eq!(out["stream"], false);
        assert_eq!(out["max_tokens"], 1);
        assert_eq!(out["max_completion_tokens"], 1);
        assert!(out.get("stream_options").is_none() && out.get("min_tokens").is_none() && out.get("min_completion_tokens").is_none());
        assert_eq!(out["kv_transfer_params"].as_object().unwrap().len(), 6);
        assert_eq!(out["kv_transfer_params"]["do_remote_decode"], true);
        assert_eq!(out["temperature"], 0.5);
        assert_eq!(out["x_custom"], json!([1]));
        let plain: Value = serde_json::from_slice(&prefill_body(&map(r#"{"prompt":"p"}"#))).unwrap();
        assert!(plain.get("max_completion_tokens").is_none(), "only if the client sent it");
    }

    #[test]
    fn decode_leg_keeps_the_clients_bytes() {
        let raw = Bytes::from_static(b"{\"prompt\":\"caf\\u00e9  x\",\"max_tokens\":5 }\n");
        let b: Map<String, Value> = serde_json::from_slice(&raw).unwrap();
        let params = json!({"do_remote_prefill": true, "remote_block_ids": [[1]]});
        let out = decode_body(&raw, &b, Some(&params));
        assert!(out.starts_with(b"{\"prompt\":\"caf\\u00e9  x\",\"max_tokens\":5 ,\"kv_transfer_params\":"));
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["kv_transfer_params"], params);
        assert_eq!(decode_body(&raw, &b, None), raw);
        let empty = Bytes::from_static(b"{}");
        let v: Value = serde_json::from_slice(&decode_body(&empty, &Map::new(), Some(&params))).unwrap();
        assert_eq!(v["kv_transfer_params"], params);
    }

    #[test]
    fn session_key_prefers_headers_then_user() {
        let mut h = HeaderMap::new();
        let b = map(r#"{"user":"u1","prompt":"hello"}"#);
        assert_eq!(request_info(&h, &b, None).session.as_deref(), Some("u1"));
        h.insert("x-session-id", "s9".parse().unwrap());
        let info = request_info(&h, &b, None);
        assert_eq!(info.session.as_deref(), Some("s9"));
        assert_eq!(info.prompt, b"hello");
    }
}
