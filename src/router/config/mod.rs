//! The router's configuration, checked: what the command line (cli.rs) turns into.

pub mod boundary;
pub mod cli;

use std::time::Duration;

use crate::router::pair::retry::RetryConfig;
use crate::router::policy::{CacheAwareConfig, PolicyKind};
use crate::router::workers::breaker::BreakerConfig;
use crate::router::workers::health::HealthConfig;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Prefill leg then decode leg.
    Disaggregated,
    /// Colocated workers, one leg.
    Regular,
}

/// Every time limit, each its own flag.
#[derive(Debug, Clone)]
pub struct Timeouts {
    /// A connection's request head must be complete within this long of its start.
    pub header_read: Duration,
    /// A connection with no request in flight and nothing received for this long closes.
    pub keep_alive: Duration,
    /// The whole request body must arrive within this long (before a permit is taken).
    pub body_read: Duration,
    /// The prefill leg's whole answer.
    pub prefill: Duration,
    /// A streamed decode leg until its first byte.
    pub decode_first_byte: Duration,
    /// A non-streamed decode leg's whole answer, and the cap on every leg.
    pub request: Duration,
    /// A relayed stream that sends nothing for this long is failed mid-stream.
    pub stream_idle: Duration,
    /// How long in-flight requests may finish after SIGTERM.
    pub shutdown: Duration,
}

/// Keys: clients', the admin's, and the one the router sends to workers.
#[derive(Debug, Clone, Default)]
pub struct AuthConfig {
    pub client_keys: Vec<String>,
    pub admin_key: Option<String>,
    pub worker_key: Option<String>,
}

/// Everything the router needs, checked.
#[derive(Debug, Clone)]
pub struct RouterConfig {
    pub host: String,
    pub port: u16,
    pub mode: Mode,
    pub connector: crate::api::connector::Connector,
    /// Where P2pNccl engines register (`--vllm-discovery-address`).
    pub discovery: Option<String>,
    /// Each Mooncake prefill's bootstrap server (`http://host:port`), by its URL.
    pub bootstrap: std::collections::HashMap<String, String>,
    pub prefill: Vec<String>,
    pub decode: Vec<String>,
    pub workers: Vec<String>,
    pub prefill_policy: PolicyKind,
    pub decode_policy: PolicyKind,
    pub cache_aware: CacheAwareConfig,
    pub model_path: Option<String>,
    /// kv_aware: a request in flight on a rank costs this many uncached blocks.
    pub kv_aware_load_weight: f64,
    /// kv_aware: a decode holding all but at most this many prompt tokens prefills them
    /// itself (no prefill leg); 0: never.
    pub kv_aware_decode_alone_tokens: usize,
    /// Response headers naming the prefill and decode (rank) that served a request.
    pub worker_headers: bool,
    pub prefill_dp: usize,
    pub decode_dp: usize,
    pub max_concurrent: usize,
    pub queue_size: usize,
    pub queue_timeout: Duration,
    pub max_payload: usize,
    pub max_connections: usize,
    /// Most pairs one request may fan out to (a prompt list times `n`).
    pub max_pairs: usize,
    pub timeouts: Timeouts,
    pub retry: RetryConfig,
    pub breaker: BreakerConfig,
    pub health: HealthConfig,
    pub auth: AuthConfig,
    pub boundary: crate::router::config::boundary::BoundaryConfig,
}
