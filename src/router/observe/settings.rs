//! What observability was configured with (router/config/observe.rs checks the flags).

use std::path::PathBuf;

/// How spans travel to the OTLP endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum OtlpProtocol {
    Grpc,
    HttpProtobuf,
}

/// Traces, checked.
#[derive(Clone, Debug)]
pub(crate) struct TracesConfig {
    pub(crate) endpoint: String,
    pub(crate) protocol: OtlpProtocol,
    pub(crate) sample_ratio: f64,
}

/// Where access-log lines go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum AccessLogTarget {
    Stdout,
    File(PathBuf),
}

/// Observability, checked.
#[derive(Clone, Debug, Default)]
pub(crate) struct ObserveConfig {
    pub(crate) traces: Option<TracesConfig>,
    pub(crate) access_log: Option<AccessLogTarget>,
}
