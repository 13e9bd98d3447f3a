//! The metrics' labels, each a type: what a series may say is written down here.

/// A value that names a metric's label.
pub(crate) trait Label {
    fn label(&self) -> &'static str;
}

/// Why a request failed, for the error metric.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Cause {
    BadRequest,
    PayloadTooLarge,
    BodyTimeout,
    /// --max-body-bytes-in-flight reached.
    BodyBudget,
    QueueFull,
    QueueTimeout,
    /// A tenant's requests or tokens per minute ran out.
    RateLimited,
    NoHealthyPrefill,
    NoHealthyDecode,
    NoHealthyWorker,
    PrefillFailed,
    DecodeFailed,
    DecodeMidstream,
    Upstream4xx,
    /// A passed-through request's worker failed or did not answer in time.
    WorkerFailed,
    ClientDisconnect,
    ShuttingDown,
    Internal,
}

impl Label for Cause {
    fn label(&self) -> &'static str {
        match self {
            Cause::BadRequest => "bad_request",
            Cause::PayloadTooLarge => "payload_too_large",
            Cause::BodyTimeout => "body_timeout",
            Cause::BodyBudget => "body_budget",
            Cause::QueueFull => "queue_full",
            Cause::QueueTimeout => "queue_timeout",
            Cause::RateLimited => "rate_limited",
            Cause::NoHealthyPrefill => "no_healthy_prefill",
            Cause::NoHealthyDecode => "no_healthy_decode",
            Cause::NoHealthyWorker => "no_healthy_worker",
            Cause::PrefillFailed => "prefill_failed",
            Cause::DecodeFailed => "decode_failed",
            Cause::DecodeMidstream => "decode_midstream",
            Cause::Upstream4xx => "upstream_4xx",
            Cause::WorkerFailed => "worker_failed",
            Cause::ClientDisconnect => "client_disconnect",
            Cause::ShuttingDown => "shutting_down",
            Cause::Internal => "internal",
        }
    }
}

/// A leg of a pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Leg {
    Prefill,
    Decode,
}

impl Label for Leg {
    fn label(&self) -> &'static str {
        match self {
            Leg::Prefill => "prefill",
            Leg::Decode => "decode",
        }
    }
}

impl Leg {
    pub(crate) fn as_str(self) -> &'static str {
        self.label()
    }
}

/// How a leg failed, as counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum LegErrorKind {
    Connect,
    Timeout,
    Client4xx,
    Server5xx,
    Broken,
    ErrorEvent,
    RankNotServed,
}

impl Label for LegErrorKind {
    fn label(&self) -> &'static str {
        match self {
            LegErrorKind::Connect => "connect",
            LegErrorKind::Timeout => "timeout",
            LegErrorKind::Client4xx => "4xx",
            LegErrorKind::Server5xx => "5xx",
            LegErrorKind::Broken => "broken",
            LegErrorKind::ErrorEvent => "error_event",
            LegErrorKind::RankNotServed => "dp_rank_out_of_range",
        }
    }
}

/// The leg times the histogram keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum LegTime {
    Prefill,
    DecodeFirstByte,
    DecodeTotal,
}

impl Label for LegTime {
    fn label(&self) -> &'static str {
        match self {
            LegTime::Prefill => "prefill",
            LegTime::DecodeFirstByte => "decode_first_byte",
            LegTime::DecodeTotal => "decode_total",
        }
    }
}

/// What a retry tries again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RetryOf {
    Prefill,
    Decode,
    /// The whole pair, from a new prefill.
    Pair,
    /// A colocated worker's one leg.
    Worker,
}

impl Label for RetryOf {
    fn label(&self) -> &'static str {
        match self {
            RetryOf::Prefill => "prefill",
            RetryOf::Decode => "decode",
            RetryOf::Pair => "pair",
            RetryOf::Worker => "worker",
        }
    }
}

/// kv_aware's decisions and its predictions' fate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum KvAwareOutcome {
    /// The decode prefilled the few tokens it lacked (no prefill leg).
    PrefillSkipped,
    PredictedExact,
    /// The engine reported fewer cached tokens than predicted.
    PredictedMore,
    PredictedLess,
    Unreported,
}

impl Label for KvAwareOutcome {
    fn label(&self) -> &'static str {
        match self {
            KvAwareOutcome::PrefillSkipped => "prefill_skipped",
            KvAwareOutcome::PredictedExact => "predicted_exact",
            KvAwareOutcome::PredictedMore => "predicted_more",
            KvAwareOutcome::PredictedLess => "predicted_less",
            KvAwareOutcome::Unreported => "unreported",
        }
    }
}

/// Where an elastic decode's request ran (--pd-pool).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ElasticLayout {
    /// Both legs on the elastic engine (no KV transfer).
    Alone,
    /// A prefill elsewhere, the KV moved to it.
    Pair,
}

impl Label for ElasticLayout {
    fn label(&self) -> &'static str {
        match self {
            ElasticLayout::Alone => "alone",
            ElasticLayout::Pair => "pair",
        }
    }
}

/// A circuit breaker's state, as the gauge shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CircuitState {
    Closed = 0,
    HalfOpen = 1,
    Open = 2,
}

/// The router's background tasks (each supervised: restarted when it ends).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Task {
    Discovery,
    TlsReload,
    Health,
    Upkeep,
    KvIntake,
    EngineLoad,
    EngineRoom,
    TenantsReload,
}

impl Label for Task {
    fn label(&self) -> &'static str {
        match self {
            Task::Discovery => "discovery",
            Task::TlsReload => "tls_reload",
            Task::Health => "health",
            Task::Upkeep => "upkeep",
            Task::KvIntake => "kv_intake",
            Task::EngineLoad => "engine_load",
            Task::EngineRoom => "engine_room",
            Task::TenantsReload => "tenants_reload",
        }
    }
}

/// What observability dropped when its writer fell behind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Dropped {
    AccessLogLine,
    Trace,
}

impl Label for Dropped {
    fn label(&self) -> &'static str {
        match self {
            Dropped::AccessLogLine => "access_log_line",
            Dropped::Trace => "trace",
        }
    }
}
