//! cache_aware: an approximate prefix tree of the prompts routed to each worker; the
//! worker that already holds the longest prefix, unless the load is imbalanced (the
//! balance thresholds), or nothing matches enough (then the emptiest tree).

use std::sync::Arc;

use super::{CacheAwareConfig, Candidate, PrefixIndex, RequestInfo};

pub(super) fn select<W: Candidate>(
    cfg: &CacheAwareConfig,
    index: &mut PrefixIndex,
    workers: &[Arc<W>],
    candidates: &[usize],
    req: &RequestInfo,
) -> usize {
    let load = |i: &usize| workers[*i].in_flight();
    let loads: Vec<usize> = candidates.iter().map(load).collect();
    let (min, max) = (*loads.iter().min().unwrap_or(&0), *loads.iter().max().unwrap_or(&0));
    let imbalanced = max - min > cfg.balance_abs_threshold && max as f64 > min as f64 * cfg.balance_rel_threshold;
    let least_loaded = || candidates[loads.iter().enumerate().min_by_key(|(_, l)| **l).map_or(0, |(k, _)| k)];
    let chosen = if imbalanced || req.prompt.is_empty() {
        least_loaded()
    } else {
        let matched = |i: usize| index.matched_units(&req.chunks, workers[i].url());
        let (best, best_units) = candidates
            .iter()
            .map(|c| (*c, matched(*c)))
            .max_by(|(a, ma), (b, mb)| ma.cmp(mb).then(load(b).cmp(&load(a))))
            .unwrap_or((candidates[0], 0));
        let rate = best_units as f64 / req.units().max(1) as f64;
        if rate > cfg.cache_threshold {
            best
        } else {
            // Nothing cached worth following: the worker with the most room.
            candidates
                .iter()
                .copied()
                .min_by(|a, b| index.size(workers[*a].url()).cmp(&index.size(workers[*b].url())).then(load(a).cmp(&load(b))))
                .unwrap_or(candidates[0])
        }
    };
    if !req.chunks.is_empty() {
        index.insert(&req.chunks, workers[chosen].url());
    }
    chosen
}
