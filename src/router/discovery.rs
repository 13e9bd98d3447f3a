//! P2pNccl service discovery, as vLLM's xPyD proxy does it (docs/PROTOCOLS.md §3): a ZMQ
//! ROUTER bound on --vllm-discovery-address; each engine's rank 0 connects a DEALER (its
//! identity: its zmq address) and sends every 3 s a msgpack map
//! `{"type": "P"|"D", "http_address": "host:port", "zmq_address": "host:port"}`. A new
//! address joins the prefill or decode pool at once (logged); 5 s without a ping and it
//! leaves (its in-flight requests finish); a ping after that joins it again.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use zeromq::{RouterSocket, Socket, SocketRecv};

use super::cli::{join_host_port, normalize_url};
use super::flow::Router;
use super::workers::Role;

/// An engine is gone this long after its last ping (vLLM's engines ping every 3 s).
pub const EXPIRY: Duration = Duration::from_secs(5);
/// Most engines registered at once (a bound on what strangers can make us hold).
const MAX_REGISTERED: usize = 4096;
/// Largest registration accepted (a real one is under 200 bytes).
const MAX_MESSAGE: usize = 4096;

/// An engine registered under its URL (the map's key).
struct Registered {
    role: Role,
    zmq_address: String,
    last_ping: Instant,
}

/// One valid registration.
#[derive(Debug, PartialEq)]
pub struct Ping {
    pub role: Role,
    /// The engine's HTTP URL (normalised).
    pub url: String,
    pub zmq_address: String,
}

/// `host:port`, IPv6 in brackets.
fn check_address(what: &str, addr: &str) -> Result<String, String> {
    let (host, port) = addr.rsplit_once(':').filter(|(h, _)| !h.is_empty()).ok_or_else(|| format!("{what} `{addr}` is not HOST:PORT"))?;
    let port = port.parse::<u16>().map_err(|_| format!("{what} `{addr}`: bad port"))?;
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if bare.is_empty() || bare.chars().any(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '_'))) {
        return Err(format!("{what} `{addr}`: bad host"));
    }
    Ok(join_host_port(bare, port))
}

/// Reads one registration payload (a msgpack map).
pub fn parse_ping(payload: &[u8]) -> Result<Ping, String> {
    if payload.len() > MAX_MESSAGE {
        return Err(format!("a {}-byte message (registrations are small)", payload.len()));
    }
    let value = rmpv::decode::read_value(&mut &payload[..]).map_err(|e| format!("not msgpack: {e}"))?;
    let map = value.as_map().ok_or("not a msgpack map")?;
    let field = |k: &str| {
        map.iter().find(|(key, _)| key.as_str() == Some(k)).and_then(|(_, v)| v.as_str()).ok_or_else(|| format!("no string `{k}`"))
    };
    let role = match field("type")? {
        "P" => Role::Prefill,
        "D" => Role::Decode,
        other => return Err(format!("type `{other}` is neither P nor D")),
    };
    let http = check_address("http_address", field("http_address")?)?;
    let url = normalize_url(&http)?;
    let zmq_address = check_address("zmq_address", field("zmq_address")?)?;
    Ok(Ping { role, url, zmq_address })
}

/// Binds the discovery socket (before the router says it is up, so a bad address fails
/// the start).
pub async fn bind(address: &str) -> anyhow::Result<RouterSocket> {
    let mut socket = RouterSocket::new();
    socket.bind(&format!("tcp://{address}")).await.with_context(|| format!("--vllm-discovery-address: cannot bind {address}"))?;
    Ok(socket)
}

pub async fn run(router: Arc<Router>, mut socket: RouterSocket) {
    let mut registered: HashMap<String, Registered> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            msg = socket.recv() => {
                let Ok(msg) = msg else { continue };
                // [identity, payload]: the payload is the last frame.
                let Some(payload) = msg.into_vec().pop() else { continue };
                match parse_ping(&payload) {
                    Ok(ping) => register(&router, &mut registered, ping),
                    Err(e) => tracing::warn!("discovery: ignored a registration: {e}"),
                }
            }
            _ = tick.tick() => expire(&router, &mut registered),
        }
    }
}

fn register(router: &Router, registered: &mut HashMap<String, Registered>, ping: Ping) {
    if let Some(r) = registered.get_mut(&ping.url) {
        if r.role == ping.role && r.zmq_address == ping.zmq_address {
            r.last_ping = Instant::now();
            return;
        }
        // The same HTTP address now says something else: it is a new engine.
        leave(router, registered, &ping.url, "re-registered with another role or KV address");
    }
    if registered.len() >= MAX_REGISTERED {
        tracing::warn!("discovery: {MAX_REGISTERED} engines registered already; ignored {}", ping.url);
        return;
    }
    let Some(pool) = router.topology.pool(ping.role) else { return };
    match pool.add(&ping.url, None, Some(ping.zmq_address.clone())) {
        Ok(_) => {
            tracing::info!(role = ping.role.as_str(), http = %ping.url, zmq = %ping.zmq_address, "discovery: registered");
            registered.insert(ping.url, Registered { role: ping.role, zmq_address: ping.zmq_address, last_ping: Instant::now() });
        }
        Err(e) => tracing::warn!("discovery: {e}"),
    }
}

fn leave(router: &Router, registered: &mut HashMap<String, Registered>, url: &str, why: &str) {
    if let Some(r) = registered.remove(url) {
        if let Some(pool) = router.topology.pool(r.role) {
            pool.remove(url);
        }
        tracing::info!(role = r.role.as_str(), http = %url, zmq = %r.zmq_address, "discovery: left ({why})");
    }
}

fn expire(router: &Router, registered: &mut HashMap<String, Registered>) {
    let gone: Vec<String> = registered.iter().filter(|(_, r)| r.last_ping.elapsed() > EXPIRY).map(|(url, _)| url.clone()).collect();
    for url in gone {
        leave(router, registered, &url, "no ping for 5 s");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(pairs: &[(&str, &str)]) -> Vec<u8> {
        let map = rmpv::Value::Map(pairs.iter().map(|(k, v)| (rmpv::Value::from(*k), rmpv::Value::from(*v))).collect());
        let mut out = Vec::new();
        rmpv::encode::write_value(&mut out, &map).unwrap();
        out
    }

    #[test]
    fn reads_vllms_registration_and_rejects_the_rest() {
        let ok = parse_ping(&payload(&[("type", "P"), ("http_address", "127.0.0.1:20001"), ("zmq_address", "127.0.0.1:21001")])).unwrap();
        assert_eq!(ok, Ping { role: Role::Prefill, url: "http://127.0.0.1:20001".into(), zmq_address: "127.0.0.1:21001".into() });
        let v6 = parse_ping(&payload(&[("type", "D"), ("http_address", "[::1]:20002"), ("zmq_address", "::1:21002")])).unwrap();
        assert_eq!((v6.url.as_str(), v6.zmq_address.as_str()), ("http://[::1]:20002", "[::1]:21002"));
        for (bad, says) in [
            (payload(&[("type", "X"), ("http_address", "a:1"), ("zmq_address", "a:2")]), "neither P nor D"),
            (payload(&[("type", "P"), ("zmq_address", "a:2")]), "http_address"),
            (payload(&[("type", "P"), ("http_address", "a:1"), ("zmq_address", "a:99999")]), "bad port"),
            (payload(&[("type", "P"), ("http_address", "a/b@c:1"), ("zmq_address", "a:2")]), "bad host"),
            (b"\xc1".to_vec(), "msgpack"),
            (vec![0x90; 5000], "byte message"),
        ] {
            let e = parse_ping(&bad).unwrap_err();
            assert!(e.contains(says), "{e}");
        }
    }
}
