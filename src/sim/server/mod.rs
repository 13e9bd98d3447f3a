//! The simulator's API server: vLLM's HTTP endpoints (http.rs), generation requests and
//! their answers (generate.rs, response.rs), /render, the command line (config.rs) and
//! the data-parallel layout (dp.rs). It drives the engine (../engine) and nothing drives it.

pub mod config;
pub mod dp;
pub mod generate;
pub mod http;
pub mod render;
pub mod response;
