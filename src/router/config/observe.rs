//! Observability's flags: OpenTelemetry traces over OTLP (vLLM's and vllm-router's flag
//! names), and the access log (router/observe/, docs/OBSERVE.md).

use std::path::PathBuf;

use clap::Args;

use crate::router::observe::{AccessLogTarget, ObserveConfig, OtlpProtocol, TracesConfig};

#[derive(Args, Debug, Clone, Default)]
#[command(next_help_heading = "Observability")]
pub(crate) struct ObserveArgs {
    /// Send one trace per request to this OTLP endpoint (as vLLM's flag): the router's span,
    /// its queue, each leg (whose `traceparent` the engine continues) and the stream. gRPC
    /// (`host:4317` or `http://host:4317`) unless OTEL_EXPORTER_OTLP_TRACES_PROTOCOL (or
    /// OTEL_EXPORTER_OTLP_PROTOCOL) is `http/protobuf` (`http://host:4318/v1/traces`).
    #[arg(long, value_name = "URL")]
    pub(crate) otlp_traces_endpoint: Option<String>,
    /// The share of requests traced (0 to 1) when the client sends no `traceparent`; a
    /// client's own sampled flag is followed.
    #[arg(long, default_value_t = 1.0, value_name = "RATIO", value_parser = parse_ratio)]
    pub(crate) otlp_traces_sample_ratio: f64,
    /// One JSON line per request (time, id, endpoint, model, tenant, status, workers and
    /// ranks, cached tokens predicted and reported, tokens, queue / prefill / KV-wait /
    /// first-token / total times, failed legs, cause) to this file (appended), or `-` for
    /// standard output.
    #[arg(long, value_name = "PATH|-")]
    pub(crate) access_log: Option<String>,
}

fn parse_ratio(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        _ => Err(format!("{s:?}: a ratio from 0 to 1")),
    }
}

/// The protocol the OpenTelemetry environment names (as vLLM and the OTel SDKs read it).
fn protocol_from_env() -> Result<OtlpProtocol, String> {
    let var = std::env::var("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL").or_else(|_| std::env::var("OTEL_EXPORTER_OTLP_PROTOCOL"));
    match var.as_deref() {
        Err(_) | Ok("grpc") => Ok(OtlpProtocol::Grpc),
        Ok("http/protobuf") => Ok(OtlpProtocol::HttpProtobuf),
        Ok(other) => Err(format!("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL={other:?}: the router sends `grpc` or `http/protobuf`")),
    }
}

impl ObserveArgs {
    pub(crate) fn to_config(&self) -> Result<ObserveConfig, String> {
        let traces = match &self.otlp_traces_endpoint {
            None => None,
            Some(endpoint) => {
                let protocol = protocol_from_env()?;
                // gRPC endpoints are often written bare (`host:4317`), as vLLM takes them.
                let endpoint = if endpoint.contains("://") { endpoint.clone() } else { format!("http://{endpoint}") };
                match endpoint.parse::<axum::http::Uri>() {
                    Ok(u) if matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some() => {}
                    _ => return Err(format!("--otlp-traces-endpoint {endpoint:?}: an http(s) URL or host:port")),
                }
                Some(TracesConfig { endpoint, protocol, sample_ratio: self.otlp_traces_sample_ratio })
            }
        };
        let access_log = self.access_log.as_deref().map(|p| match p {
            "-" => AccessLogTarget::Stdout,
            path => AccessLogTarget::File(PathBuf::from(path)),
        });
        if let Some(AccessLogTarget::File(p)) = &access_log {
            std::fs::OpenOptions::new().create(true).append(true).open(p).map_err(|e| format!("--access-log {}: {e}", p.display()))?;
        }
        Ok(ObserveConfig { traces, access_log })
    }
}
