//! `disagg launch FILE --k8s DIR`: every example's manifests validate against the
//! Kubernetes API's own OpenAPI schemas (kubernetes-validate from PyPI, strict: an unknown
//! field fails; scripts/k8s-env.sh), a LeaderWorkerSet's leader and worker templates as
//! the PodTemplates they are, and the LeaderWorkerSet itself against LWS's CRD schema as
//! the crates.io bindings generated from it hold it (kcr_leaderworkerset_x_k8s_io, kopium):
//! it must read into them and write back unchanged, so no field is unknown and every value
//! has the schema's type; the router reaches every API server by a name the manifests
//! define; a replica over nodes is one LeaderWorkerSet with its DP ranks.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_yaml_ng::Value;

use crate::support::*;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const EXAMPLES: [&str; 7] = [
    "examples/gb200-2p1d-hybrid.yaml",
    "examples/ascend-2p2d.yaml",
    "examples/deepseek-2p2d.yaml",
    "examples/vllm-cpu-1p1d.yaml",
    "examples/pdjob-toy-proxy.yaml",
    "examples/pdjob-vllm-router.yaml",
    "src/launch/demo.yaml",
];

fn out_dir(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("k8s-{name}-{}-{}", std::process::id(), rand::random::<u32>()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub(crate) fn manifests(example: &str, dir: &Path) -> Vec<(String, Value)> {
    let out = Command::new(BIN)
        .args(["launch", example, "--k8s", dir.to_str().unwrap(), "--no-check"])
        .current_dir(ROOT)
        .env("VENV", "/opt/venv")
        .env("MODEL", "/models/tiny")
        .output()
        .unwrap();
    assert!(out.status.success(), "{example}: {}", String::from_utf8_lossy(&out.stderr));
    let mut docs = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        for doc in serde_yaml_ng::Deserializer::from_str(&text) {
            let v = Value::deserialize(doc).unwrap();
            if !v.is_null() {
                docs.push((path.file_name().unwrap().to_string_lossy().into_owned(), v));
            }
        }
    }
    docs
}

use serde::Deserialize as _;

/// kubernetes-validate --strict over `files`: (passed, its output).
fn validate(files: &[PathBuf]) -> (bool, String) {
    let venv = script_var("k8s-env.sh", "K8S_VENV");
    let out = Command::new(format!("{venv}/bin/kubernetes-validate")).arg("--strict").args(files).output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// A LeaderWorkerSet's templates as core PodTemplates (what the CRD embeds).
fn templates_of(lws: &Value) -> Vec<Value> {
    let name = lws["metadata"]["name"].as_str().unwrap();
    ["leaderTemplate", "workerTemplate"]
        .iter()
        .map(|t| {
            let mut doc = serde_yaml_ng::Mapping::new();
            doc.insert("apiVersion".into(), "v1".into());
            doc.insert("kind".into(), "PodTemplate".into());
            doc.insert("metadata".into(), serde_yaml_ng::from_str(&format!("name: {name}-{}", t.to_lowercase())).unwrap());
            doc.insert("template".into(), lws["spec"]["leaderWorkerTemplate"][*t].clone());
            Value::Mapping(doc)
        })
        .collect()
}

/// The LeaderWorkerSet read into LWS's CRD types and written back: Err names what differs
/// (an unknown field is dropped by the read; a value of the wrong type fails it).
fn against_lws_crd(lws: &Value) -> Result<(), String> {
    use kcr_leaderworkerset_x_k8s_io::v1::leaderworkersets::LeaderWorkerSet;
    let json: serde_json::Value = serde_json::to_value(lws).map_err(|e| e.to_string())?;
    let typed: LeaderWorkerSet = serde_json::from_value(json.clone()).map_err(|e| format!("not a LeaderWorkerSet: {e}"))?;
    let back = serde_json::to_value(&typed).map_err(|e| e.to_string())?;
    match back == json {
        true => Ok(()),
        false => Err(format!("fields the CRD does not have, or values not of its types:\nwritten {json}\nread back {back}")),
    }
}

fn command_of(pod_spec: &Value) -> Vec<String> {
    pod_spec["containers"][0]["command"].as_sequence().unwrap().iter().map(|w| w.as_str().unwrap().to_string()).collect()
}

#[test]
fn every_examples_manifests_validate_against_the_kubernetes_schemas() {
    for example in EXAMPLES {
        let dir = out_dir("examples");
        let docs = manifests(example, &dir);
        let mut files: Vec<PathBuf> =
            std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).filter(|p| !p.ends_with("kustomization.yaml")).collect();
        // The LeaderWorkerSets' pod templates, as the core objects they are.
        let lws: Vec<&Value> = docs.iter().map(|(_, d)| d).filter(|d| d["kind"] == "LeaderWorkerSet").collect();
        let core = docs.iter().filter(|(f, d)| f != "kustomization.yaml" && d["kind"] != "LeaderWorkerSet").count();
        if !lws.is_empty() {
            let text: String =
                lws.iter().flat_map(|l| templates_of(l)).map(|t| format!("---\n{}", serde_yaml_ng::to_string(&t).unwrap())).collect();
            let path = dir.join("lws-templates.check");
            std::fs::write(&path, text).unwrap();
            files.push(path);
        }
        let (ok, out) = validate(&files);
        assert!(ok, "{example}:\n{out}");
        for l in &lws {
            against_lws_crd(l).unwrap_or_else(|e| panic!("{example}: {e}"));
        }
        assert_eq!(out.matches("passed for resource").count(), core + 2 * lws.len(), "{example}: every object checked:\n{out}");
        assert!(!out.contains("Couldn't find schema") || out.matches("Couldn't find schema").count() == lws.len(), "{example}:\n{out}");

        // The kustomization lists every file written.
        let kustomization = docs.iter().find(|(f, _)| f == "kustomization.yaml").map(|(_, d)| d).unwrap();
        let listed: BTreeSet<&str> = kustomization["resources"].as_sequence().unwrap().iter().map(|r| r.as_str().unwrap()).collect();
        let written: BTreeSet<&str> = docs.iter().map(|(f, _)| f.as_str()).filter(|f| *f != "kustomization.yaml").collect();
        assert_eq!(listed, written, "{example}");

        // Every worker URL the router is given names a Service or a LeaderWorkerSet pod written here.
        let services: BTreeSet<&str> =
            docs.iter().filter(|(_, d)| d["kind"] == "Service").map(|(_, d)| d["metadata"]["name"].as_str().unwrap()).collect();
        let sizes: Vec<(&str, u64)> = lws
            .iter()
            .map(|l| (l["metadata"]["name"].as_str().unwrap(), l["spec"]["leaderWorkerTemplate"]["size"].as_u64().unwrap()))
            .collect();
        let router = docs.iter().find(|(_, d)| d["kind"] == "Deployment" && d["metadata"]["name"] == "router").map(|(_, d)| d).unwrap();
        let argv = command_of(&router["spec"]["template"]["spec"]);
        let mut reached = 0;
        for w in argv.iter().filter_map(|a| a.strip_prefix("http://")) {
            let host = w.split(':').next().unwrap();
            let known = services.contains(host)
                || sizes.iter().any(|(g, size)| host == format!("{g}-0.{g}") || (1..*size).any(|k| host == format!("{g}-0-{k}.{g}")));
            assert!(known, "{example}: the router reaches {host}, which no manifest defines");
            reached += 1;
        }
        assert!(reached > 0 || argv.iter().any(|a| services.contains(a.as_str())), "{example}: the router names no engine: {argv:?}");
    }
}

/// Strict validation is real: an unknown field in a pod fails it.
#[test]
fn a_misspelt_field_fails_the_validation() {
    let dir = out_dir("control");
    manifests("examples/vllm-cpu-1p1d.yaml", &dir);
    let path = dir.join("decode-0.yaml");
    let text = std::fs::read_to_string(&path).unwrap().replacen("readinessProbe:", "readinesProbe:", 1);
    std::fs::write(&path, text).unwrap();
    let (ok, out) = validate(&[path]);
    assert!(!ok, "a misspelt field passed:\n{out}");
    // And the LeaderWorkerSet's CRD check: a misspelt field, a value of the wrong type.
    let dir = out_dir("control-lws");
    let docs = manifests("examples/gb200-2p1d-hybrid.yaml", &dir);
    let lws = docs.iter().map(|(_, d)| d).find(|d| d["kind"] == "LeaderWorkerSet").unwrap();
    against_lws_crd(lws).unwrap();
    let mut misspelt = lws.clone();
    misspelt["spec"]["leaderWorkerTemplate"]["restartPolicy"] = "RecreateGroupOnPodRestart".into();
    let t = misspelt["spec"]["leaderWorkerTemplate"].as_mapping_mut().unwrap();
    let size = t.remove("size").unwrap();
    t.insert("groupSize".into(), size);
    assert!(against_lws_crd(&misspelt).is_err(), "a misspelt LeaderWorkerSet field passed");
    let mut wrong = lws.clone();
    wrong["spec"]["leaderWorkerTemplate"]["restartPolicy"] = "Sometimes".into();
    assert!(against_lws_crd(&wrong).is_err(), "a restartPolicy the CRD does not list passed");
}

/// The GB200 guide's replicas span two nodes: one LeaderWorkerSet each, the leader the DP
/// master (hybrid: an API server for its 4 ranks), the worker ranks 4-7 joining it by the
/// leader's address, 4 GPUs per pod, NIXL's side channel on the pod's own address. Over
/// three nodes the worker template computes its start rank from its index.
#[test]
fn replicas_over_nodes_are_leader_worker_sets_with_their_ranks() {
    let dir = out_dir("gb200");
    let docs = manifests("examples/gb200-2p1d-hybrid.yaml", &dir);
    let lws = docs.iter().map(|(_, d)| d).find(|d| d["kind"] == "LeaderWorkerSet" && d["metadata"]["name"] == "prefill-0").unwrap();
    let t = &lws["spec"]["leaderWorkerTemplate"];
    assert_eq!(t["size"].as_u64(), Some(2));
    let leader = command_of(&t["leaderTemplate"]["spec"]);
    let worker = command_of(&t["workerTemplate"]["spec"]);
    let flag = |argv: &[String], f: &str| argv.iter().position(|a| a == f).map(|i| argv[i + 1].clone());
    assert_eq!(flag(&leader, "--data-parallel-start-rank"), None);
    assert_eq!(flag(&worker, "--data-parallel-start-rank").as_deref(), Some("4"));
    for argv in [&leader, &worker] {
        assert_eq!(flag(argv, "--data-parallel-address").as_deref(), Some("$(LWS_LEADER_ADDRESS)"));
        assert_eq!(flag(argv, "--data-parallel-size-local").as_deref(), Some("4"));
        assert_eq!(flag(argv, "--port").as_deref(), Some("8087"));
        assert!(argv.iter().any(|a| a == "--data-parallel-hybrid-lb"));
    }
    let container = &t["workerTemplate"]["spec"]["containers"][0];
    assert_eq!(container["resources"]["limits"]["nvidia.com/gpu"].as_str(), Some("4"));
    let env = serde_yaml_ng::to_string(&container["env"]).unwrap();
    assert!(env.contains("name: VLLM_NIXL_SIDE_CHANNEL_HOST\n  value: $(POD_IP)") && env.contains("fieldPath: status.podIP"), "{env}");
    assert!(!env.contains("CUDA_VISIBLE_DEVICES"), "the device plugin assigns GPUs: {env}");

    // The Ascend guide: NPUs requested from Ascend's device plugin; the headless node's
    // own per-node value (VLLM_ASCEND_LLMDD_RPC_PORT) in the worker template.
    let dir = out_dir("ascend");
    let docs = manifests("examples/ascend-2p2d.yaml", &dir);
    let lws = docs.iter().map(|(_, d)| d).find(|d| d["kind"] == "LeaderWorkerSet" && d["metadata"]["name"] == "prefill-0").unwrap();
    let t = &lws["spec"]["leaderWorkerTemplate"];
    let worker = &t["workerTemplate"]["spec"]["containers"][0];
    assert_eq!(worker["resources"]["limits"]["huawei.com/Ascend910"].as_str(), Some("8"), "{worker:?}");
    let env = |c: &Value| serde_yaml_ng::to_string(&c["env"]).unwrap();
    assert!(env(worker).contains("VLLM_ASCEND_LLMDD_RPC_PORT\n  value: '5659'"), "{}", env(worker));
    assert!(env(&t["leaderTemplate"]["spec"]["containers"][0]).contains("VLLM_ASCEND_LLMDD_RPC_PORT\n  value: '5559'"));
    assert!(command_of(&t["workerTemplate"]["spec"]).iter().any(|a| a == "--headless"));

    // Three nodes per replica (DP 12, 4 GPUs per node): the worker template's start rank.
    let text = std::fs::read_to_string(format!("{ROOT}/examples/gb200-2p1d-hybrid.yaml"))
        .unwrap()
        .replace("num_gpus: 24", "num_gpus: 36")
        .replace("nodes: [prefill-master-0, prefill-worker-0, prefill-master-1, prefill-worker-1, decode-master, decode-worker]", "")
        .replace("  num_gpus: 8\n  data_parallel_size: 8", "  num_gpus: 12\n  data_parallel_size: 12");
    let file = out_dir("three").join("three.yaml");
    std::fs::write(&file, text).unwrap();
    let dir = out_dir("three-out");
    let docs = manifests(file.to_str().unwrap(), &dir);
    let lws = docs.iter().map(|(_, d)| d).find(|d| d["kind"] == "LeaderWorkerSet" && d["metadata"]["name"] == "decode-0").unwrap();
    assert_eq!(lws["spec"]["leaderWorkerTemplate"]["size"].as_u64(), Some(3));
    let worker = command_of(&lws["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]);
    assert_eq!(worker[..2], ["/bin/sh".to_string(), "-c".to_string()]);
    assert!(
        worker[2].starts_with("exec vllm serve ") && worker[2].contains("--data-parallel-start-rank $((LWS_WORKER_INDEX * 4))"),
        "{worker:?}"
    );
}
