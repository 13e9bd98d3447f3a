//! The launch file: vLLM's `pdjob` YAML schema as it is, plus optional fields of ours.
//! Unknown keys are errors (a typo must not be silently ignored); errors name the field
//! and the line.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_yaml_ng::Value;

/// pdjob's default startup timeout.
const DEFAULT_TIMEOUT: u64 = 600;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LaunchFile {
    /// Seconds to wait for every instance's /health (pdjob).
    #[serde(default = "default_timeout")]
    pub(crate) timeout: u64,
    /// GPUs in the whole cluster (pdjob). 0 for CPU engines or the simulator.
    #[serde(default)]
    pub(crate) num_gpus: u32,
    /// GPUs per worker, the unit of a Ray placement bundle (pdjob).
    #[serde(default = "one")]
    pub(crate) gpus_per_worker: u32,
    /// Logs go to `<working_dir>/logs/<role>-<i>.log` (pdjob).
    #[serde(default = "default_working_dir")]
    pub(crate) working_dir: String,
    /// Environment of every instance (pdjob).
    #[serde(default)]
    pub(crate) envs: BTreeMap<String, Value>,
    #[serde(default)]
    pub(crate) scheduler: Scheduler,
    #[serde(default)]
    pub(crate) general: General,
    pub(crate) prefill: RoleFile,
    pub(crate) decode: RoleFile,
    /// Ours: what runs the instances: `vllm` (default, `vllm serve`) or `sim`.
    #[serde(default)]
    pub(crate) engine: Engine,
    /// Ours: nodes in node-rank order (default: one node, 127.0.0.1): an address, or
    /// `{address, envs, params}` with values for that node's instances only.
    #[serde(default)]
    pub(crate) nodes: Vec<NodeFile>,
    /// Ours: GPUs per node (default: num_gpus / number of nodes).
    pub(crate) gpus_per_node: Option<u32>,
    /// Ours: the variable that assigns devices (default CUDA_VISIBLE_DEVICES; Ascend:
    /// ASCEND_RT_VISIBLE_DEVICES).
    #[serde(default = "default_gpu_env")]
    pub(crate) gpu_env: String,
    /// Ours: HTTPS for every engine and the router (docs/LAUNCH.md, "TLS").
    pub(crate) tls: Option<TlsFile>,
}

/// `tls:`: one certificate served by every engine (`vllm serve --ssl-*`) and by the
/// router, and the client certificate the router and the launcher's health checks present.
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub(crate) struct TlsFile {
    /// The CA (PEM) the certificates chain to: clients' are verified against it, and the
    /// router trusts the engines' through it.
    pub(crate) ca_certs: String,
    /// The certificate (PEM) every engine and the router serve, and its key.
    pub(crate) certfile: String,
    pub(crate) keyfile: String,
    /// Client certificates on engines and router (vLLM's --ssl-cert-reqs): 0 not asked,
    /// 1 verified when sent, 2 required.
    #[serde(default)]
    pub(crate) cert_reqs: u8,
    /// The client certificate (PEM) the router and the health checks present, and its key.
    pub(crate) client_certfile: Option<String>,
    pub(crate) client_keyfile: Option<String>,
}

impl TlsFile {
    /// `vllm serve`'s params for this TLS.
    pub(crate) fn engine_params(&self) -> [(&'static str, String); 4] {
        [
            ("ssl_keyfile", self.keyfile.clone()),
            ("ssl_certfile", self.certfile.clone()),
            ("ssl_ca_certs", self.ca_certs.clone()),
            ("ssl_cert_reqs", self.cert_reqs.to_string()),
        ]
    }

    /// `disagg route`'s flags: its listener's and how it reaches the engines.
    pub(crate) fn router_flags(&self) -> Vec<String> {
        let mut out: Vec<String> = [
            "--ssl-keyfile",
            &self.keyfile,
            "--ssl-certfile",
            &self.certfile,
            "--ssl-ca-certs",
            &self.ca_certs,
            "--ssl-cert-reqs",
            &self.cert_reqs.to_string(),
            "--worker-ssl-ca-certs",
            &self.ca_certs,
        ]
        .map(String::from)
        .to_vec();
        if let (Some(c), Some(k)) = (&self.client_certfile, &self.client_keyfile) {
            out.extend(["--worker-ssl-certfile".into(), c.clone(), "--worker-ssl-keyfile".into(), k.clone()]);
        }
        out
    }

    /// How the launcher's health checks reach engines and router.
    pub(crate) fn client(&self) -> crate::tls::WorkerTlsArgs {
        crate::tls::WorkerTlsArgs {
            worker_ssl_ca_certs: Some(self.ca_certs.clone().into()),
            worker_ssl_certfile: self.client_certfile.clone().map(Into::into),
            worker_ssl_keyfile: self.client_keyfile.clone().map(Into::into),
        }
    }
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct Scheduler {
    /// The router's port (pdjob; default 8021).
    pub(crate) port: Option<u16>,
    /// pdjob: the proxy command, with {PORT}, $PREFILL_URL_n, $DECODE_HOST_n ... Absent:
    /// `disagg route` is used.
    pub(crate) command: Option<String>,
    /// Ours: extra `disagg route` flags when `command` is absent.
    #[serde(default)]
    pub(crate) args: Vec<String>,
    /// Ours: address the router listens on (default: node 0's address).
    pub(crate) host: Option<String>,
    /// Ours: the path that answers 200 when `command`'s proxy is ready (default: try
    /// /health, then /healthcheck, then a TCP connect).
    pub(crate) health_path: Option<String>,
}

/// One node of `nodes`.
#[derive(Debug, Deserialize, Clone)]
#[serde(untagged)]
pub(crate) enum NodeFile {
    Address(String),
    Full {
        address: String,
        /// Environment of this node's instances (over `envs` and the role's).
        #[serde(default)]
        envs: BTreeMap<String, Value>,
        /// `vllm serve` parameters of this node's instances (over the role's).
        #[serde(default)]
        params: BTreeMap<String, Value>,
    },
}

impl NodeFile {
    pub(crate) fn address(&self) -> &str {
        match self {
            NodeFile::Address(a) | NodeFile::Full { address: a, .. } => a,
        }
    }

    pub(crate) fn set_address(&mut self, to: String) {
        match self {
            NodeFile::Address(a) | NodeFile::Full { address: a, .. } => *a = to,
        }
    }
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct General {
    /// `vllm serve` parameters shared by both roles (pdjob).
    #[serde(default)]
    pub(crate) params: BTreeMap<String, Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RoleFile {
    #[serde(default)]
    pub(crate) envs: BTreeMap<String, Value>,
    /// GPUs per replica (pdjob).
    #[serde(default)]
    pub(crate) num_gpus: u32,
    pub(crate) replicas: u32,
    /// `vllm serve` parameters, merged over general.params (pdjob).
    #[serde(default)]
    pub(crate) params: BTreeMap<String, Value>,
    /// Ours: DP ranks per replica.
    pub(crate) data_parallel_size: Option<u32>,
    /// Ours: vLLM's DP load-balancing layout of a replica: `internal` (one API server on
    /// the replica's first node, the others `--headless`), `hybrid` (an API server per
    /// node for its local ranks) or `external` (an API server per rank). Default:
    /// internal, or what `data_parallel_hybrid_lb` / `data_parallel_external_lb` say.
    pub(crate) dp_mode: Option<DpMode>,
    /// Ours: base HTTP port: instance i on node n listens on port + 8n + i
    /// (default 8100 for prefill, 9100 for decode).
    pub(crate) port: Option<u16>,
    /// Ours: base NIXL side-channel port, + 8n + i likewise (default 5600 / 6600).
    pub(crate) side_channel_port: Option<u16>,
    /// Ours: the role's instances are elastic (NIXL, `"kv_role":"kv_both"`): the router
    /// routes either leg to them (`disagg route --pd-pool`) instead of this role's only.
    #[serde(default)]
    pub(crate) elastic: bool,
}

#[derive(Debug, Deserialize, Default, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub(crate) enum DpMode {
    #[default]
    Internal,
    Hybrid,
    External,
}

#[derive(Debug, Deserialize, Clone)]
#[serde(untagged)]
pub(crate) enum Engine {
    Kind(EngineKind),
    Full {
        kind: EngineKind,
        /// The command that starts an instance (vllm: default `vllm serve`).
        command: Option<String>,
        /// Extra arguments for every instance (e.g. the simulator's timing knobs).
        #[serde(default)]
        args: Vec<String>,
    },
}

impl Default for Engine {
    fn default() -> Self {
        Engine::Kind(EngineKind::Vllm)
    }
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub(crate) enum EngineKind {
    Vllm,
    Sim,
}

impl Engine {
    pub(crate) fn kind(&self) -> EngineKind {
        match self {
            Engine::Kind(k) | Engine::Full { kind: k, .. } => *k,
        }
    }
    pub(crate) fn command(&self) -> Option<&str> {
        match self {
            Engine::Full { command: Some(c), .. } => Some(c),
            _ => None,
        }
    }
    pub(crate) fn args(&self) -> &[String] {
        match self {
            Engine::Full { args, .. } => args,
            Engine::Kind(_) => &[],
        }
    }
}

fn default_timeout() -> u64 {
    DEFAULT_TIMEOUT
}
fn one() -> u32 {
    1
}
fn default_working_dir() -> String {
    "./disagg-run".into()
}
fn default_gpu_env() -> String {
    "CUDA_VISIBLE_DEVICES".into()
}

/// A config error, with the line it is about when known.
#[derive(Debug)]
pub struct ConfigError {
    pub(crate) file: String,
    pub(crate) line: Option<usize>,
    pub(crate) message: String,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.line {
            Some(l) => write!(f, "{}:{l}: {}", self.file, self.message),
            None => write!(f, "{}: {}", self.file, self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

/// The line of a key path like `prefill.replicas` in block-style YAML, for messages.
pub(crate) fn line_of(text: &str, path: &str) -> Option<usize> {
    let mut want = path.split('.').peekable();
    let mut indent: Option<usize> = None;
    let mut key = want.next()?;
    for (n, line) in text.lines().enumerate() {
        let trimmed = line.trim_start();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let ind = line.len() - trimmed.len();
        if indent.is_some_and(|i| ind <= i) {
            // Left the parent block without finding the key.
            return None;
        }
        let k = trimmed.split(':').next().unwrap_or("").trim().trim_matches(|c| c == '"' || c == '\'');
        if k == key && trimmed[k.len()..].trim_start().starts_with(':') || trimmed.starts_with(&format!("{key}:")) {
            match want.next() {
                None => return Some(n + 1),
                Some(next) => {
                    indent = Some(ind);
                    key = next;
                }
            }
        }
    }
    None
}

/// A YAML scalar as an environment value or a CLI argument.
pub(crate) fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// Replaces `${env:NAME}` with the launcher's environment variable NAME (an error if it
/// is unset). pdjob's own placeholders (`{PORT}`, `$PREFILL_URL_1`, `${PREFILL_URL_1}`)
/// are left alone.
pub(crate) fn expand_env(file: &str, text: &str) -> Result<String, ConfigError> {
    let mut out = String::with_capacity(text.len());
    for (n, line) in text.split_inclusive('\n').enumerate() {
        if line.trim_start().starts_with('#') {
            out.push_str(line);
            continue;
        }
        let mut rest = line;
        while let Some(start) = rest.find("${env:") {
            out.push_str(&rest[..start]);
            let after = &rest[start + 6..];
            let end = after.find('}').ok_or_else(|| ConfigError {
                file: file.into(),
                line: Some(n + 1),
                message: "`${env:` without a closing `}`".into(),
            })?;
            let name = &after[..end];
            let value = std::env::var(name).map_err(|_| ConfigError {
                file: file.into(),
                line: Some(n + 1),
                message: format!("${{env:{name}}}: the environment variable {name} is not set"),
            })?;
            out.push_str(&value);
            rest = &after[end + 1..];
        }
        out.push_str(rest);
    }
    Ok(out)
}

pub fn parse(file: &str, text: &str) -> Result<LaunchFile, ConfigError> {
    serde_yaml_ng::from_str::<LaunchFile>(text).map_err(|e| ConfigError {
        file: file.to_string(),
        line: e.location().map(|l| l.line()),
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_expansion_skips_comments_and_reports_unset_names() {
        std::env::set_var("DISAGG_TEST_EXPAND", "/opt/x");
        let out = expand_env("f", "# ${env:NOPE} in a comment\nmodel: ${env:DISAGG_TEST_EXPAND}/m\n").unwrap();
        assert_eq!(out, "# ${env:NOPE} in a comment\nmodel: /opt/x/m\n");
        let e = expand_env("f", "a: 1\nb: ${env:DISAGG_SURELY_UNSET_X}\n").unwrap_err();
        assert_eq!(e.line, Some(2));
    }

    #[test]
    fn finds_nested_key_lines() {
        let text = "timeout: 5\nprefill:\n  replicas: 2\n  params:\n    port: 1\ndecode:\n  replicas: 0\n";
        assert_eq!(line_of(text, "prefill.replicas"), Some(3));
        assert_eq!(line_of(text, "prefill.params.port"), Some(5));
        assert_eq!(line_of(text, "decode.replicas"), Some(7));
        assert_eq!(line_of(text, "decode.params"), None);
    }

    #[test]
    fn unknown_fields_and_wrong_types_name_the_line() {
        let e = parse("c.yaml", "prefill:\n  replica: 2\ndecode:\n  replicas: 1\n").unwrap_err();
        assert_eq!(e.line, Some(2), "{e}");
        assert!(e.message.contains("unknown field `replica`"), "{e}");
        let e = parse("c.yaml", "prefill:\n  replicas: two\ndecode:\n  replicas: 1\n").unwrap_err();
        assert_eq!(e.line, Some(2), "{e}");
        let e = parse("c.yaml", "prefill: [\n").unwrap_err();
        assert!(e.line.is_some(), "{e}");
    }
}
