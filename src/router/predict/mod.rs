//! Predicted latency (docs/ROUTING.md): each engine's model, fitted online from the legs
//! the router sees (fit.rs); a request's forecast on a pair or on one engine alone; and
//! how `slo_aware` compares forecasts under --slo-ttft-ms / --slo-itl-ms. Imports no
//! other router room.

mod fit;
mod lean;

pub(crate) use fit::EngineLatency;
pub(crate) use lean::Lean;

/// The service levels `slo_aware` routes for.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Slo {
    pub(crate) ttft_ms: f64,
    pub(crate) itl_ms: f64,
}

/// What one choice is predicted to cost: the request's time to first token, and the worst
/// time per output token it causes on the engines it uses (its own decode's, or a running
/// decode's that its prefill holds up).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Forecast {
    pub(crate) ttft_ms: f64,
    pub(crate) itl_ms: f64,
}

impl Forecast {
    pub(crate) fn meets(&self, slo: &Slo) -> bool {
        self.ttft_ms <= slo.ttft_ms && self.itl_ms <= slo.itl_ms
    }

    /// The smaller of the two shares of the SLOs left unused.
    fn headroom(&self, slo: &Slo) -> f64 {
        (1.0 - self.ttft_ms / slo.ttft_ms).min(1.0 - self.itl_ms / slo.itl_ms)
    }

    /// Whether this choice beats `other`: one that meets both SLOs beats one that does not;
    /// between two that do, the most headroom (equal: the least TTFT); between two that do
    /// not, the least TTFT.
    pub(crate) fn better_than(&self, other: &Forecast, slo: &Slo) -> bool {
        match (self.meets(slo), other.meets(slo)) {
            (true, false) => true,
            (false, true) => false,
            (true, true) => {
                let (mine, theirs) = (self.headroom(slo), other.headroom(slo));
                mine > theirs + 1e-9 || ((mine - theirs).abs() <= 1e-9 && self.ttft_ms < other.ttft_ms)
            }
            (false, false) => self.ttft_ms < other.ttft_ms,
        }
    }
}

/// An engine as a forecast reads it: its model and the sequences it is running.
#[derive(Clone, Copy)]
pub(crate) struct EngineNow<'a> {
    pub(crate) latency: &'a EngineLatency,
    pub(crate) running: usize,
}

impl EngineNow<'_> {
    /// Its decodes' time per token with one more sequence, held up by any prefill queued
    /// here (an elastic engine prefilling for others).
    fn itl_with_one_more(&self) -> f64 {
        self.latency.itl_ms(self.running + 1).max(self.latency.prefill_step_ms(self.latency.queued_tokens()))
    }

    /// The step a prefill of `tokens` puts into the decodes running here (none: nothing).
    fn held_up(&self, tokens: usize) -> f64 {
        if self.running > 0 {
            self.latency.itl_ms(self.running) + self.latency.prefill_step_ms(tokens)
        } else {
            0.0
        }
    }
}

/// Both legs on one engine: it prefills the `tokens` behind its queue (the prefill's step
/// samples the first token), then decodes beside its running sequences, whose steps the
/// prefill lengthens.
pub(crate) fn alone(engine: EngineNow<'_>, tokens: usize) -> Forecast {
    Forecast { ttft_ms: engine.latency.prefill_ms(tokens), itl_ms: engine.itl_with_one_more().max(engine.held_up(tokens)) }
}

/// A prefill leg: the `tokens` behind the engine's queue; the decodes running there held up.
pub(crate) fn prefill_leg(engine: EngineNow<'_>, tokens: usize) -> Forecast {
    Forecast { ttft_ms: engine.latency.prefill_ms(tokens), itl_ms: engine.held_up(tokens) }
}

/// A decode leg after a prefill elsewhere: the KV of `tokens` pulled and the first step;
/// then a token per step beside the running sequences.
pub(crate) fn decode_leg(engine: EngineNow<'_>, tokens: usize) -> Forecast {
    Forecast { ttft_ms: engine.latency.transfer_ms(tokens), itl_ms: engine.itl_with_one_more() }
}

/// A pair: the prefill leg, then the decode leg (`tokens` uncached on the prefill, `all`
/// moved to the decode).
pub(crate) fn split(prefill: EngineNow<'_>, decode: EngineNow<'_>, tokens: usize, all: usize) -> Forecast {
    let (p, d) = (prefill_leg(prefill, tokens), decode_leg(decode, all));
    Forecast { ttft_ms: p.ttft_ms + d.ttft_ms, itl_ms: p.itl_ms.max(d.itl_ms) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::timing::Timing;

    fn engine() -> EngineLatency {
        // 20 ms + 0.02 ms per prompt token; 10 ms steps + 1 ms per running sequence.
        let t = Timing {
            prefill_ms: [20.0, 0.02, 0.0],
            decode_ms: [10.0, 0.0, 0.0],
            decode_ms_per_seq: 1.0,
            decode_min_ms: 0.0,
            source: String::new(),
        };
        EngineLatency::new(&t)
    }

    #[test]
    fn one_engine_alone_wins_a_short_prompt_and_a_pair_wins_when_the_engine_is_busy_decoding() {
        let (a, b) = (engine(), engine());
        let slo = Slo { ttft_ms: 500.0, itl_ms: 30.0 };
        let idle = |l| EngineNow { latency: l, running: 0 };
        // Idle engines, a short prompt: no transfer to pay for.
        let one = alone(idle(&a), 100);
        let two = split(idle(&b), idle(&a), 100, 100);
        assert!(one.ttft_ms < two.ttft_ms && one.better_than(&two, &slo), "{one:?} {two:?}");
        // A 4k prompt onto an engine running 8 decodes would hold them up past the ITL
        // SLO: the pair keeps them fast.
        let busy = EngineNow { latency: &a, running: 8 };
        let one = alone(busy, 4000);
        let two = split(idle(&b), busy, 4000, 4000);
        assert!(!one.meets(&slo) && two.meets(&slo) && two.better_than(&one, &slo), "{one:?} {two:?}");
        // Neither meets the SLOs: the least TTFT.
        let tight = Slo { ttft_ms: 1.0, itl_ms: 1.0 };
        assert!(alone(idle(&a), 10).better_than(&split(idle(&b), idle(&a), 10, 10), &tight));
    }
}
