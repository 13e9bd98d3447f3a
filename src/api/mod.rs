//! Wire pieces shared by every server in the binary: OpenAI-shaped errors, SSE framing,
//! KV events and the KV connectors' shared facts.

pub(crate) mod body;
pub(crate) mod connector;
pub(crate) mod dialect;
mod error;
pub(crate) mod fields;
pub mod kv_events;
pub(crate) mod kv_params;
pub(crate) mod prom;
pub mod sse;
pub(crate) mod timing;
pub(crate) mod usage;

pub(crate) use error::{ApiError, ErrorKind, Quota};

/// The 64-bit FNV-1a offset basis: the start of a hash (`fnv1a`).
pub(crate) const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// 64-bit FNV-1a of `bytes`, continuing from `h` (`FNV_OFFSET` to start): stable across
/// runs and platforms (std's hasher is not). The one FNV of the binary.
pub(crate) fn fnv1a(h: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(h, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}
pub(crate) use fields::validation_error;

/// What an engine does in PD serving: one enum for the router's pools, the simulator's
/// `--role` and the launcher's instances.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, clap::ValueEnum)]
pub(crate) enum Role {
    /// Prefills prompts and hands their KV to a decode (vLLM's `kv_producer`): honours
    /// `do_remote_decode`.
    Prefill,
    /// Decodes from KV a prefill computed (vLLM's `kv_consumer`): honours `do_remote_prefill`.
    Decode,
    /// Both: plain colocated serving (the router's non-PD workers; vLLM's `kv_both`).
    Both,
}

impl Role {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Role::Prefill => "prefill",
            Role::Decode => "decode",
            Role::Both => "both",
        }
    }

    /// A role by name; `worker` and `regular` (vllm-router's) are colocated workers.
    pub(crate) fn parse(name: &str) -> Option<Role> {
        match name.to_ascii_lowercase().as_str() {
            "prefill" => Some(Role::Prefill),
            "decode" => Some(Role::Decode),
            "both" | "worker" | "regular" => Some(Role::Both),
            _ => None,
        }
    }

    pub(crate) fn produces_kv(self) -> bool {
        matches!(self, Role::Prefill | Role::Both)
    }

    pub(crate) fn consumes_kv(self) -> bool {
        matches!(self, Role::Decode | Role::Both)
    }
}

/// A host as it goes into a URL or a `host:port`: an IPv6 address in brackets, once.
pub(crate) fn url_host(host: &str) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_string()
    }
}

/// `host:port`, IPv6 in brackets. The one joiner of the binary.
pub(crate) fn join_host_port(host: &str, port: u16) -> String {
    format!("{}:{port}", url_host(host))
}
