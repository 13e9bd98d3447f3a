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
use bytes::Bytes;

use super::request::{LegBodies, NIXL_PREFILL_PARAMS};
use super::workers::{Lease, Worker};

/// The legs of one pair attempt.
pub struct PairLegs {
    /// The request id both legs carry.
    pub id: HeaderValue,
    pub prefill: Bytes,
    /// The decode leg, when it is sent alongside the prefill (it then waits for the KV
    /// itself); otherwise it is made from the prefill's answer (`Connector::decode_body`).
    pub decode_alongside: Option<Bytes>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Connector {
    /// NixlConnector (also vllm-ascend's LLMDataDistCMgrConnector).
    Nixl,
    /// P2pNcclConnector (xPyD with ZMQ service discovery).
    #[value(name = "p2pnccl")]
    P2pNccl,
    /// MooncakeConnector (prefill bootstrap servers; `--prefill URL BOOTSTRAP_PORT`).
    Mooncake,
}

/// Where a prefill's Mooncake bootstrap server listens when `--prefill URL` names no port
/// (vLLM's VLLM_MOONCAKE_BOOTSTRAP_PORT default).
pub const MOONCAKE_BOOTSTRAP_PORT: u16 = 8998;

impl Connector {
    pub fn as_str(self) -> &'static str {
        match self {
            Connector::Nixl => "nixl",
            Connector::P2pNccl => "p2pnccl",
            Connector::Mooncake => "mooncake",
        }
    }

    /// Whether the decode leg goes out with the prefill leg (it then waits for the KV
    /// itself) rather than after the prefill's answer.
    pub fn sends_decode_alongside(self) -> bool {
        self == Connector::Mooncake
    }

    /// The legs of a pair attempt on this prefill rank and decode worker; an error when
    /// the prefill's peers cannot find it yet (a Mooncake engine id not learned).
    pub fn pair_legs(self, bodies: &LegBodies, request_id: &HeaderValue, prefill: &Lease, decode: &Worker) -> Result<PairLegs, String> {
        let id = self.leg_id(request_id, prefill.worker(), decode);
        Ok(match self {
            Connector::Nixl => PairLegs { id, prefill: bodies.prefill_leg(Some(NIXL_PREFILL_PARAMS)), decode_alongside: None },
            Connector::P2pNccl => PairLegs { id, prefill: bodies.prefill_leg(None), decode_alongside: None },
            Connector::Mooncake => {
                let worker = prefill.worker();
                let rank = prefill.rank();
                let engine_id = worker.engine_id(rank).ok_or_else(|| format!("no Mooncake engine id known for {} rank {rank}", worker.url))?;
                let bootstrap = worker.kv_address.as_deref().ok_or_else(|| format!("no Mooncake bootstrap address for {}", worker.url))?;
                let transfer_id = format!("xfer-{}", uuid::Uuid::new_v4().simple());
                let prefill_params = serde_json::json!({"do_remote_decode": true, "do_remote_prefill": false, "transfer_id": transfer_id});
                let decode_params = serde_json::json!({"do_remote_decode": false, "do_remote_prefill": true,
                    "remote_bootstrap_addr": bootstrap, "remote_engine_id": engine_id, "transfer_id": transfer_id});
                PairLegs {
                    id,
                    prefill: bodies.prefill_leg(Some(&serde_json::to_vec(&prefill_params).expect("a JSON value serializes"))),
                    decode_alongside: Some(bodies.decode(Some(&serde_json::to_vec(&decode_params).expect("a JSON value serializes")))),
                }
            }
        })
    }

    /// The decode leg of a connector that sends it after the prefill, given what the
    /// prefill answered with.
    pub fn decode_body(self, bodies: &LegBodies, params: Option<&[u8]>) -> Bytes {
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
                let id = format!("___prefill_addr_{}___decode_addr_{}_{uuid}", kv(prefill), kv(decode));
                // The addresses are checked header-safe; were one not, a bare uuid still
                // names no address of a client's choosing.
                HeaderValue::from_str(&id).unwrap_or_else(|_| HeaderValue::from_str(&uuid.to_string()).expect("hex is a valid header"))
            }
        }
    }

    /// Whether a decode that failed without touching the KV leaves it for another decode.
    /// P2pNccl's prefill pushed it to the decode the id names: a new pair is needed.
    /// Mooncake's prefill holds it under the transfer id for whichever decode asks.
    pub fn kv_can_go_to_another_decode(self) -> bool {
        self != Connector::P2pNccl
    }
}

/// A Mooncake prefill's bootstrap server: its URL's host (IPv6 in brackets) at `port`.
pub fn mooncake_bootstrap(url: &str, port: u16) -> String {
    // `host_str` keeps IPv6 brackets, which join_host_port leaves as they are.
    let host = reqwest::Url::parse(url).ok().and_then(|u| u.host_str().map(str::to_owned)).unwrap_or_default();
    format!("http://{}", super::cli::join_host_port(&host, port))
}

/// A Mooncake prefill's engine ids, one per DP rank, from its bootstrap server:
/// `GET {bootstrap}/query` answers `{"<dp_rank>": {"engine_id": .., "worker_addr": ..}}`.
/// An error unless it lists exactly ranks 0..dp_size.
pub async fn mooncake_engine_ids(client: &reqwest::Client, bootstrap: &str, dp_size: usize) -> Result<Vec<String>, String> {
    let url = format!("{bootstrap}/query");
    let resp = client.get(&url).send().await.map_err(|e| format!("{url}: {e}"))?;
    if !resp.status().is_success() {
        return Err(format!("{url} answered {}", resp.status()));
    }
    // A registry of a few ranks is small; a larger answer is cut off.
    let body = http_body_util::BodyExt::collect(http_body_util::Limited::new(reqwest::Body::from(resp), 1 << 20))
        .await
        .map_err(|e| format!("{url}: {e}"))?
        .to_bytes();
    let map: std::collections::HashMap<String, serde_json::Value> =
        serde_json::from_slice(&body).map_err(|e| format!("{url} did not answer a JSON object: {e}"))?;
    let ids: Vec<String> = (0..dp_size)
        .map(|r| map.get(&r.to_string()).and_then(|e| e.get("engine_id")).and_then(|v| v.as_str()).map(str::to_owned))
        .collect::<Option<_>>()
        .ok_or_else(|| format!("{url} lists DP ranks {:?}, not 0..{dp_size} as configured", sorted_keys(&map)))?;
    if map.len() != dp_size {
        return Err(format!("{url} lists {} DP ranks {:?}; the router was told {dp_size}", map.len(), sorted_keys(&map)));
    }
    Ok(ids)
}

fn sorted_keys(map: &std::collections::HashMap<String, serde_json::Value>) -> Vec<&str> {
    let mut k: Vec<&str> = map.keys().map(String::as_str).collect();
    k.sort();
    k
}
