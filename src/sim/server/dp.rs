//! Multi-node data parallelism in the simulator, with vLLM's three layouts and its flags
//! (vllm/engine/arg_utils.py): which ranks this process runs, whether it serves HTTP, and
//! the handshake that makes a replica whole. The first node listens on
//! `--data-parallel-address:--data-parallel-rpc-port`; every other node connects and
//! names its ranks (one JSON line); the first node is healthy only when every rank has
//! joined, and stops when a node goes away (vLLM's API server dies with an engine).
//! Simulated engines of an internal-LB replica run in the API server's process (the
//! headless node only joins): the router reaches them through that API server, as it
//! reaches vLLM's.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

use super::config::SimArgs;

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Layout {
    pub(crate) size: u16,
    /// Global ranks of the engines this process runs, in header order.
    pub(crate) engine_ranks: Vec<u16>,
    /// This process's own ranks (what it announces, or counts as joined).
    pub(crate) own: (u16, u16),
    pub(crate) headless: bool,
    /// Some(address): ranks elsewhere, handshake at this address.
    pub(crate) master: Option<(String, u16)>,
}

impl Layout {
    pub(crate) fn of(a: &SimArgs) -> Result<Layout, String> {
        let size = a.data_parallel_size;
        if let Some(r) = a.data_parallel_rank {
            if r >= size {
                return Err(format!("--data-parallel-rank {r} is not below --data-parallel-size {size}"));
            }
            if a.headless
                || a.data_parallel_hybrid_lb
                || a.data_parallel_start_rank.is_some()
                || a.data_parallel_size_local.is_some_and(|l| l != 1)
            {
                return Err("--data-parallel-rank is external LB: one rank per API server, without --headless, --data-parallel-hybrid-lb, --data-parallel-start-rank or a local size other than 1".into());
            }
            return Ok(Layout { size, engine_ranks: vec![r], own: (r, 1), headless: false, master: master(a, size > 1)? });
        }
        let local = a.data_parallel_size_local.unwrap_or(size);
        let start = a.data_parallel_start_rank.unwrap_or(0);
        if u32::from(start) + u32::from(local) > u32::from(size) {
            return Err(format!("ranks {start}..{} run past --data-parallel-size {size}", u32::from(start) + u32::from(local)));
        }
        if a.headless && a.data_parallel_hybrid_lb {
            return Err("data_parallel_hybrid_lb is not applicable in headless mode".into());
        }
        let hybrid = a.data_parallel_hybrid_lb || (a.data_parallel_start_rank.is_some() && !a.headless);
        let elsewhere = local < size;
        if a.headless {
            if !elsewhere || start == 0 {
                return Err("--headless runs a later node's ranks: give --data-parallel-start-rank and --data-parallel-size-local".into());
            }
            return Ok(Layout { size, engine_ranks: Vec::new(), own: (start, local), headless: true, master: master(a, true)? });
        }
        let engine_ranks: Vec<u16> = if hybrid || !elsewhere { (start..start + local).collect() } else { (0..size).collect() };
        if !hybrid && start > 0 {
            return Err("a node from --data-parallel-start-rank > 0 serves its own ranks (hybrid LB) or none (--headless)".into());
        }
        Ok(Layout { size, engine_ranks, own: (start, local), headless: false, master: master(a, elsewhere)? })
    }

    /// The first node (rank 0) waits for the others; the others join it.
    pub(crate) fn is_master(&self) -> bool {
        self.own.0 == 0
    }
}

fn master(a: &SimArgs, needed: bool) -> Result<Option<(String, u16)>, String> {
    if !needed {
        return Ok(None);
    }
    let host = a.data_parallel_address.clone().ok_or("ranks on several nodes need --data-parallel-address (the first node's)")?;
    Ok(Some((host, a.data_parallel_rpc_port)))
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Join {
    start: u16,
    local: u16,
}

/// The first node: waits until every rank has joined (then `joined` is set), and returns
/// an error when a node leaves.
pub(crate) async fn lead(layout: Layout, joined: Arc<AtomicBool>) -> anyhow::Result<()> {
    let (host, port) = layout.master.clone().expect("a master address");
    let listener = TcpListener::bind((host.trim_start_matches('[').trim_end_matches(']'), port))
        .await
        .with_context(|| format!("cannot listen for the other DP nodes on {host}:{port}"))?;
    let mut have: Vec<bool> = (0..layout.size).map(|r| r >= layout.own.0 && r < layout.own.0 + layout.own.1).collect();
    let (gone_tx, mut gone_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = accepted?;
                let (read, mut write) = stream.into_split();
                // Its one line, short and soon, or it is not a node of ours.
                let mut first = BufReader::new(read.take(4096));
                let mut line = String::new();
                let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(5), first.read_line(&mut line)).await else { continue };
                let Ok(j) = serde_json::from_str::<Join>(&line) else { continue };
                let read = first.into_inner().into_inner();
                let ranks = j.start..j.start.saturating_add(j.local).min(layout.size);
                for r in ranks.clone() {
                    have[r as usize] = true;
                }
                eprintln!("DP ranks {}-{} joined from {peer}", ranks.start, ranks.end.saturating_sub(1));
                let _ = write.write_all(b"ok\n").await;
                let gone = gone_tx.clone();
                tokio::spawn(async move {
                    let _keep = write;
                    until_closed(read).await;
                    let _ = gone.send(format!("DP ranks {}-{} ({peer})", ranks.start, ranks.end.saturating_sub(1)));
                });
                if have.iter().all(|h| *h) {
                    joined.store(true, Ordering::SeqCst);
                }
            }
            Some(who) = gone_rx.recv() => anyhow::bail!("{who} went away; stopping, as vLLM's API server does when an engine dies"),
        }
    }
}

/// A later node: joins the first (retrying until it listens) and returns an error when it
/// goes away.
pub(crate) async fn join(layout: Layout) -> anyhow::Result<()> {
    let (host, port) = layout.master.clone().expect("a master address");
    let addr = crate::api::join_host_port(&host, port);
    let stream = loop {
        match TcpStream::connect(&addr).await {
            Ok(s) => break s,
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    let (read, mut write) = stream.into_split();
    let line = serde_json::to_string(&Join { start: layout.own.0, local: layout.own.1 })? + "\n";
    write.write_all(line.as_bytes()).await?;
    until_closed(read).await;
    anyhow::bail!("the DP master at {addr} went away; stopping, as vLLM's engines do")
}

/// Reads (and drops) until the peer closes the connection.
async fn until_closed(mut read: tokio::net::tcp::OwnedReadHalf) {
    let mut buf = [0u8; 256];
    while matches!(read.read(&mut buf).await, Ok(n) if n > 0) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        sim: SimArgs,
    }

    fn layout(args: &str) -> Result<Layout, String> {
        let cli = Cli::try_parse_from(std::iter::once("sim").chain(args.split_whitespace())).unwrap();
        Layout::of(&cli.sim)
    }

    #[test]
    fn ranks_follow_vllms_three_layouts() {
        let m = " --data-parallel-address 127.0.0.1 --data-parallel-rpc-port 7";
        // Internal: the API server runs all 4 ranks' engines; the headless node joins.
        let l = layout(&format!("--data-parallel-size 4 --data-parallel-size-local 2{m}")).unwrap();
        assert_eq!((l.engine_ranks.clone(), l.is_master(), l.master.is_some()), (vec![0, 1, 2, 3], true, true));
        let l = layout(&format!("--data-parallel-size 4 --data-parallel-size-local 2 --data-parallel-start-rank 2 --headless{m}")).unwrap();
        assert_eq!((l.engine_ranks.len(), l.headless, l.own), (0, true, (2, 2)));
        // Hybrid: each node runs and serves its own ranks; a start rank alone means hybrid.
        let l = layout(&format!("--data-parallel-size 4 --data-parallel-size-local 2 --data-parallel-start-rank 2{m}")).unwrap();
        assert_eq!(l.engine_ranks, vec![2, 3]);
        let l = layout(&format!("--data-parallel-size 4 --data-parallel-size-local 2 --data-parallel-hybrid-lb{m}")).unwrap();
        assert_eq!(l.engine_ranks, vec![0, 1]);
        // External: one rank.
        assert_eq!(layout(&format!("--data-parallel-size 4 --data-parallel-rank 3{m}")).unwrap().engine_ranks, vec![3]);
        // All local: no handshake.
        assert_eq!(layout("--data-parallel-size 2").unwrap().master, None);
        // vLLM's own refusals.
        assert!(layout(&format!(
            "--data-parallel-size 4 --data-parallel-size-local 2 --data-parallel-start-rank 2 --headless --data-parallel-hybrid-lb{m}"
        ))
        .unwrap_err()
        .contains("headless"));
        assert!(layout("--data-parallel-size 4 --data-parallel-size-local 2").unwrap_err().contains("--data-parallel-address"));
        assert!(layout(&format!("--data-parallel-size 2 --data-parallel-rank 2{m}")).is_err());
    }
}
