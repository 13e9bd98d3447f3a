//! `disagg bench`: a serving benchmark client with `vllm bench serve`'s flags, metric
//! definitions, printed table and result JSON, a progress bar, and a picture of the run.

mod args;
pub(crate) mod client;
pub(crate) mod dataset;
pub(crate) mod fit;
pub(crate) mod metrics;
pub mod plot;
pub(crate) mod report;
pub(crate) mod routing;
pub(crate) mod trace;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rand::SeedableRng;
use rand_distr::Distribution;
use serde_json::{json, Map, Value};

pub(crate) use args::BenchArgs;
use args::{Backend, DatasetName};
use client::{Output, RequestConfig};
use dataset::{SampleRequest, Tok};

const METRIC_NAMES: [&str; 4] = ["ttft", "tpot", "itl", "e2el"];

/// Streams per HTTP/2 connection with --http2.
const STREAMS_PER_H2_CONNECTION: usize = 100;

/// Arrival offsets (seconds) of `n` requests, as vLLM draws them: gamma gaps of shape
/// `burstiness` and scale 1/(rate*burstiness), rescaled so the last lands at n/rate.
pub(crate) fn arrivals(n: usize, rate: f64, burstiness: f64, seed: u64) -> Vec<f64> {
    if rate.is_infinite() {
        return vec![0.0; n];
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x5eed);
    let mut t = 0.0;
    let mut out: Vec<f64> = if burstiness.is_infinite() {
        (0..n)
            .map(|_| {
                t += 1.0 / rate;
                t
            })
            .collect()
    } else {
        let gamma = rand_distr::Gamma::new(burstiness, 1.0 / (rate * burstiness)).expect("positive shape and scale");
        (0..n)
            .map(|_| {
                t += gamma.sample(&mut rng);
                t
            })
            .collect()
    };
    if let Some(&last) = out.last() {
        if last > 0.0 {
            let f = (n as f64 / rate) / last;
            out.iter_mut().for_each(|x| *x *= f);
        }
    }
    out
}

async fn first_model(client: &reqwest::Client, base: &str) -> anyhow::Result<String> {
    let v: Value = client
        .get(format!("{base}/v1/models"))
        .send()
        .await
        .with_context(|| format!("cannot reach {base}/v1/models to find the model; pass --model"))?
        .json()
        .await
        .context("/v1/models did not answer JSON")?;
    v["data"][0]["id"].as_str().map(str::to_owned).context("/v1/models lists no model; pass --model")
}

pub(crate) async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let base = args.base_url.clone().unwrap_or_else(|| format!("http://{}:{}", args.host, args.port));
    let base = base.trim_end_matches('/').to_string();
    let api_url = format!("{base}{}", args.endpoint);
    let suffix = args.backend.endpoint_suffix();
    if !api_url.ends_with(suffix) {
        bail!("--backend {} needs an endpoint ending in `{suffix}`, got {}", args.backend.name(), args.endpoint);
    }
    if args.backend == Backend::AnthropicMessages && args.ignore_eos {
        bail!("--ignore-eos: vLLM's Messages API has no such field (its chat request is built field by field); drop it, or use --backend openai-chat");
    }
    let selected: Vec<String> = args.percentile_metrics.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect();
    if let Some(bad) = selected.iter().find(|m| !METRIC_NAMES.contains(&m.as_str())) {
        bail!("--percentile-metrics: `{bad}` is not one of {}", METRIC_NAMES.join(", "));
    }
    let percentiles: Vec<f64> = args
        .metric_percentiles
        .split(',')
        .map(|p| p.trim().parse::<f64>().ok().filter(|v| (0.0..=100.0).contains(v)))
        .collect::<Option<_>>()
        .with_context(|| format!("--metric-percentiles {}: expected numbers between 0 and 100", args.metric_percentiles))?;
    let goodput = metrics::Goodput::parse(&args.goodput).map_err(anyhow::Error::msg)?;
    let headers: Vec<(String, String)> = args
        .header
        .iter()
        .map(|h| {
            h.split_once('=')
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                .with_context(|| format!("--header {h}: expected KEY=VALUE"))
        })
        .collect::<anyhow::Result<_>>()?;

    let build = || {
        // Idle connections are reused only under 4 s: vLLM closes them at 5 s
        // (VLLM_HTTP_TIMEOUT_KEEP_ALIVE), and a request sent as it closes one is lost
        // (a trace's gaps between arrivals run that long).
        let b = reqwest::Client::builder()
            .tcp_nodelay(true)
            .pool_max_idle_per_host(usize::MAX)
            .pool_idle_timeout(crate::router::upstream::legs::WORKER_CONNECTION_IDLE)
            .timeout(Duration::from_secs(6 * 3600));
        if args.http2 { b.http2_prior_knowledge() } else { b }.build()
    };
    let http = build()?;
    // HTTP/2 servers commonly allow a few hundred streams per connection (hyper: 200) and
    // a client multiplexes over one: open enough connections for the concurrency asked.
    let in_flight = args.max_concurrency.unwrap_or(args.num_prompts) as usize;
    let clients: Vec<reqwest::Client> = if args.http2 {
        (0..in_flight.div_ceil(STREAMS_PER_H2_CONNECTION)).map(|_| build()).collect::<Result<_, _>>()?
    } else {
        vec![http.clone()]
    };
    let model_id = match &args.model {
        Some(m) => m.clone(),
        None => {
            let m = first_model(&http, &base).await?;
            eprintln!("Model not specified, using the server's first model: {m}");
            m
        }
    };
    let model_name = args.served_model_name.clone().unwrap_or_else(|| model_id.clone());
    let tokenizer_id = match &args.tokenizer {
        Some(t) => t.clone(),
        None if std::path::Path::new(&model_id).join("tokenizer.json").is_file() => model_id.clone(),
        None => bail!(
            "no tokenizer: --model `{model_id}` is not a local model directory; pass --tokenizer DIR (with a tokenizer.json), \
             or --tokenizer sim for the simulator's tokenizer"
        ),
    };
    let tok = Tok::load(&tokenizer_id)?;
    let n = args.num_prompts as usize;
    let requests: Vec<SampleRequest> = match args.dataset_name {
        DatasetName::Random => dataset::random(
            &tok,
            &dataset::RandomSpec {
                num: n,
                input_len: args.random_input_len,
                output_len: args.random_output_len,
                range_ratio: args.random_range_ratio,
                prefix_len: args.random_prefix_len,
                seed: args.seed,
            },
        )?,
        DatasetName::PrefixRepetition => dataset::prefix_repetition(
            &tok,
            &dataset::PrefixRepetitionSpec {
                num: n,
                prefix_len: args.prefix_repetition_prefix_len,
                suffix_len: args.prefix_repetition_suffix_len,
                num_prefixes: args.prefix_repetition_num_prefixes as usize,
                output_len: args.prefix_repetition_output_len,
                shuffle: !args.disable_shuffle,
                seed: args.seed,
            },
        )?,
        DatasetName::Sharegpt => {
            let path = args.dataset_path.as_ref().context("--dataset-name sharegpt needs --dataset-path FILE")?;
            dataset::sharegpt(&tok, path, n, args.sharegpt_output_len, !args.disable_shuffle, args.seed)?
        }
        DatasetName::MooncakeTrace | DatasetName::TimedTrace => {
            let path = args.dataset_path.as_ref().context("a trace dataset needs --dataset-path FILE (JSONL records with hash ids)")?;
            if args.backend.text_only() {
                bail!("trace datasets send token-id prompts, which only the completions API takes: use --backend openai or vllm");
            }
            trace::load(&tok, path, &trace::TraceSpec { num: n, layout: trace_layout(&args) })?
        }
    };
    check_trace_flags(&args)?;
    let n = requests.len();
    let mut sampling = Map::new();
    if let Some(t) = args.temperature {
        sampling.insert("temperature".into(), json!(t));
    }
    if let Some(t) = args.top_p {
        sampling.insert("top_p".into(), json!(t));
    }
    if let Some(t) = args.top_k {
        sampling.insert("top_k".into(), json!(t));
    }
    // A trace's requests generate their recorded lengths (vLLM forces ignore_eos too).
    let ignore_eos = args.ignore_eos || is_trace(&args);
    let cfg = Arc::new(RequestConfig { api_url, backend: args.backend, model: model_name, ignore_eos, sampling, headers });
    let prefix = args.request_id_prefix.clone().unwrap_or_else(|| format!("bench-{:08x}-", rand::random::<u32>()));

    if args.ready_check_timeout_sec > 0 {
        let end = Instant::now() + Duration::from_secs(args.ready_check_timeout_sec);
        loop {
            let o = client::send(&http, &cfg, &requests[0], &format!("{prefix}ready"), Instant::now()).await;
            if o.success {
                eprintln!("Initial test run completed.");
                break;
            }
            if Instant::now() > end {
                bail!("the endpoint did not answer within --ready-check-timeout-sec {}: {}", args.ready_check_timeout_sec, o.error);
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
    if args.num_warmups > 0 {
        eprintln!("Warming up with {} requests...", args.num_warmups);
        let warm = futures_util::future::join_all((0..args.num_warmups).map(|i| {
            let (http, cfg, req) = (&http, &cfg, &requests[0]);
            let id = format!("{prefix}warmup-{i}");
            async move { client::send(http, cfg, req, &id, Instant::now()).await }
        }))
        .await;
        if warm.iter().all(|o| !o.success) {
            bail!("every warm-up request failed: {}", warm[0].error);
        }
    }

    eprintln!(
        "Traffic request rate: {}, burstiness {}, maximum request concurrency: {}",
        report::py_float(args.request_rate),
        args.burstiness,
        args.max_concurrency.map_or("None".to_string(), |c| c.to_string())
    );
    let bar = if args.disable_tqdm { indicatif::ProgressBar::hidden() } else { indicatif::ProgressBar::new(n as u64) };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} requests [{elapsed_precise}<{eta_precise}, {per_sec}]")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let sem = args.max_concurrency.map(|c| Arc::new(tokio::sync::Semaphore::new(c as usize)));
    // Arrivals in simulated time, sent K times faster against a sped-up simulator.
    let self_timed = is_trace(&args) && !args.no_self_timed;
    let offsets: Vec<f64> = match requests.iter().map(|r| r.arrival).collect::<Option<Vec<f64>>>() {
        Some(recorded) if self_timed => recorded,
        _ => arrivals(n, args.request_rate, args.burstiness, args.seed),
    };
    let offsets: Vec<f64> = offsets.into_iter().map(|t| t / args.speedup).collect();
    let requests = Arc::new(requests);
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(n);
    for (i, offset) in offsets.iter().enumerate() {
        let due = start + Duration::from_secs_f64(*offset);
        if due > Instant::now() {
            tokio::time::sleep_until(due.into()).await;
        }
        let (http, cfg, requests, sem, bar) = (clients[i % clients.len()].clone(), cfg.clone(), requests.clone(), sem.clone(), bar.clone());
        let id = format!("{prefix}{i}");
        tasks.push(tokio::spawn(async move {
            let _permit = match &sem {
                Some(s) => Some(s.clone().acquire_owned().await.expect("the semaphore is never closed")),
                None => None,
            };
            let o = client::send(&http, &cfg, &requests[i], &id, start).await;
            bar.inc(1);
            o
        }));
    }
    let mut outputs: Vec<Output> = Vec::with_capacity(n);
    for t in tasks {
        outputs.push(t.await.unwrap_or_else(|e| Output { error: format!("request task failed: {e}"), ..Output::default() }));
    }
    let mut duration = start.elapsed().as_secs_f64();
    bar.finish_and_clear();
    if args.speedup != 1.0 {
        duration *= args.speedup;
        outputs.iter_mut().for_each(|o| o.scale_time(args.speedup));
    }

    let failed: Vec<&Output> = outputs.iter().filter(|o| !o.success).collect();
    if !failed.is_empty() {
        println!("Failed requests during benchmark run detected (capping to 10):");
        for (i, o) in failed.iter().take(10).enumerate() {
            println!("Error {i}: {}", o.error);
        }
    }
    let m = metrics::calculate(&outputs, duration, Some(&tok), &percentiles, &goodput);
    let backend = args.backend.name();
    let label = args.label.clone().unwrap_or_else(|| backend.to_string());
    let info = report::RunInfo {
        backend,
        label: &label,
        model_id: &model_id,
        tokenizer_id: &tokenizer_id,
        num_prompts: n as u64,
        request_rate: args.request_rate,
        burstiness: args.burstiness,
        max_concurrency: args.max_concurrency,
        duration,
        speedup: args.speedup,
        goodput: goodput.is_set(),
        metrics: &selected,
    };
    print!("{}", report::table(&m, &info));
    let date = chrono::Local::now().format("%Y%m%d-%H%M%S").to_string();
    if args.save_result || args.result_filename.is_some() {
        let mut path = std::path::PathBuf::from(args.result_filename.clone().unwrap_or_else(|| report::file_name(&info, &date)));
        if let Some(dir) = &args.result_dir {
            std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
            path = dir.join(path);
        }
        let doc = report::json(&m, &info, &outputs, args.save_detailed, &date);
        std::fs::write(&path, serde_json::to_string_pretty(&doc)?).with_context(|| format!("cannot write {}", path.display()))?;
        println!("results: {}", path.display());
    }
    if let Some(p) = &args.plot {
        let title = format!("disagg bench: {model_id}, {} requests, {} completed in {duration:.1}s", n, m.completed);
        plot::write(p, &outputs, duration, &title)?;
        println!("plot: {}", p.display());
    }
    Ok(())
}

fn is_trace(args: &BenchArgs) -> bool {
    matches!(args.dataset_name, DatasetName::MooncakeTrace | DatasetName::TimedTrace)
}

fn trace_layout(args: &BenchArgs) -> trace::Layout {
    match args.dataset_name {
        DatasetName::TimedTrace => {
            let d = trace::Labels::default();
            trace::Layout::Timed {
                chunk: args.timed_trace_chunk_hash_size.unwrap_or(16) as usize,
                sec_multiplier: args.timed_trace_sec_multiplier.unwrap_or(1.0),
                labels: trace::Labels {
                    timestamp: args.timed_trace_label_timestamp.clone().unwrap_or(d.timestamp),
                    input_length: args.timed_trace_label_input_length.clone().unwrap_or(d.input_length),
                    output_length: args.timed_trace_label_output_length.clone().unwrap_or(d.output_length),
                    hash_ids: args.timed_trace_label_hash_ids.clone().unwrap_or(d.hash_ids),
                },
            }
        }
        _ => trace::Layout::Mooncake {
            block_size: args.trace_block_size.map_or(trace::TRACE_BLOCK, |b| b as usize),
            speedup: args.trace_speedup.unwrap_or(1.0),
        },
    }
}

/// Every trace flag does what it says with its dataset, or is refused.
fn check_trace_flags(args: &BenchArgs) -> anyhow::Result<()> {
    let ours = args.trace_block_size.is_some() || args.trace_speedup.is_some();
    let vllms = args.timed_trace_chunk_hash_size.is_some()
        || args.timed_trace_sec_multiplier.is_some()
        || args.timed_trace_label_timestamp.is_some()
        || args.timed_trace_label_input_length.is_some()
        || args.timed_trace_label_output_length.is_some()
        || args.timed_trace_label_hash_ids.is_some();
    if ours && args.dataset_name != DatasetName::MooncakeTrace {
        bail!("--trace-block-size and --trace-speedup apply to --dataset-name mooncake_trace only");
    }
    if vllms && args.dataset_name != DatasetName::TimedTrace {
        bail!("--timed-trace-* flags apply to --dataset-name timed_trace only");
    }
    if (args.self_timed || args.no_self_timed) && !is_trace(args) {
        bail!("--self-timed/--no-self-timed is only supported with a trace dataset (timed_trace, mooncake_trace)");
    }
    if is_trace(args) && !args.no_self_timed && args.request_rate.is_finite() {
        bail!(
            "--request-rate: a trace's requests arrive at its timestamps (speed them up with --trace-speedup or \
               --timed-trace-sec-multiplier), unless --no-self-timed"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arrivals_end_at_n_over_rate_and_are_bursty_as_asked() {
        let a = arrivals(1000, 50.0, 1.0, 3);
        assert!((a[999] - 20.0).abs() < 1e-9, "rescaled to n/rate");
        assert!(a.windows(2).all(|w| w[1] >= w[0]));
        let gaps = |a: &[f64]| a.windows(2).map(|w| w[1] - w[0]).collect::<Vec<_>>();
        let cv = |g: &[f64]| metrics::std(g) / metrics::mean(g);
        assert!((cv(&gaps(&a)) - 1.0).abs() < 0.15, "Poisson gaps: cv ~1, got {}", cv(&gaps(&a)));
        let smooth = arrivals(1000, 50.0, 16.0, 3);
        assert!(cv(&gaps(&smooth)) < 0.4);
        assert_eq!(arrivals(5, f64::INFINITY, 1.0, 0), vec![0.0; 5]);
    }
}
