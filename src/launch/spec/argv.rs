//! `vllm serve` flags from launch-file params, and `disagg sim`'s command line with the
//! params it models.

use std::collections::BTreeMap;

use serde_yaml_ng::Value;

use super::config::scalar;

fn cli_flag(key: &str) -> String {
    format!("--{}", key.replace('_', "-"))
}

/// `key: value` as vLLM's flags: `true` -> `--key`, `false` -> `--no-key`, lists ->
/// `--key a b`, mappings -> JSON.
pub(crate) fn push_param(argv: &mut Vec<String>, key: &str, v: &Value) {
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

/// `vllm serve`'s TLS params, which the simulator takes too.
const TLS_PARAMS: &[&str] = &["ssl_keyfile", "ssl_certfile", "ssl_ca_certs", "ssl_cert_reqs", "enable_ssl_refresh"];

/// The simulator's flags for the params it models; the others are listed in the plan's
/// notes. The connector's and DP flags and engine.args are added by the caller.
pub(crate) fn sim_argv(
    cmd: &[String],
    role: &str,
    params: &BTreeMap<String, Value>,
    extra: &[String],
    notes: &mut Vec<String>,
) -> Vec<String> {
    let mut argv = cmd.to_vec();
    argv.extend(["--role".into(), role.into()]);
    let model = params.get("served_model_name").or_else(|| params.get("model")).and_then(|v| match v {
        Value::Sequence(s) => s.first().and_then(scalar),
        other => scalar(other),
    });
    argv.extend(["--model".into(), model.unwrap_or_else(|| "sim-model".into())]);
    if let Some(l) = params.get("max_model_len").and_then(scalar) {
        argv.extend(["--max-model-len".into(), l]);
    }
    // HTTPS: the simulator takes vLLM's flags as they are.
    for key in TLS_PARAMS {
        if let Some(v) = params.get(*key) {
            push_param(&mut argv, key, v);
        }
    }
    let unused: Vec<&str> = params
        .keys()
        .map(String::as_str)
        .filter(|k| {
            ![
                "model",
                "served_model_name",
                "host",
                "port",
                "max_model_len",
                "kv_transfer_config",
                "data_parallel_address",
                "data_parallel_rpc_port",
            ]
            .contains(k)
                && !TLS_PARAMS.contains(k)
        })
        .collect();
    if !unused.is_empty() || !extra.is_empty() {
        notes.push(format!(
            "engine: sim: {role} parameters not modelled by the simulator, not passed: {}",
            unused.iter().map(|s| s.to_string()).chain(extra.iter().cloned()).collect::<Vec<_>>().join(" ")
        ));
    }
    argv
}
