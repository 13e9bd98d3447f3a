//! `disagg bench` against simulated engines over loopback: results, files, failures,
//! both APIs, datasets, arrivals.

use std::path::PathBuf;
use std::time::Instant;

use serde_json::Value;

use crate::support::*;

fn tmp(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("bench-{}-{}", std::process::id(), rand::random::<u32>()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

async fn bench(args: &[&str]) -> (bool, String, String) {
    let out = tokio::process::Command::new(BIN).arg("bench").args(args).output().await.unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

fn line_value(table: &str, label: &str) -> f64 {
    table.lines().find_map(|l| l.strip_prefix(label)).unwrap_or_else(|| panic!("no `{label}` in:\n{table}")).trim().parse().unwrap()
}

#[tokio::test]
async fn results_have_vllms_table_and_json_and_count_exactly() {
    let s = Proc::sim(&["--decode-ms-per-token", "2"]).await;
    let result = tmp("r.json");
    let (ok, out, err) = bench(&[
        "--base-url",
        &s.url,
        "--tokenizer",
        "sim",
        "--num-prompts",
        "40",
        "--random-input-len",
        "50",
        "--random-output-len",
        "12",
        "--max-concurrency",
        "8",
        "--ignore-eos",
        "--save-result",
        "--save-detailed",
        "--result-filename",
        result.to_str().unwrap(),
        "--metric-percentiles",
        "50,99.9",
        "--percentile-metrics",
        "ttft,tpot,itl,e2el",
        "--disable-tqdm",
    ])
    .await;
    assert!(ok, "{err}");
    assert!(out.contains("============ Serving Benchmark Result ============"), "{out}");
    assert_eq!(line_value(&out, "Successful requests:"), 40.0);
    assert_eq!(line_value(&out, "Total generated tokens:"), 40.0 * 12.0, "ignore_eos: every request its full length");
    assert!(out.contains("P99.9 E2EL (ms):"));
    let j: Value = serde_json::from_str(&std::fs::read_to_string(&result).unwrap()).unwrap();
    assert_eq!(j["completed"], 40);
    assert_eq!(j["failed"], 0);
    assert_eq!(j["total_output_tokens"], 480);
    assert_eq!(j["max_concurrency"], 8);
    assert_eq!(j["request_rate"], "inf");
    for k in ["mean_ttft_ms", "median_tpot_ms", "p50_itl_ms", "p99.9_e2el_ms", "std_ttft_ms", "request_throughput", "output_throughput"] {
        assert!(j[k].is_number(), "{k}");
    }
    // The server's own count of prompt tokens (usage) is what is reported, as in vLLM.
    let m = metrics(&s.url).await;
    assert_eq!(j["total_input_tokens"].as_f64().unwrap(), metric(&m, "vllm:prompt_tokens_total", &[]));
    assert_eq!(j["total_output_tokens"].as_f64().unwrap(), metric(&m, "vllm:generation_tokens_total", &[]));
    assert_eq!(j["ttfts"].as_array().unwrap().len(), 40, "--save-detailed keeps per-request fields");
    assert_eq!(j["itls"][0].as_array().unwrap().len(), 11);
    // TPOT is (E2EL - TTFT) / (n - 1), ITLs the gaps: their means agree here.
    let (tpot, itl) = (j["mean_tpot_ms"].as_f64().unwrap(), j["mean_itl_ms"].as_f64().unwrap());
    assert!((tpot - itl).abs() < 0.5, "{tpot} vs {itl}");
    // The simulator keeps its steps on schedule (a late step is followed by a shorter
    // wait), so the mean is the step time within timer jitter, never a fraction of it.
    assert!(tpot >= 1.8, "about the decode step time: {tpot}");
}

#[tokio::test]
async fn failed_requests_are_counted_not_hidden() {
    let s = Proc::sim(&["--fail-rate", "0.5"]).await;
    let (ok, out, err) = bench(&[
        "--base-url",
        &s.url,
        "--tokenizer",
        "sim",
        "--num-prompts",
        "60",
        "--random-input-len",
        "10",
        "--random-output-len",
        "3",
        "--ignore-eos",
        "--disable-tqdm",
    ])
    .await;
    assert!(ok, "{err}");
    let (done, failed) = (line_value(&out, "Successful requests:"), line_value(&out, "Failed requests:"));
    assert_eq!(done + failed, 60.0);
    assert!(failed > 10.0 && done > 10.0, "{done} done, {failed} failed");
    assert!(out.contains("Failed requests during benchmark run detected"));
    assert_eq!(line_value(&out, "Total generated tokens:"), done * 3.0);
}

#[tokio::test]
async fn chat_backend_sharegpt_file_and_plot() {
    let s = Proc::sim(&[]).await;
    let data = tmp("sharegpt.json");
    let convs: Vec<Value> = (0..5)
        .map(|i| {
            serde_json::json!({"conversations": [
            {"from": "human", "value": format!("question number {i} about routers and queues")},
            {"from": "gpt", "value": "an answer that is long enough to count"}]})
        })
        .collect();
    std::fs::write(&data, serde_json::to_string(&convs).unwrap()).unwrap();
    let plot = tmp("run.svg");
    let (ok, out, err) = bench(&[
        "--base-url",
        &s.url,
        "--backend",
        "openai-chat",
        "--endpoint",
        "/v1/chat/completions",
        "--tokenizer",
        "sim",
        "--dataset-name",
        "sharegpt",
        "--dataset-path",
        data.to_str().unwrap(),
        "--num-prompts",
        "5",
        "--sharegpt-output-len",
        "6",
        "--ignore-eos",
        "--plot",
        plot.to_str().unwrap(),
        "--disable-tqdm",
    ])
    .await;
    assert!(ok, "{err}");
    assert_eq!(line_value(&out, "Successful requests:"), 5.0);
    assert_eq!(line_value(&out, "Total generated tokens:"), 30.0);
    let svg = std::fs::read_to_string(&plot).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("TTFT") && svg.contains("Throughput over the run"));
    // The chat endpoint check is vLLM's.
    let (ok, _, err) = bench(&["--base-url", &s.url, "--backend", "openai-chat", "--tokenizer", "sim", "--num-prompts", "1"]).await;
    assert!(!ok && err.contains("chat/completions"), "{err}");
}

#[tokio::test]
async fn request_rate_spreads_arrivals() {
    let s = Proc::sim(&[]).await;
    let t = Instant::now();
    let (ok, out, err) = bench(&[
        "--base-url",
        &s.url,
        "--tokenizer",
        "sim",
        "--num-prompts",
        "20",
        "--random-input-len",
        "5",
        "--random-output-len",
        "2",
        "--request-rate",
        "20",
        "--disable-tqdm",
    ])
    .await;
    assert!(ok, "{err}");
    assert!(t.elapsed().as_secs_f64() >= 0.95, "20 requests at 20/s take about a second");
    assert_eq!(line_value(&out, "Request rate configured (RPS):"), 20.0);
}

#[tokio::test]
async fn bad_flags_and_missing_tokenizer_are_clear() {
    let s = Proc::sim(&[]).await;
    let (ok, _, err) = bench(&["--base-url", &s.url, "--num-prompts", "1"]).await;
    assert!(!ok && err.contains("no tokenizer") && err.contains("--tokenizer sim"), "{err}");
    let (ok, _, err) = bench(&["--base-url", &s.url, "--tokenizer", "sim", "--goodput", "ttft=5"]).await;
    assert!(!ok && err.contains("KEY:MILLISECONDS"), "{err}");
    let (ok, _, err) = bench(&["--base-url", &s.url, "--tokenizer", "sim", "--percentile-metrics", "ttft,nope"]).await;
    assert!(!ok && err.contains("nope"), "{err}");
    let (ok, _, err) = bench(&["--base-url", &s.url, "--tokenizer", "sim", "--random-range-ratio", "1.5"]).await;
    assert!(!ok && err.contains("[0, 1)"), "{err}");
}

/// `--speedup K` on both ends: the simulator runs K times faster than its timing says,
/// the bench sends arrivals K times faster and reports in simulated time; the
/// simulator's own latency histograms are in simulated time too.
#[tokio::test]
async fn speedup_compresses_time_and_reports_simulated_time() {
    let s = Proc::sim(&["--decode-ms-per-token", "20", "--speedup", "10"]).await;
    let result = tmp("speedup.json");
    let t = Instant::now();
    let (ok, out, err) = bench(&[
        "--base-url",
        &s.url,
        "--tokenizer",
        "sim",
        "--num-prompts",
        "20",
        "--random-input-len",
        "8",
        "--random-output-len",
        "10",
        "--ignore-eos",
        "--request-rate",
        "10",
        "--speedup",
        "10",
        "--disable-tqdm",
        "--result-filename",
        result.to_str().unwrap(),
    ])
    .await;
    let wall = t.elapsed().as_secs_f64();
    assert!(ok, "{err}");
    // 20 arrivals at 10/s span about 2 simulated seconds, sent in about 0.2 s.
    let duration = line_value(&out, "Benchmark duration (s):");
    assert!(duration >= 1.8, "reported in simulated time: {duration}");
    assert!(wall < duration / 2.0, "sent faster than simulated time: {wall} s wall for {duration} s");
    // A 20 ms simulated step runs in 2 ms; reported back as 20 ms.
    let tpot = line_value(&out, "Mean TPOT (ms):");
    assert!((15.0..35.0).contains(&tpot), "TPOT in simulated time: {tpot}");
    assert_eq!(line_value(&out, "Simulator speedup (times scaled back):"), 10.0);
    let j: Value = serde_json::from_str(&std::fs::read_to_string(&result).unwrap()).unwrap();
    assert_eq!(j["speedup"], 10.0);
    let m = metrics(&s.url).await;
    assert_eq!(metric(&m, "vllm:e2e_request_latency_seconds_count", &[]), 20.0);
    let e2e = metric(&m, "vllm:e2e_request_latency_seconds_sum", &[]) / 20.0;
    assert!((0.15..0.5).contains(&e2e), "10 steps of 20 simulated ms: {e2e} s");
    let ttft = metric(&m, "vllm:time_to_first_token_seconds_sum", &[]) / metric(&m, "vllm:time_to_first_token_seconds_count", &[]);
    assert!((0.01..0.1).contains(&ttft), "one step of 20 simulated ms: {ttft} s");
}

/// vLLM's prefix_repetition dataset: each prefix shared by its suffixes, so a prefix-caching
/// engine hits on all but the first request of each.
#[tokio::test]
async fn prefix_repetition_prompts_share_their_prefixes() {
    let s = Proc::sim(&["--block-size", "16"]).await;
    let (ok, out, err) = bench(&[
        "--base-url",
        &s.url,
        "--tokenizer",
        "sim",
        "--dataset-name",
        "prefix_repetition",
        "--num-prompts",
        "13",
        "--prefix-repetition-prefix-len",
        "64",
        "--prefix-repetition-suffix-len",
        "20",
        "--prefix-repetition-num-prefixes",
        "3",
        "--prefix-repetition-output-len",
        "4",
        "--ignore-eos",
        "--max-concurrency",
        "1",
        "--disable-tqdm",
    ])
    .await;
    assert!(ok, "{err}");
    assert_eq!(line_value(&out, "Successful requests:"), 12.0, "13 // 3 per prefix, as vLLM");
    // 84 tokens each, and the BOS the server adds to a text prompt (counted from usage).
    assert_eq!(line_value(&out, "Total input tokens:"), 12.0 * 85.0);
    // 9 of the 12 find their prefix's 4 full blocks (BOS and 63 prefix tokens) cached.
    assert_eq!(metric(&metrics(&s.url).await, "vllm:prefix_cache_hits_total", &[]), 9.0 * 64.0);
}

/// A Mooncake trace replayed through `disagg route --worker-headers`: token-id prompts of
/// the recorded lengths, sent at the recorded times (sped up), outputs as recorded; the
/// records say who served each request and what was cached, and the summary's hit rate is
/// the engines' own.
#[tokio::test]
async fn a_mooncake_trace_replays_through_the_router_with_per_request_records() {
    let trace = tmp("trace.jsonl");
    // Request 1 shares request 0's first two blocks (of 16 tokens here), request 2 shares
    // nothing; the third arrives 0.6 s (recorded) = 0.2 s (replayed) after the start.
    std::fs::write(
        &trace,
        [
            r#"{"timestamp": 0, "input_length": 1600, "output_length": 3, "hash_ids": [7, 8, 9, 10]}"#,
            r#"{"timestamp": 300, "input_length": 1100, "output_length": 2, "hash_ids": [7, 8, 11]}"#,
            r#"{"timestamp": 600, "input_length": 700, "output_length": 4, "hash_ids": [12, 13]}"#,
        ]
        .join("\n"),
    )
    .unwrap();
    let p = Proc::sim(&["--role", "prefill", "--block-size", "16", "--enable-prompt-tokens-details"]).await;
    let d = Proc::sim(&["--role", "decode", "--block-size", "16", "--enable-prompt-tokens-details"]).await;
    let r = router(&["--prefill", &p.url, "--decode", &d.url, "--worker-headers"]).await;
    let result = tmp("trace.json");
    let (ok, out, err) = bench(&[
        "--base-url",
        &r.url,
        "--tokenizer",
        "sim",
        "--dataset-name",
        "mooncake_trace",
        "--dataset-path",
        trace.to_str().unwrap(),
        "--trace-block-size",
        "16",
        "--trace-speedup",
        "3",
        "--ignore-eos",
        "--max-concurrency",
        "1",
        "--disable-tqdm",
        "--save-result",
        "--save-detailed",
        "--result-filename",
        result.to_str().unwrap(),
    ])
    .await;
    assert!(ok, "{err}");
    assert_eq!(line_value(&out, "Successful requests:"), 3.0, "{err}");
    assert_eq!(line_value(&out, "Total input tokens:"), (50 + 34 + 21) as f64, "1600, 1100, 700 tokens at 16 per 512, exactly");
    assert_eq!(line_value(&out, "Total generated tokens:"), 9.0);
    let j: Value = serde_json::from_str(&std::fs::read_to_string(&result).unwrap()).unwrap();
    let recs = j["requests"].as_array().unwrap();
    assert_eq!(recs.len(), 3);
    // The second request found request 0's two shared blocks cached; the others nothing.
    let cached: Vec<u64> = recs.iter().map(|r| r["cached_tokens"].as_u64().unwrap()).collect();
    assert_eq!(cached, vec![0, 32, 0]);
    assert!(
        recs.iter().all(|x| x["prefill"] == format!("{}; rank=0", p.url).as_str() && x["decode"] == format!("{}; rank=0", d.url).as_str()),
        "{recs:?}"
    );
    assert!(recs[2]["start_time"].as_f64().unwrap() >= 0.19, "sent at its timestamp / 3: {}", recs[2]["start_time"]);
    let hits = metric(&metrics(&p.url).await, "vllm:prefix_cache_hits_total", &[]);
    assert_eq!(hits, 32.0, "the engine's count agrees");
    assert!((j["prefix_hit_rate"].as_f64().unwrap() - 32.0 / 105.0).abs() < 1e-9, "{}", j["prefix_hit_rate"]);
    assert_eq!(j["prefill_load_skew"].as_f64(), Some(1.0), "one prefill");
    // A trace's arrivals are its own: a request rate is refused, so are token ids for chat.
    let (ok, _, err) = bench(&[
        "--base-url",
        &r.url,
        "--tokenizer",
        "sim",
        "--dataset-name",
        "mooncake_trace",
        "--dataset-path",
        trace.to_str().unwrap(),
        "--request-rate",
        "5",
    ])
    .await;
    assert!(!ok && err.contains("--trace-speedup"), "{err}");
    let (ok, _, err) = bench(&[
        "--base-url",
        &r.url,
        "--tokenizer",
        "sim",
        "--dataset-name",
        "mooncake_trace",
        "--dataset-path",
        trace.to_str().unwrap(),
        "--backend",
        "openai-chat",
        "--endpoint",
        "/v1/chat/completions",
    ])
    .await;
    assert!(!ok && err.contains("completions API"), "{err}");
    let (ok, _, err) = bench(&["--base-url", &r.url, "--tokenizer", "sim", "--trace-speedup", "2"]).await;
    assert!(!ok && err.contains("mooncake_trace only"), "{err}");
}

/// `--backend anthropic-messages`: Anthropic's Messages stream timed and counted as the
/// OpenAI streams are, through the router (PD); the server's own token counts reported.
#[tokio::test]
async fn the_messages_backend_times_and_counts_anthropic_streams() {
    let p = Proc::sim(&["--role", "prefill", "--enable-prompt-tokens-details"]).await;
    let d = Proc::sim(&["--role", "decode", "--decode-ms-per-token", "2", "--enable-prompt-tokens-details"]).await;
    let r = router(&["--prefill", &p.url, "--decode", &d.url]).await;
    let result = tmp("messages.json");
    let args = |extra: &[&'static str]| {
        let mut a: Vec<String> = ["--base-url", &r.url, "--tokenizer", "sim", "--num-prompts", "12", "--random-input-len", "40"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        a.extend(["--random-output-len", "8", "--max-concurrency", "4", "--disable-tqdm"].map(String::from));
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let run = |a: Vec<String>| async move { bench(&a.iter().map(String::as_str).collect::<Vec<_>>()).await };
    let full = ["--backend", "anthropic-messages", "--endpoint", "/v1/messages", "--save-result", "--save-detailed", "--result-filename"];
    let mut a = args(&full);
    a.push(result.to_str().unwrap().to_string());
    let (ok, out, err) = run(a).await;
    assert!(ok, "{err}\n{out}");
    let j: Value = serde_json::from_str(&std::fs::read_to_string(&result).unwrap()).unwrap();
    assert_eq!((j["completed"].as_u64(), j["failed"].as_u64()), (Some(12), Some(0)), "{j}");
    assert_eq!(j["backend"], "anthropic-messages");
    // The decode's own counts: every generated token, every prompt token, reported.
    let dm = metrics(&d.url).await;
    assert_eq!(j["total_output_tokens"].as_f64().unwrap(), metric(&dm, "vllm:generation_tokens_total", &[]));
    assert_eq!(j["total_input_tokens"].as_f64().unwrap(), metric(&dm, "vllm:prompt_tokens_total", &[]));
    let ttfts = j["ttfts"].as_array().unwrap();
    assert!(ttfts.iter().all(|t| t.as_f64().unwrap() > 0.0), "{j}");
    assert!(
        j["mean_tpot_ms"].as_f64().unwrap() >= 1.0,
        "about the decode step time (2 ms; steps catch up after a late one): {}",
        j["mean_tpot_ms"]
    );
    // What it cannot do is refused.
    let (ok, _, err) = run(args(&["--backend", "anthropic-messages", "--endpoint", "/v1/messages", "--ignore-eos"])).await;
    assert!(!ok && err.contains("--ignore-eos"), "{err}");
    let (ok, _, err) = run(args(&["--backend", "anthropic-messages", "--endpoint", "/v1/completions"])).await;
    assert!(!ok && err.contains("/messages"), "{err}");
}

/// `--backend openai-responses` (vLLM's name): the Responses stream timed and counted as
/// the others are, through the router (PD); a stream without its terminal event fails.
#[tokio::test]
async fn the_responses_backend_times_and_counts_responses_streams() {
    let p = Proc::sim(&["--role", "prefill"]).await;
    let d = Proc::sim(&["--role", "decode", "--decode-ms-per-token", "2"]).await;
    let r = router(&["--prefill", &p.url, "--decode", &d.url]).await;
    let result = tmp("responses.json");
    let common = [
        "--tokenizer",
        "sim",
        "--random-input-len",
        "40",
        "--disable-tqdm",
        "--backend",
        "openai-responses",
        "--endpoint",
        "/v1/responses",
    ];
    let mut args = vec!["--base-url", r.url.as_str(), "--num-prompts", "12", "--random-output-len", "8", "--max-concurrency", "4"];
    args.extend(common);
    args.extend(["--ignore-eos", "--save-result", "--save-detailed", "--result-filename", result.to_str().unwrap()]);
    let (ok, out, err) = bench(&args).await;
    assert!(ok, "{err}\n{out}");
    let j: Value = serde_json::from_str(&std::fs::read_to_string(&result).unwrap()).unwrap();
    assert_eq!((j["completed"].as_u64(), j["failed"].as_u64()), (Some(12), Some(0)), "{j}");
    assert_eq!(j["backend"], "openai-responses");
    let dm = metrics(&d.url).await;
    assert_eq!(j["total_output_tokens"].as_f64().unwrap(), metric(&dm, "vllm:generation_tokens_total", &[]));
    assert_eq!(j["total_input_tokens"].as_f64().unwrap(), metric(&dm, "vllm:prompt_tokens_total", &[]));
    assert!(
        j["mean_tpot_ms"].as_f64().unwrap() >= 1.0,
        "about the decode step time (2 ms; steps catch up after a late one): {}",
        j["mean_tpot_ms"]
    );
    // A decode that dies mid-stream: the stream ends without response.completed, a failure.
    let dead = Proc::sim(&["--role", "decode", "--crash-after-requests", "0"]).await;
    let r2 = router(&["--prefill", &p.url, "--decode", &dead.url]).await;
    let mut args = vec!["--base-url", r2.url.as_str(), "--num-prompts", "1", "--random-output-len", "30", "--ignore-eos"];
    args.extend(common);
    let (_, out, err) = bench(&args).await;
    let failed = out.lines().find_map(|l| l.strip_prefix("Failed requests:")).map(|n| n.trim().to_string());
    assert_eq!(failed.as_deref(), Some("1"), "{out}\n{err}");
}
