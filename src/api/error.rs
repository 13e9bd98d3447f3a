//! Errors in the JSON shape vLLM and OpenAI clients expect:
//! `{"error":{"message":..,"type":..,"param":null,"code":<status>}}`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

/// The error classes we answer with; the name is the JSON `type`, as vLLM names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ErrorKind {
    /// A request that does not fit the schema (vLLM's pydantic errors: type "Bad Request").
    Validation,
    BadRequest,
    /// vLLM's `create_error_response(err_type="invalid_request_error")` (the Responses API).
    InvalidRequest,
    Unauthorized,
    NotFound,
    RequestTimeout,
    PayloadTooLarge,
    RateLimit,
    /// A tenant's per-minute allowance ran out: OpenAI's `rate_limit_exceeded`.
    QuotaExceeded(Quota),
    Internal,
    BadGateway,
    ServiceUnavailable,
    GatewayTimeout,
}

impl ErrorKind {
    pub(crate) fn status(self) -> StatusCode {
        match self {
            ErrorKind::Validation | ErrorKind::BadRequest | ErrorKind::InvalidRequest => StatusCode::BAD_REQUEST,
            ErrorKind::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorKind::NotFound => StatusCode::NOT_FOUND,
            ErrorKind::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            ErrorKind::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorKind::RateLimit | ErrorKind::QuotaExceeded(_) => StatusCode::TOO_MANY_REQUESTS,
            ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            ErrorKind::BadGateway => StatusCode::BAD_GATEWAY,
            ErrorKind::ServiceUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::GatewayTimeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    fn type_name(self) -> &'static str {
        match self {
            ErrorKind::Validation => "Bad Request",
            ErrorKind::BadRequest => "BadRequestError",
            ErrorKind::InvalidRequest => "invalid_request_error",
            ErrorKind::Unauthorized => "AuthenticationError",
            ErrorKind::NotFound => "NotFoundError",
            ErrorKind::RequestTimeout => "RequestTimeoutError",
            ErrorKind::PayloadTooLarge => "PayloadTooLargeError",
            ErrorKind::RateLimit => "RateLimitError",
            ErrorKind::QuotaExceeded(q) => q.as_str(),
            ErrorKind::Internal => "InternalServerError",
            ErrorKind::BadGateway => "BadGatewayError",
            ErrorKind::ServiceUnavailable => "ServiceUnavailableError",
            ErrorKind::GatewayTimeout => "GatewayTimeoutError",
        }
    }

    /// The kind for an arbitrary status (used when a fault knob picks the status).
    pub(crate) fn for_status(status: StatusCode) -> ErrorKind {
        match status.as_u16() {
            401 => ErrorKind::Unauthorized,
            404 => ErrorKind::NotFound,
            408 => ErrorKind::RequestTimeout,
            413 => ErrorKind::PayloadTooLarge,
            429 => ErrorKind::RateLimit,
            502 => ErrorKind::BadGateway,
            503 => ErrorKind::ServiceUnavailable,
            504 => ErrorKind::GatewayTimeout,
            s if s < 500 => ErrorKind::BadRequest,
            _ => ErrorKind::Internal,
        }
    }
}

/// Which per-minute allowance a request ran out of (OpenAI's error `type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Quota {
    Requests,
    Tokens,
}

impl Quota {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Quota::Requests => "requests",
            Quota::Tokens => "tokens",
        }
    }
}

/// An error answered to a client. `status` may differ from `kind.status()` only when a
/// fault knob asks for an unusual status.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub(crate) kind: ErrorKind,
    pub(crate) status: StatusCode,
    pub(crate) message: String,
    /// The request field at fault, when there is one (vLLM fills `param`).
    pub(crate) param: Option<String>,
    pub(crate) retry_after_secs: Option<u64>,
}

impl ApiError {
    pub(crate) fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        ApiError { kind, status: kind.status(), message: message.into(), param: None, retry_after_secs: None }
    }
    pub(crate) fn with_status(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError { status, ..ApiError::new(ErrorKind::for_status(status), message) }
    }
    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        ApiError::new(ErrorKind::BadRequest, message)
    }
    pub(crate) fn internal(message: impl Into<String>) -> Self {
        ApiError::new(ErrorKind::Internal, message)
    }
    pub(crate) fn param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
        self
    }
    pub(crate) fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after_secs = Some(secs);
        self
    }

    /// The error's `type` as vLLM names it.
    pub(crate) fn kind_name(&self) -> &'static str {
        self.kind.type_name()
    }

    pub(crate) fn body(&self) -> Value {
        // OpenAI's rate limits say what ran out in `type` and name the error in `code`.
        let code = match self.kind {
            ErrorKind::QuotaExceeded(_) => json!("rate_limit_exceeded"),
            _ => json!(self.status.as_u16()),
        };
        json!({"error": {
            "message": self.message,
            "type": self.kind.type_name(),
            "param": self.param,
            "code": code,
        }})
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status.as_u16(), self.message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, axum::Json(self.body())).into_response();
        if let Some(secs) = self.retry_after_secs {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}
