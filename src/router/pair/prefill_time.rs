//! How long prefill legs typically take, for the grace a prefill whose client has gone
//! gets to answer (pair.rs, run_pair).

use std::time::Duration;

/// The typical time of a prefill leg (an exponentially weighted mean), which sets how
/// long a prefill whose client has gone may still answer (see run_pair).
#[derive(Default)]
pub(crate) struct PrefillTime {
    micros: std::sync::atomic::AtomicU64,
}

impl PrefillTime {
    pub(crate) fn observe(&self, took: Duration) {
        use std::sync::atomic::Ordering::Relaxed;
        let new = took.as_micros().min(u128::from(u64::MAX)) as u64;
        let old = self.micros.load(Relaxed);
        let mean = if old == 0 { new } else { (old * 7 + new) / 8 };
        self.micros.store(mean, Relaxed);
    }

    /// How much longer a prefill leg that has run `elapsed` may take to answer once its
    /// client has gone: three typical prefill times, or twice what it has already waited
    /// (a queued prefill is expected to wait about as long again), at least a second, at
    /// most the prefill timeout.
    pub(crate) fn grace(&self, elapsed: Duration, limit: Duration) -> Duration {
        let typical = Duration::from_micros(self.micros.load(std::sync::atomic::Ordering::Relaxed));
        (typical * 3).max(elapsed * 2).max(Duration::from_secs(1)).min(limit.saturating_sub(elapsed))
    }
}
