//! One generation request, top to bottom:
//! JSON content type → read the body (bounded in size and time, before it holds a permit)
//! → scan it once → check the fields a decode would reject (before any prefill runs) →
//! admit (one permit per generation) → run it (pair.rs: pick, prefill leg, decode leg,
//! retries), or, for a list of prompts or `n` > 1, one run per generation merged into one
//! answer (fanout.rs) → relay the answer (relay.rs).
//! docs/FAILURES.md is the contract this file implements.

pub(crate) mod drain;
pub(crate) mod fanout;
pub(crate) mod passthrough;
pub(crate) mod relay;

use std::sync::Arc;

use axum::body::Body;
use axum::http::header::AUTHORIZATION;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;

use crate::api::body::{read_within, require_json, BodyBudget, Budgeted};
use crate::api::dialect::Dialect;
use crate::api::fields::Api;
use crate::api::ApiError;
use crate::router::admission::{Admission, Permit, Refused, Ticket};
use crate::router::config::RouterConfig;
use crate::router::flow::drain::{Drain, Phase};
use crate::router::metrics::Cause;
use crate::router::metrics::{RequestRecord, RouterMetrics};
use crate::router::observe::Journey;
use crate::router::pair::failure::Failure;
use crate::router::pair::{Delivery, Job, LegTemplate, Pairs};
use crate::router::policy::RequestInfo;
use crate::router::request::body::ClientBody;
use crate::router::request::{self, LegBodies, LegPriority, LegShape};
use crate::router::tenants::limits::RateHeaders;
use crate::router::tenants::Tenants;
use crate::router::workers::topology::Topology;
use relay::Held;

/// Everything the router shares between requests.
pub(crate) struct Router {
    pub(crate) cfg: RouterConfig,
    pub(crate) topology: Arc<Topology>,
    /// Whether a pool's policy reads the request's prompt or session key.
    pub(crate) needs_request_info: bool,
    pub(crate) admission: Arc<Admission>,
    /// Who clients are and what they may use (--tenants).
    pub(crate) tenants: Arc<Tenants>,
    pub(crate) metrics: Arc<RouterMetrics>,
    pub(crate) tokenizer: Option<Arc<tokenizers::Tokenizer>>,
    /// kv_aware: what each worker's DP ranks hold (kv_intake.rs feeds it), and the model's
    /// tokenizer and chat template to key prompts as the engine does.
    pub(crate) kv_index: Option<Arc<crate::router::kv_aware::index::KvIndex>>,
    pub(crate) model_tokenizer: Option<crate::tokenize::ModelTokenizer>,
    /// `Authorization` sent to workers (--api-key); without it, the client's is passed on
    /// unless client keys are configured (flow.rs, `worker_authorization`).
    pub(crate) worker_auth: Option<HeaderValue>,
    /// The PD state machine, with the retry rules and budget it spends.
    pub(crate) pairs: Arc<Pairs>,
    pub(crate) drain: Arc<Drain>,
    /// Request-body bytes held at once (--max-body-bytes-in-flight).
    pub(crate) body_budget: BodyBudget,
    /// The Responses API's stored conversations.
    pub(crate) responses: Arc<crate::router::responses::Responses>,
    /// The access log and traces (off: no journeys).
    pub(crate) observer: Arc<crate::router::observe::Observer>,
}

#[derive(Clone, Copy, Debug)]
pub(crate) enum Endpoint {
    Completions,
    Chat,
    /// Anthropic's Messages API, as vLLM serves it.
    Messages,
    /// vLLM's token-in / token-out API (`--enable-scale-out`), as llm-d uses it.
    TokensOut,
    /// OpenAI's Responses API, its conversations kept by the router (router/responses/).
    Responses,
}

impl Endpoint {
    pub(crate) fn path(self) -> &'static str {
        match self {
            Endpoint::Completions => "/v1/completions",
            Endpoint::Chat => "/v1/chat/completions",
            Endpoint::Messages => "/v1/messages",
            Endpoint::TokensOut => "/inference/v1/generate",
            Endpoint::Responses => "/v1/responses",
        }
    }
    fn label(self) -> &'static str {
        match self {
            Endpoint::Completions => "completions",
            Endpoint::Chat => "chat_completions",
            Endpoint::Messages => "messages",
            Endpoint::TokensOut => "generate",
            Endpoint::Responses => "responses",
        }
    }
    pub(crate) fn dialect(self) -> Dialect {
        match self {
            Endpoint::Completions | Endpoint::Chat | Endpoint::TokensOut => Dialect::OpenAi,
            Endpoint::Messages => Dialect::Anthropic,
            Endpoint::Responses => Dialect::Responses,
        }
    }
    /// vLLM's checks of what the prefill leg overrides, the request's shape, and how its
    /// prefill leg is written.
    fn check(self, body: &ClientBody) -> Result<(request::Shape, LegShape), ApiError> {
        match self {
            Endpoint::Completions => Ok((request::check(Api::Completions, body)?, LegShape::OpenAi)),
            Endpoint::Chat => Ok((request::check(Api::Chat, body)?, LegShape::OpenAi)),
            Endpoint::Messages => Ok((request::check_messages(body)?, LegShape::Anthropic)),
            Endpoint::TokensOut => request::check_tokens_out(body),
            Endpoint::Responses => Ok((request::check_responses(body)?, LegShape::Responses)),
        }
    }
}

pub(crate) async fn generate(router: Arc<Router>, ep: Endpoint, headers: HeaderMap, body: Body) -> Response {
    let request_id = request_id(&headers);
    let mut record = RequestRecord::new(router.metrics.clone(), ep.label());
    let journey = router.observer.journey(&headers, ep.path(), &request_id);
    if let Some(j) = &journey {
        record.watch(j.clone());
    }
    let mut record = Some(record);
    let mut rate = None;
    let served = serve(&router, ep, &headers, body, Seen { request_id: &request_id, journey }, &mut record, &mut rate);
    let result = tokio::select! {
        result = served => result,
        () = router.drain.reached(Phase::Cut) => Err(Failure::shutting_down()),
    };
    let mut resp = match result {
        Ok(resp) => resp,
        Err(f) => {
            if let Some(rec) = record.as_mut() {
                rec.status(f.status);
                rec.fail(f.cause);
                rec.finish();
            }
            in_dialect(f.response, ep.dialect()).await
        }
    };
    resp.headers_mut().insert("x-request-id", request_id);
    if let Some(rate) = rate {
        rate.write(resp.headers_mut());
    }
    resp
}

/// An error answer (the router's own, or a worker's) in the endpoint's dialect.
pub(crate) async fn in_dialect(resp: Response, dialect: Dialect) -> Response {
    if dialect == Dialect::OpenAi {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    // Error bodies are small: the router's own, or a worker's within its error cap.
    let Ok(bytes) = axum::body::to_bytes(body, 1 << 20).await else {
        return Response::from_parts(parts, Body::empty());
    };
    match dialect.translate_error(&bytes) {
        Some(rewritten) => {
            parts.headers.remove(axum::http::header::CONTENT_LENGTH);
            Response::from_parts(parts, Body::from(rewritten))
        }
        None => Response::from_parts(parts, Body::from(bytes)),
    }
}

/// The client's `x-request-id` (up to 256 bytes), or a new one.
fn request_id(headers: &HeaderMap) -> HeaderValue {
    headers
        .get("x-request-id")
        .filter(|v| !v.is_empty() && v.len() <= 256)
        .cloned()
        .unwrap_or_else(|| HeaderValue::from_str(&uuid::Uuid::new_v4().simple().to_string()).expect("hex is a valid header"))
}

/// How a request is known: its id, and its journey when observed.
struct Seen<'a> {
    request_id: &'a HeaderValue,
    journey: Option<Arc<Journey>>,
}

async fn serve(
    router: &Arc<Router>,
    ep: Endpoint,
    headers: &HeaderMap,
    body: Body,
    seen: Seen<'_>,
    record: &mut Option<RequestRecord>,
    rate: &mut Option<RateHeaders>,
) -> Result<Response, Failure> {
    let Seen { request_id, journey } = seen;
    let active = router.drain.active();
    let tenant = router.tenants.of(headers);
    if let Some(j) = journey.as_ref().filter(|_| router.tenants.configured()) {
        j.tenant(tenant.name.clone());
    }
    require_json(headers).map_err(Failure::bad_request)?;
    // The body's share of --max-body-bytes-in-flight is held until the answer has started.
    let Budgeted { bytes: raw, share: _body_share } = read_body(router, headers, body).await?;
    let body = ClientBody::parse_without_blocking(raw).await.map_err(Failure::bad_request)?;
    // A Responses turn: its history from the router's store, the router's id.
    let (body, turn) = match ep {
        Endpoint::Responses => {
            let owner = crate::router::responses::Responses::owner(headers, &router.cfg.auth, &router.tenants);
            let (body, turn) = router.responses.prepare(owner, body).await.map_err(Failure::bad_request)?;
            (body, Some(turn))
        }
        _ => (body, None),
    };
    let (shape, leg_shape) = ep.check(&body).map_err(Failure::bad_request)?;
    if let Some(j) = &journey {
        j.model(body.get("model").and_then(|m| serde_json::from_slice::<&str>(m).ok()));
    }
    if matches!(*router.topology, Topology::Disaggregated { .. }) {
        request::check_pd(&body).map_err(Failure::bad_request)?;
    }
    let generations = shape.generations();
    if generations > router.cfg.max_pairs {
        return Err(Failure::bad_request(ApiError::bad_request(format!(
            "this request makes {generations} generations (prompts x n); the router runs at most {} per request \
             (--max-pairs-per-request): send it as several requests",
            router.cfg.max_pairs
        ))));
    }
    if router.drain.draining() {
        return Err(Failure::shutting_down());
    }
    // Flow control: the tenant's priority and limits, then the router's queue.
    let priority = tenant.priority(crate::router::tenants::asked_priority(headers, &body).map_err(Failure::bad_request)?);
    // Without a tenants file there is one tenant, without limits: nothing to estimate or charge.
    let mut cost = crate::router::tenants::Cost::default();
    if router.tenants.configured() {
        cost = crate::router::tenants::estimate(&body, generations);
        let label = crate::router::metrics::TenantLabel { tenant: tenant.name.clone(), priority: router.tenants.priority_label(priority) };
        record.as_mut().expect("the record stays until the answer is built").tenant(label, cost.total());
        match tenant.charge(cost) {
            Ok(headers) => *rate = Some(headers),
            Err(limited) => {
                *rate = Some(limited.headers);
                let cause = if limited.error.status == StatusCode::TOO_MANY_REQUESTS { Cause::RateLimited } else { Cause::BadRequest };
                return Err(Failure::api(*limited.error, cause));
            }
        }
    }
    router.pairs.budget.request();
    let waited = std::time::Instant::now();
    let permit = admit(&router.admission, Ticket { tenant: tenant.clone(), priority, cost: cost.total(), generations }).await?;
    if let Some(rec) = record.as_ref() {
        rec.queued(waited);
    }
    if let Some(j) = &journey {
        j.admitted();
    }
    tracing::debug!(request_id = ?request_id, tenant = %tenant.name, priority, queued_ms = waited.elapsed().as_millis() as u64, "admitted");
    let leg_priority =
        if router.cfg.flow_control.orders() { LegPriority::Set(priority.to_string().into_bytes()) } else { LegPriority::AsSent };
    let transit = permit.transit();
    // Shared with the pair (Job::admitted): it goes back when both are over.
    let permit = Arc::new(permit);
    let t = &router.cfg.timeouts;
    let leg = LegTemplate {
        path: ep.path(),
        request_id: request_id.clone(),
        authorization: worker_authorization(router, headers),
        prefill_timeout: t.prefill,
        first_byte_timeout: t.decode_first_byte,
        request_timeout: t.request,
        journey: journey.clone(),
    };
    let mut held = Held {
        permit,
        leases: Vec::new(),
        record: record.take().expect("the record stays until the answer is built"),
        started: std::time::Instant::now(),
        active,
    };
    if generations > 1 {
        let marks = fanout::Marks { transit, priority: leg_priority };
        return fanout::run(router, headers, &body, &shape, &leg, held, marks).await.map_err(|(f, held)| {
            *record = Some(held.record);
            f
        });
    }
    let info = info_for(router, headers, &body, ep.dialect()).await;
    let bodies = LegBodies::shaped(body, leg_shape).with_priority(leg_priority);
    let job = Arc::new(Job {
        bodies,
        info,
        leg,
        delivery: Delivery::from(shape.gen.stream),
        transit,
        prediction: Default::default(),
        admitted: Some(held.permit.clone() as Arc<dyn Send + Sync>),
    });
    match router.pairs.run(job.clone()).await {
        Ok(answer) => {
            held.record.first_output();
            let prediction =
                job.info.kv.as_ref().and_then(|kv| {
                    crate::router::kv_aware::check::predict(kv, answer.cache_from.as_ref(), answer.started.status.is_success())
                });
            if let (Some(j), Some(p)) = (&journey, &prediction) {
                j.predicted_cached(p.want());
            }
            let served = router.cfg.worker_headers.then(|| (answer.prefill.clone(), answer.lease.holder()));
            let pace = (router.pairs.slo.is_some() && job.delivery == Delivery::Stream).then(|| relay::Pace::new(answer.lease.worker()));
            let finish = relay::Finish { prediction, dialect: ep.dialect(), turn, max_event: router.cfg.max_payload, journey, pace };
            let mut resp = relay::respond(answer, held, t.stream_idle, &router.drain, finish);
            if let Some((prefill, answered)) = served {
                name_workers(resp.headers_mut(), prefill.as_ref(), &answered);
            }
            Ok(resp)
        }
        Err(f) => {
            *record = Some(held.record);
            Err(f)
        }
    }
}

/// What workers are sent as `Authorization`: --api-key; without it, the client's own header
/// only where the router checks no client keys (a client key, a tenant's included, is the
/// router's secret, never a worker's).
pub(crate) fn worker_authorization(router: &Router, headers: &HeaderMap) -> Option<HeaderValue> {
    match &router.worker_auth {
        Some(key) => Some(key.clone()),
        None if router.cfg.auth.client_keys.is_empty() && !router.tenants.configured() => headers.get(AUTHORIZATION).cloned(),
        None => None,
    }
}

/// `--worker-headers`: the prefill rank that ran the prefill leg (none when the worker
/// answered alone) and the rank that answered, as `URL; rank=N`.
fn name_workers(h: &mut HeaderMap, prefill: Option<&crate::router::policy::WorkerRank>, answered: &crate::router::policy::WorkerRank) {
    let value = |w: &crate::router::policy::WorkerRank| HeaderValue::from_str(&format!("{}; rank={}", w.url, w.rank)).ok();
    if let Some(v) = prefill.and_then(value) {
        h.insert("x-disagg-prefill", v);
    }
    if let Some(v) = value(answered) {
        h.insert("x-disagg-decode", v);
    }
}

/// The body, whole, within --max-payload-size and --body-read-timeout-secs.
pub(crate) async fn read_body(router: &Router, headers: &HeaderMap, body: Body) -> Result<Budgeted, Failure> {
    let limit = router.cfg.max_payload;
    match tokio::time::timeout(router.cfg.timeouts.body_read, read_within(headers, body, limit, Some(&router.body_budget))).await {
        Ok(read) => read.map_err(Failure::bad_request),
        Err(_) => Err(Failure::bad_request(ApiError::with_status(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "the request body did not arrive within {:.0}s (--body-read-timeout-secs)",
                router.cfg.timeouts.body_read.as_secs_f64()
            ),
        ))),
    }
}

pub(crate) async fn admit(admission: &Admission, ticket: Ticket) -> Result<Permit, Failure> {
    admission.admit(ticket).await.map_err(|r| match r {
        Refused::QueueFull(e) => Failure::api(e, Cause::QueueFull),
        Refused::QueueTimeout(e) => Failure::api(e, Cause::QueueTimeout),
        Refused::TooLarge(e) => Failure::api(e, Cause::BadRequest),
    })
}

/// What the pools' policies read from a request (nothing, for those that read nothing).
pub(crate) async fn info_for(router: &Arc<Router>, headers: &HeaderMap, body: &ClientBody, dialect: Dialect) -> RequestInfo {
    let mut info = if router.needs_request_info {
        request::request_info(headers, body, router.tokenizer.as_deref(), router.cfg.cache_aware.max_prefix)
    } else {
        RequestInfo::default()
    };
    if router.kv_index.is_some() {
        // Text without a local tokenizer, and Anthropic's Messages always (vLLM converts them
        // with its own code: system, content blocks, tools), are tokenized by the engine's
        // own render endpoint.
        let text = crate::router::kv_aware::tokens::is_text(body);
        let rendered = if matches!(dialect, Dialect::Anthropic | Dialect::Responses) || (router.model_tokenizer.is_none() && text) {
            crate::router::kv_aware::tokens::render(&router.topology, router.worker_auth.as_ref(), body, dialect).await
        } else {
            None
        };
        // Tokenizing a long prompt is CPU work proportional to its size: off the async
        // workers, outside every lock; then looked up under the index's read lock.
        let (r, b) = (router.clone(), body.clone());
        info.kv = tokio::task::spawn_blocking(move || kv_view(&r, &b, rendered, dialect)).await.ok().flatten();
    }
    if router.pairs.slo.is_some() {
        // slo_aware: kv_aware's exact count, else OpenAI's rule of thumb on the body.
        info.tokens = info.kv.as_ref().map_or_else(|| crate::router::tenants::estimate(body, 1).prompt as usize, |kv| kv.tokens);
    }
    info
}

/// kv_aware's view of a prompt: its blocks, and how many of them each rank holds.
fn kv_view(router: &Router, body: &ClientBody, rendered: Option<Vec<u32>>, dialect: Dialect) -> Option<crate::router::policy::KvView> {
    let index = router.kv_index.as_ref()?;
    let local = || match dialect {
        Dialect::OpenAi => crate::router::kv_aware::tokens::prompt_tokens(body, router.model_tokenizer.as_ref()),
        Dialect::Anthropic | Dialect::Responses => None,
    };
    let tokens = rendered.or_else(local).unwrap_or_default();
    let block_size = index.block_size();
    let keys = crate::router::kv_aware::index::block_hashes(&tokens, block_size);
    Some(crate::router::policy::KvView {
        tokens: tokens.len(),
        block_size,
        blocks: keys.len(),
        held: index.prefix_blocks(block_size, &keys),
        indexed: index.sizes(),
    })
}
