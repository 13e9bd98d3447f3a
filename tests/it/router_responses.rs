//! OpenAI's Responses API through `disagg route` on simulators: the SDK's calls equal a
//! plain simulator's (responses.rs, the case real vLLM runs too) with a chain whose turns
//! land on different prefills; the store survives a router restart; a client key never
//! reads or continues another's response; requests the router cannot serve are refused
//! before any prefill.

use serde_json::{json, Value};

use crate::responses::responses_equal_plain;
use crate::support::*;

#[tokio::test]
async fn the_openai_sdks_responses_through_pd_equal_a_plain_instance_across_prefills() {
    let p1 = Proc::sim(&["--role", "prefill"]).await;
    let p2 = Proc::sim(&["--role", "prefill"]).await;
    let d = Proc::sim(&["--role", "decode"]).await;
    let plain = Proc::sim(&[]).await;
    let r =
        router(&["--client-api-key", "sk-test", "--policy", "round_robin", "--prefill", &p1.url, "--prefill", &p2.url, "--decode", &d.url])
            .await;
    responses_equal_plain(&r.url, &plain.url, "explicit", "sim-model", "Tell me how routers move prompts between engines.", "sk-test")
        .await;
    // Both prefills served turns of the conversations; the decode computed no prompt.
    assert!(served(&p1.url).await > 0.0 && served(&p2.url).await > 0.0);
    let dm = metrics(&d.url).await;
    assert_eq!(metric(&dm, "vllm:prompt_tokens_by_source_total", &[("source", "local_compute")]), 0.0);
    assert_idle(&r.url).await;
}

async fn create(router: &str, key: &str, body: Value) -> (u16, Value) {
    post_with(&format!("{router}/v1/responses"), &body, &[("authorization", &format!("Bearer {key}"))]).await
}

async fn call(method: reqwest::Method, url: &str, key: &str) -> (u16, Value) {
    let resp = client().request(method, url).bearer_auth(key).send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn a_chain_continues_after_a_router_restart_and_keys_never_see_each_others() {
    let p = Proc::sim(&["--role", "prefill"]).await;
    let d = Proc::sim(&["--role", "decode"]).await;
    let state = temp_dir("responses-restart");
    let state = state.to_str().unwrap();
    let args = ["--client-api-key", "sk-a", "--client-api-key", "sk-b", "--state-dir", state, "--prefill", &p.url, "--decode", &d.url];
    let mut r = router(&args).await;
    let first = json!({"model": "sim-model", "input": "Name three rivers.", "max_output_tokens": 6, "temperature": 0});
    let (status, r1) = create(&r.url, "sk-a", first).await;
    assert_eq!(status, 200, "{r1}");
    let id = r1["id"].as_str().unwrap().to_string();
    assert!(std::path::Path::new(state).join("responses.sqlite3").exists());
    r.kill();
    r.wait_exit(std::time::Duration::from_secs(5)).await;
    let r = router(&args).await;
    let url = |tail: &str| format!("{}/v1/responses/{id}{tail}", r.url);
    // Another key: not found, for reading, continuing, cancelling and deleting alike.
    assert_eq!(call(reqwest::Method::GET, &url(""), "sk-b").await.0, 404);
    let next =
        json!({"model": "sim-model", "input": "And a fourth?", "previous_response_id": id, "max_output_tokens": 6, "temperature": 0});
    let (status, v) = create(&r.url, "sk-b", next.clone()).await;
    assert_eq!(status, 404, "{v}");
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert_eq!(call(reqwest::Method::POST, &url("/cancel"), "sk-b").await.0, 404);
    assert_eq!(call(reqwest::Method::DELETE, &url(""), "sk-b").await.0, 404);
    // Its own key, on the new router: the stored response, and the chain goes on.
    let (status, got) = call(reqwest::Method::GET, &url(""), "sk-a").await;
    assert_eq!(status, 200, "{got}");
    assert_eq!(got["output"], r1["output"]);
    let (status, r2) = create(&r.url, "sk-a", next).await;
    assert_eq!(status, 200, "{r2}");
    assert_eq!(r2["previous_response_id"], id.as_str());
    assert!(r2["usage"]["input_tokens"].as_u64().unwrap() > r1["usage"]["input_tokens"].as_u64().unwrap(), "the history was sent");
    let (status, v) = call(reqwest::Method::DELETE, &url(""), "sk-a").await;
    assert_eq!((status, v["deleted"].clone()), (200, json!(true)), "{v}");
    assert_eq!(call(reqwest::Method::GET, &url(""), "sk-a").await.0, 404);
    assert_idle(&r.url).await;
}

#[tokio::test]
async fn responses_the_router_cannot_serve_are_refused_before_any_prefill() {
    let p = Proc::sim(&["--role", "prefill"]).await;
    let d = Proc::sim(&["--role", "decode"]).await;
    let r = router(&["--prefill", &p.url, "--decode", &d.url]).await;
    let off = router(&["--responses-store", "off", "--prefill", &p.url, "--decode", &d.url]).await;
    let url = format!("{}/v1/responses", r.url);
    let before = served(&p.url).await;
    for (bad, status) in [
        (json!({"model": "sim-model", "input": "hi", "background": true}), 400),
        (json!({"model": "sim-model", "input": "hi", "max_output_tokens": 0}), 400),
        (json!({"model": "sim-model"}), 400),
        (json!({"model": "sim-model", "input": "hi", "previous_response_id": "resp_unknown"}), 404),
        (json!({"model": "sim-model", "input": "hi", "previous_response_id": 7}), 400),
    ] {
        let (got, v) = post(&url, &bad).await;
        assert_eq!(got, status, "{bad}: {v}");
        assert!(v["error"]["message"].is_string(), "OpenAI's error shape: {v}");
    }
    assert_eq!(served(&p.url).await, before, "no prefill ran for a refused request");
    // store: false, or a router that stores nothing: answered, not kept.
    let (status, v) = post(&url, &json!({"model": "sim-model", "input": "hi", "max_output_tokens": 3, "store": false})).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(get(&format!("{}/v1/responses/{}", r.url, v["id"].as_str().unwrap())).await.0, 404);
    let (status, v) =
        post(&format!("{}/v1/responses", off.url), &json!({"model": "sim-model", "input": "hi", "max_output_tokens": 3})).await;
    assert_eq!(status, 200, "{v}");
    let next = json!({"model": "sim-model", "input": "more", "previous_response_id": v["id"]});
    assert_eq!(post(&format!("{}/v1/responses", off.url), &next).await.0, 404);
}

#[tokio::test]
async fn a_responses_stream_cut_mid_way_ends_with_an_error_event() {
    let p = Proc::sim(&["--role", "prefill"]).await;
    let d = Proc::sim(&["--role", "decode", "--crash-after-requests", "0"]).await;
    let r = router(&["--prefill", &p.url, "--decode", &d.url]).await;
    let body = json!({"model": "sim-model", "input": "tell me", "max_output_tokens": 30, "stream": true});
    let (status, events) = post_stream(&format!("{}/v1/responses", r.url), &body).await;
    assert_eq!(status, 200);
    let last: Value = serde_json::from_str(events.last().expect("events")).unwrap();
    assert_eq!(last["type"], "error", "{events:?}");
    assert!(!events.iter().any(|e| e.contains("response.completed")), "{events:?}");
}
