//! `--kv-cache-churn`: traffic this simulator was not sent turns each rank's prefix cache
//! over, as an engine shared with other clients sees. Every tick a rank fills runs of fresh
//! blocks with token ids nobody asked for and frees them at once; once the cache is full
//! each run evicts the oldest free blocks. The BlockStored and BlockRemoved events that
//! follow are published like any others, so a router's KV intake can be measured at a
//! rate of events that serving a few requests would never reach.

use std::sync::Arc;
use std::time::Duration;

use super::blocks::fingerprints;
use super::Engine;

/// How often a rank fills its share of blocks.
const TICK: Duration = Duration::from_millis(20);
/// Blocks per run: one prompt's worth (what one BlockStored event carries).
const RUN_BLOCKS: usize = 16;

/// Fills `blocks_per_sec` blocks a second of `engine`'s cache with unrequested prompts,
/// for as long as the simulator runs.
pub(crate) async fn churn(engine: Arc<Engine>, blocks_per_sec: f64) {
    let mut owed = 0.0f64;
    // Each engine's other traffic is its own: the seed is the rank's and its instance's
    // (the side channel's port, one per instance).
    let mut seed = (engine.rank as u64 ^ u64::from(engine.side_port) << 16).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let mut ticks = tokio::time::interval(TICK);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        owed += blocks_per_sec * TICK.as_secs_f64();
        let mut st = engine.lock();
        let bs = st.cache.block_size();
        while owed >= RUN_BLOCKS as f64 {
            owed -= RUN_BLOCKS as f64;
            seed = seed.wrapping_add(1);
            // Token ids from the run's seed: no run repeats another, no request's prompt.
            let tokens: Vec<u32> = (0..(RUN_BLOCKS * bs) as u64).map(|i| (seed.wrapping_mul(0x2545_f491_4f6c_dd1d) ^ i) as u32).collect();
            let hashes = fingerprints(&tokens, bs);
            let Some(blocks) = st.cache.allocate(&hashes, 0, RUN_BLOCKS) else {
                // Requests hold the cache: what is owed is dropped, not queued.
                owed = 0.0;
                break;
            };
            st.cache.commit(&blocks, &tokens, 0);
            st.cache.release(&blocks);
        }
        engine.publish(&mut st);
    }
}
