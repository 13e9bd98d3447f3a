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

/// A prompt whose prefill step takes less than this share of the ITL SLO goes alone on an
/// elastic decode: the step it adds to the engine's decodes is within their SLO.
const SHORT_PREFILL_SHARE_OF_ITL: f64 = 0.5;

fn now(w: &Worker) -> EngineNow<'_> {
    EngineNow { latency: &w.latency, running: w.in_flight() }
}

/// A worker this request holds a lease on (counted in its in-flight already).
fn reserved(w: &Worker) -> EngineNow<'_> {
    EngineNow { latency: &w.latency, running: w.in_flight().saturating_sub(1) }
}

impl<S: LegSender> Pairs<S> {
    /// Whether the reserved decode, an elastic engine, takes both legs: when no other
    /// prefill is available; under slo_aware, also when its prompt is short (its prefill
    /// step keeps the ITL SLO for the engine's decodes: a pair would only add the transfer).
    /// The prediction made is kept for the job, and a pair's prefill work counts toward the
    /// engines leaning to prefill.
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

    /// slo_aware: alone for a short prompt, else a pair with the best of `others` (those
    /// leaning to prefill first).
    fn predicted_alone<'a>(&self, job: &Job, d: &Worker, others: impl Iterator<Item = &'a Arc<Worker>>, slo: &Slo) -> bool {
        let slo = *slo;
        let on_d = uncached(d, &job.info);
        let lone = predict::alone(reserved(d), on_d);
        if d.latency.prefill_step_ms(on_d) < SHORT_PREFILL_SHARE_OF_ITL * slo.itl_ms {
            // Short: alone, whatever a pair would cost.
            job.prediction.set(lone);
            return true;
        }
        let decoding = self.decode_leaning();
        let mut others: Vec<&Arc<Worker>> = others.collect();
        if others.iter().any(|p| !decoding.contains(&p.url)) {
            others.retain(|p| !decoding.contains(&p.url));
        }
        let best_pair = others
            .iter()
            .map(|p| (p, predict::split(now(p), reserved(d), uncached(&***p, &job.info), job.info.tokens)))
            .reduce(|a, b| if b.1.better_than(&a.1, &slo) { b } else { a });
        // A long prompt is disaggregated even when neither layout meets the SLOs yet: its
        // prefill work is what makes engines lean to prefill, so that the next ones do.
        match best_pair {
            Some((p, pair)) => {
                self.lean.add(p.latency.compute_ms(uncached(&***p, &job.info)));
                job.prediction.set(pair);
                false
            }
            None => {
                job.prediction.set(lone);
                true
            }
        }
    }

    /// slo_aware over elastic engines: the URLs of those that lean to prefill now.
    pub(super) fn prefill_leaning(&self) -> Vec<String> {
        self.leaning().0
    }

    /// The available elastic engines that lean to decode while some lean to prefill.
    pub(super) fn decode_leaning(&self) -> Vec<String> {
        let (prefill, decode) = self.leaning();
        if prefill.is_empty() {
            Vec::new()
        } else {
            decode
        }
    }

    fn leaning(&self) -> (Vec<String>, Vec<String>) {
        if self.slo.is_none() {
            return (Vec::new(), Vec::new());
        }
        let elastic: Vec<(String, usize)> =
            self.pd().0.snapshot().iter().filter(|w| w.is_elastic() && w.is_available()).map(|w| (w.url.clone(), w.in_flight())).collect();
        let k = self.lean.prefill_engines(elastic.len(), self.max_prefill_share);
        let prefill = self.lean.leaning(&elastic, k);
        let decode = elastic.into_iter().map(|(u, _)| u).filter(|u| !prefill.contains(u)).collect();
        (prefill, decode)
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
