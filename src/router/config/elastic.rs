//! Elastic PD and predicted latency's flags: `--pd-pool` (engines that take either leg,
//! vLLM `kv_both`), `slo_aware`'s service levels, and the timing profile each engine's
//! latency model starts from (router/predict/, docs/ROUTING.md).

use std::sync::Arc;

use clap::Args;

use crate::api::connector::Connector;
use crate::api::timing::Timing;
use crate::flags::positive;
use crate::router::policy::PolicyKind;
use crate::router::predict::Slo;
use crate::router::workers::url::normalize_url;

#[derive(Args, Debug, Clone, Default)]
#[command(next_help_heading = "Elastic PD and predicted latency")]
pub(crate) struct ElasticArgs {
    /// Engines that take either leg (NIXL, `"kv_role":"kv_both"`): for each request the
    /// router picks the decode and the prefill among them (and the fixed pools), or one of
    /// them for both legs (no KV transfer) when no other prefill is up or slo_aware predicts
    /// it faster. Beside --prefill / --decode or alone.
    #[arg(long, value_name = "URL", num_args = 1.., action = clap::ArgAction::Append)]
    pub(crate) pd_pool: Vec<String>,
    /// slo_aware: the time to first token each request should meet (ms).
    #[arg(long, value_name = "MS", value_parser = positive)]
    pub(crate) slo_ttft_ms: Option<f64>,
    /// slo_aware: the time per output token each request should meet (ms).
    #[arg(long, value_name = "MS", value_parser = positive)]
    pub(crate) slo_itl_ms: Option<f64>,
    /// slo_aware: each engine's latency model starts from this profile (`disagg fit-timing`'s
    /// JSON, or the built-in `mocker`) and is fitted from the legs the router sees.
    #[arg(long, value_name = "FILE|mocker")]
    pub(crate) timing_profile: Option<String>,
    /// slo_aware over --pd-pool: the most engines that lean to prefill, as a share of the
    /// pool (the rest keep room for decodes, whose KV the router does not see fill).
    #[arg(long, value_name = "SHARE", value_parser = crate::flags::fraction)]
    pub(crate) pd_pool_max_prefill_share: Option<f64>,
}

/// At most half the elastic engines lean to prefill unless told otherwise.
const DEFAULT_MAX_PREFILL_SHARE: f64 = 0.5;

/// slo_aware's defaults: an interactive chat's (2 s to the first token, 50 ms a token).
const DEFAULT_SLO: Slo = Slo { ttft_ms: 2000.0, itl_ms: 50.0 };

/// What the router routes elastic engines and slo_aware with.
#[derive(Debug, Clone)]
pub(crate) struct ElasticConfig {
    pub(crate) pd_pool: Vec<String>,
    /// Set when a pool's policy is slo_aware.
    pub(crate) slo: Option<Slo>,
    pub(crate) seed: Arc<Timing>,
    pub(crate) max_prefill_share: f64,
}

impl Default for ElasticConfig {
    fn default() -> Self {
        ElasticConfig { pd_pool: Vec::new(), slo: None, seed: Arc::new(Timing::mocker()), max_prefill_share: DEFAULT_MAX_PREFILL_SHARE }
    }
}

impl ElasticArgs {
    pub(crate) fn to_config(&self, connector: Connector, policies: [PolicyKind; 2]) -> Result<ElasticConfig, String> {
        let pd_pool = self.pd_pool.iter().map(|u| normalize_url(u)).collect::<Result<Vec<_>, _>>()?;
        if !pd_pool.is_empty() && connector != Connector::Nixl {
            return Err(format!(
                "--pd-pool engines take either leg with the NIXL connector only (the router gives each leg's body); not with --kv-connector {}",
                connector.as_str()
            ));
        }
        let slo_aware = policies.contains(&PolicyKind::SloAware);
        if !slo_aware && (self.slo_ttft_ms.is_some() || self.slo_itl_ms.is_some() || self.timing_profile.is_some()) {
            return Err("--slo-ttft-ms, --slo-itl-ms and --timing-profile are slo_aware's: add --policy slo_aware".into());
        }
        if self.pd_pool_max_prefill_share.is_some() && (!slo_aware || pd_pool.is_empty()) {
            return Err("--pd-pool-max-prefill-share is for slo_aware over --pd-pool engines".into());
        }
        let seed = match &self.timing_profile {
            Some(spec) => Arc::new(Timing::load(spec)?),
            None => Arc::new(Timing::mocker()),
        };
        let slo = slo_aware.then(|| Slo {
            ttft_ms: self.slo_ttft_ms.unwrap_or(DEFAULT_SLO.ttft_ms),
            itl_ms: self.slo_itl_ms.unwrap_or(DEFAULT_SLO.itl_ms),
        });
        Ok(ElasticConfig { pd_pool, slo, seed, max_prefill_share: self.pd_pool_max_prefill_share.unwrap_or(DEFAULT_MAX_PREFILL_SHARE) })
    }
}
