//! From a launch file to a plan: every process with its node, GPUs, ports, DP ranks,
//! exact argv and environment, and the router's command. The plan is what `--dry-run`
//! prints and what the local and Ray backends run.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_yaml_ng::Value;

use super::config::{line_of, scalar, ConfigError, DpMode, EngineKind, LaunchFile, RoleFile};
use super::argv::{sim_argv, vllm_argv, EngineParams};
use super::connector::{self as launch_connector, Connector};

pub use crate::api::Role;

/// One process to start.
#[derive(Debug, Clone)]
pub struct Instance {
    /// `prefill-0`, `decode-1`, ...: also its log file's name.
    pub name: String,
    pub role: Role,
    pub replica: usize,
    pub node: usize,
    pub host: String,
    /// None for a headless DP worker (no HTTP server).
    pub port: Option<u16>,
    pub side_channel_port: u16,
    pub gpus: Vec<u32>,
    /// "DP 8, ranks 0-7" and the like, for the plan's reader.
    pub dp: Option<String>,
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
}

impl Instance {
    pub fn url(&self) -> Option<String> {
        self.port.map(|p| url(&self.host, p))
    }
}

pub fn url(host: &str, port: u16) -> String {
    format!("http://{}", crate::api::join_host_port(host, port))
}

#[derive(Debug, Clone)]
pub struct RouterPlan {
    pub host: String,
    pub port: u16,
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    /// Our own `disagg route` (vs a pdjob `scheduler.command`).
    pub ours: bool,
}

#[derive(Debug, Clone)]
pub struct Plan {
    pub file: String,
    pub engine: EngineKind,
    pub timeout: Duration,
    pub working_dir: PathBuf,
    pub nodes: Vec<String>,
    pub gpus_per_node: u32,
    pub instances: Vec<Instance>,
    pub router: RouterPlan,
    /// Things the reader should know (e.g. parameters the simulator does not use).
    pub notes: Vec<String>,
}

impl Plan {
    pub fn log_path(&self, name: &str) -> PathBuf {
        self.working_dir.join("logs").join(format!("{name}.log"))
    }
}

struct Ctx<'a> {
    file: &'a str,
    text: &'a str,
}

impl Ctx<'_> {
    /// An error about `path`, at its line, or at its nearest parent's when it is absent.
    fn err(&self, path: &str, message: impl Into<String>) -> ConfigError {
        let mut at = path;
        let line = loop {
            if let Some(l) = line_of(self.text, at) {
                break Some(l);
            }
            match at.rsplit_once('.') {
                Some((parent, _)) => at = parent,
                None => break None,
            }
        };
        ConfigError { file: self.file.into(), line, message: format!("{path}: {}", message.into()) }
    }
}

/// A role's settings after merging general.params under the role's params.
struct RoleSpec {
    role: Role,
    replicas: u32,
    num_gpus: u32,
    envs: BTreeMap<String, Value>,
    params: BTreeMap<String, Value>,
    extra: Vec<String>,
    dp: u32,
    mode: DpMode,
    port: u16,
    side: u16,
    /// The connector flow `disagg route` runs for it (None: a scheduler.command's own).
    flow: Option<Connector>,
}

const PORT_STRIDE: u16 = 8;
const DP_RPC_BASE: u16 = 13345;

/// Where the plan will run: on known nodes, or on Ray, which picks each replica's node
/// (then `{HOST}` and `{KV_IP}` stay in the commands, filled in on the node, and Ray
/// assigns the GPUs itself).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Nodes,
    Ray,
}

pub fn build(f: &LaunchFile, file: &str, text: &str, exe: &Path, target: Target) -> Result<Plan, ConfigError> {
    let cx = Ctx { file, text };
    if target == Target::Ray && !f.nodes.is_empty() {
        return Err(cx.err("nodes", "is for launches on known nodes; with --ray, Ray places every replica"));
    }
    if f.gpus_per_worker == 0 {
        return Err(cx.err("gpus_per_worker", "must be at least 1"));
    }
    if f.num_gpus % f.gpus_per_worker != 0 {
        return Err(cx.err("num_gpus", format!("{} is not a multiple of gpus_per_worker {}", f.num_gpus, f.gpus_per_worker)));
    }
    let nodes = match (target, f.nodes.is_empty()) {
        (Target::Ray, _) => vec!["{HOST}".to_string()],
        (Target::Nodes, true) => vec!["127.0.0.1".to_string()],
        (Target::Nodes, false) => f.nodes.clone(),
    };
    if let Some(dup) = nodes.iter().enumerate().find(|(i, n)| nodes[..*i].contains(n)).map(|(_, n)| n) {
        return Err(cx.err("nodes", format!("node {dup} is listed twice")));
    }
    let gpus_per_node = match f.gpus_per_node {
        Some(g) => g,
        None if f.num_gpus % nodes.len() as u32 != 0 => {
            return Err(cx.err("num_gpus", format!("{} GPUs do not divide over {} nodes; set gpus_per_node", f.num_gpus, nodes.len())))
        }
        None => f.num_gpus / nodes.len() as u32,
    };
    if gpus_per_node * nodes.len() as u32 > f.num_gpus && f.gpus_per_node.is_some() {
        return Err(cx.err("gpus_per_node", format!("{gpus_per_node} x {} nodes is more than num_gpus {}", nodes.len(), f.num_gpus)));
    }
    let mut general = f.general.params.clone();
    let general_extra = take_extra(&mut general, &cx, "general.params._extra_params")?;
    let spec = |role: Role, rf: &RoleFile| -> Result<RoleSpec, ConfigError> {
        let name = role.as_str();
        if rf.replicas == 0 {
            return Err(cx.err(&format!("{name}.replicas"), "must be greater than 0"));
        }
        if f.num_gpus > 0 && rf.num_gpus % f.gpus_per_worker != 0 {
            return Err(cx.err(&format!("{name}.num_gpus"), format!("{} is not a multiple of gpus_per_worker {}", rf.num_gpus, f.gpus_per_worker)));
        }
        let mut params = general.clone();
        let mut own = rf.params.clone();
        let mut extra = general_extra.clone();
        extra.extend(take_extra(&mut own, &cx, &format!("{name}.params._extra_params"))?);
        params.extend(own);
        let dp = match (rf.data_parallel_size, params.get("data_parallel_size")) {
            (Some(d), _) => d,
            (None, Some(v)) => scalar(v).and_then(|s| s.parse().ok()).ok_or_else(|| {
                cx.err(&format!("{name}.params.data_parallel_size"), "must be a positive integer")
            })?,
            (None, None) => 1,
        };
        if dp == 0 {
            return Err(cx.err(&format!("{name}.data_parallel_size"), "must be at least 1"));
        }
        if rf.num_gpus > 0 && rf.num_gpus % dp != 0 {
            return Err(cx.err(&format!("{name}.num_gpus"), format!("{} GPUs do not split over {dp} DP ranks", rf.num_gpus)));
        }
        params.remove("data_parallel_size");
        let flow = kv_flow(&cx, name, &params, f.engine.kind(), f.scheduler.command.is_some())?;
        let (port, side) = match role {
            Role::Prefill => (rf.port.unwrap_or(8100), rf.side_channel_port.unwrap_or(5600)),
            Role::Decode | Role::Both => (rf.port.unwrap_or(9100), rf.side_channel_port.unwrap_or(6600)),
        };
        if flow == Some(Connector::P2pNccl) && dp > 1 {
            return Err(cx.err(&format!("{name}.data_parallel_size"), "P2pNccl runs one engine per instance (the xPyD guide's layout): use replicas"));
        }
        Ok(RoleSpec { role, replicas: rf.replicas, num_gpus: rf.num_gpus, envs: rf.envs.clone(), params, extra, dp, mode: rf.dp_mode, port, side, flow })
    };
    let roles = [spec(Role::Prefill, &f.prefill)?, spec(Role::Decode, &f.decode)?];
    if roles[0].flow != roles[1].flow {
        return Err(cx.err("decode.params.kv_transfer_config", "names another connector than the prefill's: both roles need the same one"));
    }
    let flow = roles[0].flow;
    // Where the router listens; P2pNccl engines ping its discovery address.
    let router_port = f.scheduler.port.unwrap_or(8021);
    let router_host = f.scheduler.host.clone().unwrap_or_else(|| nodes[0].clone());
    let p2p_proxy = match flow {
        Some(Connector::P2pNccl) => {
            let reachable = if router_host == "0.0.0.0" || router_host == "::" { nodes[0].clone() } else { router_host.clone() };
            Some((reachable, launch_connector::discovery_port(router_port).map_err(|e| cx.err("scheduler.port", e))?))
        }
        _ => None,
    };
    // Each Mooncake prefill's bootstrap port, by URL.
    let mut bootstrap: Vec<(String, u16)> = Vec::new();

    let (engine_cmd, engine_kind) = match f.engine.kind() {
        EngineKind::Vllm => (
            shlex::split(f.engine.command().unwrap_or("vllm serve"))
                .filter(|w| !w.is_empty())
                .ok_or_else(|| cx.err("engine.command", "is not a valid command line"))?,
            EngineKind::Vllm,
        ),
        EngineKind::Sim => (vec![exe.display().to_string(), "sim".into()], EngineKind::Sim),
    };

    // Placement: replicas in order (prefill first), first fit on the nodes' free GPUs.
    let mut free: Vec<Vec<u32>> = nodes.iter().map(|_| (0..gpus_per_node).collect()).collect();
    let mut http_next: BTreeMap<(usize, Role), u16> = BTreeMap::new();
    let mut side_next: BTreeMap<(usize, Role), u16> = BTreeMap::new();
    let mut instances = Vec::new();
    let mut notes = Vec::new();
    if flow == Some(Connector::P2pNccl) && f.engine.kind() == EngineKind::Vllm {
        notes.push("engine: P2pNcclConnector was removed from vLLM in 2026 (vLLM 0.32 has none): these engines need a vLLM release that still has it".into());
    }
    let mut replica_global = 0usize;
    let mut counters: BTreeMap<Role, usize> = BTreeMap::new();
    let kv_ip = if target == Target::Ray { "{KV_IP}".to_string() } else { nodes[0].clone() };
    for spec in &roles {
        let name = spec.role.as_str();
        let need = spec.num_gpus;
        for replica in 0..spec.replicas as usize {
            // (node, gpus) for each node the replica occupies.
            let parts: Vec<(usize, Vec<u32>)> = if need == 0 {
                vec![(replica_global % nodes.len(), Vec::new())]
            } else if need <= gpus_per_node {
                let node = (0..nodes.len()).find(|n| free[*n].len() >= need as usize).ok_or_else(|| {
                    cx.err(&format!("{name}.num_gpus"), format!("no node has {need} free GPUs for {name} replica {replica} (num_gpus {}, {gpus_per_node} per node)", f.num_gpus))
                })?;
                vec![(node, free[node].drain(..need as usize).collect())]
            } else {
                if need % gpus_per_node != 0 {
                    return Err(cx.err(&format!("{name}.num_gpus"), format!("a replica of {need} GPUs spans nodes of {gpus_per_node}: it must be a multiple of {gpus_per_node}")));
                }
                if spec.dp == 1 {
                    return Err(cx.err(&format!("{name}.num_gpus"), format!("a replica of {need} GPUs spans several nodes: set data_parallel_size so every node runs its share of the DP ranks")));
                }
                let k = (need / gpus_per_node) as usize;
                let start = (0..=nodes.len().saturating_sub(k))
                    .find(|s| (*s..*s + k).all(|n| free[n].len() == gpus_per_node as usize))
                    .filter(|s| s + k <= nodes.len())
                    .ok_or_else(|| cx.err(&format!("{name}.num_gpus"), format!("no {k} whole free nodes for {name} replica {replica}")))?;
                (start..start + k).map(|n| (n, free[n].drain(..).collect())).collect()
            };
            if spec.dp as usize % parts.len() != 0 {
                return Err(cx.err(&format!("{name}.data_parallel_size"), format!("{} DP ranks do not split over the replica's {} nodes", spec.dp, parts.len())));
            }
            if parts.len() > 1 && engine_kind == EngineKind::Sim {
                return Err(cx.err(&format!("{name}.num_gpus"), "the simulator runs no multi-node replicas"));
            }
            let external = spec.mode == DpMode::External && spec.dp > 1;
            if spec.flow == Some(Connector::Mooncake) && spec.role == Role::Prefill && (parts.len() > 1 || external) {
                return Err(cx.err(&format!("{name}.data_parallel_size"),
                    "a Mooncake prefill is planned as one process per replica (one bootstrap server naming all its DP ranks): keep its DP internal and on one node"));
            }
            let per_node = spec.dp / parts.len() as u32;
            let master = nodes[parts[0].0].clone();
            let rpc_port = DP_RPC_BASE + replica_global as u16;
            for (j, (node, gpus)) in parts.iter().enumerate() {
                // One process per node (internal DP), or one per DP rank (external DP).
                let procs: Vec<(Option<u32>, Vec<u32>)> = match spec.mode {
                    DpMode::External if spec.dp > 1 => {
                        let per_rank = gpus.len() / per_node as usize;
                        (0..per_node).map(|k| (Some(j as u32 * per_node + k), gpus[k as usize * per_rank..(k as usize + 1) * per_rank].to_vec())).collect()
                    }
                    _ => vec![(None, gpus.clone())],
                };
                for (rank, gpus) in procs {
                    let index = counters.entry(spec.role).or_insert(0);
                    let inst_name = format!("{name}-{index}");
                    *index += 1;
                    let host = nodes[*node].clone();
                    let headless = spec.mode == DpMode::Internal && j > 0;
                    let port = if headless {
                        None
                    } else {
                        let i = http_next.entry((*node, spec.role)).or_insert(0);
                        let p = spec.port as u32 + PORT_STRIDE as u32 * *node as u32 + *i as u32;
                        *i += 1;
                        Some(u16::try_from(p).map_err(|_| cx.err(&format!("{name}.port"), "ports run past 65535"))?)
                    };
                    let local_ranks = if rank.is_some() || spec.dp == 1 { 1 } else { per_node };
                    let s = side_next.entry((*node, spec.role)).or_insert(0);
                    let side = u16::try_from(spec.side as u32 + PORT_STRIDE as u32 * *node as u32 + *s as u32)
                        .map_err(|_| cx.err(&format!("{name}.side_channel_port"), "ports run past 65535"))?;
                    *s += local_ranks as u16;
                    let dp_args: Vec<String> = if spec.dp == 1 {
                        Vec::new()
                    } else if let Some(r) = rank {
                        vec!["--data-parallel-size".into(), spec.dp.to_string(), "--data-parallel-rank".into(), r.to_string(),
                            "--data-parallel-address".into(), master.clone(), "--data-parallel-rpc-port".into(), rpc_port.to_string()]
                    } else if parts.len() > 1 {
                        let mut a = vec!["--data-parallel-size".into(), spec.dp.to_string(), "--data-parallel-size-local".into(), per_node.to_string(),
                            "--data-parallel-start-rank".into(), (j as u32 * per_node).to_string(), "--data-parallel-address".into(), master.clone(),
                            "--data-parallel-rpc-port".into(), rpc_port.to_string()];
                        if headless {
                            a.push("--headless".into());
                        }
                        a
                    } else {
                        vec!["--data-parallel-size".into(), spec.dp.to_string()]
                    };
                    let dp = (spec.dp > 1).then(|| match rank {
                        Some(r) => format!("DP rank {r} of {} (own server)", spec.dp),
                        None => format!("DP {}, ranks {}-{}", spec.dp, j as u32 * per_node, (j as u32 + 1) * per_node - 1),
                    });
                    let mut env: Vec<(String, String)> = Vec::new();
                    for (k, v) in f.envs.iter().chain(spec.envs.iter()) {
                        let v = scalar(v).ok_or_else(|| cx.err(&format!("envs.{k}"), "must be a string, number or boolean"))?;
                        env.retain(|(ek, _)| ek != k);
                        env.push((k.clone(), v));
                    }
                    let p2p = p2p_proxy.as_ref().map(|(h, p)| (h.as_str(), *p));
                    let engine = EngineParams { role: spec.role.as_str(), params: &spec.params, extra: &spec.extra };
                    let argv = match engine_kind {
                        EngineKind::Vllm => {
                            match spec.flow {
                                Some(Connector::Mooncake) if spec.role == Role::Prefill => env.push(("VLLM_MOONCAKE_BOOTSTRAP_PORT".into(), side.to_string())),
                                // Both legs must see the id the router sent (it names the KV addresses).
                                Some(Connector::P2pNccl) => env.push(("VLLM_DISABLE_REQUEST_ID_RANDOMIZATION".into(), "1".into())),
                                Some(Connector::Nixl) | None => {
                                    env.push(("VLLM_NIXL_SIDE_CHANNEL_HOST".into(), host.clone()));
                                    env.push(("VLLM_NIXL_SIDE_CHANNEL_PORT".into(), side.to_string()));
                                }
                                Some(Connector::Mooncake) => {}
                            }
                            vllm_argv(&engine_cmd, &engine, &host, port, &inst_name, &kv_ip, dp_args, f.engine.args(), p2p.map(|(h, p)| (h, p, side)))
                                .map_err(|e| cx.err(&e.path, e.message))?
                        }
                        EngineKind::Sim => {
                            let dp_sim = if rank.is_some() { 1 } else { spec.dp };
                            let mut argv = sim_argv(&engine_cmd, &engine, &host, port.expect("the simulator is never headless"), dp_sim, &mut notes);
                            match spec.flow {
                                Some(Connector::Mooncake) => {
                                    argv.extend(["--kv-connector".into(), "mooncake".into()]);
                                    if spec.role == Role::Prefill {
                                        argv.extend(["--mooncake-bootstrap-port".into(), side.to_string()]);
                                    }
                                }
                                Some(Connector::P2pNccl) => {
                                    let (h, p) = p2p.expect("set for P2pNccl");
                                    argv.extend(["--kv-connector".into(), "p2pnccl".into(), "--proxy-address".into(), crate::api::join_host_port(h, p)]);
                                    argv.extend(["--side-channel-port".into(), side.to_string()]);
                                }
                                Some(Connector::Nixl) | None => argv.extend(["--side-channel-port".into(), side.to_string()]),
                            }
                            argv.extend(f.engine.args().iter().cloned());
                            argv
                        }
                    };
                    if let (Some(Connector::Mooncake), Role::Prefill, Some(p)) = (spec.flow, spec.role, port) {
                        bootstrap.push((url(&host, p), side));
                    }
                    if !gpus.is_empty() && target == Target::Nodes {
                        env.push((f.gpu_env.clone(), gpus.iter().map(u32::to_string).collect::<Vec<_>>().join(",")));
                    }
                    instances.push(Instance { name: inst_name, role: spec.role, replica, node: *node, host, port, side_channel_port: side, gpus, dp, argv, env });
                }
            }
            replica_global += 1;
        }
    }
    // Every (host, port) once, HTTP and side channels alike.
    let mut seen = HashSet::new();
    for i in &instances {
        for (what, p) in [("HTTP", i.port), ("side-channel", Some(i.side_channel_port))] {
            if let Some(p) = p {
                if !seen.insert((i.host.clone(), p)) {
                    return Err(cx.err(&format!("{}.port", i.role.as_str()), format!("{} port {p} of {} on {} is already taken by another instance: set prefill/decode port and side_channel_port apart", what, i.name, i.host)));
                }
            }
        }
    }

    let internal_dp: BTreeMap<Role, u32> = roles.iter().map(|s| (s.role, if s.mode == DpMode::Internal { s.dp } else { 1 })).collect();
    let (host, port) = (router_host, router_port);
    let http: Vec<&Instance> = instances.iter().filter(|i| i.port.is_some()).collect();
    let urls = |r: Role| http.iter().filter(|i| i.role == r).map(|i| i.url().expect("serves HTTP")).collect::<Vec<_>>();
    let router = match &f.scheduler.command {
        Some(cmd) => {
            let cmd = substitute(cmd, port, &urls(Role::Prefill), &urls(Role::Decode));
            let argv = shlex::split(&cmd).filter(|w| !w.is_empty()).ok_or_else(|| cx.err("scheduler.command", "is not a valid command line"))?;
            RouterPlan { host: nodes[0].clone(), port, argv, env: Vec::new(), ours: false }
        }
        None => {
            let mut argv = vec![exe.display().to_string(), "route".into(), "--host".into(), host.clone(), "--port".into(), port.to_string()];
            match flow {
                // The engines register themselves at the discovery address.
                Some(Connector::P2pNccl) => {
                    let (_, dport) = p2p_proxy.as_ref().expect("set for P2pNccl");
                    argv.extend(["--vllm-pd-disaggregation".into(), "--vllm-discovery-address".into(), crate::api::join_host_port(&host, *dport)]);
                }
                _ => {
                    if flow == Some(Connector::Mooncake) {
                        argv.extend(["--kv-connector".into(), "mooncake".into()]);
                    }
                    for u in urls(Role::Prefill) {
                        let port = bootstrap.iter().find(|(b, _)| *b == u).map(|(_, p)| p.to_string());
                        argv.extend(["--prefill".into(), u].into_iter().chain(port));
                    }
                    for u in urls(Role::Decode) {
                        argv.extend(["--decode".into(), u]);
                    }
                }
            }
            let (p, d) = (internal_dp[&Role::Prefill], internal_dp[&Role::Decode]);
            if p == d && p > 1 {
                argv.extend(["--intra-node-data-parallel-size".into(), p.to_string()]);
            } else if p != d {
                argv.extend(["--prefill-dp-size".into(), p.to_string(), "--decode-dp-size".into(), d.to_string()]);
            }
            argv.extend(f.scheduler.args.iter().cloned());
            RouterPlan { host, port, argv, env: Vec::new(), ours: true }
        }
    };
    notes.dedup();
    Ok(Plan {
        file: file.to_string(),
        engine: engine_kind,
        timeout: Duration::from_secs(f.timeout),
        working_dir: PathBuf::from(&f.working_dir),
        nodes,
        gpus_per_node,
        instances,
        router,
        notes,
    })
}

fn take_extra(params: &mut BTreeMap<String, Value>, cx: &Ctx<'_>, path: &str) -> Result<Vec<String>, ConfigError> {
    match params.remove("_extra_params") {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(s)) => shlex::split(&s).ok_or_else(|| cx.err(path, "is not a valid argument string")),
        Some(_) => Err(cx.err(path, "must be a string of extra arguments")),
    }
}

/// The connector flow of a role's `kv_transfer_config` (required for vLLM engines; the
/// simulator runs NIXL's without one). Without a scheduler.command, it must be one
/// `disagg route` runs.
fn kv_flow(cx: &Ctx<'_>, role: &str, params: &BTreeMap<String, Value>, engine: EngineKind, custom_router: bool) -> Result<Option<Connector>, ConfigError> {
    let path = format!("{role}.params.kv_transfer_config");
    let raw = match params.get("kv_transfer_config") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Mapping(_)) => serde_json::to_string(&params["kv_transfer_config"]).unwrap_or_default(),
        Some(_) => return Err(cx.err(&path, "must be a JSON string (or a mapping)")),
        None if engine == EngineKind::Sim => return Ok(Some(Connector::Nixl)),
        None => return Err(cx.err(&path, "is required: a prefill/decode deployment needs a KV connector (e.g. '{\"kv_connector\":\"NixlConnector\",\"kv_role\":\"kv_producer\"}')")),
    };
    let probe = raw.replace("{KV_IP}", "0.0.0.0").replace("{PORT}", "0").replace("{NODE_NAME}", "n");
    let v: serde_json::Value = serde_json::from_str(&probe).map_err(|e| cx.err(&path, format!("is not valid JSON: {e}")))?;
    let class = launch_connector::class_of(&v).map_err(|e| cx.err(&path, e))?;
    let flow = launch_connector::flow_of(&class);
    if flow.is_none() && !custom_router {
        return Err(cx.err(&path, format!(
            "kv_connector {class}: disagg route runs NixlConnector (and LLMDataDistCMgrConnector), MooncakeConnector and P2pNcclConnector; for {class}, give scheduler.command a proxy that speaks it")));
    }
    Ok(flow)
}

/// pdjob's placeholders in `scheduler.command`, replaced highest index first so that
/// `$PREFILL_HOST_1` never eats the front of `$PREFILL_HOST_10`.
pub fn substitute(cmd: &str, port: u16, prefill: &[String], decode: &[String]) -> String {
    let mut out = cmd.replace("{PORT}", &port.to_string());
    for (name, urls) in [("PREFILL", prefill), ("DECODE", decode)] {
        for idx in (1..=urls.len()).rev() {
            let u = &urls[idx - 1];
            let hostport = u.trim_start_matches("http://");
            if let Some((h, p)) = hostport.rsplit_once(':') {
                for (k, v) in [("HOST", h), ("PORT", p)] {
                    out = out.replace(&format!("${{{name}_{k}_{idx}}}"), v).replace(&format!("${name}_{k}_{idx}"), v);
                }
            }
            out = out.replace(&format!("${{{name}_URL_{idx}}}"), u).replace(&format!("${name}_URL_{idx}"), u);
        }
    }
    out
}

/// Shell-pastable rendering of an argv with its environment.
pub fn shell_line(env: &[(String, String)], argv: &[String], exe: &Path) -> String {
    let q = |s: &str| shlex::try_quote(s).map(|c| c.into_owned()).unwrap_or_else(|_| s.to_string());
    let own = exe.display().to_string();
    env.iter()
        .map(|(k, v)| format!("{k}={}", q(v)))
        .chain(argv.iter().enumerate().map(|(i, a)| if i == 0 && *a == own { "disagg".to_string() } else { q(a) }))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_replaced_highest_index_first() {
        let p: Vec<String> = (1..=11).map(|i| format!("http://p{i}:81{i:02}")).collect();
        let out = substitute("x --port {PORT} $PREFILL_HOST_1 $PREFILL_HOST_11 ${PREFILL_PORT_2} $PREFILL_URL_10 $DECODE_URL_1", 9, &p, &["http://d:1".into()]);
        assert_eq!(out, "x --port 9 p1 p11 8102 http://p10:8110 http://d:1");
    }
}
