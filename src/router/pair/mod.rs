//! One generation (a whole request, or one prompt or choice of a split one) on workers,
//! top to bottom. Disaggregated: reserve a decode → prefill leg (retried on other
//! prefills) → decode leg, retried with the same KV on other decodes while the failed
//! decode surely never took it → the pair run again once when the decode failed in a
//! way that may have used the KV. Colocated: one leg, retried on other workers.
//! docs/FAILURES.md is the contract this file implements.

pub mod connector;
pub mod failure;
pub mod prefill_time;
pub mod rename;
pub mod retry;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::HeaderValue;
use bytes::Bytes;
use tokio::sync::oneshot;

use crate::router::flow::Router;
use crate::router::metrics::{KvAwareOutcome, LegTime, RetryOf};
use crate::router::pair::failure::Failure;
use crate::router::policy::RequestInfo;
use crate::router::request::body::Pieces;
use crate::router::request::LegBodies;
use crate::router::upstream::legs::{self, Leg, LegError, LegRequest, Sent, Started};
use crate::router::workers::topology::Topology;
use crate::router::workers::{Lease, NoWorker, Pool, Worker};

/// What each leg of one generation sends besides its body.
#[derive(Clone)]
pub struct LegTemplate {
    pub path: &'static str,
    pub request_id: HeaderValue,
    pub authorization: Option<HeaderValue>,
    pub prefill_timeout: Duration,
    pub first_byte_timeout: Duration,
    pub request_timeout: Duration,
}

impl LegTemplate {
    fn request(&self, body: Pieces, timeout: Duration) -> LegRequest {
        LegRequest { path: self.path, request_id: self.request_id.clone(), authorization: self.authorization.clone(), body, timeout }
    }

    /// The same legs under another request id (one generation of a split request).
    pub fn with_id(&self, request_id: HeaderValue) -> Self {
        LegTemplate { request_id, ..self.clone() }
    }
}

/// One generation to run.
pub struct Job {
    pub bodies: LegBodies,
    pub info: RequestInfo,
    pub leg: LegTemplate,
    /// The client asked for a stream; otherwise the answer is one JSON body.
    pub stream: bool,
}

impl Job {
    /// A non-streamed decode's first output is its whole answer.
    fn decode_request(&self, body: Pieces, request_id: HeaderValue) -> LegRequest {
        let timeout = if self.stream { self.leg.first_byte_timeout } else { self.leg.request_timeout };
        LegRequest { request_id, ..self.leg.request(body, timeout) }
    }
}

/// The start of the answer, and the worker rank giving it.
pub struct Answer {
    pub started: Started,
    pub lease: Lease,
    /// When the answering leg was sent.
    pub since: Instant,
    /// The DP rank whose prefix cache the answer's `cached_tokens` count: NIXL's decode
    /// reports its prefill's, a decode alone its own (None where unknown).
    pub cache_from: Option<crate::router::policy::WorkerRank>,
    /// The prefill rank that ran this answer's prefill leg (None: the worker answered alone).
    pub prefill: Option<crate::router::policy::WorkerRank>,
    /// The leg id to replace by the client's in the answer (P2pNccl's names both engines).
    pub rename: Option<crate::router::pair::rename::Rename>,
}

pub async fn run(router: &Arc<Router>, job: Arc<Job>) -> Result<Answer, Failure> {
    match &*router.topology {
        Topology::Disaggregated { .. } => disaggregated(router, job).await,
        Topology::Colocated { workers } => colocated(router, workers, &job).await,
    }
}

/// The prefill and decode pools (the request was dispatched on the topology in `run`).
fn pd(router: &Router) -> (&Pool, &Pool) {
    match &*router.topology {
        Topology::Disaggregated { prefill, decode } => (prefill, decode),
        Topology::Colocated { .. } => unreachable!("pairs are only run on a disaggregated topology"),
    }
}

/// Picks avoiding `avoid`; with `fallback`, settles for an avoided worker rather than none.
fn pick(pool: &Pool, info: &RequestInfo, avoid: &[String], fallback: bool) -> Result<Lease, NoWorker> {
    match pool.pick(info, avoid) {
        Err(no) if fallback && no.healthy > 0 => pool.pick(info, &[]),
        other => other,
    }
}

/// Counts a failed leg against its worker and says what comes of it: a client error
/// (4xx) is the client's answer, as the worker gave it (`Err`); anything else is a reason
/// to try another worker (`Ok`, with what the client hears if none is left). vLLM's 400
/// for a DP rank it does not serve is the router's configuration, not the client's: the
/// worker's rank count is lowered, and the same worker may take the retry.
fn leg_failed(router: &Router, leg: Leg, lease: &mut Lease, err: LegError, request_id: &HeaderValue) -> Result<Failure, Failure> {
    router.metrics.leg_error(leg, err.kind());
    if let LegError::RankNotServed { served } = err {
        // The worker's configuration, not its health: fewer ranks from now on, and the
        // request goes elsewhere.
        lease.worker().limit_ranks(served);
        return Ok(Failure::leg_failed(leg, &err));
    }
    if err.is_client_error() {
        lease.succeeded();
        return Err(Failure::passthrough(err));
    }
    tracing::warn!(request_id = ?request_id, worker = %lease.url(), leg = leg.as_str(), "leg failed: {err}");
    lease.failed();
    if let LegError::Connect(why) = &err {
        lease.worker().mark_down(why);
    }
    Ok(Failure::leg_failed(leg, &err))
}

/// Whether another attempt may be made now: within --retry-max-retries and the retry
/// budget; waits the backoff before saying yes.
async fn may_retry(router: &Router, attempt: u32, of: RetryOf) -> bool {
    if attempt > router.cfg.retry.max_retries || !router.retry_budget.try_retry() {
        return false;
    }
    router.metrics.retry(of);
    tokio::time::sleep(retry::backoff(&router.cfg.retry, attempt)).await;
    true
}

/// How one pair attempt ended.
enum PairOutcome {
    Answer(Answer),
    /// The request is over: every prefill failed, or a worker said 4xx.
    Final(Failure),
    /// The decode failed in a way that may have used the KV (timeout, broken answer, an
    /// error event); these decodes were tried.
    Decode {
        decodes: Vec<String>,
        prefill: String,
        last: Failure,
    },
}

/// How long a non-streamed decode whose client has gone is kept once the whole request
/// reached it: by then vLLM has taken it into its engine, where an abort frees the
/// prefill's KV (see decode_leg).
pub const DECODE_GRACE: Duration = Duration::from_secs(1);

async fn disaggregated(router: &Arc<Router>, job: Arc<Job>) -> Result<Answer, Failure> {
    let (mut avoid_p, mut avoid_d) = (Vec::new(), Vec::new());
    let pairs = if router.cfg.retry.rerun_pair { 2 } else { 1 };
    let mut last = None;
    for pair in 0..pairs {
        if pair > 0 && !may_retry(router, 1, RetryOf::Pair).await {
            break;
        }
        // The decode is reserved first: with none available, no prefill KV is made for nothing.
        let mut decode = pick(pd(router).1, &job.info, &avoid_d, pair > 0).map_err(Failure::no_worker)?;
        if pair == 0 && prefill_on_decode(router, &job, &decode) {
            match decode_alone(router, &job, decode).await {
                Ok(answer) => return Ok(answer),
                Err((url, outcome)) => {
                    // A 4xx is the client's answer; anything else: disaggregate, elsewhere.
                    outcome?;
                    avoid_d.push(url);
                    decode = pick(pd(router).1, &job.info, &avoid_d, true).map_err(Failure::no_worker)?;
                }
            }
        }
        let (tx, rx) = oneshot::channel();
        tokio::spawn(run_pair(router.clone(), job.clone(), decode, avoid_p.clone(), avoid_d.clone(), pair > 0, tx));
        match rx.await.map_err(|_| Failure::internal("the request's pair task ended unexpectedly"))? {
            PairOutcome::Answer(answer) => return Ok(answer),
            PairOutcome::Final(f) => return Err(f),
            PairOutcome::Decode { decodes, prefill, last: f } => {
                avoid_d.extend(decodes);
                if !avoid_p.contains(&prefill) {
                    avoid_p.push(prefill);
                }
                last = Some(f);
            }
        }
    }
    Err(last.expect("at least one pair was tried"))
}

/// kv_aware's conditional disaggregation: whether the chosen decode rank already holds all
/// but `--kv-aware-decode-alone-tokens` of the prompt (its own prefix cache, from its KV
/// events), so that it prefills the rest itself.
fn prefill_on_decode(router: &Router, job: &Job, decode: &Lease) -> bool {
    let limit = router.cfg.kv_aware_decode_alone_tokens;
    let Some(kv) = &job.info.kv else { return false };
    let held = kv.held.get(&decode.holder()).copied().unwrap_or(0);
    limit > 0 && held > 0 && kv.tokens.saturating_sub(held * kv.block_size) <= limit
}

/// The request on the decode alone, as a colocated worker serves it (no KV moves). `Err`:
/// the decode's URL, and what to tell the client (`Err` inside: a 4xx, final).
async fn decode_alone(router: &Router, job: &Job, decode: Lease) -> Result<Answer, (String, Result<Failure, Failure>)> {
    let req = job.decode_request(job.bodies.colocated(), job.leg.request_id.clone());
    match lone_leg(router, decode, &req).await {
        Ok(answer) => {
            router.metrics.kv_aware(KvAwareOutcome::PrefillSkipped);
            Ok(answer)
        }
        Err((mut decode, e)) => Err((decode.url().to_string(), leg_failed(router, Leg::Decode, &mut decode, e, &job.leg.request_id))),
    }
}

/// One leg to a worker that answers alone (colocated, or a decode prefilling itself): the
/// answer (its cached tokens are the worker's own), or the error with the lease to count
/// it against.
async fn lone_leg(router: &Router, mut lease: Lease, req: &LegRequest) -> Result<Answer, (Lease, LegError)> {
    let t = Instant::now();
    match legs::answer(lease.target(), req, None).await {
        Ok(started) => {
            lease.succeeded();
            router.metrics.leg_time(LegTime::DecodeFirstByte, t);
            Ok(Answer { started, cache_from: Some(lease.holder()), prefill: None, lease, since: t, rename: None })
        }
        Err(e) => Err((lease, e)),
    }
}

/// One pair attempt, in a task of its own, so that it keeps the prefill's KV from being
/// stranded when the client leaves (the handler is then dropped, closing `tx`):
/// - during the prefill leg: the prefill gets a grace to answer (PrefillTime::grace). Real
///   vLLM can have finished computing (and be holding the KV for a decode) a few
///   milliseconds before it answers; if the answer comes, the decode leg is sent as below.
///   Otherwise the prefill request is dropped, which makes vLLM abort it and free its KV.
/// - after the prefill answered (or alongside it, for a connector that sends both at
///   once): the decode leg is kept until the decode has taken the KV (decode_leg), then
///   dropped, which makes vLLM abort it.
async fn run_pair(
    router: Arc<Router>,
    job: Arc<Job>,
    decode: Lease,
    mut avoid_p: Vec<String>,
    avoid_d: Vec<String>,
    fallback: bool,
    mut tx: oneshot::Sender<PairOutcome>,
) {
    let opened = if router.cfg.connector.sends_decode_alongside() {
        prefill_alongside_decode(&router, &job, &decode, &mut avoid_p, fallback, &mut tx).await
    } else {
        prefill_then_decode(&router, &job, &decode, &mut avoid_p, fallback, &mut tx).await
    };
    let Opened { prefill_worker, prefill_rank, req, mut first } = match opened {
        Opening::Opened(o) => o,
        Opening::Over(outcome) => {
            let _ = tx.send(outcome);
            return;
        }
        Opening::Abandoned => return,
    };
    let connector = router.cfg.connector;
    let mut tried = Vec::new();
    let mut lease = decode;
    for attempt in 1.. {
        let (result, client_gone, t) = match first.take() {
            Some(done) => done,
            None => {
                let t = Instant::now();
                let (result, client_gone) = decode_leg(&lease, &req, job.stream, &mut tx).await;
                (result, client_gone, t)
            }
        };
        let Some(result) = result else {
            // Kept as long as needed, then dropped: vLLM aborts it.
            router.metrics.abandoned_decode();
            return;
        };
        let err = match result {
            Ok(started) => {
                lease.succeeded();
                if client_gone {
                    // The decode has taken the KV; dropping its answer aborts it on vLLM.
                    router.metrics.abandoned_decode();
                } else {
                    router.metrics.leg_time(LegTime::DecodeFirstByte, t);
                    let prefill = crate::router::policy::WorkerRank { url: prefill_worker.url.clone(), rank: prefill_rank };
                    let cache_from = (connector == crate::api::connector::Connector::Nixl).then(|| prefill.clone());
                    let rename = (req.request_id != job.leg.request_id)
                        .then(|| crate::router::pair::rename::Rename::new(req.request_id.as_bytes(), job.leg.request_id.as_bytes()));
                    let _ = tx.send(PairOutcome::Answer(Answer { started, lease, since: t, cache_from, prefill: Some(prefill), rename }));
                }
                return;
            }
            Err(e) => e,
        };
        let same_kv_elsewhere = err.kv_untouched_elsewhere() && connector.kv_can_go_to_another_decode();
        let worker_may_retry = matches!(err, LegError::RankNotServed { .. });
        let last = match leg_failed(&router, Leg::Decode, &mut lease, err, &job.leg.request_id) {
            Ok(last) => last,
            Err(refused) => {
                let _ = tx.send(PairOutcome::Final(refused));
                return;
            }
        };
        if !worker_may_retry {
            tried.push(lease.url().to_string());
        }
        // A decode that failed without using the KV (refused, or an error answer) leaves
        // the prefill's KV waiting: the same decode leg goes to another decode, while the
        // prefill that holds the KV is up. Never to the same decode again: vLLM's decode
        // can die on params it already failed to load. Otherwise the pair runs again from
        // a new prefill (the KV was pulled, or freed by the failed decode's abort).
        let prefill_up = prefill_worker.is_available();
        let avoid: Vec<String> = avoid_d.iter().chain(&tried).cloned().collect();
        let other = if same_kv_elsewhere && prefill_up { pd(&router).1.pick(&job.info, &avoid).ok() } else { None };
        let next = match other {
            Some(other) if may_retry(&router, attempt, RetryOf::Decode).await => Some(other),
            _ => None,
        };
        match next {
            Some(next) => lease = next,
            None => {
                if !client_gone {
                    let _ = tx.send(PairOutcome::Decode { decodes: tried, prefill: prefill_worker.url.clone(), last });
                }
                return;
            }
        }
    }
}

/// A decode leg's result, whether the client left meanwhile, and when it was sent.
type DecodeDone = (Option<Result<Started, LegError>>, bool, Instant);

/// A pair whose prefill has answered (or run alongside its decode).
struct Opened {
    prefill_worker: Arc<Worker>,
    prefill_rank: usize,
    /// The decode leg (sent again to another decode if the first fails leaving the KV).
    req: LegRequest,
    /// How the decode sent alongside the prefill went.
    first: Option<DecodeDone>,
}

enum Opening {
    Opened(Opened),
    /// The pair attempt ended before a decode answer.
    Over(PairOutcome),
    /// The client left and nothing is held for it.
    Abandoned,
}

/// NIXL, P2pNccl: the prefill leg (with a grace when the client leaves), then the decode
/// leg made from its answer.
async fn prefill_then_decode(
    router: &Router,
    job: &Job,
    decode: &Lease,
    avoid_p: &mut Vec<String>,
    fallback: bool,
    tx: &mut oneshot::Sender<PairOutcome>,
) -> Opening {
    let started = Instant::now();
    let prefilled = {
        let prefill = prefill_leg(router, job, decode.worker(), avoid_p, fallback);
        tokio::pin!(prefill);
        tokio::select! {
            biased;
            done = &mut prefill => done,
            () = tx.closed() => match tokio::time::timeout(router.prefill_time.grace(started.elapsed(), job.leg.prefill_timeout), prefill).await {
                Ok(done) => done,
                Err(_) => return Opening::Abandoned,
            },
        }
    };
    match prefilled {
        Ok((params, prefill_worker, prefill_rank, leg_id)) => {
            let req = job.decode_request(router.cfg.connector.decode_body(&job.bodies, params.as_deref()), leg_id);
            Opening::Opened(Opened { prefill_worker, prefill_rank, req, first: None })
        }
        Err(f) => Opening::Over(PairOutcome::Final(f)),
    }
}

/// Mooncake: the prefill and decode legs at once (the decode waits for the KV itself).
/// A failed prefill drops the decode (vLLM aborts it) and the pair is tried again on
/// another prefill; a decode that fails first waits for its prefill to tell whether the
/// KV is there for another decode.
async fn prefill_alongside_decode(
    router: &Router,
    job: &Job,
    decode: &Lease,
    avoid: &mut Vec<String>,
    fallback: bool,
    tx: &mut oneshot::Sender<PairOutcome>,
) -> Opening {
    let mut last: Option<Failure> = None;
    let mut attempt = 0;
    loop {
        let mut lease = match prefill_attempt(router, job, avoid, fallback, attempt, &mut last).await {
            Ok(lease) => lease,
            Err(f) => return Opening::Over(PairOutcome::Final(f)),
        };
        attempt += 1;
        let legs = match router.cfg.connector.pair_legs(&job.bodies, &job.leg.request_id, &lease, decode.worker()) {
            Ok(legs) => legs,
            Err(why) => {
                tracing::warn!(request_id = ?job.leg.request_id, worker = %lease.url(), "prefill skipped: {why}");
                avoid.push(lease.url().to_string());
                last = Some(Failure::internal("no prefill worker could be named to its decode"));
                continue;
            }
        };
        let preq = LegRequest { request_id: legs.id.clone(), ..job.leg.request(legs.prefill, job.leg.prefill_timeout) };
        let req = job.decode_request(legs.decode_alongside.expect("this connector sends the decode alongside"), legs.id);
        tracing::debug!(request_id = ?job.leg.request_id, prefill = %lease.url(), decode = %decode.url(), "pair");
        let t = Instant::now();
        let (prefilled, first) = {
            let prefill = legs::prefill(lease.target(), &preq);
            let decoding = decode_leg(decode, &req, job.stream, tx);
            tokio::pin!(prefill, decoding);
            let mut prefilled = None;
            let first = loop {
                tokio::select! {
                    p = &mut prefill, if prefilled.is_none() => {
                        // A failed prefill, or one that kept no KV: its decode would wait
                        // for KV that never comes, and is dropped (vLLM aborts it).
                        let over = p.as_ref().map_or(true, |a| !a.kv_kept);
                        prefilled = Some(p);
                        if over {
                            break None;
                        }
                    }
                    (result, client_gone) = &mut decoding => break Some((result, client_gone, t)),
                }
            };
            // A decode that failed before its prefill answered: whether the KV is there
            // for another decode depends on the prefill.
            if prefilled.is_none() && matches!(first, Some((Some(Err(_)), _, _))) {
                prefilled = Some(prefill.await);
            }
            (prefilled, first)
        };
        match prefilled {
            Some(Err(e)) => {
                let worker_may_retry = matches!(e, LegError::RankNotServed { .. });
                match leg_failed(router, Leg::Prefill, &mut lease, e, &job.leg.request_id) {
                    Ok(f) => last = Some(f),
                    Err(refused) => return Opening::Over(PairOutcome::Final(refused)),
                }
                if !worker_may_retry {
                    avoid.push(lease.url().to_string());
                }
                if let Some((_, true, _)) = first {
                    return Opening::Abandoned;
                }
                // A decode that already failed is not tried again on this pair.
                if let Some((Some(Err(e)), ..)) = first {
                    router.metrics.leg_error(Leg::Decode, e.kind());
                    return Opening::Over(PairOutcome::Decode {
                        decodes: vec![decode.url().to_string()],
                        prefill: lease.url().to_string(),
                        last: last.expect("set above"),
                    });
                }
            }
            Some(Ok(answer)) => {
                lease.succeeded();
                router.metrics.leg_time(LegTime::Prefill, t);
                router.prefill_time.observe(t.elapsed());
                // The prefill stopped before its length cap (EOS as its one token): no KV
                // for the decode, which prefills locally instead.
                let req = if first.is_none() && !answer.kv_kept {
                    job.decode_request(router.cfg.connector.decode_body(&job.bodies, None), req.request_id)
                } else {
                    req
                };
                return Opening::Opened(Opened { prefill_worker: lease.worker().clone(), prefill_rank: lease.rank(), req, first });
            }
            // The decode ended before the prefill answered: it answered (the KV moved), or
            // it was kept for a client that left and then let go (decode_leg).
            None => return Opening::Opened(Opened { prefill_worker: lease.worker().clone(), prefill_rank: lease.rank(), req, first }),
        }
    }
}

/// The prefill for attempt `attempt` of a pair (a retry waits its backoff, within the
/// retry budget); `Err` with what the client hears when no attempt is left.
async fn prefill_attempt(
    router: &Router,
    job: &Job,
    avoid: &[String],
    fallback: bool,
    attempt: u32,
    last: &mut Option<Failure>,
) -> Result<Lease, Failure> {
    if attempt > 0 && !may_retry(router, attempt, RetryOf::Prefill).await {
        return Err(last.take().expect("a retry follows a failure"));
    }
    pick(pd(router).0, &job.info, avoid, fallback && attempt == 0).map_err(|no| last.take().unwrap_or_else(|| Failure::no_worker(no)))
}

/// Sends the decode leg; says too whether the client left meanwhile. The leg is then
/// kept until the decode has surely taken the KV, and dropped after (vLLM aborts it, and
/// an abort frees the prefill's KV too if it was not yet pulled): a streamed leg until its
/// first output (which comes after the pull); a non-streamed one, whose first output is
/// its end, until DECODE_GRACE after the whole request reached the decode (`None`: vLLM
/// 0.32 also frees the prefill's KV when a request is cancelled before its engine has it).
async fn decode_leg(
    lease: &Lease,
    req: &LegRequest,
    stream: bool,
    tx: &mut oneshot::Sender<PairOutcome>,
) -> (Option<Result<Started, LegError>>, bool) {
    let sent = Arc::new(Sent::default());
    let leg = legs::answer(lease.target(), req, Some(sent.clone()));
    tokio::pin!(leg);
    tokio::select! {
        biased;
        result = &mut leg => return (Some(result), false),
        () = tx.closed() => {}
    }
    if stream {
        return (Some(leg.await), true);
    }
    let taken = async {
        sent.wait().await;
        tokio::time::sleep(DECODE_GRACE).await;
    };
    tokio::select! {
        result = &mut leg => (Some(result), true),
        () = taken => (None, true),
    }
}

/// The prefill leg (for the reserved `decode`), retried on other prefill workers; returns
/// the params, the worker, and the request id the pair's legs carry.
async fn prefill_leg(
    router: &Router,
    job: &Job,
    decode: &Worker,
    avoid: &mut Vec<String>,
    fallback: bool,
) -> Result<(Option<Bytes>, Arc<Worker>, usize, HeaderValue), Failure> {
    let mut last: Option<Failure> = None;
    let mut attempt = 0;
    loop {
        let mut lease = prefill_attempt(router, job, avoid, fallback, attempt, &mut last).await?;
        attempt += 1;
        let legs = router.cfg.connector.pair_legs(&job.bodies, &job.leg.request_id, &lease, decode).map_err(|e| Failure::internal(&e))?;
        let req = LegRequest { request_id: legs.id.clone(), ..job.leg.request(legs.prefill, job.leg.prefill_timeout) };
        tracing::debug!(request_id = ?job.leg.request_id, prefill = %lease.url(), decode = %decode.url, leg_id = ?legs.id, "pair");
        let t = Instant::now();
        match legs::prefill(lease.target(), &req).await {
            Ok(answer) => {
                lease.succeeded();
                router.metrics.leg_time(LegTime::Prefill, t);
                router.prefill_time.observe(t.elapsed());
                return Ok((answer.params, lease.worker().clone(), lease.rank(), legs.id));
            }
            Err(e) => {
                let worker_may_retry = matches!(e, LegError::RankNotServed { .. });
                last = Some(leg_failed(router, Leg::Prefill, &mut lease, e, &job.leg.request_id)?);
                if !worker_may_retry {
                    avoid.push(lease.url().to_string());
                }
            }
        }
    }
}

/// Colocated mode: one leg to a worker, retried elsewhere before its first byte. A client
/// that leaves drops it at once (no KV crosses workers).
async fn colocated(router: &Router, workers: &Pool, job: &Job) -> Result<Answer, Failure> {
    let req = job.decode_request(job.bodies.colocated(), job.leg.request_id.clone());
    let mut avoid = Vec::new();
    let mut last: Option<Failure> = None;
    for attempt in 0.. {
        if attempt > 0 && !may_retry(router, attempt, RetryOf::Worker).await {
            break;
        }
        let lease = match workers.pick(&job.info, &avoid) {
            Ok(lease) => lease,
            Err(no) => return Err(last.unwrap_or_else(|| Failure::no_worker(no))),
        };
        let (mut lease, e) = match lone_leg(router, lease, &req).await {
            Ok(answer) => return Ok(answer),
            Err(failed) => failed,
        };
        let worker_may_retry = matches!(e, LegError::RankNotServed { .. });
        last = Some(leg_failed(router, Leg::Decode, &mut lease, e, &job.leg.request_id)?);
        if !worker_may_retry {
            avoid.push(lease.url().to_string());
        }
    }
    Err(last.expect("at least one worker was tried"))
}
