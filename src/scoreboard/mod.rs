//! `disagg scoreboard`: one trace, one simulated cluster, every router and policy side by
//! side. For each row, fresh simulators (N prefills and M decodes with a GPU timing model,
//! prefix caching and KV events) are started, the router under test in front of them
//! (`disagg route --policy P`, or vllm-router with its policy), and `disagg bench` replays
//! the trace through it. What the row says comes from the engines where it can (their own
//! prefix-cache counters: hit rate, and the prompt tokens each prefill computed: load
//! skew), from the bench's result (TTFT, E2E, goodput under the TTFT SLO), and from
//! /proc (the router's CPU). Beside the rows: the oracle bound (oracle.rs). Writes
//! `scoreboard.md`, `scoreboard.svg` and each row's bench result to `--out`.

mod oracle;
pub(crate) mod phases;
pub(crate) mod plan;
mod report;
mod tenants;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use serde_json::Value;

use crate::router::policy::PolicyKind;

#[derive(Args, Debug, Clone)]
pub(crate) struct ScoreboardArgs {
    /// `trace`: every policy over a trace; `tenants`: flow control against a flood
    /// (tenants.rs); `phases`: a workload whose shape shifts, on fixed splits, colocated
    /// and elastic engines (phases.rs).
    #[arg(long, value_enum, default_value_t = Scenario::Trace)]
    pub(crate) scenario: Scenario,
    /// A Mooncake trace (JSONL), replayed as `disagg bench --dataset-name mooncake_trace`
    /// (the trace scenario).
    #[arg(long, required_if_eq("scenario", "trace"))]
    pub(crate) dataset_path: Option<PathBuf>,
    /// The tenants scenario: seconds (simulated) of arrivals.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) tenants_seconds: u64,
    /// The tenants scenario: prompt tokens per request.
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) input_len: u64,
    /// The tenants scenario: output tokens per request.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) output_len: u64,
    /// Requests replayed: the trace's first N.
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) num_prompts: u64,
    /// Arrivals this many times faster than the trace's timestamps (more load).
    #[arg(long, default_value_t = 1.0, value_parser = crate::flags::positive)]
    pub(crate) trace_speedup: f64,
    /// Prompt tokens per hash id (the traces' own: 512).
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) trace_block_size: u64,
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) prefills: u64,
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) decodes: u64,
    /// Each simulator's KV cache, in blocks of --block-size tokens.
    #[arg(long, default_value_t = 30_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) kv_blocks: u64,
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) block_size: u64,
    /// The simulators' step times (`disagg sim --timing-profile`).
    #[arg(long, default_value = "mocker")]
    pub(crate) timing_profile: String,
    /// Run the simulators (and the bench's clock) K times faster than simulated time.
    #[arg(long, default_value_t = 1.0, value_parser = crate::flags::positive)]
    pub(crate) sim_speedup: f64,
    /// `disagg route` policies, one row each.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "round_robin,power_of_two,cache_aware,kv_aware")]
    pub(crate) policies: Vec<PolicyKind>,
    /// The vllm-router binary (scripts/vllm-router-env.sh installs 0.1.17 and prints it);
    /// without it, vllm-router's rows are left out (and the table says so).
    #[arg(long)]
    pub(crate) vllm_router: Option<PathBuf>,
    /// More flags for every `disagg route` row, whitespace-separated (e.g.
    /// `--kv-aware-load-weight 0.25`).
    #[arg(long, allow_hyphen_values = true, default_value = "")]
    pub(crate) route_args: String,
    /// vllm-router policies, one row each.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "round_robin,cache_aware")]
    pub(crate) vllm_router_policies: Vec<PolicyKind>,
    /// The SLO goodput counts against: TTFT at most this many ms (simulated time).
    #[arg(long, default_value_t = 2000.0, value_parser = crate::flags::positive)]
    pub(crate) slo_ttft_ms: f64,
    /// The phases scenario: TPOT at most this many ms for goodput (and elastic's ITL SLO).
    #[arg(long, default_value_t = 50.0, value_parser = crate::flags::positive)]
    pub(crate) slo_tpot_ms: f64,
    /// The phases scenario: engines in every row (fixed splits at 1/4, 1/2 and 3/4
    /// prefills, all colocated, all elastic).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(4..=64))]
    pub(crate) engines: u64,
    /// The phases scenario: NAME:INPUT_LEN:OUTPUT_LEN:RATE:PROMPTS, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = phases::DEFAULT_PHASES)]
    pub(crate) phases: Vec<phases::Phase>,
    /// Where the table, the plot and each row's bench result go.
    #[arg(long, default_value = "scoreboard")]
    pub(crate) out: PathBuf,
    /// Exit non-zero when kv_aware misses a goal (hit rate >= 90% of the oracle, prefill
    /// load skew <= --goal-max-skew, TTFT p99 below every other row's).
    #[arg(long)]
    pub(crate) check_goals: bool,
    /// The prefill load skew kv_aware may reach (or round_robin's in the same run, when
    /// the trace itself is that uneven).
    #[arg(long, default_value_t = 1.25, value_parser = crate::flags::positive)]
    pub(crate) goal_max_skew: f64,
    /// Noise allowed on short runs: kv_aware's TTFT p99 must be below every other row's
    /// times (1 + this).
    #[arg(long, default_value_t = 0.0, value_parser = crate::flags::non_negative)]
    pub(crate) goal_p99_slack: f64,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Scenario {
    Trace,
    Tenants,
    Phases,
}

/// One row's figures.
#[derive(Debug, Clone, Default)]
pub(crate) struct Row {
    pub(crate) router: String,
    pub(crate) policy: String,
    pub(crate) ttft_p50: f64,
    pub(crate) ttft_p99: f64,
    pub(crate) e2el_p50: f64,
    pub(crate) hit_rate: f64,
    pub(crate) prefill_skew: f64,
    pub(crate) goodput: f64,
    pub(crate) router_cpu_ms_per_req: f64,
    pub(crate) failed: u64,
    /// Why the row could not be measured (its router did not start, the bench failed).
    pub(crate) error: Option<String>,
}

/// A child process group, killed when dropped.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the group this child leads (spawned with process_group(0)).
        unsafe { libc::kill(-(self.0.id() as i32), libc::SIGKILL) };
        let _ = self.0.wait();
    }
}

fn spawn(program: &std::path::Path, args: &[String], log: &std::path::Path) -> anyhow::Result<Child> {
    use std::os::unix::process::CommandExt;
    let out = std::fs::File::create(log).with_context(|| format!("cannot write {}", log.display()))?;
    let child = std::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .process_group(0)
        .spawn()
        .with_context(|| format!("cannot start {}", program.display()))?;
    Ok(Child(child))
}

/// `n` ports free a moment ago, below the kernel's ephemeral range, so that no outgoing
/// connection (the bench's, the router's, a KV-event subscriber's) takes one of them
/// before its server binds it.
fn free_ports(n: usize) -> anyhow::Result<Vec<u16>> {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap_or_default();
    let ephemeral = range.split_whitespace().next().and_then(|p| p.parse::<u16>().ok()).unwrap_or(32768).max(12_000);
    let mut ports = Vec::with_capacity(n);
    let mut candidate = 10_000 + rand::random::<u16>() % (ephemeral - 10_000);
    for _ in 0..(ephemeral - 10_000) {
        if ports.len() == n {
            break;
        }
        candidate = if candidate + 1 >= ephemeral { 10_000 } else { candidate + 1 };
        if std::net::TcpListener::bind(("0.0.0.0", candidate)).is_ok() {
            ports.push(candidate);
        }
    }
    if ports.len() < n {
        bail!("fewer than {n} free ports below {ephemeral}");
    }
    Ok(ports)
}

/// Waits for `url`'s /health, unless the process serving it exits first.
async fn wait_healthy(
    client: &reqwest::Client,
    url: &str,
    child: &mut Child,
    log: &std::path::Path,
    within: Duration,
) -> anyhow::Result<()> {
    let end = Instant::now() + within;
    loop {
        if client.get(format!("{url}/health")).send().await.is_ok_and(|r| r.status().is_success()) {
            return Ok(());
        }
        if let Ok(Some(status)) = child.0.try_wait() {
            bail!("{url} exited ({status}) before it was healthy; see {}", log.display());
        }
        if Instant::now() > end {
            bail!("{url} was not healthy within {}s", within.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A counter's sum over its series (every engine) on a /metrics page.
fn counter(text: &str, name: &str) -> f64 {
    crate::api::prom::samples(text, name).map(|(_, v)| v).sum()
}

/// The simulated cluster of one row.
struct Cluster {
    _children: Vec<Child>,
    prefills: Vec<String>,
    decodes: Vec<String>,
    /// Each simulator's KV-event endpoint (for vllm-router's kv_aware).
    events: Vec<(String, String)>,
}

async fn start_cluster(
    a: &ScoreboardArgs,
    exe: &std::path::Path,
    dir: &std::path::Path,
    client: &reqwest::Client,
    extra: &[String],
) -> anyhow::Result<Cluster> {
    let n = (a.prefills + a.decodes) as usize;
    let ports = free_ports(3 * n)?;
    let (mut children, mut prefills, mut decodes, mut events) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..n {
        let (role, k) = if i < a.prefills as usize { ("prefill", i) } else { ("decode", i - a.prefills as usize) };
        let (http, ev, replay) = (ports[3 * i], ports[3 * i + 1], ports[3 * i + 2]);
        let engine =
            SimEngine { block_size: a.block_size, kv_blocks: a.kv_blocks, timing_profile: &a.timing_profile, speedup: a.sim_speedup };
        let mut args = engine.args(role, (http, ev, replay));
        args.push("--enable-prompt-tokens-details".into());
        args.extend_from_slice(extra);
        let log = dir.join(format!("{role}-{k}.log"));
        children.push((spawn(exe, &args, &log)?, log));
        let url = format!("http://127.0.0.1:{http}");
        events.push((url.clone(), format!("tcp://127.0.0.1:{ev}")));
        if role == "prefill" {
            prefills.push(url)
        } else {
            decodes.push(url)
        }
    }
    for (url, (child, log)) in prefills.iter().chain(&decodes).zip(children.iter_mut()) {
        wait_healthy(client, url, child, log, Duration::from_secs(60)).await?;
    }
    Ok(Cluster { _children: children.into_iter().map(|(c, _)| c).collect(), prefills, decodes, events })
}

/// A simulated engine of a row: its KV cache and timing.
pub(crate) struct SimEngine<'a> {
    pub(crate) block_size: u64,
    pub(crate) kv_blocks: u64,
    pub(crate) timing_profile: &'a str,
    pub(crate) speedup: f64,
}

impl SimEngine<'_> {
    /// `disagg sim` in `role` on these ports (HTTP, KV events, their replay), with prefix
    /// caching and KV events.
    pub(crate) fn args(&self, role: &str, (http, ev, replay): (u16, u16, u16)) -> Vec<String> {
        let config = format!(
            r#"{{"enable_kv_cache_events":true,"publisher":"zmq","endpoint":"tcp://*:{ev}","replay_endpoint":"tcp://*:{replay}","topic":"kv-events"}}"#
        );
        [
            "sim",
            "--role",
            role,
            "--port",
            &http.to_string(),
            "--block-size",
            &self.block_size.to_string(),
            "--kv-blocks",
            &self.kv_blocks.to_string(),
            "--timing-profile",
            self.timing_profile,
            "--speedup",
            &self.speedup.to_string(),
            "--max-model-len",
            &(self.kv_blocks * self.block_size).to_string(),
            "--kv-events-config",
            &config,
        ]
        .map(String::from)
        .to_vec()
    }
}

/// What every row's `disagg bench` measures and where it writes it: TTFT and E2E p50/p99,
/// goodput under the TTFT SLO, at the simulators' speed.
fn measured(a: &ScoreboardArgs, result: &std::path::Path) -> Vec<String> {
    [
        "--speedup",
        &a.sim_speedup.to_string(),
        "--percentile-metrics",
        "ttft,e2el",
        "--metric-percentiles",
        "50,99",
        "--goodput",
        &format!("ttft:{}", a.slo_ttft_ms),
        "--save-result",
        "--save-detailed",
        "--result-filename",
        &result.to_string_lossy(),
        "--disable-tqdm",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// The router's command line for a row.
fn router_command(
    a: &ScoreboardArgs,
    exe: &std::path::Path,
    c: &Cluster,
    vllm_router: bool,
    policy: &str,
    port: u16,
) -> (PathBuf, Vec<String>) {
    let mut args: Vec<String> = if vllm_router { vec!["--vllm-pd-disaggregation".into()] } else { vec!["route".into()] };
    for p in &c.prefills {
        args.extend(["--prefill".into(), p.clone()]);
    }
    for d in &c.decodes {
        args.extend(["--decode".into(), d.clone()]);
    }
    args.extend(["--policy".into(), policy.into(), "--port".into(), port.to_string(), "--host".into(), "127.0.0.1".into()]);
    args.extend(["--max-concurrent-requests".into(), "100000".into(), "--queue-size".into(), "100000".into()]);
    if vllm_router && policy == "kv_aware" {
        // vllm-router takes the prefills' KV events in PD mode (--pd-kv-events).
        for (url, endpoint) in c.events.iter().filter(|(u, _)| c.prefills.contains(u)) {
            args.extend(["--pd-kv-events".into(), format!("{url}={endpoint}")]);
        }
        args.extend(["--kv-event-block-size".into(), a.block_size.to_string(), "--kv-event-model".into(), "sim-model".into()]);
    }
    if !vllm_router {
        args.extend(a.route_args.split_whitespace().map(str::to_owned));
    }
    let program = if vllm_router { a.vllm_router.clone().expect("only with --vllm-router") } else { exe.to_path_buf() };
    (program, args)
}

async fn run_row(a: &ScoreboardArgs, exe: &std::path::Path, vllm_router: bool, policy: PolicyKind) -> anyhow::Result<Row> {
    let policy = policy.to_possible_value().map(|v| v.get_name().to_string()).unwrap_or_default();
    let router_name = if vllm_router { "vllm-router 0.1.17" } else { "disagg route" };
    let name = format!("{}-{policy}", if vllm_router { "vllm-router" } else { "disagg" });
    let dir = a.out.join(&name);
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .pool_idle_timeout(crate::router::upstream::legs::WORKER_CONNECTION_IDLE)
        .build()?;
    let cluster = start_cluster(a, exe, &dir, &client, &[]).await?;
    let port = free_ports(1)?[0];
    let (program, args) = router_command(a, exe, &cluster, vllm_router, &policy, port);
    let log = dir.join("router.log");
    let mut router = spawn(&program, &args, &log)?;
    let url = format!("http://127.0.0.1:{port}");
    wait_healthy(&client, &url, &mut router, &log, Duration::from_secs(60)).await?;
    if policy == "kv_aware" && !vllm_router {
        // Subscribed to every simulator's events before the first request.
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let cpu0 = crate::proc_stat::cpu_secs(router.0.id());
    let result = dir.join("bench.json");
    let bench: Vec<String> = [
        "bench",
        "--base-url",
        &url,
        "--tokenizer",
        "sim",
        "--dataset-name",
        "mooncake_trace",
        "--dataset-path",
        &a.dataset_path.as_deref().map(|p| p.to_string_lossy().into_owned()).unwrap_or_default(),
        "--num-prompts",
        &a.num_prompts.to_string(),
        "--trace-speedup",
        &a.trace_speedup.to_string(),
        "--trace-block-size",
        &a.trace_block_size.to_string(),
        "--ignore-eos",
        "--label",
        &name,
    ]
    .iter()
    .map(|s| s.to_string())
    .chain(measured(a, &result))
    .collect();
    eprintln!("scoreboard: {router_name} --policy {policy}: replaying {} requests", a.num_prompts);
    let bench_log = std::fs::File::create(dir.join("bench.log"))?;
    let status = tokio::process::Command::new(exe).args(&bench).stdout(bench_log).status().await?;
    if !status.success() {
        bail!("{name}: disagg bench failed ({status})");
    }
    let cpu = crate::proc_stat::cpu_secs(router.0.id()) - cpu0;
    if let Ok(Some(status)) = router.0.try_wait() {
        bail!("{name}: the router exited during the run ({status}); see {}", dir.join("router.log").display());
    }
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&result)?).context("the bench result")?;
    let (mut hits, mut queries, mut computed) = (0.0, 0.0, Vec::new());
    for p in &cluster.prefills {
        let m = client.get(format!("{p}/metrics")).send().await?.text().await?;
        let (h, q) = (counter(&m, "vllm:prefix_cache_hits_total"), counter(&m, "vllm:prefix_cache_queries_total"));
        hits += h;
        queries += q;
        computed.push(q - h);
    }
    let mean = computed.iter().sum::<f64>() / computed.len().max(1) as f64;
    let f = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
    let completed = r["completed"].as_u64().unwrap_or(0);
    Ok(Row {
        router: router_name.into(),
        policy,
        ttft_p50: f("median_ttft_ms"),
        ttft_p99: f("p99_ttft_ms"),
        e2el_p50: f("median_e2el_ms"),
        hit_rate: if queries > 0.0 { hits / queries } else { 0.0 },
        prefill_skew: if mean > 0.0 { computed.iter().copied().fold(0.0, f64::max) / mean } else { f64::NAN },
        goodput: f("request_goodput"),
        router_cpu_ms_per_req: cpu * 1000.0 / completed.max(1) as f64,
        failed: r["failed"].as_u64().unwrap_or(0),
        error: None,
    })
}

pub(crate) async fn run(a: ScoreboardArgs) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("this binary's path")?;
    std::fs::create_dir_all(&a.out).with_context(|| format!("cannot create {}", a.out.display()))?;
    if let Some(v) = &a.vllm_router {
        if !v.is_file() {
            bail!("--vllm-router {}: no such file (scripts/vllm-router-env.sh installs it and prints its path)", v.display());
        }
    }
    match a.scenario {
        Scenario::Tenants => return tenants::run(&a, &exe).await,
        Scenario::Phases => return phases_board(&a, &exe).await,
        Scenario::Trace => {}
    }
    let dataset = a.dataset_path.clone().context("--dataset-path: the trace to replay")?;
    // The oracle over the very prompts the bench sends.
    let tok = crate::bench::dataset::Tok::Sim;
    let layout = crate::bench::trace::Layout::Mooncake { block_size: a.trace_block_size as usize, speedup: a.trace_speedup };
    let spec = crate::bench::trace::TraceSpec { num: a.num_prompts as usize, layout };
    let prompts: Vec<Vec<u32>> = crate::bench::trace::load(&tok, &dataset, &spec)?
        .into_iter()
        .filter_map(|r| match r.prompt {
            crate::bench::dataset::Prompt::Tokens(t) => Some(t),
            crate::bench::dataset::Prompt::Text(_) => None,
        })
        .collect();
    let oracle = oracle::hit_rate(&prompts, a.block_size as usize, (a.prefills * a.kv_blocks) as usize);
    let unbounded = oracle::hit_rate(&prompts, a.block_size as usize, usize::MAX);
    let mut rows = Vec::new();
    let vllm_rows = if a.vllm_router.is_some() { a.vllm_router_policies.as_slice() } else { &[] };
    for (vllm_router, p) in a.policies.iter().map(|p| (false, p)).chain(vllm_rows.iter().map(|p| (true, p))) {
        let row = run_row(&a, &exe, vllm_router, *p).await.unwrap_or_else(|e| {
            eprintln!("scoreboard: a row failed: {e:#}");
            Row {
                router: if vllm_router { "vllm-router 0.1.17" } else { "disagg route" }.into(),
                policy: p.to_possible_value().map(|v| v.get_name().to_string()).unwrap_or_default(),
                error: Some(format!("{e:#}")),
                ..Row::default()
            }
        });
        rows.push(row);
    }
    let board = report::Board { args: &a, rows: &rows, oracle, unbounded };
    let md = board.markdown();
    std::fs::write(a.out.join("scoreboard.md"), &md)?;
    report::plot(&a.out.join("scoreboard.svg"), &rows, oracle)?;
    report::plot(&a.out.join("scoreboard.png"), &rows, oracle)?;
    print!("{md}");
    let missed = board.missed_goals();
    if a.check_goals && !missed.is_empty() {
        bail!("kv_aware missed its goals: {}", missed.join("; "));
    }
    Ok(())
}

/// `--scenario phases`: 2P6D, 4P4D, 6P2D (for 8 engines), colocated and elastic, side by side.
async fn phases_board(a: &ScoreboardArgs, exe: &std::path::Path) -> anyhow::Result<()> {
    let n = a.engines;
    let w = phases::Workload {
        engines: n,
        phases: a.phases.clone(),
        slo_ttft_ms: a.slo_ttft_ms,
        slo_tpot_ms: a.slo_tpot_ms,
        timing_profile: a.timing_profile.clone(),
        sim_speedup: a.sim_speedup,
        kv_blocks: a.kv_blocks,
        block_size: a.block_size,
        max_num_seqs: 128,
    };
    let mut layouts: Vec<phases::Layout> =
        [n / 4, n / 2, 3 * n / 4].iter().map(|&p| phases::Layout::Split { prefills: p, decodes: n - p }).collect();
    layouts.extend([phases::Layout::Colocated, phases::Layout::Elastic]);
    let mut rows = Vec::new();
    for layout in layouts {
        eprintln!("scoreboard: {}: {} phases", layout.name(n), w.phases.len());
        let row = phases::measure(&w, layout, exe, &a.out, &|| {}).await.unwrap_or_else(|e| {
            eprintln!("scoreboard: a row failed: {e:#}");
            phases::Measured { layout, phases: Vec::new(), error: Some(format!("{e:#}")) }
        });
        rows.push(row);
    }
    let md = phases::table(&w, &rows);
    std::fs::write(a.out.join("scoreboard.md"), &md)?;
    print!("{md}");
    Ok(())
}
