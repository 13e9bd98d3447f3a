//! What one generation runs with (its legs' bodies and headers, what policies read), and
//! the start of its answer.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::HeaderValue;

use super::rename::Rename;
use crate::router::observe::Journey;
use crate::router::policy::{RequestInfo, WorkerRank};
use crate::router::request::LegBodies;
use crate::router::upstream::legs::{LegRequest, Started};
use crate::router::upstream::pieces::Pieces;
use crate::router::workers::room::Transit;
use crate::router::workers::Lease;

/// What each leg of one generation sends besides its body.
#[derive(Clone)]
pub(crate) struct LegTemplate {
    pub(crate) path: &'static str,
    pub(crate) request_id: HeaderValue,
    pub(crate) authorization: Option<HeaderValue>,
    pub(crate) prefill_timeout: Duration,
    pub(crate) first_byte_timeout: Duration,
    pub(crate) request_timeout: Duration,
    /// The request's journey, when observed: each leg is marked in it (sender.rs).
    pub(crate) journey: Option<Arc<Journey>>,
}

impl LegTemplate {
    pub(super) fn request(&self, body: Pieces, timeout: Duration) -> LegRequest {
        LegRequest {
            path: self.path,
            request_id: self.request_id.clone(),
            authorization: self.authorization.clone(),
            body,
            timeout,
            journey: self.journey.clone(),
        }
    }

    /// The same legs under another request id (one generation of a split request).
    pub(crate) fn with_id(&self, request_id: HeaderValue) -> Self {
        LegTemplate { request_id, ..self.clone() }
    }
}

/// How the client takes its answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Delivery {
    /// Server-sent events: a decode's first output comes early.
    Stream,
    /// One JSON body: a decode's first output is its end.
    Whole,
}

impl From<bool> for Delivery {
    /// From the request's `stream`.
    fn from(stream: bool) -> Self {
        if stream {
            Delivery::Stream
        } else {
            Delivery::Whole
        }
    }
}

/// One generation to run.
pub(crate) struct Job {
    pub(crate) bodies: LegBodies,
    pub(crate) info: RequestInfo,
    pub(crate) leg: LegTemplate,
    pub(crate) delivery: Delivery,
    /// Flow control's claim on the engines' room, given up as each pool is picked from.
    pub(crate) transit: Option<Arc<Transit>>,
    /// slo_aware: the TTFT predicted for the layout chosen.
    pub(crate) prediction: super::elastic::TtftPrediction,
    /// The request's admission permit (flow/ passes it; pair/ only holds it, so it does
    /// not name admission's type), shared with the handler: a pair that goes on for a
    /// client that left (its legs run to where no KV is held) keeps its place in the limits.
    #[expect(dead_code, reason = "held for its drop")]
    pub(crate) admitted: Option<Arc<dyn Send + Sync>>,
}

impl Job {
    /// A worker of `role` was picked for this generation.
    pub(super) fn picked(&self, role: crate::router::workers::Role) {
        if let Some(t) = &self.transit {
            t.picked(role);
        }
    }

    /// A decode (or colocated) leg with this body under `request_id`: its time limit is the
    /// first byte's when streamed, the whole answer's otherwise.
    pub(super) fn decode_request(&self, body: Pieces, request_id: HeaderValue) -> LegRequest {
        let timeout = match self.delivery {
            Delivery::Stream => self.leg.first_byte_timeout,
            Delivery::Whole => self.leg.request_timeout,
        };
        LegRequest { request_id, ..self.leg.request(body, timeout) }
    }
}

/// The start of the answer, and the worker rank giving it.
pub(crate) struct Answer {
    pub(crate) started: Started,
    pub(crate) lease: Lease,
    /// When the answering leg was sent.
    pub(crate) since: Instant,
    /// The DP rank whose prefix cache the answer's `cached_tokens` count: NIXL's decode
    /// reports its prefill's, a decode alone its own (None where unknown).
    pub(crate) cache_from: Option<WorkerRank>,
    /// The prefill rank that ran this answer's prefill leg (None: the worker answered alone).
    pub(crate) prefill: Option<WorkerRank>,
    /// The leg id to replace by the client's in the answer (P2pNccl's names both engines).
    pub(crate) rename: Option<Rename>,
}
