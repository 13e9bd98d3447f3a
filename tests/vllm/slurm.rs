//! The real vLLM-CPU 1P1D example launched end to end, under a real Slurm cluster
//! (scripts/slurm-cluster.sh, in this suite's network namespace): `srun -N2
//! --ntasks-per-node=1 disagg launch examples/vllm-cpu-1p1d.yaml`, the file unchanged, with
//! the preflight every launch runs first. Slurm's two nodes (127.0.0.1 and
//! 127.0.0.2) each run their share: the prefill on the first with the router, the decode
//! on the second; the answer through the router equals the same engine's plain answer, the
//! decode pulled the prompt's KV over NIXL, and `scancel` leaves no process behind.

use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::support::*;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

pub async fn vllm_1p1d_under_srun() {
    let venv = script_var("vllm-env.sh", "VENV");
    let model = script_var("vllm-env.sh", "MODEL");
    let work = crate::fresh_dir("slurm-vllm");
    let state = work.join("cluster");
    let start = std::process::Command::new(format!("{ROOT}/scripts/slurm-cluster.sh"))
        .args(["start", state.to_str().unwrap(), "2"])
        .output()
        .expect("run scripts/slurm-cluster.sh");
    assert!(start.status.success(), "the Slurm cluster did not start:\n{}", String::from_utf8_lossy(&start.stderr));
    let conf = state.join("slurm.conf");
    let result = futures_util::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(async {
        let out = std::fs::File::create(work.join("srun.out")).unwrap();
        let mut srun = tokio::process::Command::new("srun")
            .args(["--nodes=2", "--ntasks-per-node=1", BIN, "launch", &format!("{ROOT}/examples/vllm-cpu-1p1d.yaml")])
            .current_dir(&work)
            .env("SLURM_CONF", &conf)
            .env("VENV", &venv)
            .env("MODEL", &model)
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let output = || std::fs::read_to_string(work.join("srun.out")).unwrap_or_default();
        let end = Instant::now() + Duration::from_secs(600);
        while output().matches("disagg launch ready").count() < 2 {
            assert!(Instant::now() < end, "not ready:\n{}", output());
            assert!(srun.try_wait().unwrap().is_none(), "srun ended:\n{}", output());
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let out = output();
        assert!(out.contains("disagg launch ready: http://127.0.0.1:8021"), "{out}");
        // Placed on Slurm's nodes: the decode on the second.
        let (prefill, decode) = ("http://127.0.0.1:8100", "http://127.0.0.2:9108");
        let (status, v) = get(&format!("{decode}/v1/models")).await;
        assert_eq!(status, 200, "the decode on node 2: {v}");
        for (path, prompt) in
            [("/v1/completions", "Slurm placed the prefill and the decode"), ("/v1/chat/completions", "Say where you run")]
        {
            let b = crate::body(path, prompt, 12, false);
            let (status, routed) = post(&format!("http://127.0.0.1:8021{path}"), &b).await;
            assert_eq!(status, 200, "{routed}");
            let (status, plain) = post(&format!("{prefill}{path}"), &b).await;
            assert_eq!(status, 200, "{plain}");
            let text = |v: &serde_json::Value| {
                v["choices"][0]["text"].as_str().or(v["choices"][0]["message"]["content"].as_str()).map(String::from)
            };
            assert_eq!(text(&routed), text(&plain), "{path}: through the router vs the engine alone");
            if path == "/v1/completions" {
                assert_eq!(routed["usage"]["completion_tokens"], 12, "{routed}");
            }
            assert!(text(&routed).is_some_and(|t| !t.is_empty()));
        }
        let m = metrics(decode).await;
        assert!(metric(&m, "vllm:prompt_tokens_by_source_total", &[("source", "external_kv_transfer")]) > 0.0, "the decode pulled no KV");
        let job = String::from_utf8_lossy(
            &std::process::Command::new("squeue").args(["-h", "-o", "%i"]).env("SLURM_CONF", &conf).output().unwrap().stdout,
        )
        .trim()
        .to_string();
        assert!(std::process::Command::new("scancel").arg(&job).env("SLURM_CONF", &conf).status().unwrap().success());
        tokio::time::timeout(Duration::from_secs(60), srun.wait()).await.expect("srun ends after scancel").unwrap();
        // Every vLLM process of both nodes is gone: their ports are free.
        for (host, port) in [("127.0.0.1", 8100u16), ("127.0.0.2", 9108), ("127.0.0.1", 8021)] {
            let end = Instant::now() + Duration::from_secs(30);
            while std::net::TcpListener::bind((host, port)).is_err() {
                assert!(Instant::now() < end, "{host}:{port} still taken after scancel");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    }))
    .await;
    let _ = std::process::Command::new(format!("{ROOT}/scripts/slurm-cluster.sh")).args(["stop", state.to_str().unwrap()]).status();
    if let Err(e) = result {
        eprintln!("srun output:\n{}", std::fs::read_to_string(work.join("srun.out")).unwrap_or_default());
        std::panic::resume_unwind(e);
    }
}
