//! Flow control on real vLLM: a decode started with `--scheduling-policy priority` (and one
//! request at a time, so that requests queue in it) behind the router with a tenants file;
//! the priority the router resolves for each tenant reaches vLLM on both legs, and vLLM
//! serves by it: a high-priority request sent after a queue of low-priority ones is
//! served next, where at the same priority it is served last.

use std::time::Duration;

use serde_json::json;

use super::support::*;
use super::Env;

const TENANTS: &str =
    "tenants:\n  - name: batch\n    keys: [sk-batch]\n    priority: 10\n  - name: chat\n    keys: [sk-chat]\n    priority: 0\n";

/// Requests the decode reports waiting.
async fn waiting(decode: &str) -> f64 {
    let m = client().get(format!("{decode}/metrics")).send().await.unwrap().text().await.unwrap();
    metric(&m, "vllm:num_requests_waiting", &[])
}

/// Four batch requests, then (once three of them wait at the decode behind the one it
/// runs) one chat request asking for `chat_priority` (None: its tenant's default); the
/// order they finish in.
async fn finish_order(router: &str, decode: &str, chat_priority: Option<i64>) -> Vec<String> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let send = |label: String, key: &'static str, priority: Option<i64>| {
        let (url, tx) = (format!("{router}/v1/completions"), tx.clone());
        tokio::spawn(async move {
            let mut body = json!({"model": "tiny-llama", "prompt": format!("Tell me a long story about {label}."), "max_tokens": 200,
                "ignore_eos": true, "temperature": 0});
            if let Some(p) = priority {
                body["priority"] = json!(p);
            }
            let resp = client().post(&url).bearer_auth(key).json(&body).send().await.unwrap();
            let status = resp.status();
            let text = resp.text().await.unwrap();
            assert_eq!(status, 200, "{label}: {text}");
            tx.send(label).unwrap();
        })
    };
    for i in 0..4 {
        send(format!("batch-{i}"), "sk-batch", None);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let queued = eventually(Duration::from_secs(60), || async { waiting(decode).await >= 3.0 }).await;
    assert!(queued, "three batch requests wait at the decode");
    send("chat".into(), "sk-chat", chat_priority);
    let mut order = Vec::new();
    for _ in 0..5 {
        order.push(tokio::time::timeout(Duration::from_secs(300), rx.recv()).await.unwrap().unwrap());
    }
    order
}

pub async fn served_by_priority(e: &mut Env) {
    let file = temp_dir("tenants").join("tenants.yaml");
    std::fs::write(&file, TENANTS).unwrap();
    let r = router(&["--prefill", &e.p1.url, "--decode", &e.prio.url, "--tenants", file.to_str().unwrap()]).await;
    // The same priority as the batch (it may ask for a worse one than its default): last.
    let same = finish_order(&r.url, &e.prio.url, Some(10)).await;
    assert_eq!(same.last().map(String::as_str), Some("chat"), "FCFS among equals: {same:?}");
    // Its own priority 0: vLLM takes it before the batch requests still waiting.
    let first = finish_order(&r.url, &e.prio.url, None).await;
    let at = first.iter().position(|l| l == "chat").unwrap();
    assert!(at <= 1, "served right after the one running: {first:?}");
    assert_eq!(waiting(&e.prio.url).await, 0.0);
    e.prio.kill();
}
