//! The simulator at the scale routing is judged at: 32 simulated instances (16,384 KV
//! blocks each, prefix caching and KV events on, the `mocker` timing profile) behind a
//! round-robin router, under a 200 requests/s open-loop load of shared-prefix prompts.
//! Reports the simulators' CPU per request (from /proc of each sim process), and whether
//! the load was served.
//!
//!   cargo bench --bench sim_scale          (DISAGG_SCALE_SECS, default 30)

use std::process::{Command, Stdio};
use std::time::Instant;

use serde_json::Value;

use disagg::proc_stat::cpu_secs;

const BIN: &str = env!("CARGO_BIN_EXE_disagg");
const SIMS: usize = 32;

struct Child(std::process::Child, String);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(args: &[String]) -> Child {
    let mut c = Command::new(BIN).args(args).env("RUST_LOG", "warn").stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(c.stdout.take().unwrap()), &mut line).unwrap();
    let url = line.split_whitespace().find(|w| w.starts_with("http://")).unwrap().to_string();
    Child(c, url)
}

fn main() {
    let secs: u64 = std::env::var("DISAGG_SCALE_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(30);
    let sims: Vec<Child> = (0..SIMS)
        .map(|_| {
            let args = [
                "sim",
                "--port",
                "0",
                "--kv-blocks",
                "16384",
                "--block-size",
                "16",
                "--max-num-seqs",
                "512",
                "--timing-profile",
                "mocker",
                "--kv-events-config",
                r#"{"enable_kv_cache_events":true,"publisher":"zmq","endpoint":"tcp://*:0","topic":"kv-events"}"#,
            ];
            start(&args.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        })
        .collect();
    let mut router_args: Vec<String> =
        ["route", "--port", "0", "--policy", "round_robin", "--max-concurrent-requests", "100000", "--worker-urls"]
            .iter()
            .map(|s| s.to_string())
            .collect();
    router_args.extend(sims.iter().map(|s| s.1.clone()));
    let router = start(&router_args);
    std::thread::sleep(std::time::Duration::from_secs(2));
    let before: f64 = sims.iter().map(|s| cpu_secs(s.0.id())).sum();
    let n = secs * 200;
    let out = std::env::temp_dir().join("disagg-sim-scale.json");
    let t = Instant::now();
    let status = Command::new(BIN)
        .args([
            "bench",
            "--backend",
            "vllm",
            "--base-url",
            &router.1,
            "--model",
            "sim-model",
            "--dataset-name",
            "random",
            "--tokenizer",
            "sim",
            "--random-input-len",
            "1024",
            "--random-output-len",
            "64",
            "--random-prefix-len",
            "512",
            "--ignore-eos",
            "--num-prompts",
            &n.to_string(),
            "--request-rate",
            "200",
            "--save-result",
            "--result-filename",
            out.to_str().unwrap(),
            "--disable-tqdm",
        ])
        .stdout(Stdio::null())
        .status()
        .unwrap();
    let wall = t.elapsed().as_secs_f64();
    assert!(status.success());
    let after: f64 = sims.iter().map(|s| cpu_secs(s.0.id())).sum();
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let done = r["completed"].as_f64().unwrap_or(0.0);
    println!("sim scale: {SIMS} simulated instances x 16,384 blocks, mocker timing, KV events on");
    println!(
        "  {n} requests at 200 req/s offered: {done} completed, {} failed in {wall:.1}s ({:.1} req/s)",
        r["failed"],
        r["request_throughput"].as_f64().unwrap_or(0.0)
    );
    println!(
        "  mean TTFT {:.1} ms, mean TPOT {:.2} ms",
        r["mean_ttft_ms"].as_f64().unwrap_or(0.0),
        r["mean_tpot_ms"].as_f64().unwrap_or(0.0)
    );
    println!("  simulators' CPU: {:.2} s in all, {:.3} ms per request", after - before, (after - before) * 1000.0 / done.max(1.0));
}
