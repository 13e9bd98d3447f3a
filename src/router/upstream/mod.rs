//! Talking to workers: the legs (one POST each, and its answer), their own HTTP/1.1
//! client, its framing, and the router's other calls to workers.

pub(crate) mod bootstrap;
pub(crate) mod client;
mod framing;
pub mod legs;
pub(crate) mod pieces;
