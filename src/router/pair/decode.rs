//! The pair attempt, in a task of its own, and its decode legs: the decode leg is retried
//! with the same KV on other decodes while the failed one surely never took it; when it
//! may have, the pair attempt ends and `Pairs::disaggregated` runs the pair again.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::{Answer, Avoidance, Job, LegSender, Pairs};
use crate::api::connector::Connector;
use crate::router::metrics::{Leg, LegTime, RetryOf};
use crate::router::pair::failure::Failure;
use crate::router::pair::rename::Rename;
use crate::router::policy::WorkerRank;
use crate::router::upstream::legs::{LegError, LegRequest, Sent, Started};
use crate::router::workers::{Lease, Worker};

/// How long a non-streamed decode whose client has gone is kept once the whole request
/// reached it: by then vLLM has taken it into its engine, where an abort frees the
/// prefill's KV (see `decode_leg`).
pub(crate) const DECODE_GRACE: Duration = Duration::from_secs(1);

/// How one pair attempt ended.
pub(super) enum PairOutcome {
    Answer(Box<Answer>),
    /// The request is over: every prefill failed, or a worker said 4xx.
    Final(Failure),
    /// The decode failed in a way that may have used the KV (timeout, broken answer, an
    /// error event); these decodes were tried, on this prefill.
    Decode {
        decodes: Vec<String>,
        prefill: String,
        last: Failure,
    },
}

/// What a pair attempt starts from: its reserved decode, and what to avoid.
pub(super) struct Pick {
    pub(crate) decode: Lease,
    pub(crate) avoid_p: Vec<String>,
    pub(crate) avoid_d: Vec<String>,
    pub(crate) avoidance: Avoidance,
}

/// Whether the client is still there for the answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Client {
    Waiting,
    Gone,
}

/// How a decode leg ended.
pub(super) enum DecodeEnd {
    Answered(Result<Started, LegError>),
    /// Kept for a client that left until the decode had the KV, then dropped (vLLM aborts it).
    Released,
}

/// A decode leg's end, whether the client was still there, and when the leg was sent.
pub(super) struct DecodeDone {
    pub(crate) end: DecodeEnd,
    pub(crate) client: Client,
    pub(crate) sent_at: Instant,
}

/// A pair whose prefill has answered (or run alongside its decode).
pub(super) struct Opened {
    pub(crate) prefill_worker: Arc<Worker>,
    pub(crate) prefill_rank: usize,
    /// The decode leg (sent again to another decode if the first fails leaving the KV).
    pub(crate) req: LegRequest,
    /// How the decode sent alongside the prefill went.
    pub(crate) first: Option<DecodeDone>,
}

pub(super) enum Opening {
    Opened(Opened),
    /// The pair attempt ended before a decode answer.
    Over(PairOutcome),
    /// The client left and nothing is held for it.
    Abandoned,
}

impl<S: LegSender> Pairs<S> {
    /// One pair attempt, in a task of its own, so that it keeps the prefill's KV from
    /// being stranded when the client leaves (the handler is then dropped, closing `tx`):
    /// - during the prefill leg: the prefill leg runs on to its answer (prefill_then_decode:
    ///   real vLLM can hold a finished prefill's KV before it answers, where an abort
    ///   would come too late), and the decode leg is sent as below.
    /// - after the prefill answered (or alongside it, for a connector that sends both at
    ///   once): the decode leg is kept until the decode has taken the KV (decode_leg),
    ///   then dropped, which makes vLLM abort it.
    pub(super) async fn run_pair(self: Arc<Self>, job: Arc<Job>, pick: Pick, mut tx: oneshot::Sender<PairOutcome>) {
        let Pick { decode, mut avoid_p, avoid_d, avoidance } = pick;
        let opened = if self.connector.sends_decode_alongside() {
            self.prefill_alongside_decode(&job, &decode, &mut avoid_p, avoidance, &mut tx).await
        } else {
            self.prefill_then_decode(&job, &decode, &mut avoid_p, avoidance, &tx).await
        };
        let Opened { prefill_worker, prefill_rank, req, mut first } = match opened {
            Opening::Opened(o) => o,
            Opening::Over(outcome) => {
                let _ = tx.send(outcome);
                return;
            }
            Opening::Abandoned => return,
        };
        let mut tried = Vec::new();
        let mut lease = decode;
        for attempt in 1.. {
            let done = match first.take() {
                Some(done) => done,
                None => self.decode_leg(&lease, &req, &job, &mut tx).await,
            };
            let result = match done.end {
                DecodeEnd::Answered(result) => result,
                DecodeEnd::Released => {
                    self.metrics.abandoned_decode();
                    return;
                }
            };
            let err = match result {
                Ok(started) => {
                    lease.succeeded();
                    if done.client == Client::Gone {
                        // The decode has taken the KV; dropping its answer aborts it on vLLM.
                        self.metrics.abandoned_decode();
                    } else {
                        self.metrics.leg_time(LegTime::DecodeFirstByte, done.sent_at);
                        if self.slo.is_some() && job.delivery == super::Delivery::Stream {
                            lease.worker().latency.observe_transfer(job.info.tokens, done.sent_at.elapsed().as_secs_f64() * 1e3);
                        }
                        let prefill = WorkerRank { url: prefill_worker.url.clone(), rank: prefill_rank };
                        let cache_from = (self.connector == Connector::Nixl).then(|| prefill.clone());
                        let rename = (req.request_id != job.leg.request_id)
                            .then(|| Rename::new(req.request_id.as_bytes(), job.leg.request_id.as_bytes()));
                        let mut lease = lease;
                        lease.started();
                        let answer = Answer { started, lease, since: done.sent_at, cache_from, prefill: Some(prefill), rename };
                        let _ = tx.send(PairOutcome::Answer(Box::new(answer)));
                    }
                    return;
                }
                Err(e) => e,
            };
            let same_kv_elsewhere = err.kv_untouched_elsewhere() && self.connector.kv_can_go_to_another_decode();
            let last = match self.judge(Leg::Decode, &mut lease, err, &job).settle(&mut tried, lease.url()) {
                ControlFlow::Continue(last) => last,
                ControlFlow::Break(answer) => {
                    let _ = tx.send(PairOutcome::Final(answer));
                    return;
                }
            };
            // A decode that failed without using the KV (refused, or an error answer)
            // leaves the prefill's KV waiting: the same decode leg goes to another decode,
            // while the prefill that holds the KV is up. Never to the same decode again:
            // vLLM's decode can die on params it already failed to load. Otherwise the pair
            // runs again from a new prefill (the KV was pulled, or freed by the failed
            // decode's abort).
            // Never the elastic engine that prefilled it: its KV is not for itself.
            let own = prefill_worker.is_elastic().then(|| prefill_worker.url.clone());
            let avoid: Vec<String> = avoid_d.iter().chain(&tried).cloned().chain(own).collect();
            let other = if same_kv_elsewhere && prefill_worker.is_available() { self.pd().1.pick(&job.info, &avoid).ok() } else { None };
            let next = match other {
                Some(other) if self.may_retry(attempt, RetryOf::Decode).await => Some(other),
                _ => None,
            };
            match next {
                Some(next) => lease = next,
                None => {
                    if done.client == Client::Waiting {
                        let _ = tx.send(PairOutcome::Decode { decodes: tried, prefill: prefill_worker.url.clone(), last });
                    }
                    return;
                }
            }
        }
    }

    /// Sends the decode leg, noting whether the client left meanwhile. The leg is then
    /// kept until the decode has surely taken the KV, and dropped after (vLLM aborts it,
    /// and an abort frees the prefill's KV too if it was not yet pulled): a streamed leg
    /// until its first output (which comes after the pull); a non-streamed one, whose
    /// first output is its end, until DECODE_GRACE after the whole request reached the
    /// decode (vLLM 0.32 also frees the prefill's KV when a request is cancelled before
    /// its engine has it).
    pub(super) async fn decode_leg(&self, lease: &Lease, req: &LegRequest, job: &Job, tx: &mut oneshot::Sender<PairOutcome>) -> DecodeDone {
        let sent_at = Instant::now();
        let sent = Arc::new(Sent::default());
        let leg = self.legs.answer(lease.target(), req, Some(sent.clone()));
        tokio::pin!(leg);
        tokio::select! {
            biased;
            result = &mut leg => return DecodeDone { end: DecodeEnd::Answered(result), client: Client::Waiting, sent_at },
            () = tx.closed() => {}
        }
        let gone = |end| DecodeDone { end, client: Client::Gone, sent_at };
        if job.delivery == super::Delivery::Stream {
            return gone(DecodeEnd::Answered(leg.await));
        }
        let taken = async {
            sent.wait().await;
            tokio::time::sleep(DECODE_GRACE).await;
        };
        tokio::select! {
            result = &mut leg => gone(DecodeEnd::Answered(result)),
            () = taken => gone(DecodeEnd::Released),
        }
    }
}
