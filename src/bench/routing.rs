//! What a run says about routing, beside vLLM's usual numbers:
//! - prefix-hit rate: the prompt tokens the engines found cached
//!   (`usage.prompt_tokens_details.cached_tokens`) over all prompt tokens, among successful
//!   requests that report it (None when none does);
//! - load skew: the most work one worker got over the mean work per worker, where a
//!   prefill's work is the prompt tokens it computed (prompt minus cached) and a decode's
//!   the tokens it generated; over the workers the records name (`disagg route
//!   --worker-headers`), so a worker that served nothing is not counted (the scoreboard
//!   counts those from the engines' own metrics). 1.0 is perfectly even;
//! - per-request records (`--save-detailed`): who served it, what was cached, its times.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use super::client::Output;

#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Routing {
    pub(crate) prefix_hit_rate: Option<f64>,
    pub(crate) prefill_load_skew: Option<f64>,
    pub(crate) decode_load_skew: Option<f64>,
}

/// max / mean of the work per worker; None without workers or work.
pub(crate) fn skew(work: &BTreeMap<&str, f64>) -> Option<f64> {
    let total: f64 = work.values().sum();
    if work.is_empty() || total <= 0.0 {
        return None;
    }
    let max = work.values().copied().fold(0.0, f64::max);
    Some(max / (total / work.len() as f64))
}

pub(crate) fn summarize(outputs: &[Output]) -> Routing {
    let ok: Vec<&Output> = outputs.iter().filter(|o| o.success).collect();
    let reporting: Vec<&&Output> = ok.iter().filter(|o| o.cached_tokens.is_some()).collect();
    let prompt: usize = reporting.iter().map(|o| o.prompt_len).sum();
    let cached: usize = reporting.iter().filter_map(|o| o.cached_tokens).sum();
    let prefix_hit_rate = (!reporting.is_empty() && prompt > 0).then(|| cached as f64 / prompt as f64);
    let mut prefill: BTreeMap<&str, f64> = BTreeMap::new();
    let mut decode: BTreeMap<&str, f64> = BTreeMap::new();
    for o in &ok {
        if let Some(p) = &o.prefill {
            *prefill.entry(p).or_default() += o.prompt_len.saturating_sub(o.cached_tokens.unwrap_or(0)) as f64;
        }
        if let Some(d) = &o.decode {
            *decode.entry(d).or_default() += o.output_tokens.unwrap_or(0) as f64;
        }
    }
    Routing { prefix_hit_rate, prefill_load_skew: skew(&prefill), decode_load_skew: skew(&decode) }
}

/// One record per request, in the order sent.
pub(crate) fn records(outputs: &[Output]) -> Value {
    Value::Array(
        outputs
            .iter()
            .map(|o| {
                json!({"success": o.success, "start_time": o.start_time, "ttft": o.ttft, "e2el": o.latency,
                       "input_len": o.prompt_len, "output_len": o.output_tokens, "cached_tokens": o.cached_tokens,
                       "prefill": o.prefill, "decode": o.decode, "error": o.error})
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out(prompt: usize, cached: Option<usize>, output: usize, prefill: Option<&str>, decode: &str) -> Output {
        Output {
            success: true,
            prompt_len: prompt,
            cached_tokens: cached,
            output_tokens: Some(output),
            prefill: prefill.map(str::to_owned),
            decode: Some(decode.to_owned()),
            ..Output::default()
        }
    }

    #[test]
    fn hit_rate_and_skew_on_hand_made_runs() {
        // Prefill A computes 100 + 60, B 40: mean 100, max 160 -> 1.6. Decodes: 10 + 30 vs 20 -> 40 / 30.
        let runs =
            vec![out(100, Some(0), 10, Some("A"), "D1"), out(100, Some(40), 30, Some("A"), "D1"), out(100, Some(60), 20, Some("B"), "D2")];
        let r = summarize(&runs);
        assert_eq!(r.prefix_hit_rate, Some(100.0 / 300.0));
        assert_eq!(r.prefill_load_skew, Some(1.6));
        assert!((r.decode_load_skew.unwrap() - 40.0 / 30.0).abs() < 1e-12);
        // Perfectly even: 1.0. Failed requests and requests without usage details do not count.
        let even = vec![
            out(50, Some(10), 5, Some("A"), "D"),
            out(50, Some(10), 5, Some("B"), "D"),
            out(70, None, 5, None, "D"),
            Output { success: false, ..out(999, Some(999), 9, Some("A"), "D") },
        ];
        let r = summarize(&even);
        assert_eq!(r.prefix_hit_rate, Some(0.2), "20 of the 100 tokens of the requests that report");
        assert_eq!(r.prefill_load_skew, Some(1.0));
        assert_eq!(r.decode_load_skew, Some(1.0));
        // Nothing named, nothing reported: no figures rather than made-up ones.
        let blind = vec![Output { success: true, prompt_len: 10, ..Output::default() }];
        assert_eq!(summarize(&blind), Routing::default());
    }
}
