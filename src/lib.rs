//! disagg: prefill/decode disaggregated LLM serving on vLLM. See docs/ARCHITECTURE.md.

pub mod api;
pub mod bench;
pub mod cli;
pub(crate) mod fd_limit;
pub mod flags;
pub mod idle_close;
pub mod launch;
pub mod log_budget;
pub mod proc_stat;
pub mod router;
pub mod scoreboard;
pub mod signal;
pub mod sim;
pub mod tls;
pub mod tokenize;
pub mod top;
pub mod zmtp;
