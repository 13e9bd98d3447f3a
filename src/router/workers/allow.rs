//! Which hosts workers added at runtime may be on (docs/SECURITY.md): the admin API's and
//! discovery's additions are checked here; the command line's workers are taken as given.

use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

/// A network as a flag gives it: CIDR, or one address.
pub(crate) fn parse_network(s: &str) -> Result<IpNet, String> {
    s.parse::<IpNet>()
        .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| format!("`{s}` is not a network: write it as CIDR (10.0.0.0/16, fd00::/8) or one address"))
}

/// A set of networks; empty: none.
#[derive(Clone, Debug, Default)]
pub(crate) struct Networks(pub Vec<IpNet>);

impl Networks {
    pub(crate) fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.0.iter().any(|n| n.contains(&ip))
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Why a worker may not be added where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum HostRefused {
    OutsideAllow(IpAddr),
    /// Link-local, multicast, broadcast or unspecified.
    NotAWorkerAddress(IpAddr),
    /// The router's own port on one of its own addresses.
    TheRouterItself(SocketAddr),
    BadUrl {
        url: String,
        why: String,
    },
    Unresolved {
        host: String,
        why: String,
    },
    /// One of the addresses a worker URL's name resolves to is refused.
    Resolved {
        url: String,
        refused: Box<HostRefused>,
    },
}

impl std::fmt::Display for HostRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HostRefused::OutsideAllow(ip) => write!(f, "{ip} is outside --worker-allow"),
            HostRefused::NotAWorkerAddress(ip) => {
                write!(f, "{ip} is not a worker's address (link-local, multicast, broadcast or unspecified)")
            }
            HostRefused::TheRouterItself(addr) => write!(f, "{addr} is this router itself"),
            HostRefused::BadUrl { url, why } => write!(f, "{url}: {why}"),
            HostRefused::Unresolved { host, why } => write!(f, "{host} {why}"),
            HostRefused::Resolved { url, refused } => write!(f, "worker {url}: {refused}"),
        }
    }
}

/// Where workers added at runtime may be.
#[derive(Clone, Debug)]
pub(crate) struct WorkerHosts {
    /// --worker-allow (empty: the default rule).
    pub(crate) allow: Networks,
    /// The router's own listening port (a worker there on a local address would be the
    /// router itself: every leg would come back to it).
    pub(crate) own_port: u16,
}

impl WorkerHosts {
    /// Whether a worker at `addr` may be added; the error says why not.
    pub(crate) fn check(&self, addr: SocketAddr) -> Result<(), HostRefused> {
        let ip = addr.ip().to_canonical();
        if !self.allow.is_empty() {
            return if self.allow.contains(ip) { Ok(()) } else { Err(HostRefused::OutsideAllow(ip)) };
        }
        let link_local = match ip {
            IpAddr::V4(v4) => v4.is_link_local() || v4.is_broadcast(),
            IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80,
        };
        if ip.is_unspecified() || ip.is_multicast() || link_local {
            return Err(HostRefused::NotAWorkerAddress(ip));
        }
        if addr.port() == self.own_port && (ip.is_loopback() || local_address(ip)) {
            return Err(HostRefused::TheRouterItself(addr));
        }
        Ok(())
    }

    /// `check` for a worker URL: its host as written, or every address its name resolves to.
    pub(crate) async fn check_url(&self, url: &str) -> Result<(), HostRefused> {
        let bad_url = |why: String| HostRefused::BadUrl { url: url.to_string(), why };
        let parsed = reqwest::Url::parse(url).map_err(|e| bad_url(e.to_string()))?;
        let host = parsed.host_str().ok_or_else(|| bad_url("no host".into()))?.trim_start_matches('[').trim_end_matches(']').to_string();
        let unresolved = |why: String| HostRefused::Unresolved { host: host.clone(), why };
        let port = parsed.port_or_known_default().unwrap_or(80);
        let addrs: Vec<SocketAddr> = match host.parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, port)],
            Err(_) => tokio::time::timeout(std::time::Duration::from_secs(5), tokio::net::lookup_host((host.as_str(), port)))
                .await
                .map_err(|_| unresolved("did not resolve within 5 s".into()))?
                .map_err(|e| unresolved(format!("does not resolve: {e}")))?
                .collect(),
        };
        if addrs.is_empty() {
            return Err(unresolved("resolves to no address".into()));
        }
        addrs.into_iter().try_for_each(|a| self.check(a).map_err(|e| HostRefused::Resolved { url: url.to_string(), refused: Box::new(e) }))
    }
}

/// Whether `ip` is one of this machine's own addresses (it can be bound).
fn local_address(ip: IpAddr) -> bool {
    std::net::TcpListener::bind(SocketAddr::new(ip, 0)).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts(allow: &[&str]) -> WorkerHosts {
        WorkerHosts { allow: Networks(allow.iter().map(|n| parse_network(n).unwrap()).collect()), own_port: 30000 }
    }

    #[test]
    fn the_default_rule_refuses_metadata_multicast_and_the_router_itself() {
        let h = hosts(&[]);
        assert!(h.check("10.1.2.3:8100".parse().unwrap()).is_ok());
        assert!(h.check("127.0.0.1:8100".parse().unwrap()).is_ok());
        for bad in [
            "169.254.169.254:80",
            "0.0.0.0:8100",
            "224.0.0.1:8100",
            "[fe80::1]:8100",
            "[::]:1",
            "127.0.0.1:30000",
            "[::ffff:169.254.169.254]:80",
        ] {
            assert!(h.check(bad.parse().unwrap()).is_err(), "{bad}");
        }
    }

    #[test]
    fn worker_allow_is_the_only_rule_when_given() {
        let h = hosts(&["10.0.0.0/8", "fd00::/8", "192.168.1.7"]);
        assert!(h.check("10.9.9.9:8100".parse().unwrap()).is_ok());
        assert!(h.check("[fd00::5]:8100".parse().unwrap()).is_ok());
        assert!(h.check("192.168.1.7:1".parse().unwrap()).is_ok());
        assert!(h.check("192.168.1.8:1".parse().unwrap()).is_err());
        assert!(h.check("127.0.0.1:8100".parse().unwrap()).is_err());
        assert!(parse_network("10.0.0.0/33").is_err());
    }

    #[tokio::test]
    async fn names_are_checked_by_what_they_resolve_to() {
        assert!(hosts(&["127.0.0.0/8", "::1"]).check_url("http://localhost:8100").await.is_ok());
        assert!(hosts(&["10.0.0.0/8"])
            .check_url("http://localhost:8100")
            .await
            .unwrap_err()
            .to_string()
            .contains("outside --worker-allow"));
        assert!(hosts(&[]).check_url("http://169.254.169.254:80").await.is_err());
    }
}
