//! The failure contract (docs/FAILURES.md), one test per line, with the sim's fault
//! knobs and real process deaths. Every test ends with the router idle: nothing in
//! flight, no permit held, no one queued.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::capture::Capture;
use crate::support::*;

fn body(prompt: &str) -> Value {
    json!({"prompt": prompt, "max_tokens": 4, "ignore_eos": true})
}

fn sbody(prompt: &str, max_tokens: u32) -> Value {
    json!({"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": true, "stream": true})
}

async fn leg_errors(router: &str, leg: &str, kind: &str) -> f64 {
    metric(&metrics(router).await, "disagg_router_leg_errors_total", &[("leg", leg), ("kind", kind)])
}

async fn retries(router: &str, leg: &str) -> f64 {
    metric(&metrics(router).await, "disagg_router_retries_total", &[("leg", leg)])
}

async fn errors(router: &str, cause: &str) -> f64 {
    metric(&metrics(router).await, "disagg_router_errors_total", &[("cause", cause)])
}

#[tokio::test]
async fn prefill_connect_error_retries_on_another_prefill() {
    let mut p1 = Proc::sim(&["--role", "prefill"]).await;
    let p2 = Proc::sim(&["--role", "prefill"]).await;
    let d = Proc::sim(&["--role", "decode"]).await;
    // Slow health checks: the dead prefill is found by a request, not by a check.
    let r = router(&[
        "--health-check-interval-secs",
        "60",
        "--policy",
        "round_robin",
        "--prefill",
        &p1.url,
        "--prefill",
        &p2.url,
        "--decode",
        &d.url,
    ])
    .await;
    p1.kill();
    p1.wait_exit(Duration::from_secs(5)).await;
    for i in 0..4 {
        let (status, v) = post(&format!("{}/v1/completions", r.url), &body(&format!("c{i}"))).await;
        assert_eq!(status, 200, "{v}");
    }
    assert_eq!(leg_errors(&r.url, "prefill", "connect").await, 1.0, "marked down at once: tried only once");
    assert_eq!(retries(&r.url, "prefill").await, 1.0);
    assert_eq!(workers(&r.url).await["workers"][0]["healthy"], false);
    assert_eq!(served(&p2.url).await, 4.0);
    assert_idle(&r.url).await;
}

#[tokio::test]
async fn prefill_5xx_retries_then_502_naming_the_leg() {
    let bad = Proc::sim(&["--role", "prefill", "--fail-rate", "1"]).await;
    let good = Proc::sim(&["--role", "prefill"]).await;
    let d = Proc::sim(&["--role", "decode"]).await;
    let r = router(&["--policy", "round_robin", "--prefill", &bad.url, "--prefill", &good.url, "--decode", &d.url]).await;
    for i in 0..4 {
        assert_eq!(post(&format!("{}/v1/completions", r.url), &body(&format!("f{i}"))).await.0, 200);
    }
    // Its /health is fine, so it stays in rotation; round robin hands each request to it
    // first (the retry's pick advances the turn too), and each is retried on the good one.
    assert_eq!(leg_errors(&r.url, "prefill", "5xx").await, 4.0);
    assert_eq!(retries(&r.url, "prefill").await, 4.0);

    let bad2 = Proc::sim(&["--role", "prefill", "--fail-rate", "1", "--fail-status", "503"]).await;
    let all_bad = router(&["--prefill", &bad.url, "--prefill", &bad2.url, "--decode", &d.url]).await;
    let (status, v) = post(&format!("{}/v1/completions", all_bad.url), &body("x")).await;
    assert_eq!(status, 502, "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        ["prefill leg failed: the worker answered HTTP 500", "prefill leg failed: the worker answered HTTP 503"].contains(&msg),
        "no worker address, no upstream text: {msg}"
    );
    assert_eq!(v["error"]["type"], "BadGatewayError");
    assert_eq!(served(&d.url).await, 4.0, "no decode was sent for the failed request");
    assert_idle(&r.url).await;
    assert_idle(&all_bad.url).await;
}

#[tokio::test]
async fn prefill_timeout_retries_and_cancels_the_slow_one() {
    let slow = Proc::sim(&["--role", "prefill", "--hang-after-tokens", "0"]).await;
    let ok = Proc::sim(&["--role", "prefill"]).await;
    let d = Proc::sim(&["--role", "decode"]).await;
    let r = router(&[
        "--request-timeout-secs",
        "0.5",
        "--policy",
        "round_robin",
        "--prefill",
        &slow.url,
        "--prefill",
        &ok.url,
        "--decode",
        &d.url,
    ])
    .await;
    let t = Instant::now();
    for i in 0..2 {
        assert_eq!(post(&format!("{}/v1/completions", r.url), &body(&format!("t{i}"))).await.0, 200);
    }
    assert!(t.elapsed() >= Duration::from_millis(2 * 500));
    assert_eq!(leg_errors(&r.url, "prefill", "timeout").await, 2.0);
    // The slow prefill saw its request dropped: nothing runs or stays allocated there.
    assert!(
        eventually(Duration::from_secs(5), || async {
            let m = metrics(&slow.url).await;
            metric(&m, "vllm:num_requests_running", &[]) == 0.0 && metric(&m, "vllm:kv_cache_usage_perc", &[]) == 0.0
        })
        .await
    );
    assert_idle(&r.url).await;
}

#[tokio::test]
async fn prefill_4xx_is_returned_as_is() {
    let p = Proc::sim(&["--role", "prefill", "--max-model-len", "64"]).await;
    let d = Proc::sim(&["--role", "decode", "--max-model-len", "64"]).await;
    let r = router(&["--prefill", &p.url, "--decode", &d.url]).await;
    let bad = json!({"prompt": "x", "max_tokens": 1, "stop": 5});
    let (direct_status, direct) = post(&format!("{}/v1/completions", p.url), &bad).await;
    let (status, routed) = post(&format!("{}/v1/completions", r.url), &bad).await;
    assert_eq!((status, &routed), (direct_status, &direct));
    assert_eq!(status, 400);
    assert_eq!(leg_errors(&r.url, "prefill", "4xx").await, 1.0);
    assert_eq!(retries(&r.url, "prefill").await, 0.0, "a client error is not retried");
    // The decode's 4xx too: the prefill accepts 100 output tokens (it is sent max_tokens 1).
    let (status, v) = post(&format!("{}/v1/completions", r.url), &json!({"prompt": "x", "max_tokens": 100})).await;
    assert_eq!(status, 400, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("max_model_len=64"), "{v}");
    assert_idle(&r.url).await;
}

/// Finding 3 of the hardening issue: a decode failing before it took the request used to
/// re-run the whole pair on a new prefill and strand the first prefill's KV for its lease.
#[tokio::test]
async fn decode_failure_before_its_engine_retries_the_same_kv_on_another_decode() {
    let p1 = Proc::sim(&["--role", "prefill"]).await;
    let p2 = Proc::sim(&["--role", "prefill"]).await;
    let bad = Proc::sim(&["--role", "decode", "--fail-rate", "1"]).await;
    let mut dead = Proc::sim(&["--role", "decode"]).await;
    let good = Proc::sim(&["--role", "decode"]).await;
    let r =
        router(&["--policy", "round_robin", "--prefill", &p1.url, "--prefill", &p2.url, "--decode", &bad.url, "--decode", &good.url]).await;
    for i in 0..3 {
        let (status, v) = post(&format!("{}/v1/completions", r.url), &body(&format!("d{i}"))).await;
        assert_eq!(status, 200, "{v}");
        let (status, events) = post_stream(&format!("{}/v1/completions", r.url), &sbody(&format!("s{i}"), 3)).await;
        assert_eq!(status, 200);
        assert_eq!(events.last().unwrap(), "[DONE]");
    }
    assert_eq!(leg_errors(&r.url, "decode", "5xx").await, retries(&r.url, "decode").await);
    assert!(retries(&r.url, "decode").await >= 3.0);
    assert_eq!(retries(&r.url, "pair").await, 0.0, "no new prefill for a decode that never took the KV");
    assert_eq!(served(&good.url).await, 6.0);
    assert_eq!(served(&p1.url).await + served(&p2.url).await, 6.0, "one prefill per request");
    // Every prefill's KV was pulled: nothing waits for its lease.
    for p in [&p1, &p2] {
        let m = metrics(&p.url).await;
        assert_eq!(metric(&m, "disagg_sim_kv_blocks_held", &[]), 0.0, "{m}");
        assert_eq!(metric(&m, "disagg_sim_kv_transfers_total", &[("direction", "sent")]), served(&p.url).await);
    }
    // A decode that dies: refused once, marked down, the same KV sent to the other decode.
    let dr = router(&["--health-check-interval-secs", "60", "--prefill", &p1.url, "--decode", &dead.url, "--decode", &good.url]).await;
    dead.kill();
    dead.wait_exit(Duration::from_secs(5)).await;
    for i in 0..4 {
        assert_eq!(post(&format!("{}/v1/completions", dr.url), &body(&format!("x{i}"))).await.0, 200);
    }
    assert_eq!(leg_errors(&dr.url, "decode", "connect").await, 1.0, "the dead decode is down after one try");
    assert_eq!(retries(&dr.url, "pair").await, 0.0);
    assert_eq!(workers(&dr.url).await["workers"][1]["healthy"], false);
    assert_idle(&dr.url).await;
    // A single failing decode is never sent the same KV again (vLLM's decode can die on
    // params it failed to load): the pair runs again once, then the client hears which leg.
    let lone = router(&["--prefill", &p1.url, "--decode", &bad.url]).await;
    let before = served(&p1.url).await;
    let (status, v) = post(&format!("{}/v1/completions", lone.url), &body("lone")).await;
    assert_eq!(status, 502);
    assert_eq!(v["error"]["message"], "decode leg failed: the worker answered HTTP 500", "{v}");
    assert_eq!(retries(&lone.url, "decode").await, 0.0);
    assert_eq!(retries(&lone.url, "pair").await, 1.0);
    assert_eq!(served(&p1.url).await - before, 2.0);
    assert_idle(&r.url).await;
    assert_idle(&lone.url).await;
}

#[tokio::test]
async fn decode_stream_opening_with_an_error_sends_the_same_kv_to_another_decode() {
    let (purl, _p) = Capture::default().start().await;
    let (bad_url, _bad) = Capture { stream_error_first: true, ..Capture::default() }.start().await;
    let (good_url, good) = Capture::default().start().await;
    let r = router(&["--policy", "round_robin", "--prefill", &purl, "--decode", &bad_url, "--decode", &good_url]).await;
    for i in 0..2 {
        let (status, events) = post_stream(&format!("{}/v1/completions", r.url), &sbody(&format!("e{i}"), 2)).await;
        assert_eq!(status, 200);
        assert!(events.iter().all(|e| !e.contains("\"error\"")), "{events:?}");
        assert_eq!(events.last().unwrap(), "[DONE]");
    }
    assert_eq!(good.prompts().len(), 2);
    assert_eq!(leg_errors(&r.url, "decode", "error_event").await, 2.0, "each request met the bad decode first");
    assert_eq!(retries(&r.url, "decode").await, 2.0, "the same KV went to the other decode");
    assert_idle(&r.url).await;
}

async fn assert_error_ending(events: &[String]) {
    assert!(events.len() >= 3, "{events:?}");
    assert_eq!(events.last().unwrap(), "[DONE]");
    let err: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(err["error"]["code"], 502, "{err}");
    assert!(err["error"]["message"].as_str().unwrap().contains("decode leg failed mid-stream"));
    for e in &events[..events.len() - 2] {
        let v: Value = serde_json::from_str(e).unwrap();
        assert!(v["choices"][0]["finish_reason"].is_null(), "no chunk claims a normal finish: {e}");
    }
}

#[tokio::test]
async fn decode_death_mid_stream_ends_with_an_error_event() {
    let p = Proc::sim(&["--role", "prefill"]).await;
    let mut d = Proc::sim(&["--role", "decode", "--crash-after-requests", "0"]).await;
    let r = router(&["--prefill", &p.url, "--decode", &d.url]).await;
    let (resp, first) = open_stream(&format!("{}/v1/completions", r.url), &sbody("die", 1000)).await;
    let events = rest_of(resp, first).await;
    assert_error_ending(&events).await;
    assert!(d.wait_exit(Duration::from_secs(5)).await.is_some());
    assert_eq!(errors(&r.url, "decode_midstream").await, 1.0);
    assert_idle(&r.url).await;
}

#[tokio::test]
async fn decode_silence_mid_stream_times_out_into_an_error_event() {
    let p = Proc::sim(&["--role", "prefill"]).await;
    let d = Proc::sim(&["--role", "decode", "--hang-after-tokens", "3"]).await;
    let r = router(&["--stream-idle-timeout-secs", "0.5", "--prefill", &p.url, "--decode", &d.url]).await;
    let (status, events) = post_stream(&format!("{}/v1/completions", r.url), &sbody("quiet", 50)).await;
    assert_eq!(status, 200);
    assert_error_ending(&events).await;
    assert!(events[events.len() - 2].contains("no data for"));
    // The router dropped the stalled request, so the decode freed it.
    assert!(eventually(Duration::from_secs(5), || async { metric(&metrics(&d.url).await, "vllm:num_requests_running", &[]) == 0.0 }).await);
    assert_idle(&r.url).await;
}

#[tokio::test]
async fn stream_without_done_is_reported() {
    let (purl, _p) = Capture::default().start().await;
    let (durl, _d) = Capture { no_done: true, ..Capture::default() }.start().await;
    let r = router(&["--prefill", &purl, "--decode", &durl]).await;
    let (_, events) = post_stream(&format!("{}/v1/completions", r.url), &sbody("cut", 3)).await;
    assert_eq!(events.last().unwrap(), "[DONE]");
    assert!(events[events.len() - 2].contains("ended without [DONE]"), "{events:?}");
    assert_idle(&r.url).await;
}

#[tokio::test]
async fn client_leaving_mid_stream_cancels_the_decode() {
    let p = Proc::sim(&["--role", "prefill"]).await;
    let d = Proc::sim(&["--role", "decode", "--decode-ms-per-token", "10"]).await;
    let r = router(&["--prefill", &p.url, "--decode", &d.url]).await;
    let (resp, _) = open_stream(&format!("{}/v1/completions", r.url), &sbody("bye", 3000)).await;
    assert_eq!(metric(&metrics(&d.url).await, "vllm:num_requests_running", &[]), 1.0);
    drop(resp);
    assert!(
        eventually(Duration::from_secs(5), || async {
            let m = metrics(&d.url).await;
            metric(&m, "vllm:num_requests_running", &[]) == 0.0 && metric(&m, "vllm:kv_cache_usage_perc", &[]) == 0.0
        })
        .await
    );
    assert!(metric(&metrics(&d.url).await, "vllm:generation_tokens_total", &[]) < 3000.0);
    assert_eq!(metric(&metrics(&p.url).await, "disagg_sim_kv_blocks_held", &[]), 0.0);
    assert_idle(&r.url).await;
    assert_eq!(errors(&r.url, "client_disconnect").await, 1.0);
}

/// A client that leaves during a long prefill: the prefill runs on to its answer (an abort
/// could come after vLLM finished it, stranding its KV), holding the request's admission
/// permit meanwhile; then the decode leg takes the KV and is dropped.
#[tokio::test]
async fn client_leaving_during_prefill_runs_it_on_then_the_decode_frees_its_kv() {
    // ~600 prompt tokens at 5 s per 1000: the prefill takes ~3 s.
    let p = Proc::sim(&["--role", "prefill", "--prefill-ms-per-1k-tokens", "5000", "--kv-lease-secs", "60"]).await;
    let d = Proc::sim(&["--role", "decode"]).await;
    let r = router(&["--prefill", &p.url, "--decode", &d.url]).await;
    let prompt: String = (0..600).map(|i| format!(" w{i}")).collect();
    let url = format!("{}/v1/completions", r.url);
    let req = tokio::spawn(async move { client().post(url).json(&body(&prompt)).send().await });
    assert!(eventually(Duration::from_secs(5), || async { metric(&metrics(&p.url).await, "vllm:num_requests_running", &[]) == 1.0 }).await);
    req.abort();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let m = metrics(&p.url).await;
    assert_eq!(metric(&m, "vllm:num_requests_running", &[]), 1.0, "the prefill still runs after the client left");
    assert_eq!(workers(&r.url).await["permits_in_use"], 1, "its admission permit is still held");
    kv_pulled_by_an_abandoned_decode(&p, &r, Duration::from_secs(10)).await;
}

/// Real vLLM finishes a prefill (and holds its KV for a decode) a few milliseconds before
/// it answers. A client that leaves in that window must not strand the KV: the prefill
/// answers, then the decode leg is sent and dropped.
#[tokio::test]
async fn client_leaving_just_before_the_prefill_answers_strands_nothing() {
    // ~80 prompt tokens at 5 s per 1000: the prefill answers after ~400 ms.
    let p = Proc::sim(&["--role", "prefill", "--prefill-ms-per-1k-tokens", "5000", "--kv-lease-secs", "60"]).await;
    let d = Proc::sim(&["--role", "decode"]).await;
    let r = router(&["--prefill", &p.url, "--decode", &d.url]).await;
    let prompt: String = (0..80).map(|i| format!(" w{i}")).collect();
    let url = format!("{}/v1/completions", r.url);
    let req = tokio::spawn(async move { client().post(url).json(&sbody(&prompt, 20)).send().await });
    assert!(eventually(Duration::from_secs(5), || async { metric(&metrics(&p.url).await, "vllm:num_requests_running", &[]) == 1.0 }).await);
    req.abort();
    kv_pulled_by_an_abandoned_decode(&p, &r, Duration::from_secs(5)).await;
}

/// Within `within`, the decode leg kept for a client that left pulled the prefill's KV
/// (sent once, nothing held, no lease expired) and was then dropped; the router is idle.
async fn kv_pulled_by_an_abandoned_decode(p: &Proc, r: &Proc, within: Duration) {
    let freed = eventually(within, || async {
        let m = metrics(&p.url).await;
        metric(&m, "disagg_sim_kv_transfers_total", &[("direction", "sent")]) == 1.0
            && metric(&m, "disagg_sim_kv_requests_held", &[]) == 0.0
    })
    .await;
    assert!(freed, "the decode pulled the KV:\n{}", metrics(&p.url).await);
    assert_eq!(metric(&metrics(&p.url).await, "disagg_sim_kv_leases_expired_total", &[]), 0.0);
    assert_eq!(metric(&metrics(&r.url).await, "disagg_router_abandoned_decode_legs_total", &[]), 1.0);
    assert_idle(&r.url).await;
}

/// The stranded-KV case (llm-d#1138): the client leaves after the prefill answered and
/// before the decode produced anything. The prefill's KV must be freed by the decode's
/// pull, not by the prefill's lease.
#[tokio::test]
async fn client_leaving_between_legs_frees_prefill_kv_at_once() {
    let p = Proc::sim(&["--role", "prefill", "--kv-lease-secs", "60"]).await;
    // One running slot, taken by a blocker, so the PD request's decode leg queues.
    let d = Proc::sim(&["--role", "decode", "--max-num-seqs", "1", "--decode-ms-per-token", "5"]).await;
    let r = router(&["--prefill", &p.url, "--decode", &d.url]).await;
    let blocker = open_stream(&format!("{}/v1/completions", d.url), &sbody("blocker", 300)).await;
    let url = format!("{}/v1/completions", r.url);
    let req = tokio::spawn(async move { client().post(url).json(&sbody("between the legs", 50)).send().await });
    assert!(
        eventually(Duration::from_secs(5), || async { metric(&metrics(&d.url).await, "vllm:num_requests_waiting", &[]) == 1.0 }).await,
        "the decode leg is queued behind the blocker"
    );
    assert_eq!(metric(&metrics(&p.url).await, "disagg_sim_kv_requests_held", &[]), 1.0);
    req.abort();
    drop(blocker);
    let freed = eventually(Duration::from_secs(10), || async {
        let m = metrics(&p.url).await;
        metric(&m, "disagg_sim_kv_requests_held", &[]) == 0.0
    })
    .await;
    assert!(freed, "the prefill's KV was freed:\n{}", metrics(&p.url).await);
    let m = metrics(&p.url).await;
    assert_eq!(metric(&m, "disagg_sim_kv_leases_expired_total", &[]), 0.0, "not by the 60 s lease");
    assert_eq!(metric(&m, "disagg_sim_kv_transfers_total", &[("direction", "sent")]), 1.0, "by the decode's pull");
    assert!(
        eventually(Duration::from_secs(5), || async {
            let m = metrics(&d.url).await;
            metric(&m, "vllm:num_requests_running", &[]) == 0.0 && metric(&m, "vllm:num_requests_waiting", &[]) == 0.0
        })
        .await,
        "and the abandoned decode was dropped after its first output"
    );
    assert!(metric(&metrics(&d.url).await, "vllm:generation_tokens_total", &[]) < 300.0 + 50.0);
    assert_eq!(metric(&metrics(&r.url).await, "disagg_router_abandoned_decode_legs_total", &[]), 1.0);
    assert_idle(&r.url).await;
}

#[tokio::test]
async fn permit_is_held_for_the_whole_stream() {
    let p = Proc::sim(&["--role", "prefill"]).await;
    let d = Proc::sim(&["--role", "decode", "--decode-ms-per-token", "20"]).await;
    let r = router(&["--max-concurrent-requests", "1", "--queue-size", "0", "--prefill", &p.url, "--decode", &d.url]).await;
    let url = format!("{}/v1/completions", r.url);
    let (resp, first) = open_stream(&url, &sbody("hold", 30)).await;
    // Headers are long sent; the stream still holds the only permit.
    assert_eq!(workers(&r.url).await["permits_in_use"], 1);
    let busy = client().post(&url).json(&body("refused")).send().await.unwrap();
    assert_eq!(busy.status().as_u16(), 429);
    assert!(busy.headers().contains_key("retry-after"));
    assert_eq!(busy.json::<Value>().await.unwrap()["error"]["code"], 429);
    let events = rest_of(resp, first).await;
    assert_eq!(events.last().unwrap(), "[DONE]");
    assert!(eventually(Duration::from_secs(5), || async { workers(&r.url).await["permits_in_use"] == 0 }).await);
    assert_eq!(post(&url, &body("now")).await.0, 200);
    assert_idle(&r.url).await;
}

#[tokio::test]
async fn queue_overflow_is_429_and_queue_timeout_is_503() {
    let p = Proc::sim(&["--role", "prefill"]).await;
    let d = Proc::sim(&["--role", "decode", "--decode-ms-per-token", "20"]).await;
    let r = router(&[
        "--max-concurrent-requests",
        "1",
        "--queue-size",
        "1",
        "--queue-timeout-secs",
        "0.6",
        "--prefill",
        &p.url,
        "--decode",
        &d.url,
    ])
    .await;
    let url = format!("{}/v1/completions", r.url);
    let hold = open_stream(&url, &sbody("hold", 200)).await;
    let waiting = {
        let url = url.clone();
        tokio::spawn(async move {
            let r = client().post(url).json(&body("queued")).send().await.unwrap();
            (r.status().as_u16(), r.headers().contains_key("retry-after"))
        })
    };
    assert!(eventually(Duration::from_secs(5), || async { workers(&r.url).await["queued"] == 1 }).await);
    assert_eq!(metric(&metrics(&r.url).await, "disagg_router_queue_depth", &[]), 1.0);
    assert_eq!(post(&url, &body("overflow")).await.0, 429);
    assert_eq!(waiting.await.unwrap(), (503, true), "waited past --queue-timeout-secs");
    drop(hold);
    // A queued request gets the permit as soon as the stream holding it ends (FIFO).
    let (resp, first) = open_stream(&url, &sbody("short", 10)).await;
    let next = {
        let url = url.clone();
        tokio::spawn(async move { post(&url, &body("next")).await.0 })
    };
    rest_of(resp, first).await;
    assert_eq!(next.await.unwrap(), 200);
    assert_eq!(errors(&r.url, "queue_full").await, 1.0);
    assert_eq!(errors(&r.url, "queue_timeout").await, 1.0);
    assert_idle(&r.url).await;
}

#[tokio::test]
async fn oversized_body_is_413() {
    let p = Proc::sim(&["--role", "prefill"]).await;
    let d = Proc::sim(&["--role", "decode"]).await;
    let r = router(&["--max-payload-size", "1000", "--prefill", &p.url, "--decode", &d.url]).await;
    let (status, v) = post(&format!("{}/v1/completions", r.url), &body(&"x".repeat(2000))).await;
    assert_eq!(status, 413);
    assert_eq!(v["error"]["code"], 413);
    assert_eq!(post(&format!("{}/v1/completions", r.url), &body("small")).await.0, 200);
    assert_idle(&r.url).await;
}

/// A body over a MiB is scanned off the serving thread: answered as a small one is, a
/// valid one served (its other fields reach the worker), a malformed one refused with the
/// same error as its small twin, before any leg.
#[tokio::test]
async fn large_bodies_are_answered_as_small_ones() {
    let p = Proc::sim(&["--role", "prefill"]).await;
    let d = Proc::sim(&["--role", "decode"]).await;
    let r = router(&["--prefill", &p.url, "--decode", &d.url]).await;
    let url = format!("{}/v1/completions", r.url);
    let padding = "x".repeat(3 << 20);
    let (status, v) = post(&url, &json!({"prompt": "large", "max_tokens": 2, "padding": padding})).await;
    assert_eq!(status, 200, "{v}");
    let send = |raw: String| {
        let url = url.clone();
        async move {
            let resp = reqwest::Client::new().post(&url).header("content-type", "application/json").body(raw).send().await.unwrap();
            (resp.status().as_u16(), resp.json::<Value>().await.unwrap())
        }
    };
    let (small_status, small) = send(r#"{"prompt": "p", "padding": "x",}"#.to_string()).await;
    let (large_status, large) = send(format!(r#"{{"prompt": "p", "padding": "{padding}",}}"#)).await;
    assert_eq!((small_status, large_status), (400, 400), "{small} / {large}");
    assert_eq!(small["error"]["type"], large["error"]["type"]);
    assert!(large["error"]["message"].as_str().unwrap().contains("JSON"), "{large}");
    assert_eq!(served(&p.url).await, 1.0, "only the valid request reached a worker");
    assert_idle(&r.url).await;
}

#[tokio::test]
async fn health_follows_workers_and_serving_starts_with_one_of_each() {
    let dport = free_port();
    let p = Proc::sim(&["--role", "prefill"]).await;
    let dead_prefill = format!("http://127.0.0.1:{}", free_port());
    let r = router_unready(&[
        "--health-failure-threshold",
        "2",
        "--prefill",
        &p.url,
        "--prefill",
        &dead_prefill,
        "--decode",
        &format!("http://127.0.0.1:{dport}"),
    ])
    .await;
    let (status, text) = get(&format!("{}/health", r.url)).await;
    assert_eq!(status, 503);
    assert!(text.contains("no healthy decode worker (0 of 1)"), "{text}");
    let (status, v) = post(&format!("{}/v1/completions", r.url), &body("early")).await;
    assert_eq!(status, 503);
    assert!(v["error"]["message"].as_str().unwrap().contains("no healthy decode"), "{v}");
    let port = dport.to_string();
    let mut d = Proc::start(&["sim", "--port", &port, "--role", "decode"]).await;
    // Up as soon as one prefill and one decode are: the dead prefill does not hold it back.
    assert!(eventually(Duration::from_secs(5), || async { get(&format!("{}/health", r.url)).await.0 == 200 }).await);
    assert_eq!(post(&format!("{}/v1/completions", r.url), &body("served")).await.0, 200);
    d.kill();
    d.wait_exit(Duration::from_secs(5)).await;
    assert!(eventually(Duration::from_secs(5), || async { get(&format!("{}/health", r.url)).await.0 == 503 }).await);
    assert_idle(&r.url).await;
}

#[tokio::test]
async fn health_checks_run_concurrently() {
    // A worker whose /health never answers must not delay the others' checks.
    let (hung, _h) = Capture { hang_health: true, ..Capture::default() }.start().await;
    let (purl, _p) = Capture::default().start().await;
    let (durl, _d) = Capture::default().start().await;
    let t = Instant::now();
    let r = router(&["--health-check-timeout-secs", "30", "--prefill", &hung, "--prefill", &purl, "--decode", &durl]).await;
    assert!(t.elapsed() < Duration::from_secs(5), "healthy in {:?}", t.elapsed());
    let w = workers(&r.url).await;
    assert_eq!(w["workers"][0]["healthy"], false);
    assert_eq!(w["workers"][1]["healthy"], true);
}
