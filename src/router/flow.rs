//! One generation request, top to bottom:
//! admit → read and parse the body once → pick a decode, then a prefill → prefill leg
//! (retried on other prefills) → decode leg (the pair re-run once, on other workers when
//! there are any, if the decode fails before its first byte) → relay the answer.
//! docs/FAILURES.md is the contract this file implements.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::header::{AUTHORIZATION, CONTENT_TYPE};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde_json::{Map, Value};
use tokio::sync::oneshot;

use super::admission::{Admission, Refused};
use super::cli::{Mode, RouterConfig};
use super::legs::{self, Leg, LegError, LegRequest, Started, StartedBody};
use super::metrics::{RequestRecord, RouterMetrics};
use super::policy::RequestInfo;
use super::relay::{self, Held};
use super::request::{decode_body, prefill_body, request_info};
use super::workers::{Lease, NoWorker, Pool};
use crate::api::body::{parse_object, read_limited};
use crate::api::{ApiError, ErrorKind};

/// Everything the router shares between requests.
pub struct Router {
    pub cfg: RouterConfig,
    pub prefill: Pool,
    pub decode: Pool,
    /// Colocated workers (non-PD mode).
    pub workers: Pool,
    pub admission: Admission,
    pub metrics: Arc<RouterMetrics>,
    pub client: reqwest::Client,
    pub tokenizer: Option<tokenizers::Tokenizer>,
    pub api_key: Option<HeaderValue>,
}

impl Router {
    pub fn pools(&self) -> [&Pool; 3] {
        [&self.prefill, &self.decode, &self.workers]
    }
}

#[derive(Clone, Copy, Debug)]
pub enum Endpoint {
    Completions,
    Chat,
}

impl Endpoint {
    fn path(self) -> &'static str {
        match self {
            Endpoint::Completions => "/v1/completions",
            Endpoint::Chat => "/v1/chat/completions",
        }
    }
}

/// An answer that is not the worker's success, and the cause it is counted under.
struct Failure {
    response: Response,
    status: u16,
    cause: &'static str,
}

impl Failure {
    fn api(err: ApiError, cause: &'static str) -> Self {
        Failure { status: err.status.as_u16(), response: err.into_response(), cause }
    }

    /// A worker's 4xx, returned to the client as the worker sent it.
    fn passthrough(err: LegError) -> Self {
        match err {
            LegError::Status { status, content_type, body } => {
                let mut resp = (status, body).into_response();
                if let Some(ct) = content_type {
                    resp.headers_mut().insert(CONTENT_TYPE, ct);
                }
                Failure { status: status.as_u16(), response: resp, cause: "upstream_4xx" }
            }
            other => Failure::api(ApiError::internal(other.to_string()), "internal"),
        }
    }

    fn leg_failed(leg: Leg, url: &str, err: &LegError) -> Self {
        let (name, cause) = match leg {
            Leg::Prefill => ("prefill", "prefill_failed"),
            Leg::Decode => ("decode", "decode_failed"),
        };
        Failure::api(ApiError::new(ErrorKind::BadGateway, format!("{name} leg failed on {url}: {err}")), cause)
    }

    fn no_worker(no: NoWorker) -> Self {
        let cause = match no.role {
            super::workers::Role::Prefill => "no_healthy_prefill",
            super::workers::Role::Decode => "no_healthy_decode",
            super::workers::Role::Worker => "no_healthy_worker",
        };
        Failure::api(ApiError::new(ErrorKind::ServiceUnavailable, no.to_string()).retry_after(1), cause)
    }
}

pub async fn generate(router: Arc<Router>, ep: Endpoint, headers: HeaderMap, body: Body) -> Response {
    let request_id = headers
        .get("x-request-id")
        .filter(|v| !v.is_empty())
        .cloned()
        .unwrap_or_else(|| HeaderValue::from_str(&uuid::Uuid::new_v4().simple().to_string()).expect("hex is a valid header"));
    let label = match ep {
        Endpoint::Completions => "completions",
        Endpoint::Chat => "chat_completions",
    };
    let mut record = Some(RequestRecord::new(router.metrics.clone(), label));
    let mut resp = match serve(&router, ep, &headers, body, &request_id, &mut record).await {
        Ok(resp) => resp,
        Err(f) => {
            if let Some(rec) = record.as_mut() {
                rec.status(f.status);
                rec.fail(f.cause);
                rec.finish();
            }
            f.response
        }
    };
    resp.headers_mut().insert("x-request-id", request_id);
    resp
}

async fn serve(
    router: &Arc<Router>,
    ep: Endpoint,
    headers: &HeaderMap,
    body: Body,
    request_id: &HeaderValue,
    record: &mut Option<RequestRecord>,
) -> Result<Response, Failure> {
    let permit = admit(&router.admission).await?;
    let raw = read_limited(headers, body, router.cfg.max_payload).await.map_err(|e| {
        let cause = if e.status == StatusCode::PAYLOAD_TOO_LARGE { "payload_too_large" } else { "bad_request" };
        Failure::api(e, cause)
    })?;
    let leg = LegTemplate {
        path: ep.path(),
        request_id: request_id.clone(),
        authorization: headers.get(AUTHORIZATION).cloned().or_else(|| router.api_key.clone()),
        timeout: router.cfg.request_timeout,
    };
    let (started, lease, since) = match router.cfg.mode {
        Mode::Disaggregated => disaggregated(router, headers, &raw, &leg).await?,
        Mode::Regular => colocated(router, headers, &raw, &leg).await?,
    };
    let held = Held {
        permit,
        lease,
        record: record.take().expect("the record stays until the answer is built"),
        started: since,
    };
    Ok(respond(started, held, router.cfg.stream_idle_timeout))
}

async fn admit(admission: &Admission) -> Result<tokio::sync::OwnedSemaphorePermit, Failure> {
    admission.admit().await.map_err(|r| match r {
        Refused::QueueFull(e) => Failure::api(e, "queue_full"),
        Refused::QueueTimeout(e) => Failure::api(e, "queue_timeout"),
    })
}

#[derive(Clone)]
struct LegTemplate {
    path: &'static str,
    request_id: HeaderValue,
    authorization: Option<HeaderValue>,
    timeout: Duration,
}

impl LegTemplate {
    fn with_body(&self, body: Bytes) -> LegRequest {
        LegRequest {
            path: self.path,
            request_id: self.request_id.clone(),
            authorization: self.authorization.clone(),
            body,
            timeout: self.timeout,
        }
    }
}

fn info_for(router: &Router, pools: &[&Pool], headers: &HeaderMap, body: &Map<String, Value>) -> RequestInfo {
    if pools.iter().any(|p| p.needs_request_info()) {
        request_info(headers, body, router.tokenizer.as_ref())
    } else {
        RequestInfo::default()
    }
}

/// Picks avoiding `avoid`; with `fallback`, settles for an avoided worker rather than none.
fn pick(pool: &Pool, info: &RequestInfo, avoid: &[usize], fallback: bool) -> Result<Lease, NoWorker> {
    match pool.pick(info, avoid) {
        Err(no) if fallback && no.healthy > 0 => pool.pick(info, &[]),
        other => other,
    }
}

/// Counts a failed leg and says what comes of it: a client error (4xx) is the client's
/// answer, as the worker gave it (`Err`); anything else is a reason to try another worker
/// (`Ok`, with what the client hears if none is left). A refused connection marks the
/// worker down at once.
fn leg_failed(router: &Router, leg: Leg, lease: &Lease, err: LegError) -> Result<Failure, Failure> {
    router.metrics.leg_error(leg, &err);
    if err.is_client_error() {
        return Err(Failure::passthrough(err));
    }
    tracing::warn!(worker = %lease.url(), leg = ?leg, "leg failed: {err}");
    if let LegError::Connect(why) = &err {
        lease.worker().mark_down(why);
    }
    Ok(Failure::leg_failed(leg, lease.url(), &err))
}

/// The workers one leg is tried on: the first pick, then another worker not tried yet
/// after each failure, up to --retry-max-retries more. `fallback` lets the first pick
/// settle for a worker in `avoid` when no other is healthy.
struct Attempts<'a> {
    router: &'a Router,
    pool: &'a Pool,
    info: &'a RequestInfo,
    avoid: &'a mut Vec<usize>,
    fallback: bool,
    leg: Leg,
    label: &'static str,
    tried: u32,
    last: Option<Failure>,
}

impl Attempts<'_> {
    /// The next worker to try, or what the client hears when none is left.
    fn next(&mut self) -> Result<Lease, Failure> {
        if self.tried > self.router.cfg.leg_retries {
            return Err(self.last.take().expect("a failure was recorded"));
        }
        let lease = pick(self.pool, self.info, self.avoid, self.fallback && self.tried == 0)
            .map_err(|no| self.last.take().unwrap_or_else(|| Failure::no_worker(no)))?;
        if self.tried > 0 {
            self.router.metrics.retry(self.label);
        }
        self.tried += 1;
        Ok(lease)
    }

    /// Records a failure on `lease`: `Err` ends the request (the client's own 4xx).
    fn failed(&mut self, lease: &Lease, err: LegError) -> Result<(), Failure> {
        self.last = Some(leg_failed(self.router, self.leg, lease, err)?);
        self.avoid.push(lease.index());
        Ok(())
    }
}

/// What every pair attempt of one request shares.
struct PairCtx {
    raw: Bytes,
    body: Map<String, Value>,
    info: RequestInfo,
    prefill_req: LegRequest,
    leg: LegTemplate,
}

/// How one pair attempt ended.
enum PairOutcome {
    Answer(Started, Lease, Instant),
    /// The prefill leg failed on every prefill tried (or the prefill said 4xx).
    Prefill(Failure),
    /// The decode failed before its first output; `last` is what the client would hear.
    Decode { decode: usize, prefill: usize, last: Failure },
    /// The decode said 4xx: the client hears it as is.
    DecodeRefused(Failure),
}

/// Grace a prefill leg gets to answer after its client has gone (see run_pair).
const PREFILL_GRACE: Duration = Duration::from_secs(1);

async fn disaggregated(
    router: &Arc<Router>,
    headers: &HeaderMap,
    raw: &Bytes,
    leg: &LegTemplate,
) -> Result<(Started, Lease, Instant), Failure> {
    let body = parse_object(raw).map_err(|e| Failure::api(e, "bad_request"))?;
    let info = info_for(router, &[&router.prefill, &router.decode], headers, &body);
    let ctx = Arc::new(PairCtx {
        prefill_req: leg.with_body(prefill_body(&body)),
        raw: raw.clone(),
        body,
        info,
        leg: leg.clone(),
    });
    let (mut avoid_p, mut avoid_d) = (Vec::new(), Vec::new());
    let pairs = if router.cfg.rerun_pair { 2 } else { 1 };
    let mut last = None;
    for pair in 0..pairs {
        if pair > 0 {
            router.metrics.retry("pair");
        }
        // The decode is reserved first: with none healthy, no prefill KV is made for nothing.
        let decode = pick(&router.decode, &ctx.info, &avoid_d, pair > 0).map_err(Failure::no_worker)?;
        let (tx, rx) = oneshot::channel();
        tokio::spawn(run_pair(router.clone(), ctx.clone(), decode, avoid_p.clone(), pair > 0, tx));
        let outcome = rx.await.map_err(|_| Failure::api(ApiError::internal("the request's pair task ended unexpectedly"), "internal"))?;
        match outcome {
            PairOutcome::Answer(started, lease, t) => return Ok((started, lease, t)),
            PairOutcome::Prefill(f) | PairOutcome::DecodeRefused(f) => return Err(f),
            PairOutcome::Decode { decode, prefill, last: f } => {
                avoid_d.push(decode);
                if !avoid_p.contains(&prefill) {
                    avoid_p.push(prefill);
                }
                last = Some(f);
            }
        }
    }
    Err(last.expect("at least one pair was tried"))
}

/// One pair attempt, in a task of its own so that it can keep the prefill's KV from being
/// stranded when the client leaves (the handler is then dropped, closing `tx`):
/// - during the prefill leg: the prefill gets PREFILL_GRACE to answer. Real vLLM can have
///   finished computing (and be holding the KV for a decode) a few milliseconds before it
///   answers; if the answer comes, the decode leg is sent as below. Otherwise the prefill
///   request is dropped, which makes vLLM abort it and free its KV.
/// - after the prefill answered: the decode leg is sent anyway and kept until its first
///   output, when the decode has pulled the KV (or told the prefill to free it); then it
///   is dropped, which makes vLLM abort it.
async fn run_pair(
    router: Arc<Router>,
    ctx: Arc<PairCtx>,
    decode: Lease,
    mut avoid_p: Vec<usize>,
    fallback: bool,
    mut tx: oneshot::Sender<PairOutcome>,
) {
    let prefilled = {
        let prefill = prefill_leg(&router, &ctx.info, &ctx.prefill_req, &mut avoid_p, fallback);
        tokio::pin!(prefill);
        tokio::select! {
            biased;
            done = &mut prefill => done,
            () = tx.closed() => match tokio::time::timeout(PREFILL_GRACE, prefill).await {
                Ok(done) => done,
                Err(_) => return,
            },
        }
    };
    let (params, prefill_index) = match prefilled {
        Ok(done) => done,
        Err(f) => {
            let _ = tx.send(PairOutcome::Prefill(f));
            return;
        }
    };
    let t = Instant::now();
    let decode_req = ctx.leg.with_body(decode_body(&ctx.raw, &ctx.body, params.as_ref()));
    let result = legs::answer(&router.client, &decode, &decode_req).await;
    if tx.is_closed() {
        // The client left; the decode has produced its first output (or failed): drop it.
        router.metrics.abandoned_decode();
        return;
    }
    let outcome = match result {
        Ok(started) => {
            router.metrics.leg_time("decode_first_byte", t);
            PairOutcome::Answer(started, decode, t)
        }
        Err(e) => match leg_failed(&router, Leg::Decode, &decode, e) {
            Ok(last) => PairOutcome::Decode { decode: decode.index(), prefill: prefill_index, last },
            Err(refused) => PairOutcome::DecodeRefused(refused),
        },
    };
    let _ = tx.send(outcome);
}

/// The prefill leg, retried on other prefill workers; returns the params and the worker.
async fn prefill_leg(
    router: &Router,
    info: &RequestInfo,
    req: &LegRequest,
    avoid: &mut Vec<usize>,
    fallback: bool,
) -> Result<(Option<Value>, usize), Failure> {
    let mut tries = Attempts { router, pool: &router.prefill, info, avoid, fallback, leg: Leg::Prefill, label: "prefill", tried: 0, last: None };
    loop {
        let lease = tries.next()?;
        let t = Instant::now();
        match legs::prefill(&router.client, &lease, req).await {
            Ok(params) => {
                router.metrics.leg_time("prefill", t);
                return Ok((params, lease.index()));
            }
            Err(e) => tries.failed(&lease, e)?,
        }
    }
}

/// Non-PD mode: one leg to a colocated worker, retried elsewhere before its first byte.
async fn colocated(router: &Router, headers: &HeaderMap, raw: &Bytes, leg: &LegTemplate) -> Result<(Started, Lease, Instant), Failure> {
    let info = if router.workers.needs_request_info() {
        let body = parse_object(raw).map_err(|e| Failure::api(e, "bad_request"))?;
        info_for(router, &[&router.workers], headers, &body)
    } else {
        RequestInfo::default()
    };
    let req = leg.with_body(raw.clone());
    let mut avoid = Vec::new();
    let mut tries = Attempts { router, pool: &router.workers, info: &info, avoid: &mut avoid, fallback: false, leg: Leg::Decode, label: "worker", tried: 0, last: None };
    loop {
        let lease = tries.next()?;
        let t = Instant::now();
        match legs::answer(&router.client, &lease, &req).await {
            Ok(started) => {
                router.metrics.leg_time("decode_first_byte", t);
                return Ok((started, lease, t));
            }
            Err(e) => tries.failed(&lease, e)?,
        }
    }
}

fn respond(started: Started, mut held: Held, idle: Duration) -> Response {
    held.record.status(started.status.as_u16());
    let worker = held.lease.url().to_string();
    let body = match started.body {
        StartedBody::Whole(bytes) => relay::whole(bytes, held),
        StartedBody::Events { head, rest } => relay::events(head, rest, idle, worker, held),
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = started.status;
    if let Some(ct) = started.content_type {
        resp.headers_mut().insert(CONTENT_TYPE, ct);
    }
    resp
}
