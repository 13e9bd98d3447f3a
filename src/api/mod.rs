//! Wire pieces shared by every server in the binary: OpenAI-shaped errors and SSE framing.

pub mod body;
mod error;
pub mod fields;
pub mod kv_events;
pub mod prom;
pub mod sse;

pub use error::{ApiError, ErrorKind};
pub use fields::validation_error;
