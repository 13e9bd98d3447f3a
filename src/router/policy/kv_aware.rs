//! kv_aware: every candidate's every served rank is priced at the prompt blocks it would
//! compute (those it does not hold from the start) plus `load_weight` times the blocks
//! that requests in flight there still have to compute (the router's own reservations,
//! plus the requests the engine reports beyond those, each as large as this prompt);
//! the cheapest wins, ties to the less loaded worker, then to the rank with the fewest
//! blocks cached, then in turn (new prompts spread over the caches, also when every cache
//! is full).

use std::collections::HashMap;
use std::sync::Arc;

use super::{Candidate, Pick, RequestInfo, WorkerRank};

/// One rank's price, and what breaks ties.
struct Priced {
    cost: f64,
    in_flight: usize,
    indexed: usize,
    candidate: usize,
    rank: usize,
    uncached: usize,
}

impl Priced {
    fn better_than(&self, other: &Priced) -> bool {
        (self.cost, self.in_flight, self.indexed) < (other.cost, other.in_flight, other.indexed)
    }
}

/// A holders map regrouped by worker URL, so each candidate is looked up once and without
/// building a key (a pick over a thousand workers allocates nothing per rank).
fn by_url(m: Option<&HashMap<WorkerRank, usize>>) -> HashMap<&str, Vec<(usize, usize)>> {
    let mut by: HashMap<&str, Vec<(usize, usize)>> = HashMap::new();
    for (h, n) in m.into_iter().flatten() {
        by.entry(h.url.as_str()).or_default().push((h.rank, *n));
    }
    by
}

fn at(ranks: Option<&Vec<(usize, usize)>>, rank: usize) -> usize {
    ranks.and_then(|v| v.iter().find(|(r, _)| *r == rank)).map_or(0, |(_, n)| *n)
}

pub(super) fn select<W: Candidate>(workers: &[Arc<W>], candidates: &[usize], req: &RequestInfo, load_weight: f64, turn: usize) -> Pick {
    let blocks = req.kv.as_ref().map_or(0, |kv| kv.blocks);
    let (held, indexed) = (by_url(req.kv.as_ref().map(|kv| &kv.held)), by_url(req.kv.as_ref().map(|kv| &kv.indexed)));
    let mut best: Option<Priced> = None;
    let n = candidates.len();
    for &c in candidates.iter().cycle().skip(turn % n).take(n) {
        let w = &workers[c];
        let (held_here, indexed_here) = (held.get(w.url()), indexed.get(w.url()));
        let in_flight = w.in_flight();
        for rank in 0..w.served_ranks() {
            let uncached = blocks.saturating_sub(at(held_here, rank));
            // Requests the engine reports beyond ours are priced as this prompt's size.
            let queued = w.queued_blocks(rank).saturating_add(w.reported_elsewhere(rank).saturating_mul(blocks));
            let priced = Priced {
                cost: uncached as f64 + load_weight * queued as f64,
                // Among equals, the worker already in use by fewer requests.
                in_flight,
                indexed: at(indexed_here, rank),
                candidate: c,
                rank,
                uncached,
            };
            if best.as_ref().is_none_or(|b| priced.better_than(b)) {
                best = Some(priced);
            }
        }
    }
    best.map_or(Pick { index: candidates[0], rank: None, blocks: 0 }, |p| Pick {
        index: p.candidate,
        rank: Some(p.rank),
        blocks: p.uncached,
    })
}
