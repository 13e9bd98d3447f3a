//! `disagg launch --ray` on a REAL local Ray cluster (Ray from PyPI, scripts/ray-env.sh),
//! started by this test inside a loopback-only network namespace (where Ray registers the
//! node as 127.0.0.1; RAY.md), with the simulated engine (no GPUs needed).
//!
//!   cargo test --test ray        (after scripts/ray-env.sh; as root)

#[path = "it/support.rs"]
mod support;

use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::time::Duration;

use serde_json::json;

use support::*;

fn main() -> ExitCode {
    if let Some(code) = reexec_in_netns() {
        return code;
    }
    let venv = PathBuf::from(script_var("ray-env.sh", "RAY_VENV"));
    assert!(venv.join(".disagg-complete").is_file(), "no Ray venv at {}: run scripts/ray-env.sh", venv.display());
    let ray = venv.join("bin/ray");
    let start = Command::new(&ray)
        .args([
            "start",
            "--head",
            "--port",
            "6379",
            "--node-ip-address",
            "127.0.0.1",
            "--num-cpus",
            "4",
            "--num-gpus",
            "4",
            "--disable-usage-stats",
            "--include-dashboard",
            "false",
        ])
        .env("RAY_USAGE_STATS_ENABLED", "0")
        .output()
        .expect("run ray start");
    assert!(start.status.success(), "ray start failed:\n{}", String::from_utf8_lossy(&start.stderr));
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let result = rt.block_on(futures_util::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(launch_on_ray(&venv))));
    let _ = Command::new(&ray).args(["stop", "--force"]).stdout(Stdio::null()).stderr(Stdio::null()).status();
    match result {
        Ok(()) => {
            println!("ok    disagg launch --ray on a local Ray cluster");
            ExitCode::SUCCESS
        }
        Err(_) => {
            println!("FAIL  disagg launch --ray on a local Ray cluster");
            ExitCode::FAILURE
        }
    }
}

async fn launch_on_ray(venv: &std::path::Path) {
    let work = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("launch-ray");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();
    let file = work.join("ray.yaml");
    std::fs::write(
        &file,
        format!(
            r#"
timeout: 60
working_dir: {}
engine: sim
num_gpus: 4
gpus_per_worker: 2
scheduler:
  port: 8021
  args: [--policy, round_robin]
general:
  params:
    model: tiny
prefill:
  replicas: 2
  num_gpus: 2
  params:
    kv_transfer_config: '{{"kv_connector":"NixlConnector","kv_role":"kv_producer"}}'
decode:
  replicas: 1
  params:
    kv_transfer_config: '{{"kv_connector":"NixlConnector","kv_role":"kv_consumer"}}'
"#,
            work.display()
        ),
    )
    .unwrap();
    let (mut child, mut lines) = spawn_logged(
        &["launch", file.to_str().unwrap(), "--ray", "127.0.0.1:6379", "--ray-python", venv.join("bin/python").to_str().unwrap()],
        &work.join("launch.err"),
    );
    let url = ready_url(&mut lines, Duration::from_secs(120))
        .await
        .unwrap_or_else(|| panic!("launch never ready:\n{}", std::fs::read_to_string(work.join("launch.err")).unwrap_or_default()));
    assert_eq!(url, "http://127.0.0.1:8021", "the router runs on the head node");
    let err = std::fs::read_to_string(work.join("launch.err")).unwrap();
    for name in ["prefill-0", "prefill-1", "decode-0"] {
        assert!(err.contains(&format!("{name} (")) && err.contains("placed on 127.0.0.1"), "{err}");
    }
    // gpus_per_worker 2: each prefill replica is one bundle of 2 GPUs, its actor holds both
    // (Ray started with 4 logical GPUs; the simulator does not use them).
    for name in ["prefill-0", "prefill-1"] {
        let line = err.lines().find(|l| l.starts_with(&format!("{name} ("))).unwrap();
        let gpus = line.rsplit("GPUs [").next().unwrap().trim_end_matches(']');
        assert_eq!(gpus.split(',').filter(|g| !g.is_empty()).count(), 2, "{line}");
    }
    for i in 0..4 {
        let (status, v) = post(&format!("{url}/v1/completions"), &json!({"prompt": format!("ray {i}"), "max_tokens": 3})).await;
        assert_eq!(status, 200, "{v}");
    }
    assert_eq!(served("http://127.0.0.1:8100").await, 2.0);
    assert_eq!(served("http://127.0.0.1:8101").await, 2.0);
    assert_eq!(served("http://127.0.0.1:9100").await, 4.0);
    // The instances run under Ray actors (their logs are where the driver put them).
    for name in ["prefill-0", "prefill-1", "decode-0", "router"] {
        assert!(work.join("logs").join(format!("{name}.log")).is_file(), "{name}.log");
    }
    unsafe {
        libc::kill(child.id().unwrap() as i32, libc::SIGTERM);
    }
    let status = tokio::time::timeout(Duration::from_secs(60), child.wait()).await.expect("launch stops").unwrap();
    assert!(status.success(), "{}", std::fs::read_to_string(work.join("launch.err")).unwrap_or_default());
    for port in [8100u16, 8101, 9100, 8021] {
        assert!(std::net::TcpListener::bind(("127.0.0.1", port)).is_ok(), "port {port} freed");
    }
}
