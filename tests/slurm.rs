//! `disagg launch` under a REAL Slurm cluster (Debian's munge, slurmctld and slurmd,
//! installed by scripts/deps.sh), started by this test inside a loopback-only network
//! namespace by scripts/slurm-cluster.sh: six `slurmd -N nK` nodes at NodeAddr 127.0.0.K,
//! no GPU gres. With simulated engines:
//!
//! - Slurm's host lists expand as `scontrol show hostnames` expands them;
//! - the GB200 guide's shape (2 prefill + 1 decode instances, each DP 8 hybrid over two
//!   nodes) under `srun -N6 --ntasks-per-node=1 disagg launch FILE`: every node's share on
//!   its own node address, requests through the router succeed; `scancel` ends it with
//!   no process left;
//! - a node's share failing: the whole step ends (non-zero), no process left on any node;
//! - `disagg launch FILE --sbatch` submitted with `sbatch`: the same launch, then `scancel`;
//!   again, and a node's share fails: the job ends, no process left;
//! - a file whose `nodes` are not the step's, and a launch in the batch script outside a
//!   step: clear errors; there, `--dry-run` prints every node's commands;
//! - GPUs as Slurm's gres plugin assigns them (4 per node, /dev/loopN stand-ins): with
//!   another job holding devices 0-1, a plan's devices 0-1 are Slurm's 2-3; a plan larger
//!   than the allocation, or a `gpus_per_node` that disagrees, is refused naming both.
//!
//!   cargo test --test slurm        (after scripts/deps.sh; as root)

#[path = "it/support.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use serde_yaml_ng::Value;

use support::*;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const NODES: usize = 6;
const ROUTER_PORT: u16 = 18123;

/// One case: it gets a working folder of its own.
type Case = fn(&Path) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>;

fn main() -> ExitCode {
    if let Some(code) = reexec_in_netns() {
        return code;
    }
    let state = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("slurm-{}", std::process::id()));
    let start = Command::new(format!("{ROOT}/scripts/slurm-cluster.sh"))
        .args(["start", state.to_str().unwrap(), &NODES.to_string(), "17800", "4"])
        .output()
        .expect("run scripts/slurm-cluster.sh");
    assert!(start.status.success(), "the Slurm cluster did not start:\n{}", String::from_utf8_lossy(&start.stderr));
    // Every Slurm command of this process and its children reads this cluster's config.
    std::env::set_var("SLURM_CONF", state.join("slurm.conf"));
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let cases: [(&str, Case); 6] = [
        ("host lists expand as scontrol's", |_| Box::pin(async { host_lists_expand_as_scontrol_does() })),
        ("the GB200 shape under srun, then scancel", |w| Box::pin(gb200_shape_under_srun(w.to_path_buf()))),
        ("a node's share failing ends the step", |w| Box::pin(a_failing_share_ends_the_step(w.to_path_buf()))),
        ("the --sbatch script through sbatch, then scancel", |w| Box::pin(sbatch_script_runs_the_plan(w.to_path_buf()))),
        ("nodes that disagree, and no step", |w| Box::pin(clear_errors(w.to_path_buf()))),
        ("GPUs as Slurm assigns them", |w| Box::pin(gpus_as_slurm_assigns_them(w.to_path_buf()))),
    ];
    let mut failed = 0;
    for (i, (name, case)) in cases.into_iter().enumerate() {
        let work = state.join(format!("case-{i}"));
        std::fs::create_dir_all(&work).unwrap();
        let result = rt.block_on(futures_util::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(case(&work))));
        // Nothing of a case outlives it, whatever it asserted.
        let _ = Command::new("scancel").args(["--user", "root"]).status();
        wait_until_no_jobs(Duration::from_secs(30));
        // The next case's router takes the same port.
        let end = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", ROUTER_PORT)).is_ok() && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(200));
        }
        match result {
            Ok(()) => println!("ok    {name}"),
            Err(_) => {
                failed += 1;
                println!("FAIL  {name}");
            }
        }
    }
    let _ = Command::new(format!("{ROOT}/scripts/slurm-cluster.sh")).args(["stop", state.to_str().unwrap()]).status();
    if failed > 0 {
        for log in std::fs::read_dir(state.join("log")).into_iter().flatten().flatten() {
            eprintln!("--- {}\n{}", log.path().display(), tail(&log.path(), 15));
        }
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn run(cmd: &str, args: &[&str]) -> std::process::Output {
    Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("run {cmd}: {e}"))
}

fn wait_until_no_jobs(within: Duration) {
    let end = Instant::now() + within;
    while Instant::now() < end {
        let out = run("squeue", &["-h", "-o", "%i"]);
        if String::from_utf8_lossy(&out.stdout).trim().is_empty() {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("Slurm jobs still queued after {within:?}: {}", String::from_utf8_lossy(&run("squeue", &[]).stdout));
}

fn host_lists_expand_as_scontrol_does() {
    for list in ["n[1-6]", "gpu[01-04,07]", "x[1-2]-y[3-4],login", "a[8-11],b7", "rack[1-2]-gpu[001-003]"] {
        let out = run("scontrol", &["show", "hostnames", list]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let want: Vec<String> = String::from_utf8_lossy(&out.stdout).lines().map(String::from).collect();
        assert_eq!(disagg::launch::slurm::hostlist::expand(list).unwrap(), want, "{list}");
    }
}

/// The GB200 example made local: simulated engines, no `nodes` (Slurm gives them), the
/// router on node 0, ports of its own; the model's name marks this case's processes.
fn gb200_file(work: &Path, model: &str, timeout: u64) -> PathBuf {
    let mut y: Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(format!("{ROOT}/examples/gb200-2p1d-hybrid.yaml")).unwrap()).unwrap();
    let m = y.as_mapping_mut().unwrap();
    m.remove("nodes");
    y["engine"] = "sim".into();
    y["timeout"] = timeout.into();
    y["working_dir"] = work.display().to_string().into();
    y["scheduler"]["port"] = ROUTER_PORT.into();
    y["scheduler"]["host"] = "127.0.0.1".into();
    y["envs"].as_mapping_mut().unwrap().remove("VLLM_NIXL_SIDE_CHANNEL_PORT");
    let general = y["general"]["params"].as_mapping_mut().unwrap();
    general.remove("port");
    general.remove("host");
    general.insert("model".into(), model.into());
    general.insert("data_parallel_rpc_port".into(), 18200.into());
    for (role, base) in [("prefill", 18300), ("decode", 18400)] {
        y[role]["port"] = base.into();
        y[role]["side_channel_port"] = (base + 50).into();
    }
    let file = work.join("gb200.yaml");
    std::fs::write(&file, serde_yaml_ng::to_string(&y).unwrap()).unwrap();
    file
}

/// Processes of a case still alive: its launchers (their argv names the file), engines
/// (the model's name) and router (its port).
fn leftovers(file: &Path, model: &str) -> Vec<String> {
    let router = format!("--port {ROUTER_PORT}");
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(Result::ok)
        .filter_map(|e| {
            let raw = std::fs::read(e.path().join("cmdline")).ok()?;
            let cmd = String::from_utf8_lossy(&raw).replace('\0', " ");
            let ours = cmd.contains(file.to_str().unwrap()) || cmd.contains(model) || (cmd.contains(" route ") && cmd.contains(&router));
            (ours && !cmd.is_empty()).then(|| format!("{}: {cmd}", e.file_name().to_string_lossy()))
        })
        .collect()
}

async fn until_no_leftovers(file: &Path, model: &str) {
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let left = leftovers(file, model);
        if left.is_empty() {
            return;
        }
        assert!(Instant::now() < end, "processes left after the step ended:\n{}", left.join("\n"));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The router on node 0 answers, listing every node's API server, and serves.
async fn serves_through_every_node(within: Duration) {
    let url = format!("http://127.0.0.1:{ROUTER_PORT}");
    let end = Instant::now() + within;
    loop {
        if let Ok(r) = reqwest::get(format!("{url}/health")).await {
            if r.status().is_success() {
                break;
            }
        }
        assert!(Instant::now() < end, "the router never answered /health");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let workers: serde_json::Value = reqwest::get(format!("{url}/workers")).await.unwrap().json().await.unwrap();
    let text = workers.to_string();
    for k in 1..=NODES {
        assert!(text.contains(&format!("127.0.0.{k}:")), "node {k}'s server is not among the router's workers: {text}");
    }
    for i in 0..12 {
        let (status, v) = post(&format!("{url}/v1/completions"), &json!({"prompt": format!("slurm request {i}"), "max_tokens": 3})).await;
        assert_eq!(status, 200, "{v}");
    }
}

/// Each engine process listens on the address of the node whose slurmd started it.
fn engines_on_their_nodes(model: &str) {
    let mut hosts = std::collections::BTreeSet::new();
    for e in std::fs::read_dir("/proc").unwrap().filter_map(Result::ok) {
        let cmd = String::from_utf8_lossy(&std::fs::read(e.path().join("cmdline")).unwrap_or_default()).replace('\0', " ");
        if !cmd.contains(" sim ") || !cmd.contains(model) {
            continue;
        }
        let host = cmd.split("--host ").nth(1).and_then(|s| s.split(' ').next()).unwrap().to_string();
        // The step's environment says which Slurm node the process runs on.
        let environ = String::from_utf8_lossy(&std::fs::read(e.path().join("environ")).unwrap_or_default()).into_owned();
        let node = environ.split('\0').find_map(|kv| kv.strip_prefix("SLURMD_NODENAME=")).expect("an engine started by slurmd").to_string();
        assert_eq!(host, format!("127.0.0.{}", &node[1..]), "an engine on Slurm node {node} listens on {host}");
        hosts.insert(host);
    }
    assert_eq!(hosts.len(), NODES, "engines on {hosts:?}");
}

fn srun_launch(file: &Path, extra: &[&str]) -> tokio::process::Child {
    srun_with(&[&format!("--nodes={NODES}")], file, extra)
}

/// `srun SRUN_ARGS --ntasks-per-node=1 disagg launch EXTRA FILE`, its output in FILE.srun.out.
fn srun_with(srun_args: &[&str], file: &Path, extra: &[&str]) -> tokio::process::Child {
    let out = std::fs::File::create(file.with_extension("srun.out")).unwrap();
    tokio::process::Command::new("srun")
        .args(srun_args)
        .args(["--ntasks-per-node=1", BIN, "launch"])
        .args(extra)
        .arg(file)
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

/// Every node's launcher said it is ready (srun forwards each node's output as it comes;
/// node 0 says so once it has seen the router healthy).
async fn every_node_ready(output: &Path) {
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        let out = std::fs::read_to_string(output).unwrap_or_default();
        if out.matches("disagg launch ready").count() == NODES {
            return;
        }
        assert!(Instant::now() < end, "not every node said ready:\n{out}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `sbatch -N6 --wrap COMMAND` run to its end: its output (in WORK/TAG-JOB.out).
fn sbatch_wrap(work: &Path, tag: &str, command: &str) -> String {
    let output = work.join(format!("{tag}-%j.out"));
    let submitted = run("sbatch", &["--parsable", &format!("-N{NODES}"), "--output", output.to_str().unwrap(), "--wrap", command]);
    assert!(submitted.status.success(), "{}", String::from_utf8_lossy(&submitted.stderr));
    let job = String::from_utf8_lossy(&submitted.stdout).trim().to_string();
    wait_until_no_jobs(Duration::from_secs(30));
    std::fs::read_to_string(work.join(format!("{tag}-{job}.out"))).unwrap()
}

/// A dry run under `srun SRUN_ARGS`, to its end (within 30 s): did it succeed, its output.
async fn srun_dry_run(srun_args: &[&str], file: &Path) -> (bool, String) {
    let mut srun = srun_with(srun_args, file, &["--dry-run"]);
    let status = tokio::time::timeout(Duration::from_secs(30), srun.wait()).await.expect("a dry run ends").unwrap();
    (status.success(), srun_output(file))
}

fn srun_output(file: &Path) -> String {
    std::fs::read_to_string(file.with_extension("srun.out")).unwrap_or_default()
}

async fn gb200_shape_under_srun(work: PathBuf) {
    let model = "slurm-gb200-srun";
    let file = gb200_file(&work, model, 60);
    let mut srun = srun_launch(&file, &[]);
    serves_through_every_node(Duration::from_secs(60)).await;
    engines_on_their_nodes(model);
    every_node_ready(&file.with_extension("srun.out")).await;
    // scancel: the step ends, every node's share stopped.
    let job = String::from_utf8_lossy(&run("squeue", &["-h", "-o", "%i"]).stdout).trim().to_string();
    assert!(run("scancel", &[&job]).status.success());
    tokio::time::timeout(Duration::from_secs(40), srun.wait()).await.expect("srun ends after scancel").unwrap();
    until_no_leftovers(&file, model).await;
    let out = srun_output(&file);
    assert!(out.matches("stopping every instance").count() >= NODES, "each node stopped its share:\n{out}");
}

async fn a_failing_share_ends_the_step(work: PathBuf) {
    let model = "slurm-gb200-fail";
    let file = gb200_file(&work, model, 60);
    let mut srun = srun_launch(&file, &[]);
    serves_through_every_node(Duration::from_secs(60)).await;
    // The decode instance's second node (hybrid: its own API server) dies.
    kill_engine_on(model, "127.0.0.6");
    let status = tokio::time::timeout(Duration::from_secs(40), srun.wait()).await.expect("the step ends").unwrap();
    let out = srun_output(&file);
    assert!(!status.success(), "the step succeeded with a node's share failed:\n{out}");
    assert!(share_failed(&out), "{out}");
    until_no_leftovers(&file, model).await;
}

/// A decode node's share failed and cancelled the step: node 5's (its engine was killed) or
/// node 4's (its DP master, which stops when its ranks on node 5 go away, as vLLM's does),
/// whichever saw it first.
fn share_failed(out: &str) -> bool {
    (out.contains("node 5 failed") || out.contains("node 4 failed")) && out.contains("cancelled Slurm step")
}

async fn sbatch_script_runs_the_plan(work: PathBuf) {
    let model = "slurm-gb200-sbatch";
    let file = gb200_file(&work, model, 60);
    let script = run(BIN, &["launch", file.to_str().unwrap(), "--sbatch", "--time", "0:10:00"]);
    assert!(script.status.success(), "{}", String::from_utf8_lossy(&script.stderr));
    let text = String::from_utf8(script.stdout).unwrap();
    for line in [format!("#SBATCH --nodes={NODES}"), "#SBATCH --ntasks-per-node=1".into(), "#SBATCH --time=0:10:00".into()] {
        assert!(text.contains(&line), "{line} missing:\n{text}");
    }
    assert!(!text.contains("--gpus-per-node"), "simulated engines need no GPU:\n{text}");
    let path = work.join("job.sh");
    std::fs::write(&path, &text).unwrap();
    let submitted = run("sbatch", &["--parsable", path.to_str().unwrap()]);
    assert!(submitted.status.success(), "{}", String::from_utf8_lossy(&submitted.stderr));
    let job = String::from_utf8_lossy(&submitted.stdout).trim().to_string();
    serves_through_every_node(Duration::from_secs(60)).await;
    engines_on_their_nodes(model);
    every_node_ready(&work.join(format!("logs/slurm-{job}.out"))).await;
    assert!(run("scancel", &[&job]).status.success());
    wait_until_no_jobs(Duration::from_secs(40));
    until_no_leftovers(&file, model).await;

    // The same job again, and a node's share fails: the job ends, nothing is left.
    let submitted = run("sbatch", &["--parsable", path.to_str().unwrap()]);
    let job = String::from_utf8_lossy(&submitted.stdout).trim().to_string();
    let log = work.join(format!("logs/slurm-{job}.out"));
    every_node_ready(&log).await;
    kill_engine_on(model, "127.0.0.6");
    wait_until_no_jobs(Duration::from_secs(40));
    until_no_leftovers(&file, model).await;
    let out = std::fs::read_to_string(&log).unwrap();
    assert!(share_failed(&out), "{out}");
}

/// SIGKILL to this case's engine listening on `host`.
fn kill_engine_on(model: &str, host: &str) {
    let victim = std::fs::read_dir("/proc").unwrap().filter_map(Result::ok).find_map(|e| {
        let cmd = String::from_utf8_lossy(&std::fs::read(e.path().join("cmdline")).unwrap_or_default()).replace('\0', " ");
        (cmd.contains(" sim ") && cmd.contains(model) && cmd.contains(&format!("--host {host} ")))
            .then(|| e.file_name().to_string_lossy().parse::<i32>().unwrap())
    });
    unsafe {
        libc::kill(victim.unwrap_or_else(|| panic!("no engine of {model} on {host}")), libc::SIGKILL);
    }
}

async fn clear_errors(work: PathBuf) {
    let model = "slurm-errors";
    let file = gb200_file(&work, model, 30);
    // A file of its own nodes that are not the step's.
    let mut y: Value = serde_yaml_ng::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    y["nodes"] =
        Value::Sequence((1..=NODES).map(|k| Value::from(if k == 3 { "10.9.9.9".to_string() } else { format!("127.0.0.{k}") })).collect());
    let other = work.join("other-nodes.yaml");
    std::fs::write(&other, serde_yaml_ng::to_string(&y).unwrap()).unwrap();
    let (ok, out) = srun_dry_run(&[&format!("--nodes={NODES}")], &other).await;
    assert!(!ok);
    assert!(out.contains("10.9.9.9") && out.contains("n3 (127.0.0.3)"), "the error names both lists:\n{out}");
    // The same nodes by Slurm's names, in another order: accepted, ranks by the file.
    y["nodes"] = Value::Sequence((1..=NODES).rev().map(|k| Value::from(format!("n{k}"))).collect());
    std::fs::write(&other, serde_yaml_ng::to_string(&y).unwrap()).unwrap();
    let (ok, out) = srun_dry_run(&[&format!("--nodes={NODES}")], &other).await;
    assert!(ok, "{out}");
    assert!(out.contains("node 0 (127.0.0.6)") && out.contains("router http://127.0.0.1:"), "{out}");
    // In the batch script itself, outside any step: the srun line to use instead.
    let log = sbatch_wrap(&work, "nostep", &format!("{BIN} launch {}", file.display()));
    assert!(log.contains("not in a step") && log.contains("srun --nodes=6 --ntasks-per-node=1"), "{log}");
    // There, a dry run prints every node's commands, on the allocation's nodes.
    let log = sbatch_wrap(&work, "dry", &format!("{BIN} launch {} --dry-run", file.display()));
    for k in 1..=NODES {
        assert!(log.contains(&format!("node {} (127.0.0.{k})", k - 1)), "node {k} missing:\n{log}");
    }
    assert!(log.contains("this node: none: not in a step"), "{log}");
    until_no_leftovers(&file, model).await;
}

async fn gpus_as_slurm_assigns_them(work: PathBuf) {
    let file = work.join("gpus.yaml");
    let nixl = |role: &str| format!(r#"'{{"kv_connector":"NixlConnector","kv_role":"{role}"}}'"#);
    let text = format!(
        "timeout: 30\nengine: sim\nnum_gpus: 4\nworking_dir: {}\nscheduler:\n  port: {ROUTER_PORT}\n  host: 127.0.0.1\ngeneral:\n  params:\n    model: slurm-gpus\n\
         prefill:\n  replicas: 1\n  num_gpus: 2\n  port: 18300\n  side_channel_port: 18350\n  params:\n    kv_transfer_config: {}\n\
         decode:\n  replicas: 1\n  num_gpus: 2\n  port: 18400\n  side_channel_port: 18450\n  params:\n    kv_transfer_config: {}\n",
        work.display(),
        nixl("kv_producer"),
        nixl("kv_consumer")
    );
    std::fs::write(&file, &text).unwrap();
    // Another job holds devices 0 and 1 of the first two nodes.
    let holder = run("sbatch", &["--parsable", "-N2", "-w", "n1,n2", "--gpus-per-node=2", "--output=/dev/null", "--wrap", "sleep 120"]);
    assert!(holder.status.success(), "{}", String::from_utf8_lossy(&holder.stderr));
    let end = Instant::now() + Duration::from_secs(20);
    while !String::from_utf8_lossy(&run("squeue", &["-h", "-t", "R", "-o", "%i"]).stdout)
        .contains(String::from_utf8_lossy(&holder.stdout).trim())
    {
        assert!(Instant::now() < end, "the holding job never ran");
        std::thread::sleep(Duration::from_millis(200));
    }
    let (ok, out) = srun_dry_run(&["--nodes=2", "-w", "n1,n2", "--gpus-per-node=2"], &file).await;
    assert!(ok, "{out}");
    assert!(out.contains("2 GPUs per node"), "{out}");
    assert_eq!(out.matches("CUDA_VISIBLE_DEVICES='2,3' ").count(), 2, "the plan's devices 0-1 are Slurm's 2-3 on each node:\n{out}");
    // More than the allocation, and a gpus_per_node that disagrees: refused naming both.
    let (ok, out) = srun_dry_run(&["--nodes=2", "--gpus-per-node=1"], &file).await;
    assert!(!ok, "{out}");
    assert!(out.contains("num_gpus is 4, but Slurm assigned 1 GPU(s) on each of 2 nodes"), "{out}");
    std::fs::write(&file, text.replace("num_gpus: 4\n", "num_gpus: 4\ngpus_per_node: 4\n")).unwrap();
    let (ok, out) = srun_dry_run(&["--nodes=2", "--gpus-per-node=2"], &file).await;
    assert!(!ok, "{out}");
    assert!(out.contains("gpus_per_node is 4, but Slurm assigned 2 GPU(s) on each node"), "{out}");
}
