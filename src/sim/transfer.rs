//! The engine's half of the KV handshake (PROTOCOLS.md §1): a prefill that stopped on its
//! length cap holds its prompt's blocks for a decode; a decode pulls the blocks it does not
//! already hold in its own prefix cache over the side channel (side_channel.rs), checks
//! they hold its prompt, and decodes. Held blocks go when pulled, when the decode aborts
//! before pulling (it tells the prefill), or when the lease ends.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::blocks::{blocks_for, BlockId, KvCache};
use super::engine::{bump, Engine, Event, Finish, Phase, Seq, State};
use super::request::{KvRequest, RemoteKv};
use super::side_channel;
use crate::api::ApiError;

/// Blocks a prefill holds for a remote decode.
pub struct Held {
    pub blocks: Vec<BlockId>,
    pub expires: Instant,
}

#[derive(Debug)]
pub enum PullError {
    /// The prefill could not be reached or refused the read.
    Load(String),
    /// The blocks were read but hold another prompt.
    Mismatch(String),
}

impl std::fmt::Display for PullError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PullError::Load(e) => write!(f, "KV load failure (failure_policy=fail): {e}"),
            PullError::Mismatch(e) => write!(f, "KV transfer mismatch: {e}"),
        }
    }
}

/// Pulls the prompt blocks a decode lacks (all from `hits` on) and hands the outcome to
/// the engine.
pub async fn pull(engine: Arc<Engine>, seq_id: u64, remote: RemoteKv, fps: Vec<u64>, hits: usize, prompt_len: usize) {
    let mut wanted = remote.clone();
    wanted.block_ids = remote.block_ids.get(hits..).map(<[u32]>::to_vec).unwrap_or_default();
    let expected = &fps[hits.min(fps.len())..];
    let outcome = side_channel::read(&wanted, engine.cfg.kv_load_timeout).await.and_then(|contents| {
        let tokens_ok = remote.num_tokens.is_none_or(|n| n == prompt_len);
        if contents == expected && tokens_ok && remote.block_ids.len() == fps.len() {
            Ok(contents)
        } else {
            Err(PullError::Mismatch(format!(
                "pulled {} KV blocks (remote_num_tokens {:?}, {} remote blocks) that were not computed from \
                 this prompt ({prompt_len} tokens, {} blocks, {hits} cached here): the decode must get the \
                 prefill's prompt byte for byte",
                contents.len(),
                remote.num_tokens,
                remote.block_ids.len(),
                fps.len(),
            )))
        }
    });
    engine.pull_done(seq_id, hits, prompt_len, remote.cached_tokens, outcome);
}

/// Removes requests whose client has gone, freeing their blocks. Returns the remote KV
/// of decodes that had not pulled yet: their prefills must be told to free it.
pub fn reap_cancelled(st: &mut State) -> Vec<RemoteKv> {
    let State { cache, waiting, running, .. } = st;
    let mut frees = Vec::new();
    running.retain(|s| {
        let closed = s.tx.is_closed();
        if closed {
            cache.release(&s.blocks);
        }
        !closed
    });
    waiting.retain(|s| {
        let closed = s.tx.is_closed();
        if closed {
            if let KvRequest::RemotePrefill(remote) = &s.job.kv {
                frees.push(remote.clone());
            }
        }
        !closed
    });
    frees
}

pub fn spawn_frees(frees: Vec<RemoteKv>) {
    for remote in frees {
        tokio::spawn(async move { side_channel::free(&remote).await });
    }
}

impl Engine {
    /// Frees a finished request's blocks, or, for a prefill leg that stopped on its
    /// length cap, holds the prompt's blocks for the decode and returns the params.
    pub fn finish_blocks(&self, seq: &Seq, reason: Finish, cache: &mut KvCache, held: &mut HashMap<String, Held>) -> Option<Value> {
        if reason != Finish::Length || seq.job.kv != KvRequest::RemoteDecode {
            cache.release(&seq.blocks);
            return None;
        }
        let keep = blocks_for(seq.job.prompt.len(), self.cfg.block_size);
        let (kept, rest) = seq.blocks.split_at(keep);
        cache.release(rest);
        held.insert(seq.job.request_id.clone(), Held { blocks: kept.to_vec(), expires: Instant::now() + self.cfg.kv_lease });
        Some(json!({
            "do_remote_prefill": true,
            "do_remote_decode": false,
            "remote_block_ids": [kept],
            "remote_engine_id": self.engine_id,
            "remote_request_id": seq.job.request_id,
            "remote_host": self.side_host,
            "remote_port": self.side_port,
            "tp_size": 1,
            "dcp_size": 1,
            "pp_size": 1,
            "remote_num_tokens": seq.job.prompt.len(),
            "remote_blocks_expiry_time": null,
            "transfer_mode": "pull",
            "remote_prefill_cached_tokens": seq.hit_tokens,
        }))
    }

    fn pull_done(&self, seq_id: u64, hits: usize, prompt_len: usize, remote_cached: Option<usize>, outcome: Result<Vec<u64>, PullError>) {
        {
            let mut guard = self.lock();
            let State { cache, running, .. } = &mut *guard;
            // Gone: the client left while the pull was in flight.
            let Some(pos) = running.iter().position(|s| s.id == seq_id) else { return };
            match outcome {
                Ok(contents) => {
                    let seq = &mut running[pos];
                    cache.write(&seq.blocks[hits..hits + contents.len()], &contents);
                    seq.phase = Phase::Prefilling { left: 0 };
                    // vLLM reports the prefill's cache hits for a pulled prompt.
                    seq.hit_tokens = remote_cached.unwrap_or(seq.hit_tokens);
                    let pulled = prompt_len - hits * self.cfg.block_size;
                    bump(&self.stats.prompt_tokens, prompt_len);
                    bump(&self.stats.prompt_external, pulled);
                    bump(&self.stats.transfers_received, 1);
                }
                Err(err) => {
                    let seq = running.remove(pos);
                    cache.release(&seq.blocks);
                    bump(&self.stats.kv_load_failures, 1);
                    let fatal = matches!(err, PullError::Mismatch(_)) && self.cfg.die_on_kv_mismatch;
                    let api_err = if fatal {
                        ApiError::internal("EngineCore encountered an issue. See stack trace (above) for the root cause.")
                    } else {
                        ApiError::internal(err.to_string())
                    };
                    tracing::error!(engine = self.rank, request = %seq.job.request_id, "{err}");
                    let _ = seq.tx.send(Event::Failed(api_err));
                    if fatal {
                        self.die();
                    }
                }
            }
        }
        self.wake.notify_one();
    }

    /// vLLM's engine dies on a KV mismatch; with --die-on-kv-mismatch so does the sim.
    fn die(&self) {
        self.dead.store(true, Ordering::SeqCst);
        tracing::error!("engine {} died on a KV mismatch (--die-on-kv-mismatch); exiting", self.rank);
        tokio::spawn(async {
            tokio::time::sleep(Duration::from_millis(200)).await;
            std::process::exit(1);
        });
    }

    /// A decode reads held blocks over the side channel: returns their contents and
    /// frees them. Blocks no longer held are still readable (stale), as with NIXL.
    pub fn serve_read(&self, engine_id: &str, request_id: &str, block_ids: &[BlockId]) -> Result<Vec<u64>, String> {
        if engine_id != self.engine_id {
            return Err(format!(
                "engine id mismatch: this side channel serves engine {}, the decode asked for {engine_id}",
                self.engine_id
            ));
        }
        let contents = {
            let mut guard = self.lock();
            let State { cache, held, .. } = &mut *guard;
            let contents = cache.read(block_ids).ok_or_else(|| "block id out of range".to_string())?;
            match held.remove(request_id) {
                Some(h) => {
                    cache.release(&h.blocks);
                    bump(&self.stats.transfers_sent, 1);
                }
                None => {
                    tracing::warn!(engine = self.rank, request_id, "KV blocks read for an unknown request; they may have expired");
                    bump(&self.stats.stale_reads, 1);
                }
            }
            contents
        };
        self.wake.notify_one();
        Ok(contents)
    }

    /// A decode aborted before pulling: free the held blocks now.
    pub fn serve_free(&self, request_id: &str) -> bool {
        let freed = {
            let mut guard = self.lock();
            let State { cache, held, .. } = &mut *guard;
            match held.remove(request_id) {
                Some(h) => {
                    cache.release(&h.blocks);
                    bump(&self.stats.freed_by_decode_abort, 1);
                    true
                }
                None => false,
            }
        };
        if freed {
            self.wake.notify_one();
        }
        freed
    }

    pub fn expire_leases(&self) {
        let now = Instant::now();
        let expired = {
            let mut guard = self.lock();
            let State { cache, held, .. } = &mut *guard;
            let before = held.len();
            held.retain(|id, h| {
                let live = h.expires > now;
                if !live {
                    tracing::warn!(engine = self.rank, request_id = %id, "releasing expired KV blocks: no decode pulled them");
                    cache.release(&h.blocks);
                }
                live
            });
            before - held.len()
        };
        if expired > 0 {
            bump(&self.stats.leases_expired, expired);
            self.wake.notify_one();
        }
    }
}
