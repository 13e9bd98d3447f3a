//! How long a simulated engine step takes. A step prefills some new tokens (chunked under
//! --max-num-batched-tokens; prompt tokens found in the prefix cache cost nothing) and
//! decodes one token for every running sequence:
//!
//!   step ms = prefill + decode(u, n)          (each part only when the step has that work)
//!   prefill = p0 + Σ (p1·t + p2·t²)          t = new tokens of each sequence prefilled in
//!                                            the step (attention is quadratic within a
//!                                            sequence, not across the batch)
//!   decode(u, n) = max(min, d0 + d1·u + d2·u² + s·n)   u = KV-cache usage (0..1), n = sequences
//!
//! The built-in profile `mocker` is the polynomial of NVIDIA Dynamo's mocker engine
//! (prefill 4.209989e-07·T² + 1.518344e-02·T + 16.50142 ms; decode
//! −25.74·u² + 54.01·u + 5.74 ms, at least 1 ms): a published engine profile, not a
//! measurement of ours. `disagg fit-timing` fits a profile to `disagg bench` runs against
//! a real engine. Without a profile the legacy knobs apply (--prefill-ms-per-1k-tokens,
//! --decode-ms-per-token), which default to zero. --speedup divides every step's time.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct Timing {
    /// p0, p1, p2 (ms).
    pub(crate) prefill_ms: [f64; 3],
    /// d0, d1, d2 (ms).
    pub(crate) decode_ms: [f64; 3],
    /// s (ms per running sequence).
    #[serde(default)]
    pub(crate) decode_ms_per_seq: f64,
    /// Floor of a decode step (ms).
    #[serde(default)]
    pub(crate) decode_min_ms: f64,
    /// Where the coefficients come from.
    #[serde(default)]
    pub(crate) source: String,
}

impl Timing {
    /// The legacy knobs: linear prefill, constant decode.
    pub(crate) fn linear(prefill_ms_per_1k: f64, decode_ms_per_token: f64) -> Self {
        Timing {
            prefill_ms: [0.0, prefill_ms_per_1k / 1000.0, 0.0],
            decode_ms: [decode_ms_per_token, 0.0, 0.0],
            decode_ms_per_seq: 0.0,
            decode_min_ms: 0.0,
            source: "flags".into(),
        }
    }

    /// NVIDIA Dynamo's mocker polynomial.
    pub(crate) fn mocker() -> Self {
        Timing {
            prefill_ms: [16.50142, 1.518344e-02, 4.209989e-07],
            decode_ms: [5.74, 54.01, -25.74],
            decode_ms_per_seq: 0.0,
            decode_min_ms: 1.0,
            source: "NVIDIA Dynamo mocker polynomial (published coefficients)".into(),
        }
    }

    /// A profile by built-in name or from a JSON file.
    pub(crate) fn load(spec: &str) -> Result<Self, String> {
        if spec == "mocker" {
            return Ok(Timing::mocker());
        }
        let text = std::fs::read_to_string(spec).map_err(|e| format!("--timing-profile {spec}: {e} (or use the built-in `mocker`)"))?;
        serde_json::from_str(&text).map_err(|e| format!("--timing-profile {spec}: not a timing profile: {e}"))
    }

    /// One sequence prefilling `tokens` new tokens alone in a step.
    #[cfg(test)]
    pub(crate) fn prefill(&self, tokens: usize) -> f64 {
        self.prefill_chunks([tokens])
    }

    /// A step prefilling these chunks (new tokens per sequence).
    pub(crate) fn prefill_chunks(&self, chunks: impl IntoIterator<Item = usize>) -> f64 {
        let [p0, p1, p2] = self.prefill_ms;
        let (mut any, mut cost) = (false, p0);
        for t in chunks.into_iter().filter(|t| *t > 0) {
            let t = t as f64;
            any = true;
            cost += p1 * t + p2 * t * t;
        }
        if any {
            cost.max(0.0)
        } else {
            0.0
        }
    }

    pub(crate) fn decode(&self, usage: f64, seqs: usize) -> f64 {
        if seqs == 0 {
            return 0.0;
        }
        let [d0, d1, d2] = self.decode_ms;
        (d0 + d1 * usage + d2 * usage * usage + self.decode_ms_per_seq * seqs as f64).max(self.decode_min_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mocker_profile_is_dynamos_polynomial() {
        let m = Timing::mocker();
        assert!((m.prefill(1000) - (4.209989e-07 * 1e6 + 1.518344e-02 * 1e3 + 16.50142)).abs() < 1e-9);
        assert_eq!(m.prefill(0), 0.0);
        // Four prompts in one step: one step's overhead, each prompt's own attention.
        let four = m.prefill_chunks([250, 250, 250, 250]);
        assert!((four - (16.50142 + 4.0 * (4.209989e-07 * 62_500.0 + 1.518344e-02 * 250.0))).abs() < 1e-9);
        assert!((m.decode(0.5, 3) - (-25.74 * 0.25 + 54.01 * 0.5 + 5.74)).abs() < 1e-9);
        assert_eq!(m.decode(0.5, 0), 0.0);
        let flags = Timing::linear(10.0, 2.0);
        assert_eq!((flags.prefill(500), flags.decode(0.9, 4)), (5.0, 2.0));
    }

    #[test]
    fn profiles_round_trip_through_json() {
        let m = Timing::mocker();
        let back: Timing = serde_json::from_str(&serde_json::to_string(&m).unwrap()).unwrap();
        assert_eq!(back, m);
        assert!(Timing::load("/no/such/file").unwrap_err().contains("mocker"));
    }
}
