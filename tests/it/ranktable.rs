//! `disagg ranktable` (vllm-ascend's rank table): the file vllm-ascend reads, gathered
//! from every node's devices so that all nodes write the same file, and a gather that a
//! stranger on the network can neither stop nor forge.

use std::process::Stdio;
use std::time::Duration;

use serde_json::json;

use crate::launch::{run, write};
use crate::support::*;

#[test]
fn ranktable_is_written_in_vllm_ascends_format() {
    let ips = write("device_ips.txt", "# node 0\n29.7.1.1 29.7.1.2\n29.7.2.1 29.7.2.2\n");
    let out = ips.with_file_name("ranktable.json");
    let (ok, _, err) = run(&[
        "ranktable",
        "--ips",
        "172.19.32.175",
        "172.19.123.51",
        "--npus-per-node",
        "2",
        "--prefill-device-cnt",
        "2",
        "--decode-device-cnt",
        "2",
        "--device-ips",
        ips.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let t: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(t["server_count"], "2");
    assert_eq!(
        t["decode_device_list"][0],
        json!({"server_id": "172.19.123.51", "device_id": "0", "device_ip": "29.7.2.1", "cluster_id": "3"})
    );
    let (ok, _, err) =
        run(&["ranktable", "--ips", "1.2.3.4", "--local-host", "1.2.3.4", "--prefill-device-cnt", "1", "--decode-device-cnt", "1"]);
    assert!(!ok && err.contains("hccn_tool is not installed"), "{err}");
    let (ok, _, err) =
        run(&["ranktable", "--ips", "10.9.9.9", "--network-card-name", "lo", "--prefill-device-cnt", "1", "--decode-device-cnt", "1"]);
    assert!(!ok && err.contains("none of this machine's addresses on lo (127.0.0.1"), "{err}");
}

/// The Ascend guide's way: the same command on every node (here 4 "nodes" on 127.0.0.1-4,
/// each with a fake hccn_tool for its own devices); the first collects, all four write
/// the same file.
#[tokio::test]
async fn ranktable_gathers_every_nodes_devices_and_all_nodes_write_the_same_file() {
    let dir = write("hccn_tool", "").parent().unwrap().to_path_buf();
    std::fs::write(dir.join("hccn_tool"), "#!/bin/sh\n# a fake hccn_tool: -i DEV -ip -g prints this node's device DEV's address\n[ \"$1\" = -h ] && exit 0\necho \"ipaddr:29.7.$FAKE_NODE.$2\"\necho \"netmask:255.255.255.0\"\n").unwrap();
    std::fs::set_permissions(dir.join("hccn_tool"), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let port = free_port_run(1).to_string();
    let ips = ["127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4"];
    let mut children = Vec::new();
    // The first node last: the others wait for it.
    for node in [3usize, 1, 2, 0] {
        let out = dir.join(format!("ranktable-{node}.json"));
        let mut args: Vec<String> = vec!["ranktable".into(), "--ips".into()];
        args.extend(ips.iter().map(|s| s.to_string()));
        args.extend(
            [
                "--npus-per-node",
                "2",
                "--network-card-name",
                "lo",
                "--local-host",
                ips[node],
                "--prefill-device-cnt",
                "4",
                "--decode-device-cnt",
                "4",
                "--master-port",
                &port,
                "--timeout",
                "30",
                "--output",
                out.to_str().unwrap(),
            ]
            .map(String::from),
        );
        let child = tokio::process::Command::new(BIN)
            .args(&args)
            .env("PATH", format!("{}:{}", dir.display(), std::env::var("PATH").unwrap_or_default()))
            .env("FAKE_NODE", (node + 1).to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        children.push((node, child));
    }
    for (node, child) in children {
        let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output()).await.expect("ranktable finishes").unwrap();
        assert!(out.status.success(), "node {node}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let files: Vec<String> = (0..4).map(|n| std::fs::read_to_string(dir.join(format!("ranktable-{n}.json"))).unwrap()).collect();
    assert!(files.iter().all(|f| *f == files[0]), "the nodes wrote different files");
    let t: serde_json::Value = serde_json::from_str(&files[0]).unwrap();
    assert_eq!(t["server_count"], "4");
    assert_eq!(
        t["prefill_device_list"][3],
        json!({"server_id": "127.0.0.2", "device_id": "1", "device_ip": "29.7.2.1", "cluster_id": "4"})
    );
    assert_eq!(t["decode_device_list"][0], json!({"server_id": "127.0.0.3", "device_id": "0", "device_ip": "29.7.3.0", "cluster_id": "5"}));
    assert_eq!(t["decode_device_list"][3]["device_ip"], "29.7.4.1");
}

/// The first node's gather takes a node's list only from that node's address, once; a
/// peer that connects and closes, stays silent, sends garbage or forges another node's
/// list from elsewhere is skipped, and the real nodes still complete the table.
#[tokio::test]
async fn ranktable_gather_cannot_be_stopped_or_forged_from_the_network() {
    use tokio::io::AsyncWriteExt;
    let dir = write("hccn_tool", "").parent().unwrap().to_path_buf();
    std::fs::write(dir.join("hccn_tool"), "#!/bin/sh\n[ \"$1\" = -h ] && exit 0\necho \"ipaddr:29.7.$FAKE_NODE.$2\"\n").unwrap();
    std::fs::set_permissions(dir.join("hccn_tool"), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let port = free_port_run(1);
    let node = |n: usize| {
        let out = dir.join(format!("forged-{n}.json"));
        let args: Vec<String> = [
            "ranktable",
            "--ips",
            "127.0.0.1",
            "127.0.0.2",
            "--npus-per-node",
            "1",
            "--local-host",
            ["127.0.0.1", "127.0.0.2"][n],
            "--prefill-device-cnt",
            "1",
            "--decode-device-cnt",
            "1",
            "--master-port",
            &port.to_string(),
            "--timeout",
            "30",
            "--output",
            out.to_str().unwrap(),
        ]
        .map(String::from)
        .to_vec();
        tokio::process::Command::new(BIN)
            .args(&args)
            .env("PATH", format!("{}:{}", dir.display(), std::env::var("PATH").unwrap_or_default()))
            .env("FAKE_NODE", (n + 1).to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let master = node(0);
    let at = format!("127.0.0.1:{port}");
    assert!(eventually(Duration::from_secs(10), || async { tokio::net::TcpStream::connect(&at).await.is_ok() }).await);
    // Connect and close; connect and say nothing; garbage; node 1's list forged from 127.0.0.3.
    drop(tokio::net::TcpStream::connect(&at).await.unwrap());
    let _silent = tokio::net::TcpStream::connect(&at).await.unwrap();
    tokio::net::TcpStream::connect(&at).await.unwrap().write_all(b"\xff\xfe not json\n").await.unwrap();
    let forger = tokio::net::TcpSocket::new_v4().unwrap();
    forger.bind("127.0.0.3:0".parse().unwrap()).unwrap();
    let mut forged = forger.connect(at.parse().unwrap()).await.unwrap();
    forged.write_all(b"{\"node\":1,\"device_ips\":[\"6.6.6.6\"]}\n").await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let real = node(1);
    for (n, child) in [(0, master), (1, real)] {
        let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output()).await.expect("the gather finishes").unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "node {n}: {err}");
        if n == 0 {
            assert!(
                err.contains("came from 127.0.0.3, not from that node")
                    && err.contains("invalid utf-8")
                    && err.contains("closed without a line"),
                "{err}"
            );
        }
    }
    let t: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("forged-0.json")).unwrap()).unwrap();
    assert_eq!(t["decode_device_list"][0]["device_ip"], "29.7.2.0", "node 1's own list, not the forged one: {t}");
}
