//! Health: every worker is checked once every interval, spread over it (each worker in
//! one of [`SLICES`] slices by its URL's hash, so a thousand workers are never checked in
//! one burst), a worker just added is checked at the next slice's tick, and a worker that
//! is down is rechecked every second too, so one that comes up (or back) is used within a
//! second. A worker is used as soon as its first check passes (the router serves once one
//! prefill and one decode are up, without waiting for the rest); after that, the failure
//! and success thresholds apply. A connection error on a live request marks a worker down
//! at once (workers.rs).

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;

use crate::api::connector::Connector;
use crate::router::workers::topology::Topology;
use crate::router::workers::Role;

#[derive(Debug, Clone)]
pub(crate) struct HealthConfig {
    pub(crate) interval: Duration,
    pub(crate) timeout: Duration,
    pub(crate) failure_threshold: u32,
    pub(crate) success_threshold: u32,
    pub(crate) endpoint: String,
}

/// How often a worker that is down is rechecked, whatever the interval.
const DOWN_RECHECK: std::time::Duration = std::time::Duration::from_secs(1);
/// The interval is cut into this many slices; a worker is checked in its own.
const SLICES: u64 = 16;

/// The slice of `SLICES` a worker's checks fall in.
fn slice_of(url: &str) -> u64 {
    crate::api::fnv1a(crate::api::FNV_OFFSET, url.as_bytes()) % SLICES
}

pub(crate) async fn run(topology: Arc<Topology>, cfg: HealthConfig, connector: Connector) {
    let client = match crate::router::upstream::legs::control_client(Some(cfg.timeout)) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("cannot build the health-check client: {e}");
            return;
        }
    };
    let step = (cfg.interval / SLICES as u32).max(std::time::Duration::from_millis(10));
    let down_every = (DOWN_RECHECK.as_nanos() / step.as_nanos()).max(1) as u64;
    let mut tick = tokio::time::interval(step);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for n in 0u64.. {
        tick.tick().await;
        // The first tick checks every worker (the router serves once one of each role is
        // up); then each tick a worker just added, its slice, and those down every second.
        let slice = n % SLICES;
        let recheck_down = n % down_every == 0;
        for pool in topology.pools() {
            pool.remove_drained();
        }
        let workers = topology.workers();
        let due = workers.iter().filter(|w| n == 0 || w.never_checked() || slice_of(&w.url) == slice || (recheck_down && !w.is_healthy()));
        let checks = due.map(|w| {
            let client = &client;
            let cfg = &cfg;
            async move {
                let url = format!("{}{}", w.url, cfg.endpoint);
                let (mut ok, mut detail) = match client.get(&url).send().await {
                    Ok(r) if r.status().is_success() => (true, String::new()),
                    Ok(r) => (false, format!("{url} answered {}", r.status())),
                    Err(e) => (false, with_tls_hint(&url, crate::router::upstream::legs::chain(&e))),
                };
                // A Mooncake prefill is usable once its decodes can name it: its engine id
                // per DP rank, which changes when the engine restarts.
                if let (true, Connector::Mooncake, Role::Prefill, Some(bootstrap)) = (ok, connector, w.role, &w.kv_address) {
                    match crate::router::upstream::bootstrap::engine_ids(client, bootstrap, w.dp_size()).await {
                        Ok(ids) => {
                            // The bootstrap server lists the ranks the engine serves.
                            if ids.len() < w.dp_size() {
                                w.limit_ranks(ids.len());
                            }
                            w.set_engine_ids(ids);
                        }
                        Err(e) => {
                            tracing::warn!(worker = %w.url, "Mooncake prefill not usable: {e}");
                            (ok, detail) = (false, e);
                        }
                    }
                }
                w.record_check(ok, cfg, &detail);
            }
        });
        join_all(checks).await;
    }
}

/// A failed check's reason; an https worker that drops the connection right after the
/// handshake, when the router presents no client certificate, most likely requires one
/// (vLLM's `--ssl-cert-reqs 2`: uvicorn closes without an alert under TLS 1.3).
fn with_tls_hint(url: &str, error: String) -> String {
    let dropped = error.contains("close_notify") || error.contains("reset by peer");
    if url.starts_with("https://") && dropped && !crate::router::upstream::client::presents_client_certificate() {
        return format!("{url}: {error} (does the worker require a client certificate? --worker-ssl-certfile)");
    }
    format!("{url}: {error}")
}

/// cache_aware's prefix trees are trimmed to --max-tree-size every --eviction-interval.
pub(crate) async fn maintain(topology: Arc<Topology>, every: std::time::Duration) {
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    loop {
        tick.tick().await;
        for pool in topology.pools() {
            pool.maintain().await;
        }
    }
}
