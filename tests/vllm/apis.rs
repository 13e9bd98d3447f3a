//! The PD group's cases for the APIs beyond completions and chat (tests/it/messages.rs,
//! tokens_out.rs), each with a check that the prompts' KV came over NIXL.

use super::support::*;
use super::Env;

/// The Messages case (tests/it/messages.rs) on real vLLM, and its prompts' KV moved over NIXL.
pub async fn messages_through_pd(e: &mut Env) {
    let source = |t: &str, s: &str| metric(t, "vllm:prompt_tokens_by_source_total", &[("source", s)]);
    let before = metrics(&e.d.url).await;
    let via =
        crate::messages::messages_equal_plain(&e.router.url, &e.plain.url, "tiny-llama", &e.pair.prompt("messages", 2), "unused").await;
    // The tiny model fills a named tool's input with whitespace until max_tokens, which vLLM
    // cannot parse as JSON: a 400, through PD as on the plain instance (compared above).
    assert_eq!(via["tool"]["status"], 400, "{via}");
    let after = metrics(&e.d.url).await;
    assert!(source(&after, "external_kv_transfer") > source(&before, "external_kv_transfer"), "prompts came over NIXL");
    assert_eq!(source(&after, "local_compute"), source(&before, "local_compute"), "none computed on the decode");
    assert_idle(&e.router.url).await;
}

/// The generate case (tests/it/tokens_out.rs) on real vLLM, and its prompts' KV moved over NIXL.
pub async fn tokens_out_through_pd(e: &mut Env) {
    let source = |t: &str, s: &str| metric(t, "vllm:prompt_tokens_by_source_total", &[("source", s)]);
    let before = metrics(&e.d.url).await;
    crate::tokens_out::generate_equals_plain(&e.router.url, &e.plain.url, "tiny-llama", &e.pair.prompt("tokens out", 2)).await;
    let after = metrics(&e.d.url).await;
    assert!(source(&after, "external_kv_transfer") > source(&before, "external_kv_transfer"), "prompts came over NIXL");
    assert_eq!(source(&after, "local_compute"), source(&before, "local_compute"), "none computed on the decode");
    assert_idle(&e.router.url).await;
}

/// The fields agents use (tests/vllm/agent_fields.rs), through PD against the plain instance.
pub async fn agent_fields(e: &mut Env) {
    let prompt = e.pair.prompt("agent fields", 1);
    crate::agent_fields::survive_both_legs(&e.router.url, &e.plain.url, &prompt).await;
    assert_idle(&e.router.url).await;
}

/// The Responses case (tests/it/responses.rs) on real vLLM: the plain instance stores
/// responses (VLLM_ENABLE_RESPONSES_API_STORE=1), so the same `previous_response_id` chain
/// runs on both; the turns landed on both prefills and their KV came over NIXL.
pub async fn responses_through_pd(e: &mut Env) {
    let source = |t: &str, s: &str| metric(t, "vllm:prompt_tokens_by_source_total", &[("source", s)]);
    let before = metrics(&e.d.url).await;
    let served_before = (served(&e.p0.url).await, served(&e.p1.url).await);
    let prompt = e.pair.prompt("responses", 2);
    let via = crate::responses::responses_equal_plain(&e.router.url, &e.plain.url, "previous", "tiny-llama", &prompt, "unused").await;
    // A named function: a function_call item, its arguments constrained to the schema,
    // equal through PD and on the plain instance (compared above).
    assert_eq!(via["tool"]["items"][0][0], "function_call", "{via}");
    assert_eq!(via["tool"]["items"][0][1], "get_weather", "{via}");
    assert!(via["structured"]["text"].as_str().is_some_and(|t| t.trim_start().starts_with('{')), "JSON by the schema: {via}");
    let after = metrics(&e.d.url).await;
    assert!(source(&after, "external_kv_transfer") > source(&before, "external_kv_transfer"), "prompts came over NIXL");
    assert_eq!(source(&after, "local_compute"), source(&before, "local_compute"), "none computed on the decode");
    assert!(served(&e.p0.url).await > served_before.0 && served(&e.p1.url).await > served_before.1, "both prefills served turns");
    assert_idle(&e.router.url).await;
}

/// A pooling model behind a router (`--worker-urls`): its embeddings and `/pooling` answer
/// through the passthrough as the engine answers them directly.
pub async fn pooling_passes_through(e: &mut Env) {
    let r = router(&["--worker-urls", &e.pooling.url]).await;
    let body = serde_json::json!({"model": "tiny-llama", "input": ["the router passes this through", "and this"]});
    for path in ["/v1/embeddings", "/pooling"] {
        let (status, via) = post(&format!("{}{path}", r.url), &body).await;
        let (want_status, direct) = post(&format!("{}{path}", e.pooling.url), &body).await;
        assert_eq!((status, want_status), (200, 200), "{path}: {via} / {direct}");
        assert_eq!(via["data"], direct["data"], "{path}");
        assert!(via["data"][1].is_object(), "{path}: two inputs, two answers: {via}");
    }
    assert_idle(&r.url).await;
    // Its engine's busy loop would take CPU from the timing cases after this one.
    e.pooling.kill();
}
