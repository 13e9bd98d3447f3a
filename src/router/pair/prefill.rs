//! The prefill side of a pair attempt: NIXL and P2pNccl send the prefill leg, then the
//! decode leg made from its answer; Mooncake sends both at once (the decode waits for the
//! KV itself).

use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Instant;

use axum::http::HeaderValue;
use bytes::Bytes;
use tokio::sync::oneshot;

use super::decode::{Client, DecodeDone, DecodeEnd, Opened, Opening, PairOutcome};
use super::{pick, Avoidance, Job, LegSender, Pairs};
use crate::router::metrics::{Leg, LegTime, RetryOf};
use crate::router::pair::failure::Failure;
use crate::router::policy::slo_aware::uncached;
use crate::router::upstream::legs::{LegRequest, PrefillKv};
use crate::router::workers::{Lease, Worker};

/// A prefill that answered: the params its answer carries, its worker and rank, and the
/// request id the pair's legs carry.
struct PrefillDone {
    params: Option<Bytes>,
    worker: Arc<Worker>,
    rank: usize,
    leg_id: HeaderValue,
}

impl<S: LegSender> Pairs<S> {
    /// NIXL, P2pNccl: the prefill leg, then the decode leg made from its answer. A client
    /// that leaves during the prefill leg does not end it: real vLLM can have finished the
    /// prefill (and hold its KV for a decode) before its answer arrives, and an abort then
    /// comes too late and strands that KV for the engine's lease. So the leg runs to its
    /// answer (within its timeout; not retried once the client has gone), and the decode
    /// leg made from it takes the KV (decode_leg). The pair keeps the request's admission
    /// permit meanwhile (Job::admitted), so clients that leave cannot pile up work.
    pub(super) async fn prefill_then_decode(
        &self,
        job: &Job,
        decode: &Lease,
        avoid_p: &mut Vec<String>,
        avoidance: Avoidance,
        client: &oneshot::Sender<PairOutcome>,
    ) -> Opening {
        match self.prefill_leg(job, decode.worker(), avoid_p, avoidance, client).await {
            Ok(done) => {
                let req = job.decode_request(self.connector.decode_body(&job.bodies, done.params.as_deref()), done.leg_id);
                Opening::Opened(Opened { prefill_worker: done.worker, prefill_rank: done.rank, req, first: None })
            }
            Err(_) if client.is_closed() => Opening::Abandoned,
            Err(f) => Opening::Over(PairOutcome::Final(f)),
        }
    }

    /// The prefill leg (for the reserved `decode`), retried on other prefill workers while
    /// the client waits.
    async fn prefill_leg(
        &self,
        job: &Job,
        decode: &Worker,
        avoid: &mut Vec<String>,
        avoidance: Avoidance,
        client: &oneshot::Sender<PairOutcome>,
    ) -> Result<PrefillDone, Failure> {
        let mut last: Option<Failure> = None;
        let mut attempt = 0;
        loop {
            // A failed attempt is not tried again for a client that has gone.
            if client.is_closed() {
                if let Some(f) = last.take() {
                    return Err(f);
                }
            }
            let mut lease = self.prefill_attempt(job, decode, avoid, avoidance, attempt, &mut last).await?;
            attempt += 1;
            self.predict_pair(job, lease.worker(), decode);
            // slo_aware: its tokens count in the prefill's queue until it answers.
            let work = self.slo.map(|_| lease.worker().latency.start_prefill(uncached(&**lease.worker(), &job.info)));
            let legs = self
                .connector
                .pair_legs(&job.bodies, &job.leg.request_id, &lease, decode)
                .map_err(|e| Failure::internal(&e.to_string()))?;
            let req = LegRequest { request_id: legs.id.clone(), ..job.leg.request(legs.prefill, job.leg.prefill_timeout) };
            tracing::debug!(request_id = ?job.leg.request_id, prefill = %lease.url(), decode = %decode.url, leg_id = ?legs.id, "pair");
            let t = Instant::now();
            match self.legs.prefill(lease.target(), &req).await {
                Ok(answer) => {
                    lease.succeeded();
                    self.metrics.leg_time(LegTime::Prefill, t);
                    if let Some(work) = work {
                        lease.worker().latency.observe_prefill(work.ahead, t.elapsed().as_secs_f64() * 1e3);
                    }
                    return Ok(PrefillDone { params: answer.params, worker: lease.worker().clone(), rank: lease.rank(), leg_id: legs.id });
                }
                Err(e) => match self.judge(Leg::Prefill, &mut lease, e, job).settle(avoid, lease.url()) {
                    ControlFlow::Continue(f) => last = Some(f),
                    ControlFlow::Break(answer) => return Err(answer),
                },
            }
        }
    }

    /// The prefill for attempt `attempt` of a pair (a retry waits its backoff, within the
    /// retry budget); `Err` with what the client hears when no attempt is left.
    async fn prefill_attempt(
        &self,
        job: &Job,
        decode: &Worker,
        avoid: &[String],
        avoidance: Avoidance,
        attempt: u32,
        last: &mut Option<Failure>,
    ) -> Result<Lease, Failure> {
        if attempt > 0 && !self.may_retry(attempt, RetryOf::Prefill).await {
            return Err(last.take().expect("a retry follows a failure"));
        }
        let avoidance = if attempt == 0 { avoidance } else { Avoidance::Strict };
        // An elastic decode never prefills its own pair (that is the decode alone).
        let never = decode.is_elastic().then_some(decode.url.as_str());
        // slo_aware: the engines leaning to prefill first.
        let decoding = self.decode_leaning();
        if !decoding.is_empty() {
            let first: Vec<String> = avoid.iter().chain(&decoding).cloned().collect();
            if let Ok(lease) = pick(self.pd().0, job, &first, Avoidance::Strict, never) {
                return Ok(lease);
            }
        }
        pick(self.pd().0, job, avoid, avoidance, never).map_err(|no| last.take().unwrap_or_else(|| Failure::no_worker(no)))
    }

    /// Mooncake: the prefill and decode legs at once (the decode waits for the KV itself).
    /// A failed prefill drops the decode (vLLM aborts it) and the pair is tried again on
    /// another prefill; a decode that fails first waits for its prefill to tell whether
    /// the KV is there for another decode.
    pub(super) async fn prefill_alongside_decode(
        &self,
        job: &Job,
        decode: &Lease,
        avoid: &mut Vec<String>,
        avoidance: Avoidance,
        tx: &mut oneshot::Sender<PairOutcome>,
    ) -> Opening {
        let mut last: Option<Failure> = None;
        let mut attempt = 0;
        loop {
            let mut lease = match self.prefill_attempt(job, decode.worker(), avoid, avoidance, attempt, &mut last).await {
                Ok(lease) => lease,
                Err(f) => return Opening::Over(PairOutcome::Final(f)),
            };
            attempt += 1;
            let legs = match self.connector.pair_legs(&job.bodies, &job.leg.request_id, &lease, decode.worker()) {
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
                let prefill = self.legs.prefill(lease.target(), &preq);
                let decoding = self.decode_leg(decode, &req, job, tx);
                tokio::pin!(prefill, decoding);
                let mut prefilled = None;
                let first = loop {
                    tokio::select! {
                        p = &mut prefill, if prefilled.is_none() => {
                            // A failed prefill, or one that kept no KV: its decode would wait
                            // for KV that never comes, and is dropped (vLLM aborts it).
                            let over = p.as_ref().map_or(true, |a| a.kv == PrefillKv::NotKept);
                            prefilled = Some(p);
                            if over {
                                break None;
                            }
                        }
                        done = &mut decoding => break Some(DecodeDone { sent_at: t, ..done }),
                    }
                };
                // A decode that failed before its prefill answered: whether the KV is there
                // for another decode depends on the prefill.
                if prefilled.is_none() && first.as_ref().is_some_and(|d| matches!(d.end, DecodeEnd::Answered(Err(_)))) {
                    prefilled = Some(prefill.await);
                }
                (prefilled, first)
            };
            let opened = |lease: &Lease, req, first| {
                Opening::Opened(Opened { prefill_worker: lease.worker().clone(), prefill_rank: lease.rank(), req, first })
            };
            match prefilled {
                Some(Err(e)) => {
                    match self.judge(Leg::Prefill, &mut lease, e, job).settle(avoid, lease.url()) {
                        ControlFlow::Continue(f) => last = Some(f),
                        ControlFlow::Break(answer) => return Opening::Over(PairOutcome::Final(answer)),
                    }
                    match first {
                        Some(DecodeDone { client: Client::Gone, .. }) => return Opening::Abandoned,
                        // A decode that already failed is not tried again on this pair.
                        Some(DecodeDone { end: DecodeEnd::Answered(Err(e)), .. }) => {
                            self.metrics.leg_error(Leg::Decode, e.kind());
                            return Opening::Over(PairOutcome::Decode {
                                decodes: vec![decode.url().to_string()],
                                prefill: lease.url().to_string(),
                                last: last.expect("set above"),
                            });
                        }
                        _ => {}
                    }
                }
                Some(Ok(answer)) => {
                    lease.succeeded();
                    self.metrics.leg_time(LegTime::Prefill, t);
                    // The prefill kept no KV (its engine did not finish it on the length
                    // cap): the decode prefills locally instead.
                    let req = if first.is_none() && answer.kv == PrefillKv::NotKept {
                        job.decode_request(self.connector.decode_body(&job.bodies, None), req.request_id)
                    } else {
                        req
                    };
                    return opened(&lease, req, first);
                }
                // The decode ended before the prefill answered: it answered (the KV moved),
                // or it was kept for a client that left and then let go (decode_leg).
                None => return opened(&lease, req, first),
            }
        }
    }
}
