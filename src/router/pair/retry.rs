//! When a failed leg may be tried again: a retry budget (retries may add only a fraction
//! of the traffic, so a sick cluster is not buried under retries) and exponential backoff
//! with jitter between attempts.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rand::Rng;

/// Retries of failed legs on other workers.
#[derive(Debug, Clone)]
pub(crate) struct RetryConfig {
    /// Extra attempts of a failed leg on other workers (prefill leg; decode leg with the
    /// same KV; colocated leg).
    pub(crate) max_retries: u32,
    /// A pair whose decode failed before its first byte is run again once.
    pub(crate) rerun_pair: bool,
    pub(crate) initial_backoff: Duration,
    pub(crate) max_backoff: Duration,
    pub(crate) multiplier: f64,
    pub(crate) jitter: f64,
    /// Retries may add this fraction of the requests of the last 10 s ...
    pub(crate) budget_ratio: f64,
    /// ... and at least this many per second.
    pub(crate) budget_min_per_sec: f64,
}

/// Seconds per bucket; the budget looks at the current and the previous bucket.
const BUCKET_SECS: u64 = 5;

/// Requests and retries counted in two rotating 5 s buckets (lock-free).
pub(crate) struct RetryBudget {
    ratio: f64,
    min_per_sec: f64,
    start: Instant,
    /// Per bucket parity: (bucket number, requests, retries).
    buckets: [Bucket; 2],
}

#[derive(Default)]
struct Bucket {
    epoch: AtomicU64,
    requests: AtomicU64,
    retries: AtomicU64,
}

impl RetryBudget {
    pub(crate) fn new(cfg: &RetryConfig) -> Self {
        RetryBudget { ratio: cfg.budget_ratio, min_per_sec: cfg.budget_min_per_sec, start: Instant::now(), buckets: Default::default() }
    }

    fn bucket(&self, epoch: u64) -> &Bucket {
        let b = &self.buckets[(epoch % 2) as usize];
        let seen = b.epoch.load(Ordering::Acquire);
        if seen != epoch && b.epoch.compare_exchange(seen, epoch, Ordering::AcqRel, Ordering::Acquire).is_ok() {
            b.requests.store(0, Ordering::Relaxed);
            b.retries.store(0, Ordering::Relaxed);
        }
        b
    }

    fn epoch(&self) -> u64 {
        self.start.elapsed().as_secs() / BUCKET_SECS
    }

    /// Counts one client request (what the budget is a fraction of).
    pub(crate) fn request(&self) {
        self.bucket(self.epoch()).requests.fetch_add(1, Ordering::Relaxed);
    }

    /// Takes one retry from the budget; false when it is spent.
    pub(crate) fn try_retry(&self) -> bool {
        let now = self.epoch();
        let current = self.bucket(now);
        let previous = &self.buckets[((now + 1) % 2) as usize];
        let live = |b: &Bucket, f: fn(&Bucket) -> &AtomicU64| {
            if b.epoch.load(Ordering::Acquire) + 1 >= now {
                f(b).load(Ordering::Relaxed)
            } else {
                0
            }
        };
        let requests = live(current, |b| &b.requests) + live(previous, |b| &b.requests);
        let retries = live(current, |b| &b.retries) + live(previous, |b| &b.retries);
        let allowed = (self.ratio * requests as f64).max(self.min_per_sec * (2 * BUCKET_SECS) as f64);
        if (retries as f64) < allowed {
            current.retries.fetch_add(1, Ordering::Relaxed);
            true
        } else {
            false
        }
    }
}

/// The wait before retry number `attempt` (1 = the first retry).
pub(crate) fn backoff(cfg: &RetryConfig, attempt: u32) -> Duration {
    if attempt == 0 || cfg.initial_backoff.is_zero() {
        return Duration::ZERO;
    }
    let base = cfg.initial_backoff.as_secs_f64() * cfg.multiplier.powi(attempt as i32 - 1);
    let capped = base.min(cfg.max_backoff.as_secs_f64());
    let jitter = if cfg.jitter > 0.0 { rand::rng().random_range(-cfg.jitter..=cfg.jitter) } else { 0.0 };
    Duration::from_secs_f64((capped * (1.0 + jitter)).max(0.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(ratio: f64, min: f64) -> RetryConfig {
        RetryConfig {
            max_retries: 2,
            rerun_pair: true,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(300),
            multiplier: 2.0,
            jitter: 0.2,
            budget_ratio: ratio,
            budget_min_per_sec: min,
        }
    }

    #[test]
    fn the_budget_is_a_fraction_of_requests_with_a_floor() {
        let b = RetryBudget::new(&cfg(0.1, 0.0));
        for _ in 0..100 {
            b.request();
        }
        let granted = (0..50).filter(|_| b.try_retry()).count();
        assert_eq!(granted, 10);
        let floor = RetryBudget::new(&cfg(0.0, 1.0));
        assert_eq!((0..50).filter(|_| floor.try_retry()).count(), 10, "1/s over the 10 s window");
    }

    #[test]
    fn backoff_grows_is_capped_and_jittered() {
        let c = cfg(0.2, 10.0);
        assert_eq!(backoff(&c, 0), Duration::ZERO);
        for _ in 0..50 {
            let first = backoff(&c, 1).as_secs_f64();
            assert!((0.08..=0.12).contains(&first), "{first}");
            let third = backoff(&c, 3).as_secs_f64();
            assert!((0.24..=0.36).contains(&third), "capped at 300 ms: {third}");
        }
    }
}
