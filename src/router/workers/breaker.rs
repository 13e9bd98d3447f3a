//! A circuit breaker per worker: the health check sees a worker that answers /health; the
//! breaker sees one that fails the requests it is sent (5xx, timeouts, broken answers),
//! e.g. a hung engine whose API server is still up.
//!
//! closed --(failure_threshold consecutive failures within the window)--> open
//! open --(open_for has passed)--> half-open: one probe request at a time
//! half-open --(success_threshold successful probes)--> closed
//! half-open --(a failed probe)--> open again, for twice as long (at most 8x)

use std::sync::Mutex;
use std::time::Duration;
use std::time::Instant;

/// Per-worker circuit breaker (vllm-router's `--cb-*` flags).
#[derive(Debug, Clone)]
pub(crate) struct BreakerConfig {
    pub(crate) enabled: bool,
    /// Consecutive failures (within `window`) that open the circuit.
    pub(crate) failure_threshold: u32,
    /// Successful probes that close a half-open circuit.
    pub(crate) success_threshold: u32,
    /// How long an open circuit ejects the worker (doubled on each reopening, up to 8x).
    pub(crate) open_for: Duration,
    /// Failures older than this do not count.
    pub(crate) window: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Circuit {
    Closed,
    Open,
    HalfOpen,
}

impl Circuit {
    /// The state as the metrics' gauge shows it.
    pub(crate) fn gauge(self) -> crate::router::metrics::CircuitState {
        match self {
            Circuit::Closed => crate::router::metrics::CircuitState::Closed,
            Circuit::HalfOpen => crate::router::metrics::CircuitState::HalfOpen,
            Circuit::Open => crate::router::metrics::CircuitState::Open,
        }
    }
}

impl Circuit {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Circuit::Closed => "closed",
            Circuit::Open => "open",
            Circuit::HalfOpen => "half_open",
        }
    }
}

#[derive(Debug)]
enum Phase {
    Closed { failures: u32, last_failure: Option<Instant> },
    Open { until: Instant },
    HalfOpen { successes: u32, probing: bool },
}

#[derive(Debug)]
struct State {
    phase: Phase,
    /// Consecutive openings without closing: the open period doubles with each.
    reopenings: u32,
    opened_total: u64,
}

pub(crate) struct Breaker {
    cfg: BreakerConfig,
    state: Mutex<State>,
}

/// What a pick may do with a worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Admit {
    Yes,
    /// Half-open: this request is the probe.
    Probe,
    No,
}

impl Breaker {
    pub(crate) fn new(cfg: BreakerConfig) -> Self {
        Breaker {
            cfg,
            state: Mutex::new(State { phase: Phase::Closed { failures: 0, last_failure: None }, reopenings: 0, opened_total: 0 }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether a request may go to the worker now, without taking the probe slot.
    pub(crate) fn allows(&self) -> bool {
        if !self.cfg.enabled {
            return true;
        }
        let mut st = self.lock();
        Self::advance(&mut st);
        match st.phase {
            Phase::Closed { .. } => true,
            Phase::Open { .. } => false,
            Phase::HalfOpen { probing, .. } => !probing,
        }
    }

    /// Takes the way in for one request (the probe slot when half-open).
    pub(crate) fn admit(&self) -> Admit {
        if !self.cfg.enabled {
            return Admit::Yes;
        }
        let mut st = self.lock();
        Self::advance(&mut st);
        match &mut st.phase {
            Phase::Closed { .. } => Admit::Yes,
            Phase::Open { .. } => Admit::No,
            Phase::HalfOpen { probing, .. } if !*probing => {
                *probing = true;
                Admit::Probe
            }
            Phase::HalfOpen { .. } => Admit::No,
        }
    }

    /// A probe that ended without a verdict (e.g. the client left) frees its slot.
    pub(crate) fn end_probe(&self) {
        if let Phase::HalfOpen { probing, .. } = &mut self.lock().phase {
            *probing = false;
        }
    }

    fn advance(st: &mut State) {
        if let Phase::Open { until } = st.phase {
            if Instant::now() >= until {
                st.phase = Phase::HalfOpen { successes: 0, probing: false };
            }
        }
    }

    pub(crate) fn state(&self) -> Circuit {
        let mut st = self.lock();
        Self::advance(&mut st);
        match st.phase {
            Phase::Closed { .. } => Circuit::Closed,
            Phase::Open { .. } => Circuit::Open,
            Phase::HalfOpen { .. } => Circuit::HalfOpen,
        }
    }

    pub(crate) fn opened_total(&self) -> u64 {
        self.lock().opened_total
    }

    /// A leg on this worker succeeded (4xx answers count: the worker works).
    pub(crate) fn success(&self) {
        let mut st = self.lock();
        match &mut st.phase {
            Phase::Closed { failures, .. } => *failures = 0,
            Phase::Open { .. } => {}
            Phase::HalfOpen { successes, probing } => {
                *successes += 1;
                *probing = false;
                if *successes >= self.cfg.success_threshold {
                    st.phase = Phase::Closed { failures: 0, last_failure: None };
                    st.reopenings = 0;
                }
            }
        }
    }

    /// A leg on this worker failed (connect error, 5xx, timeout, broken answer). Returns
    /// true when this failure opened the circuit.
    pub(crate) fn failure(&self) -> bool {
        if !self.cfg.enabled {
            return false;
        }
        let mut st = self.lock();
        let now = Instant::now();
        let open = match &mut st.phase {
            Phase::Closed { failures, last_failure } => {
                if last_failure.is_some_and(|t| now.duration_since(t) > self.cfg.window) {
                    *failures = 0;
                }
                *failures += 1;
                *last_failure = Some(now);
                *failures >= self.cfg.failure_threshold
            }
            Phase::Open { .. } => false,
            Phase::HalfOpen { .. } => true,
        };
        if open {
            let factor = 1u32 << st.reopenings.min(3);
            st.phase = Phase::Open { until: now + self.cfg.open_for * factor };
            st.reopenings += 1;
            st.opened_total += 1;
        }
        open
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn breaker(open_ms: u64) -> Breaker {
        Breaker::new(BreakerConfig {
            enabled: true,
            failure_threshold: 3,
            success_threshold: 2,
            open_for: Duration::from_millis(open_ms),
            window: Duration::from_secs(60),
        })
    }

    #[test]
    fn opens_after_consecutive_failures_and_a_success_resets_the_count() {
        let b = breaker(10_000);
        assert!(!b.failure() && !b.failure());
        b.success();
        assert!(!b.failure() && !b.failure());
        assert!(b.failure(), "third consecutive failure opens");
        assert_eq!(b.state(), Circuit::Open);
        assert_eq!(b.admit(), Admit::No);
        assert!(!b.allows());
    }

    #[test]
    fn half_open_lets_one_probe_through_and_closes_after_enough_successes() {
        let b = breaker(20);
        for _ in 0..3 {
            b.failure();
        }
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(b.state(), Circuit::HalfOpen);
        assert_eq!(b.admit(), Admit::Probe);
        assert_eq!(b.admit(), Admit::No, "one probe at a time");
        b.success();
        assert_eq!(b.admit(), Admit::Probe);
        b.success();
        assert_eq!(b.state(), Circuit::Closed);
        assert_eq!(b.admit(), Admit::Yes);
    }

    #[test]
    fn a_failed_probe_reopens_for_longer() {
        let b = breaker(20);
        for _ in 0..3 {
            b.failure();
        }
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(b.admit(), Admit::Probe);
        assert!(b.failure());
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(b.state(), Circuit::Open, "the second opening lasts 40 ms");
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(b.state(), Circuit::HalfOpen);
        assert_eq!(b.opened_total(), 2);
        // A probe that ends without a verdict frees the slot.
        assert_eq!(b.admit(), Admit::Probe);
        b.end_probe();
        assert_eq!(b.admit(), Admit::Probe);
    }
}
