//! Load-balancing policies. `select` runs under the pool's lock and returns the index of
//! one of `candidates` (healthy, not excluded; never empty) in the pool's snapshot.
//! Policies that keep state per worker key it by URL, and hear of workers joining and
//! leaving (`add_worker`, `remove_worker`); a pick may still name a worker that has just
//! left (its snapshot was taken first), which they treat as unknown.

mod prefix;
mod ring;

use std::sync::Arc;

use clap::ValueEnum;
use rand::Rng;

use crate::router::config::CacheAwareConfig;
use crate::router::workers::Worker;
pub use prefix::PrefixIndex;
pub use ring::HashRing;

/// How a role's workers are chosen for each request.
#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
#[value(rename_all = "snake_case")]
pub enum PolicyKind {
    /// Each worker in turn.
    RoundRobin,
    /// Uniformly at random.
    Random,
    /// The less loaded of two random workers, by the router's own in-flight counts
    /// (reserved at pick time, so a burst does not herd onto one worker).
    PowerOfTwo,
    /// Sticky by session: `x-session-id` / `x-user-id` header or body `user`, else the
    /// prompt's prefix; a worker going down moves only its own keys.
    ConsistentHash,
    /// Approximate prefix tree of routed prompts per worker: the worker that already
    /// holds the longest prefix, unless load is imbalanced (see the balance thresholds).
    CacheAware,
    /// Exact: what each engine's KV cache holds, from its own KV events; the worker and
    /// DP rank with the fewest uncached prompt blocks plus --kv-aware-load-weight times
    /// the blocks queued there. Text is tokenized with --model-path, else by a prefill's
    /// render endpoint.
    KvAware,
}

/// What a policy may look at: a session key and the prompt's start, as bytes of units
/// (chars: 1 byte each; token ids: 4 bytes each), and its chunk hashes, computed here,
/// outside any lock. Filled only for the policies that need them.
#[derive(Default, Debug)]
pub struct RequestInfo {
    pub session: Option<String>,
    pub prompt: Vec<u8>,
    /// Bytes per unit of `prompt`: 1 (characters) or 4 (token ids).
    pub unit: usize,
    pub chunks: Vec<(u64, u32)>,
    /// kv_aware: the prompt's full blocks, and how many of them each (worker, rank) holds
    /// from the start (from the KV index, looked up before the pick).
    pub kv: Option<KvView>,
}

#[derive(Default, Debug)]
pub struct KvView {
    /// The prompt's tokens and tokens per block.
    pub tokens: usize,
    pub block_size: usize,
    pub blocks: usize,
    pub held: std::collections::HashMap<crate::router::kv_aware::index::Holder, usize>,
    /// Blocks indexed per holder: among equals, the emptier cache takes a new prompt.
    pub indexed: std::collections::HashMap<crate::router::kv_aware::index::Holder, usize>,
}

impl RequestInfo {
    pub fn new(session: Option<String>, prompt: Vec<u8>, unit: usize) -> Self {
        let chunks = prefix::chunk_hashes(&prompt, unit);
        RequestInfo { session, prompt, unit, chunks, kv: None }
    }

    pub fn units(&self) -> usize {
        self.prompt.len() / self.unit.max(1)
    }
}

/// Units of prompt prefix that key consistent_hash when there is no session key.
const HASH_PREFIX_UNITS: usize = 256;

/// A policy's choice: the candidate (an index into the pool's snapshot), the DP rank when
/// the policy chooses it (kv_aware: the rank whose cache holds the prompt; otherwise the
/// worker's least loaded), and the uncached blocks the request reserves there.
pub struct Pick {
    pub index: usize,
    pub rank: Option<usize>,
    pub blocks: usize,
}

pub enum Policy {
    RoundRobin {
        next: usize,
    },
    Random,
    PowerOfTwo,
    ConsistentHash(HashRing),
    CacheAware {
        cfg: CacheAwareConfig,
        index: PrefixIndex,
    },
    /// `turn` rotates ties, so equal candidates share new prompts even one at a time.
    KvAware {
        load_weight: f64,
        turn: usize,
    },
}

impl Policy {
    /// A policy with no workers yet (the pool adds them).
    pub fn new(kind: PolicyKind, cache: &CacheAwareConfig, kv_load_weight: f64) -> Self {
        match kind {
            PolicyKind::RoundRobin => Policy::RoundRobin { next: 0 },
            PolicyKind::Random => Policy::Random,
            PolicyKind::PowerOfTwo => Policy::PowerOfTwo,
            PolicyKind::ConsistentHash => Policy::ConsistentHash(HashRing::default()),
            PolicyKind::CacheAware => Policy::CacheAware { cfg: cache.clone(), index: PrefixIndex::new(cache.max_entries) },
            PolicyKind::KvAware => Policy::KvAware { load_weight: kv_load_weight, turn: 0 },
        }
    }

    pub fn add_worker(&mut self, url: &str) {
        match self {
            Policy::ConsistentHash(ring) => ring.add(url),
            Policy::CacheAware { index, .. } => index.add(url),
            _ => {}
        }
    }

    pub fn remove_worker(&mut self, url: &str) {
        match self {
            Policy::ConsistentHash(ring) => ring.remove(url),
            Policy::CacheAware { index, .. } => index.remove(url),
            _ => {}
        }
    }

    pub fn needs_request_info(&self) -> bool {
        matches!(self, Policy::ConsistentHash(_) | Policy::CacheAware { .. })
    }

    pub fn is_kv_aware(&self) -> bool {
        matches!(self, Policy::KvAware { .. })
    }

    /// The chosen candidate, and what the policy decided beyond it.
    pub fn select(&mut self, workers: &[Arc<Worker>], candidates: &[usize], req: &RequestInfo) -> Pick {
        if let Policy::KvAware { load_weight, turn } = self {
            *turn = turn.wrapping_add(1);
            return kv_aware(workers, candidates, req, *load_weight, *turn);
        }
        Pick { index: self.select_worker(workers, candidates, req), rank: None, blocks: 0 }
    }

    fn select_worker(&mut self, workers: &[Arc<Worker>], candidates: &[usize], req: &RequestInfo) -> usize {
        let load = |i: &usize| workers[*i].in_flight();
        match self {
            Policy::KvAware { .. } => unreachable!("kv_aware picks a rank too (select)"),
            Policy::RoundRobin { next } => {
                let chosen = candidates[*next % candidates.len()];
                *next = next.wrapping_add(1);
                chosen
            }
            Policy::Random => candidates[rand::rng().random_range(0..candidates.len())],
            Policy::PowerOfTwo => {
                if candidates.len() == 1 {
                    return candidates[0];
                }
                let mut rng = rand::rng();
                let a = rng.random_range(0..candidates.len());
                let mut b = rng.random_range(0..candidates.len() - 1);
                if b >= a {
                    b += 1;
                }
                let (a, b) = (candidates[a], candidates[b]);
                if load(&b) < load(&a) {
                    b
                } else {
                    a
                }
            }
            Policy::ConsistentHash(ring) => {
                let key: &[u8] = match &req.session {
                    Some(s) => s.as_bytes(),
                    None => &req.prompt[..req.prompt.len().min(HASH_PREFIX_UNITS * req.unit.max(1))],
                };
                ring.lookup(key, |url| candidates.iter().any(|c| workers[*c].url == url))
                    .and_then(|url| candidates.iter().copied().find(|c| workers[*c].url == url))
                    .unwrap_or(candidates[0])
            }
            Policy::CacheAware { cfg, index } => {
                let loads: Vec<usize> = candidates.iter().map(load).collect();
                let (min, max) = (*loads.iter().min().unwrap_or(&0), *loads.iter().max().unwrap_or(&0));
                let imbalanced = max - min > cfg.balance_abs_threshold && max as f64 > min as f64 * cfg.balance_rel_threshold;
                let least_loaded = || candidates[loads.iter().enumerate().min_by_key(|(_, l)| **l).map_or(0, |(k, _)| k)];
                let chosen = if imbalanced || req.prompt.is_empty() {
                    least_loaded()
                } else {
                    let matched = |i: usize| index.matched_units(&req.chunks, &workers[i].url);
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
                            .min_by(|a, b| index.size(&workers[*a].url).cmp(&index.size(&workers[*b].url)).then(load(a).cmp(&load(b))))
                            .unwrap_or(candidates[0])
                    }
                };
                if !req.chunks.is_empty() {
                    index.insert(&req.chunks, &workers[chosen].url);
                }
                chosen
            }
        }
    }

    /// Entries in cache_aware's prefix index (None for other policies).
    pub fn index_entries(&self) -> Option<usize> {
        match self {
            Policy::CacheAware { index, .. } => Some(index.entries()),
            _ => None,
        }
    }

    /// One bounded step of upkeep (cache_aware's trim to --max-tree-size); returns
    /// whether more steps are due.
    pub fn maintain(&mut self) -> bool {
        match self {
            Policy::CacheAware { cfg, index } => index.trim(cfg.max_tree_size),
            _ => false,
        }
    }
}

/// kv_aware: every candidate's every served rank is priced at the prompt blocks it would
/// compute (those it does not hold from the start) plus `load_weight` times the blocks
/// that requests in flight there still have to compute (the router's own reservations,
/// plus the requests the engine reports beyond those, each as large as this prompt);
/// the cheapest wins, ties to the less loaded worker, then to the rank with the fewest
/// blocks cached, then in turn (new prompts spread over the caches, also when every cache
/// is full).
fn kv_aware(workers: &[Arc<Worker>], candidates: &[usize], req: &RequestInfo, load_weight: f64, turn: usize) -> Pick {
    let blocks = req.kv.as_ref().map_or(0, |kv| kv.blocks);
    let mut best: Option<(f64, usize, usize, usize, usize, usize)> = None;
    let n = candidates.len();
    for &c in candidates.iter().cycle().skip(turn % n).take(n) {
        let w = &workers[c];
        for rank in 0..w.served_ranks() {
            let holder = crate::router::kv_aware::index::Holder { url: w.url.clone(), rank };
            let of = |m: Option<&std::collections::HashMap<crate::router::kv_aware::index::Holder, usize>>| {
                m.and_then(|m| m.get(&holder)).copied().unwrap_or(0)
            };
            let uncached = blocks.saturating_sub(of(req.kv.as_ref().map(|kv| &kv.held)));
            // Requests the engine reports beyond ours are priced as this prompt's size.
            let queued = w.queued_blocks(rank).saturating_add(w.reported_elsewhere(rank).saturating_mul(blocks));
            let cost = uncached as f64 + load_weight * queued as f64;
            // Among equals, the worker already in use by fewer requests.
            let key = (cost, w.in_flight(), of(req.kv.as_ref().map(|kv| &kv.indexed)), c, rank, uncached);
            if best.as_ref().is_none_or(|b| (key.0, key.1, key.2) < (b.0, b.1, b.2)) {
                best = Some(key);
            }
        }
    }
    best.map_or(Pick { index: candidates[0], rank: None, blocks: 0 }, |(_, _, _, c, rank, uncached)| Pick {
        index: c,
        rank: Some(rank),
        blocks: uncached,
    })
}
