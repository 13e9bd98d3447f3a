//! Admission: when a request may go to the engines. A permit per generation, up to
//! `--max-concurrent-requests`, held by the response body itself (it returns when the
//! answer, a stream included, has ended or the client has gone); a tenant's requests up
//! to its `concurrent` limit; and, under `--engine-queue-threshold`, only while the pools
//! a request needs have room (workers/room.rs), so that requests wait here, in the order
//! the router chooses, and not in the engines' FIFO queues.
//!
//! Under `auto` thresholds, requests of a band worse than the best one leave one slot free
//! in each pool, so that a request of the best band starts at once.
//!
//! Waiting requests go in fair.rs's order: strict priority bands, weighted fair shares of
//! tokens between a band's tenants, FIFO within a tenant. Without a tenants file and a
//! threshold that is one FIFO queue, as before. Waiting is bounded: `--queue-size` in all,
//! a band's and a tenant's own `max_queued` (tenants file), each a 429; `--queue-timeout-secs`
//! (or the band's own) each, then 503; both with Retry-After.

mod fair;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{oneshot, Notify};

use crate::api::{ApiError, ErrorKind};
use crate::router::tenants::{Tenant, Tenants};
use crate::router::workers::room::{EngineRoom, Transit};
use crate::router::workers::topology::Topology;
use fair::Waiting;

/// How often requests held for want of engine room look again (the engines' queues move
/// without telling the router: a leg starts answering, an engine reports).
const ROOM_POLL: Duration = Duration::from_millis(2);
/// How often `auto` thresholds take a step (room.rs).
const LEARN_EVERY: Duration = Duration::from_secs(1);

/// What admission needs to know of a request.
pub(crate) struct Ticket {
    pub(crate) tenant: Arc<Tenant>,
    /// vLLM's order: lower goes first.
    pub(crate) priority: i32,
    /// Estimated tokens (tenants/mod.rs `Cost`): what fair shares weigh.
    pub(crate) cost: u64,
    pub(crate) generations: usize,
}

/// Why a request was not admitted, for the error metric.
pub(crate) enum Refused {
    QueueFull(ApiError),
    QueueTimeout(ApiError),
    /// It needs more permits than there are.
    TooLarge(ApiError),
}

/// The engines' room and the topology it is read from.
struct Gate {
    room: EngineRoom,
    topology: Arc<Topology>,
}

struct Item {
    generations: usize,
    tenant: Arc<Tenant>,
    tx: oneshot::Sender<Permit>,
}

struct State {
    in_use: usize,
    waiting: Waiting<Item>,
    next_id: u64,
}

struct Shared {
    state: Mutex<State>,
    max: usize,
    queue_size: usize,
    timeout: Duration,
    gate: Option<Gate>,
    tenants: Arc<Tenants>,
    /// Wakes the room poller when a request starts waiting.
    wake: Notify,
    /// Requests were held for want of engine room since the last learning step.
    held: AtomicBool,
    queued: AtomicUsize,
    in_use: AtomicUsize,
}

/// A request's admission: its permits, its place in its tenant's count, and its claim on
/// the engines' room until it has picked; all given back on drop, on every path.
pub(crate) struct Permit {
    shared: Arc<Shared>,
    generations: usize,
    tenant: Arc<Tenant>,
    transit: Option<Arc<Transit>>,
}

impl Permit {
    /// The claim each pick gives up (Pairs calls `picked`); None without a threshold.
    pub(crate) fn transit(&self) -> Option<Arc<Transit>> {
        self.transit.clone()
    }

    /// Gives up the whole claim at once (a request whose one leg is about to be picked).
    pub(crate) fn picked_all(&mut self) {
        self.transit = None;
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.tenant.admitted.fetch_sub(1, Ordering::Relaxed);
        {
            let mut st = self.shared.lock();
            st.in_use -= self.generations;
            self.shared.in_use.store(st.in_use, Ordering::Relaxed);
        }
        self.transit = None;
        self.shared.dispatch();
    }
}

/// A waiting request's place, given up when it stops waiting (admitted, timed out, or
/// its client gone).
struct Place<'a> {
    shared: &'a Arc<Shared>,
    priority: i32,
    tenant: Arc<str>,
    id: u64,
}

impl Drop for Place<'_> {
    fn drop(&mut self) {
        let removed = {
            let mut st = self.shared.lock();
            let removed = st.waiting.remove(self.priority, &self.tenant, self.id);
            self.shared.queued.store(st.waiting.len(), Ordering::Relaxed);
            removed
        };
        if removed.is_some() {
            // It may have been the head others waited behind.
            self.shared.dispatch();
        }
    }
}

fn may_go(item: &Item) -> bool {
    item.tenant.limits().concurrent.is_none_or(|c| item.tenant.admitted.load(Ordering::Relaxed) < c)
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn room(&self) -> usize {
        self.gate.as_ref().map_or(usize::MAX, |g| g.room.room(&g.topology))
    }

    /// Room a request of `priority` leaves free: under `auto` thresholds, one slot for the
    /// best band the tenants file names when the request is of a worse one, so that an
    /// interactive request never waits for a batch job's leg to end before it can start
    /// (a fixed threshold is the operator's exact number: nothing is kept back from it).
    fn reserve(&self, priority: i32) -> usize {
        let learned = self.gate.as_ref().is_some_and(|g| g.room.is_learned());
        usize::from(learned && priority > self.tenants.best_priority())
    }

    fn grant(self: &Arc<Self>, st: &mut State, generations: usize, tenant: Arc<Tenant>) -> Permit {
        st.in_use += generations;
        self.in_use.store(st.in_use, Ordering::Relaxed);
        tenant.admitted.fetch_add(1, Ordering::Relaxed);
        let transit = self.gate.as_ref().map(|g| Arc::new(g.room.transit(&g.topology, generations)));
        Permit { shared: self.clone(), generations, tenant, transit }
    }

    /// Sends on the waiting requests that may go now, in order.
    fn dispatch(self: &Arc<Self>) {
        let mut unsent = Vec::new();
        {
            let mut st = self.lock();
            let mut room = None;
            while let Some((next, generations)) = st.waiting.next(may_go).map(|(n, i)| (n, i.generations)) {
                if st.in_use + generations > self.max {
                    break;
                }
                let left = room.get_or_insert_with(|| self.room());
                if *left <= self.reserve(next.priority) {
                    self.held.store(true, Ordering::Relaxed);
                    break;
                }
                *left -= 1;
                let item = st.waiting.pop(&next).expect("the head just seen");
                let permit = self.grant(&mut st, item.generations, item.tenant);
                if let Err(permit) = item.tx.send(permit) {
                    unsent.push(permit);
                }
            }
            self.queued.store(st.waiting.len(), Ordering::Relaxed);
        }
        // Dropped outside the lock: a permit's drop dispatches again.
        drop(unsent);
    }
}

pub(crate) struct Admission {
    shared: Arc<Shared>,
}

impl Admission {
    /// `gate`: `--engine-queue-threshold` over this topology.
    pub(crate) fn new(
        max: usize,
        queue_size: usize,
        timeout: Duration,
        tenants: Arc<Tenants>,
        gate: Option<(EngineRoom, Arc<Topology>)>,
    ) -> Self {
        let gate = gate.map(|(room, topology)| Gate { room, topology });
        let shared = Shared {
            state: Mutex::new(State { in_use: 0, waiting: Waiting::default(), next_id: 0 }),
            max,
            queue_size,
            timeout,
            gate,
            tenants,
            wake: Notify::new(),
            held: AtomicBool::new(false),
            queued: AtomicUsize::new(0),
            in_use: AtomicUsize::new(0),
        };
        Admission { shared: Arc::new(shared) }
    }

    /// Admits a request (one permit per generation), now or when its turn comes.
    pub(crate) async fn admit(&self, t: Ticket) -> Result<Permit, Refused> {
        let s = &self.shared;
        if t.generations > s.max {
            return Err(Refused::TooLarge(ApiError::bad_request(format!(
                "this request makes {} generations, more than --max-concurrent-requests {}",
                t.generations, s.max
            ))));
        }
        let band = s.tenants.band(t.priority);
        let (rx, place) = {
            let mut st = s.lock();
            // No jumping the queue: with requests waiting, a new one waits behind them.
            let item_may_go = t.tenant.limits().concurrent.is_none_or(|c| t.tenant.admitted.load(Ordering::Relaxed) < c);
            if st.waiting.len() == 0 && st.in_use + t.generations <= s.max && item_may_go {
                if s.room() > s.reserve(t.priority) {
                    return Ok(s.grant(&mut st, t.generations, t.tenant));
                }
                s.held.store(true, Ordering::Relaxed);
            }
            let name = t.tenant.name.clone();
            let full = if st.waiting.len() >= s.queue_size {
                Some(format!("the router's queue holds --queue-size {} requests", s.queue_size))
            } else if let Some(max) = band.and_then(|b| b.max_queued).filter(|m| st.waiting.band_len(t.priority) >= *m) {
                Some(format!("priority {}'s queue holds its max_queued {max} requests", t.priority))
            } else {
                t.tenant
                    .limits()
                    .max_queued
                    .filter(|m| st.waiting.tenant_len(t.priority, &name) >= *m)
                    .map(|m| format!("tenant {name} has its max_queued {m} requests waiting"))
            };
            if let Some(why) = full {
                let secs = s.timeout.as_secs().clamp(1, 60);
                return Err(Refused::QueueFull(
                    ApiError::new(ErrorKind::RateLimit, format!("{why} (the engines are busy); retry later")).retry_after(secs),
                ));
            }
            let (tx, rx) = oneshot::channel();
            let id = st.next_id;
            st.next_id += 1;
            let weight = t.tenant.weight();
            st.waiting.push(t.priority, &name, weight, t.cost, id, Item { generations: t.generations, tenant: t.tenant, tx });
            s.queued.store(st.waiting.len(), Ordering::Relaxed);
            (rx, Place { shared: s, priority: t.priority, tenant: name, id })
        };
        s.wake.notify_one();
        // The permit may be free already (released between the check and the queueing).
        s.dispatch();
        let timeout = band.and_then(|b| b.queue_timeout).unwrap_or(s.timeout);
        let waited = tokio::time::timeout(timeout, rx).await;
        drop(place);
        match waited {
            Ok(Ok(permit)) => Ok(permit),
            _ => Err(Refused::QueueTimeout(
                ApiError::new(
                    ErrorKind::ServiceUnavailable,
                    format!(
                        "waited {:.1}s for the engines to have room (--queue-timeout-secs); the router is saturated",
                        timeout.as_secs_f64()
                    ),
                )
                .retry_after(timeout.as_secs().clamp(1, 60)),
            )),
        }
    }

    pub(crate) fn queued(&self) -> usize {
        self.shared.queued.load(Ordering::Relaxed)
    }

    pub(crate) fn in_use(&self) -> usize {
        self.shared.in_use.load(Ordering::Relaxed)
    }

    /// Under a threshold: looks again for room while requests wait (the engines' queues
    /// move without a word to the router), and steps `auto` thresholds each second.
    pub(crate) async fn watch_room(self: Arc<Self>) {
        let Some(gate) = &self.shared.gate else { return };
        let mut learned = tokio::time::Instant::now();
        loop {
            if self.queued() == 0 {
                let _ = tokio::time::timeout(LEARN_EVERY, self.shared.wake.notified()).await;
            } else {
                tokio::time::sleep(ROOM_POLL).await;
                self.shared.dispatch();
            }
            if learned.elapsed() >= LEARN_EVERY {
                learned = tokio::time::Instant::now();
                gate.room.learn(&gate.topology, self.shared.held.swap(false, Ordering::Relaxed));
            }
        }
    }
}

#[cfg(test)]
mod tests;
