//! The simulator's API server: vLLM's HTTP endpoints (http.rs), generation requests and
//! their answers (generate.rs, response.rs), Anthropic's Messages over them (messages.rs), OpenAI's Responses
//! over them (responses.rs), token ids in and out (tokens_out.rs), /render, the command line (config.rs) and
//! the data-parallel layout (dp.rs). It drives the engine (../engine) and nothing drives it.

pub(crate) mod config;
pub(crate) mod dp;
pub(crate) mod generate;
pub(crate) mod http;
pub(crate) mod messages;
pub(crate) mod render;
pub(crate) mod response;
pub(crate) mod responses;
pub(crate) mod tokens_out;
