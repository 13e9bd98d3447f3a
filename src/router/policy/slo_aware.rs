//! slo_aware: the worker whose predicted latency (router/predict/) meets the SLOs with the
//! most headroom, else the least predicted TTFT. In the prefill pool a worker is judged by
//! its prefill of the uncached tokens behind its queue (and the decodes it would hold up,
//! when it is an elastic engine decoding too); a colocated worker by both legs on it. In
//! the decode pool, the fewest running among those whose time per token with one more
//! sequence (lengthened by prefill work queued there) keeps the ITL SLO. Over elastic
//! engines the pair's room keeps decodes off the engines leaning to prefill
//! (pair/elastic.rs).

use std::sync::Arc;

use super::{Candidate, RequestInfo, WorkerRank};
use crate::router::predict::{self, EngineNow, Forecast, Slo};

/// Which leg a pool's picks are for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum LegOf {
    Prefill,
    Decode,
    /// Colocated: one worker answers alone.
    Whole,
}

/// Prompt tokens a worker would compute: all but those its best rank's cache holds
/// (kv_aware's view, when the index is on).
pub(crate) fn uncached<W: Candidate>(worker: &W, req: &RequestInfo) -> usize {
    let Some(kv) = &req.kv else { return req.tokens };
    let held = (0..worker.served_ranks())
        .filter_map(|rank| kv.held.get(&WorkerRank { url: worker.url().to_string(), rank }))
        .max()
        .copied()
        .unwrap_or(0);
    req.tokens.saturating_sub(held * kv.block_size)
}

/// A worker's forecast for this request's leg.
pub(crate) fn forecast<W: Candidate>(worker: &W, req: &RequestInfo, leg: LegOf) -> Forecast {
    let now = EngineNow { latency: worker.latency(), running: worker.in_flight() };
    match leg {
        LegOf::Prefill => predict::prefill_leg(now, uncached(worker, req)),
        LegOf::Decode => predict::decode_leg(now, req.tokens),
        LegOf::Whole => predict::alone(now, uncached(worker, req)),
    }
}

pub(crate) fn select<W: Candidate>(workers: &[Arc<W>], candidates: &[usize], req: &RequestInfo, slo: &Slo, leg: LegOf) -> usize {
    if leg == LegOf::Decode {
        return spread_decodes(workers, candidates, req, slo);
    }
    let mut best = candidates[0];
    let mut best_forecast = forecast(&*workers[best], req, leg);
    for &c in &candidates[1..] {
        let f = forecast(&*workers[c], req, leg);
        let tie = (f == best_forecast) && workers[c].in_flight() < workers[best].in_flight();
        if f.better_than(&best_forecast, slo) || tie {
            (best, best_forecast) = (c, f);
        }
    }
    best
}

/// The decode pool's pick: the fewest running among those whose time per token with one
/// more sequence (lengthened by any prefill queued there) keeps the ITL SLO; else the
/// least time per token.
fn spread_decodes<W: Candidate>(workers: &[Arc<W>], candidates: &[usize], req: &RequestInfo, slo: &Slo) -> usize {
    let itl = |c: usize| forecast(&*workers[c], req, LegOf::Decode).itl_ms;
    let within = candidates.iter().copied().filter(|c| itl(*c) <= slo.itl_ms);
    within
        .min_by_key(|c| (workers[*c].in_flight(), *c))
        .unwrap_or_else(|| candidates.iter().copied().min_by(|a, b| itl(*a).total_cmp(&itl(*b)).then(a.cmp(b))).unwrap_or(candidates[0]))
}
