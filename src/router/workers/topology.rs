//! What the router routes over: a prefill pool and a decode pool (disaggregated), or one
//! pool of colocated workers. Each pool is a live set of workers (workers.rs). An elastic
//! engine (`--pd-pool`: vLLM `kv_both`, role `both`) is one `Worker` in both PD pools, so
//! its load and health are one, whichever leg it takes.

use std::sync::Arc;

use super::pool::AlreadyInPool;
use crate::router::workers::{Pool, Role, Worker};

#[expect(clippy::large_enum_variant, reason = "one per router")]
pub(crate) enum Topology {
    Disaggregated { prefill: Pool, decode: Pool },
    Colocated { workers: Pool },
}

impl Topology {
    pub(crate) fn pools(&self) -> impl Iterator<Item = &Pool> {
        let (first, second) = match self {
            Topology::Disaggregated { prefill, decode } => (prefill, Some(decode)),
            Topology::Colocated { workers } => (workers, None),
        };
        std::iter::once(first).chain(second)
    }

    /// Every worker of every pool, as they are now (an elastic engine once).
    pub(crate) fn workers(&self) -> Vec<Arc<Worker>> {
        let mut all: Vec<Arc<Worker>> = Vec::new();
        for pool in self.pools() {
            for w in pool.snapshot().iter() {
                if !(w.role == Role::Both && all.iter().any(|seen| Arc::ptr_eq(seen, w))) {
                    all.push(w.clone());
                }
            }
        }
        all
    }

    /// The pool of a role, if this topology has one.
    pub(crate) fn pool(&self, role: Role) -> Option<&Pool> {
        self.pools().find(|p| p.role == role)
    }

    /// The roles a worker may be added with (`both`, disaggregated: an elastic engine).
    pub(crate) fn roles(&self) -> Vec<Role> {
        match self {
            Topology::Disaggregated { .. } => vec![Role::Prefill, Role::Decode, Role::Both],
            Topology::Colocated { .. } => vec![Role::Both],
        }
    }

    /// Whether this topology routes pairs (prefill and decode pools).
    pub(crate) fn is_disaggregated(&self) -> bool {
        matches!(self, Topology::Disaggregated { .. })
    }

    /// Adds an elastic engine to both PD pools (one worker, role `both`).
    pub(crate) fn add_elastic(&self, url: &str, dp_size: Option<usize>) -> Result<Arc<Worker>, AlreadyInPool> {
        let Topology::Disaggregated { prefill, decode } = self else {
            unreachable!("elastic engines are added to a disaggregated topology only")
        };
        let worker = prefill.insert(Arc::new(prefill.new_worker(url, Role::Both, dp_size)))?;
        if let Err(e) = decode.insert(worker.clone()) {
            prefill.remove(url);
            return Err(e);
        }
        Ok(worker)
    }

    /// Takes a worker out of every pool it is in (its in-flight requests finish on it).
    pub(crate) fn remove(&self, url: &str) -> Option<Arc<Worker>> {
        self.pools().fold(None, |found, pool| pool.remove(url).or(found))
    }

    /// The pool a worker is in and the worker (an elastic engine: its prefill pool).
    pub(crate) fn find(&self, url: &str) -> Option<(&Pool, Arc<Worker>)> {
        self.pools().find_map(|p| p.get(url).map(|w| (p, w)))
    }
}
