//! `disagg route` passing vLLM's other APIs through (flow/passthrough.rs) on simulators:
//! the shared case, client keys on every passed-through path, a dead worker left for a
//! live one, and --passthrough-pool.

use std::time::Duration;

use serde_json::json;

use crate::passthrough::passes_through;
use crate::support::*;

#[tokio::test]
async fn vllm_apis_pass_through_to_one_worker() {
    let p = Proc::sim(&["--role", "prefill"]).await;
    let d = Proc::sim(&["--role", "decode"]).await;
    let r = router(&["--prefill", &p.url, "--decode", &d.url]).await;
    passes_through(&r.url, &p.url, "sim-model").await;
    assert_idle(&r.url).await;
}

#[tokio::test]
async fn passed_through_paths_need_client_keys_and_survive_a_dead_worker() {
    let mut gone = Proc::sim(&["--role", "prefill"]).await;
    let p = Proc::sim(&["--role", "prefill"]).await;
    let d = Proc::sim(&["--role", "decode"]).await;
    // Slow health checks: the dead prefill is found by a request, not by a check.
    let r = router(&[
        "--health-check-interval-secs",
        "60",
        "--policy",
        "round_robin",
        "--client-api-key",
        "k1",
        "--prefill",
        &gone.url,
        "--prefill",
        &p.url,
        "--decode",
        &d.url,
    ])
    .await;
    gone.kill();
    gone.wait_exit(Duration::from_secs(5)).await;
    let body = json!({"prompt": "keys first"});
    let url = format!("{}/tokenize", r.url);
    let (status, err) = post(&url, &body).await;
    assert_eq!(status, 401, "{err}");
    assert_eq!(get(&format!("{}/version", r.url)).await.0, 401);
    assert_eq!(post_with(&url, &body, &[("authorization", "Bearer wrong")]).await.0, 401);
    // Either spelling of the key; every request answered, the dead prefill left for the live one.
    for i in 0..4 {
        let header = if i % 2 == 0 { ("x-api-key", "k1") } else { ("authorization", "Bearer k1") };
        let (status, v) = post_with(&url, &body, &[header]).await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v, post(&format!("{}/tokenize", p.url), &body).await.1);
    }
    assert_idle_as(&r.url, None).await;
}

#[tokio::test]
async fn passthrough_pool_picks_which_pool_serves_a_group() {
    let d = Proc::sim(&["--role", "decode"]).await;
    let nowhere = format!("http://127.0.0.1:{}", free_port());
    let body = json!({"prompt": "which pool"});
    // Tokenizer paths go to prefills by default: there is none alive.
    let default = router_unready(&["--prefill", &nowhere, "--decode", &d.url]).await;
    let (status, err) = post(&format!("{}/tokenize", default.url), &body).await;
    assert!(status == 503 || status == 502, "{status} {err}");
    let moved = router_unready(&["--passthrough-pool", "tokenizer=decode", "--prefill", &nowhere, "--decode", &d.url]).await;
    let url = format!("{}/tokenize", moved.url);
    assert!(eventually(Duration::from_secs(10), || async { post(&url, &body).await.0 == 200 }).await, "{:?}", post(&url, &body).await);
    let refused = std::process::Command::new(env!("CARGO_BIN_EXE_disagg"))
        .args(["route", "--passthrough-pool", "chat=decode", "--prefill", &nowhere, "--decode", &d.url])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && stderr.contains("no path group"), "{stderr}");
}
