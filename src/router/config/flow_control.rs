//! Flow control's flags: tenants, the engines' queue threshold, and how priorities reach
//! the engines (router/tenants/, router/admission/, workers/room.rs).

use std::path::PathBuf;

use clap::Args;

use crate::router::workers::room::QueueThreshold;

#[derive(Args, Debug, Clone, Default)]
#[command(next_help_heading = "Flow control")]
pub(crate) struct FlowControlArgs {
    /// Tenants by client key (YAML: name, keys or keys_env, weight, priority, best_priority,
    /// limits {requests_per_minute, tokens_per_minute, concurrent, max_prompt_tokens,
    /// max_queued}; bands by priority); reloaded when it changes. Every client must then
    /// present a key: the file's, or --client-api-key's (tenant `default`). docs/FLOW.md.
    #[arg(long, value_name = "FILE")]
    pub(crate) tenants: Option<PathBuf>,
    /// Requests are sent to the engines only while each pool a request needs has a DP rank
    /// whose queue (requests waiting as the engine reports, or the router's own legs that
    /// have not started answering, the larger) is under N; until then they wait in the
    /// router's queue in priority and fair-share order. `auto`: learned per engine.
    #[arg(long, value_name = "N|auto", value_parser = parse_threshold)]
    pub(crate) engine_queue_threshold: Option<QueueThreshold>,
    /// Router replicas sharing the tenants' limits: each enforces 1/N of every per-minute and
    /// concurrency limit (requests are assumed spread evenly, as a load balancer does).
    #[arg(long, default_value_t = 1, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub(crate) router_replicas: u32,
}

fn parse_threshold(s: &str) -> Result<QueueThreshold, String> {
    if s == "auto" {
        return Ok(QueueThreshold::Auto);
    }
    match s.parse::<usize>() {
        Ok(n) if (1..=65_536).contains(&n) => Ok(QueueThreshold::Fixed(n)),
        _ => Err(format!("{s:?}: a number of requests per DP rank (1 to 65536) or `auto`")),
    }
}

/// Flow control, checked.
#[derive(Debug, Clone, Default)]
pub(crate) struct FlowControlConfig {
    pub(crate) tenants: Option<PathBuf>,
    pub(crate) threshold: Option<QueueThreshold>,
    pub(crate) replicas: u32,
}

impl FlowControlConfig {
    /// Whether the router orders requests itself (not only FIFO): each request's priority,
    /// as resolved for its tenant, is then what both legs carry (engines started with
    /// `--scheduling-policy priority` order by it; vLLM 0.32's FCFS engines ignore it).
    pub(crate) fn orders(&self) -> bool {
        self.tenants.is_some() || self.threshold.is_some()
    }
}

impl FlowControlArgs {
    pub(crate) fn to_config(&self) -> FlowControlConfig {
        FlowControlConfig { tenants: self.tenants.clone(), threshold: self.engine_queue_threshold, replicas: self.router_replicas }
    }
}
