//! The KV connector of a launch file: read from the roles' `kv_transfer_config`, checked
//! against the connectors vLLM knows, and what each needs filled in so that `disagg route`
//! and the engines find each other (docs/LAUNCH.md, "Connectors"):
//! - NIXL (and vllm-ascend's LLMDataDistCMgrConnector): side-channel ports per instance.
//! - Mooncake: each prefill's bootstrap server on its planned side-channel port
//!   (`VLLM_MOONCAKE_BOOTSTRAP_PORT`; the simulator's `--mooncake-bootstrap-port`), named
//!   to the router as `--prefill URL PORT`.
//! - P2pNccl: `kv_port` = the side-channel port, `kv_connector_extra_config`'s
//!   `proxy_ip`/`proxy_port`/`http_port` = the router's discovery address and the
//!   instance's HTTP port; the router gets `--vllm-discovery-address` instead of URLs.

use serde_json::{json, Value};

pub(crate) use crate::api::connector::Connector;

/// Connector classes of vLLM 0.32's registry (`kv_connector/factory.py`), plus the
/// plug-ins and legacy ones PD guides use.
pub const KNOWN: &[&str] = &[
    "NixlConnector",
    "NixlPullConnector",
    "NixlPushConnector",
    "MultiConnector",
    "MooncakeConnector",
    "MooncakeStoreConnector",
    "LMCacheConnectorV1",
    "LMCacheMPConnector",
    "OffloadingConnector",
    "SimpleCPUOffloadConnector",
    "ExampleConnector",
    "ExampleHiddenStatesConnector",
    "HiSparseConnector",
    "MoRIIOConnector",
    "DecodeBenchConnector",
    "FlexKVConnectorV1",
    "HF3FSKVConnector",         // vLLM 0.32
    "LLMDataDistCMgrConnector", // vllm-ascend's plug-in
    "P2pNcclConnector",
    "SharedStorageConnector", // removed from vLLM in 2026; older builds have them
];

/// Which flow `disagg route` runs for a connector (None: no flow of ours). A
/// MultiConnector runs its first child that has one; its children are checked too.
pub(crate) fn flow_of(kv: &Value, class: &str) -> Result<Option<Connector>, String> {
    Ok(match class {
        "NixlConnector" | "LLMDataDistCMgrConnector" => Some(Connector::Nixl),
        "MooncakeConnector" => Some(Connector::Mooncake),
        "P2pNcclConnector" => Some(Connector::P2pNccl),
        "MultiConnector" => {
            let children = kv
                .pointer("/kv_connector_extra_config/connectors")
                .and_then(Value::as_array)
                .filter(|c| !c.is_empty())
                .ok_or("MultiConnector needs kv_connector_extra_config.connectors: a list of the connectors it combines")?;
            let mut flow = None;
            for (i, child) in children.iter().enumerate() {
                let class = class_of(child).map_err(|e| format!("MultiConnector's connectors[{i}]: {e}"))?;
                let f = flow_of(child, &class).map_err(|e| format!("MultiConnector's connectors[{i}]: {e}"))?;
                flow = flow.or(f);
            }
            flow
        }
        _ => None,
    })
}

/// The connector class of a `kv_transfer_config` (placeholders already replaced), checked
/// against the known names unless it names its own module.
pub(crate) fn class_of(kv: &Value) -> Result<String, String> {
    let class = kv.get("kv_connector").and_then(Value::as_str).ok_or("has no kv_connector")?;
    if kv.get("kv_connector_module_path").is_none() && !KNOWN.contains(&class) {
        return Err(format!(
            "unknown connector: kv_connector {class} is not one vLLM knows ({}); a connector of your own needs kv_connector_module_path",
            KNOWN.join(", ")
        ));
    }
    Ok(class.to_string())
}

/// The router's discovery port for P2pNccl: the xPyD guide's HTTP + 20000 (10002 -> 30002).
pub(crate) fn discovery_port(router_port: u16) -> Result<u16, String> {
    router_port
        .checked_add(20000)
        .ok_or_else(|| format!("scheduler.port {router_port}: P2pNccl discovery listens on port + 20000; pick a port below 45536"))
}

/// Sets `key` in `obj`, or checks that the user's own value is the same.
fn fill(obj: &mut serde_json::Map<String, Value>, key: &str, want: Value, path: &str) -> Result<(), String> {
    match obj.get(key) {
        None => {
            obj.insert(key.to_string(), want);
            Ok(())
        }
        Some(have) if have == &want || (have.as_str().is_some() && have.as_str() == want.as_str()) => Ok(()),
        Some(have) => Err(format!("{path}.{key} is {have}, but the plan needs {want} here: drop it and let the plan fill it in")),
    }
}

/// P2pNccl's fills into one instance's `kv_transfer_config`.
pub(crate) fn fill_p2p(kv: &mut Value, kv_port: u16, proxy_ip: &str, proxy_port: u16, http_port: u16) -> Result<(), String> {
    let obj = kv.as_object_mut().ok_or("is not a JSON object")?;
    fill(obj, "kv_port", json!(kv_port), "kv_transfer_config")?;
    let extra = obj.entry("kv_connector_extra_config").or_insert_with(|| json!({}));
    let extra = extra.as_object_mut().ok_or("kv_connector_extra_config is not a JSON object")?;
    // vLLM joins proxy_ip + ":" + proxy_port: both strings.
    fill(extra, "proxy_ip", json!(proxy_ip), "kv_transfer_config.kv_connector_extra_config")?;
    fill(extra, "proxy_port", json!(proxy_port.to_string()), "kv_transfer_config.kv_connector_extra_config")?;
    fill(extra, "http_port", json!(http_port.to_string()), "kv_transfer_config.kv_connector_extra_config")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_and_p2p_fills_respect_what_the_user_wrote() {
        assert_eq!(class_of(&json!({"kv_connector": "MooncakeConnector"})).unwrap(), "MooncakeConnector");
        assert!(class_of(&json!({"kv_connector": "NixlConector"})).unwrap_err().contains("NixlConnector"));
        assert!(class_of(&json!({"kv_connector": "Mine", "kv_connector_module_path": "my.mod"})).is_ok());
        let multi = |children: Value| json!({"kv_connector": "MultiConnector", "kv_connector_extra_config": {"connectors": children}});
        let both = multi(json!([{"kv_connector": "OffloadingConnector"}, {"kv_connector": "NixlConnector"}]));
        assert_eq!(flow_of(&both, "MultiConnector"), Ok(Some(Connector::Nixl)));
        assert_eq!(flow_of(&multi(json!([{"kv_connector": "OffloadingConnector"}])), "MultiConnector"), Ok(None));
        assert!(flow_of(&multi(json!([{"kv_connector": "NixlConector"}])), "MultiConnector")
            .unwrap_err()
            .contains("connectors[0]: unknown connector"));
        assert!(flow_of(&json!({"kv_connector": "MultiConnector"}), "MultiConnector").unwrap_err().contains("connectors"));
        let mut kv =
            json!({"kv_connector": "P2pNcclConnector", "kv_role": "kv_producer", "kv_connector_extra_config": {"proxy_port": "30002"}});
        fill_p2p(&mut kv, 21001, "10.0.0.1", 30002, 20001).unwrap();
        assert_eq!(kv["kv_port"], 21001);
        assert_eq!(kv["kv_connector_extra_config"], json!({"proxy_ip": "10.0.0.1", "proxy_port": "30002", "http_port": "20001"}));
        let mut wrong = json!({"kv_connector": "P2pNcclConnector", "kv_connector_extra_config": {"proxy_port": "1"}});
        assert!(fill_p2p(&mut wrong, 21001, "h", 30002, 20001).unwrap_err().contains("proxy_port"));
        assert_eq!(discovery_port(10002), Ok(30002));
        assert!(discovery_port(50000).is_err());
    }
}
