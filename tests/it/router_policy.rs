//! Policies, per role, and DP ranks: each policy's distribution, observed on the workers.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use serde_json::json;

use crate::capture::Capture;
use crate::support::*;

async fn captures(n: usize) -> Vec<(String, Capture)> {
    futures_util::future::join_all((0..n).map(|_| Capture::default().start())).await
}

fn flags(role: &str, workers: &[(String, Capture)]) -> Vec<String> {
    workers.iter().flat_map(|(u, _)| [format!("--{role}"), u.clone()]).collect()
}

async fn route(prefills: &[(String, Capture)], decodes: &[(String, Capture)], extra: &[&str]) -> Proc {
    let mut args: Vec<String> = flags("prefill", prefills);
    args.extend(flags("decode", decodes));
    args.extend(extra.iter().map(|s| s.to_string()));
    router(&args.iter().map(String::as_str).collect::<Vec<_>>()).await
}

/// Which worker (by index) received each prompt.
fn owners(workers: &[(String, Capture)]) -> HashMap<String, HashSet<usize>> {
    let mut m: HashMap<String, HashSet<usize>> = HashMap::new();
    for (i, (_, c)) in workers.iter().enumerate() {
        for p in c.prompts() {
            m.entry(p).or_default().insert(i);
        }
    }
    m
}

async fn send(router: &str, prompt: &str, headers: &[(&str, &str)], extra: serde_json::Value) -> u16 {
    let mut body = json!({"prompt": prompt, "max_tokens": 1});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    post_with(&format!("{router}/v1/completions"), &body, headers).await.0
}

#[tokio::test]
async fn prefill_and_decode_policies_are_set_separately() {
    let p = captures(2).await;
    let d = captures(3).await;
    let r = route(&p, &d, &["--prefill-policy", "round_robin", "--decode-policy", "consistent_hash"]).await;
    for i in 0..12 {
        assert_eq!(send(&r.url, &format!("same session {i}"), &[("x-session-id", "alice")], json!({})).await, 200);
    }
    assert_eq!(p[0].1.prompts().len(), 6, "prefill alternates");
    assert_eq!(p[1].1.prompts().len(), 6);
    let served: Vec<usize> = d.iter().map(|(_, c)| c.prompts().len()).collect();
    assert!(served.contains(&12), "one decode owns the session: {served:?}");
    assert_idle(&r.url).await;
}

#[tokio::test]
async fn random_spreads_over_every_worker() {
    let p = captures(1).await;
    let d = captures(3).await;
    let r = route(&p, &d, &["--policy", "random"]).await;
    for i in 0..60 {
        assert_eq!(send(&r.url, &format!("r{i}"), &[], json!({})).await, 200);
    }
    let served: Vec<usize> = d.iter().map(|(_, c)| c.prompts().len()).collect();
    assert_eq!(served.iter().sum::<usize>(), 60);
    assert!(served.iter().all(|n| *n >= 5), "{served:?}");
}

/// Reserve-before-pick: a burst of concurrent requests does not herd. With reservation,
/// three workers' in-flight counts differ by more than 5 once in ~25,000 bursts of 30;
/// picks blind to each other (random, or stale loads) do so about half the time.
#[tokio::test]
async fn power_of_two_does_not_herd_a_burst() {
    let p = Proc::sim(&["--role", "prefill"]).await;
    let d: Vec<Proc> =
        futures_util::future::join_all((0..3).map(|_| Proc::sim(&["--role", "decode", "--decode-ms-per-token", "50"]))).await;
    let mut args = vec!["--policy", "power_of_two", "--prefill", p.url.as_str()];
    for s in &d {
        args.extend(["--decode", s.url.as_str()]);
    }
    let r = router(&args).await;
    let url = format!("{}/v1/completions", r.url);
    let streams =
        futures_util::future::join_all(
            (0..30).map(|i| {
                let url = url.clone();
                async move {
                    open_stream(&url, &json!({"prompt": format!("b{i}"), "max_tokens": 400, "ignore_eos": true, "stream": true})).await
                }
            }),
        )
        .await;
    let loads = futures_util::future::join_all(d.iter().map(|s| in_flight(&r.url, &s.url))).await;
    assert_eq!(loads.iter().sum::<u64>(), 30);
    let gap = loads.iter().max().unwrap() - loads.iter().min().unwrap();
    assert!(gap <= 5, "in flight per decode: {loads:?}");
    drop(streams);
    assert_idle(&r.url).await;
}

#[tokio::test]
async fn consistent_hash_sticks_by_session_user_or_prefix_and_moves_only_lost_keys() {
    let p = captures(1).await;
    let d = captures(3).await;
    let r = route(&p, &d, &["--policy", "consistent_hash", "--health-failure-threshold", "1"]).await;
    for s in 0..12 {
        for k in 0..3 {
            let prompt = format!("sess{s}-req{k}");
            let header = format!("s{s}");
            match s % 3 {
                0 => send(&r.url, &prompt, &[("x-session-id", &header)], json!({})).await,
                1 => send(&r.url, &prompt, &[("x-user-id", &header)], json!({})).await,
                _ => send(&r.url, &prompt, &[], json!({"user": header})).await,
            };
        }
    }
    let owner = owners(&d);
    let session_owner = |s: usize| -> usize {
        let set: HashSet<usize> = (0..3).flat_map(|k| owner[&format!("sess{s}-req{k}")].iter().copied()).collect();
        assert_eq!(set.len(), 1, "session {s} stuck to one decode: {set:?}");
        *set.iter().next().unwrap()
    };
    let before: Vec<usize> = (0..12).map(session_owner).collect();
    assert!(before.iter().collect::<HashSet<_>>().len() >= 2, "sessions spread: {before:?}");
    // Same prompt prefix, no session: same worker.
    let long = "a shared system prompt ".repeat(20);
    for k in 0..4 {
        send(&r.url, &format!("{long} question {k}"), &[], json!({})).await;
    }
    let prefix_owners: HashSet<usize> = (0..4).flat_map(|k| owners(&d)[&format!("{long} question {k}")].clone()).collect();
    assert_eq!(prefix_owners.len(), 1);
    // One decode goes down: only its sessions move.
    let lost = before[0];
    d[lost].1.set_down(true);
    assert!(eventually(Duration::from_secs(5), || async { workers(&r.url).await["workers"][1 + lost]["healthy"] == false }).await);
    for s in 0..12 {
        let header = format!("s{s}");
        send(&r.url, &format!("sess{s}-after"), &[("x-session-id", &header)], json!({})).await;
    }
    let after = owners(&d);
    for s in (0..12).filter(|s| s % 3 == 0) {
        let now: Vec<usize> = after[&format!("sess{s}-after")].iter().copied().collect();
        if before[s] == lost {
            assert_ne!(now, vec![lost]);
        } else {
            assert_eq!(now, vec![before[s]], "session {s} did not move");
        }
    }
}

#[tokio::test]
async fn cache_aware_follows_shared_prefixes_and_spreads_new_ones() {
    let p = captures(1).await;
    let d = captures(3).await;
    let r = route(&p, &d, &["--policy", "cache_aware"]).await;
    let families: Vec<String> = (0..3).map(|f| format!("family {f} system prompt ").repeat(30)).collect();
    for round in 0..4 {
        for (f, prefix) in families.iter().enumerate() {
            send(&r.url, &format!("{prefix} q{round}-{f}"), &[], json!({})).await;
        }
    }
    let owner = owners(&d);
    let mut homes = HashSet::new();
    for (f, prefix) in families.iter().enumerate() {
        let set: HashSet<usize> = (0..4).flat_map(|round| owner[&format!("{prefix} q{round}-{f}")].iter().copied()).collect();
        assert_eq!(set.len(), 1, "family {f} stays on one decode");
        homes.extend(set);
    }
    assert_eq!(homes.len(), 3, "three new prefixes went to three different (emptiest) decodes");
}

#[tokio::test]
async fn cache_aware_yields_to_load_when_imbalanced() {
    let p = Proc::sim(&["--role", "prefill"]).await;
    let d: Vec<Proc> =
        futures_util::future::join_all((0..2).map(|_| Proc::sim(&["--role", "decode", "--decode-ms-per-token", "50"]))).await;
    let r = router(&[
        "--policy",
        "cache_aware",
        "--balance-abs-threshold",
        "2",
        "--balance-rel-threshold",
        "1.0",
        "--prefill",
        &p.url,
        "--decode",
        &d[0].url,
        "--decode",
        &d[1].url,
    ])
    .await;
    let url = format!("{}/v1/completions", r.url);
    let prefix = "the one shared prefix ".repeat(40);
    // Sequential long streams with one prefix stack up on one decode ...
    let mut held = Vec::new();
    for i in 0..3 {
        held.push(
            open_stream(&url, &json!({"prompt": format!("{prefix}{i}"), "max_tokens": 400, "ignore_eos": true, "stream": true})).await,
        );
    }
    let loads = futures_util::future::join_all(d.iter().map(|s| in_flight(&r.url, &s.url))).await;
    assert_eq!(loads.iter().copied().max(), Some(3), "the prefix is followed while balanced: {loads:?}");
    // ... until the gap passes the thresholds: then the least loaded decode gets it.
    held.push(open_stream(&url, &json!({"prompt": format!("{prefix}x"), "max_tokens": 400, "ignore_eos": true, "stream": true})).await);
    let loads = futures_util::future::join_all(d.iter().map(|s| in_flight(&r.url, &s.url))).await;
    assert_eq!(loads.iter().copied().min(), Some(1), "{loads:?}");
    drop(held);
    assert_idle(&r.url).await;
}

#[tokio::test]
async fn dp_ranks_are_picked_by_load_and_sent_as_a_header() {
    let p = captures(1).await;
    let d = captures(1).await;
    let r = route(&p, &d, &["--intra-node-data-parallel-size", "4", "--policy", "round_robin"]).await;
    for i in 0..8 {
        assert_eq!(send(&r.url, &format!("dp{i}"), &[], json!({})).await, 200);
    }
    for (_, c) in p.iter().chain(&d) {
        let ranks: Vec<String> =
            c.requests("/v1/completions").iter().map(|s| s.headers["x-data-parallel-rank"].to_str().unwrap().to_string()).collect();
        let mut counts: HashMap<String, usize> = HashMap::new();
        for r in &ranks {
            *counts.entry(r.clone()).or_default() += 1;
        }
        assert_eq!(counts.len(), 4, "idle ranks share the work: {ranks:?}");
        assert!(counts.values().all(|n| *n == 2));
    }
    let w = workers(&r.url).await;
    assert_eq!(w["workers"][0]["ranks_in_flight"], json!([0, 0, 0, 0]));
}

#[tokio::test]
async fn dp_rank_with_most_room_gets_the_next_request() {
    let p = Proc::sim(&["--role", "prefill", "--data-parallel-size", "2"]).await;
    let d = Proc::sim(&["--role", "decode", "--data-parallel-size", "2", "--decode-ms-per-token", "50"]).await;
    let r = router(&["--prefill", &p.url, "--decode", &d.url, "--intra-node-data-parallel-size", "2"]).await;
    let url = format!("{}/v1/completions", r.url);
    let mut held = Vec::new();
    for i in 0..6 {
        held.push(open_stream(&url, &json!({"prompt": format!("k{i}"), "max_tokens": 400, "ignore_eos": true, "stream": true})).await);
    }
    let w = workers(&r.url).await;
    let decode = w["workers"].as_array().unwrap().iter().find(|w| w["role"] == "decode").unwrap().clone();
    assert_eq!(decode["ranks_in_flight"], json!([3, 3]), "{decode}");
    let m = metrics(&d.url).await;
    assert_eq!(metric(&m, "vllm:num_requests_running", &[("engine", "0")]), 3.0);
    assert_eq!(metric(&m, "vllm:num_requests_running", &[("engine", "1")]), 3.0);
    drop(held);
    assert_idle(&r.url).await;
}

/// A URL configured with more DP ranks than its engine serves: vLLM's 400 ("data_parallel_rank
/// 3 is out of range [0, 2).") is the router's configuration, not the client's. No request
/// fails; the router uses the ranks the worker serves from then on and says so.
#[tokio::test]
async fn more_dp_ranks_configured_than_served_are_learned_not_failed() {
    let p = Proc::sim(&["--role", "prefill", "--data-parallel-size", "2"]).await;
    let d = Proc::sim(&["--role", "decode", "--data-parallel-size", "2"]).await;
    let r = router(&["--prefill", &p.url, "--decode", &d.url, "--intra-node-data-parallel-size", "4", "--policy", "round_robin"]).await;
    for i in 0..12 {
        let (status, v) = post(&format!("{}/v1/completions", r.url), &json!({"prompt": format!("ranks {i}"), "max_tokens": 3})).await;
        assert_eq!(status, 200, "request {i}: {v}");
    }
    let log = r.log_text();
    assert_eq!(log.matches("serves fewer DP ranks than configured").count(), 2, "once per worker:\n{log}");
    let m = metrics(&r.url).await;
    let out_of_range = metric(&m, "disagg_router_leg_errors_total", &[("kind", "dp_rank_out_of_range")]);
    assert!((1.0..=4.0).contains(&out_of_range), "at most one per worker's unserved ranks: {out_of_range}");
    // From then on, every rank sent is one the engines serve.
    let before = metric(&metrics(&d.url).await, "vllm:request_success_total", &[]);
    for i in 0..8 {
        assert_eq!(post(&format!("{}/v1/completions", r.url), &json!({"prompt": format!("after {i}"), "max_tokens": 2})).await.0, 200);
    }
    assert_eq!(metric(&metrics(&d.url).await, "vllm:request_success_total", &[]) - before, 8.0);
    assert_eq!(metric(&metrics(&r.url).await, "disagg_router_leg_errors_total", &[("kind", "dp_rank_out_of_range")]), out_of_range);
    assert_idle(&r.url).await;
}

/// `--model-path DIR` makes cache_aware compare token ids: two prompts that differ only
/// in whitespace are the same prefix to a tokenizer, not to a character match.
#[tokio::test]
async fn model_path_tokenizer_makes_cache_aware_match_tokens() {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("tok-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let vocab: serde_json::Map<String, serde_json::Value> =
        std::iter::once(("[UNK]".to_string(), json!(0))).chain((0..100).map(|i| (format!("w{i}"), json!(i + 1)))).collect();
    let tokenizer = json!({"version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}});
    std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string()).unwrap();
    let spaced: String = (0..60).map(|i| format!("w{i}   ")).collect();
    let tight: String = (0..60).map(|i| format!("w{i} ")).collect::<String>() + "w99";
    for (with_tokenizer, same) in [(true, true), (false, false)] {
        let p = captures(1).await;
        let d = captures(2).await;
        let dir_s = dir.to_string_lossy().to_string();
        let mut extra = vec!["--policy", "cache_aware"];
        if with_tokenizer {
            extra.extend(["--model-path", dir_s.as_str()]);
        }
        let r = route(&p, &d, &extra).await;
        send(&r.url, &spaced, &[], json!({})).await;
        send(&r.url, &tight, &[], json!({})).await;
        let o = owners(&d);
        assert_eq!(o[&spaced] == o[&tight], same, "with tokenizer: {with_tokenizer}");
    }
}
