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

use std::collections::HashMap;

use lru::LruCache;

/// Units (characters or tokens) per chunk.
pub(crate) const CHUNK_UNITS: usize = 16;

/// Most entries evicted per lock hold by `trim`.
const TRIM_STEP: usize = 16_384;

/// The chained hashes of a prompt's chunks, and the units in each.
pub(crate) fn chunk_hashes(prompt: &super::PromptStart) -> Vec<(u64, u32)> {
    let units = prompt.units();
    let mut h = crate::api::FNV_OFFSET;
    (0..units)
        .step_by(CHUNK_UNITS)
        .map(|start| {
            let end = (start + CHUNK_UNITS).min(units);
            h = prompt.hash_units(h, start..end);
            h = h.rotate_left(17) ^ ((end - start) as u64);
            (h, (end - start) as u32)
        })
        .collect()
}

/// One worker's chunks: chained chunk hash -> units in that chunk, and their sum. The
/// LRU grows with its entries up to the index's per-worker share (one made with that
/// capacity up front reserves its whole table at once, and the table's pages fill in as
/// random keys land: ~60 MiB resident per worker of two after 10,000 short prompts).
struct Tree {
    lru: LruCache<u64, u32>,
    units: usize,
}

/// Per worker (by URL), the chunks routed to it. Workers join and leave (`add`, `remove`);
/// the memory cap is shared out again each time.
pub(crate) struct PrefixIndex {
    trees: HashMap<String, Tree>,
    max_entries: usize,
}

impl PrefixIndex {
    /// Bytes one entry costs (hash map slot, LRU node, allocator overhead), measured.
    pub(crate) const BYTES_PER_ENTRY: usize = 96;

    /// An empty index holding at most `max_entries` entries for all workers together.
    pub(crate) fn new(max_entries: usize) -> Self {
        PrefixIndex { trees: HashMap::new(), max_entries }
    }

    fn share(&self, workers: usize) -> usize {
        (self.max_entries / workers.max(1)).max(1)
    }

    /// Shares the cap out again over the workers (a shrunk share evicts least recently
    /// used entries).
    fn reshare(&mut self) {
        let share = self.share(self.trees.len());
        for tree in self.trees.values_mut() {
            while tree.lru.len() > share {
                let Some((_, units)) = tree.lru.pop_lru() else { break };
                tree.units -= units as usize;
            }
        }
    }

    pub(crate) fn add(&mut self, worker: &str) {
        if !self.trees.contains_key(worker) {
            self.trees.insert(worker.to_string(), Tree { lru: LruCache::unbounded(), units: 0 });
            self.reshare();
        }
    }

    pub(crate) fn remove(&mut self, worker: &str) {
        if self.trees.remove(worker).is_some() {
            self.reshare();
        }
    }

    /// Units held for a worker (0 for one the index does not know).
    pub(crate) fn size(&self, worker: &str) -> usize {
        self.trees.get(worker).map_or(0, |t| t.units)
    }

    pub(crate) fn entries(&self) -> usize {
        self.trees.values().map(|t| t.lru.len()).sum()
    }

    /// How many leading units of the prompt the worker's tree holds.
    pub(crate) fn matched_units(&self, chunks: &[(u64, u32)], worker: &str) -> usize {
        let Some(tree) = self.trees.get(worker) else { return 0 };
        chunks.iter().take_while(|(h, _)| tree.lru.contains(h)).map(|(_, u)| *u as usize).sum()
    }

    /// Records that the chunks went to `worker` (nothing, for a worker that has left).
    pub(crate) fn insert(&mut self, chunks: &[(u64, u32)], worker: &str) {
        let cap = self.share(self.trees.len());
        let Some(tree) = self.trees.get_mut(worker) else { return };
        for (h, units) in chunks {
            if tree.lru.get(h).is_some() {
                continue;
            }
            tree.lru.push(*h, *units);
            tree.units += *units as usize;
            if tree.lru.len() > cap {
                if let Some((_, old)) = tree.lru.pop_lru() {
                    tree.units -= old as usize;
                }
            }
        }
    }

    /// Evicts least recently used entries of workers over `max_units`, at most
    /// `TRIM_STEP` of them; returns whether more remain to evict.
    pub(crate) fn trim(&mut self, max_units: usize) -> bool {
        let mut budget = TRIM_STEP;
        for tree in self.trees.values_mut() {
            while tree.units > max_units && budget > 0 {
                let Some((_, units)) = tree.lru.pop_lru() else { break };
                tree.units -= units as usize;
                budget -= 1;
            }
        }
        self.trees.values().any(|t| t.units > max_units)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The cap is a bound, not a reservation: --cache-aware-max-memory-mb 1000000 (a TiB)
    /// must cost nothing until entries come (reserved up front, it cannot be allocated).
    #[test]
    fn a_huge_memory_cap_reserves_nothing_up_front() {
        let mut idx = PrefixIndex::new((1_000_000usize << 20) / PrefixIndex::BYTES_PER_ENTRY);
        idx.add("http://a");
        idx.add("http://b");
        idx.insert(&hashes("a prompt long enough for two chunks"), "http://a");
        assert_eq!(idx.matched_units(&hashes("a prompt long enough for two chunks"), "http://a"), 35);
        assert_eq!(idx.entries(), 3);
    }

    fn hashes(s: &str) -> Vec<(u64, u32)> {
        chunk_hashes(&super::super::PromptStart::Text(s.as_bytes().to_vec()))
    }

    fn index(workers: &[&str], max_entries: usize) -> PrefixIndex {
        let mut idx = PrefixIndex::new(max_entries);
        workers.iter().for_each(|w| idx.add(w));
        idx
    }

    #[test]
    fn matches_the_longest_routed_prefix_per_worker() {
        let mut idx = index(&["w0", "w1"], 10_000);
        let a = "system prompt shared by everyone, then question one".repeat(3);
        let b = "system prompt shared by everyone, then a different one".repeat(3);
        idx.insert(&hashes(&a), "w0");
        let m = idx.matched_units(&hashes(&b), "w0");
        assert!(m >= 32 && m < b.len(), "shared prefix matched on worker 0: {m}");
        assert_eq!(idx.matched_units(&hashes(&b), "w1"), 0);
        assert_eq!(idx.matched_units(&hashes(&a), "w0"), a.len());
    }

    #[test]
    fn workers_join_and_leave_with_their_share() {
        let mut idx = index(&["w0"], 100);
        idx.insert(&hashes(&"x".repeat(16 * 90)), "w0");
        assert_eq!(idx.entries(), 90);
        idx.add("w1");
        assert_eq!(idx.entries(), 50, "the newcomer's share came out of w0's");
        assert_eq!(idx.size("w0"), 50 * CHUNK_UNITS);
        idx.insert(&hashes(&"y".repeat(16 * 10)), "gone");
        assert_eq!(idx.entries(), 50, "a worker that left records nothing");
        idx.remove("w0");
        assert_eq!((idx.entries(), idx.size("w0"), idx.matched_units(&hashes("xxxxxxxxxxxxxxxx"), "w0")), (0, 0, 0));
    }

    #[test]
    fn trimming_drops_least_recently_used_first() {
        let mut idx = index(&["w"], 10_000);
        let (old, new) = ("o".repeat(160), "n".repeat(160));
        idx.insert(&hashes(&old), "w");
        idx.insert(&hashes(&new), "w");
        assert_eq!(idx.size("w"), 320);
        assert!(!idx.trim(160));
        assert_eq!(idx.size("w"), 160);
        assert_eq!(idx.matched_units(&hashes(&new), "w"), 160);
        assert_eq!(idx.matched_units(&hashes(&old), "w"), 0);
    }

    #[test]
    fn memory_is_capped_on_insert() {
        let mut idx = index(&["w0", "w1"], 100);
        for i in 0..40 {
            idx.insert(&hashes(&format!("{i:04}").repeat(64)), ["w0", "w1"][i % 2]);
        }
        assert!(idx.entries() <= 100, "{}", idx.entries());
        assert_eq!(idx.size("w0") + idx.size("w1"), idx.entries() * CHUNK_UNITS);
    }

    #[test]
    fn trimming_is_bounded_per_call() {
        let mut idx = index(&["w"], 1 << 20);
        let long: String = (0..TRIM_STEP * 2).map(|i| char::from(b'a' + (i % 26) as u8)).collect::<String>().repeat(CHUNK_UNITS);
        idx.insert(&hashes(&long), "w");
        assert!(idx.trim(0), "more than one step's worth");
        assert!(!idx.trim(0));
        assert_eq!(idx.size("w"), 0);
    }
}
