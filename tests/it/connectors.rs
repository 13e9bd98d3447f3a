//! Every KV connector end to end on simulators: 2 prefills and 2 decodes per connector
//! through `disagg route`, output equal to a colocated instance, and each connector's
//! failure cases (docs/FAILURES.md): a dead peer, KV nobody takes, a client gone while a
//! decode waits.

use std::time::Duration;

use serde_json::{json, Value};

use crate::support::*;

fn words(tag: &str, n: usize) -> String {
    (0..n).fold(format!("{tag}:"), |p, i| format!("{p} w{}", i % 89))
}

/// The `n`th request of a mixed load: both APIs, streamed or not, prompts of many lengths.
fn body(n: usize) -> (&'static str, Value) {
    let prompt = words(&format!("req{n}"), 3 + (n * 13) % 70);
    let max_tokens = 4 + n % 9;
    if n % 2 == 0 {
        ("/v1/completions", json!({"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": true, "stream": n % 4 == 0}))
    } else {
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "ignore_eos": true, "stream": n % 3 == 0}),
        )
    }
}

/// Requests 0..n through the router give what the colocated instance gives.
async fn routed_equals_colocated(router: &str, colocated: &str, n: usize) {
    for i in 0..n {
        let (path, b) = body(i);
        let text = |v: &Value| text_of(v);
        let mut plain = b.clone();
        plain["stream"] = json!(false);
        let (status, want) = post(&format!("{colocated}{path}"), &plain).await;
        assert_eq!(status, 200, "{want}");
        let got = if b["stream"] == json!(true) {
            let (status, events) = post_stream(&format!("{router}{path}"), &b).await;
            assert_eq!(status, 200, "{events:?}");
            stream_text(&events)
        } else {
            let (status, v) = post(&format!("{router}{path}"), &b).await;
            assert_eq!(status, 200, "request {i}: {v}");
            text(&v)
        };
        assert_eq!(got, text(&want), "request {i} ({path})");
    }
}

fn bootstrap_port(p: &Proc) -> String {
    p.banner
        .split_whitespace()
        .find_map(|w| w.strip_prefix("bootstrap_port="))
        .unwrap_or_else(|| panic!("no bootstrap port: {}", p.banner))
        .to_string()
}

async fn sum_metric(procs: &[&Proc], name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut total = 0.0;
    for p in procs {
        total += metric(&metrics(&p.url).await, name, labels);
    }
    total
}

#[tokio::test]
async fn nixl_2p2d_through_the_router_equals_colocated() {
    let p1 = Proc::sim(&["--role", "prefill", "--data-parallel-size", "2"]).await;
    let p2 = Proc::sim(&["--role", "prefill", "--data-parallel-size", "2"]).await;
    let d1 = Proc::sim(&["--role", "decode", "--data-parallel-size", "2"]).await;
    let d2 = Proc::sim(&["--role", "decode", "--data-parallel-size", "2"]).await;
    let c = Proc::sim(&[]).await;
    let r = router(&[
        "--prefill",
        &p1.url,
        "--prefill",
        &p2.url,
        "--decode",
        &d1.url,
        "--decode",
        &d2.url,
        "--intra-node-data-parallel-size",
        "2",
        "--policy",
        "round_robin",
    ])
    .await;
    routed_equals_colocated(&r.url, &c.url, 24).await;
    assert_eq!(sum_metric(&[&d1, &d2], "vllm:prompt_tokens_by_source_total", &[("source", "local_compute")]).await, 0.0);
    for w in [&p1, &p2, &d1, &d2] {
        assert!(served(&w.url).await > 0.0, "every worker served");
    }
    assert_idle(&r.url).await;
}

async fn mooncake_prefill(extra: &[&str]) -> Proc {
    let mut args = vec!["--role", "prefill", "--kv-connector", "mooncake", "--mooncake-bootstrap-port", "0"];
    args.extend_from_slice(extra);
    Proc::sim(&args).await
}

#[tokio::test]
async fn mooncake_2p2d_through_the_router_equals_colocated() {
    let p1 = mooncake_prefill(&["--data-parallel-size", "2"]).await;
    let p2 = mooncake_prefill(&[]).await;
    // A decode waits at most 3 s for a transfer that never comes, then fails (counted).
    let d1 = Proc::sim(&["--role", "decode", "--kv-connector", "mooncake", "--kv-lease-secs", "3"]).await;
    let d2 = Proc::sim(&["--role", "decode", "--kv-connector", "mooncake", "--data-parallel-size", "2", "--kv-lease-secs", "3"]).await;
    let c = Proc::sim(&[]).await;
    let (b1, b2) = (bootstrap_port(&p1), bootstrap_port(&p2));
    // Two ranks configured everywhere; p2's bootstrap server lists one: learned, not failed.
    let r = router(&[
        "--kv-connector",
        "mooncake",
        "--prefill",
        &p1.url,
        &b1,
        "--prefill",
        &p2.url,
        &b2,
        "--decode",
        &d1.url,
        "--decode",
        &d2.url,
        "--intra-node-data-parallel-size",
        "2",
        "--policy",
        "round_robin",
    ])
    .await;
    let url = r.url.clone();
    assert!(
        eventually(Duration::from_secs(5), || async {
            workers(&url).await["workers"].as_array().unwrap().iter().all(|w| w["healthy"] == true)
        })
        .await
    );
    routed_equals_colocated(&r.url, &c.url, 24).await;
    // A prefill whose one token is EOS keeps no KV (vLLM: not length-capped, nothing to
    // send): the router drops the waiting decode and has it prefill locally.
    for stream in [false, true] {
        let b = json!({"prompt": "eos probe 5", "max_tokens": 8, "stream": stream});
        let (_, want) = post(&format!("{}/v1/completions", c.url), &json!({"prompt": "eos probe 5", "max_tokens": 8})).await;
        assert_eq!(want["choices"][0]["finish_reason"], "stop", "the probe's first token is EOS: {want}");
        let got = if stream {
            stream_text(&post_stream(&format!("{}/v1/completions", r.url), &b).await.1)
        } else {
            text_of(&post(&format!("{}/v1/completions", r.url), &b).await.1)
        };
        assert_eq!(got, text_of(&want));
    }
    assert_eq!(sum_metric(&[&d1, &d2], "disagg_sim_kv_load_failures_total", &[]).await, 0.0, "no decode waited for KV that never came");
    // Every decode took its prompt from a prefill; nothing is left held.
    let decodes = [&d1, &d2];
    // Only the EOS probe's two runs were prefilled on a decode.
    assert!(sum_metric(&decodes, "vllm:prompt_tokens_by_source_total", &[("source", "local_compute")]).await <= 10.0);
    assert!(sum_metric(&decodes, "disagg_sim_kv_transfers_total", &[("direction", "received")]).await >= 24.0);
    for p in [&p1, &p2] {
        assert!(metric(&metrics(&p.url).await, "disagg_sim_kv_transfers_total", &[("direction", "sent")]) > 0.0, "both prefills served");
        assert_eq!(metric(&metrics(&p.url).await, "disagg_sim_kv_blocks_held", &[]), 0.0);
    }
    assert_idle(&r.url).await;
}

#[tokio::test]
async fn p2pnccl_2p2d_register_and_through_the_router_equal_colocated() {
    let discovery = format!("127.0.0.1:{}", free_port_run(1));
    let r = router_unready(&["--vllm-pd-disaggregation", "--vllm-discovery-address", &discovery, "--admin-api-key", "k"]).await;
    let mut sims = Vec::new();
    for role in ["prefill", "prefill", "decode", "decode"] {
        sims.push(Proc::sim(&["--role", role, "--kv-connector", "p2pnccl", "--proxy-address", &discovery]).await);
    }
    let c = Proc::sim(&[]).await;
    let url = r.url.clone();
    let all_in = eventually(Duration::from_secs(10), || async {
        let (status, body) = get_as(&format!("{url}/health"), "k").await;
        status == 200 && sims.iter().all(|s| body.contains(&s.url))
    })
    .await;
    assert!(all_in, "not all registered: {}", get_as(&format!("{}/health", r.url), "k").await.1);
    routed_equals_colocated(&r.url, &c.url, 24).await;
    let (prefills, decodes) = (&sims[..2], &sims[2..]);
    for d in decodes {
        let m = metrics(&d.url).await;
        assert_eq!(metric(&m, "vllm:prompt_tokens_by_source_total", &[("source", "local_compute")]), 0.0, "KV was pushed, not recomputed");
        assert!(metric(&m, "disagg_sim_kv_transfers_total", &[("direction", "received")]) > 0.0, "both decodes served");
    }
    for p in prefills {
        assert!(metric(&metrics(&p.url).await, "vllm:request_success_total", &[]) > 0.0, "both prefills served");
    }
    assert_idle_as(&r.url, Some("k")).await;
}

#[tokio::test]
async fn mooncake_handshake_cases_pass_on_the_sim() {
    let p = mooncake_prefill(&[]).await;
    let d = Proc::sim(&["--role", "decode", "--kv-connector", "mooncake"]).await;
    let c = Proc::sim(&[]).await;
    let pair = crate::mooncake_handshake::MooncakePair {
        prefill: p.url.clone(),
        bootstrap: format!("http://127.0.0.1:{}", bootstrap_port(&p)),
        decode: d.url.clone(),
        plain: c.url.clone(),
        model: "sim-model".into(),
    };
    assert_eq!(crate::mooncake_handshake::cases(&pair).await, 2);
    assert_eq!(metric(&metrics(&d.url).await, "vllm:prompt_tokens_by_source_total", &[("source", "local_compute")]), 0.0);
}

/// Mooncake, dead peer: a prefill that dies takes its legs with it; the router sends the
/// request to the other prefill (its decode is dropped, vLLM aborts it) and every
/// request still answers.
#[tokio::test]
async fn mooncake_a_dead_prefill_costs_no_request() {
    let mut p1 = mooncake_prefill(&[]).await;
    let p2 = mooncake_prefill(&[]).await;
    let d = Proc::sim(&["--role", "decode", "--kv-connector", "mooncake"]).await;
    let c = Proc::sim(&[]).await;
    let (b1, b2) = (bootstrap_port(&p1), bootstrap_port(&p2));
    // Health checks far apart: the router learns of the death from the legs themselves.
    let r = router(&[
        "--kv-connector",
        "mooncake",
        "--prefill",
        &p1.url,
        &b1,
        "--prefill",
        &p2.url,
        &b2,
        "--decode",
        &d.url,
        "--policy",
        "round_robin",
        "--health-check-interval-secs",
        "30",
    ])
    .await;
    p1.kill();
    let _ = p1.wait_exit(Duration::from_secs(5)).await;
    routed_equals_colocated(&r.url, &c.url, 8).await;
    // The decode's abandoned waits cost it nothing it keeps.
    assert!(eventually(Duration::from_secs(5), || async { metric(&metrics(&d.url).await, "vllm:kv_cache_usage_perc", &[]) == 0.0 }).await);
    assert_idle(&r.url).await;
}

/// Mooncake, KV nobody takes: the prefill holds it under the transfer id for the lease
/// (vLLM: VLLM_MOONCAKE_ABORT_REQUEST_TIMEOUT), then frees it.
#[tokio::test]
async fn mooncake_kv_nobody_takes_is_freed_when_the_lease_ends() {
    let p = mooncake_prefill(&["--kv-lease-secs", "1"]).await;
    let body = json!({"prompt": words("orphan", 40), "max_tokens": 1, "kv_transfer_params": {"do_remote_decode": true, "do_remote_prefill": false, "transfer_id": "xfer-orphan"}});
    let (status, v) = post(&format!("{}/v1/completions", p.url), &body).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["kv_transfer_params"], Value::Null, "a Mooncake prefill answers no params");
    assert!(metric(&metrics(&p.url).await, "disagg_sim_kv_blocks_held", &[]) > 0.0);
    let freed = eventually(Duration::from_secs(5), || async {
        let m = metrics(&p.url).await;
        metric(&m, "disagg_sim_kv_blocks_held", &[]) == 0.0 && metric(&m, "disagg_sim_kv_leases_expired_total", &[]) == 1.0
    })
    .await;
    assert!(freed);
}

/// Mooncake, client gone while the decode waits for its prefill: the decode tells the
/// prefill, which frees the blocks as soon as they are ready instead of holding them.
#[tokio::test]
async fn mooncake_a_decode_that_gives_up_frees_the_prefills_blocks_when_ready() {
    let p = mooncake_prefill(&["--prefill-ms-per-1k-tokens", "3000"]).await;
    let d = Proc::sim(&["--role", "decode", "--kv-connector", "mooncake"]).await;
    let (status, q) = get(&format!("http://127.0.0.1:{}/query", bootstrap_port(&p))).await;
    assert_eq!(status, 200);
    let q: Value = serde_json::from_str(&q).unwrap();
    let engine_id = q["0"]["engine_id"].as_str().unwrap().to_string();
    let prompt = words("gone", 300);
    let params = |decode: bool| {
        if decode {
            json!({"do_remote_decode": false, "do_remote_prefill": true, "transfer_id": "xfer-gone",
                "remote_bootstrap_addr": format!("http://127.0.0.1:{}", bootstrap_port(&p)), "remote_engine_id": engine_id})
        } else {
            json!({"do_remote_decode": true, "do_remote_prefill": false, "transfer_id": "xfer-gone"})
        }
    };
    // The decode waits for a transfer the prefill has not computed; its client leaves.
    let waiting = client()
        .post(format!("{}/v1/completions", d.url))
        .json(&json!({"prompt": prompt, "max_tokens": 5, "kv_transfer_params": params(true)}))
        .send();
    assert!(tokio::time::timeout(Duration::from_millis(600), waiting).await.is_err(), "the decode waits for its prefill");
    tokio::time::sleep(Duration::from_millis(600)).await;
    let (status, _) =
        post(&format!("{}/v1/completions", p.url), &json!({"prompt": prompt, "max_tokens": 1, "kv_transfer_params": params(false)})).await;
    assert_eq!(status, 200);
    let m = metrics(&p.url).await;
    assert_eq!(metric(&m, "disagg_sim_kv_blocks_held", &[]), 0.0, "freed at once, not after the lease");
    assert_eq!(metric(&m, "disagg_sim_kv_freed_by_decode_abort_total", &[]), 1.0);
    assert_eq!(metric(&metrics(&d.url).await, "vllm:kv_cache_usage_perc", &[]), 0.0);
}

/// P2pNccl, dead peer, under load: a decode killed while requests run costs none of them
/// (a pair whose decode failed runs again with a new id: the KV went to the dead one); it
/// leaves the pool 5 s after its last ping; a new engine that registers takes requests.
#[tokio::test]
async fn p2pnccl_decodes_leave_and_join_under_load_and_no_request_is_lost() {
    let discovery = format!("127.0.0.1:{}", free_port_run(1));
    let r = router_unready(&[
        "--vllm-pd-disaggregation",
        "--vllm-discovery-address",
        &discovery,
        "--health-check-interval-secs",
        "30",
        "--policy",
        "round_robin",
        "--admin-api-key",
        "k",
    ])
    .await;
    let engine = |role: &'static str| {
        let discovery = discovery.clone();
        async move {
            Proc::sim(&["--role", role, "--kv-connector", "p2pnccl", "--proxy-address", &discovery, "--decode-ms-per-token", "5"]).await
        }
    };
    let p = engine("prefill").await;
    let mut d1 = engine("decode").await;
    let d2 = engine("decode").await;
    let c = Proc::sim(&[]).await;
    let url = r.url.clone();
    let health = || async { get_as(&format!("{url}/health"), "k").await.1 };
    assert!(
        eventually(Duration::from_secs(10), || async {
            let h = health().await;
            h.contains(&d1.url) && h.contains(&d2.url) && h.contains(&p.url)
        })
        .await
    );
    // Three clients, each a stream of requests; the first decode dies meanwhile.
    let clients: Vec<_> = (0..3)
        .map(|k| {
            let (router, colocated) = (r.url.clone(), c.url.clone());
            tokio::spawn(async move {
                for i in 0..12 {
                    let b = json!({"prompt": words(&format!("load{k}-{i}"), 20), "max_tokens": 6, "ignore_eos": true});
                    let (status, got) = post(&format!("{router}/v1/completions"), &b).await;
                    assert_eq!(status, 200, "client {k} request {i}: {got}");
                    let (_, want) = post(&format!("{colocated}/v1/completions"), &b).await;
                    assert_eq!(text_of(&got), text_of(&want));
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(150)).await;
    d1.kill();
    for client in clients {
        client.await.unwrap();
    }
    assert!(eventually(Duration::from_secs(8), || async { !health().await.contains(&d1.url) }).await, "{}", health().await);
    // A new decode registers and is used.
    let d3 = engine("decode").await;
    let healthy = |u: String| {
        let url = url.clone();
        async move {
            workers_as(&url, Some("k")).await["workers"].as_array().unwrap().iter().any(|w| w["url"] == u.as_str() && w["healthy"] == true)
        }
    };
    assert!(eventually(Duration::from_secs(10), || healthy(d3.url.clone())).await, "{}", health().await);
    routed_equals_colocated(&r.url, &c.url, 6).await;
    assert!(served(&d3.url).await > 0.0, "the new decode takes requests");
    assert_idle_as(&r.url, Some("k")).await;
}

/// P2pNccl, KV nobody takes: KV pushed to a decode whose request never comes is dropped
/// when the lease ends (vLLM 0.10 keeps it in its receive buffer).
#[tokio::test]
async fn p2pnccl_pushed_kv_nobody_takes_is_dropped_when_the_lease_ends() {
    let p = Proc::sim(&["--role", "prefill", "--kv-connector", "p2pnccl"]).await;
    let d = Proc::sim(&["--role", "decode", "--kv-connector", "p2pnccl", "--kv-lease-secs", "1"]).await;
    let side = |s: &Proc| s.banner.split("side_channel_ports=[").nth(1).unwrap().split(']').next().unwrap().to_string();
    let id = format!("___prefill_addr_127.0.0.1:{}___decode_addr_127.0.0.1:{}_abc", side(&p), side(&d));
    let (status, _) =
        post_with(&format!("{}/v1/completions", p.url), &json!({"prompt": words("push", 30), "max_tokens": 1}), &[("x-request-id", &id)])
            .await;
    assert_eq!(status, 200);
    let dropped =
        eventually(Duration::from_secs(5), || async { metric(&metrics(&d.url).await, "disagg_sim_kv_leases_expired_total", &[]) == 1.0 })
            .await;
    assert!(dropped);
}

/// P2pNccl, client gone while the decode waits for KV that never comes (vLLM 0.10 waits
/// without a bound): the request leaves and its blocks are freed.
#[tokio::test]
async fn p2pnccl_a_decode_waiting_for_kv_leaves_with_its_client() {
    let d = Proc::sim(&["--role", "decode", "--kv-connector", "p2pnccl"]).await;
    let waiting = client().post(format!("{}/v1/completions", d.url)).json(&json!({"prompt": words("never", 50), "max_tokens": 3})).send();
    assert!(tokio::time::timeout(Duration::from_millis(800), waiting).await.is_err(), "the decode waits for pushed KV");
    assert!(eventually(Duration::from_secs(3), || async { metric(&metrics(&d.url).await, "vllm:kv_cache_usage_perc", &[]) == 0.0 }).await);
    assert!(eventually(Duration::from_secs(3), || async { metric(&metrics(&d.url).await, "vllm:num_requests_running", &[]) == 0.0 }).await);
}

/// The first-token cases (tests/it/first_token.rs), NIXL and Mooncake, on simulators.
#[tokio::test]
async fn a_prefill_whose_first_token_ends_the_request_leaves_no_kv_held() {
    let prompt = (0..48).map(|i| format!("w{}", i % 97)).collect::<Vec<_>>().join(" ");
    let (p1, p2) =
        tokio::join!(Proc::sim(&["--role", "prefill", "--block-size", "16"]), Proc::sim(&["--role", "prefill", "--block-size", "16"]));
    let d = Proc::sim(&["--role", "decode", "--block-size", "16"]).await;
    let plain = Proc::sim(&["--block-size", "16"]).await;
    let r = router(&["--policy", "round_robin", "--prefill", &p1.url, "--prefill", &p2.url, "--decode", &d.url]).await;
    let engines = crate::first_token::Engines {
        router: &r.url,
        plain: &plain.url,
        prefills: &[&p1.url, &p2.url],
        model: "sim-model",
        eos: disagg::sim::engine::tokens::EOS,
        prompt: prompt.clone(),
    };
    assert_eq!(crate::first_token::first_token_ends_the_request(&engines).await, 12);
    assert_idle(&r.url).await;

    let mp = mooncake_prefill(&["--block-size", "16"]).await;
    let md = Proc::sim(&["--role", "decode", "--kv-connector", "mooncake", "--block-size", "16", "--kv-lease-secs", "3"]).await;
    let r = router(&["--kv-connector", "mooncake", "--prefill", &mp.url, &bootstrap_port(&mp), "--decode", &md.url]).await;
    let engines = crate::first_token::Engines { router: &r.url, prefills: &[&mp.url], ..engines };
    assert_eq!(crate::first_token::first_token_ends_the_request(&engines).await, 12);
    assert_idle(&r.url).await;
}
