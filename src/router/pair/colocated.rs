//! Colocated mode: one leg to a worker, retried elsewhere before its first byte. A client
//! that leaves drops it at once (no KV crosses workers).

use std::ops::ControlFlow;

use super::{Answer, Job, LegSender, Pairs};
use crate::router::metrics::{Leg, RetryOf};
use crate::router::pair::failure::Failure;
use crate::router::workers::Pool;

impl<S: LegSender> Pairs<S> {
    pub(super) async fn colocated(&self, workers: &Pool, job: &Job) -> Result<Answer, Failure> {
        let req = job.decode_request(job.bodies.colocated(), job.leg.request_id.clone());
        let mut avoid = Vec::new();
        let mut last: Option<Failure> = None;
        for attempt in 0.. {
            if attempt > 0 && !self.may_retry(attempt, RetryOf::Worker).await {
                break;
            }
            let lease = match super::pick(workers, job, &avoid, super::Avoidance::Strict, None) {
                Ok(lease) => lease,
                Err(no) => return Err(last.unwrap_or_else(|| Failure::no_worker(no))),
            };
            self.predict_alone(job, lease.worker());
            let (mut lease, e) = match self.lone_leg(lease, &req, job).await {
                Ok(answer) => return Ok(answer),
                Err(failed) => failed,
            };
            match self.judge(Leg::Decode, &mut lease, e, job).settle(&mut avoid, lease.url()) {
                ControlFlow::Continue(f) => last = Some(f),
                ControlFlow::Break(answer) => return Err(answer),
            }
        }
        Err(last.expect("at least one worker was tried"))
    }
}
