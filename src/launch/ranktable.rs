//! `disagg ranktable`: vllm-ascend's ranktable.json for LLMDataDistCMgrConnector
//! (PROTOCOLS.md §4). Devices are numbered node by node; the first prefill-device-cnt
//! are prefill, the next decode-device-cnt decode; cluster_id counts from 1 over all of
//! them. Device IPs come from `hccn_tool -i N -ip -g` when it is installed, else from a
//! --device-ips file (one line per node: the IPs of its devices, in device order).

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;
use serde_json::json;

#[derive(Args, Debug, Clone)]
pub struct RanktableArgs {
    /// Node IPs (server_id), in node order.
    #[arg(long, num_args = 1.., required = true)]
    pub ips: Vec<String>,
    /// NPUs per node.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..))]
    pub npus_per_node: u32,
    /// Devices (counted over all nodes, in order) that serve prefill.
    #[arg(long)]
    pub prefill_device_cnt: u32,
    /// Devices after the prefill ones that serve decode.
    #[arg(long)]
    pub decode_device_cnt: u32,
    /// File of device IPs, one line per node (whitespace-separated, in device order),
    /// used when hccn_tool is not installed.
    #[arg(long)]
    pub device_ips: Option<PathBuf>,
    /// Where to write (default: ./ranktable.json).
    #[arg(long, default_value = "ranktable.json")]
    pub output: PathBuf,
}

fn hccn_ip(device: u32) -> anyhow::Result<String> {
    let out = std::process::Command::new("hccn_tool").args(["-i", &device.to_string(), "-ip", "-g"]).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.trim().strip_prefix("ipaddr:").map(|s| s.trim().to_string()))
        .with_context(|| format!("hccn_tool -i {device} -ip -g printed no ipaddr: {text}"))
}

pub fn build(args: &RanktableArgs, device_ips: &[Vec<String>]) -> anyhow::Result<serde_json::Value> {
    let total = args.ips.len() as u32 * args.npus_per_node;
    if args.prefill_device_cnt + args.decode_device_cnt > total {
        bail!(
            "--prefill-device-cnt {} + --decode-device-cnt {} is more than the {total} devices of {} node(s) x {}",
            args.prefill_device_cnt, args.decode_device_cnt, args.ips.len(), args.npus_per_node
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

pub fn run(args: RanktableArgs) -> anyhow::Result<()> {
    let device_ips: Vec<Vec<String>> = match &args.device_ips {
        Some(p) => std::fs::read_to_string(p)
            .with_context(|| format!("cannot read {}", p.display()))?
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
            .map(|l| l.split_whitespace().map(str::to_owned).collect())
            .collect(),
        None => {
            if std::process::Command::new("hccn_tool").arg("-h").output().is_err() {
                bail!("hccn_tool is not installed here: pass --device-ips FILE (one line per node with its device IPs)");
            }
            if args.ips.len() > 1 {
                bail!("hccn_tool only sees this node's devices: for {} nodes pass --device-ips FILE", args.ips.len());
            }
            vec![(0..args.npus_per_node).map(hccn_ip).collect::<anyhow::Result<Vec<_>>>()?]
        }
    };
    let table = build(&args, &device_ips)?;
    std::fs::write(&args.output, serde_json::to_string_pretty(&table)? + "\n")
        .with_context(|| format!("cannot write {}", args.output.display()))?;
    println!("wrote {} ({} prefill, {} decode devices); point DISAGGREGATED_PREFILL_RANK_TABLE_PATH at it on every node",
        args.output.display(), args.prefill_device_cnt, args.decode_device_cnt);
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
            output: "x".into(),
        };
        let ips = vec![vec!["29.7.1.1".into(), "29.7.1.2".into()], vec!["29.7.2.1".into(), "29.7.2.2".into()]];
        let t = build(&args, &ips).unwrap();
        assert_eq!(t["version"], "1.2");
        assert_eq!(t["server_count"], "2");
        assert_eq!(t["status"], "completed");
        assert_eq!(t["prefill_device_list"].as_array().unwrap().len(), 3);
        assert_eq!(t["prefill_device_list"][2], json!({"server_id": "172.19.123.51", "device_id": "0", "device_ip": "29.7.2.1", "cluster_id": "3"}));
        assert_eq!(t["decode_device_list"], json!([{"server_id": "172.19.123.51", "device_id": "1", "device_ip": "29.7.2.2", "cluster_id": "4"}]));
        let too_many = RanktableArgs { prefill_device_cnt: 4, decode_device_cnt: 1, ..args };
        assert!(build(&too_many, &ips).unwrap_err().to_string().contains("more than the 4 devices"));
    }
}
