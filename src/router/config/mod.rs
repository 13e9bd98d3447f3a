//! The router's configuration, checked: what the command line (cli.rs) turns into.

pub(crate) mod addresses;
pub(crate) mod boundary;
pub(crate) mod cli;
pub(crate) mod elastic;
pub(crate) mod flow_control;
pub(crate) mod keys;
pub(crate) mod observe;
pub(crate) mod passthrough;
pub(crate) mod responses;

use std::time::Duration;

use crate::router::pair::retry::RetryConfig;
use crate::router::policy::{CacheAwareConfig, PolicyKind};
use crate::router::workers::breaker::BreakerConfig;
use crate::router::workers::health::HealthConfig;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Prefill leg then decode leg.
    Disaggregated,
    /// Colocated workers, one leg.
    Regular,
}

/// Every time limit, each its own flag.
#[derive(Debug, Clone)]
pub(crate) struct Timeouts {
    /// A connection's request head must be complete within this long of its start.
    pub(crate) header_read: Duration,
    /// A connection with no request in flight and nothing received for this long closes.
    pub(crate) keep_alive: Duration,
    /// The whole request body must arrive within this long (before a permit is taken).
    pub(crate) body_read: Duration,
    /// The prefill leg's whole answer.
    pub(crate) prefill: Duration,
    /// A streamed decode leg until its first byte.
    pub(crate) decode_first_byte: Duration,
    /// A non-streamed decode leg's whole answer, and the cap on every leg.
    pub(crate) request: Duration,
    /// A relayed stream that sends nothing for this long is failed mid-stream.
    pub(crate) stream_idle: Duration,
    /// How long in-flight requests may finish after SIGTERM.
    pub(crate) shutdown: Duration,
}

/// Keys: clients', the admin's, and the one the router sends to workers.
#[derive(Debug, Clone, Default)]
pub(crate) struct AuthConfig {
    pub(crate) client_keys: Vec<String>,
    pub(crate) admin_key: Option<String>,
    pub(crate) worker_key: Option<String>,
}

/// Everything the router needs, checked.
#[derive(Debug, Clone)]
pub(crate) struct RouterConfig {
    pub(crate) host: String,
    pub(crate) port: u16,
    pub(crate) mode: Mode,
    pub(crate) connector: crate::api::connector::Connector,
    /// Where P2pNccl engines register (`--vllm-discovery-address`).
    pub(crate) discovery: Option<String>,
    /// Each Mooncake prefill's bootstrap server (`http://host:port`), by its URL.
    pub(crate) bootstrap: std::collections::HashMap<String, String>,
    pub(crate) prefill: Vec<String>,
    pub(crate) decode: Vec<String>,
    pub(crate) workers: Vec<String>,
    pub(crate) prefill_policy: PolicyKind,
    pub(crate) decode_policy: PolicyKind,
    pub(crate) cache_aware: CacheAwareConfig,
    pub(crate) model_path: Option<String>,
    /// kv_aware: a request in flight on a rank costs this many uncached blocks.
    pub(crate) kv_aware_load_weight: f64,
    /// kv_aware: a decode holding all but at most this many prompt tokens prefills them
    /// itself (no prefill leg); 0: never.
    pub(crate) kv_aware_decode_alone_tokens: usize,
    /// Response headers naming the prefill and decode (rank) that served a request.
    pub(crate) worker_headers: bool,
    pub(crate) prefill_dp: usize,
    pub(crate) decode_dp: usize,
    pub(crate) max_concurrent: usize,
    pub(crate) queue_size: usize,
    pub(crate) queue_timeout: Duration,
    pub(crate) max_payload: usize,
    pub(crate) max_connections: usize,
    /// Most pairs one request may fan out to (a prompt list times `n`).
    pub(crate) max_pairs: usize,
    pub(crate) timeouts: Timeouts,
    pub(crate) retry: RetryConfig,
    pub(crate) breaker: BreakerConfig,
    pub(crate) health: HealthConfig,
    pub(crate) auth: AuthConfig,
    pub(crate) boundary: crate::router::config::boundary::BoundaryConfig,
    pub(crate) passthrough: passthrough::PassthroughConfig,
    pub(crate) responses: responses::ResponsesConfig,
    pub(crate) flow_control: flow_control::FlowControlConfig,
    pub(crate) observe: crate::router::observe::ObserveConfig,
    pub(crate) elastic: elastic::ElasticConfig,
}
