//! Elastic PD (--pd-pool: engines that take either leg, vLLM `kv_both`) and slo_aware on
//! simulators (their default role serves either leg by the params it gets, as `kv_both`).

use std::time::Duration;

use serde_json::{json, Value};

use crate::support::*;

const KEY: &str = "admin-secret";

/// A completion through the router: its text, and the workers its headers name (prefill
/// None: one engine answered alone).
async fn served(router: &str, prompt: &str, max_tokens: u32, stream: bool) -> (String, Option<String>, String) {
    let mut body = json!({"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": true});
    if stream {
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
    }
    let resp = client().post(format!("{router}/v1/completions")).json(&body).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let header = |name: &str| resp.headers().get(name).map(|v| v.to_str().unwrap().split(';').next().unwrap().to_string());
    let (prefill, decode) = (header("x-disagg-prefill"), header("x-disagg-decode").expect("the answering worker is named"));
    let bytes = resp.bytes().await.unwrap();
    let text = if stream {
        let events: Vec<String> =
            String::from_utf8_lossy(&bytes).split("\n\n").filter_map(|e| e.strip_prefix("data: ")).map(str::to_owned).collect();
        stream_text(&events)
    } else {
        text_of(&serde_json::from_slice::<Value>(&bytes).unwrap())
    };
    (text, prefill, decode)
}

fn sourced(metrics: &str, source: &str) -> f64 {
    metric(metrics, "vllm:prompt_tokens_by_source_total", &[("source", source)])
}

#[tokio::test]
async fn a_pd_pool_pairs_its_engines_both_ways_and_one_engine_answers_alone() {
    let (a, b) = (Proc::sim(&[]).await, Proc::sim(&[]).await);
    let r = router(&["--pd-pool", &a.url, &b.url, "--policy", "round_robin", "--worker-headers", "--admin-api-key", KEY]).await;
    let w = workers_as(&r.url, Some(KEY)).await;
    let roles: Vec<&str> = w["workers"].as_array().unwrap().iter().map(|w| w["role"].as_str().unwrap()).collect();
    assert_eq!(roles, ["both", "both"], "each engine listed once, as elastic: {w}");

    // Round robin over the pool as decodes; the prefill is always the other engine.
    let prompt = "elastic engines take either leg of a request";
    let want =
        text_of(&post(&format!("{}/v1/completions", a.url), &json!({"prompt": prompt, "max_tokens": 12, "ignore_eos": true})).await.1);
    let mut pairs = Vec::new();
    for stream in [false, true, false, true] {
        let (text, prefill, decode) = served(&r.url, prompt, 12, stream).await;
        assert_eq!(text, want, "equal to one engine's own answer (stream {stream})");
        let prefill = prefill.expect("a pair while both engines are up");
        assert_ne!(prefill, decode);
        pairs.push((prefill, decode));
    }
    assert!(pairs.contains(&(a.url.clone(), b.url.clone())) && pairs.contains(&(b.url.clone(), a.url.clone())), "{pairs:?}");
    // The KV moved both ways: each engine decoded from the other's KV.
    for e in [&a, &b] {
        let m = metrics(&e.url).await;
        assert!(sourced(&m, "external_kv_transfer") > 0.0, "{} pulled KV", e.url);
        assert_eq!(metric(&m, "disagg_sim_kv_transfers_total", &[("direction", "sent")]), 2.0, "{}", e.url);
    }
    let rm = metrics_as(&r.url, KEY).await;
    assert_eq!(metric(&rm, "disagg_router_elastic_layout_total", &[("layout", "pair")]), 4.0);

    // B leaves: A takes both legs alone (no prefill leg, no transfer).
    let (status, v) = admin_post(&format!("{}/remove_worker?url={}", r.url, b.url)).await;
    assert_eq!(status, 200, "{v}");
    let before = metrics(&a.url).await;
    for stream in [false, true] {
        let (text, prefill, decode) = served(&r.url, prompt, 12, stream).await;
        assert_eq!((text.as_str(), prefill, decode.as_str()), (want.as_str(), None, a.url.as_str()));
    }
    let after = metrics(&a.url).await;
    assert_eq!(sourced(&after, "external_kv_transfer"), sourced(&before, "external_kv_transfer"), "no KV moved");
    assert!(
        sourced(&after, "local_compute") + sourced(&after, "local_cache_hit")
            > sourced(&before, "local_compute") + sourced(&before, "local_cache_hit")
    );
    assert_eq!(metric(&metrics_as(&r.url, KEY).await, "disagg_router_elastic_layout_total", &[("layout", "alone")]), 2.0);

    // B is back as an elastic engine through the admin API: pairs again.
    let (status, v) = admin_post(&format!("{}/add_worker?url={}&role=both", r.url, b.url)).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["worker"]["role"], "both", "{v}");
    let listed = admin_get(&format!("{}/list_workers", r.url)).await;
    assert_eq!(listed["both"].as_array().map(Vec::len), Some(2), "{listed}");
    let healthy = || async {
        workers_as(&r.url, Some(KEY)).await["workers"].as_array().unwrap().iter().filter(|w| w["healthy"] == true).count() == 2
    };
    assert!(eventually(Duration::from_secs(5), healthy).await);
    let mut saw_pair = false;
    for _ in 0..4 {
        saw_pair |= served(&r.url, prompt, 4, false).await.1.is_some();
    }
    assert!(saw_pair);
    // Every API through the pool: chat and Anthropic's Messages, each answered by a pair.
    let chat = json!({"model": "sim-model", "messages": [{"role": "user", "content": prompt}], "max_tokens": 6});
    let (status, v) = post(&format!("{}/v1/chat/completions", r.url), &chat).await;
    assert_eq!((status, v["choices"][0]["message"]["role"].as_str()), (200, Some("assistant")), "{v}");
    let (status, v) = post(
        &format!("{}/v1/messages", r.url),
        &json!({"model": "sim-model", "max_tokens": 6, "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!((status, v["type"].as_str()), (200, Some("message")), "{v}");
    assert_idle_as(&r.url, Some(KEY)).await;

    // Beside fixed pools: a --pd-pool engine with a prefill and a decode of fixed roles.
    let (p, d) = (Proc::sim(&["--role", "prefill"]).await, Proc::sim(&["--role", "decode"]).await);
    let r = router(&["--prefill", &p.url, "--decode", &d.url, "--pd-pool", &a.url, "--policy", "round_robin", "--worker-headers"]).await;
    let mut used = std::collections::HashSet::new();
    for i in 0..6 {
        let (_, prefill, decode) = served(&r.url, &format!("beside {i}"), 3, false).await;
        assert!(prefill.as_deref() != Some(decode.as_str()), "never paired with itself");
        used.extend(prefill.into_iter().chain([decode]));
    }
    assert!(used.contains(&a.url) && used.contains(&p.url) && used.contains(&d.url), "{used:?}");
    assert!(!used.iter().any(|u| u == &b.url));
}

async fn metrics_as(router: &str, key: &str) -> String {
    get_as(&format!("{router}/metrics"), key).await.1
}

async fn admin_post(url: &str) -> (u16, Value) {
    let resp = client().post(url).bearer_auth(KEY).send().await.unwrap();
    (resp.status().as_u16(), resp.json().await.unwrap_or(Value::Null))
}

async fn admin_get(url: &str) -> Value {
    client().get(url).bearer_auth(KEY).send().await.unwrap().json().await.unwrap()
}

#[tokio::test]
async fn slo_aware_keeps_short_prompts_alone_and_leans_an_engine_to_prefill_for_long_ones() {
    // Simulated engines at 0.2 ms per prompt token and 10 ms per step; the router starts
    // from the same profile.
    let profile = temp_dir("elastic").join("profile.json");
    std::fs::write(&profile, r#"{"prefill_ms":[0,0.2,0],"decode_ms":[10,0,0],"decode_ms_per_seq":0,"decode_min_ms":0}"#).unwrap();
    let timing = ["--prefill-ms-per-1k-tokens", "200", "--decode-ms-per-token", "10"];
    let (a, b) = (Proc::sim(&timing).await, Proc::sim(&timing).await);
    let log = temp_dir("elastic").join("access.log");
    let r = router(&[
        "--pd-pool",
        &a.url,
        &b.url,
        "--policy",
        "slo_aware",
        "--slo-ttft-ms",
        "5000",
        "--slo-itl-ms",
        "40",
        "--timing-profile",
        profile.to_str().unwrap(),
        "--worker-headers",
        "--admin-api-key",
        KEY,
        "--access-log",
        log.to_str().unwrap(),
    ])
    .await;
    // Idle engines and a short prompt (its prefill step is well within the ITL SLO): one
    // engine, no transfer to wait for.
    let (_, prefill, _) = served(&r.url, "a short question", 4, true).await;
    assert_eq!(prefill, None, "alone");
    // Long prompts (a 3,000-token prefill would hold a decode's step 600 ms): disaggregated.
    // Their prefill work makes one engine lean to prefill: from the second on, that one
    // prefills them and the other decodes (the lean stays while the work comes).
    let mut roles: Option<(String, String)> = None;
    for i in 0..4 {
        let (_, prefill, decode) = served(&r.url, &format!("{i} {}", "word ".repeat(3000)), 4, true).await;
        let pair = (prefill.expect("a pair for a long prompt"), decode);
        assert_ne!(pair.0, pair.1);
        if i > 1 {
            assert_eq!(Some(&pair), roles.as_ref(), "request {i}: the same engine leans to prefill");
        }
        roles = Some(pair);
    }
    let (_, decoding) = roles.unwrap();
    // Short prompts meanwhile go alone, to the engine leaning to decode.
    for i in 0..3 {
        let (_, prefill, decode) = served(&r.url, &format!("short {i}"), 4, i % 2 == 0).await;
        assert_eq!((prefill, decode.as_str()), (None, decoding.as_str()));
    }
    // Predicted against observed TTFT: after 12 requests of mixed lengths one at a time
    // (the fit's samples), 12 more are each predicted within a third of what they took.
    for i in 0..24 {
        // Each prompt new from its first token (no prefix cache hit: the router does not
        // see caches without kv_aware).
        served(&r.url, &format!("{i} {}", "token ".repeat([10, 400, 1500][i % 3])), 8, true).await;
    }
    assert!(eventually(Duration::from_secs(5), || async { std::fs::read_to_string(&log).unwrap_or_default().lines().count() >= 32 }).await);
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let predicted = lines.iter().filter(|v| v["predicted_ttft_ms"].as_f64().is_some()).count();
    assert_eq!(predicted, 31, "every streamed request has its prediction (one of the 32 was not streamed): {text}");
    for v in &lines[lines.len() - 12..] {
        let (predicted, observed) =
            (v["predicted_ttft_ms"].as_f64().unwrap(), v["first_token_ms"].as_f64().unwrap() - v["queue_ms"].as_f64().unwrap());
        assert!((observed - predicted).abs() / observed < 0.34, "predicted {predicted} ms, observed {observed} ms: {v}");
    }
    let m = metrics_as(&r.url, KEY).await;
    assert_eq!(metric(&m, "disagg_router_ttft_observed_over_predicted_count", &[]), 31.0, "the streamed ones");
    assert!(metric(&m, "disagg_router_elastic_layout_total", &[("layout", "pair")]) >= 4.0 + 16.0);
    assert_idle_as(&r.url, Some(KEY)).await;
}

#[tokio::test]
async fn elastic_and_slo_flags_are_checked() {
    for (args, says) in [
        (vec!["--pd-pool", "http://127.0.0.1:1", "--kv-connector", "mooncake"], "NIXL connector only"),
        (vec!["--pd-pool", "http://127.0.0.1:1", "--slo-ttft-ms", "100"], "add --policy slo_aware"),
        (vec!["--pd-pool", "http://127.0.0.1:1", "--policy", "slo_aware", "--slo-itl-ms", "0"], "must be > 0"),
        (vec!["--prefill", "http://127.0.0.1:1", "--pd-pool", "http://127.0.0.1:1"], "listed twice"),
        (vec!["--pd-pool", "http://127.0.0.1:1", "--policy", "slo_aware", "--timing-profile", "/nonexistent"], "--timing-profile"),
    ] {
        let mut all = vec!["route", "--port", "0"];
        all.extend(&args);
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_disagg")).args(&all).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(says), "{args:?}: {err}");
    }
}

/// `disagg launch` with elastic roles: kv_both engines given to the router as --pd-pool,
/// the simulators started `--role both`; a launched topology serves through both layouts.
#[tokio::test]
async fn launch_gives_elastic_roles_to_the_router_as_a_pd_pool() {
    let (p, d, r) = (free_port_run(2), free_port_run(1), free_port_run(1));
    let role = |name: &str, replicas: u32, port: u16, role: &str| {
        format!(
            "{name}:\n  replicas: {replicas}\n  port: {port}\n  side_channel_port: {side}\n  elastic: true\n  params:\n    kv_transfer_config: '{{\"kv_connector\":\"NixlConnector\",\"kv_role\":\"{role}\"}}'\n",
            side = free_port_run(replicas as u16)
        )
    };
    let file_text = |kv_role: &str| {
        format!(
            "timeout: 30\nworking_dir: {wd}\nengine: sim\nscheduler:\n  port: {r}\n  args: [--policy, round_robin, --worker-headers]\ngeneral:\n  params:\n    model: tiny\n{}{}",
            role("prefill", 2, p, kv_role),
            role("decode", 1, d, "kv_both"),
            wd = std::env::temp_dir().join(format!("disagg-launch-elastic-{p}")).display(),
        )
    };
    let bad = crate::launch::write("elastic-bad.yaml", &file_text("kv_producer"));
    let (ok, _, err) = crate::launch::run(&["launch", bad.to_str().unwrap(), "--dry-run"]);
    assert!(!ok && err.contains("prefill.elastic") && err.contains("kv_both"), "{err}");

    let file = crate::launch::write("elastic.yaml", &file_text("kv_both"));
    let (ok, plan, err) = crate::launch::run(&["launch", file.to_str().unwrap(), "--dry-run"]);
    assert!(ok, "{err}");
    let router_line = plan.lines().find(|l| l.contains(" route ")).expect("the router's line");
    assert_eq!(router_line.matches("--pd-pool").count(), 3, "{router_line}");
    assert!(!router_line.contains("--prefill ") && !router_line.contains("--decode "), "{router_line}");
    assert_eq!(plan.matches("--role both").count(), 3, "{plan}");

    let mut launch = crate::launch::Launch::start(&file).await;
    let url = launch.ready().await.unwrap_or_else(|| panic!("no ready line:\n{}", launch.stderr()));
    let w = workers(&url).await;
    assert_eq!(w["workers"].as_array().unwrap().iter().filter(|w| w["role"] == "both").count(), 3, "{w}");
    let mut decodes = std::collections::HashSet::new();
    for i in 0..6 {
        let (_, prefill, decode) = served(&url, &format!("launched elastic {i}"), 3, i % 2 == 0).await;
        assert!(prefill.is_some_and(|p| p != decode));
        decodes.insert(decode);
    }
    assert_eq!(decodes.len(), 3, "every engine decoded: {decodes:?}");
    launch.stop().await;
}
