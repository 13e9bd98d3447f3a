//! `disagg route`: the PD router. The flow of one request is in flow.rs; the failure
//! contract it implements is docs/FAILURES.md.

pub mod admission;
pub mod cli;
pub mod flow;
pub mod health;
pub mod http;
pub mod legs;
pub mod metrics;
pub mod policy;
pub mod relay;
pub mod request;
pub mod workers;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::http::HeaderValue;
use tokio::net::TcpListener;

pub use cli::RouteArgs;
use cli::{Mode, RouterConfig};
use flow::Router;
use policy::Policy;
use workers::{Pool, Role};

/// How long in-flight requests may finish after SIGINT/SIGTERM before the router exits.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

pub fn build(cfg: RouterConfig) -> anyhow::Result<Router> {
    let tokenizer = match &cfg.model_path {
        Some(dir) => {
            let file = std::path::Path::new(dir).join("tokenizer.json");
            Some(tokenizers::Tokenizer::from_file(&file).map_err(|e| anyhow::anyhow!("--model-path: cannot load {}: {e}", file.display()))?)
        }
        None => None,
    };
    let api_key = cfg
        .api_key
        .as_ref()
        .map(|k| HeaderValue::from_str(&format!("Bearer {k}")))
        .transpose()
        .context("--api-key must be printable ASCII")?;
    let pool = |role, urls: &[String], dp, kind| Pool::new(role, urls, dp, Policy::new(kind, urls, &cfg.cache_aware));
    let client = reqwest::Client::builder()
        .tcp_nodelay(true)
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(4096)
        .build()
        .context("cannot build the HTTP client")?;
    Ok(Router {
        prefill: pool(Role::Prefill, &cfg.prefill, cfg.prefill_dp, cfg.prefill_policy),
        decode: pool(Role::Decode, &cfg.decode, cfg.decode_dp, cfg.decode_policy),
        workers: pool(Role::Worker, &cfg.workers, cfg.decode_dp, cfg.decode_policy),
        admission: admission::Admission::new(cfg.max_concurrent, cfg.queue_size, cfg.queue_timeout),
        metrics: Arc::new(metrics::RouterMetrics::new()),
        client,
        tokenizer,
        api_key,
        cfg,
    })
}

pub async fn run(args: RouteArgs) -> anyhow::Result<()> {
    let cfg = args.to_config().map_err(anyhow::Error::msg)?;
    let host = cfg.host.trim_start_matches('[').trim_end_matches(']').to_string();
    let listener = TcpListener::bind((host.as_str(), cfg.port))
        .await
        .with_context(|| format!("cannot listen on {}:{}", cfg.host, cfg.port))?;
    let port = listener.local_addr()?.port();
    let router = Arc::new(build(cfg)?);
    tokio::spawn(health::run(router.clone()));
    tokio::spawn(health::maintain(router.clone()));
    let shown_host = if host.contains(':') { format!("[{host}]") } else { host.clone() };
    let cfg = &router.cfg;
    match cfg.mode {
        Mode::Disaggregated => println!(
            "disagg route listening on http://{shown_host}:{port} mode=pd prefill={:?} decode={:?} policy={:?}/{:?} dp={}/{}",
            cfg.prefill, cfg.decode, cfg.prefill_policy, cfg.decode_policy, cfg.prefill_dp, cfg.decode_dp
        ),
        Mode::Regular => println!(
            "disagg route listening on http://{shown_host}:{port} mode=colocated workers={:?} policy={:?} dp={}",
            cfg.workers, cfg.decode_policy, cfg.decode_dp
        ),
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    let mut graceful = stop_rx.clone();
    let server = axum::serve(listener, http::app(router.clone())).with_graceful_shutdown(async move {
        let _ = graceful.wait_for(|s| *s).await;
        tracing::info!("shutting down: no new connections; in-flight requests get {}s", SHUTDOWN_GRACE.as_secs());
    });
    let mut deadline = stop_rx;
    tokio::select! {
        r = server => r.context("HTTP server failed"),
        _ = async move {
            let _ = deadline.wait_for(|s| *s).await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } => Ok(()),
    }
}

pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => return std::future::pending().await,
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
