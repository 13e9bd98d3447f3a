//! `kv_aware`: what each engine's KV cache holds, from its own KV events (docs/PROTOCOLS.md
//! §6): the index, the intake of events, a prompt's tokens as the engine sees them, the
//! check of predictions against what engines report, and the load engines report.

mod applier;
pub(crate) mod check;
pub(crate) mod engine_load;
mod holders;
pub mod index;
pub(crate) mod intake;
mod keys;
mod table;
pub mod tokens;
