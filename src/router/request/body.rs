//! The client's request body as the router holds it: the bytes as they came, and where
//! each top-level field's value lies in them. It is scanned once; a field is decoded only
//! when the router needs it; a leg's body is written from the original values, so every
//! value the router does not change reaches the worker byte for byte (the prompt above
//! all: a decode checks it against the KV it pulls). Keys are compared decoded, so
//! `"kv\u005ftransfer_params"` is the field it spells, as it is to vLLM.

use bytes::{BufMut, Bytes, BytesMut};
use serde_json::{Map, Value};

use crate::router::request::scan::{self, Field};
pub(crate) use crate::router::upstream::pieces::Pieces;

use crate::api::{validation_error, ApiError, ErrorKind};

#[derive(Clone)]
pub struct ClientBody {
    raw: Bytes,
    fields: Vec<Field>,
}

impl ClientBody {
    /// Scans a body that must be one JSON object; errors are vLLM's.
    pub fn parse(raw: Bytes) -> Result<ClientBody, ApiError> {
        match scan::scan(&raw) {
            Ok(fields) => Ok(ClientBody { raw, fields }),
            Err(e) => Err(not_an_object(&raw, &e)),
        }
    }

    /// `parse`, with a body over 1 MiB scanned on the blocking pool: a serving thread runs
    /// many connections and does not hand them to another thread while it is busy
    /// (server.rs), so a large body (up to --max-payload-size) must not hold them up.
    pub(crate) async fn parse_without_blocking(raw: Bytes) -> Result<ClientBody, ApiError> {
        const INLINE_UP_TO: usize = 1 << 20;
        if raw.len() <= INLINE_UP_TO {
            return ClientBody::parse(raw);
        }
        tokio::task::spawn_blocking(move || ClientBody::parse(raw))
            .await
            .unwrap_or_else(|e| Err(ApiError::new(ErrorKind::Internal, format!("the request body's scan failed: {e}"))))
    }

    pub(crate) fn raw(&self) -> &Bytes {
        &self.raw
    }

    /// The raw JSON of a field (its last occurrence, as Python's json keeps the last).
    pub fn get(&self, key: &str) -> Option<&[u8]> {
        self.fields.iter().rev().find(|f| &*f.key == key).map(|f| &self.raw[f.value.clone()])
    }

    pub(crate) fn has(&self, key: &str) -> bool {
        self.fields.iter().any(|f| &*f.key == key)
    }

    /// A field decoded; `Ok(None)` when absent. The scan checks JSON's grammar, not what a
    /// decode refuses: a number past f64 (`1e400`) or nesting deeper than 128, which are a
    /// 400 naming the field.
    pub(crate) fn value(&self, key: &str) -> Result<Option<Value>, ApiError> {
        let Some(raw) = self.get(key) else { return Ok(None) };
        serde_json::from_slice(raw).map(Some).map_err(|e| {
            ApiError::new(
                ErrorKind::Validation,
                format!("1 validation error:\n  {{'type': 'value_error', 'loc': ('body', '{key}'), 'msg': 'Value error, {e}'}}"),
            )
            .param(key)
        })
    }

    /// A field decoded where an undecodable one counts as absent (policies' hints: the
    /// worker sees the field as sent and answers for it).
    pub(crate) fn hint(&self, key: &str) -> Option<Value> {
        self.value(key).ok().flatten()
    }

    /// The given fields decoded into one map (the fields a check needs, not the body).
    pub(crate) fn subset(&self, keys: &[&str]) -> Result<Map<String, Value>, ApiError> {
        let mut out = Map::new();
        for k in keys {
            if let Some(v) = self.value(k)? {
                out.insert(k.to_string(), v);
            }
        }
        Ok(out)
    }

    /// The body without the `drop` fields (every occurrence) and with the `set` fields
    /// (key, raw JSON) added, in one buffer (a body the router parses again).
    pub fn with_fields(&self, drop: &[&str], set: &[(&str, &[u8])]) -> Bytes {
        self.pieces_with(drop, set).to_bytes()
    }

    /// `with_fields` as pieces for a leg's request: the client's bytes are not copied,
    /// only shared (slices of `raw`), with the few bytes the router writes between them.
    /// The client's own bytes when there is nothing to do; those bytes plus a splice before
    /// the closing brace when only adding.
    pub(crate) fn pieces_with(&self, drop: &[&str], set: &[(&str, &[u8])]) -> Pieces {
        let replaced = |k: &str| drop.contains(&k) || set.iter().any(|(s, _)| *s == k);
        let mut out = Pieces::default();
        if !self.fields.iter().any(|f| replaced(&f.key)) {
            if set.is_empty() {
                out.push(self.raw.clone());
                return out;
            }
            let end = self.raw.iter().rposition(|b| *b == b'}').expect("a scanned object ends with }");
            out.push(self.raw.slice(..end));
            let mut tail = BytesMut::with_capacity(extra_len(set) + 1);
            for (i, (k, v)) in set.iter().enumerate() {
                if i > 0 || !self.fields.is_empty() {
                    tail.put_u8(b',');
                }
                put_entry(&mut tail, k, v);
            }
            tail.put_u8(b'}');
            out.push(tail.freeze());
            return out;
        }
        // Keys and separators are written; kept values are shared slices of the client's
        // bytes (a 100k-token prompt is not copied).
        let mut small = BytesMut::with_capacity(256 + extra_len(set));
        small.put_u8(b'{');
        let mut first = true;
        for f in self.fields.iter().filter(|f| !replaced(&f.key)) {
            if !first {
                small.put_u8(b',');
            }
            first = false;
            put_key(&mut small, &f.key);
            let value = &self.raw[f.value.clone()];
            if value.len() >= SHARE_FROM {
                out.push(small.split().freeze());
                out.push(self.raw.slice(f.value.clone()));
            } else {
                small.put_slice(value);
            }
        }
        for (k, v) in set {
            if !first {
                small.put_u8(b',');
            }
            first = false;
            put_entry(&mut small, k, v);
        }
        small.put_u8(b'}');
        out.push(small.freeze());
        out
    }
}

/// Values from this size on are shared with the client's body rather than copied.
const SHARE_FROM: usize = 4096;

fn extra_len(set: &[(&str, &[u8])]) -> usize {
    set.iter().map(|(k, v)| k.len() + v.len() + 4).sum()
}

fn put_key(out: &mut BytesMut, key: &str) {
    serde_json::to_writer(out.writer(), key).expect("a string serialises");
    out.put_u8(b':');
}

fn put_entry(out: &mut BytesMut, key: &str, value: &[u8]) {
    put_key(out, key);
    out.put_slice(value);
}

/// vLLM's answer to a body that is not one JSON object.
fn not_an_object(raw: &[u8], e: &serde_json::Error) -> ApiError {
    match serde_json::from_slice::<Value>(raw) {
        Ok(other) => {
            validation_error("body", "model_attributes_type", "Input should be a valid dictionary or object to extract fields from", &other)
        }
        Err(_) => ApiError::new(
            ErrorKind::Validation,
            format!(
                "1 validation error:\n  {{'type': 'json_invalid', 'loc': 'body', 'msg': 'JSON decode error', 'ctx': {{'error': '{e}'}}}}"
            ),
        )
        .param("body"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(s: &str) -> ClientBody {
        ClientBody::parse(Bytes::copy_from_slice(s.as_bytes())).unwrap()
    }

    #[test]
    fn fields_are_found_decoded_and_the_last_wins() {
        let b = body(r#" { "a" : 1, "kv\u005ftransfer_params": {"x": [1, 2]}, "a": "two" } "#);
        assert_eq!(b.get("a"), Some(&b"\"two\""[..]));
        assert_eq!(b.get("kv_transfer_params"), Some(&br#"{"x": [1, 2]}"#[..]));
        assert!(b.get("missing").is_none());
        assert_eq!(b.value("a").unwrap(), Some(Value::from("two")));
    }

    #[test]
    fn rewrites_keep_values_byte_for_byte() {
        let raw = "{\"prompt\":\"caf\\u00e9  x\",\"max_tokens\":5 ,\"kv_transfer_params\":{\"remote_host\":\"evil\"},\"t\":1e2}\n";
        let b = body(raw);
        let out = b.with_fields(&["kv_transfer_params"], &[("max_tokens", b"1")]);
        assert_eq!(&out[..], br#"{"prompt":"caf\u00e9  x","t":1e2,"max_tokens":1}"#);
        // Nothing to drop: the client's bytes, spliced.
        let b = body("{\"prompt\": \"p\" }\n");
        assert_eq!(&b.with_fields(&["x"], &[("k", b"{}")])[..], b"{\"prompt\": \"p\" ,\"k\":{}}");
        assert_eq!(b.with_fields(&["x"], &[]), b.raw());
        assert_eq!(&body("{}").with_fields(&[], &[("k", b"1"), ("j", b"2")])[..], b"{\"k\":1,\"j\":2}");
        // Every occurrence of a dropped key goes, escaped spellings included.
        let b = body(r#"{"kv_transfer_params":1,"p":0,"kv\u005ftransfer_params":2}"#);
        assert_eq!(&b.with_fields(&["kv_transfer_params"], &[])[..], br#"{"p":0}"#);
        // A long value is shared, not copied: the same bytes, in the client's buffer.
        let ids = format!("[{}]", (0..5000).map(|i| i.to_string()).collect::<Vec<_>>().join(","));
        let raw = Bytes::from(format!(r#"{{"stream":true,"prompt":{ids},"max_tokens":9}}"#));
        let b = ClientBody::parse(raw.clone()).unwrap();
        let pieces = b.pieces_with(&["stream"], &[("max_tokens", b"1")]);
        assert_eq!(&pieces.to_bytes()[..], format!(r#"{{"prompt":{ids},"max_tokens":1}}"#).as_bytes());
        let shared = pieces.chunks().iter().find(|c| c.len() == ids.len()).expect("the prompt is one piece");
        let start = raw.as_ptr() as usize;
        assert!((start..start + raw.len()).contains(&(shared.as_ptr() as usize)), "the prompt piece points into the client's bytes");
    }

    #[test]
    fn non_objects_get_vllms_errors() {
        let e = ClientBody::parse(Bytes::from_static(b"[1,2]")).err().unwrap();
        assert!(e.message.contains("model_attributes_type"), "{}", e.message);
        let e = ClientBody::parse(Bytes::from_static(b"{oops")).err().unwrap();
        assert!(e.message.contains("json_invalid"), "{}", e.message);
        assert!(ClientBody::parse(Bytes::from_static(b"{} x")).is_err());
    }
}
