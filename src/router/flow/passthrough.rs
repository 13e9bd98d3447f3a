//! Every other vLLM API, passed through to one worker, top to bottom: the path is one vLLM
//! serves (a fixed list, by group; anything else is a 404 before this runs, so the router
//! is never an open proxy) → read the body (bounded in size and time, as generation
//! bodies) → admit (one permit) → pick a worker of the group's pool by its policy → send;
//! a worker that cannot be reached is left for another (up to MAX_TRIES) → relay the
//! answer as it comes, each piece within the stream-idle time, the permit and the worker's
//! lease held until its last byte.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::header::{ACCEPT, CONTENT_TYPE};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::StreamExt;

use crate::api::dialect::Dialect;
use crate::api::{ApiError, ErrorKind};
use crate::router::admission::Ticket;
use crate::router::config::passthrough::PathGroup;
use crate::router::flow::{admit, read_body, worker_authorization, Router};
use crate::router::metrics::Cause;
use crate::router::pair::failure::Failure;
use crate::router::policy::RequestInfo;
use crate::router::workers::Lease;

/// Workers tried for one request when the ones before could not be reached.
const MAX_TRIES: usize = 3;

/// Forwards one request of `group` at `path_and_query`.
pub(crate) async fn forward(
    router: Arc<Router>,
    group: PathGroup,
    method: Method,
    path_and_query: String,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let request_id = super::request_id(&headers);
    let dialect = if path_and_query.starts_with("/v1/messages") { Dialect::Anthropic } else { Dialect::OpenAi };
    let mut resp = match run(&router, group, method, &path_and_query, &headers, body, &request_id).await {
        Ok(resp) => resp,
        Err(f) => super::in_dialect(f.response, dialect).await,
    };
    resp.headers_mut().insert("x-request-id", request_id);
    resp
}

async fn run(
    router: &Arc<Router>,
    group: PathGroup,
    method: Method,
    path_and_query: &str,
    headers: &HeaderMap,
    body: Body,
    request_id: &HeaderValue,
) -> Result<Response, Failure> {
    if router.drain.draining() {
        return Err(Failure::shutting_down());
    }
    let active = router.drain.active();
    let body = if method == Method::GET { Bytes::new() } else { read_body(router, headers, body).await?.bytes };
    let tenant = router.tenants.of(headers);
    let priority = tenant.priority(None);
    let mut permit = admit(&router.admission, Ticket { tenant, priority, cost: 0, generations: 1 }).await?;
    // One leg, on one pool: its lease counts in that pool's queue from here on.
    permit.picked_all();
    let role = router.cfg.passthrough.role_for(group);
    let pool = router.topology.pool(role).or_else(|| router.topology.pools().next()).expect("a topology has a pool");
    let authorization = worker_authorization(router, headers);
    let timeouts = &router.cfg.timeouts;
    let mut tried: Vec<String> = Vec::new();
    loop {
        let mut lease = pool.pick(&RequestInfo::default(), &tried).map_err(|e| {
            Failure::api(ApiError::new(ErrorKind::ServiceUnavailable, format!("{path_and_query}: {e}")), Cause::NoHealthyWorker)
        })?;
        let mut req = crate::router::upstream::legs::client()
            .request(method.clone(), format!("{}{path_and_query}", lease.url()))
            .header("x-request-id", request_id.clone())
            .timeout(timeouts.request);
        for name in [CONTENT_TYPE, ACCEPT] {
            if let Some(v) = headers.get(&name) {
                req = req.header(name, v.clone());
            }
        }
        if let Some(auth) = &authorization {
            req = req.header(axum::http::header::AUTHORIZATION, auth.clone());
        }
        if method != Method::GET {
            req = req.body(body.clone());
        }
        match tokio::time::timeout(timeouts.decode_first_byte, req.send()).await {
            Ok(Ok(answer)) => {
                if answer.status().is_server_error() {
                    lease.failed();
                } else {
                    lease.succeeded();
                }
                return Ok(relay(answer, lease, permit, active, timeouts.stream_idle));
            }
            Ok(Err(e)) if e.is_connect() && tried.len() + 1 < MAX_TRIES => {
                tracing::warn!(worker = %lease.url(), "{path_and_query}: cannot connect ({}); trying another worker", e);
                lease.failed();
                tried.push(lease.url().to_string());
            }
            Ok(Err(e)) => {
                lease.failed();
                tracing::warn!(worker = %lease.url(), "{path_and_query}: {}", crate::router::upstream::legs::chain(&e));
                return Err(Failure::api(
                    ApiError::new(ErrorKind::BadGateway, format!("{path_and_query}: the worker failed")),
                    Cause::WorkerFailed,
                ));
            }
            Err(_) => {
                lease.failed();
                return Err(Failure::api(
                    ApiError::with_status(
                        StatusCode::GATEWAY_TIMEOUT,
                        format!("{path_and_query}: no answer within {:.0}s", timeouts.decode_first_byte.as_secs_f64()),
                    ),
                    Cause::WorkerFailed,
                ));
            }
        }
    }
}

/// The worker's answer as it comes: its status and content type, its body piece by piece,
/// each within `idle`; the permit, the lease and the drain's count held until the end.
fn relay<A: Send + 'static, B: Send + 'static>(answer: reqwest::Response, lease: Lease, permit: A, active: B, idle: Duration) -> Response {
    let status = answer.status();
    let content_type = answer.headers().get(CONTENT_TYPE).cloned();
    let held = (lease, permit, active);
    let pieces = futures_util::stream::unfold((answer.bytes_stream(), Some(held)), move |(mut stream, held)| async move {
        held.as_ref()?;
        match tokio::time::timeout(idle, stream.next()).await {
            Ok(Some(Ok(piece))) => Some((Ok::<Bytes, std::io::Error>(piece), (stream, held))),
            Ok(Some(Err(e))) => Some((Err(std::io::Error::other(e)), (stream, None))),
            Ok(None) => None,
            Err(_) => Some((Err(std::io::Error::other("the worker's answer stalled")), (stream, None))),
        }
    });
    let mut resp = Body::from_stream(pieces).into_response();
    *resp.status_mut() = status;
    if let Some(ct) = content_type {
        resp.headers_mut().insert(CONTENT_TYPE, ct);
    }
    resp
}
