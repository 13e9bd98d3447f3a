//! The router's HTTP surface.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{json, Value};

use super::cli::Mode;
use super::flow::{self, Endpoint, Router};
use crate::api::{ApiError, ErrorKind};

pub fn app(router: Arc<Router>) -> axum::Router {
    axum::Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/healthcheck", get(healthcheck))
        .route("/metrics", get(metrics))
        .route("/workers", get(workers))
        .fallback(|| async { ApiError::new(ErrorKind::NotFound, "no such endpoint on disagg route") })
        .with_state(router)
}

async fn completions(State(r): State<Arc<Router>>, headers: HeaderMap, body: Body) -> Response {
    flow::generate(r, Endpoint::Completions, headers, body).await
}

async fn chat(State(r): State<Arc<Router>>, headers: HeaderMap, body: Body) -> Response {
    flow::generate(r, Endpoint::Chat, headers, body).await
}

/// `/v1/models` from the first healthy worker that answers: one dead worker never makes
/// it fail.
async fn models(State(r): State<Arc<Router>>) -> Response {
    let mut tried = Vec::new();
    for pool in [&r.decode, &r.prefill, &r.workers] {
        for w in pool.workers.iter().filter(|w| w.is_healthy()) {
            let url = format!("{}/v1/models", w.url);
            let resp = r.client.get(&url).timeout(Duration::from_secs(5)).send().await;
            match resp {
                Ok(resp) if resp.status().is_success() => {
                    if let Ok(body) = resp.bytes().await {
                        if serde_json::from_slice::<Value>(&body).is_ok() {
                            return ([(header::CONTENT_TYPE, "application/json")], body).into_response();
                        }
                    }
                    tried.push(format!("{url}: not JSON"));
                }
                Ok(resp) => tried.push(format!("{url}: {}", resp.status())),
                Err(e) => tried.push(format!("{url}: {e}")),
            }
        }
    }
    let detail = if tried.is_empty() { "no healthy worker".to_string() } else { tried.join("; ") };
    ApiError::new(ErrorKind::ServiceUnavailable, format!("no worker could list models ({detail})")).into_response()
}

/// 200 iff at least one healthy prefill and one healthy decode (PD), or one healthy
/// worker (colocated); otherwise 503 saying what is missing.
async fn health(State(r): State<Arc<Router>>) -> Response {
    let count = |p: &super::workers::Pool| (p.healthy_count(), p.workers.len());
    let (missing, status) = match r.cfg.mode {
        Mode::Disaggregated => {
            let (p, pt) = count(&r.prefill);
            let (d, dt) = count(&r.decode);
            let mut missing = Vec::new();
            if p == 0 {
                missing.push(format!("no healthy prefill worker (0 of {pt})"));
            }
            if d == 0 {
                missing.push(format!("no healthy decode worker (0 of {dt})"));
            }
            (missing, json!({"status": "ok", "healthy_prefill": p, "prefill": pt, "healthy_decode": d, "decode": dt}))
        }
        Mode::Regular => {
            let (w, wt) = count(&r.workers);
            let missing = if w == 0 { vec![format!("no healthy worker (0 of {wt})")] } else { Vec::new() };
            (missing, json!({"status": "ok", "healthy_workers": w, "workers": wt}))
        }
    };
    if missing.is_empty() {
        axum::Json(status).into_response()
    } else {
        ApiError::new(ErrorKind::ServiceUnavailable, missing.join("; ")).into_response()
    }
}

/// The vLLM toy proxy's shape.
async fn healthcheck(State(r): State<Arc<Router>>) -> Response {
    axum::Json(json!({"status": "ok", "prefill_instances": r.prefill.workers.len(),
        "decode_instances": r.decode.workers.len()}))
    .into_response()
}

async fn metrics(State(r): State<Arc<Router>>) -> Response {
    let text = r.metrics.render(&r.pools(), r.admission.queued(), r.admission.in_use());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response()
}

async fn workers(State(r): State<Arc<Router>>) -> Response {
    let list: Vec<Value> = r
        .pools()
        .into_iter()
        .flat_map(|p| p.workers.iter())
        .map(|w| {
            json!({"url": w.url, "role": w.role.as_str(), "healthy": w.is_healthy(),
                   "dp_size": w.dp_size(), "in_flight": w.in_flight(), "ranks_in_flight": w.rank_in_flight()})
        })
        .collect();
    axum::Json(json!({"workers": list, "queued": r.admission.queued(), "permits_in_use": r.admission.in_use()}))
        .into_response()
}

