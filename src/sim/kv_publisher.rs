//! Publishes one DP engine's KV events as vLLM's ZmqEventPublisher does
//! (api/kv_events.rs has the wire format): a PUB socket bound or connected per
//! `--kv-events-config` (port + DP rank), each step's events one batch with the next
//! sequence number, the last `buffer_steps` batches kept for the replay ROUTER.

use std::collections::VecDeque;

use anyhow::Context;
use bytes::Bytes;
use tokio::sync::mpsc;
use zeromq::{PubSocket, RouterSocket, Socket, SocketRecv, SocketSend, ZmqMessage};

use crate::api::kv_events::{encode, is_bind_endpoint, EventBatch, KvEvent, KvEventsConfig, END_SEQ};

/// A ZMQ endpoint as the zeromq crate takes it: a wildcard host becomes `host` (what the
/// simulator listens on), as vLLM's wildcard binds its node.
fn concrete(endpoint: &str, host: &str) -> String {
    let host = crate::api::url_host(host);
    endpoint.replace("[::]", &host).replace('*', &host)
}

/// The sockets of one rank, ready; `sources` gets the config as /kv_event_sources shows it.
pub struct Publisher {
    publ: PubSocket,
    replay: Option<RouterSocket>,
    topic: Bytes,
    buffer_steps: usize,
    /// Fraction of batches not sent live (still buffered for replay): --kv-events-drop-rate.
    pub drop_rate: f64,
    pub shown: KvEventsConfig,
}

impl Publisher {
    pub async fn open(cfg: &KvEventsConfig, rank: usize, host: &str) -> anyhow::Result<Publisher> {
        let mut shown = cfg.for_rank(rank);
        let mut publ = PubSocket::new();
        if is_bind_endpoint(&shown.endpoint) {
            let bound = publ.bind(&concrete(&shown.endpoint, host)).await.with_context(|| format!("KV events: cannot bind {}", shown.endpoint))?;
            if shown.endpoint.ends_with(":0") {
                shown.endpoint = bound.to_string();
            }
        } else {
            publ.connect(&shown.endpoint).await.with_context(|| format!("KV events: cannot connect to {}", shown.endpoint))?;
        }
        let replay = match &shown.replay_endpoint {
            Some(ep) => {
                let mut r = RouterSocket::new();
                let bound = r.bind(&concrete(ep, host)).await.with_context(|| format!("KV events: cannot bind the replay endpoint {ep}"))?;
                if ep.ends_with(":0") {
                    shown.replay_endpoint = Some(bound.to_string());
                }
                Some(r)
            }
            None => None,
        };
        Ok(Publisher { publ, replay, topic: Bytes::from(shown.topic.clone().into_bytes()), buffer_steps: shown.buffer_steps.max(1), drop_rate: 0.0, shown })
    }

    /// Runs until the engine goes: each batch of events is published, and replay
    /// requests are answered from the buffer.
    pub async fn run(mut self, rank: usize, mut rx: mpsc::UnboundedReceiver<Vec<KvEvent>>) {
        let mut buffer: VecDeque<(u64, Bytes)> = VecDeque::new();
        let mut seq = 0u64;
        let mut replay = self.replay.take();
        loop {
            let request = async {
                match replay.as_mut() {
                    Some(r) => r.recv().await.ok(),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                events = rx.recv() => {
                    let Some(events) = events else { return };
                    let ts = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
                    let payload = Bytes::from(encode(&EventBatch { ts, events, dp_rank: Some(rank as u64) }));
                    let frames = vec![self.topic.clone(), Bytes::copy_from_slice(&seq.to_be_bytes()), payload.clone()];
                    // Lost on purpose, as a PUB socket loses batches past its high-water mark.
                    let lost = self.drop_rate > 0.0 && rand::random::<f64>() < self.drop_rate;
                    if lost {
                        tracing::debug!("KV events: batch {seq} not published (--kv-events-drop-rate)");
                    } else if let Err(e) = self.publ.send(ZmqMessage::try_from(frames).expect("three frames")).await {
                        tracing::warn!("KV events: publishing batch {seq} failed: {e}");
                    }
                    if buffer.len() == self.buffer_steps {
                        buffer.pop_front();
                    }
                    buffer.push_back((seq, payload));
                    seq += 1;
                }
                Some(msg) = request => {
                    let frames = msg.into_vec();
                    let (Some(id), Some(start)) = (frames.first(), frames.get(2)) else { continue };
                    let start = start.get(..8).map_or(0, |b| u64::from_be_bytes(b.try_into().expect("8 bytes")));
                    let r = replay.as_mut().expect("a request came from it");
                    for (s, payload) in buffer.iter().filter(|(s, _)| *s >= start) {
                        let reply = vec![id.clone(), Bytes::new(), self.topic.clone(), Bytes::copy_from_slice(&s.to_be_bytes()), payload.clone()];
                        let _ = r.send(ZmqMessage::try_from(reply).expect("frames")).await;
                    }
                    let end = vec![id.clone(), Bytes::new(), Bytes::new(), Bytes::copy_from_slice(&END_SEQ), Bytes::new()];
                    let _ = r.send(ZmqMessage::try_from(end).expect("frames")).await;
                }
            }
        }
    }
}
