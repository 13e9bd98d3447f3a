//! Elastic engines (--pd-pool, vLLM `kv_both`) and predicted latency in the pair's run:
//! whether a reserved decode that is an elastic engine takes both legs alone, the prefill
//! kept off it otherwise, and the TTFT predicted for the layout chosen, compared with the
//! one observed (docs/ROUTING.md).

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use super::{Job, LegSender, Pairs};
use crate::router::metrics::ElasticLayout;
use crate::router::policy::slo_aware::uncached;
use crate::router::predict::{self, EngineNow, Forecast, Slo};
use crate::router::workers::{Lease, Worker};

/// The TTFT predicted for a generation (the first layout's), and when its picks began.
pub(crate) struct TtftPrediction {
    predicted_ms: OnceLock<f64>,
    since: Instant,
}

impl Default for TtftPrediction {
    fn default() -> Self {
        TtftPrediction { predicted_ms: OnceLock::new(), since: Instant::now() }
    }
}

impl TtftPrediction {
    pub(super) fn set(&self, forecast: Forecast) {
        let _ = self.predicted_ms.set(forecast.ttft_ms);
    }

    /// The prediction, if one was made, and the time since the picks began (the observed
    /// TTFT, when read as a streamed answer starts).
    pub(crate) fn predicted_and_observed_ms(&self) -> Option<(f64, f64)> {
        self.predicted_ms.get().map(|p| (*p, self.since.elapsed().as_secs_f64() * 1e3))
    }
}

fn now(w: &Worker) -> EngineNow<'_> {
    EngineNow { latency: &w.latency, running: w.in_flight() }
}

/// A worker this request holds a lease on (counted in its in-flight already).
fn reserved(w: &Worker) -> EngineNow<'_> {
    EngineNow { latency: &w.latency, running: w.in_flight().saturating_sub(1) }
}

impl<S: LegSender> Pairs<S> {
    /// Whether the reserved decode, an elastic engine, takes both legs: when no other
    /// prefill is available, or when slo_aware predicts it alone better than a pair with
    /// the best other prefill. The prediction made is kept for the job.
    pub(super) fn elastic_alone(&self, job: &Job, decode: &Lease) -> bool {
        let d = decode.worker();
        if !d.is_elastic() {
            return false;
        }
        let prefills = self.pd().0.snapshot();
        let others = prefills.iter().filter(|p| p.is_available() && p.url != d.url);
        let alone = match self.slo {
            None => others.count() == 0,
            Some(slo) => self.predicted_alone(job, d, others, &slo),
        };
        self.metrics.elastic_layout(if alone { ElasticLayout::Alone } else { ElasticLayout::Pair });
        alone
    }

    /// slo_aware: the elastic decode alone against a pair with the best of `others`.
    fn predicted_alone<'a>(&self, job: &Job, d: &Worker, others: impl Iterator<Item = &'a Arc<Worker>>, slo: &Slo) -> bool {
        let slo = *slo;
        let best_pair = others
            .map(|p| predict::split(now(p), reserved(d), uncached(&**p, &job.info), job.info.tokens))
            .reduce(|a, b| if b.better_than(&a, &slo) { b } else { a });
        let lone = predict::alone(reserved(d), uncached(d, &job.info));
        let alone = best_pair.is_none_or(|pair| lone.better_than(&pair, &slo));
        job.prediction.set(if alone { lone } else { best_pair.expect("a pair when not alone") });
        alone
    }

    /// slo_aware: the TTFT predicted for a pair once both its workers are known.
    pub(super) fn predict_pair(&self, job: &Job, prefill: &Worker, decode: &Worker) {
        if self.slo.is_some() {
            job.prediction.set(predict::split(reserved(prefill), reserved(decode), uncached(prefill, &job.info), job.info.tokens));
        }
    }

    /// slo_aware: the TTFT predicted for one worker answering alone (colocated).
    pub(super) fn predict_alone(&self, job: &Job, worker: &Worker) {
        if self.slo.is_some() {
            job.prediction.set(predict::alone(reserved(worker), uncached(worker, &job.info)));
        }
    }
}
