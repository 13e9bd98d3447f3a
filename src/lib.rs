//! disagg: prefill/decode disaggregated LLM serving on vLLM. See docs/ARCHITECTURE.md.

pub mod api;
pub mod bench;
pub mod cli;
pub mod launch;
pub mod router;
pub mod sim;
