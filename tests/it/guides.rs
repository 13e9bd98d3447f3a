//! Each guide's topology as an example file, its dry run checked flag by flag against the
//! guide's own commands (examples/guides/*.sh): the same flags with the same values (JSON
//! values compared as JSON), the same environment (the plan may add only the device
//! variable), per node.

use std::collections::{BTreeMap, BTreeSet};

use super::support::BIN;

/// One command: its environment and its flags as (name, value) pairs, names with dashes,
/// the model as `--model`.
#[derive(Debug, Default, PartialEq)]
struct Cmd {
    env: BTreeMap<String, String>,
    flags: BTreeSet<(String, Option<String>)>,
}

fn normal_value(v: &str) -> String {
    match serde_json::from_str::<serde_json::Value>(v) {
        Ok(j @ serde_json::Value::Object(_)) => j.to_string(),
        _ => v.to_string(),
    }
}

fn normal_name(n: &str) -> String {
    // vLLM's parser: `_` and `-` are one in the flag's own name (before a `.`).
    match n.split_once('.') {
        Some((head, rest)) => format!("{}.{rest}", head.replace('_', "-")),
        None => n.replace('_', "-"),
    }
}

/// `A=1 B=2 vllm serve MODEL --x 1 --y --z=2`, or a router's `PROGRAM... --x 1`.
fn parse(words: &[String], program_words: usize) -> Cmd {
    let mut cmd = Cmd::default();
    let mut i = 0;
    while i < words.len() && words[i].contains('=') && !words[i].starts_with("--") {
        let (k, v) = words[i].split_once('=').unwrap();
        cmd.env.insert(k.to_string(), v.to_string());
        i += 1;
    }
    i += program_words;
    while i < words.len() {
        let w = &words[i];
        if let Some(flag) = w.strip_prefix("--") {
            if let Some((n, v)) = flag.split_once('=') {
                cmd.flags.insert((format!("--{}", normal_name(n)), Some(normal_value(v))));
                i += 1;
            } else if i + 1 < words.len() && !words[i + 1].starts_with("--") {
                cmd.flags.insert((format!("--{}", normal_name(flag)), Some(normal_value(&words[i + 1]))));
                i += 2;
            } else {
                cmd.flags.insert((format!("--{}", normal_name(flag)), None));
                i += 1;
            }
        } else {
            // `vllm serve MODEL`: the positional model.
            cmd.flags.insert(("--model".into(), Some(w.clone())));
            i += 1;
        }
    }
    cmd
}

/// The guide file: (node, command) per `@node` line, the router line, the shared env.
fn guide(name: &str) -> (Vec<(usize, Cmd)>, Option<Cmd>) {
    let text = std::fs::read_to_string(format!("{}/examples/guides/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap();
    let mut shared = BTreeMap::new();
    let (mut nodes, mut router) = (Vec::new(), None);
    for line in text.lines().filter(|l| l.starts_with('@')) {
        let words = shlex::split(line).unwrap();
        match words[0].as_str() {
            "@env" => shared.extend(words[1..].iter().map(|w| {
                let (k, v) = w.split_once('=').unwrap();
                (k.to_string(), v.to_string())
            })),
            "@node" => {
                let mut cmd = parse(&words[2..], 2);
                for (k, v) in &shared {
                    cmd.env.entry(k.clone()).or_insert_with(|| v.clone());
                }
                nodes.push((words[1].parse().unwrap(), cmd));
            }
            "@router" => {
                // `cargo run --release -- FLAGS`: the router's flags follow the `--`.
                let first_flag = match words.iter().position(|w| w == "--") {
                    Some(p) => p + 1,
                    None => words.iter().position(|w| w.starts_with("--")).unwrap(),
                };
                router = Some(parse(&words[first_flag..], 0));
            }
            other => panic!("unknown line {other}"),
        }
    }
    (nodes, router)
}

/// The dry run: (node, command) per instance and the router.
fn dry_run(args: &[&str]) -> (Vec<(usize, Cmd)>, Option<Cmd>) {
    let out = std::process::Command::new(BIN).args(args).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let (mut node, mut cmds, mut router) = (0usize, Vec::new(), None);
    let mut next_is_router = false;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("node ") {
            node = rest.split_whitespace().next().unwrap().parse().unwrap();
        } else if line.starts_with("  router ") {
            next_is_router = true;
        } else if let Some(cmd) = line.trim_start().strip_prefix("$ ") {
            let words = shlex::split(cmd).unwrap();
            if next_is_router {
                let first_flag = words.iter().position(|w| w.starts_with("--")).unwrap();
                router = Some(parse(&words[first_flag..], 0));
                next_is_router = false;
            } else {
                cmds.push((node, parse(&words, 2)));
            }
        }
    }
    (cmds, router)
}

fn assert_same(guide: &[(usize, Cmd)], plan: &[(usize, Cmd)], device_var: &str) {
    assert_eq!(guide.len(), plan.len(), "number of commands");
    for ((gn, g), (pn, p)) in guide.iter().zip(plan) {
        assert_eq!(gn, pn, "node");
        let missing: Vec<_> = g.flags.difference(&p.flags).collect();
        let extra: Vec<_> = p.flags.difference(&g.flags).collect();
        assert!(missing.is_empty() && extra.is_empty(), "node {gn}: the plan lacks {missing:?} and adds {extra:?}");
        for (k, v) in &g.env {
            assert_eq!(p.env.get(k), Some(v), "node {gn}: env {k}");
        }
        let added: Vec<_> = p.env.keys().filter(|k| !g.env.contains_key(*k) && *k != device_var).collect();
        assert!(added.is_empty(), "node {gn}: the plan adds env {added:?}");
    }
}

#[test]
fn gb200_guide_hybrid_lb_over_six_nodes_is_the_guides_commands() {
    let (want, want_router) = guide("gb200.sh");
    let (got, got_router) = dry_run(&["launch", "examples/gb200-2p1d-hybrid.yaml", "--dry-run"]);
    assert_same(&want, &got, "CUDA_VISIBLE_DEVICES");
    // The guide's router line, flag for flag (`disagg route` takes vllm-router's flags).
    assert_eq!(want_router.map(|r| r.flags), got_router.map(|r| r.flags));
}

#[test]
fn ascend_guide_internal_lb_with_per_node_env_is_the_guides_four_commands() {
    let (want, _) = guide("ascend.sh");
    let (got, router) = dry_run(&["launch", "examples/ascend-2p2d.yaml", "--dry-run"]);
    assert_same(&want, &got, "ASCEND_RT_VISIBLE_DEVICES");
    // The router reaches each instance through its API server node (the guide's proxy
    // line names the headless node, which serves no HTTP).
    let router = router.unwrap();
    assert!(router.flags.contains(&("--prefill".into(), Some("http://172.19.32.175:20002".into()))), "{router:?}");
    assert!(router.flags.contains(&("--decode".into(), Some("http://172.19.123.51:20002".into()))), "{router:?}");
}

/// The launcher script's 4-node example, line by line: its flags are `disagg launch`'s, and
/// its port formulas: prefill `base + 8 * node_rank + i`, decode `base + 1000 + ...` with the
/// node rank counted within the role, one DP rank per server.
#[test]
fn launcher_script_four_node_example_runs_its_flags_verbatim() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/guides/launcher-4node.sh")).unwrap();
    let lines: Vec<Vec<String>> = text.lines().filter(|l| l.starts_with("disagg launch")).map(|l| shlex::split(l).unwrap()).collect();
    assert_eq!(lines.len(), 4);
    let mut all = Vec::new();
    for words in &lines {
        let args: Vec<&str> = words[1..].iter().map(String::as_str).chain(["--dry-run"]).collect();
        let (cmds, router) = dry_run(&args);
        assert!(router.is_none(), "the script starts no router");
        assert_eq!(cmds.len(), 8);
        all.extend(cmds.into_iter().map(|(_, c)| c));
    }
    let flag = |c: &Cmd, k: &str| c.flags.iter().find(|(n, _)| n == k).and_then(|(_, v)| v.clone()).unwrap_or_default();
    let ports: Vec<String> = all.iter().map(|c| flag(c, "--port")).collect();
    let want: Vec<String> = [8300, 8308, 9300, 9308].iter().flat_map(|b| (0..8).map(move |i| (b + i).to_string())).collect();
    assert_eq!(ports, want);
    let ranks: Vec<String> = all.iter().map(|c| flag(c, "--data-parallel-rank")).collect();
    assert_eq!(ranks, (0..2).flat_map(|_| (0..16).map(|r| r.to_string())).collect::<Vec<_>>());
    for (i, c) in all.iter().enumerate() {
        let (prefill, node) = (i < 16, (i / 8) % 2);
        let side: u32 = c.env["VLLM_NIXL_SIDE_CHANNEL_PORT"].parse().unwrap();
        assert_eq!(side, if prefill { 4300 } else { 5300 } + 8 * node as u32 + (i % 8) as u32);
        assert_eq!(flag(c, "--data-parallel-address"), if prefill { "192.168.1.100" } else { "192.168.1.102" });
        assert_eq!(flag(c, "--data-parallel-rpc-port"), if prefill { "6300" } else { "7300" });
        assert_eq!(c.env["VLLM_NIXL_SIDE_CHANNEL_HOST"], format!("192.168.1.{}", 100 + i / 8));
        assert_eq!(flag(c, "--data-parallel-size"), "16");
        let kv: serde_json::Value = serde_json::from_str(&flag(c, "--kv-transfer-config")).unwrap();
        assert_eq!(kv["kv_connector"], "NixlConnector");
    }
    // Flag names take `_` for `-`, as vLLM's parser does.
    let (same, _) = dry_run(&[
        "launch",
        "--role",
        "decode",
        "-n",
        "2",
        "--dp_size",
        "4",
        "--node_size",
        "2",
        "--node-rank",
        "1",
        "--dp_master_ip",
        "10.0.0.3",
        "--dry-run",
    ]);
    assert_eq!(flag(&same[0].1, "--data-parallel-address"), "10.0.0.3");
    assert_eq!(flag(&same[1].1, "--data-parallel-rank"), "3");
    // The script's own check: DP is 1 or one rank per server over the role's nodes.
    let out = std::process::Command::new(BIN)
        .args(["launch", "--role", "prefill", "-n", "8", "-d", "12", "--node-size", "2", "--dry-run"])
        .output()
        .unwrap();
    assert!(
        !out.status.success()
            && String::from_utf8_lossy(&out.stderr).contains("--dp-size 12 must be 1 or --num-instances 8 x --node-size 2")
    );
}
