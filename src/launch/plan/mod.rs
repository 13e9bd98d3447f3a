//! From a launch file to a plan: every process with its node, GPUs, ports, DP ranks,
//! exact argv and environment, and the router's command. The plan is what `--dry-run`
//! prints and what the local and Ray backends run.

mod dp;
pub(crate) mod kube;
mod process;
mod roles;
mod router;

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::launch::spec::argv::sim_argv;
use crate::launch::spec::config::{line_of, ConfigError, DpMode, EngineKind, LaunchFile, NodeFile};
use crate::launch::spec::connector::{self as launch_connector, Connector};
pub(crate) use dp::ReplicaPart;
use dp::Slot;
pub(crate) use process::shell_line;
use process::{Fills, UserParams};
use roles::RoleSpec;

pub(crate) use crate::api::Role;

/// One process to start.
#[derive(Debug, Clone)]
pub(crate) struct Instance {
    /// `prefill-0`, `decode-1`, ...: also its log file's name.
    pub(crate) name: String,
    pub(crate) role: Role,
    pub(crate) node: usize,
    pub(crate) host: String,
    /// None for a headless DP worker (no HTTP server).
    pub(crate) port: Option<u16>,
    pub(crate) scheme: Scheme,
    pub(crate) side_channel_port: u16,
    pub(crate) gpus: Vec<u32>,
    /// "DP 8, ranks 0-3, hybrid LB" and the like, for the plan's reader.
    pub(crate) dp: Option<String>,
    /// DP ranks reached through its API server (0 for a headless node).
    pub(crate) ranks: u32,
    /// Takes either leg (the router's --pd-pool).
    pub(crate) elastic: bool,
    /// Its replica and its place there.
    pub(crate) group: ReplicaPart,
    pub(crate) argv: Vec<String>,
    pub(crate) env: Vec<(String, String)>,
}

impl Instance {
    pub(crate) fn url(&self) -> Option<String> {
        self.port.map(|p| url(self.scheme, &self.host, p))
    }
}

/// How an API server is reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Scheme {
    Http,
    /// The launch file's `tls:`.
    Https,
}

pub(crate) fn url(scheme: Scheme, host: &str, port: u16) -> String {
    let s = match scheme {
        Scheme::Http => "http",
        Scheme::Https => "https",
    };
    format!("{s}://{}", crate::api::join_host_port(host, port))
}

#[derive(Debug, Clone)]
pub(crate) struct RouterPlan {
    pub(crate) host: String,
    pub(crate) port: u16,
    pub(crate) scheme: Scheme,
    pub(crate) argv: Vec<String>,
    pub(crate) env: Vec<(String, String)>,
    /// Our own `disagg route` (vs a pdjob `scheduler.command`).
    pub(crate) ours: bool,
    /// scheduler.health_path: where a `scheduler.command` proxy says it is ready.
    pub(crate) health_path: Option<String>,
    /// Ours: `argv` as parts, for a backend that learns the URLs only at start (Ray):
    /// `base`, then each worker's flag with its instance's URL, then `tail`.
    pub(crate) base: Vec<String>,
    pub(crate) workers: Vec<RouterWorker>,
    pub(crate) tail: Vec<String>,
}

/// One `--prefill URL [BOOTSTRAP_PORT]` or `--decode URL` of `disagg route`.
#[derive(Debug, Clone)]
pub(crate) struct RouterWorker {
    pub(crate) flag: &'static str,
    /// The instance whose URL goes here.
    pub(crate) instance: String,
    /// Mooncake: the prefill's bootstrap port.
    pub(crate) bootstrap: Option<u16>,
}

#[derive(Debug, Clone)]
pub(crate) struct Plan {
    pub(crate) file: String,
    pub(crate) engine: EngineKind,
    /// GPUs per Ray bundle (pdjob's gpus_per_worker).
    pub(crate) gpus_per_worker: u32,
    pub(crate) timeout: Duration,
    pub(crate) working_dir: PathBuf,
    pub(crate) nodes: Vec<String>,
    pub(crate) gpus_per_node: u32,
    /// The variable that assigns devices (CUDA_VISIBLE_DEVICES, ASCEND_RT_VISIBLE_DEVICES).
    pub(crate) gpu_env: String,
    pub(crate) instances: Vec<Instance>,
    /// None: the launcher script's mode (no router of its own).
    pub(crate) router: Option<RouterPlan>,
    /// The launch file's `tls:` (the health checks' client comes from it).
    pub(crate) tls: Option<crate::launch::spec::config::TlsFile>,
    /// Things the reader should know (e.g. parameters the simulator does not use).
    pub(crate) notes: Vec<String>,
}

impl Plan {
    pub(crate) fn log_path(&self, name: &str) -> PathBuf {
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

const PORT_STRIDE: u16 = 8;
const DP_RPC_BASE: u16 = 13345;

/// Where the plan will run: on known nodes, or on Ray, which picks each replica's node
/// (then `{HOST}` and `{KV_IP}` stay in the commands, filled in on the node, and Ray
/// assigns the GPUs itself), or as Kubernetes objects (each process a pod, reached by its
/// DNS name, its GPUs requested from the device plugin).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Target {
    Nodes,
    Ray,
    Kubernetes,
}

pub(crate) fn build(f: &LaunchFile, file: &str, text: &str, exe: &Path, target: Target) -> Result<Plan, ConfigError> {
    let cx = Ctx { file, text };
    if let Some(t) = &f.tls {
        if target == Target::Ray {
            return Err(cx.err("tls", "is for launches on known nodes; --ray does not set up TLS yet"));
        }
        if t.cert_reqs > 2 {
            return Err(cx.err("tls.cert_reqs", "must be 0, 1 or 2 (vLLM's --ssl-cert-reqs)"));
        }
        if t.client_certfile.is_some() != t.client_keyfile.is_some() {
            return Err(cx.err("tls.client_certfile", "goes with tls.client_keyfile"));
        }
        if t.cert_reqs == 2 && t.client_certfile.is_none() {
            return Err(cx.err(
                "tls.cert_reqs",
                "2 requires client certificates: give the router's with tls.client_certfile and tls.client_keyfile",
            ));
        }
    }
    let cluster = cluster(f, &cx, target)?;
    let roles = roles::specs(f, &cx)?;
    let flow = roles[0].flow;
    let engine = engine_command(f, &cx, exe)?;
    let at = router::address(f, &cx, &cluster.nodes, flow)?;
    let mut notes = Vec::new();
    if flow == Some(Connector::P2pNccl) && engine.kind == EngineKind::Vllm {
        notes.push("engine: P2pNcclConnector was removed from vLLM in 2026 (vLLM 0.32 has none): these engines need a vLLM release that still has it".into());
    }
    let mut placer = Placer {
        free: cluster.nodes.iter().map(|_| (0..cluster.gpus_per_node).collect()).collect(),
        gpus_per_node: cluster.gpus_per_node,
        num_gpus: f.num_gpus,
    };
    let mut builder = InstanceBuilder {
        f,
        cx: &cx,
        target,
        cluster: &cluster,
        engine: &engine,
        p2p: at.p2p_proxy.clone(),
        instances: Vec::new(),
        notes: &mut notes,
        http_next: BTreeMap::new(),
        side_next: BTreeMap::new(),
    };
    let mut replica_global = 0usize;
    for spec in &roles {
        for replica in 0..spec.replicas as usize {
            let parts = placer.place(&cx, spec, replica, replica_global, cluster.nodes.len())?;
            if spec.dp as usize % parts.len() != 0 {
                return Err(cx.err(
                    &format!("{}.data_parallel_size", spec.name()),
                    format!("{} DP ranks do not split over the replica's {} nodes", spec.dp, parts.len()),
                ));
            }
            if spec.flow == Some(Connector::Mooncake)
                && spec.role == Role::Prefill
                && (parts.len() > 1 || (spec.layout != DpMode::Internal && spec.dp > 1))
            {
                return Err(cx.err(&format!("{}.data_parallel_size", spec.name()),
                    "a Mooncake prefill is planned as one process per replica (one bootstrap server naming all its DP ranks): keep its DP internal and on one node"));
            }
            if spec.layout == DpMode::Hybrid && parts.len() > 1 && spec.dp as usize / parts.len() == 1 {
                return Err(cx.err(
                    &format!("{}.dp_mode", spec.name()),
                    "hybrid LB with one DP rank per node is what vLLM runs as external LB (it switches by itself): say dp_mode: external",
                ));
            }
            let master = cluster.nodes[parts[0].0].clone();
            let rpc_port = DP_RPC_BASE + replica_global as u16;
            let slots = dp::slots(spec.layout, spec.dp, &parts);
            for (part, slot) in slots.iter().enumerate() {
                let group = ReplicaPart { replica, part, processes: slots.len() };
                builder.add(spec, parts.len(), slot, group, &master, rpc_port)?;
            }
            replica_global += 1;
        }
    }
    let mut instances = builder.instances;
    check_ports_unique(&cx, &instances)?;
    if target == Target::Kubernetes {
        kube::reach_by_dns(&mut instances);
    }
    let router = router::plan(f, &cx, exe, &cluster.nodes, flow, &instances, &at)?;
    notes.dedup();
    Ok(Plan {
        file: file.to_string(),
        engine: engine.kind,
        gpus_per_worker: f.gpus_per_worker,
        timeout: Duration::from_secs(f.timeout),
        working_dir: PathBuf::from(&f.working_dir),
        nodes: cluster.nodes,
        gpus_per_node: cluster.gpus_per_node,
        gpu_env: f.gpu_env.clone(),
        instances,
        router: Some(router),
        tls: f.tls.clone(),
        notes,
    })
}

struct Cluster {
    nodes: Vec<String>,
    /// Each node's own envs and params (empty for a bare address).
    node_files: Vec<Option<NodeFile>>,
    gpus_per_node: u32,
}

fn cluster(f: &LaunchFile, cx: &Ctx<'_>, target: Target) -> Result<Cluster, ConfigError> {
    if target == Target::Ray && !f.nodes.is_empty() {
        return Err(cx.err("nodes", "is for launches on known nodes; with --ray, Ray places every replica"));
    }
    if f.gpus_per_worker == 0 {
        return Err(cx.err("gpus_per_worker", "must be at least 1"));
    }
    if f.num_gpus % f.gpus_per_worker != 0 {
        return Err(cx.err("num_gpus", format!("{} is not a multiple of gpus_per_worker {}", f.num_gpus, f.gpus_per_worker)));
    }
    let (nodes, node_files): (Vec<String>, Vec<Option<NodeFile>>) = match (target, f.nodes.is_empty()) {
        (Target::Ray, _) => (vec!["{HOST}".to_string()], vec![None]),
        (Target::Nodes | Target::Kubernetes, true) => (vec!["127.0.0.1".to_string()], vec![None]),
        (Target::Nodes | Target::Kubernetes, false) => {
            (f.nodes.iter().map(|n| n.address().to_string()).collect(), f.nodes.iter().cloned().map(Some).collect())
        }
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
    Ok(Cluster { nodes, node_files, gpus_per_node })
}

struct EngineCommand {
    kind: EngineKind,
    argv: Vec<String>,
}

fn engine_command(f: &LaunchFile, cx: &Ctx<'_>, exe: &Path) -> Result<EngineCommand, ConfigError> {
    Ok(match f.engine.kind() {
        EngineKind::Vllm => EngineCommand {
            kind: EngineKind::Vllm,
            argv: shlex::split(f.engine.command().unwrap_or("vllm serve"))
                .filter(|w| !w.is_empty())
                .ok_or_else(|| cx.err("engine.command", "is not a valid command line"))?,
        },
        EngineKind::Sim => EngineCommand { kind: EngineKind::Sim, argv: vec![exe.display().to_string(), "sim".into()] },
    })
}

/// First fit of replicas on the nodes' free GPUs, lowest device ids first; a replica
/// larger than a node takes whole nodes.
struct Placer {
    free: Vec<Vec<u32>>,
    gpus_per_node: u32,
    num_gpus: u32,
}

impl Placer {
    fn place(
        &mut self,
        cx: &Ctx<'_>,
        spec: &RoleSpec,
        replica: usize,
        replica_global: usize,
        nodes: usize,
    ) -> Result<Vec<(usize, Vec<u32>)>, ConfigError> {
        let (name, need, per_node) = (spec.name(), spec.num_gpus, self.gpus_per_node);
        if need == 0 {
            return Ok(vec![(replica_global % nodes, Vec::new())]);
        }
        if need <= per_node {
            let node = (0..nodes).find(|n| self.free[*n].len() >= need as usize).ok_or_else(|| {
                cx.err(
                    &format!("{name}.num_gpus"),
                    format!("no node has {need} free GPUs for {name} replica {replica} (num_gpus {}, {per_node} per node)", self.num_gpus),
                )
            })?;
            return Ok(vec![(node, self.free[node].drain(..need as usize).collect())]);
        }
        if need % per_node != 0 {
            return Err(cx.err(
                &format!("{name}.num_gpus"),
                format!("a replica of {need} GPUs spans nodes of {per_node}: it must be a multiple of {per_node}"),
            ));
        }
        if spec.dp == 1 {
            return Err(cx.err(
                &format!("{name}.num_gpus"),
                format!(
                    "a replica of {need} GPUs spans several nodes: set data_parallel_size so every node runs its share of the DP ranks"
                ),
            ));
        }
        let k = (need / per_node) as usize;
        let start = (0..=nodes.saturating_sub(k))
            .find(|s| s + k <= nodes && (*s..*s + k).all(|n| self.free[n].len() == per_node as usize))
            .ok_or_else(|| cx.err(&format!("{name}.num_gpus"), format!("no {k} whole free nodes for {name} replica {replica}")))?;
        Ok((start..start + k).map(|n| (n, self.free[n].drain(..).collect())).collect())
    }
}

/// Builds each process's command line, environment and ports.
struct InstanceBuilder<'a> {
    f: &'a LaunchFile,
    cx: &'a Ctx<'a>,
    target: Target,
    cluster: &'a Cluster,
    engine: &'a EngineCommand,
    p2p: Option<(String, u16)>,
    instances: Vec<Instance>,
    notes: &'a mut Vec<String>,
    /// Next HTTP / side-channel offset per (node, role).
    http_next: BTreeMap<(usize, Role), u16>,
    side_next: BTreeMap<(usize, Role), u16>,
}

impl InstanceBuilder<'_> {
    fn add(
        &mut self,
        spec: &RoleSpec,
        replica_nodes: usize,
        slot: &Slot,
        group: ReplicaPart,
        master: &str,
        rpc_port: u16,
    ) -> Result<(), ConfigError> {
        let (cx, name) = (self.cx, spec.name());
        let node = slot.node;
        let host = self.cluster.nodes[node].clone();
        let index = self.instances.iter().filter(|i| i.role == spec.role).count();
        let inst_name = format!("{name}-{index}");
        let local_rank = self.instances.iter().filter(|i| i.role == spec.role && i.node == node).count();
        let planned_port = if slot.headless {
            None
        } else {
            let i = self.http_next.entry((node, spec.role)).or_insert(0);
            let p = spec.port as u32 + PORT_STRIDE as u32 * node as u32 + *i as u32;
            *i += 1;
            Some(u16::try_from(p).map_err(|_| cx.err(&format!("{name}.port"), "ports run past 65535"))?)
        };
        let s = self.side_next.entry((node, spec.role)).or_insert(0);
        let side = u16::try_from(spec.side as u32 + PORT_STRIDE as u32 * node as u32 + *s as u32)
            .map_err(|_| cx.err(&format!("{name}.side_channel_port"), "ports run past 65535"))?;
        *s += slot.ranks as u16;
        let kv_ip = if self.target == Target::Ray { "{KV_IP}".to_string() } else { self.cluster.nodes[0].clone() };
        let deferred: &[&str] = if self.target == Target::Ray { &["HOST", "KV_IP"] } else { &[] };
        let fills = Fills {
            values: vec![
                ("NODE_IP", host.clone()),
                ("NODE_RANK", node.to_string()),
                ("LOCAL_RANK", local_rank.to_string()),
                ("KV_IP", kv_ip),
                ("PORT", planned_port.map_or(String::new(), |p| p.to_string())),
                ("NODE_NAME", inst_name.clone()),
            ],
            deferred,
        };
        let node_file = self.cluster.node_files[node].as_ref();
        let (node_envs, node_params) = match node_file {
            Some(NodeFile::Full { envs, params, .. }) => (Some(envs), Some(params)),
            _ => (None, None),
        };
        let origin = spec.params.keys().map(|k| (k.clone(), format!("{name}.params"))).collect();
        let mut user =
            UserParams { params: spec.params.clone(), origin, extra: &spec.extra, extra_path: format!("{name}.params._extra_params") };
        for (k, v) in node_params.into_iter().flatten() {
            user.params.insert(k.clone(), v.clone());
            user.origin.insert(k.clone(), format!("nodes[{node}].params"));
        }
        // The plan's environment: the connector's side of the handshake, the devices.
        let mut plan_env: Vec<(String, String)> = Vec::new();
        if self.engine.kind == EngineKind::Vllm {
            match (spec.flow, spec.class.as_deref()) {
                (Some(Connector::Mooncake), _) if spec.role == Role::Prefill => {
                    plan_env.push(("VLLM_MOONCAKE_BOOTSTRAP_PORT".into(), side.to_string()))
                }
                // Both legs must see the id the router sent (it names the KV addresses).
                (Some(Connector::P2pNccl), _) => plan_env.push(("VLLM_DISABLE_REQUEST_ID_RANDOMIZATION".into(), "1".into())),
                (Some(Connector::Nixl), Some(c)) if c != "LLMDataDistCMgrConnector" => {
                    plan_env.push(("VLLM_NIXL_SIDE_CHANNEL_HOST".into(), host.clone()));
                    plan_env.push(("VLLM_NIXL_SIDE_CHANNEL_PORT".into(), side.to_string()));
                }
                _ => {}
            }
        }
        if !slot.gpus.is_empty() && self.target == Target::Nodes {
            plan_env.push((self.f.gpu_env.clone(), slot.gpus.iter().map(u32::to_string).collect::<Vec<_>>().join(",")));
        }
        let layers: Vec<&BTreeMap<String, serde_yaml_ng::Value>> =
            [Some(&self.f.envs), Some(&spec.envs), node_envs].into_iter().flatten().collect();
        let env = process::environment(plan_env, &layers, &fills).map_err(|(k, m)| cx.err(&format!("envs.{k}"), m))?;
        let side = env_port(&env, "VLLM_NIXL_SIDE_CHANNEL_PORT").or_else(|| env_port(&env, "VLLM_MOONCAKE_BOOTSTRAP_PORT")).unwrap_or(side);

        let mut plan_flags: Vec<dp::Flag> = Vec::new();
        if let Some(p) = planned_port {
            plan_flags.push(("host".into(), Some(host.clone())));
            plan_flags.push(("port".into(), Some(p.to_string())));
        }
        plan_flags.extend(dp::flags(spec.layout, spec.dp, replica_nodes, slot, master, rpc_port));
        let p2p = self.p2p.clone();
        let kv = |raw: &str| -> Result<String, String> {
            match (&p2p, planned_port) {
                // P2pNccl: the engine's KV port, the proxy it pings, its own HTTP port.
                (Some((proxy_ip, proxy_port)), Some(http)) => {
                    let mut v: serde_json::Value = serde_json::from_str(raw).map_err(|e| format!("is not valid JSON: {e}"))?;
                    launch_connector::fill_p2p(&mut v, side, proxy_ip, *proxy_port, http)?;
                    Ok(v.to_string())
                }
                _ => Ok(raw.to_string()),
            }
        };
        let rendered = process::render(plan_flags, &user, slot.headless, &fills, &kv).map_err(|e| cx.err(&e.path, e.message))?;
        let port = if slot.headless { None } else { rendered.port.or(planned_port) };
        let argv = match self.engine.kind {
            EngineKind::Vllm => {
                let model = rendered
                    .model
                    .ok_or_else(|| cx.err(&format!("{name}.params.model"), "is required (in general.params or the role's params)"))?;
                let mut argv = self.engine.argv.clone();
                argv.push(model);
                argv.extend(rendered.args);
                argv.extend(self.f.engine.args().iter().cloned());
                argv
            }
            EngineKind::Sim => self.sim_argv(spec, &rendered.args, side),
        };
        for s in argv.iter().chain(env.iter().map(|(_, v)| v)) {
            if let Some(p) = fills.unfilled(s) {
                return Err(cx.err(&format!("{name}.params"), format!("{{{p}}} has no value here (the plan fills {})", fills.names())));
            }
        }
        let ranks = slot.served_ranks(spec.layout, spec.dp);
        let dp = slot.describe(spec.layout, spec.dp);
        let scheme = if self.f.tls.is_some() { Scheme::Https } else { Scheme::Http };
        self.instances.push(Instance {
            name: inst_name,
            role: spec.role,
            node,
            host,
            port,
            scheme,
            side_channel_port: side,
            gpus: slot.gpus.clone(),
            dp,
            ranks,
            elastic: spec.elastic,
            group,
            argv,
            env,
        });
        Ok(())
    }

    /// The simulator's command: the params it models, the same host/port/DP flags as
    /// vLLM's, and its connector's flags.
    fn sim_argv(&mut self, spec: &RoleSpec, vllm_args: &[String], side: u16) -> Vec<String> {
        let role = if spec.elastic { Role::Both.as_str() } else { spec.name() };
        let mut argv = sim_argv(&self.engine.argv, role, &spec.params, &spec.extra, self.notes);
        argv.extend(sim_flags(vllm_args));
        match spec.flow {
            Some(Connector::Mooncake) => {
                argv.extend(["--kv-connector".into(), "mooncake".into()]);
                if spec.role == Role::Prefill {
                    argv.extend(["--mooncake-bootstrap-port".into(), side.to_string()]);
                }
            }
            Some(Connector::P2pNccl) => {
                let (h, p) = self.p2p.clone().expect("set for P2pNccl");
                argv.extend(["--kv-connector".into(), "p2pnccl".into(), "--proxy-address".into(), crate::api::join_host_port(&h, p)]);
                argv.extend(["--side-channel-port".into(), side.to_string()]);
            }
            Some(Connector::Nixl) | None => argv.extend(["--side-channel-port".into(), side.to_string()]),
        }
        argv.extend(self.f.engine.args().iter().cloned());
        argv
    }
}

/// The simulator takes vLLM's host, port and DP flags as they are.
fn sim_flags(vllm_args: &[String]) -> Vec<String> {
    const TAKES_VALUE: &[&str] = &[
        "--host",
        "--port",
        "--data-parallel-size",
        "--data-parallel-size-local",
        "--data-parallel-start-rank",
        "--data-parallel-rank",
        "--data-parallel-address",
        "--data-parallel-rpc-port",
    ];
    const SWITCHES: &[&str] = &["--headless", "--data-parallel-hybrid-lb"];
    let mut out = Vec::new();
    let mut it = vllm_args.iter().peekable();
    while let Some(a) = it.next() {
        if TAKES_VALUE.contains(&a.as_str()) {
            out.push(a.clone());
            out.extend(it.next().cloned());
        } else if SWITCHES.contains(&a.as_str()) {
            out.push(a.clone());
        }
    }
    out
}

fn env_port(env: &[(String, String)], key: &str) -> Option<u16> {
    env.iter().find(|(k, _)| k == key).and_then(|(_, v)| v.parse().ok())
}

/// Every (host, port) once, HTTP and side channels alike.
fn check_ports_unique(cx: &Ctx<'_>, instances: &[Instance]) -> Result<(), ConfigError> {
    let mut seen = HashSet::new();
    for i in instances {
        for (what, p) in [("HTTP", i.port), ("side-channel", Some(i.side_channel_port))] {
            if let Some(p) = p {
                if !seen.insert((i.host.clone(), p)) {
                    return Err(cx.err(&format!("{}.port", i.role.as_str()), format!("{what} port {p} of {} on {} is already taken by another instance: set prefill/decode port and side_channel_port apart", i.name, i.host)));
                }
            }
        }
    }
    Ok(())
}
