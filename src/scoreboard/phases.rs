//! A workload whose shape shifts (prefill-heavy, decode-heavy, mixed: vLLM's random
//! dataset, Poisson arrivals) replayed on N simulated engines that take either leg, one
//! fresh cluster per layout: fixed splits (xPyD), N colocated with kv_aware, N elastic
//! with slo_aware. Each phase is one `disagg bench` with goodput under TTFT and TPOT SLOs.
//! `disagg scoreboard --scenario phases` prints the rows side by side; `disagg plan`
//! (plan.rs) measures every split this way and writes the best as a launch file.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::Value;

use super::{free_ports, spawn, wait_healthy, Child, SimEngine};

/// One phase of the workload.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Phase {
    pub(crate) name: String,
    pub(crate) input_len: u64,
    pub(crate) output_len: u64,
    /// Requests per second (simulated time), Poisson.
    pub(crate) rate: f64,
    pub(crate) prompts: u64,
}

impl FromStr for Phase {
    type Err = String;
    /// `NAME:INPUT_LEN:OUTPUT_LEN:RATE:PROMPTS`.
    fn from_str(s: &str) -> Result<Self, String> {
        let parts: Vec<&str> = s.split(':').collect();
        let bad = || format!("{s:?}: a phase is NAME:INPUT_LEN:OUTPUT_LEN:RATE:PROMPTS (e.g. rag:3000:32:6:200)");
        let [name, i, o, r, n] = parts.as_slice() else { return Err(bad()) };
        let (input_len, output_len, prompts) =
            (i.parse().map_err(|_| bad())?, o.parse().map_err(|_| bad())?, n.parse().map_err(|_| bad())?);
        let rate: f64 = r.parse().map_err(|_| bad())?;
        if name.is_empty() || input_len == 0 || output_len == 0 || prompts == 0 || !(rate > 0.0 && rate.is_finite()) {
            return Err(bad());
        }
        Ok(Phase { name: name.to_string(), input_len, output_len, rate, prompts })
    }
}

/// The default phases: a RAG-like burst of long prompts and short answers, a chat burst of
/// long answers, and a mix.
pub(crate) const DEFAULT_PHASES: &str = "prefill-heavy:3000:32:12:240,decode-heavy:128:512:6:120,mixed:1000:128:10:200";

/// How a row uses the engines.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Layout {
    Split { prefills: u64, decodes: u64 },
    Colocated,
    Elastic,
}

impl Layout {
    pub(crate) fn name(self, engines: u64) -> String {
        match self {
            Layout::Split { prefills, decodes } => format!("{prefills}P{decodes}D"),
            Layout::Colocated => format!("{engines} colocated (kv_aware)"),
            Layout::Elastic => format!("{engines} elastic (slo_aware)"),
        }
    }

    /// Every split of `engines` (1P..(N-1)P), then colocated, then elastic.
    pub(crate) fn all(engines: u64) -> Vec<Layout> {
        let mut all: Vec<Layout> = (1..engines).map(|p| Layout::Split { prefills: p, decodes: engines - p }).collect();
        all.extend([Layout::Colocated, Layout::Elastic]);
        all
    }

    fn router_args(self, urls: &[String], w: &Workload) -> Vec<String> {
        let mut args: Vec<String> = vec!["route".into()];
        let list = |flag: &str, urls: &[String]| urls.iter().flat_map(|u| [flag.to_string(), u.clone()]).collect::<Vec<_>>();
        match self {
            Layout::Split { prefills, .. } => {
                let (p, d) = urls.split_at(prefills as usize);
                args.extend(list("--prefill", p));
                args.extend(list("--decode", d));
                args.extend(["--policy".into(), "power_of_two".into()]);
            }
            Layout::Colocated => {
                args.extend(list("--worker-urls", urls));
                args.extend(["--policy".into(), "kv_aware".into()]);
            }
            Layout::Elastic => {
                args.extend(list("--pd-pool", urls));
                args.extend(["--policy".into(), "slo_aware".into(), "--timing-profile".into(), w.timing_profile.clone()]);
                args.extend(["--slo-ttft-ms".into(), w.slo_ttft_ms.to_string(), "--slo-itl-ms".into(), w.slo_tpot_ms.to_string()]);
            }
        }
        args.extend(["--max-concurrent-requests".into(), "100000".into(), "--queue-size".into(), "100000".into()]);
        args
    }
}

/// What every row replays, on what.
#[derive(Clone, Debug)]
pub(crate) struct Workload {
    pub(crate) engines: u64,
    pub(crate) phases: Vec<Phase>,
    pub(crate) slo_ttft_ms: f64,
    pub(crate) slo_tpot_ms: f64,
    pub(crate) timing_profile: String,
    pub(crate) sim_speedup: f64,
    pub(crate) kv_blocks: u64,
    pub(crate) block_size: u64,
    pub(crate) max_num_seqs: u64,
}

/// One phase's figures in one row.
#[derive(Clone, Debug, Default)]
pub(crate) struct PhaseFigures {
    /// Requests per second that met both SLOs.
    pub(crate) goodput: f64,
    pub(crate) completed: u64,
    pub(crate) failed: u64,
    /// Seconds (simulated).
    pub(crate) duration: f64,
    pub(crate) ttft_p99: f64,
    pub(crate) tpot_p99: f64,
}

/// One layout's row.
#[derive(Clone, Debug)]
pub(crate) struct Measured {
    pub(crate) layout: Layout,
    pub(crate) phases: Vec<PhaseFigures>,
    pub(crate) error: Option<String>,
}

impl Measured {
    /// Goodput over the whole run: every phase's good requests over their total time.
    pub(crate) fn whole(&self) -> f64 {
        let good: f64 = self.phases.iter().map(|p| p.goodput * p.duration).sum();
        let time: f64 = self.phases.iter().map(|p| p.duration).sum();
        if time > 0.0 {
            good / time
        } else {
            0.0
        }
    }
}

/// Starts the engines: simulators serving either leg, with KV events (kv_aware).
async fn engines(w: &Workload, exe: &Path, dir: &Path, client: &reqwest::Client) -> anyhow::Result<(Vec<Child>, Vec<String>)> {
    let n = w.engines as usize;
    let ports = free_ports(3 * n)?;
    let (mut children, mut urls) = (Vec::new(), Vec::new());
    for i in 0..n {
        let (http, ev, replay) = (ports[3 * i], ports[3 * i + 1], ports[3 * i + 2]);
        let engine =
            SimEngine { block_size: w.block_size, kv_blocks: w.kv_blocks, timing_profile: &w.timing_profile, speedup: w.sim_speedup };
        let mut args = engine.args("both", (http, ev, replay));
        args.extend(["--max-num-seqs".to_string(), w.max_num_seqs.to_string()]);
        let log = dir.join(format!("engine-{i}.log"));
        children.push((spawn(exe, &args, &log)?, log));
        urls.push(format!("http://127.0.0.1:{http}"));
    }
    for (url, (child, log)) in urls.iter().zip(children.iter_mut()) {
        wait_healthy(client, url, child, log, Duration::from_secs(60)).await?;
    }
    Ok((children.into_iter().map(|(c, _)| c).collect(), urls))
}

/// One layout over every phase, on a fresh cluster; `progress` is told of each phase done.
pub(crate) async fn measure(w: &Workload, layout: Layout, exe: &Path, out: &Path, progress: &dyn Fn()) -> anyhow::Result<Measured> {
    let dir: PathBuf = out.join(layout.name(w.engines).replace([' ', '(', ')'], ""));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let client = reqwest::Client::builder().timeout(Duration::from_secs(5)).build()?;
    let (_engines, urls) = engines(w, exe, &dir, &client).await?;
    let port = free_ports(1)?[0];
    let mut args = layout.router_args(&urls, w);
    args.extend(["--port".into(), port.to_string(), "--host".into(), "127.0.0.1".into()]);
    let log = dir.join("router.log");
    let mut router = spawn(exe, &args, &log)?;
    let url = format!("http://127.0.0.1:{port}");
    wait_healthy(&client, &url, &mut router, &log, Duration::from_secs(60)).await?;
    if layout == Layout::Colocated {
        // Subscribed to every engine's KV events before the first request.
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let mut phases = Vec::new();
    for (k, phase) in w.phases.iter().enumerate() {
        phases.push(bench_phase(w, phase, k, exe, &url, &dir).await?);
        progress();
        if let Ok(Some(status)) = router.0.try_wait() {
            bail!("{}: the router exited during the run ({status}); see {}", layout.name(w.engines), log.display());
        }
    }
    Ok(Measured { layout, phases, error: None })
}

async fn bench_phase(w: &Workload, phase: &Phase, k: usize, exe: &Path, url: &str, dir: &Path) -> anyhow::Result<PhaseFigures> {
    let result = dir.join(format!("phase-{k}.json"));
    let args: Vec<String> = [
        "bench",
        "--base-url",
        url,
        "--tokenizer",
        "sim",
        "--dataset-name",
        "random",
        "--random-input-len",
        &phase.input_len.to_string(),
        "--random-output-len",
        &phase.output_len.to_string(),
        "--num-prompts",
        &phase.prompts.to_string(),
        "--request-rate",
        &phase.rate.to_string(),
        "--seed",
        &(k as u64 + 1).to_string(),
        "--ignore-eos",
        "--speedup",
        &w.sim_speedup.to_string(),
        "--percentile-metrics",
        "ttft,tpot",
        "--metric-percentiles",
        "99",
        "--goodput",
        &format!("ttft:{}", w.slo_ttft_ms),
        &format!("tpot:{}", w.slo_tpot_ms),
        "--save-result",
        "--result-filename",
        &result.to_string_lossy(),
        "--disable-tqdm",
    ]
    .map(String::from)
    .to_vec();
    let bench_log = std::fs::File::create(dir.join(format!("phase-{k}.log")))?;
    let status = tokio::process::Command::new(exe).args(&args).stdout(bench_log).status().await?;
    if !status.success() {
        bail!("phase {}: disagg bench failed ({status}); see {}", phase.name, dir.display());
    }
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&result)?).context("the bench result")?;
    let f = |key: &str| r[key].as_f64().unwrap_or(f64::NAN);
    Ok(PhaseFigures {
        goodput: r["request_goodput"].as_f64().unwrap_or(0.0),
        completed: r["completed"].as_u64().unwrap_or(0),
        failed: r["failed"].as_u64().unwrap_or(0),
        duration: f("duration"),
        ttft_p99: f("p99_ttft_ms"),
        tpot_p99: f("p99_tpot_ms"),
    })
}

/// The rows as a Markdown table: goodput per phase and over the whole run, with each
/// elastic row's ratio to the best fixed split.
pub(crate) fn table(w: &Workload, rows: &[Measured]) -> String {
    let mut out = format!(
        "Goodput (req/s meeting TTFT <= {} ms and TPOT <= {} ms), {} simulated engines, timing profile {}:\n\n| layout |",
        w.slo_ttft_ms, w.slo_tpot_ms, w.engines, w.timing_profile
    );
    for p in &w.phases {
        out.push_str(&format!(" {} ({}→{} tok, {}/s) |", p.name, p.input_len, p.output_len, p.rate));
    }
    out.push_str(" whole run | TTFT p99 / TPOT p99 (ms), worst phase | completed / failed |\n|---|");
    out.push_str(&"---:|".repeat(w.phases.len() + 3));
    out.push('\n');
    for r in rows {
        out.push_str(&format!("| {} |", r.layout.name(w.engines)));
        if let Some(e) = &r.error {
            out.push_str(&format!(" failed: {e} |\n"));
            continue;
        }
        for p in &r.phases {
            out.push_str(&format!(" {:.2} |", p.goodput));
        }
        let worst = |f: fn(&PhaseFigures) -> f64| r.phases.iter().map(f).fold(0.0, f64::max);
        let (completed, failed): (u64, u64) = (r.phases.iter().map(|p| p.completed).sum(), r.phases.iter().map(|p| p.failed).sum());
        out.push_str(&format!(
            " {:.2} | {:.0} / {:.1} | {completed} / {failed} |\n",
            r.whole(),
            worst(|p| p.ttft_p99),
            worst(|p| p.tpot_p99)
        ));
    }
    if let Some(ratios) = elastic_ratios(rows) {
        out.push_str(&format!(
            "\nElastic against the best fixed split: whole run {:.2}x (goal >= 1.25x); per phase {} (goal >= 0.95x each).\n",
            ratios.0,
            ratios.1.iter().map(|r| format!("{r:.2}x")).collect::<Vec<_>>().join(", ")
        ));
    }
    out
}

/// The elastic row's goodput over the best fixed split's: whole run, and each phase.
pub(crate) fn elastic_ratios(rows: &[Measured]) -> Option<(f64, Vec<f64>)> {
    let ok = |r: &&Measured| r.error.is_none();
    let elastic = rows.iter().filter(ok).find(|r| r.layout == Layout::Elastic)?;
    let splits: Vec<&Measured> = rows.iter().filter(ok).filter(|r| matches!(r.layout, Layout::Split { .. })).collect();
    let best_whole = splits.iter().map(|r| r.whole()).fold(0.0, f64::max);
    let per_phase = (0..elastic.phases.len())
        .map(|k| {
            let best = splits.iter().map(|r| r.phases[k].goodput).fold(0.0, f64::max);
            if best > 0.0 {
                elastic.phases[k].goodput / best
            } else {
                f64::NAN
            }
        })
        .collect();
    (best_whole > 0.0).then(|| (elastic.whole() / best_whole, per_phase))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_parse_and_layouts_name_themselves() {
        let phases: Vec<Phase> = DEFAULT_PHASES.split(',').map(|p| p.parse().unwrap()).collect();
        assert_eq!(phases[0], Phase { name: "prefill-heavy".into(), input_len: 3000, output_len: 32, rate: 12.0, prompts: 240 });
        for bad in ["x:1:1:1", "x:0:1:1:1", "x:1:1:-1:1", ":1:1:1:1"] {
            assert!(bad.parse::<Phase>().is_err(), "{bad}");
        }
        let names: Vec<String> = Layout::all(4).into_iter().map(|l| l.name(4)).collect();
        assert_eq!(names, ["1P3D", "2P2D", "3P1D", "4 colocated (kv_aware)", "4 elastic (slo_aware)"]);
    }

    #[test]
    fn whole_run_goodput_weighs_phases_by_their_time() {
        let phase = |goodput, duration| PhaseFigures { goodput, duration, ..Default::default() };
        let r = Measured { layout: Layout::Elastic, phases: vec![phase(10.0, 10.0), phase(2.0, 30.0)], error: None };
        assert!((r.whole() - 4.0).abs() < 1e-9, "(100 + 60) good requests over 40 s");
        let split =
            Measured { layout: Layout::Split { prefills: 1, decodes: 1 }, phases: vec![phase(5.0, 10.0), phase(2.5, 30.0)], error: None };
        let (whole, per) = elastic_ratios(&[split, r]).unwrap();
        assert!((whole - 4.0 / 3.125).abs() < 1e-9 && per == vec![2.0, 0.8], "{whole} {per:?}");
    }
}
