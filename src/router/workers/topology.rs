//! What the router routes over: a prefill pool and a decode pool (disaggregated), or one
//! pool of colocated workers. Each pool is a live set of workers (workers.rs).

use std::sync::Arc;

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

    /// Every worker of every pool, as they are now.
    pub(crate) fn workers(&self) -> Vec<Arc<Worker>> {
        self.pools().flat_map(|p| p.snapshot().iter().cloned().collect::<Vec<_>>()).collect()
    }

    /// The pool of a role, if this topology has one.
    pub(crate) fn pool(&self, role: Role) -> Option<&Pool> {
        self.pools().find(|p| p.role == role)
    }

    /// The roles a worker may be added with.
    pub(crate) fn roles(&self) -> Vec<Role> {
        self.pools().map(|p| p.role).collect()
    }
}
