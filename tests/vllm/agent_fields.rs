//! The fields coding agents use, through PD on real vLLM-CPU against a plain instance:
//! logprobs and top logprobs (both APIs), structured output (a JSON schema), `echo`;
//! and `prompt_logprobs`, which a decode that pulled its prompt's KV cannot compute, is a
//! clear 400 from the router before any prefill (docs/PROTOCOLS.md §0).

use serde_json::{json, Value};

use super::support::*;

/// Rounds every float in a JSON value (logprobs from two engines of the same weights may
/// differ in their last bits).
fn rounded(v: &Value) -> Value {
    match v {
        Value::Number(n) if n.is_f64() => json!((n.as_f64().unwrap() * 1000.0).round() / 1000.0),
        Value::Array(a) => Value::Array(a.iter().map(rounded).collect()),
        Value::Object(m) => Value::Object(m.iter().map(|(k, v)| (k.clone(), rounded(v))).collect()),
        other => other.clone(),
    }
}

pub async fn survive_both_legs(router: &str, plain: &str, prompt: &str) {
    let schema = json!({"type": "json_schema", "json_schema": {"name": "answer", "schema": {
        "type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}}});
    let cases = [
        ("/v1/completions", json!({"prompt": prompt, "max_tokens": 6, "logprobs": 2}), "/choices/0/logprobs"),
        ("/v1/completions", json!({"prompt": prompt, "max_tokens": 6, "echo": true}), "/choices/0/text"),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": prompt}], "max_tokens": 6, "logprobs": true, "top_logprobs": 2}),
            "/choices/0/logprobs",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": prompt}], "max_tokens": 24, "response_format": schema}),
            "/choices/0/message/content",
        ),
    ];
    for (path, mut body, field) in cases {
        body["model"] = json!("tiny-llama");
        body["temperature"] = json!(0);
        let (status, direct) = post(&format!("{plain}{path}"), &body).await;
        assert_eq!(status, 200, "{path} {body}: {direct}");
        let (status, via) = post(&format!("{router}{path}"), &body).await;
        assert_eq!(status, 200, "{path} {body}: {via}");
        let (want, got) = (direct.pointer(field).cloned().unwrap_or_default(), via.pointer(field).cloned().unwrap_or_default());
        assert!(!want.is_null(), "{path} {body}: plain answered no {field}: {direct}");
        assert_eq!(rounded(&got), rounded(&want), "{path} {body}: {field}");
    }
    // A decode that pulled its prompt's KV never computes its logprobs: refused, before any prefill.
    let body = json!({"model": "tiny-llama", "prompt": prompt, "max_tokens": 2, "prompt_logprobs": 1});
    let (status, err) = post(&format!("{router}/v1/completions"), &body).await;
    assert_eq!(status, 400, "{err}");
    assert!(err["error"]["message"].as_str().unwrap().contains("prompt_logprobs"), "{err}");
}
