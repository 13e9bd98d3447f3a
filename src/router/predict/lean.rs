//! Soft roles over elastic engines (Splitwise's pools, moved by the load): how many of
//! them lean to prefill now, from the prefill work the disaggregated requests bring
//! (engine-milliseconds per millisecond, decayed over LEAN_WINDOW), with headroom. The
//! rest take decodes and the requests that go alone.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How far back prefill work counts (exponential decay with this time constant).
const LEAN_WINDOW: Duration = Duration::from_secs(2);
/// Prefill engines kept beyond the work measured (queues stay short).
const HEADROOM: f64 = 1.2;

pub(crate) struct Lean {
    /// Prefill milliseconds brought, decayed to `at`.
    decayed: Mutex<(f64, Instant)>,
}

impl Default for Lean {
    fn default() -> Self {
        Lean { decayed: Mutex::new((0.0, Instant::now())) }
    }
}

impl Lean {
    fn now(&self, add: f64) -> f64 {
        let mut d = self.decayed.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let kept = (-(now - d.1).as_secs_f64() / LEAN_WINDOW.as_secs_f64()).exp();
        *d = (d.0 * kept + add, now);
        d.0
    }

    /// A disaggregated request brings this much prefill work (ms on one engine).
    pub(crate) fn add(&self, prefill_ms: f64) {
        self.now(prefill_ms.max(0.0));
    }

    /// Engines that should lean to prefill, of `elastic`: at most `max_share` of them (the
    /// decodes' room: the router does not see the engines' KV caches fill) and all but one;
    /// none while no prefill work came lately.
    pub(crate) fn prefill_engines(&self, elastic: usize, max_share: f64) -> usize {
        let rate = self.now(0.0) / (LEAN_WINDOW.as_secs_f64() * 1e3);
        if rate < 1e-3 || elastic < 2 {
            return 0;
        }
        let most = ((elastic as f64 * max_share).floor() as usize).clamp(1, elastic - 1);
        ((rate * HEADROOM).ceil() as usize).clamp(1, most)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prefill_share_follows_the_work_and_decays() {
        let lean = Lean::default();
        assert_eq!(lean.prefill_engines(8, 1.0), 0, "no prefill work: every engine decodes");
        // The window's length of prefill work at once (an engine-second per second).
        lean.add(LEAN_WINDOW.as_secs_f64() * 1e3);
        assert_eq!(lean.prefill_engines(8, 1.0), 2, "ceil(1.0 x 1.2)");
        lean.add(4.0 * LEAN_WINDOW.as_secs_f64() * 1e3);
        assert_eq!(lean.prefill_engines(8, 1.0), 6, "ceil(5.0 x 1.2)");
        assert_eq!(lean.prefill_engines(8, 0.5), 4, "at most half");
        lean.add(1e9);
        assert_eq!(lean.prefill_engines(8, 1.0), 7, "one engine always decodes");
        assert_eq!(lean.prefill_engines(1, 1.0), 0);
        assert_eq!(lean.prefill_engines(2, 0.1), 1, "at least one");
        *lean.decayed.lock().unwrap() = (5_000.0, Instant::now() - LEAN_WINDOW * 10);
        assert_eq!(lean.prefill_engines(8, 1.0), 0, "decayed away");
    }
}
