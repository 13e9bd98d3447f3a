//! A bounded soak of `disagg route` in front of simulated engines with random faults:
//! prefill and decode 5xx, a decode that hangs mid-stream, a decode killed (-9) and
//! restarted on its port, clients that leave at random moments and clients that send
//! their bodies slowly. Every request must end correct or with a clear error; afterwards,
//! once the KV lease has passed, no engine holds a KV block, the router is idle, and its
//! RSS stays under a stated bound. DISAGG_SOAK_SECS sets the length (default 60 s).

#[path = "it/support.rs"]
mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;

use support::*;

/// The router's resident memory must stay under this at the end of the soak.
const RSS_BOUND_MIB: u64 = 200;
const LEASE_SECS: &str = "3";

#[derive(Default)]
struct Totals {
    sent: AtomicU64,
    correct: AtomicU64,
    clear_errors: AtomicU64,
    left: AtomicU64,
    slow: AtomicU64,
}

fn body_for(rng: &mut impl Rng) -> (&'static str, Value) {
    let prompt = format!("soak prompt {} with some words", rng.random_range(0..40));
    let max_tokens = rng.random_range(1..30);
    match rng.random_range(0..10) {
        0 => (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "ignore_eos": true}),
        ),
        1 => ("/v1/completions", json!({"prompt": [prompt, "second soak prompt"], "max_tokens": max_tokens, "ignore_eos": true})),
        2 => (
            "/v1/completions",
            json!({"prompt": prompt, "n": 2, "seed": 3, "temperature": 0.7, "max_tokens": max_tokens, "ignore_eos": true}),
        ),
        _ => ("/v1/completions", json!({"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": true})),
    }
}

fn strip(mut v: Value) -> Value {
    if let Some(m) = v.as_object_mut() {
        for k in ["id", "created"] {
            m.remove(k);
        }
    }
    v
}

fn texts(v: &Value) -> Vec<String> {
    v["choices"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| c["text"].as_str().or_else(|| c["message"]["content"].as_str()).unwrap_or("").to_string())
        .collect()
}

/// What a colocated engine answers (the reference every routed answer must equal).
struct Reference {
    url: String,
    cache: Mutex<HashMap<String, Value>>,
}

impl Reference {
    async fn answer(&self, path: &str, body: &Value) -> Value {
        let key = format!("{path}{body}");
        if let Some(v) = self.cache.lock().unwrap().get(&key) {
            return v.clone();
        }
        let (status, v) = post(&format!("{}{path}", self.url), body).await;
        assert_eq!(status, 200, "the reference failed: {v}");
        self.cache.lock().unwrap().insert(key, v.clone());
        v
    }
}

fn is_clear_error(status: u16, v: &Value) -> bool {
    status >= 400 && v["error"]["message"].is_string() && v["error"]["code"].as_u64() == Some(u64::from(status))
}

async fn one_request(router: &str, reference: &Reference, totals: &Totals, rng_seed: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(rng_seed);
    let (path, body) = body_for(&mut rng);
    let stream = rng.random_bool(0.5);
    let leave_after = rng.random_bool(0.08).then(|| Duration::from_millis(rng.random_range(0..300)));
    let slow = rng.random_bool(0.03);
    totals.sent.fetch_add(1, Ordering::Relaxed);
    let want = reference.answer(path, &body).await;
    let url = format!("{router}{path}");
    if let Some(after) = leave_after {
        let mut b = body.clone();
        b["stream"] = json!(stream);
        let _ = tokio::time::timeout(after, async {
            if let Ok(mut r) = client().post(&url).json(&b).send().await {
                while let Ok(Some(_)) = r.chunk().await {}
            }
        })
        .await;
        totals.left.fetch_add(1, Ordering::Relaxed);
        return;
    }
    if slow {
        // The body arrives in pieces over ~1 s (under --body-read-timeout-secs).
        let raw = serde_json::to_vec(&body).unwrap();
        let mut sock = tokio::net::TcpStream::connect(addr_of(router)).await.unwrap();
        let head = format!(
            "POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            raw.len()
        );
        sock.write_all(head.as_bytes()).await.unwrap();
        for piece in raw.chunks(raw.len().div_ceil(5)) {
            tokio::time::sleep(Duration::from_millis(200)).await;
            sock.write_all(piece).await.unwrap();
        }
        let (text, _) = read_until_closed(&mut sock, Duration::from_secs(30)).await;
        let body_text = text.split("\r\n\r\n").nth(1).unwrap_or("");
        let status: u16 = text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        // A chunked body: the JSON is the one line that parses.
        let v = body_text.lines().find_map(|l| serde_json::from_str::<Value>(l).ok().filter(Value::is_object)).unwrap_or(Value::Null);
        totals.slow.fetch_add(1, Ordering::Relaxed);
        if status == 200 && strip(v.clone()) == strip(want.clone()) {
            totals.correct.fetch_add(1, Ordering::Relaxed);
        } else {
            assert!(is_clear_error(status, &v), "slow client got {status}: {text}\nwanted {}", strip(want.clone()));
            totals.clear_errors.fetch_add(1, Ordering::Relaxed);
        }
        return;
    }
    if stream {
        let mut b = body.clone();
        b["stream"] = json!(true);
        let resp = client().post(&url).json(&b).send().await.unwrap();
        let status = resp.status().as_u16();
        if status != 200 {
            let v: Value = resp.json().await.unwrap_or(Value::Null);
            assert!(is_clear_error(status, &v), "{status}: {v}");
            totals.clear_errors.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let events = rest_of(resp, Vec::new()).await;
        assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "a stream ended without [DONE]: {events:?}");
        if let Some(err) = events.iter().find(|e| e.contains("\"error\"")) {
            let v: Value = serde_json::from_str(err).unwrap();
            assert!(v["error"]["message"].is_string(), "{err}");
            totals.clear_errors.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let mut by_index: Vec<String> = vec![String::new(); texts(&want).len()];
        for e in events.iter().filter(|e| e.as_str() != "[DONE]") {
            let v: Value = serde_json::from_str(e).unwrap();
            for c in v["choices"].as_array().into_iter().flatten() {
                let i = c["index"].as_u64().unwrap() as usize;
                by_index[i].push_str(c["text"].as_str().or_else(|| c["delta"]["content"].as_str()).unwrap_or(""));
            }
        }
        assert_eq!(by_index, texts(&want), "a streamed answer differs from the colocated one: {b}");
        totals.correct.fetch_add(1, Ordering::Relaxed);
    } else {
        let (status, v) = post(&url, &body).await;
        if status == 200 {
            assert_eq!(strip(v), strip(want), "an answer differs from the colocated one: {body}");
            totals.correct.fetch_add(1, Ordering::Relaxed);
        } else {
            assert!(is_clear_error(status, &v), "{status}: {v}");
            totals.clear_errors.fetch_add(1, Ordering::Relaxed);
        }
    }
}

use rand::SeedableRng;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_with_random_faults() {
    let secs: u64 = std::env::var("DISAGG_SOAK_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(60);
    let lease = ["--kv-lease-secs", LEASE_SECS];
    let p1 = Proc::sim(&[&["--role", "prefill", "--fail-rate", "0.03", "--decode-ms-per-token", "2"][..], &lease].concat()).await;
    let p2 = Proc::sim(&[&["--role", "prefill", "--prefill-ms-per-1k-tokens", "20"][..], &lease].concat()).await;
    let d1 = Proc::sim(&[&["--role", "decode", "--fail-rate", "0.03", "--decode-ms-per-token", "3"][..], &lease].concat()).await;
    let d_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port().to_string();
    let restartable = |port: String| async move {
        Proc::start(&["sim", "--port", &port, "--role", "decode", "--decode-ms-per-token", "2", "--kv-lease-secs", LEASE_SECS]).await
    };
    let d2 = Arc::new(tokio::sync::Mutex::new(restartable(d_port.clone()).await));
    let d2_url = d2.lock().await.url.clone();
    let d3 = Proc::sim(&[&["--role", "decode", "--hang-after-tokens", "5"][..], &lease].concat()).await;
    let plain = Proc::sim(&[]).await;
    let r = router(&[
        "--prefill",
        &p1.url,
        "--prefill",
        &p2.url,
        "--decode",
        &d1.url,
        "--decode",
        &d2_url,
        "--decode",
        &d3.url,
        "--policy",
        "power_of_two",
        "--prefill-timeout-secs",
        "3",
        "--decode-first-byte-timeout-secs",
        "3",
        "--request-timeout-secs",
        "6",
        "--stream-idle-timeout-secs",
        "1",
        "--cb-timeout-duration-secs",
        "2",
        "--health-check-interval-secs",
        "0.5",
        "--body-read-timeout-secs",
        "3",
        "--retry-budget-min-per-sec",
        "50",
    ])
    .await;
    let reference = Arc::new(Reference { url: plain.url.clone(), cache: Mutex::new(HashMap::new()) });
    let totals = Arc::new(Totals::default());
    let end = Instant::now() + Duration::from_secs(secs);
    let killer = {
        let d2 = d2.clone();
        let port = d_port.clone();
        tokio::spawn(async move {
            while Instant::now() + Duration::from_secs(12) < end {
                tokio::time::sleep(Duration::from_secs(6)).await;
                let mut d = d2.lock().await;
                d.signal(libc::SIGKILL);
                d.wait_exit(Duration::from_secs(5)).await;
                tokio::time::sleep(Duration::from_secs(2)).await;
                *d = restartable(port.clone()).await;
            }
        })
    };
    let clients: Vec<_> = (0..24u64)
        .map(|c| {
            let (url, reference, totals) = (r.url.clone(), reference.clone(), totals.clone());
            tokio::spawn(async move {
                let mut k = 0u64;
                while Instant::now() < end {
                    one_request(&url, &reference, &totals, c * 1_000_003 + k).await;
                    k += 1;
                }
            })
        })
        .collect();
    for c in clients {
        c.await.expect("a client's checks failed");
    }
    killer.abort();
    let t = |a: &AtomicU64| a.load(Ordering::Relaxed);
    println!(
        "soak {secs}s: {} requests: {} correct, {} clear errors, {} clients left early, {} slow bodies",
        t(&totals.sent),
        t(&totals.correct),
        t(&totals.clear_errors),
        t(&totals.left),
        t(&totals.slow)
    );
    assert_eq!(t(&totals.sent), t(&totals.correct) + t(&totals.clear_errors) + t(&totals.left));
    assert!(t(&totals.correct) > t(&totals.sent) / 2, "most requests are answered");
    // After the KV lease, nothing is held anywhere, and the router is idle.
    tokio::time::sleep(Duration::from_secs(LEASE_SECS.parse::<u64>().unwrap() + 1)).await;
    let d2_url = d2.lock().await.url.clone();
    for url in [&p1.url, &p2.url, &d1.url, &d2_url, &d3.url] {
        let held = eventually(Duration::from_secs(10), || async {
            let m = metrics(url).await;
            metric(&m, "disagg_sim_kv_blocks_held", &[]) == 0.0 && metric(&m, "vllm:num_requests_running", &[]) == 0.0
        })
        .await;
        assert!(held, "{url} still holds KV or runs requests:\n{}", metrics(url).await);
    }
    assert_idle(&r.url).await;
    let rss = proc_status_kib(r.pid().unwrap(), "VmRSS") / 1024;
    let peak = proc_status_kib(r.pid().unwrap(), "VmHWM") / 1024;
    let expired: f64 = futures_util::future::join_all(
        [&p1.url, &p2.url].map(|u| async move { metric(&metrics(u).await, "disagg_sim_kv_leases_expired_total", &[]) }),
    )
    .await
    .iter()
    .sum();
    println!("router RSS {rss} MiB (peak {peak} MiB, bound {RSS_BOUND_MIB} MiB); prefill KV released by lease expiry: {expired} times");
    assert!(rss < RSS_BOUND_MIB, "router RSS {rss} MiB");
}
