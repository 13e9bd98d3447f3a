//! The worker admin API: workers join, drain and leave a running router. Off unless
//! --admin-api-key is set; then every call needs that key (http.rs checks it). vllm-router's
//! spellings (`/add_worker?url=`, `/remove_worker?url=`, `/list_workers`, `POST /workers`,
//! `DELETE /workers/{url}`) and a drain (`POST /workers/{url}/drain`). The contract is in
//! docs/PROTOCOLS.md ("Admin API").

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::json;

use crate::api::connector::Connector;
use crate::api::{ApiError, ErrorKind};
use crate::router::flow::Router;
use crate::router::front::worker_json;
use crate::router::workers::url::normalize_url;
use crate::router::workers::{Pool, Role, Worker};

/// The admin API's routes, each behind the admin key (without --admin-api-key, each says
/// the API is off).
pub(crate) fn routes(router: &Arc<Router>) -> axum::Router<Arc<Router>> {
    axum::Router::new()
        .route("/add_worker", post(add_worker))
        .route("/remove_worker", post(remove_worker))
        .route("/list_workers", get(list_workers))
        .route("/workers", post(create_worker))
        .route("/workers/{url}", get(get_worker).delete(delete_worker))
        .route("/workers/{url}/drain", post(drain_worker))
        .route_layer(axum::middleware::from_fn_with_state(router.clone(), admin_only))
}

async fn admin_only(State(r): State<Arc<Router>>, req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    match &r.cfg.auth.admin_key {
        None => {
            ApiError::new(ErrorKind::NotFound, "the worker admin API is off: start disagg route with --admin-api-key KEY").into_response()
        }
        Some(admin) if !crate::router::config::keys::bearer_matches(req.headers(), std::slice::from_ref(admin)) => {
            super::unauthorized("this endpoint needs the admin API key", crate::api::dialect::Dialect::OpenAi)
        }
        Some(_) => next.run(req).await,
    }
}

/// A worker to add: `url`, its role (`role`, or vllm-router's `worker_type`), and its DP
/// rank count (default: the router's --intra-node-data-parallel-size for the role), and
/// a Mooncake prefill's bootstrap port (default 8998).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct NewWorker {
    url: String,
    #[serde(alias = "worker_type")]
    role: Option<String>,
    dp_size: Option<usize>,
    bootstrap_port: Option<u16>,
}

fn bad(msg: impl Into<String>) -> Response {
    ApiError::bad_request(msg.into()).into_response()
}

/// The role of a new worker, which must be one of this topology's; without one, the only
/// role there is. `both` in a disaggregated router: an elastic engine (vLLM `kv_both`).
fn role_for(r: &Router, role: Option<&str>) -> Result<Role, ApiError> {
    let roles = r.topology.roles();
    let names: Vec<&str> = roles.iter().map(|x| x.as_str()).collect();
    match role {
        Some(name) => Role::parse(name).ok_or_else(|| ApiError::bad_request(format!("unknown role `{name}`: one of {}", names.join(", ")))),
        None if roles.len() == 1 => Ok(roles[0]),
        None => Err(ApiError::bad_request(format!("say the worker's role: role={}", names.join("|")))),
    }
}

/// An elastic engine joins both PD pools (NIXL only: its legs need no per-engine address).
fn add_elastic(r: &Router, url: &str, w: &NewWorker) -> Response {
    if r.cfg.connector != Connector::Nixl || w.bootstrap_port.is_some() {
        return bad(
            "an elastic engine (role=both: vLLM kv_both, either leg per request) needs the NIXL connector, and takes no bootstrap_port",
        );
    }
    match r.topology.add_elastic(url, w.dp_size) {
        Ok(worker) => axum::Json(json!({"success": true, "message": format!("added elastic (both) worker {url}"),
            "worker": worker_json(&worker)}))
        .into_response(),
        Err(e) => bad(e.to_string()),
    }
}

async fn add(r: &Router, w: NewWorker) -> Response {
    if r.cfg.connector == Connector::P2pNccl {
        return bad("P2pNccl engines join by registering at --vllm-discovery-address (request ids must name their KV \
                    addresses, which only the registration gives)");
    }
    let url = match normalize_url(&w.url) {
        Ok(u) => u,
        Err(e) => return bad(e),
    };
    // A leaked admin key must not point legs (carrying prompts) at any host: the cloud's
    // metadata address, the router itself (docs/SECURITY.md).
    if let Err(e) = r.cfg.boundary.worker_hosts.check_url(&url).await {
        r.metrics.refused("admin", &OutsideWorkerHosts);
        return bad(e.to_string());
    }
    if w.dp_size == Some(0) || w.dp_size.is_some_and(|n| n > 1024) {
        return bad("dp_size must be 1..=1024");
    }
    if let Some((_, other)) = r.topology.find(&url) {
        return bad(format!("worker {url} is already in the router as a {} worker", other.role.as_str()));
    }
    let role = match role_for(r, w.role.as_deref()) {
        Ok(role) => role,
        Err(e) => return e.into_response(),
    };
    if role == Role::Both && r.topology.is_disaggregated() {
        // vllm-router's `worker` / `regular` are colocated workers, which a PD router has no
        // pool for; `both` is an engine that takes either leg.
        if !w.role.as_deref().is_some_and(|n| n.eq_ignore_ascii_case("both")) {
            return bad("this router has no pool for colocated (worker/regular) workers; role=both adds an elastic engine \
                        (vLLM kv_both, either leg per request)");
        }
        return add_elastic(r, &url, &w);
    }
    let Some(pool) = r.topology.pool(role) else {
        return bad(format!("this router has no pool for {} workers", role.as_str()));
    };
    let kv_address = match (r.cfg.connector, pool.role, w.bootstrap_port) {
        (Connector::Mooncake, Role::Prefill, port) => {
            Some(crate::router::upstream::bootstrap::address(&url, port.unwrap_or(crate::api::connector::MOONCAKE_BOOTSTRAP_PORT)))
        }
        (_, _, Some(_)) => return bad("bootstrap_port is a Mooncake prefill's; this router's connector or the role takes none"),
        _ => None,
    };
    match pool.add(&url, w.dp_size, kv_address) {
        Ok(worker) => axum::Json(json!({"success": true, "message": format!("added {} worker {url}", pool.role.as_str()),
            "worker": worker_json(&worker)}))
        .into_response(),
        Err(e) => bad(e.to_string()),
    }
}

/// The admin API's one refusal at the boundary: a worker on a host it may not be on.
struct OutsideWorkerHosts;

impl crate::router::metrics::Label for OutsideWorkerHosts {
    fn label(&self) -> &'static str {
        "worker_host"
    }
}

fn not_found(url: &str) -> ApiError {
    ApiError::new(ErrorKind::NotFound, format!("no worker {url} in this router"))
}

/// The worker a path or query names (normalised as the command line's URLs are), and
/// its pool.
fn find<'a>(r: &'a Router, raw: &str) -> Result<(&'a Pool, Arc<Worker>), ApiError> {
    let url = normalize_url(raw).map_err(ApiError::bad_request)?;
    r.topology.find(&url).ok_or_else(|| not_found(&url))
}

fn remove(r: &Router, raw: &str) -> Response {
    let (_, w) = match find(r, raw) {
        Ok(found) => found,
        Err(e) => return e.into_response(),
    };
    match r.topology.remove(&w.url) {
        Some(w) => axum::Json(json!({"success": true, "message": format!("removed {} worker {}; {} request(s) in flight finish on it",
            w.role.as_str(), w.url, w.in_flight())}))
        .into_response(),
        None => not_found(&w.url).into_response(),
    }
}

/// vllm-router's `POST /add_worker?url=...` (the same fields as `POST /workers`'s body).
async fn add_worker(State(r): State<Arc<Router>>, query: Result<Query<NewWorker>, axum::extract::rejection::QueryRejection>) -> Response {
    match query {
        Ok(Query(w)) => add(&r, w).await,
        Err(e) => bad(format!("/add_worker takes ?url=URL&role=prefill|decode|worker[&dp_size=N][&bootstrap_port=P]: {e}")),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UrlQuery {
    url: String,
}

async fn remove_worker(State(r): State<Arc<Router>>, query: Result<Query<UrlQuery>, axum::extract::rejection::QueryRejection>) -> Response {
    match query {
        Ok(Query(q)) => remove(&r, &q.url),
        Err(e) => bad(format!("/remove_worker takes ?url=URL: {e}")),
    }
}

/// vllm-router's shape (`urls`), and the same by role.
async fn list_workers(State(r): State<Arc<Router>>) -> Response {
    let mut all = Vec::new();
    let mut by_role = serde_json::Map::new();
    let workers = r.topology.workers();
    for role in r.topology.roles() {
        let urls: Vec<String> = workers.iter().filter(|w| w.role == role).map(|w| w.url.clone()).collect();
        all.extend(urls.iter().cloned());
        if !urls.is_empty() || r.topology.pool(role).is_some() {
            by_role.insert(role.as_str().to_string(), json!(urls));
        }
    }
    let mut body = json!({"urls": all});
    body.as_object_mut().expect("an object").extend(by_role);
    axum::Json(body).into_response()
}

async fn create_worker(
    State(r): State<Arc<Router>>,
    body: Result<axum::Json<NewWorker>, axum::extract::rejection::JsonRejection>,
) -> Response {
    match body {
        Ok(axum::Json(w)) => add(&r, w).await,
        Err(e) => {
            bad(format!("POST /workers takes {{\"url\": URL, \"role\": \"prefill|decode|worker\", \"dp_size\": N}}: {}", e.body_text()))
        }
    }
}

async fn get_worker(State(r): State<Arc<Router>>, Path(url): Path<String>) -> Response {
    match find(&r, &url) {
        Ok((_, w)) => axum::Json(worker_json(&w)).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn delete_worker(State(r): State<Arc<Router>>, Path(url): Path<String>) -> Response {
    remove(&r, &url)
}

async fn drain_worker(State(r): State<Arc<Router>>, Path(url): Path<String>) -> Response {
    let (pool, w) = match find(&r, &url) {
        Ok(found) => found,
        Err(e) => return e.into_response(),
    };
    match pool.drain(&w.url) {
        Some(w) => axum::Json(
            json!({"success": true, "message": format!("draining {} worker {}: no new requests; removed once its {} in flight are done",
            w.role.as_str(), w.url, w.in_flight()), "worker": worker_json(&w)}),
        )
        .into_response(),
        None => not_found(&w.url).into_response(),
    }
}
