//! The simulator's KV side channel: the one TCP listener per DP engine through which
//! simulated engines move KV (vLLM: NIXL's side channel on VLLM_NIXL_SIDE_CHANNEL_PORT + DP
//! rank, Mooncake's worker address, P2pNccl's zmq address). A peer connects over real
//! loopback TCP and sends one JSON line; the engine answers one JSON line. This wire is
//! the simulator's own; only simulators speak it.
//!
//!   {"op":"read","engine_id":E,"request_id":R,"block_ids":[..]}       -> {"ok":true,"contents":[..]}   NIXL
//!   {"op":"free","request_id":R}                                      -> {"ok":true,"freed":bool}      NIXL, Mooncake
//!   {"op":"take","engine_id":E,"transfer_id":T,"skip":N,"wait_ms":W}  -> {"ok":true,"contents":[..],"blocks":B}
//!                                                                      | {"ok":false,"pending":true}   Mooncake
//!   {"op":"put","key":K,"contents":[..]}                              -> {"ok":true}                   P2pNccl
//!   any failure                                                       -> {"ok":false,"error":".."}

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

use super::Engine;

/// A peer's side channel.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Peer {
    /// As written in params (IPv6 may be in brackets).
    pub(crate) host: String,
    pub(crate) port: u16,
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Request {
    Read { engine_id: String, request_id: String, block_ids: Vec<u32> },
    Free { request_id: String },
    Take { engine_id: String, transfer_id: String, skip: usize, wait_ms: u64 },
    Put { key: String, contents: Vec<u64> },
}

#[derive(Serialize, Deserialize, Default)]
struct Reply {
    ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    contents: Option<Vec<u64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    blocks: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    freed: Option<bool>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pending: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

impl Reply {
    fn failed(e: String) -> Reply {
        Reply { error: Some(e), ..Reply::default() }
    }
}

const MAX_LINE: u64 = 4 << 20;
/// The longest a `take` may wait on the prefill side before answering `pending`.
const MAX_TAKE_WAIT: Duration = Duration::from_secs(5);

pub(crate) async fn serve(listener: TcpListener, engine: Arc<Engine>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let engine = engine.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(stream, &engine).await {
                tracing::debug!("side channel connection: {e}");
            }
        });
    }
}

async fn handle(stream: TcpStream, engine: &Engine) -> std::io::Result<()> {
    let (rd, mut wr) = stream.into_split();
    let mut line = String::new();
    BufReader::new(rd.take(MAX_LINE)).read_line(&mut line).await?;
    let reply = match serde_json::from_str::<Request>(&line) {
        Err(e) => Reply::failed(format!("bad side channel request: {e}")),
        Ok(Request::Read { engine_id, request_id, block_ids }) => match engine.serve_read(&engine_id, &request_id, &block_ids) {
            Ok(contents) => Reply { ok: true, contents: Some(contents), ..Reply::default() },
            Err(e) => Reply::failed(e),
        },
        Ok(Request::Free { request_id }) => Reply { ok: true, freed: Some(engine.serve_free(&request_id)), ..Reply::default() },
        Ok(Request::Take { engine_id, transfer_id, skip, wait_ms }) => {
            let wait = Duration::from_millis(wait_ms).min(MAX_TAKE_WAIT);
            match engine.serve_take(&engine_id, &transfer_id, skip, wait).await {
                Ok(Some((contents, blocks))) => Reply { ok: true, contents: Some(contents), blocks: Some(blocks), ..Reply::default() },
                Ok(None) => Reply { pending: true, ..Reply::default() },
                Err(e) => Reply::failed(e),
            }
        }
        Ok(Request::Put { key, contents }) => {
            engine.serve_put(key, contents);
            Reply { ok: true, ..Reply::default() }
        }
    };
    let mut out = serde_json::to_vec(&reply).expect("reply serialises");
    out.push(b'\n');
    wr.write_all(&out).await?;
    wr.shutdown().await
}

async fn exchange(peer: &Peer, req: &Request, deadline: Instant) -> Result<Reply, String> {
    let host = peer.host.trim_start_matches('[').trim_end_matches(']');
    let mut last_err = String::from("timed out");
    // Keep trying while the peer is unreachable, as NIXL's handshake does, up to the deadline.
    let stream = loop {
        match tokio::time::timeout_at(deadline, TcpStream::connect((host, peer.port))).await {
            Ok(Ok(s)) => break s,
            Ok(Err(e)) => last_err = e.to_string(),
            Err(_) => {}
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(format!("cannot reach the side channel {}:{}: {last_err}", peer.host, peer.port));
        }
        tokio::time::sleep_until((now + Duration::from_millis(100)).min(deadline)).await;
    };
    let io = async {
        let (rd, mut wr) = stream.into_split();
        let mut out = serde_json::to_vec(req).expect("request serialises");
        out.push(b'\n');
        wr.write_all(&out).await?;
        let mut line = String::new();
        BufReader::new(rd.take(MAX_LINE)).read_line(&mut line).await?;
        Ok::<_, std::io::Error>(line)
    };
    let line = tokio::time::timeout_at(deadline, io)
        .await
        .map_err(|_| format!("side channel {}:{} did not answer in time", peer.host, peer.port))?
        .map_err(|e| format!("side channel {}:{}: {e}", peer.host, peer.port))?;
    serde_json::from_str(&line).map_err(|e| format!("side channel {}:{} answered garbage: {e}", peer.host, peer.port))
}

fn refused(reply: Reply, what: &str) -> String {
    reply.error.unwrap_or_else(|| format!("the peer refused the {what}"))
}

/// NIXL: reads the named blocks; returns their contents.
pub(crate) async fn read(peer: &Peer, engine_id: &str, request_id: &str, block_ids: &[u32], timeout: Duration) -> Result<Vec<u64>, String> {
    let req = Request::Read { engine_id: engine_id.into(), request_id: request_id.into(), block_ids: block_ids.to_vec() };
    let mut reply = exchange(peer, &req, Instant::now() + timeout).await?;
    match reply.contents.take() {
        Some(contents) if reply.ok => Ok(contents),
        _ => Err(refused(reply, "read")),
    }
}

/// Mooncake: takes the blocks held under `transfer_id` from the `skip`th on, waiting up to
/// `wait` for the prefill to hold them. `Ok(None)`: not held yet.
pub(crate) async fn take(
    peer: &Peer,
    engine_id: &str,
    transfer_id: &str,
    skip: usize,
    wait: Duration,
    connect: Duration,
) -> Result<Option<(Vec<u64>, usize)>, String> {
    let req = Request::Take { engine_id: engine_id.into(), transfer_id: transfer_id.into(), skip, wait_ms: wait.as_millis() as u64 };
    let reply = exchange(peer, &req, Instant::now() + connect + wait).await?;
    match (reply.ok, reply.pending, reply.contents, reply.blocks) {
        (true, _, Some(contents), Some(blocks)) => Ok(Some((contents, blocks))),
        (false, true, _, _) => Ok(None),
        (_, _, _, _) => Err(reply.error.unwrap_or_else(|| "the prefill refused the transfer".into())),
    }
}

/// P2pNccl: pushes a prompt's blocks to the decode under `key`.
pub(crate) async fn put(peer: &Peer, key: &str, contents: Vec<u64>, timeout: Duration) -> Result<(), String> {
    let reply = exchange(peer, &Request::Put { key: key.into(), contents }, Instant::now() + timeout).await?;
    if reply.ok {
        Ok(())
    } else {
        Err(refused(reply, "push"))
    }
}

/// Tells a prefill to free blocks a decode will never take. Best effort, as in vLLM.
pub(crate) async fn free(peer: &Peer, key: &str) {
    let req = Request::Free { request_id: key.into() };
    if let Err(e) = exchange(peer, &req, Instant::now() + Duration::from_secs(5)).await {
        tracing::warn!("could not tell the prefill to free {key}: {e}");
    }
}
