//! The oracle bound of a trace's prefix-hit rate: one engine whose prefix cache is the
//! whole cluster's (every prefill's KV blocks together), seeing every request in order.
//! Each prompt finds the longest run of its leading full blocks still cached (vLLM's
//! counting: full blocks only, never the last token), then all its full blocks become the
//! most recently used; the least recently used go when the cache is full. No timing: a
//! request never misses because an earlier one is still computing. (Not a ceiling:
//! several caches with affinity routing can keep reused prefixes that one shared LRU lets
//! one-off prompts push out; with `capacity` unbounded it is one.)

use std::collections::HashMap;

use crate::router::kv_aware::index::block_hashes;

/// Cached tokens over prompt tokens for `prompts` through an LRU of `capacity` blocks.
pub(crate) fn hit_rate(prompts: &[Vec<u32>], block_size: usize, capacity: usize) -> f64 {
    let mut lru = Lru::new(capacity);
    let (mut hit, mut total) = (0usize, 0usize);
    for p in prompts {
        let keys = block_hashes(p, block_size);
        let held = keys.iter().take_while(|k| lru.contains(**k)).count();
        hit += crate::router::kv_aware::check::predicted(p.len(), held, block_size);
        total += p.len();
        for k in keys {
            lru.touch(k);
        }
    }
    if total == 0 {
        0.0
    } else {
        hit as f64 / total as f64
    }
}

/// An LRU set of block keys: a map from key to its last use, and the uses in order.
struct Lru {
    capacity: usize,
    last_use: HashMap<u64, u64>,
    order: std::collections::BTreeMap<u64, u64>,
    clock: u64,
}

impl Lru {
    fn new(capacity: usize) -> Self {
        Lru { capacity, last_use: HashMap::new(), order: Default::default(), clock: 0 }
    }

    fn contains(&self, key: u64) -> bool {
        self.last_use.contains_key(&key)
    }

    fn touch(&mut self, key: u64) {
        if self.capacity == 0 {
            return;
        }
        self.clock += 1;
        if let Some(old) = self.last_use.insert(key, self.clock) {
            self.order.remove(&old);
        }
        self.order.insert(self.clock, key);
        while self.last_use.len() > self.capacity {
            let Some((_, oldest)) = self.order.pop_first() else { break };
            self.last_use.remove(&oldest);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeats_hit_their_full_blocks_until_evicted() {
        let a: Vec<u32> = (0..40).collect();
        let b: Vec<u32> = (100..140).collect();
        // 40 tokens = 2 full blocks of 16 (+8). The repeat of `a` hits 32 of 40.
        assert_eq!(hit_rate(&[a.clone(), a.clone()], 16, 10), 32.0 / 80.0);
        // A cache of 2 blocks: `b` evicts `a`, whose repeat then misses.
        assert_eq!(hit_rate(&[a.clone(), b.clone(), a.clone()], 16, 2), 0.0);
        // A cache of 4 holds both.
        assert_eq!(hit_rate(&[a.clone(), b, a.clone()], 16, 4), 32.0 / 120.0);
        // A shared first block only: the other prompt hits 16.
        let mut c = a[..16].to_vec();
        c.extend(200..224);
        assert_eq!(hit_rate(&[a, c], 16, 10), 16.0 / 80.0);
    }
}
