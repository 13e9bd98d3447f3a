//! A reserved slot on a worker's DP rank, released on drop, on every path.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::worker::Worker;

/// One reserved slot on a worker's DP rank; released on drop.
pub(crate) struct Lease {
    worker: Arc<Worker>,
    rank: usize,
    /// The uncached blocks this request reserved on the rank (kv_aware), released on drop.
    blocks: usize,
    /// This request is the half-open circuit's probe.
    probe: bool,
    /// The leg has not started answering: it counts in the rank's queue (room.rs).
    pending: bool,
    reserved: std::time::Instant,
}

impl Lease {
    pub(super) fn new(worker: Arc<Worker>, rank: usize, probe: bool, blocks: usize) -> Self {
        worker.ranks[rank].fetch_add(1, Ordering::Relaxed);
        worker.queued_blocks[rank].fetch_add(blocks, Ordering::Relaxed);
        worker.pending[rank].fetch_add(1, Ordering::Relaxed);
        Lease { worker, rank, blocks, probe, pending: true, reserved: std::time::Instant::now() }
    }

    /// The leg started answering: it no longer counts in the rank's queue.
    pub(crate) fn started(&mut self) {
        if std::mem::take(&mut self.pending) {
            self.worker.pending[self.rank].fetch_sub(1, Ordering::Relaxed);
            self.worker.start_took(self.reserved.elapsed());
        }
    }

    /// The leg on this lease succeeded (or the worker answered the client's error).
    pub(crate) fn succeeded(&mut self) {
        self.worker.breaker.success();
        self.probe = false;
    }

    /// The leg on this lease failed for a reason of the worker's.
    pub(crate) fn failed(&mut self) {
        self.worker.leg_failed();
        self.probe = false;
    }
    pub(crate) fn worker(&self) -> &Arc<Worker> {
        &self.worker
    }
    /// The worker's URL: its identity (for excluding it from a retry).
    pub(crate) fn url(&self) -> &str {
        &self.worker.url
    }
    /// The reserved DP rank.
    pub(crate) fn rank(&self) -> usize {
        self.rank
    }
    /// The reserved rank as the KV index names it.
    pub(crate) fn holder(&self) -> crate::router::policy::WorkerRank {
        crate::router::policy::WorkerRank { url: self.worker.url.clone(), rank: self.rank }
    }
    /// The DP rank to send as `X-data-parallel-rank`, when the worker has several.
    /// Where a leg on this lease goes.
    pub(crate) fn target(&self) -> crate::router::upstream::legs::Target<'_> {
        crate::router::upstream::legs::Target { url: &self.worker.url, dp_rank: self.dp_rank() }
    }

    pub(crate) fn dp_rank(&self) -> Option<usize> {
        (self.worker.dp_size() > 1).then_some(self.rank)
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.worker.ranks[self.rank].fetch_sub(1, Ordering::Relaxed);
        self.worker.queued_blocks[self.rank].fetch_sub(self.blocks, Ordering::Relaxed);
        self.started();
        if self.probe {
            self.worker.breaker.end_probe();
        }
    }
}
