//! Wire pieces shared by every server in the binary: OpenAI-shaped errors, SSE framing,
//! KV events and the KV connectors' shared facts.

pub mod body;
pub mod connector;
mod error;
pub mod fields;
pub mod kv_events;
pub mod prom;
pub mod sse;

pub use error::{ApiError, ErrorKind};

/// The 64-bit FNV-1a offset basis: the start of a hash (`fnv1a`).
pub const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// 64-bit FNV-1a of `bytes`, continuing from `h` (`FNV_OFFSET` to start): stable across
/// runs and platforms (std's hasher is not). The one FNV of the binary.
pub fn fnv1a(h: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(h, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}
pub use fields::validation_error;

/// A host as it goes into a URL or a `host:port`: an IPv6 address in brackets, once.
pub fn url_host(host: &str) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_string()
    }
}

/// `host:port`, IPv6 in brackets. The one joiner of the binary.
pub fn join_host_port(host: &str, port: u16) -> String {
    format!("{}:{port}", url_host(host))
}
