//! `disagg bench` flags: `vllm bench serve`'s names, defaults and meanings (PROTOCOLS.md §7),
//! plus `--plot`, `--http2` and `--speedup`.

use std::path::PathBuf;

use clap::{Args, ValueEnum};

use crate::flags::{below_one, positive_or_inf};

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum Backend {
    /// /v1/completions, streamed.
    Openai,
    /// /v1/chat/completions, streamed.
    #[value(name = "openai-chat")]
    OpenaiChat,
    /// Same as openai (vLLM's name for it).
    Vllm,
    /// /v1/messages (Anthropic's Messages API, as vLLM serves it), streamed. vLLM's bench
    /// has no such backend: the name is ours. Text prompts only; no --ignore-eos (vLLM's
    /// Messages API has no such field).
    #[value(name = "anthropic-messages")]
    AnthropicMessages,
    /// /v1/responses (OpenAI's Responses API), streamed, `store: false`: vLLM's own
    /// backend of that name. Text prompts only.
    #[value(name = "openai-responses")]
    OpenaiResponses,
}

impl Backend {
    /// The name results carry (vLLM's where vLLM has one).
    pub(crate) fn name(self) -> &'static str {
        match self {
            Backend::Openai => "openai",
            Backend::OpenaiChat => "openai-chat",
            Backend::Vllm => "vllm",
            Backend::AnthropicMessages => "anthropic-messages",
            Backend::OpenaiResponses => "openai-responses",
        }
    }

    /// How the endpoint's path must end.
    pub(crate) fn endpoint_suffix(self) -> &'static str {
        match self {
            Backend::OpenaiChat => "chat/completions",
            Backend::AnthropicMessages => "/messages",
            Backend::OpenaiResponses => "responses",
            Backend::Openai | Backend::Vllm => "completions",
        }
    }

    /// Whether its requests carry text only (chat messages), never token ids.
    pub(crate) fn text_only(self) -> bool {
        matches!(self, Backend::OpenaiChat | Backend::AnthropicMessages | Backend::OpenaiResponses)
    }
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum DatasetName {
    /// Synthetic prompts of random lengths (see --random-*).
    Random,
    /// A ShareGPT-format JSON file (--dataset-path): first human turn as the prompt, the
    /// first answer's token count as the output length.
    Sharegpt,
    /// vLLM's repeated-prefix prompts (see --prefix-repetition-*).
    #[value(name = "prefix_repetition")]
    PrefixRepetition,
    /// A Mooncake request trace (JSONL: timestamp, input_length, output_length, hash_ids;
    /// --dataset-path): token-id prompts whose blocks are equal where the hash ids are,
    /// sent at the recorded times (see --trace-*).
    #[value(name = "mooncake_trace")]
    MooncakeTrace,
    /// vLLM's timed trace (JSONL records with hash ids; --dataset-path): token-id prompts
    /// of --timed-trace-chunk-hash-size tokens per id, sent at timestamp x
    /// --timed-trace-sec-multiplier seconds (see --timed-trace-*).
    #[value(name = "timed_trace")]
    TimedTrace,
}

#[derive(Args, Debug, Clone)]
pub(crate) struct BenchArgs {
    /// Server or API base URL (e.g. http://127.0.0.1:8000); else --host and --port.
    #[arg(long)]
    pub(crate) base_url: Option<String>,
    #[arg(long, default_value = "127.0.0.1")]
    pub(crate) host: String,
    #[arg(long, default_value_t = 8000)]
    pub(crate) port: u16,
    /// API path.
    #[arg(long, default_value = "/v1/completions")]
    pub(crate) endpoint: String,
    #[arg(long, value_enum, default_value_t = Backend::Openai)]
    pub(crate) backend: Backend,
    /// Model name sent in requests (default: the first of the server's /v1/models).
    #[arg(long)]
    pub(crate) model: Option<String>,
    /// The name requests carry, when it differs from --model (the tokenizer's source).
    #[arg(long)]
    pub(crate) served_model_name: Option<String>,
    /// A local directory with tokenizer.json (default: --model, if it is such a
    /// directory). `sim` selects the simulator's word-piece tokenizer.
    #[arg(long)]
    pub(crate) tokenizer: Option<String>,
    /// Accepted for compatibility with `vllm bench serve` and without effect: tokenizers
    /// are read from tokenizer.json, which runs no code.
    #[arg(long)]
    pub(crate) trust_remote_code: bool,
    #[arg(long, value_enum, default_value_t = DatasetName::Random)]
    pub(crate) dataset_name: DatasetName,
    /// The dataset file (ShareGPT JSON, or a Mooncake trace's JSONL).
    #[arg(long)]
    pub(crate) dataset_path: Option<PathBuf>,
    /// mooncake_trace: prompt tokens per hash id (the traces' own: 512); prompt lengths
    /// scale with it.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) trace_block_size: Option<u64>,
    /// mooncake_trace: arrivals come this many times faster than the timestamps say.
    #[arg(long, value_parser = crate::flags::positive)]
    pub(crate) trace_speedup: Option<f64>,
    /// timed_trace: prompt tokens per hash id (vLLM's default 16; Mooncake's traces: 512).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) timed_trace_chunk_hash_size: Option<u64>,
    /// timed_trace: seconds per timestamp unit (0.001 for milliseconds).
    #[arg(long, value_parser = crate::flags::positive)]
    pub(crate) timed_trace_sec_multiplier: Option<f64>,
    /// timed_trace: the records' field names.
    #[arg(long)]
    pub(crate) timed_trace_label_timestamp: Option<String>,
    #[arg(long)]
    pub(crate) timed_trace_label_input_length: Option<String>,
    #[arg(long)]
    pub(crate) timed_trace_label_output_length: Option<String>,
    #[arg(long)]
    pub(crate) timed_trace_label_hash_ids: Option<String>,
    /// Send a trace's requests at its timestamps (the default for trace datasets).
    #[arg(long, conflicts_with = "no_self_timed")]
    pub(crate) self_timed: bool,
    /// Send a trace's requests at --request-rate instead of its timestamps.
    #[arg(long)]
    pub(crate) no_self_timed: bool,
    /// Number of requests.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) num_prompts: u64,
    #[arg(long, default_value_t = 1024)]
    pub(crate) random_input_len: usize,
    #[arg(long, default_value_t = 128)]
    pub(crate) random_output_len: usize,
    /// Lengths are drawn uniformly from [len*(1-r), len*(1+r)].
    #[arg(long, default_value_t = 0.0, value_parser = below_one)]
    pub(crate) random_range_ratio: f64,
    /// Tokens of one random prefix shared by every request.
    #[arg(long, default_value_t = 0)]
    pub(crate) random_prefix_len: usize,
    /// prefix_repetition: tokens of each shared prefix.
    #[arg(long, default_value_t = 256)]
    pub(crate) prefix_repetition_prefix_len: usize,
    /// prefix_repetition: tokens of each request's own suffix.
    #[arg(long, default_value_t = 256)]
    pub(crate) prefix_repetition_suffix_len: usize,
    /// prefix_repetition: number of distinct prefixes.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) prefix_repetition_num_prefixes: u64,
    /// prefix_repetition: output tokens of every request.
    #[arg(long, default_value_t = 128)]
    pub(crate) prefix_repetition_output_len: usize,
    /// Output length of every ShareGPT request (default: its answer's length).
    #[arg(long)]
    pub(crate) sharegpt_output_len: Option<usize>,
    /// Keep the dataset's order (ShareGPT, prefix_repetition) instead of shuffling it with --seed.
    #[arg(long)]
    pub(crate) disable_shuffle: bool,
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: u64,
    /// Requests per second ("inf": all at once); arrivals are a gamma process.
    #[arg(long, default_value = "inf", value_parser = positive_or_inf)]
    pub(crate) request_rate: f64,
    /// Gamma shape of the arrivals: 1 is Poisson, lower is burstier.
    #[arg(long, default_value_t = 1.0, value_parser = positive_or_inf)]
    pub(crate) burstiness: f64,
    /// Most requests in flight at once.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) max_concurrency: Option<u64>,
    /// Send ignore_eos, so every request generates its full output length.
    #[arg(long)]
    pub(crate) ignore_eos: bool,
    #[arg(long)]
    pub(crate) temperature: Option<f64>,
    #[arg(long)]
    pub(crate) top_p: Option<f64>,
    #[arg(long)]
    pub(crate) top_k: Option<i64>,
    /// SLOs for goodput, e.g. `ttft:200 tpot:50 e2el:2000` (milliseconds).
    #[arg(long, num_args = 1.., value_name = "KEY:MS")]
    pub(crate) goodput: Vec<String>,
    /// Metrics with percentiles: comma list of ttft, tpot, itl, e2el.
    #[arg(long, default_value = "ttft,tpot,itl")]
    pub(crate) percentile_metrics: String,
    /// Percentiles to report, comma separated.
    #[arg(long, default_value = "99")]
    pub(crate) metric_percentiles: String,
    /// Write the results as JSON (vLLM's keys).
    #[arg(long)]
    pub(crate) save_result: bool,
    /// Keep per-request fields (ttfts, itls, ...) in the JSON.
    #[arg(long)]
    pub(crate) save_detailed: bool,
    #[arg(long)]
    pub(crate) result_dir: Option<PathBuf>,
    #[arg(long)]
    pub(crate) result_filename: Option<String>,
    /// Label in the result file name and JSON (default: the backend).
    #[arg(long)]
    pub(crate) label: Option<String>,
    /// Retry one request until the server answers, for up to this long (0: no check).
    #[arg(long, default_value_t = 0)]
    pub(crate) ready_check_timeout_sec: u64,
    /// Requests before the measured run (not counted).
    #[arg(long, default_value_t = 0)]
    pub(crate) num_warmups: u64,
    /// Prefix of each request's X-Request-Id (default: bench-<random hex>-).
    #[arg(long)]
    pub(crate) request_id_prefix: Option<String>,
    /// Extra request headers, KEY=VALUE.
    #[arg(long, num_args = 1..)]
    pub(crate) header: Vec<String>,
    /// No progress bar.
    #[arg(long)]
    pub(crate) disable_tqdm: bool,
    /// Draw the run to FILE (.svg or .png): TTFT, TPOT and ITL distributions and
    /// throughput over time.
    #[arg(long, value_name = "FILE")]
    pub(crate) plot: Option<PathBuf>,
    /// The target is a simulator run with `disagg sim --speedup K`: arrivals come K times
    /// faster, and every measured time is multiplied by K (throughputs divided by K), so
    /// the report is in simulated time, comparable to a run at K = 1.
    #[arg(long, default_value_t = 1.0, value_parser = crate::flags::positive)]
    pub(crate) speedup: f64,
    /// Speak HTTP/2 without TLS (prior knowledge) to the server, as `disagg route` and
    /// `disagg sim` accept: many streams per connection, for very high concurrency.
    #[arg(long)]
    pub(crate) http2: bool,
}
