//! The hardening findings, one test each (finding 3 is in router_faults.rs): hostile or
//! careless clients, slow clients, hung workers, shutdown. Every test ends with the router
//! idle.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::capture::Capture;
use crate::support::*;

/// A loopback listener that counts the connections it gets.
async fn listener() -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let h = hits.clone();
    tokio::spawn(async move {
        while let Ok((_s, _)) = l.accept().await {
            h.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    });
    (port, hits)
}

/// Finding 1: a client's `kv_transfer_params` (or one in `vllm_xargs`) never reaches a
/// worker, so no client chooses where a decode opens its KV side channel.
#[tokio::test]
async fn a_client_cannot_point_the_decode_at_any_host() {
    let (purl, prefill) = Capture { no_params: true, ..Capture::default() }.start().await;
    let d = Proc::sim(&["--role", "decode", "--kv-load-timeout-ms", "500"]).await;
    let (durl, decode) = Capture::default().start().await;
    let (port, hits) = listener().await;
    let evil = json!({"do_remote_prefill": true, "do_remote_decode": false, "remote_engine_id": "e", "remote_block_ids": [[1, 2]],
        "remote_request_id": "other", "remote_host": "127.0.0.1", "remote_port": port});
    let r = router(&["--prefill", &purl, "--decode", &d.url]).await;
    for body in [
        json!({"prompt": "steer", "max_tokens": 3, "kv_transfer_params": evil}),
        json!({"prompt": "steer", "max_tokens": 3, "vllm_xargs": {"kv_transfer_params": "x"}}),
        json!({"prompt": "steer", "max_tokens": 3, "ec_transfer_params": {"x": 1}, "kv_transfer_params": evil}),
    ] {
        let (status, v) = post(&format!("{}/v1/completions", r.url), &body).await;
        assert_eq!(status, 200, "{v}");
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 0, "the decode connected where the client said");
    let m = metrics(&d.url).await;
    assert_eq!(metric(&m, "vllm:prompt_tokens_by_source_total", &[("source", "external_kv_transfer")]), 0.0);
    assert_eq!(metric(&m, "disagg_sim_kv_load_failures_total", &[]), 0.0);
    assert!(prefill.requests("/v1/completions").iter().all(|s| !String::from_utf8_lossy(&s.body).contains(&port.to_string())));
    // The exact bodies: no transfer params of the client's on either leg.
    let cap = router(&["--prefill", &purl, "--decode", &durl]).await;
    let (status, _) = post(
        &format!("{}/v1/completions", cap.url),
        &json!({"prompt": "p", "kv_transfer_params": evil, "vllm_xargs": {"kv_transfer_params": 1, "k": 2}}),
    )
    .await;
    assert_eq!(status, 200);
    let leg: Value = serde_json::from_slice(&decode.requests("/v1/completions")[0].body).unwrap();
    assert!(leg.get("kv_transfer_params").is_none(), "{leg}");
    assert_eq!(leg["vllm_xargs"], json!({"k": 2}));
    assert_idle(&r.url).await;
    assert_idle(&cap.url).await;
}

/// Finding 2: fields the decode rejects (the prefill leg overrides them) are refused
/// before any prefill runs, with vLLM's own answers.
#[tokio::test]
async fn decode_only_fields_are_refused_before_any_prefill() {
    let p = Proc::sim(&["--role", "prefill"]).await;
    let d = Proc::sim(&["--role", "decode"]).await;
    let plain = Proc::sim(&[]).await;
    let r = router(&["--prefill", &p.url, "--decode", &d.url]).await;
    let bodies = [
        json!({"prompt": "x", "max_tokens": 0}),
        json!({"prompt": "x", "max_tokens": -1}),
        json!({"prompt": "x", "max_tokens": "abc"}),
        json!({"prompt": "x", "max_tokens": 2.5}),
        json!({"prompt": "x", "max_tokens": 2, "min_tokens": 5}),
        json!({"prompt": "x", "min_tokens": -1}),
        json!({"prompt": "x", "stream": "abc"}),
        json!({"prompt": "x", "stream_options": {"include_usage": true}}),
        json!({"prompt": "x", "stream": true, "stream_options": 5}),
        json!({"prompt": "x", "n": 0}),
        json!({"prompt": "x", "n": 2, "temperature": 0}),
        json!({"prompt": "x", "kv_transfer_params": 5}),
    ];
    for b in &bodies {
        let want = post(&format!("{}/v1/completions", plain.url), b).await;
        let got = post(&format!("{}/v1/completions", r.url), b).await;
        assert_eq!(got, want, "{b}");
        assert_eq!(got.0, 400, "{b}");
    }
    let chat = json!({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0, "max_tokens": 5});
    assert_eq!(
        post(&format!("{}/v1/chat/completions", r.url), &chat).await,
        post(&format!("{}/v1/chat/completions", plain.url), &chat).await
    );
    assert_eq!(metric(&metrics(&p.url).await, "vllm:prompt_tokens_total", &[]), 0.0, "no prefill ran");
    assert_eq!(metric(&metrics(&p.url).await, "disagg_sim_kv_blocks_held", &[]), 0.0);
    assert_idle(&r.url).await;
}

/// Finding 4: a slow body holds no admission permit (it is read first, within
/// --body-read-timeout-secs); slow heads and idle connections are closed; the number of
/// connections is capped.
#[tokio::test]
async fn slow_clients_hold_no_permit_and_idle_connections_close() {
    let p = Proc::sim(&["--role", "prefill"]).await;
    let d = Proc::sim(&["--role", "decode"]).await;
    let r = router(&[
        "--prefill",
        &p.url,
        "--decode",
        &d.url,
        "--max-concurrent-requests",
        "2",
        "--queue-size",
        "0",
        "--body-read-timeout-secs",
        "2",
        "--header-read-timeout-secs",
        "1",
        "--keep-alive-timeout-secs",
        "1",
    ])
    .await;
    let addr = addr_of(&r.url);
    let mut slow = Vec::new();
    for _ in 0..4 {
        let mut s = TcpStream::connect(&addr).await.unwrap();
        s.write_all(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{")
            .await
            .unwrap();
        slow.push(s);
    }
    let drip = async {
        for _ in 0..4 {
            tokio::time::sleep(Duration::from_millis(300)).await;
            for s in &mut slow {
                let _ = s.write_all(b" ").await;
            }
        }
    };
    let others = async {
        for i in 0..6 {
            let (status, v) = post(&format!("{}/v1/completions", r.url), &json!({"prompt": format!("fast {i}"), "max_tokens": 2})).await;
            assert_eq!(status, 200, "a fast client is served while slow bodies trickle: {v}");
        }
        assert_eq!(workers(&r.url).await["permits_in_use"], 0, "the slow bodies hold no permit");
    };
    tokio::join!(drip, others);
    for s in &mut slow {
        let (text, closed) = read_until_closed(s, Duration::from_secs(5)).await;
        assert!(text.starts_with("HTTP/1.1 408"), "{text}");
        assert!(text.contains("--body-read-timeout-secs"), "{text}");
        assert!(closed || text.contains("408"));
    }
    // A head sent one byte at a time is cut off; idle connections are closed.
    let mut loris = TcpStream::connect(&addr).await.unwrap();
    let t = Instant::now();
    let dripping = async {
        for b in b"POST /v1/completions HTTP/1.1\r\nhost: x\r\nx-pad: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa" {
            if loris.write_all(&[*b]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(6), dripping).await.ok();
    let (_, closed) = read_until_closed(&mut loris, Duration::from_secs(1)).await;
    assert!(closed && t.elapsed() < Duration::from_secs(5), "slow head not cut: {:?}", t.elapsed());
    let mut idle = Vec::new();
    for _ in 0..20 {
        idle.push(TcpStream::connect(&addr).await.unwrap());
    }
    for s in &mut idle {
        assert!(read_until_closed(s, Duration::from_secs(4)).await.1, "an idle connection stayed open");
    }
    assert_idle(&r.url).await;

    // At most --max-connections at once: the next one waits until one closes.
    let capped = router(&["--prefill", &p.url, "--decode", &d.url, "--max-connections", "2", "--keep-alive-timeout-secs", "30"]).await;
    let caddr = addr_of(&capped.url);
    let mut held = vec![TcpStream::connect(&caddr).await.unwrap(), TcpStream::connect(&caddr).await.unwrap()];
    tokio::time::sleep(Duration::from_millis(200)).await;
    let url = format!("{}/v1/completions", capped.url);
    let waiting = tokio::spawn(async move { post(&url, &json!({"prompt": "third", "max_tokens": 2})).await.0 });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!waiting.is_finished(), "a third connection was served past --max-connections 2");
    held.pop();
    assert_eq!(tokio::time::timeout(Duration::from_secs(5), waiting).await.unwrap().unwrap(), 200);
}

/// Finding 5: cache_aware indexes a bounded prefix of each prompt, so huge prompts cost
/// bounded index memory, and nothing proportional to the prompt is done under its lock.
#[tokio::test]
async fn cache_aware_memory_is_bounded_by_construction() {
    let p = Proc::sim(&["--role", "prefill", "--max-model-len", "100000000", "--kv-blocks", "8000000"]).await;
    let d = Proc::sim(&["--role", "decode", "--max-model-len", "100000000", "--kv-blocks", "8000000"]).await;
    let r = router(&[
        "--prefill",
        &p.url,
        "--decode",
        &d.url,
        "--policy",
        "cache_aware",
        "--cache-aware-max-prefix",
        "256",
        "--max-payload-size",
        "67108864",
    ])
    .await;
    let big: String = (0..1_500_000).map(|i| format!("w{} ", i % 997)).collect();
    let url = format!("{}/v1/completions", r.url);
    let bigs = (0..2).map(|k| {
        let url = url.clone();
        let prompt = format!("{k} {big}");
        tokio::spawn(async move { post(&url, &json!({"prompt": prompt, "max_tokens": 1})).await.0 })
    });
    let small = async {
        for i in 0..5 {
            assert_eq!(post(&url, &json!({"prompt": format!("small {i}"), "max_tokens": 2})).await.0, 200);
        }
    };
    let (statuses, ()) = tokio::join!(futures_util::future::join_all(bigs), small);
    assert!(statuses.into_iter().all(|s| s.unwrap() == 200));
    let entries = workers(&r.url).await["prefix_index_entries"].clone();
    let per_prompt = 256 / 16;
    for role in ["prefill", "decode"] {
        assert!(entries[role].as_u64().unwrap() <= 7 * per_prompt, "{role}: {entries}");
    }
    let pid = r.pid().unwrap();
    let peak_mib = proc_status_kib(pid, "VmHWM") / 1024;
    println!("router peak RSS with two {} MB prompts in flight: {peak_mib} MiB", big.len() >> 20);
    assert!(peak_mib < 1024, "peak RSS {peak_mib} MiB");
    assert_idle(&r.url).await;
}

/// Finding 6: a worker that passes /health but hangs is ejected by its circuit breaker,
/// probed when the open period ends, and ejected again while it stays hung.
#[tokio::test]
async fn a_hung_worker_is_ejected_and_probed() {
    let p = Proc::sim(&["--role", "prefill"]).await;
    let hung = Proc::sim(&["--role", "decode", "--hang-after-tokens", "0"]).await;
    let good = Proc::sim(&["--role", "decode"]).await;
    let r = router(&[
        "--prefill",
        &p.url,
        "--decode",
        &hung.url,
        "--decode",
        &good.url,
        "--policy",
        "round_robin",
        "--decode-first-byte-timeout-secs",
        "0.4",
        "--request-timeout-secs",
        "0.4",
        "--cb-failure-threshold",
        "2",
        "--cb-timeout-duration-secs",
        "2",
    ])
    .await;
    let url = format!("{}/v1/completions", r.url);
    let send = |i: usize| {
        let url = url.clone();
        async move { post(&url, &json!({"prompt": format!("h{i}"), "max_tokens": 2, "stream": i % 2 == 0})).await.0 }
    };
    for i in 0..4 {
        assert_eq!(send(i).await, 200);
    }
    let circuit = |w: Value| w["workers"][1]["circuit"].as_str().unwrap().to_string();
    assert_eq!(circuit(workers(&r.url).await), "open");
    let timeouts = metric(&metrics(&r.url).await, "disagg_router_leg_errors_total", &[("leg", "decode"), ("kind", "timeout")]);
    assert_eq!(timeouts, 2.0);
    let t = Instant::now();
    for i in 4..14 {
        assert_eq!(send(i).await, 200);
    }
    assert!(t.elapsed() < Duration::from_secs(2), "an ejected worker gets no requests: {:?}", t.elapsed());
    assert_eq!(metric(&metrics(&r.url).await, "disagg_router_leg_errors_total", &[("leg", "decode"), ("kind", "timeout")]), 2.0);
    let m = metrics(&r.url).await;
    assert_eq!(metric(&m, "disagg_router_worker_circuit_state", &[("worker", &hung.url)]), 2.0);
    // After the open period one probe goes to it, fails, and the circuit opens again.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(circuit(workers(&r.url).await), "half_open");
    for i in 14..18 {
        assert_eq!(send(i).await, 200);
    }
    assert_eq!(circuit(workers(&r.url).await), "open");
    assert_eq!(metric(&metrics(&r.url).await, "disagg_router_worker_circuit_openings", &[("worker", &hung.url)]), 2.0);
    assert_idle(&r.url).await;
}

/// Finding 7: SIGTERM drains: /health is 503 at once, new requests get 503, requests in
/// flight finish, and streams still open when the grace ends get an error event and
/// `[DONE]`, never a silent cut.
#[tokio::test]
async fn sigterm_drains_and_never_cuts_a_stream_silently() {
    let p = Proc::sim(&["--role", "prefill"]).await;
    let d = Proc::sim(&["--role", "decode", "--decode-ms-per-token", "50"]).await;
    let mut r = router(&["--prefill", &p.url, "--decode", &d.url, "--shutdown-timeout-secs", "1.5"]).await;
    let url = format!("{}/v1/completions", r.url);
    let (long, first) = open_stream(&url, &json!({"prompt": "long", "max_tokens": 1000, "ignore_eos": true, "stream": true})).await;
    let short_url = url.clone();
    let short = tokio::spawn(async move { post(&short_url, &json!({"prompt": "short", "max_tokens": 10, "ignore_eos": true})).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    r.signal(libc::SIGTERM);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(get(&format!("{}/health", r.url)).await.0, 503);
    let (status, v) = post(&url, &json!({"prompt": "late", "max_tokens": 2})).await;
    assert_eq!(status, 503, "{v}");
    assert_eq!(v["error"]["code"], 503);
    let (status, v) = short.await.unwrap();
    assert_eq!(status, 200, "a request in flight finishes: {v}");
    let events = rest_of(long, first).await;
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{events:?}");
    let err: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert!(err["error"]["message"].as_str().unwrap().contains("shutting down"), "{err}");
    let status = r.wait_exit(Duration::from_secs(10)).await.expect("the router exits after the drain");
    assert!(status.success(), "{status}");
    // The decode saw its stream dropped.
    assert!(eventually(Duration::from_secs(5), || async { metric(&metrics(&d.url).await, "vllm:num_requests_running", &[]) == 0.0 }).await);
}

/// Finding 8: client keys guard the generation and model endpoints, the admin key guards
/// /workers and /metrics, and a client's key is not passed to workers when the router has
/// its own.
#[tokio::test]
async fn client_admin_and_worker_keys_are_separate() {
    let (purl, prefill) = Capture::default().start().await;
    let (durl, _) = Capture::default().start().await;
    let dir = std::env::temp_dir().join(format!("disagg-keys-{}", std::process::id()));
    std::fs::write(&dir, "# client keys\nfile-key\n\n").unwrap();
    let r = router_with_env(
        &[
            "--prefill",
            &purl,
            "--decode",
            &durl,
            "--client-api-key",
            "flag-key",
            "--client-api-key-file",
            dir.to_str().unwrap(),
            "--admin-api-key",
            "adm",
            "--api-key",
            "worker-key",
        ],
        &[("DISAGG_CLIENT_API_KEYS", "env-key, other")],
    )
    .await;
    let url = format!("{}/v1/completions", r.url);
    let body = json!({"prompt": "k", "max_tokens": 2});
    let resp = client().post(&url).json(&body).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 401);
    assert_eq!(resp.headers()["www-authenticate"], "Bearer");
    let v: Value = resp.json().await.unwrap();
    assert_eq!((v["error"]["type"].as_str(), v["error"]["code"].as_u64()), (Some("AuthenticationError"), Some(401)), "{v}");
    assert_eq!(post_with(&url, &body, &[("Authorization", "Bearer nope")]).await.0, 401);
    for key in ["flag-key", "file-key", "env-key", "other"] {
        assert_eq!(post_with(&url, &body, &[("Authorization", &format!("Bearer {key}"))]).await.0, 200, "{key}");
    }
    assert!(
        prefill.requests("/v1/completions").iter().all(|s| s.headers["authorization"] == "Bearer worker-key"),
        "the client's key stays with the router"
    );
    assert_eq!(get(&format!("{}/v1/models", r.url)).await.0, 401);
    assert_eq!(get(&format!("{}/health", r.url)).await.0, 200);
    for path in ["/workers", "/metrics"] {
        assert_eq!(get(&format!("{}{path}", r.url)).await.0, 401, "{path}");
        let ok = client().get(format!("{}{path}", r.url)).bearer_auth("adm").send().await.unwrap();
        assert_eq!(ok.status().as_u16(), 200, "{path}");
    }
    let _ = std::fs::remove_file(dir);
}

/// Finding 9: error bodies name the leg and the cause class, never a worker address or an
/// upstream error text.
#[tokio::test]
async fn error_bodies_name_no_internal_address() {
    let bad = Proc::sim(&["--role", "prefill", "--fail-rate", "1"]).await;
    let d = Proc::sim(&["--role", "decode"]).await;
    let dead = free_port();
    let r = router(&["--prefill", &bad.url, "--decode", &d.url, "--health-check-interval-secs", "60"]).await;
    let r2 = router_unready(&["--prefill", &format!("http://127.0.0.1:{dead}"), "--decode", &d.url]).await;
    for (u, body) in [(&r.url, json!({"prompt": "e", "max_tokens": 2})), (&r2.url, json!({"prompt": "e", "max_tokens": 2}))] {
        let resp = client().post(format!("{u}/v1/completions")).json(&body).send().await.unwrap();
        let text = resp.text().await.unwrap();
        assert!(!text.contains("127.0.0.1") && !text.contains("simulated failure") && !text.contains("error sending"), "{text}");
        assert!(text.contains("\"error\""), "{text}");
    }
    let (_, models) = get(&format!("{}/v1/models", r2.url)).await;
    assert!(!models.contains("127.0.0.1"), "{models}");
}

/// Finding 10: a body that is not declared JSON gets vLLM's 400, and reaches no worker.
#[tokio::test]
async fn non_json_content_types_get_vllms_400() {
    let (purl, prefill) = Capture::default().start().await;
    let (durl, _) = Capture::default().start().await;
    let r = router(&["--prefill", &purl, "--decode", &durl]).await;
    let url = format!("{}/v1/completions", r.url);
    let body = r#"{"prompt": "ct", "max_tokens": 2}"#;
    for ct in [Some("text/plain"), Some("application/x-www-form-urlencoded"), None] {
        let mut req = client().post(&url).body(body);
        if let Some(ct) = ct {
            req = req.header("content-type", ct);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status().as_u16(), 400, "{ct:?}");
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["error"]["message"], "1 validation error:\n  Unsupported Media Type: Only 'application/json' is allowed");
    }
    assert!(prefill.requests("/v1/completions").is_empty());
    let ok = client().post(&url).header("content-type", "Application/JSON; charset=utf-8").body(body).send().await.unwrap();
    assert_eq!(ok.status().as_u16(), 200);
}

fn without_ids(mut v: Value) -> Value {
    for k in ["id", "created"] {
        v.as_object_mut().unwrap().remove(k);
    }
    v
}

/// Streamed choices' text by index.
fn texts_by_index(events: &[String]) -> std::collections::BTreeMap<u64, String> {
    let mut out = std::collections::BTreeMap::new();
    for e in events.iter().filter(|e| e.as_str() != "[DONE]") {
        let v: Value = serde_json::from_str(e).unwrap();
        for c in v["choices"].as_array().unwrap() {
            let text = c["text"].as_str().or_else(|| c["delta"]["content"].as_str()).unwrap_or("");
            out.entry(c["index"].as_u64().unwrap()).or_insert_with(String::new).push_str(text);
        }
    }
    out
}

/// Findings 11 and 12: a list of prompts, and `n` choices, are one pair per prompt and per
/// choice, merged into the answer a colocated engine gives; no KV is read twice or left.
#[tokio::test]
async fn prompt_lists_and_n_choices_are_one_pair_each() {
    let p = Proc::sim(&["--role", "prefill", "--block-size", "4"]).await;
    let d = Proc::sim(&["--role", "decode", "--block-size", "4", "--die-on-kv-mismatch"]).await;
    let plain = Proc::sim(&["--block-size", "4"]).await;
    let r = router(&["--prefill", &p.url, "--decode", &d.url]).await;
    let bodies = [
        json!({"prompt": ["short one", "a much longer second prompt with many more words in it"], "max_tokens": 6, "ignore_eos": true}),
        json!({"prompt": [[5, 6, 7, 8, 9], [10, 11]], "max_tokens": 4, "ignore_eos": true}),
        json!({"prompt": "choices", "n": 3, "seed": 11, "temperature": 0.8, "max_tokens": 5, "ignore_eos": true}),
        json!({"prompt": ["x y", "z"], "n": 2, "seed": 1, "temperature": 1.0, "max_tokens": 3, "ignore_eos": true}),
    ];
    for b in &bodies {
        let (s1, want) = post(&format!("{}/v1/completions", plain.url), b).await;
        let (s2, got) = post(&format!("{}/v1/completions", r.url), b).await;
        assert_eq!((s1, s2), (200, 200), "{got}");
        assert_eq!(without_ids(got.clone()), without_ids(want), "{b}");
        assert!(got["id"].as_str().unwrap().starts_with("cmpl-") && !got["id"].as_str().unwrap().ends_with("-0"));
        let mut sb = b.clone();
        sb["stream"] = json!(true);
        sb["stream_options"] = json!({"include_usage": true});
        let (_, want_events) = post_stream(&format!("{}/v1/completions", plain.url), &sb).await;
        let (_, got_events) = post_stream(&format!("{}/v1/completions", r.url), &sb).await;
        assert_eq!(texts_by_index(&got_events), texts_by_index(&want_events), "{sb}");
        let usage = |e: &[String]| serde_json::from_str::<Value>(&e[e.len() - 2]).unwrap()["usage"].clone();
        assert_eq!(usage(&got_events), usage(&want_events));
        assert_eq!(got_events.iter().filter(|e| e.as_str() == "[DONE]").count(), 1);
    }
    let chat = json!({"messages": [{"role": "user", "content": "hi"}], "n": 2, "seed": 4, "temperature": 0.9, "max_tokens": 4});
    let (_, want) = post(&format!("{}/v1/chat/completions", plain.url), &chat).await;
    let (_, got) = post(&format!("{}/v1/chat/completions", r.url), &chat).await;
    assert_eq!(without_ids(got), without_ids(want));
    let pm = metrics(&p.url).await;
    assert_eq!(metric(&pm, "disagg_sim_kv_stale_reads_total", &[]), 0.0, "no KV read twice");
    assert_eq!(metric(&pm, "disagg_sim_kv_blocks_held", &[]), 0.0, "no KV left");
    assert_eq!(get(&format!("{}/health", d.url)).await.0, 200, "the decode is alive");
    let too_many = json!({"prompt": "x", "n": 100, "temperature": 1});
    let (status, v) = post(&format!("{}/v1/completions", r.url), &too_many).await;
    assert_eq!(status, 400);
    assert!(v["error"]["message"].as_str().unwrap().contains("--max-pairs-per-request"), "{v}");
    assert_idle(&r.url).await;
}

/// Finding 13: a non-streamed request whose client leaves has its decode cancelled soon
/// after the decode took it, not run to its full length.
#[tokio::test]
async fn a_non_streamed_decode_stops_when_its_client_leaves() {
    let p = Proc::sim(&["--role", "prefill"]).await;
    let d = Proc::sim(&["--role", "decode", "--decode-ms-per-token", "20"]).await;
    let r = router(&["--prefill", &p.url, "--decode", &d.url]).await;
    let gone = reqwest::Client::builder().timeout(Duration::from_millis(300)).build().unwrap();
    let body = json!({"prompt": "abandon me", "max_tokens": 500, "ignore_eos": true});
    assert!(gone.post(format!("{}/v1/completions", r.url)).json(&body).send().await.is_err());
    let dropped = eventually(Duration::from_secs(4), || async {
        metric(&metrics(&r.url).await, "disagg_router_abandoned_decode_legs_total", &[]) == 1.0
    })
    .await;
    assert!(dropped, "the decode leg was not dropped");
    let stopped =
        eventually(Duration::from_secs(4), || async { metric(&metrics(&d.url).await, "vllm:num_requests_running", &[]) == 0.0 }).await;
    assert!(stopped, "the decode still runs the abandoned request");
    let generated = metric(&metrics(&d.url).await, "vllm:generation_tokens_total", &[]);
    assert!(generated < 250.0, "the decode generated {generated} of 500 tokens for nobody");
    assert!(generated > 0.0, "the decode had started");
    assert_eq!(metric(&metrics(&p.url).await, "disagg_sim_kv_blocks_held", &[]), 0.0);
    assert_idle(&r.url).await;
}

/// A connection to a worker idle for 4 s is not reused: vLLM closes idle connections
/// after 5 s (VLLM_HTTP_TIMEOUT_KEEP_ALIVE), and a leg sent on one it is closing at that
/// instant is lost. Back-to-back legs do reuse theirs.
#[tokio::test]
async fn worker_connections_idle_past_4_s_are_not_reused() {
    let (p_url, _p) = Capture::default().start().await;
    let (d_url, d) = Capture::default().start().await;
    let r = router(&["--prefill", &p_url, "--decode", &d_url]).await;
    // One client connection: its requests are served by one serving thread, one pool.
    let client = reqwest::Client::new();
    let url = format!("{}/v1/completions", r.url);
    let send = || async {
        let resp = client.post(&url).json(&json!({"prompt": "idle", "max_tokens": 2})).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        resp.bytes().await.unwrap();
    };
    send().await;
    send().await;
    tokio::time::sleep(Duration::from_millis(4500)).await;
    send().await;
    let peers: Vec<_> = d.requests("/v1/completions").iter().map(|s| s.peer).collect();
    assert_eq!(peers.len(), 3);
    assert_eq!(peers[0], peers[1], "back-to-back legs reuse their connection");
    assert_ne!(peers[1], peers[2], "a connection idle for 4.5 s is not reused");
}

/// By default an idle client connection outlives the 5 s that clients such as httpx (the
/// OpenAI SDK's) keep theirs, so the client closes first and never sends on a connection
/// the router is closing.
#[tokio::test]
async fn idle_client_connections_outlast_the_clients_keep_alive() {
    let p = Proc::sim(&["--role", "prefill"]).await;
    let d = Proc::sim(&["--role", "decode"]).await;
    let r = router(&["--prefill", &p.url, "--decode", &d.url]).await;
    let mut sock = TcpStream::connect(r.url.trim_start_matches("http://")).await.unwrap();
    for pause in [0, 6] {
        tokio::time::sleep(Duration::from_secs(pause)).await;
        sock.write_all(b"GET /health HTTP/1.1\r\nHost: router\r\n\r\n").await.unwrap();
        let (answer, closed) = read_until_closed(&mut sock, Duration::from_millis(500)).await;
        assert!(answer.starts_with("HTTP/1.1 200") && !closed, "after {pause} s idle: {answer:?} closed={closed}");
    }
}
