//! The access log (--access-log): one JSON line per request, written by one task in the
//! background. A request hands its line over without waiting; when the writer falls
//! behind by more than `BACKLOG` lines, lines are dropped and counted
//! (`disagg_router_observe_dropped_total{what="access_log_line"}`), never queued without
//! bound.

use std::sync::Arc;
use std::time::Instant;

use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use super::journey::{LegMark, Snapshot};
use super::AccessLogTarget;
use crate::router::metrics::Label;

const BACKLOG: usize = 16_384;

pub(crate) struct AccessLog {
    tx: mpsc::Sender<Arc<Snapshot>>,
}

impl AccessLog {
    pub(crate) fn start(target: &AccessLogTarget) -> anyhow::Result<Self> {
        let (tx, mut rx) = mpsc::channel::<Arc<Snapshot>>(BACKLOG);
        let mut out: std::pin::Pin<Box<dyn tokio::io::AsyncWrite + Send>> = match target {
            AccessLogTarget::Stdout => Box::pin(tokio::io::stdout()),
            AccessLogTarget::File(p) => {
                let f = std::fs::OpenOptions::new().create(true).append(true).open(p)?;
                Box::pin(tokio::fs::File::from_std(f))
            }
        };
        tokio::spawn(async move {
            let mut buf = Vec::with_capacity(64 * 1024);
            while let Some(journey) = rx.recv().await {
                write_line(&mut buf, &journey);
                // Whatever else is waiting goes in the same write.
                while buf.len() < 1 << 20 {
                    match rx.try_recv() {
                        Ok(journey) => write_line(&mut buf, &journey),
                        Err(_) => break,
                    }
                }
                if let Err(e) = async {
                    out.write_all(&buf).await?;
                    out.flush().await
                }
                .await
                {
                    tracing::warn!("access log: cannot write: {e}");
                }
                buf.clear();
            }
        });
        Ok(AccessLog { tx })
    }

    /// Hands a journey to the writer; false when it was dropped (the writer is behind).
    pub(crate) fn write(&self, journey: Arc<Snapshot>) -> bool {
        self.tx.try_send(journey).is_ok()
    }
}

fn write_line(buf: &mut Vec<u8>, journey: &Snapshot) {
    // Writing JSON into memory cannot fail.
    let _ = serde_json::to_writer(&mut *buf, &line(journey));
    buf.push(b'\n');
}

fn ms(from: Instant, to: Instant) -> Value {
    json!((to.saturating_duration_since(from).as_secs_f64() * 1e6).round() / 1e3)
}

fn worker(leg: Option<&LegMark>) -> Value {
    leg.map_or(Value::Null, |l| json!({"url": l.url, "rank": l.rank}))
}

/// The request's line.
pub(crate) fn line(s: &Snapshot) -> Value {
    let prefill = s.prefill();
    let answering = s.answering();
    let time = chrono::DateTime::<chrono::Utc>::from(s.start_time).to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let queue_end = s.admitted.unwrap_or(s.end);
    let first_token = answering.and_then(|l| l.end).map(|(at, _)| at);
    let failed: Vec<Value> =
        s.failed().map(|l| json!({"leg": l.role.name(), "url": l.url, "rank": l.rank, "cause": l.end.map(|e| e.1.name())})).collect();
    json!({
        "time": time,
        "request_id": s.request_id,
        "endpoint": s.endpoint,
        "model": s.model,
        "tenant": s.tenant.as_deref(),
        "status": s.status,
        "cause": s.cause.map(|c| c.label()),
        "prefill": worker(prefill),
        "decode": worker(answering),
        "cached_tokens_predicted": s.predicted_cached,
        "cached_tokens_reported": s.usage.cached,
        "prompt_tokens": s.usage.prompt,
        "output_tokens": s.usage.output,
        "queue_ms": ms(s.start, queue_end),
        "prefill_ms": prefill.and_then(|l| l.end.map(|(at, _)| ms(l.start, at))),
        "kv_wait_ms": answering.filter(|_| prefill.is_some()).and_then(|l| l.end.map(|(at, _)| ms(l.start, at))),
        "first_token_ms": first_token.map(|at| ms(s.start, at)),
        "predicted_ttft_ms": s.predicted_ttft_ms.map(|p| (p * 1000.0).round() / 1000.0),
        "total_ms": ms(s.start, s.end),
        "retries": s.retries(),
        "failed_legs": failed,
        "trace_id": s.trace.filter(|t| t.sampled).map(|t| format!("{:032x}", t.trace_id)),
    })
}
