//! The router's own cases on the PD group's shared instances (tests/vllm.rs): output equal
//! to a colocated instance, concurrency, KV moved over both prefills, clients leaving
//! between the legs, the round trip against direct legs, a prefill dying mid-run, and a
//! KV mismatch killing the decode.

use std::time::{Duration, Instant};

use super::support::*;
use super::{body, first_token, handshake, reference, text, Env};

pub async fn first_token_cases(e: &mut Env) {
    let engines = first_token::Engines {
        router: &e.router.url,
        plain: &e.plain.url,
        prefills: &[&e.p0.url, &e.p1.url],
        model: "tiny-llama",
        eos: 1,
        prompt: e.pair.prompt("first token", 2),
    };
    assert_eq!(first_token::first_token_ends_the_request(&engines).await, 12);
    assert_idle(&e.router.url).await;
}

pub async fn router_equals_colocated(e: &mut Env) {
    for path in ["/v1/completions", "/v1/chat/completions"] {
        for (tag, blocks) in [("short", 0usize), ("long", 3)] {
            let prompt = e.pair.prompt(&format!("router-{tag}-{path}"), blocks);
            let want = reference(e, path, &prompt, 16).await;
            for stream in [false, true] {
                let got = text(&format!("{}{path}", e.router.url), &body(path, &prompt, 16, stream)).await;
                assert_eq!(got, want, "{path} {tag} stream={stream}");
            }
        }
    }
    assert_idle(&e.router.url).await;
}

pub async fn router_concurrent(e: &mut Env) {
    let prompts: Vec<String> = (0..8).map(|i| e.pair.prompt(&format!("concurrent {i}"), i % 3)).collect();
    let mut want = Vec::new();
    for p in &prompts {
        want.push(reference(e, "/v1/completions", p, 16).await);
    }
    let url = format!("{}/v1/completions", e.router.url);
    let got = futures_util::future::join_all(prompts.iter().enumerate().map(|(i, p)| {
        let url = url.clone();
        let b = body("/v1/completions", p, 16, i % 2 == 0);
        async move { text(&url, &b).await }
    }))
    .await;
    assert_eq!(got, want);
    assert_idle(&e.router.url).await;
}

pub async fn router_moves_kv_over_both_prefills(e: &mut Env) {
    let source = |t: &str, s: &str| metric(t, "vllm:prompt_tokens_by_source_total", &[("source", s)]);
    let d0 = metrics(&e.d.url).await;
    let (p0, p1) = (metrics(&e.p0.url).await, metrics(&e.p1.url).await);
    let mut prompt_tokens = 0.0;
    for i in 0..4 {
        let (status, v) =
            post(&format!("{}/v1/completions", e.router.url), &body("/v1/completions", &e.pair.prompt(&format!("moved {i}"), 1), 8, false))
                .await;
        assert_eq!(status, 200, "{v}");
        prompt_tokens += v["usage"]["prompt_tokens"].as_f64().unwrap();
    }
    let d1 = metrics(&e.d.url).await;
    assert_eq!(
        source(&d1, "external_kv_transfer") - source(&d0, "external_kv_transfer"),
        prompt_tokens,
        "every prompt token came over NIXL"
    );
    assert_eq!(source(&d1, "local_compute"), source(&d0, "local_compute"), "none computed on the decode");
    let used = |before: &str, after: &str| metric(after, "vllm:prompt_tokens_total", &[]) - metric(before, "vllm:prompt_tokens_total", &[]);
    let (p0b, p1b) = (metrics(&e.p0.url).await, metrics(&e.p1.url).await);
    assert!(used(&p0, &p0b) > 0.0 && used(&p1, &p1b) > 0.0, "round robin used both prefills");
    assert_idle(&e.router.url).await;
}

/// Clients that leave at staggered moments, some of them between the legs: afterwards no
/// prefill holds KV (a stranded request would hold it for the 30 s lease).
pub async fn client_leaving_strands_nothing(e: &mut Env) {
    let abandoned = || async { metric(&metrics(&e.router.url).await, "disagg_router_abandoned_decode_legs_total", &[]) };
    let url = format!("{}/v1/completions", e.router.url);
    let mut delay_ms = 0u64;
    while abandoned().await < 1.0 {
        assert!(delay_ms < 3000, "no client left between the legs in any of the tries");
        for k in 0..10u64 {
            let b = body("/v1/completions", &e.pair.prompt(&format!("leave {delay_ms} {k}"), 2), 64, true);
            let url = url.clone();
            let req = tokio::spawn(async move {
                let resp = client().post(url).json(&b).send().await;
                if let Ok(mut r) = resp {
                    while let Ok(Some(_)) = r.chunk().await {}
                }
            });
            tokio::time::sleep(Duration::from_millis(delay_ms + k * 3)).await;
            req.abort();
        }
        delay_ms += 30;
    }
    println!("      {} decode legs kept for clients that left between the legs", abandoned().await);
    for p in [&e.p0, &e.p1] {
        let released =
            eventually(Duration::from_secs(10), || async { metric(&metrics(&p.url).await, "vllm:kv_cache_usage_perc", &[]) == 0.0 }).await;
        assert!(released, "{} still holds KV:\n{}", p.name, metrics(&p.url).await);
        assert!(!p.log_text().contains("Releasing expired KV blocks"), "{} released KV by lease expiry", p.name);
    }
    assert_eq!(get(&format!("{}/health", e.d.url)).await.0, 200, "the decode stays healthy");
    assert_idle(&e.router.url).await;
}

pub async fn round_trip(e: &mut Env) {
    let median = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    };
    let (mut direct, mut routed) = (Vec::new(), Vec::new());
    for i in 0..20 {
        let b = body("/v1/completions", &format!("round trip {i} with a few words"), 16, false);
        let t = Instant::now();
        e.pair.disaggregated("/v1/completions", &b, false).await;
        direct.push(t.elapsed().as_secs_f64() * 1000.0);
        let b = body("/v1/completions", &format!("round trip {i} routed with a few words"), 16, false);
        let t = Instant::now();
        assert_eq!(post(&format!("{}/v1/completions", e.router.url), &b).await.0, 200);
        routed.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let (d, r) = (median(direct), median(routed));
    println!("      1P1D round trip, 16 output tokens, median of 20: direct {d:.1} ms, through disagg route {r:.1} ms ({:+.1} ms)", r - d);
}

pub async fn prefill_dies_mid_run(e: &mut Env) {
    let prompts: Vec<String> = (0..24).map(|i| e.pair.prompt(&format!("survive {i}"), i % 2)).collect();
    let mut want = Vec::new();
    for p in &prompts {
        want.push(reference(e, "/v1/completions", p, 12).await);
    }
    let url = format!("{}/v1/completions", e.router.url);
    let run = futures_util::future::join_all(prompts.iter().enumerate().map(|(i, p)| {
        let url = url.clone();
        let b = body("/v1/completions", p, 12, i % 2 == 1);
        async move {
            tokio::time::sleep(Duration::from_millis(50 * i as u64)).await;
            text(&url, &b).await
        }
    }));
    let killer = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        e.p0.kill();
    };
    let (got, ()) = tokio::join!(run, killer);
    assert_eq!(got, want, "every request answered correctly by the surviving prefill");
    assert_idle(&e.router.url).await;
}

pub async fn mismatch_kills_decode(e: &mut Env) {
    e.pair.prefill = e.p1.url.clone();
    handshake::mismatched_prompt_fails(&e.pair).await;
    let dead = eventually(Duration::from_secs(30), || async {
        !matches!(client().get(format!("{}/health", e.d.url)).send().await, Ok(r) if r.status().is_success())
    })
    .await;
    assert!(dead, "real vLLM's decode engine dies on a KV mismatch (the sim's --die-on-kv-mismatch)");
}
