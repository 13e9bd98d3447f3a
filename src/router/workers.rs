//! Workers, their DP ranks and health, and the `Pool` a role's requests are picked from.
//!
//! A pick happens under the pool's lock and reserves the chosen rank (its in-flight count
//! rises) before the lock is released, so a burst of picks sees each other's reservations
//! and does not herd. The reservation is a `Lease`, released when dropped, on every path.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use super::breaker::{Admit, Breaker, Circuit};
use super::config::{BreakerConfig, HealthConfig};
use super::policy::{Policy, RequestInfo};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Prefill,
    Decode,
    /// A colocated worker (non-PD mode).
    Worker,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Prefill => "prefill",
            Role::Decode => "decode",
            Role::Worker => "worker",
        }
    }
}

pub struct Worker {
    pub url: String,
    pub role: Role,
    /// In-flight requests per DP rank, counted by the router itself.
    ranks: Vec<AtomicUsize>,
    /// Rotates the tie-break between equally loaded ranks.
    rank_turn: AtomicUsize,
    healthy: AtomicBool,
    ever_healthy: AtomicBool,
    failures: AtomicU32,
    successes: AtomicU32,
    /// What its requests say of it (health checks say what /health says).
    pub breaker: Breaker,
}

impl Worker {
    pub fn new(url: String, role: Role, dp_size: usize, breaker: BreakerConfig) -> Self {
        Worker {
            url,
            role,
            ranks: (0..dp_size).map(|_| AtomicUsize::new(0)).collect(),
            rank_turn: AtomicUsize::new(0),
            healthy: AtomicBool::new(false),
            ever_healthy: AtomicBool::new(false),
            failures: AtomicU32::new(0),
            successes: AtomicU32::new(0),
            breaker: Breaker::new(breaker),
        }
    }

    /// Healthy, and its circuit lets a request through.
    pub fn is_available(&self) -> bool {
        self.is_healthy() && self.breaker.allows()
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

    pub fn in_flight(&self) -> usize {
        self.ranks.iter().map(|r| r.load(Ordering::Relaxed)).sum()
    }

    pub fn rank_in_flight(&self) -> Vec<usize> {
        self.ranks.iter().map(|r| r.load(Ordering::Relaxed)).collect()
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// The least loaded rank; ties go round the ranks so idle ranks share the work.
    fn pick_rank(&self) -> usize {
        let n = self.ranks.len();
        let start = self.rank_turn.fetch_add(1, Ordering::Relaxed) % n;
        (0..n)
            .map(|k| (start + k) % n)
            .min_by_key(|&r| self.ranks[r].load(Ordering::Relaxed))
            .unwrap_or(0)
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
            }
        }
    }
}

/// One reserved slot on a worker's DP rank; released on drop.
pub struct Lease {
    worker: Arc<Worker>,
    index: usize,
    rank: usize,
    /// This request is the half-open circuit's probe.
    probe: bool,
}

impl Lease {
    fn new(worker: Arc<Worker>, index: usize, rank: usize, probe: bool) -> Self {
        worker.ranks[rank].fetch_add(1, Ordering::Relaxed);
        Lease { worker, index, rank, probe }
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
    pub fn url(&self) -> &str {
        &self.worker.url
    }
    /// Position of the worker in its pool (for excluding it from a retry).
    pub fn index(&self) -> usize {
        self.index
    }
    /// The DP rank to send as `X-data-parallel-rank`, when the worker has several.
    pub fn dp_rank(&self) -> Option<usize> {
        (self.worker.dp_size() > 1).then_some(self.rank)
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.worker.ranks[self.rank].fetch_sub(1, Ordering::Relaxed);
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
    pub workers: Vec<Arc<Worker>>,
    /// Whether picks read the request's prompt or session key (fixed by the policy).
    needs_info: bool,
    policy: Mutex<Policy>,
}

impl Pool {
    pub fn new(role: Role, urls: &[String], dp_size: usize, policy: Policy, breaker: &BreakerConfig) -> Self {
        Pool {
            role,
            workers: urls.iter().map(|u| Arc::new(Worker::new(u.clone(), role, dp_size, breaker.clone()))).collect(),
            needs_info: policy.needs_request_info(),
            policy: Mutex::new(policy),
        }
    }

    pub fn healthy_count(&self) -> usize {
        self.workers.iter().filter(|w| w.is_healthy()).count()
    }

    /// Healthy workers whose circuit lets requests through.
    pub fn available_count(&self) -> usize {
        self.workers.iter().filter(|w| w.is_available()).count()
    }

    /// Whether picks need the request's prompt or session key.
    pub fn needs_request_info(&self) -> bool {
        self.needs_info
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Policy> {
        self.policy.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Picks an available worker not in `exclude`, and reserves its least loaded rank.
    pub fn pick(&self, req: &RequestInfo, exclude: &[usize]) -> Result<Lease, NoWorker> {
        let mut candidates: Vec<usize> = (0..self.workers.len())
            .filter(|i| self.workers[*i].is_available() && !exclude.contains(i))
            .collect();
        let mut policy = self.lock();
        while !candidates.is_empty() {
            let chosen = policy.select(&self.workers, &candidates, req);
            let worker = &self.workers[chosen];
            // Another pick may have taken a half-open worker's one probe meanwhile.
            let probe = match worker.breaker.admit() {
                Admit::Yes => false,
                Admit::Probe => true,
                Admit::No => {
                    candidates.retain(|c| *c != chosen);
                    continue;
                }
            };
            let rank = worker.pick_rank();
            return Ok(Lease::new(worker.clone(), chosen, rank, probe));
        }
        Err(NoWorker { role: self.role, total: self.workers.len(), healthy: self.available_count() })
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
