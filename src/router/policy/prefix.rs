//! The approximate prefix tree behind cache_aware: the prompt is cut into fixed chunks
//! and each chunk is keyed by a hash chained over every chunk before it, so a chain of
//! present keys is a path from the root of a prefix tree. Per worker, each key carries
//! the time it was last routed there; eviction drops the oldest (deepest first) until a
//! worker's tree is within its size limit.

use std::collections::HashMap;

/// Units (characters or tokens) per chunk.
const CHUNK_UNITS: usize = 16;

pub struct PrefixIndex {
    /// chained chunk hash -> (worker, last use, depth, units in chunk)
    nodes: HashMap<u64, Vec<Entry>>,
    /// Units held per worker.
    sizes: Vec<usize>,
    clock: u64,
}

#[derive(Clone, Copy)]
struct Entry {
    worker: u32,
    used: u64,
    depth: u32,
    units: u32,
}

fn chunks(prompt: &[u8], unit: usize) -> impl Iterator<Item = (u64, usize)> + '_ {
    let step = CHUNK_UNITS * unit.max(1);
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    prompt.chunks(step).map(move |c| {
        for b in c {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h = h.rotate_left(17) ^ (c.len() as u64);
        (h, c.len() / unit.max(1))
    })
}

impl PrefixIndex {
    pub fn new(workers: usize) -> Self {
        PrefixIndex { nodes: HashMap::new(), sizes: vec![0; workers], clock: 0 }
    }

    pub fn size(&self, worker: usize) -> usize {
        self.sizes[worker]
    }

    /// For every worker, how many leading units of `prompt` its tree holds.
    pub fn matched_units(&self, prompt: &[u8], unit: usize) -> Vec<usize> {
        let n = self.sizes.len();
        let mut matched = vec![0usize; n];
        let mut alive = vec![true; n];
        let mut any = true;
        for (h, units) in chunks(prompt, unit) {
            if !any {
                break;
            }
            any = false;
            let holders = self.nodes.get(&h);
            for w in 0..n {
                if !alive[w] {
                    continue;
                }
                if holders.is_some_and(|v| v.iter().any(|e| e.worker as usize == w)) {
                    matched[w] += units;
                    any = true;
                } else {
                    alive[w] = false;
                }
            }
        }
        matched
    }

    pub fn insert(&mut self, prompt: &[u8], unit: usize, worker: usize) {
        self.clock += 1;
        let now = self.clock;
        for (depth, (h, units)) in chunks(prompt, unit).enumerate() {
            let holders = self.nodes.entry(h).or_default();
            match holders.iter_mut().find(|e| e.worker as usize == worker) {
                Some(e) => e.used = now,
                None => {
                    holders.push(Entry { worker: worker as u32, used: now, depth: depth as u32, units: units as u32 });
                    self.sizes[worker] += units;
                }
            }
        }
    }

    /// Trims every worker's tree to `max_units`, least recently used first.
    pub fn evict(&mut self, max_units: usize) {
        for w in 0..self.sizes.len() {
            if self.sizes[w] <= max_units {
                continue;
            }
            let mut owned: Vec<(u64, u32, u64)> = self
                .nodes
                .iter()
                .filter_map(|(h, v)| v.iter().find(|e| e.worker as usize == w).map(|e| (e.used, e.depth, *h)))
                .collect();
            // Oldest first; within one use, deepest first (leaves before their parents).
            owned.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
            for (_, _, h) in owned {
                if self.sizes[w] <= max_units {
                    break;
                }
                if let Some(v) = self.nodes.get_mut(&h) {
                    if let Some(pos) = v.iter().position(|e| e.worker as usize == w) {
                        self.sizes[w] -= v[pos].units as usize;
                        v.swap_remove(pos);
                    }
                    if v.is_empty() {
                        self.nodes.remove(&h);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_longest_routed_prefix_per_worker() {
        let mut idx = PrefixIndex::new(2);
        let a = "system prompt shared by everyone, then question one".repeat(3);
        let b = "system prompt shared by everyone, then a different one".repeat(3);
        idx.insert(a.as_bytes(), 1, 0);
        let m = idx.matched_units(b.as_bytes(), 1);
        assert!(m[0] >= 32 && m[0] < b.len(), "shared prefix matched on worker 0: {m:?}");
        assert_eq!(m[1], 0);
        assert_eq!(idx.matched_units(a.as_bytes(), 1)[0], a.len());
    }

    #[test]
    fn eviction_trims_least_recently_used_first() {
        let mut idx = PrefixIndex::new(1);
        let old = "o".repeat(160);
        let new = "n".repeat(160);
        idx.insert(old.as_bytes(), 1, 0);
        idx.insert(new.as_bytes(), 1, 0);
        assert_eq!(idx.size(0), 320);
        idx.evict(160);
        assert_eq!(idx.size(0), 160);
        assert_eq!(idx.matched_units(new.as_bytes(), 1)[0], 160);
        assert_eq!(idx.matched_units(old.as_bytes(), 1)[0], 0);
    }
}
