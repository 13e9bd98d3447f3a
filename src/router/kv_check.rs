//! kv_aware checks itself: the cached tokens it predicted for the rank it chose, against
//! what the engine reports in `usage.prompt_tokens_details.cached_tokens` (vLLM's
//! `--enable-prompt-tokens-details`), counted in `disagg_router_kv_aware_total{outcome}`
//! and, when they drift, a warning naming the likely causes. Non-streamed answers only
//! (a stream's usage comes in its last chunk, which the relay does not read).

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Deserialize;

use super::flow::Router;
use super::legs::StartedBody;
use super::pair::Answer;
use super::policy::KvView;

#[derive(Deserialize)]
struct Reported {
    usage: Option<Usage>,
}
#[derive(Deserialize)]
struct Usage {
    prompt_tokens_details: Option<Details>,
}
#[derive(Deserialize)]
struct Details {
    cached_tokens: Option<usize>,
}

/// What vLLM reports as cached for a prompt of `tokens` when `held` of its full blocks are
/// in the cache: full blocks only, and never the last token (it is always computed).
pub fn predicted(tokens: usize, held: usize, block_size: usize) -> usize {
    if block_size == 0 || tokens == 0 {
        return 0;
    }
    held.min((tokens - 1) / block_size) * block_size
}

pub fn check(router: &Router, kv: &KvView, answer: &Answer) {
    let (Some(holder), StartedBody::Whole(body)) = (&answer.cache_from, &answer.started.body) else { return };
    if !answer.started.status.is_success() || kv.tokens == 0 {
        return;
    }
    let want = predicted(kv.tokens, kv.held.get(holder).copied().unwrap_or(0), kv.block_size);
    let got = serde_json::from_slice::<Reported>(body).ok().and_then(|r| r.usage?.prompt_tokens_details?.cached_tokens);
    let outcome = match got {
        None => "unreported",
        Some(g) if g == want => "predicted_exact",
        Some(g) if g < want => "predicted_more",
        Some(_) => "predicted_less",
    };
    router.metrics.kv_aware(outcome);
    if let Some(got) = got.filter(|g| *g != want) {
        warn_drift(&holder.url, holder.rank, want, got);
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
    tracing::warn!(worker = url, rank, predicted = want, reported = got, "kv_aware: cached tokens drift from the prediction; likely: {why}");
}

#[cfg(test)]
mod tests {
    use super::predicted;

    #[test]
    fn the_last_token_is_never_cached_and_only_full_blocks_count() {
        assert_eq!(predicted(67, 4, 16), 64);
        assert_eq!(predicted(64, 4, 16), 48, "a prompt of exactly 4 blocks computes its last token");
        assert_eq!(predicted(67, 2, 16), 32);
        assert_eq!(predicted(10, 0, 16), 0);
        assert_eq!(predicted(0, 3, 16), 0);
    }
}
