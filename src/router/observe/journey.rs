//! One request's journey, recorded as it goes: its model and tenant, when it left the
//! router's queue, each leg (role, worker, DP rank, span id, start, end, failure), the
//! cached tokens predicted and reported, and its usage. Told of the request's end by its
//! metrics record (`EndWatcher`), it hands a snapshot to the observer. Marks are a few
//! words under a short mutex, never held across an await.

use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use axum::http::HeaderValue;

use super::traceparent::{self, TraceContext};
use super::Observer;
use crate::api::usage::Usage;
use crate::router::metrics::{Cause, EndWatcher, Label, LegErrorKind, RequestEnd};

/// At most this many legs are recorded per request (retries and split requests included).
const MAX_LEGS: usize = 64;

/// What a leg did for the request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum LegRole {
    Prefill,
    /// The answering leg after a prefill leg.
    Decode,
    /// The answering leg of a worker that prefilled itself (colocated, or a decode alone).
    Generate,
}

impl LegRole {
    pub(crate) fn name(self) -> &'static str {
        match self {
            LegRole::Prefill => "prefill",
            LegRole::Decode => "decode",
            LegRole::Generate => "generate",
        }
    }
}

/// How a leg ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum LegEnd {
    Ok,
    Failed(LegErrorKind),
    /// Dropped before it answered (the request ended without it).
    Cancelled,
}

impl LegEnd {
    pub(crate) fn name(self) -> &'static str {
        match self {
            LegEnd::Ok => "ok",
            LegEnd::Failed(k) => k.label(),
            LegEnd::Cancelled => "cancelled",
        }
    }
}

/// One leg as recorded.
#[derive(Clone, Debug)]
pub(crate) struct LegMark {
    pub(crate) role: LegRole,
    pub(crate) url: String,
    pub(crate) rank: Option<usize>,
    pub(crate) span_id: u64,
    pub(crate) start: Instant,
    pub(crate) end: Option<(Instant, LegEnd)>,
}

#[derive(Default)]
struct Marks {
    model: Option<String>,
    tenant: Option<Arc<str>>,
    admitted: Option<Instant>,
    legs: Vec<LegMark>,
    predicted_cached: Option<usize>,
    predicted_ttft_ms: Option<f64>,
    usage: Usage,
}

/// One request, from its arrival to its end.
pub(crate) struct Journey {
    observer: Arc<Observer>,
    pub(crate) trace: Option<TraceContext>,
    endpoint: &'static str,
    request_id: String,
    start: Instant,
    start_time: SystemTime,
    marks: Mutex<Marks>,
}

/// The request's end, as its record saw it.
pub(crate) struct Ended {
    pub(crate) status: u16,
    pub(crate) cause: Option<Cause>,
    pub(crate) at: Instant,
}

/// A finished journey, read once for the log line and the trace.
pub(crate) struct Snapshot {
    pub(crate) trace: Option<TraceContext>,
    pub(crate) endpoint: &'static str,
    pub(crate) request_id: String,
    pub(crate) start: Instant,
    pub(crate) start_time: SystemTime,
    pub(crate) end: Instant,
    pub(crate) status: u16,
    pub(crate) cause: Option<Cause>,
    pub(crate) model: Option<String>,
    pub(crate) tenant: Option<Arc<str>>,
    pub(crate) admitted: Option<Instant>,
    pub(crate) legs: Vec<LegMark>,
    pub(crate) predicted_cached: Option<usize>,
    /// slo_aware: the TTFT predicted for the layout chosen (streamed answers).
    pub(crate) predicted_ttft_ms: Option<f64>,
    pub(crate) usage: Usage,
}

impl Snapshot {
    /// The wall-clock time of an instant of this request.
    pub(crate) fn wall(&self, at: Instant) -> SystemTime {
        self.start_time + at.saturating_duration_since(self.start)
    }
    /// The leg that answered (the last successful decode or generate leg).
    pub(crate) fn answering(&self) -> Option<&LegMark> {
        self.legs.iter().rev().find(|l| l.role != LegRole::Prefill && matches!(l.end, Some((_, LegEnd::Ok))))
    }
    /// The prefill leg whose KV the answer used (the last successful one).
    pub(crate) fn prefill(&self) -> Option<&LegMark> {
        self.legs.iter().rev().find(|l| l.role == LegRole::Prefill && matches!(l.end, Some((_, LegEnd::Ok))))
    }
    /// Legs that failed (each was retried, or the request failed with it).
    pub(crate) fn failed(&self) -> impl Iterator<Item = &LegMark> {
        self.legs.iter().filter(|l| matches!(l.end, Some((_, LegEnd::Failed(_)))))
    }
    /// Failed legs after which another leg was sent: the retries.
    pub(crate) fn retries(&self) -> usize {
        let last = self.legs.len().saturating_sub(1);
        self.legs.iter().take(last).filter(|l| matches!(l.end, Some((_, LegEnd::Failed(_))))).count()
    }
}

impl Journey {
    pub(super) fn new(observer: Arc<Observer>, trace: Option<TraceContext>, endpoint: &'static str, request_id: &HeaderValue) -> Self {
        Journey {
            observer,
            trace,
            endpoint,
            request_id: String::from_utf8_lossy(request_id.as_bytes()).into_owned(),
            start: Instant::now(),
            start_time: SystemTime::now(),
            marks: Mutex::default(),
        }
    }

    fn marks(&self) -> std::sync::MutexGuard<'_, Marks> {
        self.marks.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The model the request named (at most 256 bytes kept).
    pub(crate) fn model(&self, model: Option<&str>) {
        self.marks().model = model.map(|m| m.chars().take(256).collect());
    }
    pub(crate) fn tenant(&self, tenant: Arc<str>) {
        self.marks().tenant = Some(tenant);
    }
    /// It left the router's queue.
    pub(crate) fn admitted(&self) {
        self.marks().admitted = Some(Instant::now());
    }
    pub(crate) fn predicted_cached(&self, tokens: usize) {
        self.marks().predicted_cached = Some(tokens);
    }
    pub(crate) fn predicted_ttft(&self, ms: f64) {
        self.marks().predicted_ttft_ms = Some(ms);
    }
    pub(crate) fn usage(&self, usage: Usage) {
        self.marks().usage = usage;
    }

    /// A leg starts now: its mark (ended when the guard is told or dropped), and the
    /// `traceparent` to send with it when the request is traced. An answering leg is a
    /// decode when a prefill leg ran before it.
    pub(crate) fn begin(self: &Arc<Self>, prefill: bool, url: &str, rank: Option<usize>) -> LegGuard {
        let span_id = traceparent::new_span_id();
        let mut marks = self.marks();
        let role = match prefill {
            true => LegRole::Prefill,
            false if marks.legs.iter().any(|l| l.role == LegRole::Prefill) => LegRole::Decode,
            false => LegRole::Generate,
        };
        let index = (marks.legs.len() < MAX_LEGS).then(|| {
            marks.legs.push(LegMark { role, url: url.to_owned(), rank, span_id, start: Instant::now(), end: None });
            marks.legs.len() - 1
        });
        drop(marks);
        let traceparent = self.trace.map(|t| traceparent::header(t.trace_id, span_id, t.sampled));
        LegGuard { journey: self.clone(), index, traceparent, ended: false }
    }

    fn end_leg(&self, index: usize, how: LegEnd) {
        if let Some(leg) = self.marks().legs.get_mut(index) {
            leg.end.get_or_insert((Instant::now(), how));
        }
    }

    fn snapshot(&self, end: Ended) -> Snapshot {
        let m = std::mem::take(&mut *self.marks());
        Snapshot {
            trace: self.trace,
            endpoint: self.endpoint,
            request_id: self.request_id.clone(),
            start: self.start,
            start_time: self.start_time,
            end: end.at,
            status: end.status,
            cause: end.cause,
            model: m.model,
            tenant: m.tenant,
            admitted: m.admitted,
            legs: m.legs,
            predicted_cached: m.predicted_cached,
            predicted_ttft_ms: m.predicted_ttft_ms,
            usage: m.usage,
        }
    }
}

impl EndWatcher for Journey {
    fn ended(&self, end: RequestEnd) {
        let snapshot = self.snapshot(Ended { status: end.status, cause: end.cause, at: Instant::now() });
        self.observer.finished(snapshot);
    }
}

/// A leg in flight: ended as it ended, or as cancelled when dropped unended.
pub(crate) struct LegGuard {
    journey: Arc<Journey>,
    index: Option<usize>,
    pub(crate) traceparent: Option<HeaderValue>,
    ended: bool,
}

impl LegGuard {
    pub(crate) fn end(mut self, failed: Option<LegErrorKind>) {
        self.ended = true;
        if let Some(i) = self.index {
            self.journey.end_leg(i, failed.map_or(LegEnd::Ok, LegEnd::Failed));
        }
    }
}

impl Drop for LegGuard {
    fn drop(&mut self) {
        if let (false, Some(i)) = (self.ended, self.index) {
            self.journey.end_leg(i, LegEnd::Cancelled);
        }
    }
}
