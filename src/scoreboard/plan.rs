//! `disagg plan`: sizes xPyD for a workload. It replays the workload's phases on simulated
//! clusters of --engines engines, one per layout (every split 1P..(N-1)P, all colocated
//! with kv_aware, all elastic with slo_aware; phases.rs), reports goodput under the SLOs
//! per phase and over the whole run (table and SVG), names the best layout for each phase
//! and overall, and writes the best launchable one as a `disagg launch` file.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use plotters::prelude::*;

use super::phases::{self, Layout, Measured, Phase, Workload};

#[derive(Args, Debug, Clone)]
pub(crate) struct PlanArgs {
    /// Engines to size for (each one vLLM instance, one DP rank).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(2..=64))]
    pub(crate) engines: u64,
    /// The workload: NAME:INPUT_LEN:OUTPUT_LEN:RATE:PROMPTS, comma-separated (vLLM's random
    /// dataset, Poisson arrivals at RATE requests/s).
    #[arg(long, value_delimiter = ',', default_value = phases::DEFAULT_PHASES)]
    pub(crate) phases: Vec<Phase>,
    /// The layouts to measure, comma-separated (`2P6D`, `colocated`, `elastic`); default:
    /// every split, colocated and elastic.
    #[arg(long, value_delimiter = ',')]
    pub(crate) layouts: Vec<String>,
    #[arg(long, default_value_t = 2000.0, value_parser = crate::flags::positive)]
    pub(crate) slo_ttft_ms: f64,
    #[arg(long, default_value_t = 50.0, value_parser = crate::flags::positive)]
    pub(crate) slo_tpot_ms: f64,
    /// The engines' step times (`disagg fit-timing`'s profile of the real engine, or the
    /// built-in `mocker`).
    #[arg(long, default_value = "mocker")]
    pub(crate) timing_profile: String,
    /// Each engine's KV cache, in blocks of --block-size tokens.
    #[arg(long, default_value_t = 30_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) kv_blocks: u64,
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) block_size: u64,
    /// Requests each engine runs at once (vLLM's --max-num-seqs).
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) max_num_seqs: u64,
    /// Run the simulators (and the clock) K times faster than simulated time.
    #[arg(long, default_value_t = 1.0, value_parser = crate::flags::positive)]
    pub(crate) sim_speedup: f64,
    /// The model the launch file serves.
    #[arg(long, default_value = "MODEL")]
    pub(crate) model: String,
    /// Where each layout's runs, the table and the plot go.
    #[arg(long, default_value = "plan")]
    pub(crate) out: PathBuf,
    /// The launch file to write (the best launchable layout).
    #[arg(long, default_value = "plan.yaml")]
    pub(crate) write: PathBuf,
}

fn layouts(a: &PlanArgs) -> anyhow::Result<Vec<Layout>> {
    let all = Layout::all(a.engines);
    if a.layouts.is_empty() {
        return Ok(all);
    }
    a.layouts
        .iter()
        .map(|name| {
            let name = name.trim().to_ascii_lowercase();
            all.iter().copied().find(|l| l.name(a.engines).to_ascii_lowercase().contains(&name)).with_context(|| {
                let names: Vec<String> = all.iter().map(|l| l.name(a.engines)).collect();
                format!("--layouts {name}: one of {}", names.join(", "))
            })
        })
        .collect()
}

/// The best row by whole-run goodput (and each phase's best), among rows that ran.
fn best(rows: &[Measured], by: impl Fn(&Measured) -> f64) -> Option<&Measured> {
    rows.iter().filter(|r| r.error.is_none()).max_by(|a, b| by(a).total_cmp(&by(b)))
}

pub(crate) async fn run(a: PlanArgs) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("this binary's path")?;
    std::fs::create_dir_all(&a.out).with_context(|| format!("cannot create {}", a.out.display()))?;
    let w = Workload {
        engines: a.engines,
        phases: a.phases.clone(),
        slo_ttft_ms: a.slo_ttft_ms,
        slo_tpot_ms: a.slo_tpot_ms,
        timing_profile: a.timing_profile.clone(),
        sim_speedup: a.sim_speedup,
        kv_blocks: a.kv_blocks,
        block_size: a.block_size,
        max_num_seqs: a.max_num_seqs,
    };
    let layouts = layouts(&a)?;
    let bar = indicatif::ProgressBar::new((layouts.len() * w.phases.len()) as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} layout phases [{elapsed_precise}<{eta_precise}] {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut rows = Vec::new();
    for layout in layouts {
        bar.set_message(layout.name(a.engines));
        let row = phases::measure(&w, layout, &exe, &a.out, &|| bar.inc(1)).await.unwrap_or_else(|e| {
            bar.println(format!("plan: {}: {e:#}", layout.name(a.engines)));
            Measured { layout, phases: Vec::new(), error: Some(format!("{e:#}")) }
        });
        rows.push(row);
    }
    bar.finish_and_clear();
    let mut md = phases::table(&w, &rows);
    for (k, p) in w.phases.iter().enumerate() {
        if let Some(b) = best(&rows, |r| r.phases[k].goodput) {
            md.push_str(&format!("\nBest for {}: {} ({:.2} req/s).", p.name, b.layout.name(a.engines), b.phases[k].goodput));
        }
    }
    let overall = best(&rows, Measured::whole).context("no layout ran")?;
    md.push_str(&format!("\nBest over the whole run: {} ({:.2} req/s).\n", overall.layout.name(a.engines), overall.whole()));
    let launchable = best(&rows.iter().filter(|r| r.layout != Layout::Colocated).cloned().collect::<Vec<_>>(), Measured::whole)
        .map(|r| r.layout)
        .unwrap_or(overall.layout);
    if launchable != overall.layout {
        md.push_str(&format!(
            "(A launch file is for PD layouts: {} is written, the best of them; colocated engines are `vllm serve` without a KV connector behind `disagg route --worker-urls`.)\n",
            launchable.name(a.engines)
        ));
    }
    std::fs::write(&a.write, launch_file(&a, launchable, overall_goodput(&rows, launchable)))
        .with_context(|| format!("cannot write {}", a.write.display()))?;
    md.push_str(&format!("Launch file: {}\n", a.write.display()));
    std::fs::write(a.out.join("plan.md"), &md)?;
    plot(&a.out.join("plan.svg"), &w, &rows)?;
    print!("{md}");
    Ok(())
}

fn overall_goodput(rows: &[Measured], layout: Layout) -> f64 {
    rows.iter().find(|r| r.layout == layout).map_or(0.0, Measured::whole)
}

/// The layout as a `disagg launch` file (vLLM's pdjob schema and ours), NIXL on GPUs.
fn launch_file(a: &PlanArgs, layout: Layout, goodput: f64) -> String {
    let kv = |role: &str| format!("'{{\"kv_connector\":\"NixlConnector\",\"kv_role\":\"{role}\"}}'");
    let (p, d, elastic, roles, policy) = match layout {
        Layout::Split { prefills, decodes } => {
            (prefills, decodes, false, ("kv_producer", "kv_consumer"), "[--policy, power_of_two]".to_string())
        }
        _ => (
            a.engines / 2,
            a.engines - a.engines / 2,
            true,
            ("kv_both", "kv_both"),
            format!("[--policy, slo_aware, --slo-ttft-ms, '{}', --slo-itl-ms, '{}']", a.slo_ttft_ms, a.slo_tpot_ms),
        ),
    };
    let workload: Vec<String> =
        a.phases.iter().map(|p| format!("{}:{}:{}:{}:{}", p.name, p.input_len, p.output_len, p.rate, p.prompts)).collect();
    let role = |name: &str, replicas: u64, kv_role: &str| {
        format!(
            "{name}:\n  replicas: {replicas}\n{}  params:\n    kv_transfer_config: {}\n",
            if elastic { "  elastic: true\n" } else { "" },
            kv(kv_role)
        )
    };
    format!(
        "# disagg plan: {} for {} engines; goodput {goodput:.2} req/s under TTFT <= {} ms and TPOT <= {} ms over\n\
         # the workload {} (simulated with timing profile {}).\n\
         engine: vllm\nscheduler:\n  args: {policy}\ngeneral:\n  params:\n    model: {}\n{}{}",
        layout.name(a.engines),
        a.engines,
        a.slo_ttft_ms,
        a.slo_tpot_ms,
        workload.join(","),
        a.timing_profile,
        a.model,
        role("prefill", p, roles.0),
        role("decode", d, roles.1),
    )
}

/// Goodput per layout, one bar per phase and one for the whole run.
fn plot(path: &Path, w: &Workload, rows: &[Measured]) -> anyhow::Result<()> {
    crate::bench::plot::register_font()?;
    let ran: Vec<&Measured> = rows.iter().filter(|r| r.error.is_none()).collect();
    let series = w.phases.len() + 1;
    let top = ran.iter().flat_map(|r| r.phases.iter().map(|p| p.goodput).chain([r.whole()])).fold(0.0, f64::max).max(1e-3) * 1.15;
    let root = SVGBackend::new(path, (160 * ran.len().max(1) as u32 + 120, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("disagg plan: goodput (req/s) under TTFT <= {} ms, TPOT <= {} ms", w.slo_ttft_ms, w.slo_tpot_ms),
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..ran.len() as f64, 0f64..top)?;
    let names: Vec<String> = ran.iter().map(|r| r.layout.name(w.engines)).collect();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(ran.len().max(1))
        .x_label_formatter(&|x| names.get(x.floor() as usize).cloned().unwrap_or_default())
        .y_desc("req/s")
        .draw()?;
    let labels: Vec<String> = w.phases.iter().map(|p| p.name.clone()).chain(["whole run".to_string()]).collect();
    for (s, label) in labels.iter().enumerate() {
        let color = Palette99::pick(s).to_rgba();
        let width = 0.8 / series as f64;
        chart
            .draw_series(ran.iter().enumerate().map(|(i, r)| {
                let v = r.phases.get(s).map_or_else(|| r.whole(), |p| p.goodput);
                let x0 = i as f64 + 0.1 + width * s as f64;
                Rectangle::new([(x0, 0.0), (x0 + width * 0.9, v)], color.filled())
            }))?
            .label(label.clone())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled()));
    }
    chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw()?;
    root.present()?;
    Ok(())
}
