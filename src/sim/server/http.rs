//! The simulator's HTTP API: vLLM's endpoints, with the fault knobs applied at the door.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::json;

use super::config::SimArgs;
use super::generate::{generate, hex16};
use crate::api::body::{parse_object, read_limited, require_json};
use crate::api::{ApiError, ErrorKind};
use crate::sim::engine::metrics::SimMetrics;
use crate::sim::engine::request::{self, Api};
use crate::sim::engine::Engine;

pub(crate) const MAX_BODY: usize = 64 << 20;

pub(crate) struct Sim {
    pub(crate) args: SimArgs,
    pub(crate) engines: Vec<Arc<Engine>>,
    pub(crate) metrics: SimMetrics,
    pub(crate) ready: AtomicBool,
    /// Every DP rank of the replica has joined (multi-node DP; always true otherwise).
    pub(crate) joined: Arc<AtomicBool>,
    pub(crate) dead: Arc<AtomicBool>,
    /// Generation requests received (for --crash-after-requests).
    pub(crate) seen: AtomicU64,
    /// HTTP generation requests in flight (`/load`).
    pub(crate) in_flight: AtomicUsize,
    started: u64,
    /// Per DP rank, the KV events publisher's config (`/kv_event_sources`).
    pub(crate) kv_sources: serde_json::Map<String, serde_json::Value>,
    /// A real model's tokenizer and chat template (--tokenizer).
    pub(crate) tokenizer: Option<Arc<crate::tokenize::ModelTokenizer>>,
}

pub(crate) fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl Sim {
    pub(crate) fn new(
        args: SimArgs,
        engines: Vec<Arc<Engine>>,
        metrics: SimMetrics,
        dead: Arc<AtomicBool>,
        kv_sources: serde_json::Map<String, serde_json::Value>,
        tokenizer: Option<Arc<crate::tokenize::ModelTokenizer>>,
        joined: Arc<AtomicBool>,
    ) -> Self {
        Sim {
            joined,
            kv_sources,
            tokenizer,
            ready: AtomicBool::new(args.startup_delay_ms == 0),
            args,
            engines,
            metrics,
            dead,
            seen: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            started: now_secs(),
        }
    }
}

/// vLLM's authentication middleware: /v1/* needs one of the --api-key tokens.
async fn authenticate(State(sim): State<Arc<Sim>>, req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    if sim.args.api_keys.is_empty() || !req.uri().path().starts_with("/v1") {
        return next.run(req).await;
    }
    let ok = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .is_some_and(|(scheme, token)| scheme.eq_ignore_ascii_case("bearer") && sim.args.api_keys.iter().any(|k| k == token));
    if ok {
        next.run(req).await
    } else {
        (StatusCode::UNAUTHORIZED, axum::Json(json!({"error": "Unauthorized"}))).into_response()
    }
}

pub(crate) fn router(sim: Arc<Sim>) -> Router {
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/messages", post(super::messages::messages))
        .route("/v1/messages/count_tokens", post(super::messages::count_tokens))
        .route("/health", get(health))
        .route("/v1/models", get(models))
        .route("/load", get(load))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .route("/version", get(version))
        .route("/metrics", get(metrics))
        .route("/kv_event_sources", get(kv_event_sources))
        .route("/reset_prefix_cache", post(reset_prefix_cache))
        .route("/v1/completions/render", post(super::render::completions))
        .route("/inference/v1/generate", post(super::tokens_out::generate))
        .route("/v1/chat/completions/render", post(super::render::chat))
        .route("/v1/messages/render", post(super::render::messages))
        .route("/v1/responses", post(super::responses::responses))
        .route("/v1/responses/render", post(super::render::responses))
        .fallback(|| async { ApiError::new(ErrorKind::NotFound, "Not Found") })
        .layer(axum::middleware::from_fn_with_state(sim.clone(), authenticate))
        .with_state(sim)
}

pub(crate) fn not_serving(sim: &Sim) -> Option<ApiError> {
    if sim.dead.load(Ordering::SeqCst) {
        Some(ApiError::new(ErrorKind::ServiceUnavailable, "engine is dead"))
    } else if !sim.ready.load(Ordering::SeqCst) {
        Some(ApiError::new(ErrorKind::ServiceUnavailable, "engine is starting (--startup-delay-ms)"))
    } else if !sim.joined.load(Ordering::SeqCst) {
        Some(ApiError::new(ErrorKind::ServiceUnavailable, "waiting for the other nodes' DP ranks to join"))
    } else {
        None
    }
}

async fn health(State(sim): State<Arc<Sim>>) -> Response {
    match not_serving(&sim) {
        Some(e) => e.into_response(),
        None => StatusCode::OK.into_response(),
    }
}

async fn models(State(sim): State<Arc<Sim>>) -> Response {
    let m = &sim.args.model;
    axum::Json(json!({"object": "list", "data": [{
        "id": m, "object": "model", "created": sim.started, "owned_by": "vllm", "root": m, "parent": null,
        "max_model_len": sim.args.max_model_len,
        "permission": [{"id": format!("modelperm-{}", hex16()), "object": "model_permission",
            "created": sim.started, "allow_create_engine": false, "allow_sampling": true,
            "allow_logprobs": true, "allow_search_indices": false, "allow_view": true,
            "allow_fine_tuning": false, "organization": "*", "group": null, "is_blocking": false}],
    }]}))
    .into_response()
}

async fn load(State(sim): State<Arc<Sim>>) -> Response {
    axum::Json(json!({"server_load": sim.in_flight.load(Ordering::Relaxed)})).into_response()
}

async fn metrics(State(sim): State<Arc<Sim>>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], sim.metrics.render(&sim.engines, &sim.args.model))
        .into_response()
}

async fn tokenize(State(sim): State<Arc<Sim>>, headers: HeaderMap, body: Body) -> Response {
    let result = async {
        require_json(&headers)?;
        let body = parse_object(&read_limited(&headers, body, MAX_BODY).await?)?;
        request::check_model(&body, &sim.args.model)?;
        let api = if body.contains_key("messages") { Api::Chat } else { Api::Completions };
        let tokens = request::prompt_tokens(api, &body, sim.tokenizer.as_deref())?.swap_remove(0);
        Ok::<_, ApiError>(json!({"count": tokens.len(), "max_model_len": sim.args.max_model_len,
            "tokens": tokens, "token_strs": null}))
    }
    .await;
    match result {
        Ok(v) => axum::Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

/// vLLM's /detokenize: `{"tokens": [...]}` -> `{"prompt": text}` (the model's tokenizer,
/// or the simulator's own token texts).
async fn detokenize(State(sim): State<Arc<Sim>>, headers: HeaderMap, body: Body) -> Response {
    let result = async {
        require_json(&headers)?;
        let body = parse_object(&read_limited(&headers, body, MAX_BODY).await?)?;
        request::check_model(&body, &sim.args.model)?;
        let ids: Vec<u32> = match body.get("tokens") {
            Some(serde_json::Value::Array(items)) => {
                items.iter().map(|v| v.as_u64().and_then(|n| u32::try_from(n).ok())).collect::<Option<_>>()
            }
            _ => None,
        }
        .ok_or_else(|| {
            crate::api::fields::validation_error(
                "body.tokens",
                "list_type",
                "Input should be a valid list",
                body.get("tokens").unwrap_or(&serde_json::Value::Null),
            )
        })?;
        let prompt = match sim.tokenizer.as_deref() {
            Some(t) => t.decode(&ids).map_err(|e| ApiError::bad_request(e.to_string()))?,
            None => ids.iter().map(|id| crate::sim::engine::tokens::token_text(*id)).collect(),
        };
        Ok::<_, ApiError>(json!({"prompt": prompt}))
    }
    .await;
    match result {
        Ok(v) => axum::Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

/// vLLM's /version, naming the simulator.
async fn version() -> Response {
    axum::Json(json!({"version": concat!("disagg-sim ", env!("CARGO_PKG_VERSION"))})).into_response()
}

/// Where each DP rank publishes its KV events (vLLM: `{}` without --kv-events-config).
async fn kv_event_sources(State(sim): State<Arc<Sim>>) -> Response {
    axum::Json(serde_json::Value::Object(sim.kv_sources.clone())).into_response()
}

/// vLLM's prefix-cache reset: every engine forgets its cache (AllBlocksCleared).
async fn reset_prefix_cache(State(sim): State<Arc<Sim>>) -> Response {
    for e in &sim.engines {
        e.reset_prefix_cache();
    }
    StatusCode::OK.into_response()
}

async fn completions(State(sim): State<Arc<Sim>>, headers: HeaderMap, body: Body) -> Response {
    generate(sim, Api::Completions, headers, body).await.unwrap_or_else(IntoResponse::into_response)
}

async fn chat(State(sim): State<Arc<Sim>>, headers: HeaderMap, body: Body) -> Response {
    generate(sim, Api::Chat, headers, body).await.unwrap_or_else(IntoResponse::into_response)
}

/// The first line a test or launcher reads to learn where the sim listens.
pub(crate) fn banner(args: &SimArgs, port: u16, side_ports: &[u16], bootstrap_port: Option<u16>) -> String {
    let bootstrap = bootstrap_port.map(|p| format!(" bootstrap_port={p}")).unwrap_or_default();
    format!(
        "disagg sim (SIMULATED vLLM engine, no model) listening on {}://{}:{port} role={:?} \
         dp={} model={} connector={} side_channel_ports={side_ports:?}{bootstrap}",
        if args.tls.ssl_certfile.is_some() { "https" } else { "http" },
        crate::api::url_host(&args.host),
        args.role,
        side_ports.len(),
        args.model,
        args.kv_connector.as_str(),
    )
}
