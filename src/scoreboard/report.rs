//! The scoreboard's table (Markdown), its picture (SVG) and kv_aware's goals.

use std::path::Path;

use plotters::prelude::*;

use super::{Row, ScoreboardArgs};

pub(crate) struct Board<'a> {
    pub(crate) args: &'a ScoreboardArgs,
    pub(crate) rows: &'a [Row],
    pub(crate) oracle: f64,
    /// The hit rate with nothing ever evicted: no placement can do better.
    pub(crate) unbounded: f64,
}

/// kv_aware's goal: a hit rate at least this share of the oracle's.
const HIT_SHARE: f64 = 0.9;

impl Board<'_> {
    pub(crate) fn markdown(&self) -> String {
        let a = self.args;
        let mut s = format!(
            "# Routing scoreboard\n\n{} requests of `{}` (arrivals {}x, {} tokens per hash id) on {} simulated prefills + {} decodes \
             (`disagg sim --timing-profile {}`, {} KV blocks of {} tokens each, prefix caching and KV events on; times are simulated time). \
             Hit rate and prefill skew are the engines' own counts (prefix-cache hits over queries; the most prompt tokens one prefill \
             computed over the mean). Goodput: requests with TTFT <= {} ms, per second.\n\n",
            a.num_prompts, a.dataset_path.as_deref().and_then(|p| p.file_name()).map_or(String::new(), |f| f.to_string_lossy().into_owned()), a.trace_speedup, a.trace_block_size,
            a.prefills, a.decodes, a.timing_profile, a.kv_blocks, a.block_size, a.slo_ttft_ms
        );
        s += "| router | policy | TTFT p50 (ms) | TTFT p99 (ms) | E2E p50 (ms) | prefix-hit rate | prefill load skew | goodput (req/s) | router CPU (ms/req) | failed |\n";
        s += "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n";
        for r in self.rows {
            if let Some(e) = &r.error {
                s += &format!("| {} | {} | not measured: {} | | | | | | | |\n", r.router, r.policy, e.replace('|', "/"));
                continue;
            }
            s += &format!(
                "| {} | {} | {:.0} | {:.0} | {:.0} | {:.1}% | {:.2} | {:.2} | {:.3} | {} |\n",
                r.router,
                r.policy,
                r.ttft_p50,
                r.ttft_p99,
                r.e2el_p50,
                r.hit_rate * 100.0,
                r.prefill_skew,
                r.goodput,
                r.router_cpu_ms_per_req,
                r.failed
            );
        }
        s += &format!("| oracle | one engine with the cluster's whole cache (LRU) | | | | {:.1}% | | | | |\n", self.oracle * 100.0);
        s += &format!("| bound | a cache that never evicts | | | | {:.1}% | | | | |\n\n", self.unbounded * 100.0);
        s += "The oracle is the issue's yardstick, not a ceiling: separate caches with affinity can keep reused prefixes that one \
              shared LRU lets one-off prompts push out. Only the never-evicting cache bounds every router.\n\n";
        if a.vllm_router.is_none() {
            s += "vllm-router's rows were not run (no --vllm-router; scripts/vllm-router-env.sh installs it).\n\n";
        }
        let missed = self.missed_goals();
        if self.kv_aware().is_some() {
            s += &if missed.is_empty() {
                "kv_aware meets its goals.\n".to_string()
            } else {
                format!("kv_aware misses: {}.\n", missed.join("; "))
            };
        }
        s
    }

    fn kv_aware(&self) -> Option<&Row> {
        self.rows.iter().find(|r| r.router == "disagg route" && r.policy == "kv_aware")
    }

    fn measured(&self) -> impl Iterator<Item = &Row> {
        self.rows.iter().filter(|r| r.error.is_none())
    }

    /// Each goal kv_aware misses, with by how much.
    pub(crate) fn missed_goals(&self) -> Vec<String> {
        let Some(kv) = self.kv_aware() else { return Vec::new() };
        if let Some(e) = &kv.error {
            return vec![format!("kv_aware's row was not measured: {e}")];
        }
        let mut missed = Vec::new();
        if kv.hit_rate < HIT_SHARE * self.oracle {
            missed.push(format!(
                "prefix-hit rate {:.1}% is {:.0}% of the oracle's {:.1}% (goal {:.0}%)",
                kv.hit_rate * 100.0,
                kv.hit_rate / self.oracle * 100.0,
                self.oracle * 100.0,
                HIT_SHARE * 100.0
            ));
        }
        let (max_skew, slack) = (self.args.goal_max_skew, self.args.goal_p99_slack);
        // The trace's own unevenness: round_robin, measured in the same run, spreads
        // requests evenly; kv_aware may not be worse than that, nor than the goal.
        let round_robin = self.measured().find(|r| r.router == "disagg route" && r.policy == "round_robin").map(|r| r.prefill_skew);
        let allowed = round_robin.map_or(max_skew, |rr| rr.max(max_skew));
        // NaN (no measurement) misses the goal too.
        if kv.prefill_skew.partial_cmp(&allowed).is_none_or(|o| o.is_gt()) {
            let rr = round_robin.map(|rr| format!(", round_robin's in this run {rr:.2}")).unwrap_or_default();
            missed.push(format!("prefill load skew {:.2} (goal <= {max_skew}{rr})", kv.prefill_skew));
        }
        for r in self.measured().filter(|r| !std::ptr::eq(*r, kv)) {
            if kv.ttft_p99.partial_cmp(&(r.ttft_p99 * (1.0 + slack))).is_none_or(|o| o.is_ge()) {
                let allowed = if slack > 0.0 { format!(" (+{:.0}% allowed)", slack * 100.0) } else { String::new() };
                missed
                    .push(format!("TTFT p99 {:.0} ms is not below {} {}'s {:.0} ms{allowed}", kv.ttft_p99, r.router, r.policy, r.ttft_p99));
            }
        }
        if kv.failed > 0 {
            missed.push(format!("{} requests failed", kv.failed));
        }
        missed
    }
}

/// The picture, as SVG or PNG by the file's extension.
pub(crate) fn plot(path: &Path, rows: &[Row], oracle: f64) -> anyhow::Result<()> {
    crate::bench::plot::register_font()?;
    let size = (1200, 520);
    if path.extension().is_some_and(|e| e == "png") {
        draw(BitMapBackend::new(path, size).into_drawing_area(), rows, oracle)
    } else {
        draw(SVGBackend::new(path, size).into_drawing_area(), rows, oracle)
    }
}

/// TTFT p50 and p99 per row (log scale), and each row's prefix-hit rate against the oracle.
fn draw<DB: DrawingBackend>(root: DrawingArea<DB, plotters::coord::Shift>, rows: &[Row], oracle: f64) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    let rows: Vec<&Row> = rows.iter().filter(|r| r.error.is_none()).collect();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(640);
    let labels: Vec<String> =
        rows.iter().map(|r| format!("{}{}", if r.router.starts_with("vllm") { "vllm-router " } else { "" }, r.policy)).collect();
    let n = rows.len().max(1);
    let top = rows.iter().map(|r| r.ttft_p99).filter(|v| v.is_finite()).fold(1.0, f64::max) * 1.5;
    let mut chart = ChartBuilder::on(&left)
        .caption("TTFT p50 (light) and p99 (dark), ms", ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(60)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..n as f64, (1f64..top).log_scale())?;
    chart.configure_mesh().disable_x_mesh().x_labels(0).draw()?;
    for (i, r) in rows.iter().enumerate() {
        let x = i as f64;
        chart.draw_series([Rectangle::new([(x + 0.1, 1.0), (x + 0.45, r.ttft_p50.max(1.0))], BLUE.mix(0.4).filled())])?;
        chart.draw_series([Rectangle::new([(x + 0.5, 1.0), (x + 0.85, r.ttft_p99.max(1.0))], BLUE.filled())])?;
    }
    let mut bars = ChartBuilder::on(&right)
        .caption(format!("prefix-hit rate, % (line: oracle {:.1}%)", oracle * 100.0), ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(60)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..n as f64, 0f64..rows.iter().map(|r| r.hit_rate).fold(oracle, f64::max).mul_add(130.0, 1.0).min(100.0))?;
    bars.configure_mesh().disable_x_mesh().x_labels(0).draw()?;
    for (i, r) in rows.iter().enumerate() {
        let x = i as f64;
        bars.draw_series([Rectangle::new([(x + 0.15, 0.0), (x + 0.85, r.hit_rate * 100.0)], GREEN.filled())])?;
    }
    bars.draw_series(LineSeries::new([(0.0, oracle * 100.0), (n as f64, oracle * 100.0)], RED.stroke_width(2)))?;
    for (area, width) in [(&left, 640.0), (&right, 560.0)] {
        let step = (width - 80.0) / n as f64;
        for (i, l) in labels.iter().enumerate() {
            let x = (65.0 + step * (i as f64 + 0.1)) as i32;
            area.draw(&Text::new(l.clone(), (x, 470), ("sans-serif", 11).into_font()))?;
        }
    }
    root.present()?;
    Ok(())
}
