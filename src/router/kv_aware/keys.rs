//! Our block keys: the chained hash of a block's token ids and its parent's key, the same
//! for a prompt the router reads and for a run an engine reports storing (index.rs).

use crate::api::FNV_OFFSET;

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

/// The process's key function: foldhash with a seed drawn at start, so an engine cannot
/// choose token ids whose keys collide (keys never leave the process).
static KEYS: std::sync::LazyLock<foldhash::fast::FixedState> = std::sync::LazyLock::new(|| {
    use std::hash::BuildHasher;
    foldhash::fast::FixedState::with_seed(std::collections::hash_map::RandomState::new().hash_one(0x6b76_u64))
});

/// The key of `block` following the block keyed `parent` (FNV_OFFSET at a prompt's start):
/// two tokens per 64-bit word.
pub(crate) fn chain(parent: u64, block: &[u32]) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = KEYS.build_hasher();
    h.write_u64(parent);
    for pair in block.chunks(2) {
        h.write_u64(u64::from(pair[0]) | u64::from(pair.get(1).copied().unwrap_or(0)) << 32);
    }
    h.finish()
}
