//! `disagg launch FILE --k8s DIR`: the plan as Kubernetes manifests. Per replica: a
//! Deployment and a headless Service (one process), or a LeaderWorkerSet (a replica over
//! several processes: the leader its DP master — the API server of an internal-LB replica —
//! the workers headless or API servers with their start ranks); probes on vLLM's
//! `/health`; GPUs requested from the device plugin; the env and args the plan gives each
//! process; the router's Deployment and Service; a kustomization over them all.

use std::path::Path;

use anyhow::{bail, Context};
use serde_json::{json, Value};

use super::plan::kube::{dns_name, group_name};
use super::plan::{Instance, Plan, RouterPlan};
use super::spec::config::EngineKind;

/// What the manifests run.
pub(crate) struct Images<'a> {
    /// The engines' image (`vllm serve` on PATH).
    pub(crate) engine: &'a str,
    /// The router's (and the simulator's) image: `disagg` on PATH.
    pub(crate) router: &'a str,
    pub(crate) namespace: Option<&'a str>,
}

const LABEL: &str = "app.kubernetes.io/name";
const PART_OF: &str = "app.kubernetes.io/part-of";

/// Writes the manifests into `dir`; returns the files written.
pub(crate) fn write(plan: &Plan, images: &Images<'_>, dir: &Path) -> anyhow::Result<Vec<String>> {
    let router = plan.router.as_ref().context("the launcher script's mode has no router to deploy")?;
    if plan.tls.is_some() {
        bail!("{}: tls: certificates would be Secrets mounted in each pod; --k8s does not write them yet", plan.file);
    }
    if router.argv.iter().any(|a| a == "--vllm-discovery-address") {
        bail!("{}: P2pNcclConnector engines register with the router by address over ZMQ; --k8s does not plan that", plan.file);
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let part_of = plan_name(plan);
    let mut files = Vec::new();
    let mut groups: Vec<String> = plan.instances.iter().map(group_name).collect();
    groups.dedup();
    for g in &groups {
        let members: Vec<&Instance> = plan.instances.iter().filter(|i| &group_name(i) == g).collect();
        let docs = if members.len() == 1 {
            vec![deployment(g, &part_of, pod(plan, members[0], images, None)?), engine_service(g, &part_of, members[0])]
        } else {
            vec![leader_worker_set(plan, g, &part_of, &members, images)?]
        };
        files.push(write_docs(dir, &format!("{g}.yaml"), &docs)?);
    }
    let router_pod = router_pod(router, images);
    files.push(write_docs(dir, "router.yaml", &[deployment("router", &part_of, router_pod), router_service(&part_of, router)])?);
    let mut kustomization = json!({
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": files,
    });
    if let Some(ns) = images.namespace {
        kustomization["namespace"] = json!(ns);
    }
    write_docs(dir, "kustomization.yaml", &[kustomization])?;
    Ok(files)
}

fn plan_name(plan: &Plan) -> String {
    let stem = Path::new(&plan.file).file_stem().map_or("disagg".into(), |s| s.to_string_lossy().to_lowercase());
    let clean: String = stem.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '-' }).collect();
    clean.trim_matches('-').chars().take(63).collect()
}

fn write_docs(dir: &Path, name: &str, docs: &[Value]) -> anyhow::Result<String> {
    let mut text = String::from("# Written by `disagg launch --k8s` (docs/LAUNCH.md, \"Kubernetes\").\n");
    for d in docs {
        text.push_str("---\n");
        text.push_str(&serde_yaml_ng::to_string(d)?);
    }
    std::fs::write(dir.join(name), text).with_context(|| format!("cannot write {}", dir.join(name).display()))?;
    Ok(name.to_string())
}

fn labels(name: &str, part_of: &str) -> Value {
    json!({ LABEL: name, PART_OF: part_of })
}

fn deployment(name: &str, part_of: &str, pod: Value) -> Value {
    json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": labels(name, part_of)},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {LABEL: name}},
            "template": {"metadata": {"labels": labels(name, part_of)}, "spec": pod},
        },
    })
}

/// Headless, and listing pods before they are ready: a DP master resolves its own name
/// before it serves, and NIXL's side channel is reached at the pod's own address.
fn engine_service(name: &str, part_of: &str, i: &Instance) -> Value {
    let mut ports = vec![json!({"name": "side-channel", "port": i.side_channel_port, "targetPort": i.side_channel_port})];
    if let Some(p) = i.port {
        ports.insert(0, json!({"name": "http", "port": p, "targetPort": p}));
    }
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "labels": labels(name, part_of)},
        "spec": {"clusterIP": "None", "publishNotReadyAddresses": true, "selector": {LABEL: name}, "ports": ports},
    })
}

fn router_service(part_of: &str, router: &RouterPlan) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "router", "labels": labels("router", part_of)},
        "spec": {"selector": {LABEL: "router"}, "ports": [{"name": "http", "port": router.port, "targetPort": router.port}]},
    })
}

/// A LeaderWorkerSet for a replica over several processes: one template for every worker,
/// its DP start rank (or rank) computed from LWS_WORKER_INDEX where the workers differ.
fn leader_worker_set(plan: &Plan, name: &str, part_of: &str, members: &[&Instance], images: &Images<'_>) -> anyhow::Result<Value> {
    let leader = pod(plan, members[0], images, None)?;
    let worker = pod(plan, members[1], images, Some(members))?;
    Ok(json!({
        "apiVersion": "leaderworkerset.x-k8s.io/v1",
        "kind": "LeaderWorkerSet",
        "metadata": {"name": name, "labels": labels(name, part_of)},
        "spec": {
            "replicas": 1,
            "leaderWorkerTemplate": {
                "size": members.len(),
                "restartPolicy": "RecreateGroupOnPodRestart",
                "leaderTemplate": {"metadata": {"labels": labels(name, part_of)}, "spec": leader},
                "workerTemplate": {"metadata": {"labels": labels(name, part_of)}, "spec": worker},
            },
        },
    }))
}

/// The flags whose value is a DP rank that grows with the worker's index.
const RANK_FLAGS: [&str; 2] = ["--data-parallel-start-rank", "--data-parallel-rank"];

/// One process's pod. `workers`: a LeaderWorkerSet's members, when this is its worker
/// template (its per-worker ranks become `$((LWS_WORKER_INDEX * step))`).
fn pod(plan: &Plan, i: &Instance, images: &Images<'_>, workers: Option<&[&Instance]>) -> anyhow::Result<Value> {
    let in_lws = i.group.processes > 1;
    let mut argv = container_argv(plan, i, in_lws);
    let mut shell = false;
    if let Some(members) = workers.filter(|m| m.len() > 2) {
        // Workers 1..n differ in their rank flags only: one template computes them.
        let others: Vec<Vec<String>> = members[1..].iter().map(|m| container_argv(plan, m, true)).collect();
        for (at, word) in argv.clone().iter().enumerate() {
            if others.iter().all(|o| o.get(at) == Some(word)) {
                continue;
            }
            let flag = at.checked_sub(1).map(|f| argv[f].as_str()).unwrap_or_default();
            if !RANK_FLAGS.contains(&flag) || others.iter().any(|o| o.len() != argv.len()) {
                bail!(
                    "{}: the workers of {} differ in `{flag} {word}`, which one LeaderWorkerSet template cannot say",
                    plan.file,
                    group_name(i)
                );
            }
            // Worker k's rank must be k times worker 1's, as vLLM's layouts place them.
            let step: u64 = word.parse().with_context(|| format!("{flag} {word}"))?;
            let linear = others.iter().enumerate().all(|(k, o)| o[at].parse::<u64>().ok() == Some(step * (k as u64 + 1)));
            if !linear {
                bail!("{}: the workers of {} have `{flag}` values that are not multiples of their index", plan.file, group_name(i));
            }
            argv[at] = format!("$((LWS_WORKER_INDEX * {step}))");
            shell = true;
        }
    }
    if let Some(members) = workers {
        // One template: the workers' environments must be the same.
        let env_of = |m: &Instance| pod_env(plan, m);
        if members[1..].iter().any(|m| env_of(m) != env_of(i)) {
            bail!(
                "{}: the workers of {} differ in their environment (per-node envs), which one LeaderWorkerSet template cannot say",
                plan.file,
                group_name(i)
            );
        }
    }
    let command: Vec<String> = match shell {
        true => {
            let line = argv.iter().map(|a| {
                if a.starts_with("$((") {
                    a.clone()
                } else {
                    shlex::try_quote(a).map(|c| c.into_owned()).unwrap_or_default()
                }
            });
            vec!["/bin/sh".into(), "-c".into(), format!("exec {}", line.collect::<Vec<_>>().join(" "))]
        }
        false => argv,
    };
    let env = pod_env(plan, i);
    let mut ports = vec![json!({"name": "side-channel", "containerPort": i.side_channel_port})];
    let mut container = json!({
        "name": if plan.engine == EngineKind::Sim { "sim" } else { "vllm" },
        "image": if plan.engine == EngineKind::Sim { images.router } else { images.engine },
        "command": command,
        "env": env,
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}],
    });
    if let Some(p) = i.port {
        ports.insert(0, json!({"name": "http", "containerPort": p}));
        let probe = |period: u64, failures: u64| json!({"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": period, "failureThreshold": failures});
        // vLLM takes minutes to load a model: the plan's timeout, then /health every 10 s.
        container["startupProbe"] = probe(10, plan.timeout.as_secs().div_ceil(10).max(1));
        container["readinessProbe"] = probe(5, 2);
        container["livenessProbe"] = probe(10, 3);
    }
    container["ports"] = json!(ports);
    if !i.gpus.is_empty() {
        let resource = if plan.gpu_env == "ASCEND_RT_VISIBLE_DEVICES" { "huawei.com/Ascend910" } else { "nvidia.com/gpu" };
        container["resources"] = json!({"limits": {resource: i.gpus.len().to_string()}});
    }
    Ok(json!({
        "containers": [container],
        "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory"}}],
    }))
}

/// The process's environment in its pod: the plan's, its address from the downward API
/// wherever the plan wrote its node's, the device variable left to the device plugin.
fn pod_env(plan: &Plan, i: &Instance) -> Vec<Value> {
    let mut env = vec![json!({"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}})];
    for (k, v) in i.env.iter().filter(|(k, _)| *k != plan.gpu_env) {
        let value = match k.as_str() {
            "VLLM_NIXL_SIDE_CHANNEL_HOST" => "$(POD_IP)".to_string(),
            "VLLM_NIXL_SIDE_CHANNEL_PORT" => i.side_channel_port.to_string(),
            _ if plan.nodes.contains(v) => "$(POD_IP)".to_string(),
            _ => v.clone(),
        };
        env.push(json!({"name": k, "value": value}));
    }
    env
}

/// The process's argv in its container: the image's program, every interface, its
/// replica's ports, the DP master by its DNS name.
fn container_argv(plan: &Plan, i: &Instance, in_lws: bool) -> Vec<String> {
    let mut argv = i.argv.clone();
    argv[0] = match plan.engine {
        EngineKind::Sim => "disagg".into(),
        EngineKind::Vllm if argv[0].rsplit('/').next() == Some("vllm") => "vllm".into(),
        EngineKind::Vllm => argv[0].clone(),
    };
    for at in 1..argv.len() {
        let value = match argv[at - 1].as_str() {
            "--host" => "0.0.0.0".to_string(),
            "--port" => match i.port {
                Some(p) => p.to_string(),
                None => continue,
            },
            "--data-parallel-address" if in_lws => "$(LWS_LEADER_ADDRESS)".to_string(),
            "--data-parallel-address" => "$(POD_IP)".to_string(),
            "--side-channel-port" => i.side_channel_port.to_string(),
            _ => continue,
        };
        argv[at] = value;
    }
    argv
}

fn router_pod(router: &RouterPlan, images: &Images<'_>) -> Value {
    let exe = std::env::current_exe().unwrap_or_default().display().to_string();
    let mut argv = router.argv.clone();
    if argv[0] == exe {
        argv[0] = "disagg".into();
    }
    for at in 1..argv.len() {
        if argv[at - 1] == "--host" {
            argv[at] = "0.0.0.0".into();
        }
    }
    let env: Vec<Value> = router.env.iter().map(|(k, v)| json!({"name": k, "value": v})).collect();
    let probe = json!({"httpGet": {"path": router.health_path.as_deref().unwrap_or("/health"), "port": "http"}, "periodSeconds": 5});
    let mut container = json!({
        "name": "router",
        "image": images.router,
        "command": argv,
        "env": env,
        "ports": [{"name": "http", "containerPort": router.port}],
    });
    if router.ours || router.health_path.is_some() {
        container["readinessProbe"] = probe.clone();
        container["livenessProbe"] = probe;
    }
    json!({"containers": [container]})
}

/// The DNS name the router reaches an instance at (for the reader of the manifests).
pub(crate) fn describe(plan: &Plan) -> String {
    let mut out = String::new();
    for i in &plan.instances {
        let reach = i.port.map_or("headless".to_string(), |p| format!("http://{}:{p}", dns_name(i)));
        out.push_str(&format!("  {} -> {} ({})\n", i.name, group_name(i), reach));
    }
    out
}
