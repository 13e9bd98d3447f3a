//! One simulated DP engine: a FIFO waiting queue, continuous batching of up to
//! `max_num_seqs` running requests that share each step, a finite KV block pool, and the
//! KV held for remote decodes until pulled, freed or expired.
//!
//! A step has two phases. Under the lock: drop cancelled requests, admit waiting ones
//! while blocks last, and price the step (prefill of the newly admitted + one decode
//! step). Then sleep that long without the lock. Then, under the lock again, produce one
//! token for every running request and hand it to the request's channel.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::sync::{mpsc, Notify};

use super::blocks::{blocks_for, prompt_block_fingerprints, BlockId, BlockPool};
use super::request::{KvRequest, RemoteKv};
use super::metrics::Stats;
use super::side_channel;
use super::tokens::{non_eos, Generator, EOS};
use crate::api::ApiError;

pub struct EngineConfig {
    pub block_size: usize,
    pub kv_blocks: usize,
    pub max_num_seqs: usize,
    pub prefill_ms_per_1k: f64,
    pub decode_ms_per_token: f64,
    pub hang_after_tokens: Option<usize>,
    pub kv_lease: Duration,
    pub kv_load_timeout: Duration,
    pub die_on_kv_mismatch: bool,
}

/// What the HTTP layer asks an engine to run.
pub struct Job {
    /// The engine-internal id (`cmpl-<base>-0-<hex>`), also the id KV is held under.
    pub request_id: String,
    pub prompt: Vec<u32>,
    pub generator: Generator,
    pub max_tokens: usize,
    pub min_tokens: usize,
    pub ignore_eos: bool,
    pub kv: KvRequest,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    Length,
    Eos,
}

pub enum Event {
    Token(u32),
    Finished { reason: Finish, kv_transfer_params: Option<Value> },
    Failed(ApiError),
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Admitted on the decode side, its KV still being pulled.
    Pulling,
    Ready,
}

struct Seq {
    id: u64,
    job: Job,
    tx: mpsc::UnboundedSender<Event>,
    blocks: Vec<BlockId>,
    generated: usize,
    phase: Phase,
}

struct Held {
    blocks: Vec<BlockId>,
    expires: Instant,
}

struct State {
    pool: BlockPool,
    waiting: VecDeque<Seq>,
    running: Vec<Seq>,
    held: HashMap<String, Held>,
    next_id: u64,
}

fn bump(c: &prometheus::IntCounter, n: usize) {
    c.inc_by(n as u64);
}

/// Gauges read at scrape time.
pub struct Snapshot {
    pub running: usize,
    pub waiting: usize,
    pub blocks_used: usize,
    pub blocks_total: usize,
    pub held_blocks: usize,
    pub held_requests: usize,
}

pub struct Engine {
    pub rank: usize,
    pub engine_id: String,
    side_host: String,
    side_port: u16,
    cfg: Arc<EngineConfig>,
    state: Mutex<State>,
    wake: Notify,
    pub stats: Stats,
    /// Set when the engine "dies" (--die-on-kv-mismatch); the process exits right after.
    dead: Arc<AtomicBool>,
}

/// A running request's output. Dropping it cancels the request (client gone).
pub struct Output {
    rx: mpsc::UnboundedReceiver<Event>,
    engine: Arc<Engine>,
}

impl Output {
    pub async fn next(&mut self) -> Option<Event> {
        self.rx.recv().await
    }

    /// The next event if it is already there.
    pub fn try_next(&mut self) -> Option<Event> {
        self.rx.try_recv().ok()
    }
}

impl Drop for Output {
    fn drop(&mut self) {
        self.rx.close();
        self.engine.wake.notify_one();
    }
}

impl Engine {
    pub fn new(
        rank: usize,
        cfg: Arc<EngineConfig>,
        side_host: String,
        side_port: u16,
        stats: Stats,
        dead: Arc<AtomicBool>,
    ) -> Self {
        Engine {
            rank,
            engine_id: uuid::Uuid::new_v4().to_string(),
            side_host,
            side_port,
            state: Mutex::new(State {
                pool: BlockPool::new(cfg.kv_blocks),
                waiting: VecDeque::new(),
                running: Vec::new(),
                held: HashMap::new(),
                next_id: 0,
            }),
            cfg,
            wake: Notify::new(),
            stats,
            dead,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock would be a bug; keep serving what we can.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn submit(self: &Arc<Self>, job: Job) -> Output {
        let (tx, rx) = mpsc::unbounded_channel();
        {
            let mut st = self.lock();
            let id = st.next_id;
            st.next_id += 1;
            st.waiting.push_back(Seq { id, job, tx, blocks: Vec::new(), generated: 0, phase: Phase::Ready });
        }
        self.wake.notify_one();
        Output { rx, engine: self.clone() }
    }

    pub fn snapshot(&self) -> Snapshot {
        let st = self.lock();
        let pulling = st.running.iter().filter(|s| s.phase == Phase::Pulling).count();
        Snapshot {
            // vLLM counts requests waiting for remote KV as waiting.
            running: st.running.len() - pulling,
            waiting: st.waiting.len() + pulling,
            blocks_used: st.pool.used(),
            blocks_total: st.pool.total(),
            held_blocks: st.held.values().map(|h| h.blocks.len()).sum(),
            held_requests: st.held.len(),
        }
    }

    /// Requests queued or running: the engine's load, for picking a DP rank.
    pub fn load(&self) -> usize {
        let st = self.lock();
        st.waiting.len() + st.running.len()
    }

    pub async fn run(self: Arc<Self>) {
        let reaper = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tick.tick().await;
                reaper.expire_leases();
            }
        });
        loop {
            let (cost_ms, has_work) = self.admit();
            if !has_work {
                self.wake.notified().await;
                continue;
            }
            if cost_ms > 0.0 {
                // The step's time is spent whatever happens, but a request cancelled
                // meanwhile leaves at once (its slot and blocks are freed), as an abort
                // does on vLLM.
                let end = tokio::time::Instant::now() + Duration::from_secs_f64(cost_ms / 1000.0);
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep_until(end) => break,
                        _ = self.wake.notified() => self.drop_cancelled(),
                    }
                }
            } else {
                tokio::task::yield_now().await;
            }
            self.generate();
        }
    }

    /// Phase 1: drop cancelled requests, admit waiting ones, price the step.
    fn admit(self: &Arc<Self>) -> (f64, bool) {
        let cfg = &self.cfg;
        let mut pulls = Vec::new();
        let frees;
        let mut cost_ms = 0.0;
        let has_work;
        {
            let mut guard = self.lock();
            frees = reap_cancelled(&mut guard);
            let State { pool, waiting, running, .. } = &mut *guard;
            while running.len() < cfg.max_num_seqs {
                let Some(head) = waiting.front() else { break };
                let need = blocks_for(head.job.prompt.len() + head.job.max_tokens, cfg.block_size);
                let Some(blocks) = pool.alloc(need) else { break };
                let mut seq = waiting.pop_front().expect("front exists");
                seq.blocks = blocks;
                let p = seq.job.prompt.len();
                match &seq.job.kv {
                    KvRequest::RemotePrefill(remote) => {
                        seq.phase = Phase::Pulling;
                        pulls.push((seq.id, remote.clone(), prompt_block_fingerprints(&seq.job.prompt, cfg.block_size), p));
                    }
                    KvRequest::Local | KvRequest::RemoteDecode => {
                        pool.write_prompt(&seq.blocks, &seq.job.prompt, cfg.block_size);
                        cost_ms += cfg.prefill_ms_per_1k * p as f64 / 1000.0;
                        bump(&self.stats.prompt_tokens, p);
                        bump(&self.stats.prompt_local_compute, p);
                        seq.phase = Phase::Ready;
                    }
                }
                running.push(seq);
            }
            has_work = running.iter().any(|s| self.can_generate(s));
            if has_work {
                cost_ms += cfg.decode_ms_per_token;
            }
        }
        for (seq_id, remote, expected, prompt_len) in pulls {
            let engine = self.clone();
            let timeout = cfg.kv_load_timeout;
            tokio::spawn(async move {
                let outcome = side_channel::read(&remote, timeout).await.and_then(|contents| {
                    let tokens_ok = remote.num_tokens.is_none_or(|n| n == prompt_len);
                    if contents == expected && tokens_ok {
                        Ok(())
                    } else {
                        Err(PullError::Mismatch(format!(
                            "pulled {} KV blocks (remote_num_tokens {:?}) that were not computed from \
                             this prompt ({} tokens, {} blocks): the decode must get the prefill's \
                             prompt byte for byte",
                            contents.len(),
                            remote.num_tokens,
                            prompt_len,
                            expected.len()
                        )))
                    }
                });
                engine.pull_done(seq_id, prompt_len, outcome);
            });
        }
        spawn_frees(frees);
        (cost_ms, has_work)
    }

    fn drop_cancelled(&self) {
        let frees = reap_cancelled(&mut self.lock());
        spawn_frees(frees);
    }

    fn can_generate(&self, s: &Seq) -> bool {
        s.phase == Phase::Ready && self.cfg.hang_after_tokens.is_none_or(|n| s.generated < n)
    }

    /// Phase 2: one token for every running request.
    fn generate(&self) {
        let mut guard = self.lock();
        let State { pool, running, held, .. } = &mut *guard;
        let mut k = 0;
        while k < running.len() {
            if !self.can_generate(&running[k]) {
                k += 1;
                continue;
            }
            let seq = &mut running[k];
            let i = seq.generated;
            let mut token = seq.job.generator.token(i);
            let stop_on_eos = token == EOS && !seq.job.ignore_eos && i >= seq.job.min_tokens;
            if token == EOS && !stop_on_eos {
                token = non_eos(token, i);
            }
            seq.generated += 1;
            bump(&self.stats.generation_tokens, 1);
            if !stop_on_eos {
                let _ = seq.tx.send(Event::Token(token));
            }
            let finish = if stop_on_eos {
                Some(Finish::Eos)
            } else if seq.generated >= seq.job.max_tokens {
                Some(Finish::Length)
            } else {
                None
            };
            match finish {
                Some(reason) => {
                    let seq = running.remove(k);
                    let params = self.finish_blocks(&seq, reason, pool, held);
                    bump(&self.stats.requests_finished, 1);
                    let _ = seq.tx.send(Event::Finished { reason, kv_transfer_params: params });
                }
                None => k += 1,
            }
        }
    }

    /// Frees a finished request's blocks, or, for a prefill leg that stopped on its
    /// length cap, holds the prompt's blocks for the decode and returns the params.
    fn finish_blocks(
        &self,
        seq: &Seq,
        reason: Finish,
        pool: &mut BlockPool,
        held: &mut HashMap<String, Held>,
    ) -> Option<Value> {
        if reason != Finish::Length || seq.job.kv != KvRequest::RemoteDecode {
            pool.release(seq.blocks.iter().copied());
            return None;
        }
        let keep = blocks_for(seq.job.prompt.len(), self.cfg.block_size);
        let (kept, rest) = seq.blocks.split_at(keep);
        pool.release(rest.iter().copied());
        held.insert(
            seq.job.request_id.clone(),
            Held { blocks: kept.to_vec(), expires: Instant::now() + self.cfg.kv_lease },
        );
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
            "remote_prefill_cached_tokens": 0,
        }))
    }

    fn pull_done(&self, seq_id: u64, prompt_len: usize, outcome: Result<(), PullError>) {
        {
            let mut guard = self.lock();
            let State { pool, running, .. } = &mut *guard;
            // Gone: the client left while the pull was in flight.
            let Some(pos) = running.iter().position(|s| s.id == seq_id) else { return };
            match outcome {
                Ok(()) => {
                    running[pos].phase = Phase::Ready;
                    bump(&self.stats.prompt_tokens, prompt_len);
                    bump(&self.stats.prompt_external, prompt_len);
                    bump(&self.stats.transfers_received, 1);
                }
                Err(err) => {
                    let seq = running.remove(pos);
                    pool.release(seq.blocks.iter().copied());
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
            let State { pool, held, .. } = &mut *guard;
            let contents = pool.read(block_ids).ok_or_else(|| "block id out of range".to_string())?;
            match held.remove(request_id) {
                Some(h) => {
                    pool.release(h.blocks);
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
            let State { pool, held, .. } = &mut *guard;
            match held.remove(request_id) {
                Some(h) => {
                    pool.release(h.blocks);
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

    fn expire_leases(&self) {
        let now = Instant::now();
        let expired = {
            let mut guard = self.lock();
            let State { pool, held, .. } = &mut *guard;
            let before = held.len();
            held.retain(|id, h| {
                let live = h.expires > now;
                if !live {
                    tracing::warn!(engine = self.rank, request_id = %id, "releasing expired KV blocks: no decode pulled them");
                    pool.release(h.blocks.iter().copied());
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

/// Removes requests whose client has gone, freeing their blocks. Returns the remote KV
/// of decodes that had not pulled yet: their prefills must be told to free it.
fn reap_cancelled(st: &mut State) -> Vec<RemoteKv> {
    let State { pool, waiting, running, .. } = st;
    let mut frees = Vec::new();
    running.retain(|s| {
        let closed = s.tx.is_closed();
        if closed {
            pool.release(s.blocks.iter().copied());
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

fn spawn_frees(frees: Vec<RemoteKv>) {
    for remote in frees {
        tokio::spawn(async move { side_channel::free(&remote).await });
    }
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
