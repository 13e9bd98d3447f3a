//! Prefix caching, KV events and the render endpoints on a real vLLM-CPU instance, with
//! the same cases the simulator's tests run (tests/it/kv_events.rs), and, on a corpus of
//! completions prompts and chats (system prompts, multi-turn conversations grown turn by
//! turn), the token ids of vLLM's render endpoints against the simulator's (with the tiny
//! model's tokenizer) and against the router's own path for kv_aware
//! (`kv_tokens::prompt_tokens`: the model's tokenizer, its chat template, the turn cache).
//! The instance renders chats with TinyLlama-Chat's template (`--chat-template`): a real
//! model's, which ends every message with `</s>`, where the turn cache cuts.

use std::time::Duration;

use serde_json::{json, Value};

use super::kv_events::{self, Engine};
use super::support::*;
use super::Vllm;

/// Blocks of the instance's KV cache (--num-gpu-blocks-override).
const BLOCKS: usize = 128;

/// TinyLlama/TinyLlama-1.1B-Chat-v1.0's chat template, verbatim (also the kv_aware bench's).
const TINYLLAMA_CHAT: &str = include_str!("../data/tinyllama-chat.jinja");

/// The tiny model's tokenizer with TinyLlama-Chat's template, in a directory of its own.
fn tokenizer_dir() -> String {
    let model = script_var("vllm-env.sh", "MODEL");
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("tinyllama-chat-tokenizer");
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(format!("{model}/{f}"), dir.join(f)).unwrap();
    }
    std::fs::write(dir.join("chat_template.jinja"), TINYLLAMA_CHAT).unwrap();
    dir.to_string_lossy().into_owned()
}

/// Chats: single messages, system prompts, unicode, empty content, and two conversations
/// grown turn by turn (each turn's body is every earlier turn plus one question).
fn chat_corpus() -> Vec<Value> {
    let mut chats = vec![
        json!([{"role": "user", "content": "hi"}]),
        json!([{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is PD?"}]),
        json!([{"role": "user", "content": "one"}, {"role": "assistant", "content": "two"}, {"role": "user", "content": "three ✓"}]),
        json!([{"role": "system", "content": ""}, {"role": "user", "content": "  leading and trailing spaces  "}]),
        json!([{"role": "user", "content": "unicodé ✓ 漢字\n\ttabs and </s> written out"}]),
    ];
    for (system, topic) in [("You are a careful assistant.", "prefill"), ("Answer in one line.\n", "decode")] {
        let mut conv = vec![json!({"role": "system", "content": system})];
        for turn in 0..5 {
            conv.push(json!({"role": "user", "content": format!("Turn {turn}: tell me about {topic} number {turn}, with ✓ and  double  spaces?")}));
            chats.push(Value::Array(conv.clone()));
            conv.push(json!({"role": "assistant", "content": format!("About {topic} {turn}: it is what it is.\n")}));
        }
    }
    chats
}

pub async fn run() {
    let tokenizer_dir = tokenizer_dir();
    let chat_template = format!("{tokenizer_dir}/chat_template.jinja");
    let cfg = r#"{"enable_kv_cache_events":true,"publisher":"zmq","endpoint":"tcp://*:5557","replay_endpoint":"tcp://*:5558","topic":"kv-events"}"#;
    let blocks = BLOCKS.to_string();
    let mut v = Vllm::spawn_with(
        "kv-plain",
        "plain",
        8400,
        5900,
        0,
        &[
            "--enable-prefix-caching",
            "--block-size",
            "32",
            "--enable-prompt-tokens-details",
            "--enable-scale-out",
            "--num-gpu-blocks-override",
            &blocks,
            "--kv-events-config",
            cfg,
            "--chat-template",
            &chat_template,
        ],
    );
    v.wait_healthy(Duration::from_secs(600)).await;
    let e = Engine { url: v.url.clone(), model: "tiny-llama".into(), block_size: 32 };
    kv_events::sources_show_the_config(&e, "tcp://*:5557", "tcp://*:5558", "kv-events").await;
    let mut sub = kv_events::subscribe(&e).await;
    kv_events::stored_events_follow_full_blocks(&e, &mut sub).await;
    kv_events::removed_events_follow_eviction(&e, &mut sub, BLOCKS).await;
    kv_events::replay_returns_what_was_missed(&e, &sub).await;
    println!("      {} event batches from vLLM decoded; stored, chained, evicted and replayed as the simulator's", sub.seen.len());

    // The simulator with the model's tokenizer renders what vLLM renders, and so does the
    // router's own path.
    let sim = Proc::sim(&["--enable-scale-out", "--tokenizer", &tokenizer_dir, "--model", "tiny-llama", "--max-model-len", "2048"]).await;
    let router_tokenizer = disagg::tokenize::ModelTokenizer::load(&tokenizer_dir).unwrap();
    let completions =
        [json!("hello world"), json!("  spaces  and\ttabs\n"), json!("unicodé ✓ 漢字"), json!(["a list", "of two"]), json!([5, 6, 7])];
    let chats = chat_corpus();
    let ids = |v: &Value| -> Vec<Value> {
        match v {
            Value::Array(list) => list.iter().map(|x| x["token_ids"].clone()).collect(),
            one => vec![one["token_ids"].clone()],
        }
    };
    let bodies = completions
        .iter()
        .map(|p| ("/v1/completions/render", json!({"model": "tiny-llama", "prompt": p})))
        .chain(chats.iter().map(|m| ("/v1/chat/completions/render", json!({"model": "tiny-llama", "messages": m}))));
    for (path, body) in bodies {
        let (s1, want) = post(&format!("{}{path}", v.url), &body).await;
        let (s2, got) = post(&format!("{}{path}", sim.url), &body).await;
        assert_eq!((s1, s2), (200, 200), "{want} / {got}");
        assert_eq!(ids(&got), ids(&want), "{path} of {body}");
        let client_body = disagg::router::request::body::ClientBody::parse(serde_json::to_vec(&body).unwrap().into()).unwrap();
        let routed = disagg::router::kv_aware::tokens::prompt_tokens(&client_body, Some(&router_tokenizer));
        if ids(&want).len() == 1 {
            assert_eq!(routed.map(|t| json!(t)), Some(ids(&want)[0].clone()), "the router's tokens for {body}");
        }
    }
    let (prefixes, _) = router_tokenizer.turns_held();
    assert!(
        router_tokenizer.turn_hits() >= 8,
        "the conversations' later turns found their earlier turns cached ({prefixes} prefixes held)"
    );
    println!(
        "      render: {} completions and {} chat bodies give vLLM's token ids on the simulator and on the router's path \
              (turn cache: {} of its chats found an earlier turn)",
        completions.len(),
        chats.len(),
        router_tokenizer.turn_hits()
    );
    drop(sim);
    super::timing::run(&v.url).await;
}
