//! Whether the engines have room (flow control, `--engine-queue-threshold`): a rank's
//! queue is the legs this router sent it that have not started answering, plus what its
//! engine reported waiting (`vllm:num_requests_waiting`) beyond this router's own when it
//! last reported (other replicas', clients reaching it directly); the rank has room while
//! its queue is under its threshold. (The router's own count is live; a report is up to a
//! second old, so only what it says of others is taken from it.) The router's queue (router/admission/) sends a
//! request on only when each pool it needs has room, so the order the router chooses is
//! the order the engines serve in.
//!
//! `auto` learns each engine's threshold, once a second, from how long its legs take to
//! start answering (the router times each one) against the shortest it has seen lately:
//! more than 1.3x that, and the engine is past its knee (requests queue in it, or its
//! batch slows every step), so it takes a quarter fewer; at most 1.1x while it was full
//! and the router held requests, and it takes half as many more (at least 1, at most
//! 1024). An engine reporting more requests waiting than half its threshold (others', too)
//! takes a quarter fewer. So the engines stay near their best time to first token with
//! the queue kept at the router, where priority and fair shares order it.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
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

/// How long a worker's legs take to start (milliseconds, as f64 bits): a moving average
/// of the last ~10, and its floor, which rises 2% a second so that old lows are forgotten.
#[derive(Default)]
pub(crate) struct StartTime {
    average: AtomicU64,
    floor: AtomicU64,
    /// The worker was full since the last learning step.
    was_full: AtomicBool,
}

fn load_f64(a: &AtomicU64) -> f64 {
    f64::from_bits(a.load(Ordering::Relaxed))
}

fn store_f64(a: &AtomicU64, v: f64) {
    a.store(v.to_bits(), Ordering::Relaxed);
}

impl Worker {
    /// A leg on this worker started answering after `took` (lease.rs).
    pub(crate) fn start_took(&self, took: std::time::Duration) {
        if self.queue_threshold() == 0 {
            return;
        }
        let ms = took.as_secs_f64() * 1000.0;
        let s = &self.start_time;
        let avg = load_f64(&s.average);
        // Benign races: two legs ending at once may lose one sample.
        store_f64(&s.average, if avg == 0.0 { ms } else { avg + (ms - avg) * 0.1 });
    }
}

/// Where an auto threshold starts, and its bounds.
const AUTO_START: usize = 4;
const AUTO_MAX: usize = 1024;

impl Worker {
    /// The rank's queue: the router's own unstarted legs, and the others' the engine reported.
    pub(crate) fn rank_queue(&self, rank: usize) -> usize {
        let pending = self.pending.get(rank).map_or(0, |p| p.load(Ordering::Relaxed));
        let elsewhere = self.waiting_elsewhere.get(rank).map_or(0, |p| p.load(Ordering::Relaxed));
        pending + elsewhere
    }

    /// Requests the engine reports waiting on a rank (engine_load.rs): kept for `auto`, and
    /// what exceeds the router's own unstarted legs counts as others' in the rank's queue.
    pub(crate) fn set_reported_waiting(&self, rank: usize, n: usize) {
        let ours = self.pending.get(rank).map_or(0, |p| p.load(Ordering::Relaxed));
        if let (Some(w), Some(e)) = (self.reported_waiting.get(rank), self.waiting_elsewhere.get(rank)) {
            w.store(n, Ordering::Relaxed);
            e.store(n.saturating_sub(ours), Ordering::Relaxed);
        }
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

    /// Whether the thresholds are learned (`auto`).
    pub(crate) fn is_learned(&self) -> bool {
        self.threshold == QueueThreshold::Auto
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
                        let room = w.room();
                        if room == 0 {
                            w.start_time.was_full.store(true, Ordering::Relaxed);
                        }
                        room
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
            // The busiest rank speaks for the engine.
            let waiting = w.reported_waiting.iter().map(|r| r.load(Ordering::Relaxed)).max().unwrap_or(0);
            let st = &w.start_time;
            let (average, floor) = (load_f64(&st.average), load_f64(&st.floor));
            let floor = if floor == 0.0 || average < floor { average } else { floor * 1.02 };
            store_f64(&st.floor, floor);
            let slowed = floor > 0.0 && average > 1.3 * floor;
            let brisk = floor == 0.0 || average <= 1.1 * floor;
            let was_full = st.was_full.swap(false, Ordering::Relaxed);
            let next = if 2 * waiting > t || slowed {
                t - t.div_ceil(4)
            } else if held && was_full && brisk {
                t + t.div_ceil(2)
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
    use std::time::Duration;

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
        // What an engine reports beyond the router's own counts as others'.
        let _d = decode.pick(&Default::default(), &[]).unwrap();
        t.workers()[2].set_reported_waiting(0, 1);
        assert_eq!(room.room(&t), 1, "the one waiting is the router's own");
        t.workers()[2].set_reported_waiting(0, 2);
        assert_eq!(room.room(&t), 0, "one more waiting there is another's");
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
        assert_eq!(w.queue_threshold(), 3, "3 of 4 waiting at the engine: a quarter fewer");
        w.set_reported_waiting(0, 0);
        let leases: Vec<_> = (0..3).map(|_| t.pool(Role::Both).unwrap().pick(&Default::default(), &[]).unwrap()).collect();
        assert_eq!(room.room(&t), 0, "full");
        room.learn(&t, false);
        assert_eq!(w.queue_threshold(), 3, "nothing held: no change");
        assert_eq!(room.room(&t), 0);
        room.learn(&t, true);
        assert_eq!(w.queue_threshold(), 5, "full, held, nothing waiting at the engine: half as many more");
        // Legs that take twice as long to start as the floor: past the knee.
        w.start_took(Duration::from_millis(10));
        room.learn(&t, false);
        for _ in 0..40 {
            w.start_took(Duration::from_millis(30));
        }
        room.learn(&t, true);
        assert_eq!(w.queue_threshold(), 3, "slowed starts: a quarter fewer");
        drop(leases);
    }
}
