//! The KV connector seam: how a chosen (prefill, decode) pair becomes two legs. The pair
//! flow (pair.rs) is the same for every connector; what a connector decides is each leg's
//! body, the request id both carry, whether the decode goes alongside the prefill or after
//! its answer, and whether the prefill's KV can still go to another decode once the first
//! failed.
//!
//! - NIXL (and vllm-ascend's LLMDataDistCMgrConnector, the same flow): the prefill gets
//!   the six-key `kv_transfer_params` and answers with the params the decode needs; the
//!   decode pulls. docs/PROTOCOLS.md §1.
//! - P2pNccl: engines find each other from the request id, which names both KV (zmq)
//!   addresses: `___prefill_addr_{P}___decode_addr_{D}_{uuid}`. The prefill pushes its KV
//!   to D. No params. docs/PROTOCOLS.md §3. Legs run prefill first, as vLLM's own proxy
//!   does: a decode sent alongside a prefill that then fails would wait for KV forever.
//! - Mooncake: both legs carry one `transfer_id`; the decode is sent alongside the prefill
//!   with the prefill's bootstrap address and the engine id of the prefill's DP rank
//!   (learned from the bootstrap server's `/query`, health.rs), and pulls the KV by
//!   transfer id once the prefill has it. docs/PROTOCOLS.md §2.

use axum::http::HeaderValue;

use crate::api::kv_params;
use crate::router::request::body::Pieces;
use crate::router::request::{LegBodies, NIXL_PREFILL_PARAMS};
use crate::router::workers::{Lease, Worker};

/// The legs of one pair attempt.
pub(crate) struct PairLegs {
    /// The request id both legs carry.
    pub(crate) id: HeaderValue,
    pub(crate) prefill: Pieces,
    /// The decode leg, when it is sent alongside the prefill (it then waits for the KV
    /// itself); otherwise it is made from the prefill's answer (`Connector::decode_body`).
    pub(crate) decode_alongside: Option<Pieces>,
}

pub(crate) use crate::api::connector::Connector;

/// A prefill its decode cannot name yet (Mooncake: learned from its bootstrap server).
#[derive(Debug)]
pub(crate) enum NotNamed {
    EngineId { url: String, rank: usize },
    Bootstrap { url: String },
}

impl std::fmt::Display for NotNamed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NotNamed::EngineId { url, rank } => write!(f, "no Mooncake engine id known for {url} rank {rank}"),
            NotNamed::Bootstrap { url } => write!(f, "no Mooncake bootstrap address for {url}"),
        }
    }
}

impl Connector {
    /// Whether the decode leg goes out with the prefill leg (it then waits for the KV
    /// itself) rather than after the prefill's answer.
    pub(crate) fn sends_decode_alongside(self) -> bool {
        self == Connector::Mooncake
    }

    /// The legs of a pair attempt on this prefill rank and decode worker; an error when
    /// the prefill's peers cannot find it yet (a Mooncake engine id not learned).
    pub(crate) fn pair_legs(
        self,
        bodies: &LegBodies,
        request_id: &HeaderValue,
        prefill: &Lease,
        decode: &Worker,
    ) -> Result<PairLegs, NotNamed> {
        let id = self.leg_id(request_id, prefill.worker(), decode);
        Ok(match self {
            Connector::Nixl => PairLegs { id, prefill: bodies.prefill_leg(Some(&NIXL_PREFILL_PARAMS)), decode_alongside: None },
            Connector::P2pNccl => PairLegs { id, prefill: bodies.prefill_leg(None), decode_alongside: None },
            Connector::Mooncake => {
                let worker = prefill.worker();
                let rank = prefill.rank();
                let engine_id = worker.engine_id(rank).ok_or_else(|| NotNamed::EngineId { url: worker.url.clone(), rank })?;
                let bootstrap = worker.kv_address.as_deref().ok_or_else(|| NotNamed::Bootstrap { url: worker.url.clone() })?;
                let transfer_id = format!("xfer-{}", uuid::Uuid::new_v4().simple());
                PairLegs {
                    id,
                    prefill: bodies.prefill_leg(Some(&kv_params::Mooncake::prefill(&transfer_id).to_bytes())),
                    decode_alongside: Some(
                        bodies.decode(Some(&kv_params::Mooncake::decode(bootstrap, &engine_id, &transfer_id).to_bytes())),
                    ),
                }
            }
        })
    }

    /// The decode leg of a connector that sends it after the prefill, given what the
    /// prefill answered with.
    pub(crate) fn decode_body(self, bodies: &LegBodies, params: Option<&[u8]>) -> Pieces {
        match self {
            Connector::Nixl | Connector::Mooncake => bodies.decode(params),
            Connector::P2pNccl => bodies.colocated(),
        }
    }

    /// The request id both legs of this pair carry. NIXL, Mooncake: the request's own.
    /// P2pNccl: one naming both KV addresses, never the client's (its markers would steer
    /// the engines).
    fn leg_id(self, request_id: &HeaderValue, prefill: &Worker, decode: &Worker) -> HeaderValue {
        match self {
            Connector::Nixl | Connector::Mooncake => request_id.clone(),
            Connector::P2pNccl => {
                // Every P2pNccl worker came from discovery, with its checked address
                // (discovery.rs; the admin API refuses to add one without).
                let kv = |w: &Worker| w.kv_address.clone().unwrap_or_default();
                let uuid = uuid::Uuid::new_v4().simple();
                let id = crate::api::connector::p2p_request_id(&kv(prefill), &kv(decode), &uuid.to_string());
                // The addresses are checked header-safe; were one not, a bare uuid still
                // names no address of a client's choosing.
                HeaderValue::from_str(&id).unwrap_or_else(|_| HeaderValue::from_str(&uuid.to_string()).expect("hex is a valid header"))
            }
        }
    }

    /// Whether a decode that failed without touching the KV leaves it for another decode.
    /// P2pNccl's prefill pushed it to the decode the id names: a new pair is needed.
    /// Mooncake's prefill holds it under the transfer id for whichever decode asks.
    pub(crate) fn kv_can_go_to_another_decode(self) -> bool {
        self != Connector::P2pNccl
    }
}
