//! Relaying an answer to the client. The response body owns everything the request
//! holds (admission permit, worker leases, metrics record, its place in the drain), so
//! all of it is released when the body ends or the client goes away, on every path.
//!
//! A streamed answer is passed through chunk by chunk as it arrives. If it breaks (the
//! worker dies, resets, goes quiet past the idle timeout, ends without `[DONE]`, or the
//! router's shutdown grace runs out), the client gets an error event and `[DONE]`: never
//! a silent truncation.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::header::CONTENT_TYPE;
use axum::response::Response;
use bytes::Bytes;
use futures_util::stream;
use futures_util::StreamExt;

use crate::api::dialect::Dialect;
use crate::api::usage::{self, Usage};
use crate::api::{ApiError, ErrorKind};
use crate::router::flow::drain::{Active, Drain, Phase};
use crate::router::kv_aware::check::Prediction;
use crate::router::metrics::Cause;
use crate::router::metrics::RequestRecord;
use crate::router::observe::Journey;
use crate::router::pair::rename::Rename;
use crate::router::pair::Answer;
use crate::router::responses::capture::StreamCapture;
use crate::router::responses::Turn;
use crate::router::upstream::client as worker_client;
use crate::router::upstream::legs::StartedBody;
use crate::router::workers::Lease;

/// What a request holds until its answer is over.
pub(crate) struct Held {
    /// The admission permit goes back when the answer is over (and the pair's legs, which
    /// hold it too: Job::admitted).
    pub(crate) permit: Arc<crate::router::admission::Permit>,
    /// The worker ranks answering (their in-flight counts are released with the body).
    pub(crate) leases: Vec<Lease>,
    pub(crate) record: RequestRecord,
    /// When the answering leg was sent, for its decode_total time.
    pub(crate) started: Instant,
    #[expect(dead_code, reason = "held for its drop")]
    pub(crate) active: Active,
}

impl Held {
    /// The answer reached its end (normally, or with an error event the client got).
    pub(crate) fn finish(&mut self) {
        self.record.metrics().leg_time(crate::router::metrics::LegTime::DecodeTotal, self.started);
        self.record.finish();
    }
}

/// What is done with an answer as it passes: kv_aware's prediction of its cached tokens is
/// checked against the usage it reports (kv_check.rs); a Responses turn's response is
/// stored (router/responses/).
pub(crate) struct Finish {
    pub(crate) prediction: Option<Prediction>,
    pub(crate) dialect: Dialect,
    pub(crate) turn: Option<Turn>,
    /// The longest Responses event held whole (--max-payload-size).
    pub(crate) max_event: usize,
    /// The request's journey (observed): told the usage the answer reports.
    pub(crate) journey: Option<Arc<Journey>>,
    /// slo_aware: the stream's time per output token, for its engine's latency model.
    pub(crate) pace: Option<Pace>,
}

/// A streamed answer's pace: from its start to its end over its output tokens, with the
/// sequences its engine was running when it started.
pub(crate) struct Pace {
    worker: Arc<crate::router::workers::Worker>,
    running: usize,
    since: std::time::Instant,
}

impl Pace {
    pub(crate) fn new(worker: &Arc<crate::router::workers::Worker>) -> Self {
        Pace { worker: worker.clone(), running: worker.in_flight(), since: std::time::Instant::now() }
    }

    fn tell(self, output_tokens: Option<u64>) {
        if let Some(n) = output_tokens.filter(|n| *n >= 2) {
            let ms = self.since.elapsed().as_secs_f64() * 1e3 / (n - 1) as f64;
            self.worker.latency.observe_itl(self.running, ms);
        }
    }
}

/// Who hears of the usage an answer reports: kv_aware's prediction (its cached tokens),
/// the request's journey (all of it).
struct UsageReaders {
    prediction: Option<Prediction>,
    journey: Option<Arc<Journey>>,
    pace: Option<Pace>,
}

impl UsageReaders {
    fn any(&self) -> bool {
        self.prediction.is_some() || self.journey.is_some() || self.pace.is_some()
    }
    fn tell(self, metrics: &crate::router::metrics::RouterMetrics, usage: Usage) {
        if let Some(p) = self.prediction {
            p.check(metrics, usage.cached.map(|c| c as usize));
        }
        if let Some(p) = self.pace {
            p.tell(usage.output);
        }
        if let Some(j) = self.journey {
            j.usage(usage);
        }
    }
}

/// The response for one generation's answer.
pub(crate) fn respond(answer: Answer, mut held: Held, idle: Duration, drain: &Arc<Drain>, finish: Finish) -> Response {
    let Answer { started, lease, since, rename, .. } = answer;
    let Finish { prediction, dialect, turn, max_event, journey, pace } = finish;
    let readers = UsageReaders { prediction, journey, pace };
    held.record.status(started.status.as_u16());
    held.started = since;
    held.leases.push(lease);
    let success = started.status.is_success();
    let body = match started.body {
        StartedBody::Whole(bytes) => {
            let bytes = rename.as_ref().map_or(bytes.clone(), |r| r.whole(bytes));
            if readers.any() {
                readers.tell(held.record.metrics(), usage::whole(&bytes, dialect));
            }
            whole(bytes, held, turn.filter(|_| success))
        }
        StartedBody::Events { head, rest } => {
            let mut up = Upstream::new(head, rest, idle, drain);
            up.rename = rename;
            up.dialect = dialect;
            up.keep_usage = readers.any();
            up.capture = turn.map(|t| StreamCapture::new(t, max_event));
            events(up, held, readers)
        }
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = started.status;
    if let Some(ct) = started.content_type {
        resp.headers_mut().insert(CONTENT_TYPE, ct);
    }
    resp
}

/// A whole (JSON) answer; the guards go when hyper has taken the bytes. A Responses turn
/// is stored before the client sees its answer.
pub(crate) fn whole(bytes: Bytes, held: Held, turn: Option<Turn>) -> Body {
    let s = stream::unfold(Some((bytes, held, turn)), |state| async move {
        let (mut bytes, mut held, turn) = state?;
        if let Some(turn) = turn {
            bytes = crate::router::responses::capture::whole(&turn, bytes).await;
        }
        held.finish();
        Some((Ok::<_, std::convert::Infallible>(bytes), None))
    });
    Body::from_stream(s)
}

/// Chunks kept for the final usage chunk: vLLM sends usage, then `[DONE]`, usually in
/// one or two chunks.
const USAGE_CHUNKS: usize = 4;

/// One piece of a relayed stream.
pub(crate) enum Piece {
    Bytes(Bytes),
    /// The stream broke: the error event to send (then `[DONE]`), why (for the log), and
    /// whether the worker is to blame (not when the router is shutting down).
    Broken {
        event: Bytes,
        why: String,
        worker_fault: bool,
    },
}

/// A worker's SSE answer as it arrives, with breakage turned into a `Piece::Broken`.
pub(crate) struct Upstream {
    head: Option<Bytes>,
    rest: worker_client::Body,
    idle: Duration,
    /// The last bytes relayed, to see whether the stream ended with `[DONE]`.
    tail: Vec<u8>,
    /// Whether to keep the last chunks (shared, not copied) for the final usage chunk.
    pub(crate) keep_usage: bool,
    recent: std::collections::VecDeque<Bytes>,
    phase: tokio::sync::watch::Receiver<Phase>,
    over: bool,
    /// P2pNccl: the leg id replaced by the client's request id (rename.rs).
    pub(crate) rename: Option<Rename>,
    /// Whose stream this is: how it ends, and its error event.
    pub(crate) dialect: Dialect,
    /// A Responses stream: its events rewritten and its response stored as they pass.
    pub(crate) capture: Option<StreamCapture>,
}

impl Upstream {
    pub(crate) fn new(head: Bytes, rest: worker_client::Body, idle: Duration, drain: &Drain) -> Self {
        Upstream {
            head: Some(head),
            rest,
            idle,
            tail: Vec::new(),
            keep_usage: false,
            recent: Default::default(),
            phase: drain.subscribe(),
            over: false,
            rename: None,
            dialect: Dialect::OpenAi,
            capture: None,
        }
    }

    fn remember(&mut self, chunk: &Bytes) {
        if self.keep_usage {
            if self.recent.len() == USAGE_CHUNKS {
                self.recent.pop_front();
            }
            self.recent.push_back(chunk.clone());
        }
        self.tail.extend_from_slice(chunk);
        let keep = 32;
        if self.tail.len() > keep {
            self.tail.drain(..self.tail.len() - keep);
        }
    }

    /// The usage the stream's last chunks report (when kept).
    fn usage_reported(&self) -> Usage {
        usage::in_stream(&self.recent.iter().flat_map(|b| b.iter().copied()).collect::<Vec<u8>>(), self.dialect)
    }

    /// A Responses stream's chunk as its capture passes it on (whole events, rewritten).
    async fn captured(&mut self, chunk: Bytes) -> Result<Bytes, String> {
        match &mut self.capture {
            Some(c) => c.feed(&chunk).await,
            None => Ok(chunk),
        }
    }

    fn renamed(&mut self, chunk: Bytes) -> Bytes {
        match &mut self.rename {
            Some(r) => r.chunk(&chunk),
            None => chunk,
        }
    }

    fn broken(&mut self, why: String) -> Option<Piece> {
        self.over = true;
        let err = ApiError::new(ErrorKind::BadGateway, format!("decode leg failed mid-stream: {why}"));
        Some(Piece::Broken { event: self.dialect.error_event(&err), why, worker_fault: true })
    }

    /// The next piece; `None` once the stream ended with `[DONE]` (or broke before).
    pub(crate) async fn next(&mut self) -> Option<Piece> {
        if self.over {
            return None;
        }
        if let Some(head) = self.head.take() {
            let head = self.renamed(head);
            let head = match self.captured(head).await {
                Ok(b) => b,
                Err(why) => return self.broken(why),
            };
            self.remember(&head);
            return Some(Piece::Bytes(head));
        }
        let cut = async {
            let _ = self.phase.wait_for(|p| *p == Phase::Cut).await;
        };
        let next = tokio::select! {
            next = tokio::time::timeout(self.idle, self.rest.next()) => next,
            () = cut => {
                let mut piece = self.broken("the router is shutting down".into());
                if let Some(Piece::Broken { worker_fault, .. }) = &mut piece {
                    *worker_fault = false;
                }
                return piece;
            }
        };
        match next {
            Ok(Some(Ok(chunk))) => {
                let chunk = self.renamed(chunk);
                let chunk = match self.captured(chunk).await {
                    Ok(b) => b,
                    Err(why) => return self.broken(why),
                };
                self.remember(&chunk);
                Some(Piece::Bytes(chunk))
            }
            Ok(Some(Err(e))) => self.broken(format!("the connection to the worker broke ({e})")),
            Ok(None) => {
                if let Some(held_back) = self.rename.as_mut().map(Rename::finish).filter(|b| !b.is_empty()) {
                    self.remember(&held_back);
                    return Some(Piece::Bytes(held_back));
                }
                let tail = String::from_utf8_lossy(&self.tail);
                let ended = match &self.capture {
                    Some(c) => c.ended(),
                    None => self.dialect.stream_ended(&tail),
                };
                if ended {
                    self.over = true;
                    None
                } else {
                    let end = match self.dialect {
                        Dialect::OpenAi => "[DONE]",
                        Dialect::Responses => "response.completed",
                        Dialect::Anthropic => "message_stop",
                    };
                    self.broken(format!("the stream ended without {end}"))
                }
            }
            Err(_) => self.broken(format!("no data for {:.0}s (--stream-idle-timeout-secs)", self.idle.as_secs_f64())),
        }
    }
}

/// A streamed answer relayed to the client.
fn events(upstream: Upstream, held: Held, readers: UsageReaders) -> Body {
    #[expect(clippy::large_enum_variant, reason = "the state moves once per chunk; boxing it would allocate per chunk")]
    enum State {
        Relay(Upstream, Held, UsageReaders),
        Done(Held, Dialect),
        End,
    }
    let s = stream::unfold(State::Relay(upstream, held, readers), |state| async move {
        match state {
            State::Relay(mut up, mut held, readers) => match up.next().await {
                Some(Piece::Bytes(b)) => Some((b, State::Relay(up, held, readers))),
                Some(Piece::Broken { event, why, worker_fault }) => {
                    tracing::warn!(worker = %held.leases.last().map_or("", |l| l.url()), "decode stream failed: {why}");
                    held.record.fail(Cause::DecodeMidstream);
                    if let Some(lease) = held.leases.last_mut().filter(|_| worker_fault) {
                        lease.failed();
                    }
                    let dialect = up.dialect;
                    Some((event, State::Done(held, dialect)))
                }
                None => {
                    if readers.any() {
                        readers.tell(held.record.metrics(), up.usage_reported());
                    }
                    held.finish();
                    None
                }
            },
            State::Done(mut held, dialect) => {
                held.finish();
                Some((Bytes::from_static(dialect.after_error()), State::End))
            }
            State::End => None,
        }
    });
    Body::from_stream(s.map(Ok::<_, std::convert::Infallible>))
}
