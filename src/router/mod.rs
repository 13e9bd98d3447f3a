//! `disagg route`: the PD router. The flow of one request is in flow.rs; the failure
//! contract it implements is docs/FAILURES.md.

pub(crate) mod admission;
pub(crate) mod config;
pub(crate) mod flow;
pub(crate) mod front;
pub mod kv_aware;
pub(crate) mod metrics;
pub(crate) mod observe;
pub(crate) mod pair;
pub mod policy;
pub(crate) mod predict;
pub mod request;
pub(crate) mod responses;
pub(crate) mod tenants;
pub mod upstream;
pub(crate) mod workers;

use std::sync::Arc;

use anyhow::Context;
use axum::http::HeaderValue;
use tokio::net::TcpListener;

pub(crate) use config::cli::RouteArgs;
use config::{Mode, RouterConfig};
use flow::Router;
use metrics::{Label, Task};
use policy::Policy;
use workers::topology::Topology;
use workers::{Pool, Role};

pub(crate) fn build(cfg: RouterConfig) -> anyhow::Result<Router> {
    let tokenizer = match &cfg.model_path {
        Some(dir) => Some(Arc::new(crate::tokenize::load_tokenizer(dir).context("--model-path")?)),
        None => None,
    };
    let worker_auth = cfg
        .auth
        .worker_key
        .as_ref()
        .map(|k| HeaderValue::from_str(&format!("Bearer {k}")))
        .transpose()
        .context("--api-key must be printable ASCII")?;
    let pool = |role, urls: &[String], dp, kind| {
        let leg = match role {
            Role::Prefill => policy::slo_aware::LegOf::Prefill,
            Role::Decode => policy::slo_aware::LegOf::Decode,
            Role::Both => policy::slo_aware::LegOf::Whole,
        };
        let policy = Policy::new(kind, &cfg.cache_aware, cfg.kv_aware_load_weight).for_leg(cfg.elastic.slo, leg);
        Pool::new(role, urls, &cfg.bootstrap, dp, policy, &cfg.breaker, &cfg.elastic.seed)
    };
    upstream::legs::new_client().context("cannot build the HTTP client")?;
    let topology = match cfg.mode {
        Mode::Disaggregated => Topology::Disaggregated {
            prefill: pool(Role::Prefill, &cfg.prefill, cfg.prefill_dp, cfg.prefill_policy),
            decode: pool(Role::Decode, &cfg.decode, cfg.decode_dp, cfg.decode_policy),
        },
        Mode::Regular => Topology::Colocated { workers: pool(Role::Both, &cfg.workers, cfg.decode_dp, cfg.decode_policy) },
    };
    for url in &cfg.elastic.pd_pool {
        topology.add_elastic(url, Some(cfg.decode_dp)).map_err(|e| anyhow::anyhow!("--pd-pool: {e}"))?;
    }
    let needs_request_info = topology.pools().any(Pool::needs_request_info);
    let kv_aware = topology.pools().any(Pool::is_kv_aware);
    let model_tokenizer = match (&cfg.model_path, &tokenizer, kv_aware) {
        (Some(dir), Some(t), true) => Some(crate::tokenize::ModelTokenizer::with_tokenizer(dir, t.clone()).context("--model-path")?),
        _ => None,
    };
    let topology = Arc::new(topology);
    let metrics = Arc::new(metrics::RouterMetrics::new());
    let tenants = Arc::new(match &cfg.flow_control.tenants {
        Some(path) => tenants::Tenants::load(path.clone(), cfg.flow_control.replicas).map_err(anyhow::Error::msg)?,
        None => tenants::Tenants::none(),
    });
    Ok(Router {
        needs_request_info,
        topology: topology.clone(),
        admission: Arc::new(admission::Admission::new(
            cfg.max_concurrent,
            cfg.queue_size,
            cfg.queue_timeout,
            tenants.clone(),
            cfg.flow_control.threshold.map(|t| (workers::room::EngineRoom::new(t), topology.clone())),
        )),
        tenants,
        metrics: metrics.clone(),
        tokenizer,
        kv_index: kv_aware.then(Arc::default),
        model_tokenizer,
        worker_auth,
        pairs: Arc::new(pair::Pairs {
            topology: topology.clone(),
            connector: cfg.connector,
            retry: cfg.retry.clone(),
            budget: pair::retry::RetryBudget::new(&cfg.retry),
            metrics: metrics.clone(),
            decode_alone_tokens: cfg.kv_aware_decode_alone_tokens,
            slo: cfg.elastic.slo,
            lean: Default::default(),
            max_prefill_share: cfg.elastic.max_prefill_share,
            legs: pair::HttpLegs,
        }),
        drain: Arc::default(),
        body_budget: crate::api::body::BodyBudget::new(cfg.boundary.body_budget),
        responses: Arc::new(responses::Responses::new(&cfg.responses)),
        observer: observe::Observer::start(&cfg.observe, metrics.clone())?,
        cfg,
    })
}

/// The router's background tasks, each supervised: one that ends or panics is logged,
/// counted (`disagg_router_task_restarts_total{task}`) and started again a second later.
fn background(router: &Arc<Router>, discovery: Option<std::net::TcpListener>, tls: Option<Arc<crate::tls::ServerTls>>) {
    let (topology, metrics, cfg) = (router.topology.clone(), router.metrics.clone(), &router.cfg);
    if let Some(listener) = discovery {
        let b = &cfg.boundary;
        let rules =
            workers::discovery::Rules { allow: b.discovery_allow.clone(), workers: b.worker_hosts.clone(), per_host: b.discovery_per_host };
        let (t, m) = (topology.clone(), metrics.clone());
        supervise(Task::Discovery, &metrics, move || {
            let (t, m, rules) = (t.clone(), m.clone(), rules.clone());
            let listener = listener.try_clone();
            async move {
                match listener {
                    Ok(l) => workers::discovery::run(t, m, l, rules).await,
                    Err(e) => tracing::error!("discovery: the listener cannot be shared again: {e}"),
                }
            }
        });
    }
    if let Some(tls) = tls {
        supervise(Task::TlsReload, &metrics, move || tls.clone().reload_on_change());
    }
    let (t, health, connector) = (topology.clone(), cfg.health.clone(), cfg.connector);
    supervise(Task::Health, &metrics, move || workers::health::run(t.clone(), health.clone(), connector));
    let (t, every) = (topology.clone(), cfg.cache_aware.eviction_interval);
    supervise(Task::Upkeep, &metrics, move || workers::health::maintain(t.clone(), every));
    if let Some(index) = router.kv_index.clone() {
        let t = topology.clone();
        supervise(Task::KvIntake, &metrics, move || kv_aware::intake::run(t.clone(), index.clone()));
    }
    // The engines' own load: kv_aware prices it, flow control's room reads their queues.
    if router.kv_index.is_some() || cfg.flow_control.threshold.is_some() {
        let (t, timeout, auth) = (topology.clone(), cfg.health.timeout, router.worker_auth.clone());
        supervise(Task::EngineLoad, &metrics, move || kv_aware::engine_load::run(t.clone(), timeout, auth.clone()));
    }
    if cfg.flow_control.threshold.is_some() {
        let admission = router.admission.clone();
        supervise(Task::EngineRoom, &metrics, move || admission.clone().watch_room());
    }
    if router.tenants.configured() {
        let tenants = router.tenants.clone();
        supervise(Task::TenantsReload, &metrics, move || tenants.clone().reload_on_change());
    }
}

/// Runs `make()`'s task for as long as the router runs: when it ends or panics, it is
/// logged, counted, and made again after a second.
fn supervise<F, Fut>(task: Task, metrics: &Arc<metrics::RouterMetrics>, make: F)
where
    F: Fn() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let metrics = metrics.clone();
    tokio::spawn(async move {
        loop {
            match tokio::spawn(make()).await {
                Ok(()) => tracing::error!(task = task.label(), "a background task ended; it is started again"),
                Err(e) => tracing::error!(task = task.label(), "a background task failed ({e}); it is started again"),
            }
            metrics.task_restarted(task);
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        }
    });
}

pub(crate) async fn run(args: RouteArgs) -> anyhow::Result<()> {
    let mut cfg = args.to_config().map_err(anyhow::Error::msg)?;
    let tls = crate::tls::ServerTls::load(&args.tls, crate::tls::Alpn::H2AndHttp1)?;
    upstream::client::use_tls(args.worker_tls.client_config()?);
    let serving_threads = args.worker_threads.map(usize::from);
    let host = cfg.host.trim_start_matches('[').trim_end_matches(']').to_string();
    let listener =
        TcpListener::bind((host.as_str(), cfg.port)).await.with_context(|| format!("cannot listen on {}:{}", cfg.host, cfg.port))?;
    let port = listener.local_addr()?.port();
    // Port 0 picked one: it is the port no worker may be on (the router itself).
    cfg.boundary.worker_hosts.own_port = port;
    let discovery = match &cfg.discovery {
        Some(address) => Some(workers::discovery::bind(address)?),
        None => None,
    };
    let router = Arc::new(build(cfg)?);
    background(&router, discovery, tls.clone());
    crate::fd_limit::raise();
    let cfg = &router.cfg;
    let drain = router.drain.clone();
    let threads = serving_threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from));
    let limits = front::server::ConnectionLimits { max_connections: cfg.max_connections, h2_streams: cfg.boundary.h2_streams };
    let connections = front::server::spawn_serving_threads(
        listener.into_std()?,
        threads,
        front::app(router.clone()),
        cfg.timeouts.clone(),
        limits,
        tls.clone(),
        drain.clone(),
    )
    .context("cannot start the serving threads")?;
    let shown_host = crate::api::url_host(&host);
    let scheme = if tls.is_some() { "https" } else { "http" };
    match cfg.mode {
        Mode::Disaggregated => println!(
            "disagg route listening on {scheme}://{shown_host}:{port} mode=pd connector={} prefill={:?} decode={:?} policy={:?}/{:?} dp={}/{}{}",
            cfg.connector.as_str(), cfg.prefill, cfg.decode, cfg.prefill_policy, cfg.decode_policy, cfg.prefill_dp, cfg.decode_dp,
            cfg.discovery.as_ref().map_or(String::new(), |d| format!(" discovery=tcp://{d}"))
                + &if cfg.elastic.pd_pool.is_empty() { String::new() } else { format!(" pd_pool={:?}", cfg.elastic.pd_pool) }
        ),
        Mode::Regular => println!(
            "disagg route listening on {scheme}://{shown_host}:{port} mode=colocated workers={:?} policy={:?} dp={}",
            cfg.workers, cfg.decode_policy, cfg.decode_dp
        ),
    }
    crate::signal::shutdown().await;
    drain.run(cfg.timeouts.shutdown).await;
    connections.closed(std::time::Duration::from_secs(2)).await;
    tracing::info!("stopped");
    Ok(())
}
