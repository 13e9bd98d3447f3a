//! `disagg scoreboard --scenario tenants`: flow control against a flood. On one simulated
//! cluster per row, tenant A floods at 3x the cluster's capacity with priority 10 while
//! tenant B sends interactive requests at 20% of it with priority 0; each tenant is one
//! `disagg bench` (Poisson arrivals) with its own key. Rows: the router without flow
//! control (FIFO), with it (`--tenants`, `--engine-queue-threshold`), and vllm-router
//! with its token bucket. Beside them: B alone on an idle cluster, and the capacity the
//! rates are set from (measured first, closed loop). Reported per tenant: TTFT p50/p99,
//! goodput under the TTFT SLO, refused requests (429/503) and requests lost (neither
//! answered nor refused).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use plotters::prelude::*;
use serde_json::Value;

use super::{free_ports, spawn, start_cluster, wait_healthy, Child, Cluster, ScoreboardArgs};

/// One tenant's figures in one row.
#[derive(Debug, Clone, Default)]
struct TenantFigures {
    sent: u64,
    completed: u64,
    ttft_p50: f64,
    ttft_p99: f64,
    goodput: f64,
    refused: u64,
    lost: u64,
}

#[derive(Debug, Clone)]
struct FloodRow {
    front: Front,
    name: String,
    a: TenantFigures,
    b: TenantFigures,
}

const TENANTS_FILE: &str =
    "tenants:\n  - name: flood\n    keys: [sk-a]\n    priority: 10\n  - name: interactive\n    keys: [sk-b]\n    priority: 0\n";

/// Which router a row runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Front {
    Fifo,
    FlowControl,
    VllmRouter,
}

impl Front {
    fn name(self) -> &'static str {
        match self {
            Front::Fifo => "disagg route, FIFO (today's)",
            Front::FlowControl => "disagg route, flow control",
            Front::VllmRouter => "vllm-router 0.1.17, token bucket",
        }
    }
}

struct Setting<'a> {
    a: &'a ScoreboardArgs,
    exe: &'a Path,
    client: reqwest::Client,
}

/// Requests each engine runs at once (the simulators' --max-num-seqs): the capacity run
/// keeps the decodes full.
const MAX_NUM_SEQS: u64 = 64;

impl Setting<'_> {
    /// The engines schedule by priority (vLLM's `--scheduling-policy priority`): what
    /// flow control sends with each leg orders their own queues too; the other rows send
    /// none, so their engines serve first come, first served.
    fn sim_args(&self) -> Vec<String> {
        ["--max-num-seqs", &MAX_NUM_SEQS.to_string(), "--scheduling-policy", "priority"].map(String::from).to_vec()
    }

    async fn router(&self, c: &Cluster, front: Front, dir: &Path, capacity: f64, concurrency: u64) -> anyhow::Result<(Child, String)> {
        let port = free_ports(1)?[0];
        let mut args: Vec<String> = if front == Front::VllmRouter { vec!["--vllm-pd-disaggregation".into()] } else { vec!["route".into()] };
        for p in &c.prefills {
            args.extend(["--prefill".into(), p.clone()]);
        }
        for d in &c.decodes {
            args.extend(["--decode".into(), d.clone()]);
        }
        args.extend(["--policy".into(), "round_robin".into(), "--port".into(), port.to_string(), "--host".into(), "127.0.0.1".into()]);
        match front {
            Front::Fifo => args.extend(["--max-concurrent-requests", "100000", "--queue-size", "100000"].map(String::from)),
            Front::FlowControl => {
                let file = dir.join("tenants.yaml");
                // A's band waits at most half the SLO (in real time): what is served still meets
                // it, what would wait longer is refused at once.
                let wait = (self.a.slo_ttft_ms / 2000.0 / self.a.sim_speedup).max(0.05);
                std::fs::write(&file, format!("{TENANTS_FILE}bands:\n  - {{priority: 10, queue_timeout_secs: {wait}}}\n"))?;
                args.extend(["--tenants".into(), file.to_string_lossy().into_owned(), "--queue-size".into(), "100000".into()]);
                args.extend(self.a.route_args.split_whitespace().map(str::to_owned));
                if !self.a.route_args.contains("--engine-queue-threshold") {
                    args.extend(["--engine-queue-threshold".into(), "auto".into()]);
                }
            }
            Front::VllmRouter => {
                // Its bucket refills at the cluster's capacity, with its concurrency as the burst.
                args.extend([
                    "--max-concurrent-requests".into(),
                    concurrency.to_string(),
                    "--rate-limit-tokens-per-second".into(),
                    format!("{}", capacity.ceil().max(1.0) as u64),
                    "--queue-size".into(),
                    concurrency.to_string(),
                ]);
            }
        }
        let program = match front {
            Front::VllmRouter => self.a.vllm_router.clone().context("--vllm-router")?,
            _ => self.exe.to_path_buf(),
        };
        let log = dir.join("router.log");
        let mut child = spawn(&program, &args, &log)?;
        let url = format!("http://127.0.0.1:{port}");
        wait_healthy(&self.client, &url, &mut child, &log, Duration::from_secs(60)).await?;
        Ok((child, url))
    }

    /// One `disagg bench` run: `rate` None is closed loop at `concurrency`.
    fn bench(&self, url: &str, key: &str, num: u64, rate: Option<f64>, concurrency: Option<u64>, result: &Path) -> tokio::process::Command {
        let a = self.a;
        let mut args: Vec<String> = [
            "bench",
            "--base-url",
            url,
            "--tokenizer",
            "sim",
            "--model",
            "sim-model",
            "--dataset-name",
            "random",
            "--random-input-len",
            &a.input_len.to_string(),
            "--random-output-len",
            &a.output_len.to_string(),
            "--ignore-eos",
            "--num-prompts",
            &num.to_string(),
            "--header",
            &format!("Authorization=Bearer {key}"),
        ]
        .iter()
        .map(|s| s.to_string())
        .chain(super::measured(a, result))
        .collect();
        if let Some(r) = rate {
            args.extend(["--request-rate".into(), format!("{r:.3}")]);
        }
        if let Some(c) = concurrency {
            args.extend(["--max-concurrency".into(), c.to_string()]);
        }
        let mut cmd = tokio::process::Command::new(self.exe);
        cmd.args(args).stdout(std::process::Stdio::null());
        cmd
    }
}

fn read_result(path: &Path, sent: u64) -> anyhow::Result<TenantFigures> {
    let r: Value = serde_json::from_str(&std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?)?;
    let f = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
    let errors: Vec<String> =
        r["errors"].as_array().map(|e| e.iter().filter_map(|x| x.as_str().map(str::to_owned)).collect()).unwrap_or_default();
    let failed: Vec<&String> = errors.iter().filter(|e| !e.is_empty()).collect();
    // vllm-router refuses what waited past its queue timeout with a 408.
    let refused =
        failed.iter().filter(|e| matches!(e.as_str(), "Too Many Requests" | "Service Unavailable" | "Request Timeout")).count() as u64;
    let completed = r["completed"].as_u64().unwrap_or(0);
    Ok(TenantFigures {
        sent,
        completed,
        ttft_p50: f("median_ttft_ms"),
        ttft_p99: f("p99_ttft_ms"),
        goodput: f("request_goodput"),
        refused,
        lost: sent.saturating_sub(completed + refused),
    })
}

pub(super) async fn run(a: &ScoreboardArgs, exe: &Path) -> anyhow::Result<()> {
    let client = reqwest::Client::builder().timeout(Duration::from_secs(5)).build()?;
    let s = Setting { a, exe, client };
    let concurrency = 2 * MAX_NUM_SEQS * a.decodes;
    // The cluster's capacity: closed loop, enough requests in flight to fill it.
    let dir = a.out.join("capacity");
    std::fs::create_dir_all(&dir)?;
    let capacity = {
        let cluster = start_cluster(a, exe, &dir, &s.client, &s.sim_args()).await?;
        let (_router, url) = s.router(&cluster, Front::Fifo, &dir, 0.0, concurrency).await?;
        let result = dir.join("bench.json");
        let status = s.bench(&url, "sk-a", concurrency * 6, None, Some(concurrency), &result).status().await?;
        if !status.success() {
            bail!("the capacity run failed");
        }
        let r: Value = serde_json::from_str(&std::fs::read_to_string(&result)?)?;
        r["request_throughput"].as_f64().filter(|t| *t > 0.0).context("the capacity run measured no throughput")?
    };
    eprintln!("scoreboard: capacity {capacity:.2} req/s (simulated time)");
    let secs = a.tenants_seconds as f64;
    let (rate_a, rate_b) = (3.0 * capacity, 0.2 * capacity);
    let (num_a, num_b) = (((rate_a * secs).ceil() as u64).max(1), ((rate_b * secs).ceil() as u64).max(1));
    // B alone, on an idle cluster: its TTFT without a flood.
    let idle = {
        let dir = a.out.join("idle");
        std::fs::create_dir_all(&dir)?;
        let cluster = start_cluster(a, exe, &dir, &s.client, &s.sim_args()).await?;
        let (_router, url) = s.router(&cluster, Front::Fifo, &dir, capacity, concurrency).await?;
        let result = dir.join("b.json");
        s.bench(&url, "sk-b", num_b, Some(rate_b), None, &result).status().await?;
        read_result(&result, num_b)?
    };
    let mut rows = Vec::new();
    let fronts = [Front::Fifo, Front::FlowControl].into_iter().chain(a.vllm_router.is_some().then_some(Front::VllmRouter));
    for front in fronts {
        let dir = a.out.join(format!("tenants-{front:?}").to_lowercase());
        std::fs::create_dir_all(&dir)?;
        eprintln!("scoreboard: {}: A {num_a} at {rate_a:.2}/s, B {num_b} at {rate_b:.2}/s", front.name());
        let cluster = start_cluster(a, exe, &dir, &s.client, &s.sim_args()).await?;
        let (mut router, url) = s.router(&cluster, front, &dir, capacity, concurrency).await?;
        let (ra, rb) = (dir.join("a.json"), dir.join("b.json"));
        let (sa, sb) = tokio::join!(
            s.bench(&url, "sk-a", num_a, Some(rate_a), None, &ra).status(),
            s.bench(&url, "sk-b", num_b, Some(rate_b), None, &rb).status()
        );
        if !sa?.success() || !sb?.success() {
            bail!("{}: a bench failed; see {}", front.name(), dir.display());
        }
        if let Ok(Some(status)) = router.0.try_wait() {
            bail!("{}: the router exited during the run ({status})", front.name());
        }
        // What the router says of its workers after the run (flow control: the thresholds it learned).
        if let Ok(resp) = s.client.get(format!("{url}/workers")).send().await {
            std::fs::write(dir.join("workers.json"), resp.bytes().await.unwrap_or_default())?;
        }
        rows.push(FloodRow { front, name: front.name().into(), a: read_result(&ra, num_a)?, b: read_result(&rb, num_b)? });
    }
    let md = markdown(a, capacity, &idle, &rows);
    std::fs::write(a.out.join("tenants.md"), &md)?;
    for ext in ["svg", "png"] {
        plot(&a.out.join(format!("tenants.{ext}")), &idle, &rows)?;
    }
    print!("{md}");
    Ok(())
}

fn markdown(a: &ScoreboardArgs, capacity: f64, idle: &TenantFigures, rows: &[FloodRow]) -> String {
    let mut s = format!(
        "# Flow control under a flood\n\n{} simulated prefills + {} decodes (`disagg sim --timing-profile {}`), prompts of {} tokens, \
         {} output tokens; capacity {capacity:.2} req/s (closed loop, measured first). Tenant A floods at 3x capacity with priority 10, \
         tenant B sends at 20% of it with priority 0, Poisson arrivals for {} s (simulated time). Goodput: requests with TTFT <= {} ms, \
         per second. Refused: 429/503 (disagg: every one with Retry-After; vllm-router: 408 when its queue times out); lost: neither answered nor refused.\n\n",
        a.prefills, a.decodes, a.timing_profile, a.input_len, a.output_len, a.tenants_seconds, a.slo_ttft_ms
    );
    s += "| router | tenant | sent | answered | TTFT p50 (ms) | TTFT p99 (ms) | goodput (req/s) | refused | lost |\n";
    s += "|---|---|---:|---:|---:|---:|---:|---:|---:|\n";
    let line = |router: &str, tenant: &str, t: &TenantFigures| {
        format!(
            "| {router} | {tenant} | {} | {} | {:.0} | {:.0} | {:.2} | {} | {} |\n",
            t.sent, t.completed, t.ttft_p50, t.ttft_p99, t.goodput, t.refused, t.lost
        )
    };
    s += &line("idle cluster", "B alone", idle);
    for r in rows {
        s += &line(&r.name, "A (flood, priority 10)", &r.a);
        s += &line(&r.name, "B (interactive, priority 0)", &r.b);
    }
    if let (Some(fifo), Some(fc)) = (rows.iter().find(|r| r.front == Front::Fifo), rows.iter().find(|r| r.front == Front::FlowControl)) {
        s += &format!(
            "\nGoals: B's TTFT p99 under flow control {:.0} ms = {:.2}x its idle p99 {:.0} ms (goal <= 1.5x); A's goodput {:.2} vs {:.2} \
             under FIFO (goal: no lower); lost {} (goal 0).\n",
            fc.b.ttft_p99,
            fc.b.ttft_p99 / idle.ttft_p99,
            idle.ttft_p99,
            fc.a.goodput,
            fifo.a.goodput,
            fc.a.lost + fc.b.lost
        );
    }
    if a.vllm_router.is_none() {
        s += "\nvllm-router's row was not run (no --vllm-router; scripts/vllm-router-env.sh installs it).\n";
    }
    s
}

/// B's TTFT p99 per row (log scale, with its idle figure), and each tenant's goodput.
fn plot(path: &PathBuf, idle: &TenantFigures, rows: &[FloodRow]) -> anyhow::Result<()> {
    crate::bench::plot::register_font()?;
    let size = (1100, 460);
    if path.extension().is_some_and(|e| e == "png") {
        draw(BitMapBackend::new(path, size).into_drawing_area(), idle, rows)
    } else {
        draw(SVGBackend::new(path, size).into_drawing_area(), idle, rows)
    }
}

fn draw<DB: DrawingBackend>(root: DrawingArea<DB, plotters::coord::Shift>, idle: &TenantFigures, rows: &[FloodRow]) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(550);
    let n = rows.len().max(1) as f64;
    let top = rows.iter().map(|r| r.b.ttft_p99.max(r.a.ttft_p99)).filter(|v| v.is_finite()).fold(idle.ttft_p99.max(10.0), f64::max) * 2.0;
    let mut chart = ChartBuilder::on(&left)
        .caption(format!("TTFT p99, ms: A (light), B (dark); line: B idle {:.0}", idle.ttft_p99), ("sans-serif", 16))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..n, (1f64..top).log_scale())?;
    chart.configure_mesh().disable_x_mesh().x_labels(0).draw()?;
    for (i, r) in rows.iter().enumerate() {
        let x = i as f64;
        chart.draw_series([Rectangle::new([(x + 0.1, 1.0), (x + 0.45, r.a.ttft_p99.max(1.0))], RED.mix(0.35).filled())])?;
        chart.draw_series([Rectangle::new([(x + 0.5, 1.0), (x + 0.85, r.b.ttft_p99.max(1.0))], BLUE.filled())])?;
        chart.draw_series([Text::new(short(&r.name), (x + 0.1, 1.2), ("sans-serif", 13))])?;
    }
    chart.draw_series(LineSeries::new([(0.0, idle.ttft_p99.max(1.0)), (n, idle.ttft_p99.max(1.0))], BLACK))?;
    let gtop = rows.iter().map(|r| r.a.goodput + r.b.goodput).filter(|v| v.is_finite()).fold(0.1, f64::max) * 1.3;
    let mut bars = ChartBuilder::on(&right)
        .caption("goodput, req/s: A (light), B (dark)", ("sans-serif", 16))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..n, 0f64..gtop)?;
    bars.configure_mesh().disable_x_mesh().x_labels(0).draw()?;
    for (i, r) in rows.iter().enumerate() {
        let x = i as f64;
        bars.draw_series([Rectangle::new([(x + 0.1, 0.0), (x + 0.45, r.a.goodput.max(0.0))], RED.mix(0.35).filled())])?;
        bars.draw_series([Rectangle::new([(x + 0.5, 0.0), (x + 0.85, r.b.goodput.max(0.0))], BLUE.filled())])?;
        bars.draw_series([Text::new(short(&r.name), (x + 0.1, gtop * 0.95), ("sans-serif", 13))])?;
    }
    root.present()?;
    Ok(())
}

fn short(name: &str) -> String {
    if name.contains("FIFO") {
        "FIFO".into()
    } else if name.contains("flow control") {
        "flow control".into()
    } else {
        "vllm-router".into()
    }
}
