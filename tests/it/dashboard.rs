//! The Grafana dashboard and Prometheus rules in deploy/, on a real Prometheus (Debian's,
//! installed by scripts/deps.sh) scraping a router and simulated engines under load: every
//! rule loads (promtool, and Prometheus' own rule manager), every dashboard query returns
//! data, and every metric it names exists on a /metrics page it scrapes.

use std::time::Duration;

use serde_json::{json, Value};

use crate::kv_aware::{prompt, publishing_sim_with};
use crate::support::*;

const DEPLOY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy");

/// The dashboard's queries, as Grafana would send them over a 15 s rate window.
fn dashboard_queries() -> Vec<String> {
    let dash: Value = serde_json::from_str(&std::fs::read_to_string(format!("{DEPLOY}/grafana/disagg-pd.json")).unwrap()).unwrap();
    let mut out = Vec::new();
    for p in dash["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().into_iter().flatten() {
            out.push(t["expr"].as_str().unwrap().replace("$__rate_interval", "15s"));
        }
    }
    out
}

/// The metric names an expression reads (the router's, vLLM's, and Prometheus' own `up`).
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let is_name = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    for (i, _) in expr.match_indices(['d', 'v', 'u']) {
        if i > 0 && is_name(expr[..i].chars().last().unwrap()) {
            continue;
        }
        let word: String = expr[i..].chars().take_while(|c| is_name(*c)).collect();
        if word.starts_with("disagg_router_") || word.starts_with("vllm:") || word == "up" {
            let base = ["_bucket", "_count", "_sum"].iter().fold(word.clone(), |w, s| w.strip_suffix(s).map_or(w.clone(), str::to_owned));
            names.push(base);
        }
    }
    names
}

async fn query(prom: &str, expr: &str) -> Vec<Value> {
    let v: Value = client().get(format!("{prom}/api/v1/query")).query(&[("query", expr)]).send().await.unwrap().json().await.unwrap();
    assert_eq!(v["status"], "success", "{expr}: {v}");
    v["data"]["result"].as_array().cloned().unwrap_or_default()
}

#[tokio::test]
async fn the_dashboard_and_rules_hold_on_a_real_prometheus() {
    assert!(std::path::Path::new("/usr/bin/prometheus").exists(), "no Prometheus: run scripts/deps.sh");
    let rules = format!("{DEPLOY}/prometheus/disagg-rules.yml");
    let checked = std::process::Command::new("promtool").args(["check", "rules", &rules]).output().unwrap();
    assert!(checked.status.success(), "{}", String::from_utf8_lossy(&checked.stderr));

    // A cluster: two prefills publishing KV events (kv_aware), one failing half its
    // prefills (retries, errors), a decode; a tenant; the router's admin key.
    let p1 = publishing_sim_with("prefill", 1, &[]).await;
    let p2 = publishing_sim_with("prefill", 1, &[]).await;
    let flaky = Proc::sim(&["--role", "prefill", "--fail-rate", "0.5", "--fail-status", "500", "--block-size", "16"]).await;
    let d = Proc::sim(&["--role", "decode", "--block-size", "16", "--enable-prompt-tokens-details"]).await;
    let tenants = temp_dir("dash").join("tenants.yaml");
    std::fs::write(&tenants, "tenants:\n  - name: team-a\n    keys: [sk-a]\n").unwrap();
    let r = router(&[
        "--prefill",
        &p1.url,
        "--prefill",
        &p2.url,
        "--prefill",
        &flaky.url,
        "--decode",
        &d.url,
        "--prefill-policy",
        "kv_aware",
        "--decode-policy",
        "round_robin",
        "--tenants",
        tenants.to_str().unwrap(),
        "--admin-api-key",
        "adm",
    ])
    .await;

    let dir = temp_dir("prometheus");
    let port = free_port();
    let host = |u: &str| u.trim_start_matches("http://").to_string();
    let config = format!(
        "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\nrule_files: [{rules}]\nscrape_configs:\n  \
         - job_name: disagg-router\n    authorization: {{credentials: adm}}\n    static_configs: [{{targets: ['{}']}}]\n  \
         - job_name: vllm\n    static_configs:\n      - targets: ['{}', '{}', '{}']\n        labels: {{role: prefill}}\n      \
         - targets: ['{}']\n        labels: {{role: decode}}\n",
        host(&r.url),
        host(&p1.url),
        host(&p2.url),
        host(&flaky.url),
        host(&d.url)
    );
    std::fs::write(dir.join("prometheus.yml"), config).unwrap();
    let mut prometheus = tokio::process::Command::new("prometheus")
        .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
        .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stderr(std::fs::File::create(dir.join("prometheus.log")).unwrap())
        .kill_on_drop(true)
        .spawn()
        .expect("start prometheus");
    let prom = format!("http://127.0.0.1:{port}");
    let ready = eventually(Duration::from_secs(20), || async {
        client().get(format!("{prom}/-/ready")).send().await.is_ok_and(|r| r.status().is_success())
    })
    .await;
    assert!(ready, "{}", std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default());

    // Load: shared prefixes (kv_aware hits), streamed and whole, as the tenant; some bad
    // requests (errors by cause).
    let url = format!("{}/v1/completions", r.url);
    let load = async {
        for i in 0..120u32 {
            let body = json!({"model": "sim-model", "prompt": prompt(i % 4, 3, &[i]), "max_tokens": 4, "stream": i % 3 == 0});
            let resp = client().post(&url).bearer_auth("sk-a").json(&body).send().await.unwrap();
            let _ = resp.bytes().await;
            if i % 20 == 0 {
                let bad = json!({"model": "sim-model", "prompt": "x", "max_tokens": -1});
                let _ = client().post(&url).bearer_auth("sk-a").json(&bad).send().await.unwrap().bytes().await;
            }
            tokio::time::sleep(Duration::from_millis(60)).await;
        }
    };
    load.await;

    // Every metric the dashboard names is on a page Prometheus scrapes.
    let mut pages = client().get(format!("{}/metrics", r.url)).bearer_auth("adm").send().await.unwrap().text().await.unwrap();
    for s in [&p1, &d] {
        pages.push_str(&metrics(&s.url).await);
    }
    let queries = dashboard_queries();
    assert!(queries.len() >= 25, "{} queries", queries.len());
    for q in &queries {
        for name in metric_names(q) {
            assert!(name == "up" || pages.contains(&format!("# TYPE {name} ")), "{name} (in {q}) is on no /metrics page");
        }
    }
    // Every query returns data (a few scrapes in, the rates have two points).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let empty = loop {
        let mut empty = Vec::new();
        for q in &queries {
            if query(&prom, q).await.is_empty() {
                empty.push(q.clone());
            }
        }
        if empty.is_empty() || std::time::Instant::now() > deadline {
            break empty;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(empty.is_empty(), "queries without data: {empty:#?}");
    // Every rule is loaded and evaluates.
    let v: Value = client().get(format!("{prom}/api/v1/rules")).send().await.unwrap().json().await.unwrap();
    let loaded: Vec<&Value> = v["data"]["groups"].as_array().unwrap().iter().flat_map(|g| g["rules"].as_array().unwrap()).collect();
    let in_file = std::fs::read_to_string(&rules).unwrap().matches("- record:").count()
        + std::fs::read_to_string(&rules).unwrap().matches("- alert:").count();
    assert_eq!(loaded.len(), in_file, "{v}");
    let evaluated = eventually(Duration::from_secs(10), || async {
        let v: Value = client().get(format!("{prom}/api/v1/rules")).send().await.unwrap().json().await.unwrap();
        v["data"]["groups"].as_array().unwrap().iter().flat_map(|g| g["rules"].as_array().unwrap().clone()).all(|r| r["health"] == "ok")
    })
    .await;
    assert!(
        evaluated,
        "a rule does not evaluate: {}",
        client().get(format!("{prom}/api/v1/rules")).send().await.unwrap().text().await.unwrap()
    );
    assert!(!query(&prom, "disagg:ttft_seconds:p99_5m").await.is_empty(), "the recording rules record");
    let _ = prometheus.kill().await;
}
