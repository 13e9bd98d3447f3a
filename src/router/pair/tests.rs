//! The state machine against scripted workers: one test per row of docs/FAILURES.md that
//! the pair room decides (the rows' HTTP tests run the same paths on the simulator).
//! Workers are scripted (scripted.rs); the clock is tokio's paused one, so backoffs and
//! graces take no time.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::http::HeaderValue;
use bytes::Bytes;
use serde_json::json;

use crate::router::policy::RequestInfo;
use tokio::time::Instant;

use super::retry::{RetryBudget, RetryConfig};
use super::scripted::*;
use super::*;
use crate::router::metrics::Cause;
use crate::router::request::body::ClientBody;
use crate::router::request::LegBodies;
use crate::router::upstream::legs::{LegError, PrefillKv, Prefilled};
use crate::router::workers::Role;

fn retry(max_retries: u32) -> RetryConfig {
    RetryConfig {
        max_retries,
        rerun_pair: true,
        initial_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(100),
        multiplier: 2.0,
        jitter: 0.0,
        budget_ratio: 1.0,
        budget_min_per_sec: 100.0,
    }
}

fn pool(role: Role, urls: &[&str], dp: usize, connector: Connector) -> Pool {
    let kv: HashMap<String, String> = match connector {
        Connector::Nixl => HashMap::new(),
        Connector::Mooncake => urls.iter().map(|u| (u.to_string(), format!("{}:8998", u.trim_start_matches("http://")))).collect(),
        Connector::P2pNccl => urls.iter().enumerate().map(|(i, u)| (u.to_string(), format!("127.0.0.1:{}", 21000 + i))).collect(),
    };
    let pool = crate::router::workers::pool::healthy_pool_with(role, urls, dp, &kv);
    for w in pool.snapshot().iter() {
        w.set_engine_ids((0..dp).map(|r| format!("engine-{}-{r}", w.url)).collect());
    }
    pool
}

struct Setup {
    pairs: Arc<Pairs<ScriptedLegs>>,
    script: Arc<Script>,
}

fn pd(connector: Connector, prefills: &[&str], decodes: &[&str], cfg: RetryConfig) -> Setup {
    let topology =
        Topology::Disaggregated { prefill: pool(Role::Prefill, prefills, 1, connector), decode: pool(Role::Decode, decodes, 1, connector) };
    setup(topology, connector, cfg)
}

fn setup(topology: Topology, connector: Connector, cfg: RetryConfig) -> Setup {
    let script = Arc::new(Script::default());
    let pairs = Arc::new(Pairs {
        topology: Arc::new(topology),
        connector,
        budget: RetryBudget::new(&cfg),
        retry: cfg,
        metrics: Arc::new(RouterMetrics::new()),
        decode_alone_tokens: 0,
        slo: None,
        lean: Default::default(),
        max_prefill_share: 0.5,
        legs: ScriptedLegs(script.clone()),
    });
    Setup { pairs, script }
}

fn job(delivery: Delivery) -> Arc<Job> {
    let body = ClientBody::parse(Bytes::from_static(br#"{"model":"m","prompt":"hello","max_tokens":8}"#)).unwrap();
    let leg = LegTemplate {
        path: "/v1/completions",
        request_id: HeaderValue::from_static("client-id"),
        authorization: None,
        prefill_timeout: Duration::from_secs(30),
        first_byte_timeout: Duration::from_secs(30),
        request_timeout: Duration::from_secs(60),
        journey: None,
    };
    Arc::new(Job {
        bodies: LegBodies::new(body),
        info: RequestInfo::default(),
        leg,
        delivery,
        transit: None,
        prediction: Default::default(),
        admitted: None,
    })
}

async fn failure_text(f: Failure) -> (u16, Cause, String) {
    let body = axum::body::to_bytes(f.response.into_body(), 1 << 20).await.unwrap();
    (f.status, f.cause, String::from_utf8_lossy(&body).into_owned())
}

fn metrics_text(s: &Setup) -> String {
    s.pairs.metrics.render(&[], None, 0, 0, false)
}

const P1: &str = "http://127.0.0.1:9001";
const P2: &str = "http://127.0.0.1:9002";
const D1: &str = "http://127.0.0.1:9101";
const D2: &str = "http://127.0.0.1:9102";

fn worker(s: &Setup, role: Role, url: &str) -> Arc<crate::router::workers::Worker> {
    let (p, d) = s.pairs.pd();
    match role {
        Role::Prefill => p.get(url),
        _ => d.get(url),
    }
    .expect("a worker of the setup")
}

#[tokio::test(start_paused = true)]
async fn prefill_connect_error_retries_on_another_prefill() {
    let s = pd(Connector::Nixl, &[P1, P2], &[D1], retry(3));
    s.script.on(P1, [Step::Prefill(Err(LegError::Connect("refused".into())))]);
    s.script.on(P2, [prefilled()]);
    s.script.on(D1, [answered()]);
    let answer = s.pairs.run(job(Delivery::Whole)).await.ok().expect("an answer");
    assert_eq!(answer.lease.url(), D1);
    assert_eq!(answer.prefill.unwrap().url, P2);
    assert_eq!(s.script.order(), [format!("Prefill {P1}"), format!("Prefill {P2}"), format!("Answer {D1}")]);
    assert!(!worker(&s, Role::Prefill, P1).is_available(), "a refused connection marks the prefill down at once");
    // The decode leg carries what the prefill that answered returned.
    assert_eq!(s.script.legs()[2].body["kv_transfer_params"], json!({"remote_block_ids": [1]}));
}

#[tokio::test(start_paused = true)]
async fn prefill_5xx_retries_then_502_naming_the_leg() {
    let s = pd(Connector::Nixl, &[P1, P2], &[D1], retry(3));
    s.script.on(P1, [Step::Prefill(Err(status(503)))]);
    s.script.on(P2, [Step::Prefill(Err(status(500)))]);
    let Err(f) = s.pairs.run(job(Delivery::Whole)).await else { panic!("every prefill failed") };
    let (code, cause, text) = failure_text(f).await;
    assert_eq!((code, cause), (502, Cause::PrefillFailed));
    assert!(text.contains("prefill leg failed"), "{text}");
    assert!(!text.contains("127.0.0.1"), "no worker address reaches the client: {text}");
    assert_eq!(s.script.order(), [format!("Prefill {P1}"), format!("Prefill {P2}")], "no decode leg without a prefill");
}

#[tokio::test(start_paused = true)]
async fn prefill_timeout_retries_on_another_prefill() {
    let s = pd(Connector::Nixl, &[P1, P2], &[D1], retry(3));
    s.script.on(P1, [Step::Prefill(Err(LegError::Timeout(Duration::from_secs(30))))]);
    s.script.on(P2, [prefilled()]);
    s.script.on(D1, [answered()]);
    assert!(s.pairs.run(job(Delivery::Whole)).await.is_ok());
    assert_eq!(s.script.order()[..2], [format!("Prefill {P1}"), format!("Prefill {P2}")]);
    assert!(worker(&s, Role::Prefill, P1).is_available(), "a timeout counts against the circuit; it is not a refusal");
}

#[tokio::test(start_paused = true)]
async fn prefill_4xx_is_returned_as_is() {
    let s = pd(Connector::Nixl, &[P1, P2], &[D1], retry(3));
    s.script.on(P1, [Step::Prefill(Err(status(400)))]);
    let Err(f) = s.pairs.run(job(Delivery::Whole)).await else { panic!("a 4xx is the answer") };
    let (code, cause, text) = failure_text(f).await;
    assert_eq!((code, cause, text.as_str()), (400, Cause::Upstream4xx, "{\"error\":\"x\"}"));
    assert_eq!(s.script.order(), [format!("Prefill {P1}")]);
}

#[tokio::test(start_paused = true)]
async fn decode_4xx_is_returned_as_is() {
    let s = pd(Connector::Nixl, &[P1], &[D1, D2], retry(3));
    s.script.on(P1, [prefilled()]);
    s.script.on(D1, [Step::Answer(Err(status(422)))]);
    let Err(f) = s.pairs.run(job(Delivery::Whole)).await else { panic!("a 4xx is the answer") };
    assert_eq!(failure_text(f).await.0, 422);
    assert_eq!(s.script.order(), [format!("Prefill {P1}"), format!("Answer {D1}")]);
}

#[tokio::test(start_paused = true)]
async fn more_dp_ranks_configured_than_served_are_learned_not_failed() {
    let topology = Topology::Disaggregated {
        prefill: pool(Role::Prefill, &[P1], 8, Connector::Nixl),
        decode: pool(Role::Decode, &[D1], 1, Connector::Nixl),
    };
    let s = setup(topology, Connector::Nixl, retry(3));
    // Round robin over 8 ranks starts at rank 0; make the first pick land past 4.
    let p1 = worker(&s, Role::Prefill, P1);
    for _ in 0..5 {
        drop(s.pairs.pd().0.pick(&RequestInfo::default(), &[]).unwrap());
    }
    s.script.on(P1, [Step::Prefill(Err(LegError::RankNotServed { served: 4 })), prefilled()]);
    s.script.on(D1, [answered()]);
    assert!(s.pairs.run(job(Delivery::Whole)).await.is_ok());
    let legs = s.script.legs();
    assert_eq!(s.script.order()[..2], [format!("Prefill {P1}"), format!("Prefill {P1}")], "retried on the same worker");
    assert!(legs[0].rank.unwrap() >= 4 && legs[1].rank.unwrap() < 4, "{:?} then {:?}", legs[0].rank, legs[1].rank);
    assert_eq!(p1.served_ranks(), 4);
    assert!(p1.is_available());
    assert!(metrics_text(&s).contains(r#"kind="dp_rank_out_of_range""#));
}

#[tokio::test(start_paused = true)]
async fn no_available_worker_is_503_and_nothing_is_sent() {
    let s = pd(Connector::Nixl, &[P1], &[D1], retry(3));
    worker(&s, Role::Decode, D1).mark_down("test");
    let Err(f) = s.pairs.run(job(Delivery::Whole)).await else { panic!("no decode") };
    let (code, cause, text) = failure_text(f).await;
    assert_eq!((code, cause), (503, Cause::NoHealthyDecode));
    assert!(text.contains("no healthy decode worker"), "{text}");
    assert!(s.script.order().is_empty(), "the decode is reserved first: no prefill KV is made for nothing");

    let s = pd(Connector::Nixl, &[P1], &[D1], retry(3));
    worker(&s, Role::Prefill, P1).mark_down("test");
    let Err(f) = s.pairs.run(job(Delivery::Whole)).await else { panic!("no prefill") };
    assert_eq!(failure_text(f).await.1, Cause::NoHealthyPrefill);
    assert!(s.script.order().is_empty());
}

#[tokio::test(start_paused = true)]
async fn decode_failure_before_its_engine_retries_the_same_kv_on_another_decode() {
    for failure in [LegError::Connect("refused".into()), status(503), LegError::ErrorEvent("kv load failed".into())] {
        let s = pd(Connector::Nixl, &[P1], &[D1, D2], retry(3));
        s.script.on(P1, [prefilled()]);
        s.script.on(D1, [Step::Answer(Err(failure))]);
        s.script.on(D2, [answered()]);
        let answer = s.pairs.run(job(Delivery::Whole)).await.ok().expect("an answer");
        assert_eq!(answer.lease.url(), D2);
        let legs = s.script.legs();
        assert_eq!(s.script.order(), [format!("Prefill {P1}"), format!("Answer {D1}"), format!("Answer {D2}")], "one prefill");
        assert_eq!(legs[1].body, legs[2].body, "the same decode leg, the same KV params");
        assert_eq!(legs[1].id, legs[2].id);
    }
}

#[tokio::test(start_paused = true)]
async fn a_decode_that_failed_on_the_kv_is_never_sent_it_again() {
    // One decode: the same KV cannot go to another, so the pair runs again (a new prefill).
    let s = pd(Connector::Nixl, &[P1, P2], &[D1], retry(3));
    s.script.on(P1, [prefilled()]);
    s.script.on(D1, [Step::Answer(Err(LegError::ErrorEvent("kv load failed".into()))), answered()]);
    s.script.on(P2, [prefilled()]);
    assert!(s.pairs.run(job(Delivery::Whole)).await.is_ok());
    assert_eq!(s.script.order(), [format!("Prefill {P1}"), format!("Answer {D1}"), format!("Prefill {P2}"), format!("Answer {D1}")]);
}

#[tokio::test(start_paused = true)]
async fn decode_failure_after_it_may_have_used_the_kv_reruns_the_pair_on_other_workers() {
    for failure in [LegError::Timeout(Duration::from_secs(30)), LegError::Broken("reset".into())] {
        let s = pd(Connector::Nixl, &[P1, P2], &[D1, D2], retry(3));
        s.script.on(P1, [prefilled()]);
        s.script.on(D1, [Step::Answer(Err(failure))]);
        s.script.on(P2, [prefilled()]);
        s.script.on(D2, [answered()]);
        let answer = s.pairs.run(job(Delivery::Whole)).await.ok().expect("the re-run's answer");
        assert_eq!(answer.prefill.unwrap().url, P2);
        assert_eq!(s.script.order(), [format!("Prefill {P1}"), format!("Answer {D1}"), format!("Prefill {P2}"), format!("Answer {D2}")]);
        assert!(metrics_text(&s).contains(r#"disagg_router_retries_total{leg="pair"} 1"#), "{}", metrics_text(&s));
    }
}

#[tokio::test(start_paused = true)]
async fn a_pair_runs_again_once_then_the_client_hears_502() {
    let s = pd(Connector::Nixl, &[P1, P2], &[D1, D2], retry(3));
    s.script.on(P1, [prefilled()]);
    s.script.on(P2, [prefilled()]);
    s.script.on(D1, [Step::Answer(Err(LegError::Timeout(Duration::from_secs(1))))]);
    s.script.on(D2, [Step::Answer(Err(LegError::Timeout(Duration::from_secs(1))))]);
    let Err(f) = s.pairs.run(job(Delivery::Whole)).await else { panic!("both pairs failed") };
    let (code, cause, text) = failure_text(f).await;
    assert_eq!((code, cause), (502, Cause::DecodeFailed));
    assert!(text.contains("decode leg failed"), "{text}");
    assert_eq!(s.script.legs().len(), 4, "two pairs, no more: {:?}", s.script.order());
}

#[tokio::test(start_paused = true)]
async fn retries_stop_when_the_budget_is_spent() {
    let mut cfg = retry(3);
    (cfg.budget_ratio, cfg.budget_min_per_sec) = (0.0, 0.0);
    let s = pd(Connector::Nixl, &[P1, P2], &[D1], cfg);
    s.script.on(P1, [Step::Prefill(Err(status(503)))]);
    s.script.on(P2, [prefilled()]);
    let Err(f) = s.pairs.run(job(Delivery::Whole)).await else { panic!("no retry was allowed") };
    assert_eq!(failure_text(f).await.0, 502);
    assert_eq!(s.script.order(), [format!("Prefill {P1}")]);
}

#[tokio::test(start_paused = true)]
async fn colocated_legs_retry_on_another_worker() {
    let workers = pool(Role::Both, &[P1, P2], 1, Connector::Nixl);
    let s = setup(Topology::Colocated { workers }, Connector::Nixl, retry(3));
    s.script.on(P1, [Step::Answer(Err(status(502)))]);
    s.script.on(P2, [answered()]);
    let answer = s.pairs.run(job(Delivery::Whole)).await.ok().expect("an answer");
    assert_eq!(answer.lease.url(), P2);
    assert!(answer.prefill.is_none());
    let legs = s.script.legs();
    assert_eq!(s.script.order(), [format!("Answer {P1}"), format!("Answer {P2}")]);
    assert!(legs[0].body.get("kv_transfer_params").is_none(), "a colocated leg carries no KV params");
}

#[tokio::test(start_paused = true)]
async fn mooncake_a_dead_prefill_costs_no_request() {
    let s = pd(Connector::Mooncake, &[P1, P2], &[D1], retry(3));
    s.script.on(P1, [after(50, Step::Prefill(Err(LegError::Connect("refused".into()))))]);
    // The decode sent alongside the dead prefill waits for KV that never comes.
    s.script.on(D1, [Step::Hang, after(20, answered())]);
    s.script.on(P2, [prefilled()]);
    assert!(s.pairs.run(job(Delivery::Whole)).await.is_ok());
    let legs = alongside_first(s.script.legs());
    let order: Vec<_> = legs.iter().map(|l| (l.kind, l.url.as_str())).collect();
    assert_eq!(order, [(Kind::Prefill, P1), (Kind::Answer, D1), (Kind::Prefill, P2), (Kind::Answer, D1)]);
    assert_eq!(legs[1].end.unwrap().0, End::Dropped, "the waiting decode is dropped (vLLM aborts it)");
    let transfer = |l: &SentLeg| l.body["kv_transfer_params"]["transfer_id"].as_str().unwrap().to_string();
    assert_eq!(transfer(&legs[0]), transfer(&legs[1]));
    assert_eq!(transfer(&legs[2]), transfer(&legs[3]));
    assert_ne!(transfer(&legs[0]), transfer(&legs[2]), "a new transfer id on the new prefill");
    assert_eq!(legs[3].body["kv_transfer_params"]["remote_engine_id"], json!(format!("engine-{P2}-0")));
}

#[tokio::test(start_paused = true)]
async fn mooncake_a_prefill_that_kept_no_kv_gets_its_decode_sent_again_without_params() {
    let s = pd(Connector::Mooncake, &[P1], &[D1], retry(3));
    s.script.on(P1, [after(10, Step::Prefill(Ok(Prefilled { params: None, kv: PrefillKv::NotKept })))]);
    s.script.on(D1, [Step::Hang, answered()]);
    assert!(s.pairs.run(job(Delivery::Whole)).await.is_ok());
    let legs = alongside_first(s.script.legs());
    assert_eq!(legs.len(), 3);
    assert_eq!(legs[1].end.unwrap().0, End::Dropped);
    assert!(legs[1].body.get("kv_transfer_params").is_some());
    assert_eq!((legs[2].kind, legs[2].url.as_str()), (Kind::Answer, D1));
    assert!(legs[2].body.get("kv_transfer_params").is_none(), "the decode prefills locally: {}", legs[2].body);
}

#[tokio::test(start_paused = true)]
async fn mooncake_a_decode_that_fails_first_goes_to_another_decode_once_its_prefill_has_the_kv() {
    let s = pd(Connector::Mooncake, &[P1], &[D1, D2], retry(3));
    s.script.on(P1, [after(100, prefilled())]);
    s.script.on(D1, [Step::Answer(Err(status(503)))]);
    s.script.on(D2, [answered()]);
    let answer = s.pairs.run(job(Delivery::Whole)).await.ok().expect("an answer");
    assert_eq!(answer.lease.url(), D2);
    let legs = alongside_first(s.script.legs());
    assert_eq!(legs.len(), 3, "{:?}", s.script.order());
    assert_eq!(legs[1].body, legs[2].body, "the same transfer for the next decode");
    assert!(legs[2].sent_at >= legs[0].end.unwrap().1, "after the prefill said the KV is there");
}

#[tokio::test(start_paused = true)]
async fn p2pnccl_a_dead_decode_gets_a_new_pair_with_a_new_id() {
    let s = pd(Connector::P2pNccl, &[P1], &[D1, D2], retry(3));
    s.script.on(P1, [prefilled(), prefilled()]);
    s.script.on(D1, [Step::Answer(Err(LegError::Connect("refused".into())))]);
    s.script.on(D2, [answered()]);
    let answer = s.pairs.run(job(Delivery::Whole)).await.ok().expect("an answer");
    assert_eq!(answer.lease.url(), D2);
    let legs = s.script.legs();
    assert_eq!(s.script.order(), [format!("Prefill {P1}"), format!("Answer {D1}"), format!("Prefill {P1}"), format!("Answer {D2}")]);
    assert_ne!(legs[0].id, legs[2].id, "the KV went to the dead decode: a new id");
    assert!(legs[2].id.contains("___decode_addr_127.0.0.1:21001_"), "the new id names the new decode: {}", legs[2].id);
    assert!(answer.rename.is_some(), "the answer carries the client's id, not the legs'");
}

#[tokio::test(start_paused = true)]
async fn p2pnccl_the_decode_is_sent_only_after_its_prefill_answered() {
    let s = pd(Connector::P2pNccl, &[P1], &[D1], retry(3));
    s.script.on(P1, [after(200, prefilled())]);
    s.script.on(D1, [answered()]);
    assert!(s.pairs.run(job(Delivery::Stream)).await.is_ok());
    let legs = s.script.legs();
    assert!(legs[1].sent_at >= legs[0].end.unwrap().1);
    assert!(legs[1].body.get("kv_transfer_params").is_none(), "P2pNccl's decode finds its KV by the id");
}

/// Mooncake's legs of one pair go out together, in either order: each pair's prefill first.
fn alongside_first(mut legs: Vec<SentLeg>) -> Vec<SentLeg> {
    for pair in legs.chunks_mut(2) {
        if pair.len() == 2 && pair[0].kind == Kind::Answer && pair[1].kind == Kind::Prefill {
            pair.swap(0, 1);
        }
    }
    legs
}

/// Runs the job as the handler does, and drops the handler (the client leaves) after `ms`.
async fn client_leaves_after(s: &Setup, job: Arc<Job>, ms: u64) {
    let pairs = s.pairs.clone();
    let handler = tokio::spawn(async move { pairs.run(job).await.is_ok() });
    tokio::time::sleep(Duration::from_millis(ms)).await;
    handler.abort();
    // Every kept leg ends within the graces.
    tokio::time::sleep(Duration::from_secs(120)).await;
}

#[tokio::test(start_paused = true)]
async fn client_leaving_during_prefill_keeps_it_to_its_timeout_and_tries_nothing_else() {
    let s = pd(Connector::Nixl, &[P1, P2], &[D1], retry(3));
    s.script.on(P1, [after(30_000, Step::Prefill(Err(LegError::Timeout(Duration::from_secs(30)))))]);
    s.script.on(P2, [prefilled()]);
    let start = Instant::now();
    client_leaves_after(&s, job(Delivery::Whole), 100).await;
    assert_eq!(s.script.order(), [format!("Prefill {P1}")], "no other prefill, no decode, once the client has gone");
    let (end, at) = s.script.legs()[0].end.unwrap();
    assert_eq!((end, at - start), (End::Answered, Duration::from_secs(30)), "kept to its end, not dropped when the client left");
}

#[tokio::test(start_paused = true)]
async fn client_leaving_during_a_long_prefill_still_frees_its_kv() {
    let s = pd(Connector::Nixl, &[P1], &[D1], retry(3));
    s.script.on(P1, [after(20_000, prefilled())]);
    s.script.on(D1, [Step::Hang]);
    client_leaves_after(&s, job(Delivery::Whole), 100).await;
    assert_eq!(s.script.order(), [format!("Prefill {P1}"), format!("Answer {D1}")], "the decode is sent to pull the KV");
    assert_eq!(s.script.legs()[0].end.unwrap().0, End::Answered);
}

#[tokio::test(start_paused = true)]
async fn client_leaving_just_before_the_prefill_answers_still_frees_its_kv() {
    let s = pd(Connector::Nixl, &[P1], &[D1], retry(3));
    s.script.on(P1, [after(300, prefilled())]);
    s.script.on(D1, [Step::Hang]);
    client_leaves_after(&s, job(Delivery::Whole), 100).await;
    let legs = s.script.legs();
    assert_eq!(s.script.order(), [format!("Prefill {P1}"), format!("Answer {D1}")], "the decode is sent to pull (or free) the KV");
    let (end, at) = legs[1].end.unwrap();
    assert_eq!(end, End::Dropped);
    assert_eq!(at - legs[1].sent_at, decode::DECODE_GRACE, "a non-streamed decode is kept until it has the request");
    assert!(metrics_text(&s).contains("disagg_router_abandoned_decode_legs_total 1"), "{}", metrics_text(&s));
}

#[tokio::test(start_paused = true)]
async fn client_leaving_between_legs_keeps_a_streamed_decode_until_its_first_output() {
    let s = pd(Connector::Nixl, &[P1], &[D1], retry(3));
    s.script.on(P1, [prefilled()]);
    s.script.on(D1, [after(5000, answered())]);
    client_leaves_after(&s, job(Delivery::Stream), 100).await;
    let legs = s.script.legs();
    assert_eq!(legs[1].end.unwrap().0, End::Answered, "kept past the client until it took the KV");
    assert!(metrics_text(&s).contains("disagg_router_abandoned_decode_legs_total 1"));
}

#[tokio::test(start_paused = true)]
async fn mooncake_the_client_leaving_keeps_the_waiting_decode_until_it_has_the_request() {
    let s = pd(Connector::Mooncake, &[P1], &[D1], retry(3));
    s.script.on(P1, [Step::Hang]);
    s.script.on(D1, [Step::Hang]);
    client_leaves_after(&s, job(Delivery::Whole), 100).await;
    let legs = alongside_first(s.script.legs());
    let (end, at) = legs[1].end.unwrap();
    assert_eq!(end, End::Dropped);
    // The grace runs from when both the request reached the decode and the client left.
    assert_eq!(at - legs[1].sent_at, Duration::from_millis(100) + decode::DECODE_GRACE, "then its abort frees the prefill's blocks");
    assert_eq!(legs[0].end.unwrap().0, End::Dropped);
}

/// Elastic engines (--pd-pool): each one worker in both pools, healthy.
fn elastic(urls: &[&str]) -> Setup {
    let topology = Topology::Disaggregated {
        prefill: pool(Role::Prefill, &[], 1, Connector::Nixl),
        decode: pool(Role::Decode, &[], 1, Connector::Nixl),
    };
    let health = crate::router::workers::health::HealthConfig {
        interval: Duration::from_secs(5),
        timeout: Duration::from_secs(1),
        failure_threshold: 1,
        success_threshold: 1,
        endpoint: "/health".into(),
    };
    for url in urls {
        topology.add_elastic(url, Some(1)).unwrap().record_check(true, &health, "");
    }
    setup(topology, Connector::Nixl, retry(3))
}

#[tokio::test(start_paused = true)]
async fn an_elastic_decode_is_paired_with_another_engine_never_itself() {
    let s = elastic(&[P1, P2]);
    assert_eq!(s.pairs.topology.workers().len(), 2, "one worker per engine");
    // Round robin: P1 decodes first (P2 prefills), then P2 (P1 prefills).
    s.script.on(P1, [answered(), prefilled()]);
    s.script.on(P2, [prefilled(), answered()]);
    for (prefill, decode) in [(P2, P1), (P1, P2)] {
        let answer = s.pairs.run(job(Delivery::Whole)).await.ok().expect("an answer");
        assert_eq!((answer.prefill.unwrap().url.as_str(), answer.lease.url()), (prefill, decode));
    }
    assert_eq!(s.script.order(), [format!("Prefill {P2}"), format!("Answer {P1}"), format!("Prefill {P1}"), format!("Answer {P2}")]);
    assert!(metrics_text(&s).contains(r#"disagg_router_elastic_layout_total{layout="pair"} 2"#), "{}", metrics_text(&s));
}

#[tokio::test(start_paused = true)]
async fn an_elastic_engine_without_another_prefill_answers_alone_and_a_failed_prefill_is_not_retried_on_the_decode() {
    let s = elastic(&[P1, P2]);
    worker(&s, Role::Decode, P2).mark_down("test");
    s.script.on(P1, [answered()]);
    let answer = s.pairs.run(job(Delivery::Whole)).await.ok().expect("an answer");
    assert_eq!((answer.prefill.is_none(), answer.lease.url()), (true, P1));
    assert!(s.script.legs()[0].body.get("kv_transfer_params").is_none(), "the client's body as it is: {:?}", s.script.legs()[0].body);
    assert!(metrics_text(&s).contains(r#"disagg_router_elastic_layout_total{layout="alone"} 1"#));

    // Both up; the other engine's prefill is refused: no prefill is left but the decode
    // itself, which never prefills its own pair.
    let s = elastic(&[P1, P2]);
    s.script.on(P2, [Step::Prefill(Err(LegError::Connect("refused".into())))]);
    let Err(f) = s.pairs.run(job(Delivery::Whole)).await else { panic!("the only other prefill failed") };
    assert_eq!(failure_text(f).await.0, 502);
    assert_eq!(s.script.order(), [format!("Prefill {P2}")]);
}
