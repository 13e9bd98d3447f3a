//! `--policy kv_aware` on simulators that publish vLLM's KV events: the router learns
//! what each worker's DP rank holds from its events and sends a prompt to the rank that
//! holds its prefix; a cache reset or a worker leaving takes its entries away.

use std::time::Duration;

use serde_json::{json, Value};

use crate::support::*;

pub(crate) const BLOCK: usize = 16;

pub(crate) fn events_config(base: u16) -> String {
    format!(
        r#"{{"enable_kv_cache_events":true,"publisher":"zmq","endpoint":"tcp://*:{base}","replay_endpoint":"tcp://*:{}","topic":"kv-events"}}"#,
        base + 4
    )
}

/// A simulator with `dp` ranks publishing KV events on ports from a free run.
pub(crate) async fn publishing_sim(role: &str, dp: usize) -> Proc {
    publishing_sim_with(role, dp, &[]).await
}

/// As `publishing_sim`, with more flags.
pub(crate) async fn publishing_sim_with(role: &str, dp: usize, extra: &[&str]) -> Proc {
    let base = free_port_run(8);
    let (dp, block, events) = (dp.to_string(), BLOCK.to_string(), events_config(base));
    let mut args = vec!["--role", role, "--data-parallel-size", &dp, "--block-size", &block, "--enable-prompt-tokens-details"];
    args.extend(["--kv-events-config", &events]);
    args.extend(extra);
    Proc::sim(&args).await
}

/// A router over two prefills (kv_aware) and a decode (round_robin).
pub(crate) async fn kv_aware_router(p1: &Proc, p2: &Proc, d: &Proc) -> Proc {
    let args = ["--prefill", &p1.url, "--prefill", &p2.url, "--decode", &d.url];
    router(&[&args[..], &["--prefill-policy", "kv_aware", "--decode-policy", "round_robin"]].concat()).await
}

/// A token-id prompt: `blocks` full blocks of prefix `tag`, then `tail` tokens of its own.
pub(crate) fn prompt(tag: u32, blocks: usize, tail: &[u32]) -> Vec<u32> {
    (0..blocks * BLOCK).map(|i| 1000 + tag * 7919 + i as u32).chain(tail.iter().copied()).collect()
}

/// /workers, with the admin key the tests use when they set one.
pub(crate) async fn workers_list(router: &str) -> Value {
    client().get(format!("{router}/workers")).bearer_auth(ADMIN_KEY).send().await.unwrap().json().await.unwrap()
}

pub(crate) const ADMIN_KEY: &str = "adm";

/// Indexed blocks per (url, rank), from /workers.
pub(crate) async fn indexed(router: &str) -> Vec<(String, u64, u64)> {
    let v = workers_list(router).await;
    let mut out = Vec::new();
    for w in v["workers"].as_array().unwrap() {
        for r in w["kv_events"].as_array().into_iter().flatten() {
            out.push((w["url"].as_str().unwrap().to_string(), r["rank"].as_u64().unwrap(), r["indexed_blocks"].as_u64().unwrap()));
        }
    }
    out
}

/// Prefix-cache hits per rank of a simulator.
pub(crate) async fn hits(sim: &Proc, rank: usize) -> f64 {
    metric(&metrics(&sim.url).await, "vllm:prefix_cache_hits_total", &[("engine", &rank.to_string())])
}

#[tokio::test]
async fn a_shared_prefix_goes_to_the_rank_that_holds_it() {
    let p1 = publishing_sim("prefill", 2).await;
    let p2 = publishing_sim("prefill", 2).await;
    let d = Proc::sim(&["--role", "decode", "--block-size", &BLOCK.to_string(), "--enable-prompt-tokens-details"]).await;
    let r = router(&[
        "--prefill",
        &p1.url,
        "--prefill",
        &p2.url,
        "--decode",
        &d.url,
        "--intra-node-data-parallel-size",
        "2",
        "--prefill-policy",
        "kv_aware",
        "--decode-policy",
        "round_robin",
    ])
    .await;
    let url = r.url.clone();
    // Subscribed to all four ranks.
    assert!(
        eventually(Duration::from_secs(10), || async {
            workers_list(&url).await["workers"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|w| w["role"] == "prefill")
                .all(|w| w["kv_events"].is_array())
        })
        .await
    );
    // Four conversations: a first turn each, which caches its prefix somewhere.
    for tag in 0..4 {
        let (status, v) =
            post(&format!("{url}/v1/completions"), &json!({"prompt": prompt(tag, 4, &[1, 2, 3]), "max_tokens": 2, "ignore_eos": true}))
                .await;
        assert_eq!(status, 200, "{v}");
    }
    assert!(
        eventually(Duration::from_secs(5), || async { indexed(&url).await.iter().map(|(_, _, n)| n).sum::<u64>() >= 16 }).await,
        "{:?}",
        indexed(&url).await
    );
    let before: f64 = {
        let mut t = 0.0;
        for p in [&p1, &p2] {
            for rank in 0..2 {
                t += hits(p, rank).await;
            }
        }
        t
    };
    // Second turns, in another order (a blind rotation would miss): each must land where
    // its first turn's blocks are (4 blocks = 64 tokens each).
    // Two of them streamed with usage in the last chunk, which the router checks too.
    for tag in [2, 0, 3, 1] {
        let body = json!({"prompt": prompt(tag, 4, &[4, 5, 6, 7]), "max_tokens": 2, "ignore_eos": true});
        if tag % 2 == 0 {
            let mut body = body;
            body["stream"] = json!(true);
            body["stream_options"] = json!({"include_usage": true});
            let (status, events) = post_stream(&format!("{url}/v1/completions"), &body).await;
            assert_eq!(status, 200, "{events:?}");
        } else {
            let (status, v) = post(&format!("{url}/v1/completions"), &body).await;
            assert_eq!(status, 200, "{v}");
        }
    }
    let mut after = 0.0;
    for p in [&p1, &p2] {
        for rank in 0..2 {
            after += hits(p, rank).await;
        }
    }
    assert_eq!(after - before, (4 * 4 * BLOCK) as f64, "every second turn found its whole prefix cached on the prefill it was sent to");
    // The router predicted each answer's cached tokens exactly (checked against usage).
    let m = metrics(&url).await;
    assert_eq!(metric(&m, "disagg_router_kv_aware_total", &[("outcome", "predicted_exact")]), 8.0, "{m}");
    assert_eq!(metric(&m, "disagg_router_kv_aware_total", &[]), 8.0, "no other outcome");
    // A reset cache is announced (AllBlocksCleared) and the index forgets that worker.
    assert_eq!(client().post(format!("{}/reset_prefix_cache", p1.url)).send().await.unwrap().status().as_u16(), 200);
    let p1_url = p1.url.clone();
    assert!(
        eventually(Duration::from_secs(5), || async {
            indexed(&url).await.iter().filter(|(u, _, _)| *u == p1_url).all(|(_, _, n)| *n == 0)
        })
        .await,
        "{:?}",
        indexed(&url).await
    );
    assert_idle(&r.url).await;
}

/// Ranks with a subscription, from /workers.
pub(crate) async fn indexed_ranks(router: &str) -> usize {
    workers_list(router).await["workers"].as_array().unwrap().iter().map(|w| w["kv_events"].as_array().map_or(0, Vec::len)).sum()
}

/// Conditional disaggregation: a second turn whose decode already holds all but a few of
/// its tokens (pulled with the first turn) is prefilled on the decode, with no prefill
/// leg, and the output is still what a colocated instance gives.
#[tokio::test]
async fn a_decode_that_holds_all_but_a_few_tokens_prefills_them_itself() {
    let p = publishing_sim("prefill", 1).await;
    let d = publishing_sim("decode", 1).await;
    let c = Proc::sim(&["--block-size", &BLOCK.to_string()]).await;
    let r = router(&["--prefill", &p.url, "--decode", &d.url, "--policy", "kv_aware", "--kv-aware-decode-alone-tokens", "24"]).await;
    let url = r.url.clone();
    assert!(eventually(Duration::from_secs(10), || async { indexed_ranks(&url).await == 2 }).await);
    let turn1 = prompt(400, 4, &[1, 2, 3]);
    let (status, v) = post(&format!("{url}/v1/completions"), &json!({"prompt": turn1, "max_tokens": 4, "ignore_eos": true})).await;
    assert_eq!(status, 200, "{v}");
    // The decode pulled the prompt's four full blocks and published them.
    let d_url = d.url.clone();
    assert!(
        eventually(Duration::from_secs(5), || async { indexed(&url).await.iter().any(|(u, _, n)| *u == d_url && *n >= 4) }).await,
        "{:?}",
        indexed(&url).await
    );
    assert_eq!(served(&p.url).await, 1.0);
    // 64 tokens held, 3 + 10 not: the decode prefills 13 tokens itself.
    let turn2 = prompt(400, 4, &[1, 2, 3, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9]);
    for stream in [false, true] {
        let b = json!({"prompt": turn2, "max_tokens": 6, "ignore_eos": true, "stream": stream});
        let (_, want) = post(&format!("{}/v1/completions", c.url), &json!({"prompt": turn2, "max_tokens": 6, "ignore_eos": true})).await;
        let got = if stream {
            stream_text(&post_stream(&format!("{url}/v1/completions"), &b).await.1)
        } else {
            text_of(&post(&format!("{url}/v1/completions"), &b).await.1)
        };
        assert_eq!(got, text_of(&want), "stream={stream}");
    }
    assert_eq!(served(&p.url).await, 1.0, "no prefill leg for the second turns");
    let m = metrics(&r.url).await;
    assert_eq!(metric(&m, "disagg_router_kv_aware_total", &[("outcome", "prefill_skipped")]), 2.0);
    // Turn 1 (0 cached) and the non-streamed turn 2 (64 cached, the decode's own) were predicted exactly.
    assert_eq!(metric(&m, "disagg_router_kv_aware_total", &[("outcome", "predicted_exact")]), 2.0, "{m}");
    // A prompt the decode holds too little of still goes through a prefill.
    let (status, _) = post(&format!("{url}/v1/completions"), &json!({"prompt": prompt(401, 4, &[]), "max_tokens": 2})).await;
    assert_eq!(status, 200);
    assert_eq!(served(&p.url).await, 2.0);
    assert_idle(&r.url).await;
}

/// Text and chat prompts route exactly too: tokenized with the model's tokenizer and chat
/// template (`--model-path`), or, without one, by the engine's own render endpoint.
#[tokio::test]
async fn text_and_chat_prompts_route_with_the_models_tokenizer_or_the_render_endpoint() {
    let model = script_var("vllm-env.sh", "MODEL");
    for local in [true, false] {
        let sim = |role: &'static str| {
            let model = model.clone();
            async move {
                let base = free_port_run(8);
                Proc::sim(&[
                    "--role",
                    role,
                    "--block-size",
                    &BLOCK.to_string(),
                    "--tokenizer",
                    &model,
                    "--model",
                    "tiny-llama",
                    "--max-model-len",
                    "4096",
                    "--enable-scale-out",
                    "--enable-prompt-tokens-details",
                    "--kv-events-config",
                    &events_config(base),
                ])
                .await
            }
        };
        let (p1, p2, d) = (sim("prefill").await, sim("prefill").await, sim("decode").await);
        // Every request disaggregated (the decode holds each first turn too, and would
        // otherwise serve the second alone): the prefills are chosen by what they hold.
        let mut args = vec![
            "--prefill",
            p1.url.as_str(),
            "--prefill",
            p2.url.as_str(),
            "--decode",
            d.url.as_str(),
            "--prefill-policy",
            "kv_aware",
            "--decode-policy",
            "round_robin",
            "--kv-aware-decode-alone-tokens",
            "0",
        ];
        if local {
            args.extend(["--model-path", model.as_str()]);
        }
        let r = router(&args).await;
        let url = r.url.clone();
        assert!(eventually(Duration::from_secs(10), || async { indexed_ranks(&url).await == 3 }).await);
        let doc = |k: usize| {
            format!(
                "Shared document {k}: {}",
                (0..120).map(|i| ["river", "stone", "cloud", "ember"][(i + k) % 4]).collect::<Vec<_>>().join(" ")
            )
        };
        let bodies = |k: usize, q: usize| {
            if k % 2 == 0 {
                json!({"model": "tiny-llama", "prompt": format!("{}\nQuestion {q}?", doc(k)), "max_tokens": 1})
            } else {
                json!({"model": "tiny-llama", "messages": [{"role": "system", "content": doc(k)}, {"role": "user", "content": format!("Question {q}?")}], "max_tokens": 1})
            }
        };
        let path = |k: usize| if k % 2 == 0 { "/v1/completions" } else { "/v1/chat/completions" };
        for k in 0..4 {
            let (status, v) = post(&format!("{url}{}", path(k)), &bodies(k, 0)).await;
            assert_eq!(status, 200, "{v}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for k in [3, 1, 2, 0] {
            let (status, v) = post(&format!("{url}{}", path(k)), &bodies(k, 1)).await;
            assert_eq!(status, 200, "{v}");
        }
        // Every second question's answer reported what the router predicted, and the
        // predictions were not all zero: the documents were found where they were cached.
        let m = metrics(&url).await;
        assert_eq!(metric(&m, "disagg_router_kv_aware_total", &[("outcome", "predicted_exact")]), 8.0, "local tokenizer: {local}\n{m}");
        let hits = hits(&p1, 0).await + hits(&p2, 0).await;
        assert!(hits >= 4.0 * 300.0, "local tokenizer: {local}: {hits} tokens hit");
    }
}

/// At scale: eight prefills, two decodes, sixteen conversations of three turns arriving
/// interleaved; every later turn finds its prefix where the router predicted.
#[tokio::test]
async fn eight_prefills_sixteen_conversations() {
    let mut prefills = Vec::new();
    for _ in 0..8 {
        prefills.push(publishing_sim("prefill", 1).await);
    }
    let decodes = [
        Proc::sim(&["--role", "decode", "--block-size", &BLOCK.to_string(), "--enable-prompt-tokens-details"]).await,
        Proc::sim(&["--role", "decode", "--block-size", &BLOCK.to_string(), "--enable-prompt-tokens-details"]).await,
    ];
    let mut args = vec!["--prefill-policy", "kv_aware", "--decode-policy", "power_of_two"];
    for p in &prefills {
        args.extend(["--prefill", p.url.as_str()]);
    }
    for d in &decodes {
        args.extend(["--decode", d.url.as_str()]);
    }
    let r = router(&args).await;
    let url = r.url.clone();
    assert!(eventually(Duration::from_secs(15), || async { indexed_ranks(&url).await == 8 }).await);
    let mut total_hits = 0.0;
    for p in &prefills {
        total_hits -= hits(p, 0).await;
    }
    for turn in 0..3u32 {
        // Conversations in a different order each turn.
        let order: Vec<u32> = (0..16).map(|k| (k * 5 + turn * 3) % 16).collect();
        let sends = order.iter().map(|&c| {
            let url = url.clone();
            // A conversation's prompt grows by a block per turn.
            let tail: Vec<u32> = (0..turn * BLOCK as u32).map(|i| 50_000 + c * 1000 + i).collect();
            async move { post(&format!("{url}/v1/completions"), &json!({"prompt": prompt(500 + c, 3, &tail), "max_tokens": 1})).await }
        });
        for (status, v) in futures_util::future::join_all(sends).await {
            assert_eq!(status, 200, "{v}");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    for p in &prefills {
        total_hits += hits(p, 0).await;
    }
    // The second turn (64 tokens) finds its first 3 blocks, the third (80) its first 4.
    let want = 16.0 * (3 * BLOCK + 4 * BLOCK) as f64;
    let m = metrics(&url).await;
    let exact = metric(&m, "disagg_router_kv_aware_total", &[("outcome", "predicted_exact")]);
    assert_eq!(exact, 48.0, "every answer's cached tokens as predicted:\n{m}");
    assert!(total_hits >= want * 0.9, "{total_hits} tokens hit, about {want} possible");
    // The conversations spread over the prefills.
    let mut used = 0;
    for p in &prefills {
        if metric(&metrics(&p.url).await, "vllm:prefix_cache_queries_total", &[]) > 0.0 {
            used += 1;
        }
    }
    assert!(used >= 6, "{used} of 8 prefills used");
    assert_idle(&url).await;
}

/// Load the router cannot see itself (another router's requests) is read from the engines'
/// /metrics: a second router sends fresh prompts away from the prefill the first one keeps
/// busy (without it, equal candidates take new prompts in turn: one of the two would go
/// there).
#[tokio::test]
async fn load_reported_by_the_engines_steers_prompts_away_from_a_prefill_busy_elsewhere() {
    let slow = || async {
        let base = free_port_run(8);
        Proc::sim(&[
            "--role",
            "prefill",
            "--block-size",
            &BLOCK.to_string(),
            "--kv-events-config",
            &events_config(base),
            "--prefill-ms-per-1k-tokens",
            "2000",
            "--max-num-seqs",
            "1",
        ])
        .await
    };
    let (a, b) = (slow().await, slow().await);
    let d = Proc::sim(&["--role", "decode", "--block-size", &BLOCK.to_string()]).await;
    let first = router(&["--prefill", &a.url, "--decode", &d.url]).await;
    let second = router(&["--prefill", &a.url, "--prefill", &b.url, "--decode", &d.url, "--policy", "kv_aware"]).await;
    // The first router keeps prefill A busy: four prompts of 512 tokens, one at a time there.
    let busy: Vec<_> = (0..4)
        .map(|k| {
            let url = format!("{}/v1/completions", first.url);
            tokio::spawn(async move { post(&url, &json!({"prompt": prompt(100 + k, 32, &[]), "max_tokens": 1})).await })
        })
        .collect();
    let (second_url, a_url) = (second.url.clone(), a.url.clone());
    let seen = eventually(Duration::from_secs(5), || async {
        workers(&second_url).await["workers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w["url"] == a_url.as_str() && w["ranks_requests_elsewhere"][0].as_u64() > Some(0))
    })
    .await;
    assert!(seen, "the second router read A's queue from its /metrics: {}", workers(&second.url).await);
    let before = served(&b.url).await;
    for k in 0..2 {
        let (status, v) =
            post(&format!("{}/v1/completions", second.url), &json!({"prompt": prompt(200 + k, 2, &[]), "max_tokens": 1})).await;
        assert_eq!(status, 200, "{v}");
    }
    assert_eq!(served(&b.url).await - before, 2.0, "both fresh prompts went to the idle prefill B");
    for t in busy {
        assert_eq!(t.await.unwrap().0, 200);
    }
    assert_idle(&second.url).await;
}
