//! `disagg launch --role prefill|decode ...`: the NIXL launcher script's flags and port
//! formulas (vLLM's disaggregated_prefill_server_launcher, docs/LAUNCH.md), one node's
//! share, no YAML: `--num-instances` servers, each its own DP rank when `--dp-size` > 1
//! (`--data-parallel-rank num_instances * node_rank + i`), ports `base + 8 * node_rank +
//! i`; a decode node adds 1000 to the base port, the side-channel base and the DP master
//! port, and `--node-rank` counts within the role's nodes (9300 on the first decode node).

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};

use super::plan::{Instance, Plan, Role};
use crate::launch::spec::config::EngineKind;

#[derive(Args, Debug, Clone)]
pub(crate) struct ScriptArgs {
    /// Launcher-script mode: this node's servers of ROLE, from the script's flags.
    #[arg(short = 'r', long, value_enum)]
    pub(crate) role: Option<ScriptRole>,
    /// Model to serve.
    #[arg(short = 'm', long, default_value = "ibm-research/PowerMoE-3b", requires = "role")]
    pub(crate) model: String,
    /// Servers on this node.
    #[arg(short = 'n', long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=8), requires = "role")]
    pub(crate) num_instances: u32,
    /// Tensor parallel size of each server.
    #[arg(short = 't', long, default_value_t = 1, requires = "role")]
    pub(crate) tp_size: u32,
    /// Data parallel size of the role: 1, or num_instances x node_size (one rank per server).
    #[arg(short = 'd', long, default_value_t = 1, requires = "role")]
    pub(crate) dp_size: u32,
    #[arg(long, default_value_t = 8300, requires = "role")]
    pub(crate) base_port: u16,
    #[arg(long, default_value_t = 4300, requires = "role")]
    pub(crate) base_channel_port: u16,
    /// This node's address (the NIXL side channel's host).
    #[arg(long, default_value = "localhost", requires = "role")]
    pub(crate) node_ip: String,
    #[arg(long, default_value = "localhost", requires = "role")]
    pub(crate) dp_master_ip: String,
    #[arg(long, default_value_t = 6300, requires = "role")]
    pub(crate) dp_master_port: u16,
    #[arg(long, default_value = "cpu", requires = "role")]
    pub(crate) nixl_buffer_device: String,
    #[arg(long, default_value = "UCX", requires = "role")]
    pub(crate) nixl_backend: String,
    #[arg(long, default_value = "rc,ud,ib", requires = "role")]
    pub(crate) ucx_tls: String,
    #[arg(long, default_value_t = 8192, requires = "role")]
    pub(crate) max_model_len: u32,
    #[arg(long, default_value_t = 8192, requires = "role")]
    pub(crate) max_num_batched_tokens: u32,
    #[arg(long, default_value_t = 256, requires = "role")]
    pub(crate) max_num_seqs: u32,
    #[arg(long, requires = "role")]
    pub(crate) enforce_eager: bool,
    /// The command that starts a server (default `vllm serve`).
    #[arg(long, default_value = "vllm serve", requires = "role")]
    pub(crate) vllm_command: String,
    /// Seconds to wait for every server's /health.
    #[arg(long, default_value_t = 600, requires = "role")]
    pub(crate) timeout: u64,
    /// Logs go to DIR/logs/<role>-<i>.log.
    #[arg(long, default_value = "./disagg-run", requires = "role")]
    pub(crate) log_dir: PathBuf,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ScriptRole {
    Prefill,
    Decode,
}

/// The plan of one node's share. `node_rank`/`node_size` count this role's nodes.
pub(crate) fn plan(a: &ScriptArgs, role: ScriptRole, node_rank: usize, node_size: usize) -> anyhow::Result<Plan> {
    let n = a.num_instances;
    if a.dp_size != 1 && a.dp_size != n * node_size as u32 {
        anyhow::bail!("--dp-size {} must be 1 or --num-instances {n} x --node-size {node_size} (one DP rank per server)", a.dp_size);
    }
    if node_rank >= node_size {
        anyhow::bail!("--node-rank {node_rank} is not below --node-size {node_size}");
    }
    let (role, kv_role, shift) = match role {
        ScriptRole::Prefill => (Role::Prefill, "kv_producer", 0u32),
        ScriptRole::Decode => (Role::Decode, "kv_both", 1000),
    };
    let port_of = |base: u16, i: u32| -> anyhow::Result<u16> {
        u16::try_from(base as u32 + shift + 8 * node_rank as u32 + i).map_err(|_| anyhow::anyhow!("ports run past 65535"))
    };
    let dp_master_port = u16::try_from(a.dp_master_port as u32 + shift).map_err(|_| anyhow::anyhow!("--dp-master-port runs past 65535"))?;
    let kv = serde_json::json!({"kv_connector": "NixlConnector", "kv_role": kv_role, "kv_buffer_device": a.nixl_buffer_device,
        "kv_connector_extra_config": {"backends": [a.nixl_backend]}});
    let cmd = shlex::split(&a.vllm_command)
        .filter(|w| !w.is_empty())
        .ok_or_else(|| anyhow::anyhow!("--vllm-command is not a valid command line"))?;
    let mut instances = Vec::new();
    for i in 0..n {
        let (port, side) = (port_of(a.base_port, i)?, port_of(a.base_channel_port, i)?);
        let mut argv = cmd.clone();
        argv.push(a.model.clone());
        for (k, v) in [
            ("--port", port.to_string()),
            ("--max-num-batched-tokens", a.max_num_batched_tokens.to_string()),
            ("--max-model-len", a.max_model_len.to_string()),
            ("--max-num-seqs", a.max_num_seqs.to_string()),
            ("--tensor-parallel-size", a.tp_size.to_string()),
        ] {
            argv.extend([k.to_string(), v]);
        }
        if a.enforce_eager {
            argv.push("--enforce-eager".into());
        }
        let rank = n * node_rank as u32 + i;
        if a.dp_size > 1 {
            for (k, v) in [
                ("--data-parallel-size", a.dp_size.to_string()),
                ("--data-parallel-rank", rank.to_string()),
                ("--data-parallel-address", a.dp_master_ip.clone()),
                ("--data-parallel-rpc-port", dp_master_port.to_string()),
            ] {
                argv.extend([k.to_string(), v]);
            }
        }
        argv.extend(["--kv-transfer-config".into(), kv.to_string()]);
        let env = vec![
            ("UCX_TLS".to_string(), a.ucx_tls.clone()),
            ("VLLM_NIXL_SIDE_CHANNEL_HOST".to_string(), a.node_ip.clone()),
            ("VLLM_NIXL_SIDE_CHANNEL_PORT".to_string(), side.to_string()),
        ];
        let dp = (a.dp_size > 1).then(|| format!("DP rank {rank} of {}, external LB (own API server)", a.dp_size));
        instances.push(Instance {
            name: format!("{}-{i}", role.as_str()),
            role,
            elastic: false,
            node: 0,
            host: a.node_ip.clone(),
            port: Some(port),
            scheme: super::plan::Scheme::Http,
            side_channel_port: side,
            gpus: Vec::new(),
            dp,
            ranks: 1,
            group: super::plan::ReplicaPart { replica: i as usize, part: 0, processes: 1 },
            argv,
            env,
        });
    }
    Ok(Plan {
        file: format!("the launcher script's flags (--role {}, node {node_rank} of {node_size})", role.as_str()),
        engine: EngineKind::Vllm,
        gpus_per_worker: 1,
        timeout: Duration::from_secs(a.timeout),
        working_dir: a.log_dir.clone(),
        nodes: vec![a.node_ip.clone()],
        gpus_per_node: 0,
        gpu_env: "CUDA_VISIBLE_DEVICES".into(),
        instances,
        router: None,
        tls: None,
        notes: vec!["the launcher script starts no router: start `disagg route --vllm-pd-disaggregation --prefill URL ... --decode URL ...` with every node's servers".into()],
    })
}
