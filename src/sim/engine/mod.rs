//! One simulated DP engine: a FIFO waiting queue, continuous batching of up to
//! `max_num_seqs` running requests that share each step, the KV cache with its prefix
//! cache (blocks.rs), and the KV held for remote decodes (transfer.rs).
//!
//! A step has two phases. Under the lock: drop cancelled requests, admit waiting ones
//! while blocks last (a prompt's cached prefix is shared, not recomputed), choose the
//! prefill chunks of the step under --max-num-batched-tokens, and price the step
//! (timing.rs). Then sleep that long without the lock. Then, under the lock again, produce
//! one token for every sequence that is decoding, and publish the step's KV events.

pub(crate) mod blocks;
pub(crate) mod churn;
pub(crate) mod kv_publisher;
pub(crate) mod metrics;
pub(crate) mod mooncake;
pub(crate) mod p2p;
pub(crate) mod request;
pub(crate) mod side_channel;
pub(crate) use crate::api::timing;
pub mod tokens;
pub(crate) mod transfer;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde_json::Value;
use tokio::sync::{mpsc, Notify};

use self::blocks::{blocks_for, fingerprints, BlockId, KvCache, KvEvent};
use self::metrics::Stats;
use self::request::KvRequest;
use self::timing::Timing;
use self::tokens::{non_eos, Generator, EOS};
use self::transfer::{Held, Pushed};
use crate::api::ApiError;

pub(crate) struct EngineConfig {
    pub(crate) block_size: usize,
    pub(crate) kv_blocks: usize,
    pub(crate) prefix_caching: bool,
    pub(crate) max_num_seqs: usize,
    pub(crate) scheduling: SchedulingPolicy,
    pub(crate) max_num_batched_tokens: usize,
    pub(crate) timing: Timing,
    /// Every step's time is divided by this.
    pub(crate) speedup: f64,
    pub(crate) hang_after_tokens: Option<usize>,
    pub(crate) kv_lease: Duration,
    pub(crate) kv_load_timeout: Duration,
    pub(crate) die_on_kv_mismatch: bool,
}

/// How the waiting queue is ordered (vLLM's `--scheduling-policy`).
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum SchedulingPolicy {
    /// By arrival.
    #[default]
    Fcfs,
    /// By `priority` (lower first), then arrival (vLLM's PriorityRequestQueue; the
    /// simulator does not preempt running requests for a better one).
    Priority,
}

/// What the HTTP layer asks an engine to run.
pub(crate) struct Job {
    /// The engine-internal id (`cmpl-<base>-0-<hex>`), also the id KV is held under.
    pub(crate) request_id: String,
    pub(crate) prompt: Vec<u32>,
    pub(crate) generator: Generator,
    pub(crate) max_tokens: usize,
    pub(crate) min_tokens: usize,
    pub(crate) ignore_eos: bool,
    /// vLLM's `priority`: the waiting queue's order under `--scheduling-policy priority`.
    pub(crate) priority: i64,
    /// Tokens that end the request where they are sampled (vLLM's core checks them, as EOS).
    pub(crate) stop_token_ids: Vec<u32>,
    pub(crate) kv: KvRequest,
}

/// How the engine finished a request (vLLM's core statuses).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Finish {
    /// FINISHED_LENGTH_CAPPED: max_tokens reached.
    Length,
    /// FINISHED_STOPPED: EOS or a stop_token_ids token was sampled.
    Stopped,
}

pub(crate) enum Event {
    /// The prompt is in the engine's KV: this many of its tokens came from a cache (the
    /// local prefix cache, or the prefill's, for a pulled prompt, as vLLM reports it).
    Prefilled {
        cached_tokens: usize,
    },
    Token(u32),
    /// The request's end, with its last token (None when that token is EOS, which is
    /// generated but never shown): vLLM sends the last token and the finish together.
    Finished {
        reason: Finish,
        last_token: Option<u32>,
        kv_transfer_params: Option<Value>,
    },
    Failed(ApiError),
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Phase {
    /// Admitted on the decode side, its KV still being pulled.
    Pulling,
    /// Prompt tokens still to compute.
    Prefilling {
        left: usize,
    },
    Decoding,
}

pub(crate) struct Seq {
    pub(crate) id: u64,
    pub(crate) job: Job,
    pub(crate) tx: mpsc::UnboundedSender<Event>,
    pub(crate) blocks: Vec<BlockId>,
    pub(crate) generated: usize,
    /// The generated tokens (their KV fills blocks that get cached).
    pub(crate) output: Vec<u32>,
    /// Blocks recorded in the cache so far.
    pub(crate) committed: usize,
    /// Prompt tokens found cached.
    pub(crate) hit_tokens: usize,
    pub(crate) phase: Phase,
    /// When the request reached the engine.
    pub(crate) arrived: std::time::Instant,
    /// When its last token was made (for the inter-token latency).
    pub(crate) last_token: Option<std::time::Instant>,
}

pub(crate) struct State {
    pub(crate) cache: KvCache,
    pub(crate) waiting: VecDeque<Seq>,
    pub(crate) running: Vec<Seq>,
    pub(crate) held: HashMap<String, Held>,
    /// P2pNccl: KV pushed to this decode, by request id.
    pub(crate) pushed: HashMap<String, Pushed>,
    /// Mooncake transfers a decode gave up on before this prefill held them.
    pub(crate) abandoned: HashMap<String, std::time::Instant>,
    pub(crate) next_id: u64,
}

pub(crate) fn bump(c: &prometheus::IntCounter, n: usize) {
    c.inc_by(n as u64);
}

/// Gauges read at scrape time.
pub(crate) struct Snapshot {
    pub(crate) running: usize,
    pub(crate) waiting: usize,
    pub(crate) blocks_used: usize,
    pub(crate) blocks_total: usize,
    pub(crate) held_blocks: usize,
    pub(crate) held_requests: usize,
}

pub(crate) struct Engine {
    pub(crate) rank: usize,
    pub(crate) engine_id: String,
    pub(crate) side_host: String,
    pub(crate) side_port: u16,
    pub(crate) cfg: Arc<EngineConfig>,
    pub(crate) state: Mutex<State>,
    pub(crate) wake: Notify,
    /// Woken when KV is held for, or pushed to, a transfer (side-channel waiters).
    pub(crate) handed_over: Notify,
    /// Told when a lease starts (held or pushed KV, a remembered abort): the reaper runs
    /// only while one is live, so an idle engine costs no wakeups.
    pub(crate) leased: Notify,
    pub(crate) stats: Stats,
    /// Set when the engine "dies" (--die-on-kv-mismatch); the process exits right after.
    pub(crate) dead: Arc<AtomicBool>,
    /// Where each step's KV events go (--kv-events-config).
    events: Option<mpsc::UnboundedSender<Vec<KvEvent>>>,
}

/// A running request's output. Dropping it cancels the request (client gone).
pub(crate) struct Output {
    rx: mpsc::UnboundedReceiver<Event>,
    engine: Arc<Engine>,
}

impl Output {
    pub(crate) async fn next(&mut self) -> Option<Event> {
        self.rx.recv().await
    }
}

impl Drop for Output {
    fn drop(&mut self) {
        self.rx.close();
        self.engine.wake.notify_one();
    }
}

impl Engine {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        rank: usize,
        cfg: Arc<EngineConfig>,
        side_host: String,
        side_port: u16,
        stats: Stats,
        dead: Arc<AtomicBool>,
        events: Option<mpsc::UnboundedSender<Vec<KvEvent>>>,
    ) -> Self {
        Engine {
            rank,
            engine_id: uuid::Uuid::new_v4().to_string(),
            side_host,
            side_port,
            state: Mutex::new(State {
                cache: KvCache::new(cfg.kv_blocks, cfg.block_size, cfg.prefix_caching),
                waiting: VecDeque::new(),
                running: Vec::new(),
                held: HashMap::new(),
                pushed: HashMap::new(),
                abandoned: HashMap::new(),
                next_id: 0,
            }),
            cfg,
            wake: Notify::new(),
            handed_over: Notify::new(),
            leased: Notify::new(),
            stats,
            dead,
            events,
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock would be a bug; keep serving what we can.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn submit(self: &Arc<Self>, job: Job) -> Output {
        let (tx, rx) = mpsc::unbounded_channel();
        {
            let mut st = self.lock();
            let id = st.next_id;
            st.next_id += 1;
            // Priority scheduling: behind every waiting request of the same or a better
            // priority (they arrived earlier), ahead of the rest.
            let at = match self.cfg.scheduling {
                SchedulingPolicy::Fcfs => st.waiting.len(),
                SchedulingPolicy::Priority => st.waiting.iter().position(|s| s.job.priority > job.priority).unwrap_or(st.waiting.len()),
            };
            st.waiting.insert(
                at,
                Seq {
                    id,
                    job,
                    tx,
                    blocks: Vec::new(),
                    generated: 0,
                    output: Vec::new(),
                    committed: 0,
                    hit_tokens: 0,
                    phase: Phase::Decoding,
                    arrived: std::time::Instant::now(),
                    last_token: None,
                },
            );
        }
        self.wake.notify_one();
        Output { rx, engine: self.clone() }
    }

    pub(crate) fn snapshot(&self) -> Snapshot {
        let st = self.lock();
        let pulling = st.running.iter().filter(|s| s.phase == Phase::Pulling).count();
        Snapshot {
            // vLLM counts requests waiting for remote KV as waiting.
            running: st.running.len() - pulling,
            waiting: st.waiting.len() + pulling,
            blocks_used: st.cache.used(),
            blocks_total: st.cache.total(),
            held_blocks: st.held.values().map(|h| h.blocks.len()).sum(),
            held_requests: st.held.len(),
        }
    }

    /// Requests queued or running: the engine's load, for picking a DP rank.
    pub(crate) fn load(&self) -> usize {
        let st = self.lock();
        st.waiting.len() + st.running.len()
    }

    /// Publishes the KV events recorded since the last call, as one batch.
    pub(crate) fn publish(&self, st: &mut State) {
        let events = st.cache.take_events();
        if let (Some(tx), false) = (&self.events, events.is_empty()) {
            let _ = tx.send(events);
        }
    }

    /// Forgets the prefix cache (vLLM's /reset_prefix_cache).
    pub(crate) fn reset_prefix_cache(&self) {
        let mut st = self.lock();
        st.cache.clear();
        self.publish(&mut st);
    }

    pub(crate) async fn run(self: Arc<Self>) {
        let reaper = self.clone();
        tokio::spawn(async move {
            loop {
                reaper.leased.notified().await;
                loop {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    if !reaper.expire_leases() {
                        break;
                    }
                }
            }
        });
        // Steps follow each other on a schedule of their own: the timer rounds every
        // sleep up (tokio's is 1 ms grained), so each step ends on its due time counted
        // from the previous step's due time, not from when the last sleep woke. Idle time,
        // or a lag past MAX_LAG (a starved machine), restarts the schedule from now.
        const MAX_LAG: Duration = Duration::from_millis(20);
        let mut due: Option<tokio::time::Instant> = None;
        loop {
            let (cost_ms, has_work) = self.admit();
            if !has_work {
                due = None;
                self.wake.notified().await;
                continue;
            }
            let cost_ms = cost_ms / self.cfg.speedup;
            let now = tokio::time::Instant::now();
            let start = due.filter(|d| now.saturating_duration_since(*d) < MAX_LAG).unwrap_or(now);
            let end = start + Duration::from_secs_f64(cost_ms.max(0.0) / 1000.0);
            due = Some(end);
            if end > now {
                // The step's time is spent whatever happens, but a request cancelled
                // meanwhile leaves at once (its slot and blocks are freed), as an abort
                // does on vLLM.
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

    /// Phase 1: drop cancelled requests, admit waiting ones, plan the step's prefill
    /// chunks and price the step.
    fn admit(self: &Arc<Self>) -> (f64, bool) {
        let cfg = &self.cfg;
        let bs = cfg.block_size;
        let mut pulls = Vec::new();
        let frees;
        let (cost_ms, has_work);
        {
            let mut guard = self.lock();
            frees = transfer::reap_cancelled(&mut guard);
            let State { cache, waiting, running, .. } = &mut *guard;
            while running.len() < cfg.max_num_seqs {
                let Some(head) = waiting.front() else { break };
                let prompt = &head.job.prompt;
                let fps = fingerprints(prompt, bs);
                let hashes = &fps[..prompt.len() / bs];
                // vLLM computes at least the prompt's last token.
                let hits = cache.hits(hashes, prompt.len().saturating_sub(1) / bs);
                let need = blocks_for(prompt.len() + head.job.max_tokens, bs).saturating_sub(hits);
                let Some(blocks) = cache.allocate(hashes, hits, need) else { break };
                let mut seq = waiting.pop_front().expect("front exists");
                seq.blocks = blocks;
                seq.hit_tokens = hits * bs;
                seq.committed = hits;
                let p = seq.job.prompt.len();
                bump(&self.stats.prefix_queries, p);
                bump(&self.stats.prefix_hits, seq.hit_tokens);
                bump(&self.stats.prompt_local_hit, seq.hit_tokens);
                match &seq.job.kv {
                    KvRequest::RemotePrefill(remote) => {
                        seq.phase = Phase::Pulling;
                        pulls.push((seq.id, remote.clone(), fps, hits, p));
                    }
                    KvRequest::Local | KvRequest::RemoteDecode(_) => {
                        seq.phase = Phase::Prefilling { left: p - seq.hit_tokens };
                        bump(&self.stats.prompt_tokens, p);
                    }
                }
                running.push(seq);
            }
            // The step: every decoding sequence makes a token; prefills take what is left
            // of the token budget, in arrival order (chunked prefill).
            let decoding = running.iter().filter(|s| self.can_generate(s)).count();
            let mut budget = cfg.max_num_batched_tokens.saturating_sub(decoding);
            let mut chunks = Vec::new();
            for seq in running.iter_mut() {
                if let Phase::Prefilling { left } = seq.phase {
                    let take = left.min(budget);
                    budget -= take;
                    chunks.push(take);
                    seq.phase = Phase::Prefilling { left: left - take };
                    bump(&self.stats.prompt_local_compute, take);
                }
            }
            let ready = running.iter().filter(|s| matches!(s.phase, Phase::Prefilling { left: 0 })).count();
            has_work = decoding + ready > 0 || chunks.iter().any(|t| *t > 0);
            let usage = cache.used() as f64 / cache.total().max(1) as f64;
            cost_ms = cfg.timing.prefill_chunks(chunks) + cfg.timing.decode(usage, decoding + ready);
        }
        for (seq_id, remote, fps, hits, prompt_len) in pulls {
            tokio::spawn(transfer::pull(self.clone(), seq_id, remote, fps, hits, prompt_len));
        }
        transfer::spawn_frees(frees);
        (cost_ms, has_work)
    }

    pub(crate) fn drop_cancelled(&self) {
        let frees = transfer::reap_cancelled(&mut self.lock());
        transfer::spawn_frees(frees);
    }

    /// A wall-clock duration in simulated seconds (scaled back by --speedup).
    fn simulated_secs(&self, wall: Duration) -> f64 {
        wall.as_secs_f64() * self.cfg.speedup
    }

    fn can_generate(&self, s: &Seq) -> bool {
        s.phase == Phase::Decoding && self.cfg.hang_after_tokens.is_none_or(|n| s.generated < n)
    }

    /// Phase 2: prompts whose prefill completed enter the cache; one token for every
    /// decoding sequence (a sequence whose prefill just completed makes its first).
    fn generate(&self) {
        let bs = self.cfg.block_size;
        let mut guard = self.lock();
        let st = &mut *guard;
        for seq in st.running.iter_mut() {
            if seq.phase == (Phase::Prefilling { left: 0 }) {
                st.cache.commit(&seq.blocks, &seq.job.prompt, seq.committed);
                seq.committed = seq.job.prompt.len() / bs;
                seq.phase = Phase::Decoding;
                self.push_computed(seq, &st.cache);
                let _ = seq.tx.send(Event::Prefilled { cached_tokens: seq.hit_tokens });
            }
        }
        let mut k = 0;
        while k < st.running.len() {
            if !self.can_generate(&st.running[k]) {
                k += 1;
                continue;
            }
            let seq = &mut st.running[k];
            let i = seq.generated;
            let mut token = seq.job.generator.token(i);
            let stop_on_eos = token == EOS && !seq.job.ignore_eos && i >= seq.job.min_tokens;
            if token == EOS && !stop_on_eos {
                token = non_eos(token, i);
            }
            // vLLM masks stop tokens before min_tokens, as it masks EOS.
            let stopped = stop_on_eos || (i >= seq.job.min_tokens && seq.job.stop_token_ids.contains(&token));
            seq.generated += 1;
            seq.output.push(token);
            if seq.generated == 1 {
                self.stats.ttft.observe(self.simulated_secs(seq.arrived.elapsed()));
            }
            if let Some(last) = seq.last_token.replace(std::time::Instant::now()) {
                self.stats.itl.observe(self.simulated_secs(last.elapsed()));
            }
            bump(&self.stats.generation_tokens, 1);
            let finish = if stopped {
                Some(Finish::Stopped)
            } else if seq.generated >= seq.job.max_tokens {
                Some(Finish::Length)
            } else {
                None
            };
            if finish.is_none() {
                let _ = seq.tx.send(Event::Token(token));
            }
            // A block the output filled is cached, as vLLM caches decoded blocks. The token
            // just sampled has no KV yet (it is computed when it is fed back).
            let with_kv = seq.job.prompt.len() + seq.output.len() - 1;
            if with_kv % bs == 0 && with_kv / bs > seq.committed {
                let all: Vec<u32> = seq.job.prompt.iter().chain(&seq.output[..seq.output.len() - 1]).copied().collect();
                st.cache.commit(&seq.blocks, &all, seq.committed);
                seq.committed = all.len() / bs;
            }
            match finish {
                Some(reason) => {
                    let seq = st.running.remove(k);
                    let params = self.finish_blocks(&seq, reason, st);
                    bump(&self.stats.requests_finished, 1);
                    self.stats.e2e.observe(self.simulated_secs(seq.arrived.elapsed()));
                    let last_token = (!stop_on_eos).then_some(token);
                    let _ = seq.tx.send(Event::Finished { reason, last_token, kv_transfer_params: params });
                }
                None => k += 1,
            }
        }
        self.publish(&mut guard);
    }
}
