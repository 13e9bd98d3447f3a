//! Soft roles over elastic engines (Splitwise's pools, moved by the load): how many of
//! them lean to prefill now, from the prefill work the disaggregated requests bring
//! (engine-milliseconds per millisecond, decayed over LEAN_WINDOW), with headroom; and
//! which: those leaning already stay while they are needed, new ones are those running
//! the fewest sequences (their decodes are the fewest a prefill holds up). The rest take
//! decodes and the requests that go alone.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How far back prefill work counts (exponential decay with this time constant).
const LEAN_WINDOW: Duration = Duration::from_secs(2);
/// Prefill engines kept beyond the work measured (queues stay short).
const HEADROOM: f64 = 1.2;
/// Below this much prefill work (engines), none leans to prefill.
const NONE_BELOW: f64 = 0.25;

pub(crate) struct Lean {
    /// Prefill milliseconds brought, decayed to `at`.
    decayed: Mutex<(f64, Instant)>,
    /// The engines leaning to prefill now, by URL.
    leaning: Mutex<Vec<String>>,
}

impl Default for Lean {
    fn default() -> Self {
        Lean { decayed: Mutex::new((0.0, Instant::now())), leaning: Mutex::default() }
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
        if rate * HEADROOM < NONE_BELOW || elastic < 2 {
            return 0;
        }
        let most = ((elastic as f64 * max_share).floor() as usize).clamp(1, elastic - 1);
        ((rate * HEADROOM).ceil() as usize).clamp(1, most)
    }

    /// The `k` engines leaning to prefill among the available elastic ones (URL and
    /// sequences running): those leaning already (the least busy of them when fewer are
    /// needed), then the least busy others.
    pub(crate) fn leaning(&self, available: &[(String, usize)], k: usize) -> Vec<String> {
        let running = |url: &str| available.iter().find(|(u, _)| u == url).map(|(_, n)| *n);
        let mut leaning = self.leaning.lock().unwrap_or_else(|e| e.into_inner());
        leaning.retain(|u| running(u).is_some());
        leaning.sort_by_key(|u| running(u));
        leaning.truncate(k);
        let mut others: Vec<&(String, usize)> = available.iter().filter(|(u, _)| !leaning.contains(u)).collect();
        others.sort_by_key(|(_, n)| *n);
        let more = k.saturating_sub(leaning.len());
        leaning.extend(others.into_iter().take(more).map(|(u, _)| u.clone()));
        leaning.clone()
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
        lean.add(0.1 * LEAN_WINDOW.as_secs_f64() * 1e3);
        assert_eq!(lean.prefill_engines(8, 1.0), 0, "a tenth of an engine's work: none leans");
    }

    #[test]
    fn leaning_engines_stay_and_new_ones_are_the_least_busy() {
        let lean = Lean::default();
        let engines = |n: &[usize]| n.iter().enumerate().map(|(i, n)| (format!("e{i}"), *n)).collect::<Vec<_>>();
        assert_eq!(lean.leaning(&engines(&[5, 0, 3, 1]), 2), ["e1", "e3"]);
        // They stay though others are now idler; one more is the least busy other.
        assert_eq!(lean.leaning(&engines(&[0, 4, 3, 4]), 3), ["e1", "e3", "e0"]);
        // Fewer needed: the least busy of them stay; one gone (unavailable) is replaced.
        assert_eq!(lean.leaning(&engines(&[0, 9, 3, 1]), 2), ["e0", "e3"]);
        assert_eq!(lean.leaning(&[("e3".into(), 1), ("e2".into(), 0)], 2), ["e3", "e2"]);
        assert!(lean.leaning(&engines(&[1, 1]), 0).is_empty());
    }
}
