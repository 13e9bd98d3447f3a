//! kv_aware on the APIs beyond completions and chat, on simulators that publish vLLM's KV
//! events: `/inference/v1/generate` keyed by its token ids, Anthropic's Messages and
//! OpenAI's Responses keyed by the engines' own render endpoints; each conversation's next
//! turn goes where its blocks are, and every prediction equals the cached tokens reported.

use std::time::Duration;

use serde_json::json;

use crate::kv_aware::{hits, indexed, kv_aware_router, prompt, publishing_sim_with, BLOCK};
use crate::support::*;

/// `/inference/v1/generate` is keyed by its own `token_ids`: second turns land where their
/// first turns' blocks are, and the predictions equal the engines' cached tokens.
#[tokio::test]
async fn generate_requests_are_keyed_by_their_token_ids() {
    let p1 = publishing_sim_with("prefill", 1, &["--enable-scale-out"]).await;
    let p2 = publishing_sim_with("prefill", 1, &["--enable-scale-out"]).await;
    let d =
        Proc::sim(&["--role", "decode", "--block-size", &BLOCK.to_string(), "--enable-prompt-tokens-details", "--enable-scale-out"]).await;
    let r = kv_aware_router(&p1, &p2, &d).await;
    let url = r.url.clone();
    let generate =
        |tag: u32, tail: &[u32]| json!({"token_ids": prompt(tag, 4, tail), "sampling_params": {"max_tokens": 2, "ignore_eos": true}});
    for tag in 0..4 {
        let (status, v) = post(&format!("{url}/inference/v1/generate"), &generate(tag, &[1, 2, 3])).await;
        assert_eq!(status, 200, "{v}");
    }
    assert!(
        eventually(Duration::from_secs(5), || async { indexed(&url).await.iter().map(|(_, _, n)| n).sum::<u64>() >= 16 }).await,
        "{:?}",
        indexed(&url).await
    );
    let before = hits(&p1, 0).await + hits(&p2, 0).await;
    for tag in [2, 0, 3, 1] {
        let (status, v) = post(&format!("{url}/inference/v1/generate"), &generate(tag, &[4, 5, 6, 7])).await;
        assert_eq!(status, 200, "{v}");
    }
    let after = hits(&p1, 0).await + hits(&p2, 0).await;
    assert_eq!(after - before, (4 * 4 * BLOCK) as f64, "every second turn found its whole prefix on the prefill it was sent to");
    let m = metrics(&url).await;
    assert_eq!(metric(&m, "disagg_router_kv_aware_total", &[("outcome", "predicted_exact")]), 8.0, "{m}");
    assert_idle(&r.url).await;
}

/// Anthropic's Messages are keyed by the engines' own /v1/messages/render (vLLM converts
/// them with its own code): a conversation's next turn goes where its first turn's blocks
/// are, streamed or not, and the predictions equal the cached tokens the answers report
/// (`usage.cache_read_input_tokens`).
#[tokio::test]
async fn messages_are_keyed_by_the_engines_render_and_predicted_exactly() {
    let p1 = publishing_sim_with("prefill", 1, &["--enable-scale-out"]).await;
    let p2 = publishing_sim_with("prefill", 1, &["--enable-scale-out"]).await;
    let d = Proc::sim(&["--role", "decode", "--block-size", &BLOCK.to_string(), "--enable-prompt-tokens-details"]).await;
    let r = kv_aware_router(&p1, &p2, &d).await;
    let url = r.url.clone();
    let first = |tag: usize| {
        let story: String = (0..60).map(|i| format!("conversation {tag} line {i} says something new. ")).collect();
        vec![json!({"role": "user", "content": story})]
    };
    for tag in 0..4 {
        let body = json!({"model": "sim-model", "max_tokens": 3, "system": "Be brief.", "messages": first(tag)});
        let (status, v) = post(&format!("{url}/v1/messages"), &body).await;
        assert_eq!(status, 200, "{v}");
    }
    assert!(
        eventually(Duration::from_secs(5), || async { indexed(&url).await.iter().map(|(_, _, n)| n).sum::<u64>() >= 40 }).await,
        "{:?}",
        indexed(&url).await
    );
    let before = hits(&p1, 0).await + hits(&p2, 0).await;
    for tag in [2, 0, 3, 1] {
        let mut turns = first(tag);
        turns.push(json!({"role": "assistant", "content": "Noted."}));
        turns.push(json!({"role": "user", "content": "And then?"}));
        let body = json!({"model": "sim-model", "max_tokens": 3, "system": "Be brief.", "messages": turns, "stream": tag % 2 == 0});
        if tag % 2 == 0 {
            let (status, events) = post_stream(&format!("{url}/v1/messages"), &body).await;
            assert_eq!(status, 200, "{events:?}");
        } else {
            let (status, v) = post(&format!("{url}/v1/messages"), &body).await;
            assert_eq!(status, 200, "{v}");
        }
    }
    let after = hits(&p1, 0).await + hits(&p2, 0).await;
    assert!(after - before >= (4 * 40) as f64, "every second turn found its first turn's blocks: {before} -> {after}");
    let m = metrics(&url).await;
    assert_eq!(metric(&m, "disagg_router_kv_aware_total", &[("outcome", "predicted_exact")]), 8.0, "{m}");
    assert_eq!(metric(&m, "disagg_router_kv_aware_total", &[]), 8.0, "no other outcome");
    assert_idle(&r.url).await;
}

/// OpenAI's Responses chained by `previous_response_id` are keyed by the engines' own
/// /v1/responses/render with the history the router writes in: each next turn goes where
/// its conversation's blocks are, streamed or not, and the predictions equal the cached
/// tokens the answers report (`usage.input_tokens_details.cached_tokens`).
#[tokio::test]
async fn chained_responses_are_keyed_by_the_engines_render_and_predicted_exactly() {
    let p1 = publishing_sim_with("prefill", 1, &["--enable-scale-out"]).await;
    let p2 = publishing_sim_with("prefill", 1, &["--enable-scale-out"]).await;
    let d = Proc::sim(&["--role", "decode", "--block-size", &BLOCK.to_string(), "--enable-prompt-tokens-details"]).await;
    let r = kv_aware_router(&p1, &p2, &d).await;
    let url = format!("{}/v1/responses", r.url);
    let mut ids = Vec::new();
    for tag in 0..4 {
        let story: String = (0..60).map(|i| format!("conversation {tag} line {i} says something new. ")).collect();
        let body = json!({"model": "sim-model", "max_output_tokens": 3, "instructions": "Be brief.", "input": story});
        let (status, v) = post(&url, &body).await;
        assert_eq!(status, 200, "{v}");
        ids.push(v["id"].clone());
    }
    assert!(
        eventually(Duration::from_secs(5), || async { indexed(&r.url).await.iter().map(|(_, _, n)| n).sum::<u64>() >= 40 }).await,
        "{:?}",
        indexed(&r.url).await
    );
    let before = hits(&p1, 0).await + hits(&p2, 0).await;
    for tag in [2, 0, 3, 1] {
        let body = json!({"model": "sim-model", "max_output_tokens": 3, "instructions": "Be brief.", "input": "And then?",
                          "previous_response_id": ids[tag], "stream": tag % 2 == 0});
        if tag % 2 == 0 {
            let (status, events) = post_stream(&url, &body).await;
            assert_eq!(status, 200, "{events:?}");
            assert!(events.iter().any(|e| e.contains("response.completed")), "{events:?}");
        } else {
            let (status, v) = post(&url, &body).await;
            assert_eq!(status, 200, "{v}");
        }
    }
    let after = hits(&p1, 0).await + hits(&p2, 0).await;
    assert!(after - before >= (4 * 40) as f64, "every second turn found its first turn's blocks: {before} -> {after}");
    let m = metrics(&r.url).await;
    assert_eq!(metric(&m, "disagg_router_kv_aware_total", &[("outcome", "predicted_exact")]), 8.0, "{m}");
    assert_eq!(metric(&m, "disagg_router_kv_aware_total", &[]), 8.0, "no other outcome");
    assert_idle(&r.url).await;
}
