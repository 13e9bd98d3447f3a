//! kv_aware's own cost, in process (no network):
//!
//!   cargo bench --bench kv_aware        (DISAGG_MODEL=DIR adds tokenizing text prompts;
//!                                        DISAGG_KV_BENCH_SERVING=warm,cold,grouped picks cases)
//!
//! - the index: KV events applied per second, and memory per million indexed blocks
//!   (RSS before and after, 8 ranks holding 125k blocks each in runs of 32);
//! - per request: the prompt's block keys and the lookup of which rank holds how much,
//!   for 1k, 8k, 32k and 128k-token prompts, fresh (nothing cached) and with the whole
//!   prompt but its last block cached; with DISAGG_MODEL, also tokenizing the same length
//!   of text with the model's tokenizer, and a chat conversation's next turn (TinyLlama-Chat's
//!   template, which ends each message with `</s>`) tokenized whole against through the
//!   turn cache (the earlier turns cached by the previous turn). Published for comparison: llm-d's precise prefix
//!   scorer at 0.5-1 CPU core per request/s at long context (500-1000 ms per request).

use std::time::Instant;

use disagg::api::kv_events::KvEvent;
use disagg::router::kv_aware::index::{block_hashes, KvIndex};
use disagg::router::policy::WorkerRank;

const BLOCK: usize = 16;

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:").map(|v| v.trim().trim_end_matches("kB").trim().parse().unwrap_or(0)))
        .unwrap_or(0)
}

/// A run of `n` stored blocks continuing `parent`, token ids from `seed`.
fn run_of(seed: u32, parent: Option<u64>, first_hash: u64, n: usize) -> KvEvent {
    let token_ids: Vec<u32> = (0..(n * BLOCK) as u32).map(|i| seed.wrapping_mul(2654435761).wrapping_add(i)).collect();
    KvEvent::Stored { hashes: (0..n as u64).map(|k| first_hash + k).collect(), parent, token_ids, block_size: BLOCK }
}

fn index_cost() {
    let index = KvIndex::default();
    let before = rss_kib();
    let (ranks, per_rank, run) = (8usize, 125_000usize, 32usize);
    // Events are made a few at a time (so that their memory is not counted as the
    // index's) and only applying them is timed.
    let mut spent = std::time::Duration::ZERO;
    let mut applied = 0usize;
    for r in 0..ranks {
        let holder = WorkerRank { url: format!("http://10.0.0.{r}:8000"), rank: 0 };
        let mut hash = (r as u64) << 40;
        let mut s = 0;
        while s < per_rank / run {
            let events: Vec<KvEvent> = (s..(s + 8).min(per_rank / run))
                .map(|k| {
                    let e = run_of((r * 1_000_003 + k) as u32, None, hash, run);
                    hash += run as u64;
                    e
                })
                .collect();
            let t = Instant::now();
            index.apply(&holder, &events);
            spent += t.elapsed();
            applied += events.len();
            s += 8;
        }
    }
    let secs = spent.as_secs_f64();
    let blocks: usize = index.sizes().values().sum();
    let after = rss_kib();
    println!(
        "index: {blocks} blocks from {applied} BlockStored events (runs of {run}) applied in {secs:.2} s: {:.0} events/s, {:.2} M blocks/s",
        applied as f64 / secs,
        blocks as f64 / secs / 1e6
    );
    println!(
        "index memory: {:.0} MiB per million blocks (RSS {before} -> {after} KiB)",
        (after.saturating_sub(before)) as f64 / 1024.0 / (blocks as f64 / 1e6)
    );
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Caches {
    Warm,
    Cold,
}

/// Serving-shaped batches, as engines publish them while serving: each batch one rank's
/// eviction of 16 blocks and its storing of 16 new ones continuing a cached 16-block
/// prefix, round-robin over `holders` ranks of `capacity` blocks each; applied back to
/// back (sustained), timed by the index's own clock (what /metrics reports), `group`
/// batches at a time (`apply_group`, as the router's intake thread applies what gathered
/// in a moment). `Cold`: 48 MiB (more than this machine's L3) is swept between groups, as
/// other work between the batches of a trickle of events leaves the caches cold.
fn serving_batches(holders: usize, capacity: usize, caches: Caches, group: usize) {
    let index = KvIndex::default();
    let names: Vec<WorkerRank> =
        (0..holders).map(|h| WorkerRank { url: format!("http://10.0.{}.{}:8000", h / 8 / 256, h / 8 % 256), rank: h % 8 }).collect();
    let run = 16usize;
    // Per holder: the engine hashes it holds, oldest first.
    let mut held: Vec<std::collections::VecDeque<u64>> = vec![Default::default(); holders];
    let prefix: Vec<u32> = (0..(run * BLOCK) as u32).collect();
    let mut next_hash = 1u64 << 40;
    let mut seed = 1u32;
    let mut batch = |h: usize, held: &mut std::collections::VecDeque<u64>| -> Vec<KvEvent> {
        let mut events = Vec::new();
        if held.is_empty() {
            let hashes: Vec<u64> = (0..run as u64).map(|k| (h as u64) << 20 | k).collect();
            held.extend(&hashes);
            events.push(KvEvent::Stored { hashes, parent: None, token_ids: prefix.clone(), block_size: BLOCK });
        }
        if held.len() + run > capacity {
            let gone: Vec<u64> = held.drain(run..run * 2).collect();
            events.push(KvEvent::Removed { hashes: gone });
        }
        seed = seed.wrapping_add(1);
        let e = run_of(seed, Some(held[run - 1]), next_hash, run);
        if let KvEvent::Stored { hashes, .. } = &e {
            held.extend(hashes);
        }
        next_hash += run as u64;
        events.push(e);
        events
    };
    // Warm: every holder fills its cache.
    for _ in 0..capacity / run {
        for (h, q) in held.iter_mut().enumerate() {
            index.apply(&names[h], &batch(h, q));
        }
    }
    let totals = |i: &KvIndex| {
        let t = i.applied_totals();
        (t.blocks, t.nanos)
    };
    let (b0, n0) = totals(&index);
    let wall = Instant::now();
    let batches = match caches {
        Caches::Warm => (2_000_000 / (run * 2)).max(holders),
        Caches::Cold => 2_000 * group,
    };
    let mut sweep = vec![0u8; 48 << 20];
    let mut made = std::time::Duration::ZERO;
    let order: Vec<usize> = (0..holders).cycle().take(batches).collect();
    for hs in order.chunks(group) {
        let t = Instant::now();
        let events: Vec<Vec<KvEvent>> = hs.iter().map(|h| batch(*h, &mut held[*h])).collect();
        let applied: Vec<(&WorkerRank, &[KvEvent])> = hs.iter().zip(&events).map(|(h, e)| (&names[*h], &e[..])).collect();
        if caches == Caches::Cold {
            for line in sweep.chunks_mut(64) {
                line[0] = line[0].wrapping_add(1);
            }
        }
        made += t.elapsed();
        index.apply_group(&applied);
    }
    std::hint::black_box(&sweep);
    let (b1, n1) = totals(&index);
    let blocks = (b1 - b0) as f64;
    let wall = (wall.elapsed() - made).as_secs_f64();
    println!(
        "serving-shaped, {caches:?} caches, {group} batch(es) at a time: {holders} ranks x {capacity} blocks ({} indexed): {:.2} M blocks/s by the index's own clock (/metrics), {:.2} by wall time ({batches} batches)",
        index.sizes().values().sum::<usize>(),
        blocks / ((n1 - n0) as f64 / 1e9) / 1e6,
        blocks / wall / 1e6,
    );
}

fn per_request(tokenizer: Option<&disagg::tokenize::ModelTokenizer>) {
    let index = KvIndex::default();
    let holder = WorkerRank { url: "http://10.0.0.1:8000".into(), rank: 0 };
    println!("per request (block keys + lookup; ms of CPU):");
    println!("{:>8} {:>12} {:>12} {:>14}", "tokens", "fresh", "cached", "tokenize text");
    for tokens in [1_000usize, 8_000, 32_000, 128_000] {
        let prompt: Vec<u32> = (0..tokens as u32).map(|i| 7 + (i * 31) % 32000).collect();
        let time = |f: &dyn Fn()| {
            let iters = (2_000_000 / tokens).max(3);
            let t = Instant::now();
            for _ in 0..iters {
                f();
            }
            t.elapsed().as_secs_f64() * 1e3 / iters as f64
        };
        let lookup = || {
            let keys = block_hashes(&prompt, BLOCK);
            std::hint::black_box(index.prefix_blocks(BLOCK, &keys));
        };
        let fresh = time(&lookup);
        // Everything but the last block cached on this rank.
        let cached_blocks = tokens / BLOCK - 1;
        index.apply(
            &holder,
            &[KvEvent::Stored {
                hashes: (0..cached_blocks as u64).map(|k| (tokens as u64) << 32 | k).collect(),
                parent: None,
                token_ids: prompt[..cached_blocks * BLOCK].to_vec(),
                block_size: BLOCK,
            }],
        );
        let cached = time(&lookup);
        let tok = tokenizer.map(|t| {
            let words: Vec<&str> = ["harbour", "lantern", "granite", "meadow"].iter().cycle().take(tokens / 3).copied().collect();
            let text = words.join(" ");
            let n = t.encode(&text).map(|v| v.len()).unwrap_or(0);
            (
                time(&|| {
                    std::hint::black_box(t.encode(&text).ok());
                }),
                n,
            )
        });
        let tok = tok.map_or("-".to_string(), |(ms, n)| format!("{ms:.2} ({n} tok)"));
        println!("{tokens:>8} {fresh:>12.3} {cached:>12.3} {tok:>14}");
        index.drop_holder(&holder);
    }
}

/// The next turn of a conversation of about `tokens` tokens: rendered and tokenized whole,
/// against `encode_chat` with the previous turn already seen (each timed turn asks a new
/// question, so only the earlier turns can come from the cache).
fn conversation(model: &str) {
    let dir = std::env::temp_dir().join(format!("disagg-bench-chat-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(format!("{model}/{f}"), dir.join(f)).expect("DISAGG_MODEL holds tokenizer.json and tokenizer_config.json");
    }
    std::fs::write(dir.join("chat_template.jinja"), include_str!("../tests/data/tinyllama-chat.jinja")).unwrap();
    let tok = disagg::tokenize::ModelTokenizer::load(dir.to_str().unwrap()).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let msg = |role: &str, content: String| serde_json::json!({"role": role, "content": content});
    let body = |messages: &[serde_json::Value]| serde_json::json!({"messages": messages}).as_object().unwrap().clone();
    println!("a conversation's next turn (ms of CPU): render + tokenize whole, and through the turn cache");
    println!("{:>8} {:>12} {:>12}", "tokens", "whole", "turn cache");
    for tokens in [1_000usize, 8_000, 32_000, 128_000] {
        let para = "The harbour lantern swung over granite steps while the meadow dried. ".repeat(8);
        let mut earlier = vec![msg("system", "You are a careful assistant.".into())];
        let mut k = 0;
        while tok.encode_chat(&body(&earlier)).unwrap().len() < tokens {
            earlier.push(msg("user", format!("Question {k}: {para}")));
            earlier.push(msg("assistant", format!("Answer {k}: {para}")));
            k += 1;
        }
        // The previous turn: the earlier turns and the question just answered.
        let mut previous = earlier[..earlier.len() - 1].to_vec();
        tok.encode_chat(&body(&previous)).unwrap();
        previous.push(earlier[earlier.len() - 1].clone());
        let iters = (400_000 / tokens).max(3);
        let turns: Vec<_> = (0..iters)
            .map(|i| {
                let mut m = previous.clone();
                m.push(msg("user", format!("New question {i}: and then?")));
                body(&m)
            })
            .collect();
        let n = tok.encode_chat(&turns[0]).unwrap().len();
        let t = Instant::now();
        for b in &turns {
            std::hint::black_box(tok.encode_rendered_whole(&tok.render_chat(b).unwrap()).unwrap());
        }
        let whole = t.elapsed().as_secs_f64() * 1e3 / iters as f64;
        let t = Instant::now();
        for b in &turns[1..] {
            std::hint::black_box(tok.encode_chat(b).unwrap());
        }
        let cached = t.elapsed().as_secs_f64() * 1e3 / (iters - 1) as f64;
        println!("{n:>8} {whole:>12.2} {cached:>12.2}");
    }
}

fn main() {
    index_cost();
    // DISAGG_KV_BENCH_SERVING=warm|cold|grouped,... : some of the serving-shaped cases only
    // (to profile one).
    let only = std::env::var("DISAGG_KV_BENCH_SERVING").unwrap_or_else(|_| "warm,cold,grouped".into());
    for (name, caches, group) in [("warm", Caches::Warm, 1), ("cold", Caches::Cold, 1), ("grouped", Caches::Cold, 16)] {
        if !only.split(',').any(|o| o == name) {
            continue;
        }
        for (holders, capacity) in [(16, 256), (8192, 64), (8192, 512)] {
            serving_batches(holders, capacity, caches, group);
        }
    }
    let model = std::env::var("DISAGG_MODEL").ok();
    let tokenizer = model.as_ref().map(|dir| disagg::tokenize::ModelTokenizer::load(dir).expect("DISAGG_MODEL: a model directory"));
    per_request(tokenizer.as_ref());
    if let Some(model) = &model {
        conversation(model);
    }
}
