//! `disagg route`: command lines users paste, the PD wire protocol byte by byte, streaming,
//! colocated mode and the router's own endpoints.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::capture::{Capture, PARAMS};
use crate::support::*;

async fn sims(n: usize, args: &[&str]) -> Vec<Proc> {
    futures_util::future::join_all((0..n).map(|_| Proc::sim(args))).await
}

/// The seed guide's command, verbatim but for loopback addresses and a free port.
#[tokio::test]
async fn vllm_router_command_line_works_verbatim() {
    let p = sims(2, &["--role", "prefill", "--data-parallel-size", "4"]).await;
    let d = sims(2, &["--role", "decode", "--data-parallel-size", "4"]).await;
    let r = Proc::start(&[
        "--policy",
        "round_robin",
        "--vllm-pd-disaggregation",
        "--max-concurrent-requests",
        "9216",
        "--prefill",
        &p[0].url,
        "--prefill",
        &p[1].url,
        "--decode",
        &d[0].url,
        "--decode",
        &d[1].url,
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--intra-node-data-parallel-size",
        "4",
    ])
    .await;
    assert!(eventually(Duration::from_secs(10), || async { get(&format!("{}/health", r.url)).await.0 == 200 }).await);
    for i in 0..16 {
        let (status, v) = post(&format!("{}/v1/completions", r.url), &json!({"prompt": format!("q{i}"), "max_tokens": 3})).await;
        assert_eq!(status, 200, "{v}");
    }
    // Round robin over both prefills and decodes, spread over every DP rank of each.
    for s in p.iter().chain(&d) {
        let m = metrics(&s.url).await;
        assert_eq!(metric(&m, "vllm:request_success_total", &[]), 8.0, "{}", s.url);
        for rank in ["0", "1", "2", "3"] {
            assert_eq!(metric(&m, "vllm:request_success_total", &[("engine", rank)]), 2.0, "{} rank {rank}", s.url);
        }
    }
    assert_idle(&r.url).await;
}

#[tokio::test]
async fn toy_proxy_flags_and_instances_shorthand_work() {
    let p = sims(2, &["--role", "prefill"]).await;
    let d = sims(1, &["--role", "decode"]).await;
    let toy = router(&[
        "--prefiller-hosts",
        "127.0.0.1",
        "localhost",
        "--prefiller-ports",
        &p[0].port.to_string(),
        &p[1].port.to_string(),
        "--decoder-host",
        "127.0.0.1",
        "--decoder-port",
        &d[0].port.to_string(),
    ])
    .await;
    let hc: Value = serde_json::from_str(&get(&format!("{}/healthcheck", toy.url)).await.1).unwrap();
    assert_eq!(hc, json!({"status": "ok", "prefill_instances": 2, "decode_instances": 1}));
    for _ in 0..4 {
        assert_eq!(post(&format!("{}/v1/completions", toy.url), &json!({"prompt": "t", "max_tokens": 2})).await.0, 200);
    }
    // The same prompt four times: the toy proxy's flags imply its round robin (cache_aware
    // would follow the prefix to one prefill).
    assert_eq!(served(&p[0].url).await, 2.0);
    assert_eq!(served(&p[1].url).await, 2.0);
    let spec = format!("127.0.0.1:{},{}", p[0].port, p[1].port);
    let short = router(&["--prefill-instances", &spec, "--decode-instances", &format!("127.0.0.1:{}", d[0].port)]).await;
    let hc: Value = serde_json::from_str(&get(&format!("{}/healthcheck", short.url)).await.1).unwrap();
    assert_eq!(hc["prefill_instances"], 2);
    assert_eq!(post(&format!("{}/v1/completions", short.url), &json!({"prompt": "t", "max_tokens": 2})).await.0, 200);
}

#[tokio::test]
async fn bad_flags_are_clear_errors() {
    let run = |args: &[&str]| {
        let out = std::process::Command::new(BIN).args(args).output().unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stderr).to_string())
    };
    let (ok, err) = run(&["route", "--bogus-flag"]);
    assert!(!ok && err.contains("--bogus-flag"), "{err}");
    let (ok, err) = run(&["--policy", "sticky", "--prefill", "http://a:1", "--decode", "http://b:2"]);
    assert!(!ok && err.contains("possible values"), "{err}");
    let (ok, err) = run(&["--prefill", "http://a:1", "8998", "--decode", "http://b:2"]);
    assert!(!ok && err.contains("bootstrap port"), "{err}");
    let (ok, err) = run(&["--prefill", "http://a:1"]);
    assert!(!ok && err.contains("at least one prefill and one decode"), "{err}");
    let (ok, err) = run(&["--prefiller-hosts", "a", "b", "--prefiller-ports", "1", "--decode", "http://b:2"]);
    assert!(!ok && err.contains("zipped"), "{err}");
    let (ok, err) = run(&["--prefill", "http://a:1", "--decode", "http://b:2", "--model-path", "/nonexistent"]);
    assert!(!ok && err.contains("tokenizer.json"), "{err}");
    let (ok, err) = run(&["--max-concurrent-requests", "0", "--worker-urls", "http://a:1"]);
    assert!(!ok && err.contains("max-concurrent-requests"), "{err}");
    let (ok, help) = {
        let out = std::process::Command::new(BIN).args(["route", "--help"]).output().unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stdout).to_string())
    };
    assert!(ok);
    for flag in [
        "--prefill-policy",
        "--cache-threshold",
        "--intra-node-data-parallel-size",
        "--queue-timeout-secs",
        "--prefiller-hosts",
        "--health-failure-threshold",
        "--max-payload-size",
    ] {
        assert!(help.contains(flag), "--help documents {flag}");
    }
}

#[tokio::test]
async fn ipv6_worker_urls_work() {
    let p = Proc::sim(&["--host", "::1", "--role", "prefill"]).await;
    let d = Proc::sim(&["--host", "::1", "--role", "decode"]).await;
    assert!(p.url.starts_with("http://[::1]:"), "{}", p.url);
    let r = router(&["--host", "::1", "--prefill", &p.url, "--decode", &d.url]).await;
    assert!(r.url.starts_with("http://[::1]:"));
    let (status, v) = post(&format!("{}/v1/completions", r.url), &json!({"prompt": "v6", "max_tokens": 3})).await;
    assert_eq!(status, 200, "{v}");
}

/// The two legs exactly as PROTOCOLS.md §1 says, checked on the bytes a worker receives.
#[tokio::test]
async fn pd_legs_are_exactly_the_nixl_protocol() {
    let (purl, prefill) = Capture::default().start().await;
    let (durl, decode) = Capture::default().start().await;
    let r = router(&["--prefill", &purl, "--decode", &durl]).await;
    let raw = r#"{"model":"m","prompt":"héllo  wörld","max_tokens":7,"max_completion_tokens":7,"stream":true,"stream_options":{"include_usage":true},"min_tokens":2,"temperature":0.7,"guided_json":{"type":"object"},"some_new_vllm_field":[1,{"x":null}]}"#;
    let resp = client()
        .post(format!("{}/v1/completions", r.url))
        .header("content-type", "application/json")
        .header("X-Request-Id", "rid-42")
        .header("Authorization", "Bearer tok")
        .body(raw)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(resp.headers()["x-request-id"], "rid-42");
    let text = resp.text().await.unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");

    let p = prefill.requests("/v1/completions");
    assert_eq!(p.len(), 1);
    let leg: Value = serde_json::from_slice(&p[0].body).unwrap();
    assert_eq!(leg["stream"], false);
    assert_eq!(leg["max_tokens"], 1);
    assert_eq!(leg["max_completion_tokens"], 1);
    assert!(leg.get("stream_options").is_none() && leg.get("min_tokens").is_none());
    assert_eq!(
        leg["kv_transfer_params"],
        json!({"do_remote_decode": true, "do_remote_prefill": false, "remote_engine_id": null,
               "remote_block_ids": null, "remote_host": null, "remote_port": null})
    );
    assert_eq!(leg["prompt"], "héllo  wörld");
    assert_eq!(leg["temperature"], 0.7);
    assert_eq!(leg["guided_json"], json!({"type": "object"}));
    assert_eq!(leg["some_new_vllm_field"], json!([1, {"x": null}]));
    assert_eq!(p[0].headers["x-request-id"], "rid-42");
    assert_eq!(p[0].headers["authorization"], "Bearer tok");

    let d = decode.requests("/v1/completions");
    assert_eq!(d.len(), 1);
    // The client's own bytes, plus the prefill's params (opaque, copied unchanged).
    let body = std::str::from_utf8(&d[0].body).unwrap();
    assert_eq!(body, format!("{},\"kv_transfer_params\":{}}}", &raw[..raw.len() - 1], PARAMS));
    assert_eq!(d[0].headers["x-request-id"], "rid-42");
    assert_eq!(d[0].headers["authorization"], "Bearer tok");
    assert!(d[0].headers.get("x-data-parallel-rank").is_none(), "no rank header without DP");

    // Without a client id, one is made and sent to both legs and back.
    let resp = client()
        .post(format!("{}/v1/chat/completions", r.url))
        .json(&json!({"messages": [{"role": "user", "content": "x"}]}))
        .send()
        .await
        .unwrap();
    let rid = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    assert!(rid.len() >= 16);
    assert_eq!(prefill.requests("/v1/chat/completions")[0].headers["x-request-id"].to_str().unwrap(), rid);
    assert_eq!(decode.requests("/v1/chat/completions")[0].headers["x-request-id"].to_str().unwrap(), rid);
    let chat_leg: Value = serde_json::from_slice(&prefill.requests("/v1/chat/completions")[0].body).unwrap();
    assert!(chat_leg.get("max_completion_tokens").is_none(), "only if the client sent it");
}

#[tokio::test]
async fn pd_output_through_the_router_equals_colocated() {
    let p = Proc::sim(&["--role", "prefill"]).await;
    let d = Proc::sim(&["--role", "decode"]).await;
    let r = router(&["--prefill", &p.url, "--decode", &d.url]).await;
    for path in ["/v1/completions", "/v1/chat/completions"] {
        let body = if path.contains("chat") {
            json!({"messages": [{"role": "user", "content": "tell me"}], "max_tokens": 20, "ignore_eos": true})
        } else {
            json!({"prompt": "tell me a story about routers", "max_tokens": 20, "ignore_eos": true})
        };
        let (_, direct) = post(&format!("{}{path}", p.url), &body).await;
        let (status, routed) = post(&format!("{}{path}", r.url), &body).await;
        assert_eq!(status, 200);
        assert_eq!(text_of(&routed), text_of(&direct), "{path}");
        assert_eq!(routed["usage"], direct["usage"], "usage preserved");
        let mut sbody = body.clone();
        sbody["stream"] = json!(true);
        sbody["stream_options"] = json!({"include_usage": true});
        let (status, events) = post_stream(&format!("{}{path}", r.url), &sbody).await;
        assert_eq!(status, 200);
        assert_eq!(stream_text(&events), text_of(&direct));
        let usage: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
        assert_eq!(usage["usage"]["completion_tokens"], 20, "include_usage reaches the client");
    }
    // The decode pulled every prompt: nothing computed locally, nothing left held.
    let dm = metrics(&d.url).await;
    assert_eq!(metric(&dm, "vllm:prompt_tokens_by_source_total", &[("source", "local_compute")]), 0.0);
    assert_eq!(metric(&metrics(&p.url).await, "disagg_sim_kv_blocks_held", &[]), 0.0);
    assert_idle(&r.url).await;
}

#[tokio::test]
async fn streams_are_relayed_chunk_by_chunk() {
    let p = Proc::sim(&["--role", "prefill"]).await;
    let d = Proc::sim(&["--role", "decode", "--decode-ms-per-token", "40"]).await;
    let r = router(&["--prefill", &p.url, "--decode", &d.url]).await;
    let t = Instant::now();
    let (resp, first) =
        open_stream(&format!("{}/v1/completions", r.url), &json!({"prompt": "slow", "max_tokens": 15, "ignore_eos": true, "stream": true}))
            .await;
    let first_at = t.elapsed();
    let events = rest_of(resp, first).await;
    let total = t.elapsed();
    assert_eq!(events.len(), 15 + 1);
    // The first token reached the client long before the last was generated.
    assert!(total - first_at >= Duration::from_millis(14 * 40 - 100), "first at {first_at:?}, end at {total:?}");
}

#[tokio::test]
async fn colocated_mode_balances_workers_with_the_same_machinery() {
    let w = sims(3, &[]).await;
    let urls: Vec<&str> = w.iter().map(|s| s.url.as_str()).collect();
    let mut args = vec!["--policy", "round_robin", "--worker-urls"];
    args.extend(&urls);
    let r = router(&args).await;
    for i in 0..9 {
        let (status, _) = post(&format!("{}/v1/completions", r.url), &json!({"prompt": format!("c{i}"), "max_tokens": 2})).await;
        assert_eq!(status, 200);
    }
    let (status, events) =
        post_stream(&format!("{}/v1/completions", r.url), &json!({"prompt": "s", "max_tokens": 2, "stream": true})).await;
    assert_eq!(status, 200);
    assert_eq!(events.last().unwrap(), "[DONE]");
    let counts = futures_util::future::join_all(w.iter().map(|s| served(&s.url))).await;
    assert_eq!(counts.iter().sum::<f64>(), 10.0);
    assert!(counts.iter().all(|c| *c >= 3.0), "{counts:?}");
    let h: Value = serde_json::from_str(&get(&format!("{}/health", r.url)).await.1).unwrap();
    assert_eq!(h["healthy_workers"], 3);
    assert_idle(&r.url).await;
}

#[tokio::test]
async fn models_survive_a_dead_worker_and_endpoints_answer_json() {
    let p = Proc::sim(&["--role", "prefill", "--model", "m7"]).await;
    let mut d1 = Proc::sim(&["--role", "decode", "--model", "m7"]).await;
    let d2 = Proc::sim(&["--role", "decode", "--model", "m7"]).await;
    let r = router(&["--prefill", &p.url, "--decode", &d1.url, "--decode", &d2.url, "--policy", "round_robin"]).await;
    assert_eq!(post(&format!("{}/v1/completions", r.url), &json!({"prompt": "m", "max_tokens": 2})).await.0, 200);
    d1.kill();
    d1.wait_exit(Duration::from_secs(5)).await;
    for _ in 0..3 {
        let (status, body) = get(&format!("{}/v1/models", r.url)).await;
        assert_eq!(status, 200, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["data"][0]["id"], "m7");
    }
    let (status, body) = get(&format!("{}/nope", r.url)).await;
    assert_eq!(status, 404);
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["error"]["code"], 404);
    let (status, v) = post(&format!("{}/v1/completions", r.url), &json!("not an object")).await;
    assert_eq!(status, 400);
    assert_eq!(v["error"]["code"], 400);
    let raw =
        client().post(format!("{}/v1/completions", r.url)).header("content-type", "application/json").body("{oops").send().await.unwrap();
    assert_eq!(raw.status().as_u16(), 400);
    assert!(raw.json::<Value>().await.unwrap()["error"]["message"].as_str().unwrap().contains("JSON"));
    let w = workers(&r.url).await;
    assert_eq!(w["workers"].as_array().unwrap().len(), 3);
    assert_eq!(w["workers"][0]["role"], "prefill");
    let m = metrics(&r.url).await;
    for name in [
        "disagg_router_requests_total",
        "disagg_router_errors_total",
        "disagg_router_leg_duration_seconds_bucket",
        "disagg_router_in_flight",
        "disagg_router_queue_depth",
        "disagg_router_worker_healthy",
        "disagg_router_permits_in_use",
    ] {
        assert!(m.contains(name), "{name} missing from /metrics");
    }
    assert_eq!(metric(&m, "disagg_router_errors_total", &[("cause", "bad_request")]), 2.0);
    assert_eq!(metric(&m, "disagg_router_leg_duration_seconds_count", &[("leg", "prefill")]), 1.0);
    assert_eq!(metric(&m, "disagg_router_requests_total", &[("endpoint", "completions"), ("status", "200")]), 1.0);
}

#[tokio::test]
async fn authorization_and_api_key_reach_the_workers() {
    let p = Proc::sim(&["--role", "prefill", "--api-key", "sekrit"]).await;
    let d = Proc::sim(&["--role", "decode", "--api-key", "sekrit"]).await;
    let open = router(&["--prefill", &p.url, "--decode", &d.url]).await;
    let url = format!("{}/v1/completions", open.url);
    let body = json!({"prompt": "auth", "max_tokens": 2});
    let (status, v) = post(&url, &body).await;
    assert_eq!(status, 401, "the prefill's 401 is returned as is");
    assert_eq!(v, json!({"error": "Unauthorized"}));
    let (status, _) = post_with(&url, &body, &[("Authorization", "Bearer sekrit")]).await;
    assert_eq!(status, 200);
    let keyed = router(&["--prefill", &p.url, "--decode", &d.url, "--api-key", "sekrit"]).await;
    assert_eq!(post(&format!("{}/v1/completions", keyed.url), &body).await.0, 200);
}

/// `--worker-threads N` starts N serving threads (and no runtime worker pool besides), in
/// the bare-flags form and under `route`; each serves requests.
#[tokio::test]
async fn worker_threads_sets_the_serving_threads() {
    let p = Proc::sim(&["--role", "prefill"]).await;
    let d = Proc::sim(&["--role", "decode"]).await;
    let threads = |pid: u32, prefix: &str| {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .filter_map(Result::ok)
            .filter(|t| std::fs::read_to_string(t.path().join("comm")).unwrap_or_default().starts_with(prefix))
            .count()
    };
    for n in ["1", "3"] {
        let r = router(&["--worker-threads", n, "--prefill", &p.url, "--decode", &d.url]).await;
        // More connections at once than threads.
        let url = format!("{}/v1/completions", r.url);
        let answers = futures_util::future::join_all((0..8).map(|i| {
            let url = url.clone();
            async move {
                let client = reqwest::Client::new();
                client
                    .post(&url)
                    .json(&json!({"prompt": format!("threads {i}"), "max_tokens": 2}))
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
            }
        }))
        .await;
        assert!(answers.iter().all(|a| matches!(a, Ok(200))), "{answers:?}");
        let pid = r.pid().unwrap();
        assert_eq!(threads(pid, "disagg-serve-").to_string(), n);
        assert_eq!(threads(pid, "tokio-rt-worker"), 0, "the control plane runs on the main thread");
    }
    let r = Proc::start(&["--worker-threads", "1", "--prefill", &p.url, "--decode", &d.url, "--port", "0"]).await;
    assert_eq!(threads(r.pid().unwrap(), "disagg-serve-"), 1, "bare flags, as vllm-router's command lines");
}

/// What PD cannot answer as one instance would (prompt logprobs: the decode computes none
/// of the prompt) is a 400 before any prefill; colocated workers are sent it as it is.
#[tokio::test]
async fn prompt_logprobs_are_refused_in_pd_before_any_prefill() {
    let p = Proc::sim(&["--role", "prefill"]).await;
    let d = Proc::sim(&["--role", "decode"]).await;
    let r = router(&["--prefill", &p.url, "--decode", &d.url]).await;
    for body in [
        json!({"prompt": "hi", "max_tokens": 2, "prompt_logprobs": 1}),
        json!({"prompt": "hi", "max_tokens": 2, "echo": true, "logprobs": 1}),
        json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "prompt_logprobs": 0}),
    ] {
        let path = if body.get("messages").is_some() { "/v1/chat/completions" } else { "/v1/completions" };
        let (status, err) = post(&format!("{}{path}", r.url), &body).await;
        assert_eq!(status, 400, "{body}: {err}");
        assert!(err["error"]["message"].as_str().unwrap().contains("prompt logprobs"), "{err}");
    }
    assert_eq!(served(&p.url).await, 0.0, "no prefill ran");
    // echo alone, and logprobs of the output, are answered.
    let (status, v) = post(&format!("{}/v1/completions", r.url), &json!({"prompt": "hi", "max_tokens": 2, "echo": true})).await;
    assert_eq!(status, 200, "{v}");
    let c = router(&["--worker-urls", &p.url]).await;
    let (status, v) = post(&format!("{}/v1/completions", c.url), &json!({"prompt": "hi", "max_tokens": 2, "prompt_logprobs": 1})).await;
    assert_ne!(status, 400, "colocated: the worker decides: {v}");
}
