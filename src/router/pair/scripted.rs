//! Scripted workers for the state machine's tests: a queue of steps per URL; every leg's
//! worker, rank, request id, body, and end (answered, or dropped) is recorded.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::StatusCode;
use bytes::Bytes;
use serde_json::Value;
use tokio::time::Instant;

use super::LegSender;
use crate::router::upstream::legs::{LegError, LegRequest, PrefillKv, Prefilled, Sent, Started, StartedBody, Target};

/// What a scripted worker does with one leg.
pub(super) enum Step {
    /// Answers a prefill leg.
    Prefill(Result<Prefilled, LegError>),
    /// Answers a generating leg.
    Answer(Result<Started, LegError>),
    /// Takes the whole request and never answers.
    Hang,
    /// Does the step after a while.
    After(Duration, Box<Step>),
}

pub(super) fn after(ms: u64, step: Step) -> Step {
    Step::After(Duration::from_millis(ms), Box::new(step))
}

pub(super) fn prefilled() -> Step {
    Step::Prefill(Ok(Prefilled { params: Some(Bytes::from_static(br#"{"remote_block_ids":[1]}"#)), kv: PrefillKv::Kept }))
}

pub(super) fn answered() -> Step {
    let body = Bytes::from_static(br#"{"choices":[{"text":"ok"}]}"#);
    Step::Answer(Ok(Started { status: StatusCode::OK, content_type: None, body: StartedBody::Whole(body) }))
}

pub(super) fn status(code: u16) -> LegError {
    LegError::Status { status: StatusCode::from_u16(code).unwrap(), content_type: None, body: Bytes::from_static(b"{\"error\":\"x\"}") }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    Prefill,
    Answer,
}

/// How a leg ended, as the worker saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum End {
    Answered,
    /// Dropped before its answer (vLLM aborts such a request).
    Dropped,
}

#[derive(Clone, Debug)]
pub(super) struct SentLeg {
    pub(super) kind: Kind,
    pub(super) url: String,
    pub(super) rank: Option<usize>,
    pub(super) id: String,
    pub(super) body: Value,
    pub(super) sent_at: Instant,
    pub(super) end: Option<(End, Instant)>,
}

/// Scripted workers: a queue of steps per URL; a leg no step was written for is refused.
#[derive(Default)]
pub(super) struct Script {
    pub(super) steps: Mutex<HashMap<String, VecDeque<Step>>>,
    pub(super) legs: Mutex<Vec<SentLeg>>,
}

impl Script {
    pub(super) fn on(&self, url: &str, steps: impl IntoIterator<Item = Step>) {
        self.steps.lock().unwrap().entry(url.to_string()).or_default().extend(steps);
    }

    pub(super) fn legs(&self) -> Vec<SentLeg> {
        self.legs.lock().unwrap().clone()
    }

    /// `kind url` for each leg, in the order sent.
    pub(super) fn order(&self) -> Vec<String> {
        self.legs().iter().map(|l| format!("{:?} {}", l.kind, l.url)).collect()
    }
}

/// Marks its leg dropped unless it was answered.
pub(super) struct LegEnd {
    pub(super) script: Arc<Script>,
    pub(super) index: usize,
    pub(super) answered: bool,
}

impl Drop for LegEnd {
    fn drop(&mut self) {
        let end = if self.answered { End::Answered } else { End::Dropped };
        self.script.legs.lock().unwrap()[self.index].end = Some((end, Instant::now()));
    }
}

pub(super) struct ScriptedLegs(pub(super) Arc<Script>);

impl ScriptedLegs {
    async fn leg(&self, kind: Kind, to: Target<'_>, req: &LegRequest, sent: Option<Arc<Sent>>) -> Step {
        let body: Vec<u8> = req.body.chunks().iter().flat_map(|c| c.iter().copied()).collect();
        let index = {
            let mut legs = self.0.legs.lock().unwrap();
            legs.push(SentLeg {
                kind,
                url: to.url.to_string(),
                rank: to.dp_rank,
                id: req.request_id.to_str().unwrap().to_string(),
                body: serde_json::from_slice(&body).unwrap(),
                sent_at: Instant::now(),
                end: None,
            });
            legs.len() - 1
        };
        let mut end = LegEnd { script: self.0.clone(), index, answered: false };
        if let Some(sent) = sent {
            sent.done();
        }
        let step = self.0.steps.lock().unwrap().get_mut(to.url).and_then(VecDeque::pop_front);
        let mut step = step.unwrap_or_else(|| match kind {
            Kind::Prefill => Step::Prefill(Err(LegError::Connect("unscripted".into()))),
            Kind::Answer => Step::Answer(Err(LegError::Connect("unscripted".into()))),
        });
        loop {
            step = match step {
                Step::After(d, next) => {
                    tokio::time::sleep(d).await;
                    *next
                }
                Step::Hang => std::future::pending().await,
                done => {
                    end.answered = true;
                    return done;
                }
            }
        }
    }
}

impl LegSender for ScriptedLegs {
    async fn prefill(&self, to: Target<'_>, req: &LegRequest) -> Result<Prefilled, LegError> {
        match self.leg(Kind::Prefill, to, req, None).await {
            Step::Prefill(r) => r,
            _ => panic!("a generating step scripted for a prefill leg"),
        }
    }

    async fn answer(&self, to: Target<'_>, req: &LegRequest, sent: Option<Arc<Sent>>) -> Result<Started, LegError> {
        match self.leg(Kind::Answer, to, req, sent).await {
            Step::Answer(r) => r,
            _ => panic!("a prefill step scripted for a generating leg"),
        }
    }
}
