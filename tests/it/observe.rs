//! Observability over loopback: traces over OTLP (gRPC and HTTP/protobuf, to a receiver
//! decoding the real wire format), the `traceparent` each engine gets naming its leg's
//! span, sampling; the access log's lines; JSON logs; `disagg top` in a real terminal.

use std::time::Duration;

use serde_json::{json, Value};

use crate::capture::Capture;
use crate::otlp::{ids_of, named, Receiver};
use crate::support::*;

const CLIENT_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

fn traceparent_seen(c: &Capture, path: &str) -> Vec<String> {
    c.requests(path).iter().map(|s| s.headers.get("traceparent").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default()).collect()
}

#[tokio::test]
async fn a_trace_per_request_continues_the_clients_and_names_each_legs_span_to_its_engine() {
    let rx = Receiver::start();
    let (p_url, p) = Capture::default().start().await;
    let (d_url, d) = Capture::default().start().await;
    let log = temp_dir("access").join("access.jsonl");
    let r =
        router(&["--prefill", &p_url, "--decode", &d_url, "--otlp-traces-endpoint", &rx.grpc, "--access-log", log.to_str().unwrap()]).await;
    let url = format!("{}/v1/completions", r.url);
    let resp = client()
        .post(&url)
        .header("traceparent", format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"))
        .header("x-request-id", "traced-1")
        .json(&json!({"model": "m", "prompt": "hello", "max_tokens": 4}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let spans = rx.trace(CLIENT_TRACE, Duration::from_secs(10), |s| s.len() >= 5).await.expect("the router's spans arrive over gRPC");
    let root = named(&spans, "POST /v1/completions");
    assert_eq!(root.len(), 1, "{spans:?}");
    let root = root[0];
    assert_eq!(root["parent_span_id"], CLIENT_SPAN, "the client's span is the router's parent");
    assert_eq!(root["service"], "disagg-router");
    assert_eq!(root["via"], "grpc");
    assert_eq!(root["attributes"]["disagg.request_id"], "traced-1");
    assert_eq!(root["attributes"]["gen_ai.request.model"], "m");
    assert_eq!(root["attributes"]["http.response.status_code"], 200);
    for name in ["queue", "prefill", "decode", "stream"] {
        let s = named(&spans, name);
        assert_eq!(s.len(), 1, "{name}: {spans:?}");
        assert_eq!(s[0]["parent_span_id"], root["span_id"], "{name} is the request's child");
        assert!(s[0]["start_ns"].as_u64() >= root["start_ns"].as_u64() && s[0]["end_ns"].as_u64() <= root["end_ns"].as_u64(), "{name}");
    }
    // Each engine got its own leg's span as its parent, in the client's trace.
    for (capture, path, leg) in [(&p, "/v1/completions", "prefill"), (&d, "/v1/completions", "decode")] {
        let seen = traceparent_seen(capture, path);
        assert_eq!(seen.len(), 1, "{leg}");
        let (trace, span, flags) = ids_of(&seen[0]);
        assert_eq!((trace.as_str(), flags.as_str()), (CLIENT_TRACE, "01"), "{leg}");
        assert_eq!(named(&spans, leg)[0]["span_id"], span, "{leg}: the engine's parent is the leg's span");
        assert_eq!(named(&spans, leg)[0]["attributes"]["server.address"], capture_url(leg, &p_url, &d_url));
    }

    // A streamed request without a traceparent starts a trace of its own.
    let (status, _) = post_stream(
        &format!("{}/v1/chat/completions", r.url),
        &json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": true}),
    )
    .await;
    assert_eq!(status, 200);
    // The access log: one line per request, in order, each with its legs and times.
    let lines = eventually_lines(&log, 2).await;
    let first: Value = serde_json::from_str(&lines[0]).unwrap();
    assert_eq!(first["request_id"], "traced-1");
    assert_eq!(first["endpoint"], "/v1/completions");
    assert_eq!(first["status"], 200);
    assert_eq!(first["prefill"]["url"], p_url);
    assert_eq!(first["decode"]["url"], d_url);
    assert_eq!(first["trace_id"], CLIENT_TRACE);
    assert_eq!(first["retries"], 0);
    for k in ["queue_ms", "prefill_ms", "kv_wait_ms", "first_token_ms", "total_ms"] {
        assert!(first[k].as_f64().is_some_and(|v| v >= 0.0), "{k}: {first}");
    }
    assert!(first["total_ms"].as_f64() >= first["first_token_ms"].as_f64());
    let second: Value = serde_json::from_str(&lines[1]).unwrap();
    assert_eq!(second["endpoint"], "/v1/chat/completions");
    let own_trace = second["trace_id"].as_str().expect("a sampled trace of its own").to_string();
    assert_ne!(own_trace, CLIENT_TRACE);
    let spans = rx.trace(&own_trace, Duration::from_secs(10), |s| s.len() >= 5).await.expect("the second trace arrives");
    assert_eq!(named(&spans, "POST /v1/chat/completions")[0]["parent_span_id"], "", "a root span");
    let (trace, _, _) = ids_of(&traceparent_seen(&d, "/v1/chat/completions")[0]);
    assert_eq!(trace, own_trace);
}

fn capture_url<'a>(leg: &str, p: &'a str, d: &'a str) -> &'a str {
    if leg == "prefill" {
        p
    } else {
        d
    }
}

async fn eventually_lines(path: &std::path::Path, n: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let ok = eventually(Duration::from_secs(5), || {
        lines = std::fs::read_to_string(path).unwrap_or_default().lines().map(str::to_owned).collect();
        let done = lines.len() >= n;
        async move { done }
    })
    .await;
    assert!(ok, "{n} access-log lines: {lines:?}");
    lines
}

#[tokio::test]
async fn over_http_protobuf_and_sampled_as_configured() {
    let rx = Receiver::start();
    let (p_url, p) = Capture::default().start().await;
    let (d_url, _d) = Capture::default().start().await;
    let env = [("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf")];
    let r = router_with_env(
        &["--prefill", &p_url, "--decode", &d_url, "--otlp-traces-endpoint", &rx.http, "--otlp-traces-sample-ratio", "0"],
        &env,
    )
    .await;
    let url = format!("{}/v1/completions", r.url);
    let body = json!({"model": "m", "prompt": "hi", "max_tokens": 2});
    // Ratio 0: a request of its own is not traced, and the engines are told so (flag 00).
    assert_eq!(post(&url, &body).await.0, 200);
    let (unsampled, _, flags) = ids_of(&traceparent_seen(&p, "/v1/completions")[0]);
    assert_eq!(flags, "00");
    // A client's sampled trace is followed all the same, and sent over HTTP/protobuf.
    let resp = client().post(&url).header("traceparent", format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01")).json(&body).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let spans = rx.trace(CLIENT_TRACE, Duration::from_secs(10), |s| s.len() >= 5).await.expect("spans over HTTP/protobuf");
    assert!(spans.iter().all(|s| s["via"] == "http"));
    assert!(rx.spans().iter().all(|s| s["trace_id"] != unsampled), "the unsampled request sent no span");
}

#[tokio::test]
async fn a_failed_leg_is_a_failed_span_and_a_retry_in_the_log() {
    let rx = Receiver::start();
    // A prefill that dies once the router has seen it healthy (no health check until the
    // test is over), and one that answers.
    let mut dying = Proc::sim(&["--role", "prefill"]).await;
    let closed = dying.url.clone();
    let (p_url, _p) = Capture::default().start().await;
    let (d_url, _d) = Capture::default().start().await;
    let log = temp_dir("access").join("access.jsonl");
    let r = router_unready(&[
        "--prefill",
        &closed,
        "--prefill",
        &p_url,
        "--decode",
        &d_url,
        "--policy",
        "round_robin",
        "--otlp-traces-endpoint",
        &rx.grpc,
        "--access-log",
        log.to_str().unwrap(),
        "--health-check-interval-secs",
        "60",
    ])
    .await;
    let health = format!("{}/health", r.url);
    assert!(eventually(Duration::from_secs(10), || async { get(&health).await.0 == 200 }).await);
    let both = eventually(Duration::from_secs(10), || async {
        workers(&r.url).await["workers"].as_array().unwrap().iter().all(|w| w["healthy"] == true)
    })
    .await;
    assert!(both, "{}", workers(&r.url).await);
    dying.kill();
    let url = format!("{}/v1/completions", r.url);
    let mut retried = None;
    for i in 0..4 {
        let resp = client()
            .post(&url)
            .header("traceparent", format!("00-{CLIENT_TRACE}-{:016x}-01", i + 1))
            .json(&json!({"model": "m", "prompt": "hi", "max_tokens": 2}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "the retry on the live prefill answers");
    }
    let lines = eventually_lines(&log, 4).await;
    for l in &lines {
        let v: Value = serde_json::from_str(l).unwrap();
        if v["retries"] == 1 {
            retried = Some(v);
        }
    }
    let v = retried.expect("one of the requests went to the closed prefill first");
    assert_eq!(v["failed_legs"][0]["leg"], "prefill");
    assert_eq!(v["failed_legs"][0]["url"], closed);
    assert_eq!(v["failed_legs"][0]["cause"], "connect");
    assert_eq!(v["prefill"]["url"], p_url);
    let spans = rx.trace(CLIENT_TRACE, Duration::from_secs(10), |s| named(s, "POST /v1/completions").len() == 4).await.expect("4 traces");
    let failed: Vec<&Value> = named(&spans, "prefill").into_iter().filter(|s| s["attributes"]["disagg.leg.outcome"] == "connect").collect();
    assert_eq!(failed.len(), 1, "{spans:?}");
    assert_eq!(failed[0]["status"], 2, "an error status");
    assert_eq!(failed[0]["attributes"]["server.address"], closed);
}

#[tokio::test]
async fn bad_observability_settings_are_refused_at_start() {
    let out = std::process::Command::new(BIN)
        .args([
            "route",
            "--port",
            "0",
            "--prefill",
            "http://127.0.0.1:1",
            "--decode",
            "http://127.0.0.1:2",
            "--otlp-traces-endpoint",
            "127.0.0.1:4317",
        ])
        .env("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/json")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("http/json"), "{}", String::from_utf8_lossy(&out.stderr));
    for (flag, value) in [
        ("--otlp-traces-sample-ratio", "1.5"),
        ("--otlp-traces-endpoint", "ftp://x"),
        ("--access-log", "/nonexistent-dir/x.log"),
        ("--log-format", "xml"),
    ] {
        let out = std::process::Command::new(BIN)
            .args(["route", "--port", "0", "--prefill", "http://127.0.0.1:1", "--decode", "http://127.0.0.1:2", flag, value])
            .output()
            .unwrap();
        assert!(!out.status.success(), "{flag} {value} accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(flag.trim_start_matches("--")) || err.contains(value), "{flag} {value}: {err}");
    }
}

#[tokio::test]
async fn json_logs_keep_the_registration_lines_and_one_pair_line_at_debug() {
    let p = Proc::sim(&["--role", "prefill"]).await;
    let d = Proc::sim(&["--role", "decode"]).await;
    let r =
        router(&["--prefill", &p.url, "--decode", &d.url, "--log-format", "json", "--log-level", "info,disagg::router::pair=debug"]).await;
    for i in 0..3 {
        assert_eq!(post(&format!("{}/v1/completions", r.url), &json!({"prompt": format!("p{i}"), "max_tokens": 2})).await.0, 200);
    }
    let text = r.log_text();
    let lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("not JSON: {l}"))).collect();
    let healthy: Vec<&Value> = lines.iter().filter(|l| l["fields"]["message"] == "healthy").collect();
    assert_eq!(healthy.len(), 2, "{text}");
    assert!(healthy.iter().any(|l| l["fields"]["worker"] == p.url.as_str() && l["fields"]["role"] == "prefill"), "{text}");
    assert!(lines.iter().all(|l| l["timestamp"].is_string() && l["level"].is_string()));
    let pairs: Vec<&Value> = lines.iter().filter(|l| l["fields"]["message"] == "pair").collect();
    assert_eq!(pairs.len(), 3, "one routed-pair line per request: {text}");
    assert_eq!(pairs[0]["level"], "DEBUG");
    assert_eq!(pairs[0]["fields"]["prefill"], p.url.as_str());
}

#[tokio::test]
async fn top_shows_every_worker_and_a_changing_rate_in_a_real_terminal_and_quits_on_q() {
    let p = Proc::sim(&["--role", "prefill"]).await;
    let d = Proc::sim(&["--role", "decode"]).await;
    let r = router(&["--prefill", &p.url, "--decode", &d.url, "--admin-api-key", "adm"]).await;
    let session = format!("disagg-top-{}", std::process::id());
    let tmux = |args: &[&str]| std::process::Command::new("tmux").args(args).output().expect("tmux");
    let cmd = format!("{BIN} top --url {} --admin-api-key adm --interval-secs 0.5", r.url);
    assert!(tmux(&["new-session", "-d", "-s", &session, "-x", "80", "-y", "24", &cmd]).status.success());
    let screen = || String::from_utf8_lossy(&tmux(&["capture-pane", "-p", "-t", &session]).stdout).into_owned();
    let rate = |s: &str| -> Option<f64> {
        s.lines().find_map(|l| l.split("req/s").next().filter(|_| l.contains("req/s"))?.trim_start_matches(['│', ' ']).trim().parse().ok())
    };
    let idle = eventually(Duration::from_secs(10), || {
        let s = screen();
        async move { rate(&s).is_some() }
    })
    .await;
    let first = screen();
    assert!(idle, "{first}");
    for w in [&p.url, &d.url] {
        assert!(first.contains(w.trim_start_matches("http://")), "{w} listed:\n{first}");
    }
    assert!(first.lines().all(|l| l.chars().count() <= 80), "fits 80 columns:\n{first}");
    assert_eq!(rate(&first), Some(0.0), "{first}");
    let load = tokio::spawn({
        let url = format!("{}/v1/completions", r.url);
        async move {
            for i in 0..60 {
                post(&url, &json!({"prompt": format!("top {i}"), "max_tokens": 2})).await;
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
        }
    });
    let busy = eventually(Duration::from_secs(10), || {
        let s = screen();
        async move { rate(&s).is_some_and(|r| r > 0.0) }
    })
    .await;
    assert!(busy, "the rate moves under load:\n{}", screen());
    load.abort();
    assert!(tmux(&["send-keys", "-t", &session, "q"]).status.success());
    let quit = eventually(Duration::from_secs(5), || async { !tmux(&["has-session", "-t", &session]).status.success() }).await;
    if !quit {
        tmux(&["kill-session", "-t", &session]);
    }
    assert!(quit, "q quits");
}
