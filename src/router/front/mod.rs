//! The router's HTTP surface, and who may use it: with --client-api-key or --tenants, every
//! API that serves clients (/v1/*, /v2/*, /inference/*, the passed-through paths) needs one
//! of the client keys or the tenants' (as a bearer token or `x-api-key`); with --admin-api-key, /workers and /metrics need
//! it (they list internal addresses). /health and /healthcheck stay open for probes and
//! name no worker (registered engines are listed to the admin key only).

pub(crate) mod admin;
pub(crate) mod server;

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, Query, Request, State};
use axum::http::header::{AUTHORIZATION, CONNECTION, WWW_AUTHENTICATE};
use axum::http::{header, HeaderMap, HeaderValue, Method, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{json, Value};

use crate::api::dialect::Dialect;
use crate::api::{ApiError, ErrorKind};
use crate::router::config::keys::bearer_matches;
use crate::router::flow::{self, Endpoint, Router};
use crate::router::metrics::WorkerGauges;
use crate::router::responses::Responses;
use crate::router::workers::topology::Topology;
use crate::router::workers::{Pool, Role, Worker};

pub(crate) fn app(router: Arc<Router>) -> axum::Router {
    axum::Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/messages", post(messages))
        .route("/inference/v1/generate", post(tokens_out))
        .route("/v1/responses", post(responses))
        .route("/v1/responses/{id}", get(retrieve_response).delete(delete_response))
        .route("/v1/responses/{id}/cancel", post(cancel_response))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/healthcheck", get(healthcheck))
        .route("/metrics", get(metrics))
        .route("/workers", get(workers))
        .merge(crate::router::front::admin::routes(&router))
        .merge(passthrough_routes())
        .fallback(|| async { ApiError::new(ErrorKind::NotFound, "no such endpoint on disagg route") })
        .layer(axum::middleware::from_fn_with_state(router.clone(), guard))
        .with_state(router)
}

/// vLLM's other APIs (config/passthrough.rs lists them), each to one worker of its group's pool.
fn passthrough_routes() -> axum::Router<Arc<Router>> {
    use crate::router::config::passthrough::{PathGroup, PATHS};
    PATHS.iter().fold(axum::Router::new(), |app, &(path, group)| {
        let handler = move |State(r): State<Arc<Router>>, method: Method, uri: Uri, headers: HeaderMap, body: Body| {
            let path_and_query = uri.path_and_query().map_or(path.to_string(), |p| p.as_str().to_string());
            flow::passthrough::forward(r, group, method, path_and_query, headers, body)
        };
        match group {
            PathGroup::Info => app.route(path, get(handler)),
            _ => app.route(path, post(handler)),
        }
    })
}

/// The APIs that serve clients (generation, models, and every passed-through path): the
/// probes, /metrics, /workers and the admin API are not among them.
fn needs_client_key(path: &str) -> bool {
    ["/v1/", "/v2/", "/inference/"].iter().any(|p| path.starts_with(p))
        || crate::router::config::passthrough::PATHS.iter().any(|(p, _)| *p == path)
}

fn unauthorized(what: &str, dialect: Dialect) -> Response {
    let err = ApiError::new(ErrorKind::Unauthorized, format!("{what}: send `Authorization: Bearer <key>` with a valid key"));
    let mut resp = (err.status, axum::Json(dialect.error_body(&err))).into_response();
    resp.headers_mut().insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    resp
}

/// Client keys on `/v1/*`, the admin key on `/workers` and `/metrics` (the admin API checks
/// its own, admin.rs), and `Connection: close` on every answer while draining.
async fn guard(State(r): State<Arc<Router>>, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    let auth = &r.cfg.auth;
    let client_api = needs_client_key(path);
    // The tenant's key, read once: for the check here and its allowances on the answer.
    let tenant = if client_api { r.tenants.by_key(req.headers()) } else { None };
    let keys_required = !auth.client_keys.is_empty() || r.tenants.configured();
    if client_api && keys_required && tenant.is_none() && auth.client_key_of(req.headers()).is_none() {
        let dialect = if path.starts_with("/v1/messages") { Dialect::Anthropic } else { Dialect::OpenAi };
        return unauthorized("this router needs a client API key (or `x-api-key: <key>`)", dialect);
    }
    if matches!(path, "/workers" | "/metrics") {
        if let Some(admin) = &auth.admin_key {
            if !bearer_matches(req.headers(), std::slice::from_ref(admin)) {
                return unauthorized("this endpoint needs the admin API key", Dialect::OpenAi);
            }
        }
    }
    // A tenant's allowances on every answer to it (generation answers carry them already,
    // as charged).
    let tenant = (r.tenants.configured() && client_api).then(|| r.tenants.or_default(tenant));
    let mut resp = next.run(req).await;
    if let Some(t) = tenant
        .filter(|_| !resp.headers().contains_key("x-ratelimit-limit-requests") && !resp.headers().contains_key("x-ratelimit-limit-tokens"))
    {
        t.headers().write(resp.headers_mut());
    }
    if r.drain.draining() {
        resp.headers_mut().insert(CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

async fn completions(State(r): State<Arc<Router>>, headers: HeaderMap, body: Body) -> Response {
    flow::generate(r, Endpoint::Completions, headers, body).await
}

async fn chat(State(r): State<Arc<Router>>, headers: HeaderMap, body: Body) -> Response {
    flow::generate(r, Endpoint::Chat, headers, body).await
}

async fn messages(State(r): State<Arc<Router>>, headers: HeaderMap, body: Body) -> Response {
    flow::generate(r, Endpoint::Messages, headers, body).await
}

async fn tokens_out(State(r): State<Arc<Router>>, headers: HeaderMap, body: Body) -> Response {
    flow::generate(r, Endpoint::TokensOut, headers, body).await
}

async fn responses(State(r): State<Arc<Router>>, headers: HeaderMap, body: Body) -> Response {
    flow::generate(r, Endpoint::Responses, headers, body).await
}

#[derive(serde::Deserialize)]
struct RetrieveQuery {
    #[serde(default)]
    stream: Option<bool>,
}

async fn retrieve_response(
    State(r): State<Arc<Router>>,
    Path(id): Path<String>,
    Query(q): Query<RetrieveQuery>,
    headers: HeaderMap,
) -> Response {
    let owner = Responses::owner(&headers, &r.cfg.auth, &r.tenants);
    r.responses.retrieve(&id, &owner, q.stream.unwrap_or(false)).await
}

async fn cancel_response(State(r): State<Arc<Router>>, Path(id): Path<String>, headers: HeaderMap) -> Response {
    let owner = Responses::owner(&headers, &r.cfg.auth, &r.tenants);
    r.responses.cancel(&id, &owner).await
}

async fn delete_response(State(r): State<Arc<Router>>, Path(id): Path<String>, headers: HeaderMap) -> Response {
    let owner = Responses::owner(&headers, &r.cfg.auth, &r.tenants);
    r.responses.delete(&id, &owner).await
}

/// `/v1/models` from the first healthy worker that answers: one dead worker never makes
/// it fail. The error names no worker (the log does).
async fn models(State(r): State<Arc<Router>>) -> Response {
    let mut tried = 0;
    // Decodes first: they serve the answers.
    let mut workers = r.topology.workers();
    workers.sort_by_key(|w| w.role != Role::Decode);
    for w in workers.iter().filter(|w| w.is_healthy()) {
        tried += 1;
        let url = format!("{}/v1/models", w.url);
        let mut req = crate::router::upstream::legs::client().get(&url).timeout(Duration::from_secs(5));
        if let Some(auth) = &r.worker_auth {
            req = req.header(AUTHORIZATION, auth.clone());
        }
        match req.send().await {
            Ok(resp) if resp.status().is_success() => match resp.bytes().await {
                Ok(body) if serde_json::from_slice::<Value>(&body).is_ok() => {
                    return ([(header::CONTENT_TYPE, "application/json")], body).into_response();
                }
                _ => tracing::warn!(worker = %w.url, "/v1/models: the answer is not JSON"),
            },
            Ok(resp) => tracing::warn!(worker = %w.url, "/v1/models answered {}", resp.status()),
            Err(e) => tracing::warn!(worker = %w.url, "/v1/models: {}", crate::router::upstream::legs::chain(&e)),
        }
    }
    let detail = if tried == 0 { "no healthy worker".to_string() } else { format!("{tried} healthy workers tried, none answered") };
    ApiError::new(ErrorKind::ServiceUnavailable, format!("no worker could list models ({detail})")).into_response()
}

/// 200 iff at least one available prefill and one available decode (PD), or one available
/// worker (colocated), and the router is not draining; otherwise 503 saying what is missing.
async fn health(State(r): State<Arc<Router>>, headers: HeaderMap) -> Response {
    if r.drain.draining() {
        return ApiError::new(ErrorKind::ServiceUnavailable, "the router is shutting down").into_response();
    }
    let count = |p: &Pool| (p.available_count(), p.worker_count());
    let (missing, status) = match &*r.topology {
        Topology::Disaggregated { prefill, decode } => {
            let (p, pt) = count(prefill);
            let (d, dt) = count(decode);
            let mut missing = Vec::new();
            if p == 0 {
                missing.push(format!("no healthy prefill worker (0 of {pt})"));
            }
            if d == 0 {
                missing.push(format!("no healthy decode worker (0 of {dt})"));
            }
            let mut status = json!({"status": "ok", "healthy_prefill": p, "prefill": pt, "healthy_decode": d, "decode": dt});
            // Registered engines, as vLLM's P2pNccl proxy users check them: internal
            // addresses, for the admin key only.
            let admin = r.cfg.auth.admin_key.as_ref().is_some_and(|k| bearer_matches(&headers, std::slice::from_ref(k)));
            if r.cfg.discovery.is_some() && admin {
                let urls = |pool: &Pool| pool.snapshot().iter().map(|w| json!({"http": w.url, "zmq": w.kv_address})).collect::<Vec<_>>();
                status["prefill_instances"] = json!(urls(prefill));
                status["decode_instances"] = json!(urls(decode));
            }
            (missing, status)
        }
        Topology::Colocated { workers } => {
            let (w, wt) = count(workers);
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
    let len = |role| r.topology.pool(role).map_or(0, Pool::worker_count);
    axum::Json(json!({"status": "ok", "prefill_instances": len(Role::Prefill), "decode_instances": len(Role::Decode)})).into_response()
}

async fn metrics(State(r): State<Arc<Router>>) -> Response {
    let pools: Vec<&Pool> = r.topology.pools().collect();
    let kv_status = r.kv_index.as_ref().map(|index| index.status_by_worker());
    let gauges: Vec<WorkerGauges> = pools
        .iter()
        .flat_map(|pool| {
            pool.snapshot()
                .iter()
                .map(|w| WorkerGauges {
                    url: w.url.clone(),
                    role: pool.role.as_str(),
                    rank_in_flight: w.rank_in_flight(),
                    healthy: w.is_healthy(),
                    circuit: w.circuit().gauge(),
                    circuit_openings: w.breaker.opened_total(),
                    kv_events: kv_status.as_ref().map(|by| {
                        by.get(&w.url)
                            .into_iter()
                            .flatten()
                            .map(|h| crate::router::metrics::RankEvents {
                                rank: h.rank,
                                blocks: h.indexed_blocks,
                                secs_since_event: h.secs_since_event,
                            })
                            .collect()
                    }),
                })
                .collect::<Vec<_>>()
        })
        .collect();
    let text = r.metrics.render(
        &gauges,
        r.kv_index.as_ref().map(|i| i.applied_totals()),
        r.admission.queued(),
        r.admission.in_use(),
        r.drain.draining(),
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response()
}

async fn workers(State(r): State<Arc<Router>>) -> Response {
    let kv_status = r.kv_index.as_ref().map(|index| index.status_by_worker());
    let list: Vec<Value> = r
        .topology
        .workers()
        .iter()
        .map(|w| {
            let mut v = worker_json(w);
            // kv_aware: what the KV index holds of each rank, and how fresh its events are.
            if let Some(by) = kv_status.as_ref() {
                v["kv_events"] = json!(by.get(&w.url).cloned().unwrap_or_default());
            }
            v
        })
        .collect();
    let index: serde_json::Map<String, Value> =
        r.topology.pools().filter_map(|p| p.index_entries().map(|n| (p.role.as_str().to_string(), json!(n)))).collect();
    axum::Json(json!({"workers": list, "queued": r.admission.queued(), "permits_in_use": r.admission.in_use(),
        "requests_in_flight": r.drain.in_flight(), "draining": r.drain.draining(), "prefix_index_entries": index,
        "body_bytes_in_flight": r.body_budget.in_use(), "tenants": tenants_json(&r.tenants)}))
    .into_response()
}

/// What /workers says of each tenant: what it is admitted for now and what is left of
/// its per-minute allowances.
fn tenants_json(tenants: &crate::router::tenants::Tenants) -> Value {
    let view = |v: Option<crate::router::tenants::limits::BucketView>| v.map(|v| json!({"limit": v.limit, "remaining": v.remaining}));
    tenants
        .all()
        .iter()
        .map(|t| {
            let rate = t.headers();
            json!({"name": &*t.name, "admitted": t.admitted.load(std::sync::atomic::Ordering::Relaxed),
                "weight": t.weight(), "requests": view(rate.requests), "tokens": view(rate.tokens)})
        })
        .collect()
}

/// What /workers (and the admin API) say of a worker.
pub(crate) fn worker_json(w: &Worker) -> Value {
    let queued: Vec<usize> = (0..w.dp_size()).map(|r| w.queued_blocks(r)).collect();
    let elsewhere: Vec<usize> = (0..w.dp_size()).map(|r| w.reported_elsewhere(r)).collect();
    json!({"url": w.url, "role": w.role.as_str(), "healthy": w.is_healthy(), "draining": w.is_draining(),
           "circuit": w.circuit().as_str(), "dp_size": w.dp_size(), "in_flight": w.in_flight(), "ranks_in_flight": w.rank_in_flight(),
           "ranks_queued_blocks": queued,
           "ranks_requests_elsewhere": elsewhere,
           "ranks_queue": (0..w.dp_size()).map(|r| w.rank_queue(r)).collect::<Vec<_>>(), "queue_threshold": w.queue_threshold(),
           "latency_model": latency_json(&w.latency)})
}

/// slo_aware's model of a worker as fitted now: each line's intercept (ms) and slope.
fn latency_json(l: &crate::router::predict::EngineLatency) -> Value {
    let [prefill, transfer, itl] = l.coefficients();
    let line = |(a, b): (f64, f64)| json!({"ms": a, "per_unit_ms": b});
    json!({"prefill_by_queued_tokens": line(prefill), "first_token_after_transfer_by_tokens": line(transfer),
           "itl_by_running_sequences": line(itl), "queued_prefill_tokens": l.queued_tokens()})
}
