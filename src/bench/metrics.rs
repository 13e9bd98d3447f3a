//! The benchmark's numbers, defined as vLLM defines them (vllm/benchmarks/serve.py
//! calculate_metrics): numpy's mean, median, population std and linearly interpolated
//! percentiles; TPOT = (E2EL - TTFT) / (output - 1) for outputs over one token; goodput =
//! requests meeting every SLO, with TPOT 0 for one-token outputs.

use super::client::Output;
use super::dataset::Tok;

/// numpy.percentile (linear interpolation) of sorted values; 0 for none.
pub(crate) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = p / 100.0 * (sorted.len() - 1) as f64;
    let lo = rank.floor() as usize;
    let hi = rank.ceil() as usize;
    sorted[lo] + (sorted[hi] - sorted[lo]) * (rank - lo as f64)
}

pub(crate) fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        0.0
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

/// Population standard deviation (numpy's default).
pub(crate) fn std(v: &[f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let m = mean(v);
    (v.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / v.len() as f64).sqrt()
}

/// One latency metric's statistics, in milliseconds.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Stat {
    pub(crate) mean: f64,
    pub(crate) median: f64,
    pub(crate) std: f64,
    pub(crate) percentiles: Vec<(f64, f64)>,
}

pub(crate) fn stat(values: &[f64], percentiles: &[f64]) -> Stat {
    let mut s: Vec<f64> = values.iter().map(|v| v * 1000.0).collect();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    Stat {
        mean: mean(&s),
        median: percentile(&s, 50.0),
        std: std(&s),
        percentiles: percentiles.iter().map(|p| (*p, percentile(&s, *p))).collect(),
    }
}

/// SLOs in milliseconds.
#[derive(Debug, Clone, Default)]
pub(crate) struct Goodput {
    pub(crate) ttft: Option<f64>,
    pub(crate) tpot: Option<f64>,
    pub(crate) e2el: Option<f64>,
}

impl Goodput {
    pub(crate) fn parse(items: &[String]) -> Result<Goodput, String> {
        let mut g = Goodput::default();
        for item in items {
            let (k, v) = item.split_once(':').ok_or_else(|| format!("--goodput {item}: expected KEY:MILLISECONDS"))?;
            let ms: f64 = v.parse().map_err(|_| format!("--goodput {item}: {v} is not a number"))?;
            if ms < 0.0 {
                return Err(format!("--goodput {item}: must not be negative"));
            }
            match k {
                "ttft" => g.ttft = Some(ms),
                "tpot" => g.tpot = Some(ms),
                "e2el" => g.e2el = Some(ms),
                _ => return Err(format!("--goodput {item}: {k} is not one of ttft, tpot, e2el")),
            }
        }
        Ok(g)
    }
    pub(crate) fn is_set(&self) -> bool {
        self.ttft.is_some() || self.tpot.is_some() || self.e2el.is_some()
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Metrics {
    pub(crate) completed: usize,
    pub(crate) failed: usize,
    pub(crate) total_input: usize,
    pub(crate) total_output: usize,
    pub(crate) request_throughput: f64,
    pub(crate) request_goodput: f64,
    pub(crate) output_throughput: f64,
    pub(crate) total_token_throughput: f64,
    pub(crate) ttft: Stat,
    pub(crate) tpot: Stat,
    pub(crate) itl: Stat,
    pub(crate) e2el: Stat,
    pub(crate) max_output_tokens_per_s: f64,
    pub(crate) max_concurrent_requests: usize,
    /// Output tokens of each request (0 for failed ones).
    pub(crate) output_lens: Vec<usize>,
    /// Prefix-hit rate and load skew (routing.rs).
    pub(crate) routing: super::routing::Routing,
}

pub(crate) fn calculate(outputs: &[Output], duration: f64, tok: Option<&Tok>, percentiles: &[f64], goodput: &Goodput) -> Metrics {
    let mut output_lens = Vec::with_capacity(outputs.len());
    let (mut ttfts, mut tpots, mut all_tpots, mut itls, mut e2els) = (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut total_input, mut completed) = (0, 0);
    for o in outputs {
        if !o.success {
            output_lens.push(0);
            continue;
        }
        let out_len = match o.output_tokens {
            Some(n) if n > 0 => n,
            _ => tok.map_or(1, |t| t.encode(&o.generated_text, false).len()),
        };
        output_lens.push(out_len);
        total_input += o.prompt_len;
        let mut tpot = 0.0;
        if out_len > 1 {
            tpot = (o.latency - o.ttft) / (out_len - 1) as f64;
            tpots.push(tpot);
        }
        all_tpots.push(tpot);
        itls.extend_from_slice(&o.itl);
        ttfts.push(o.ttft);
        e2els.push(o.latency);
        completed += 1;
    }
    let good = if goodput.is_set() {
        (0..ttfts.len())
            .filter(|&i| {
                goodput.ttft.is_none_or(|s| s / 1000.0 >= ttfts[i])
                    && goodput.tpot.is_none_or(|s| s / 1000.0 >= all_tpots[i])
                    && goodput.e2el.is_none_or(|s| s / 1000.0 >= e2els[i])
            })
            .count()
    } else {
        0
    };
    // Peaks: output tokens and requests in flight, per one-second bucket.
    let ok: Vec<&Output> = outputs.iter().filter(|o| o.success).collect();
    let (mut max_tok, mut max_conc) = (0.0, 0usize);
    if !ok.is_empty() {
        let t0 = ok.iter().map(|o| o.start_time).fold(f64::INFINITY, f64::min);
        let t1 = ok.iter().map(|o| o.start_time + o.latency).fold(f64::NEG_INFINITY, f64::max);
        let n = (t1 - t0).ceil() as usize + 1;
        let (mut tokens, mut conc) = (vec![0.0f64; n], vec![0usize; n]);
        for o in &ok {
            for tt in o.token_times() {
                let b = (tt - t0) as usize;
                if b < n {
                    tokens[b] += 1.0;
                }
            }
            let (s, e) = ((o.start_time - t0) as usize, ((o.start_time + o.latency) - t0) as usize);
            for c in conc.iter_mut().take(e.min(n - 1) + 1).skip(s) {
                *c += 1;
            }
        }
        max_tok = tokens.iter().copied().fold(0.0, f64::max);
        max_conc = conc.iter().copied().max().unwrap_or(0);
    }
    let total_output: usize = output_lens.iter().sum();
    Metrics {
        completed,
        failed: outputs.len() - completed,
        total_input,
        total_output,
        request_throughput: completed as f64 / duration,
        request_goodput: good as f64 / duration,
        output_throughput: total_output as f64 / duration,
        total_token_throughput: (total_input + total_output) as f64 / duration,
        ttft: stat(&ttfts, percentiles),
        tpot: stat(&tpots, percentiles),
        itl: stat(&itls, percentiles),
        e2el: stat(&e2els, percentiles),
        max_output_tokens_per_s: max_tok,
        max_concurrent_requests: max_conc,
        output_lens,
        routing: super::routing::summarize(outputs),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out(ttft: f64, itl: &[f64], tokens: usize) -> Output {
        Output {
            success: true,
            start_time: 0.0,
            ttft,
            latency: ttft + itl.iter().sum::<f64>(),
            itl: itl.to_vec(),
            prompt_len: 10,
            output_tokens: Some(tokens),
            ..Output::default()
        }
    }

    #[test]
    fn percentiles_interpolate_like_numpy() {
        let v = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(percentile(&v, 50.0), 2.5); // numpy.percentile([1,2,3,4], 50)
        assert!((percentile(&v, 99.0) - 3.97).abs() < 1e-12);
        assert_eq!(percentile(&v, 0.0), 1.0);
        assert_eq!(percentile(&[5.0], 99.9), 5.0);
        assert_eq!(percentile(&[], 99.0), 0.0);
        assert!((std(&[1.0, 2.0, 3.0, 4.0]) - 1.118033988749895).abs() < 1e-12, "population std");
    }

    #[test]
    fn hand_computed_run() {
        // A: TTFT 100 ms, then 3 tokens 20 ms apart -> 4 tokens, E2EL 160, TPOT 60/3 = 20.
        // B: TTFT 200 ms, one token only -> no TPOT; its ITL list is empty.
        // C: failed.
        let a = out(0.1, &[0.02, 0.02, 0.02], 4);
        let b = out(0.2, &[], 1);
        let c = Output { prompt_len: 99, ..Output::default() };
        let m = calculate(&[a, b, c], 2.0, None, &[50.0, 99.0], &Goodput::default());
        assert_eq!((m.completed, m.failed, m.total_input, m.total_output), (2, 1, 20, 5));
        assert_eq!(m.output_lens, vec![4, 1, 0]);
        assert!((m.request_throughput - 1.0).abs() < 1e-12);
        assert!((m.output_throughput - 2.5).abs() < 1e-12);
        assert!((m.total_token_throughput - 12.5).abs() < 1e-12);
        assert!((m.ttft.mean - 150.0).abs() < 1e-9);
        assert!((m.ttft.median - 150.0).abs() < 1e-9);
        assert!((m.ttft.std - 50.0).abs() < 1e-9);
        assert!((m.tpot.mean - 20.0).abs() < 1e-9, "only A has a TPOT");
        assert!((m.itl.mean - 20.0).abs() < 1e-9);
        assert_eq!(m.itl.percentiles.len(), 2);
        assert!((m.e2el.mean - 180.0).abs() < 1e-9);
        assert!((m.e2el.percentiles[1].1 - (160.0 + 0.99 * 40.0)).abs() < 1e-9);
        assert_eq!(m.max_concurrent_requests, 2);
        assert_eq!(m.max_output_tokens_per_s, 5.0);
    }

    #[test]
    fn goodput_counts_requests_meeting_every_slo() {
        let runs = [out(0.1, &[0.02, 0.02], 3), out(0.3, &[0.01], 2), out(0.05, &[], 1)];
        let g = Goodput::parse(&["ttft:150".into(), "tpot:15".into()]).unwrap();
        let m = calculate(&runs, 1.0, None, &[99.0], &g);
        // A: tpot 20 > 15 fails; B: ttft 300 fails; C: one token, tpot counts as 0, passes.
        assert_eq!(m.request_goodput, 1.0);
        assert!(Goodput::parse(&["foo:1".into()]).is_err());
        assert!(Goodput::parse(&["ttft".into()]).is_err());
    }

    #[test]
    fn empty_and_all_failed_runs_are_zeros_not_nans() {
        let m = calculate(&[], 1.0, None, &[99.0], &Goodput::default());
        assert_eq!((m.completed, m.total_output), (0, 0));
        assert_eq!(m.ttft.mean, 0.0);
        assert_eq!(m.ttft.percentiles[0].1, 0.0);
        let failed = Output::default();
        let m = calculate(&[failed.clone(), failed], 1.0, None, &[99.0], &Goodput::default());
        assert_eq!((m.completed, m.failed, m.max_concurrent_requests), (0, 2, 0));
        assert!(m.tpot.std == 0.0 && m.e2el.median == 0.0);
    }

    #[test]
    fn missing_usage_falls_back_to_the_tokenizer_or_one() {
        let mut o = out(0.1, &[0.1], 0);
        o.output_tokens = None;
        o.generated_text = " a b c".into();
        let m = calculate(&[o.clone()], 1.0, Some(&Tok::Sim), &[99.0], &Goodput::default());
        assert_eq!(m.total_output, 3);
        let m = calculate(&[o], 1.0, None, &[99.0], &Goodput::default());
        assert_eq!(m.total_output, 1);
    }
}
