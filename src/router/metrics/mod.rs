//! The router's Prometheus metrics. Counters and histograms are recorded once per request
//! by `RequestRecord` when it drops; gauges (in flight, queue, health) are read at scrape.
//! Every label is a typed value (labels.rs); this room imports no other.

pub(crate) mod labels;

use std::sync::Arc;
use std::time::Instant;

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

pub(crate) use labels::{Cause, CircuitState, Dropped, ElasticLayout, KvAwareOutcome, Label, Leg, LegErrorKind, LegTime, RetryOf, Task};

pub(crate) struct RouterMetrics {
    registry: Registry,
    requests: IntCounterVec,
    errors: IntCounterVec,
    leg_errors: IntCounterVec,
    retries: IntCounterVec,
    legs: HistogramVec,
    duration: HistogramVec,
    in_flight: IntGaugeVec,
    healthy: IntGaugeVec,
    circuit: IntGaugeVec,
    circuit_opened: IntGaugeVec,
    kv_blocks: IntGaugeVec,
    kv_event_age: prometheus::GaugeVec,
    kv_intake: KvIntakeCounters,
    draining: IntGauge,
    queue_depth: IntGauge,
    permits: IntGauge,
    abandoned: prometheus::IntCounter,
    kv_aware: IntCounterVec,
    refused: IntCounterVec,
    task_restarts: IntCounterVec,
    observe_dropped: IntCounterVec,
    ttft: HistogramVec,
    predicted_ttft: HistogramVec,
    ttft_prediction: HistogramVec,
    elastic: IntCounterVec,
    tenant: TenantMetrics,
    /// One render at a time (each resets the per-worker series, then sets them).
    rendering: std::sync::Mutex<()>,
}

const BUCKETS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0];

impl RouterMetrics {
    pub(crate) fn new() -> Self {
        let r = Registry::new();
        let counter =
            |n: &str, h: &str, l: &[&str]| crate::api::prom::register(&r, IntCounterVec::new(Opts::new(n, h), l).expect("valid metric"));
        let hist = |n: &str, h: &str, l: &[&str]| {
            crate::api::prom::register(&r, HistogramVec::new(HistogramOpts::new(n, h).buckets(BUCKETS.to_vec()), l).expect("valid metric"))
        };
        RouterMetrics {
            requests: counter("disagg_router_requests_total", "Requests answered, by endpoint and status.", &["endpoint", "status"]),
            errors: counter("disagg_router_errors_total", "Failed requests, by cause.", &["cause"]),
            leg_errors: counter("disagg_router_leg_errors_total", "Failed leg attempts (each retry counts), by leg and kind.", &["leg", "kind"]),
            retries: counter("disagg_router_retries_total", "Legs retried on another worker, by leg.", &["leg"]),
            kv_aware: counter("disagg_router_kv_aware_total", "kv_aware decisions, by outcome (prefill_skipped: the decode prefilled the few tokens it lacked).", &["outcome"]),
            task_restarts: counter("disagg_router_task_restarts_total", "Background tasks started again after they ended or panicked, by task.", &["task"]),
            refused: counter("disagg_router_refused_total", "What the network boundary refused (docs/SECURITY.md), by where it came from and why.", &["from", "reason"]),
            observe_dropped: counter("disagg_router_observe_dropped_total", "Access-log lines and traces dropped because their writer fell behind, by what.", &["what"]),
            ttft: hist("disagg_router_ttft_seconds", "Time from a request's arrival to its answer's first output (a stream's first event, or the whole answer), by endpoint.", &["endpoint"]),
            predicted_ttft: hist("disagg_router_predicted_ttft_seconds", "slo_aware: the TTFT predicted for each streamed request's layout (from the first pick to the first output).", &[]),
            ttft_prediction: crate::api::prom::register(&r, HistogramVec::new(HistogramOpts::new("disagg_router_ttft_observed_over_predicted",
                "slo_aware: each streamed request's observed TTFT over the TTFT predicted for it (1: exact).").buckets(vec![0.25, 0.5, 0.67, 0.8, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 4.0]), &[]).expect("valid metric")),
            elastic: counter("disagg_router_elastic_layout_total", "Requests whose decode was an elastic engine (--pd-pool), by layout: alone (both legs on it) or pair.", &["layout"]),
            legs: hist("disagg_router_leg_duration_seconds", "Per-leg latency: prefill, decode_first_byte, decode_total.", &["leg"]),
            duration: hist("disagg_router_request_duration_seconds", "Whole request latency, by endpoint.", &["endpoint"]),
            in_flight: crate::api::prom::register(&r, IntGaugeVec::new(Opts::new("disagg_router_in_flight", "Requests in flight per worker and DP rank, as the router counts them."), &["worker", "role", "rank"]).expect("valid metric")),
            healthy: crate::api::prom::register(&r, IntGaugeVec::new(Opts::new("disagg_router_worker_healthy", "1 if the worker is healthy."), &["worker", "role"]).expect("valid metric")),
            circuit: crate::api::prom::register(&r, IntGaugeVec::new(Opts::new("disagg_router_worker_circuit_state",
                "The worker's circuit breaker: 0 closed, 1 half-open (probing), 2 open (ejected)."), &["worker", "role"]).expect("valid metric")),
            circuit_opened: crate::api::prom::register(&r, IntGaugeVec::new(Opts::new("disagg_router_worker_circuit_openings",
                "Times the worker's circuit opened (it was ejected)."), &["worker", "role"]).expect("valid metric")),
            kv_blocks: crate::api::prom::register(&r, IntGaugeVec::new(Opts::new("disagg_router_kv_index_blocks",
                "kv_aware: blocks the index holds for each worker's DP rank."), &["worker", "rank"]).expect("valid metric")),
            kv_event_age: crate::api::prom::register(&r, prometheus::GaugeVec::new(Opts::new("disagg_router_kv_events_seconds_since_last",
                "kv_aware: seconds since the last KV event from each worker's DP rank (absent before its first)."), &["worker", "rank"]).expect("valid metric")),
            kv_intake: KvIntakeCounters {
                batches: crate::api::prom::register(&r, prometheus::IntCounter::new("disagg_router_kv_event_batches_total",
                    "kv_aware: KV event batches applied to the index (all workers).").expect("valid metric")),
                blocks: crate::api::prom::register(&r, prometheus::IntCounter::new("disagg_router_kv_blocks_applied_total",
                    "kv_aware: blocks stored or removed by the batches applied.").expect("valid metric")),
                seconds: crate::api::prom::register(&r, prometheus::Counter::new("disagg_router_kv_apply_seconds_total",
                    "kv_aware: CPU time the index's thread spent applying them (blocks over seconds: the apply rate).").expect("valid metric")),
            },
            draining: crate::api::prom::register(&r, IntGauge::new("disagg_router_draining", "1 while the router drains for shutdown.").expect("valid metric")),
            queue_depth: crate::api::prom::register(&r, IntGauge::new("disagg_router_queue_depth", "Requests waiting for a permit.").expect("valid metric")),
            abandoned: crate::api::prom::register(&r, prometheus::IntCounter::new("disagg_router_abandoned_decode_legs_total",
                "Decode legs whose client left before their first output: kept until that output (so the prefill's KV was pulled), then dropped.").expect("valid metric")),
            permits: crate::api::prom::register(&r, IntGauge::new("disagg_router_permits_in_use", "Permits held by requests in flight (of --max-concurrent-requests).").expect("valid metric")),
            tenant: TenantMetrics {
                requests: counter("disagg_router_tenant_requests_total", "Requests by tenant and priority (with --tenants).", &["tenant", "priority"]),
                tokens: counter("disagg_router_tenant_tokens_total", "Estimated tokens (prompt + max output) charged to each tenant's tokens per minute.", &["tenant"]),
                refused: counter("disagg_router_tenant_refused_total", "Requests refused by flow control, by tenant and cause (rate_limited, queue_full, queue_timeout).", &["tenant", "cause"]),
                queued: hist("disagg_router_tenant_queue_seconds", "Time waiting in the router's queue, by tenant and priority.", &["tenant", "priority"]),
                ttft: hist("disagg_router_tenant_ttft_seconds", "Time to the answer's first output (a stream's first event), by tenant and priority.", &["tenant", "priority"]),
            },
            rendering: std::sync::Mutex::new(()),
            registry: r,
        }
    }

    pub(crate) fn abandoned_decode(&self) {
        self.abandoned.inc();
    }

    /// slo_aware: a streamed request's predicted and observed TTFT (ms).
    pub(crate) fn ttft_prediction(&self, predicted_ms: f64, observed_ms: f64) {
        self.predicted_ttft.with_label_values::<&str>(&[]).observe(predicted_ms / 1e3);
        if predicted_ms > 0.0 {
            self.ttft_prediction.with_label_values::<&str>(&[]).observe(observed_ms / predicted_ms);
        }
    }

    /// An elastic decode's layout.
    pub(crate) fn elastic_layout(&self, layout: ElasticLayout) {
        self.elastic.with_label_values(&[layout.label()]).inc();
    }

    pub(crate) fn kv_aware(&self, outcome: KvAwareOutcome) {
        self.kv_aware.with_label_values(&[outcome.label()]).inc();
    }

    /// Something refused at the network boundary (docs/SECURITY.md): where it came from,
    /// and why (the refusing room's own reason).
    pub(crate) fn refused(&self, from: &'static str, reason: &impl Label) {
        self.refused.with_label_values(&[from, reason.label()]).inc();
    }

    /// An access-log line or a trace dropped (its writer is behind).
    pub(crate) fn observe_dropped(&self, what: Dropped) {
        self.observe_dropped.with_label_values(&[what.label()]).inc();
    }

    pub(crate) fn task_restarted(&self, task: Task) {
        self.task_restarts.with_label_values(&[task.label()]).inc();
    }

    pub(crate) fn retry(&self, of: RetryOf) {
        self.retries.with_label_values(&[of.label()]).inc();
    }

    pub(crate) fn leg_error(&self, leg: Leg, kind: LegErrorKind) {
        self.leg_errors.with_label_values(&[leg.label(), kind.label()]).inc();
    }

    pub(crate) fn leg_time(&self, leg: LegTime, since: Instant) {
        self.legs.with_label_values(&[leg.label()]).observe(since.elapsed().as_secs_f64());
    }

    /// The text exposition. Per-worker series are rebuilt from `workers` each time, so a
    /// worker that has left has none.
    pub(crate) fn render(
        &self,
        workers: &[WorkerGauges],
        intake: Option<IntakeTotals>,
        queued: usize,
        permits: usize,
        draining: bool,
    ) -> String {
        let _one_at_a_time = self.rendering.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(totals) = intake {
            self.kv_intake.catch_up(totals);
        }
        for gauge in [&self.in_flight, &self.healthy, &self.circuit, &self.circuit_opened, &self.kv_blocks] {
            gauge.reset();
        }
        self.kv_event_age.reset();
        for w in workers {
            for (rank, n) in w.rank_in_flight.iter().enumerate() {
                self.in_flight.with_label_values(&[w.url.as_str(), w.role, &rank.to_string()]).set(*n as i64);
            }
            self.healthy.with_label_values(&[w.url.as_str(), w.role]).set(i64::from(w.healthy));
            self.circuit.with_label_values(&[w.url.as_str(), w.role]).set(w.circuit as i64);
            self.circuit_opened.with_label_values(&[w.url.as_str(), w.role]).set(w.circuit_openings as i64);
            for k in w.kv_events.iter().flatten() {
                let rank = k.rank.to_string();
                self.kv_blocks.with_label_values(&[w.url.as_str(), &rank]).set(k.blocks as i64);
                if let Some(age) = k.secs_since_event {
                    self.kv_event_age.with_label_values(&[w.url.as_str(), &rank]).set(age);
                }
            }
        }
        self.queue_depth.set(queued as i64);
        self.permits.set(permits as i64);
        self.draining.set(i64::from(draining));
        crate::api::prom::encode(&self.registry)
    }
}

/// What the KV index has applied since start: batches, blocks stored or removed, and the
/// nanoseconds spent applying them.
#[derive(Clone, Copy, Debug, Default)]
pub struct IntakeTotals {
    pub batches: u64,
    pub blocks: u64,
    pub nanos: u64,
}

/// The KV index's intake totals, as counters (caught up with the index at each scrape).
struct KvIntakeCounters {
    batches: prometheus::IntCounter,
    blocks: prometheus::IntCounter,
    seconds: prometheus::Counter,
}

impl KvIntakeCounters {
    fn catch_up(&self, totals: IntakeTotals) {
        let ahead = |c: &prometheus::IntCounter, total: u64| c.inc_by(total.saturating_sub(c.get()));
        ahead(&self.batches, totals.batches);
        ahead(&self.blocks, totals.blocks);
        let secs = totals.nanos as f64 / 1e9;
        if secs > self.seconds.get() {
            self.seconds.inc_by(secs - self.seconds.get());
        }
    }
}

/// Per-tenant series (with --tenants; their label values come from the tenants file).
struct TenantMetrics {
    requests: IntCounterVec,
    tokens: IntCounterVec,
    refused: IntCounterVec,
    queued: HistogramVec,
    ttft: HistogramVec,
}

/// Whom a request is counted for: its tenant, and its priority as labelled.
#[derive(Clone, Debug)]
pub(crate) struct TenantLabel {
    pub(crate) tenant: Arc<str>,
    pub(crate) priority: String,
}

/// One worker's gauges, as the scrape reads them.
pub(crate) struct WorkerGauges {
    pub(crate) url: String,
    pub(crate) role: &'static str,
    pub(crate) rank_in_flight: Vec<usize>,
    pub(crate) healthy: bool,
    pub(crate) circuit: CircuitState,
    pub(crate) circuit_openings: u64,
    /// kv_aware: what the index holds of each rank and how fresh its events are.
    pub(crate) kv_events: Option<Vec<RankEvents>>,
}

/// One DP rank's KV events as the index has them.
pub(crate) struct RankEvents {
    pub(crate) rank: usize,
    pub(crate) blocks: usize,
    pub(crate) secs_since_event: Option<f64>,
}

impl Default for RouterMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// A request's end as its record saw it.
pub(crate) struct RequestEnd {
    pub(crate) status: u16,
    pub(crate) cause: Option<Cause>,
}

/// Told once of a request's end, whichever path it took (the access log and traces,
/// router/observe/).
pub(crate) trait EndWatcher: Send + Sync {
    fn ended(&self, end: RequestEnd);
}

/// Records one request's outcome exactly once, when dropped: whichever path the request
/// took (answered, failed, client gone mid-way), the counters see it.
pub(crate) struct RequestRecord {
    metrics: Arc<RouterMetrics>,
    endpoint: &'static str,
    start: Instant,
    status: u16,
    cause: Option<Cause>,
    done: bool,
    first_output: bool,
    tenant: Option<TenantLabel>,
    watcher: Option<Arc<dyn EndWatcher>>,
}

impl RequestRecord {
    pub(crate) fn new(metrics: Arc<RouterMetrics>, endpoint: &'static str) -> Self {
        RequestRecord {
            metrics,
            endpoint,
            start: Instant::now(),
            status: 499,
            cause: None,
            done: false,
            first_output: false,
            tenant: None,
            watcher: None,
        }
    }
    /// `watcher` is told of the request's end.
    pub(crate) fn watch(&mut self, watcher: Arc<dyn EndWatcher>) {
        self.watcher = Some(watcher);
    }
    pub(crate) fn metrics(&self) -> &RouterMetrics {
        &self.metrics
    }
    /// The status sent to the client.
    pub(crate) fn status(&mut self, status: u16) {
        self.status = status;
    }
    /// Why the request failed (the first cause wins).
    pub(crate) fn fail(&mut self, cause: Cause) {
        self.cause.get_or_insert(cause);
    }
    /// Counts the request for its tenant (with --tenants), charged `tokens`.
    pub(crate) fn tenant(&mut self, label: TenantLabel, tokens: u64) {
        self.metrics.tenant.tokens.with_label_values(&[&*label.tenant]).inc_by(tokens);
        self.tenant = Some(label);
    }
    /// It waited this long in the router's queue.
    pub(crate) fn queued(&self, since: Instant) {
        if let Some(t) = &self.tenant {
            self.metrics.tenant.queued.with_label_values(&[&*t.tenant, &t.priority]).observe(since.elapsed().as_secs_f64());
        }
    }
    /// The answer's first output is here (counted once).
    pub(crate) fn first_output(&mut self) {
        if std::mem::replace(&mut self.first_output, true) {
            return;
        }
        self.metrics.ttft.with_label_values(&[self.endpoint]).observe(self.start.elapsed().as_secs_f64());
        if let Some(t) = &self.tenant {
            self.metrics.tenant.ttft.with_label_values(&[&*t.tenant, &t.priority]).observe(self.start.elapsed().as_secs_f64());
        }
    }
    /// The response reached its end (a success or an error the client received whole).
    pub(crate) fn finish(&mut self) {
        self.done = true;
    }
}

impl Drop for RequestRecord {
    fn drop(&mut self) {
        if !self.done {
            // Dropped before the end: the client went away.
            self.cause.get_or_insert(Cause::ClientDisconnect);
        }
        self.metrics.requests.with_label_values(&[self.endpoint, &self.status.to_string()]).inc();
        if let Some(c) = self.cause {
            self.metrics.errors.with_label_values(&[c.label()]).inc();
        }
        if let Some(t) = &self.tenant {
            self.metrics.tenant.requests.with_label_values(&[&*t.tenant, &t.priority]).inc();
            if let Some(c) = self.cause.filter(|c| matches!(c, Cause::RateLimited | Cause::QueueFull | Cause::QueueTimeout)) {
                self.metrics.tenant.refused.with_label_values(&[&*t.tenant, c.label()]).inc();
            }
        }
        self.metrics.duration.with_label_values(&[self.endpoint]).observe(self.start.elapsed().as_secs_f64());
        if let Some(w) = self.watcher.take() {
            w.ended(RequestEnd { status: self.status, cause: self.cause });
        }
    }
}
