//! The `disagg` command line: one binary, one subcommand per tool.

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "disagg",
    version,
    about = "Prefill/decode disaggregated LLM serving on vLLM: router, launcher, benchmark, simulator",
    propagate_version = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log filter (tracing EnvFilter syntax, e.g. `info` or `disagg=debug`); RUST_LOG wins.
    #[arg(long, global = true, default_value = "info")]
    pub log_level: String,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run a SIMULATED vLLM engine (no model, no GPU) that speaks vLLM's API and PD handshake.
    Sim(crate::sim::SimArgs),
}

pub fn init_tracing(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Sim(args) => crate::sim::run(args).await,
    }
}
