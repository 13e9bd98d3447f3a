//! kv_aware checks itself: the cached tokens it predicted for the rank it chose, against
//! what the engine reports in `usage.prompt_tokens_details.cached_tokens` (vLLM's
//! `--enable-prompt-tokens-details`), counted in `disagg_router_kv_aware_total{outcome}`
//! and, when they drift, a warning naming the likely causes. A whole answer's usage is read
//! from its body; a stream's from its last usage chunk (sent when the client asks for
//! `stream_options.include_usage`), which the relay keeps the last few chunks to find.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::router::metrics::{KvAwareOutcome, RouterMetrics};
use crate::router::policy::KvView;
use crate::router::policy::WorkerRank;

/// What vLLM reports as cached for a prompt of `tokens` when `held` of its full blocks are
/// in the cache: full blocks only, and never the last token (it is always computed).
pub(crate) fn predicted(tokens: usize, held: usize, block_size: usize) -> usize {
    if block_size == 0 || tokens == 0 {
        return 0;
    }
    held.min((tokens - 1) / block_size) * block_size
}

/// The cached tokens predicted for an answer, to check against what it reports.
pub(crate) struct Prediction {
    holder: WorkerRank,
    want: usize,
}

/// The prediction for a successful answer whose prompt cache was `cache_from`'s.
pub(crate) fn predict(kv: &KvView, cache_from: Option<&WorkerRank>, answered_ok: bool) -> Option<Prediction> {
    let holder = cache_from?.clone();
    if !answered_ok || kv.tokens == 0 {
        return None;
    }
    let want = predicted(kv.tokens, kv.held.get(&holder).copied().unwrap_or(0), kv.block_size);
    Some(Prediction { holder, want })
}

impl Prediction {
    /// The cached tokens predicted.
    pub(crate) fn want(&self) -> usize {
        self.want
    }

    pub(crate) fn check(&self, metrics: &RouterMetrics, got: Option<usize>) {
        let want = self.want;
        let outcome = match got {
            None => KvAwareOutcome::Unreported,
            Some(g) if g == want => KvAwareOutcome::PredictedExact,
            Some(g) if g < want => KvAwareOutcome::PredictedMore,
            Some(_) => KvAwareOutcome::PredictedLess,
        };
        metrics.kv_aware(outcome);
        if let Some(got) = got.filter(|g| *g != want) {
            warn_drift(&self.holder.url, self.holder.rank, want, got);
        }
    }
}

/// At most one drift warning every 10 s.
fn warn_drift(url: &str, rank: usize, want: usize, got: usize) {
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let last = LAST.load(Ordering::Relaxed);
    if now < last + 10 || LAST.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_err() {
        return;
    }
    let why = if got < want {
        "the engine holds less than its events said: BlockRemoved events missed, or the prompt's tokens differ from the engine's \
         (tokenizer or chat template not the model's: --model-path, or a block size that differs)"
    } else {
        "the engine holds more than the index knows: events lost before the router subscribed, or the prompt's tokens differ \
         from the engine's (--model-path's tokenizer or chat template)"
    };
    tracing::warn!(
        worker = url,
        rank,
        predicted = want,
        reported = got,
        "kv_aware: cached tokens drift from the prediction; likely: {why}"
    );
}

#[cfg(test)]
mod tests {
    use super::predicted;
    use crate::api::dialect::Dialect;
    use crate::api::usage;

    fn reported_whole(b: &[u8], d: Dialect) -> Option<u64> {
        usage::whole(b, d).cached
    }
    fn reported_in_stream(b: &[u8], d: Dialect) -> Option<u64> {
        usage::in_stream(b, d).cached
    }
    use crate::api::dialect::Dialect::{Anthropic, OpenAi};

    #[test]
    fn usage_is_read_from_a_whole_answer_and_from_a_streams_last_usage_chunk() {
        let whole = br#"{"id":"x","usage":{"prompt_tokens":70,"prompt_tokens_details":{"cached_tokens":64}}}"#;
        assert_eq!(reported_whole(whole, OpenAi), Some(64));
        assert_eq!(reported_whole(br#"{"usage":{"prompt_tokens":70}}"#, OpenAi), None);
        let stream = b"data: {\"choices\":[],\"usage\":{\"prompt_tokens_details\":{\"cached_tokens\":16}}}\n\n\
                       data: {\"choices\":[],\"usage\":{\"prompt_tokens_details\":{\"cached_tokens\": 48}}}\n\ndata: [DONE]\n\n";
        assert_eq!(reported_in_stream(stream, OpenAi), Some(48), "the last usage counts");
        assert_eq!(reported_in_stream(b"data: {\"usage\":{\"prompt_tokens_details\":null}}\n\ndata: [DONE]", OpenAi), None);
        assert_eq!(reported_in_stream(b"\"cached_tokens\":", OpenAi), None, "cut off: nothing to read");
        // Anthropic's usage, as vLLM writes it: cached input apart from the rest.
        let message = br#"{"type":"message","usage":{"input_tokens":6,"output_tokens":2,"cache_read_input_tokens":64}}"#;
        assert_eq!(reported_whole(message, Anthropic), Some(64));
        assert_eq!(reported_whole(message, OpenAi), None);
        let events =
            b"event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"input_tokens\":6,\"cache_read_input_tokens\":32}}\n\n\
                       event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";
        assert_eq!(reported_in_stream(events, Anthropic), Some(32));
        assert_eq!(reported_in_stream(events, OpenAi), None);
    }

    #[test]
    fn the_last_token_is_never_cached_and_only_full_blocks_count() {
        assert_eq!(predicted(67, 4, 16), 64);
        assert_eq!(predicted(64, 4, 16), 48, "a prompt of exactly 4 blocks computes its last token");
        assert_eq!(predicted(67, 2, 16), 32);
        assert_eq!(predicted(10, 0, 16), 0);
        assert_eq!(predicted(0, 3, 16), 0);
    }
}
