//! THE LEGS' SEAM: how a pair's legs reach workers. Over HTTP in the router (`HttpLegs`);
//! scripted in the state machine's unit tests (tests.rs), so every failure path runs
//! without a process or a socket.

use std::future::Future;
use std::sync::Arc;

use crate::router::upstream::legs::{self, LegError, LegRequest, Prefilled, Sent, Started, Target};

/// Sends one leg and returns what the worker answered.
pub(crate) trait LegSender: Send + Sync + 'static {
    /// A prefill leg: the params its answer carries, and whether it kept the KV.
    fn prefill(&self, to: Target<'_>, req: &LegRequest) -> impl Future<Output = Result<Prefilled, LegError>> + Send;
    /// A generating leg (decode, or a worker answering alone): the start of its answer.
    /// `sent` is told once the worker has the whole request.
    fn answer(&self, to: Target<'_>, req: &LegRequest, sent: Option<Arc<Sent>>) -> impl Future<Output = Result<Started, LegError>> + Send;
}

/// The legs over HTTP/1.1 (upstream/legs.rs).
pub(crate) struct HttpLegs;

impl LegSender for HttpLegs {
    fn prefill(&self, to: Target<'_>, req: &LegRequest) -> impl Future<Output = Result<Prefilled, LegError>> + Send {
        legs::prefill(to, req)
    }

    fn answer(&self, to: Target<'_>, req: &LegRequest, sent: Option<Arc<Sent>>) -> impl Future<Output = Result<Started, LegError>> + Send {
        legs::answer(to, req, sent)
    }
}
