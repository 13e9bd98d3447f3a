//! `--policy kv_aware`'s index over its engines' lives: a worker that leaves takes its
//! entries and one that joins is subscribed, lost events are replayed, a restarted engine
//! leaves nothing stale, and two routers build the same index from the same events.

use std::time::Duration;

use serde_json::json;

use crate::kv_aware::*;
use crate::support::*;

#[tokio::test]
async fn a_worker_that_leaves_takes_its_entries_and_one_that_joins_is_subscribed() {
    let p1 = publishing_sim("prefill", 1).await;
    let d = Proc::sim(&["--role", "decode", "--block-size", &BLOCK.to_string()]).await;
    let r = router_with_env(&["--prefill", &p1.url, "--decode", &d.url, "--policy", "kv_aware", "--admin-api-key", ADMIN_KEY], &[]).await;
    let url = r.url.clone();
    let (status, v) = post(&format!("{url}/v1/completions"), &json!({"prompt": prompt(9, 3, &[]), "max_tokens": 2})).await;
    assert_eq!(status, 200, "{v}");
    assert!(
        eventually(Duration::from_secs(5), || async { indexed(&url).await.iter().any(|(_, _, n)| *n >= 3) }).await,
        "{:?}",
        indexed(&url).await
    );
    // A second prefill joins through the admin API: subscribed without a restart.
    let p2 = publishing_sim("prefill", 1).await;
    let add = client().post(format!("{url}/add_worker?url={}&role=prefill", p2.url)).bearer_auth(ADMIN_KEY).send().await.unwrap();
    assert_eq!(add.status().as_u16(), 200, "{}", add.text().await.unwrap());
    let p2_url = p2.url.clone();
    assert!(
        eventually(Duration::from_secs(10), || async {
            workers_list(&url).await["workers"]
                .as_array()
                .unwrap()
                .iter()
                .any(|w| w["url"] == p2_url.as_str() && w["kv_events"].as_array().is_some_and(|a| !a.is_empty()))
        })
        .await
    );
    // The first leaves: its entries go.
    let del = client().delete(format!("{url}/workers/{}", urlencode(&p1.url))).bearer_auth(ADMIN_KEY).send().await.unwrap();
    assert_eq!(del.status().as_u16(), 200, "{}", del.text().await.unwrap());
    let p1_url = p1.url.clone();
    assert!(
        eventually(Duration::from_secs(5), || async { !indexed(&url).await.iter().any(|(u, _, _)| *u == p1_url) }).await,
        "{:?}",
        indexed(&url).await
    );
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| if b.is_ascii_alphanumeric() || b"-._~".contains(&b) { (b as char).to_string() } else { format!("%{b:02X}") })
        .collect()
}

/// Batches lost on the way (half of them, kept for replay) leave the index complete: the
/// router sees the sequence gaps and replays what it missed.
#[tokio::test]
async fn lost_events_are_replayed_and_routing_stays_exact() {
    let base = free_port_run(8);
    let lossy = |role: &'static str, base: u16| async move {
        Proc::sim(&[
            "--role",
            role,
            "--block-size",
            &BLOCK.to_string(),
            "--kv-events-config",
            &events_config(base),
            "--kv-events-drop-rate",
            "0.5",
        ])
        .await
    };
    let p1 = lossy("prefill", base).await;
    let p2 = lossy("prefill", free_port_run(8)).await;
    let d = Proc::sim(&["--role", "decode", "--block-size", &BLOCK.to_string()]).await;
    let r = kv_aware_router(&p1, &p2, &d).await;
    let url = r.url.clone();
    assert!(eventually(Duration::from_secs(10), || async { indexed_ranks(&url).await == 2 }).await);
    for tag in 0..8 {
        let (status, v) = post(&format!("{url}/v1/completions"), &json!({"prompt": prompt(100 + tag, 3, &[1]), "max_tokens": 1})).await;
        assert_eq!(status, 200, "{v}");
    }
    // One more batch on each, so that a lost last batch shows as a gap too.
    for tag in 0..4 {
        post(&format!("{url}/v1/completions"), &json!({"prompt": prompt(200 + tag, 1, &[]), "max_tokens": 1})).await;
    }
    assert!(
        eventually(Duration::from_secs(5), || async { indexed(&url).await.iter().map(|(_, _, n)| n).sum::<u64>() >= 28 }).await,
        "every block, lost batches included: {:?}",
        indexed(&url).await
    );
    let total_hits = || async { hits(&p1, 0).await + hits(&p2, 0).await };
    let before = total_hits().await;
    for tag in [5, 1, 7, 3, 0, 6, 2, 4] {
        let (status, v) = post(&format!("{url}/v1/completions"), &json!({"prompt": prompt(100 + tag, 3, &[2, 3]), "max_tokens": 1})).await;
        assert_eq!(status, 200, "{v}");
    }
    assert_eq!(total_hits().await - before, (8 * 3 * BLOCK) as f64, "every prefix found where the index said");
}

/// A prefill restarted on the same address: what the old engine held is forgotten, and
/// the new one's events are followed.
#[tokio::test]
async fn a_restarted_engine_leaves_no_stale_entries() {
    let (http, events) = (free_port_run(1), free_port_run(8));
    let start = || async move {
        Proc::start(&[
            "sim",
            "--port",
            &http.to_string(),
            "--role",
            "prefill",
            "--block-size",
            &BLOCK.to_string(),
            "--kv-events-config",
            &events_config(events),
        ])
        .await
    };
    let mut p = start().await;
    let d = Proc::sim(&["--role", "decode", "--block-size", &BLOCK.to_string()]).await;
    let r = router(&["--prefill", &p.url, "--decode", &d.url, "--prefill-policy", "kv_aware", "--decode-policy", "round_robin"]).await;
    let url = r.url.clone();
    let total = || async { indexed(&url).await.iter().map(|(_, _, n)| *n).sum::<u64>() };
    assert!(eventually(Duration::from_secs(10), || async { indexed_ranks(&url).await == 1 }).await);
    post(&format!("{url}/v1/completions"), &json!({"prompt": prompt(300, 5, &[]), "max_tokens": 1})).await;
    assert!(eventually(Duration::from_secs(5), || async { total().await == 5 }).await, "{:?}", indexed(&url).await);
    p.kill();
    let _ = p.wait_exit(Duration::from_secs(5)).await;
    let _p = start().await;
    // The old five blocks go; the new engine's two come.
    let (status, v) = loop {
        let (s, v) = post(&format!("{url}/v1/completions"), &json!({"prompt": prompt(301, 2, &[]), "max_tokens": 1})).await;
        if s == 200 {
            break (s, v);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(status, 200, "{v}");
    assert!(eventually(Duration::from_secs(8), || async { total().await == 2 }).await, "{:?}", indexed(&url).await);
}

/// Router replicas need no coordination: a second router that routed nothing builds the
/// same index from the same events, and routes the next turns to where the first router's
/// turns left their prefixes.
#[tokio::test]
async fn two_routers_build_the_same_index_from_the_same_events() {
    let (p1, p2) = (publishing_sim("prefill", 2).await, publishing_sim("prefill", 2).await);
    let d = Proc::sim(&["--role", "decode", "--block-size", &BLOCK.to_string(), "--enable-prompt-tokens-details"]).await;
    let args = [
        "--prefill",
        p1.url.as_str(),
        "--prefill",
        p2.url.as_str(),
        "--decode",
        d.url.as_str(),
        "--intra-node-data-parallel-size",
        "2",
        "--prefill-policy",
        "kv_aware",
        "--decode-policy",
        "round_robin",
    ];
    let (a, b) = (router(&args).await, router(&args).await);
    for r in [&a, &b] {
        let url = r.url.clone();
        assert!(eventually(Duration::from_secs(10), || async { indexed_ranks(&url).await == 4 }).await);
    }
    for tag in 0..6 {
        let (status, v) = post(&format!("{}/v1/completions", a.url), &json!({"prompt": prompt(700 + tag, 3, &[1]), "max_tokens": 1})).await;
        assert_eq!(status, 200, "{v}");
    }
    let sorted = |mut v: Vec<(String, u64, u64)>| {
        v.sort();
        v
    };
    let (a_url, b_url) = (a.url.clone(), b.url.clone());
    let same = eventually(Duration::from_secs(5), || async {
        let x = sorted(indexed(&a_url).await);
        x.iter().map(|e| e.2).sum::<u64>() >= 18 && x == sorted(indexed(&b_url).await)
    })
    .await;
    assert!(same, "{:?} vs {:?}", indexed(&a.url).await, indexed(&b.url).await);
    let mut before = 0.0;
    for p in [&p1, &p2] {
        before += hits(p, 0).await + hits(p, 1).await;
    }
    for tag in [4, 1, 5, 0, 3, 2] {
        let (status, v) =
            post(&format!("{}/v1/completions", b.url), &json!({"prompt": prompt(700 + tag, 3, &[2, 3]), "max_tokens": 1})).await;
        assert_eq!(status, 200, "{v}");
    }
    let mut after = 0.0;
    for p in [&p1, &p2] {
        after += hits(p, 0).await + hits(p, 1).await;
    }
    assert_eq!(after - before, (6 * 3 * BLOCK) as f64, "router B sent every turn where router A's turns were cached");
}
