//! The engine's half of each connector's KV handoff (docs/PROTOCOLS.md §1-§3), over the
//! side channel (side_channel.rs):
//! - NIXL: a prefill that stopped on its length cap holds its prompt's blocks under its
//!   request id and answers the params; the decode reads the blocks it does not already
//!   hold in its own prefix cache.
//! - Mooncake: the prefill holds them under the router's transfer id; the decode, sent at
//!   the same time, finds the prefill engine's side channel on its bootstrap server and
//!   takes them by transfer id, waiting until the prefill holds them.
//! - P2pNccl: the prefill pushes them, as soon as they are computed, to the decode's
//!   address named in the request id; the decode waits for them under its request id.
//!
//! The decode checks the blocks hold its prompt, and decodes. Held blocks go when taken,
//! when the decode aborts before taking them (it tells the prefill), or when the lease
//! ends; pushed blocks nobody asked for go when the lease ends.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::blocks::{blocks_for, BlockId, KvCache};
use super::mooncake;
use super::request::{Handoff, KvRequest, NixlRemote, RemoteKv};
use super::side_channel::{self, Peer};
use super::{bump, Engine, Event, Finish, Phase, Seq, State};
use crate::api::kv_params::NixlAnswer;
use crate::api::ApiError;

/// Blocks a prefill holds for a remote decode.
pub(crate) struct Held {
    pub(crate) blocks: Vec<BlockId>,
    pub(crate) expires: Instant,
}

/// KV a P2pNccl prefill pushed to this decode, until its request takes it.
pub(crate) struct Pushed {
    pub(crate) contents: Vec<u64>,
    pub(crate) expires: Instant,
}

/// What a decode got from its prefill.
struct Fetched {
    /// The contents of the prompt's blocks from the first one not cached here on.
    contents: Vec<u64>,
    /// How many blocks the prefill's prompt has.
    prompt_blocks: usize,
    /// The prefill's prompt length and cache hits, where its params say.
    num_tokens: Option<usize>,
    cached_tokens: Option<usize>,
}

/// How often a waiting decode checks whether its client is still there.
const RECHECK: Duration = Duration::from_millis(200);
#[derive(Debug)]
pub(crate) enum PullError {
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

/// Gets the prompt blocks a decode lacks (all from `hits` on) and hands the outcome to
/// the engine. Returns early, with nothing to hand, when the request is gone meanwhile.
pub(crate) async fn pull(engine: Arc<Engine>, seq_id: u64, remote: RemoteKv, fps: Vec<u64>, hits: usize, prompt_len: usize) {
    let fetched = match &remote {
        RemoteKv::Nixl(nixl) => read_nixl(&engine, nixl, hits).await,
        RemoteKv::Mooncake { bootstrap_addr, engine_id, transfer_id } => {
            match take_mooncake(&engine, seq_id, bootstrap_addr, engine_id, transfer_id, hits).await {
                Some(f) => f,
                None => return,
            }
        }
        RemoteKv::Pushed { key } => match engine.wait_pushed(seq_id, key).await {
            Some(contents) => Ok(Fetched {
                prompt_blocks: contents.len(),
                contents: contents.get(hits..).map(<[u64]>::to_vec).unwrap_or_default(),
                num_tokens: None,
                cached_tokens: None,
            }),
            None => return,
        },
    };
    let expected = &fps[hits.min(fps.len())..];
    let outcome = fetched.and_then(|f| {
        let tokens_ok = f.num_tokens.is_none_or(|n| n == prompt_len);
        if f.contents == expected && tokens_ok && f.prompt_blocks == fps.len() {
            Ok((f.contents, f.cached_tokens))
        } else {
            Err(PullError::Mismatch(format!(
                "got {} KV blocks (remote_num_tokens {:?}, {} remote blocks) that were not computed from \
                 this prompt ({prompt_len} tokens, {} blocks, {hits} cached here): the decode must get the \
                 prefill's prompt byte for byte",
                f.contents.len(),
                f.num_tokens,
                f.prompt_blocks,
                fps.len(),
            )))
        }
    });
    engine.pull_done(seq_id, hits, prompt_len, outcome);
}

async fn read_nixl(engine: &Engine, nixl: &NixlRemote, hits: usize) -> Result<Fetched, PullError> {
    let wanted = nixl.block_ids.get(hits..).unwrap_or_default();
    let peer = Peer { host: nixl.host.clone(), port: nixl.port };
    let contents =
        side_channel::read(&peer, &nixl.engine_id, &nixl.request_id, wanted, engine.cfg.kv_load_timeout).await.map_err(PullError::Load)?;
    Ok(Fetched { contents, prompt_blocks: nixl.block_ids.len(), num_tokens: nixl.num_tokens, cached_tokens: nixl.cached_tokens })
}

/// Mooncake: asks the prefill for the transfer until it has it, for as long as the
/// prefill would hold it (--kv-lease-secs; vLLM: VLLM_MOONCAKE_ABORT_REQUEST_TIMEOUT).
/// `None`: the request went away meanwhile (the prefill is told to free the KV).
async fn take_mooncake(
    engine: &Engine,
    seq_id: u64,
    bootstrap: &str,
    engine_id: &str,
    transfer_id: &str,
    hits: usize,
) -> Option<Result<Fetched, PullError>> {
    let peer = match mooncake::worker_peer(bootstrap, engine_id).await {
        Ok(p) => p,
        Err(e) => return Some(Err(PullError::Load(e))),
    };
    let deadline = Instant::now() + engine.cfg.kv_lease;
    loop {
        if !engine.is_running(seq_id) {
            side_channel::free(&peer, transfer_id).await;
            return None;
        }
        let now = Instant::now();
        if now >= deadline {
            side_channel::free(&peer, transfer_id).await;
            return Some(Err(PullError::Load(format!(
                "transfer {transfer_id} was not ready on the prefill within {:?}",
                engine.cfg.kv_lease
            ))));
        }
        match side_channel::take(&peer, engine_id, transfer_id, hits, RECHECK.min(deadline - now), engine.cfg.kv_load_timeout).await {
            Ok(Some((contents, prompt_blocks))) => {
                return Some(Ok(Fetched { contents, prompt_blocks, num_tokens: None, cached_tokens: None }))
            }
            Ok(None) => {}
            Err(e) => return Some(Err(PullError::Load(e))),
        }
    }
}

/// Removes requests whose client has gone, freeing their blocks. Returns the remote KV
/// of NIXL decodes that had not pulled yet: their prefills must be told to free it (a
/// Mooncake decode waiting for its transfer tells its prefill itself, take_mooncake).
pub(crate) fn reap_cancelled(st: &mut State) -> Vec<NixlRemote> {
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
            if let KvRequest::RemotePrefill(RemoteKv::Nixl(remote)) = &s.job.kv {
                frees.push(remote.clone());
            }
        }
        !closed
    });
    frees
}

pub(crate) fn spawn_frees(frees: Vec<NixlRemote>) {
    for remote in frees {
        tokio::spawn(async move { side_channel::free(&Peer { host: remote.host, port: remote.port }, &remote.request_id).await });
    }
}

impl Engine {
    /// Frees a finished request's blocks, or, for a prefill leg, holds the prompt's blocks
    /// for the decode and returns the params the connector answers with, as vLLM 0.32's
    /// connectors decide (`request_finished`): NIXL holds on FINISHED_LENGTH_CAPPED and
    /// FINISHED_STOPPED (EOS, a stop token) and answers its params; Mooncake holds on the
    /// length cap only and answers none.
    pub(crate) fn finish_blocks(&self, seq: &Seq, reason: Finish, st: &mut State) -> Option<Value> {
        let State { cache, held, abandoned, .. } = st;
        let key = match (&seq.job.kv, reason) {
            (KvRequest::RemoteDecode(Handoff::Nixl), Finish::Length | Finish::Stopped) => seq.job.request_id.clone(),
            (KvRequest::RemoteDecode(Handoff::Mooncake { transfer_id }), Finish::Length) => {
                if abandoned.remove(transfer_id).is_some() {
                    // Its decode gave up before the blocks were ready.
                    bump(&self.stats.freed_by_decode_abort, 1);
                    cache.release(&seq.blocks);
                    return None;
                }
                transfer_id.clone()
            }
            _ => {
                cache.release(&seq.blocks);
                return None;
            }
        };
        let keep = blocks_for(seq.job.prompt.len(), self.cfg.block_size);
        let (kept, rest) = seq.blocks.split_at(keep);
        cache.release(rest);
        held.insert(key, Held { blocks: kept.to_vec(), expires: Instant::now() + self.cfg.kv_lease });
        self.leased.notify_one();
        self.handed_over.notify_waiters();
        if !matches!(seq.job.kv, KvRequest::RemoteDecode(Handoff::Nixl)) {
            return None;
        }
        let answer = NixlAnswer {
            do_remote_prefill: true,
            do_remote_decode: false,
            remote_block_ids: vec![kept.to_vec()],
            remote_engine_id: self.engine_id.clone(),
            remote_request_id: seq.job.request_id.clone(),
            remote_host: self.side_host.clone(),
            remote_port: self.side_port,
            tp_size: 1,
            dcp_size: 1,
            pp_size: 1,
            remote_num_tokens: seq.job.prompt.len(),
            remote_blocks_expiry_time: None,
            transfer_mode: "pull",
            remote_prefill_cached_tokens: seq.hit_tokens,
        };
        Some(serde_json::to_value(answer).expect("params serialise"))
    }

    /// P2pNccl: a prefill pushes its prompt's blocks to the decode as soon as they are
    /// computed (vLLM sends each layer's KV during the forward pass).
    pub(crate) fn push_computed(&self, seq: &Seq, cache: &KvCache) {
        let KvRequest::RemoteDecode(Handoff::Push { host, port, key }) = &seq.job.kv else { return };
        let n = blocks_for(seq.job.prompt.len(), self.cfg.block_size);
        let Some(contents) = cache.read(&seq.blocks[..n]) else { return };
        let (peer, key, timeout) = (Peer { host: host.clone(), port: *port }, key.clone(), self.cfg.kv_load_timeout);
        let rank = self.rank;
        tokio::spawn(async move {
            if let Err(e) = side_channel::put(&peer, &key, contents, timeout).await {
                tracing::error!(engine = rank, request = %key, "could not push KV to {}:{}: {e}", peer.host, peer.port);
            }
        });
    }

    fn pull_done(&self, seq_id: u64, hits: usize, prompt_len: usize, outcome: Result<(Vec<u64>, Option<usize>), PullError>) {
        {
            let mut guard = self.lock();
            let State { cache, running, .. } = &mut *guard;
            // Gone: the client left while the pull was in flight.
            let Some(pos) = running.iter().position(|s| s.id == seq_id) else { return };
            match outcome {
                Ok((contents, remote_cached)) => {
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
    pub(crate) fn serve_read(&self, engine_id: &str, request_id: &str, block_ids: &[BlockId]) -> Result<Vec<u64>, String> {
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

    /// A decode aborted before pulling: free the held blocks now. A Mooncake transfer the
    /// prefill does not hold yet is remembered, so its blocks are freed when it finishes
    /// (vLLM's prefill frees them once ready).
    pub(crate) fn serve_free(&self, key: &str) -> bool {
        let freed = {
            let mut guard = self.lock();
            let State { cache, held, abandoned, .. } = &mut *guard;
            match held.remove(key) {
                Some(h) => {
                    cache.release(&h.blocks);
                    bump(&self.stats.freed_by_decode_abort, 1);
                    true
                }
                None => {
                    abandoned.insert(key.to_string(), Instant::now() + self.cfg.kv_lease);
                    self.leased.notify_one();
                    false
                }
            }
        };
        if freed {
            self.wake.notify_one();
        }
        freed
    }

    /// Mooncake: the blocks held under `transfer_id` from the `skip`th on, and how many
    /// the prompt has; waits up to `wait` for the prefill to hold them (`Ok(None)`: not yet).
    pub(crate) async fn serve_take(
        &self,
        engine_id: &str,
        transfer_id: &str,
        skip: usize,
        wait: Duration,
    ) -> Result<Option<(Vec<u64>, usize)>, String> {
        if engine_id != self.engine_id {
            return Err(format!(
                "engine id mismatch: this side channel serves engine {}, the decode asked for {engine_id}",
                self.engine_id
            ));
        }
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let handed = self.handed_over.notified();
            {
                let mut guard = self.lock();
                let State { cache, held, .. } = &mut *guard;
                if let Some(h) = held.remove(transfer_id) {
                    let contents = cache.read(h.blocks.get(skip..).unwrap_or_default()).unwrap_or_default();
                    cache.release(&h.blocks);
                    bump(&self.stats.transfers_sent, 1);
                    drop(guard);
                    self.wake.notify_one();
                    return Ok(Some((contents, h.blocks.len())));
                }
            }
            if tokio::time::timeout_at(deadline, handed).await.is_err() {
                return Ok(None);
            }
        }
    }

    /// P2pNccl: KV a prefill pushed, kept until this decode's request takes it.
    pub(crate) fn serve_put(&self, key: String, contents: Vec<u64>) {
        self.lock().pushed.insert(key, Pushed { contents, expires: Instant::now() + self.cfg.kv_lease });
        self.leased.notify_one();
        self.handed_over.notify_waiters();
    }

    /// P2pNccl: waits for the KV pushed under `key` for as long as the request is there
    /// (vLLM 0.10's decode waits without a bound). `None`: the request went away.
    async fn wait_pushed(&self, seq_id: u64, key: &str) -> Option<Vec<u64>> {
        loop {
            let handed = self.handed_over.notified();
            if let Some(p) = self.lock().pushed.remove(key) {
                return Some(p.contents);
            }
            if !self.is_running(seq_id) {
                return None;
            }
            let _ = tokio::time::timeout(RECHECK, handed).await;
        }
    }

    /// Whether request `seq_id` is still admitted (its client has not gone).
    fn is_running(&self, seq_id: u64) -> bool {
        self.lock().running.iter().any(|s| s.id == seq_id && !s.tx.is_closed())
    }

    /// Ends the leases of KV nobody took: held blocks, pushed KV, remembered aborts; true
    /// while some lease is still live.
    pub(crate) fn expire_leases(&self) -> bool {
        let now = Instant::now();
        let (expired, live) = {
            let mut guard = self.lock();
            let State { cache, held, pushed, abandoned, .. } = &mut *guard;
            let before = held.len() + pushed.len();
            held.retain(|id, h| {
                let live = h.expires > now;
                if !live {
                    tracing::warn!(engine = self.rank, request_id = %id, "releasing expired KV blocks: no decode pulled them");
                    cache.release(&h.blocks);
                }
                live
            });
            pushed.retain(|id, p| {
                let live = p.expires > now;
                if !live {
                    tracing::warn!(engine = self.rank, request_id = %id, "dropping pushed KV: no request took it");
                }
                live
            });
            abandoned.retain(|_, until| *until > now);
            (before - held.len() - pushed.len(), !(held.is_empty() && pushed.is_empty() && abandoned.is_empty()))
        };
        if expired > 0 {
            bump(&self.stats.leases_expired, expired);
            self.wake.notify_one();
        }
        live
    }
}
