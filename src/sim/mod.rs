//! `disagg sim`: a SIMULATED vLLM engine for tests, demos and scale experiments.
//!
//! It speaks vLLM's HTTP API and the KV handoffs of NixlConnector, MooncakeConnector and
//! P2pNcclConnector (docs/PROTOCOLS.md §1-§3: their params, bootstrap server and
//! registration on vLLM's wire) with a deterministic token model instead of a neural
//! network, and a real loopback side channel instead of NIXL, Mooncake or NCCL. Where it differs from vLLM, the difference is documented in
//! docs/SIM.md; the handshake tests run against both.
//!
//! Two rooms: engine/ (the scheduler, KV blocks, token model, the connectors' transfers)
//! and server/ (vLLM's API on top of it); this file starts them.

pub mod engine;
mod instances;
pub(crate) mod server;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;

use crate::api::connector::{Connector, MOONCAKE_BOOTSTRAP_PORT};
use engine::{Engine, EngineConfig};
pub use server::config::SimArgs;

pub(crate) async fn run(args: SimArgs) -> anyhow::Result<()> {
    args.validate().map_err(anyhow::Error::msg)?;
    let tokenizer = match &args.tokenizer {
        Some(dir) => Some(Arc::new(crate::tokenize::ModelTokenizer::load(dir)?)),
        None => None,
    };
    if args.instances == 1 {
        return serve_bound(args, tokenizer, None).await;
    }
    crate::fd_limit::raise();
    // Each instance binds and prints its banner in turn, then all serve together; the
    // first to fail ends the process.
    let mut serving = tokio::task::JoinSet::new();
    for i in 0..args.instances {
        let (bound_tx, bound_rx) = tokio::sync::oneshot::channel();
        let one = args.instance(i);
        let tokenizer = tokenizer.clone();
        serving.spawn(async move { serve_bound(one, tokenizer, Some(bound_tx)).await.with_context(|| format!("instance {i}")) });
        if bound_rx.await.is_err() {
            break;
        }
    }
    match serving.join_next().await {
        Some(Ok(done)) => done,
        Some(Err(e)) => Err(anyhow::anyhow!("an instance's task failed: {e}")),
        None => Ok(()),
    }
}

/// One simulated engine (with its DP ranks): binds, prints its banner (then tells `bound`),
/// serves.
async fn serve_bound(
    args: SimArgs,
    tokenizer: Option<Arc<crate::tokenize::ModelTokenizer>>,
    bound: Option<tokio::sync::oneshot::Sender<()>>,
) -> anyhow::Result<()> {
    let layout = server::dp::Layout::of(&args).map_err(anyhow::Error::msg)?;
    if layout.headless {
        // No HTTP: this node's ranks are reached through the master's API server.
        println!(
            "disagg sim (SIMULATED vLLM engine, no model) headless: DP ranks {}-{} of {}, joining {}",
            layout.own.0,
            layout.own.0 + layout.own.1 - 1,
            layout.size,
            layout.master.as_ref().map_or(String::new(), |(h, p)| crate::api::join_host_port(h, *p))
        );
        return server::dp::join(layout).await;
    }
    let host = args.host.trim_start_matches('[').trim_end_matches(']').to_string();
    let listener =
        TcpListener::bind((host.as_str(), args.port)).await.with_context(|| format!("cannot listen on {}:{}", args.host, args.port))?;
    let port = listener.local_addr()?.port();

    let kv_events = args.kv_events().map_err(anyhow::Error::msg)?;
    let cfg = Arc::new(EngineConfig {
        block_size: args.block_size as usize,
        kv_blocks: args.kv_blocks as usize,
        prefix_caching: args.prefix_caching(),
        max_num_seqs: args.max_num_seqs as usize,
        scheduling: args.scheduling_policy,
        max_num_batched_tokens: args.max_num_batched_tokens as usize,
        timing: args.timing().map_err(anyhow::Error::msg)?,
        speedup: args.speedup,
        hang_after_tokens: args.hang_after_tokens.map(|n| n as usize),
        kv_lease: Duration::from_secs_f64(args.kv_lease_secs),
        kv_load_timeout: Duration::from_millis(args.kv_load_timeout_ms),
        die_on_kv_mismatch: args.die_on_kv_mismatch,
    });
    let side_host = args.advertised_side_host();
    let bind_side = side_host.trim_start_matches('[').trim_end_matches(']').to_string();
    let metrics = engine::metrics::SimMetrics::new();
    let dead = Arc::new(AtomicBool::new(false));
    let mut engines = Vec::new();
    let mut side_ports = Vec::new();
    let mut kv_sources = serde_json::Map::new();
    for (local, rank) in layout.engine_ranks.iter().map(|r| *r as usize).enumerate() {
        let want = args.side_channel_port.map_or(0, |base| base + local as u16);
        let side = TcpListener::bind((bind_side.as_str(), want))
            .await
            .with_context(|| format!("cannot listen on the side channel {side_host}:{want}"))?;
        let side_port = side.local_addr()?.port();
        side_ports.push(side_port);
        let events = match &kv_events {
            Some(kc) => {
                let mut publisher = engine::kv_publisher::Publisher::open(kc, rank, &host).await?;
                publisher.drop_rate = args.kv_events_drop_rate;
                kv_sources.insert(rank.to_string(), serde_json::to_value(&publisher.shown).expect("a config serialises"));
                let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
                tokio::spawn(publisher.run(rank, rx));
                Some(tx)
            }
            None => None,
        };
        let engine = Arc::new(Engine::new(
            rank,
            cfg.clone(),
            side_host.clone(),
            side_port,
            metrics.stats_for(rank, &args.model),
            dead.clone(),
            events,
        ));
        tokio::spawn(engine::side_channel::serve(side, engine.clone()));
        tokio::spawn(engine.clone().run());
        if args.kv_cache_churn > 0.0 {
            tokio::spawn(engine::churn::churn(engine.clone(), args.kv_cache_churn));
        }
        engines.push(engine);
    }

    let bootstrap_port = match args.kv_connector {
        Connector::Mooncake if args.role.produces_kv() => {
            let want = args.mooncake_bootstrap_port.unwrap_or(MOONCAKE_BOOTSTRAP_PORT);
            let listener = TcpListener::bind((host.as_str(), want))
                .await
                .with_context(|| format!("cannot listen on the Mooncake bootstrap port {host}:{want}"))?;
            let port = listener.local_addr()?.port();
            let registry: Vec<(String, String, u16)> =
                engines.iter().map(|e| (e.engine_id.clone(), side_host.clone(), e.side_port)).collect();
            tokio::spawn(engine::mooncake::serve_bootstrap(listener, engine::mooncake::query_body(&registry)));
            Some(port)
        }
        _ => None,
    };
    if let (Connector::P2pNccl, Some(proxy)) = (args.kv_connector, &args.proxy_address) {
        let zmq_address = crate::api::join_host_port(&side_host, side_ports[0]);
        let payload = engine::p2p::ping_payload(args.role.produces_kv(), &crate::api::join_host_port(&side_host, port), &zmq_address);
        tokio::spawn(engine::p2p::register(proxy.clone(), payload, zmq_address));
    }
    let tls = crate::tls::ServerTls::load(&args.tls, crate::tls::Alpn::Http1)?;
    if let (Some(tls), true) = (&tls, args.enable_ssl_refresh) {
        tokio::spawn(tls.clone().reload_on_change());
    }
    println!("{}", server::http::banner(&args, port, &side_ports, bootstrap_port));
    if let Some(bound) = bound {
        let _ = bound.send(());
    }
    let startup_delay = args.startup_delay_ms;
    let joined = Arc::new(AtomicBool::new(layout.master.is_none() || !layout.is_master()));
    let handshake = match (&layout.master, layout.is_master()) {
        (None, _) => None,
        (Some(_), true) => Some(tokio::spawn(server::dp::lead(layout.clone(), joined.clone()))),
        (Some(_), false) => Some(tokio::spawn(server::dp::join(layout.clone()))),
    };
    let sim = Arc::new(server::http::Sim::new(args, engines, metrics, dead, kv_sources, tokenizer, joined));
    if startup_delay > 0 {
        let sim = sim.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(startup_delay)).await;
            sim.ready.store(true, Ordering::SeqCst);
        });
    }
    let serve = serve_http(listener, server::http::router(sim), keep_alive_from_env(), tls);
    match handshake {
        None => serve.await.context("HTTP server failed"),
        Some(handshake) => tokio::select! {
            served = serve => served.context("HTTP server failed"),
            done = handshake => done.context("the DP handshake task failed")?,
        },
    }
}

/// vLLM's keep-alive: uvicorn closes a connection this long after its last answer when
/// nothing more came (`VLLM_HTTP_TIMEOUT_KEEP_ALIVE`, 5 s by default, vllm/envs.py).
fn keep_alive_from_env() -> Duration {
    Duration::from_secs(std::env::var("VLLM_HTTP_TIMEOUT_KEEP_ALIVE").ok().and_then(|v| v.trim().parse().ok()).unwrap_or(5))
}

/// The simulator's HTTP server, as vLLM's behaves on a connection: TCP_NODELAY, and closed
/// once idle for `keep_alive` after an answer (idle_close.rs, armed as uvicorn arms its
/// timer).
async fn serve_http(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    keep_alive: Duration,
    tls: Option<Arc<crate::tls::ServerTls>>,
) -> std::io::Result<()> {
    let builder = Arc::new(hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new()));
    loop {
        let tcp = crate::idle_close::accept(&listener).await;
        let (builder, app) = (builder.clone(), app.clone());
        let acceptor = tls.as_ref().map(|t| t.acceptor());
        tokio::spawn(async move {
            let from = crate::idle_close::IdleFrom::FirstAnswer;
            match acceptor {
                None => crate::idle_close::serve_connection(&builder, tcp, app, keep_alive, from, std::future::pending()).await,
                Some(acceptor) => match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => crate::idle_close::serve_connection(&builder, tls, app, keep_alive, from, std::future::pending()).await,
                    Ok(Err(e)) => tracing::info!("TLS handshake failed: {}", crate::tls::describe(&e)),
                    Err(_) => tracing::info!("a client did not finish its TLS handshake in 10 s"),
                },
            }
        });
    }
}
