//! Test support: spawn `disagg` processes on loopback, talk to them over real HTTP.
//! Shared by the `it`, `vllm` and `ray` test binaries, each of which uses a part of it.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

pub const BIN: &str = env!("CARGO_BIN_EXE_disagg");

/// A running `disagg` process, killed when dropped. Its stderr goes to a file that is
/// printed if the test fails.
pub struct Proc {
    child: Child,
    pub url: String,
    pub port: u16,
    pub banner: String,
    log: PathBuf,
}

fn log_path(tag: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("proc-logs");
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(format!("{tag}-{}-{}.log", std::process::id(), rand::random::<u32>()))
}

impl Proc {
    /// Starts `disagg <args>` and waits for its banner line (which names its URL).
    pub async fn start(args: &[&str]) -> Proc {
        Proc::start_with_env(args, &[]).await
    }

    /// As `start`, with extra environment variables.
    pub async fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Proc {
        Proc::start_banners(args, env, 1).await.0
    }

    /// `disagg sim --port 0 --instances n <args>`: the process, and every instance's URL.
    pub async fn sim_instances(n: usize, args: &[&str]) -> (Proc, Vec<String>) {
        let count = n.to_string();
        let mut all = vec!["sim", "--port", "0", "--instances", &count];
        all.extend_from_slice(args);
        Proc::start_banners(&all, &[], n).await
    }

    /// Starts `disagg <args>` and waits for `n` banner lines; the first names the Proc's URL.
    async fn start_banners(args: &[&str], env: &[(&str, &str)], n: usize) -> (Proc, Vec<String>) {
        let log = log_path(args.first().copied().unwrap_or("disagg"));
        let mut child = Command::new(BIN)
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn disagg");
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let mut urls = Vec::new();
        let mut banner = String::new();
        while urls.len() < n {
            let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
                .await
                .unwrap_or_else(|_| panic!("no banner from disagg {args:?}; log:\n{}", tail(&log)))
                .unwrap()
                .unwrap_or_else(|| panic!("disagg {args:?} exited before its banner; log:\n{}", tail(&log)));
            let url = line
                .split_whitespace()
                .find(|w| w.starts_with("http://") || w.starts_with("https://"))
                .unwrap_or_else(|| panic!("banner without URL: {line}"))
                .trim_end_matches('/')
                .to_string();
            if urls.is_empty() {
                banner = line;
            }
            urls.push(url);
        }
        // Keep draining stdout so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let url = urls[0].clone();
        let port = url.rsplit(':').next().unwrap().parse().unwrap();
        (Proc { child, url, port, banner, log }, urls)
    }

    /// `disagg sim --port 0 <args>`.
    pub async fn sim(args: &[&str]) -> Proc {
        let mut all = vec!["sim", "--port", "0"];
        all.extend_from_slice(args);
        Proc::start(&all).await
    }

    pub fn kill(&mut self) {
        let _ = self.child.start_kill();
    }

    /// Sends a signal (e.g. `libc::SIGTERM`) to the process.
    pub fn signal(&self, sig: i32) {
        if let Some(pid) = self.child.id() {
            unsafe {
                libc::kill(pid as i32, sig);
            }
        }
    }

    /// Everything the process has logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Waits for the process to exit by itself; `None` if it is still running.
    pub async fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        tokio::time::timeout(within, self.child.wait()).await.ok().and_then(Result::ok)
    }
}

/// A loopback port free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The first of `n` consecutive loopback ports free a moment ago, below the kernel's
/// ephemeral range (so no test's outgoing connection takes one of them meanwhile): for
/// plans that put replica k on port + k.
///
/// Tests run concurrently in one binary: a run handed out is never handed out again (a
/// port checked free by one test and bound a moment later by its child could otherwise be
/// checked free by another test in between).
pub fn free_port_run(n: u16) -> u16 {
    static HANDED_OUT: std::sync::Mutex<std::collections::BTreeSet<u16>> = std::sync::Mutex::new(std::collections::BTreeSet::new());
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    if handed_out.len() > 10_000 {
        // Nearly the whole range: the oldest runs are long closed.
        handed_out.clear();
    }
    loop {
        let base = 20_000 + rand::random::<u16>() % (12_000 - n);
        let run = base..base + n;
        if run.clone().all(|p| !handed_out.contains(&p) && std::net::TcpListener::bind(("127.0.0.1", p)).is_ok()) {
            handed_out.extend(run);
            return base;
        }
    }
}

fn tail(path: &PathBuf) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        if std::thread::panicking() {
            eprintln!("---- log of {} ----\n{}", self.banner, tail(&self.log));
        }
    }
}

pub fn client() -> reqwest::Client {
    // Idle connections reused only under 4 s: the simulator and vLLM close them at 5 s.
    reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .pool_idle_timeout(disagg::router::upstream::legs::WORKER_CONNECTION_IDLE)
        .build()
        .unwrap()
}

/// POSTs JSON; returns the status and the body parsed as JSON (Null if it is not JSON).
pub async fn post(url: &str, body: &Value) -> (u16, Value) {
    post_with(url, body, &[]).await
}

pub async fn post_with(url: &str, body: &Value, headers: &[(&str, &str)]) -> (u16, Value) {
    let mut req = client().post(url).json(body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.unwrap_or_else(|e| panic!("POST {url}: {e}"));
    let status = resp.status().as_u16();
    let bytes = resp.bytes().await.unwrap();
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

/// GET with `Authorization: Bearer key`.
pub async fn get_as(url: &str, key: &str) -> (u16, String) {
    let resp = client().get(url).bearer_auth(key).send().await.unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

pub async fn get(url: &str) -> (u16, String) {
    let resp = client().get(url).send().await.unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap())
}

/// A streamed response, read to its end: status and the `data:` payloads in order.
pub async fn post_stream(url: &str, body: &Value) -> (u16, Vec<String>) {
    let resp = client().post(url).json(body).send().await.unwrap();
    let status = resp.status().as_u16();
    let mut events = Vec::new();
    let mut buf = String::new();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let Ok(chunk) = chunk else { break };
        buf.push_str(std::str::from_utf8(&chunk).unwrap());
        while let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            // An event's data line (Anthropic's events name their type on a line before it).
            if let Some(data) = event.lines().find_map(|l| l.strip_prefix("data: ")) {
                events.push(data.to_string());
            }
        }
    }
    (status, events)
}

/// Text of a completions or chat response, streamed (events) or not.
pub fn text_of(v: &Value) -> String {
    let c = &v["choices"][0];
    c["text"].as_str().or_else(|| c["message"]["content"].as_str()).unwrap_or_default().to_string()
}

pub fn stream_text(events: &[String]) -> String {
    events
        .iter()
        .filter(|e| e.as_str() != "[DONE]")
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .map(|v| {
            let c = &v["choices"][0];
            c["text"].as_str().or_else(|| c["delta"]["content"].as_str()).unwrap_or_default().to_string()
        })
        .collect()
}

/// Sum of a metric's series whose labels include every `labels` pair.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, rest) = series.split_once('{').unwrap_or((series, ""));
            if n != name {
                return None;
            }
            labels.iter().all(|(k, v)| rest.contains(&format!("{k}=\"{v}\""))).then(|| value.parse::<f64>().ok())?
        })
        .fold(0.0, |a, b| a + b)
}

pub async fn metrics(base: &str) -> String {
    get(&format!("{base}/metrics")).await.1
}

/// Polls `check` until it holds or `within` passes; returns whether it held.
pub async fn eventually<F, Fut>(within: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = Instant::now() + within;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() > end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The six-key `kv_transfer_params` of a prefill leg (PROTOCOLS.md §1).
pub fn prefill_params() -> Value {
    serde_json::json!({"do_remote_decode": true, "do_remote_prefill": false, "remote_engine_id": null,
        "remote_block_ids": null, "remote_host": null, "remote_port": null})
}

/// `disagg route --port 0 <args>`, once its /health is 200.
pub async fn router(args: &[&str]) -> Proc {
    let r = router_unready(args).await;
    let url = r.url.clone();
    let ready = eventually(Duration::from_secs(10), || async { get(&format!("{url}/health")).await.0 == 200 }).await;
    assert!(ready, "router never became healthy: {}", get(&format!("{}/health", r.url)).await.1);
    r
}

/// `disagg route --port 0 <args>` without waiting for its workers.
pub async fn router_unready(args: &[&str]) -> Proc {
    router_unready_with_env(args, &[]).await
}

async fn router_unready_with_env(args: &[&str], env: &[(&str, &str)]) -> Proc {
    let mut all = vec!["route", "--port", "0"];
    if !args.contains(&"--health-check-interval-secs") {
        all.extend(["--health-check-interval-secs", "0.2"]);
    }
    // A stored Responses conversation goes to a directory of the test's own.
    let state_dir;
    if !args.contains(&"--state-dir") {
        state_dir = temp_dir("router-state").to_string_lossy().into_owned();
        all.extend(["--state-dir", state_dir.as_str()]);
    }
    all.extend_from_slice(args);
    Proc::start_with_env(&all, env).await
}

/// `disagg route` with extra environment variables, once its /health is 200.
pub async fn router_with_env(args: &[&str], env: &[(&str, &str)]) -> Proc {
    let r = router_unready_with_env(args, env).await;
    let url = r.url.clone();
    let ready = eventually(Duration::from_secs(10), || async { get(&format!("{url}/health")).await.0 == 200 }).await;
    assert!(ready, "router never became healthy");
    r
}

/// The router's `/workers` document.
pub async fn workers(router: &str) -> Value {
    workers_as(router, None).await
}

/// `/workers` with the admin key, when the router has one.
pub async fn workers_as(router: &str, admin_key: Option<&str>) -> Value {
    let mut req = client().get(format!("{router}/workers"));
    if let Some(k) = admin_key {
        req = req.bearer_auth(k);
    }
    req.send().await.unwrap().json().await.unwrap()
}

/// Every in-flight count, permit and queue slot of the router is back to zero.
pub async fn assert_idle(router: &str) {
    assert_idle_as(router, None).await
}

/// `assert_idle` for a router with an admin key.
pub async fn assert_idle_as(router: &str, admin_key: Option<&str>) {
    let idle = eventually(Duration::from_secs(10), || async {
        let w = workers_as(router, admin_key).await;
        w["permits_in_use"] == 0
            && w["queued"] == 0
            && w["workers"]
                .as_array()
                .unwrap()
                .iter()
                .all(|w| w["in_flight"] == 0 && w["ranks_queued_blocks"].as_array().is_none_or(|q| q.iter().all(|b| b == 0)))
    })
    .await;
    assert!(idle, "router not idle: {}", workers_as(router, admin_key).await);
}

/// A worker's in-flight count as the router sees it.
pub async fn in_flight(router: &str, worker_url: &str) -> u64 {
    let w = workers(router).await;
    w["workers"].as_array().unwrap().iter().find(|w| w["url"] == worker_url).map_or(0, |w| w["in_flight"].as_u64().unwrap())
}

/// Requests a sim has completed (all DP engines).
pub async fn served(sim: &str) -> f64 {
    metric(&metrics(sim).await, "vllm:request_success_total", &[])
}

/// Starts a stream and returns it after its first chunk arrived.
pub async fn open_stream(url: &str, body: &Value) -> (reqwest::Response, Vec<u8>) {
    let mut resp = client().post(url).json(body).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let first = resp.chunk().await.unwrap().expect("a first chunk").to_vec();
    (resp, first)
}

/// Reads the rest of a stream into its `data:` payloads.
pub async fn rest_of(mut resp: reqwest::Response, first: Vec<u8>) -> Vec<String> {
    let mut raw = first;
    while let Ok(Some(c)) = resp.chunk().await {
        raw.extend_from_slice(&c);
    }
    String::from_utf8_lossy(&raw).split("\n\n").filter_map(|e| e.trim().strip_prefix("data: ").map(str::to_owned)).collect()
}

/// For test binaries that must run inside a loopback-only network namespace (real vLLM,
/// Ray): outside one, re-runs this binary inside a fresh namespace (scripts/in-netns.sh)
/// and returns its exit code; inside, returns None.
pub fn reexec_in_netns() -> Option<std::process::ExitCode> {
    const INSIDE: &str = "DISAGG_TEST_IN_NETNS";
    if std::env::var_os(INSIDE).is_some() {
        return None;
    }
    let exe = std::env::current_exe().expect("own path");
    let status = std::process::Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/in-netns.sh"))
        .arg(exe)
        .args(std::env::args().skip(1))
        .env(INSIDE, "1")
        .status()
        .expect("run scripts/in-netns.sh");
    Some(std::process::ExitCode::from(status.code().unwrap_or(1) as u8))
}

/// Reads `KEY=value` lines printed by one of the project's env scripts.
pub fn script_var(script: &str, key: &str) -> String {
    let out = std::process::Command::new(format!("{}/scripts/{script}", env!("CARGO_MANIFEST_DIR")))
        .arg("--print")
        .output()
        .expect("run env script");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")).map(str::to_owned))
        .unwrap_or_else(|| panic!("{script} --print did not say {key}"))
}

/// `disagg ARGS` in the background (a launch), its stderr written to `err`: the child and
/// its stdout's lines (see `ready_url`).
pub fn spawn_logged(args: &[&str], err: &std::path::Path) -> (Child, tokio::io::Lines<BufReader<tokio::process::ChildStdout>>) {
    let mut child =
        Command::new(BIN).args(args).stdout(Stdio::piped()).stderr(std::fs::File::create(err).unwrap()).kill_on_drop(true).spawn().unwrap();
    let lines = BufReader::new(child.stdout.take().unwrap()).lines();
    (child, lines)
}

/// Reads `disagg launch`'s stdout up to its `disagg launch ready: URL` line; None if the
/// output ends or `within` passes first.
pub async fn ready_url<R: tokio::io::AsyncBufRead + Unpin>(lines: &mut tokio::io::Lines<R>, within: Duration) -> Option<String> {
    let end = Instant::now() + within;
    loop {
        let left = end.checked_duration_since(Instant::now())?;
        let line = tokio::time::timeout(left, lines.next_line()).await.ok()?.ok()??;
        if let Some(url) = line.strip_prefix("disagg launch ready: ") {
            return Some(url.to_string());
        }
    }
}

/// A field of /proc/PID/status in KiB (e.g. `VmRSS`, `VmHWM`).
pub fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(field).and_then(|r| r.trim_start_matches(':').trim().trim_end_matches("kB").trim().parse().ok()))
        .unwrap_or(0)
}

/// The `host:port` of a base URL, for raw sockets.
pub fn addr_of(url: &str) -> String {
    url.trim_start_matches("http://").to_string()
}

/// Reads a raw socket until it closes or `within` passes; returns what it read and
/// whether it closed.
pub async fn read_until_closed(sock: &mut tokio::net::TcpStream, within: Duration) -> (String, bool) {
    use tokio::io::AsyncReadExt;
    let mut out = Vec::new();
    let end = Instant::now() + within;
    let mut buf = [0u8; 4096];
    loop {
        let left = end.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, sock.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (String::from_utf8_lossy(&out).into_owned(), true),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => return (String::from_utf8_lossy(&out).into_owned(), false),
        }
    }
}

/// The test certificates (scripts/test-certs.sh, made once per test binary).
pub fn test_certs() -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("test-certs");
        let out = std::process::Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/test-certs.sh")).arg(&dir).output().unwrap();
        assert!(out.status.success(), "scripts/test-certs.sh: {}", String::from_utf8_lossy(&out.stderr));
        dir
    })
    .clone()
}

/// A file of the test certificates, by name.
pub fn cert_file(name: &str) -> String {
    test_certs().join(name).to_string_lossy().into_owned()
}

/// curl over https with the test CA (and a client certificate, by name): (exit ok, status, body, stderr).
pub fn curl_tls(url: &str, body: Option<&Value>, client: Option<&str>) -> (bool, u16, String, String) {
    let mut cmd = std::process::Command::new("curl");
    cmd.args(["-sS", "--max-time", "60", "--cacert", &cert_file("ca.pem"), "-w", "\n%{http_code}"]);
    if let Some(c) = client {
        cmd.args(["--cert", &cert_file(&format!("{c}.pem")), "--key", &cert_file(&format!("{c}.key"))]);
    }
    if let Some(b) = body {
        cmd.args(["-H", "content-type: application/json", "-d", &b.to_string()]);
    }
    let out = cmd.arg(url).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (out.status.success(), code.trim().parse().unwrap_or(0), body.to_string(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// A new empty directory under the system's temp dir, named for what it holds.
pub fn temp_dir(what: &str) -> std::path::PathBuf {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("disagg-{what}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
