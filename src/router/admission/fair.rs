//! The router's waiting requests in the order they go: strict bands by priority (lower
//! first, as vLLM), weighted fair shares between tenants within a band, FIFO within a
//! tenant. Fair shares are start-time fair queueing (Goyal et al., SIGCOMM '96) by token
//! cost: each request is tagged `start = max(band's virtual time, tenant's last finish)`,
//! `finish = start + cost / weight`, and the smallest start tag goes next, so over time each
//! busy tenant of a band gets tokens in proportion to its weight.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

/// A request of one tenant, waiting.
struct Entry<T> {
    id: u64,
    start: f64,
    item: T,
}

/// One tenant's waiting requests in one band.
struct Flow<T> {
    finish: f64,
    queue: VecDeque<Entry<T>>,
}

struct Band<T> {
    vtime: f64,
    flows: HashMap<Arc<str>, Flow<T>>,
    len: usize,
}

/// The head that goes next: its band and tenant, to pop it by.
pub(super) struct Next {
    pub(super) priority: i32,
    pub(super) tenant: Arc<str>,
}

pub(super) struct Waiting<T> {
    bands: BTreeMap<i32, Band<T>>,
    len: usize,
}

impl<T> Default for Waiting<T> {
    fn default() -> Self {
        Waiting { bands: BTreeMap::new(), len: 0 }
    }
}

impl<T> Waiting<T> {
    pub(super) fn len(&self) -> usize {
        self.len
    }

    pub(super) fn band_len(&self, priority: i32) -> usize {
        self.bands.get(&priority).map_or(0, |b| b.len)
    }

    pub(super) fn tenant_len(&self, priority: i32, tenant: &str) -> usize {
        self.bands.get(&priority).and_then(|b| b.flows.get(tenant)).map_or(0, |f| f.queue.len())
    }

    /// Queues `item` (request `id`, costing `cost` tokens) for `tenant` of `weight`.
    pub(super) fn push(&mut self, priority: i32, tenant: &Arc<str>, weight: f64, cost: u64, id: u64, item: T) {
        let band = self.bands.entry(priority).or_insert_with(|| Band { vtime: 0.0, flows: HashMap::new(), len: 0 });
        let flow = band.flows.entry(tenant.clone()).or_insert_with(|| Flow { finish: 0.0, queue: VecDeque::new() });
        let start = band.vtime.max(flow.finish);
        // A request costs at least one token: a stream of empty prompts still shares.
        flow.finish = start + (cost.max(1) as f64) / weight;
        flow.queue.push_back(Entry { id, start, item });
        band.len += 1;
        self.len += 1;
    }

    /// The request that goes next: the first band with a tenant whose head `may_go`; in
    /// it, the smallest start tag among those heads. A band whose every tenant is held
    /// (at its own concurrency limit) lets the next band go.
    pub(super) fn next(&self, may_go: impl Fn(&T) -> bool) -> Option<(Next, &T)> {
        for (priority, band) in &self.bands {
            let best = band
                .flows
                .iter()
                .filter_map(|(name, f)| f.queue.front().map(|e| (name, e)))
                .filter(|(_, e)| may_go(&e.item))
                .min_by(|a, b| a.1.start.total_cmp(&b.1.start).then(a.1.id.cmp(&b.1.id)));
            if let Some((name, e)) = best {
                return Some((Next { priority: *priority, tenant: name.clone() }, &e.item));
            }
        }
        None
    }

    /// Takes the head `next` named; the band's virtual time moves to its start tag.
    pub(super) fn pop(&mut self, next: &Next) -> Option<T> {
        let band = self.bands.get_mut(&next.priority)?;
        let flow = band.flows.get_mut(&next.tenant)?;
        let e = flow.queue.pop_front()?;
        band.vtime = band.vtime.max(e.start);
        self.after_removal(next.priority);
        Some(e.item)
    }

    /// Takes request `id` out (it stopped waiting), if it is still here.
    pub(super) fn remove(&mut self, priority: i32, tenant: &str, id: u64) -> Option<T> {
        let flow = self.bands.get_mut(&priority)?.flows.get_mut(tenant)?;
        let at = flow.queue.iter().position(|e| e.id == id)?;
        let e = flow.queue.remove(at)?;
        self.after_removal(priority);
        Some(e.item)
    }

    fn after_removal(&mut self, priority: i32) {
        self.len -= 1;
        let band = self.bands.get_mut(&priority).expect("the band of a removed entry");
        band.len -= 1;
        if band.len == 0 {
            // An idle band starts again at 0 (its tenants' tags with it).
            self.bands.remove(&priority);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(w: &mut Waiting<(&'static str, u64)>) -> Vec<&'static str> {
        let mut out = Vec::new();
        while let Some((next, _)) = w.next(|_| true) {
            out.push(w.pop(&next).unwrap().0);
        }
        out
    }

    #[test]
    fn bands_are_strict_and_tenants_fifo() {
        let mut w = Waiting::default();
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        w.push(10, &a, 1.0, 10, 1, ("a1", 0));
        w.push(10, &a, 1.0, 10, 2, ("a2", 0));
        w.push(0, &b, 1.0, 10, 3, ("b1", 0));
        assert_eq!(drain(&mut w), ["b1", "a1", "a2"]);
        assert_eq!(w.len(), 0);
    }

    #[test]
    fn shares_follow_weights_by_tokens() {
        let mut w = Waiting::default();
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        // a: weight 1, 100-token requests; b: weight 4, 100-token requests, both backlogged.
        for i in 0..100 {
            w.push(5, &a, 1.0, 100, 2 * i, ("a", 100));
            w.push(5, &b, 4.0, 100, 2 * i + 1, ("b", 100));
        }
        let first: Vec<_> = drain(&mut w).into_iter().take(50).collect();
        let b_share = first.iter().filter(|t| **t == "b").count();
        assert_eq!(b_share, 40, "4:1 by weight: {first:?}");
        // By tokens, not requests: a's requests cost a quarter of b's at equal weight.
        for i in 0..100 {
            w.push(5, &a, 1.0, 25, 2 * i, ("a", 25));
            w.push(5, &b, 1.0, 100, 2 * i + 1, ("b", 100));
        }
        let first: Vec<_> = drain(&mut w).into_iter().take(50).collect();
        assert_eq!(first.iter().filter(|t| **t == "a").count(), 40);
    }

    #[test]
    fn a_held_tenant_lets_others_go_and_removal_keeps_counts() {
        let mut w = Waiting::default();
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        w.push(0, &a, 1.0, 1, 1, ("a1", 0));
        w.push(10, &b, 1.0, 1, 2, ("b1", 0));
        let (next, _) = w.next(|(name, _)| *name != "a1").unwrap();
        assert_eq!((next.priority, &*next.tenant), (10, "b"), "a is held: the next band goes");
        assert_eq!(w.remove(0, "a", 1).map(|x| x.0), Some("a1"));
        assert_eq!(w.remove(0, "a", 1), None);
        assert_eq!((w.len(), w.band_len(0), w.band_len(10), w.tenant_len(10, "b")), (1, 0, 1, 1));
    }
}
