//! The workers of one role, read through snapshots (add, remove, drain), and the pick:
//! the policy's choice and its reservation under one short lock.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, RwLock};

use super::breaker::{Admit, BreakerConfig};
use super::lease::Lease;
use super::worker::Worker;
use crate::api::timing::Timing;
use crate::api::Role;
use crate::router::policy::{Policy, RequestInfo};

/// No worker of a role can take the request.
#[derive(Debug)]
pub(crate) struct NoWorker {
    pub(crate) role: Role,
    pub(crate) total: usize,
    pub(crate) healthy: usize,
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

/// A worker added to a pool that has it already.
#[derive(Debug)]
pub(crate) struct AlreadyInPool {
    pub(crate) role: Role,
    pub(crate) url: String,
}

impl std::fmt::Display for AlreadyInPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} worker {} is already in the pool", self.role.as_str(), self.url)
    }
}

/// The workers of one role and the policy that picks among them.
pub(crate) struct Pool {
    pub(crate) role: Role,
    workers: RwLock<Arc<Vec<Arc<Worker>>>>,
    /// DP ranks of a worker added without saying (--intra-node-data-parallel-size).
    default_dp: usize,
    breaker: BreakerConfig,
    /// slo_aware: each new worker's latency model starts from this profile.
    seed: Arc<Timing>,
    /// Whether picks read the request's prompt or session key (fixed by the policy).
    needs_info: bool,
    policy: Mutex<Policy>,
}

impl Pool {
    /// A pool of `urls`; `kv_addresses` has the KV address of those that have one.
    pub(crate) fn new(
        role: Role,
        urls: &[String],
        kv_addresses: &std::collections::HashMap<String, String>,
        dp_size: usize,
        mut policy: Policy,
        breaker: &BreakerConfig,
        seed: &Arc<Timing>,
    ) -> Self {
        let workers: Vec<Arc<Worker>> = urls
            .iter()
            .map(|u| {
                let mut w = Worker::new(u.clone(), role, dp_size, breaker.clone(), seed);
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
            seed: seed.clone(),
            needs_info: policy.needs_request_info(),
            policy: Mutex::new(policy),
        }
    }

    /// The workers as they are now.
    pub(crate) fn snapshot(&self) -> Arc<Vec<Arc<Worker>>> {
        self.workers.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub(crate) fn worker_count(&self) -> usize {
        self.snapshot().len()
    }

    pub(crate) fn get(&self, url: &str) -> Option<Arc<Worker>> {
        self.snapshot().iter().find(|w| w.url == url).cloned()
    }

    /// Adds a worker (`dp_size` None: the pool's default); an error if its URL is here.
    pub(crate) fn add(&self, url: &str, dp_size: Option<usize>, kv_address: Option<String>) -> Result<Arc<Worker>, AlreadyInPool> {
        let mut worker = self.new_worker(url, self.role, dp_size);
        worker.kv_address = kv_address;
        self.insert(Arc::new(worker))
    }

    /// A worker of `role` with this pool's defaults (not yet in any pool).
    pub(crate) fn new_worker(&self, url: &str, role: Role, dp_size: Option<usize>) -> Worker {
        Worker::new(url.to_string(), role, dp_size.unwrap_or(self.default_dp).max(1), self.breaker.clone(), &self.seed)
    }

    /// Puts a worker in this pool (an elastic engine is in both PD pools, one `Worker`).
    pub(crate) fn insert(&self, worker: Arc<Worker>) -> Result<Arc<Worker>, AlreadyInPool> {
        let url = worker.url.clone();
        {
            let mut set = self.workers.write().unwrap_or_else(|e| e.into_inner());
            if set.iter().any(|w| w.url == url) {
                return Err(AlreadyInPool { role: self.role, url });
            }
            let mut next = Vec::clone(&set);
            next.push(worker.clone());
            *set = Arc::new(next);
        }
        self.lock().add_worker(&url);
        tracing::info!(worker = %url, role = worker.role.as_str(), pool = self.role.as_str(), dp_size = worker.dp_size(), "worker added");
        Ok(worker)
    }

    /// Removes a worker at once (its in-flight requests finish); None if it is not here.
    pub(crate) fn remove(&self, url: &str) -> Option<Arc<Worker>> {
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
    pub(crate) fn drain(&self, url: &str) -> Option<Arc<Worker>> {
        let w = self.get(url)?;
        if !w.draining.swap(true, Ordering::Relaxed) {
            tracing::info!(worker = %url, role = self.role.as_str(), in_flight = w.in_flight(), "draining");
        }
        Some(w)
    }

    /// Removes the draining workers that have nothing in flight.
    pub(crate) fn remove_drained(&self) {
        for w in self.snapshot().iter().filter(|w| w.is_draining() && w.in_flight() == 0) {
            self.remove(&w.url);
        }
    }

    /// Healthy workers whose circuit lets requests through.
    pub(crate) fn available_count(&self) -> usize {
        self.snapshot().iter().filter(|w| w.is_available()).count()
    }

    /// Whether picks need the request's prompt or session key.
    pub(crate) fn is_kv_aware(&self) -> bool {
        self.lock().is_kv_aware()
    }

    pub(crate) fn needs_request_info(&self) -> bool {
        self.needs_info
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Policy> {
        self.policy.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Picks an available worker whose URL is not in `exclude`, and reserves its least
    /// loaded rank.
    pub(crate) fn pick(&self, req: &RequestInfo, exclude: &[String]) -> Result<Lease, NoWorker> {
        let workers = self.snapshot();
        let mut candidates: Vec<usize> =
            (0..workers.len()).filter(|i| workers[*i].is_available() && !exclude.iter().any(|u| *u == workers[*i].url)).collect();
        // Flow control (room.rs): the policy chooses among the workers with room, where any has.
        if candidates.iter().any(|c| !workers[*c].has_room()) && candidates.iter().any(|c| workers[*c].has_room()) {
            candidates.retain(|c| workers[*c].has_room());
        }
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
    pub(crate) fn index_entries(&self) -> Option<usize> {
        self.lock().index_entries()
    }

    /// Periodic policy upkeep (cache_aware's trim), in bounded steps between which
    /// picks take the lock.
    pub(crate) async fn maintain(&self) {
        while self.lock().maintain() {
            tokio::task::yield_now().await;
        }
    }
}

/// (tests) A pool of healthy round-robin workers.
#[cfg(test)]
pub(crate) fn healthy_pool(role: Role, urls: &[&str], dp: usize) -> Pool {
    healthy_pool_with(role, urls, dp, &Default::default())
}

/// (tests) As `healthy_pool`, with the KV address of those that have one.
#[cfg(test)]
pub(crate) fn healthy_pool_with(role: Role, urls: &[&str], dp: usize, kv_addresses: &std::collections::HashMap<String, String>) -> Pool {
    use std::time::Duration;
    let urls: Vec<String> = urls.iter().map(|u| u.to_string()).collect();
    let breaker = BreakerConfig {
        enabled: true,
        failure_threshold: 100,
        success_threshold: 1,
        open_for: Duration::from_secs(30),
        window: Duration::from_secs(60),
    };
    let cache = crate::router::policy::CacheAwareConfig {
        cache_threshold: 0.5,
        balance_abs_threshold: 32,
        balance_rel_threshold: 1.1,
        eviction_interval: Duration::from_secs(60),
        max_tree_size: 1 << 20,
        max_prefix: 1 << 16,
        max_entries: 1 << 16,
    };
    let policy = Policy::new(crate::router::policy::PolicyKind::RoundRobin, &cache, 0.0);
    let pool = Pool::new(role, &urls, kv_addresses, dp, policy, &breaker, &Arc::new(Timing::mocker()));
    let health = super::health::HealthConfig {
        interval: Duration::from_secs(5),
        timeout: Duration::from_secs(1),
        failure_threshold: 1,
        success_threshold: 1,
        endpoint: "/health".into(),
    };
    for w in pool.snapshot().iter() {
        w.record_check(true, &health, "");
    }
    pool
}
