//! The printed table and the result JSON, in `vllm bench serve`'s format and keys, so
//! scripts that read either keep working.

use serde_json::{json, Map, Value};

use super::client::Output;
use super::metrics::{Metrics, Stat};

/// What the report says about the run besides its metrics.
pub(crate) struct RunInfo<'a> {
    pub(crate) backend: &'a str,
    pub(crate) label: &'a str,
    pub(crate) model_id: &'a str,
    pub(crate) tokenizer_id: &'a str,
    pub(crate) num_prompts: u64,
    pub(crate) request_rate: f64,
    pub(crate) burstiness: f64,
    pub(crate) max_concurrency: Option<u64>,
    pub(crate) duration: f64,
    /// `--speedup`: the times above are simulated time, measured K times faster.
    pub(crate) speedup: f64,
    pub(crate) goodput: bool,
    pub(crate) metrics: &'a [String],
}

/// Python's str() of a float: `inf`, `10.0`, `2.5`.
pub(crate) fn py_float(v: f64) -> String {
    if v.is_infinite() {
        "inf".into()
    } else if v.fract() == 0.0 {
        format!("{v:.1}")
    } else {
        format!("{v}")
    }
}

/// The key of a percentile: `99`, `99.9`.
pub(crate) fn p_word(p: f64) -> String {
    if p.fract() == 0.0 {
        format!("{}", p as i64)
    } else {
        format!("{p}")
    }
}

fn line(out: &mut String, label: &str, value: impl std::fmt::Display) {
    out.push_str(&format!("{label:<40} {value:<10}\n"));
}

fn linef(out: &mut String, label: &str, value: f64) {
    out.push_str(&format!("{label:<40} {value:<10.2}\n"));
}

const METRICS: [(&str, &str, &str); 4] = [
    ("ttft", "TTFT", "Time to First Token"),
    ("tpot", "TPOT", "Time per Output Token (excl. 1st token)"),
    ("itl", "ITL", "Inter-token Latency"),
    ("e2el", "E2EL", "End-to-end Latency"),
];

fn stat_of<'m>(m: &'m Metrics, key: &str) -> &'m Stat {
    match key {
        "ttft" => &m.ttft,
        "tpot" => &m.tpot,
        "itl" => &m.itl,
        _ => &m.e2el,
    }
}

pub(crate) fn table(m: &Metrics, r: &RunInfo<'_>) -> String {
    let mut out = format!("{:=^50}\n", " Serving Benchmark Result ");
    line(&mut out, "Successful requests:", m.completed);
    line(&mut out, "Failed requests:", m.failed);
    if let Some(c) = r.max_concurrency {
        line(&mut out, "Maximum request concurrency:", c);
    }
    if r.request_rate.is_finite() {
        linef(&mut out, "Request rate configured (RPS):", r.request_rate);
    }
    linef(&mut out, "Benchmark duration (s):", r.duration);
    if r.speedup != 1.0 {
        linef(&mut out, "Simulator speedup (times scaled back):", r.speedup);
    }
    line(&mut out, "Total input tokens:", m.total_input);
    line(&mut out, "Total generated tokens:", m.total_output);
    linef(&mut out, "Request throughput (req/s):", m.request_throughput);
    if r.goodput {
        linef(&mut out, "Request goodput (req/s):", m.request_goodput);
    }
    linef(&mut out, "Output token throughput (tok/s):", m.output_throughput);
    linef(&mut out, "Peak output token throughput (tok/s):", m.max_output_tokens_per_s);
    linef(&mut out, "Peak concurrent requests:", m.max_concurrent_requests as f64);
    linef(&mut out, "Total token throughput (tok/s):", m.total_token_throughput);
    let routing = &m.routing;
    for (label, v) in [
        ("Prefix-hit rate (%):", routing.prefix_hit_rate.map(|h| h * 100.0)),
        ("Prefill load skew (max/mean):", routing.prefill_load_skew),
        ("Decode load skew (max/mean):", routing.decode_load_skew),
    ] {
        if let Some(v) = v {
            linef(&mut out, label, v);
        }
    }
    for (key, name, header) in METRICS {
        if !r.metrics.iter().any(|k| k == key) {
            continue;
        }
        let s = stat_of(m, key);
        out.push_str(&format!("{header:-^50}\n"));
        linef(&mut out, &format!("Mean {name} (ms):"), s.mean);
        linef(&mut out, &format!("Median {name} (ms):"), s.median);
        for (p, v) in &s.percentiles {
            linef(&mut out, &format!("P{} {name} (ms):", p_word(*p)), *v);
        }
    }
    out.push_str(&"=".repeat(50));
    out.push('\n');
    out
}

pub(crate) fn json(m: &Metrics, r: &RunInfo<'_>, outputs: &[Output], detailed: bool, date: &str) -> Value {
    let mut j = Map::new();
    let mut put = |k: &str, v: Value| {
        j.insert(k.to_string(), v);
    };
    put("date", json!(date));
    put("endpoint_type", json!(r.backend));
    put("backend", json!(r.backend));
    put("label", json!(r.label));
    put("model_id", json!(r.model_id));
    put("tokenizer_id", json!(r.tokenizer_id));
    put("num_prompts", json!(r.num_prompts));
    put("request_rate", if r.request_rate.is_finite() { json!(r.request_rate) } else { json!("inf") });
    put("burstiness", json!(r.burstiness));
    put("max_concurrency", json!(r.max_concurrency));
    put("duration", json!(r.duration));
    if r.speedup != 1.0 {
        put("speedup", json!(r.speedup));
    }
    put("completed", json!(m.completed));
    put("failed", json!(m.failed));
    put("total_input_tokens", json!(m.total_input));
    put("total_output_tokens", json!(m.total_output));
    put("request_throughput", json!(m.request_throughput));
    put("request_goodput", if r.goodput { json!(m.request_goodput) } else { Value::Null });
    put("output_throughput", json!(m.output_throughput));
    put("total_token_throughput", json!(m.total_token_throughput));
    if detailed {
        put("input_lens", json!(outputs.iter().map(|o| o.prompt_len).collect::<Vec<_>>()));
        put("output_lens", json!(m.output_lens));
        put("ttfts", json!(outputs.iter().map(|o| o.ttft).collect::<Vec<_>>()));
        put("itls", json!(outputs.iter().map(|o| o.itl.clone()).collect::<Vec<_>>()));
        put("latencies", json!(outputs.iter().map(|o| o.latency).collect::<Vec<_>>()));
        put("start_times", json!(outputs.iter().map(|o| o.start_time).collect::<Vec<_>>()));
        put("generated_texts", json!(outputs.iter().map(|o| o.generated_text.clone()).collect::<Vec<_>>()));
        put("errors", json!(outputs.iter().map(|o| o.error.clone()).collect::<Vec<_>>()));
    }
    put("prefix_hit_rate", json!(m.routing.prefix_hit_rate));
    put("prefill_load_skew", json!(m.routing.prefill_load_skew));
    put("decode_load_skew", json!(m.routing.decode_load_skew));
    if detailed {
        put("requests", super::routing::records(outputs));
    }
    put("max_output_tokens_per_s", json!(m.max_output_tokens_per_s));
    put("max_concurrent_requests", json!(m.max_concurrent_requests));
    put("rtfx", json!(0.0));
    for (key, _, _) in METRICS {
        if !r.metrics.iter().any(|k| k == key) {
            continue;
        }
        let s = stat_of(m, key);
        put(&format!("mean_{key}_ms"), json!(s.mean));
        put(&format!("median_{key}_ms"), json!(s.median));
        put(&format!("std_{key}_ms"), json!(s.std));
        for (p, v) in &s.percentiles {
            put(&format!("p{}_{key}_ms", p_word(*p)), json!(v));
        }
    }
    Value::Object(j)
}

/// vLLM's result file name: `{label}-{rate}qps[-concurrency{N}]-{model}-{date}.json`.
pub(crate) fn file_name(r: &RunInfo<'_>, date: &str) -> String {
    let model = r.model_id.rsplit('/').next().unwrap_or(r.model_id);
    let conc = r.max_concurrency.map_or(String::new(), |c| format!("-concurrency{c}"));
    format!("{}-{}qps{conc}-{model}-{date}.json", r.label, py_float(r.request_rate))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::metrics::{calculate, Goodput};

    #[test]
    fn table_and_keys_match_vllms() {
        let o =
            Output { success: true, ttft: 0.1, itl: vec![0.02], latency: 0.12, prompt_len: 7, output_tokens: Some(2), ..Output::default() };
        let m = calculate(std::slice::from_ref(&o), 1.0, None, &[99.0, 99.9], &Goodput::default());
        let metrics = vec!["ttft".to_string(), "tpot".into(), "itl".into()];
        let r = RunInfo {
            backend: "vllm",
            label: "vllm",
            model_id: "/m/tiny",
            tokenizer_id: "/m/tiny",
            num_prompts: 1,
            request_rate: f64::INFINITY,
            burstiness: 1.0,
            max_concurrency: Some(4),
            duration: 1.0,
            speedup: 1.0,
            goodput: false,
            metrics: &metrics,
        };
        let t = table(&m, &r);
        assert!(t.starts_with("============ Serving Benchmark Result ============\n"));
        assert!(t.contains("Successful requests:                     1         \n"));
        assert!(t.contains("Maximum request concurrency:             4         \n"));
        assert!(t.contains("Mean TTFT (ms):                          100.00    \n"));
        assert!(t.contains("P99.9 ITL (ms):                          20.00     \n"));
        assert!(!t.contains("E2EL") && !t.contains("Request rate configured"));
        assert!(t.contains("-----Time per Output Token (excl. 1st token)------\n"));
        let j = json(&m, &r, &[o], false, "20261121-120000");
        for k in [
            "mean_ttft_ms",
            "median_ttft_ms",
            "std_ttft_ms",
            "p99_ttft_ms",
            "p99.9_ttft_ms",
            "p99_tpot_ms",
            "p99_itl_ms",
            "total_input_tokens",
            "total_output_tokens",
            "request_throughput",
            "output_throughput",
            "completed",
            "failed",
        ] {
            assert!(j.get(k).is_some(), "{k}");
        }
        assert_eq!(j["request_rate"], "inf");
        assert!(j.get("ttfts").is_none(), "detailed fields only with --save-detailed");
        assert_eq!(file_name(&r, "20261121-120000"), "vllm-infqps-concurrency4-tiny-20261121-120000.json");
        assert_eq!(py_float(10.0), "10.0");
    }
}
