//! Which (worker, DP rank) holds which prefix, from the engines' own KV events
//! (kv_intake.rs; docs/PROTOCOLS.md §6). Blocks are keyed by our own chained hash of their
//! token ids (`block_hashes`), so a router computes a prompt's keys without the engine's
//! hash function; each holder maps the engine's hashes to ours, for removals and for the
//! parent of the next stored run. A holder whose events cannot be trusted (a gap that
//! replay could not fill, a restart) is dropped whole: the index may miss blocks, never
//! claim blocks an engine does not hold.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::RwLock;

use crate::api::kv_events::KvEvent;
use crate::api::{fnv1a, FNV_OFFSET};

/// Most blocks indexed per holder (a few million: more than any engine's KV cache); a
/// publisher that claims more is not believed beyond it.
const MAX_BLOCKS_PER_HOLDER: usize = 1 << 22;

/// A KV cache that events come from: a worker's DP rank.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Holder {
    pub url: String,
    pub rank: usize,
}

/// The chained hashes of the full blocks of `tokens`: block i's key covers blocks 0..=i.
pub fn block_hashes(tokens: &[u32], block_size: usize) -> Vec<u64> {
    if block_size == 0 {
        return Vec::new();
    }
    let mut h = FNV_OFFSET;
    tokens
        .chunks_exact(block_size)
        .map(|block| {
            h = chain(h, block);
            h
        })
        .collect()
}

/// The key of `block` following the block keyed `parent` (FNV_OFFSET at a prompt's start).
fn chain(parent: u64, block: &[u32]) -> u64 {
    block.iter().fold(parent, |h, t| fnv1a(h, &t.to_le_bytes()))
}

#[derive(Default)]
struct HolderState {
    /// The engine's block hash -> ours.
    ours: HashMap<u64, u64>,
}

/// Who holds one block: nearly always one rank, so that case takes no allocation (the
/// index stays near 50 bytes per block).
enum Holders {
    One(u32),
    Many(Box<Vec<u32>>),
}

impl Holders {
    fn contains(&self, id: u32) -> bool {
        match self {
            Holders::One(h) => *h == id,
            Holders::Many(v) => v.contains(&id),
        }
    }

    fn insert(&mut self, id: u32) {
        match self {
            Holders::One(h) if *h == id => {}
            Holders::One(h) => *self = Holders::Many(Box::new(vec![*h, id])),
            Holders::Many(v) if !v.contains(&id) => v.push(id),
            Holders::Many(_) => {}
        }
    }

    /// Removes `id`; true when no holder is left.
    fn remove(&mut self, id: u32) -> bool {
        match self {
            Holders::One(h) => *h == id,
            Holders::Many(v) => {
                v.retain(|h| *h != id);
                let (empty, single) = (v.is_empty(), (v.len() == 1).then(|| v[0]));
                if let Some(last) = single {
                    *self = Holders::One(last);
                }
                empty
            }
        }
    }

    fn ids(&self) -> Vec<u32> {
        match self {
            Holders::One(h) => vec![*h],
            Holders::Many(v) => v.to_vec(),
        }
    }
}

/// What /workers shows of a holder.
#[derive(Debug, Clone, serde::Serialize)]
pub struct HolderStatus {
    pub rank: usize,
    pub indexed_blocks: usize,
    /// The last event batch's sequence number, and how long ago it came.
    pub last_seq: Option<u64>,
    pub secs_since_event: Option<f64>,
}

#[derive(Default)]
struct Inner {
    /// Our block key -> who holds it.
    blocks: HashMap<u64, Holders>,
    /// Holders by a small id.
    ids: HashMap<Holder, u32>,
    names: Vec<Holder>,
    states: HashMap<u32, HolderState>,
}

impl Inner {
    fn id(&mut self, holder: &Holder) -> u32 {
        if let Some(id) = self.ids.get(holder) {
            return *id;
        }
        let id = self.names.len() as u32;
        self.names.push(holder.clone());
        self.ids.insert(holder.clone(), id);
        id
    }
}

#[derive(Default)]
pub struct KvIndex {
    /// Tokens per block, from the events (0 until the first BlockStored).
    block_size: AtomicUsize,
    inner: RwLock<Inner>,
    /// Subscribed holders: the last batch applied, and when (None before the first).
    seen: std::sync::Mutex<HashMap<Holder, Option<(u64, std::time::Instant)>>>,
}

impl KvIndex {
    pub fn block_size(&self) -> usize {
        self.block_size.load(Ordering::Relaxed)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies one holder's events, in order.
    pub fn apply(&self, holder: &Holder, events: &[KvEvent]) {
        let mut inner = self.write();
        let id = inner.id(holder);
        for event in events {
            match event {
                KvEvent::Stored { hashes, parent, token_ids, block_size } => {
                    if *block_size == 0 || token_ids.len() != hashes.len() * block_size {
                        continue;
                    }
                    let known = self.block_size.compare_exchange(0, *block_size, Ordering::Relaxed, Ordering::Relaxed);
                    if known.is_err_and(|b| b != *block_size) {
                        tracing::warn!(worker = %holder.url, rank = holder.rank, "KV events with block size {block_size}, not {}: ignored", self.block_size());
                        continue;
                    }
                    let Inner { blocks, states, .. } = &mut *inner;
                    let state = states.entry(id).or_default();
                    if state.ours.len() + hashes.len() > MAX_BLOCKS_PER_HOLDER {
                        tracing::warn!(worker = %holder.url, rank = holder.rank, "KV events claim over {MAX_BLOCKS_PER_HOLDER} blocks: not indexed beyond");
                        continue;
                    }
                    // Our chain continues from the parent's key; a parent we never heard of
                    // leaves the run unplaceable (the index misses it, safely).
                    let mut h = match parent {
                        None => FNV_OFFSET,
                        Some(p) => match state.ours.get(p) {
                            Some(k) => *k,
                            None => continue,
                        },
                    };
                    for (engine_hash, block) in hashes.iter().zip(token_ids.chunks_exact(*block_size)) {
                        h = chain(h, block);
                        state.ours.insert(*engine_hash, h);
                        match blocks.get_mut(&h) {
                            Some(holders) => holders.insert(id),
                            None => {
                                blocks.insert(h, Holders::One(id));
                            }
                        }
                    }
                }
                KvEvent::Removed { hashes } => {
                    let Inner { blocks, states, .. } = &mut *inner;
                    let Some(state) = states.get_mut(&id) else { continue };
                    for k in hashes.iter().filter_map(|e| state.ours.remove(e)) {
                        if blocks.get_mut(&k).is_some_and(|holders| holders.remove(id)) {
                            blocks.remove(&k);
                        }
                    }
                }
                KvEvent::AllCleared => drop_holder(&mut inner, holder),
            }
        }
    }

    /// Forgets everything `holder` held (its events cannot be trusted, or it left).
    pub fn drop_holder(&self, holder: &Holder) {
        drop_holder(&mut self.write(), holder);
    }

    /// Forgets a holder that is no longer subscribed to.
    pub fn unsubscribed(&self, holder: &Holder) {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).remove(holder);
        self.drop_holder(holder);
    }

    /// Forgets every rank of `url`.
    pub fn drop_worker(&self, url: &str) {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).retain(|h, _| h.url != url);
        let mut inner = self.write();
        let gone: Vec<Holder> = inner.ids.keys().filter(|h| h.url == url).cloned().collect();
        for h in gone {
            drop_holder(&mut inner, &h);
        }
    }

    /// For each holder, how many of `keys` (a prompt's block keys, in order) it holds from
    /// the start.
    pub fn prefix_blocks(&self, keys: &[u64]) -> HashMap<Holder, usize> {
        let inner = self.read();
        let Some(first) = keys.first().and_then(|k| inner.blocks.get(k)) else { return HashMap::new() };
        let mut alive: Vec<(u32, usize)> = first.ids().into_iter().map(|id| (id, 0)).collect();
        let mut done: Vec<(u32, usize)> = Vec::new();
        for (i, key) in keys.iter().enumerate() {
            let here = inner.blocks.get(key);
            alive.retain_mut(|(id, n)| {
                if here.is_some_and(|h| h.contains(*id)) {
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
        done.into_iter().chain(alive).filter(|(_, n)| *n > 0).map(|(id, n)| (inner.names[id as usize].clone(), n)).collect()
    }

    /// Records the sequence number of the batch just applied.
    pub fn note_seq(&self, holder: &Holder, seq: u64) {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).insert(holder.clone(), Some((seq, std::time::Instant::now())));
    }

    /// Records a holder whose events are subscribed to (before any arrive).
    pub fn note_subscribed(&self, holder: &Holder) {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).entry(holder.clone()).or_insert(None);
    }

    /// Each rank of `url` that has published or is indexed.
    pub fn status(&self, url: &str) -> Vec<HolderStatus> {
        let sizes = self.sizes();
        let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let mut ranks: Vec<usize> = sizes.keys().chain(seen.keys()).filter(|h| h.url == url).map(|h| h.rank).collect();
        ranks.sort_unstable();
        ranks.dedup();
        ranks
            .into_iter()
            .map(|rank| {
                let h = Holder { url: url.to_string(), rank };
                let last = seen.get(&h).copied().flatten();
                HolderStatus {
                    rank,
                    indexed_blocks: sizes.get(&h).copied().unwrap_or(0),
                    last_seq: last.map(|l| l.0),
                    secs_since_event: last.map(|l| l.1.elapsed().as_secs_f64()),
                }
            })
            .collect()
    }

    /// Blocks indexed per holder.
    pub fn sizes(&self) -> HashMap<Holder, usize> {
        let inner = self.read();
        inner.states.iter().map(|(id, s)| (inner.names[*id as usize].clone(), s.ours.len())).collect()
    }
}

fn drop_holder(inner: &mut Inner, holder: &Holder) {
    let Some(id) = inner.ids.get(holder).copied() else { return };
    let Some(state) = inner.states.remove(&id) else { return };
    for k in state.ours.values() {
        if inner.blocks.get_mut(k).is_some_and(|holders| holders.remove(id)) {
            inner.blocks.remove(k);
        }
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
        let (a, b) = (Holder { url: "a".into(), rank: 0 }, Holder { url: "b".into(), rank: 1 });
        let prompt = [1, 2, 3, 4, 5, 6, 7];
        let keys = block_hashes(&prompt, 2);
        assert_eq!(keys.len(), 3, "full blocks only");
        // a holds the first two blocks, in two runs (the second chained to the first).
        idx.apply(&a, &[stored(&[100], None, &[1, 2]), stored(&[101], Some(100), &[3, 4])]);
        // b holds all three in one run.
        idx.apply(&b, &[stored(&[7, 8, 9], None, &[1, 2, 3, 4, 5, 6])]);
        let got = idx.prefix_blocks(&keys);
        assert_eq!((got[&a], got[&b]), (2, 3));
        // A different first block matches nothing.
        assert!(idx.prefix_blocks(&block_hashes(&[9, 9, 3, 4], 2)).is_empty());
        // a's first block goes: nothing of a is a prefix any more.
        idx.apply(&a, &[KvEvent::Removed { hashes: vec![100] }]);
        assert_eq!(idx.prefix_blocks(&keys).get(&a), None);
        // A run whose parent a never reported cannot be placed.
        idx.apply(&a, &[stored(&[200], Some(999), &[5, 6])]);
        assert_eq!(idx.sizes()[&a], 1);
        idx.apply(&b, &[KvEvent::AllCleared]);
        assert!(idx.prefix_blocks(&keys).is_empty());
        idx.drop_worker("a");
        assert!(idx.sizes().is_empty());
        assert_eq!(idx.block_size(), 2);
    }
}
