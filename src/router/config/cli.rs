//! `disagg route` flags: vllm-router's command line, the vLLM toy proxy's, and a shorthand,
//! normalised into one `RouterConfig`. Every accepted flag does what `--help` says.

use std::time::Duration;

use clap::Args;

pub(crate) use crate::router::workers::url::normalize_url;

use crate::api::connector::Connector;
use crate::flags::{at_least_one, fraction as unit_interval, non_negative, positive as positive_secs};
use crate::router::config::addresses::{parse_bind_address, parse_instances, zip_hosts};
use crate::router::config::{AuthConfig, BreakerConfig, CacheAwareConfig, HealthConfig, Mode, RetryConfig, RouterConfig, Timeouts};
pub(crate) use crate::router::policy::PolicyKind;

#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "Router")]
pub(crate) struct RouteArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub(crate) host: String,
    /// Port to listen on (0 picks a free one; the URL is printed on stdout).
    #[arg(long, default_value_t = 30000)]
    pub(crate) port: u16,
    /// Threads that serve requests (default: one per core). Each accepts connections and
    /// runs their requests and legs start to end on its own runtime (docs/PERFORMANCE.md);
    /// health checks and KV events run on one more thread.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub(crate) worker_threads: Option<u16>,

    /// Prefill/decode disaggregation: every request is a prefill leg then a decode leg.
    /// Implied by any prefill/decode worker flag.
    #[arg(long)]
    pub(crate) vllm_pd_disaggregation: bool,
    /// A prefill worker URL (repeatable). An optional second value is its Mooncake
    /// bootstrap port (default 8998; with --kv-connector mooncake only).
    #[arg(long, value_name = "URL", num_args = 1..=2, action = clap::ArgAction::Append)]
    pub(crate) prefill: Vec<String>,
    /// A decode worker URL (repeatable).
    #[arg(long, value_name = "URL", action = clap::ArgAction::Append)]
    pub(crate) decode: Vec<String>,
    /// Colocated (non-PD) worker URLs, load-balanced with the same machinery.
    #[arg(long, value_name = "URL", num_args = 1.., action = clap::ArgAction::Append)]
    pub(crate) worker_urls: Vec<String>,

    /// Toy-proxy style prefill hosts, zipped with --prefiller-ports.
    #[arg(long, alias = "prefiller-host", value_name = "HOST", num_args = 1.., help_heading = "vLLM toy proxy flags")]
    pub(crate) prefiller_hosts: Vec<String>,
    /// Toy-proxy style prefill ports, zipped with --prefiller-hosts.
    #[arg(long, alias = "prefiller-port", value_name = "PORT", num_args = 1.., help_heading = "vLLM toy proxy flags")]
    pub(crate) prefiller_ports: Vec<u16>,
    /// Toy-proxy style decode hosts, zipped with --decoder-ports.
    #[arg(long, alias = "decoder-host", value_name = "HOST", num_args = 1.., help_heading = "vLLM toy proxy flags")]
    pub(crate) decoder_hosts: Vec<String>,
    /// Toy-proxy style decode ports, zipped with --decoder-hosts.
    #[arg(long, alias = "decoder-port", value_name = "PORT", num_args = 1.., help_heading = "vLLM toy proxy flags")]
    pub(crate) decoder_ports: Vec<u16>,
    /// Shorthand: `HOST:PORT[,PORT...][,HOST:PORT...]`, e.g. `localhost:8300,8301`.
    #[arg(long, value_name = "HOST:PORTS", action = clap::ArgAction::Append, help_heading = "vLLM toy proxy flags")]
    pub(crate) prefill_instances: Vec<String>,
    /// Shorthand for decode workers, as --prefill-instances.
    #[arg(long, value_name = "HOST:PORTS", action = clap::ArgAction::Append, help_heading = "vLLM toy proxy flags")]
    pub(crate) decode_instances: Vec<String>,

    /// The KV connector the engines run, which decides each leg's body and request id
    /// [default: nixl; p2pnccl with --vllm-discovery-address].
    #[arg(long, value_enum)]
    pub(crate) kv_connector: Option<crate::api::connector::Connector>,
    /// Bind a ZMQ ROUTER here for P2pNccl engines to register with (vLLM's xPyD proxy's
    /// service discovery; `0.0.0.0:30002` in the runbook). Registered engines join the
    /// router's pools and leave 5 s after their last ping. Trust: whoever can reach this
    /// address can add workers, so bind it on the engines' network only.
    #[arg(long, value_name = "HOST:PORT")]
    pub(crate) vllm_discovery_address: Option<String>,

    /// Policy for every role unless overridden [default: cache_aware; round_robin with the
    /// vLLM toy proxy's flags, as the toy proxy does].
    #[arg(long, value_enum)]
    pub(crate) policy: Option<PolicyKind>,
    /// Policy for prefill workers (default: --policy).
    #[arg(long, value_enum)]
    pub(crate) prefill_policy: Option<PolicyKind>,
    /// Policy for decode workers (default: --policy).
    #[arg(long, value_enum)]
    pub(crate) decode_policy: Option<PolicyKind>,
    /// cache_aware: minimum matched fraction of the prompt to prefer the matching worker;
    /// below it, the worker with the smallest tree is chosen.
    #[arg(long, default_value_t = 0.3, value_parser = unit_interval)]
    pub(crate) cache_threshold: f64,
    /// cache_aware: load is imbalanced when max - min in-flight exceeds this ...
    #[arg(long, default_value_t = 64)]
    pub(crate) balance_abs_threshold: usize,
    /// ... and max exceeds min times this; then the least loaded worker is chosen.
    #[arg(long, default_value_t = 1.5, value_parser = at_least_one)]
    pub(crate) balance_rel_threshold: f64,
    /// cache_aware: seconds between evictions of the prefix trees.
    #[arg(long, default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) eviction_interval: u64,
    /// cache_aware: most characters (tokens with --model-path) kept per worker's tree.
    #[arg(long, default_value_t = 67_108_864, value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) max_tree_size: u64,
    /// cache_aware: characters (tokens with --model-path) of each prompt's start that are
    /// indexed; the rest of a long prompt is not looked at.
    #[arg(long, default_value_t = 16_384, value_parser = clap::value_parser!(u64).range(16..))]
    pub(crate) cache_aware_max_prefix: u64,
    /// cache_aware: memory cap of the prefix index, all workers together (MiB).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) cache_aware_max_memory_mb: u64,
    /// kv_aware: the weight of the work queued on a DP rank (the uncached prompt blocks of
    /// its prefills in flight) against the blocks this prompt would compute there
    /// (docs/PROTOCOLS.md §6 has the measurement behind the default).
    #[arg(long, default_value_t = 0.1, value_parser = non_negative)]
    pub(crate) kv_aware_load_weight: f64,
    /// kv_aware (decode pool): a decode whose cache holds all but at most this many of the
    /// prompt's tokens prefills them itself, with no prefill leg (0: always disaggregate).
    #[arg(long, default_value_t = 32)]
    pub(crate) kv_aware_decode_alone_tokens: usize,
    /// Name the workers that served each request in its response headers
    /// (`x-disagg-prefill`, `x-disagg-decode`: `URL; rank=N`), for benchmarks' records.
    #[arg(long)]
    pub(crate) worker_headers: bool,
    /// A local model directory whose tokenizer.json makes cache_aware and
    /// consistent_hash work on token ids instead of characters.
    #[arg(long, value_name = "DIR")]
    pub(crate) model_path: Option<String>,

    /// Data-parallel ranks behind each worker URL; the router picks a rank by load and
    /// sends `X-data-parallel-rank`.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub(crate) intra_node_data_parallel_size: u16,
    /// DP ranks behind each prefill URL, when it differs from decode's (default:
    /// --intra-node-data-parallel-size).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub(crate) prefill_dp_size: Option<u16>,
    /// DP ranks behind each decode URL (default: --intra-node-data-parallel-size).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub(crate) decode_dp_size: Option<u16>,

    /// Most requests in flight at once (the permit is held until the response, stream
    /// included, has ended or the client has gone).
    #[arg(long, default_value_t = 32768, value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) max_concurrent_requests: u64,
    /// Requests that may wait for a permit (FIFO); beyond it: 429.
    #[arg(long, default_value_t = 100)]
    pub(crate) queue_size: usize,
    /// Longest wait for a permit; then 503.
    #[arg(long, default_value_t = 60.0, value_parser = positive_secs)]
    pub(crate) queue_timeout_secs: f64,
    /// Largest request body accepted, in bytes (413 beyond).
    #[arg(long, default_value_t = 33_554_432, value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) max_payload_size: u64,
    /// Most client connections open at once; more wait in the listen queue.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) max_connections: u64,
    /// Most prefill/decode pairs one request may fan out to (a list of prompts times `n`).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=16384))]
    pub(crate) max_pairs_per_request: u64,

    /// A client's request head must arrive within this long (counted from the end of its
    /// previous request on a kept-alive connection, plus --keep-alive-timeout-secs).
    #[arg(long, default_value_t = 10.0, value_parser = positive_secs, help_heading = "Timeouts")]
    pub(crate) header_read_timeout_secs: f64,
    /// A client connection with nothing in flight and nothing received for this long is
    /// closed. Longer than clients keep idle connections (httpx and the OpenAI SDK 5 s,
    /// aiohttp 15 s), so they close first: a request sent on a connection the router is
    /// closing at that instant would be lost (vLLM's own 5 s has that race; nginx uses 75).
    #[arg(long, default_value_t = 75.0, value_parser = positive_secs, help_heading = "Timeouts")]
    pub(crate) keep_alive_timeout_secs: f64,
    /// A request body must arrive whole within this long (408 otherwise). It is read
    /// before the request takes an admission permit, so slow bodies hold none.
    #[arg(long, default_value_t = 60.0, value_parser = positive_secs, help_heading = "Timeouts")]
    pub(crate) body_read_timeout_secs: f64,
    /// Time limit of a prefill leg's answer.
    #[arg(long, default_value_t = 300.0, value_parser = positive_secs, help_heading = "Timeouts")]
    pub(crate) prefill_timeout_secs: f64,
    /// Time limit of a streamed decode leg until its first byte.
    #[arg(long, default_value_t = 300.0, value_parser = positive_secs, help_heading = "Timeouts")]
    pub(crate) decode_first_byte_timeout_secs: f64,
    /// Time limit of a non-streamed decode leg's whole answer; also caps the two above.
    #[arg(long, default_value_t = 1800.0, value_parser = positive_secs, help_heading = "Timeouts")]
    pub(crate) request_timeout_secs: f64,
    /// A streamed decode that sends nothing for this long is failed mid-stream.
    #[arg(long, default_value_t = 120.0, value_parser = positive_secs, help_heading = "Timeouts")]
    pub(crate) stream_idle_timeout_secs: f64,
    /// After SIGTERM/SIGINT: /health turns 503 and new requests get 503 at once; requests
    /// in flight get this long to finish, then open streams end with an error event.
    #[arg(long, default_value_t = 30.0, value_parser = non_negative, help_heading = "Timeouts")]
    pub(crate) shutdown_timeout_secs: f64,

    /// Extra attempts of a failed leg (connect error, 5xx, timeout) on other workers before
    /// the client hears of it: the prefill leg, a decode leg (with the same KV), or the one
    /// leg of colocated mode.
    #[arg(long, default_value_t = 2, help_heading = "Retries")]
    pub(crate) retry_max_retries: u32,
    /// No retries, and no re-run of a pair whose decode failed before its first byte.
    #[arg(long, help_heading = "Retries")]
    pub(crate) disable_retries: bool,
    /// Wait before the first retry; later ones wait --retry-backoff-multiplier times more.
    #[arg(long, default_value_t = 50, help_heading = "Retries")]
    pub(crate) retry_initial_backoff_ms: u64,
    /// Longest wait before a retry.
    #[arg(long, default_value_t = 5000, help_heading = "Retries")]
    pub(crate) retry_max_backoff_ms: u64,
    #[arg(long, default_value_t = 1.5, value_parser = at_least_one, help_heading = "Retries")]
    pub(crate) retry_backoff_multiplier: f64,
    /// Each wait is randomised by up to this fraction either way.
    #[arg(long, default_value_t = 0.2, value_parser = unit_interval, help_heading = "Retries")]
    pub(crate) retry_jitter_factor: f64,
    /// Retry budget: retries in the last 10 s may be at most this fraction of the requests
    /// in them (or --retry-budget-min-per-sec); beyond it a failure is not retried.
    #[arg(long, default_value_t = 0.2, value_parser = non_negative, help_heading = "Retries")]
    pub(crate) retry_budget_ratio: f64,
    #[arg(long, default_value_t = 10.0, value_parser = non_negative, help_heading = "Retries")]
    pub(crate) retry_budget_min_per_sec: f64,

    /// Consecutive failed legs (connect error, 5xx, timeout, broken answer) that open a
    /// worker's circuit: it takes no requests until a probe succeeds.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..), help_heading = "Circuit breaker")]
    pub(crate) cb_failure_threshold: u32,
    /// Successful probe requests that close a half-open circuit.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..), help_heading = "Circuit breaker")]
    pub(crate) cb_success_threshold: u32,
    /// How long an open circuit keeps the worker out before one probe request is let
    /// through (doubled each time a probe fails, up to 8x).
    #[arg(long, default_value_t = 30.0, value_parser = positive_secs, help_heading = "Circuit breaker")]
    pub(crate) cb_timeout_duration_secs: f64,
    /// Failures further apart than this do not add up.
    #[arg(long, default_value_t = 60.0, value_parser = positive_secs, help_heading = "Circuit breaker")]
    pub(crate) cb_window_duration_secs: f64,
    #[arg(long, help_heading = "Circuit breaker")]
    pub(crate) disable_circuit_breaker: bool,

    /// Seconds between two health checks of a worker (the workers' checks spread over it).
    #[arg(long, default_value_t = 5.0, value_parser = positive_secs)]
    pub(crate) health_check_interval_secs: f64,
    /// Time limit of one health check.
    #[arg(long, default_value_t = 5.0, value_parser = positive_secs)]
    pub(crate) health_check_timeout_secs: f64,
    /// Consecutive failed checks before a healthy worker is marked down (a connection
    /// error on a request marks it down at once).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) health_failure_threshold: u32,
    /// Consecutive good checks before a down worker is used again (a worker never seen
    /// healthy is used after its first good check).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) health_success_threshold: u32,
    /// Path checked on every worker.
    #[arg(long, default_value = "/health")]
    pub(crate) health_check_endpoint: String,

    /// The key the router sends to workers as `Authorization: Bearer KEY` (vllm-router's
    /// meaning). With it, a client's own Authorization header is not passed on.
    #[arg(long, env = "DISAGG_WORKER_API_KEY", hide_env_values = true, help_heading = "Authentication")]
    pub(crate) api_key: Option<String>,
    /// A key clients must send (`Authorization: Bearer KEY`) on /v1/*; repeatable.
    /// Without any, the generation endpoints are open.
    #[arg(long, value_name = "KEY", action = clap::ArgAction::Append, help_heading = "Authentication")]
    pub(crate) client_api_key: Vec<String>,
    /// A file of client keys, one per line (blank lines and `#` comments skipped).
    #[arg(long, value_name = "FILE", help_heading = "Authentication")]
    pub(crate) client_api_key_file: Option<String>,
    /// Client keys from the environment, comma-separated.
    #[arg(long, env = "DISAGG_CLIENT_API_KEYS", hide_env_values = true, value_name = "KEYS", help_heading = "Authentication")]
    pub(crate) client_api_keys_env: Option<String>,
    /// The key /workers and /metrics require (and the worker admin API, when on).
    #[arg(long, env = "DISAGG_ADMIN_API_KEY", hide_env_values = true, help_heading = "Authentication")]
    pub(crate) admin_api_key: Option<String>,

    #[command(flatten)]
    pub(crate) boundary: crate::router::config::boundary::BoundaryArgs,
    #[command(flatten)]
    pub(crate) passthrough: crate::router::config::passthrough::PassthroughArgs,
    #[command(flatten)]
    pub(crate) responses: crate::router::config::responses::ResponsesArgs,
    #[command(flatten)]
    pub(crate) flow_control: crate::router::config::flow_control::FlowControlArgs,
    #[command(flatten)]
    pub(crate) observe: crate::router::config::observe::ObserveArgs,
    #[command(flatten)]
    pub(crate) elastic: crate::router::config::elastic::ElasticArgs,
    #[command(flatten)]
    pub(crate) tls: crate::tls::ServerTlsArgs,
    #[command(flatten)]
    pub(crate) worker_tls: crate::tls::WorkerTlsArgs,
}

/// Whether the vLLM toy proxy's flags name the workers (its default policy is round_robin).
fn toy_flags(a: &RouteArgs) -> bool {
    !(a.prefiller_hosts.is_empty() && a.decoder_hosts.is_empty() && a.prefill_instances.is_empty() && a.decode_instances.is_empty())
}

impl RouteArgs {
    pub(crate) fn to_config(&self) -> Result<RouterConfig, String> {
        // --prefill takes an optional second value: a Mooncake bootstrap port (or `none`),
        // as in vllm-router and vLLM's Mooncake proxy.
        let mut prefill = Vec::new();
        let mut ports: Vec<(String, u16)> = Vec::new();
        for v in &self.prefill {
            if v.eq_ignore_ascii_case("none") {
                continue;
            }
            if let Ok(port) = v.parse::<u16>() {
                let url = prefill.last().cloned().ok_or_else(|| format!("--prefill {v}: a bootstrap port follows a URL"))?;
                ports.push((url, port));
                continue;
            }
            prefill.push(normalize_url(v)?);
        }
        prefill.extend(zip_hosts(&self.prefiller_hosts, &self.prefiller_ports, "prefiller")?);
        for spec in &self.prefill_instances {
            prefill.extend(parse_instances(spec, "prefill-instances")?);
        }
        let mut decode = self.decode.iter().map(|u| normalize_url(u)).collect::<Result<Vec<_>, _>>()?;
        decode.extend(zip_hosts(&self.decoder_hosts, &self.decoder_ports, "decoder")?);
        for spec in &self.decode_instances {
            decode.extend(parse_instances(spec, "decode-instances")?);
        }
        let workers = self.worker_urls.iter().map(|u| normalize_url(u)).collect::<Result<Vec<_>, _>>()?;

        let discovery = self.vllm_discovery_address.as_deref().map(parse_bind_address).transpose()?;
        let connector = match (self.kv_connector, &discovery) {
            (Some(c @ (Connector::Nixl | Connector::Mooncake)), Some(_)) => {
                return Err(format!(
                    "--vllm-discovery-address is P2pNccl's service discovery; it does not go with --kv-connector {}",
                    c.as_str()
                ))
            }
            (Some(Connector::P2pNccl), None) => {
                return Err("--kv-connector p2pnccl needs --vllm-discovery-address HOST:PORT: P2pNccl engines register their \
                            KV (zmq) addresses there, and request ids must name them"
                    .into())
            }
            (Some(c), _) => c,
            (None, Some(_)) => Connector::P2pNccl,
            (None, None) => Connector::Nixl,
        };
        let bootstrap = if connector == Connector::Mooncake {
            prefill
                .iter()
                .map(|url| {
                    let port = ports.iter().find(|(u, _)| u == url).map_or(crate::api::connector::MOONCAKE_BOOTSTRAP_PORT, |p| p.1);
                    (url.clone(), crate::router::upstream::bootstrap::address(url, port))
                })
                .collect()
        } else if let Some((url, port)) = ports.first() {
            return Err(format!(
                "--prefill {url} {port}: a bootstrap port is for the Mooncake connector; add --kv-connector mooncake, \
                 or drop `{port}` (NIXL needs none)"
            ));
        } else {
            std::collections::HashMap::new()
        };
        if connector == Connector::P2pNccl && !(prefill.is_empty() && decode.is_empty()) {
            return Err("with P2pNccl, engines join by registering at --vllm-discovery-address (their KV addresses come \
                        with them): drop --prefill/--decode"
                .into());
        }
        let policy = self.policy.unwrap_or(if toy_flags(self) { PolicyKind::RoundRobin } else { PolicyKind::CacheAware });
        let (prefill_policy, decode_policy) = (self.prefill_policy.unwrap_or(policy), self.decode_policy.unwrap_or(policy));
        let elastic = self.elastic.to_config(connector, [prefill_policy, decode_policy])?;
        let pd =
            self.vllm_pd_disaggregation || !prefill.is_empty() || !decode.is_empty() || discovery.is_some() || !elastic.pd_pool.is_empty();
        // Workers may also join later: through the admin API, or by registering.
        let joinable = self.admin_api_key.is_some() || discovery.is_some();
        let mode = if pd {
            if !workers.is_empty() {
                return Err("--worker-urls is for colocated workers; with prefill/decode workers use --prefill and --decode".into());
            }
            let elastic_engines = elastic.pd_pool.len();
            if (prefill.len() + decode.len() + elastic_engines == 0 || (elastic_engines == 0 && (prefill.is_empty() || decode.is_empty())))
                && !joinable
            {
                return Err(format!(
                    "prefill/decode disaggregation needs at least one prefill and one decode worker \
                     (got {} prefill, {} decode): pass --prefill URL and --decode URL (or --pd-pool URL... of engines \
                     that take either leg), or --admin-api-key KEY to add them at runtime",
                    prefill.len(),
                    decode.len()
                ));
            }
            Mode::Disaggregated
        } else {
            if workers.is_empty() && !joinable {
                return Err("no workers: pass --prefill URL --decode URL (disaggregated) or --worker-urls URL... (colocated), \
                            or --admin-api-key KEY to add them at runtime"
                    .into());
            }
            Mode::Regular
        };
        for list in [&prefill, &decode, &workers] {
            let mut seen = std::collections::HashSet::new();
            if let Some(dup) = list.iter().find(|u| !seen.insert(u.as_str())) {
                return Err(format!("worker {dup} is listed twice"));
            }
        }
        let mut seen: std::collections::HashSet<&str> = prefill.iter().chain(&decode).map(String::as_str).collect();
        if let Some(dup) = elastic.pd_pool.iter().find(|u| !seen.insert(u.as_str())) {
            return Err(format!("worker {dup} is listed twice (a --pd-pool engine takes both legs: list it there only)"));
        }
        if let Some(dir) = &self.model_path {
            let file = std::path::Path::new(dir).join("tokenizer.json");
            if !file.is_file() {
                return Err(format!(
                    "--model-path {dir}: no tokenizer.json there; pass a local model directory (the \
                     router has no model hub access) or drop the flag to match prompts by characters"
                ));
            }
        }
        if !self.health_check_endpoint.starts_with('/') {
            return Err(format!("--health-check-endpoint `{}` must start with /", self.health_check_endpoint));
        }
        let secs = Duration::from_secs_f64;
        let request = secs(self.request_timeout_secs);
        let cap = |d: f64| secs(d).min(request);
        let max_payload = usize::try_from(self.max_payload_size).unwrap_or(usize::MAX);
        Ok(RouterConfig {
            host: self.host.clone(),
            port: self.port,
            mode,
            connector,
            discovery,
            bootstrap,
            prefill,
            decode,
            workers,
            prefill_policy,
            decode_policy,
            cache_aware: CacheAwareConfig {
                cache_threshold: self.cache_threshold,
                balance_abs_threshold: self.balance_abs_threshold,
                balance_rel_threshold: self.balance_rel_threshold,
                eviction_interval: Duration::from_secs(self.eviction_interval),
                max_tree_size: usize::try_from(self.max_tree_size).unwrap_or(usize::MAX),
                max_prefix: usize::try_from(self.cache_aware_max_prefix).unwrap_or(usize::MAX),
                max_entries: usize::try_from(self.cache_aware_max_memory_mb << 20).unwrap_or(usize::MAX)
                    / crate::router::policy::PrefixIndex::BYTES_PER_ENTRY,
            },
            model_path: self.model_path.clone(),
            kv_aware_load_weight: self.kv_aware_load_weight,
            kv_aware_decode_alone_tokens: self.kv_aware_decode_alone_tokens,
            worker_headers: self.worker_headers,
            prefill_dp: self.prefill_dp_size.unwrap_or(self.intra_node_data_parallel_size) as usize,
            decode_dp: self.decode_dp_size.unwrap_or(self.intra_node_data_parallel_size) as usize,
            max_concurrent: usize::try_from(self.max_concurrent_requests).unwrap_or(usize::MAX).min(tokio::sync::Semaphore::MAX_PERMITS),
            queue_size: self.queue_size,
            queue_timeout: secs(self.queue_timeout_secs),
            max_payload,
            max_connections: usize::try_from(self.max_connections).unwrap_or(usize::MAX).min(tokio::sync::Semaphore::MAX_PERMITS),
            max_pairs: self.max_pairs_per_request as usize,
            timeouts: Timeouts {
                header_read: secs(self.header_read_timeout_secs),
                keep_alive: secs(self.keep_alive_timeout_secs),
                body_read: secs(self.body_read_timeout_secs),
                prefill: cap(self.prefill_timeout_secs),
                decode_first_byte: cap(self.decode_first_byte_timeout_secs),
                request,
                stream_idle: secs(self.stream_idle_timeout_secs),
                shutdown: secs(self.shutdown_timeout_secs),
            },
            retry: RetryConfig {
                max_retries: if self.disable_retries { 0 } else { self.retry_max_retries },
                rerun_pair: !self.disable_retries,
                initial_backoff: Duration::from_millis(self.retry_initial_backoff_ms),
                max_backoff: Duration::from_millis(self.retry_max_backoff_ms.max(self.retry_initial_backoff_ms)),
                multiplier: self.retry_backoff_multiplier,
                jitter: self.retry_jitter_factor,
                budget_ratio: self.retry_budget_ratio,
                budget_min_per_sec: self.retry_budget_min_per_sec,
            },
            breaker: BreakerConfig {
                enabled: !self.disable_circuit_breaker,
                failure_threshold: self.cb_failure_threshold,
                success_threshold: self.cb_success_threshold,
                open_for: secs(self.cb_timeout_duration_secs),
                window: secs(self.cb_window_duration_secs),
            },
            health: HealthConfig {
                interval: secs(self.health_check_interval_secs),
                timeout: secs(self.health_check_timeout_secs),
                failure_threshold: self.health_failure_threshold,
                success_threshold: self.health_success_threshold,
                endpoint: self.health_check_endpoint.clone(),
            },
            auth: self.auth()?,
            boundary: self.boundary.to_config(self.port),
            passthrough: self.passthrough.to_config(),
            responses: self.responses.to_config()?,
            flow_control: self.flow_control.to_config(),
            observe: self.observe.to_config()?,
            elastic,
        })
    }

    /// Client keys from the flag, the file and the environment; the admin and worker keys.
    fn auth(&self) -> Result<AuthConfig, String> {
        let mut client_keys = self.client_api_key.clone();
        if let Some(path) = &self.client_api_key_file {
            let text = std::fs::read_to_string(path).map_err(|e| format!("--client-api-key-file {path}: {e}"))?;
            client_keys.extend(text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(str::to_owned));
        }
        if let Some(keys) = &self.client_api_keys_env {
            client_keys.extend(keys.split(',').map(str::trim).filter(|k| !k.is_empty()).map(str::to_owned));
        }
        let printable = |k: &str| !k.is_empty() && k.bytes().all(|b| (0x21..0x7f).contains(&b));
        if let Some(bad) = client_keys.iter().chain(&self.admin_api_key).chain(&self.api_key).find(|k| !printable(k)) {
            let shown: String = bad.chars().take(4).collect();
            return Err(format!("API key `{shown}...` must be printable ASCII without spaces"));
        }
        Ok(AuthConfig { client_keys, admin_key: self.admin_api_key.clone(), worker_key: self.api_key.clone() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_normalised_including_ipv6() {
        assert_eq!(normalize_url("http://P0:8087").unwrap(), "http://p0:8087");
        assert_eq!(normalize_url("localhost:8100/").unwrap(), "http://localhost:8100");
        assert_eq!(normalize_url("http://[::1]:8100").unwrap(), "http://[::1]:8100");
        assert_eq!(normalize_url("https://X:8443/").unwrap(), "https://x:8443");
        assert_eq!(normalize_url("https://x").unwrap(), "https://x:443");
        assert!(normalize_url("ftp://x:1").unwrap_err().contains("scheme"));
        assert!(normalize_url("http://:80").is_err());
    }

    fn config(args: &[&str]) -> Result<RouterConfig, String> {
        use clap::Parser;
        #[derive(Parser)]
        struct Cmd {
            #[command(flatten)]
            route: RouteArgs,
        }
        let cmd = Cmd::try_parse_from(std::iter::once("disagg").chain(args.iter().copied())).map_err(|e| e.to_string())?;
        cmd.route.to_config()
    }

    #[test]
    fn mooncake_prefills_take_bootstrap_ports() {
        let c = config(&[
            "--kv-connector",
            "mooncake",
            "--prefill",
            "http://a:1",
            "9000",
            "--prefill",
            "http://[::1]:2",
            "--decode",
            "http://b:3",
        ])
        .unwrap();
        assert_eq!(c.prefill, ["http://a:1", "http://[::1]:2"]);
        assert_eq!(c.bootstrap["http://a:1"], "http://a:9000");
        assert_eq!(c.bootstrap["http://[::1]:2"], "http://[::1]:8998", "vLLM's default port, IPv6 in brackets");
        assert!(!c.bootstrap.contains_key("http://b:3"), "decodes have none");
        let nixl = config(&["--prefill", "http://a:1", "9000", "--decode", "http://b:3"]).unwrap_err();
        assert!(nixl.contains("--kv-connector mooncake"), "{nixl}");
        assert!(config(&["--kv-connector", "mooncake", "--prefill", "http://a:1", "none", "--decode", "http://b:3"]).is_ok());
    }
}
