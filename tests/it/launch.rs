//! `disagg launch`: plans checked line by line, precise errors for bad files, and real
//! local launches of simulated topologies that must come up, serve, and leave nothing.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::support::*;

pub(crate) fn run(args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(BIN).args(args).current_dir(env!("CARGO_MANIFEST_DIR")).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

pub(crate) fn write(name: &str, text: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("launch-{}-{}", std::process::id(), rand::random::<u32>()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn seed_plan_is_exact_line_by_line() {
    let (ok, out, err) = run(&["launch", "examples/deepseek-2p2d.yaml", "--dry-run"]);
    assert!(ok, "{err}");
    let want = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/launch/deepseek-2p2d.plan")).unwrap();
    for (n, (got, want)) in out.lines().zip(want.lines()).enumerate() {
        assert_eq!(got, want, "line {} of the plan", n + 1);
    }
    assert_eq!(out.lines().count(), want.lines().count());
    // Spot checks of what the plan is for (the golden file is reviewed, these say why).
    assert!(out.contains("prefill-1 headless (no HTTP server), GPUs 0,1,2,3,4,5,6,7, side channel 5608, DP 16, ranks 8-15"));
    assert!(out.contains("--data-parallel-start-rank 8 --data-parallel-address 10.0.0.1 --data-parallel-rpc-port 13345 --headless"));
    assert!(
        out.contains("decode-8 http://10.0.0.4:9124, GPUs 0, side channel 6624, DP rank 8 of 16, external LB (own API server)"),
        "9100 + 8*3 + 0"
    );
    assert!(out.contains("--prefill-dp-size 16 --decode-dp-size 1 --policy round_robin --max-concurrent-requests 9216"));
}

#[test]
fn node_rank_prints_and_runs_one_nodes_share() {
    let (ok, out, err) = run(&["launch", "examples/deepseek-2p2d.yaml", "--dry-run", "--node-rank", "3", "--node-size", "4"]);
    assert!(ok, "{err}");
    assert!(out.contains("node 3 (10.0.0.4)") && !out.contains("node 2 (") && !out.contains("router"));
    assert_eq!(out.lines().filter(|l| l.trim_start().starts_with("$ ")).count(), 8);
    let (ok, _, err) = run(&["launch", "examples/deepseek-2p2d.yaml", "--dry-run", "--node-rank", "1", "--node-size", "2"]);
    assert!(!ok && err.contains("--node-size 2, but") && err.contains("4 node(s)"), "{err}");
}

/// vLLM's own pdjob example, unchanged: toy proxy command with placeholders, general
/// params with `port: '{PORT}'`, `_extra_params`.
#[test]
fn pdjob_files_are_accepted_as_they_are() {
    let file = write(
        "pdjob.yaml",
        r#"
timeout: 3600
num_gpus: 16
gpus_per_worker: 1
working_dir: /tmp/vllm
envs: {}

scheduler:
  port: 8021
  command: "python toy_proxy_server.py --port {PORT} --prefiller-hosts $PREFILL_HOST_1 --prefiller-ports $PREFILL_PORT_1 --decoder-hosts $DECODE_HOST_1 --decoder-ports ${DECODE_PORT_1}"

general:
  params:
    model: /path/to/your/model
    host: 0.0.0.0
    port: '{PORT}'
    served_model_name: my_model
    _extra_params: --trust-remote-code

prefill:
  envs:
    VLLM_ATTENTION_BACKEND: FLASHMLA
  num_gpus: 8
  replicas: 1
  params:
    tensor_parallel_size: 8
    kv_transfer_config: '{"kv_connector":"NixlConnector","kv_role":"kv_producer","kv_ip":"{KV_IP}"}'
    _extra_params: ''

decode:
  envs:
    VLLM_ATTENTION_BACKEND: FLASHMLA
  num_gpus: 8
  replicas: 1
  params:
    tensor_parallel_size: 1
    data_parallel_size: 8
    kv_transfer_config: '{"kv_connector":"NixlConnector","kv_role":"kv_consumer"}'
    _extra_params: ''
"#,
    );
    let (ok, out, err) = run(&["launch", file.to_str().unwrap(), "--dry-run"]);
    assert!(ok, "{err}");
    assert!(out.contains("$ python toy_proxy_server.py --port 8021 --prefiller-hosts 127.0.0.1 --prefiller-ports 8100 --decoder-hosts 127.0.0.1 --decoder-ports 9100"), "{out}");
    assert!(out.contains("CUDA_VISIBLE_DEVICES='0,1,2,3,4,5,6,7' VLLM_ATTENTION_BACKEND=FLASHMLA vllm serve /path/to/your/model --host 0.0.0.0 --port 8100"), "{out}");
    assert!(
        out.contains("CUDA_VISIBLE_DEVICES='8,9,10,11,12,13,14,15' VLLM_ATTENTION_BACKEND=FLASHMLA vllm serve"),
        "decode gets the next 8 GPUs: {out}"
    );
    assert!(out.contains(r#""kv_ip":"127.0.0.1""#), "{{KV_IP}} is the first prefill's node");
    assert!(out.contains("--trust-remote-code") && out.contains("--data-parallel-size 8"));
}

#[test]
fn bad_files_get_precise_errors() {
    let base = |prefill: &str, extra: &str| {
        format!("{extra}\nprefill:\n{prefill}\ndecode:\n  replicas: 1\n  params:\n    model: m\n    kv_transfer_config: '{{\"kv_connector\":\"NixlConnector\",\"kv_role\":\"kv_consumer\"}}'\n")
    };
    let kv = "    model: m\n    kv_transfer_config: '{\"kv_connector\":\"NixlConnector\",\"kv_role\":\"kv_producer\"}'";
    let cases: Vec<(String, &str, &str)> = vec![
        (base(&format!("  replica: 2\n  params:\n{kv}"), ""), ":3:", "unknown field `replica`"),
        (base(&format!("  replicas: 0\n  params:\n{kv}"), ""), ":3:", "prefill.replicas: must be greater than 0"),
        (base(&format!("  replicas: two\n  params:\n{kv}"), ""), ":3:", "invalid type"),
        (
            base(&format!("  replicas: 1\n  params:\n{kv}"), "num_gpus: 3\ngpus_per_worker: 2"),
            ":1:",
            "num_gpus: 3 is not a multiple of gpus_per_worker 2",
        ),
        (base("  replicas: 1\n  params:\n    model: m", ""), ":4:", "prefill.params.kv_transfer_config: is required"),
        (base("  replicas: 1\n  params:\n    model: m\n    kv_transfer_config: '{oops'", ""), ":6:", "is not valid JSON"),
        (
            base("  replicas: 1\n  params:\n    model: m\n    kv_transfer_config: '{\"kv_connector\":\"NixlConector\"}'", ""),
            ":6:",
            "unknown connector: kv_connector NixlConector",
        ),
        (
            base("  replicas: 1\n  params:\n    model: m\n    kv_transfer_config: '{\"kv_connector\":\"LMCacheConnectorV1\"}'", ""),
            ":6:",
            "give scheduler.command a proxy",
        ),
        (
            base("  replicas: 1\n  params:\n    model: m\n    kv_transfer_config: '{\"kv_connector\":\"MooncakeConnector\"}'", ""),
            ":11:",
            "names another connector than the prefill's",
        ),
        (base(&format!("  replicas: 3\n  num_gpus: 8\n  params:\n{kv}"), "num_gpus: 16"), ":4:", "no node has 8 free GPUs"),
        (base("  replicas: 1\n  params: {model: m", ""), ":5:", "did not find expected ',' or '}'"),
        (
            base(&format!("  replicas: 1\n  params:\n{kv}\n    served_model_name: ${{env:DISAGG_SURELY_UNSET}}"), ""),
            ":7:",
            "DISAGG_SURELY_UNSET is not set",
        ),
    ];
    for (text, line, msg) in cases {
        let f = write("bad.yaml", &text);
        let (ok, _, err) = run(&["launch", f.to_str().unwrap(), "--dry-run"]);
        assert!(!ok, "accepted:\n{text}");
        assert!(err.contains(&format!("bad.yaml{line}")), "no line {line} in: {err}\n{text}");
        assert!(err.contains(msg), "`{msg}` not in: {err}");
    }
}

/// What the guides showed: one flag per key, placeholders without a value, unknown
/// connectors, MultiConnector's contents, layouts vLLM refuses; each a clear error.
#[test]
fn plan_errors_name_the_field() {
    let file = |prefill_params: &str, extra: &str| {
        format!("{extra}\nnum_gpus: 4\ngpus_per_node: 2\nnodes: [10.0.0.1, 10.0.0.2]\nprefill:\n  replicas: 1\n  num_gpus: 4\n  data_parallel_size: 4\n  params:\n    model: m\n    kv_transfer_config: '{{\"kv_connector\":\"NixlConnector\",\"kv_role\":\"kv_producer\"}}'\n{prefill_params}\ndecode:\n  replicas: 1\n  params:\n    model: m\n    kv_transfer_config: '{{\"kv_connector\":\"NixlConnector\",\"kv_role\":\"kv_consumer\"}}'\n")
    };
    let cases: Vec<(String, &str)> = vec![
        (file("    data_parallel_start_rank: 2", ""), "prefill.params.data_parallel_start_rank: is set by the plan"),
        (file("    data_parallel_size_local: 4", ""), "is 4, but this process runs 2 DP rank(s) locally"),
        (
            file("    max_num_seqs: 8\n    _extra_params: --max_num_seqs=9", ""),
            "--max_num_seqs=9 is also given by prefill.params.max_num_seqs",
        ),
        (file("    _extra_params: --data-parallel-address 1.2.3.4", ""), "is also given by the plan"),
        (file("    seed: '{NODE_SEED}'", ""), "{NODE_SEED} has no value here"),
        (file("", "scheduler:\n  command: 'proxy --prefill $PREFILL_URL_1 --prefill $PREFILL_URL_3'"), "$PREFILL_URL_3 has no value"),
        (file("  dp_mode: hybrid", "").replace("data_parallel_size: 4", "data_parallel_size: 2"), "hybrid LB with one DP rank per node"),
        (file("    data_parallel_hybrid_lb: true\n    data_parallel_external_lb: true", ""), "one DP load-balancing mode"),
        (file("    port: eighty", ""), "eighty is not a port"),
        (
            file("", "").replace(r#""NixlConnector","kv_role":"kv_producer""#, r#""MultiConnector","kv_role":"kv_producer""#),
            "MultiConnector needs kv_connector_extra_config.connectors",
        ),
    ];
    for (text, msg) in cases {
        let f = write("plan.yaml", &text);
        let (ok, _, err) = run(&["launch", f.to_str().unwrap(), "--dry-run"]);
        assert!(!ok, "accepted:\n{text}");
        assert!(err.contains(msg), "`{msg}` not in: {err}\n{text}");
    }
    // The same file without the mistakes is a plan; placeholders fill per node.
    let f = write("plan.yaml", &file("    seed: '{NODE_RANK}'\n    data_parallel_rpc_port: 13999", "envs: {HCCL_IF_IP: '{NODE_IP}'}"));
    let (ok, out, err) = run(&["launch", f.to_str().unwrap(), "--dry-run"]);
    assert!(ok, "{err}");
    assert!(out.contains("HCCL_IF_IP=10.0.0.2") && out.contains("--seed 1") && out.contains("--data-parallel-rpc-port 13999"), "{out}");
    assert!(!out.contains("13345"), "the user's DP port replaces the plan's: {out}");
}

/// A launch in the background; its stdout's "ready" line gives the endpoint.
pub(crate) struct Launch {
    pub child: tokio::process::Child,
    stdout: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    stderr_path: PathBuf,
}

impl Launch {
    pub async fn start(file: &std::path::Path) -> Launch {
        Launch::start_with(file, &[])
    }

    /// `disagg launch EXTRA... FILE`.
    pub fn start_with(file: &std::path::Path, extra: &[&str]) -> Launch {
        let stderr_path = file.with_extension("stderr");
        let args: Vec<&str> = std::iter::once("launch").chain(extra.iter().copied()).chain([file.to_str().unwrap()]).collect();
        let (child, stdout) = spawn_logged(&args, &stderr_path);
        Launch { child, stdout, stderr_path }
    }

    pub async fn ready(&mut self) -> Option<String> {
        ready_url(&mut self.stdout, Duration::from_secs(30)).await
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// SIGTERM, and a clean exit within 30 s.
    pub async fn stop(mut self) {
        unsafe {
            libc::kill(self.child.id().unwrap() as i32, libc::SIGTERM);
        }
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await.expect("launch stops").unwrap();
        assert!(status.success(), "{status}: {}", self.stderr());
    }
}

fn sim_topology(dir_ports: (u16, u16, u16), extra: &str) -> String {
    let (p, d, r) = dir_ports;
    format!(
        r#"
timeout: 30
working_dir: {wd}
engine: sim
scheduler:
  port: {r}
  args: [--policy, round_robin]
general:
  params:
    model: tiny
prefill:
  replicas: 2
  port: {p}
  side_channel_port: {ps}
  params:
    kv_transfer_config: '{{"kv_connector":"NixlConnector","kv_role":"kv_producer"}}'
decode:
  replicas: 1
  port: {d}
  side_channel_port: {ds}
  params:
    kv_transfer_config: '{{"kv_connector":"NixlConnector","kv_role":"kv_consumer"}}'
{extra}
"#,
        wd = std::env::temp_dir().join(format!("disagg-launch-{p}")).display(),
        ps = free_port_run(2),
        ds = free_port_run(1)
    )
}

fn port_free(p: u16) -> bool {
    std::net::TcpListener::bind(("127.0.0.1", p)).is_ok()
}

/// No process of ours still has `needle` (a unique port) on its command line.
fn no_process_with(needle: &str) -> bool {
    std::fs::read_dir("/proc").unwrap().filter_map(Result::ok).all(|e| {
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        !(cmd.contains("disagg") && cmd.contains(&format!(" {needle} ")))
    })
}

#[tokio::test]
async fn a_local_sim_topology_serves_and_tears_down_completely() {
    // Bases far apart: prefill instances take base and base+1.
    let (p, d, r) = (free_port_run(2), free_port_run(1), free_port_run(1));
    let file = write("local.yaml", &sim_topology((p, d, r), ""));
    let mut launch = Launch::start(&file).await;
    let url = launch.ready().await.unwrap_or_else(|| panic!("no ready line:\n{}", launch.stderr()));
    assert_eq!(url, format!("http://127.0.0.1:{r}"));
    for i in 0..4 {
        let (status, v) = post(&format!("{url}/v1/completions"), &json!({"prompt": format!("launched {i}"), "max_tokens": 3})).await;
        assert_eq!(status, 200, "{v}");
    }
    // Both prefills served (round robin), through the one decode.
    assert_eq!(served(&format!("http://127.0.0.1:{p}")).await, 2.0);
    assert_eq!(served(&format!("http://127.0.0.1:{}", p + 1)).await, 2.0);
    assert_eq!(served(&format!("http://127.0.0.1:{d}")).await, 4.0);
    let log_dir = std::env::temp_dir().join(format!("disagg-launch-{p}")).join("logs");
    for name in ["prefill-0", "prefill-1", "decode-0", "router"] {
        let log = std::fs::read_to_string(log_dir.join(format!("{name}.log"))).unwrap_or_else(|_| panic!("{name}.log"));
        assert!(!log.contains('\u{1b}'), "{name}.log has terminal colour codes: {log}");
    }
    let pid = launch.child.id().unwrap() as i32;
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
    let status = tokio::time::timeout(Duration::from_secs(20), launch.child.wait()).await.expect("launch stops").unwrap();
    assert!(status.success(), "{status}: {}", launch.stderr());
    for port in [p, p + 1, d, r] {
        assert!(port_free(port), "port {port} still taken");
        assert!(no_process_with(&port.to_string()), "a process with port {port} survived");
    }
}

#[tokio::test]
async fn an_instance_that_cannot_start_is_named_and_everything_is_cleaned_up() {
    let (p, d, r) = (free_port_run(2), free_port_run(1), free_port_run(1));
    // The decode's port is taken: it cannot start.
    let _squatter = std::net::TcpListener::bind(("127.0.0.1", d)).unwrap();
    let file = write("fail.yaml", &sim_topology((p, d, r), ""));
    let mut launch = Launch::start(&file).await;
    assert!(launch.ready().await.is_none(), "must not become ready");
    let status = match tokio::time::timeout(Duration::from_secs(20), launch.child.wait()).await {
        Ok(s) => s.unwrap(),
        Err(_) => panic!("the launch did not exit:\n{}", launch.stderr()),
    };
    assert!(!status.success());
    let err = launch.stderr();
    assert!(err.contains("decode-0 exited"), "{err}");
    assert!(err.contains("cannot listen on 127.0.0.1"), "the tail of its log is shown: {err}");
    for port in [p, p + 1, r] {
        assert!(port_free(port), "port {port} still taken");
        assert!(no_process_with(&port.to_string()));
    }
}

#[tokio::test]
async fn a_child_dying_later_stops_the_launch() {
    let (p, d, r) = (free_port_run(2), free_port_run(1), free_port_run(1));
    let text = sim_topology((p, d, r), "").replace("engine: sim", "engine:\n  kind: sim\n  args: [--crash-after-requests, \"0\"]");
    let file = write("crash.yaml", &text);
    let mut launch = Launch::start(&file).await;
    let url = launch.ready().await.unwrap_or_else(|| panic!("{}", launch.stderr()));
    // The first request kills a prefill (it crashes while serving request 1).
    let _ = post(&format!("{url}/v1/completions"), &json!({"prompt": "boom", "max_tokens": 2})).await;
    let status = tokio::time::timeout(Duration::from_secs(20), launch.child.wait()).await.expect("launch exits").unwrap();
    assert!(!status.success());
    let err = launch.stderr();
    assert!(err.contains("prefill-0 exited") && err.contains("stopping everything"), "{err}");
    for port in [p, p + 1, d, r] {
        assert!(port_free(port), "port {port} still taken");
    }
}

/// Two "nodes" on one machine (127.0.0.1 and 127.0.0.2, both loopback), each running its
/// share of the plan: node 1 the decode, node 0 the prefill, then the router once node 1's
/// server is healthy.
#[tokio::test]
async fn node_rank_runs_one_share_and_node_0_waits_for_the_others() {
    let (p, d, r) = (free_port_run(2), free_port_run(1), free_port_run(1));
    let text = sim_topology((p, d, r), "nodes: [127.0.0.1, 127.0.0.2]").replace("replicas: 2", "replicas: 1");
    let file = write("nodes.yaml", &text);
    let start = |rank: &str| {
        let err = file.with_extension(format!("{rank}.stderr"));
        let mut child = tokio::process::Command::new(BIN)
            .args(["launch", file.to_str().unwrap(), "--node-rank", rank, "--node-size", "2"])
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&err).unwrap())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        (child, lines, err)
    };
    let (mut n1, mut n1_out, _) = start("1");
    let (mut n0, mut n0_out, n0_err) = start("0");
    assert_eq!(ready_url(&mut n1_out, Duration::from_secs(30)).await.as_deref(), Some("node 1 (1 instances healthy)"));
    let url =
        ready_url(&mut n0_out, Duration::from_secs(30)).await.unwrap_or_else(|| panic!("{}", std::fs::read_to_string(&n0_err).unwrap()));
    assert_eq!(url, format!("http://127.0.0.1:{r}"));
    // The decode of node 1 listens on 127.0.0.2 at its base + 8 * node rank.
    let decode = format!("http://127.0.0.2:{}", d + 8);
    for i in 0..3 {
        let (status, v) = post(&format!("{url}/v1/completions"), &json!({"prompt": format!("two nodes {i}"), "max_tokens": 3})).await;
        assert_eq!(status, 200, "{v}");
    }
    assert_eq!(served(&decode).await, 3.0);
    for child in [&mut n0, &mut n1] {
        unsafe {
            libc::kill(child.id().unwrap() as i32, libc::SIGTERM);
        }
        let status = tokio::time::timeout(Duration::from_secs(20), child.wait()).await.expect("stops").unwrap();
        assert!(status.success());
    }
    assert!(port_free(p) && port_free(r) && std::net::TcpListener::bind(("127.0.0.2", d + 8)).is_ok());
}

/// A router port whose P2pNccl discovery port (the plan's router port + 20000) is free
/// too, both below the kernel's ephemeral range (so no outgoing connection takes them).
fn router_port_with_discovery() -> u16 {
    loop {
        let p = 10_000 + rand::random::<u16>() % 2_700;
        if [p, p + 20_000].iter().all(|q| std::net::TcpListener::bind(("127.0.0.1", *q)).is_ok()) {
            return p;
        }
    }
}

/// Mooncake and P2pNccl topologies of simulators: the plan fills in bootstrap ports, the
/// P2pNccl proxy address and KV ports; `disagg route` runs each connector's flow and the
/// decode computes no prompt itself.
#[tokio::test]
async fn local_sim_topologies_run_mooncake_and_p2pnccl() {
    for class in ["MooncakeConnector", "P2pNcclConnector"] {
        let (p, d, r) = (free_port_run(2), free_port_run(1), router_port_with_discovery());
        let file = write(&format!("{class}.yaml"), &sim_topology((p, d, r), "").replace("NixlConnector", class));
        let mut launch = Launch::start(&file).await;
        let url = launch.ready().await.unwrap_or_else(|| panic!("{class}: no ready line:\n{}", launch.stderr()));
        let decode = format!("http://127.0.0.1:{d}");
        if class == "P2pNcclConnector" {
            // The engines register with the router's discovery address themselves.
            // (/healthcheck counts them; their addresses are the admin's to see.)
            assert!(
                eventually(Duration::from_secs(10), || async {
                    get(&format!("{url}/healthcheck")).await.1.contains("\"prefill_instances\":2")
                })
                .await
            );
        }
        for i in 0..4 {
            let (status, v) = post(
                &format!("{url}/v1/completions"),
                &json!({"prompt": format!("launched {class} {i}"), "max_tokens": 3, "ignore_eos": true}),
            )
            .await;
            assert_eq!(status, 200, "{class}: {v}");
        }
        assert_eq!(served(&decode).await, 4.0, "{class}");
        assert_eq!(
            metric(&metrics(&decode).await, "vllm:prompt_tokens_by_source_total", &[("source", "local_compute")]),
            0.0,
            "{class}: the KV came from the prefills"
        );
        unsafe {
            libc::kill(launch.child.id().unwrap() as i32, libc::SIGTERM);
        }
        let status = tokio::time::timeout(Duration::from_secs(20), launch.child.wait()).await.expect("launch stops").unwrap();
        assert!(status.success(), "{class}: {status}: {}", launch.stderr());
    }
}

/// vLLM plans per connector: what each engine and the router are given.
#[test]
fn vllm_plans_fill_in_what_each_connector_needs() {
    let file = |class: &str| {
        format!("engine: vllm\nscheduler:\n  port: 10002\nprefill:\n  replicas: 2\n  params:\n    model: m\n    kv_transfer_config: '{{\"kv_connector\":\"{class}\",\"kv_role\":\"kv_producer\"}}'\ndecode:\n  replicas: 1\n  params:\n    model: m\n    kv_transfer_config: '{{\"kv_connector\":\"{class}\",\"kv_role\":\"kv_consumer\"}}'\n")
    };
    let f = write("mooncake-vllm.yaml", &file("MooncakeConnector"));
    let (ok, out, err) = run(&["launch", f.to_str().unwrap(), "--dry-run"]);
    assert!(ok, "{err}");
    assert!(out.contains("VLLM_MOONCAKE_BOOTSTRAP_PORT=5600") && out.contains("VLLM_MOONCAKE_BOOTSTRAP_PORT=5601"), "{out}");
    assert!(out.contains("--kv-connector mooncake --prefill http://127.0.0.1:8100 5600 --prefill http://127.0.0.1:8101 5601 --decode http://127.0.0.1:9100"), "{out}");
    assert!(!out.contains("VLLM_NIXL_SIDE_CHANNEL_PORT"), "no NIXL settings for Mooncake: {out}");

    let f = write("p2p-vllm.yaml", &file("P2pNcclConnector"));
    let (ok, out, err) = run(&["launch", f.to_str().unwrap(), "--dry-run"]);
    assert!(ok, "{err}");
    assert!(out.contains("--vllm-pd-disaggregation --vllm-discovery-address 127.0.0.1:30002"), "the runbook's 10002/30002: {out}");
    assert!(
        out.contains(r#""kv_port":5601"#) && out.contains(r#""proxy_ip":"127.0.0.1","proxy_port":"30002","http_port":"8101""#),
        "{out}"
    );
    assert!(out.contains("VLLM_DISABLE_REQUEST_ID_RANDOMIZATION=1"), "{out}");
    assert!(out.contains("P2pNcclConnector was removed from vLLM"), "the plan says which vLLM it needs: {out}");
    assert!(!out.contains("--prefill http"), "P2pNccl engines register; no URLs: {out}");
}

/// `tls:` in the launch file: every engine serves HTTPS requiring client certificates (the
/// simulator takes vLLM's --ssl-* flags), the router serves HTTPS and reaches them with
/// its client certificate, and the launcher's health waits speak https; the plan shows it.
#[tokio::test]
async fn a_tls_topology_launches_and_serves_https_on_both_sides() {
    let c = |f: &str| test_certs().join(f).display().to_string();
    let tls = format!(
        "tls:\n  ca_certs: {}\n  certfile: {}\n  keyfile: {}\n  cert_reqs: 2\n  client_certfile: {}\n  client_keyfile: {}\n",
        c("ca.pem"),
        c("server.pem"),
        c("server.key"),
        c("client.pem"),
        c("client.key")
    );
    let (p, d, r) = (free_port_run(2), free_port_run(1), free_port_run(1));
    let file = write("tls.yaml", &sim_topology((p, d, r), &tls));
    let (ok, out, err) = run(&["launch", "--dry-run", file.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(
        out.contains("--ssl-cert-reqs 2") && out.contains("--worker-ssl-certfile") && out.contains(&format!("https://127.0.0.1:{p}")),
        "{out}"
    );
    let mut launch = Launch::start(&file).await;
    let url = launch.ready().await.unwrap_or_else(|| panic!("no ready line:\n{}", launch.stderr()));
    assert_eq!(url, format!("https://127.0.0.1:{r}"));
    let body = json!({"prompt": "launched over TLS", "max_tokens": 3});
    let (ok, status, answer, err) =
        tokio::task::spawn_blocking(move || curl_tls(&format!("{url}/v1/completions"), Some(&body), Some("client"))).await.unwrap();
    assert!(ok && status == 200, "{status} {answer} {err}");
    // Params that set TLS beside `tls:` are refused, naming the field.
    let twice =
        write("tls-twice.yaml", &sim_topology((p, d, r), &tls).replace("    model: tiny", "    model: tiny\n    ssl_keyfile: x.key"));
    let (ok, _, err) = run(&["launch", "--dry-run", twice.to_str().unwrap()]);
    assert!(!ok && err.contains("ssl_keyfile") && err.contains("tls:"), "{err}");
    unsafe {
        libc::kill(launch.child.id().unwrap() as i32, libc::SIGTERM);
    }
    let _ = tokio::time::timeout(Duration::from_secs(15), launch.child.wait()).await;
}

/// `--check` says why it cannot check where no vLLM is importable (the plan's `vllm` runs
/// with a Python without it, or is no Python program at all), and fails: never a pass.
#[test]
fn check_without_vllm_says_why() {
    let dir = write("x", "").parent().unwrap().to_path_buf();
    let no_vllm = dir.join("vllm");
    std::fs::write(&no_vllm, "#!/usr/bin/env python3\nraise SystemExit(1)\n").unwrap();
    let shell = dir.join("serve.sh");
    std::fs::write(&shell, "#!/bin/sh\nexit 1\n").unwrap();
    for (program, why) in [(no_vllm.display().to_string(), "cannot import vllm"), (shell.display().to_string(), "cannot tell which Python")]
    {
        let file = write(
            "check.yaml",
            &format!(
                "engine:\n  kind: vllm\n  command: {program} serve\ngeneral:\n  params:\n    model: m\nprefill:\n  replicas: 1\n  params:\n    kv_transfer_config: '{{\"kv_connector\":\"NixlConnector\",\"kv_role\":\"kv_producer\"}}'\ndecode:\n  replicas: 1\n  params:\n    kv_transfer_config: '{{\"kv_connector\":\"NixlConnector\",\"kv_role\":\"kv_consumer\"}}'\n"
            ),
        );
        let (ok, _, err) = run(&["launch", file.to_str().unwrap(), "--check"]);
        assert!(!ok, "{program}: --check passed without a vLLM");
        assert!(err.contains("cannot check") && err.contains(why), "{program}: {err}");
    }
}
