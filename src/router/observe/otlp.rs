//! Traces over OTLP: a finished journey becomes spans (the request, its queue, each leg,
//! the stream), batched by one task on the router's runtime and sent by
//! opentelemetry-otlp's exporter (gRPC with tonic, or HTTP/protobuf with reqwest). A full
//! backlog drops traces (counted), never holds a request.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use opentelemetry::trace::{SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanExporter, SpanLinks};
use opentelemetry_sdk::Resource;
use tokio::sync::mpsc;

use super::journey::{LegEnd, Snapshot};
use super::traceparent::TraceContext;
use super::{OtlpProtocol, TracesConfig};
use crate::router::metrics::Label;

/// Traces waiting to be sent, at most.
const BACKLOG: usize = 4096;
/// Spans sent in one export, at most; a batch goes at least this often.
const BATCH_SPANS: usize = 512;
const BATCH_EVERY: Duration = Duration::from_millis(500);
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) struct Traces {
    tx: mpsc::Sender<Arc<Snapshot>>,
    ratio: f64,
}

impl Traces {
    /// Builds the exporter and starts the task that batches and sends.
    pub(crate) fn start(cfg: &TracesConfig) -> anyhow::Result<Self> {
        let mut exporter = match cfg.protocol {
            OtlpProtocol::Grpc => opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(cfg.endpoint.clone())
                .with_timeout(EXPORT_TIMEOUT)
                .build()?,
            OtlpProtocol::HttpProtobuf => opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_protocol(Protocol::HttpBinary)
                .with_endpoint(cfg.endpoint.clone())
                .with_timeout(EXPORT_TIMEOUT)
                .build()?,
        };
        exporter.set_resource(&Resource::builder().with_service_name("disagg-router").build());
        let (tx, mut rx) = mpsc::channel::<Arc<Snapshot>>(BACKLOG);
        let endpoint = cfg.endpoint.clone();
        tokio::spawn(async move {
            let mut failing = false;
            while let Some(first) = rx.recv().await {
                let mut batch = spans_of(&first);
                let deadline = tokio::time::Instant::now() + BATCH_EVERY;
                while batch.len() < BATCH_SPANS {
                    match tokio::time::timeout_at(deadline, rx.recv()).await {
                        Ok(Some(more)) => batch.extend(spans_of(&more)),
                        Ok(None) | Err(_) => break,
                    }
                }
                let sent = tokio::time::timeout(EXPORT_TIMEOUT, exporter.export(batch)).await;
                match sent {
                    Ok(Ok(())) => failing = false,
                    Ok(Err(e)) if !failing => {
                        failing = true;
                        tracing::warn!(endpoint, "OTLP traces: export failed: {e}");
                    }
                    Err(_) if !failing => {
                        failing = true;
                        tracing::warn!(endpoint, "OTLP traces: export timed out");
                    }
                    _ => {}
                }
            }
        });
        Ok(Traces { tx, ratio: cfg.sample_ratio })
    }

    pub(crate) fn sample_ratio(&self) -> f64 {
        self.ratio
    }

    /// Hands a sampled journey to the exporter; false when dropped (the backlog is full).
    pub(crate) fn send(&self, journey: Arc<Snapshot>) -> bool {
        self.tx.try_send(journey).is_ok()
    }
}

/// A sampled journey's spans (none for one that is not).
fn spans_of(s: &Snapshot) -> Vec<SpanData> {
    s.trace.filter(|t| t.sampled).map_or_else(Vec::new, |t| spans(s, &t))
}

/// The router's instrumentation scope, built once.
fn scope() -> InstrumentationScope {
    static SCOPE: std::sync::LazyLock<InstrumentationScope> =
        std::sync::LazyLock::new(|| InstrumentationScope::builder("disagg.router").with_version(env!("CARGO_PKG_VERSION")).build());
    SCOPE.clone()
}

/// One span of the trace.
struct SpanSpec {
    id: u64,
    parent: Option<u64>,
    parent_remote: bool,
    kind: SpanKind,
    name: Cow<'static, str>,
    start: Instant,
    end: Instant,
    attributes: Vec<KeyValue>,
    status: Status,
}

fn span(s: &Snapshot, trace: &TraceContext, spec: SpanSpec) -> SpanData {
    let context = SpanContext::new(
        TraceId::from_bytes(trace.trace_id.to_be_bytes()),
        SpanId::from_bytes(spec.id.to_be_bytes()),
        TraceFlags::SAMPLED,
        false,
        TraceState::default(),
    );
    SpanData {
        span_context: context,
        parent_span_id: spec.parent.map_or(SpanId::INVALID, |p| SpanId::from_bytes(p.to_be_bytes())),
        parent_span_is_remote: spec.parent_remote,
        span_kind: spec.kind,
        name: spec.name,
        start_time: s.wall(spec.start),
        end_time: s.wall(spec.end.max(spec.start)),
        attributes: spec.attributes,
        dropped_attributes_count: 0,
        events: SpanEvents::default(),
        links: SpanLinks::default(),
        status: spec.status,
        instrumentation_scope: scope(),
    }
}

fn int(key: &'static str, v: Option<impl TryInto<i64>>) -> Option<KeyValue> {
    v.and_then(|v| v.try_into().ok()).map(|v| KeyValue::new(key, v))
}

/// The trace of a finished request: the request's span (a child of the client's, when it
/// sent one), then its queue, each leg (the parent of the engine's own spans), the stream.
pub(crate) fn spans(s: &Snapshot, trace: &TraceContext) -> Vec<SpanData> {
    let root = trace.span_id;
    let mut attributes = vec![
        KeyValue::new("http.request.method", "POST"),
        KeyValue::new("url.path", s.endpoint),
        KeyValue::new("http.response.status_code", i64::from(s.status)),
        KeyValue::new("disagg.request_id", s.request_id.clone()),
    ];
    attributes.extend(s.model.clone().map(|m| KeyValue::new("gen_ai.request.model", m)));
    attributes.extend(s.tenant.as_deref().map(|t| KeyValue::new("disagg.tenant", t.to_owned())));
    for (prefix, leg) in [("disagg.prefill", s.prefill()), ("disagg.decode", s.answering())] {
        if let Some(l) = leg {
            attributes.push(KeyValue::new(format!("{prefix}.url"), l.url.clone()));
            attributes.extend(int(if prefix == "disagg.prefill" { "disagg.prefill.rank" } else { "disagg.decode.rank" }, l.rank));
        }
    }
    attributes.extend(int("disagg.cached_tokens.predicted", s.predicted_cached));
    attributes.extend(int("disagg.cached_tokens.reported", s.usage.cached));
    attributes.extend(s.predicted_ttft_ms.map(|p| KeyValue::new("disagg.ttft_ms.predicted", p)));
    attributes.extend(int("gen_ai.usage.prompt_tokens", s.usage.prompt));
    attributes.extend(int("gen_ai.usage.completion_tokens", s.usage.output));
    let failed: Vec<String> = s.failed().map(|l| format!("{} {}: {}", l.role.name(), l.url, l.end.map_or("", |e| e.1.name()))).collect();
    attributes.push(KeyValue::new("disagg.retries", s.retries() as i64));
    if !failed.is_empty() {
        attributes.push(KeyValue::new("disagg.failed_legs", failed.join("; ")));
    }
    let status = match s.cause {
        Some(c) => {
            attributes.push(KeyValue::new("error.type", c.label()));
            Status::error(c.label())
        }
        None => Status::Unset,
    };
    let mut out = vec![span(
        s,
        trace,
        SpanSpec {
            id: root,
            parent: trace.parent,
            parent_remote: trace.parent.is_some(),
            kind: SpanKind::Server,
            name: Cow::Owned(format!("POST {}", s.endpoint)),
            start: s.start,
            end: s.end,
            attributes,
            status,
        },
    )];
    let child = |name: &'static str, start: Instant, end: Instant, attributes: Vec<KeyValue>, status: Status, id: u64, kind| SpanSpec {
        id,
        parent: Some(root),
        parent_remote: false,
        kind,
        name: Cow::Borrowed(name),
        start,
        end,
        attributes,
        status,
    };
    if let Some(admitted) = s.admitted {
        out.push(span(
            s,
            trace,
            child("queue", s.start, admitted, Vec::new(), Status::Unset, super::traceparent::new_span_id(), SpanKind::Internal),
        ));
    }
    for leg in &s.legs {
        let (end, how) = leg.end.unwrap_or((s.end, LegEnd::Cancelled));
        let mut attributes = vec![KeyValue::new("server.address", leg.url.clone()), KeyValue::new("disagg.leg.outcome", how.name())];
        attributes.extend(int("disagg.dp_rank", leg.rank));
        let status = if how == LegEnd::Ok { Status::Unset } else { Status::error(how.name()) };
        out.push(span(s, trace, child(leg.role.name(), leg.start, end, attributes, status, leg.span_id, SpanKind::Client)));
    }
    if let Some((first, _)) = s.answering().and_then(|l| l.end) {
        out.push(span(
            s,
            trace,
            child("stream", first, s.end, Vec::new(), Status::Unset, super::traceparent::new_span_id(), SpanKind::Internal),
        ));
    }
    out
}
