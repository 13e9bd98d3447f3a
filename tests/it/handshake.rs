//! The NIXL handshake (PROTOCOLS.md §1) checked case by case against base URLs, so the
//! very same cases run against `disagg sim` (here) and against real vLLM (vllm_e2e.rs).

use std::time::Duration;

use serde_json::{json, Value};

use crate::support::*;

/// A prefill instance, a decode instance, and the served model name.
pub struct Pair {
    pub prefill: String,
    pub decode: String,
    /// A plain instance serving the same model: the colocated reference.
    pub colocated: String,
    pub model: String,
    /// Tokens per KV block of the engines (vLLM CPU: 128; the sim: --block-size).
    pub block_size: usize,
}

impl Pair {
    /// A prompt of about `blocks` KV blocks, unique to `tag`.
    pub fn prompt(&self, tag: &str, blocks: usize) -> String {
        let words = self.block_size * blocks;
        let mut p = format!("{tag}:");
        for i in 0..words {
            p.push_str(&format!(" w{}", i % 97));
        }
        p
    }

    fn body(&self, path: &str, prompt: &str, max_tokens: u32) -> Value {
        if path.ends_with("chat/completions") {
            json!({"model": self.model, "messages": [{"role": "user", "content": prompt}],
                   "max_tokens": max_tokens, "temperature": 0})
        } else {
            json!({"model": self.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
        }
    }

    /// The prefill leg exactly as a router sends it. Returns the prefill's response.
    pub async fn prefill_leg(&self, path: &str, body: &Value) -> Value {
        let mut leg = body.clone();
        leg["kv_transfer_params"] = prefill_params();
        leg["stream"] = json!(false);
        leg["max_tokens"] = json!(1);
        leg.as_object_mut().unwrap().remove("stream_options");
        let (status, resp) = post_with(&format!("{}{path}", self.prefill), &leg, &[("X-Request-Id", "hs-test")]).await;
        assert_eq!(status, 200, "prefill leg failed: {resp}");
        resp
    }

    /// Prefill then decode by hand, as the toy proxy does; returns the decode's text.
    pub async fn disaggregated(&self, path: &str, body: &Value, stream: bool) -> String {
        let prefill = self.prefill_leg(path, body).await;
        let params = prefill["kv_transfer_params"].clone();
        assert!(params.is_object(), "prefill returned no kv_transfer_params: {prefill}");
        let mut decode = body.clone();
        decode["kv_transfer_params"] = params;
        let url = format!("{}{path}", self.decode);
        if stream {
            decode["stream"] = json!(true);
            let (status, events) = post_stream(&url, &decode).await;
            assert_eq!(status, 200);
            assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
            stream_text(&events)
        } else {
            let (status, resp) = post(&url, &decode).await;
            assert_eq!(status, 200, "decode leg failed: {resp}");
            text_of(&resp)
        }
    }

    pub async fn colocated(&self, path: &str, body: &Value) -> String {
        let (status, resp) = post(&format!("{}{path}", self.colocated), body).await;
        assert_eq!(status, 200, "{resp}");
        text_of(&resp)
    }
}

/// The prefill answers a `do_remote_decode` leg with the params a decode needs.
pub async fn prefill_returns_params(p: &Pair) {
    let body = p.body("/v1/completions", &p.prompt("params", 2), 1);
    let resp = p.prefill_leg("/v1/completions", &body).await;
    assert_eq!(resp["id"], "cmpl-hs-test", "X-Request-Id is the base of the id");
    assert_eq!(resp["choices"][0]["finish_reason"], "length");
    assert_eq!(resp["usage"]["completion_tokens"], 1);
    let kv = &resp["kv_transfer_params"];
    assert_eq!(kv["do_remote_prefill"], true, "{kv}");
    assert_eq!(kv["do_remote_decode"], false);
    assert!(kv["remote_engine_id"].is_string());
    assert!(kv["remote_request_id"].as_str().unwrap().starts_with("cmpl-hs-test"));
    assert!(kv["remote_host"].is_string());
    assert!(kv["remote_port"].is_u64());
    assert!(kv["tp_size"].is_u64());
    let blocks = kv["remote_block_ids"][0].as_array().expect("nested block ids");
    let prompt_tokens = resp["usage"]["prompt_tokens"].as_u64().unwrap() as usize;
    assert_eq!(blocks.len(), prompt_tokens.div_ceil(p.block_size), "one block id per prompt block");
    // Let the decode pull it so nothing stays held.
    let mut decode = body.clone();
    decode["kv_transfer_params"] = kv.clone();
    assert_eq!(post(&format!("{}/v1/completions", p.decode), &decode).await.0, 200);
}

/// Greedy output of prefill→decode equals a colocated run: both APIs, streamed or not,
/// short prompts and prompts longer than two blocks.
pub async fn disaggregated_equals_colocated(p: &Pair) {
    for path in ["/v1/completions", "/v1/chat/completions"] {
        for (tag, blocks) in [("short", 0usize), ("long", 3)] {
            for stream in [false, true] {
                let prompt = p.prompt(&format!("{tag}-{stream}-{path}"), blocks);
                let body = p.body(path, &prompt, 12);
                let want = p.colocated(path, &body).await;
                let got = p.disaggregated(path, &body, stream).await;
                assert!(!want.is_empty());
                assert_eq!(got, want, "{path} {tag} stream={stream}");
            }
        }
    }
}

/// The decode counts the prompt as transferred, not computed, and the prefill's held
/// blocks are released once pulled.
pub async fn kv_moves_and_is_released(p: &Pair) {
    let before = metrics(&p.decode).await;
    let body = p.body("/v1/completions", &p.prompt("moves", 2), 4);
    let prefill = p.prefill_leg("/v1/completions", &body).await;
    let prompt_tokens = prefill["usage"]["prompt_tokens"].as_f64().unwrap();
    let held = metric(&metrics(&p.prefill).await, "vllm:kv_cache_usage_perc", &[]);
    assert!(held > 0.0, "the prefill holds the prompt's KV until it is pulled");
    let mut decode = body.clone();
    decode["kv_transfer_params"] = prefill["kv_transfer_params"].clone();
    assert_eq!(post(&format!("{}/v1/completions", p.decode), &decode).await.0, 200);
    let after = metrics(&p.decode).await;
    let source = |t: &str, s: &str| metric(t, "vllm:prompt_tokens_by_source_total", &[("source", s)]);
    assert_eq!(source(&after, "external_kv_transfer") - source(&before, "external_kv_transfer"), prompt_tokens);
    assert_eq!(source(&after, "local_compute"), source(&before, "local_compute"));
    let released =
        eventually(Duration::from_secs(5), || async { metric(&metrics(&p.prefill).await, "vllm:kv_cache_usage_perc", &[]) == 0.0 }).await;
    assert!(released, "the prefill released the blocks after the pull");
}

/// Params that point at a prefill that is not there: HTTP 500 with an error JSON (or,
/// streamed, an error event then [DONE]); the decode stays healthy. (The engine id is
/// one the decode has never met: NIXL reuses a finished handshake with a known engine,
/// so only an unknown one makes the decode go to the side channel.)
pub async fn dead_prefill_fails_the_decode(p: &Pair, dead_port: u16) {
    let body = p.body("/v1/completions", &p.prompt("dead", 1), 4);
    let resp = p.prefill_leg("/v1/completions", &body).await;
    let mut params = resp["kv_transfer_params"].clone();
    params["remote_port"] = json!(dead_port);
    params["remote_engine_id"] = json!("00000000-dead-4000-8000-000000000000");
    let mut decode = body.clone();
    decode["kv_transfer_params"] = params;
    let url = format!("{}/v1/completions", p.decode);
    let (status, err) = post(&url, &decode).await;
    assert_eq!(status, 500, "{err}");
    assert!(err["error"]["message"].is_string(), "{err}");
    assert_eq!(err["error"]["code"], 500);
    decode["stream"] = json!(true);
    let (status, events) = post_stream(&url, &decode).await;
    assert_eq!(status, 200);
    let first: Value = serde_json::from_str(&events[0]).unwrap();
    assert_eq!(first["error"]["code"], 500, "{first}");
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    assert_eq!(get(&format!("{}/health", p.decode)).await.0, 200, "the decode survives");
    // Let a decode pull the real params, so the prefill holds nothing after this case.
    let mut decode = body.clone();
    decode["kv_transfer_params"] = resp["kv_transfer_params"].clone();
    assert_eq!(post(&url, &decode).await.0, 200);
}

/// A decode prompt that does not match the pulled blocks fails (real vLLM's engine dies).
pub async fn mismatched_prompt_fails(p: &Pair) {
    let body = p.body("/v1/completions", &p.prompt("mismatch", 1), 4);
    let resp = p.prefill_leg("/v1/completions", &body).await;
    let mut decode = p.body("/v1/completions", &p.prompt("other prompt entirely", 3), 4);
    decode["kv_transfer_params"] = resp["kv_transfer_params"].clone();
    let (status, err) = post(&format!("{}/v1/completions", p.decode), &decode).await;
    assert_eq!(status, 500, "{err}");
    assert_eq!(err["error"]["code"], 500);
}
