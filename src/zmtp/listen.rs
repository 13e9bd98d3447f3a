//! The bound end of a socket (a ROUTER or a PUB): connections accepted within caps (in
//! all, and per source host), each handshaken within its time, read within `Limits`, and
//! closed after `idle` without a message where one is expected. What they bring, and the
//! means to answer them, go to one channel.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use super::{handshake, Incoming, Limits, SocketType};

/// Bounds on the connections a bound socket holds.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ConnectionLimits {
    pub(crate) max_connections: usize,
    pub(crate) per_host: usize,
    /// A connection that sends nothing for this long is closed (None: subscribers to a
    /// PUB, which send nothing after subscribing).
    pub(crate) idle: Option<Duration>,
    /// Framed messages queued to one connection; past it, a message to it is dropped
    /// (ZeroMQ's high-water mark).
    pub(crate) send_queue: usize,
}

/// What a bound socket hears.
#[derive(Debug)]
pub(crate) enum Accepted {
    /// A peer finished its handshake; `to_peer` sends it framed messages
    /// (`encode_message`) until it goes.
    Connected {
        id: u64,
        to_peer: mpsc::Sender<Bytes>,
    },
    Received(Inbound),
    Closed {
        id: u64,
    },
    /// A connection refused (a cap), or dropped for what it sent (or did not send in time).
    Refused {
        peer: SocketAddr,
        why: String,
    },
}

/// A message (or subscription) from a connected peer.
#[derive(Debug)]
pub(crate) struct Inbound {
    pub(crate) id: u64,
    pub(crate) peer: SocketAddr,
    pub(crate) incoming: Incoming,
}

/// Accepts on `listener` for as long as `tx` is open.
pub(crate) async fn serve(listener: TcpListener, me: SocketType, limits: Limits, caps: ConnectionLimits, tx: mpsc::Sender<Accepted>) {
    let slots = Arc::new(Semaphore::new(caps.max_connections.min(Semaphore::MAX_PERMITS)));
    let hosts: Arc<Mutex<HashMap<IpAddr, usize>>> = Arc::default();
    let mut next_id = 0u64;
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = tx.closed() => return,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(_) => {
                // Out of descriptors and the like: wait rather than spin.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let refuse = |why: String| {
            let _ = tx.try_send(Accepted::Refused { peer, why });
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            refuse(format!("{} connections open already", caps.max_connections));
            continue;
        };
        let Some(host) = HostSlot::take(&hosts, peer.ip(), caps.per_host) else {
            refuse(format!("{} connections from {} open already", caps.per_host, peer.ip()));
            continue;
        };
        next_id += 1;
        tokio::spawn(connection(stream, peer, next_id, me, limits, caps, tx.clone(), (slot, host)));
    }
}

/// One connection's place in the per-host count, given back on drop.
struct HostSlot {
    hosts: Arc<Mutex<HashMap<IpAddr, usize>>>,
    ip: IpAddr,
}

impl HostSlot {
    fn take(hosts: &Arc<Mutex<HashMap<IpAddr, usize>>>, ip: IpAddr, cap: usize) -> Option<HostSlot> {
        let mut map = hosts.lock().expect("the host counts are never poisoned");
        let n = map.entry(ip).or_insert(0);
        if *n >= cap {
            return None;
        }
        *n += 1;
        Some(HostSlot { hosts: hosts.clone(), ip })
    }
}

impl Drop for HostSlot {
    fn drop(&mut self) {
        let mut map = self.hosts.lock().expect("the host counts are never poisoned");
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn connection(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    id: u64,
    me: SocketType,
    limits: Limits,
    caps: ConnectionLimits,
    tx: mpsc::Sender<Accepted>,
    _slots: (OwnedSemaphorePermit, HostSlot),
) {
    let conn = match handshake(stream, me, b"", limits).await {
        Ok(c) => c,
        Err(e) => {
            let _ = tx.try_send(Accepted::Refused { peer, why: e.to_string() });
            return;
        }
    };
    let (mut receiver, mut writer) = conn.split();
    let (to_peer, mut queued) = mpsc::channel::<Bytes>(caps.send_queue.max(1));
    if tx.send(Accepted::Connected { id, to_peer }).await.is_err() {
        return;
    }
    let mut sending = true;
    loop {
        // Reads are cancel-safe (frame.rs): a send or the idle timer may interrupt one.
        let idle = async {
            match caps.idle {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            incoming = receiver.recv() => match incoming {
                Ok(incoming) => {
                    if tx.send(Accepted::Received(Inbound { id, peer, incoming })).await.is_err() {
                        return;
                    }
                }
                Err(super::Error::Closed) => break,
                Err(e) => {
                    let _ = tx.try_send(Accepted::Refused { peer, why: e.to_string() });
                    break;
                }
            },
            framed = queued.recv(), if sending => match framed {
                Some(framed) => {
                    if writer.send_framed(&framed).await.is_err() {
                        break;
                    }
                }
                None => sending = false,
            },
            () = idle => break,
        }
    }
    let _ = tx.send(Accepted::Closed { id }).await;
}
