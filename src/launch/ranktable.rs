//! `disagg ranktable`: vllm-ascend's ranktable.json for LLMDataDistCMgrConnector
//! (PROTOCOLS.md §4), with gen_ranktable.sh's flags. Devices are numbered node by node;
//! the first prefill-device-cnt are prefill, the next decode-device-cnt decode; cluster_id
//! counts from 1 over all of them. Run on every node as the guide says: each node reads
//! its own devices' IPs (`hccn_tool -i N -ip -g`), the first `--ips` address collects
//! every node's list over TCP (gen_ranktable's master port, 6657), and every node writes
//! the same file. `--device-ips FILE` (one line per node) builds it on one machine instead.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

#[derive(Args, Debug, Clone)]
pub(crate) struct RanktableArgs {
    /// Every node's address (server_id), prefill nodes first, in node order.
    #[arg(long, num_args = 1.., required = true)]
    pub(crate) ips: Vec<String>,
    /// NPUs per node.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) npus_per_node: u32,
    /// The NIC the nodes reach each other on: this node's address is the one of its
    /// addresses listed in --ips (gen_ranktable's GLOO_SOCKET_IFNAME).
    #[arg(long)]
    pub(crate) network_card_name: Option<String>,
    /// This node's address among --ips (default: found from the machine's addresses).
    #[arg(long)]
    pub(crate) local_host: Option<String>,
    /// Devices (counted over all nodes, in order) that serve prefill.
    #[arg(long)]
    pub(crate) prefill_device_cnt: u32,
    /// Devices after the prefill ones that serve decode.
    #[arg(long)]
    pub(crate) decode_device_cnt: u32,
    /// File of every node's device IPs, one line per node (whitespace-separated, in
    /// device order): build the table here, without hccn_tool or the other nodes.
    #[arg(long)]
    pub(crate) device_ips: Option<PathBuf>,
    /// Port the first node collects on (gen_ranktable's MASTER_PORT).
    #[arg(long, default_value_t = 6657)]
    pub(crate) master_port: u16,
    /// Seconds to wait for the other nodes.
    #[arg(long, default_value_t = 600)]
    pub(crate) timeout: u64,
    /// Where to write (default: ./ranktable.json).
    #[arg(long, default_value = "ranktable.json")]
    pub(crate) output: PathBuf,
}

fn hccn_ip(device: u32) -> anyhow::Result<String> {
    let out = std::process::Command::new("hccn_tool").args(["-i", &device.to_string(), "-ip", "-g"]).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.trim().strip_prefix("ipaddr:").map(|s| s.trim().to_string()))
        .with_context(|| format!("hccn_tool -i {device} -ip -g printed no ipaddr: {text}"))
}

pub(crate) fn build(args: &RanktableArgs, device_ips: &[Vec<String>]) -> anyhow::Result<serde_json::Value> {
    let total = args.ips.len() as u32 * args.npus_per_node;
    if args.prefill_device_cnt + args.decode_device_cnt > total {
        bail!(
            "--prefill-device-cnt {} + --decode-device-cnt {} is more than the {total} devices of {} node(s) x {}",
            args.prefill_device_cnt,
            args.decode_device_cnt,
            args.ips.len(),
            args.npus_per_node
        );
    }
    let (mut prefill, mut decode) = (Vec::new(), Vec::new());
    let mut n = 0u32;
    for (node, server) in args.ips.iter().enumerate() {
        for dev in 0..args.npus_per_node {
            if n >= args.prefill_device_cnt + args.decode_device_cnt {
                break;
            }
            let ip = device_ips
                .get(node)
                .and_then(|l| l.get(dev as usize))
                .with_context(|| format!("no IP for device {dev} of node {node} ({server})"))?;
            let entry = json!({"server_id": server, "device_id": dev.to_string(), "device_ip": ip, "cluster_id": (n + 1).to_string()});
            if n < args.prefill_device_cnt {
                prefill.push(entry);
            } else {
                decode.push(entry);
            }
            n += 1;
        }
    }
    Ok(json!({"version": "1.2", "server_count": args.ips.len().to_string(), "prefill_device_list": prefill,
        "decode_device_list": decode, "status": "completed"}))
}

/// This node's address among `ips`: --local-host, or an address of this machine (of
/// --network-card-name's interface when given) that is listed.
fn local_rank(args: &RanktableArgs) -> anyhow::Result<usize> {
    if let Some(h) = &args.local_host {
        return args.ips.iter().position(|ip| ip == h).with_context(|| format!("--local-host {h} is not among --ips"));
    }
    let mine = interface_addresses(args.network_card_name.as_deref());
    args.ips.iter().position(|ip| mine.contains(ip)).with_context(|| {
        format!(
            "none of this machine's addresses{} ({}) is among --ips; say which with --local-host",
            args.network_card_name.as_ref().map(|n| format!(" on {n}")).unwrap_or_default(),
            mine.join(", ")
        )
    })
}

fn interface_addresses(nic: Option<&str>) -> Vec<String> {
    let mut out = Vec::new();
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list` with a linked list freed below with freeifaddrs.
    unsafe {
        if libc::getifaddrs(&mut list) != 0 {
            return out;
        }
        let mut cur = list;
        while !cur.is_null() {
            let ifa = &*cur;
            let name = std::ffi::CStr::from_ptr(ifa.ifa_name).to_string_lossy();
            if !ifa.ifa_addr.is_null() && nic.is_none_or(|n| n == name) {
                match (*ifa.ifa_addr).sa_family as i32 {
                    libc::AF_INET => {
                        let a = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                        out.push(std::net::Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)).to_string());
                    }
                    libc::AF_INET6 => {
                        let a = &*(ifa.ifa_addr as *const libc::sockaddr_in6);
                        out.push(std::net::Ipv6Addr::from(a.sin6_addr.s6_addr).to_string());
                    }
                    _ => {}
                }
            }
            cur = ifa.ifa_next;
        }
        libc::freeifaddrs(list);
    }
    out
}

/// This node's device IPs, from hccn_tool.
fn own_device_ips(npus: u32) -> anyhow::Result<Vec<String>> {
    if std::process::Command::new("hccn_tool").arg("-h").output().is_err() {
        bail!("hccn_tool is not installed here: pass --device-ips FILE (one line per node with its device IPs)");
    }
    (0..npus).map(hccn_ip).collect()
}

#[derive(serde::Serialize, serde::Deserialize)]
struct NodeDevices {
    node: usize,
    device_ips: Vec<String>,
}

/// How long one connection to the first node has to send its line.
const LINE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections the first node reads at once.
const READING_AT_ONCE: usize = 64;

/// A line as the first node received it, where it came from, and the way back.
struct Arrival {
    from: SocketAddr,
    line: Result<String, String>,
    reply: tokio::net::tcp::OwnedWriteHalf,
}

/// Each node's addresses (--ips resolved), to check where a line comes from.
async fn node_addresses(ips: &[String]) -> anyhow::Result<Vec<Vec<IpAddr>>> {
    let mut out = Vec::new();
    for ip in ips {
        let bare = ip.trim_start_matches('[').trim_end_matches(']');
        let addrs: Vec<IpAddr> = match bare.parse::<IpAddr>() {
            Ok(a) => vec![a],
            Err(_) => {
                tokio::net::lookup_host((bare, 0)).await.with_context(|| format!("--ips {ip} does not resolve"))?.map(|a| a.ip()).collect()
            }
        };
        out.push(addrs.into_iter().map(|a| a.to_canonical()).collect());
    }
    Ok(out)
}

/// One connection's line: at most 1 MiB, within LINE_TIMEOUT.
async fn read_line(stream: TcpStream, from: SocketAddr, tx: tokio::sync::mpsc::Sender<Arrival>, _slot: tokio::sync::OwnedSemaphorePermit) {
    let (read, reply) = stream.into_split();
    let mut line = String::new();
    let line = match tokio::time::timeout(LINE_TIMEOUT, BufReader::new(read.take(1 << 20)).read_line(&mut line)).await {
        Ok(Ok(0)) => Err("closed without a line".to_string()),
        Ok(Ok(_)) => Ok(line),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no line within {}s", LINE_TIMEOUT.as_secs())),
    };
    let _ = tx.send(Arrival { from, line, reply }).await;
}

/// Which node a line is from, checked: its rank is one of the others, it came from that
/// node's own address, and that node has not sent one already.
fn accept_line(arrival: &Arrival, addresses: &[Vec<IpAddr>], lists: &[Option<Vec<String>>]) -> Result<NodeDevices, String> {
    let line = arrival.line.as_ref().map_err(Clone::clone)?;
    let got: NodeDevices = serde_json::from_str(line).map_err(|e| format!("not a device list: {e}"))?;
    if got.node == 0 || got.node >= lists.len() {
        return Err(format!("node rank {} is not one of 1..{}", got.node, lists.len()));
    }
    let from = arrival.from.ip().to_canonical();
    if !addresses[got.node].contains(&from) {
        return Err(format!("node {}'s list came from {from}, not from that node", got.node));
    }
    if lists[got.node].is_some() {
        return Err(format!("node {} sent its list already", got.node));
    }
    Ok(got)
}

/// The first node: every other node's device list, each taken only from that node's own
/// address, once; lines are read several at a time, each within LINE_TIMEOUT, and a bad
/// or foreign one is logged and skipped (the gather goes on until the deadline).
async fn collect(args: &RanktableArgs, mine: Vec<String>, deadline: Instant) -> anyhow::Result<serde_json::Value> {
    let n = args.ips.len();
    let master = crate::api::join_host_port(&args.ips[0], args.master_port);
    let addresses = node_addresses(&args.ips).await?;
    let listener = TcpListener::bind((args.ips[0].trim_start_matches('[').trim_end_matches(']'), args.master_port))
        .await
        .with_context(|| format!("cannot listen on {master} for the other nodes"))?;
    let mut lists: Vec<Option<Vec<String>>> = vec![None; n];
    lists[0] = Some(mine);
    let mut peers = Vec::new();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Arrival>(READING_AT_ONCE);
    let reading = std::sync::Arc::new(tokio::sync::Semaphore::new(READING_AT_ONCE));
    let timed_out = |lists: &[Option<Vec<String>>]| {
        let missing: Vec<&str> = lists.iter().enumerate().filter(|(_, l)| l.is_none()).map(|(i, _)| args.ips[i].as_str()).collect();
        anyhow::anyhow!("no device list from {} after {}s", missing.join(", "), args.timeout)
    };
    while lists.iter().any(Option::is_none) {
        let left = deadline.saturating_duration_since(Instant::now());
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, from) = accepted?;
                match reading.clone().try_acquire_owned() {
                    Ok(slot) => { tokio::spawn(read_line(stream, from, tx.clone(), slot)); }
                    Err(_) => eprintln!("ranktable: {from} refused: {READING_AT_ONCE} connections are being read already"),
                }
            }
            Some(arrival) = rx.recv() => match accept_line(&arrival, &addresses, &lists) {
                Ok(got) => {
                    lists[got.node] = Some(got.device_ips);
                    peers.push(arrival.reply);
                }
                Err(why) => eprintln!("ranktable: a line from {} skipped: {why}", arrival.from),
            },
            () = tokio::time::sleep(left) => return Err(timed_out(&lists)),
        }
    }
    let lists: Vec<Vec<String>> = lists.into_iter().map(Option::unwrap_or_default).collect();
    let table = build(args, &lists)?;
    let line = serde_json::to_string(&table)? + "\n";
    for mut p in peers {
        p.write_all(line.as_bytes()).await?;
    }
    Ok(table)
}

/// Every node's device IPs: the first node collects them and sends the table back.
async fn gather(args: &RanktableArgs, rank: usize, mine: Vec<String>) -> anyhow::Result<serde_json::Value> {
    let master = crate::api::join_host_port(&args.ips[0], args.master_port);
    let deadline = Instant::now() + Duration::from_secs(args.timeout);
    if rank == 0 {
        return collect(args, mine, deadline).await;
    }
    // From this node's own address: the first node takes a node's list only from there.
    let own: IpAddr =
        node_addresses(&args.ips[rank..=rank]).await?.remove(0).first().copied().context("this node's address does not resolve")?;
    let stream = loop {
        let socket = if own.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
        socket.bind(SocketAddr::new(own, 0)).with_context(|| format!("cannot send from this node's address {own}"))?;
        let to = tokio::net::lookup_host(&master).await?.next().with_context(|| format!("{master} does not resolve"))?;
        match socket.connect(to).await {
            Ok(s) => break s,
            Err(e) if Instant::now() > deadline => bail!("cannot reach the first node at {master}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    let (read, mut write) = stream.into_split();
    write.write_all((serde_json::to_string(&NodeDevices { node: rank, device_ips: mine })? + "\n").as_bytes()).await?;
    let mut line = String::new();
    let left = deadline.saturating_duration_since(Instant::now());
    tokio::time::timeout(left, BufReader::new(read.take(16 << 20)).read_line(&mut line))
        .await
        .context("the first node sent no table in time")??;
    serde_json::from_str(&line).context("the first node sent no table (did it fail? see its output)")
}

pub(crate) async fn run(args: RanktableArgs) -> anyhow::Result<()> {
    let table = match &args.device_ips {
        Some(p) => {
            let lists: Vec<Vec<String>> = std::fs::read_to_string(p)
                .with_context(|| format!("cannot read {}", p.display()))?
                .lines()
                .filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
                .map(|l| l.split_whitespace().map(str::to_owned).collect())
                .collect();
            build(&args, &lists)?
        }
        None => {
            let rank = local_rank(&args)?;
            let mine = own_device_ips(args.npus_per_node)?;
            if args.ips.len() == 1 {
                build(&args, &[mine])?
            } else {
                println!(
                    "node {rank} of {} ({}): {} device IPs; gathering at {}",
                    args.ips.len(),
                    args.ips[rank],
                    mine.len(),
                    crate::api::join_host_port(&args.ips[0], args.master_port)
                );
                gather(&args, rank, mine).await?
            }
        }
    };
    std::fs::write(&args.output, serde_json::to_string_pretty(&table)? + "\n")
        .with_context(|| format!("cannot write {}", args.output.display()))?;
    println!(
        "wrote {} ({} prefill, {} decode devices); point DISAGGREGATED_PREFILL_RANK_TABLE_PATH at it on every node",
        args.output.display(),
        args.prefill_device_cnt,
        args.decode_device_cnt
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_split_in_node_order_with_one_based_cluster_ids() {
        let args = RanktableArgs {
            ips: vec!["172.19.32.175".into(), "172.19.123.51".into()],
            npus_per_node: 2,
            prefill_device_cnt: 3,
            decode_device_cnt: 1,
            device_ips: None,
            network_card_name: None,
            local_host: None,
            master_port: 6657,
            timeout: 1,
            output: "x".into(),
        };
        let ips = vec![vec!["29.7.1.1".into(), "29.7.1.2".into()], vec!["29.7.2.1".into(), "29.7.2.2".into()]];
        let t = build(&args, &ips).unwrap();
        assert_eq!(t["version"], "1.2");
        assert_eq!(t["server_count"], "2");
        assert_eq!(t["status"], "completed");
        assert_eq!(t["prefill_device_list"].as_array().unwrap().len(), 3);
        assert_eq!(
            t["prefill_device_list"][2],
            json!({"server_id": "172.19.123.51", "device_id": "0", "device_ip": "29.7.2.1", "cluster_id": "3"})
        );
        assert_eq!(
            t["decode_device_list"],
            json!([{"server_id": "172.19.123.51", "device_id": "1", "device_ip": "29.7.2.2", "cluster_id": "4"}])
        );
        let too_many = RanktableArgs { prefill_device_cnt: 4, decode_device_cnt: 1, ..args };
        assert!(build(&too_many, &ips).unwrap_err().to_string().contains("more than the 4 devices"));
    }
}
