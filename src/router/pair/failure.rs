//! What a client hears when its request does not get a worker's answer, and the cause it
//! is counted under (`disagg_router_errors_total{cause}`). Messages name the leg and the
//! cause class, never a worker's address or an upstream error text (those go to the log,
//! with the request id).

use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};

use crate::api::{ApiError, ErrorKind};
use crate::router::metrics::{Cause, Leg};
use crate::router::upstream::legs::LegError;
use crate::router::workers::{NoWorker, Role};

/// An answer that is not the worker's success, and the cause it is counted under.
pub(crate) struct Failure {
    pub(crate) response: Response,
    pub(crate) status: u16,
    pub(crate) cause: Cause,
}

impl Failure {
    pub(crate) fn api(err: ApiError, cause: Cause) -> Self {
        Failure { status: err.status.as_u16(), response: err.into_response(), cause }
    }

    /// A request the client got wrong (vLLM's own checks).
    pub(crate) fn bad_request(err: ApiError) -> Self {
        let cause = match err.status.as_u16() {
            413 => Cause::PayloadTooLarge,
            408 => Cause::BodyTimeout,
            503 => Cause::BodyBudget,
            _ => Cause::BadRequest,
        };
        Failure::api(err, cause)
    }

    /// A worker's 4xx, returned to the client as the worker sent it.
    pub(crate) fn passthrough(err: LegError) -> Self {
        match err {
            LegError::Status { status, content_type, body } => {
                let mut resp = (status, body).into_response();
                if let Some(ct) = content_type {
                    resp.headers_mut().insert(CONTENT_TYPE, ct);
                }
                Failure { status: status.as_u16(), response: resp, cause: Cause::Upstream4xx }
            }
            other => Failure::api(ApiError::internal(format!("unexpected leg error: {}", other.class())), Cause::Internal),
        }
    }

    pub(crate) fn leg_failed(leg: Leg, err: &LegError) -> Self {
        let cause = match leg {
            Leg::Prefill => Cause::PrefillFailed,
            Leg::Decode => Cause::DecodeFailed,
        };
        Failure::api(ApiError::new(ErrorKind::BadGateway, format!("{} leg failed: {}", leg.as_str(), err.class())), cause)
    }

    pub(crate) fn no_worker(no: NoWorker) -> Self {
        let cause = match no.role {
            Role::Prefill => Cause::NoHealthyPrefill,
            Role::Decode => Cause::NoHealthyDecode,
            Role::Both => Cause::NoHealthyWorker,
        };
        Failure::api(ApiError::new(ErrorKind::ServiceUnavailable, no.to_string()).retry_after(1), cause)
    }

    pub(crate) fn shutting_down() -> Self {
        Failure::api(
            ApiError::new(ErrorKind::ServiceUnavailable, "the router is shutting down; retry on another replica").retry_after(1),
            Cause::ShuttingDown,
        )
    }

    pub(crate) fn internal(what: &str) -> Self {
        Failure::api(ApiError::internal(what), Cause::Internal)
    }
}
