//! The simulator's KV side channel (vLLM: the NIXL side channel on
//! VLLM_NIXL_SIDE_CHANNEL_PORT + DP rank). A decode connects to the prefill over real
//! loopback TCP and sends one JSON line; the prefill answers one JSON line.
//!
//!   {"op":"read","engine_id":E,"request_id":R,"block_ids":[..]} -> {"ok":true,"contents":[..]}
//!   {"op":"free","request_id":R}                               -> {"ok":true,"freed":bool}
//!   any failure                                                -> {"ok":false,"error":".."}

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

use super::engine::Engine;
use super::transfer::PullError;
use super::request::RemoteKv;

#[derive(Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Request {
    Read { engine_id: String, request_id: String, block_ids: Vec<u32> },
    Free { request_id: String },
}

#[derive(Serialize, Deserialize, Default)]
struct Reply {
    ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    contents: Option<Vec<u64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    freed: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

const MAX_LINE: u64 = 4 << 20;

pub async fn serve(listener: TcpListener, engine: Arc<Engine>) {
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
        Err(e) => Reply { error: Some(format!("bad side channel request: {e}")), ..Reply::default() },
        Ok(Request::Read { engine_id, request_id, block_ids }) => {
            match engine.serve_read(&engine_id, &request_id, &block_ids) {
                Ok(contents) => Reply { ok: true, contents: Some(contents), ..Reply::default() },
                Err(e) => Reply { error: Some(e), ..Reply::default() },
            }
        }
        Ok(Request::Free { request_id }) => {
            Reply { ok: true, freed: Some(engine.serve_free(&request_id)), ..Reply::default() }
        }
    };
    let mut out = serde_json::to_vec(&reply).expect("reply serialises");
    out.push(b'\n');
    wr.write_all(&out).await?;
    wr.shutdown().await
}

fn host_of(remote: &RemoteKv) -> &str {
    remote.host.trim_start_matches('[').trim_end_matches(']')
}

async fn exchange(remote: &RemoteKv, req: &Request, deadline: Instant) -> Result<Reply, String> {
    let addr = (host_of(remote), remote.port);
    let mut last_err = String::from("timed out");
    // Keep trying while the prefill is unreachable, as NIXL's handshake does, up to the deadline.
    let stream = loop {
        match tokio::time::timeout_at(deadline, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => break s,
            Ok(Err(e)) => last_err = e.to_string(),
            Err(_) => {}
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(format!("cannot reach the prefill's side channel {}:{}: {last_err}", remote.host, remote.port));
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
        .map_err(|_| format!("side channel {}:{} did not answer in time", remote.host, remote.port))?
        .map_err(|e| format!("side channel {}:{}: {e}", remote.host, remote.port))?;
    serde_json::from_str(&line).map_err(|e| format!("side channel {}:{} answered garbage: {e}", remote.host, remote.port))
}

/// Pulls the blocks `remote` names; returns their contents.
pub async fn read(remote: &RemoteKv, timeout: Duration) -> Result<Vec<u64>, PullError> {
    let req = Request::Read {
        engine_id: remote.engine_id.clone(),
        request_id: remote.request_id.clone(),
        block_ids: remote.block_ids.clone(),
    };
    let reply = exchange(remote, &req, Instant::now() + timeout).await.map_err(PullError::Load)?;
    match (reply.ok, reply.contents) {
        (true, Some(contents)) => Ok(contents),
        _ => Err(PullError::Load(reply.error.unwrap_or_else(|| "the prefill refused the read".into()))),
    }
}

/// Tells the prefill to free blocks a decode will never pull. Best effort, as in vLLM.
pub async fn free(remote: &RemoteKv) {
    let req = Request::Free { request_id: remote.request_id.clone() };
    if let Err(e) = exchange(remote, &req, Instant::now() + Duration::from_secs(5)).await {
        tracing::warn!("could not tell the prefill to free {}: {e}", remote.request_id);
    }
}
