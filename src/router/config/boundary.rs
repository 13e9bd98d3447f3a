//! Where the router's trust ends (docs/SECURITY.md): which hosts workers added at runtime
//! may be on, what the engines' network may register, and the bounds on what clients hold.
//! The command line is trusted as given; the admin API (a key that may leak) and
//! discovery (anyone on the engines' network) are not.

use clap::Args;
use ipnet::IpNet;

use crate::router::workers::allow::{parse_network, Networks, WorkerHosts};

#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "Network boundary")]
pub(crate) struct BoundaryArgs {
    /// A network (CIDR, e.g. 10.0.0.0/16; repeatable) that workers added at runtime (admin
    /// API, discovery) must be on; a name must resolve into it. Without any: every host but
    /// link-local (cloud metadata), multicast and unspecified addresses, and the router's
    /// own port. Workers on the command line are taken as given.
    #[arg(long, value_name = "CIDR", value_parser = parse_network, action = clap::ArgAction::Append)]
    pub(crate) worker_allow: Vec<IpNet>,
    /// A network (CIDR; repeatable) whose hosts may register engines on other hosts of
    /// these networks. Without it, a registration must name the host it came from (its
    /// source address), for both its HTTP and its KV address.
    #[arg(long, value_name = "CIDR", value_parser = parse_network, action = clap::ArgAction::Append)]
    pub(crate) discovery_allow: Vec<IpNet>,
    /// Most engines registered, and connections open, per source host at the discovery
    /// address.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub(crate) discovery_max_per_host: u64,
    /// Request-body bytes held at once over all connections (bodies being read and their
    /// requests in flight); a body that would pass it is refused with 503.
    #[arg(long, value_name = "BYTES", default_value_t = 1 << 30, value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) max_body_bytes_in_flight: u64,
    /// Most requests in flight on one HTTP/2 connection.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub(crate) h2_max_concurrent_streams: u32,
}

/// The checked boundary settings.
#[derive(Clone, Debug)]
pub(crate) struct BoundaryConfig {
    pub(crate) worker_hosts: WorkerHosts,
    pub(crate) discovery_allow: Networks,
    pub(crate) discovery_per_host: usize,
    pub(crate) body_budget: usize,
    pub(crate) h2_streams: u32,
}

impl BoundaryArgs {
    /// The settings for a router listening on `port`.
    pub(crate) fn to_config(&self, port: u16) -> BoundaryConfig {
        BoundaryConfig {
            worker_hosts: WorkerHosts { allow: Networks(self.worker_allow.clone()), own_port: port },
            discovery_allow: Networks(self.discovery_allow.clone()),
            discovery_per_host: self.discovery_max_per_host as usize,
            body_budget: usize::try_from(self.max_body_bytes_in_flight).unwrap_or(usize::MAX),
            h2_streams: self.h2_max_concurrent_streams,
        }
    }
}
