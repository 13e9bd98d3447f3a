//! Findings of the router's review, each checked on real vLLM against the PD group's shared
//! instances (tests/vllm.rs): decode-only field errors, prompt lists, `n`, steering in
//! `vllm_xargs`, and a non-streamed decode whose client left.

use serde_json::{json, Value};

use super::support::*;
use super::{body, Env};
use std::time::Duration;

/// An answer without what differs between any two answers: id, time, the instance's hash.
fn without_ids(mut v: Value) -> Value {
    for k in ["id", "created", "system_fingerprint"] {
        v.as_object_mut().unwrap().remove(k);
    }
    v
}

fn texts_by_index(events: &[String]) -> std::collections::BTreeMap<u64, String> {
    let mut out = std::collections::BTreeMap::new();
    for e in events.iter().filter(|e| e.as_str() != "[DONE]") {
        let v: Value = serde_json::from_str(e).unwrap();
        for c in v["choices"].as_array().into_iter().flatten() {
            let text = c["text"].as_str().or_else(|| c["delta"]["content"].as_str()).unwrap_or("");
            out.entry(c["index"].as_u64().unwrap()).or_insert_with(String::new).push_str(text);
        }
    }
    out
}

async fn prompt_tokens_of(url: &str) -> f64 {
    metric(&metrics(url).await, "vllm:prompt_tokens_total", &[])
}

/// Finding 2 on real vLLM: the router's answer to each bad body is the plain instance's,
/// and no prefill ran for it.
pub async fn decode_only_errors_are_vllms(e: &mut Env) {
    let before = prompt_tokens_of(&e.p0.url).await + prompt_tokens_of(&e.p1.url).await;
    let bodies = [
        json!({"model": "tiny-llama", "prompt": "x", "max_tokens": 0}),
        json!({"model": "tiny-llama", "prompt": "x", "max_tokens": -1}),
        json!({"model": "tiny-llama", "prompt": "x", "max_tokens": "abc"}),
        json!({"model": "tiny-llama", "prompt": "x", "max_tokens": 2.5}),
        json!({"model": "tiny-llama", "prompt": "x", "max_tokens": 2, "min_tokens": 5}),
        json!({"model": "tiny-llama", "prompt": "x", "max_tokens": 2, "min_tokens": -1}),
        json!({"model": "tiny-llama", "prompt": "x", "max_tokens": 2, "stream": "abc"}),
        json!({"model": "tiny-llama", "prompt": "x", "max_tokens": 2, "stream_options": {"include_usage": true}}),
        json!({"model": "tiny-llama", "prompt": "x", "max_tokens": 2, "stream": true, "stream_options": {"include_usage": "x"}}),
        json!({"model": "tiny-llama", "prompt": "x", "max_tokens": 2, "n": 0}),
        json!({"model": "tiny-llama", "prompt": "x", "max_tokens": 2, "n": 2, "temperature": 0}),
        json!({"model": "tiny-llama", "prompt": "x", "max_tokens": 2, "kv_transfer_params": 5}),
    ];
    for b in &bodies {
        let want = post(&format!("{}/v1/completions", e.plain.url), b).await;
        let got = post(&format!("{}/v1/completions", e.router.url), b).await;
        assert_eq!(got, want, "{b}");
    }
    let chat = json!({"model": "tiny-llama", "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0});
    assert_eq!(
        post(&format!("{}/v1/chat/completions", e.router.url), &chat).await,
        post(&format!("{}/v1/chat/completions", e.plain.url), &chat).await
    );
    let after = prompt_tokens_of(&e.p0.url).await + prompt_tokens_of(&e.p1.url).await;
    assert_eq!(after, before, "no prefill ran for a refused request");
    assert_idle(&e.router.url).await;
}

/// Finding 11 on real vLLM: prompts of different block counts in one request.
pub async fn prompt_list_equals_plain(e: &mut Env) {
    let long = e.pair.prompt("list-long", 2);
    let body = json!({"model": "tiny-llama", "prompt": ["list short", long], "max_tokens": 8, "temperature": 0});
    let (s1, want) = post(&format!("{}/v1/completions", e.plain.url), &body).await;
    let (s2, got) = post(&format!("{}/v1/completions", e.router.url), &body).await;
    assert_eq!((s1, s2), (200, 200), "{got}");
    assert_eq!(without_ids(got), without_ids(want));
    let mut sb = body.clone();
    sb["stream"] = json!(true);
    sb["stream_options"] = json!({"include_usage": true});
    let (_, want_ev) = post_stream(&format!("{}/v1/completions", e.plain.url), &sb).await;
    let (_, got_ev) = post_stream(&format!("{}/v1/completions", e.router.url), &sb).await;
    assert_eq!(texts_by_index(&got_ev), texts_by_index(&want_ev));
    assert_eq!(got_ev.last().map(String::as_str), Some("[DONE]"));
    assert_eq!(get(&format!("{}/health", e.d.url)).await.0, 200, "the decode engine is alive");
    for p in [&e.p0, &e.p1] {
        assert!(!p.log_text().contains("Potentially invalid KV blocks"), "{} saw a read of KV it did not hold for the request", p.name);
    }
    assert_idle(&e.router.url).await;
}

/// Finding 12 on real vLLM: `n` with a seed samples what the plain instance samples.
pub async fn n_choices_equal_plain(e: &mut Env) {
    for path in ["/v1/completions", "/v1/chat/completions"] {
        let mut body = body(path, &e.pair.prompt("n-choices", 1), 6, false);
        body["n"] = json!(2);
        body["seed"] = json!(5);
        body["temperature"] = json!(0.8);
        let (s1, want) = post(&format!("{}{path}", e.plain.url), &body).await;
        let (s2, got) = post(&format!("{}{path}", e.router.url), &body).await;
        assert_eq!((s1, s2), (200, 200), "{got}");
        assert_eq!(without_ids(got), without_ids(want), "{path}");
    }
    for p in [&e.p0, &e.p1] {
        assert!(!p.log_text().contains("Potentially invalid KV blocks"), "{}", p.name);
    }
    assert_idle(&e.router.url).await;
}

/// vLLM passes `vllm_xargs.kv_transfer_params` to its connector unchecked (a string there
/// makes it answer 500); the router never forwards it.
pub async fn xargs_steering_is_dropped(e: &mut Env) {
    let b = json!({"model": "tiny-llama", "prompt": "xargs", "max_tokens": 4, "temperature": 0, "vllm_xargs": {"kv_transfer_params": "x"}});
    assert_eq!(post(&format!("{}/v1/completions", e.plain.url), &b).await.0, 500, "vLLM itself trips on it");
    let (status, v) = post(&format!("{}/v1/completions", e.router.url), &b).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(get(&format!("{}/health", e.d.url)).await.0, 200);
    assert_idle(&e.router.url).await;
}

/// Finding 13 on real vLLM: the decode of a non-streamed request whose client left is
/// cancelled soon after it took the request, and no prefill KV is left behind.
pub async fn abandoned_non_streamed_decode_stops(e: &mut Env) {
    let gen = || async { metric(&metrics(&e.d.url).await, "vllm:generation_tokens_total", &[]) };
    let before = gen().await;
    let b = json!({"model": "tiny-llama", "prompt": "abandon this one", "max_tokens": 1500, "ignore_eos": true, "temperature": 0});
    let abandoned = || async { metric(&metrics(&e.router.url).await, "disagg_router_abandoned_decode_legs_total", &[]) };
    let dropped_before = abandoned().await;
    let quick = reqwest::Client::builder().timeout(Duration::from_millis(400)).build().unwrap();
    assert!(quick.post(format!("{}/v1/completions", e.router.url)).json(&b).send().await.is_err());
    assert!(eventually(Duration::from_secs(10), || async { abandoned().await > dropped_before }).await, "the decode leg was never dropped");
    let stopped =
        eventually(Duration::from_secs(10), || async { metric(&metrics(&e.d.url).await, "vllm:num_requests_running", &[]) == 0.0 }).await;
    let made = gen().await - before;
    println!("      the decode made {made} of 1500 tokens for a client that left after 0.4 s");
    assert!(stopped, "the decode is still running the abandoned request");
    assert!(made < 1000.0, "the decode generated {made} tokens for nobody");
    for p in [&e.p0, &e.p1] {
        let released =
            eventually(Duration::from_secs(10), || async { metric(&metrics(&p.url).await, "vllm:kv_cache_usage_perc", &[]) == 0.0 }).await;
        assert!(released, "{} still holds KV", p.name);
    }
    assert_idle(&e.router.url).await;
}
