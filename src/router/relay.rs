//! Relaying an answer to the client. The response body owns everything the request
//! holds (admission permit, worker leases, metrics record), so all of it is released when
//! the body ends or the client goes away, on every path.
//!
//! A streamed answer is passed through chunk by chunk as it arrives. If it breaks (the
//! worker dies, resets, goes quiet past the idle timeout, or ends without `[DONE]`), the
//! client gets an error event and `[DONE]`: never a silent truncation.

use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use futures_util::stream::{self, BoxStream};
use futures_util::StreamExt;
use tokio::sync::OwnedSemaphorePermit;

use super::metrics::RequestRecord;
use super::workers::Lease;
use crate::api::{sse, ApiError, ErrorKind};

/// What a request holds until its answer is over.
pub struct Held {
    pub permit: OwnedSemaphorePermit,
    /// The worker rank answering (its in-flight count is released with the body).
    pub lease: Lease,
    pub record: RequestRecord,
    /// When the leg that answers was sent, for its decode_total time.
    pub started: std::time::Instant,
}

impl Held {
    /// The answer reached its end (normally, or with an error event the client got).
    fn finish(&mut self) {
        self.record.metrics().leg_time("decode_total", self.started);
        self.record.finish();
    }
}

/// A whole (JSON) answer; the guards go when hyper has taken the bytes.
pub fn whole(bytes: Bytes, held: Held) -> Body {
    let s = stream::unfold(Some((bytes, held)), |state| async move {
        let (bytes, mut held) = state?;
        held.finish();
        Some((Ok::<_, std::convert::Infallible>(bytes), None))
    });
    Body::from_stream(s)
}

enum Phase {
    Head(Bytes),
    Relay,
    Error(Bytes),
    Done,
}

struct Relay {
    phase: Phase,
    rest: BoxStream<'static, reqwest::Result<Bytes>>,
    idle: Duration,
    worker: String,
    /// The last bytes relayed, to see whether the stream ended with `[DONE]`.
    tail: Vec<u8>,
    held: Held,
}

impl Relay {
    fn remember(&mut self, chunk: &[u8]) {
        self.tail.extend_from_slice(chunk);
        let keep = 32;
        if self.tail.len() > keep {
            self.tail.drain(..self.tail.len() - keep);
        }
    }

    fn fail(&mut self, why: String) -> Bytes {
        tracing::warn!(worker = %self.worker, "decode stream failed: {why}");
        self.held.record.fail("decode_midstream");
        self.phase = Phase::Error(Bytes::from_static(sse::DONE));
        let err = ApiError::new(ErrorKind::BadGateway, format!("decode leg failed mid-stream on {}: {why}", self.worker));
        sse::event(&err.body())
    }

    async fn next(&mut self) -> Option<Bytes> {
        match std::mem::replace(&mut self.phase, Phase::Relay) {
            Phase::Head(head) => {
                self.remember(&head);
                return Some(head);
            }
            Phase::Error(done) => {
                self.phase = Phase::Done;
                self.held.finish();
                return Some(done);
            }
            Phase::Done => {
                self.phase = Phase::Done;
                return None;
            }
            Phase::Relay => {}
        }
        match tokio::time::timeout(self.idle, self.rest.next()).await {
            Ok(Some(Ok(chunk))) => {
                self.remember(&chunk);
                Some(chunk)
            }
            Ok(Some(Err(e))) => Some(self.fail(format!("the connection broke: {e}"))),
            Ok(None) => {
                let tail = String::from_utf8_lossy(&self.tail);
                if tail.trim_end().ends_with("data: [DONE]") {
                    self.phase = Phase::Done;
                    self.held.finish();
                    None
                } else {
                    Some(self.fail("the stream ended without [DONE]".into()))
                }
            }
            Err(_) => Some(self.fail(format!("no data for {:.0}s (--stream-idle-timeout-secs)", self.idle.as_secs_f64()))),
        }
    }
}

/// An SSE answer: `head` (already read) then the rest, relayed as it comes.
pub fn events(head: Bytes, rest: BoxStream<'static, reqwest::Result<Bytes>>, idle: Duration, worker: String, held: Held) -> Body {
    let relay = Relay { phase: Phase::Head(head), rest, idle, worker, tail: Vec::new(), held };
    Body::from_stream(stream::unfold(relay, |mut r| async move {
        let chunk = r.next().await?;
        Some((Ok::<_, std::convert::Infallible>(chunk), r))
    }))
}
