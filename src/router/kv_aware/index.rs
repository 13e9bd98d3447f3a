//! Which (worker, DP rank) holds which prefix, from the engines' own KV events
//! (kv_intake.rs; docs/PROTOCOLS.md §6). Blocks are keyed by our own chained hash of their
//! token ids (`block_hashes`), so a router computes a prompt's keys without the engine's
//! hash function; each holder maps the engine's hashes to ours, for removals and for the
//! parent of the next stored run. A holder whose events cannot be trusted (a gap that
//! replay could not fill, a restart) is dropped whole: the index may miss blocks, never
//! claim blocks an engine does not hold.
//!
//! Workers' events are bounded as they are applied (docs/SECURITY.md): each holder indexes
//! at most MAX_BLOCKS_PER_HOLDER blocks, the write lock is taken per bounded run of
//! blocks, a holder's block size is its own (blocks of each size in a map of their own;
//! lookups use the size most holders report, so one worker with another size is left out
//! rather than every other), and a holder's id is reclaimed when it is dropped.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::RwLock;

use crate::api::kv_events::KvEvent;
use crate::api::FNV_OFFSET;
use crate::router::kv_aware::holders::{place, HolderLists, Holders};
use crate::router::kv_aware::table::Table;

/// Most blocks indexed per holder (a few million: more than any engine's KV cache); a
/// publisher that claims more is not believed beyond it.
const MAX_BLOCKS_PER_HOLDER: usize = 1 << 22;
/// Blocks applied under one hold of the write lock: readers wait at most this long.
const BLOCKS_PER_LOCK: usize = 4096;
/// Slots of the next batch fetched ahead (more would push out what is being used).
const PREFETCH_PER_BATCH: usize = 256;

pub use crate::router::kv_aware::keys::block_hashes;
use crate::router::kv_aware::keys::chain;
pub use crate::router::metrics::IntakeTotals;
pub(crate) use crate::router::policy::WorkerRank;

/// The index's maps hash their (already hashed) u64 keys with foldhash, randomly seeded.
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// One (worker, rank) the index holds blocks of.
struct Holder {
    name: WorkerRank,
    /// The engine's block hash -> ours.
    ours: Table<u64>,
    /// Tokens per block in this holder's events (0 before its first BlockStored).
    block_size: usize,
}

/// What /workers shows of a holder.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct HolderStatus {
    pub(crate) rank: usize,
    pub(crate) indexed_blocks: usize,
    /// The last event batch's sequence number, and how long ago it came.
    pub(crate) last_seq: Option<u64>,
    pub(crate) secs_since_event: Option<f64>,
}

#[derive(Default)]
struct Inner {
    /// Our block key -> who holds it, for each block size.
    blocks: FastMap<usize, Table<Holders>>,
    /// The holders of blocks held more than once.
    lists: HolderLists,
    /// Holders by a small id (their place in `holders`); ids of dropped holders are reused.
    ids: FastMap<WorkerRank, u32>,
    holders: Vec<Option<Holder>>,
    free: Vec<u32>,
    /// How many holders report each block size.
    size_counts: FastMap<usize, usize>,
    /// The keys of the event being applied (kept: no allocation per event).
    keys: Vec<u64>,
}

impl Inner {
    fn id(&mut self, holder: &WorkerRank) -> u32 {
        if let Some(id) = self.ids.get(holder) {
            return *id;
        }
        let state = Some(Holder { name: holder.clone(), ours: Table::default(), block_size: 0 });
        let id = place(&mut self.holders, &mut self.free, state);
        self.ids.insert(holder.clone(), id);
        id
    }

    /// Starts fetching the holder's slots that `events` will read (a parent's, each hash
    /// stored or removed; at most PREFETCH_PER_BATCH of them).
    fn prefetch_holder_slots(&self, id: u32, events: &[KvEvent]) {
        let Some(state) = self.holder(id) else { return };
        let hashes = events.iter().flat_map(|e| {
            let (parent, hashes) = match e {
                KvEvent::Stored { hashes, parent, .. } => (*parent, &hashes[..]),
                KvEvent::Removed { hashes } => (None, &hashes[..]),
                KvEvent::AllCleared => (None, &[][..]),
            };
            parent.into_iter().chain(hashes.iter().copied())
        });
        for h in hashes.take(PREFETCH_PER_BATCH) {
            state.ours.prefetch(h);
        }
    }

    fn holder(&self, id: u32) -> Option<&Holder> {
        self.holders.get(id as usize).and_then(Option::as_ref)
    }

    fn holder_mut(&mut self, id: u32) -> Option<&mut Holder> {
        holder_at(&mut self.holders, id)
    }

    fn name(&self, id: u32) -> Option<&WorkerRank> {
        self.holder(id).map(|h| &h.name)
    }

    /// The block size most holders report (ties: the smaller), 0 with none: from the
    /// counts kept as holders learn and leave (a few sizes, whatever the holders).
    fn common_block_size(&self) -> usize {
        self.size_counts.iter().max_by_key(|(size, n)| (**n, std::cmp::Reverse(**size))).map_or(0, |(size, _)| *size)
    }

    /// A holder's block size changes from `old` to `new` (0: none).
    fn count_block_size(&mut self, old: usize, new: usize) {
        if old != 0 {
            if let Some(n) = self.size_counts.get_mut(&old) {
                *n -= 1;
                if *n == 0 {
                    self.size_counts.remove(&old);
                }
            }
        }
        if new != 0 {
            *self.size_counts.entry(new).or_default() += 1;
        }
    }
}

/// What the index has applied since start (the router's /metrics: intake counters).
#[derive(Default)]
struct AppliedTotals {
    batches: std::sync::atomic::AtomicU64,
    /// Blocks stored or removed.
    blocks: std::sync::atomic::AtomicU64,
    /// The time spent applying them: the index's thread's CPU time per group in a router
    /// (`apply_group_cpu_timed`), the monotonic clock per call otherwise (`apply_group`:
    /// a CPU clock read is a system call, ~0.6 µs here, too dear for one batch).
    nanos: std::sync::atomic::AtomicU64,
}

#[derive(Default)]
pub struct KvIndex {
    applied: AppliedTotals,
    /// Tokens per block that lookups use: the size most holders report (0 before any).
    block_size: AtomicUsize,
    inner: RwLock<Inner>,
    /// Subscribed holders: the last batch applied, and when (None before the first).
    seen: std::sync::Mutex<HashMap<WorkerRank, Option<(u64, std::time::Instant)>>>,
}

impl KvIndex {
    pub fn applied_totals(&self) -> IntakeTotals {
        let a = &self.applied;
        IntakeTotals {
            batches: a.batches.load(Ordering::Relaxed),
            blocks: a.blocks.load(Ordering::Relaxed),
            nanos: a.nanos.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn block_size(&self) -> usize {
        self.block_size.load(Ordering::Relaxed)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Learns (or changes) a holder's block size; the lookups' size follows the holders.
    fn learn_block_size(&self, inner: &mut Inner, holder: &WorkerRank, id: u32, block_size: usize) {
        let old = inner.holder(id).map_or(0, |s| s.block_size);
        if old == block_size {
            return;
        }
        if old != 0 {
            tracing::warn!(worker = %holder.url, rank = holder.rank, "KV events now with block size {block_size}, not {old}: its entries are dropped");
            drop_holder_entries(inner, id);
        }
        let Some(state) = inner.holder_mut(id) else { return };
        state.block_size = block_size;
        inner.count_block_size(old, block_size);
        let common = inner.common_block_size();
        self.block_size.store(common, Ordering::Relaxed);
        if block_size != common {
            tracing::warn!(worker = %holder.url, rank = holder.rank, "KV events with block size {block_size}, while most workers use {common}: its blocks are left out of kv_aware");
        }
    }

    /// Applies one holder's events, in order (`apply_group` of one batch).
    pub fn apply(&self, holder: &WorkerRank, events: &[KvEvent]) {
        self.apply_group(&[(holder, events)]);
    }

    /// `apply_group`, timed by the calling thread's CPU clock (the index's thread: a
    /// system call a group, not a batch; preemption and waits are not the index's cost).
    pub(crate) fn apply_group_cpu_timed(&self, group: &[(&WorkerRank, &[KvEvent])]) {
        let started = crate::proc_stat::thread_cpu_nanos();
        let blocks = self.apply_untimed(group);
        self.record(group.len(), blocks, crate::proc_stat::thread_cpu_nanos().saturating_sub(started));
    }

    /// Applies batches of events, each one holder's, in order. The write lock is taken
    /// per BLOCKS_PER_LOCK blocks, so a large group never holds readers up for long; while
    /// one batch is applied the slots of the next holder's hashes are already being
    /// fetched, and within an event every slot it needs is asked for before the first is
    /// used (docs/PERFORMANCE.md: the apply is bound by memory, not by work).
    pub fn apply_group(&self, group: &[(&WorkerRank, &[KvEvent])]) {
        let started = std::time::Instant::now();
        let blocks = self.apply_untimed(group);
        self.record(group.len(), blocks, u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX));
    }

    fn record(&self, batches: usize, blocks: usize, nanos: u64) {
        let totals = &self.applied;
        totals.batches.fetch_add(batches as u64, Ordering::Relaxed);
        totals.blocks.fetch_add(blocks as u64, Ordering::Relaxed);
        totals.nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// `apply_group`'s work; the blocks stored or removed.
    fn apply_untimed(&self, group: &[(&WorkerRank, &[KvEvent])]) -> usize {
        let mut applied = 0usize;
        let mut since_lock = 0usize;
        let mut inner = self.write();
        // Each batch's holder is looked up once (its name is hashed and compared).
        let mut ids: Vec<u32> = group.iter().map(|(holder, _)| inner.id(holder)).collect();
        if let (Some(id), Some((_, events))) = (ids.first(), group.first()) {
            inner.prefetch_holder_slots(*id, events);
        }
        for (at, (holder, events)) in group.iter().enumerate() {
            if let (Some(next), Some((_, events))) = (ids.get(at + 1), group.get(at + 1)) {
                inner.prefetch_holder_slots(*next, events);
            }
            for event in *events {
                if since_lock >= BLOCKS_PER_LOCK {
                    drop(inner);
                    inner = self.write();
                    // A holder may have been dropped meanwhile (its worker left): fresh ids.
                    for (id, (holder, _)) in ids.iter_mut().zip(group).skip(at) {
                        *id = inner.id(holder);
                    }
                    since_lock = 0;
                }
                let blocks = self.apply_event(&mut inner, holder, ids[at], event);
                since_lock += blocks;
                applied += blocks;
            }
        }
        applied
    }

    /// One event of `holder` (id `id`); the blocks it stores or removes.
    fn apply_event(&self, inner: &mut Inner, holder: &WorkerRank, id: u32, event: &KvEvent) -> usize {
        match event {
            KvEvent::Stored { hashes, parent, token_ids, block_size } => {
                let block_size = *block_size;
                if block_size == 0 || hashes.len().checked_mul(block_size) != Some(token_ids.len()) {
                    return 0;
                }
                self.learn_block_size(inner, holder, id, block_size);
                let Inner { blocks, holders, lists, keys, .. } = inner;
                let Some(state) = holder_at(holders, id) else { return 0 };
                if state.ours.len().saturating_add(hashes.len()) > MAX_BLOCKS_PER_HOLDER {
                    tracing::warn!(worker = %holder.url, rank = holder.rank, "KV events claim over {MAX_BLOCKS_PER_HOLDER} blocks: not indexed beyond");
                    return hashes.len();
                }
                // Our chain continues from the parent's key; a parent we never heard of
                // leaves the run unplaceable (the index misses it, safely).
                let mut h = match parent {
                    None => FNV_OFFSET,
                    Some(p) => match state.ours.get(*p) {
                        Some(k) => k,
                        None => return hashes.len(),
                    },
                };
                let blocks = blocks.entry(block_size).or_default();
                keys.clear();
                keys.extend(token_ids.chunks_exact(block_size).map(|block| {
                    h = chain(h, block);
                    h
                }));
                for k in keys.iter() {
                    blocks.prefetch(*k);
                }
                for (engine_hash, k) in hashes.iter().zip(keys.iter().copied()) {
                    // An engine hash stored again under another chain no longer holds the old one.
                    if let Some(old) = state.ours.insert(*engine_hash, k).filter(|old| *old != k) {
                        release(blocks, lists, old, id);
                    }
                    match blocks.get_mut(k) {
                        Some(holders) => lists.insert(holders, id),
                        None => {
                            blocks.insert(k, Holders::one(id));
                        }
                    }
                }
                hashes.len()
            }
            KvEvent::Removed { hashes } => {
                let Inner { blocks, holders, lists, keys, .. } = inner;
                let Some(state) = holder_at(holders, id) else { return hashes.len() };
                let Some(blocks) = blocks.get_mut(&state.block_size) else { return hashes.len() };
                keys.clear();
                keys.extend(hashes.iter().filter_map(|e| state.ours.remove(*e)));
                for k in keys.iter() {
                    blocks.prefetch(*k);
                }
                for k in keys.iter() {
                    release(blocks, lists, *k, id);
                }
                hashes.len()
            }
            KvEvent::AllCleared => {
                drop_holder_entries(inner, id);
                0
            }
        }
    }

    /// Forgets everything `holder` held (its events cannot be trusted, or it left).
    pub fn drop_holder(&self, holder: &WorkerRank) {
        let mut inner = self.write();
        drop_holder(&mut inner, holder);
        self.block_size.store(inner.common_block_size(), Ordering::Relaxed);
    }

    /// Forgets a holder that is no longer subscribed to.
    pub(crate) fn unsubscribed(&self, holder: &WorkerRank) {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).remove(holder);
        self.drop_holder(holder);
    }

    /// Forgets every rank of `url`.
    pub(crate) fn drop_worker(&self, url: &str) {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).retain(|h, _| h.url != url);
        let mut inner = self.write();
        let gone: Vec<WorkerRank> = inner.ids.keys().filter(|h| h.url == url).cloned().collect();
        for h in gone {
            drop_holder(&mut inner, &h);
        }
        self.block_size.store(inner.common_block_size(), Ordering::Relaxed);
    }

    /// For each holder, how many of `keys` (a prompt's block keys of `block_size` tokens, in
    /// order) it holds from the start.
    pub fn prefix_blocks(&self, block_size: usize, keys: &[u64]) -> HashMap<WorkerRank, usize> {
        let inner = self.read();
        let Some(blocks) = inner.blocks.get(&block_size) else { return HashMap::new() };
        let Some(first) = keys.first().and_then(|k| blocks.get(*k)) else { return HashMap::new() };
        let mut alive: Vec<(u32, usize)> = inner.lists.ids(first).into_iter().map(|id| (id, 0)).collect();
        let mut done: Vec<(u32, usize)> = Vec::new();
        for (i, key) in keys.iter().enumerate() {
            let here = blocks.get(*key);
            alive.retain_mut(|(id, n)| {
                if here.is_some_and(|h| inner.lists.contains(h, *id)) {
                    *n = i + 1;
                    true
                } else {
                    done.push((*id, *n));
                    false
                }
            });
            if alive.is_empty() {
                break;
            }
        }
        done.into_iter().chain(alive).filter(|(_, n)| *n > 0).filter_map(|(id, n)| inner.name(id).map(|h| (h.clone(), n))).collect()
    }

    /// Records the sequence numbers of the batches just applied, in order.
    pub(crate) fn note_seqs(&self, applied: &[(&WorkerRank, u64)]) {
        let now = std::time::Instant::now();
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        for (holder, seq) in applied {
            let last = Some((*seq, now));
            // Every batch comes here: the holder's name is copied only the first time.
            match seen.get_mut(*holder) {
                Some(entry) => *entry = last,
                None => {
                    seen.insert((*holder).clone(), last);
                }
            }
        }
    }

    /// Records a holder whose events are subscribed to (before any arrive).
    pub(crate) fn note_subscribed(&self, holder: &WorkerRank) {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).entry(holder.clone()).or_insert(None);
    }

    /// Each rank of every worker that has published or is indexed, by worker URL: one
    /// pass over the index, whatever the number of workers.
    pub(crate) fn status_by_worker(&self) -> HashMap<String, Vec<HolderStatus>> {
        let sizes = self.sizes();
        let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let mut by: HashMap<String, Vec<HolderStatus>> = HashMap::new();
        for h in sizes.keys().chain(seen.keys()) {
            let ranks = by.entry(h.url.clone()).or_default();
            if ranks.iter().any(|r| r.rank == h.rank) {
                continue;
            }
            let last = seen.get(h).copied().flatten();
            ranks.push(HolderStatus {
                rank: h.rank,
                indexed_blocks: sizes.get(h).copied().unwrap_or(0),
                last_seq: last.map(|l| l.0),
                secs_since_event: last.map(|l| l.1.elapsed().as_secs_f64()),
            });
        }
        for ranks in by.values_mut() {
            ranks.sort_unstable_by_key(|r| r.rank);
        }
        by
    }

    /// Blocks indexed per holder.
    pub fn sizes(&self) -> HashMap<WorkerRank, usize> {
        let inner = self.read();
        inner.holders.iter().flatten().filter(|s| !s.ours.is_empty()).map(|s| (s.name.clone(), s.ours.len())).collect()
    }
}

/// The holder of `id`, when it is one (for callers holding other parts of `Inner` too).
fn holder_at(holders: &mut [Option<Holder>], id: u32) -> Option<&mut Holder> {
    holders.get_mut(id as usize).and_then(Option::as_mut)
}

/// Takes `id` out of the holders of block `key`, and the block out when none is left.
fn release(blocks: &mut Table<Holders>, lists: &mut HolderLists, key: u64, id: u32) {
    if blocks.get_mut(key).is_some_and(|holders| lists.remove(holders, id)) {
        blocks.remove(key);
    }
}

/// Forgets a holder: its entries, its state, and its id (free for the next holder).
fn drop_holder(inner: &mut Inner, holder: &WorkerRank) {
    let Some(id) = inner.ids.remove(holder) else { return };
    drop_holder_entries(inner, id);
    if let Some(state) = inner.holders[id as usize].take() {
        inner.count_block_size(state.block_size, 0);
    }
    inner.free.push(id);
}

/// Forgets the blocks a holder holds (it keeps its id and block size).
fn drop_holder_entries(inner: &mut Inner, id: u32) {
    let Some(state) = holder_at(&mut inner.holders, id) else { return };
    let ours = std::mem::take(&mut state.ours);
    let Some(blocks) = inner.blocks.get_mut(&state.block_size) else { return };
    for k in ours.values() {
        release(blocks, &mut inner.lists, k, id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(hashes: &[u64], parent: Option<u64>, tokens: &[u32]) -> KvEvent {
        KvEvent::Stored { hashes: hashes.to_vec(), parent, token_ids: tokens.to_vec(), block_size: 2 }
    }

    #[test]
    fn prefixes_follow_stored_removed_and_cleared_events() {
        let idx = KvIndex::default();
        let (a, b) = (WorkerRank { url: "a".into(), rank: 0 }, WorkerRank { url: "b".into(), rank: 1 });
        let prompt = [1, 2, 3, 4, 5, 6, 7];
        let keys = block_hashes(&prompt, 2);
        assert_eq!(keys.len(), 3, "full blocks only");
        // a holds the first two blocks, in two runs (the second chained to the first).
        idx.apply(&a, &[stored(&[100], None, &[1, 2]), stored(&[101], Some(100), &[3, 4])]);
        // b holds all three in one run.
        idx.apply(&b, &[stored(&[7, 8, 9], None, &[1, 2, 3, 4, 5, 6])]);
        let got = idx.prefix_blocks(2, &keys);
        assert_eq!((got[&a], got[&b]), (2, 3));
        // A different first block matches nothing.
        assert!(idx.prefix_blocks(2, &block_hashes(&[9, 9, 3, 4], 2)).is_empty());
        // a's first block goes: nothing of a is a prefix any more.
        idx.apply(&a, &[KvEvent::Removed { hashes: vec![100] }]);
        assert_eq!(idx.prefix_blocks(2, &keys).get(&a), None);
        // A run whose parent a never reported cannot be placed.
        idx.apply(&a, &[stored(&[200], Some(999), &[5, 6])]);
        assert_eq!(idx.sizes()[&a], 1);
        idx.apply(&b, &[KvEvent::AllCleared]);
        assert!(idx.prefix_blocks(2, &keys).is_empty());
        idx.drop_worker("a");
        assert!(idx.sizes().is_empty());
        assert_eq!(idx.block_size(), 2);
    }

    #[test]
    fn one_worker_with_another_block_size_is_left_out_not_every_worker() {
        let idx = KvIndex::default();
        let rogue = WorkerRank { url: "rogue".into(), rank: 0 };
        // The rogue speaks first, with blocks of 4 tokens.
        idx.apply(&rogue, &[KvEvent::Stored { hashes: vec![1], parent: None, token_ids: vec![1, 2, 3, 4], block_size: 4 }]);
        assert_eq!(idx.block_size(), 4);
        let (a, b) = (WorkerRank { url: "a".into(), rank: 0 }, WorkerRank { url: "b".into(), rank: 0 });
        idx.apply(&a, &[stored(&[10, 11], None, &[1, 2, 3, 4])]);
        idx.apply(&b, &[stored(&[20], None, &[1, 2])]);
        assert_eq!(idx.block_size(), 2, "most workers use 2");
        let got = idx.prefix_blocks(2, &block_hashes(&[1, 2, 3, 4], 2));
        assert_eq!((got.get(&a), got.get(&b), got.get(&rogue)), (Some(&2), Some(&1), None));
        // Its blocks stay, under their own size: the rogue leaving changes nothing for the others.
        idx.drop_worker("rogue");
        assert_eq!(idx.block_size(), 2);
        // Overflowing products are not blocks.
        idx.apply(&a, &[KvEvent::Stored { hashes: vec![1; 4], parent: None, token_ids: vec![], block_size: usize::MAX / 2 }]);
        assert_eq!(idx.sizes()[&a], 2);
    }

    #[test]
    fn a_hash_stored_again_under_another_chain_no_longer_claims_the_old_block() {
        let idx = KvIndex::default();
        let a = WorkerRank { url: "a".into(), rank: 0 };
        idx.apply(&a, &[stored(&[100], None, &[1, 2])]);
        idx.apply(&a, &[stored(&[100], None, &[3, 4])]);
        assert!(idx.prefix_blocks(2, &block_hashes(&[1, 2], 2)).is_empty(), "the first chain's block is not a's any more");
        assert_eq!(idx.prefix_blocks(2, &block_hashes(&[3, 4], 2))[&a], 1);
        assert_eq!(idx.sizes()[&a], 1);
        // Its removal leaves nothing behind either.
        idx.apply(&a, &[KvEvent::Removed { hashes: vec![100] }]);
        assert!(idx.read().blocks.values().all(Table::is_empty));
    }

    #[test]
    fn a_group_of_batches_applies_as_its_batches_one_by_one() {
        let (grouped, single) = (KvIndex::default(), KvIndex::default());
        let names: Vec<WorkerRank> = (0..3).map(|r| WorkerRank { url: "w".into(), rank: r }).collect();
        let batches: Vec<(usize, Vec<KvEvent>)> = vec![
            (0, vec![stored(&[1, 2], None, &[1, 2, 3, 4])]),
            (1, vec![stored(&[5], None, &[1, 2])]),
            (0, vec![stored(&[3], Some(2), &[5, 6]), KvEvent::Removed { hashes: vec![1] }]),
            (2, vec![stored(&[9, 8], None, &[1, 2, 3, 4])]),
            (1, vec![KvEvent::AllCleared, stored(&[6], None, &[7, 7])]),
            (2, vec![KvEvent::Removed { hashes: vec![8] }]),
        ];
        let group: Vec<(&WorkerRank, &[KvEvent])> = batches.iter().map(|(h, e)| (&names[*h], &e[..])).collect();
        grouped.apply_group(&group);
        for (h, e) in &group {
            single.apply(h, e);
        }
        for prompt in [&[1, 2, 3, 4, 5, 6][..], &[7, 7], &[1, 2]] {
            let keys = block_hashes(prompt, 2);
            assert_eq!(grouped.prefix_blocks(2, &keys), single.prefix_blocks(2, &keys));
        }
        assert_eq!(grouped.sizes(), single.sizes());
        assert_eq!(grouped.applied_totals().batches, 6);
        assert_eq!(grouped.applied_totals().blocks, single.applied_totals().blocks);
    }

    #[test]
    fn dropped_holders_give_their_ids_back() {
        let idx = KvIndex::default();
        for round in 0..1000 {
            let h = WorkerRank { url: format!("w{round}"), rank: 0 };
            idx.apply(&h, &[stored(&[1], None, &[1, 2])]);
            idx.drop_worker(&h.url);
        }
        assert!(idx.read().holders.len() <= 1, "ids reused under churn: {}", idx.read().holders.len());
        assert!(idx.sizes().is_empty() && idx.read().blocks.values().all(Table::is_empty));
    }
}
