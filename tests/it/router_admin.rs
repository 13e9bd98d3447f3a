//! The live worker set: workers join, drain and leave a running router through the admin
//! API (vllm-router's spellings), under load, with nothing lost and nothing left counted.

use std::time::Duration;

use serde_json::{json, Value};

use crate::support::*;

const KEY: &str = "admin-secret";

async fn admin(method: reqwest::Method, url: &str, body: Option<Value>, key: Option<&str>) -> (u16, Value) {
    let mut req = client().request(method, url);
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap_or(Value::Null))
}

async fn post_admin(url: &str) -> (u16, Value) {
    admin(reqwest::Method::POST, url, None, Some(KEY)).await
}

fn enc(url: &str) -> String {
    url.replace(':', "%3A").replace('/', "%2F")
}

async fn listed(router: &str) -> Value {
    admin(reqwest::Method::GET, &format!("{router}/list_workers"), None, Some(KEY)).await.1
}

#[tokio::test]
async fn the_admin_api_is_off_without_a_key_and_needs_the_key_when_on() {
    let p = Proc::sim(&["--role", "prefill"]).await;
    let d = Proc::sim(&["--role", "decode"]).await;
    let open = router(&["--prefill", &p.url, "--decode", &d.url]).await;
    let (status, v) = post_admin(&format!("{}/add_worker?url={}&role=prefill", open.url, d.url)).await;
    assert_eq!(status, 404, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("--admin-api-key"), "{v}");
    let (status, _) = admin(reqwest::Method::POST, &format!("{}/workers", open.url), Some(json!({"url": d.url})), None).await;
    assert_eq!(status, 404);

    let r = router(&["--prefill", &p.url, "--decode", &d.url, "--admin-api-key", KEY]).await;
    for (method, path, body) in [
        (reqwest::Method::POST, format!("/add_worker?url={}&role=decode", p.url), None),
        (reqwest::Method::POST, format!("/remove_worker?url={}", d.url), None),
        (reqwest::Method::GET, "/list_workers".to_string(), None),
        (reqwest::Method::POST, "/workers".to_string(), Some(json!({"url": p.url, "role": "decode"}))),
        (reqwest::Method::DELETE, format!("/workers/{}", enc(&d.url)), None),
        (reqwest::Method::POST, format!("/workers/{}/drain", enc(&d.url)), None),
    ] {
        for key in [None, Some("wrong")] {
            let (status, v) = admin(method.clone(), &format!("{}{path}", r.url), body.clone(), key).await;
            assert_eq!(status, 401, "{method} {path} with {key:?}: {v}");
            assert_eq!(v["error"]["type"], "AuthenticationError", "OpenAI's shape: {v}");
        }
    }
    // Nothing changed.
    assert_eq!(listed(&r.url).await, json!({"urls": [p.url, d.url], "prefill": [p.url], "decode": [d.url]}));
}

#[tokio::test]
async fn bad_admin_calls_get_clear_errors() {
    let p = Proc::sim(&["--role", "prefill"]).await;
    let d = Proc::sim(&["--role", "decode"]).await;
    let r = router(&["--prefill", &p.url, "--decode", &d.url, "--admin-api-key", KEY]).await;
    let cases = [
        (format!("/add_worker?url={}", "127.0.0.1:9"), 400, "role"),
        (format!("/add_worker?url={}&role=worker", "127.0.0.1:9"), 400, "no pool for colocated (worker/regular) workers"),
        (format!("/add_worker?url={}&role=cook", "127.0.0.1:9"), 400, "unknown role"),
        (format!("/add_worker?url={}&role=decode", p.url), 400, "already in the router as a prefill worker"),
        ("/add_worker?url=ftp://127.0.0.1:9&role=decode".to_string(), 400, "scheme"),
        ("/add_worker?role=decode".to_string(), 400, "?url="),
        ("/add_worker?url=127.0.0.1:9&role=decode&dp_size=0".to_string(), 400, "dp_size"),
        ("/remove_worker?url=127.0.0.1:9".to_string(), 404, "no worker http://127.0.0.1:9"),
        (format!("/workers/{}/drain", enc("http://127.0.0.1:9")), 404, "no worker"),
    ];
    for (path, want, says) in cases {
        let (status, v) = post_admin(&format!("{}{path}", r.url)).await;
        assert_eq!(status, want, "{path}: {v}");
        let msg = v["error"]["message"].as_str().unwrap_or_else(|| panic!("{path}: not OpenAI's shape: {v}"));
        assert!(msg.contains(says), "{path}: {msg}");
    }
    let (status, v) = admin(
        reqwest::Method::POST,
        &format!("{}/workers", r.url),
        Some(json!({"url": "127.0.0.1:9", "role": "decode", "priority": 3})),
        Some(KEY),
    )
    .await;
    assert_eq!(status, 400, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("priority"), "unknown fields are named: {v}");
    assert_eq!(listed(&r.url).await["urls"].as_array().unwrap().len(), 2, "nothing was added");
}

#[tokio::test]
async fn a_router_started_empty_serves_once_a_prefill_and_a_decode_join() {
    let p = Proc::sim(&["--role", "prefill"]).await;
    let d = Proc::sim(&["--role", "decode"]).await;
    let r = router_unready(&["--vllm-pd-disaggregation", "--admin-api-key", KEY]).await;
    let (status, body) = get(&format!("{}/health", r.url)).await;
    assert_eq!(status, 503);
    assert!(body.contains("no healthy prefill worker (0 of 0)"), "{body}");
    let req = json!({"prompt": "joined late", "max_tokens": 8, "ignore_eos": true});
    let (status, v) = post(&format!("{}/v1/completions", r.url), &req).await;
    assert_eq!(status, 503, "{v}");

    let (status, v) = post_admin(&format!("{}/add_worker?url={}&role=prefill", r.url, p.url)).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["worker"]["role"], "prefill");
    let (status, v) =
        admin(reqwest::Method::POST, &format!("{}/workers", r.url), Some(json!({"url": d.url, "worker_type": "decode"})), Some(KEY)).await;
    assert_eq!(status, 200, "vllm-router's worker_type: {v}");
    assert!(eventually(Duration::from_secs(10), || async { get(&format!("{}/health", r.url)).await.0 == 200 }).await);
    let (_, direct) = post(&format!("{}/v1/completions", p.url), &req).await;
    let (status, routed) = post(&format!("{}/v1/completions", r.url), &req).await;
    assert_eq!(status, 200, "{routed}");
    assert_eq!(text_of(&routed), text_of(&direct));
    let (status, w) = admin(reqwest::Method::GET, &format!("{}/workers/{}", r.url, enc(&d.url)), None, Some(KEY)).await;
    assert_eq!((status, &w["role"], &w["healthy"]), (200, &json!("decode"), &json!(true)), "{w}");
}

/// One request of the load, checked: 200 and the text a direct colocated run gives.
async fn one(router: &str, reference: &str, i: usize) -> Result<(), String> {
    let req = json!({"prompt": format!("load {}", i % 7), "max_tokens": 6, "ignore_eos": true, "stream": i % 2 == 0});
    let want_text = {
        let mut plain = req.clone();
        plain["stream"] = json!(false);
        text_of(&post(&format!("{reference}/v1/completions"), &plain).await.1)
    };
    let got = if i % 2 == 0 {
        let (status, events) = post_stream(&format!("{router}/v1/completions"), &req).await;
        if status != 200 {
            return Err(format!("request {i}: {status}"));
        }
        stream_text(&events)
    } else {
        let (status, v) = post(&format!("{router}/v1/completions"), &req).await;
        if status != 200 {
            return Err(format!("request {i}: {status} {v}"));
        }
        text_of(&v)
    };
    (got == want_text).then_some(()).ok_or_else(|| format!("request {i}: {got:?} != {want_text:?}"))
}

#[tokio::test]
async fn workers_join_drain_and_leave_under_load_and_nothing_is_lost() {
    let p: Vec<Proc> =
        futures_util::future::join_all((0..2).map(|_| Proc::sim(&["--role", "prefill", "--decode-ms-per-token", "2"]))).await;
    let d: Vec<Proc> = futures_util::future::join_all((0..2).map(|_| Proc::sim(&["--role", "decode", "--decode-ms-per-token", "2"]))).await;
    let reference = Proc::sim(&[]).await;
    let r = router(&["--prefill", &p[0].url, "--decode", &d[0].url, "--admin-api-key", KEY, "--policy", "round_robin"]).await;
    let (ru, refu) = (r.url.clone(), reference.url.clone());
    // Waves of 6 requests until every change below is made, and a few waves after.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stopped = stop.clone();
    let load = tokio::spawn(async move {
        let mut errors = Vec::new();
        let (mut done, mut wave, mut after_stop) = (0, 0, 0);
        while after_stop < 5 {
            if stopped.load(std::sync::atomic::Ordering::Relaxed) {
                after_stop += 1;
            }
            let results = futures_util::future::join_all((0..6).map(|k| one(&ru, &refu, wave * 6 + k))).await;
            wave += 1;
            for res in results {
                match res {
                    Ok(()) => done += 1,
                    Err(e) => errors.push(e),
                }
            }
        }
        (done, wave * 6, errors)
    });
    let served_by = |s: String| async move { served(&s).await };
    // Join: the second pair takes requests.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(post_admin(&format!("{}/add_worker?url={}&role=prefill", r.url, p[1].url)).await.0, 200);
    assert_eq!(post_admin(&format!("{}/add_worker?url={}&role=decode", r.url, d[1].url)).await.0, 200);
    assert!(
        eventually(Duration::from_secs(10), || {
            let u = d[1].url.clone();
            async move { served_by(u).await > 0.0 }
        })
        .await,
        "a joined decode serves"
    );
    // As an operator does: the new prefill healthy before the old one drains (until its
    // first check passes, draining the only healthy prefill leaves none: 503s).
    let healthy = |url: String| {
        let r = r.url.clone();
        async move {
            let w = admin(reqwest::Method::GET, &format!("{r}/workers"), None, Some(KEY)).await.1;
            w["workers"].as_array().unwrap().iter().any(|w| w["url"] == json!(url) && w["healthy"] == true)
        }
    };
    assert!(eventually(Duration::from_secs(5), || healthy(p[1].url.clone())).await, "the joined prefill is healthy");
    // Drain the first prefill: it takes nothing new and leaves once idle.
    let (status, v) = post_admin(&format!("{}/workers/{}/drain", r.url, enc(&p[0].url))).await;
    assert_eq!(status, 200, "{v}");
    let gone =
        eventually(Duration::from_secs(10), || async { !listed(&r.url).await["urls"].as_array().unwrap().contains(&json!(p[0].url)) })
            .await;
    assert!(gone, "a drained worker leaves once idle: {}", listed(&r.url).await);
    let after_drain = served(&p[0].url).await;
    // Remove the first decode outright: its in-flight requests finish on it.
    let (status, v) = admin(reqwest::Method::DELETE, &format!("{}/workers/{}", r.url, enc(&d[0].url)), None, Some(KEY)).await;
    assert_eq!(status, 200, "{v}");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (done, sent, errors) = load.await.unwrap();
    assert!(errors.is_empty(), "{} of {sent} requests failed: {errors:?}", errors.len());
    assert_eq!(done, sent);
    println!("{sent} requests while workers joined, drained and left");
    assert_eq!(served(&p[0].url).await, after_drain, "a drained prefill got nothing new");
    assert_eq!(listed(&r.url).await, json!({"urls": [p[1].url, d[1].url], "prefill": [p[1].url], "decode": [d[1].url]}));
    let idle = eventually(Duration::from_secs(10), || async {
        let w = admin(reqwest::Method::GET, &format!("{}/workers", r.url), None, Some(KEY)).await.1;
        w["permits_in_use"] == 0 && w["workers"].as_array().unwrap().iter().all(|w| w["in_flight"] == 0)
    })
    .await;
    assert!(idle, "counters back to zero");
    // A worker that left has no metric series.
    let m = metrics_with_key(&r.url).await;
    assert!(!m.contains(&format!("worker=\"{}\"", p[0].url)) && !m.contains(&format!("worker=\"{}\"", d[0].url)), "{m}");
    assert!(m.contains(&format!("worker=\"{}\"", d[1].url)));
    // Every sim holds no KV for anyone.
    for s in p.iter().chain(&d) {
        assert_eq!(metric(&metrics(&s.url).await, "disagg_sim_kv_blocks_held", &[]), 0.0, "{}", s.url);
    }
}

async fn metrics_with_key(router: &str) -> String {
    client().get(format!("{router}/metrics")).bearer_auth(KEY).send().await.unwrap().text().await.unwrap()
}
