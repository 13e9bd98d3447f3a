//! Engine command lines of a plan: `vllm serve` with the role's params (and the P2pNccl
//! fills of connector.rs), or `disagg sim` with the params it models.

use std::collections::BTreeMap;

use serde_yaml_ng::Value;

use super::config::scalar;
use super::connector as launch_connector;

/// A role's engine parameters, as the plan resolved them.
pub struct EngineParams<'a> {
    pub role: &'a str,
    pub params: &'a BTreeMap<String, Value>,
    pub extra: &'a [String],
}

/// What is wrong, and the launch file's field it is about.
pub struct FieldError {
    pub path: String,
    pub message: String,
}

fn field_error(path: &str, message: impl Into<String>) -> FieldError {
    FieldError { path: path.to_string(), message: message.into() }
}

fn cli_flag(key: &str) -> String {
    format!("--{}", key.replace('_', "-"))
}

fn push_param(argv: &mut Vec<String>, key: &str, v: &Value) {
    match v {
        Value::Null => {}
        Value::Bool(true) => argv.push(cli_flag(key)),
        Value::Bool(false) => argv.push(format!("--no-{}", key.replace('_', "-"))),
        Value::Sequence(items) => {
            argv.push(cli_flag(key));
            argv.extend(items.iter().map(|i| scalar(i).unwrap_or_else(|| serde_json::to_string(i).unwrap_or_default())));
        }
        Value::Mapping(_) => {
            argv.push(cli_flag(key));
            argv.push(serde_json::to_string(v).unwrap_or_default());
        }
        other => {
            argv.push(cli_flag(key));
            argv.push(scalar(other).unwrap_or_default());
        }
    }
}

#[allow(clippy::too_many_arguments)]
pub(super) fn vllm_argv(
    cmd: &[String],
    spec: &EngineParams<'_>,
    host: &str,
    port: Option<u16>,
    name: &str,
    kv_ip: &str,
    dp_args: Vec<String>,
    engine_args: &[String],
    p2p: Option<(&str, u16, u16)>,
) -> Result<Vec<String>, FieldError> {
    let mut argv = cmd.to_vec();
    let role = spec.role;
    match spec.params.get("model").and_then(scalar) {
        Some(m) => argv.push(m),
        None => return Err(field_error(&format!("{role}.params.model"), "is required (in general.params or the role's params)")),
    }
    argv.extend(["--host".into(), host.to_string()]);
    if let Some(p) = port {
        argv.extend(["--port".into(), p.to_string()]);
    }
    for (k, v) in spec.params {
        match k.as_str() {
            "model" | "host" | "port" => {}
            "kv_transfer_config" => {
                let raw = match v {
                    Value::String(s) => s.clone(),
                    other => serde_json::to_string(other).unwrap_or_default(),
                };
                let mut kv = raw
                    .replace("{KV_IP}", kv_ip)
                    .replace("{PORT}", &port.map_or(String::new(), |p| p.to_string()))
                    .replace("{NODE_NAME}", name);
                // P2pNccl: the engine's KV port, the proxy it pings, its own HTTP port.
                if let (Some((proxy_ip, proxy_port, kv_port)), Some(http)) = (p2p, port) {
                    let path = format!("{role}.params.kv_transfer_config");
                    let mut v: serde_json::Value = serde_json::from_str(&kv).map_err(|e| field_error(&path, format!("is not valid JSON: {e}")))?;
                    launch_connector::fill_p2p(&mut v, kv_port, proxy_ip, proxy_port, http).map_err(|e| field_error(&path, e))?;
                    kv = v.to_string();
                }
                argv.extend(["--kv-transfer-config".into(), kv]);
            }
            _ => push_param(&mut argv, k, v),
        }
    }
    argv.extend(dp_args);
    argv.extend(spec.extra.iter().cloned());
    argv.extend(engine_args.iter().cloned());
    Ok(argv)
}

/// The simulator takes the parameters it models; the others are listed in the plan's notes.
#[allow(clippy::too_many_arguments)]
/// The connector's flags and engine.args are added by the caller.
pub(super) fn sim_argv(cmd: &[String], spec: &EngineParams<'_>, host: &str, port: u16, dp: u32, notes: &mut Vec<String>) -> Vec<String> {
    let mut argv = cmd.to_vec();
    argv.extend(["--host".into(), host.to_string(), "--port".into(), port.to_string(), "--role".into(), spec.role.into()]);
    let model = spec.params.get("served_model_name").or_else(|| spec.params.get("model")).and_then(|v| match v {
        Value::Sequence(s) => s.first().and_then(scalar),
        other => scalar(other),
    });
    argv.extend(["--model".into(), model.unwrap_or_else(|| "sim-model".into())]);
    if dp > 1 {
        argv.extend(["--data-parallel-size".into(), dp.to_string()]);
    }
    if let Some(l) = spec.params.get("max_model_len").and_then(scalar) {
        argv.extend(["--max-model-len".into(), l]);
    }
    let unused: Vec<&str> = spec
        .params
        .keys()
        .map(String::as_str)
        .filter(|k| !["model", "served_model_name", "host", "port", "max_model_len", "kv_transfer_config"].contains(k))
        .collect();
    if !unused.is_empty() || !spec.extra.is_empty() {
        notes.push(format!(
            "engine: sim: {} parameters not modelled by the simulator, not passed: {}",
            spec.role,
            unused.iter().map(|s| s.to_string()).chain(spec.extra.iter().cloned()).collect::<Vec<_>>().join(" ")
        ));
    }
    argv
}

