//! Reading request bodies: a size cap and one JSON parse, with errors in the API shape.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{header, HeaderMap};
use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use serde_json::{Map, Value};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::{ApiError, ErrorKind};

fn too_large(limit: usize) -> ApiError {
    ApiError::new(ErrorKind::PayloadTooLarge, format!("request body is larger than the {limit}-byte limit"))
}

/// Reads a whole body, refusing more than `limit` bytes with 413. The rest of an
/// oversized body is read and dropped (for a bounded time) before answering, so the
/// client sees the 413 instead of a connection reset mid-upload.
pub(crate) async fn read_limited(headers: &HeaderMap, body: Body, limit: usize) -> Result<Bytes, ApiError> {
    read_within(headers, body, limit, None).await.map(|b| b.bytes)
}

/// Request-body bytes held at once, over every connection: a body takes its share as its
/// bytes arrive and gives it back when dropped.
#[derive(Clone)]
pub(crate) struct BodyBudget {
    bytes: Arc<Semaphore>,
    total: usize,
}

impl BodyBudget {
    pub(crate) fn new(total: usize) -> Self {
        let total = total.clamp(1, Semaphore::MAX_PERMITS);
        BodyBudget { bytes: Arc::new(Semaphore::new(total)), total }
    }

    /// Bytes held by bodies now.
    pub(crate) fn in_use(&self) -> usize {
        self.total - self.bytes.available_permits()
    }
}

/// A body read within a budget: its bytes, and their share of the budget (given back
/// when this is dropped).
pub(crate) struct Budgeted {
    pub(crate) bytes: Bytes,
    pub(crate) share: Option<OwnedSemaphorePermit>,
}

/// `read_limited`, each arriving piece taken from `budget` first: a body that would pass
/// it is refused with 503. The buffer grows as bytes arrive (a declared Content-Length
/// reserves nothing).
pub(crate) async fn read_within(headers: &HeaderMap, body: Body, limit: usize, budget: Option<&BodyBudget>) -> Result<Budgeted, ApiError> {
    let declared = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    let mut body = body;
    if declared.is_some_and(|n| n > limit as u64) {
        drain(body).await;
        return Err(too_large(limit));
    }
    // The frames as they come (nothing reserved ahead of them), joined once at the end;
    // past FRAMES_KEPT small ones (a client dripping bytes), into one growing buffer.
    const FRAMES_KEPT: usize = 64;
    let mut frames: Vec<Bytes> = Vec::new();
    let mut joined = BytesMut::new();
    let mut len = 0usize;
    let mut share: Option<OwnedSemaphorePermit> = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| ApiError::bad_request(format!("could not read the request body: {e}")))?;
        let Ok(data) = frame.into_data() else { continue };
        if len + data.len() > limit {
            drain(body).await;
            return Err(too_large(limit));
        }
        if let Some(budget) = budget {
            let n = u32::try_from(data.len()).unwrap_or(u32::MAX);
            let Ok(more) = budget.bytes.clone().try_acquire_many_owned(n) else {
                return Err(ApiError::new(
                    ErrorKind::ServiceUnavailable,
                    "the router is holding as many request bodies as it may (--max-body-bytes-in-flight): retry shortly",
                ));
            };
            match &mut share {
                Some(s) => s.merge(more),
                None => share = Some(more),
            }
        }
        len += data.len();
        if frames.len() < FRAMES_KEPT {
            frames.push(data);
        } else {
            joined.extend_from_slice(&data);
        }
    }
    let bytes = match (frames.len(), joined.is_empty()) {
        (0, _) => Bytes::new(),
        (1, true) => frames.pop().expect("one frame"),
        _ => {
            let mut buf = BytesMut::with_capacity(len);
            for f in &frames {
                buf.extend_from_slice(f);
            }
            buf.extend_from_slice(&joined);
            buf.freeze()
        }
    };
    Ok(Budgeted { bytes, share })
}

/// Reads and drops what is left of a body, for at most a second.
async fn drain(mut body: Body) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(1);
    while let Ok(Some(Ok(_))) = tokio::time::timeout_at(deadline, body.frame()).await {}
}

/// vLLM (FastAPI) accepts only JSON bodies on its generation endpoints.
pub(crate) fn require_json(headers: &HeaderMap) -> Result<(), ApiError> {
    let ok = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split(';').next().unwrap_or("").trim().eq_ignore_ascii_case("application/json"))
        .unwrap_or(false);
    if ok {
        Ok(())
    } else {
        Err(ApiError::new(ErrorKind::Validation, "1 validation error:\n  Unsupported Media Type: Only 'application/json' is allowed"))
    }
}

/// Parses a body that must be a JSON object, keeping field order for pass-through.
pub(crate) fn parse_object(bytes: &[u8]) -> Result<Map<String, Value>, ApiError> {
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(other) => Err(crate::api::validation_error(
            "body",
            "model_attributes_type",
            "Input should be a valid dictionary or object to extract fields from",
            &other,
        )),
        Err(e) => Err(ApiError::new(
            ErrorKind::Validation,
            format!(
                "1 validation error:\n  {{'type': 'json_invalid', 'loc': 'body', 'msg': 'JSON decode error', 'ctx': {{'error': '{e}'}}}}"
            ),
        )
        .param("body")),
    }
}
