//! The approximate prefix index behind cache_aware. A prompt's start (at most
//! --cache-aware-max-prefix units) is cut into fixed chunks, each keyed by a hash chained
//! over every chunk before it, so a run of present keys is a path from the root of a
//! prefix tree. The hashes are computed outside any lock (`chunk_hashes`, when the
//! request's info is built); the index only looks them up.
//!
//! Memory is bounded by construction: each worker's keys live in an LRU whose capacity is
//! its share of --cache-aware-max-memory-mb, so an insert evicts at most what it adds.
//! --max-tree-size (vllm-router's per-worker limit) is applied every --eviction-interval,
//! a bounded number of entries per lock hold.

use std::num::NonZeroUsize;

use lru::LruCache;

/// Units (characters or tokens) per chunk.
pub const CHUNK_UNITS: usize = 16;

/// Most entries evicted per lock hold by `trim`.
const TRIM_STEP: usize = 16_384;

/// The chained hashes of a prompt's chunks, and the units in each.
pub fn chunk_hashes(prompt: &[u8], unit: usize) -> Vec<(u64, u32)> {
    let step = CHUNK_UNITS * unit.max(1);
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    prompt
        .chunks(step)
        .map(|c| {
            for b in c {
                h ^= u64::from(*b);
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
            h = h.rotate_left(17) ^ (c.len() as u64);
            (h, (c.len() / unit.max(1)) as u32)
        })
        .collect()
}

pub struct PrefixIndex {
    /// Per worker: chained chunk hash -> units in that chunk.
    trees: Vec<LruCache<u64, u32>>,
    /// Units held per worker.
    sizes: Vec<usize>,
}

impl PrefixIndex {
    /// Bytes one entry costs (hash map slot, LRU node, allocator overhead), measured.
    pub const BYTES_PER_ENTRY: usize = 96;

    /// An index over `workers` workers holding at most `max_entries` entries in all.
    pub fn new(workers: usize, max_entries: usize) -> Self {
        let share = NonZeroUsize::new((max_entries / workers.max(1)).max(1)).expect("at least one");
        PrefixIndex { trees: (0..workers).map(|_| LruCache::new(share)).collect(), sizes: vec![0; workers] }
    }

    pub fn size(&self, worker: usize) -> usize {
        self.sizes[worker]
    }

    pub fn entries(&self) -> usize {
        self.trees.iter().map(LruCache::len).sum()
    }

    /// For every worker, how many leading units of the prompt its tree holds.
    pub fn matched_units(&self, chunks: &[(u64, u32)]) -> Vec<usize> {
        self.trees
            .iter()
            .map(|tree| chunks.iter().take_while(|(h, _)| tree.contains(h)).map(|(_, u)| *u as usize).sum())
            .collect()
    }

    pub fn insert(&mut self, chunks: &[(u64, u32)], worker: usize) {
        let tree = &mut self.trees[worker];
        for (h, units) in chunks {
            if tree.get(h).is_some() {
                continue;
            }
            if let Some((_, old)) = tree.push(*h, *units) {
                self.sizes[worker] -= old as usize;
            }
            self.sizes[worker] += *units as usize;
        }
    }

    /// Evicts least recently used entries of workers over `max_units`, at most
    /// `TRIM_STEP` of them; returns whether more remain to evict.
    pub fn trim(&mut self, max_units: usize) -> bool {
        let mut budget = TRIM_STEP;
        for (tree, size) in self.trees.iter_mut().zip(&mut self.sizes) {
            while *size > max_units && budget > 0 {
                let Some((_, units)) = tree.pop_lru() else { break };
                *size -= units as usize;
                budget -= 1;
            }
        }
        self.sizes.iter().any(|s| *s > max_units)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hashes(s: &str) -> Vec<(u64, u32)> {
        chunk_hashes(s.as_bytes(), 1)
    }

    #[test]
    fn matches_the_longest_routed_prefix_per_worker() {
        let mut idx = PrefixIndex::new(2, 10_000);
        let a = "system prompt shared by everyone, then question one".repeat(3);
        let b = "system prompt shared by everyone, then a different one".repeat(3);
        idx.insert(&hashes(&a), 0);
        let m = idx.matched_units(&hashes(&b));
        assert!(m[0] >= 32 && m[0] < b.len(), "shared prefix matched on worker 0: {m:?}");
        assert_eq!(m[1], 0);
        assert_eq!(idx.matched_units(&hashes(&a))[0], a.len());
    }

    #[test]
    fn trimming_drops_least_recently_used_first() {
        let mut idx = PrefixIndex::new(1, 10_000);
        let (old, new) = ("o".repeat(160), "n".repeat(160));
        idx.insert(&hashes(&old), 0);
        idx.insert(&hashes(&new), 0);
        assert_eq!(idx.size(0), 320);
        assert!(!idx.trim(160));
        assert_eq!(idx.size(0), 160);
        assert_eq!(idx.matched_units(&hashes(&new))[0], 160);
        assert_eq!(idx.matched_units(&hashes(&old))[0], 0);
    }

    #[test]
    fn memory_is_capped_on_insert() {
        let mut idx = PrefixIndex::new(2, 100);
        for i in 0..40 {
            idx.insert(&hashes(&format!("{i:04}").repeat(64)), i % 2);
        }
        assert!(idx.entries() <= 100, "{}", idx.entries());
        assert_eq!(idx.size(0) + idx.size(1), idx.entries() * CHUNK_UNITS);
    }

    #[test]
    fn trimming_is_bounded_per_call() {
        let mut idx = PrefixIndex::new(1, 1 << 20);
        let long: String = (0..TRIM_STEP * 2).map(|i| char::from(b'a' + (i % 26) as u8)).collect::<String>().repeat(CHUNK_UNITS);
        idx.insert(&hashes(&long), 0);
        assert!(idx.trim(0), "more than one step's worth");
        assert!(!idx.trim(0));
        assert_eq!(idx.size(0), 0);
    }
}
