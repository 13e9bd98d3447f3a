//! Graceful drain on SIGTERM/SIGINT: /health turns 503 and new requests get 503 at once;
//! requests in flight get --shutdown-timeout-secs to finish; then streams still open end
//! with an error event and `[DONE]` (never a silent cut), and the router exits.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Notify};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Phase {
    Serving,
    /// No new requests; the ones in flight finish.
    Draining,
    /// Time is up: whatever is still open ends now, with an error the client can see.
    Cut,
}

pub(crate) struct Drain {
    phase: watch::Sender<Phase>,
    active: AtomicUsize,
    idle: Notify,
}

impl Default for Drain {
    fn default() -> Self {
        Drain { phase: watch::channel(Phase::Serving).0, active: AtomicUsize::new(0), idle: Notify::new() }
    }
}

/// One request in flight (its handler, then its response body).
pub(crate) struct Active(Arc<Drain>);

impl Drop for Active {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl Drain {
    pub(crate) fn active(self: &Arc<Self>) -> Active {
        self.active.fetch_add(1, Ordering::AcqRel);
        Active(self.clone())
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }

    pub(crate) fn phase(&self) -> Phase {
        *self.phase.borrow()
    }

    pub(crate) fn draining(&self) -> bool {
        self.phase() >= Phase::Draining
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<Phase> {
        self.phase.subscribe()
    }

    /// Resolves once the drain reaches `phase`.
    pub(crate) async fn reached(&self, phase: Phase) {
        let mut rx = self.phase.subscribe();
        let _ = rx.wait_for(|p| *p >= phase).await;
    }

    fn set(&self, phase: Phase) {
        self.phase.send_if_modified(|p| {
            let changed = *p < phase;
            if changed {
                *p = phase;
            }
            changed
        });
    }

    /// Waits until nothing is in flight, or `limit` passed; true if idle.
    async fn settle(&self, limit: Duration) -> bool {
        let wait = async {
            loop {
                let notified = self.idle.notified();
                if self.in_flight() == 0 {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(limit, wait).await.is_ok()
    }

    /// The whole drain: stop taking requests, let those in flight finish within `grace`,
    /// then cut what is left and give it a moment to reach its clients.
    pub(crate) async fn run(&self, grace: Duration) {
        self.set(Phase::Draining);
        tracing::info!(
            "draining: /health is 503 and new requests are refused; {} in flight get {:.0}s",
            self.in_flight(),
            grace.as_secs_f64()
        );
        if !self.settle(grace).await {
            tracing::warn!("{} requests still in flight after {:.0}s: ending them with an error", self.in_flight(), grace.as_secs_f64());
        }
        self.set(Phase::Cut);
        self.settle(Duration::from_secs(2)).await;
    }
}
