//! One generation (a whole request, or one prompt or choice of a split one) on workers:
//! the PD state machine, top to bottom. Disaggregated: reserve a decode → prefill leg
//! (retried on other prefills) → decode leg, retried with the same KV on other decodes
//! while the failed decode surely never took it → the pair run again once when the decode
//! failed in a way that may have used the KV. Colocated: one leg, retried on other
//! workers. Legs go through `LegSender` (sender.rs): HTTP in the router, scripted in the
//! unit tests (tests.rs), one per row of docs/FAILURES.md, the contract this room keeps.

mod colocated;
pub(crate) mod connector;
mod decode;
pub(crate) mod elastic;
pub(crate) mod failure;
mod job;
mod prefill;
pub(crate) mod rename;
pub(crate) mod retry;
#[cfg(test)]
mod scripted;
pub(crate) mod sender;
#[cfg(test)]
mod tests;
mod verdict;

use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::oneshot;

use crate::api::connector::Connector;
use crate::router::metrics::{KvAwareOutcome, Leg, LegTime, RetryOf, RouterMetrics};
use crate::router::upstream::legs::LegRequest;
use crate::router::workers::topology::Topology;
use crate::router::workers::{Lease, NoWorker, Pool};
use decode::{PairOutcome, Pick};
use failure::Failure;
pub(crate) use job::{Answer, Delivery, Job, LegTemplate};
use retry::{RetryBudget, RetryConfig};
pub(crate) use sender::{HttpLegs, LegSender};
use verdict::Verdict;

/// What the state machine runs with: the pools, the connector, the retry rules and budget,
/// the metrics, and the legs' sender.
pub(crate) struct Pairs<S = HttpLegs> {
    pub(crate) topology: Arc<Topology>,
    pub(crate) connector: Connector,
    pub(crate) retry: RetryConfig,
    pub(crate) budget: RetryBudget,
    pub(crate) metrics: Arc<RouterMetrics>,
    /// kv_aware: a decode holding all but at most this many prompt tokens prefills them
    /// itself (no prefill leg); 0: never.
    pub(crate) decode_alone_tokens: usize,
    /// slo_aware's service levels (None: no policy predicts latency, nothing is fitted).
    pub(crate) slo: Option<crate::router::predict::Slo>,
    /// slo_aware over elastic engines: how many lean to prefill now, and at most what share.
    pub(crate) lean: crate::router::predict::Lean,
    pub(crate) max_prefill_share: f64,
    pub(crate) legs: S,
}

/// Why a decode answers alone (no prefill leg).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Alone {
    /// kv_aware: its cache holds nearly all of the prompt.
    Cached,
    /// An elastic engine with no other prefill, or predicted faster alone.
    Elastic,
}

/// Whether a pick may settle for a worker it was told to avoid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Avoidance {
    Strict,
    /// An avoided worker rather than none (a pair's second run: the pool may be one deep).
    UnlessNoneElse,
}

/// Picks from `pool` for `job`, avoiding `avoid` as `how` says, and `never` always (an
/// elastic engine already reserved as the decode).
fn pick(pool: &Pool, job: &Job, avoid: &[String], how: Avoidance, never: Option<&str>) -> Result<Lease, NoWorker> {
    let with_never = |urls: &[String]| -> Vec<String> { urls.iter().cloned().chain(never.map(str::to_owned)).collect() };
    let strict = match never {
        Some(_) => std::borrow::Cow::Owned(with_never(avoid)),
        None => std::borrow::Cow::Borrowed(avoid),
    };
    let picked = match pool.pick(&job.info, &strict) {
        Err(no) if how == Avoidance::UnlessNoneElse && no.healthy > 0 => pool.pick(&job.info, &with_never(&[])),
        other => other,
    };
    if picked.is_ok() {
        job.picked(pool.role);
    }
    picked
}

impl<S: LegSender> Pairs<S> {
    pub(crate) async fn run(self: &Arc<Self>, job: Arc<Job>) -> Result<Answer, Failure> {
        let answer = match &*self.topology {
            Topology::Disaggregated { .. } => self.disaggregated(job.clone()).await,
            Topology::Colocated { workers } => self.colocated(workers, &job).await,
        };
        // A streamed answer starts with its first token: the TTFT to compare with the prediction.
        if let (Ok(_), Some((predicted, observed)), Delivery::Stream) = (&answer, job.prediction.predicted_and_observed_ms(), job.delivery)
        {
            self.metrics.ttft_prediction(predicted, observed);
            if let Some(j) = &job.leg.journey {
                j.predicted_ttft(predicted);
            }
        }
        answer
    }

    /// The prefill and decode pools (the request was dispatched on the topology in `run`).
    fn pd(&self) -> (&Pool, &Pool) {
        match &*self.topology {
            Topology::Disaggregated { prefill, decode } => (prefill, decode),
            Topology::Colocated { .. } => unreachable!("pairs are only run on a disaggregated topology"),
        }
    }

    /// Whether another attempt may be made now: within --retry-max-retries and the retry
    /// budget; waits the backoff before saying yes.
    async fn may_retry(&self, attempt: u32, of: RetryOf) -> bool {
        if attempt > self.retry.max_retries || !self.budget.try_retry() {
            return false;
        }
        self.metrics.retry(of);
        tokio::time::sleep(retry::backoff(&self.retry, attempt)).await;
        true
    }

    /// A failed leg's verdict, its worker charged.
    fn judge(&self, leg: Leg, lease: &mut Lease, err: crate::router::upstream::legs::LegError, job: &Job) -> Verdict {
        Verdict::of(&self.metrics, leg, lease, err, &job.leg.request_id)
    }

    async fn disaggregated(self: &Arc<Self>, job: Arc<Job>) -> Result<Answer, Failure> {
        let (mut avoid_p, mut avoid_d) = (Vec::new(), Vec::new());
        let runs = if self.retry.rerun_pair { 2 } else { 1 };
        let mut last = None;
        for run in 0..runs {
            if run > 0 && !self.may_retry(1, RetryOf::Pair).await {
                break;
            }
            let avoidance = if run == 0 { Avoidance::Strict } else { Avoidance::UnlessNoneElse };
            // The decode is reserved first: with none available, no prefill KV is made for nothing.
            // slo_aware over elastic engines: decodes on the engines that do not lean to prefill.
            let leaning = if run == 0 { self.prefill_leaning() } else { Vec::new() };
            let mut decode = if leaning.is_empty() {
                pick(self.pd().1, &job, &avoid_d, avoidance, None)
            } else {
                pick(self.pd().1, &job, &leaning, Avoidance::UnlessNoneElse, None)
            }
            .map_err(Failure::no_worker)?;
            let alone = match run {
                0 if self.prefill_on_decode(&job, &decode) => Some(Alone::Cached),
                0 if self.elastic_alone(&job, &decode) => Some(Alone::Elastic),
                _ => None,
            };
            if let Some(why) = alone {
                // No prefill leg: its claim on the prefills' room ends here.
                job.picked(crate::router::workers::Role::Prefill);
                match self.decode_alone(&job, decode, why).await {
                    ControlFlow::Break(answered) => return answered,
                    // Anything but a 4xx: disaggregate, on another decode.
                    ControlFlow::Continue(failed_url) => {
                        avoid_d.push(failed_url);
                        decode = pick(self.pd().1, &job, &avoid_d, Avoidance::UnlessNoneElse, None).map_err(Failure::no_worker)?;
                    }
                }
            }
            let (tx, rx) = oneshot::channel();
            let pick = Pick { decode, avoid_p: avoid_p.clone(), avoid_d: avoid_d.clone(), avoidance };
            tokio::spawn(self.clone().run_pair(job.clone(), pick, tx));
            match rx.await.map_err(|_| Failure::internal("the request's pair task ended unexpectedly"))? {
                PairOutcome::Answer(answer) => return Ok(*answer),
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

    /// kv_aware's conditional disaggregation: whether the chosen decode rank already holds
    /// all but `decode_alone_tokens` of the prompt (its own prefix cache, from its KV
    /// events), so that it prefills the rest itself.
    fn prefill_on_decode(&self, job: &Job, decode: &Lease) -> bool {
        let limit = self.decode_alone_tokens;
        let Some(kv) = &job.info.kv else { return false };
        let held = kv.held.get(&decode.holder()).copied().unwrap_or(0);
        limit > 0 && held > 0 && kv.tokens.saturating_sub(held * kv.block_size) <= limit
    }

    /// The request on the decode alone, as a colocated worker serves it (no KV moves):
    /// `Break` with the client's answer (the worker's, or its 4xx), `Continue` with the
    /// URL of a decode that failed otherwise.
    async fn decode_alone(&self, job: &Job, decode: Lease, why: Alone) -> ControlFlow<Result<Answer, Failure>, String> {
        let req = job.decode_request(job.bodies.colocated(), job.leg.request_id.clone());
        match self.lone_leg(decode, &req, job).await {
            Ok(answer) => {
                if why == Alone::Cached {
                    self.metrics.kv_aware(KvAwareOutcome::PrefillSkipped);
                }
                ControlFlow::Break(Ok(answer))
            }
            Err((mut decode, e)) => match self.judge(Leg::Decode, &mut decode, e, job) {
                Verdict::Answer(f) => ControlFlow::Break(Err(f)),
                Verdict::Elsewhere(_) | Verdict::Again(_) => ControlFlow::Continue(decode.url().to_string()),
            },
        }
    }

    /// One leg to a worker that answers alone (colocated, or a decode prefilling itself):
    /// the answer (its cached tokens are the worker's own), or the error with the lease to
    /// count it against.
    async fn lone_leg(
        &self,
        mut lease: Lease,
        req: &LegRequest,
        job: &Job,
    ) -> Result<Answer, (Lease, crate::router::upstream::legs::LegError)> {
        let t = Instant::now();
        // slo_aware: its prefill counts in the worker's queue until the first output.
        let work = self
            .slo
            .map(|_| lease.worker().latency.start_prefill(crate::router::policy::slo_aware::uncached(&**lease.worker(), &job.info)));
        match self.legs.answer(lease.target(), req, None).await {
            Ok(started) => {
                lease.succeeded();
                lease.started();
                self.metrics.leg_time(LegTime::DecodeFirstByte, t);
                if let (Some(work), Delivery::Stream) = (work, job.delivery) {
                    lease.worker().latency.observe_prefill(work.ahead, t.elapsed().as_secs_f64() * 1e3);
                }
                Ok(Answer { started, cache_from: Some(lease.holder()), prefill: None, lease, since: t, rename: None })
            }
            Err(e) => Err((lease, e)),
        }
    }
}
