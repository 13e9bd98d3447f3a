//! A tenant's rate limits, per minute as OpenAI states them: a bucket that holds a minute's
//! allowance and refills continuously (a tenant at rest may send a minute's worth at once,
//! then at the limit's pace). What a request is charged, what is left and when the bucket
//! is full again are the `x-ratelimit-*` headers OpenAI sends.

use std::time::{Duration, Instant};

use axum::http::{HeaderMap, HeaderValue};

use crate::api::Quota;

/// One per-minute allowance.
#[derive(Debug)]
pub(crate) struct Bucket {
    per_minute: u64,
    level: f64,
    at: Instant,
}

/// A request the bucket cannot take now: when it could.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Short {
    /// After this long.
    For(Duration),
    /// Never: it costs more than a minute's allowance.
    Never,
}

impl Bucket {
    pub(crate) fn new(per_minute: u64, now: Instant) -> Self {
        Bucket { per_minute, level: per_minute as f64, at: now }
    }

    /// A new limit keeps what was used (a reloaded file does not hand out a fresh minute).
    pub(crate) fn set_limit(&mut self, per_minute: u64, now: Instant) {
        self.refill(now);
        let used = self.per_minute as f64 - self.level;
        self.per_minute = per_minute;
        self.level = (per_minute as f64 - used).max(0.0);
    }

    fn rate(&self) -> f64 {
        self.per_minute as f64 / 60.0
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.level = (self.level + elapsed * self.rate()).min(self.per_minute as f64);
        self.at = now;
    }

    /// Whether `cost` fits now (not taken).
    pub(crate) fn check(&mut self, cost: u64, now: Instant) -> Result<(), Short> {
        self.refill(now);
        if cost as f64 <= self.level {
            return Ok(());
        }
        if cost > self.per_minute {
            return Err(Short::Never);
        }
        Err(Short::For(Duration::from_secs_f64((cost as f64 - self.level) / self.rate())))
    }

    pub(crate) fn take(&mut self, cost: u64) {
        self.level = (self.level - cost as f64).max(0.0);
    }

    pub(crate) fn view(&self) -> BucketView {
        let reset = Duration::from_secs_f64(((self.per_minute as f64 - self.level) / self.rate()).max(0.0));
        BucketView { limit: self.per_minute, remaining: self.level.floor() as u64, reset }
    }
}

/// A bucket as the headers show it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct BucketView {
    pub(crate) limit: u64,
    pub(crate) remaining: u64,
    /// Until the bucket is full again.
    pub(crate) reset: Duration,
}

/// A tenant's allowances after a request, for its answer's headers.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct RateHeaders {
    pub(crate) requests: Option<BucketView>,
    pub(crate) tokens: Option<BucketView>,
}

impl RateHeaders {
    /// `x-ratelimit-{limit,remaining,reset}-{requests,tokens}`, for the limits the tenant has.
    pub(crate) fn write(&self, h: &mut HeaderMap) {
        for (quota, view) in [(Quota::Requests, self.requests), (Quota::Tokens, self.tokens)] {
            let Some(v) = view else { continue };
            let q = quota.as_str();
            let name = |what: &str| axum::http::HeaderName::from_bytes(format!("x-ratelimit-{what}-{q}").as_bytes()).expect("a valid name");
            h.insert(name("limit"), HeaderValue::from(v.limit));
            h.insert(name("remaining"), HeaderValue::from(v.remaining));
            h.insert(name("reset"), HeaderValue::from_str(&openai_duration(v.reset)).expect("ascii"));
        }
    }
}

/// A duration as OpenAI's headers write it: `1s`, `6m0s`, `59ms`, `1h2m3s`.
pub(crate) fn openai_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let secs = d.as_secs_f64();
    let (h, rest) = ((secs / 3600.0).floor() as u64, secs % 3600.0);
    let (m, s) = ((rest / 60.0).floor() as u64, rest % 60.0);
    let s = if s.fract() == 0.0 { format!("{s:.0}s") } else { format!("{}s", format!("{s:.3}").trim_end_matches('0')) };
    match (h, m) {
        (0, 0) => s,
        (0, m) => format!("{m}m{s}"),
        (h, m) => format!("{h}h{m}m{s}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_holds_a_minute_and_refills_at_its_pace() {
        let t0 = Instant::now();
        let mut b = Bucket::new(60, t0);
        for _ in 0..60 {
            b.check(1, t0).unwrap();
            b.take(1);
        }
        assert_eq!(b.view().remaining, 0);
        match b.check(1, t0) {
            Err(Short::For(wait)) => assert!((wait.as_secs_f64() - 1.0).abs() < 1e-6, "{wait:?}"),
            other => panic!("{other:?}"),
        }
        b.check(1, t0 + Duration::from_secs(1)).unwrap();
        assert_eq!(b.check(61, t0), Err(Short::Never));
        assert_eq!(b.view().reset, Duration::from_secs(59), "59 of 60 used: full again in 59 s");
    }

    #[test]
    fn a_new_limit_keeps_what_was_used() {
        let t0 = Instant::now();
        let mut b = Bucket::new(100, t0);
        b.take(40);
        b.set_limit(50, t0);
        assert_eq!(b.view().remaining, 10);
    }

    #[test]
    fn durations_are_written_as_openai_writes_them() {
        assert_eq!(openai_duration(Duration::from_millis(59)), "59ms");
        assert_eq!(openai_duration(Duration::from_secs(1)), "1s");
        assert_eq!(openai_duration(Duration::from_secs(360)), "6m0s");
        assert_eq!(openai_duration(Duration::from_millis(1500)), "1.5s");
        assert_eq!(openai_duration(Duration::from_secs(3723)), "1h2m3s");
    }
}
