//! The router's own cost, side by side with vllm-router 0.1.17 and with the same two legs
//! sent directly, in one run:
//!
//!   cargo bench --bench router      (DISAGG_BENCH_SECS=3 per point; installs vllm-router
//!                                    with scripts/vllm-router-env.sh if it is missing;
//!                                    DISAGG_BENCH_ONLY=rss for the RSS measurement alone,
//!                                    =sides for the TLS and tracing comparisons alone)
//!
//! A simulated prefill and decode (`disagg sim`, no artificial delays: the fastest backend
//! this machine can run), `disagg route` and vllm-router in front of them, all on
//! loopback, round_robin. "direct" is a client doing the toy proxy's job itself (prefill
//! leg, then decode leg). Every point runs the three one after another, in a rotating
//! order, three times; medians are reported. Points: latency at concurrency 1 (p50/p99
//! and each router's added time), requests/s at 64 and 1024, streamed and not, 1k- and
//! 100k-token prompts (token ids), the routers' CPU per 1k requests (/proc), and each
//! router's RSS holding 10,000 open streams (clients over HTTP/2, 200 streams per
//! connection, to both: the sandbox's 20,000-descriptor limit is not hit on the client side).
//! Then TLS: disagg route serving HTTPS to HTTPS simulators against the same plain, in the
//! same run (latency at concurrency 1, requests/s at 64, the router's CPU).

use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use disagg::proc_stat::cpu_secs;

#[path = "router/observe.rs"]
mod observe;
#[path = "router/rss.rs"]
mod rss;
use rss::open_streams;

const BIN: &str = env!("CARGO_BIN_EXE_disagg");
const ROUNDS: usize = 3;

struct Proc {
    child: Child,
    url: String,
}

/// `disagg` with these arguments; its URL from the banner.
async fn start(args: &[&str]) -> Proc {
    let mut cmd = Command::new(BIN);
    // DISAGG_BENCH_ROUTER_THREADS=N: the router with N serving threads (--worker-threads).
    let mut args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    if let (Some("route"), Ok(n)) = (args.first().map(String::as_str), std::env::var("DISAGG_BENCH_ROUTER_THREADS")) {
        args.extend(["--worker-threads".to_string(), n]);
    }
    let mut child = cmd
        .args(&args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn disagg");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let banner = lines.next_line().await.unwrap().expect("banner");
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let url = banner.split_whitespace().find(|w| w.starts_with("http://") || w.starts_with("https://")).unwrap().to_string();
    Proc { child, url }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// vllm-router in PD mode in front of `prefill` and `decode`.
async fn start_vllm_router(bin: &str, prefill: &str, decode: &str) -> Proc {
    let port = free_port();
    let child = Command::new(bin)
        .args([
            "--vllm-pd-disaggregation",
            "--prefill",
            prefill,
            "--decode",
            decode,
            "--policy",
            "round_robin",
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--max-concurrent-requests",
            "100000",
            "--queue-size",
            "100000",
            "--log-level",
            "warning",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn vllm-router");
    Proc { child, url: format!("http://127.0.0.1:{port}") }
}

/// The vllm-router binary, installed by the project's script when missing.
fn vllm_router_bin() -> String {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/vllm-router-env.sh");
    let out = std::process::Command::new(script).stderr(Stdio::inherit()).output().expect("run scripts/vllm-router-env.sh");
    assert!(out.status.success(), "scripts/vllm-router-env.sh failed");
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines().find_map(|l| l.strip_prefix("VLLM_ROUTER=")).expect("VLLM_ROUTER=").trim().to_string()
}

fn proc_field(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field).map(|v| v.trim().trim_end_matches("kB").trim().parse().unwrap_or(0)))
        .unwrap_or(0)
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Mode {
    Direct,
    Disagg,
    VllmRouter,
    /// disagg route serving HTTPS, reaching HTTPS simulators.
    DisaggTls,
    /// disagg route sending every request's trace over OTLP (ratio 1.0) and writing an
    /// access log.
    DisaggTraced,
}

const MODES: [Mode; 3] = [Mode::Direct, Mode::Disagg, Mode::VllmRouter];

struct Target {
    client: reqwest::Client,
    prefill: String,
    decode: String,
    disagg: String,
    vllm_router: String,
    /// The TLS router and a client that trusts it (keeps its connections, as the plain one).
    disagg_tls: String,
    tls_client: reqwest::Client,
    disagg_traced: String,
    /// The routers' pids, for their CPU: disagg, vllm-router, disagg over TLS, disagg traced.
    pids: [u32; 4],
    /// The two simulators and this process (the client): everything but the router.
    others: [u32; 3],
}

fn others_cpu(t: &Target) -> f64 {
    t.others.iter().map(|p| cpu_secs(*p)).sum()
}

#[derive(Clone, Copy)]
struct Case {
    stream: bool,
    prompt_tokens: usize,
    concurrency: usize,
}

fn body(case: Case, i: u64) -> Value {
    // Token ids; the first varies per request, so prompts are not all one prefix.
    let prompt: Vec<u64> = std::iter::once(100 + i % 20_000).chain((1..case.prompt_tokens as u64).map(|k| 200 + k % 30_000)).collect();
    json!({"model": "sim-model", "prompt": prompt, "max_tokens": 8, "ignore_eos": true, "stream": case.stream})
}

/// Reads the whole answer; why it failed otherwise.
async fn drain(resp: reqwest::Result<reqwest::Response>) -> Result<(), String> {
    let show = |e: &dyn std::error::Error| {
        let mut s = e.to_string();
        let mut cause = e.source();
        while let Some(c) = cause {
            s += &format!(": {c}");
            cause = c.source();
        }
        s
    };
    let mut r = resp.map_err(|e| show(&e))?;
    if !r.status().is_success() {
        let status = r.status();
        return Err(format!("{status}: {}", r.text().await.unwrap_or_default().chars().take(300).collect::<String>()));
    }
    loop {
        match r.chunk().await {
            Ok(Some(_)) => {}
            Ok(None) => return Ok(()),
            Err(e) => return Err(show(&e)),
        }
    }
}

async fn one(t: &Target, mode: Mode, case: Case, i: u64) -> Result<(), String> {
    let b = body(case, i);
    match mode {
        Mode::Disagg => drain(t.client.post(&t.disagg).json(&b).send().await).await,
        Mode::VllmRouter => drain(t.client.post(&t.vllm_router).json(&b).send().await).await,
        Mode::DisaggTls => drain(t.tls_client.post(&t.disagg_tls).json(&b).send().await).await,
        Mode::DisaggTraced => drain(t.client.post(&t.disagg_traced).json(&b).send().await).await,
        Mode::Direct => {
            let mut p = b.clone();
            p["kv_transfer_params"] = json!({"do_remote_decode": true, "do_remote_prefill": false, "remote_engine_id": null,
                "remote_block_ids": null, "remote_host": null, "remote_port": null});
            p["max_tokens"] = json!(1);
            p["stream"] = json!(false);
            let resp = t.client.post(&t.prefill).header("x-request-id", i.to_string()).json(&p).send().await.map_err(|e| e.to_string())?;
            let v = resp.json::<Value>().await.map_err(|e| e.to_string())?;
            let mut d = b;
            d["kv_transfer_params"] = v["kv_transfer_params"].clone();
            drain(t.client.post(&t.decode).header("x-request-id", i.to_string()).json(&d).send().await).await
        }
    }
}

/// One point's figures for one mode.
#[derive(Clone, Copy, Default)]
struct Figures {
    rps: f64,
    p50: f64,
    p99: f64,
    /// The router's CPU per 1k requests (seconds); 0 for direct.
    cpu_per_1k: f64,
    /// The client's and both simulators' CPU per 1k requests (seconds).
    others_cpu_per_1k: f64,
    failures: u64,
}

/// Runs `case.concurrency` loops for `secs`.
async fn load(t: &Arc<Target>, mode: Mode, case: Case, secs: f64) -> Figures {
    let stop = Arc::new(AtomicBool::new(false));
    let counter = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(AtomicU64::new(0));
    let pid = match mode {
        Mode::Direct => None,
        Mode::Disagg => Some(t.pids[0]),
        Mode::VllmRouter => Some(t.pids[1]),
        Mode::DisaggTls => Some(t.pids[2]),
        Mode::DisaggTraced => Some(t.pids[3]),
    };
    let cpu0 = pid.map_or(0.0, cpu_secs);
    let others0 = others_cpu(t);
    let start = Instant::now();
    let tasks: Vec<_> = (0..case.concurrency)
        .map(|_| {
            let (t, stop, counter, failures) = (t.clone(), stop.clone(), counter.clone(), failures.clone());
            tokio::spawn(async move {
                let mut lat = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let i = counter.fetch_add(1, Ordering::Relaxed);
                    let t0 = Instant::now();
                    match one(&t, mode, case, i).await {
                        Ok(()) => lat.push(t0.elapsed().as_secs_f64() * 1000.0),
                        Err(why) => {
                            // The first few, to say what failed.
                            if failures.fetch_add(1, Ordering::Relaxed) < 3 {
                                eprintln!("    {mode:?} failed: {why}");
                            }
                        }
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
    let cpu = pid.map_or(0.0, |p| cpu_secs(p) - cpu0);
    let others = others_cpu(t) - others0;
    all.sort_by(|a, b| a.partial_cmp(b).unwrap());
    Figures {
        rps: all.len() as f64 / elapsed,
        p50: pct(&all, 50.0),
        p99: pct(&all, 99.0),
        cpu_per_1k: cpu / all.len().max(1) as f64 * 1000.0,
        others_cpu_per_1k: others / all.len().max(1) as f64 * 1000.0,
        failures: failures.load(Ordering::Relaxed),
    }
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = p / 100.0 * (sorted.len() - 1) as f64;
    let (lo, hi) = (rank.floor() as usize, rank.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (rank - lo as f64)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// ROUNDS rounds of `modes` in a rotating order; the median of each figure.
async fn point(t: &Arc<Target>, modes: &[Mode], case: Case, secs: f64) -> Vec<Figures> {
    let n = modes.len();
    let mut runs: Vec<Vec<Figures>> = Vec::new();
    for round in 0..ROUNDS {
        let mut figs = vec![Figures::default(); n];
        for k in 0..n {
            let m = (round + k) % n;
            figs[m] = load(t, modes[m], case, secs).await;
        }
        runs.push(figs);
    }
    (0..n)
        .map(|m| {
            let take = |f: fn(&Figures) -> f64| median(runs.iter().map(|r| f(&r[m])).collect());
            Figures {
                rps: take(|f| f.rps),
                p50: take(|f| f.p50),
                p99: take(|f| f.p99),
                cpu_per_1k: take(|f| f.cpu_per_1k),
                others_cpu_per_1k: take(|f| f.others_cpu_per_1k),
                failures: runs.iter().map(|r| r[m].failures).sum(),
            }
        })
        .collect()
}

async fn wait_healthy(url: &str) {
    let c = reqwest::Client::new();
    for _ in 0..600 {
        if matches!(c.get(format!("{url}/health")).send().await, Ok(r) if r.status().is_success()) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{url} never became healthy");
}

#[tokio::main]
async fn main() {
    let secs: f64 = std::env::var("DISAGG_BENCH_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(3.0);
    let vr_bin = vllm_router_bin();
    let sim = |role: &'static str| {
        ["sim", "--port", "0", "--role", role, "--kv-blocks", "2000000", "--max-num-seqs", "4096", "--max-model-len", "131072"]
    };
    let prefill = start(&sim("prefill")).await;
    let decode = start(&sim("decode")).await;
    // The router as measured: round_robin, never refusing work; its legs' flags after.
    let route = |prefill: &str, decode: &str, extra: &[&str]| {
        let mut a: Vec<String> = ["route", "--port", "0", "--policy", "round_robin", "--max-concurrent-requests", "100000"]
            .into_iter()
            .chain(["--queue-size", "100000", "--prefill", prefill, "--decode", decode])
            .map(String::from)
            .collect();
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let disagg = start(&route(&prefill.url, &decode.url, &[]).iter().map(String::as_str).collect::<Vec<_>>()).await;
    let vr = start_vllm_router(&vr_bin, &prefill.url, &decode.url).await;
    // TLS: HTTPS simulators (vllm serve's --ssl-* flags) and a router serving HTTPS.
    let certs = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("test-certs");
    let made = std::process::Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/test-certs.sh")).arg(&certs).status().unwrap();
    assert!(made.success(), "scripts/test-certs.sh failed");
    let cert = |f: &str| certs.join(f).display().to_string();
    let (key, crt, ca) = (cert("server.key"), cert("server.pem"), cert("ca.pem"));
    let tls_sim = |role: &'static str| {
        let mut a: Vec<String> = sim(role).iter().map(|s| s.to_string()).collect();
        a.extend(["--ssl-keyfile".into(), key.clone(), "--ssl-certfile".into(), crt.clone()]);
        a
    };
    let (tp, td) = (tls_sim("prefill"), tls_sim("decode"));
    let prefill_tls = start(&tp.iter().map(String::as_str).collect::<Vec<_>>()).await;
    let decode_tls = start(&td.iter().map(String::as_str).collect::<Vec<_>>()).await;
    let tls_args = route(&prefill_tls.url, &decode_tls.url, &["--ssl-keyfile", &key, "--ssl-certfile", &crt, "--worker-ssl-ca-certs", &ca]);
    let disagg_tls = start(&tls_args.iter().map(String::as_str).collect::<Vec<_>>()).await;
    // Traces on (every request, over OTLP HTTP/protobuf to an in-process sink) and an
    // access log (to /dev/null: the router's work, not the disk's).
    let sink = observe::OtlpSink::start().await;
    std::env::set_var("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf");
    let traced_args = route(
        &prefill.url,
        &decode.url,
        &["--otlp-traces-endpoint", &sink.url, "--otlp-traces-sample-ratio", "1.0", "--access-log", "/dev/null"],
    );
    let disagg_traced = start(&traced_args.iter().map(String::as_str).collect::<Vec<_>>()).await;
    let tls_client = reqwest::Client::builder()
        .pool_max_idle_per_host(2048)
        .pool_idle_timeout(disagg::router::upstream::legs::WORKER_CONNECTION_IDLE)
        .tcp_nodelay(true)
        .use_preconfigured_tls(
            (*disagg::tls::WorkerTlsArgs { worker_ssl_ca_certs: Some(ca.clone().into()), ..Default::default() }.client_config().unwrap())
                .clone(),
        )
        .build()
        .unwrap();
    wait_healthy(&disagg.url).await;
    wait_healthy(&vr.url).await;
    wait_healthy(&disagg_traced.url).await;
    for _ in 0..600 {
        if matches!(tls_client.get(format!("{}/health", disagg_tls.url)).send().await, Ok(r) if r.status().is_success()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Idle connections reused only under 4 s: the simulators close them at 5 s, as vLLM does.
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(2048)
        .pool_idle_timeout(disagg::router::upstream::legs::WORKER_CONNECTION_IDLE)
        .tcp_nodelay(true)
        .build()
        .unwrap();
    let t = Arc::new(Target {
        client,
        prefill: format!("{}/v1/completions", prefill.url),
        decode: format!("{}/v1/completions", decode.url),
        disagg: format!("{}/v1/completions", disagg.url),
        vllm_router: format!("{}/v1/completions", vr.url),
        disagg_tls: format!("{}/v1/completions", disagg_tls.url),
        tls_client,
        disagg_traced: format!("{}/v1/completions", disagg_traced.url),
        pids: [disagg.child.id().unwrap(), vr.child.id().unwrap(), disagg_tls.child.id().unwrap(), disagg_traced.child.id().unwrap()],
        others: [prefill.child.id().unwrap(), decode.child.id().unwrap(), std::process::id()],
    });
    println!("router benchmark: disagg route vs vllm-router 0.1.17 vs the two legs sent directly; simulated prefill + decode on loopback,");
    println!("{secs} s per run, {ROUNDS} rounds in rotating order, medians; 8 output tokens; token-id prompts");
    let warm = Case { stream: false, prompt_tokens: 1000, concurrency: 8 };
    for m in MODES {
        load(&t, m, warm, 0.5).await;
    }
    let cases = [
        Case { stream: false, prompt_tokens: 1000, concurrency: 1 },
        Case { stream: true, prompt_tokens: 1000, concurrency: 1 },
        Case { stream: false, prompt_tokens: 100_000, concurrency: 1 },
        Case { stream: true, prompt_tokens: 100_000, concurrency: 1 },
        Case { stream: false, prompt_tokens: 1000, concurrency: 64 },
        Case { stream: true, prompt_tokens: 1000, concurrency: 64 },
        Case { stream: false, prompt_tokens: 100_000, concurrency: 64 },
        Case { stream: false, prompt_tokens: 1000, concurrency: 1024 },
        Case { stream: true, prompt_tokens: 1000, concurrency: 1024 },
    ];
    println!();
    println!(
        "{:>6} {:>7} {:>5} | {:>9} {:>9} {:>9} | {:>13} {:>13} {:>6} | {:>8} {:>8} {:>8} {:>6} {:>6} | {:>9} {:>9}",
        "stream",
        "prompt",
        "conc",
        "direct",
        "disagg",
        "vllm-r",
        "added disagg",
        "added vllm-r",
        "ratio",
        "direct",
        "disagg",
        "vllm-r",
        "d/vr",
        "d/dir",
        "CPU disagg",
        "CPU vllm-r"
    );
    println!("{:>20} | {:>29} | {:>34} | {:>40} | {:>19}", "", "p50 latency (ms)", "added p50 (ms)", "requests/s", "s per 1k requests");
    let mut rows = Vec::new();
    // DISAGG_BENCH_ONLY=rss|sides: only the open-streams measurement, or only the side-by-side
    // comparisons (TLS, tracing).
    let only = std::env::var("DISAGG_BENCH_ONLY").ok();
    let runs = |part: &str| only.as_deref().is_none_or(|o| o == part);
    for case in cases.into_iter().filter(|_| runs("main")) {
        let [d, g, v] = point(&t, &MODES, case, secs).await[..] else { unreachable!("three modes") };
        let (ag, av) = (g.p50 - d.p50, v.p50 - d.p50);
        println!("{:>6} {:>7} {:>5} | {:>9.3} {:>9.3} {:>9.3} | {:>13.3} {:>13.3} {:>6.2} | {:>8.0} {:>8.0} {:>8.0} {:>6.2} {:>6.2} | {:>9.3} {:>9.3}",
            case.stream, case.prompt_tokens, case.concurrency, d.p50, g.p50, v.p50, ag, av, ag / av, d.rps, g.rps, v.rps, g.rps / v.rps, g.rps / d.rps,
            g.cpu_per_1k, v.cpu_per_1k);
        rows.push(json!({"stream": case.stream, "prompt_tokens": case.prompt_tokens, "concurrency": case.concurrency,
            "direct": {"rps": d.rps, "p50_ms": d.p50, "p99_ms": d.p99, "failures": d.failures},
            "disagg": {"rps": g.rps, "p50_ms": g.p50, "p99_ms": g.p99, "cpu_s_per_1k": g.cpu_per_1k, "others_cpu_s_per_1k": g.others_cpu_per_1k, "failures": g.failures},
            "vllm_router": {"rps": v.rps, "p50_ms": v.p50, "p99_ms": v.p99, "cpu_s_per_1k": v.cpu_per_1k, "failures": v.failures},
            "added_p50_ratio": ag / av, "added_p99_disagg_ms": g.p99 - d.p99, "added_p99_vllm_router_ms": v.p99 - d.p99}));
        if case.concurrency == 1 {
            let (pg, pv) = (g.p99 - d.p99, v.p99 - d.p99);
            println!("    added p99: disagg {pg:.3} ms, vllm-router {pv:.3} ms (ratio {:.2})", pg / pv);
        }
        if case.concurrency >= 64 {
            // What the rest of the machine allows: the client and both simulators' CPU per
            // request in the disagg runs bounds any router's rate on these cores.
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
            let others_ms = g.others_cpu_per_1k;
            println!("    client + simulators: {others_ms:.3} ms CPU per request (disagg runs): a router costing nothing tops out near {:.0}/s on {cores} cores; 2x vllm-router = {:.0}/s",
                cores / others_ms * 1000.0, 2.0 * v.rps);
        }
        if d.failures + g.failures > 0 {
            println!("    failures: direct {}, disagg {}, vllm-router {}", d.failures, g.failures, v.failures);
        }
    }
    // TLS: https front and https workers against plain; then tracing on against off. Same
    // machine, same run. (The simulators' own TLS work counts in neither router's CPU.)
    if runs("sides") {
        let cases = [
            Case { stream: false, prompt_tokens: 1000, concurrency: 1 },
            Case { stream: true, prompt_tokens: 1000, concurrency: 1 },
            Case { stream: false, prompt_tokens: 1000, concurrency: 64 },
        ];
        let tls = "TLS: disagg route serving HTTPS to HTTPS workers (rustls) vs plain HTTP; clients keep their connections";
        rows.extend(observe::side_by_side(&t, tls, ("plain", Mode::Disagg), ("tls", Mode::DisaggTls), &cases, secs).await);
        let traced = "Tracing: every request's trace sent over OTLP (ratio 1.0) and an access-log line, vs both off";
        rows.extend(observe::side_by_side(&t, traced, ("off", Mode::Disagg), ("traced", Mode::DisaggTraced), &cases, secs).await);
        println!("    the OTLP sink received {} exports, {} KiB", sink.exports(), sink.bytes() / 1024);
    }
    drop(disagg_traced);
    drop(disagg_tls);
    drop(prefill_tls);
    drop(decode_tls);
    drop(disagg);
    drop(vr);
    drop(decode);
    println!();
    let (ours, theirs) = match runs("rss") {
        true => (open_streams(&prefill.url, None, 10_000).await, open_streams(&prefill.url, Some(&vr_bin), 10_000).await),
        false => ((0, 0, 0), (0, 0, 0)),
    };
    for (name, (idle, busy, open)) in [("disagg route", ours), ("vllm-router", theirs)].into_iter().filter(|_| runs("rss")) {
        println!(
            "{name}: RSS {} MiB idle, {} MiB holding {open} open streams ({:.1} KiB per stream)",
            idle / 1024,
            busy / 1024,
            (busy as f64 - idle as f64) / open.max(1) as f64
        );
    }
    let out = json!({"points": rows, "rss": {"disagg": ours, "vllm_router": theirs}});
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("bench-router.json");
    std::fs::write(&path, serde_json::to_string_pretty(&out).unwrap()).unwrap();
    println!("results: {}", path.display());
}
