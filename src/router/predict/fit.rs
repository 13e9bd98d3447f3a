//! One engine's latency model: three lines fitted online (least squares, older samples
//! decaying), each seeded from a timing profile until the engine's own legs say more.
//!
//!   prefill leg ms   = a + b·(prompt tokens queued on the engine, this one's included)
//!                      (to its answer, or a lone leg's first token: the prefill's step
//!                      samples it)
//!   decode first ms  = a + b·(prompt tokens whose KV it pulls)   (transfer + first step)
//!   ITL ms           = a + b·(sequences running on the engine)

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::api::timing::Timing;

/// The most prompt tokens one engine step prefills (vLLM's chunked prefill; a longer
/// prompt's prefill is spread over several steps, each slowing the running decodes once).
pub(crate) const PREFILL_CHUNK_TOKENS: usize = 2048;

/// Each new sample weighs this much more than the one before it (a window of ~20 legs).
const DECAY: f64 = 0.95;

/// A line fitted by decayed least squares; its seed until samples spread along x.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Line {
    seed: (f64, f64),
    s: f64,
    sx: f64,
    sy: f64,
    sxx: f64,
    sxy: f64,
}

impl Line {
    pub(crate) fn seeded(intercept: f64, slope: f64) -> Self {
        Line { seed: (intercept.max(0.0), slope.max(0.0)), s: 0.0, sx: 0.0, sy: 0.0, sxx: 0.0, sxy: 0.0 }
    }

    pub(crate) fn observe(&mut self, x: f64, y: f64) {
        if !(x.is_finite() && y.is_finite()) {
            return;
        }
        for v in [&mut self.s, &mut self.sx, &mut self.sy, &mut self.sxx, &mut self.sxy] {
            *v *= DECAY;
        }
        self.s += 1.0;
        self.sx += x;
        self.sy += y;
        self.sxx += x * x;
        self.sxy += x * y;
    }

    /// (intercept, slope): the fit where samples spread along x (through the origin at
    /// the samples' mean when the fit's intercept would be negative); otherwise the seed
    /// scaled to the samples' mean; the seed alone before any sample.
    pub(crate) fn coefficients(&self) -> (f64, f64) {
        if self.s < 0.5 {
            return self.seed;
        }
        let (mx, my) = (self.sx / self.s, self.sy / self.s);
        let var = self.sxx / self.s - mx * mx;
        if self.s >= 3.0 && var > 1e-6 * (1.0 + mx * mx) {
            let slope = ((self.sxy / self.s - mx * my) / var).max(0.0);
            let intercept = my - slope * mx;
            if intercept >= 0.0 || mx <= 0.0 {
                return (intercept, slope);
            }
            return (0.0, (my / mx).max(0.0));
        }
        let at_mean = self.seed.0 + self.seed.1 * mx;
        let k = if at_mean > 0.0 { (my / at_mean).max(0.0) } else { 1.0 };
        (self.seed.0 * k, self.seed.1 * k)
    }

    pub(crate) fn at(&self, x: f64) -> f64 {
        let (a, b) = self.coefficients();
        (a + b * x).max(0.0)
    }
}

#[derive(Clone, Copy, Debug)]
struct Lines {
    prefill: Line,
    transfer: Line,
    itl: Line,
}

/// What the router has learned of one engine's speed, and the prefill work it has sent
/// there that has not answered yet.
pub(crate) struct EngineLatency {
    lines: Mutex<Lines>,
    queued_tokens: Arc<AtomicUsize>,
}

impl EngineLatency {
    pub(crate) fn new(seed: &Timing) -> Self {
        let [p0, p1, p2] = seed.prefill_ms;
        let step = seed.decode(0.1, 1);
        let lines = Lines {
            // The step that samples the first token, and the quadratic term as a slope at a
            // typical prompt's length.
            prefill: Line::seeded(p0 + step, p1 + p2 * 512.0),
            // One step, and the KV's time over the wire (seeded small; fitted from the legs).
            transfer: Line::seeded(step, 0.001),
            itl: Line::seeded(step - seed.decode_ms_per_seq, seed.decode_ms_per_seq),
        };
        EngineLatency { lines: Mutex::new(lines), queued_tokens: Arc::default() }
    }

    fn lines(&self) -> Lines {
        *self.lines.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Prompt tokens of prefill work sent here that has not answered yet.
    pub(crate) fn queued_tokens(&self) -> usize {
        self.queued_tokens.load(Ordering::Relaxed)
    }

    /// A prefill of `tokens` more, behind the work queued here.
    pub(crate) fn prefill_ms(&self, tokens: usize) -> f64 {
        self.lines().prefill.at((self.queued_tokens() + tokens) as f64)
    }

    /// A prefill of `tokens` alone, without the queue: the engine time it takes.
    pub(crate) fn compute_ms(&self, tokens: usize) -> f64 {
        self.lines().prefill.at(tokens as f64)
    }

    /// The longest step a prefill of `tokens` puts into this engine's decodes.
    pub(crate) fn prefill_step_ms(&self, tokens: usize) -> f64 {
        if tokens == 0 {
            return 0.0;
        }
        self.lines().prefill.at(tokens.min(PREFILL_CHUNK_TOKENS) as f64)
    }

    /// A decode leg's first output here, after pulling `tokens` of KV.
    pub(crate) fn transfer_ms(&self, tokens: usize) -> f64 {
        self.lines().transfer.at(tokens as f64)
    }

    /// Time per output token with `running` sequences decoding here.
    pub(crate) fn itl_ms(&self, running: usize) -> f64 {
        self.lines().itl.at(running as f64)
    }

    /// The current fit: (intercept, slope) of the prefill, transfer and ITL lines.
    pub(crate) fn coefficients(&self) -> [(f64, f64); 3] {
        let l = self.lines();
        [l.prefill.coefficients(), l.transfer.coefficients(), l.itl.coefficients()]
    }

    fn observe(&self, f: impl FnOnce(&mut Lines)) {
        f(&mut self.lines.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// A prefill (or a lone leg's first output) took `ms` with `ahead` tokens queued here,
    /// its own included.
    pub(crate) fn observe_prefill(&self, ahead: usize, ms: f64) {
        self.observe(|l| l.prefill.observe(ahead as f64, ms));
    }

    /// A decode leg's first output took `ms` after its prefill (of `tokens`).
    pub(crate) fn observe_transfer(&self, tokens: usize, ms: f64) {
        self.observe(|l| l.transfer.observe(tokens as f64, ms));
    }

    /// A stream's time per output token was `ms` with `running` sequences here.
    pub(crate) fn observe_itl(&self, running: usize, ms: f64) {
        self.observe(|l| l.itl.observe(running as f64, ms));
    }

    /// Prefill work of `tokens` sent here, counted until the guard drops.
    pub(crate) fn start_prefill(&self, tokens: usize) -> PrefillWork {
        let ahead = self.queued_tokens.fetch_add(tokens, Ordering::Relaxed) + tokens;
        PrefillWork { queued: self.queued_tokens.clone(), tokens, ahead }
    }
}

/// Prefill work in flight on an engine; its tokens leave the engine's queue when dropped.
pub(crate) struct PrefillWork {
    queued: Arc<AtomicUsize>,
    tokens: usize,
    /// Tokens queued on the engine when it was sent, its own included.
    pub(crate) ahead: usize,
}

impl Drop for PrefillWork {
    fn drop(&mut self) {
        self.queued.fetch_sub(self.tokens, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_is_fitted_from_spread_samples_and_scales_its_seed_otherwise() {
        let mut l = Line::seeded(10.0, 1.0);
        assert_eq!(l.at(5.0), 15.0);
        // Samples all at one x: the seed scaled through their mean (50 / 110).
        for _ in 0..5 {
            l.observe(100.0, 50.0);
        }
        assert!((l.at(100.0) - 50.0).abs() < 1e-9);
        assert!((l.at(200.0) - 210.0 * 50.0 / 110.0).abs() < 1e-9);
        assert!(l.at(1.0) > 0.0, "a short prompt is never predicted free");
        // Spread samples of y = 4 + 0.5x: fitted.
        let mut l = Line::seeded(10.0, 1.0);
        for x in [0.0, 100.0, 200.0, 400.0, 800.0] {
            l.observe(x, 4.0 + 0.5 * x);
        }
        let (a, b) = l.coefficients();
        assert!((a - 4.0).abs() < 1e-6 && (b - 0.5).abs() < 1e-9, "{a} {b}");
        // A new regime takes over as old samples decay.
        for _ in 0..200 {
            for x in [0.0, 400.0] {
                l.observe(x, 40.0 + 0.1 * x);
            }
        }
        let (a, b) = l.coefficients();
        assert!((a - 40.0).abs() < 0.5 && (b - 0.1).abs() < 0.01, "{a} {b}");
        // A fit whose intercept would be negative goes through the origin instead.
        let mut l = Line::seeded(10.0, 1.0);
        for (x, y) in [(1000.0, 100.0), (2000.0, 300.0), (3000.0, 500.0), (4000.0, 700.0)] {
            l.observe(x, y);
        }
        assert_eq!(l.coefficients().0, 0.0);
        assert!(l.at(10.0) > 0.0);
    }

    #[test]
    fn prefill_work_queues_tokens_until_dropped() {
        let e = EngineLatency::new(&Timing::linear(1000.0, 1.0));
        let before = e.prefill_ms(100);
        let work = e.start_prefill(300);
        assert_eq!((work.ahead, e.queued_tokens()), (300, 300));
        assert!(e.prefill_ms(100) > before + 299.0, "the queued 300 tokens are ahead of the next prompt");
        drop(work);
        assert_eq!(e.queued_tokens(), 0);
        assert!(e.prefill_step_ms(10_000) <= e.prefill_step_ms(PREFILL_CHUNK_TOKENS) + 1e-9);
    }
}
