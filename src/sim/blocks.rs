//! The simulated KV cache: a finite pool of fixed-size blocks. Each block remembers a
//! fingerprint of the tokens last written into it, so a decode that pulls blocks can
//! check they hold its prompt, and a read of blocks that were freed but not yet reused
//! still succeeds, as a NIXL read of stale GPU memory does on a real engine.

use std::collections::VecDeque;

use super::tokens::mix;

pub type BlockId = u32;

pub struct BlockPool {
    /// Free block ids, oldest-freed first: like vLLM's free queue, a freed block is
    /// reused as late as possible.
    free: VecDeque<BlockId>,
    /// content[id] = fingerprint written into block `id`; 0 = never written.
    content: Vec<u64>,
}

impl BlockPool {
    /// Block ids run from 1 (vLLM reserves block 0 as the null block).
    pub fn new(total: usize) -> Self {
        BlockPool { free: (1..=total as BlockId).collect(), content: vec![0; total + 1] }
    }

    pub fn total(&self) -> usize {
        self.content.len() - 1
    }

    pub fn available(&self) -> usize {
        self.free.len()
    }

    pub fn used(&self) -> usize {
        self.total() - self.available()
    }

    pub fn alloc(&mut self, n: usize) -> Option<Vec<BlockId>> {
        if n > self.free.len() {
            return None;
        }
        Some(self.free.drain(..n).collect())
    }

    /// Returns blocks to the pool; their content stays readable until reused.
    pub fn release(&mut self, blocks: impl IntoIterator<Item = BlockId>) {
        self.free.extend(blocks);
    }

    /// Writes the prompt's per-block fingerprints into the first blocks of `blocks`.
    pub fn write_prompt(&mut self, blocks: &[BlockId], prompt: &[u32], block_size: usize) {
        for (block, fp) in blocks.iter().zip(prompt_block_fingerprints(prompt, block_size)) {
            self.content[*block as usize] = fp;
        }
    }

    /// The contents of the given blocks; `None` if an id is not a block of this pool.
    pub fn read(&self, blocks: &[BlockId]) -> Option<Vec<u64>> {
        blocks
            .iter()
            .map(|b| (*b as usize >= 1).then(|| self.content.get(*b as usize).copied()).flatten())
            .collect()
    }
}

/// Number of blocks that hold `tokens` tokens.
pub fn blocks_for(tokens: usize, block_size: usize) -> usize {
    tokens.div_ceil(block_size)
}

/// One fingerprint per prompt block, each chained over every token up to the block's end,
/// so equal fingerprints mean equal prefixes (as vLLM's block hashes do).
pub fn prompt_block_fingerprints(prompt: &[u32], block_size: usize) -> Vec<u64> {
    let mut out = Vec::with_capacity(blocks_for(prompt.len(), block_size));
    let mut h = 0x6b76_u64;
    for chunk in prompt.chunks(block_size) {
        for t in chunk {
            h = mix(h ^ u64::from(*t));
        }
        // Never 0, which marks a block never written.
        out.push(h | 1);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alloc_and_release_track_usage() {
        let mut p = BlockPool::new(4);
        let a = p.alloc(3).unwrap();
        assert_eq!(a, vec![1, 2, 3]);
        assert!(p.alloc(2).is_none());
        assert_eq!(p.used(), 3);
        p.release(a);
        assert_eq!(p.available(), 4);
        // Freed blocks go to the back: the never-used block 4 comes first.
        assert_eq!(p.alloc(1).unwrap(), vec![4]);
    }

    #[test]
    fn freed_content_stays_readable_until_reused() {
        let mut p = BlockPool::new(2);
        let a = p.alloc(1).unwrap();
        p.write_prompt(&a, &[5, 6, 7], 16);
        let written = p.read(&a).unwrap();
        p.release(a.clone());
        assert_eq!(p.read(&a).unwrap(), written);
        assert!(p.read(&[0]).is_none());
        assert!(p.read(&[3]).is_none());
    }

    #[test]
    fn fingerprints_chain_over_the_prefix() {
        let a = prompt_block_fingerprints(&[1, 2, 3, 4, 5], 2);
        let b = prompt_block_fingerprints(&[1, 2, 3, 9, 5], 2);
        assert_eq!(a.len(), 3);
        assert_eq!(a[0], b[0]);
        assert_ne!(a[1], b[1]);
        assert_ne!(a[2], b[2]);
    }
}
