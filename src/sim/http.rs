//! The simulator's HTTP API: vLLM's endpoints, with the fault knobs applied at the door.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use bytes::Bytes;
use futures_util::stream;
use serde_json::json;

use super::config::SimArgs;
use super::engine::{Engine, Event, Job, Output};
use super::metrics::SimMetrics;
use super::request::{self, Api, GenRequest, KvRequest, Limits};
use super::response::{Ending, Meta, TextOut};
use crate::api::body::{parse_object, read_limited, require_json};
use crate::api::{sse, ApiError, ErrorKind};

const MAX_BODY: usize = 64 << 20;

pub struct Sim {
    pub args: SimArgs,
    pub engines: Vec<Arc<Engine>>,
    pub metrics: SimMetrics,
    pub ready: AtomicBool,
    pub dead: Arc<AtomicBool>,
    /// Generation requests received (for --crash-after-requests).
    seen: AtomicU64,
    /// HTTP generation requests in flight (`/load`).
    in_flight: AtomicUsize,
    started: u64,
}

pub fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl Sim {
    pub fn new(args: SimArgs, engines: Vec<Arc<Engine>>, metrics: SimMetrics, dead: Arc<AtomicBool>) -> Self {
        Sim {
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

pub fn router(sim: Arc<Sim>) -> Router {
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat))
        .route("/health", get(health))
        .route("/v1/models", get(models))
        .route("/load", get(load))
        .route("/tokenize", post(tokenize))
        .route("/metrics", get(metrics))
        .fallback(|| async { ApiError::new(ErrorKind::NotFound, "Not Found") })
        .layer(axum::middleware::from_fn_with_state(sim.clone(), authenticate))
        .with_state(sim)
}

fn not_serving(sim: &Sim) -> Option<ApiError> {
    if sim.dead.load(Ordering::SeqCst) {
        Some(ApiError::new(ErrorKind::ServiceUnavailable, "engine is dead"))
    } else if !sim.ready.load(Ordering::SeqCst) {
        Some(ApiError::new(ErrorKind::ServiceUnavailable, "engine is starting (--startup-delay-ms)"))
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
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        sim.metrics.render(&sim.engines, &sim.args.model),
    )
        .into_response()
}

async fn tokenize(State(sim): State<Arc<Sim>>, headers: HeaderMap, body: Body) -> Response {
    let result = async {
        require_json(&headers)?;
        let body = parse_object(&read_limited(&headers, body, MAX_BODY).await?)?;
        request::check_model(&body, &sim.args.model)?;
        let api = if body.contains_key("messages") { Api::Chat } else { Api::Completions };
        let tokens = request::prompt_tokens(api, &body)?;
        Ok::<_, ApiError>(json!({"count": tokens.len(), "max_model_len": sim.args.max_model_len,
            "tokens": tokens, "token_strs": null}))
    }
    .await;
    match result {
        Ok(v) => axum::Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn completions(State(sim): State<Arc<Sim>>, headers: HeaderMap, body: Body) -> Response {
    generate(sim, Api::Completions, headers, body).await.unwrap_or_else(IntoResponse::into_response)
}

async fn chat(State(sim): State<Arc<Sim>>, headers: HeaderMap, body: Body) -> Response {
    generate(sim, Api::Chat, headers, body).await.unwrap_or_else(IntoResponse::into_response)
}

fn hex16() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// Counts a generation request in flight for `/load` until dropped.
struct InFlight(Arc<Sim>);

impl InFlight {
    fn new(sim: &Arc<Sim>) -> Self {
        sim.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(sim.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

fn crash_now() -> ! {
    tracing::error!("crashing on purpose (--crash-after-requests)");
    std::process::exit(1)
}

fn pick_engine(sim: &Sim, headers: &HeaderMap) -> Result<Arc<Engine>, ApiError> {
    let n = sim.engines.len();
    match headers.get("x-data-parallel-rank") {
        Some(v) => {
            let rank: i64 = v
                .to_str()
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .ok_or_else(|| ApiError::bad_request("X-data-parallel-rank must be an integer"))?;
            if rank < 0 || rank as usize >= n {
                return Err(ApiError::bad_request(format!("data_parallel_rank {rank} is out of range [0, {n}).")));
            }
            Ok(sim.engines[rank as usize].clone())
        }
        // vLLM's internal DP load balancing: the least loaded engine.
        None => Ok(sim.engines.iter().min_by_key(|e| e.load()).expect("at least one engine").clone()),
    }
}

async fn generate(sim: Arc<Sim>, api: Api, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    let in_flight = InFlight::new(&sim);
    if let Some(e) = not_serving(&sim) {
        return Err(e);
    }
    let nth = sim.seen.fetch_add(1, Ordering::SeqCst) + 1;
    let doomed = sim.args.crash_after_requests.is_some_and(|n| nth > n);
    require_json(&headers)?;
    let body = parse_object(&read_limited(&headers, body, MAX_BODY).await?)?;
    if sim.args.fail_rate > 0.0 && rand::random::<f64>() < sim.args.fail_rate {
        let status = StatusCode::from_u16(sim.args.fail_status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return Err(ApiError::with_status(status, "simulated failure (--fail-rate)"));
    }
    let limits = Limits { model: &sim.args.model, max_model_len: sim.args.max_model_len as usize };
    let req = request::parse(api, &body, &limits)?;
    if doomed && !req.stream {
        crash_now();
    }
    let engine = pick_engine(&sim, &headers)?;
    let base = headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|s| !s.is_empty())
        .map_or_else(hex16, str::to_owned);
    let id = match api {
        Api::Completions => format!("cmpl-{base}"),
        Api::Chat => format!("chatcmpl-{base}"),
    };
    tracing::debug!(
        id = %id,
        rank = engine.rank,
        prompt_tokens = req.prompt.len(),
        max_tokens = req.max_tokens,
        stream = req.stream,
        kv = ?req.kv,
        "generation request"
    );
    // The role decides which half of the handshake this instance honours.
    let kv = match req.kv.clone() {
        KvRequest::RemoteDecode if !sim.args.role.produces_kv() => KvRequest::Local,
        KvRequest::RemotePrefill(_) if !sim.args.role.consumes_kv() => KvRequest::Local,
        kv => kv,
    };
    let job = Job {
        request_id: format!("{id}-0-{:08x}", rand::random::<u32>()),
        prompt: req.prompt.clone(),
        generator: req.generator,
        max_tokens: req.max_tokens,
        min_tokens: req.min_tokens,
        ignore_eos: req.ignore_eos,
        kv,
    };
    let meta = Meta { api, id, created: now_secs(), model: sim.args.model.clone(), prompt_tokens: req.prompt.len() };
    let out = engine.submit(job);
    if req.stream {
        stream_response(meta, req, out, doomed, in_flight).await
    } else {
        full_response(meta, req, out).await
    }
}

async fn full_response(meta: Meta, req: GenRequest, mut out: Output) -> Result<Response, ApiError> {
    let mut text = TextOut::new(req.stop, req.stop_token_ids);
    loop {
        match out.next().await {
            Some(Event::Token(t)) => {
                if let (_, Some(ending)) = text.push(t) {
                    let tokens = text.tokens;
                    return Ok(axum::Json(meta.full_response(&text.text, &ending, tokens, None)).into_response());
                }
            }
            Some(Event::Finished { reason, kv_transfer_params }) => {
                let ending = Ending::from_finish(reason);
                // EOS is generated (and counted) but never shown.
                let tokens = text.tokens + usize::from(ending == Ending::Eos);
                return Ok(axum::Json(meta.full_response(&text.text, &ending, tokens, kv_transfer_params)).into_response());
            }
            Some(Event::Failed(e)) => return Err(e),
            None => return Err(ApiError::internal("engine dropped the request")),
        }
    }
}

/// SSE as vLLM sends it; headers go out with the first chunk, as vLLM's do.
async fn stream_response(
    meta: Meta,
    req: GenRequest,
    mut out: Output,
    doomed: bool,
    in_flight: InFlight,
) -> Result<Response, ApiError> {
    let first = out.next().await;
    let state = StreamState {
        meta,
        text: TextOut::new(req.stop, req.stop_token_ids),
        out,
        pending: first,
        include_usage: req.include_usage,
        continuous_usage: req.continuous_usage,
        role_sent: false,
        phase: Phase::Tokens,
        doomed,
        chunks: 0,
        _in_flight: in_flight,
    };
    let body = stream::unfold(state, |mut s| async move {
        let chunk = s.next_chunk().await?;
        Some((Ok::<Bytes, std::convert::Infallible>(chunk), s))
    });
    Ok(([(header::CONTENT_TYPE, sse::CONTENT_TYPE)], Body::from_stream(body)).into_response())
}

enum Phase {
    Tokens,
    Usage(usize),
    Done,
    End,
}

struct StreamState {
    meta: Meta,
    text: TextOut,
    out: Output,
    pending: Option<Event>,
    include_usage: bool,
    continuous_usage: bool,
    role_sent: bool,
    phase: Phase,
    doomed: bool,
    chunks: usize,
    _in_flight: InFlight,
}

impl StreamState {
    async fn next_chunk(&mut self) -> Option<Bytes> {
        if self.doomed && self.chunks > 0 {
            // The first chunk went out; die mid-stream (--crash-after-requests).
            tokio::time::sleep(Duration::from_millis(50)).await;
            crash_now();
        }
        let chunk = self.produce().await;
        if chunk.is_some() {
            self.chunks += 1;
        }
        chunk
    }

    fn usage_for(&self, tokens: usize) -> Option<super::response::Usage> {
        self.continuous_usage.then(|| self.meta.usage(tokens))
    }

    async fn produce(&mut self) -> Option<Bytes> {
        loop {
            match self.phase {
                Phase::Usage(tokens) => {
                    self.phase = Phase::Done;
                    return Some(self.meta.usage_chunk(tokens));
                }
                Phase::Done => {
                    self.phase = Phase::End;
                    return Some(Bytes::from_static(sse::DONE));
                }
                Phase::End => return None,
                Phase::Tokens => {}
            }
            // The chat stream opens with a role-only delta, with the first output.
            if self.meta.api == Api::Chat && !self.role_sent {
                self.role_sent = true;
                return Some(self.meta.chunk("", None, true, None));
            }
            let event = match self.pending.take() {
                Some(e) => Some(e),
                None => self.out.next().await,
            };
            match event {
                Some(Event::Token(t)) => {
                    let (mut delta, ending) = self.text.push(t);
                    if let Some(ending) = ending {
                        let tokens = self.text.tokens;
                        return Some(self.finish(&delta, &ending, tokens));
                    }
                    // vLLM sends the last token and the finish reason in one chunk.
                    match self.out.try_next() {
                        Some(Event::Finished { reason, .. }) => {
                            let ending = Ending::from_finish(reason);
                            let tokens = self.text.tokens + usize::from(ending == Ending::Eos);
                            delta.push_str(&self.text.flush());
                            return Some(self.finish(&delta, &ending, tokens));
                        }
                        other => self.pending = other,
                    }
                    if !delta.is_empty() {
                        return Some(self.meta.chunk(&delta, None, false, self.usage_for(self.text.tokens)));
                    }
                }
                Some(Event::Finished { reason, .. }) => {
                    let ending = Ending::from_finish(reason);
                    let tokens = self.text.tokens + usize::from(ending == Ending::Eos);
                    let rest = self.text.flush();
                    return Some(self.finish(&rest, &ending, tokens));
                }
                Some(Event::Failed(e)) => {
                    self.phase = Phase::Done;
                    return Some(sse::event(&e.body()));
                }
                None => {
                    self.phase = Phase::Done;
                    return Some(sse::event(&ApiError::internal("engine dropped the request").body()));
                }
            }
        }
    }

    fn finish(&mut self, delta: &str, ending: &Ending, tokens: usize) -> Bytes {
        self.phase = if self.include_usage { Phase::Usage(tokens) } else { Phase::Done };
        self.meta.chunk(delta, Some(ending), false, self.usage_for(tokens))
    }
}

/// The first line a test or launcher reads to learn where the sim listens.
pub fn banner(args: &SimArgs, port: u16, side_ports: &[u16]) -> String {
    format!(
        "disagg sim (SIMULATED vLLM engine, no model) listening on http://{}:{port} role={:?} \
         dp={} model={} side_channel_ports={side_ports:?}",
        if args.host.contains(':') { format!("[{}]", args.host) } else { args.host.clone() },
        args.role,
        args.data_parallel_size,
        args.model,
    )
}

