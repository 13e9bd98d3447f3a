//! `disagg sim` flags. Every fault and timing knob is off by default.

use clap::Args;

pub(crate) use crate::api::connector::Connector;
pub(crate) use crate::api::Role;
use crate::flags::{fraction, non_negative, positive as positive_secs};

/// A SIMULATED vLLM engine: same endpoints, shapes and KV handshakes as vLLM with
/// NixlConnector, MooncakeConnector or P2pNcclConnector, no model, no GPU. For tests, demos and scale experiments.
#[derive(Args, Debug, Clone)]
pub struct SimArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub(crate) host: String,
    /// HTTP port (0 picks a free one; the chosen port is printed on stdout).
    #[arg(long, default_value_t = 8000)]
    pub(crate) port: u16,
    /// Serve N simulated engines from this process (scale experiments): instance i on
    /// --port + i, its side channels on --side-channel-port + i × its DP ranks, its KV events
    /// on the --kv-events-config endpoint's port + i × --data-parallel-size; each its own KV
    /// cache, DP ranks, publisher, metrics and fault counters. One banner line each.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=4096))]
    pub(crate) instances: u16,
    /// Which PD role this instance plays.
    #[arg(long, value_enum, default_value_t = Role::Both)]
    pub(crate) role: Role,
    /// Data-parallel ranks of the replica (vLLM's flag), each a simulated engine with its
    /// own queue and KV blocks; pick one per request with the `X-data-parallel-rank`
    /// header. Without the flags below, every rank runs here.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub(crate) data_parallel_size: u16,
    /// Ranks on this "node" (vLLM's flag; default: all). See docs/SIM.md, "Multi-node DP".
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub(crate) data_parallel_size_local: Option<u16>,
    /// First rank on this node (vLLM's flag: a hybrid-LB node, or a headless one).
    #[arg(long)]
    pub(crate) data_parallel_start_rank: Option<u16>,
    /// The one rank this process serves (vLLM's external LB).
    #[arg(long)]
    pub(crate) data_parallel_rank: Option<u16>,
    /// The DP master's address: the first node listens there for the others.
    #[arg(long)]
    pub(crate) data_parallel_address: Option<String>,
    /// The DP master's port (vLLM's default 29550).
    #[arg(long, default_value_t = 29550)]
    pub(crate) data_parallel_rpc_port: u16,
    /// Serve no HTTP: this node's ranks are reached through the master's API server.
    #[arg(long)]
    pub(crate) headless: bool,
    /// An API server on every node for its own ranks (vLLM's hybrid LB).
    #[arg(long)]
    pub(crate) data_parallel_hybrid_lb: bool,
    /// Model name served (what `/v1/models` lists and requests must name, if they name one).
    #[arg(long, default_value = "sim-model")]
    pub(crate) model: String,
    /// Longest prompt + output, in tokens.
    #[arg(long, default_value_t = 8192, value_parser = clap::value_parser!(u32).range(16..))]
    pub(crate) max_model_len: u32,
    /// KV blocks per DP engine.
    #[arg(long, default_value_t = 65536, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) kv_blocks: u32,
    /// Tokens per KV block.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub(crate) block_size: u32,
    /// Seconds a prefill holds KV for a decode that never pulls it (vLLM: 30 s lease).
    #[arg(long, default_value_t = 30.0, value_parser = positive_secs)]
    pub(crate) kv_lease_secs: f64,
    /// Base port of the KV side channel; DP rank r listens on PORT + r
    /// (vLLM: VLLM_NIXL_SIDE_CHANNEL_PORT). Default: a free port per rank.
    #[arg(long)]
    pub(crate) side_channel_port: Option<u16>,
    /// Host the side channel binds and advertises as `remote_host`. Default: --host, or
    /// 127.0.0.1 when --host is a wildcard address.
    #[arg(long)]
    pub(crate) side_channel_host: Option<String>,
    /// The KV connector whose handoff this engine speaks (docs/PROTOCOLS.md §1-§3); the
    /// side channel carries its KV in every case.
    #[arg(long, value_enum, default_value_t = Connector::Nixl)]
    pub(crate) kv_connector: Connector,
    /// Mooncake: the port of a prefill's bootstrap server (vLLM: VLLM_MOONCAKE_BOOTSTRAP_PORT,
    /// default 8998); 0 picks a free one (the banner names it).
    #[arg(long, value_name = "PORT")]
    pub(crate) mooncake_bootstrap_port: Option<u16>,
    /// P2pNccl: register every 3 s with the proxy's discovery socket at HOST:PORT, as vLLM's
    /// engine does with `kv_connector_extra_config` `proxy_ip`/`proxy_port`.
    #[arg(long, value_name = "HOST:PORT")]
    pub(crate) proxy_address: Option<String>,
    /// How long a decode keeps trying to pull KV from an unreachable prefill before the
    /// request fails with HTTP 500 (vLLM takes ~5 s).
    #[arg(long, default_value_t = 5000)]
    pub(crate) kv_load_timeout_ms: u64,
    /// Exit the process when pulled KV does not match the prompt, as vLLM's engine dies
    /// on a block-count mismatch. Default: fail only that request with HTTP 500.
    #[arg(long)]
    pub(crate) die_on_kv_mismatch: bool,
    /// How waiting requests are ordered (vLLM's flag): `fcfs` by arrival, `priority` by the
    /// request's `priority` (lower first), then arrival.
    #[arg(long, value_enum, default_value_t = crate::sim::engine::SchedulingPolicy::Fcfs)]
    pub(crate) scheduling_policy: crate::sim::engine::SchedulingPolicy,
    /// Most requests running at once per DP engine (continuous batching); more wait.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) max_num_seqs: u32,
    /// Simulated prefill time, milliseconds per 1000 prompt tokens.
    #[arg(long, default_value_t = 0.0, value_parser = non_negative)]
    pub(crate) prefill_ms_per_1k_tokens: f64,
    /// Simulated time of one decode step (one token for every running request).
    #[arg(long, default_value_t = 0.0, value_parser = non_negative)]
    pub(crate) decode_ms_per_token: f64,
    /// Fraction of generation requests answered with --fail-status instead (0..1).
    #[arg(long, default_value_t = 0.0, value_parser = fraction)]
    pub(crate) fail_rate: f64,
    /// HTTP status of a --fail-rate failure.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u16).range(400..=599))]
    pub(crate) fail_status: u16,
    /// Every request stops making progress after this many output tokens (0: before the
    /// first) and holds its KV until the client goes away.
    #[arg(long)]
    pub(crate) hang_after_tokens: Option<u32>,
    /// The process dies (exit 1, connections reset) while serving generation request N+1:
    /// a stream after its first chunk, a non-stream request before any byte.
    #[arg(long)]
    pub(crate) crash_after_requests: Option<u64>,
    /// Require `Authorization: Bearer KEY` on /v1/* (repeatable), as `vllm serve --api-key`
    /// does: 401 `{"error":"Unauthorized"}` otherwise.
    #[arg(long = "api-key", value_name = "KEY", action = clap::ArgAction::Append)]
    pub(crate) api_keys: Vec<String>,
    /// `/health` and generation answer 503 for this long after start.
    #[arg(long, default_value_t = 0)]
    pub(crate) startup_delay_ms: u64,

    /// Prefix caching (on by default, as in vLLM): full blocks are cached by content and
    /// shared by later requests with the same prefix.
    #[arg(long, overrides_with = "no_enable_prefix_caching", help_heading = "Prefix cache and KV events")]
    pub(crate) enable_prefix_caching: bool,
    #[arg(long, overrides_with = "enable_prefix_caching", help_heading = "Prefix cache and KV events")]
    pub(crate) no_enable_prefix_caching: bool,
    /// Report `usage.prompt_tokens_details.cached_tokens`, as vLLM does with this flag.
    #[arg(long, help_heading = "Prefix cache and KV events")]
    pub(crate) enable_prompt_tokens_details: bool,
    /// vLLM's KV events config (JSON), e.g. `{"enable_kv_cache_events":true,"publisher":"zmq",
    /// "endpoint":"tcp://*:5557","replay_endpoint":"tcp://*:5558","topic":"kv-events"}`. A `*`
    /// host binds the simulator's --host; rank r uses port + r.
    #[arg(long, value_name = "JSON", help_heading = "Prefix cache and KV events")]
    pub(crate) kv_events_config: Option<String>,
    /// Fraction of KV event batches not sent live, though kept for replay (a fault: a PUB
    /// socket drops batches past its high-water mark); subscribers see sequence gaps.
    #[arg(long, default_value_t = 0.0, value_parser = fraction, help_heading = "Prefix cache and KV events")]
    pub(crate) kv_events_drop_rate: f64,
    /// Blocks a second each DP rank fills with prompts it was not sent and frees at once
    /// (runs of 16 blocks), as other traffic turns an engine's prefix cache over: their
    /// BlockStored and, once the cache is full, BlockRemoved events are published like any
    /// others. For measuring a router's KV event intake. Needs prefix caching.
    #[arg(long, default_value_t = 0.0, value_name = "BLOCKS_PER_SEC", value_parser = non_negative, help_heading = "Prefix cache and KV events")]
    pub(crate) kv_cache_churn: f64,
    /// Serve vLLM's render endpoints (`/v1/completions/render`, `/v1/chat/completions/render`),
    /// which vLLM answers 403 without this flag.
    #[arg(long, help_heading = "Prefix cache and KV events")]
    pub(crate) enable_scale_out: bool,
    /// A local model directory: tokenize with its tokenizer.json and apply its chat template
    /// (chat_template.jinja or tokenizer_config.json), as vLLM would, instead of the
    /// simulator's word-piece tokenizer.
    #[arg(long, value_name = "DIR")]
    pub(crate) tokenizer: Option<String>,

    /// Most tokens one engine step processes (chunked prefill: a long prompt is prefilled
    /// over several steps, sharing each with the running decodes).
    #[arg(long, default_value_t = 8192, value_parser = clap::value_parser!(u32).range(1..), help_heading = "Timing")]
    pub(crate) max_num_batched_tokens: u32,
    /// Step times from a profile: `mocker` (NVIDIA Dynamo's published polynomial) or a JSON
    /// file (e.g. from `disagg fit-timing`); replaces --prefill-ms-per-1k-tokens and
    /// --decode-ms-per-token. See docs/SIM.md.
    #[arg(long, value_name = "FILE|mocker", help_heading = "Timing")]
    pub(crate) timing_profile: Option<String>,
    /// Run K times faster than the clock: every step's simulated time is divided by K.
    #[arg(long, default_value_t = 1.0, value_parser = crate::flags::positive, help_heading = "Timing")]
    pub(crate) speedup: f64,

    /// HTTPS, with vLLM's flags (--ssl-keyfile, --ssl-certfile, --ssl-ca-certs, --ssl-cert-reqs).
    #[command(flatten)]
    pub(crate) tls: crate::tls::ServerTlsArgs,
    /// Reload the certificate files when they change (vLLM's flag).
    #[arg(long, help_heading = "TLS")]
    pub(crate) enable_ssl_refresh: bool,
}

impl SimArgs {
    /// Cross-flag checks clap cannot express.
    pub(crate) fn validate(&self) -> Result<(), String> {
        let capacity = u64::from(self.kv_blocks) * u64::from(self.block_size);
        if capacity < u64::from(self.max_model_len) {
            return Err(format!(
                "--kv-blocks {} x --block-size {} = {capacity} tokens cannot hold one request of \
                 --max-model-len {}; raise --kv-blocks or lower --max-model-len",
                self.kv_blocks, self.block_size, self.max_model_len
            ));
        }
        if self.kv_connector != Connector::Mooncake && self.mooncake_bootstrap_port.is_some() {
            return Err("--mooncake-bootstrap-port is for --kv-connector mooncake".into());
        }
        if self.kv_cache_churn > 0.0 && !self.prefix_caching() {
            return Err("--kv-cache-churn fills the prefix cache: it does not go with --no-enable-prefix-caching".into());
        }
        if self.kv_connector != Connector::P2pNccl && self.proxy_address.is_some() {
            return Err("--proxy-address is for --kv-connector p2pnccl".into());
        }
        super::dp::Layout::of(self)?;
        self.check_instances()?;
        if self.kv_connector == Connector::P2pNccl && self.data_parallel_size > 1 {
            return Err("--kv-connector p2pnccl runs one engine per instance (as the xPyD guide does): drop --data-parallel-size".into());
        }
        if let Some(base) = self.side_channel_port {
            if u32::from(base) + u32::from(self.data_parallel_size) - 1 > u32::from(u16::MAX) {
                return Err("--side-channel-port + --data-parallel-size exceeds 65535".into());
            }
        }
        Ok(())
    }

    pub(crate) fn prefix_caching(&self) -> bool {
        !self.no_enable_prefix_caching
    }

    pub(crate) fn timing(&self) -> Result<crate::sim::engine::timing::Timing, String> {
        match &self.timing_profile {
            Some(spec) => {
                if self.prefill_ms_per_1k_tokens > 0.0 || self.decode_ms_per_token > 0.0 {
                    return Err(
                        "--timing-profile replaces --prefill-ms-per-1k-tokens and --decode-ms-per-token: pass one or the other".into()
                    );
                }
                crate::sim::engine::timing::Timing::load(spec)
            }
            None => Ok(crate::sim::engine::timing::Timing::linear(self.prefill_ms_per_1k_tokens, self.decode_ms_per_token)),
        }
    }

    pub(crate) fn kv_events(&self) -> Result<Option<crate::api::kv_events::KvEventsConfig>, String> {
        let Some(json) = &self.kv_events_config else { return Ok(None) };
        let cfg: crate::api::kv_events::KvEventsConfig = serde_json::from_str(json).map_err(|e| format!("--kv-events-config: {e}"))?;
        if cfg.enable_kv_cache_events && cfg.publisher != "zmq" && cfg.publisher != "null" {
            return Err(format!("--kv-events-config: unknown publisher `{}` (zmq or null)", cfg.publisher));
        }
        Ok(cfg.enabled().then_some(cfg))
    }

    pub(crate) fn advertised_side_host(&self) -> String {
        match &self.side_channel_host {
            Some(h) => h.clone(),
            None if self.host == "0.0.0.0" || self.host == "::" => "127.0.0.1".into(),
            None => self.host.clone(),
        }
    }
}
