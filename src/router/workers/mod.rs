//! Workers, their DP ranks and health, and the `Pool` a role's requests are picked from.
//!
//! A pool is a live set: workers are keyed by their URL (a stable identity) and come and
//! go at runtime (`add`, `remove`, `drain`: from the command line, the admin API or
//! discovery). Readers take a snapshot (an `Arc` of the current list), so a change never
//! waits for requests and requests never see a half-made change. A removed worker's
//! in-flight requests finish on the `Arc<Worker>` their leases hold.
//!
//! A pick happens under the pool's policy lock and reserves the chosen rank (its
//! in-flight count rises) before the lock is released, so a burst of picks sees each
//! other's reservations and does not herd. The reservation is a `Lease`, released when
//! dropped, on every path.

pub mod breaker;
pub mod discovery;
pub mod health;
pub mod topology;

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use crate::router::config::{BreakerConfig, HealthConfig};
use crate::router::policy::{Policy, RequestInfo};
use crate::router::workers::breaker::{Admit, Breaker, Circuit};

pub use crate::api::Role;

pub struct Worker {
    pub url: String,
    pub role: Role,
    /// Where its KV connector listens, when the connector names it in request ids
    /// (P2pNccl's zmq address, as the worker registered it; a Mooncake prefill's bootstrap
    /// server, `http://host:port`).
    pub kv_address: Option<String>,
    /// A Mooncake prefill's engine id per DP rank, from its bootstrap server (health.rs).
    engine_ids: Mutex<Vec<String>>,
    /// In-flight requests per DP rank, counted by the router itself.
    ranks: Vec<AtomicUsize>,
    /// kv_aware: prompt blocks still to compute (or pull) that in-flight requests reserved
    /// on each rank: the work queued there, as the router counts it.
    queued_blocks: Vec<AtomicUsize>,
    /// kv_aware: requests the engine reports on each rank beyond this router's own
    /// (engine_load.rs): other routers', or clients reaching the engine directly.
    elsewhere: Vec<AtomicUsize>,
    /// Rotates the tie-break between equally loaded ranks.
    rank_turn: AtomicUsize,
    /// Ranks the worker was found to serve (`limit_ranks`), at most `ranks.len()`.
    served_ranks: AtomicUsize,
    healthy: AtomicBool,
    ever_healthy: AtomicBool,
    failures: AtomicU32,
    successes: AtomicU32,
    /// Why the last failed check failed, as last logged (a new reason is logged once).
    last_failure: std::sync::Mutex<String>,
    /// Takes no new requests; removed from its pool once idle.
    draining: AtomicBool,
    /// What its requests say of it (health checks say what /health says).
    pub breaker: Breaker,
}

impl Worker {
    pub fn new(url: String, role: Role, dp_size: usize, breaker: BreakerConfig) -> Self {
        Worker {
            url,
            role,
            kv_address: None,
            engine_ids: Mutex::new(Vec::new()),
            ranks: (0..dp_size).map(|_| AtomicUsize::new(0)).collect(),
            queued_blocks: (0..dp_size).map(|_| AtomicUsize::new(0)).collect(),
            elsewhere: (0..dp_size).map(|_| AtomicUsize::new(0)).collect(),
            rank_turn: AtomicUsize::new(0),
            served_ranks: AtomicUsize::new(dp_size),
            healthy: AtomicBool::new(false),
            ever_healthy: AtomicBool::new(false),
            failures: AtomicU32::new(0),
            successes: AtomicU32::new(0),
            last_failure: std::sync::Mutex::default(),
            draining: AtomicBool::new(false),
            breaker: Breaker::new(breaker),
        }
    }

    /// Healthy, not draining, and its circuit lets a request through.
    pub fn is_available(&self) -> bool {
        self.is_healthy() && !self.is_draining() && self.breaker.allows()
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    pub fn circuit(&self) -> Circuit {
        self.breaker.state()
    }

    /// A leg on this worker failed for a reason of the worker's (not the client's).
    pub fn leg_failed(&self) {
        if self.breaker.failure() {
            tracing::warn!(worker = %self.url, role = self.role.as_str(), "circuit opened: too many failed requests in a row");
        }
    }

    pub fn dp_size(&self) -> usize {
        self.ranks.len()
    }

    /// The engine id a peer names this worker's DP rank by (Mooncake), once learned.
    pub fn engine_id(&self, rank: usize) -> Option<String> {
        self.engine_ids.lock().unwrap_or_else(|e| e.into_inner()).get(rank).cloned()
    }

    /// Records the engine ids the worker's bootstrap server lists, one per DP rank.
    pub fn set_engine_ids(&self, ids: Vec<String>) {
        let mut known = self.engine_ids.lock().unwrap_or_else(|e| e.into_inner());
        if *known != ids {
            tracing::info!(worker = %self.url, engine_ids = ?ids, "engine ids");
            *known = ids;
        }
    }

    pub fn in_flight(&self) -> usize {
        self.ranks.iter().map(|r| r.load(Ordering::Relaxed)).sum()
    }

    pub fn rank_in_flight(&self) -> Vec<usize> {
        self.ranks.iter().map(|r| r.load(Ordering::Relaxed)).collect()
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// The worker said it serves only `n` DP ranks (vLLM's "data_parallel_rank R is out
    /// of range [0, N)"): ranks from `n` on are not picked again.
    pub fn limit_ranks(&self, n: usize) {
        let n = n.clamp(1, self.ranks.len());
        if self.served_ranks.swap(n, Ordering::Relaxed) != n {
            tracing::warn!(worker = %self.url, configured = self.ranks.len(), served = n,
                "the worker serves fewer DP ranks than configured (--intra-node-data-parallel-size / --prefill-dp-size / --decode-dp-size); using {n}");
        }
    }

    /// The DP ranks in use (fewer than configured once the worker said so).
    pub fn served_ranks(&self) -> usize {
        self.served_ranks.load(Ordering::Relaxed).clamp(1, self.ranks.len())
    }

    /// Requests in flight on one rank.
    pub fn rank_load(&self, rank: usize) -> usize {
        self.ranks.get(rank).map_or(0, |r| r.load(Ordering::Relaxed))
    }

    /// kv_aware: uncached prompt blocks reserved on one rank by requests in flight.
    pub fn queued_blocks(&self, rank: usize) -> usize {
        self.queued_blocks.get(rank).map_or(0, |r| r.load(Ordering::Relaxed))
    }

    /// kv_aware: requests on one rank that the engine reported beyond this router's own.
    pub fn reported_elsewhere(&self, rank: usize) -> usize {
        self.elsewhere.get(rank).map_or(0, |r| r.load(Ordering::Relaxed))
    }

    pub fn set_reported_elsewhere(&self, rank: usize, n: usize) {
        if let Some(r) = self.elsewhere.get(rank) {
            r.store(n, Ordering::Relaxed);
        }
    }

    /// The least loaded rank; ties go round the ranks so idle ranks share the work.
    fn pick_rank(&self) -> usize {
        let n = self.served_ranks.load(Ordering::Relaxed).clamp(1, self.ranks.len());
        let start = self.rank_turn.fetch_add(1, Ordering::Relaxed) % n;
        (0..n).map(|k| (start + k) % n).min_by_key(|&r| self.ranks[r].load(Ordering::Relaxed)).unwrap_or(0)
    }

    /// A connection error on a live request: down at once, back after good checks.
    pub fn mark_down(&self, why: &str) {
        self.successes.store(0, Ordering::Relaxed);
        if self.healthy.swap(false, Ordering::Relaxed) {
            tracing::warn!(worker = %self.url, role = self.role.as_str(), "marked down: {why}");
        }
    }

    /// Applies one health check result with the configured thresholds.
    pub fn record_check(&self, ok: bool, cfg: &HealthConfig, detail: &str) {
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

/// One reserved slot on a worker's DP rank; released on drop.
pub struct Lease {
    worker: Arc<Worker>,
    rank: usize,
    /// The uncached blocks this request reserved on the rank (kv_aware), released on drop.
    blocks: usize,
    /// This request is the half-open circuit's probe.
    probe: bool,
}

impl Lease {
    fn new(worker: Arc<Worker>, rank: usize, probe: bool, blocks: usize) -> Self {
        worker.ranks[rank].fetch_add(1, Ordering::Relaxed);
        worker.queued_blocks[rank].fetch_add(blocks, Ordering::Relaxed);
        Lease { worker, rank, blocks, probe }
    }

    /// The leg on this lease succeeded (or the worker answered the client's error).
    pub fn succeeded(&mut self) {
        self.worker.breaker.success();
        self.probe = false;
    }

    /// The leg on this lease failed for a reason of the worker's.
    pub fn failed(&mut self) {
        self.worker.leg_failed();
        self.probe = false;
    }
    pub fn worker(&self) -> &Arc<Worker> {
        &self.worker
    }
    /// The worker's URL: its identity (for excluding it from a retry).
    pub fn url(&self) -> &str {
        &self.worker.url
    }
    /// The reserved DP rank.
    pub fn rank(&self) -> usize {
        self.rank
    }
    /// The reserved rank as the KV index names it.
    pub fn holder(&self) -> crate::router::kv_aware::index::Holder {
        crate::router::kv_aware::index::Holder { url: self.worker.url.clone(), rank: self.rank }
    }
    /// The DP rank to send as `X-data-parallel-rank`, when the worker has several.
    pub fn dp_rank(&self) -> Option<usize> {
        (self.worker.dp_size() > 1).then_some(self.rank)
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.worker.ranks[self.rank].fetch_sub(1, Ordering::Relaxed);
        self.worker.queued_blocks[self.rank].fetch_sub(self.blocks, Ordering::Relaxed);
        if self.probe {
            self.worker.breaker.end_probe();
        }
    }
}

/// No worker of a role can take the request.
#[derive(Debug)]
pub struct NoWorker {
    pub role: Role,
    pub total: usize,
    pub healthy: usize,
}

impl std::fmt::Display for NoWorker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.healthy == 0 {
            write!(f, "no healthy {} worker ({} configured, none healthy or all ejected)", self.role.as_str(), self.total)
        } else {
            write!(f, "no other healthy {} worker left to try ({} of {} available)", self.role.as_str(), self.healthy, self.total)
        }
    }
}

/// The workers of one role and the policy that picks among them.
pub struct Pool {
    pub role: Role,
    workers: RwLock<Arc<Vec<Arc<Worker>>>>,
    /// DP ranks of a worker added without saying (--intra-node-data-parallel-size).
    default_dp: usize,
    breaker: BreakerConfig,
    /// Whether picks read the request's prompt or session key (fixed by the policy).
    needs_info: bool,
    policy: Mutex<Policy>,
}

impl Pool {
    /// A pool of `urls`; `kv_addresses` has the KV address of those that have one.
    pub fn new(
        role: Role,
        urls: &[String],
        kv_addresses: &std::collections::HashMap<String, String>,
        dp_size: usize,
        mut policy: Policy,
        breaker: &BreakerConfig,
    ) -> Self {
        let workers: Vec<Arc<Worker>> = urls
            .iter()
            .map(|u| {
                let mut w = Worker::new(u.clone(), role, dp_size, breaker.clone());
                w.kv_address = kv_addresses.get(u).cloned();
                Arc::new(w)
            })
            .collect();
        for w in &workers {
            policy.add_worker(&w.url);
        }
        Pool {
            role,
            workers: RwLock::new(Arc::new(workers)),
            default_dp: dp_size,
            breaker: breaker.clone(),
            needs_info: policy.needs_request_info(),
            policy: Mutex::new(policy),
        }
    }

    /// The workers as they are now.
    pub fn snapshot(&self) -> Arc<Vec<Arc<Worker>>> {
        self.workers.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn len(&self) -> usize {
        self.snapshot().len()
    }

    pub fn get(&self, url: &str) -> Option<Arc<Worker>> {
        self.snapshot().iter().find(|w| w.url == url).cloned()
    }

    /// Adds a worker (`dp_size` None: the pool's default); an error if its URL is here.
    pub fn add(&self, url: &str, dp_size: Option<usize>, kv_address: Option<String>) -> Result<Arc<Worker>, String> {
        let mut worker = Worker::new(url.to_string(), self.role, dp_size.unwrap_or(self.default_dp).max(1), self.breaker.clone());
        worker.kv_address = kv_address;
        let worker = Arc::new(worker);
        {
            let mut set = self.workers.write().unwrap_or_else(|e| e.into_inner());
            if set.iter().any(|w| w.url == url) {
                return Err(format!("{} worker {url} is already in the pool", self.role.as_str()));
            }
            let mut next = Vec::clone(&set);
            next.push(worker.clone());
            *set = Arc::new(next);
        }
        self.lock().add_worker(url);
        tracing::info!(worker = %url, role = self.role.as_str(), dp_size = worker.dp_size(), "worker added");
        Ok(worker)
    }

    /// Removes a worker at once (its in-flight requests finish); None if it is not here.
    pub fn remove(&self, url: &str) -> Option<Arc<Worker>> {
        let removed = {
            let mut set = self.workers.write().unwrap_or_else(|e| e.into_inner());
            let at = set.iter().position(|w| w.url == url)?;
            let mut next = Vec::clone(&set);
            let removed = next.remove(at);
            *set = Arc::new(next);
            removed
        };
        self.lock().remove_worker(url);
        tracing::info!(worker = %url, role = self.role.as_str(), in_flight = removed.in_flight(), "worker removed");
        Some(removed)
    }

    /// Stops new requests to a worker; `remove_drained` takes it out once idle.
    pub fn drain(&self, url: &str) -> Option<Arc<Worker>> {
        let w = self.get(url)?;
        if !w.draining.swap(true, Ordering::Relaxed) {
            tracing::info!(worker = %url, role = self.role.as_str(), in_flight = w.in_flight(), "draining");
        }
        Some(w)
    }

    /// Removes the draining workers that have nothing in flight.
    pub fn remove_drained(&self) {
        for w in self.snapshot().iter().filter(|w| w.is_draining() && w.in_flight() == 0) {
            self.remove(&w.url);
        }
    }

    pub fn healthy_count(&self) -> usize {
        self.snapshot().iter().filter(|w| w.is_healthy()).count()
    }

    /// Healthy workers whose circuit lets requests through.
    pub fn available_count(&self) -> usize {
        self.snapshot().iter().filter(|w| w.is_available()).count()
    }

    /// Whether picks need the request's prompt or session key.
    pub fn is_kv_aware(&self) -> bool {
        self.lock().is_kv_aware()
    }

    pub fn needs_request_info(&self) -> bool {
        self.needs_info
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Policy> {
        self.policy.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Picks an available worker whose URL is not in `exclude`, and reserves its least
    /// loaded rank.
    pub fn pick(&self, req: &RequestInfo, exclude: &[String]) -> Result<Lease, NoWorker> {
        let workers = self.snapshot();
        let mut candidates: Vec<usize> =
            (0..workers.len()).filter(|i| workers[*i].is_available() && !exclude.iter().any(|u| *u == workers[*i].url)).collect();
        let mut policy = self.lock();
        while !candidates.is_empty() {
            let pick = policy.select(&workers, &candidates, req);
            let chosen = pick.index;
            let worker = &workers[chosen];
            // Another pick may have taken a half-open worker's one probe meanwhile.
            let probe = match worker.breaker.admit() {
                Admit::Yes => false,
                Admit::Probe => true,
                Admit::No => {
                    candidates.retain(|c| *c != chosen);
                    continue;
                }
            };
            let (rank, blocks) = match pick.rank.filter(|r| *r < worker.served_ranks()) {
                Some(rank) => (rank, pick.blocks),
                None => (worker.pick_rank(), 0),
            };
            return Ok(Lease::new(worker.clone(), rank, probe, blocks));
        }
        Err(NoWorker { role: self.role, total: workers.len(), healthy: workers.iter().filter(|w| w.is_available()).count() })
    }

    /// Entries in the policy's prefix index, if it keeps one.
    pub fn index_entries(&self) -> Option<usize> {
        self.lock().index_entries()
    }

    /// Periodic policy upkeep (cache_aware's trim), in bounded steps between which
    /// picks take the lock.
    pub async fn maintain(&self) {
        while self.lock().maintain() {
            tokio::task::yield_now().await;
        }
    }
}
