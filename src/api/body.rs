//! Reading request bodies: a size cap and one JSON parse, with errors in the API shape.

use axum::body::Body;
use axum::http::{header, HeaderMap};
use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use serde_json::{Map, Value};

use super::{ApiError, ErrorKind};

fn too_large(limit: usize) -> ApiError {
    ApiError::new(
        ErrorKind::PayloadTooLarge,
        format!("request body is larger than the {limit}-byte limit"),
    )
}

/// Reads a whole body, refusing more than `limit` bytes with 413. The rest of an
/// oversized body is read and dropped (for a bounded time) before answering, so the
/// client sees the 413 instead of a connection reset mid-upload.
pub async fn read_limited(headers: &HeaderMap, body: Body, limit: usize) -> Result<Bytes, ApiError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let mut body = body;
    if declared.is_some_and(|n| n > limit as u64) {
        drain(body).await;
        return Err(too_large(limit));
    }
    let mut buf = BytesMut::with_capacity(declared.map_or(1024, |n| n as usize));
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| ApiError::bad_request(format!("could not read the request body: {e}")))?;
        let Ok(data) = frame.into_data() else { continue };
        if buf.len() + data.len() > limit {
            drain(body).await;
            return Err(too_large(limit));
        }
        buf.extend_from_slice(&data);
    }
    Ok(buf.freeze())
}

/// Reads and drops what is left of a body, for at most a second.
async fn drain(mut body: Body) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(1);
    while let Ok(Some(Ok(_))) = tokio::time::timeout_at(deadline, body.frame()).await {}
}

/// vLLM (FastAPI) accepts only JSON bodies on its generation endpoints.
pub fn require_json(headers: &HeaderMap) -> Result<(), ApiError> {
    let ok = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split(';').next().unwrap_or("").trim().eq_ignore_ascii_case("application/json"))
        .unwrap_or(false);
    if ok {
        Ok(())
    } else {
        Err(ApiError::new(
            ErrorKind::Validation,
            "1 validation error:\n  Unsupported Media Type: Only 'application/json' is allowed",
        ))
    }
}

/// Parses a body that must be a JSON object, keeping field order for pass-through.
pub fn parse_object(bytes: &[u8]) -> Result<Map<String, Value>, ApiError> {
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
            format!("1 validation error:\n  {{'type': 'json_invalid', 'loc': 'body', 'msg': 'JSON decode error', 'ctx': {{'error': '{e}'}}}}"),
        )
        .param("body")),
    }
}
