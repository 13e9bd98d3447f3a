//! Load-balancing policies. `select` runs under the pool's lock and returns the index of
//! one of `candidates` (healthy, not excluded; never empty) in the pool's snapshot.
//! Policies that keep state per worker key it by URL, and hear of workers joining and
//! leaving (`add_worker`, `remove_worker`); a pick may still name a worker that has just
//! left (its snapshot was taken first), which they treat as unknown.

mod cache_aware;
mod consistent_hash;
mod kv_aware;
mod power_of_two;
mod prefix;
mod random;
mod ring;
mod round_robin;
pub(crate) mod slo_aware;

use std::sync::Arc;
use std::time::Duration;

use clap::ValueEnum;

pub(crate) use prefix::PrefixIndex;
pub(crate) use ring::HashRing;

#[derive(Debug, Clone)]
pub(crate) struct CacheAwareConfig {
    pub(crate) cache_threshold: f64,
    pub(crate) balance_abs_threshold: usize,
    pub(crate) balance_rel_threshold: f64,
    pub(crate) eviction_interval: Duration,
    /// Most prompt units (characters, or tokens with a tokenizer) indexed per worker.
    pub(crate) max_tree_size: usize,
    /// Units of each prompt's start that are indexed (the rest is not looked at).
    pub(crate) max_prefix: usize,
    /// Most index entries for all workers together (each ~100 bytes).
    pub(crate) max_entries: usize,
}

/// One DP rank of one worker: what a request is sent to, and a KV cache that events come
/// from.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkerRank {
    pub url: String,
    pub rank: usize,
}

/// How a role's workers are chosen for each request.
#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
#[value(rename_all = "snake_case")]
pub(crate) enum PolicyKind {
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
    /// Predicted latency: each worker's model (prefill time behind its queue, KV transfer,
    /// time per token with its running sequences, the steps a prefill adds to them),
    /// fitted from the legs the router sees; the worker meeting --slo-ttft-ms and
    /// --slo-itl-ms with the most headroom, else the least predicted TTFT. Over a
    /// --pd-pool it also decides whether one engine takes both legs.
    SloAware,
}

/// A prompt's start as policies read it, in units: text bytes, or token ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PromptStart {
    /// UTF-8 text, one unit per byte.
    Text(Vec<u8>),
    /// Token ids, one unit each.
    Tokens(Vec<u32>),
}

impl Default for PromptStart {
    fn default() -> Self {
        PromptStart::Text(Vec::new())
    }
}

impl PromptStart {
    pub(crate) fn units(&self) -> usize {
        match self {
            PromptStart::Text(b) => b.len(),
            PromptStart::Tokens(t) => t.len(),
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.units() == 0
    }

    /// FNV-1a from `h` over the units in `range` (a token id as its 4 little-endian bytes).
    pub(crate) fn hash_units(&self, h: u64, range: std::ops::Range<usize>) -> u64 {
        match self {
            PromptStart::Text(b) => crate::api::fnv1a(h, &b[range]),
            PromptStart::Tokens(t) => t[range].iter().fold(h, |h, id| crate::api::fnv1a(h, &id.to_le_bytes())),
        }
    }
}

/// What a policy may look at: a session key and the prompt's start, and its chunk hashes,
/// computed here, outside any lock. Filled only for the policies that need them.
#[derive(Default, Debug)]
pub(crate) struct RequestInfo {
    pub(crate) session: Option<String>,
    pub(crate) prompt: PromptStart,
    pub(crate) chunks: Vec<(u64, u32)>,
    /// kv_aware: the prompt's full blocks, and how many of them each (worker, rank) holds
    /// from the start (from the KV index, looked up before the pick).
    pub(crate) kv: Option<KvView>,
    /// slo_aware: the prompt's tokens (kv_aware's count, else estimated from its bytes).
    pub(crate) tokens: usize,
}

#[derive(Default, Debug)]
pub(crate) struct KvView {
    /// The prompt's tokens and tokens per block.
    pub(crate) tokens: usize,
    pub(crate) block_size: usize,
    pub(crate) blocks: usize,
    pub(crate) held: std::collections::HashMap<crate::router::policy::WorkerRank, usize>,
    /// Blocks indexed per holder: among equals, the emptier cache takes a new prompt.
    pub(crate) indexed: std::collections::HashMap<crate::router::policy::WorkerRank, usize>,
}

impl RequestInfo {
    pub(crate) fn new(session: Option<String>, prompt: PromptStart) -> Self {
        let chunks = prefix::chunk_hashes(&prompt);
        RequestInfo { session, prompt, chunks, kv: None, tokens: 0 }
    }

    pub(crate) fn units(&self) -> usize {
        self.prompt.units()
    }
}

/// What a policy reads of a worker (workers::Worker is one).
pub(crate) trait Candidate {
    fn url(&self) -> &str;
    /// Requests in flight on it, as the router counts them.
    fn in_flight(&self) -> usize;
    /// DP ranks it serves.
    fn served_ranks(&self) -> usize;
    /// kv_aware: uncached prompt blocks reserved on a rank by requests in flight.
    fn queued_blocks(&self, rank: usize) -> usize;
    /// kv_aware: requests the engine reports on a rank beyond the router's own.
    fn reported_elsewhere(&self, rank: usize) -> usize;
    /// slo_aware: its latency model.
    fn latency(&self) -> &crate::router::predict::EngineLatency;
}

/// A policy's choice: the candidate (an index into the pool's snapshot), the DP rank when
/// the policy chooses it (kv_aware: the rank whose cache holds the prompt; otherwise the
/// worker's least loaded), and the uncached blocks the request reserves there.
pub(crate) struct Pick {
    pub(crate) index: usize,
    pub(crate) rank: Option<usize>,
    pub(crate) blocks: usize,
}

pub(crate) enum Policy {
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
    SloAware {
        slo: crate::router::predict::Slo,
        leg: slo_aware::LegOf,
    },
}

impl Policy {
    /// A policy with no workers yet (the pool adds them).
    pub(crate) fn new(kind: PolicyKind, cache: &CacheAwareConfig, kv_load_weight: f64) -> Self {
        match kind {
            PolicyKind::RoundRobin => Policy::RoundRobin { next: 0 },
            PolicyKind::Random => Policy::Random,
            PolicyKind::PowerOfTwo => Policy::PowerOfTwo,
            PolicyKind::ConsistentHash => Policy::ConsistentHash(HashRing::default()),
            PolicyKind::CacheAware => Policy::CacheAware { cfg: cache.clone(), index: PrefixIndex::new(cache.max_entries) },
            PolicyKind::KvAware => Policy::KvAware { load_weight: kv_load_weight, turn: 0 },
            PolicyKind::SloAware => {
                Policy::SloAware { slo: crate::router::predict::Slo { ttft_ms: 2000.0, itl_ms: 50.0 }, leg: slo_aware::LegOf::Whole }
            }
        }
    }

    /// slo_aware: the SLOs, and the leg the pool's picks are for (other policies: as they are).
    pub(crate) fn for_leg(mut self, slo: Option<crate::router::predict::Slo>, of: slo_aware::LegOf) -> Self {
        if let (Policy::SloAware { slo: s, leg }, Some(wanted)) = (&mut self, slo) {
            (*s, *leg) = (wanted, of);
        }
        self
    }

    pub(crate) fn add_worker(&mut self, url: &str) {
        match self {
            Policy::ConsistentHash(ring) => ring.add(url),
            Policy::CacheAware { index, .. } => index.add(url),
            _ => {}
        }
    }

    pub(crate) fn remove_worker(&mut self, url: &str) {
        match self {
            Policy::ConsistentHash(ring) => ring.remove(url),
            Policy::CacheAware { index, .. } => index.remove(url),
            _ => {}
        }
    }

    pub(crate) fn needs_request_info(&self) -> bool {
        matches!(self, Policy::ConsistentHash(_) | Policy::CacheAware { .. })
    }

    pub(crate) fn is_kv_aware(&self) -> bool {
        matches!(self, Policy::KvAware { .. })
    }

    /// The chosen candidate, and what the policy decided beyond it.
    pub(crate) fn select<W: Candidate>(&mut self, workers: &[Arc<W>], candidates: &[usize], req: &RequestInfo) -> Pick {
        let worker_only = |index| Pick { index, rank: None, blocks: 0 };
        match self {
            Policy::RoundRobin { next } => worker_only(round_robin::select(next, candidates)),
            Policy::Random => worker_only(random::select(candidates)),
            Policy::PowerOfTwo => worker_only(power_of_two::select(workers, candidates)),
            Policy::ConsistentHash(ring) => worker_only(consistent_hash::select(ring, workers, candidates, req)),
            Policy::CacheAware { cfg, index } => worker_only(cache_aware::select(cfg, index, workers, candidates, req)),
            Policy::KvAware { load_weight, turn } => {
                *turn = turn.wrapping_add(1);
                kv_aware::select(workers, candidates, req, *load_weight, *turn)
            }
            Policy::SloAware { slo, leg } => worker_only(slo_aware::select(workers, candidates, req, slo, *leg)),
        }
    }

    /// Entries in cache_aware's prefix index (None for other policies).
    pub(crate) fn index_entries(&self) -> Option<usize> {
        match self {
            Policy::CacheAware { index, .. } => Some(index.entries()),
            _ => None,
        }
    }

    /// One bounded step of upkeep (cache_aware's trim to --max-tree-size); returns
    /// whether more steps are due.
    pub(crate) fn maintain(&mut self) -> bool {
        match self {
            Policy::CacheAware { cfg, index } => index.trim(cfg.max_tree_size),
            _ => false,
        }
    }
}
