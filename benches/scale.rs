//! The router at cluster scale, side by side with vllm-router 0.1.17 in the same run:
//!
//!   cargo bench --bench scale        (DISAGG_SCALE_POINTS=2,64,256,1024 workers,
//!                                     DISAGG_SCALE_RATE=20 requests/s, DISAGG_SCALE_SECS=20;
//!                                     DISAGG_SCALE_CHURN_SECS=60 for the churn runs, 0: none,
//!                                     DISAGG_SCALE_CHURN_BY=admin,discovery which of them,
//!                                     DISAGG_SCALE_CHURN_ROUNDS=1 measured rounds;
//!                                     DISAGG_SCALE_INTAKE=1024 workers for the intake run,
//!                                     0: none, DISAGG_SCALE_INTAKE_CHURN=32 blocks/s a rank;
//!                                     DISAGG_SCALE_REPLOT=FILE.json: only draw the plot, to
//!                                     DISAGG_SCALE_PLOT=PATH.svg|png;
//!                                     installs vllm-router with scripts/vllm-router-env.sh)
//!
//! Per point: N workers, half prefill and half decode, each a simulated engine with 8 DP
//! ranks publishing KV events (two `disagg sim --instances N/2` processes, no artificial
//! step time: what is measured is the routers and the legs), and in front of them in turn
//! `disagg route --policy kv_aware` and vllm-router with round_robin, cache_aware and
//! kv_aware (its `--pd-kv-events`). Each router: its idle CPU over 10 s (health checks, KV
//! intake, engine-load scrapes; % of one core), then a fixed open-loop rate of
//! shared-prefix prompts (`disagg bench`): its CPU per request (its CPU under load less its
//! idle rate over as long; the gross figure beside), the requests' p50/p99
//! end-to-end latency (the simulators answer in microseconds: the rest is the routers'
//! and the legs'), its RSS, and for disagg route the index's blocks, apply rate (blocks
//! over the time spent applying them, while serving) and KV event batches per second.
//! The simulators' own CPU is reported too: per engine idle, and per request under load.
//!
//! The intake run: KV events sustained while serving. The same workers and load, each rank
//! also turning its cache over with traffic the router does not see (`disagg sim
//! --kv-cache-churn`): the index's apply rate, the blocks a second received, the router's
//! idle CPU (now mostly intake) and the requests' latency.
//!
//! The churn run: 64 workers serving the same rate while 1,000 workers a minute are added
//! and removed through the admin API (from a spare set of 256 more engines), twice: a warm
//! round, 20 s quiet, the baseline RSS, the measured round, 20 s quiet: requests lost (must
//! be 0), the workers listed half way through and at the end, and the router's RSS before,
//! during and after. Then the same through P2pNccl discovery: 64 engines that register
//! themselves, and 1,000 a minute registered by the bench and left to expire.
//!
//! Results go to stdout, target/scale.json and target/scale.svg (each figure against the
//! number of workers; docs/PERFORMANCE.md is made from them).

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use disagg::proc_stat::cpu_secs;

#[path = "scale/plot.rs"]
mod plot;

const BIN: &str = env!("CARGO_BIN_EXE_disagg");
const DP: u16 = 8;
const ADMIN_KEY: &str = "scale-admin";

struct Proc {
    child: std::process::Child,
    urls: Vec<String>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    fn pid(&self) -> u32 {
        self.child.id()
    }
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Ports below Linux's ephemeral range, so a thousand fixed binds are cheap (binding port 0
/// makes the kernel search among every port bound).
struct Ports {
    http: u16,
    side: u16,
    kv: u16,
}

/// `n` simulated engines of `role` in one process (`extra`: more `disagg sim` flags);
/// their URLs from the banners.
fn sims(role: &str, n: usize, ports: &Ports, extra: &[&str]) -> Proc {
    let events = format!(r#"{{"enable_kv_cache_events":true,"publisher":"zmq","endpoint":"tcp://*:{}","topic":"kv-events"}}"#, ports.kv);
    let (n_text, http_port, side_port, dp) = (n.to_string(), ports.http.to_string(), ports.side.to_string(), DP.to_string());
    let mut args = vec![
        "sim",
        "--instances",
        &n_text,
        "--role",
        role,
        "--port",
        &http_port,
        "--side-channel-port",
        &side_port,
        "--data-parallel-size",
        &dp,
        "--max-num-seqs",
        "256",
        // kv_aware keys text prompts through the engines' render endpoint.
        "--enable-scale-out",
        "--kv-events-config",
        &events,
    ];
    if !extra.contains(&"--kv-blocks") {
        args.extend(["--kv-blocks", "2048"]);
    }
    args.extend_from_slice(extra);
    spawn_sims(&args, n)
}

/// `disagg` with `args` (a `sim --instances n`), once its `n` banners are out.
fn spawn_sims(args: &[&str], n: usize) -> Proc {
    let mut child = Command::new(BIN).args(args).env("RUST_LOG", "error").stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut urls = Vec::new();
    let mut line = String::new();
    while urls.len() < n {
        line.clear();
        assert!(out.read_line(&mut line).unwrap() > 0, "the simulator ended before its {n} banners");
        urls.push(line.split_whitespace().find(|w| w.starts_with("http://")).expect("a banner names its URL").to_string());
    }
    std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
    Proc { child, urls }
}

/// A plain HTTP/1.1 exchange on loopback: status and body.
fn http(method: &str, url: &str, auth: Option<&str>) -> Option<(u16, String)> {
    let rest = url.strip_prefix("http://")?;
    let (host, path) = rest.split_once('/').map_or((rest, "/".to_string()), |(h, p)| (h, format!("/{p}")));
    let mut s = std::net::TcpStream::connect(host).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    let auth = auth.map(|k| format!("Authorization: Bearer {k}\r\n")).unwrap_or_default();
    write!(s, "{method} {path} HTTP/1.1\r\nHost: {host}\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Some((status, body))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A router (`program` with `args` and `--port`), once its /health answers 200 (None if
/// it does not within 180 s).
fn router(program: &str, mut args: Vec<String>) -> Option<Proc> {
    let port = free_port();
    args.extend(["--port".into(), port.to_string(), "--host".into(), "127.0.0.1".into()]);
    let child = Command::new(program).args(&args).env("RUST_LOG", "error").stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let t = Instant::now();
    let proc = Proc { child, urls: vec![url.clone()] };
    while http("GET", &format!("{url}/health"), None).is_none_or(|(s, _)| s != 200) {
        if t.elapsed() > Duration::from_secs(180) {
            return None;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    Some(proc)
}

fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib: f64 = status.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()).unwrap_or(0.0);
    kib / 1024.0
}

/// The sum of a metric's samples on a /metrics page.
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// `disagg bench` at `rate` for `secs` against `url`: its result JSON.
fn load(url: &str, rate: f64, secs: u64, tag: &str) -> Value {
    let out = std::env::temp_dir().join(format!("disagg-scale-{tag}-{}.json", std::process::id()));
    let n = (rate * secs as f64) as usize;
    let status = Command::new(BIN)
        .args(["bench", "--backend", "vllm", "--base-url", url, "--model", "sim-model", "--dataset-name", "random"])
        .args(["--tokenizer", "sim", "--random-input-len", "512", "--random-output-len", "16", "--random-prefix-len", "256"])
        .args(["--ignore-eos", "--num-prompts", &n.to_string(), "--request-rate", &rate.to_string()])
        .args(["--percentile-metrics", "ttft,e2el", "--metric-percentiles", "50,99", "--save-result", "--result-filename"])
        .arg(&out)
        .arg("--disable-tqdm")
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "disagg bench failed against {url}");
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let _ = std::fs::remove_file(out);
    v
}

/// One router at one point: idle cost, then the load (`sims`: the simulators' processes,
/// whose CPU per request is reported too).
fn measure(program: &str, args: Vec<String>, rate: f64, secs: u64, kv: bool, tag: &str, sims: &[u32]) -> Value {
    let t = Instant::now();
    let Some(r) = router(program, args) else {
        return json!({"error": format!("not healthy within {} s of its start", t.elapsed().as_secs())});
    };
    let startup_secs = t.elapsed().as_secs_f64();
    // Subscribed, checked and scraped once before the idle window.
    std::thread::sleep(Duration::from_secs(5));
    let c0 = cpu_secs(r.pid());
    std::thread::sleep(Duration::from_secs(10));
    let idle_core = (cpu_secs(r.pid()) - c0) / 10.0;
    let m0 = http("GET", &format!("{}/metrics", r.urls[0]), None).map(|(_, b)| b).unwrap_or_default();
    let c1 = cpu_secs(r.pid());
    let sims_cpu = || sims.iter().map(|p| cpu_secs(*p)).sum::<f64>();
    let s1 = sims_cpu();
    let t = Instant::now();
    let result = load(&r.urls[0], rate, secs, tag);
    let wall = t.elapsed().as_secs_f64();
    let cpu = cpu_secs(r.pid()) - c1;
    let sim_cpu = sims_cpu() - s1;
    let m1 = http("GET", &format!("{}/metrics", r.urls[0]), None).map(|(_, b)| b).unwrap_or_default();
    let done = result["completed"].as_f64().unwrap_or(0.0);
    let mut row = json!({
        "startup_secs": startup_secs,
        "idle_core_pct": idle_core * 100.0,
        // The router's CPU while loaded, less what it spends idle over as long (reported apart).
        "cpu_ms_per_request": (cpu - idle_core * wall).max(0.0) * 1e3 / done.max(1.0),
        "cpu_ms_per_request_gross": cpu * 1e3 / done.max(1.0),
        "sim_cpu_ms_per_request": sim_cpu * 1e3 / done.max(1.0),
        "completed": done,
        "failed": result["failed"],
        "p50_e2e_ms": result["median_e2el_ms"],
        "p99_e2e_ms": result["p99_e2el_ms"],
        "p50_ttft_ms": result["median_ttft_ms"],
        "rss_mib": rss_mib(r.pid()),
    });
    if kv {
        let applied = metric(&m1, "disagg_router_kv_blocks_applied_total") - metric(&m0, "disagg_router_kv_blocks_applied_total");
        let spent = metric(&m1, "disagg_router_kv_apply_seconds_total") - metric(&m0, "disagg_router_kv_apply_seconds_total");
        let batches = metric(&m1, "disagg_router_kv_event_batches_total") - metric(&m0, "disagg_router_kv_event_batches_total");
        row["index_blocks"] = json!(metric(&m1, "disagg_router_kv_index_blocks"));
        row["apply_m_blocks_per_s"] = json!(if spent > 0.0 { applied / spent / 1e6 } else { 0.0 });
        row["kv_batches_per_s"] = json!(batches / wall);
        row["kv_blocks_per_s"] = json!(applied / wall);
    }
    row
}

fn pd_args(prefills: &[String], decodes: &[String]) -> Vec<String> {
    let mut args = vec!["--vllm-pd-disaggregation".to_string(), "--intra-node-data-parallel-size".into(), DP.to_string()];
    args.extend(["--max-concurrent-requests".into(), "100000".into(), "--queue-size".into(), "100000".into()]);
    for p in prefills {
        args.extend(["--prefill".into(), p.clone()]);
    }
    for d in decodes {
        args.extend(["--decode".into(), d.clone()]);
    }
    args
}

fn vllm_router() -> String {
    let out = Command::new("scripts/vllm-router-env.sh").output().expect("scripts/vllm-router-env.sh runs");
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines().find_map(|l| l.strip_prefix("VLLM_ROUTER=")).expect("vllm-router installed").to_string()
}

/// The ports of half a point: prefills from 10000, decodes from 10600 (HTTP), side
/// channels and KV events 8 per engine above.
fn ports(decode: bool) -> Ports {
    if decode {
        Ports { http: 10600, side: 16200, kv: 25200 }
    } else {
        Ports { http: 10000, side: 12000, kv: 21000 }
    }
}

fn point(n: usize, rate: f64, secs: u64, vr: &str) -> Value {
    let (prefill, decode) = (sims("prefill", n / 2, &ports(false), &[]), sims("decode", n / 2, &ports(true), &[]));
    std::thread::sleep(Duration::from_secs(2));
    let (s0, t0) = (cpu_secs(prefill.pid()) + cpu_secs(decode.pid()), Instant::now());
    std::thread::sleep(Duration::from_secs(5));
    let sim_idle_us_per_engine_s =
        (cpu_secs(prefill.pid()) + cpu_secs(decode.pid()) - s0) / t0.elapsed().as_secs_f64() / (n * DP as usize) as f64 * 1e6;
    let base = pd_args(&prefill.urls, &decode.urls);
    let mut rows = serde_json::Map::new();
    let mut disagg = vec!["route".to_string(), "--policy".into(), "kv_aware".into()];
    disagg.extend(base.iter().cloned());
    let row = measure(BIN, disagg, rate, secs, true, &format!("d{n}"), &[prefill.pid(), decode.pid()]);
    println!("{n} workers, disagg route kv_aware: {row}");
    rows.insert("disagg route kv_aware".into(), row);
    let mut unstarted: Option<Value> = None;
    for policy in ["round_robin", "cache_aware", "kv_aware"] {
        if let Some(why) = &unstarted {
            // vllm-router did not start with these workers under one policy: not under the others either.
            rows.insert(
                format!("vllm-router {policy}"),
                json!({"error": format!("not run: {}", why["error"].as_str().unwrap_or_default())}),
            );
            continue;
        }
        let mut args = base.clone();
        args.extend(["--policy".into(), policy.into()]);
        if policy == "kv_aware" {
            for (i, url) in prefill.urls.iter().enumerate() {
                let endpoints: Vec<String> = (0..DP).map(|r| format!("tcp://127.0.0.1:{}", ports(false).kv + i as u16 * DP + r)).collect();
                args.extend(["--pd-kv-events".into(), format!("{url}={}", endpoints.join(","))]);
            }
            args.extend(["--kv-event-block-size".into(), "16".into(), "--kv-event-model".into(), "sim-model".into()]);
        }
        let row = measure(vr, args, rate, secs, false, &format!("v{policy}{n}"), &[prefill.pid(), decode.pid()]);
        println!("{n} workers, vllm-router {policy}: {row}");
        if row.get("error").is_some() {
            unstarted = Some(row.clone());
        }
        rows.insert(format!("vllm-router {policy}"), row);
    }
    json!({"workers": n, "dp_ranks": DP, "sim_idle_us_cpu_per_engine_per_s": sim_idle_us_per_engine_s, "routers": rows})
}

/// KV intake sustained while serving: `n` workers whose every rank turns `per_rank` blocks
/// a second of its cache over with traffic the router does not see (`disagg sim
/// --kv-cache-churn`, caches of 256 blocks so the index reaches its steady size, stores
/// and removals, within the idle window), behind kv_aware at the same request rate.
fn intake(n: usize, per_rank: f64, rate: f64, secs: u64) -> Value {
    let churn = per_rank.to_string();
    let extra = ["--kv-blocks", "256", "--max-model-len", "2048", "--kv-cache-churn", churn.as_str()];
    let (prefill, decode) = (sims("prefill", n / 2, &ports(false), &extra), sims("decode", n / 2, &ports(true), &extra));
    let mut args = vec!["route".to_string(), "--policy".into(), "kv_aware".into()];
    args.extend(pd_args(&prefill.urls, &decode.urls));
    let row = measure(BIN, args, rate, secs, true, &format!("i{n}"), &[prefill.pid(), decode.pid()]);
    json!({"workers": n, "dp_ranks": DP, "churn_blocks_per_rank_per_s": per_rank, "disagg route kv_aware": row})
}

/// How many workers the router at `url` lists (its admin /workers).
fn workers_listed(url: &str) -> usize {
    http("GET", &format!("{url}/workers"), Some(ADMIN_KEY))
        .and_then(|(_, b)| serde_json::from_str::<Value>(&b).ok())
        .and_then(|v| v["workers"].as_array().map(Vec::len))
        .unwrap_or(0)
}

/// What one round of churn did.
struct Churned {
    added: usize,
    removed: usize,
    /// Joins or leaves the router did not take (admin answers other than 200, pings that
    /// could not be sent).
    refused: usize,
}

/// 64 workers serving while 1,000 a minute come and go through the admin API.
fn churn(rate: f64, secs: u64) -> Value {
    let (prefill, decode) = (sims("prefill", 32, &ports(false), &[]), sims("decode", 32, &ports(true), &[]));
    let spare = sims("decode", 256, &Ports { http: 11200, side: 29400, kv: 0 }, &[]);
    let mut args = vec!["route".to_string(), "--policy".into(), "kv_aware".into(), "--admin-api-key".into(), ADMIN_KEY.into()];
    args.extend(pd_args(&prefill.urls, &decode.urls));
    let r = router(BIN, args).expect("the churn run's router becomes healthy");
    let url = r.urls[0].clone();
    std::thread::sleep(Duration::from_secs(3));
    let cycle = |stop: Instant| {
        let (mut added, mut removed, mut refused) = (0usize, 0usize, 0usize);
        let mut turn = 0usize;
        // 1,000 a minute each way: one add and one remove every 60 ms.
        while Instant::now() < stop {
            let w = &spare.urls[turn % spare.urls.len()];
            let add = format!("{url}/add_worker?url={w}&role=decode&dp_size={DP}");
            match http("POST", &add, Some(ADMIN_KEY)) {
                Some((200, _)) => added += 1,
                _ => refused += 1,
            }
            if turn >= 32 {
                let old = &spare.urls[(turn - 32) % spare.urls.len()];
                match http("POST", &format!("{url}/remove_worker?url={old}"), Some(ADMIN_KEY)) {
                    Some((200, _)) => removed += 1,
                    _ => refused += 1,
                }
            }
            turn += 1;
            std::thread::sleep(Duration::from_millis(60));
        }
        for k in turn.saturating_sub(32)..turn {
            let old = &spare.urls[k % spare.urls.len()];
            let _ = http("POST", &format!("{url}/remove_worker?url={old}"), Some(ADMIN_KEY));
            removed += 1;
        }
        Churned { added, removed, refused }
    };
    churn_rounds(&r, rate, secs, "churn", cycle)
}

/// The same through P2pNccl discovery: 64 simulated P2pNccl engines register themselves
/// every 3 s; spare engines are registered by this bench, one every 60 ms (a DEALER with
/// the engine's zmq address as identity, one ping, closed a second later, as an engine
/// that stops), and leave when the router has heard nothing of them for 5 s.
fn churn_by_discovery(rate: f64, secs: u64) -> Value {
    let proxy = format!("127.0.0.1:{}", free_port());
    let p2p = |role: &str, n: usize, http: u16, side: u16, register: bool| {
        let (n_text, http, side) = (n.to_string(), http.to_string(), side.to_string());
        let mut args = vec!["sim", "--instances", &n_text, "--role", role, "--port", &http, "--side-channel-port", &side];
        args.extend(["--kv-connector", "p2pnccl", "--max-num-seqs", "256"]);
        if register {
            args.extend(["--proxy-address", proxy.as_str()]);
        }
        spawn_sims(&args, n)
    };
    let (_prefill, _decode) = (p2p("prefill", 32, 10000, 12000, true), p2p("decode", 32, 10600, 16200, true));
    let (spare_http, spare_side) = (11200u16, 29400u16);
    let spare = p2p("decode", 256, spare_http, spare_side, false);
    let args = ["route", "--vllm-discovery-address", &proxy, "--discovery-max-per-host", "1024", "--admin-api-key", ADMIN_KEY];
    let mut args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    args.extend(["--max-concurrent-requests".into(), "100000".into(), "--queue-size".into(), "100000".into()]);
    let r = router(BIN, args).expect("the discovery churn run's router becomes healthy");
    let url = r.urls[0].clone();
    let t = Instant::now();
    while workers_listed(&url) < 64 && t.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(250));
    }
    let cycle = |stop: Instant| {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            use disagg::zmtp::{self, Limits, SocketType};
            let (mut added, mut refused) = (0usize, 0usize);
            let mut open = std::collections::VecDeque::new();
            let mut turn = 0usize;
            while Instant::now() < stop {
                let i = (turn % spare.urls.len()) as u16;
                let (http_address, zmq_address) = (format!("127.0.0.1:{}", spare_http + i), format!("127.0.0.1:{}", spare_side + i));
                let ping = rmpv::Value::Map(vec![
                    ("type".into(), "D".into()),
                    ("http_address".into(), http_address.into()),
                    ("zmq_address".into(), zmq_address.clone().into()),
                ]);
                let mut payload = Vec::new();
                rmpv::encode::write_value(&mut payload, &ping).unwrap();
                let sent = match zmtp::connect(&proxy, SocketType::Dealer, zmq_address.as_bytes(), Limits::SMALL).await {
                    Ok(mut dealer) => dealer.send(&[bytes::Bytes::from(payload)]).await.is_ok().then_some(dealer),
                    Err(_) => None,
                };
                match sent {
                    Some(dealer) => {
                        added += 1;
                        open.push_back((Instant::now(), dealer));
                    }
                    None => refused += 1,
                }
                while open.front().is_some_and(|(at, _)| at.elapsed() >= Duration::from_secs(1)) {
                    open.pop_front();
                }
                turn += 1;
                tokio::time::sleep(Duration::from_millis(60)).await;
            }
            // Each leaves by silence; `workers_after` shows whether all did.
            Churned { added, removed: added, refused }
        })
    };
    let mut row = churn_rounds(&r, rate, secs, "discovery", cycle);
    let m = http("GET", &format!("{url}/metrics"), Some(ADMIN_KEY)).map(|(_, b)| b).unwrap_or_default();
    let refused: f64 = m
        .lines()
        .filter(|l| l.starts_with("disagg_router_refused_total{") && l.contains(r#"from="discovery""#))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .fold(0.0, |a, b| a + b);
    row["discovery_refused"] = json!(refused);
    row
}

/// Around one way of churning (`cycle`: joins and leaves until its stop): a warm round
/// under load, 20 s quiet, the baseline RSS, the measured round under load, 20 s quiet
/// (time for leaves by expiry too): requests lost, RSS before, during and after, and the
/// workers listed at the end.
fn churn_rounds(r: &Proc, rate: f64, secs: u64, tag: &str, cycle: impl Fn(Instant) -> Churned + Sync) -> Value {
    let url = &r.urls[0];
    // A first round as long as the measured one, under the same load, so the allocator's
    // arenas reach their size before the baseline: what grows after it is kept, not reused.
    let listed = || workers_listed(url);
    // Joins and leaves under load; the workers listed half way through.
    let round = |label: &str| {
        let stop = Instant::now() + Duration::from_secs(secs);
        std::thread::scope(|s| {
            let churner = s.spawn(|| cycle(stop));
            let midway = s.spawn(|| {
                std::thread::sleep(Duration::from_secs(secs) / 2);
                listed()
            });
            let result = load(url, rate, secs, label);
            (churner.join().unwrap(), result, midway.join().unwrap())
        })
    };
    let warm = round(&format!("{tag}-warm"));
    std::thread::sleep(Duration::from_secs(20));
    let before = rss_mib(r.pid());
    let (churned, result, midway) = round(tag);
    let during = rss_mib(r.pid());
    std::thread::sleep(Duration::from_secs(20));
    let after = rss_mib(r.pid());
    // More rounds, each followed by 20 s quiet: whether the RSS settles at a level or climbs.
    let more: Vec<Value> = (1..env_or("DISAGG_SCALE_CHURN_ROUNDS", 1usize))
        .map(|k| {
            let (churned, result, _) = round(&format!("{tag}-{k}"));
            std::thread::sleep(Duration::from_secs(20));
            json!({"added": churned.added, "failed": result["failed"], "rss_mib_after": rss_mib(r.pid())})
        })
        .collect();
    json!({"seconds": secs, "warm_round": {"added": warm.0.added, "removed": warm.0.removed, "completed": warm.1["completed"], "failed": warm.1["failed"]},
           "added": churned.added, "removed": churned.removed, "refused": churned.refused,
           "completed": result["completed"], "failed": result["failed"], "workers_midway": midway, "workers_after": listed(),
           "rss_mib_before": before, "rss_mib_during": during, "rss_mib_after": after, "more_rounds": more})
}

fn main() {
    if let Ok(from) = std::env::var("DISAGG_SCALE_REPLOT") {
        // Draws target/scale.svg again from a saved report, running nothing.
        let report: Value = serde_json::from_str(&std::fs::read_to_string(&from).unwrap()).unwrap();
        let svg = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join(std::env::var("DISAGG_SCALE_PLOT").unwrap_or_else(|_| "target/scale.svg".into()));
        plot::write(&svg, &report).unwrap();
        return;
    }
    let points: Vec<usize> = std::env::var("DISAGG_SCALE_POINTS")
        .unwrap_or_else(|_| "2,64,256,1024".into())
        .split(',')
        .filter_map(|p| p.trim().parse().ok())
        .collect();
    let (rate, secs) = (env_or("DISAGG_SCALE_RATE", 20.0), env_or("DISAGG_SCALE_SECS", 20u64));
    let churn_secs = env_or("DISAGG_SCALE_CHURN_SECS", 60u64);
    // Installed (scripts/vllm-router-env.sh) only when a point runs it.
    let vr = if points.is_empty() { String::new() } else { vllm_router() };
    let mut report = json!({"rate": rate, "seconds": secs, "points": []});
    for &n in &points {
        let p = point(n.max(2), rate, secs, &vr);
        println!("{}", serde_json::to_string_pretty(&p).unwrap());
        report["points"].as_array_mut().unwrap().push(p);
    }
    let (intake_workers, intake_churn) = (env_or("DISAGG_SCALE_INTAKE", 1024usize), env_or("DISAGG_SCALE_INTAKE_CHURN", 32.0));
    if intake_workers > 0 {
        let i = intake(intake_workers.max(2), intake_churn, rate, secs);
        println!("intake: {}", serde_json::to_string_pretty(&i).unwrap());
        report["intake"] = i;
    }
    if churn_secs > 0 {
        let by = std::env::var("DISAGG_SCALE_CHURN_BY").unwrap_or_else(|_| "admin,discovery".into());
        if by.contains("admin") {
            let c = churn(rate, churn_secs);
            println!("churn: {}", serde_json::to_string_pretty(&c).unwrap());
            report["churn"] = c;
        }
        if by.contains("discovery") {
            let c = churn_by_discovery(rate, churn_secs);
            println!("churn by discovery: {}", serde_json::to_string_pretty(&c).unwrap());
            report["churn_by_discovery"] = c;
        }
    }
    let target = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target");
    std::fs::write(target.join("scale.json"), serde_json::to_string_pretty(&report).unwrap()).unwrap();
    plot::write(&target.join("scale.svg"), &report).unwrap();
    println!("written: target/scale.json, target/scale.svg");
}
