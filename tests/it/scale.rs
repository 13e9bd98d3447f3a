//! The router at cluster scale, kept small enough for CI: 64 workers x 8 DP ranks with KV
//! events, all in one simulator process (`disagg sim --instances`), behind kv_aware, with
//! workers added and removed through the admin API while requests run.
//! (`cargo bench --bench scale` measures 2 to 1,024 workers; docs/PERFORMANCE.md.)

use std::collections::HashSet;
use std::time::Duration;

use futures_util::future::join_all;
use serde_json::json;

use crate::support::*;

const EVENTS: &str = r#"{"enable_kv_cache_events":true,"publisher":"zmq","endpoint":"tcp://*:0","topic":"kv-events"}"#;
const KEY: &str = "scale-admin";

/// Token ids (kv_aware keys them as they are): 128 shared by the group, then 8 of its own.
fn prompt(group: usize, i: usize) -> Vec<u32> {
    let shared = (0..128).map(|t| 1000 + (group * 128 + t) as u32);
    shared.chain((0..8).map(|t| 50_000 + (i * 8 + t) as u32)).collect()
}

/// The router's /metrics (behind the admin key here).
async fn router_metrics(router: &str) -> String {
    get_as(&format!("{router}/metrics"), KEY).await.1
}

async fn complete(router: &str, tokens: &[u32]) -> u16 {
    post(&format!("{router}/v1/completions"), &json!({"model": "sim-model", "prompt": tokens, "max_tokens": 4})).await.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_workers_of_eight_ranks_in_one_simulator_behind_kv_aware_under_churn() {
    let (sim, urls) = Proc::sim_instances(80, &["--data-parallel-size", "8", "--kv-blocks", "1024", "--kv-events-config", EVENTS]).await;
    // Each instance its own engine: its own port, its own side channels.
    assert_eq!(urls.iter().collect::<HashSet<_>>().len(), 80, "80 distinct URLs");
    let (a, b) = (get(&format!("{}/kv_event_sources", urls[0])).await.1, get(&format!("{}/kv_event_sources", urls[1])).await.1);
    assert!(a.contains("tcp://") && a != b, "each instance publishes on its own ports: {a} / {b}");
    let (prefills, rest) = urls.split_at(32);
    let (decodes, spare) = rest.split_at(32);
    let mut args = vec!["--vllm-pd-disaggregation", "--policy", "kv_aware", "--intra-node-data-parallel-size", "8", "--admin-api-key", KEY];
    for p in prefills {
        args.extend(["--prefill", p]);
    }
    for d in decodes {
        args.extend(["--decode", d]);
    }
    let r = router(&args).await;
    let all_up = eventually(Duration::from_secs(20), || async {
        metric(&router_metrics(&r.url).await, "disagg_router_worker_healthy", &[]) == 64.0
    })
    .await;
    assert!(all_up, "all 64 workers healthy: {}", metric(&router_metrics(&r.url).await, "disagg_router_worker_healthy", &[]));

    // Requests over eight prompt groups, 16 at a time: every one answered.
    for wave in 0..4 {
        let statuses = join_all((0..16).map(|i| {
            let url = r.url.clone();
            async move { complete(&url, &prompt(i % 8, wave * 16 + i)).await }
        }))
        .await;
        assert!(statuses.iter().all(|s| *s == 200), "wave {wave}: {statuses:?}");
    }
    let indexed = eventually(Duration::from_secs(10), || async {
        let m = router_metrics(&r.url).await;
        metric(&m, "disagg_router_kv_index_blocks", &[]) > 0.0 && metric(&m, "disagg_router_kv_event_batches_total", &[]) > 0.0
    })
    .await;
    let m = router_metrics(&r.url).await;
    let kv: Vec<&str> = m.lines().filter(|l| l.contains("kv_")).take(12).collect();
    assert!(indexed, "the index took the engines' events: {kv:#?}");

    // kv_aware over 256 prefill ranks: a prompt seen once goes back to the prefill that holds it.
    let repeated = prompt(99, 0);
    let indexed_of = |w: serde_json::Value| -> Vec<(String, u64)> {
        w["workers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| {
                let blocks = w["kv_events"].as_array().map_or(0, |ks| ks.iter().filter_map(|k| k["indexed_blocks"].as_u64()).sum());
                (w["url"].as_str().unwrap().to_string(), blocks)
            })
            .collect()
    };
    let indexed_before = indexed_of(workers_as(&r.url, Some(KEY)).await);
    let before: Vec<f64> = join_all(prefills.iter().map(|p| served(p))).await;
    assert_eq!(complete(&r.url, &repeated).await, 200);
    let after: Vec<f64> = join_all(prefills.iter().map(|p| served(p))).await;
    let holder = (0..32).find(|i| after[*i] > before[*i]).expect("one prefill served it");
    let holder_before = indexed_before.iter().find(|(u, _)| *u == prefills[holder]).map_or(0, |(_, n)| *n);
    let held = eventually(Duration::from_secs(5), || async {
        let w = workers_as(&r.url, Some(KEY)).await;
        let blocks = |w: &serde_json::Value| -> u64 {
            w["kv_events"].as_array().map_or(0, |ks| ks.iter().filter_map(|k| k["indexed_blocks"].as_u64()).sum())
        };
        let holder_now = w["workers"].as_array().unwrap().iter().find(|w| w["url"] == prefills[holder].as_str()).map_or(0, blocks);
        holder_now >= holder_before + 5
    })
    .await;
    assert!(held, "the holder's blocks are indexed");
    let skipped = |m: &str| metric(m, "disagg_router_kv_aware_total", &[("outcome", "prefill_skipped")]);
    let skipped_before = skipped(&router_metrics(&r.url).await);
    for _ in 0..4 {
        assert_eq!(complete(&r.url, &repeated).await, 200);
    }
    let again: Vec<f64> = join_all(prefills.iter().map(|p| served(p))).await;
    let elsewhere: f64 = (0..32).filter(|i| *i != holder).map(|i| again[i] - after[i]).sum();
    let skipped_now = skipped(&router_metrics(&r.url).await) - skipped_before;
    // Each repeat went to the prefill that holds the prompt, or to no prefill at all (the
    // decode that pulled its KV holds it too: kv_aware's prefill_skipped).
    assert_eq!((elsewhere, again[holder] - after[holder] + skipped_now), (0.0, 4.0), "repeats of a held prompt");

    // Churn: the 16 spare engines join as decodes and leave again, one every few ms, while
    // 64 requests run: none lost, and the pools end as they began.
    let admin = |path: String| {
        let url = format!("{}{path}", r.url);
        async move {
            let resp = client().post(&url).bearer_auth(KEY).send().await.unwrap();
            resp.status().as_u16()
        }
    };
    let churn = async {
        for round in 0..3 {
            for s in spare {
                assert_eq!(admin(format!("/add_worker?url={s}&role=decode&dp_size=8")).await, 200, "round {round}: add {s}");
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
            for s in spare {
                assert_eq!(admin(format!("/remove_worker?url={s}")).await, 200, "round {round}: remove {s}");
            }
        }
    };
    let load = join_all((0..64).map(|i| {
        let url = r.url.clone();
        async move { complete(&url, &prompt(i % 8, 1000 + i)).await }
    }));
    let (_, statuses) = tokio::join!(churn, load);
    assert!(statuses.iter().all(|s| *s == 200), "under churn: {statuses:?}");
    let w = workers_as(&r.url, Some(KEY)).await;
    assert_eq!(w["workers"].as_array().unwrap().len(), 64, "the spares left again");
    assert_idle_as(&r.url, Some(KEY)).await;
    drop(sim);
}
