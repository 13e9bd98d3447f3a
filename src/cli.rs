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
    pub command: Option<Command>,
    #[command(flatten)]
    pub route: crate::router::RouteArgs,
    /// Log filter (tracing EnvFilter syntax, e.g. `info` or `disagg=debug`); RUST_LOG wins.
    #[arg(long, global = true, default_value = "info")]
    pub log_level: String,
}

#[derive(Subcommand, Debug)]
pub enum Command {
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
}

pub fn init_tracing(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal: logs sent to a file or a collector stay plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi).try_init();
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        None => crate::router::run(cli.route).await,
        Some(Command::Route(args)) => crate::router::run(args).await,
        Some(Command::Sim(args)) => crate::sim::run(args).await,
        Some(Command::Launch(args)) => crate::launch::run(args).await,
        Some(Command::Ranktable(args)) => crate::launch::ranktable::run(args),
        Some(Command::Bench(args)) => crate::bench::run(args).await,
        Some(Command::FitTiming(args)) => crate::bench::fit::run(args),
        Some(Command::Scoreboard(args)) => crate::scoreboard::run(args).await,
    }
}
