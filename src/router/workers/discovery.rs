//! P2pNccl service discovery, as vLLM's xPyD proxy does it (docs/PROTOCOLS.md §3): a ZMQ
//! ROUTER bound on --vllm-discovery-address; each engine's rank 0 connects a DEALER (its
//! identity: its zmq address) and sends every 3 s a msgpack map
//! `{"type": "P"|"D", "http_address": "host:port", "zmq_address": "host:port"}`. A new
//! address joins the prefill or decode pool at once (logged); 5 s without a ping and it
//! leaves (its in-flight requests finish); a ping after that joins it again.
//!
//! Anyone on the engines' network can reach this socket, so a registration is taken only
//! under rules (docs/SECURITY.md): it names IP addresses, of the host it came from (or,
//! with --discovery-allow, of those networks); it does not replace a live registration
//! that says otherwise; a source host has at most --discovery-max-per-host; what is
//! refused is counted, and logged within a budget.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use crate::api::join_host_port;
use crate::log_budget::LogBudget;
use crate::router::metrics::Label;
use crate::router::metrics::RouterMetrics;
use crate::router::workers::allow::{Networks, WorkerHosts};
use crate::router::workers::topology::Topology;
use crate::router::workers::url::normalize_url;
use crate::router::workers::Role;
use crate::zmtp::{self, Accepted, ConnectionLimits, Inbound, Incoming, Limits, SocketType};

/// An engine is gone this long after its last ping (vLLM's engines ping every 3 s).
pub(crate) const EXPIRY: Duration = Duration::from_secs(5);
/// Most engines registered at once (a bound on what strangers can make us hold).
const MAX_REGISTERED: usize = 4096;
/// Most connections open at the discovery address.
const MAX_CONNECTIONS: usize = 4096;
/// A connection that sends no ping for this long is closed (engines ping every 3 s).
const SILENT_CONNECTION: Duration = Duration::from_secs(30);

/// One valid registration.
#[derive(Debug, PartialEq, Clone)]
pub(crate) struct Ping {
    pub(crate) role: Role,
    /// The engine's HTTP URL (normalised).
    pub(crate) url: String,
    pub(crate) zmq_address: String,
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
pub(crate) fn parse_ping(payload: &[u8]) -> Result<Ping, String> {
    if payload.len() > Limits::SMALL.max_message {
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

/// Why a registration was not taken (the label it is counted under).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    Malformed,
    /// It names a host name, or a host other than the one it came from.
    NotItsHost,
    /// --discovery-allow / --worker-allow leave it out.
    OutsideNetworks,
    /// A live registration of this URL (or KV address) says otherwise.
    Conflict,
    TooManyFromHost,
    Full,
    /// A connection dropped for what it sent (or did not send in time), or past a cap.
    Connection,
}

impl Label for Refusal {
    fn label(&self) -> &'static str {
        match self {
            Refusal::Malformed => "malformed",
            Refusal::NotItsHost => "not_its_host",
            Refusal::OutsideNetworks => "outside_networks",
            Refusal::Conflict => "conflict",
            Refusal::TooManyFromHost => "too_many_from_host",
            Refusal::Full => "full",
            Refusal::Connection => "connection",
        }
    }
}

/// The rules a registration is held to.
#[derive(Clone)]
pub(crate) struct Rules {
    pub(crate) allow: Networks,
    pub(crate) workers: WorkerHosts,
    pub(crate) per_host: usize,
}

/// A registered engine, under its URL.
struct Registered {
    role: Role,
    zmq_address: String,
    source: IpAddr,
    last_ping: Instant,
}

/// What a registration did.
#[derive(Debug, PartialEq)]
pub(crate) enum Admitted {
    New,
    Refreshed,
}

/// The engines registered, and the rules they came in under.
pub(crate) struct Registry {
    rules: Rules,
    registered: HashMap<String, Registered>,
}

fn ip_of(host_port: &str) -> Option<SocketAddr> {
    let (host, port) = host_port.rsplit_once(':')?;
    let ip: IpAddr = host.trim_start_matches('[').trim_end_matches(']').parse().ok()?;
    Some(SocketAddr::new(ip, port.parse().ok()?))
}

impl Registry {
    pub(crate) fn new(rules: Rules) -> Self {
        Registry { rules, registered: HashMap::new() }
    }

    /// Takes a ping from `source`, or says why not (the reason, and words for the log).
    pub(crate) fn admit(&mut self, ping: &Ping, source: IpAddr, now: Instant) -> Result<Admitted, (Refusal, String)> {
        let source = source.to_canonical();
        let http = ip_of(ping.url.trim_start_matches("http://"))
            .ok_or((Refusal::NotItsHost, format!("{} names a host, not an IP address", ping.url)))?;
        let zmq = ip_of(&ping.zmq_address)
            .ok_or((Refusal::NotItsHost, format!("zmq_address {} names a host, not an IP address", ping.zmq_address)))?;
        for named in [http, zmq] {
            let ip = named.ip().to_canonical();
            if self.rules.allow.is_empty() {
                if ip != source {
                    return Err((
                        Refusal::NotItsHost,
                        format!("a registration from {source} names {ip} (it may name only its own host; see --discovery-allow)"),
                    ));
                }
            } else if !(self.rules.allow.contains(source) && self.rules.allow.contains(ip)) {
                return Err((Refusal::OutsideNetworks, format!("a registration from {source} naming {ip} is outside --discovery-allow")));
            }
            self.rules.workers.check(named).map_err(|e| (Refusal::OutsideNetworks, e.to_string()))?;
        }
        if let Some(r) = self.registered.get_mut(&ping.url) {
            if r.role == ping.role && r.zmq_address == ping.zmq_address && r.source == source {
                r.last_ping = now;
                return Ok(Admitted::Refreshed);
            }
            return Err((
                Refusal::Conflict,
                format!(
                    "{} is registered as a {} with KV address {} from {}; a ping from {source} says {} / {}",
                    ping.url,
                    r.role.as_str(),
                    r.zmq_address,
                    r.source,
                    ping.role.as_str(),
                    ping.zmq_address
                ),
            ));
        }
        if let Some((url, _)) = self.registered.iter().find(|(_, r)| r.zmq_address == ping.zmq_address) {
            return Err((Refusal::Conflict, format!("KV address {} is registered to {url}", ping.zmq_address)));
        }
        if self.registered.values().filter(|r| r.source == source).count() >= self.rules.per_host {
            return Err((
                Refusal::TooManyFromHost,
                format!("{source} has {} engines registered (--discovery-max-per-host)", self.rules.per_host),
            ));
        }
        if self.registered.len() >= MAX_REGISTERED {
            return Err((Refusal::Full, format!("{MAX_REGISTERED} engines registered already")));
        }
        self.registered
            .insert(ping.url.clone(), Registered { role: ping.role, zmq_address: ping.zmq_address.clone(), source, last_ping: now });
        Ok(Admitted::New)
    }

    /// Forgets a registration (its pool refused it).
    fn forget(&mut self, url: &str) {
        self.registered.remove(url);
    }

    /// The registrations silent for longer than EXPIRY, removed: (url, role, zmq address).
    pub(crate) fn expire(&mut self, now: Instant) -> Vec<(String, Role, String)> {
        let gone: Vec<String> =
            self.registered.iter().filter(|(_, r)| now.duration_since(r.last_ping) > EXPIRY).map(|(u, _)| u.clone()).collect();
        gone.into_iter().filter_map(|url| self.registered.remove(&url).map(|r| (url, r.role, r.zmq_address))).collect()
    }
}

/// Binds the discovery socket (before the router says it is up, so a bad address fails
/// the start).
pub(crate) fn bind(address: &str) -> anyhow::Result<std::net::TcpListener> {
    let bare = address.replace(['[', ']'], "");
    let (host, port) = bare.rsplit_once(':').context("--vllm-discovery-address: HOST:PORT")?;
    let listener = std::net::TcpListener::bind((host, port.parse::<u16>().context("--vllm-discovery-address: bad port")?))
        .with_context(|| format!("--vllm-discovery-address: cannot bind {address}"))?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

pub(crate) async fn run(topology: Arc<Topology>, metrics: Arc<RouterMetrics>, listener: std::net::TcpListener, rules: Rules) {
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("discovery: {e}");
            return;
        }
    };
    let (tx, mut rx) = mpsc::channel(1024);
    // Connections per host: room for an engine's reconnects beside its registrations.
    let caps = ConnectionLimits {
        max_connections: MAX_CONNECTIONS,
        per_host: (rules.per_host * 4).max(64),
        idle: Some(SILENT_CONNECTION),
        send_queue: 1,
    };
    tokio::spawn(zmtp::serve(listener, SocketType::Router, Limits::SMALL, caps, tx));
    let mut registry = Registry::new(rules);
    let mut log = LogBudget::new(10, Duration::from_secs(10));
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            event = rx.recv() => match event {
                Some(Accepted::Received(Inbound { peer, incoming: Incoming::Message(mut parts), .. })) => {
                    // A DEALER's message: the payload is its last part.
                    let payload = parts.pop().unwrap_or_default();
                    let admitted = parse_ping(&payload)
                        .map_err(|e| (Refusal::Malformed, e))
                        .and_then(|ping| registry.admit(&ping, peer.ip(), Instant::now()).map(|a| (ping, a)));
                    match admitted {
                        Ok((ping, Admitted::New)) => join(&topology, &mut registry, ping),
                        Ok((_, Admitted::Refreshed)) => {}
                        Err((refusal, why)) => {
                            metrics.refused("discovery", &refusal);
                            if let Some(skipped) = log.take() {
                                tracing::warn!(from = %peer, skipped, "discovery: refused a registration: {why}");
                            }
                        }
                    }
                }
                Some(Accepted::Refused { peer, why }) => {
                    metrics.refused("discovery", &Refusal::Connection);
                    if let Some(skipped) = log.take() {
                        tracing::warn!(from = %peer, skipped, "discovery: dropped a connection: {why}");
                    }
                }
                Some(_) => {}
                None => return,
            },
            _ = tick.tick() => {
                for (url, role, zmq) in registry.expire(Instant::now()) {
                    if let Some(pool) = topology.pool(role) {
                        pool.remove(&url);
                    }
                    tracing::info!(role = role.as_str(), http = %url, %zmq, "discovery: left (no ping for 5 s)");
                }
            }
        }
    }
}

fn join(topology: &Topology, registry: &mut Registry, ping: Ping) {
    let Some(pool) = topology.pool(ping.role) else {
        registry.forget(&ping.url);
        return;
    };
    match pool.add(&ping.url, None, Some(ping.zmq_address.clone())) {
        Ok(_) => tracing::info!(role = ping.role.as_str(), http = %ping.url, zmq = %ping.zmq_address, "discovery: registered"),
        Err(e) => {
            registry.forget(&ping.url);
            tracing::warn!("discovery: {e}");
        }
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

    fn registry(allow: &[&str], per_host: usize) -> Registry {
        Registry::new(Rules {
            allow: Networks(allow.iter().map(|n| n.parse().unwrap()).collect()),
            workers: WorkerHosts { allow: Networks::default(), own_port: 30000 },
            per_host,
        })
    }

    fn ping(role: Role, http: &str, zmq: &str) -> Ping {
        Ping { role, url: format!("http://{http}"), zmq_address: zmq.into() }
    }

    #[test]
    fn a_live_registration_is_not_replaced_and_an_expired_one_comes_back() {
        let mut r = registry(&[], 16);
        let t0 = Instant::now();
        let engine = ping(Role::Prefill, "10.0.0.5:8100", "10.0.0.5:21001");
        let ip: IpAddr = "10.0.0.5".parse().unwrap();
        assert_eq!(r.admit(&engine, ip, t0), Ok(Admitted::New));
        assert_eq!(r.admit(&engine, ip, t0), Ok(Admitted::Refreshed));
        // The same URL, another KV address or role, even from the engine's own host.
        for hijack in [ping(Role::Prefill, "10.0.0.5:8100", "10.0.0.5:6666"), ping(Role::Decode, "10.0.0.5:8100", "10.0.0.5:21001")] {
            assert_eq!(r.admit(&hijack, ip, t0).unwrap_err().0, Refusal::Conflict);
        }
        // Another URL claiming the live engine's KV address.
        assert_eq!(r.admit(&ping(Role::Decode, "10.0.0.5:8200", "10.0.0.5:21001"), ip, t0).unwrap_err().0, Refusal::Conflict);
        // Once expired, the engine's own re-registration (with new values) works.
        let later = t0 + EXPIRY + Duration::from_millis(1);
        assert_eq!(r.expire(later).len(), 1);
        assert_eq!(r.admit(&ping(Role::Prefill, "10.0.0.5:8100", "10.0.0.5:21002"), ip, later), Ok(Admitted::New));
    }

    #[test]
    fn a_registration_names_its_own_host_unless_networks_are_allowed() {
        let mut r = registry(&[], 16);
        let now = Instant::now();
        let stranger: IpAddr = "10.0.0.66".parse().unwrap();
        for p in [
            ping(Role::Prefill, "10.0.0.5:8100", "10.0.0.66:1"),
            ping(Role::Prefill, "10.0.0.66:8100", "10.0.0.5:1"),
            ping(Role::Prefill, "169.254.169.254:80", "169.254.169.254:1"),
        ] {
            assert_eq!(r.admit(&p, stranger, now).unwrap_err().0, Refusal::NotItsHost, "{p:?}");
        }
        assert_eq!(r.admit(&ping(Role::Prefill, "engine.local:8100", "10.0.0.66:1"), stranger, now).unwrap_err().0, Refusal::NotItsHost);
        // An IPv4 peer seen on a dual-stack socket.
        assert_eq!(
            r.admit(&ping(Role::Decode, "10.0.0.66:8100", "10.0.0.66:1"), "::ffff:10.0.0.66".parse().unwrap(), now),
            Ok(Admitted::New)
        );
        let mut r = registry(&["10.0.0.0/24"], 16);
        assert_eq!(r.admit(&ping(Role::Prefill, "10.0.0.5:8100", "10.0.0.5:1"), stranger, now), Ok(Admitted::New));
        assert_eq!(r.admit(&ping(Role::Prefill, "10.0.1.5:8100", "10.0.1.5:1"), stranger, now).unwrap_err().0, Refusal::OutsideNetworks);
        assert_eq!(
            r.admit(&ping(Role::Prefill, "10.0.0.7:8100", "10.0.0.7:1"), "10.9.9.9".parse().unwrap(), now).unwrap_err().0,
            Refusal::OutsideNetworks
        );
    }

    #[test]
    fn one_host_registers_at_most_its_share() {
        let mut r = registry(&[], 2);
        let now = Instant::now();
        let ip: IpAddr = "10.0.0.5".parse().unwrap();
        for port in [8100, 8101] {
            assert_eq!(
                r.admit(&ping(Role::Decode, &format!("10.0.0.5:{port}"), &format!("10.0.0.5:{}", port + 1000)), ip, now),
                Ok(Admitted::New)
            );
        }
        assert_eq!(r.admit(&ping(Role::Decode, "10.0.0.5:8102", "10.0.0.5:9102"), ip, now).unwrap_err().0, Refusal::TooManyFromHost);
        assert_eq!(r.admit(&ping(Role::Decode, "10.0.0.6:8102", "10.0.0.6:9102"), "10.0.0.6".parse().unwrap(), now), Ok(Admitted::New));
    }
}
