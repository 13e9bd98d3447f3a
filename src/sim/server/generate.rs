//! One generation request through the simulator: fault knobs at the door, vLLM's checks,
//! one engine job per generation (a completions prompt list makes one per prompt, `n` one
//! per choice, all with the request's `kv_transfer_params`, as vLLM's engine does), and
//! vLLM's response: one JSON body, or SSE with every choice's chunks as they come, one
//! usage chunk and `[DONE]`.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::stream::{self, BoxStream, StreamExt};
use serde_json::{Map, Value};

use super::config::Role;
use super::http::{not_serving, now_secs, Sim, MAX_BODY};
use super::response::{Ending, Finished, Meta, RoleField, TextOut, Usage};
use crate::api::body::{parse_object, read_limited, require_json};
use crate::api::connector::{p2p_decode_addr, Connector};
use crate::api::{sse, ApiError, ErrorKind};
use crate::sim::engine::request::{self, Api, GenRequest, Handoff, KvRequest, Limits, RemoteKv};
use crate::sim::engine::transfer;
use crate::sim::engine::{Engine, Event, Job, Output};

pub(crate) fn hex16() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// Counts a generation request in flight for `/load` until dropped.
pub(crate) struct InFlight(Arc<Sim>);

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

pub(crate) fn crash_now() -> ! {
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

/// vLLM 0.32 frees a prefill's KV when its serving layer turns down a decode request with
/// remote-prefill params (a check after the schema; schema errors free nothing).
fn release_rejected(sim: &Sim, body: &Map<String, Value>, err: &ApiError) {
    if err.kind == ErrorKind::Validation || !sim.args.role.consumes_kv() {
        return;
    }
    let Some(Value::Object(p)) = body.get("kv_transfer_params") else { return };
    if let Ok(KvRequest::RemotePrefill(RemoteKv::Nixl(remote))) = request::kv_params(p, sim.args.kv_connector) {
        tracing::info!(request = %remote.request_id, "request rejected: telling its prefill to free the KV");
        transfer::spawn_frees(vec![remote]);
    }
}

pub(crate) async fn generate(sim: Arc<Sim>, api: Api, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    if let Some(e) = not_serving(&sim) {
        return Err(e);
    }
    require_json(&headers)?;
    let body = parse_object(&read_limited(&headers, body, MAX_BODY).await?)?;
    let Started { meta, req, outs, doomed, in_flight } = start(&sim, api, &headers, &body)?;
    if req.stream {
        Ok(stream_response(meta, req, outs, doomed, in_flight).await)
    } else {
        full_response(&meta, &req, outs).await
    }
}

/// A generation request admitted: its engine jobs submitted, their outputs to read.
pub(crate) struct Started {
    pub(crate) meta: Arc<Meta>,
    pub(crate) req: GenRequest,
    pub(crate) outs: Vec<Output>,
    /// --crash-after-requests: this one dies (before a whole answer, after a first chunk).
    pub(crate) doomed: bool,
    pub(crate) in_flight: InFlight,
}

/// The fault knobs at the door, vLLM's checks of `body` as `api`, and one engine job per
/// generation.
pub(crate) fn start(sim: &Arc<Sim>, api: Api, headers: &HeaderMap, body: &Map<String, Value>) -> Result<Started, ApiError> {
    let in_flight = InFlight::new(sim);
    let nth = sim.seen.fetch_add(1, Ordering::SeqCst) + 1;
    let doomed = sim.args.crash_after_requests.is_some_and(|n| nth > n);
    if sim.args.fail_rate > 0.0 && rand::random::<f64>() < sim.args.fail_rate {
        let status = StatusCode::from_u16(sim.args.fail_status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return Err(ApiError::with_status(status, "simulated failure (--fail-rate)"));
    }
    let limits = Limits {
        model: &sim.args.model,
        max_model_len: sim.args.max_model_len as usize,
        tokenizer: sim.tokenizer.as_deref(),
        connector: sim.args.kv_connector,
    };
    let req = request::parse(api, body, &limits).inspect_err(|e| release_rejected(sim, body, e))?;
    if doomed && !req.stream {
        crash_now();
    }
    let engine = pick_engine(sim, headers)?;
    let base = headers.get("x-request-id").and_then(|v| v.to_str().ok()).filter(|s| !s.is_empty()).map_or_else(hex16, str::to_owned);
    let id = match api {
        Api::Completions => format!("cmpl-{base}"),
        Api::Chat => format!("chatcmpl-{base}"),
    };
    tracing::debug!(id = %id, rank = engine.rank, generations = req.generations(), stream = req.stream, kv = ?req.kv, "generation request");
    // The role decides which half of the handshake this instance honours.
    let kv = match req.kv.clone() {
        KvRequest::RemoteDecode(_) if !sim.args.role.produces_kv() => KvRequest::Local,
        KvRequest::RemotePrefill(_) if !sim.args.role.consumes_kv() => KvRequest::Local,
        kv => kv,
    };
    let outs: Vec<Output> = (0..req.generations())
        .map(|k| {
            let kv = match sim.args.kv_connector {
                Connector::P2pNccl => p2p_kv(sim.args.role, &format!("{id}-{k}")),
                _ => kv.clone(),
            };
            engine.submit(Job {
                request_id: format!("{id}-{k}-{:08x}", rand::random::<u32>()),
                prompt: req.prompt_of(k).to_vec(),
                generator: req.generators[k],
                max_tokens: req.max_tokens_of(k),
                min_tokens: req.min_tokens,
                ignore_eos: req.ignore_eos,
                priority: req.priority,
                stop_token_ids: req.stop_token_ids.clone(),
                kv,
            })
        })
        .collect();
    let meta =
        Arc::new(Meta { api, id, created: now_secs(), model: sim.args.model.clone(), details: sim.args.enable_prompt_tokens_details });
    Ok(Started { meta, req, outs, doomed, in_flight })
}

/// P2pNccl engines go by the request id (`key`, vLLM's engine request id): a producer
/// pushes the prompt's KV to the decode address it names (vLLM fails a request whose id
/// names none; the simulator serves it without a transfer), a consumer waits for KV pushed
/// under it, whatever the body says.
fn p2p_kv(role: Role, key: &str) -> KvRequest {
    if role.produces_kv() {
        match p2p_decode_addr(key) {
            Some((host, port)) => KvRequest::RemoteDecode(Handoff::Push { host: host.to_string(), port, key: key.to_string() }),
            None => {
                tracing::warn!(request = key, "a P2pNccl prefill request whose id names no decode address: no KV is sent");
                KvRequest::Local
            }
        }
    } else {
        KvRequest::RemotePrefill(RemoteKv::Pushed { key: key.to_string() })
    }
}

/// Prompt tokens of a request: each prompt once, whatever its `n`.
fn prompt_tokens(req: &GenRequest) -> usize {
    req.prompts.iter().map(Vec::len).sum()
}

async fn finish_one(req: &GenRequest, mut out: Output) -> Result<Finished, ApiError> {
    let mut text = TextOut::new(req.stop.clone(), req.stop_token_ids.clone());
    let mut cached = 0;
    loop {
        match out.next().await {
            Some(Event::Prefilled { cached_tokens }) => cached = cached_tokens,
            Some(Event::Token(t)) => {
                if let (_, Some(ending)) = text.push(t) {
                    return Ok(Finished { text: text.text, ending, tokens: text.tokens, kv: None, cached });
                }
            }
            Some(Event::Finished { reason, last_token, kv_transfer_params }) => {
                // The last token may end the text itself (a stop string or stop token): that
                // is the ending shown, and the engine's params stand (vLLM's core finished
                // the request in that step, and its connector decided on the KV).
                let shown = last_token.and_then(|t| text.push(t).1);
                let ending = shown.unwrap_or_else(|| Ending::from_finish(reason));
                // EOS is generated (and counted) but never shown.
                let tokens = text.tokens + usize::from(ending == Ending::Eos);
                return Ok(Finished { text: text.text, ending, tokens, kv: kv_transfer_params, cached });
            }
            Some(Event::Failed(e)) => return Err(e),
            None => return Err(ApiError::internal("engine dropped the request")),
        }
    }
}

async fn full_response(meta: &Meta, req: &GenRequest, outs: Vec<Output>) -> Result<Response, ApiError> {
    let done = futures_util::future::join_all(outs.into_iter().map(|o| finish_one(req, o))).await;
    let choices = done.into_iter().collect::<Result<Vec<_>, _>>()?;
    let completion = choices.iter().map(|c| c.tokens).sum();
    // vLLM reports the cached tokens of the last prompt.
    let cached = choices.last().map_or(0, |c| c.cached);
    let usage = Usage::new(prompt_tokens(req), completion).cached(meta.details, cached);
    Ok(axum::Json(meta.full_response(&choices, usage)).into_response())
}

/// What one choice's stream yields.
enum Piece {
    Chunk(Bytes),
    /// The choice failed: its error event (no usage chunk follows, as in vLLM).
    Failed(Bytes),
    /// The choice ended; it generated this many tokens.
    End(usize),
}

/// Every choice's chunks as they come, then one usage chunk and `[DONE]`.
struct Merged {
    meta: Arc<Meta>,
    choices: stream::SelectAll<BoxStream<'static, Piece>>,
    pending: Option<Piece>,
    prompt_tokens: usize,
    completion_tokens: usize,
    include_usage: bool,
    failed: bool,
    sent: usize,
    doomed: bool,
    over: bool,
    /// Cached prompt tokens, as the choices learn them.
    cached: Arc<std::sync::atomic::AtomicUsize>,
    _in_flight: InFlight,
}

impl Merged {
    async fn next(&mut self) -> Option<Bytes> {
        loop {
            if self.doomed && self.sent > 0 {
                // The first chunk went out; die mid-stream (--crash-after-requests).
                tokio::time::sleep(Duration::from_millis(50)).await;
                crash_now();
            }
            if self.over {
                return None;
            }
            let piece = match self.pending.take() {
                Some(p) => Some(p),
                None => self.choices.next().await,
            };
            match piece {
                Some(Piece::Chunk(b)) => {
                    self.sent += 1;
                    return Some(b);
                }
                Some(Piece::Failed(b)) => {
                    self.failed = true;
                    self.sent += 1;
                    return Some(b);
                }
                Some(Piece::End(tokens)) => self.completion_tokens += tokens,
                None => {
                    self.over = true;
                    let mut tail = Vec::new();
                    if self.include_usage && !self.failed {
                        let cached = self.cached.load(std::sync::atomic::Ordering::Relaxed);
                        let usage = Usage::new(self.prompt_tokens, self.completion_tokens).cached(self.meta.details, cached);
                        tail.extend_from_slice(&self.meta.usage_chunk(usage));
                    }
                    tail.extend_from_slice(sse::DONE);
                    return Some(Bytes::from(tail));
                }
            }
        }
    }
}

/// SSE as vLLM sends it; headers go out with the first chunk, as vLLM's do.
async fn stream_response(meta: Arc<Meta>, req: GenRequest, outs: Vec<Output>, doomed: bool, in_flight: InFlight) -> Response {
    let cached = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let choices: Vec<BoxStream<'static, Piece>> = outs
        .into_iter()
        .enumerate()
        .map(|(k, out)| {
            let choice = Choice {
                meta: meta.clone(),
                index: k as u32,
                prompt_tokens: req.prompt_of(k).len(),
                text: TextOut::new(req.stop.clone(), req.stop_token_ids.clone()),
                out,
                pending: None,
                continuous_usage: req.continuous_usage,
                role_sent: false,
                ended: None,
                over: false,
                cached: cached.clone(),
            };
            stream::unfold(choice, |mut c| async move { c.next().await.map(|p| (p, c)) }).boxed()
        })
        .collect();
    let mut merged = Merged {
        meta,
        choices: stream::select_all(choices),
        pending: None,
        prompt_tokens: prompt_tokens(&req),
        completion_tokens: 0,
        include_usage: req.include_usage,
        failed: false,
        sent: 0,
        doomed,
        over: false,
        cached,
        _in_flight: in_flight,
    };
    // The first piece is produced before the headers go out.
    merged.pending = merged.choices.next().await;
    let body = stream::unfold(merged, |mut m| async move { m.next().await.map(|b| (Ok::<Bytes, std::convert::Infallible>(b), m)) });
    ([(header::CONTENT_TYPE, sse::CONTENT_TYPE)], Body::from_stream(body)).into_response()
}

/// One choice of a streamed answer.
struct Choice {
    meta: Arc<Meta>,
    index: u32,
    prompt_tokens: usize,
    text: TextOut,
    out: Output,
    pending: Option<Event>,
    continuous_usage: bool,
    role_sent: bool,
    /// Tokens generated, once the last chunk went out.
    ended: Option<usize>,
    over: bool,
    cached: Arc<std::sync::atomic::AtomicUsize>,
}

impl Choice {
    fn usage_for(&self, tokens: usize) -> Option<Usage> {
        self.continuous_usage.then(|| Usage::new(self.prompt_tokens, tokens))
    }

    fn finish(&mut self, delta: &str, ending: &Ending, tokens: usize) -> Piece {
        self.over = true;
        self.ended = Some(tokens);
        Piece::Chunk(self.meta.chunk(self.index, delta, Some(ending), RoleField::Omitted, self.usage_for(tokens)))
    }

    fn fail(&mut self, e: &ApiError) -> Piece {
        self.over = true;
        Piece::Failed(sse::event(&e.body()))
    }

    async fn next(&mut self) -> Option<Piece> {
        if let Some(tokens) = self.ended.take() {
            return Some(Piece::End(tokens));
        }
        if self.over {
            return None;
        }
        loop {
            // The chat stream opens with a role-only delta, with the first output.
            if self.meta.api == Api::Chat && !self.role_sent {
                self.role_sent = true;
                self.pending = self.out.next().await;
                return Some(Piece::Chunk(self.meta.chunk(self.index, "", None, RoleField::Assistant, None)));
            }
            let event = match self.pending.take() {
                Some(e) => Some(e),
                None => self.out.next().await,
            };
            match event {
                Some(Event::Prefilled { cached_tokens }) => {
                    self.cached.store(cached_tokens, std::sync::atomic::Ordering::Relaxed);
                }
                Some(Event::Token(t)) => {
                    let (delta, ending) = self.text.push(t);
                    if let Some(ending) = ending {
                        let tokens = self.text.tokens;
                        return Some(self.finish(&delta, &ending, tokens));
                    }
                    if !delta.is_empty() {
                        return Some(Piece::Chunk(self.meta.chunk(
                            self.index,
                            &delta,
                            None,
                            RoleField::Omitted,
                            self.usage_for(self.text.tokens),
                        )));
                    }
                }
                // vLLM sends the last token and the finish reason in one chunk.
                Some(Event::Finished { reason, last_token, .. }) => {
                    let (mut delta, shown) = last_token.map_or((String::new(), None), |t| self.text.push(t));
                    let ending = shown.unwrap_or_else(|| Ending::from_finish(reason));
                    let tokens = self.text.tokens + usize::from(ending == Ending::Eos);
                    delta.push_str(&self.text.flush());
                    return Some(self.finish(&delta, &ending, tokens));
                }
                Some(Event::Failed(e)) => return Some(self.fail(&e)),
                None => return Some(self.fail(&ApiError::internal("engine dropped the request"))),
            }
        }
    }
}
