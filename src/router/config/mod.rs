//! The router's configuration, checked: what the command line (cli.rs) turns into.

pub mod boundary;
pub mod cli;

use std::time::Duration;

use crate::router::policy::PolicyKind;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Prefill leg then decode leg.
    Disaggregated,
    /// Colocated workers, one leg.
    Regular,
}

#[derive(Debug, Clone)]
pub struct CacheAwareConfig {
    pub cache_threshold: f64,
    pub balance_abs_threshold: usize,
    pub balance_rel_threshold: f64,
    pub eviction_interval: Duration,
    /// Most prompt units (characters, or tokens with a tokenizer) indexed per worker.
    pub max_tree_size: usize,
    /// Units of each prompt's start that are indexed (the rest is not looked at).
    pub max_prefix: usize,
    /// Most index entries for all workers together (each ~100 bytes).
    pub max_entries: usize,
}

#[derive(Debug, Clone)]
pub struct HealthConfig {
    pub interval: Duration,
    pub timeout: Duration,
    pub failure_threshold: u32,
    pub success_threshold: u32,
    pub endpoint: String,
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

/// Per-worker circuit breaker (vllm-router's `--cb-*` flags).
#[derive(Debug, Clone)]
pub struct BreakerConfig {
    pub enabled: bool,
    /// Consecutive failures (within `window`) that open the circuit.
    pub failure_threshold: u32,
    /// Successful probes that close a half-open circuit.
    pub success_threshold: u32,
    /// How long an open circuit ejects the worker (doubled on each reopening, up to 8x).
    pub open_for: Duration,
    /// Failures older than this do not count.
    pub window: Duration,
}

/// Retries of failed legs on other workers.
#[derive(Debug, Clone)]
pub struct RetryConfig {
    /// Extra attempts of a failed leg on other workers (prefill leg; decode leg with the
    /// same KV; colocated leg).
    pub max_retries: u32,
    /// A pair whose decode failed before its first byte is run again once.
    pub rerun_pair: bool,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    pub multiplier: f64,
    pub jitter: f64,
    /// Retries may add this fraction of the requests of the last 10 s ...
    pub budget_ratio: f64,
    /// ... and at least this many per second.
    pub budget_min_per_sec: f64,
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
    pub connector: crate::router::pair::connector::Connector,
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
