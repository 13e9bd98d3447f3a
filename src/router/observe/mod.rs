//! Seeing one request whole: its journey (queue, each leg on its worker and rank, the
//! stream) recorded as it goes, then written as one access-log line and, when traced, sent
//! as one OpenTelemetry trace whose leg spans are the `traceparent` each engine continues.
//! Off (no --access-log, no --otlp-traces-endpoint), no journey is made: nothing is
//! recorded, allocated or sent (docs/OBSERVE.md).

pub(crate) mod access_log;
pub(crate) mod journey;
pub(crate) mod otlp;
mod settings;
pub(crate) mod traceparent;

use std::sync::Arc;

use axum::http::{HeaderMap, HeaderValue};

use crate::router::metrics::{Dropped, RouterMetrics};
pub(crate) use journey::Journey;
pub(crate) use settings::{AccessLogTarget, ObserveConfig, OtlpProtocol, TracesConfig};
use traceparent::TraceContext;

/// Where finished journeys go.
pub(crate) struct Observer {
    access_log: Option<access_log::AccessLog>,
    traces: Option<otlp::Traces>,
    metrics: Arc<RouterMetrics>,
}

impl Observer {
    /// Starts the access log's writer and the trace exporter (on the calling runtime, which
    /// lives as long as the router).
    pub(crate) fn start(cfg: &ObserveConfig, metrics: Arc<RouterMetrics>) -> anyhow::Result<Arc<Self>> {
        let access_log = cfg.access_log.as_ref().map(access_log::AccessLog::start).transpose()?;
        let traces = cfg.traces.as_ref().map(otlp::Traces::start).transpose()?;
        Ok(Arc::new(Observer { access_log, traces, metrics }))
    }

    pub(crate) fn on(&self) -> bool {
        self.access_log.is_some() || self.traces.is_some()
    }

    /// A journey for a request arriving with these headers (None when observing is off).
    pub(crate) fn journey(self: &Arc<Self>, headers: &HeaderMap, endpoint: &'static str, request_id: &HeaderValue) -> Option<Arc<Journey>> {
        if !self.on() {
            return None;
        }
        let trace = self.traces.as_ref().map(|t| TraceContext::continue_or_start(headers, t.sample_ratio()));
        Some(Arc::new(Journey::new(self.clone(), trace, endpoint, request_id)))
    }

    /// A finished journey goes to the access log's writer and the exporter, which format
    /// it there: nothing is formatted on the request's path.
    fn finished(&self, journey: journey::Snapshot) {
        let journey = Arc::new(journey);
        if let Some(log) = &self.access_log {
            if !log.write(journey.clone()) {
                self.metrics.observe_dropped(Dropped::AccessLogLine);
            }
        }
        if let (Some(traces), true) = (&self.traces, journey.trace.is_some_and(|t| t.sampled)) {
            if !traces.send(journey) {
                self.metrics.observe_dropped(Dropped::Trace);
            }
        }
    }
}
