//! Publishes one DP engine's KV events as vLLM's ZmqEventPublisher does
//! (api/kv_events.rs has the wire format): a PUB socket bound or connected per
//! `--kv-events-config` (port + DP rank), each step's events one batch with the next
//! sequence number, the last `buffer_steps` batches kept for the replay ROUTER.

use std::collections::{HashMap, VecDeque};

use anyhow::Context;
use bytes::Bytes;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use crate::api::kv_events::{encode, is_bind_endpoint, EventBatch, KvEvent, KvEventsConfig, END_SEQ};
use crate::zmtp::{self, Accepted, ConnectionLimits, Inbound, Incoming, Limits, SocketType};

/// What a subscriber or a replay client may send us: subscriptions and replay requests.
const PEER_LIMITS: Limits = Limits::SMALL;
/// Batches queued to one subscriber before newer ones are dropped (vLLM's default hwm).
const SEND_QUEUE: usize = 100_000;

/// A ZMQ endpoint's `host:port` to bind: a wildcard host becomes `host` (what the
/// simulator listens on), as vLLM's wildcard binds its node.
fn concrete(endpoint: &str, host: &str) -> String {
    let host = crate::api::url_host(host);
    let address = endpoint.strip_prefix("tcp://").unwrap_or(endpoint);
    address.replace("[::]", &host).replace('*', &host)
}

/// Binds `endpoint`'s address; events of what connects go to the returned channel.
async fn bind(endpoint: &str, host: &str, me: SocketType) -> anyhow::Result<(String, mpsc::Receiver<Accepted>)> {
    if !endpoint.starts_with("tcp://") {
        anyhow::bail!("KV events: only tcp:// endpoints are simulated, not {endpoint}");
    }
    let address = concrete(endpoint, host);
    let bracketless = address.replace(['[', ']'], "");
    let (h, p) = bracketless.rsplit_once(':').with_context(|| format!("KV events: {endpoint} has no port"))?;
    let listener = TcpListener::bind((h, p.parse::<u16>().with_context(|| format!("KV events: bad port in {endpoint}"))?))
        .await
        .with_context(|| format!("KV events: cannot bind {endpoint}"))?;
    let bound = listener.local_addr()?;
    let (tx, rx) = mpsc::channel(1024);
    let caps = ConnectionLimits { max_connections: 1024, per_host: 1024, idle: None, send_queue: SEND_QUEUE };
    tokio::spawn(zmtp::serve(listener, me, PEER_LIMITS, caps, tx));
    Ok((format!("tcp://{bound}"), rx))
}

/// `endpoint` as configured, its port 0 replaced by the one bound (`tcp://*:0` stays a
/// wildcard endpoint, as subscribers expect of one the engine binds).
fn with_bound_port(endpoint: &str, bound: &str) -> String {
    match (endpoint.strip_suffix(":0"), bound.rsplit_once(':')) {
        (Some(base), Some((_, port))) => format!("{base}:{port}"),
        _ => endpoint.to_string(),
    }
}

/// Connects out to `endpoint` (vLLM's publisher connects to non-wildcard endpoints),
/// again whenever the connection ends; its events go to the returned channel.
fn dial(endpoint: String, me: SocketType) -> mpsc::Receiver<Accepted> {
    let (tx, rx) = mpsc::channel(1024);
    tokio::spawn(async move {
        let mut id = 0u64;
        while !tx.is_closed() {
            match zmtp::connect(&endpoint, me, b"", PEER_LIMITS).await {
                Ok(conn) => {
                    id += 1;
                    let (mut receiver, mut writer) = conn.split();
                    let (to_peer, mut queued) = mpsc::channel::<Bytes>(SEND_QUEUE);
                    let peer = ([0, 0, 0, 0], 0).into();
                    if tx.send(Accepted::Connected { id, to_peer }).await.is_err() {
                        return;
                    }
                    loop {
                        tokio::select! {
                            incoming = receiver.recv() => match incoming {
                                Ok(incoming) => { let _ = tx.send(Accepted::Received(Inbound { id, peer, incoming })).await; }
                                Err(_) => break,
                            },
                            framed = queued.recv() => match framed {
                                Some(f) => if writer.send_framed(&f).await.is_err() { break },
                                None => break,
                            },
                        }
                    }
                    let _ = tx.send(Accepted::Closed { id }).await;
                }
                Err(e) => tracing::debug!("KV events: cannot connect to {endpoint}: {e}"),
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    });
    rx
}

/// The sockets of one rank, ready; `sources` gets the config as /kv_event_sources shows it.
pub(crate) struct Publisher {
    subscribers: mpsc::Receiver<Accepted>,
    replay: Option<mpsc::Receiver<Accepted>>,
    topic: Bytes,
    buffer_steps: usize,
    /// Fraction of batches not sent live (still buffered for replay): --kv-events-drop-rate.
    pub(crate) drop_rate: f64,
    pub(crate) shown: KvEventsConfig,
}

/// A subscriber: where its batches go, and the topic prefixes it asked for.
struct Subscriber {
    to_peer: mpsc::Sender<Bytes>,
    topics: Vec<Bytes>,
}

impl Publisher {
    pub(crate) async fn open(cfg: &KvEventsConfig, rank: usize, host: &str) -> anyhow::Result<Publisher> {
        let mut shown = cfg.for_rank(rank);
        let subscribers = if is_bind_endpoint(&shown.endpoint) {
            let (bound, rx) = bind(&shown.endpoint, host, SocketType::Pub).await?;
            shown.endpoint = with_bound_port(&shown.endpoint, &bound);
            rx
        } else {
            dial(shown.endpoint.clone(), SocketType::Pub)
        };
        let replay = match &shown.replay_endpoint {
            Some(ep) => {
                let (bound, rx) = bind(ep, host, SocketType::Router).await.context("the replay endpoint")?;
                shown.replay_endpoint = Some(with_bound_port(ep, &bound));
                Some(rx)
            }
            None => None,
        };
        Ok(Publisher {
            subscribers,
            replay,
            topic: Bytes::from(shown.topic.clone().into_bytes()),
            buffer_steps: shown.buffer_steps.max(1),
            drop_rate: 0.0,
            shown,
        })
    }

    /// Runs until the engine goes: each batch of events is published, and replay
    /// requests are answered from the buffer.
    pub(crate) async fn run(self, rank: usize, mut rx: mpsc::UnboundedReceiver<Vec<KvEvent>>) {
        let Publisher { subscribers: mut arrivals, mut replay, topic, buffer_steps, drop_rate, .. } = self;
        let mut buffer: VecDeque<(u64, Bytes)> = VecDeque::new();
        let mut seq = 0u64;
        let mut subscribers: HashMap<u64, Subscriber> = HashMap::new();
        let mut replay_peers: HashMap<u64, mpsc::Sender<Bytes>> = HashMap::new();
        loop {
            let replay_event = async {
                match replay.as_mut() {
                    Some(r) => r.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                events = rx.recv() => {
                    let Some(events) = events else { return };
                    let ts = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
                    let payload = Bytes::from(encode(&EventBatch { ts, events, dp_rank: Some(rank as u64) }));
                    // Lost on purpose, as a PUB socket loses batches past its high-water mark.
                    let lost = drop_rate > 0.0 && rand::random::<f64>() < drop_rate;
                    if lost {
                        tracing::debug!("KV events: batch {seq} not published (--kv-events-drop-rate)");
                    } else {
                        let framed = zmtp::encode_message(&[topic.clone(), Bytes::copy_from_slice(&seq.to_be_bytes()), payload.clone()]).freeze();
                        for s in subscribers.values().filter(|s| s.topics.iter().any(|t| topic.starts_with(t))) {
                            // A subscriber past its queue misses the batch (the HWM).
                            let _ = s.to_peer.try_send(framed.clone());
                        }
                    }
                    if buffer.len() == buffer_steps {
                        buffer.pop_front();
                    }
                    buffer.push_back((seq, payload));
                    seq += 1;
                }
                Some(event) = arrivals.recv() => match event {
                    Accepted::Connected { id, to_peer } => { subscribers.insert(id, Subscriber { to_peer, topics: Vec::new() }); }
                    Accepted::Received(Inbound { id, incoming: Incoming::Subscribe(t), .. }) => {
                        if let Some(s) = subscribers.get_mut(&id) { s.topics.push(t); }
                    }
                    Accepted::Received(Inbound { id, incoming: Incoming::Cancel(t), .. }) => {
                        if let Some(s) = subscribers.get_mut(&id) {
                            if let Some(i) = s.topics.iter().position(|x| *x == t) { s.topics.remove(i); }
                        }
                    }
                    Accepted::Closed { id } => { subscribers.remove(&id); }
                    _ => {}
                },
                Some(event) = replay_event => match event {
                    Accepted::Connected { id, to_peer } => { replay_peers.insert(id, to_peer); }
                    Accepted::Received(Inbound { id, incoming: Incoming::Message(frames), .. }) => {
                        let Some(to_peer) = replay_peers.get(&id).cloned() else { continue };
                        // [b"", start]: every buffered batch from `start`, then the end marker.
                        let start = frames.get(1).and_then(|s| s.get(..8)).map_or(0, |b| u64::from_be_bytes(b.try_into().expect("8 bytes")));
                        let topic = topic.clone();
                        let batches: Vec<(u64, Bytes)> = buffer.iter().filter(|(s, _)| *s >= start).cloned().collect();
                        tokio::spawn(async move {
                            for (s, payload) in batches {
                                let reply = zmtp::encode_message(&[Bytes::new(), topic.clone(), Bytes::copy_from_slice(&s.to_be_bytes()), payload]);
                                if to_peer.send(reply.freeze()).await.is_err() { return; }
                            }
                            let end = zmtp::encode_message(&[Bytes::new(), Bytes::new(), Bytes::copy_from_slice(&END_SEQ), Bytes::new()]);
                            let _ = to_peer.send(end.freeze()).await;
                        });
                    }
                    Accepted::Closed { id } => { replay_peers.remove(&id); }
                    _ => {}
                },
            }
        }
    }
}
