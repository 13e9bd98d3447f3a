//! The `kv_transfer_params` the binary writes, typed once (docs/PROTOCOLS.md §1-§2): the
//! router's legs and the simulator's answers. What a worker answers and the router does
//! not need passes through as bytes; the simulator reads requests with vLLM's checks
//! (sim/request.rs).

use serde::Serialize;

/// NIXL, the prefill leg's six keys (vLLM's toy proxy sends the nulls too).
#[derive(Serialize)]
struct NixlPrefill {
    do_remote_decode: bool,
    do_remote_prefill: bool,
    remote_engine_id: Option<String>,
    remote_block_ids: Option<Vec<u32>>,
    remote_host: Option<String>,
    remote_port: Option<u16>,
}

/// NIXL: the prefill leg's params, serialised.
pub(crate) fn nixl_prefill() -> Vec<u8> {
    let p = NixlPrefill {
        do_remote_decode: true,
        do_remote_prefill: false,
        remote_engine_id: None,
        remote_block_ids: None,
        remote_host: None,
        remote_port: None,
    };
    serde_json::to_vec(&p).expect("params serialise")
}

/// NIXL: what a length-capped prefill answers (vLLM 0.32's keys), which its decode pulls with.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub(crate) struct NixlAnswer {
    pub(crate) do_remote_prefill: bool,
    pub(crate) do_remote_decode: bool,
    /// One list of block ids per KV-cache group.
    pub(crate) remote_block_ids: Vec<Vec<u32>>,
    pub(crate) remote_engine_id: String,
    pub(crate) remote_request_id: String,
    pub(crate) remote_host: String,
    pub(crate) remote_port: u16,
    pub(crate) tp_size: u32,
    pub(crate) dcp_size: u32,
    pub(crate) pp_size: u32,
    pub(crate) remote_num_tokens: usize,
    pub(crate) remote_blocks_expiry_time: Option<f64>,
    pub(crate) transfer_mode: &'static str,
    pub(crate) remote_prefill_cached_tokens: usize,
}

/// Mooncake: both legs' params, one transfer id per pair attempt.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub(crate) struct Mooncake {
    pub(crate) do_remote_decode: bool,
    pub(crate) do_remote_prefill: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) remote_bootstrap_addr: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) remote_engine_id: Option<String>,
    pub(crate) transfer_id: String,
}

impl Mooncake {
    /// The prefill leg's: compute, then hold the KV under `transfer_id`.
    pub(crate) fn prefill(transfer_id: &str) -> Mooncake {
        Mooncake {
            do_remote_decode: true,
            do_remote_prefill: false,
            remote_bootstrap_addr: None,
            remote_engine_id: None,
            transfer_id: transfer_id.into(),
        }
    }

    /// The decode leg's: take the KV of `transfer_id` from engine `engine_id`, found on
    /// the bootstrap server at `bootstrap_addr`.
    pub(crate) fn decode(bootstrap_addr: &str, engine_id: &str, transfer_id: &str) -> Mooncake {
        Mooncake {
            do_remote_decode: false,
            do_remote_prefill: true,
            remote_bootstrap_addr: Some(bootstrap_addr.into()),
            remote_engine_id: Some(engine_id.into()),
            transfer_id: transfer_id.into(),
        }
    }

    pub(crate) fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("params serialise")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    #[test]
    fn the_shapes_are_vllms() {
        let v: Value = serde_json::from_slice(&nixl_prefill()).unwrap();
        assert_eq!(
            v,
            json!({"do_remote_decode": true, "do_remote_prefill": false, "remote_engine_id": null,
            "remote_block_ids": null, "remote_host": null, "remote_port": null})
        );
        let v: Value = serde_json::from_slice(&Mooncake::prefill("xfer-1").to_bytes()).unwrap();
        assert_eq!(v, json!({"do_remote_decode": true, "do_remote_prefill": false, "transfer_id": "xfer-1"}));
        let v: Value = serde_json::from_slice(&Mooncake::decode("http://h:8998", "e", "xfer-1").to_bytes()).unwrap();
        assert_eq!(
            v,
            json!({"do_remote_decode": false, "do_remote_prefill": true, "remote_bootstrap_addr": "http://h:8998",
            "remote_engine_id": "e", "transfer_id": "xfer-1"})
        );
    }
}
