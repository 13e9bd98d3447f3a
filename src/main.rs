use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = disagg::cli::Cli::parse_from(disagg::cli::normalize_flag_names(std::env::args_os()));
    disagg::cli::init_tracing(&cli.log_level);
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = cli.worker_threads() {
        builder.worker_threads(n);
    }
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
