//! The KV connector seam: how a chosen (prefill, decode) pair becomes two legs. The pair
//! flow (pair.rs) is the same for every connector, prefill leg then decode leg; what a
//! connector decides is each leg's body, the request id both carry, and whether the
//! prefill's KV can still go to another decode once the first failed.
//!
//! - NIXL (and vllm-ascend's LLMDataDistCMgrConnector, the same flow): the prefill gets
//!   the six-key `kv_transfer_params` and answers with the params the decode needs; the
//!   decode pulls. docs/PROTOCOLS.md §1.
//! - P2pNccl: engines find each other from the request id, which names both KV (zmq)
//!   addresses: `___prefill_addr_{P}___decode_addr_{D}_{uuid}`. The prefill pushes its KV
//!   to D. No params. docs/PROTOCOLS.md §3. Legs run prefill first, as vLLM's own proxy
//!   does: a decode sent alongside a prefill that then fails would wait for KV forever.

use axum::http::HeaderValue;
use bytes::Bytes;

use super::request::LegBodies;
use super::workers::Worker;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Connector {
    /// NixlConnector (also vllm-ascend's LLMDataDistCMgrConnector).
    Nixl,
    /// P2pNcclConnector (xPyD with ZMQ service discovery).
    #[value(name = "p2pnccl")]
    P2pNccl,
}

impl Connector {
    pub fn as_str(self) -> &'static str {
        match self {
            Connector::Nixl => "nixl",
            Connector::P2pNccl => "p2pnccl",
        }
    }

    pub fn prefill_body(self, bodies: &LegBodies) -> Bytes {
        bodies.prefill_leg(self == Connector::Nixl)
    }

    /// The decode leg, given what the prefill answered with.
    pub fn decode_body(self, bodies: &LegBodies, params: Option<&[u8]>) -> Bytes {
        match self {
            Connector::Nixl => bodies.decode(params),
            Connector::P2pNccl => bodies.colocated(),
        }
    }

    /// The request id both legs of this pair carry. NIXL: the request's own. P2pNccl: one
    /// naming both KV addresses, never the client's (its markers would steer the engines).
    pub fn leg_id(self, request_id: &HeaderValue, prefill: &Worker, decode: &Worker) -> HeaderValue {
        match self {
            Connector::Nixl => request_id.clone(),
            Connector::P2pNccl => {
                // Every P2pNccl worker came from discovery, with its checked address
                // (discovery.rs; the admin API refuses to add one without).
                let kv = |w: &Worker| w.kv_address.clone().unwrap_or_default();
                let uuid = uuid::Uuid::new_v4().simple();
                let id = format!("___prefill_addr_{}___decode_addr_{}_{uuid}", kv(prefill), kv(decode));
                // The addresses are checked header-safe; were one not, a bare uuid still
                // names no address of a client's choosing.
                HeaderValue::from_str(&id).unwrap_or_else(|_| HeaderValue::from_str(&uuid.to_string()).expect("hex is a valid header"))
            }
        }
    }

    /// Whether a decode that failed without touching the KV leaves it for another decode.
    /// P2pNccl's prefill pushed it to the decode the id names: a new pair is needed.
    pub fn kv_can_go_to_another_decode(self) -> bool {
        self == Connector::Nixl
    }
}
