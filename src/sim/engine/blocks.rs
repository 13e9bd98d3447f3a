//! The simulated KV cache of one DP engine, as vLLM's: a finite pool of fixed-size blocks
//! with reference counts, and a prefix cache. A full block is cached under a hash chained
//! over every token up to its end (so equal hashes mean equal prefixes); a request whose
//! prompt starts with cached blocks shares them instead of computing them. Blocks nobody
//! uses wait in a free queue, least recently freed first; taking one for new data evicts
//! its cached hash. Every change to the cache is recorded as a KV event (BlockStored,
//! BlockRemoved, AllBlocksCleared) for the engine to publish.
//!
//! Each block also keeps a fingerprint of the tokens last written into it, so a decode
//! that pulls blocks can check they hold its prompt, and a read of blocks that were freed
//! but not yet reused still succeeds, as a NIXL read of stale memory does on vLLM.

use std::collections::HashMap;

use super::tokens::mix;

pub(crate) type BlockId = u32;

pub(crate) use crate::api::kv_events::KvEvent;

/// The fingerprint of every block of `tokens` (the last one may be partial), each chained
/// over all tokens up to its end; a full block's fingerprint is its prefix-cache hash.
pub(crate) fn fingerprints(tokens: &[u32], block_size: usize) -> Vec<u64> {
    let mut out = Vec::with_capacity(blocks_for(tokens.len(), block_size));
    let mut h = 0x6b76_u64;
    for chunk in tokens.chunks(block_size) {
        for t in chunk {
            h = mix(h ^ u64::from(*t));
        }
        // Never 0, which marks a block never written.
        out.push(h | 1);
    }
    out
}

/// Number of blocks that hold `tokens` tokens.
pub(crate) fn blocks_for(tokens: usize, block_size: usize) -> usize {
    tokens.div_ceil(block_size)
}

/// Blocks with no user, in the order they were freed (a doubly linked list over ids).
struct FreeQueue {
    prev: Vec<BlockId>,
    next: Vec<BlockId>,
    queued: Vec<bool>,
    len: usize,
}

/// Id 0 is the list's sentinel (and vLLM's null block: never handed out).
const SENTINEL: BlockId = 0;

impl FreeQueue {
    fn new(total: usize) -> Self {
        let mut q = FreeQueue { prev: vec![0; total + 1], next: vec![0; total + 1], queued: vec![false; total + 1], len: 0 };
        for b in 1..=total as BlockId {
            q.push_back(b);
        }
        q
    }

    fn push_back(&mut self, b: BlockId) {
        let last = self.prev[SENTINEL as usize];
        self.next[last as usize] = b;
        self.prev[b as usize] = last;
        self.next[b as usize] = SENTINEL;
        self.prev[SENTINEL as usize] = b;
        self.queued[b as usize] = true;
        self.len += 1;
    }

    fn remove(&mut self, b: BlockId) {
        let (p, n) = (self.prev[b as usize], self.next[b as usize]);
        self.next[p as usize] = n;
        self.prev[n as usize] = p;
        self.queued[b as usize] = false;
        self.len -= 1;
    }

    fn pop_front(&mut self) -> Option<BlockId> {
        let b = self.next[SENTINEL as usize];
        (b != SENTINEL).then(|| {
            self.remove(b);
            b
        })
    }
}

pub(crate) struct KvCache {
    block_size: usize,
    /// Prefix caching on (vLLM's --enable-prefix-caching, on by default).
    caching: bool,
    refs: Vec<u32>,
    /// content[id] = fingerprint written into block `id`; 0 = never written.
    content: Vec<u64>,
    /// The hash a block is cached under.
    hash: Vec<Option<u64>>,
    cached: HashMap<u64, BlockId>,
    free: FreeQueue,
    events: Vec<KvEvent>,
}

impl KvCache {
    pub(crate) fn new(total: usize, block_size: usize, caching: bool) -> Self {
        KvCache {
            block_size,
            caching,
            refs: vec![0; total + 1],
            content: vec![0; total + 1],
            hash: vec![None; total + 1],
            cached: HashMap::new(),
            free: FreeQueue::new(total),
            events: Vec::new(),
        }
    }

    pub(crate) fn block_size(&self) -> usize {
        self.block_size
    }

    pub(crate) fn total(&self) -> usize {
        self.refs.len() - 1
    }

    /// Blocks some request or held KV uses (what vLLM's KV-cache usage counts).
    pub(crate) fn used(&self) -> usize {
        self.total() - self.free.len
    }

    /// How many leading blocks of a prompt with these full-block hashes are cached, at
    /// most `max_blocks` (vLLM always computes at least the prompt's last token).
    pub(crate) fn hits(&self, hashes: &[u64], max_blocks: usize) -> usize {
        if !self.caching {
            return 0;
        }
        hashes.iter().take(max_blocks).take_while(|h| self.cached.contains_key(h)).count()
    }

    /// Takes the cached blocks of the first `hits` hashes (shared) and `fresh` new blocks;
    /// `None` when that many blocks cannot be had.
    pub(crate) fn allocate(&mut self, hashes: &[u64], hits: usize, fresh: usize) -> Option<Vec<BlockId>> {
        let shared: Vec<BlockId> = hashes[..hits].iter().map(|h| self.cached[h]).collect();
        let revived = shared.iter().filter(|b| self.free.queued[**b as usize]).count();
        if self.free.len - revived < fresh {
            return None;
        }
        for b in &shared {
            if self.refs[*b as usize] == 0 {
                self.free.remove(*b);
            }
            self.refs[*b as usize] += 1;
        }
        let mut out = shared;
        let mut evicted = Vec::new();
        for _ in 0..fresh {
            let b = self.free.pop_front().expect("counted above");
            if let Some(h) = self.hash[b as usize].take() {
                self.cached.remove(&h);
                evicted.push(h);
            }
            self.refs[b as usize] = 1;
            out.push(b);
        }
        if !evicted.is_empty() {
            self.events.push(KvEvent::Removed { hashes: evicted });
        }
        Some(out)
    }

    /// Records the tokens of `blocks` (a request's blocks, in order): every block's
    /// fingerprint, and the full blocks from `from_block` on are cached (BlockStored).
    pub(crate) fn commit(&mut self, blocks: &[BlockId], tokens: &[u32], from_block: usize) {
        let fps = fingerprints(tokens, self.block_size);
        let full = tokens.len() / self.block_size;
        let mut stored = Vec::new();
        let mut first = None;
        for (i, (b, fp)) in blocks.iter().zip(&fps).enumerate().skip(from_block) {
            self.content[*b as usize] = *fp;
            if i >= full || !self.caching || self.hash[*b as usize].is_some() || self.cached.contains_key(fp) {
                continue;
            }
            self.cached.insert(*fp, *b);
            self.hash[*b as usize] = Some(*fp);
            first.get_or_insert(i);
            stored.push(*fp);
        }
        if let Some(first) = first {
            let bs = self.block_size;
            let token_ids = tokens[first * bs..(first + stored.len()) * bs].to_vec();
            let parent = first.checked_sub(1).map(|p| fps[p]);
            self.events.push(KvEvent::Stored { hashes: stored, parent, token_ids, block_size: bs });
        }
    }

    /// Writes content pulled from another engine into `blocks`.
    pub(crate) fn write(&mut self, blocks: &[BlockId], contents: &[u64]) {
        for (b, c) in blocks.iter().zip(contents) {
            self.content[*b as usize] = *c;
        }
    }

    /// Drops one use of each block; a block nobody uses goes to the free queue. Blocks
    /// are freed last first, so a prompt's tail is evicted before its head (as vLLM does).
    pub(crate) fn release(&mut self, blocks: &[BlockId]) {
        for b in blocks.iter().rev() {
            let r = &mut self.refs[*b as usize];
            debug_assert!(*r > 0, "block {b} released more often than taken");
            *r = r.saturating_sub(1);
            if *r == 0 && !self.free.queued[*b as usize] {
                self.free.push_back(*b);
            }
        }
    }

    /// The contents of the given blocks; `None` if an id is not a block of this pool.
    pub(crate) fn read(&self, blocks: &[BlockId]) -> Option<Vec<u64>> {
        blocks.iter().map(|b| (*b as usize >= 1).then(|| self.content.get(*b as usize).copied()).flatten()).collect()
    }

    /// Forgets every cached hash (vLLM's reset_prefix_cache): AllBlocksCleared.
    pub(crate) fn clear(&mut self) {
        self.cached.clear();
        for h in &mut self.hash {
            *h = None;
        }
        self.events.push(KvEvent::AllCleared);
    }

    /// The events since the last call.
    pub(crate) fn take_events(&mut self) -> Vec<KvEvent> {
        std::mem::take(&mut self.events)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_taken_and_returned() {
        let mut c = KvCache::new(4, 2, true);
        let a = c.allocate(&[], 0, 3).unwrap();
        assert_eq!(a, vec![1, 2, 3]);
        assert!(c.allocate(&[], 0, 2).is_none());
        assert_eq!(c.used(), 3);
        c.release(&a);
        assert_eq!(c.used(), 0);
        // Freed blocks go to the back: the never-used block 4 comes first.
        assert_eq!(c.allocate(&[], 0, 1).unwrap(), vec![4]);
    }

    #[test]
    fn a_repeated_prefix_is_shared_and_announced_once() {
        let mut c = KvCache::new(16, 2, true);
        let prompt = [5, 6, 7, 8, 9];
        let hashes = &fingerprints(&prompt, 2)[..2];
        assert_eq!(c.hits(hashes, 2), 0);
        let a = c.allocate(hashes, 0, 3).unwrap();
        c.commit(&a, &prompt, 0);
        assert_eq!(
            c.take_events(),
            vec![KvEvent::Stored { hashes: hashes.to_vec(), parent: None, token_ids: vec![5, 6, 7, 8], block_size: 2 }]
        );
        c.release(&a);
        // A second request with the same start shares both full blocks.
        assert_eq!(c.hits(hashes, 2), 2);
        let b = c.allocate(hashes, 2, 1).unwrap();
        assert_eq!(&b[..2], &a[..2]);
        c.commit(&b, &[5, 6, 7, 8, 1], 2);
        assert!(c.take_events().is_empty(), "nothing new cached");
        assert_eq!(c.read(&b[..2]).unwrap(), c.read(&a[..2]).unwrap());
    }

    #[test]
    fn taking_a_cached_free_block_evicts_its_hash() {
        let mut c = KvCache::new(2, 2, true);
        let a = c.allocate(&[], 0, 2).unwrap();
        c.commit(&a, &[1, 2, 3, 4], 0);
        let stored = c.take_events();
        c.release(&a);
        let b = c.allocate(&[], 0, 1).unwrap();
        // The prompt's tail was freed first, so it goes first.
        assert_eq!(b, vec![a[1]]);
        let KvEvent::Stored { hashes, .. } = &stored[0] else { panic!() };
        assert_eq!(c.take_events(), vec![KvEvent::Removed { hashes: vec![hashes[1]] }]);
        assert_eq!(c.hits(hashes, 2), 1);
    }

    #[test]
    fn parents_chain_and_caching_can_be_off() {
        let mut c = KvCache::new(8, 2, true);
        let a = c.allocate(&[], 0, 3).unwrap();
        c.commit(&a, &[1, 2], 0);
        c.commit(&a, &[1, 2, 3, 4, 5, 6], 1);
        let ev = c.take_events();
        let fps = fingerprints(&[1, 2, 3, 4, 5, 6], 2);
        assert_eq!(ev[1], KvEvent::Stored { hashes: fps[1..3].to_vec(), parent: Some(fps[0]), token_ids: vec![3, 4, 5, 6], block_size: 2 });
        let mut off = KvCache::new(8, 2, false);
        let a = off.allocate(&[], 0, 2).unwrap();
        off.commit(&a, &[1, 2, 3, 4], 0);
        assert!(off.take_events().is_empty());
        assert_eq!(off.hits(&fps[..2], 2), 0);
    }

    #[test]
    fn freed_content_stays_readable_until_reused() {
        let mut c = KvCache::new(2, 16, true);
        let a = c.allocate(&[], 0, 1).unwrap();
        c.commit(&a, &[5, 6, 7], 0);
        let written = c.read(&a).unwrap();
        c.release(&a);
        assert_eq!(c.read(&a).unwrap(), written);
        assert!(c.read(&[0]).is_none());
        assert!(c.read(&[3]).is_none());
    }
}
