//! Health: every worker is checked concurrently every interval. A worker is used as soon
//! as its first check passes (the router serves once one prefill and one decode are up,
//! without waiting for the rest); after that, the failure and success thresholds apply.
//! A connection error on a live request marks a worker down at once (workers.rs).

use std::sync::Arc;

use futures_util::future::join_all;

use super::flow::Router;

pub async fn run(router: Arc<Router>) {
    let cfg = router.cfg.health.clone();
    let client = match reqwest::Client::builder().timeout(cfg.timeout).build() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("cannot build the health-check client: {e}");
            return;
        }
    };
    let mut tick = tokio::time::interval(cfg.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let checks = router.pools().into_iter().flat_map(|p| p.workers.iter()).map(|w| {
            let client = &client;
            let cfg = &cfg;
            async move {
                let url = format!("{}{}", w.url, cfg.endpoint);
                let (ok, detail) = match client.get(&url).send().await {
                    Ok(r) if r.status().is_success() => (true, String::new()),
                    Ok(r) => (false, format!("{url} answered {}", r.status())),
                    Err(e) => (false, format!("{url}: {e}")),
                };
                w.record_check(ok, cfg, &detail);
            }
        });
        join_all(checks).await;
    }
}

/// cache_aware's prefix trees are trimmed to --max-tree-size every --eviction-interval.
pub async fn maintain(router: Arc<Router>) {
    let mut tick = tokio::time::interval(router.cfg.cache_aware.eviction_interval);
    tick.tick().await;
    loop {
        tick.tick().await;
        for pool in router.pools() {
            pool.maintain();
        }
    }
}
