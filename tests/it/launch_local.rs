//! Launches of the guides' topologies on this machine with simulated engines: pdjob's
//! example with each of its two proxy commands (serving past `timeout`), the GB200 and
//! Ascend multi-node layouts with every "node" its own 127.0.0.N address, and an engine
//! whose children outlive it that still leaves no process behind.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::json;
use serde_yaml_ng::Value;

use crate::launch::Launch;
use crate::support::*;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn work_dir(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("launch-local-{name}-{}", rand::random::<u32>()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// An example file made local: simulated engines, free ports, no GPUs, the given nodes.
fn localize(example: &str, work: &Path, nodes: Option<Vec<&str>>, timeout: u64) -> (PathBuf, u16) {
    let text = std::fs::read_to_string(format!("{ROOT}/{example}")).unwrap();
    let mut y: Value = serde_yaml_ng::from_str(&text).unwrap();
    let router = free_port_run(1);
    y["engine"] = Value::String("sim".into());
    y["timeout"] = timeout.into();
    y["working_dir"] = Value::String(work.display().to_string());
    y["scheduler"]["port"] = router.into();
    if y["scheduler"].get("host").is_some() {
        y["scheduler"]["host"] = Value::String("127.0.0.1".into());
    }
    if let Some(general) = y["general"]["params"].as_mapping_mut() {
        general.remove("port");
        general.remove("host");
    }
    // The plan's side-channel ports (free ones, below), not a guide's fixed 5600.
    if let Some(envs) = y["envs"].as_mapping_mut() {
        envs.remove("VLLM_NIXL_SIDE_CHANNEL_PORT");
    }
    if let Some(n) = nodes {
        let mut list: Vec<Value> = y["nodes"].as_sequence().cloned().unwrap_or_default();
        list.resize(n.len(), Value::Null);
        for (entry, addr) in list.iter_mut().zip(n) {
            match entry {
                Value::Mapping(m) => {
                    m.insert("address".into(), addr.into());
                }
                other => *other = addr.into(),
            }
        }
        y["nodes"] = Value::Sequence(list);
    }
    for role in ["prefill", "decode"] {
        y[role]["port"] = free_port_run(48).into();
        y[role]["side_channel_port"] = free_port_run(48).into();
        if let Some(p) = y[role]["params"].as_mapping_mut() {
            // The sim takes the DP master's port as vLLM does; keep it free and ours.
            if p.contains_key("data_parallel_rpc_port") {
                p.insert("data_parallel_rpc_port".into(), free_port_run(1).into());
            }
        }
    }
    if let Some(p) = y["general"]["params"].as_mapping_mut() {
        if p.contains_key("data_parallel_rpc_port") {
            p.insert("data_parallel_rpc_port".into(), free_port_run(1).into());
        }
    }
    let file = work.join("local.yaml");
    std::fs::write(&file, serde_yaml_ng::to_string(&y).unwrap()).unwrap();
    (file, router)
}

async fn ready(launch: &mut Launch) -> String {
    match launch.ready().await {
        Some(url) => url,
        None => panic!("never ready:\n{}", launch.stderr()),
    }
}

async fn serves(url: &str, n: usize) {
    for i in 0..n {
        let (status, v) = post(&format!("{url}/v1/completions"), &json!({"prompt": format!("guide request {i}"), "max_tokens": 3})).await;
        assert_eq!(status, 200, "{v}");
    }
}

/// pdjob's example with each of its proxy commands (the toy proxy, vllm-router from
/// source), `disagg` standing in for both programs: ready by what each proxy serves, and
/// still serving after `timeout` has passed.
#[tokio::test]
async fn pdjob_examples_launch_and_keep_serving_past_timeout() {
    for (example, program) in [
        ("examples/pdjob-toy-proxy.yaml", "python tests/v1/kv_connector/nixl_integration/toy_proxy_server.py"),
        ("examples/pdjob-vllm-router.yaml", "cargo run --release --"),
    ] {
        let work = work_dir("pdjob");
        let (file, router) = localize(example, &work, None, 3);
        let text = std::fs::read_to_string(&file).unwrap().replace(program, "disagg").replace("--host 0.0.0.0", "--host 127.0.0.1");
        std::fs::write(&file, text).unwrap();
        let mut launch = Launch::start_with(&file, &["--config"]);
        let url = ready(&mut launch).await;
        assert_eq!(url, format!("http://127.0.0.1:{router}"));
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(launch.child.try_wait().unwrap().is_none(), "{example}: the launch stopped after its timeout:\n{}", launch.stderr());
        serves(&url, 4).await;
        launch.stop().await;
    }
}

/// The GB200 guide's layout (hybrid LB, 2 prefill + 1 decode instances over 6 nodes) and
/// the Ascend guide's (internal LB, headless second nodes, per-node env) run with every
/// node its own loopback address: the router reaches every rank through the API servers.
#[tokio::test]
async fn guide_layouts_run_on_loopback_nodes() {
    let work = work_dir("gb200");
    let nodes = vec!["127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5", "127.0.0.6"];
    let (file, router) = localize("examples/gb200-2p1d-hybrid.yaml", &work, Some(nodes), 60);
    let mut launch = Launch::start_with(&file, &[]);
    let url = ready(&mut launch).await;
    assert_eq!(url, format!("http://127.0.0.1:{router}"));
    serves(&url, 16).await;
    // Every prefill API server (one per node, 4 ranks each) served its share.
    let workers: serde_json::Value = reqwest::get(format!("{url}/workers")).await.unwrap().json().await.unwrap();
    let text = workers.to_string();
    for host in ["127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5", "127.0.0.6"] {
        assert!(text.contains(host), "{host} not among the router's workers: {text}");
    }
    launch.stop().await;

    let work = work_dir("ascend");
    let (file, router) = localize("examples/ascend-2p2d.yaml", &work, Some(vec!["127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4"]), 60);
    let mut launch = Launch::start_with(&file, &[]);
    let url = ready(&mut launch).await;
    assert_eq!(url, format!("http://127.0.0.1:{router}"));
    serves(&url, 8).await;
    // The headless nodes serve no HTTP and joined their replica's first node.
    let log = std::fs::read_to_string(work.join("logs/prefill-1.log")).unwrap();
    assert!(log.contains("headless: DP ranks 1-1 of 2"), "{log}");
    let log = std::fs::read_to_string(work.join("logs/decode-0.log")).unwrap();
    assert!(log.contains("DP ranks 2-3 joined"), "{log}");
    launch.stop().await;
}

/// A headless node that goes away takes its replica down, as vLLM's does, and the launch
/// says which instance failed.
#[tokio::test]
async fn a_lost_headless_node_stops_the_launch() {
    let work = work_dir("lost-node");
    let (file, _) = localize("examples/ascend-2p2d.yaml", &work, Some(vec!["127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4"]), 60);
    let mut launch = Launch::start_with(&file, &[]);
    ready(&mut launch).await;
    // The headless decode node: its replica's DP port is this launch's own.
    let y: Value = serde_yaml_ng::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    let rpc = format!("--data-parallel-rpc-port {}", y["general"]["params"]["data_parallel_rpc_port"].as_u64().unwrap());
    let pid = std::fs::read_dir("/proc").unwrap().filter_map(Result::ok).find_map(|e| {
        let cmd = String::from_utf8_lossy(&std::fs::read(e.path().join("cmdline")).unwrap_or_default()).replace('\0', " ");
        (cmd.contains(" sim ") && cmd.contains("--headless") && cmd.contains("--data-parallel-start-rank 2") && cmd.contains(&rpc))
            .then(|| e.file_name().to_string_lossy().parse::<i32>().ok())
            .flatten()
    });
    let pid = pid.expect("the headless decode node's process");
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
    let status = tokio::time::timeout(Duration::from_secs(30), launch.child.wait()).await.expect("the launch stops").unwrap();
    assert!(!status.success());
    let err = launch.stderr();
    assert!(err.contains("exited"), "{err}");
}

/// An engine that starts children which ignore SIGTERM: whether the launch is stopped or
/// the engine dies first, no process of its group survives the launch.
#[tokio::test]
async fn engine_children_never_outlive_the_launch() {
    let work = work_dir("children");
    let fake = work.join("fake-engine.sh");
    std::fs::write(
        &fake,
        r#"#!/bin/sh
# A fake engine: a child that ignores SIGTERM, then the simulator in the engine's place.
host=127.0.0.1; port=0
while [ $# -gt 0 ]; do case "$1" in --host) host=$2; shift;; --port) port=$2; shift;; esac; shift; done
sh -c 'trap "" TERM; while :; do sleep 1; done' &
echo "child $! leader $$" >> "$PIDS"
exec "$DISAGG" sim --host "$host" --port "$port"
"#,
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let pids = work.join("pids");
    for kill_leader_first in [false, true] {
        let _ = std::fs::remove_file(&pids);
        let (p, d, r) = (free_port_run(1), free_port_run(1), free_port_run(1));
        let file = work.join("children.yaml");
        std::fs::write(&file, format!(r#"
timeout: 30
working_dir: {work}
envs: {{PIDS: {pids}, DISAGG: {bin}}}
engine: {{kind: vllm, command: {fake}}}
scheduler: {{port: {r}}}
general: {{params: {{model: m}}}}
prefill: {{replicas: 1, port: {p}, side_channel_port: {ps}, params: {{kv_transfer_config: '{{"kv_connector":"NixlConnector","kv_role":"kv_producer"}}'}}}}
decode: {{replicas: 1, port: {d}, side_channel_port: {ds}, params: {{kv_transfer_config: '{{"kv_connector":"NixlConnector","kv_role":"kv_consumer"}}'}}}}
"#, work = work.display(), pids = pids.display(), bin = BIN, fake = fake.display(), ps = free_port_run(1), ds = free_port_run(1))).unwrap();
        let mut launch = Launch::start_with(&file, &[]);
        ready(&mut launch).await;
        let text = std::fs::read_to_string(&pids).unwrap();
        let ids: Vec<(i32, i32)> = text
            .lines()
            .map(|l| {
                let w: Vec<&str> = l.split_whitespace().collect();
                (w[1].parse().unwrap(), w[3].parse().unwrap())
            })
            .collect();
        assert_eq!(ids.len(), 2);
        if kill_leader_first {
            // The engine itself dies; its child lives on in the group.
            unsafe {
                libc::kill(ids[0].1, libc::SIGKILL);
            }
            let status = tokio::time::timeout(Duration::from_secs(30), launch.child.wait()).await.expect("the launch stops").unwrap();
            assert!(!status.success());
        } else {
            launch.stop().await;
        }
        for (child, _) in &ids {
            assert!(gone(*child), "kill_leader_first={kill_leader_first}: engine child {child} survived the launch");
        }
    }
}

/// The process is gone (or a zombie nobody has reaped yet).
fn gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('Z')),
    }
}

/// The launcher script's flags run for real: `--role decode -n 2` starts two servers at the
/// script's ports (decode: base + 1000) with their side channels, waits for them, and
/// stops them (a fake `vllm serve` that runs the simulator in its place).
#[tokio::test]
async fn launcher_script_flags_start_the_servers_they_plan() {
    let work = work_dir("script");
    let fake = work.join("fake-vllm.sh");
    std::fs::write(&fake, format!("#!/bin/sh\n# `vllm serve MODEL --port P ...` -> the simulator on P, its side channel from the env\nport=0\nwhile [ $# -gt 0 ]; do case \"$1\" in --port) port=$2; shift;; esac; shift; done\nexec {BIN} sim --host 127.0.0.1 --port \"$port\" --side-channel-port \"$VLLM_NIXL_SIDE_CHANNEL_PORT\"\n")).unwrap();
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    // Base ports 1000 below free ones: the decode servers listen at base + 1000 + i.
    let (http, side) = (free_port_run(2) - 1000, free_port_run(2) - 1000);
    let args = [
        "launch",
        "--role",
        "decode",
        "-n",
        "2",
        "--base-port",
        &http.to_string(),
        "--base-channel-port",
        &side.to_string(),
        "--node-ip",
        "127.0.0.1",
        "--vllm-command",
        fake.to_str().unwrap(),
        "--log-dir",
        work.to_str().unwrap(),
        "--timeout",
        "30",
    ];
    let (mut child, mut lines) = spawn_logged(&args, &work.join("launch.err"));
    let ready = ready_url(&mut lines, Duration::from_secs(30)).await;
    assert_eq!(
        ready.as_deref(),
        Some("node 0 (2 instances healthy)"),
        "{}",
        std::fs::read_to_string(work.join("launch.err")).unwrap_or_default()
    );
    for i in 0..2 {
        let url = format!("http://127.0.0.1:{}", http + 1000 + i);
        assert_eq!(get(&format!("{url}/health")).await.0, 200, "{url}");
        let banner = std::fs::read_to_string(work.join(format!("logs/decode-{i}.log"))).unwrap();
        assert!(banner.contains(&format!("side_channel_ports=[{}]", side + 1000 + i)), "{banner}");
    }
    unsafe {
        libc::kill(child.id().unwrap() as i32, libc::SIGTERM);
    }
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait()).await.expect("launch stops").unwrap();
    assert!(status.success());
    assert!(std::net::TcpListener::bind(("127.0.0.1", http + 1000)).is_ok(), "the servers are gone");
}
