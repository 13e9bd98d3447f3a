//! `disagg bench` as a load generator, against `vllm bench serve` in the same run:
//!
//!   cargo bench --bench client        (vllm bench serve from scripts/vllm-env.sh's venv)
//!
//! 1. The same workload (random prompts of 64 tokens, 16 output tokens, ignore_eos,
//!    concurrency 256) from both clients against a simulated engine with no artificial
//!    delays: requests/s achieved and the client's CPU seconds per 1000 requests
//!    (getrusage of the client process).
//! 2. Open streams: `disagg bench` holding N concurrent streams to a slow simulated
//!    decode (HTTP/1: one connection each, N = 9,000 here to stay under the 20,000
//!    descriptors a process may hold in this sandbox; then --http2 with 30,000).

use std::process::{Command, Stdio};
use std::time::Instant;

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_disagg");

fn child_cpu() -> f64 {
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(ru.ru_utime) + t(ru.ru_stime)
}

struct Sim(std::process::Child, String);

impl Drop for Sim {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn sim(args: &[&str]) -> Sim {
    let mut c = Command::new(BIN)
        .args(["sim", "--port", "0", "--kv-blocks", "4000000", "--max-num-seqs", "100000"])
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(c.stdout.take().unwrap()), &mut line).unwrap();
    let url = line.split_whitespace().find(|w| w.starts_with("http://")).unwrap().to_string();
    Sim(c, url)
}

/// Runs a client; returns (wall s, client CPU s, result JSON).
fn run(program: &str, args: &[String], out: &std::path::Path) -> Option<(f64, f64, Value)> {
    let cpu0 = child_cpu();
    let t = Instant::now();
    let status = Command::new(program).args(args).env("HF_HUB_OFFLINE", "1").stdout(Stdio::null()).stderr(Stdio::null()).status().ok()?;
    let wall = t.elapsed().as_secs_f64();
    let cpu = child_cpu() - cpu0;
    if !status.success() {
        eprintln!("{program} failed ({status})");
        return None;
    }
    Some((wall, cpu, serde_json::from_str(&std::fs::read_to_string(out).ok()?).ok()?))
}

fn script_var(script: &str, key: &str) -> Option<String> {
    let out = Command::new(format!("{}/scripts/{script}", env!("CARGO_MANIFEST_DIR"))).arg("--print").output().ok()?;
    String::from_utf8_lossy(&out.stdout).lines().find_map(|l| l.strip_prefix(&format!("{key}=")).map(str::to_owned))
}

fn main() {
    let tmp = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bench-client");
    std::fs::create_dir_all(&tmp).unwrap();
    let venv = script_var("vllm-env.sh", "VENV").filter(|v| std::path::Path::new(v).join(".disagg-complete").is_file());
    let model = script_var("vllm-env.sh", "MODEL").filter(|m| std::path::Path::new(m).join("tokenizer.json").is_file());
    let n: usize = std::env::var("DISAGG_CLIENT_REQUESTS").ok().and_then(|s| s.parse().ok()).unwrap_or(4000);

    let s = sim(&[]);
    let tokenizer = model.clone().unwrap_or_else(|| "sim".into());
    let workload = |out: &std::path::Path| -> Vec<String> {
        [
            "--backend",
            "vllm",
            "--base-url",
            &s.1,
            "--model",
            "sim-model",
            "--tokenizer",
            &tokenizer,
            "--dataset-name",
            "random",
            "--random-input-len",
            "64",
            "--random-output-len",
            "16",
            "--num-prompts",
            &n.to_string(),
            "--max-concurrency",
            "256",
            "--ignore-eos",
            "--save-result",
            "--result-filename",
            out.to_str().unwrap(),
            "--disable-tqdm",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    println!("client benchmark: {n} requests (64 in / 16 out tokens, ignore_eos, concurrency 256) against a simulated engine");
    println!("{:<20} {:>10} {:>12} {:>22}", "client", "req/s", "wall (s)", "client CPU s / 1k req");
    let ours = tmp.join("disagg.json");
    if let Some((wall, cpu, j)) = run(BIN, &[vec!["bench".to_string()], workload(&ours)].concat(), &ours) {
        println!(
            "{:<20} {:>10.0} {:>12.2} {:>22.3}",
            "disagg bench",
            j["request_throughput"].as_f64().unwrap_or(0.0),
            wall,
            cpu / n as f64 * 1000.0
        );
        assert_eq!(j["completed"].as_u64(), Some(n as u64));
    }
    match (&venv, &model) {
        (Some(v), Some(_)) => {
            let theirs = tmp.join("vllm.json");
            let args = [vec!["bench".to_string(), "serve".to_string()], workload(&theirs)].concat();
            if let Some((wall, cpu, j)) = run(&format!("{v}/bin/vllm"), &args, &theirs) {
                println!(
                    "{:<20} {:>10.0} {:>12.2} {:>22.3}",
                    "vllm bench serve",
                    j["request_throughput"].as_f64().unwrap_or(0.0),
                    wall,
                    cpu / n as f64 * 1000.0
                );
            }
        }
        _ => println!("(vllm bench serve not measured: run scripts/vllm-env.sh)"),
    }
    drop(s);

    println!();
    for (streams, http2) in [(9_000usize, false), (30_000, true)] {
        // 20 output tokens at one decode step per second: every stream stays open ~20 s.
        let slow = sim(&["--decode-ms-per-token", "1000"]);
        let out = tmp.join(format!("streams-{streams}.json"));
        let mut args: Vec<String> = [
            "bench",
            "--base-url",
            &slow.1,
            "--model",
            "sim-model",
            "--tokenizer",
            "sim",
            "--random-input-len",
            "8",
            "--random-output-len",
            "20",
            "--num-prompts",
            &streams.to_string(),
            "--ignore-eos",
            "--save-result",
            "--result-filename",
            out.to_str().unwrap(),
            "--disable-tqdm",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if http2 {
            args.push("--http2".into());
        }
        if let Some((wall, cpu, j)) = run(BIN, &args, &out) {
            println!(
                "open streams: {} of {streams} completed{}; peak concurrent {} ; {wall:.1} s wall, {cpu:.1} s client CPU ({:.3} s / 1k streams)",
                j["completed"], if http2 { " over HTTP/2" } else { " over HTTP/1" }, j["max_concurrent_requests"], cpu / streams as f64 * 1000.0
            );
        }
    }
}
