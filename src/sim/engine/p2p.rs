//! The simulator's P2pNcclConnector registration (docs/PROTOCOLS.md §3): rank 0 pings the
//! proxy every 3 s the way vLLM's `P2pNcclEngine.ping` does — a DEALER whose identity is
//! the engine's zmq address, sending the msgpack map `{"type": "P"|"D", "http_address",
//! "zmq_address"}`. KV itself moves over the simulator's side channel (side_channel.rs):
//! the zmq address it advertises is that channel's.

use std::time::Duration;

use bytes::Bytes;

use crate::zmtp::{self, Limits, SocketType};

/// vLLM's ping period.
const PING_EVERY: Duration = Duration::from_secs(3);

/// The registration payload.
pub(crate) fn ping_payload(producer: bool, http_address: &str, zmq_address: &str) -> Vec<u8> {
    let map = rmpv::Value::Map(vec![
        ("type".into(), if producer { "P" } else { "D" }.into()),
        ("http_address".into(), http_address.into()),
        ("zmq_address".into(), zmq_address.into()),
    ]);
    let mut out = Vec::new();
    rmpv::encode::write_value(&mut out, &map).expect("writing to a Vec");
    out
}

/// Pings `proxy` (`host:port`) for as long as the simulator runs. A proxy that is not up
/// yet, or restarts, is reached again on a later ping (libzmq reconnects on its own; here a
/// failed send reconnects).
pub(crate) async fn register(proxy: String, payload: Vec<u8>, zmq_address: String) {
    let payload = Bytes::from(payload);
    let mut socket: Option<zmtp::Connection> = None;
    loop {
        if socket.is_none() {
            match zmtp::connect(&proxy, SocketType::Dealer, zmq_address.as_bytes(), Limits::SMALL).await {
                Ok(s) => socket = Some(s),
                Err(e) => tracing::debug!("P2pNccl proxy {proxy} not reachable yet: {e}"),
            }
        }
        if let Some(s) = socket.as_mut() {
            let sent = tokio::time::timeout(PING_EVERY, s.send(std::slice::from_ref(&payload))).await;
            if !matches!(sent, Ok(Ok(()))) {
                tracing::debug!("P2pNccl ping to {proxy} failed; reconnecting");
                socket = None;
            }
        }
        tokio::time::sleep(PING_EVERY).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_payload_is_what_the_router_reads() {
        let ping = crate::router::workers::discovery::parse_ping(&ping_payload(true, "127.0.0.1:8100", "127.0.0.1:21001")).unwrap();
        assert_eq!(ping.zmq_address, "127.0.0.1:21001");
        assert_eq!(ping.url, "http://127.0.0.1:8100");
        assert!(!ping_payload(false, "a:1", "b:2").is_empty());
    }
}
