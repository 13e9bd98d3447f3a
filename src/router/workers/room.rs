//! Whether the engines have room (flow control, `--engine-queue-threshold`): a rank's
//! queue is the larger of what its engine last reported waiting (`vllm:num_requests_waiting`)
//! and the legs this router sent it that have not started answering; the rank has room
//! while its queue is under its threshold. The router's queue (router/admission/) sends a
//! request on only when each pool it needs has room, so the order the router chooses is
//! the order the engines serve in.
//!
//! `auto` learns each engine's threshold: every second, an engine that reported requests
//! waiting takes one fewer; one that reported none while the router held requests because
//! it was full takes one more (at least 1, at most 256): the engines are kept busy with
//! their own queues near empty.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use super::topology::Topology;
use super::{Role, Worker};

/// `--engine-queue-threshold`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum QueueThreshold {
    /// Requests per DP rank.
    Fixed(usize),
    /// Learned per engine.
    Auto,
}

/// Where an auto threshold starts, and its bounds.
const AUTO_START: usize = 4;
const AUTO_MAX: usize = 256;

impl Worker {
    /// The rank's queue: the engine's report or the router's own unstarted legs, the larger.
    pub(crate) fn rank_queue(&self, rank: usize) -> usize {
        let pending = self.pending.get(rank).map_or(0, |p| p.load(Ordering::Relaxed));
        let reported = self.reported_waiting.get(rank).map_or(0, |p| p.load(Ordering::Relaxed));
        pending.max(reported)
    }

    /// The rank's threshold; 0: none (flow control is off).
    pub(crate) fn queue_threshold(&self) -> usize {
        self.queue_threshold.load(Ordering::Relaxed)
    }

    pub(super) fn rank_has_room(&self, rank: usize) -> bool {
        let t = self.queue_threshold();
        t == 0 || self.rank_queue(rank) < t
    }

    /// Whether a leg sent now would start without queueing past the threshold somewhere.
    pub(crate) fn has_room(&self) -> bool {
        (0..self.served_ranks()).any(|r| self.rank_has_room(r))
    }

    /// Legs a rank could take before its queue is full.
    fn room(&self) -> usize {
        let t = self.queue_threshold();
        (0..self.served_ranks()).map(|r| t.saturating_sub(self.rank_queue(r))).sum()
    }
}

/// The engines' room, as the router's queue reads it.
pub(crate) struct EngineRoom {
    threshold: QueueThreshold,
    /// Requests sent on whose pick in pool `i` (prefill or colocated: 0, decode: 1) has not
    /// happened yet: their legs are not yet in any rank's queue, but will be.
    transit: Arc<[AtomicUsize; 2]>,
}

fn pool_index(role: Role) -> usize {
    match role {
        Role::Prefill | Role::Both => 0,
        Role::Decode => 1,
    }
}

/// A dispatched request's claim on the pools' room until it picks its workers.
pub(crate) struct Transit {
    counts: Arc<[AtomicUsize; 2]>,
    left: [AtomicUsize; 2],
}

impl Transit {
    /// One of the request's generations picked a worker of `role`.
    pub(crate) fn picked(&self, role: Role) {
        let i = pool_index(role);
        if self.left[i].fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1)).is_ok() {
            self.counts[i].fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Drop for Transit {
    fn drop(&mut self) {
        for i in 0..2 {
            self.counts[i].fetch_sub(self.left[i].load(Ordering::Relaxed), Ordering::Relaxed);
        }
    }
}

impl EngineRoom {
    pub(crate) fn new(threshold: QueueThreshold) -> Self {
        EngineRoom { threshold, transit: Arc::default() }
    }

    /// Requests that may be sent on now: the least room of the pools a request uses.
    pub(crate) fn room(&self, topology: &Topology) -> usize {
        topology
            .pools()
            .map(|pool| {
                let room: usize = pool
                    .snapshot()
                    .iter()
                    .filter(|w| w.is_available())
                    .map(|w| {
                        if let QueueThreshold::Fixed(n) = self.threshold {
                            w.queue_threshold.store(n, Ordering::Relaxed);
                        } else if w.queue_threshold() == 0 {
                            w.queue_threshold.store(AUTO_START, Ordering::Relaxed);
                        }
                        w.room()
                    })
                    .sum();
                room.saturating_sub(self.transit[pool_index(pool.role)].load(Ordering::Relaxed))
            })
            .min()
            .unwrap_or(0)
    }

    /// A request of `generations` sent on: it holds their room until each picks.
    pub(crate) fn transit(&self, topology: &Topology, generations: usize) -> Transit {
        let left = [AtomicUsize::new(0), AtomicUsize::new(0)];
        for pool in topology.pools() {
            let i = pool_index(pool.role);
            self.transit[i].fetch_add(generations, Ordering::Relaxed);
            left[i].store(generations, Ordering::Relaxed);
        }
        Transit { counts: self.transit.clone(), left }
    }

    /// `auto`: each engine's threshold one step towards a busy engine with an empty queue
    /// of its own; `held`: the router held requests for want of room since the last step.
    pub(crate) fn learn(&self, topology: &Topology, held: bool) {
        if self.threshold != QueueThreshold::Auto {
            return;
        }
        for w in topology.workers().iter().filter(|w| w.is_available()) {
            let t = w.queue_threshold();
            if t == 0 {
                continue;
            }
            let waiting: usize = w.reported_waiting.iter().map(|r| r.load(Ordering::Relaxed)).sum();
            let next = if waiting > 0 {
                t - 1
            } else if held && !w.has_room() {
                t + 1
            } else {
                t
            };
            w.queue_threshold.store(next.clamp(1, AUTO_MAX), Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::router::workers::pool::healthy_pool;

    fn pool(role: Role, urls: &[&str]) -> crate::router::workers::Pool {
        healthy_pool(role, urls, 1)
    }

    #[test]
    fn room_is_the_least_of_the_pools_and_counts_sent_requests_until_they_pick() {
        let t = Topology::Disaggregated {
            prefill: pool(Role::Prefill, &["http://p0", "http://p1"]),
            decode: pool(Role::Decode, &["http://d0"]),
        };
        let room = EngineRoom::new(QueueThreshold::Fixed(2));
        assert_eq!(room.room(&t), 2, "two prefills with 2 each, one decode with 2");
        let transit = room.transit(&t, 1);
        assert_eq!(room.room(&t), 1);
        let Topology::Disaggregated { prefill, decode } = &t else { unreachable!() };
        let d = decode.pick(&Default::default(), &[]).unwrap();
        transit.picked(Role::Decode);
        transit.picked(Role::Decode);
        assert_eq!(room.room(&t), 1, "the decode's lease counts instead of the transit, once");
        let mut p = prefill.pick(&Default::default(), &[]).unwrap();
        transit.picked(Role::Prefill);
        assert_eq!(room.room(&t), 1);
        p.started();
        drop(d);
        assert_eq!(room.room(&t), 2);
        // An engine's own report counts when it is larger.
        t.workers()[2].set_reported_waiting(0, 5);
        assert_eq!(room.room(&t), 0, "the decode reports 5 waiting");
        drop(transit);
    }

    #[test]
    fn auto_learns_down_when_the_engine_queues_and_up_when_held_at_an_idle_engine() {
        let t = Topology::Colocated { workers: pool(Role::Both, &["http://w0"]) };
        let room = EngineRoom::new(QueueThreshold::Auto);
        assert_eq!(room.room(&t), AUTO_START);
        let w = t.workers()[0].clone();
        w.set_reported_waiting(0, 3);
        room.learn(&t, true);
        assert_eq!(w.queue_threshold(), AUTO_START - 1);
        w.set_reported_waiting(0, 0);
        let leases: Vec<_> = (0..AUTO_START - 1).map(|_| t.pool(Role::Both).unwrap().pick(&Default::default(), &[]).unwrap()).collect();
        room.learn(&t, true);
        assert_eq!(w.queue_threshold(), AUTO_START, "full, held, and the engine has nothing waiting: one more");
        room.learn(&t, false);
        assert_eq!(w.queue_threshold(), AUTO_START, "nothing held: no change");
        drop(leases);
    }
}
