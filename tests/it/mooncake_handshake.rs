//! MooncakeConnector's handshake (docs/PROTOCOLS.md §2) checked case by case against base
//! URLs, so the same cases run against `disagg sim --kv-connector mooncake` (connectors.rs)
//! and against real vLLM-CPU with Mooncake's transfer engine (vllm/mooncake.rs).

use serde_json::{json, Value};

use crate::support::*;

pub struct MooncakePair {
    pub prefill: String,
    /// The prefill's bootstrap server, `http://host:port`.
    pub bootstrap: String,
    pub decode: String,
    /// An instance generating plainly with the same model: the reference.
    pub plain: String,
    pub model: String,
}

impl MooncakePair {
    fn body(&self, prompt: &str, max_tokens: u32, params: Option<Value>) -> Value {
        let mut b = json!({"model": self.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0});
        if let Some(p) = params {
            b["kv_transfer_params"] = p;
        }
        b
    }

    fn prefill_params(transfer_id: &str) -> Value {
        json!({"do_remote_decode": true, "do_remote_prefill": false, "transfer_id": transfer_id})
    }

    fn decode_params(&self, engine_id: &str, transfer_id: &str) -> Value {
        json!({"do_remote_decode": false, "do_remote_prefill": true, "remote_bootstrap_addr": self.bootstrap,
            "remote_engine_id": engine_id, "transfer_id": transfer_id})
    }
}

/// Every case; returns the number of cases run.
pub async fn cases(p: &MooncakePair) -> usize {
    // The bootstrap server names rank 0's engine and its worker address.
    let (status, q) = get(&format!("{}/query", p.bootstrap)).await;
    assert_eq!(status, 200, "{q}");
    let q: Value = serde_json::from_str(&q).unwrap();
    let engine_id = q["0"]["engine_id"].as_str().unwrap_or_else(|| panic!("no engine id: {q}")).to_string();
    assert!(q["0"]["worker_addr"]["0"]["0"].as_str().is_some_and(|a| a.starts_with("tcp://")), "{q}");

    // Prefill first, then decode: the prefill stops on its length cap and answers no params.
    let prompt = "Mooncake handshake: the orchard keeper pruned the trees before the first frost came";
    let (_, plain) = post(&format!("{}/v1/completions", p.plain), &p.body(prompt, 12, None)).await;
    let (status, pre) =
        post(&format!("{}/v1/completions", p.prefill), &p.body(prompt, 1, Some(MooncakePair::prefill_params("xfer-hs-1")))).await;
    assert_eq!(status, 200, "{pre}");
    assert_eq!(pre["choices"][0]["finish_reason"], "length");
    assert!(pre["kv_transfer_params"].is_null(), "a Mooncake prefill answers no params: {pre}");
    let (status, dec) =
        post(&format!("{}/v1/completions", p.decode), &p.body(prompt, 12, Some(p.decode_params(&engine_id, "xfer-hs-1")))).await;
    assert_eq!(status, 200, "{dec}");
    assert_eq!(text_of(&dec), text_of(&plain), "prefill then decode");

    // Decode first: it waits for the transfer until the prefill holds it.
    let prompt = "Mooncake handshake, decode first: the ferry waited at the pier while the tide turned";
    let (_, plain) = post(&format!("{}/v1/completions", p.plain), &p.body(prompt, 12, None)).await;
    let decode_url = format!("{}/v1/completions", p.decode);
    let decode_body = p.body(prompt, 12, Some(p.decode_params(&engine_id, "xfer-hs-2")));
    let decoding = tokio::spawn(async move { post(&decode_url, &decode_body).await });
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert!(!decoding.is_finished(), "the decode waits for its prefill");
    let (status, _) =
        post(&format!("{}/v1/completions", p.prefill), &p.body(prompt, 1, Some(MooncakePair::prefill_params("xfer-hs-2")))).await;
    assert_eq!(status, 200);
    let (status, dec) = decoding.await.unwrap();
    assert_eq!(status, 200, "{dec}");
    assert_eq!(text_of(&dec), text_of(&plain), "decode sent before its prefill");
    2
}
