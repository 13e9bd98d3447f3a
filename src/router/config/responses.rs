//! Where the Responses API's conversations are kept (router/responses/): the store, its
//! bounds. vLLM keeps a stored response in the memory of the API server that made it (the
//! decode, in PD), so the router keeps them itself and any prefill and decode can serve
//! the next turn.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "Responses API")]
pub(crate) struct ResponsesArgs {
    /// Where `/v1/responses` conversations are stored: `sqlite` (a file under --state-dir,
    /// the default), `postgres://USER@HOST:PORT/DB` (several router replicas share it), or
    /// `off` (as vLLM without VLLM_ENABLE_RESPONSES_API_STORE: `store` is taken as false and
    /// `previous_response_id` finds nothing).
    #[arg(long, default_value = "sqlite", value_name = "sqlite|postgres://...|off")]
    pub(crate) responses_store: String,
    /// The router's state directory (the SQLite store). Default: $XDG_STATE_HOME/disagg, or
    /// ~/.local/state/disagg. Created when a response is first stored.
    #[arg(long, value_name = "DIR")]
    pub(crate) state_dir: Option<PathBuf>,
    /// A stored response is kept this long, then neither read nor continued, and deleted.
    #[arg(long, default_value_t = 30 * 24 * 3600, value_name = "SECS")]
    pub(crate) responses_ttl_secs: u64,
    /// At most this many stored responses; the oldest go first.
    #[arg(long, default_value_t = 100_000, value_name = "N")]
    pub(crate) responses_max_stored: u64,
    /// A response (with its conversation) larger than this is answered but not stored.
    #[arg(long, default_value_t = 16 << 20, value_name = "BYTES")]
    pub(crate) responses_max_bytes: usize,
    /// The longest one store call may take, connecting included; past it a continuation or
    /// read answers 503 and a new response is answered without being stored.
    #[arg(long, default_value_t = 10.0, value_name = "SECS", value_parser = crate::flags::positive)]
    pub(crate) responses_store_timeout_secs: f64,
}

/// Which store keeps the conversations.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum StoreKind {
    Off,
    Sqlite(PathBuf),
    Postgres(String),
}

#[derive(Clone, Debug)]
pub(crate) struct ResponsesConfig {
    pub(crate) store: StoreKind,
    pub(crate) ttl: Duration,
    pub(crate) max_stored: u64,
    pub(crate) max_bytes: usize,
    pub(crate) timeout: Duration,
}

impl ResponsesArgs {
    pub(crate) fn to_config(&self) -> Result<ResponsesConfig, String> {
        let store = match self.responses_store.as_str() {
            "off" => StoreKind::Off,
            "sqlite" => StoreKind::Sqlite(self.state_dir.clone().unwrap_or_else(default_state_dir).join("responses.sqlite3")),
            url if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
                let parsed: tokio_postgres::Config = url.parse().map_err(|e| format!("--responses-store: {e}"))?;
                if parsed.get_ssl_mode() == tokio_postgres::config::SslMode::Require {
                    return Err("--responses-store: sslmode=require is not supported (the store speaks plain TCP; \
                                keep PostgreSQL on a private network or loopback)"
                        .into());
                }
                StoreKind::Postgres(url.to_string())
            }
            other => return Err(format!("--responses-store `{other}`: one of sqlite, postgres://..., off")),
        };
        if self.responses_max_stored == 0 {
            return Err("--responses-max-stored must be at least 1 (use --responses-store off to store nothing)".into());
        }
        Ok(ResponsesConfig {
            store,
            ttl: Duration::from_secs(self.responses_ttl_secs),
            max_stored: self.responses_max_stored,
            max_bytes: self.responses_max_bytes,
            timeout: Duration::from_secs_f64(self.responses_store_timeout_secs),
        })
    }
}

fn default_state_dir() -> PathBuf {
    match (std::env::var_os("XDG_STATE_HOME"), std::env::var_os("HOME")) {
        (Some(state), _) if !state.is_empty() => PathBuf::from(state).join("disagg"),
        (_, Some(home)) => PathBuf::from(home).join(".local/state/disagg"),
        _ => PathBuf::from(".disagg-state"),
    }
}
