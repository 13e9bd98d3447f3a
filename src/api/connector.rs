//! The KV connectors, by the names `--kv-connector` takes in `disagg route` and `disagg
//! sim`, and the wire facts both sides of a connector share (docs/PROTOCOLS.md §1-§3).

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Connector {
    /// NixlConnector (also vllm-ascend's LLMDataDistCMgrConnector).
    Nixl,
    /// P2pNcclConnector (xPyD with ZMQ service discovery).
    #[value(name = "p2pnccl")]
    P2pNccl,
    /// MooncakeConnector (prefill bootstrap servers; `--prefill URL BOOTSTRAP_PORT`).
    Mooncake,
}

impl Connector {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Connector::Nixl => "nixl",
            Connector::P2pNccl => "p2pnccl",
            Connector::Mooncake => "mooncake",
        }
    }
}

/// Where a prefill's Mooncake bootstrap server listens by default (vLLM's
/// VLLM_MOONCAKE_BOOTSTRAP_PORT).
pub(crate) const MOONCAKE_BOOTSTRAP_PORT: u16 = 8998;

/// P2pNccl's request id, which names both engines' KV (zmq) addresses:
/// `___prefill_addr_{P}___decode_addr_{D}_{uuid}` (vLLM's xPyD proxy).
pub(crate) fn p2p_request_id(prefill_kv: &str, decode_kv: &str, uuid: &str) -> String {
    format!("___prefill_addr_{prefill_kv}___decode_addr_{decode_kv}_{uuid}")
}

/// The decode's KV address a P2pNccl prefill pushes to, read from a request id as vLLM's
/// `P2pNcclConnector.parse_request_id` does (`___decode_addr_(.*):(\d+)`: the last
/// `:digits` after the marker). Host as written (IPv6 in brackets), port.
pub(crate) fn p2p_decode_addr(request_id: &str) -> Option<(&str, u16)> {
    let rest = &request_id[request_id.find("___decode_addr_")? + "___decode_addr_".len()..];
    // The greedy `(.*)` ends at the last colon that digits follow.
    let mut best = None;
    for (i, _) in rest.match_indices(':') {
        let digits: &str = &rest[i + 1..];
        let end = digits.find(|c: char| !c.is_ascii_digit()).unwrap_or(digits.len());
        if end > 0 {
            best = Some((i, &digits[..end]));
        }
    }
    let (i, port) = best?;
    Some((&rest[..i], port.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_decode_address_is_read_as_vllms_regex_reads_it() {
        let id = p2p_request_id("10.0.0.1:21001", "10.0.0.2:22001", "0123abcd");
        assert_eq!(p2p_decode_addr(&format!("cmpl-{id}-0")), Some(("10.0.0.2", 22001)));
        let id = p2p_request_id("[::1]:21001", "[::1]:22001", "ff");
        assert_eq!(p2p_decode_addr(&id), Some(("[::1]", 22001)));
        assert_eq!(p2p_decode_addr("cmpl-plain-0"), None);
        assert_eq!(p2p_decode_addr("___decode_addr_host_without_port"), None);
        assert_eq!(p2p_decode_addr("___decode_addr_h:99999_x"), None);
    }
}
