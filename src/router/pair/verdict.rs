//! What a failed leg means for the request: the error carries its own retry decision
//! (pingora's way), and the worker is charged for it.

use std::ops::ControlFlow;

use axum::http::HeaderValue;

use super::failure::Failure;
use crate::router::metrics::{Leg, RouterMetrics};
use crate::router::upstream::legs::LegError;
use crate::router::workers::Lease;

/// What comes of a failed leg.
pub(super) enum Verdict {
    /// The worker's 4xx: the client's answer, as the worker gave it.
    Answer(Failure),
    /// Another worker may take the leg; the failure is what the client hears if none does.
    Elsewhere(Failure),
    /// The same worker may take it again: it serves fewer DP ranks than the router was
    /// told (its rank count is lowered, and a rank it serves is picked next).
    Again(Failure),
}

impl Verdict {
    /// Judges a failed leg and charges its worker: a 4xx is the client's (the worker did
    /// its job); vLLM's refusal of a DP rank is the router's configuration (the worker's
    /// ranks are lowered, its health untouched); anything else counts against the worker,
    /// and a refused connection marks it down at once.
    pub(super) fn of(metrics: &RouterMetrics, leg: Leg, lease: &mut Lease, err: LegError, request_id: &HeaderValue) -> Verdict {
        metrics.leg_error(leg, err.kind());
        if let LegError::RankNotServed { served } = err {
            lease.worker().limit_ranks(served);
            return Verdict::Again(Failure::leg_failed(leg, &err));
        }
        if err.is_client_error() {
            lease.succeeded();
            return Verdict::Answer(Failure::passthrough(err));
        }
        tracing::warn!(request_id = ?request_id, worker = %lease.url(), leg = leg.as_str(), "leg failed: {err}");
        lease.failed();
        if let LegError::Connect(why) = &err {
            lease.worker().mark_down(why);
        }
        Verdict::Elsewhere(Failure::leg_failed(leg, &err))
    }

    /// Whether to go on: `Continue` with what the client hears if no attempt is left (the
    /// worker added to `avoid` unless it may take the leg again), `Break` with the answer.
    pub(super) fn settle(self, avoid: &mut Vec<String>, url: &str) -> ControlFlow<Failure, Failure> {
        match self {
            Verdict::Answer(f) => ControlFlow::Break(f),
            Verdict::Again(f) => ControlFlow::Continue(f),
            Verdict::Elsewhere(f) => {
                avoid.push(url.to_string());
                ControlFlow::Continue(f)
            }
        }
    }
}
