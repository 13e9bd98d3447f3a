//! Flow control over loopback, on simulated engines: tenants' limits in OpenAI's shape and
//! headers, priority order at a saturated engine, fair shares, the tenants file reloaded,
//! a tenant's queue bounded while another's is served, the priority the legs carry.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::capture::Capture;
use crate::support::*;

fn tenants_file(yaml: &str) -> String {
    let path = temp_dir("tenants").join("tenants.yaml");
    std::fs::write(&path, yaml).unwrap();
    path.to_string_lossy().into_owned()
}

/// A POST as `key`, with its status, headers and JSON body.
async fn post_as(url: &str, key: &str, body: &Value) -> (u16, reqwest::header::HeaderMap, Value) {
    let resp = client().post(url).bearer_auth(key).json(body).send().await.unwrap();
    let (status, headers) = (resp.status().as_u16(), resp.headers().clone());
    (status, headers, resp.json().await.unwrap_or(Value::Null))
}

fn header(h: &reqwest::header::HeaderMap, name: &str) -> String {
    h.get(name).map(|v| v.to_str().unwrap().to_string()).unwrap_or_default()
}

#[tokio::test]
async fn limits_per_tenant_in_openais_shape_and_headers() {
    let p = Proc::sim(&["--role", "prefill"]).await;
    let d = Proc::sim(&["--role", "decode"]).await;
    let file = tenants_file(
        "tenants:\n  - name: few-requests\n    keys: [sk-r]\n    limits: {requests_per_minute: 3}\n  \
         - name: few-tokens\n    keys: [sk-t]\n    limits: {tokens_per_minute: 100, max_prompt_tokens: 60}\n",
    );
    let r = router(&["--prefill", &p.url, "--decode", &d.url, "--tenants", &file, "--client-api-key", "sk-plain"]).await;
    let url = format!("{}/v1/completions", r.url);
    let small = json!({"prompt": "hi", "max_tokens": 2});
    for left in ["2", "1", "0"] {
        let (status, h, v) = post_as(&url, "sk-r", &small).await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(header(&h, "x-ratelimit-limit-requests"), "3");
        assert_eq!(header(&h, "x-ratelimit-remaining-requests"), left);
        assert!(header(&h, "x-ratelimit-reset-requests").ends_with('s'), "{h:?}");
        assert!(h.get("x-ratelimit-limit-tokens").is_none(), "the tenant has no token limit");
    }
    let (status, h, v) = post_as(&url, "sk-r", &small).await;
    assert_eq!(status, 429, "{v}");
    assert_eq!(v["error"]["code"], "rate_limit_exceeded");
    assert_eq!(v["error"]["type"], "requests");
    assert!(v["error"]["message"].as_str().unwrap().contains("few-requests"), "{v}");
    assert!(header(&h, "retry-after").parse::<u64>().unwrap() >= 1);
    assert_eq!(header(&h, "x-ratelimit-remaining-requests"), "0");

    // Tokens: the estimate (body bytes / 4 + max_tokens) is charged; 100 a minute.
    let body = json!({"prompt": "a prompt of some forty bytes, give or take", "max_tokens": 40});
    let (status, h, _) = post_as(&url, "sk-t", &body).await;
    assert_eq!(status, 200);
    assert_eq!(header(&h, "x-ratelimit-limit-tokens"), "100");
    let first_left: u64 = header(&h, "x-ratelimit-remaining-tokens").parse().unwrap();
    assert!(first_left <= 100 - 40 - 15, "prompt bytes / 4 and max_tokens: {first_left}");
    let (status, _, v) = post_as(&url, "sk-t", &body).await;
    assert_eq!(status, 429, "the second does not fit what is left: {v}");
    assert_eq!(v["error"]["type"], "tokens");
    // A prompt over the tenant's max_prompt_tokens is the client's error.
    let (status, _, v) = post_as(&url, "sk-t", &json!({"prompt": "x".repeat(400), "max_tokens": 1})).await;
    assert_eq!(status, 400, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("max_prompt_tokens"), "{v}");

    // Every answer to a tenant carries its allowances: /v1/models and a passed-through API too.
    let models = client().get(format!("{}/v1/models", r.url)).bearer_auth("sk-r").send().await.unwrap();
    assert_eq!(models.status(), 200);
    assert_eq!(header(models.headers(), "x-ratelimit-remaining-requests"), "0");
    let tokenized = client().post(format!("{}/tokenize", r.url)).bearer_auth("sk-t").json(&json!({"prompt": "hi"})).send().await.unwrap();
    assert_eq!(header(tokenized.headers(), "x-ratelimit-limit-tokens"), "100");
    // Every client presents a key: the file's, or --client-api-key's (the default tenant).
    assert_eq!(post_as(&url, "sk-plain", &small).await.0, 200);
    assert_eq!(post_as(&url, "sk-unknown", &small).await.0, 401);
    assert_eq!(post(&url, &small).await.0, 401);
    let m = {
        let resp = client().get(format!("{}/metrics", r.url)).send().await.unwrap();
        resp.text().await.unwrap()
    };
    assert_eq!(metric(&m, "disagg_router_tenant_refused_total", &[("tenant", "few-requests"), ("cause", "rate_limited")]), 1.0);
    assert_eq!(metric(&m, "disagg_router_tenant_requests_total", &[("tenant", "few-requests"), ("priority", "0")]), 4.0);
    assert_idle(&r.url).await;
}

/// Completion order of requests sent one after another (each starts 30 ms after the last).
async fn finish_order(url: &str, sends: &[(&'static str, &'static str, Value)]) -> Vec<&'static str> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for (label, key, body) in sends.iter().cloned() {
        let (url, tx) = (url.to_string(), tx.clone());
        tokio::spawn(async move {
            let (status, _, v) = post_as(&url, key, &body).await;
            assert_eq!(status, 200, "{label}: {v}");
            tx.send(label).unwrap();
        });
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let mut order = Vec::new();
    for _ in sends {
        order.push(rx.recv().await.unwrap());
    }
    order
}

#[tokio::test]
async fn a_high_priority_request_passes_a_queue_of_low_ones_at_a_saturated_engine() {
    let file =
        tenants_file("tenants:\n  - name: batch\n    keys: [sk-b]\n    priority: 10\n  - name: chat\n    keys: [sk-c]\n    priority: 0\n");
    let p = Proc::sim(&["--role", "prefill"]).await;
    // One request at a time, 200 ms each: the engine is full from the first request.
    let d = Proc::sim(&["--role", "decode", "--max-num-seqs", "1", "--decode-ms-per-token", "20"]).await;
    let long = json!({"prompt": "work", "max_tokens": 10, "ignore_eos": true});
    let mut sends: Vec<(&str, &str, Value)> = ["b1", "b2", "b3", "b4", "b5"].iter().map(|l| (*l, "sk-b", long.clone())).collect();
    sends.push(("chat", "sk-c", long.clone()));
    // FIFO (no flow control): the engine's own queue serves the chat request last.
    let fifo = router(&["--prefill", &p.url, "--decode", &d.url, "--client-api-key", "sk-b", "--client-api-key", "sk-c"]).await;
    let order = finish_order(&format!("{}/v1/completions", fifo.url), &sends).await;
    assert_eq!(order.last(), Some(&"chat"), "{order:?}");
    drop(fifo);
    // Held at the router while the decode's queue is at 1: the chat request goes next.
    let r = router(&["--prefill", &p.url, "--decode", &d.url, "--tenants", &file, "--engine-queue-threshold", "1"]).await;
    let order = finish_order(&format!("{}/v1/completions", r.url), &sends).await;
    let at = order.iter().position(|l| *l == "chat").unwrap();
    assert!(at <= 2, "at most the running request and the one the engine holds go before it: {order:?}");
    let w = workers(&r.url).await;
    assert_eq!(w["workers"][1]["queue_threshold"], 1, "{w}");
    assert_idle(&r.url).await;
}

#[tokio::test]
async fn priority_reaches_engines_that_schedule_by_it() {
    let file = tenants_file("tenants:\n  - name: batch\n    keys: [sk-b]\n    priority: 10\n    best_priority: 5\n");
    let (purl, prefill) = Capture::default().start().await;
    let (durl, decode) = Capture::default().start().await;
    let r = router(&["--prefill", &purl, "--decode", &durl, "--tenants", &file]).await;
    let url = format!("{}/v1/completions", r.url);
    for (asked, carried) in [(None, "10"), (Some(json!(7)), "7"), (Some(json!(0)), "5"), (Some(json!("6")), "6")] {
        let mut body = json!({"prompt": "hi", "max_tokens": 2});
        if let Some(p) = asked.clone() {
            body["priority"] = p;
        }
        let (status, _, v) = post_as(&url, "sk-b", &body).await;
        assert_eq!(status, 200, "{v}");
        for seen in [prefill.seen.lock().unwrap().last().cloned(), decode.seen.lock().unwrap().last().cloned()] {
            let leg: Value = serde_json::from_slice(&seen.unwrap().body).unwrap();
            assert_eq!(leg["priority"].to_string(), carried, "asked {asked:?}: {leg}");
        }
    }
    // The header, when the body names none; a priority that is not an integer is a 400.
    let resp = client()
        .post(&url)
        .bearer_auth("sk-b")
        .header("x-priority", "8")
        .json(&json!({"prompt": "hi", "max_tokens": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let leg: Value = serde_json::from_slice(&decode.seen.lock().unwrap().last().unwrap().body).unwrap();
    assert_eq!(leg["priority"], 8);
    let (status, _, v) = post_as(&url, "sk-b", &json!({"prompt": "hi", "priority": 1.5})).await;
    assert_eq!(status, 400, "{v}");
}

#[tokio::test]
async fn fair_shares_follow_weights_over_a_minute() {
    let file =
        tenants_file("tenants:\n  - name: light\n    keys: [sk-l]\n    weight: 1\n  - name: heavy\n    keys: [sk-h]\n    weight: 3\n");
    let w = Proc::sim(&["--max-num-seqs", "2", "--decode-ms-per-token", "10"]).await;
    let r = router(&["--worker-urls", &w.url, "--tenants", &file, "--engine-queue-threshold", "1"]).await;
    let url = format!("{}/v1/completions", r.url);
    let until = Instant::now() + Duration::from_secs(60);
    // Both tenants keep 6 requests waiting all the time: both are backlogged.
    let clients = ["sk-l", "sk-h"].iter().flat_map(|key| (0..6).map(move |_| *key)).map(|key| {
        let url = url.clone();
        tokio::spawn(async move {
            let mut done = 0u32;
            while Instant::now() < until {
                let (status, _, v) = post_as(&url, key, &json!({"prompt": "same size", "max_tokens": 4, "ignore_eos": true})).await;
                assert_eq!(status, 200, "{v}");
                done += 1;
            }
            (key, done)
        })
    });
    let (mut light, mut heavy) = (0, 0);
    for c in futures_util::future::join_all(clients).await {
        match c.unwrap() {
            ("sk-l", n) => light += n,
            (_, n) => heavy += n,
        }
    }
    let share = f64::from(heavy) / f64::from(light + heavy);
    assert!((share - 0.75).abs() <= 0.075, "heavy's share {share:.3} of {} requests, weights 3:1", light + heavy);
    assert_idle(&r.url).await;
}

#[tokio::test]
async fn a_tenants_queue_is_bounded_while_another_is_served_and_the_file_reloads() {
    let file =
        tenants_file("tenants:\n  - name: flood\n    keys: [sk-f]\n    limits: {max_queued: 2}\n  - name: other\n    keys: [sk-o]\n");
    let w = Proc::sim(&["--max-num-seqs", "1", "--decode-ms-per-token", "20"]).await;
    let r = router(&["--worker-urls", &w.url, "--tenants", &file, "--engine-queue-threshold", "1"]).await;
    let url = format!("{}/v1/completions", r.url);
    let slow = json!({"prompt": "x", "max_tokens": 10, "ignore_eos": true});
    let flood: Vec<_> = (0..8)
        .map(|_| {
            let (url, slow) = (url.clone(), slow.clone());
            tokio::spawn(async move { post_as(&url, "sk-f", &slow).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (status, _, v) = post_as(&url, "sk-o", &json!({"prompt": "y", "max_tokens": 2})).await;
    assert_eq!(status, 200, "the other tenant is served while flood's queue is full: {v}");
    let mut statuses = Vec::new();
    for f in flood {
        let (status, h, v) = f.await.unwrap();
        if status == 429 {
            assert!(v["error"]["message"].as_str().unwrap().contains("tenant flood"), "{v}");
            assert!(h.get("retry-after").is_some());
        }
        statuses.push(status);
    }
    let refused = statuses.iter().filter(|s| **s == 429).count();
    let served = statuses.iter().filter(|s| **s == 200).count();
    assert_eq!(refused + served, 8, "{statuses:?}");
    assert!(refused >= 4 && served >= 3, "at most 1 sent + 1 at the engine + 2 queued at a time: {statuses:?}");

    // The file changes: a new key, a limit; the router takes both without a restart.
    std::fs::write(&file, "tenants:\n  - name: flood\n    keys: [sk-f2]\n    limits: {requests_per_minute: 1}\n").unwrap();
    let reloaded =
        eventually(Duration::from_secs(10), || async { post_as(&url, "sk-f2", &json!({"prompt": "z", "max_tokens": 1})).await.0 == 200 })
            .await;
    assert!(reloaded, "the new key is taken");
    assert_eq!(post_as(&url, "sk-f2", &json!({"prompt": "z", "max_tokens": 1})).await.0, 429, "the new limit holds");
    assert_eq!(post_as(&url, "sk-f", &json!({"prompt": "z", "max_tokens": 1})).await.0, 401, "the old key is gone");
    assert_idle(&r.url).await;
}

/// Twelve requests at once over four APIs as two tenants, through a router holding them at
/// a threshold of 1: every one answered, and every slot, leg and claim on the engines'
/// room given back after.
async fn every_api_through(router: &str, admin: &str) {
    let apis = [
        ("/v1/completions", json!({"prompt": "hello there", "max_tokens": 6})),
        ("/v1/chat/completions", json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 6})),
        ("/v1/messages", json!({"model": "sim-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6})),
        ("/v1/responses", json!({"input": "hi", "max_output_tokens": 6})),
    ];
    let sends = (0..12).map(|i| {
        let (path, body) = apis[i % 4].clone();
        let url = format!("{router}{path}");
        let key = if i % 2 == 0 { "sk-b" } else { "sk-c" };
        tokio::spawn(async move { (path, post_as(&url, key, &body).await) })
    });
    for done in futures_util::future::join_all(sends).await {
        let (path, (status, _, v)) = done.unwrap();
        assert_eq!(status, 200, "{path}: {v}");
    }
    assert_idle_as(router, Some(admin)).await;
    let w = workers_as(router, Some(admin)).await;
    for worker in w["workers"].as_array().unwrap() {
        assert!(worker["ranks_queue"].as_array().unwrap().iter().all(|q| q == 0), "a leg still counted: {w}");
    }
}

#[tokio::test]
async fn every_connector_and_api_under_flow_control_and_workers_added_at_runtime() {
    let file =
        tenants_file("tenants:\n  - name: batch\n    keys: [sk-b]\n    priority: 10\n  - name: chat\n    keys: [sk-c]\n    priority: 0\n");
    let slow = ["--decode-ms-per-token", "5"];
    let flow = ["--tenants", file.as_str(), "--engine-queue-threshold", "1", "--admin-api-key", "adm", "--policy", "cache_aware"];
    // NIXL, and a decode added through the admin API under load takes requests.
    let p = Proc::sim(&["--role", "prefill"]).await;
    let d = Proc::sim(&[&["--role", "decode"][..], &slow].concat()).await;
    let mut args = vec!["--prefill", p.url.as_str(), "--decode", d.url.as_str()];
    args.extend(flow);
    let r = router(&args).await;
    every_api_through(&r.url, "adm").await;
    let d2 = Proc::sim(&[&["--role", "decode"][..], &slow].concat()).await;
    let added = client().post(format!("{}/add_worker?url={}&role=decode", r.url, d2.url)).bearer_auth("adm").send().await.unwrap();
    assert!(added.status().is_success(), "{}", added.text().await.unwrap());
    assert!(
        eventually(Duration::from_secs(10), || async {
            workers_as(&r.url, Some("adm")).await["workers"].as_array().unwrap().iter().all(|w| w["healthy"] == true)
        })
        .await
    );
    every_api_through(&r.url, "adm").await;
    assert!(served(&d2.url).await > 0.0, "the added decode was given work");

    // Mooncake: both legs at once.
    let mp = Proc::sim(&["--role", "prefill", "--kv-connector", "mooncake", "--mooncake-bootstrap-port", "0"]).await;
    let md = Proc::sim(&[&["--role", "decode", "--kv-connector", "mooncake"][..], &slow].concat()).await;
    let bootstrap_port =
        mp.banner.split_whitespace().find_map(|w| w.strip_prefix("bootstrap_port=")).expect("the banner names it").to_string();
    let mut args = vec!["--kv-connector", "mooncake", "--prefill", mp.url.as_str(), bootstrap_port.as_str(), "--decode", md.url.as_str()];
    args.extend(flow);
    let r = router(&args).await;
    every_api_through(&r.url, "adm").await;

    // P2pNccl: engines register over ZMQ.
    let discovery = format!("127.0.0.1:{}", free_port_run(1));
    let mut args = vec!["--vllm-pd-disaggregation", "--vllm-discovery-address", discovery.as_str()];
    args.extend(flow);
    let r = router_unready(&args).await;
    let _sims = [
        Proc::sim(&["--role", "prefill", "--kv-connector", "p2pnccl", "--proxy-address", &discovery]).await,
        Proc::sim(&[&["--role", "decode", "--kv-connector", "p2pnccl", "--proxy-address", &discovery][..], &slow].concat()).await,
    ];
    assert!(eventually(Duration::from_secs(10), || async { get(&format!("{}/health", r.url)).await.0 == 200 }).await);
    every_api_through(&r.url, "adm").await;
}

/// kv_aware still picks the pair; flow control only decides when: second turns under a
/// threshold find their first turns' prefixes on the ranks that hold them.
#[tokio::test]
async fn kv_aware_picks_the_holder_under_flow_control() {
    use crate::kv_aware::{hits, prompt, publishing_sim_with, BLOCK};
    let file = tenants_file("tenants:\n  - name: batch\n    keys: [sk-b]\n    priority: 10\n");
    let p1 = publishing_sim_with("prefill", 1, &[]).await;
    let p2 = publishing_sim_with("prefill", 1, &[]).await;
    let d = Proc::sim(&["--role", "decode", "--block-size", &BLOCK.to_string()]).await;
    let args =
        ["--prefill", &p1.url, "--prefill", &p2.url, "--decode", &d.url, "--prefill-policy", "kv_aware", "--decode-policy", "round_robin"];
    let r = router(&[&args[..], &["--tenants", &file, "--engine-queue-threshold", "2"]].concat()).await;
    let url = format!("{}/v1/completions", r.url);
    tokio::time::sleep(Duration::from_secs(1)).await;
    for tag in 0..4 {
        let (status, _, v) = post_as(&url, "sk-b", &json!({"prompt": prompt(tag, 4, &[1, 2]), "max_tokens": 2, "ignore_eos": true})).await;
        assert_eq!(status, 200, "{v}");
    }
    let before = hits(&p1, 0).await + hits(&p2, 0).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    // In another order than the first turns (round robin would now miss every one).
    for tag in [1, 2, 3, 0] {
        let (status, _, v) = post_as(&url, "sk-b", &json!({"prompt": prompt(tag, 4, &[3, 4]), "max_tokens": 2, "ignore_eos": true})).await;
        assert_eq!(status, 200, "{v}");
    }
    let gained = hits(&p1, 0).await + hits(&p2, 0).await - before;
    assert_eq!(gained, (4 * 4 * BLOCK) as f64, "every second turn found its 4 blocks where its first turn left them");
    assert_idle(&r.url).await;
}
