//! `/metrics` of the simulator: vLLM's metric names with the `engine` (DP rank) and
//! `model_name` labels, plus the simulator's own KV bookkeeping under `disagg_sim_`.

use prometheus::{GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry};

use super::Engine;

/// One engine's counters (handles into the shared families).
pub(crate) struct Stats {
    pub(crate) prompt_tokens: IntCounter,
    pub(crate) prompt_local_compute: IntCounter,
    pub(crate) prompt_external: IntCounter,
    pub(crate) generation_tokens: IntCounter,
    pub(crate) requests_finished: IntCounter,
    pub(crate) transfers_sent: IntCounter,
    pub(crate) transfers_received: IntCounter,
    pub(crate) kv_load_failures: IntCounter,
    pub(crate) leases_expired: IntCounter,
    pub(crate) freed_by_decode_abort: IntCounter,
    pub(crate) stale_reads: IntCounter,
    pub(crate) prompt_local_hit: IntCounter,
    pub(crate) prefix_queries: IntCounter,
    pub(crate) prefix_hits: IntCounter,
    /// Simulated seconds (wall time × --speedup), vLLM's buckets.
    pub(crate) ttft: Histogram,
    pub(crate) e2e: Histogram,
    pub(crate) itl: Histogram,
}

/// vLLM's default buckets (vllm/v1/metrics/buckets.py).
const TTFT_BUCKETS: &[f64] =
    &[0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0];
const ITL_BUCKETS: &[f64] = &[0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0];
const REQUEST_LATENCY_BUCKETS: &[f64] =
    &[0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0];

pub(crate) struct SimMetrics {
    registry: Registry,
    running: GaugeVec,
    waiting: GaugeVec,
    kv_usage: GaugeVec,
    held_blocks: IntGaugeVec,
    held_requests: IntGaugeVec,
    prompt_tokens: IntCounterVec,
    by_source: IntCounterVec,
    generation: IntCounterVec,
    success: IntCounterVec,
    transfers: IntCounterVec,
    load_failures: IntCounterVec,
    leases_expired: IntCounterVec,
    freed_by_abort: IntCounterVec,
    stale_reads: IntCounterVec,
    prefix_queries: IntCounterVec,
    prefix_hits: IntCounterVec,
    ttft: HistogramVec,
    e2e: HistogramVec,
    itl: HistogramVec,
}

const LABELS: &[&str] = &["engine", "model_name"];

impl SimMetrics {
    pub(crate) fn new() -> Self {
        let r = Registry::new();
        let gauge =
            |name: &str, help: &str| crate::api::prom::register(&r, GaugeVec::new(Opts::new(name, help), LABELS).expect("valid metric"));
        let igauge =
            |name: &str, help: &str| crate::api::prom::register(&r, IntGaugeVec::new(Opts::new(name, help), LABELS).expect("valid metric"));
        let counter = |name: &str, help: &str, extra: &[&str]| {
            let labels: Vec<&str> = LABELS.iter().chain(extra).copied().collect();
            crate::api::prom::register(&r, IntCounterVec::new(Opts::new(name, help), &labels).expect("valid metric"))
        };
        let histogram = |name: &str, help: &str, buckets: &[f64]| {
            crate::api::prom::register(
                &r,
                HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets.to_vec()), LABELS).expect("valid metric"),
            )
        };
        SimMetrics {
            running: gauge("vllm:num_requests_running", "Number of requests in model execution batches."),
            waiting: gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed."),
            kv_usage: gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage."),
            held_blocks: igauge("disagg_sim_kv_blocks_held", "KV blocks a prefill holds for remote decodes (simulator)."),
            held_requests: igauge("disagg_sim_kv_requests_held", "Requests whose KV a prefill holds for a remote decode (simulator)."),
            prompt_tokens: counter("vllm:prompt_tokens_total", "Number of prefill tokens processed.", &[]),
            by_source: counter("vllm:prompt_tokens_by_source_total", "Number of prompt tokens by source.", &["source"]),
            generation: counter("vllm:generation_tokens_total", "Number of generation tokens processed.", &[]),
            success: counter("vllm:request_success_total", "Count of successfully processed requests.", &[]),
            transfers: counter("disagg_sim_kv_transfers_total", "KV pulls completed, by direction (simulator).", &["direction"]),
            load_failures: counter(
                "disagg_sim_kv_load_failures_total",
                "Decode requests failed because their KV could not be pulled or did not match (simulator).",
                &[],
            ),
            leases_expired: counter(
                "disagg_sim_kv_leases_expired_total",
                "Held KV released because no decode pulled it within the lease (simulator).",
                &[],
            ),
            freed_by_abort: counter(
                "disagg_sim_kv_freed_by_decode_abort_total",
                "Held KV freed early because the decode aborted before pulling (simulator).",
                &[],
            ),
            stale_reads: counter("disagg_sim_kv_stale_reads_total", "KV reads of blocks no longer held for that request (simulator).", &[]),
            prefix_queries: counter("vllm:prefix_cache_queries_total", "Prefix cache queries, in terms of number of queried tokens.", &[]),
            prefix_hits: counter("vllm:prefix_cache_hits_total", "Prefix cache hits, in terms of number of cached tokens.", &[]),
            ttft: histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", TTFT_BUCKETS),
            e2e: histogram("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", REQUEST_LATENCY_BUCKETS),
            itl: histogram("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", ITL_BUCKETS),
            registry: r,
        }
    }

    pub(crate) fn stats_for(&self, rank: usize, model: &str) -> Stats {
        let rank = rank.to_string();
        let l = [rank.as_str(), model];
        let src = |s: &str| self.by_source.with_label_values(&[l[0], l[1], s]);
        Stats {
            prompt_local_hit: src("local_cache_hit"),
            prefix_queries: self.prefix_queries.with_label_values(&l),
            prefix_hits: self.prefix_hits.with_label_values(&l),
            prompt_tokens: self.prompt_tokens.with_label_values(&l),
            prompt_local_compute: src("local_compute"),
            prompt_external: src("external_kv_transfer"),
            generation_tokens: self.generation.with_label_values(&l),
            requests_finished: self.success.with_label_values(&l),
            transfers_sent: self.transfers.with_label_values(&[l[0], l[1], "sent"]),
            transfers_received: self.transfers.with_label_values(&[l[0], l[1], "received"]),
            kv_load_failures: self.load_failures.with_label_values(&l),
            leases_expired: self.leases_expired.with_label_values(&l),
            freed_by_decode_abort: self.freed_by_abort.with_label_values(&l),
            stale_reads: self.stale_reads.with_label_values(&l),
            ttft: self.ttft.with_label_values(&l),
            e2e: self.e2e.with_label_values(&l),
            itl: self.itl.with_label_values(&l),
        }
    }

    pub(crate) fn render(&self, engines: &[std::sync::Arc<Engine>], model: &str) -> String {
        for e in engines {
            let s = e.snapshot();
            let rank = e.rank.to_string();
            let l = [rank.as_str(), model];
            self.running.with_label_values(&l).set(s.running as f64);
            self.waiting.with_label_values(&l).set(s.waiting as f64);
            self.kv_usage.with_label_values(&l).set(s.blocks_used as f64 / s.blocks_total as f64);
            self.held_blocks.with_label_values(&l).set(s.held_blocks as i64);
            self.held_requests.with_label_values(&l).set(s.held_requests as i64);
        }
        crate::api::prom::encode(&self.registry)
    }
}

impl Default for SimMetrics {
    fn default() -> Self {
        Self::new()
    }
}
