//! One worker: its DP ranks and their in-flight counts, health, circuit breaker, and
//! what kv_aware knows of its load.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::Mutex;

use super::breaker::{Breaker, BreakerConfig, Circuit};
use super::health::HealthConfig;
use crate::api::timing::Timing;
use crate::api::Role;
use crate::router::policy::Candidate;
use crate::router::predict::EngineLatency;

pub(crate) struct Worker {
    pub(crate) url: String,
    pub(crate) role: Role,
    /// Where its KV connector listens, when the connector names it in request ids
    /// (P2pNccl's zmq address, as the worker registered it; a Mooncake prefill's bootstrap
    /// server, `http://host:port`).
    pub(crate) kv_address: Option<String>,
    /// A Mooncake prefill's engine id per DP rank, from its bootstrap server (health.rs).
    pub(super) engine_ids: Mutex<Vec<String>>,
    /// In-flight requests per DP rank, counted by the router itself.
    pub(super) ranks: Vec<AtomicUsize>,
    /// kv_aware: prompt blocks still to compute (or pull) that in-flight requests reserved
    /// on each rank: the work queued there, as the router counts it.
    pub(super) queued_blocks: Vec<AtomicUsize>,
    /// kv_aware: requests the engine reports on each rank beyond this router's own
    /// (engine_load.rs): other routers', or clients reaching the engine directly.
    pub(super) elsewhere: Vec<AtomicUsize>,
    /// Legs this router sent to each rank that have not started answering (room.rs).
    pub(super) pending: Vec<AtomicUsize>,
    /// Requests waiting on each rank, as the engine last reported (engine_load.rs), and
    /// how many of them were not this router's (room.rs).
    pub(super) reported_waiting: Vec<AtomicUsize>,
    pub(super) waiting_elsewhere: Vec<AtomicUsize>,
    /// Flow control: a rank takes no more while its queue is at this many (0: no limit).
    pub(super) queue_threshold: AtomicUsize,
    /// Flow control's `auto` (room.rs): how long legs take to start, and its recent floor.
    pub(super) start_time: super::room::StartTime,
    /// Rotates the tie-break between equally loaded ranks.
    pub(super) rank_turn: AtomicUsize,
    /// Ranks the worker was found to serve (`limit_ranks`), at most `ranks.len()`.
    pub(super) served_ranks: AtomicUsize,
    pub(super) healthy: AtomicBool,
    pub(super) ever_healthy: AtomicBool,
    /// A health check has been recorded (a worker just added is checked at the next tick).
    pub(super) checked: AtomicBool,
    pub(super) failures: AtomicU32,
    pub(super) successes: AtomicU32,
    /// Why the last failed check failed, as last logged (a new reason is logged once).
    pub(super) last_failure: std::sync::Mutex<String>,
    /// Takes no new requests; removed from its pool once idle.
    pub(super) draining: AtomicBool,
    /// What its requests say of it (health checks say what /health says).
    pub(crate) breaker: Breaker,
    /// slo_aware: its predicted latency, fitted from its legs (router/predict/).
    pub(crate) latency: EngineLatency,
}

impl Worker {
    pub(crate) fn new(url: String, role: Role, dp_size: usize, breaker: BreakerConfig, seed: &Timing) -> Self {
        Worker {
            url,
            role,
            kv_address: None,
            engine_ids: Mutex::new(Vec::new()),
            ranks: (0..dp_size).map(|_| AtomicUsize::new(0)).collect(),
            queued_blocks: (0..dp_size).map(|_| AtomicUsize::new(0)).collect(),
            elsewhere: (0..dp_size).map(|_| AtomicUsize::new(0)).collect(),
            pending: (0..dp_size).map(|_| AtomicUsize::new(0)).collect(),
            reported_waiting: (0..dp_size).map(|_| AtomicUsize::new(0)).collect(),
            waiting_elsewhere: (0..dp_size).map(|_| AtomicUsize::new(0)).collect(),
            queue_threshold: AtomicUsize::new(0),
            start_time: super::room::StartTime::default(),
            rank_turn: AtomicUsize::new(0),
            served_ranks: AtomicUsize::new(dp_size.max(1)),
            healthy: AtomicBool::new(false),
            ever_healthy: AtomicBool::new(false),
            checked: AtomicBool::new(false),
            failures: AtomicU32::new(0),
            successes: AtomicU32::new(0),
            last_failure: std::sync::Mutex::default(),
            draining: AtomicBool::new(false),
            breaker: Breaker::new(breaker),
            latency: EngineLatency::new(seed),
        }
    }

    /// Healthy, not draining, and its circuit lets a request through.
    pub(crate) fn is_available(&self) -> bool {
        self.is_healthy() && !self.is_draining() && self.breaker.allows()
    }

    /// An elastic engine (--pd-pool): in both PD pools, either leg per request.
    pub(crate) fn is_elastic(&self) -> bool {
        self.role == Role::Both
    }

    pub(crate) fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    pub(crate) fn circuit(&self) -> Circuit {
        self.breaker.state()
    }

    /// A leg on this worker failed for a reason of the worker's (not the client's).
    pub(crate) fn leg_failed(&self) {
        if self.breaker.failure() {
            tracing::warn!(worker = %self.url, role = self.role.as_str(), "circuit opened: too many failed requests in a row");
        }
    }

    pub(crate) fn dp_size(&self) -> usize {
        self.ranks.len()
    }

    /// The engine id a peer names this worker's DP rank by (Mooncake), once learned.
    pub(crate) fn engine_id(&self, rank: usize) -> Option<String> {
        self.engine_ids.lock().unwrap_or_else(|e| e.into_inner()).get(rank).cloned()
    }

    /// Records the engine ids the worker's bootstrap server lists, one per DP rank.
    pub(crate) fn set_engine_ids(&self, ids: Vec<String>) {
        let mut known = self.engine_ids.lock().unwrap_or_else(|e| e.into_inner());
        if *known != ids {
            tracing::info!(worker = %self.url, engine_ids = ?ids, "engine ids");
            *known = ids;
        }
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.ranks.iter().map(|r| r.load(Ordering::Relaxed)).sum()
    }

    pub(crate) fn rank_in_flight(&self) -> Vec<usize> {
        self.ranks.iter().map(|r| r.load(Ordering::Relaxed)).collect()
    }

    pub(crate) fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// The worker said it serves only `n` DP ranks (vLLM's "data_parallel_rank R is out
    /// of range [0, N)"): ranks from `n` on are not picked again.
    pub(crate) fn limit_ranks(&self, n: usize) {
        let n = n.clamp(1, self.ranks.len());
        if self.served_ranks.swap(n, Ordering::Relaxed) != n {
            tracing::warn!(worker = %self.url, configured = self.ranks.len(), served = n,
                "the worker serves fewer DP ranks than configured (--intra-node-data-parallel-size / --prefill-dp-size / --decode-dp-size); using {n}");
        }
    }

    /// The DP ranks in use (fewer than configured once the worker said so).
    pub(crate) fn served_ranks(&self) -> usize {
        self.served_ranks.load(Ordering::Relaxed)
    }

    /// Requests in flight on one rank.
    pub(crate) fn rank_load(&self, rank: usize) -> usize {
        self.ranks.get(rank).map_or(0, |r| r.load(Ordering::Relaxed))
    }

    /// kv_aware: uncached prompt blocks reserved on one rank by requests in flight.
    pub(crate) fn queued_blocks(&self, rank: usize) -> usize {
        self.queued_blocks.get(rank).map_or(0, |r| r.load(Ordering::Relaxed))
    }

    /// kv_aware: requests on one rank that the engine reported beyond this router's own.
    pub(crate) fn reported_elsewhere(&self, rank: usize) -> usize {
        self.elsewhere.get(rank).map_or(0, |r| r.load(Ordering::Relaxed))
    }

    pub(crate) fn set_reported_elsewhere(&self, rank: usize, n: usize) {
        if let Some(r) = self.elsewhere.get(rank) {
            r.store(n, Ordering::Relaxed);
        }
    }

    /// The least loaded rank (with room for one more, under flow control, where one has
    /// it); ties go round the ranks so idle ranks share the work.
    pub(super) fn pick_rank(&self) -> usize {
        let n = self.served_ranks();
        let start = self.rank_turn.fetch_add(1, Ordering::Relaxed) % n;
        (0..n).map(|k| (start + k) % n).min_by_key(|&r| (!self.rank_has_room(r), self.ranks[r].load(Ordering::Relaxed))).unwrap_or(0)
    }

    /// A connection error on a live request: down at once, back after good checks.
    pub(crate) fn mark_down(&self, why: &str) {
        self.successes.store(0, Ordering::Relaxed);
        if self.healthy.swap(false, Ordering::Relaxed) {
            tracing::warn!(worker = %self.url, role = self.role.as_str(), "marked down: {why}");
        }
    }

    /// No health check has been recorded yet.
    pub(crate) fn never_checked(&self) -> bool {
        !self.checked.load(Ordering::Relaxed)
    }

    /// Applies one health check result with the configured thresholds.
    pub(crate) fn record_check(&self, ok: bool, cfg: &HealthConfig, detail: &str) {
        self.checked.store(true, Ordering::Relaxed);
        if ok {
            self.failures.store(0, Ordering::Relaxed);
            self.last_failure.lock().unwrap_or_else(|e| e.into_inner()).clear();
            let n = self.successes.fetch_add(1, Ordering::Relaxed) + 1;
            let first = !self.ever_healthy.load(Ordering::Relaxed);
            if !self.is_healthy() && (first || n >= cfg.success_threshold) {
                self.healthy.store(true, Ordering::Relaxed);
                self.ever_healthy.store(true, Ordering::Relaxed);
                tracing::info!(worker = %self.url, role = self.role.as_str(), "healthy");
            }
        } else {
            self.successes.store(0, Ordering::Relaxed);
            let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
            if self.is_healthy() && n >= cfg.failure_threshold {
                self.healthy.store(false, Ordering::Relaxed);
                tracing::warn!(worker = %self.url, role = self.role.as_str(), "unhealthy after {n} failed checks: {detail}");
            } else if !self.is_healthy() {
                // A worker that is down (or never came up) says why, once per reason.
                // (Numbers aside: a reason that names a time or a count is the same reason.)
                let reason: String = detail.chars().filter(|c| !c.is_ascii_digit()).collect();
                let mut last = self.last_failure.lock().unwrap_or_else(|e| e.into_inner());
                if *last != reason {
                    tracing::warn!(worker = %self.url, role = self.role.as_str(), "health check failed: {detail}");
                    *last = reason;
                }
            }
        }
    }
}

impl Candidate for Worker {
    fn url(&self) -> &str {
        &self.url
    }
    fn in_flight(&self) -> usize {
        Worker::in_flight(self)
    }
    fn served_ranks(&self) -> usize {
        Worker::served_ranks(self)
    }
    fn queued_blocks(&self, rank: usize) -> usize {
        Worker::queued_blocks(self, rank)
    }
    fn reported_elsewhere(&self, rank: usize) -> usize {
        Worker::reported_elsewhere(self, rank)
    }
    fn latency(&self) -> &EngineLatency {
        &self.latency
    }
}
