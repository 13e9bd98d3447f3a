//! The `disagg` command line: one binary, one subcommand per tool.

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "disagg",
    version,
    about = "Prefill/decode disaggregated LLM serving on vLLM: router, launcher, benchmark, simulator",
    long_about = "Prefill/decode disaggregated LLM serving on vLLM: router, launcher, benchmark, simulator.\n\n\
        With no subcommand, the flags are `disagg route`'s, so vllm-router command lines work as they are:\n  \
        disagg --vllm-pd-disaggregation --prefill http://P:8100 --decode http://D:8200 --port 8123",
    propagate_version = true,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub(crate) command: Option<Command>,
    #[command(flatten)]
    pub(crate) route: crate::router::RouteArgs,
    /// Log filter (tracing EnvFilter syntax, e.g. `info` or `disagg=debug`); RUST_LOG wins.
    #[arg(long, global = true, default_value = "info")]
    pub log_level: String,
    /// How log lines are written: `text` (plain) or `json` (one JSON object per line, for
    /// log collectors).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// The log's line format.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
#[expect(clippy::large_enum_variant, reason = "parsed once, at start")]
pub(crate) enum Command {
    /// The PD router: OpenAI-compatible front, prefill leg then decode leg (a drop-in for
    /// vllm-router's and the vLLM toy proxy's command lines).
    Route(crate::router::RouteArgs),
    /// Bring up a whole PD topology (prefill and decode instances, then the router) from
    /// one YAML file (vLLM's pdjob schema), here, on one node of many, or on Ray.
    Launch(crate::launch::LaunchArgs),
    /// Benchmark a serving endpoint with `vllm bench serve`'s flags, metrics and result
    /// files, plus a progress bar and a plot of the run.
    Bench(crate::bench::BenchArgs),
    /// Fit `disagg sim --timing-profile` coefficients to `disagg bench` runs against a real
    /// engine (results saved with --save-result --save-detailed).
    FitTiming(crate::bench::fit::FitArgs),
    /// Write vllm-ascend's ranktable.json (LLMDataDistCMgrConnector) for a set of nodes.
    Ranktable(crate::launch::ranktable::RanktableArgs),
    /// Run a SIMULATED vLLM engine (no model, no GPU) that speaks vLLM's API and PD handshake.
    Sim(crate::sim::SimArgs),
    /// Replay a trace on a simulated cluster through every router policy (and vllm-router):
    /// a Markdown table and a plot of TTFT, hit rate, load skew, goodput and router CPU.
    Scoreboard(crate::scoreboard::ScoreboardArgs),
    /// Size xPyD for a workload: its phases replayed on simulated clusters for every split,
    /// colocated and elastic; goodput under the SLOs per phase (table, plot), and the best
    /// layout written as a `disagg launch` file.
    Plan(crate::scoreboard::plan::PlanArgs),
    /// A live terminal view of a running router: its workers (health, circuit, in flight
    /// and queue per rank, KV usage, hit rate) and its rate, TTFT and errors; `q` quits.
    Top(crate::top::TopArgs),
}

impl Cli {
    /// Whether this runs the router (bare flags, as vllm-router's, or `route`).
    pub fn is_route(&self) -> bool {
        matches!(self.command, None | Some(Command::Route(_)))
    }
}

/// vLLM's parser takes `_` for `-` in every flag name (`--trust_remote_code`), and so
/// does every subcommand here: flag names are rewritten with dashes before clap sees them
/// (values, and everything after a bare `--`, untouched).
pub fn normalize_flag_names(args: impl IntoIterator<Item = std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    let mut rest_verbatim = false;
    args.into_iter()
        .map(|a| {
            let Some(s) = a.to_str() else { return a };
            if rest_verbatim || !s.starts_with("--") || !s.contains('_') {
                rest_verbatim |= s == "--";
                return a;
            }
            let (name, value) = match s.split_once('=') {
                Some((n, v)) => (n, Some(v)),
                None => (s, None),
            };
            let name = format!("--{}", name[2..].replace('_', "-"));
            value.map_or(name.clone(), |v| format!("{name}={v}")).into()
        })
        .collect()
}

pub fn init_tracing(level: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match format {
        // Colours only on a terminal: logs sent to a file or a collector stay plain text.
        LogFormat::Text => fmt.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).try_init(),
        LogFormat::Json => fmt.json().with_current_span(false).with_span_list(false).try_init(),
    };
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        None => crate::router::run(cli.route).await,
        Some(Command::Route(args)) => crate::router::run(args).await,
        Some(Command::Sim(args)) => crate::sim::run(args).await,
        Some(Command::Launch(args)) => crate::launch::run(args).await,
        Some(Command::Ranktable(args)) => crate::launch::ranktable::run(args).await,
        Some(Command::Bench(args)) => crate::bench::run(args).await,
        Some(Command::FitTiming(args)) => crate::bench::fit::run(args),
        Some(Command::Scoreboard(args)) => crate::scoreboard::run(args).await,
        Some(Command::Plan(args)) => crate::scoreboard::plan::run(args).await,
        Some(Command::Top(args)) => crate::top::run(args).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flag_names_take_underscores_like_vllms_parser() {
        let args = ["disagg", "bench", "--trust_remote_code", "--dataset_name=random", "--model", "a_b", "--", "--x_y"];
        let out: Vec<String> = normalize_flag_names(args.iter().map(|s| s.into())).into_iter().map(|s| s.into_string().unwrap()).collect();
        assert_eq!(out, ["disagg", "bench", "--trust-remote-code", "--dataset-name=random", "--model", "a_b", "--", "--x_y"]);
    }
}
