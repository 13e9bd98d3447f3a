//! One process's command line and environment: the plan's flags, the user's params and
//! envs over them (one flag per key: a user's value overrides the plan's where that is
//! safe, and is an error naming the field where the plan must decide), per-node values
//! (`{NODE_IP}`, `{NODE_RANK}`, `{LOCAL_RANK}` and the node's own envs/params).

use std::collections::BTreeMap;

use serde_yaml_ng::Value;

use super::dp::Flag;
use crate::launch::spec::argv::push_param;
use crate::launch::spec::config::scalar;

/// Keys vLLM refuses on a `--headless` node ("api_server_count can't be set in headless
/// mode"): the user's value reaches the API-server nodes only.
const API_SERVER_ONLY: &[&str] = &["api_server_count"];

/// What a user's param may do to a flag the plan sets.
#[derive(PartialEq)]
enum Rule {
    /// The user's value is used (addresses and ports the guides pick themselves).
    Override,
    /// Must equal the plan's value: the plan's placement depends on it.
    MustMatch,
    /// Only the plan sets it, per node or per rank.
    PlanOnly,
}

fn rule(key: &str) -> Rule {
    match key {
        "data_parallel_size_local" => Rule::MustMatch,
        "data_parallel_start_rank" | "data_parallel_rank" | "headless" => Rule::PlanOnly,
        _ => Rule::Override,
    }
}

/// What is wrong, and the launch file's field it is about.
pub(super) struct FieldError {
    pub(crate) path: String,
    pub(crate) message: String,
}

fn field_error(path: &str, message: impl Into<String>) -> FieldError {
    FieldError { path: path.to_string(), message: message.into() }
}

/// Per-process values of `{NAME}` placeholders.
pub(super) struct Fills<'a> {
    pub(crate) values: Vec<(&'static str, String)>,
    /// Placeholders left for later (`{HOST}`, `{KV_IP}` on Ray: filled on the node).
    pub(crate) deferred: &'a [&'a str],
}

impl Fills<'_> {
    pub(crate) fn apply(&self, s: &str) -> String {
        let mut out = s.to_string();
        for (k, v) in &self.values {
            out = out.replace(&format!("{{{k}}}"), v);
        }
        out
    }

    /// The first `{NAME}` (upper case) in `s` that nothing fills.
    pub(crate) fn unfilled<'s>(&self, s: &'s str) -> Option<&'s str> {
        let mut rest = s;
        while let Some(i) = rest.find('{') {
            let after = &rest[i + 1..];
            let end = after.find(|c: char| !(c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')).unwrap_or(after.len());
            let name = &after[..end];
            if end > 0
                && after[end..].starts_with('}')
                && name.starts_with(|c: char| c.is_ascii_uppercase())
                && !self.deferred.contains(&name)
            {
                return Some(name);
            }
            rest = after;
        }
        None
    }

    pub(crate) fn names(&self) -> String {
        self.values.iter().map(|(k, _)| format!("{{{k}}}")).collect::<Vec<_>>().join(", ")
    }
}

/// A user's params for one process: the role's, with its node's over them.
pub(super) struct UserParams<'a> {
    pub(crate) params: BTreeMap<String, Value>,
    /// Where a key came from, for messages: `prefill.params` or `nodes[2].params`.
    pub(crate) origin: BTreeMap<String, String>,
    pub(crate) extra: &'a [String],
    pub(crate) extra_path: String,
}

impl UserParams<'_> {
    fn path(&self, key: &str) -> String {
        format!("{}.{key}", self.origin.get(key).map_or("params", String::as_str))
    }
}

/// The rendered flags of one process: the plan's (with the user's overrides applied), then
/// the user's other params, then `_extra_params`. `model` is returned apart (positional).
pub(super) struct Rendered {
    pub(crate) model: Option<String>,
    pub(crate) args: Vec<String>,
    /// The HTTP port the process listens on (the user's `port` if given).
    pub(crate) port: Option<u16>,
}

/// `kv` renders `kv_transfer_config` (placeholders, connector fills) for this process.
pub(super) fn render(
    plan: Vec<Flag>,
    user: &UserParams<'_>,
    headless: bool,
    fills: &Fills<'_>,
    kv: &dyn Fn(&str) -> Result<String, String>,
) -> Result<Rendered, FieldError> {
    let mut args = Vec::new();
    let mut port = None;
    for (key, value) in &plan {
        let mine = user.params.get(key.as_str());
        let value = match (mine, rule(key)) {
            (None, _) => value.clone(),
            // `host: ~`: vLLM's default (every interface), as guides that give no --host.
            (Some(Value::Null), _) if key == "host" => continue,
            (Some(_), Rule::PlanOnly) => {
                return Err(field_error(&user.path(key), "is set by the plan for each node or rank: remove it"));
            }
            (Some(v), Rule::MustMatch) => {
                let have = scalar(v).map(|s| fills.apply(&s));
                if have != *value {
                    return Err(field_error(
                        &user.path(key),
                        format!(
                            "is {}, but this process runs {} DP rank(s) locally: remove it and let the plan set it",
                            have.unwrap_or_default(),
                            value.clone().unwrap_or_default()
                        ),
                    ));
                }
                value.clone()
            }
            (Some(v), Rule::Override) => {
                Some(scalar(v).map(|s| fills.apply(&s)).ok_or_else(|| field_error(&user.path(key), "must be a string or a number"))?)
            }
        };
        if key == "port" {
            port = value
                .as_deref()
                .map(|p| p.parse::<u16>().map_err(|_| field_error(&user.path(key), format!("{p} is not a port"))))
                .transpose()?;
        }
        args.push(format!("--{}", key.replace('_', "-")));
        args.extend(value);
    }
    let plan_keys: Vec<&str> = plan.iter().map(|(k, _)| k.as_str()).collect();
    let mut model = None;
    for (key, v) in &user.params {
        if plan_keys.contains(&key.as_str()) || (headless && API_SERVER_ONLY.contains(&key.as_str())) {
            continue;
        }
        if rule(key) == Rule::PlanOnly || key == "data_parallel_size_local" {
            return Err(field_error(&user.path(key), "is set by the plan for each node or rank: remove it"));
        }
        match key.as_str() {
            "model" => model = scalar(v).map(|s| fills.apply(&s)),
            "kv_transfer_config" => {
                let raw = match v {
                    Value::String(s) => s.clone(),
                    other => serde_json::to_string(other).unwrap_or_default(),
                };
                let kv = kv(&fills.apply(&raw)).map_err(|e| field_error(&user.path(key), e))?;
                args.extend(["--kv-transfer-config".to_string(), kv]);
            }
            _ => {
                if key == "port" {
                    // The user's port on a process the plan gives none (a headless node).
                    let p = scalar(v).map(|s| fills.apply(&s)).unwrap_or_default();
                    p.parse::<u16>().map_err(|_| field_error(&user.path(key), format!("{p} is not a port")))?;
                }
                let mut one = Vec::new();
                push_param(&mut one, key, v);
                args.extend(one.iter().map(|a| fills.apply(a)));
            }
        }
    }
    for a in user.extra {
        if let Some(name) = flag_name(a) {
            if plan_keys.contains(&name.as_str()) || user.params.contains_key(&name) {
                let by = if plan_keys.contains(&name.as_str()) && !user.params.contains_key(&name) {
                    "the plan".to_string()
                } else {
                    user.path(&name)
                };
                return Err(field_error(&user.extra_path, format!("{a} is also given by {by}: give it once")));
            }
        }
        if headless && flag_name(a).is_some_and(|n| API_SERVER_ONLY.contains(&n.as_str())) {
            return Err(field_error(
                &user.extra_path,
                format!(
                    "{a} cannot reach a --headless node (vLLM refuses it there): put it in params, which the plan keeps off headless nodes"
                ),
            ));
        }
        args.push(fills.apply(a));
    }
    Ok(Rendered { model, args, port })
}

/// `--max_num_seqs=8` -> `max_num_seqs`; dotted keys (`--compilation-config.x`) combine
/// in vLLM's parser and are not names of their own.
fn flag_name(arg: &str) -> Option<String> {
    let name = arg.strip_prefix("--")?.split('=').next()?;
    if name.contains('.') || name.is_empty() {
        return None;
    }
    let name = name.replace('-', "_");
    Some(name.strip_prefix("no_").map(str::to_string).unwrap_or(name))
}

/// The environment: the plan's variables, then the user's (all instances, the role's, the
/// node's) over them, each once.
pub(super) fn environment(
    plan: Vec<(String, String)>,
    user: &[&BTreeMap<String, Value>],
    fills: &Fills<'_>,
) -> Result<Vec<(String, String)>, (String, String)> {
    let mut env = plan;
    for layer in user {
        for (k, v) in *layer {
            let v = scalar(v).ok_or_else(|| (k.clone(), "must be a string, number or boolean".to_string()))?;
            env.retain(|(ek, _)| ek != k);
            env.push((k.clone(), fills.apply(&v)));
        }
    }
    Ok(env)
}

/// Shell-pastable rendering of an argv with its environment.
pub(crate) fn shell_line(env: &[(String, String)], argv: &[String], exe: &std::path::Path) -> String {
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

    fn user(yaml: &str, extra: &[String]) -> UserParams<'static> {
        let params: BTreeMap<String, Value> = serde_yaml_ng::from_str(yaml).unwrap();
        let origin = params.keys().map(|k| (k.clone(), "prefill.params".to_string())).collect();
        UserParams {
            params,
            origin,
            extra: Box::leak(extra.to_vec().into_boxed_slice()),
            extra_path: "prefill.params._extra_params".into(),
        }
    }

    fn fills() -> Fills<'static> {
        Fills { values: vec![("NODE_IP", "10.0.0.2".into()), ("NODE_RANK", "1".into())], deferred: &[] }
    }

    fn plan() -> Vec<Flag> {
        vec![
            ("host".into(), Some("10.0.0.2".into())),
            ("port".into(), Some("8100".into())),
            ("data_parallel_size".into(), Some("4".into())),
            ("data_parallel_size_local".into(), Some("2".into())),
            ("data_parallel_rpc_port".into(), Some("13345".into())),
        ]
    }

    fn kv(s: &str) -> Result<String, String> {
        Ok(s.to_string())
    }

    #[test]
    fn a_users_value_replaces_the_plans_once_or_is_an_error_naming_the_field() {
        let r = render(plan(), &user("{model: m, port: 8087, data_parallel_rpc_port: 13356, max_num_seqs: 8}", &[]), false, &fills(), &kv)
            .ok()
            .unwrap();
        assert_eq!(r.args.join(" "), "--host 10.0.0.2 --port 8087 --data-parallel-size 4 --data-parallel-size-local 2 --data-parallel-rpc-port 13356 --max-num-seqs 8");
        assert_eq!((r.port, r.model.as_deref()), (Some(8087), Some("m")));
        let e = render(plan(), &user("{data_parallel_size_local: 4}", &[]), false, &fills(), &kv).err().unwrap();
        assert_eq!(e.path, "prefill.params.data_parallel_size_local");
        assert!(render(plan(), &user("{data_parallel_size_local: 2}", &[]), false, &fills(), &kv).is_ok());
        let e = render(plan(), &user("{data_parallel_start_rank: 4}", &[]), false, &fills(), &kv).err().unwrap();
        assert!(e.message.contains("set by the plan"), "{}", e.message);
        let e = render(plan(), &user("{}", &["--port".into(), "1".into()]), false, &fills(), &kv).err().unwrap();
        assert!(e.message.contains("--port is also given by the plan"), "{}", e.message);
        let e = render(plan(), &user("{max_num_seqs: 8}", &["--max_num_seqs=9".into()]), false, &fills(), &kv).err().unwrap();
        assert!(e.message.contains("prefill.params.max_num_seqs"), "{}", e.message);
        // Dotted keys combine in vLLM's parser.
        assert!(render(
            plan(),
            &user("{compilation_config: '{}'}", &["--compilation_config.custom_ops+=+rms_norm".into()]),
            false,
            &fills(),
            &kv
        )
        .is_ok());
    }

    #[test]
    fn headless_nodes_get_no_api_server_params_and_placeholders_fill_per_node() {
        let u = user("{api_server_count: 2, seed: '{NODE_RANK}'}", &[]);
        let head = render(plan(), &u, false, &fills(), &kv).ok().unwrap().args.join(" ");
        assert!(head.contains("--api-server-count 2") && head.contains("--seed 1"), "{head}");
        let headless = render(plan(), &u, true, &fills(), &kv).ok().unwrap().args.join(" ");
        assert!(!headless.contains("api-server-count"), "{headless}");
        assert_eq!(fills().unfilled("a {NODE_IP} {OTHER_1} {\"x\":1}"), Some("NODE_IP"));
        assert_eq!(fills().unfilled(&fills().apply("a {NODE_IP} {\"x\":1} {lower}")), None);
        assert_eq!(fills().unfilled("$X {PREFILL_URL_3}"), Some("PREFILL_URL_3"));
        let env = environment(
            vec![("VLLM_NIXL_SIDE_CHANNEL_PORT".into(), "5608".into())],
            &[&serde_yaml_ng::from_str("{VLLM_NIXL_SIDE_CHANNEL_PORT: 5600, HCCL_IF_IP: '{NODE_IP}'}").unwrap()],
            &fills(),
        )
        .unwrap();
        assert_eq!(
            env,
            [("HCCL_IF_IP".to_string(), "10.0.0.2".to_string()), ("VLLM_NIXL_SIDE_CHANNEL_PORT".to_string(), "5600".to_string())]
        );
    }
}
