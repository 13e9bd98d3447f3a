//! Anthropic's Messages API through `disagg route` on simulators: the SDK's calls equal a
//! plain simulator's (messages.rs, the case real vLLM runs too), the KV moved over the
//! legs, and the router's own errors in Anthropic's shape (keys, no decode, a stream cut).

use std::time::Duration;

use serde_json::{json, Value};

use crate::messages::messages_equal_plain;
use crate::support::*;

#[tokio::test]
async fn the_anthropic_sdk_through_pd_equals_a_plain_instance() {
    let p = Proc::sim(&["--role", "prefill"]).await;
    let d = Proc::sim(&["--role", "decode"]).await;
    let plain = Proc::sim(&[]).await;
    let r = router(&["--client-api-key", "sk-test", "--prefill", &p.url, "--decode", &d.url]).await;
    messages_equal_plain(&r.url, &plain.url, "sim-model", "Tell me how routers move prompts between engines.", "sk-test").await;
    // Every generation's prompt came over the legs: the decode computed none of it.
    let dm = metrics(&d.url).await;
    assert_eq!(metric(&dm, "vllm:prompt_tokens_by_source_total", &[("source", "local_compute")]), 0.0);
    assert!(metric(&dm, "vllm:prompt_tokens_by_source_total", &[("source", "external_kv_transfer")]) > 0.0);
    assert_eq!(metric(&metrics(&p.url).await, "disagg_sim_kv_blocks_held", &[]), 0.0);
    assert_idle(&r.url).await;
}

#[tokio::test]
async fn messages_errors_are_anthropic_shaped() {
    let p = Proc::sim(&["--role", "prefill"]).await;
    let mut d = Proc::sim(&["--role", "decode"]).await;
    let r = router(&["--client-api-key", "sk-test", "--prefill", &p.url, "--decode", &d.url]).await;
    let url = format!("{}/v1/messages", r.url);
    let body = json!({"model": "sim-model", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]});
    let anthropic = |v: &Value| v["type"] == "error" && v["error"]["message"].is_string() && v["error"]["type"].is_string();
    // No key, or a wrong one: 401 in Anthropic's shape; the x-api-key the SDK sends passes.
    let (status, v) = post(&url, &body).await;
    assert!(status == 401 && anthropic(&v), "{status} {v}");
    let (status, v) = post_with(&url, &body, &[("x-api-key", "nope")]).await;
    assert!(status == 401 && anthropic(&v), "{status} {v}");
    let (status, v) = post_with(&url, &body, &[("x-api-key", "sk-test")]).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["type"], "message");
    // Fields the prefill leg overrides are checked before it runs: nothing reaches a worker.
    let before = served(&p.url).await;
    for bad in [
        json!({"model": "sim-model", "messages": [{"role": "user", "content": "hi"}]}),
        json!({"model": "sim-model", "max_tokens": 0, "messages": [{"role": "user", "content": "hi"}]}),
        json!({"model": "sim-model", "max_tokens": 8, "thinking": {"type": "enabled", "budget_tokens": 8},
               "messages": [{"role": "user", "content": "hi"}]}),
    ] {
        let (status, v) = post_with(&url, &bad, &[("x-api-key", "sk-test")]).await;
        assert!(status == 400 && anthropic(&v), "{bad}: {status} {v}");
    }
    assert_eq!(served(&p.url).await, before, "no prefill ran for a refused request");
    // No decode: the router's 503, in Anthropic's shape.
    d.kill();
    d.wait_exit(Duration::from_secs(5)).await;
    let gone = eventually(Duration::from_secs(10), || async { post_with(&url, &body, &[("x-api-key", "sk-test")]).await.0 == 503 }).await;
    assert!(gone);
    let (_, v) = post_with(&url, &body, &[("x-api-key", "sk-test")]).await;
    assert!(anthropic(&v), "{v}");
    // count_tokens passes through to a prefill.
    let (status, v) = post_with(
        &format!("{}/v1/messages/count_tokens", r.url),
        &json!({"model": "sim-model", "messages": [{"role": "user", "content": "hi"}]}),
        &[("x-api-key", "sk-test")],
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert!(v["input_tokens"].as_u64().unwrap() > 0);
}

#[tokio::test]
async fn a_messages_stream_cut_mid_way_ends_with_an_anthropic_error_event() {
    let p = Proc::sim(&["--role", "prefill"]).await;
    // The decode dies after its first chunk.
    let d = Proc::sim(&["--role", "decode", "--crash-after-requests", "0"]).await;
    let r = router(&["--prefill", &p.url, "--decode", &d.url]).await;
    let body = json!({"model": "sim-model", "max_tokens": 30, "stream": true, "messages": [{"role": "user", "content": "tell me"}]});
    let (status, events) = post_stream(&format!("{}/v1/messages", r.url), &body).await;
    assert_eq!(status, 200);
    let first: Value = serde_json::from_str(&events[0]).unwrap();
    assert_eq!(first["type"], "message_start", "{events:?}");
    let last: Value = serde_json::from_str(events.last().unwrap()).unwrap();
    assert!(last["type"] == "error" && last["error"]["message"].as_str().unwrap().contains("mid-stream"), "{events:?}");
    assert!(!events.iter().any(|e| e.contains("[DONE]") || e.contains("message_stop")), "{events:?}");
    assert_idle(&r.url).await;
}
