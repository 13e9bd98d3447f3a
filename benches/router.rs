//! The router's own cost, measured against the same two legs sent directly, in one run:
//!
//!   cargo bench --bench router            (DISAGG_BENCH_SECS=4 per point by default)
//!
//! Starts a simulated prefill and decode (`disagg sim`, no artificial delays: the fastest
//! backend this machine can run) and `disagg route` in front of them, all on loopback.
//! "direct" is a client doing the toy proxy's job itself (prefill leg, then decode leg);
//! "router" is the same client sending one request to the router. Reports latency at
//! concurrency 1 (p50/p99 and the router's added time), requests/s at concurrency 1, 64
//! and 1024 (and the router/direct ratio), and the router's RSS holding 10,000 open
//! streams (clients reach the router over HTTP/2, so the 20,000-descriptor limit of this
//! sandbox is not hit on the client side; the router talks HTTP/1 to the workers).

use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const BIN: &str = env!("CARGO_BIN_EXE_disagg");

struct Proc {
    child: Child,
    url: String,
}

async fn start(args: &[&str]) -> Proc {
    let mut child = Command::new(BIN)
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn disagg");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let banner = lines.next_line().await.unwrap().expect("banner");
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let url = banner.split_whitespace().find(|w| w.starts_with("http://")).unwrap().to_string();
    Proc { child, url }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:").map(|v| v.trim().trim_end_matches("kB").trim().parse().unwrap_or(0)))
        .unwrap_or(0)
}

fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    fields.get(11).and_then(|u| u.parse::<u64>().ok()).unwrap_or(0) + fields.get(12).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0)
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Direct,
    Router,
}

struct Target {
    client: reqwest::Client,
    prefill: String,
    decode: String,
    router: String,
}

fn body(i: u64) -> Value {
    json!({"model": "sim-model", "prompt": format!("benchmark request {i}: a short prompt of a few words"),
           "max_tokens": 8, "ignore_eos": true})
}

async fn ok(resp: reqwest::Result<reqwest::Response>) -> bool {
    match resp {
        Ok(r) if r.status().is_success() => r.bytes().await.is_ok(),
        _ => false,
    }
}

async fn one(t: &Target, mode: Mode, i: u64) -> bool {
    let b = body(i);
    match mode {
        Mode::Router => ok(t.client.post(&t.router).json(&b).send().await).await,
        Mode::Direct => {
            let mut p = b.clone();
            p["kv_transfer_params"] = json!({"do_remote_decode": true, "do_remote_prefill": false, "remote_engine_id": null,
                "remote_block_ids": null, "remote_host": null, "remote_port": null});
            p["max_tokens"] = json!(1);
            p["stream"] = json!(false);
            let Ok(resp) = t.client.post(&t.prefill).header("x-request-id", i.to_string()).json(&p).send().await else { return false };
            let Ok(v) = resp.json::<Value>().await else { return false };
            let mut d = b;
            d["kv_transfer_params"] = v["kv_transfer_params"].clone();
            ok(t.client.post(&t.decode).header("x-request-id", i.to_string()).json(&d).send().await).await
        }
    }
}

/// Runs `concurrency` loops for `secs`; returns (requests/s, latencies in ms, failures).
async fn load(t: &Arc<Target>, mode: Mode, concurrency: usize, secs: f64) -> (f64, Vec<f64>, u64) {
    let stop = Arc::new(AtomicBool::new(false));
    let counter = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let (t, stop, counter, failures) = (t.clone(), stop.clone(), counter.clone(), failures.clone());
            tokio::spawn(async move {
                let mut lat = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let i = counter.fetch_add(1, Ordering::Relaxed);
                    let t0 = Instant::now();
                    if one(&t, mode, i).await {
                        lat.push(t0.elapsed().as_secs_f64() * 1000.0);
                    } else {
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
                lat
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.unwrap());
    }
    let elapsed = start.elapsed().as_secs_f64();
    all.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (all.len() as f64 / elapsed, all, failures.load(Ordering::Relaxed))
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = p / 100.0 * (sorted.len() - 1) as f64;
    let (lo, hi) = (rank.floor() as usize, rank.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (rank - lo as f64)
}

async fn wait_healthy(url: &str) {
    let c = reqwest::Client::new();
    for _ in 0..200 {
        if matches!(c.get(format!("{url}/health")).send().await, Ok(r) if r.status().is_success()) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{url} never became healthy");
}

#[tokio::main]
async fn main() {
    let secs: f64 = std::env::var("DISAGG_BENCH_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(4.0);
    let prefill = start(&["sim", "--port", "0", "--role", "prefill", "--kv-blocks", "400000"]).await;
    let decode = start(&["sim", "--port", "0", "--role", "decode", "--kv-blocks", "400000", "--max-num-seqs", "4096"]).await;
    let router = start(&["route", "--port", "0", "--policy", "round_robin", "--max-concurrent-requests", "100000",
        "--prefill", &prefill.url, "--decode", &decode.url]).await;
    wait_healthy(&router.url).await;
    let client = reqwest::Client::builder().pool_max_idle_per_host(2048).tcp_nodelay(true).build().unwrap();
    let t = Arc::new(Target {
        client,
        prefill: format!("{}/v1/completions", prefill.url),
        decode: format!("{}/v1/completions", decode.url),
        router: format!("{}/v1/completions", router.url),
    });
    let rpid = router.child.id().unwrap();
    println!("disagg route benchmark: simulated prefill + decode on loopback, {secs} s per point, non-streamed, 8 output tokens");
    println!();
    // Warm up connections and allocators.
    load(&t, Mode::Direct, 8, 0.5).await;
    load(&t, Mode::Router, 8, 0.5).await;

    let mut rows = Vec::new();
    for conc in [1usize, 64, 1024] {
        let (d_rps, d_lat, d_fail) = load(&t, Mode::Direct, conc, secs).await;
        let cpu0 = cpu_ticks(rpid);
        let (r_rps, r_lat, r_fail) = load(&t, Mode::Router, conc, secs).await;
        let cpu = cpu_ticks(rpid) - cpu0;
        let ticks = 100.0; // USER_HZ
        let cpu_per_1k = cpu as f64 / ticks / (r_lat.len().max(1) as f64) * 1000.0;
        rows.push(json!({"concurrency": conc, "direct_rps": d_rps, "router_rps": r_rps, "ratio": r_rps / d_rps,
            "direct_p50_ms": pct(&d_lat, 50.0), "direct_p99_ms": pct(&d_lat, 99.0),
            "router_p50_ms": pct(&r_lat, 50.0), "router_p99_ms": pct(&r_lat, 99.0),
            "router_cpu_s_per_1k_requests": cpu_per_1k, "failures": d_fail + r_fail}));
    }
    println!("{:>11} {:>12} {:>12} {:>7} {:>10} {:>10} {:>10} {:>10} {:>14}", "concurrency", "direct req/s", "router req/s", "ratio",
        "direct p50", "router p50", "direct p99", "router p99", "router CPU/1k");
    for r in &rows {
        println!("{:>11} {:>12.0} {:>12.0} {:>7.2} {:>8.2}ms {:>8.2}ms {:>8.2}ms {:>8.2}ms {:>12.3}s",
            r["concurrency"], r["direct_rps"].as_f64().unwrap(), r["router_rps"].as_f64().unwrap(), r["ratio"].as_f64().unwrap(),
            r["direct_p50_ms"].as_f64().unwrap(), r["router_p50_ms"].as_f64().unwrap(), r["direct_p99_ms"].as_f64().unwrap(),
            r["router_p99_ms"].as_f64().unwrap(), r["router_cpu_s_per_1k_requests"].as_f64().unwrap());
        assert_eq!(r["failures"], 0, "failed requests at concurrency {}", r["concurrency"]);
    }
    let c1 = &rows[0];
    println!();
    println!("added latency at concurrency 1: p50 {:+.3} ms, p99 {:+.3} ms (router minus the same two legs sent directly)",
        c1["router_p50_ms"].as_f64().unwrap() - c1["direct_p50_ms"].as_f64().unwrap(),
        c1["router_p99_ms"].as_f64().unwrap() - c1["direct_p99_ms"].as_f64().unwrap());
    drop(router);
    drop(decode);

    let rss = open_streams(&prefill.url, 10_000).await;
    println!("router RSS: {} MiB idle, {} MiB holding {} open streams ({:.1} KiB per stream)",
        rss.0 / 1024, rss.1 / 1024, rss.2, (rss.1 as f64 - rss.0 as f64) / rss.2 as f64);
    let out = json!({"points": rows, "rss_idle_kib": rss.0, "rss_streams_kib": rss.1, "open_streams": rss.2});
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("bench-router.json");
    std::fs::write(&path, serde_json::to_string_pretty(&out).unwrap()).unwrap();
    println!("results: {}", path.display());
}

/// Opens `n` streams through a fresh router to a slow decode; returns the router's RSS
/// before and while holding them, and how many were open.
async fn open_streams(prefill: &str, n: usize) -> (u64, u64, usize) {
    let decode = start(&["sim", "--port", "0", "--role", "decode", "--kv-blocks", "2000000", "--max-num-seqs", "100000",
        "--decode-ms-per-token", "1000"]).await;
    let router = start(&["route", "--port", "0", "--max-concurrent-requests", "100000", "--prefill", prefill,
        "--decode", &decode.url]).await;
    wait_healthy(&router.url).await;
    let pid = router.child.id().unwrap();
    let idle = rss_kib(pid);
    // 200 streams per HTTP/2 connection.
    let clients: Vec<reqwest::Client> = (0..n.div_ceil(200))
        .map(|_| reqwest::Client::builder().http2_prior_knowledge().build().unwrap())
        .collect();
    let url = format!("{}/v1/completions", router.url);
    let opened = Arc::new(AtomicU64::new(0));
    let mut held = Vec::new();
    // Open in waves so the prefill legs stay a few hundred at a time.
    for wave in (0..n).collect::<Vec<_>>().chunks(500) {
        let starts: Vec<_> = wave
            .iter()
            .map(|i| {
                let (c, url, opened) = (clients[i / 200].clone(), url.clone(), opened.clone());
                let i = *i;
                tokio::spawn(async move {
                    let mut resp = c.post(url).json(&json!({"prompt": format!("s{i}"), "max_tokens": 60, "ignore_eos": true, "stream": true}))
                        .send().await.ok()?;
                    resp.chunk().await.ok()??;
                    opened.fetch_add(1, Ordering::Relaxed);
                    Some(resp)
                })
            })
            .collect();
        for s in starts {
            if let Some(resp) = s.await.unwrap() {
                held.push(resp);
            }
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let busy = rss_kib(pid);
    let open = opened.load(Ordering::Relaxed) as usize;
    drop(held);
    (idle, busy, open)
}
