use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = disagg::cli::Cli::parse_from(disagg::cli::normalize_flag_names(std::env::args_os()));
    disagg::cli::init_tracing(&cli.log_level, cli.log_format);
    // The router serves on threads of its own (router/server.rs); this thread keeps its
    // health checks, discovery and KV event intake.
    let mut builder =
        if cli.is_route() { tokio::runtime::Builder::new_current_thread() } else { tokio::runtime::Builder::new_multi_thread() };
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(disagg::cli::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
