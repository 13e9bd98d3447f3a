//! The network boundary (docs/SECURITY.md): what strangers on the engines' network can
//! send the router's ZMQ sockets, over raw TCP and with pyzmq as vLLM's engines use it.

use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::capture::Capture;
use crate::discovery::Registrant;
use crate::support::*;

/// A ZMTP 3.0 greeting with NULL security, as libzmq sends it.
fn greeting() -> Vec<u8> {
    let mut g = vec![0u8; 64];
    g[0] = 0xff;
    g[9] = 0x7f;
    g[10] = 3;
    g[12..16].copy_from_slice(b"NULL");
    g
}

/// A READY command naming `socket_type`.
fn ready(socket_type: &str) -> Vec<u8> {
    let mut body = vec![5u8];
    body.extend_from_slice(b"READY");
    body.push(11);
    body.extend_from_slice(b"Socket-Type");
    body.extend_from_slice(&(socket_type.len() as u32).to_be_bytes());
    body.extend_from_slice(socket_type.as_bytes());
    let mut out = vec![0x04, body.len() as u8];
    out.extend(body);
    out
}

/// A long frame header declaring 2^40 bytes.
fn huge_frame_header() -> Vec<u8> {
    let mut h = vec![0x02];
    h.extend_from_slice(&(1u64 << 40).to_be_bytes());
    h
}

async fn send_then_wait_close(address: &str, bytes: &[u8], within: Duration) -> bool {
    let mut s = TcpStream::connect(address).await.unwrap();
    let _ = s.write_all(bytes).await;
    read_until_closed(&mut s, within).await.1
}

fn assert_alive(r: &mut Proc) {
    let pid = r.pid().expect("the router is running") as i32;
    assert_eq!(unsafe { libc::kill(pid, 0) }, 0, "the router died: {}", r.log_text());
}

/// The discovery socket survives every malformed stream a stranger can send, and still
/// registers engines after.
#[tokio::test]
async fn no_packet_to_the_discovery_address_takes_the_router_down() {
    let discovery = format!("127.0.0.1:{}", free_port());
    let mut r = router_unready(&["--vllm-discovery-address", &discovery, "--admin-api-key", "k"]).await;
    let rss_before = proc_status_kib(r.pid().unwrap(), "VmRSS");

    // One packet: a greeting and a frame declaring 2^40 bytes (this aborted the router).
    let one_packet = [greeting(), huge_frame_header()].concat();
    assert!(send_then_wait_close(&discovery, &one_packet, Duration::from_secs(5)).await, "the connection is dropped");
    // The same after a whole handshake, and as a command.
    let after_ready = [greeting(), ready("DEALER"), huge_frame_header()].concat();
    assert!(send_then_wait_close(&discovery, &after_ready, Duration::from_secs(5)).await);
    let command = [greeting(), vec![0x06], (1u64 << 40).to_be_bytes().to_vec()].concat();
    assert!(send_then_wait_close(&discovery, &command, Duration::from_secs(5)).await);
    // Garbage for a greeting; a truncated frame; a socket type that cannot talk to a ROUTER.
    assert!(send_then_wait_close(&discovery, &[0x42; 64], Duration::from_secs(5)).await);
    assert!(send_then_wait_close(&discovery, &[greeting(), ready("PUB")].concat(), Duration::from_secs(5)).await);
    let mut truncated = TcpStream::connect(&discovery).await.unwrap();
    truncated.write_all(&[greeting(), ready("DEALER"), vec![0x00, 200, 1, 2, 3]].concat()).await.unwrap();
    drop(truncated);
    // Endless empty MORE frames: cut at the part cap, long before memory grows.
    let mut endless = TcpStream::connect(&discovery).await.unwrap();
    endless.write_all(&[greeting(), ready("DEALER")].concat()).await.unwrap();
    let more = [0x01u8, 0x00].repeat(64 * 1024);
    let mut cut = false;
    for _ in 0..200 {
        if endless.write_all(&more).await.is_err() {
            cut = true;
            break;
        }
    }
    assert!(cut || read_until_closed(&mut endless, Duration::from_secs(5)).await.1, "endless MORE frames end the connection");
    // A peer that connects and says nothing is dropped after the handshake time.
    let mut silent = TcpStream::connect(&discovery).await.unwrap();
    assert!(read_until_closed(&mut silent, Duration::from_secs(10)).await.1, "a silent peer is dropped");

    assert_alive(&mut r);
    let rss_after = proc_status_kib(r.pid().unwrap(), "VmRSS");
    assert!(rss_after < rss_before + 64 * 1024, "RSS {rss_before} -> {rss_after} KiB");
    let refused =
        metric(&metrics_with_key(&r.url, "k").await, "disagg_router_refused_total", &[("from", "discovery"), ("reason", "connection")]);
    assert!(refused >= 6.0, "every dropped connection is counted: {refused}");
    // A real engine still registers.
    let (p_url, _p) = Capture::default().start().await;
    let (d_url, _d) = Capture::default().start().await;
    let _pe = Registrant::pinging_every("0.5", &discovery, "P", &addr_of(&p_url), &format!("127.0.0.1:{}", free_port()));
    let _de = Registrant::pinging_every("0.5", &discovery, "D", &addr_of(&d_url), &format!("127.0.0.1:{}", free_port()));
    assert!(eventually(Duration::from_secs(15), || async { get(&format!("{}/health", r.url)).await.0 == 200 }).await, "{}", r.log_text());
}

/// The same reader takes kv_aware's events: a publisher (anything answering on an
/// engine's event port) that sends a 2^40-byte frame, or endless parts, is dropped.
#[tokio::test]
async fn a_hostile_kv_event_publisher_is_dropped_not_obeyed() {
    let pub_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let replay_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (pub_port, replay_port) = (pub_listener.local_addr().unwrap().port(), replay_listener.local_addr().unwrap().port());
    let sources =
        json!({"0": {"endpoint": format!("tcp://*:{pub_port}"), "replay_endpoint": format!("tcp://*:{replay_port}"), "topic": ""}});
    let (p_url, _p) = Capture { kv_event_sources: Some(sources), ..Capture::default() }.start().await;
    let (d_url, _d) = Capture::default().start().await;
    let mut r = router(&["--policy", "kv_aware", "--prefill", &p_url, "--decode", &d_url]).await;
    let hostile = |listener: tokio::net::TcpListener, me: &'static str| async move {
        let mut served = 0;
        while served < 3 {
            let (mut s, _) = listener.accept().await.unwrap();
            let attack = if served % 2 == 0 { huge_frame_header() } else { [0x01u8, 0x00].repeat(100_000) };
            let _ = s.write_all(&[greeting(), ready(me), attack].concat()).await;
            let _ = read_until_closed(&mut s, Duration::from_secs(5)).await;
            served += 1;
        }
    };
    let attacks = tokio::spawn(hostile(pub_listener, "PUB"));
    let replay = tokio::spawn(hostile(replay_listener, "ROUTER"));
    // The router reconnects each second; three hostile rounds on the event port.
    tokio::time::timeout(Duration::from_secs(30), attacks).await.expect("the router kept reconnecting").unwrap();
    replay.abort();
    assert_alive(&mut r);
    assert!(r.log_text().contains("KV events"), "the broken publisher is logged");
    assert_eq!(post(&format!("{}/v1/completions", r.url), &json!({"prompt": "still up", "max_tokens": 2})).await.0, 200);
}

/// A stranger's flood of malformed registrations.
const FLOOD: &str = r#"
import sys, zmq
sock = zmq.Context().socket(zmq.DEALER)
sock.connect(f"tcp://{sys.argv[1]}")
for i in range(2000):
    sock.send(b"\xc1 not msgpack %d" % i)
sock.send(b"end")
import time; time.sleep(1)
"#;

fn python() -> String {
    let python = format!("{}/bin/python", script_var("ray-env.sh", "RAY_VENV"));
    assert!(std::path::Path::new(&python).exists(), "no {python}: run scripts/ray-env.sh (it installs pyzmq and msgpack)");
    python
}

async fn metrics_with_key(router: &str, key: &str) -> String {
    client().get(format!("{router}/metrics")).bearer_auth(key).send().await.unwrap().text().await.unwrap()
}

async fn registered(router: &str) -> Value {
    let resp = client().get(format!("{router}/health")).bearer_auth("k").send().await.unwrap();
    resp.json().await.unwrap_or(Value::Null)
}

fn refused(text: &str, reason: &str) -> f64 {
    metric(text, "disagg_router_refused_total", &[("from", "discovery"), ("reason", reason)])
}

#[tokio::test]
async fn discovery_cannot_be_hijacked_or_filled_by_strangers() {
    let (p_url, p) = Capture::default().start().await;
    let (d_url, _d) = Capture::default().start().await;
    let discovery = format!("127.0.0.1:{}", free_port());
    let r = router_unready(&["--vllm-discovery-address", &discovery, "--admin-api-key", "k", "--discovery-max-per-host", "3"]).await;
    let (pz, dz) = (format!("127.0.0.1:{}", free_port()), format!("127.0.0.1:{}", free_port()));
    let _pe = Registrant::pinging_every("0.5", &discovery, "P", &addr_of(&p_url), &pz);
    let _de = Registrant::pinging_every("0.5", &discovery, "D", &addr_of(&d_url), &dz);
    assert!(eventually(Duration::from_secs(15), || async { get(&format!("{}/health", r.url)).await.0 == 200 }).await, "{}", r.log_text());

    // A stranger names the live prefill's URL with its own KV address, then as a decode.
    let _hijack = Registrant::pinging_every("0.5", &discovery, "P", &addr_of(&p_url), "127.0.0.1:6666");
    let _flip = Registrant::pinging_every("0.5", &discovery, "D", &addr_of(&p_url), &pz);
    // Another names a host that is not its own (the router itself, another address).
    let _elsewhere = Registrant::pinging_every("0.5", &discovery, "D", "127.0.0.2:8100", "127.0.0.2:8101");
    assert!(
        eventually(Duration::from_secs(10), || async {
            let m = metrics_with_key(&r.url, "k").await;
            refused(&m, "conflict") >= 2.0 && refused(&m, "not_its_host") >= 1.0
        })
        .await,
        "{}",
        metrics_with_key(&r.url, "k").await
    );
    let v = registered(&r.url).await;
    assert_eq!(v["prefill_instances"], json!([{"http": p_url, "zmq": pz}]), "the live registration stands: {v}");
    assert_eq!(v["decode_instances"], json!([{"http": d_url, "zmq": dz}]), "{v}");
    // Requests keep going to the real engines, with the real KV addresses.
    for _ in 0..5 {
        assert_eq!(post(&format!("{}/v1/completions", r.url), &json!({"prompt": "x", "max_tokens": 2})).await.0, 200);
    }
    let ids: Vec<String> = p.requests("/v1/completions").iter().map(|s| s.headers["x-request-id"].to_str().unwrap().to_string()).collect();
    assert!(ids.iter().all(|id| id.starts_with(&format!("___prefill_addr_{pz}___decode_addr_{dz}_"))), "{ids:?}");

    // One host registers at most --discovery-max-per-host engines (2 are in; 1 more fits).
    let fillers: Vec<Registrant> = (0..3)
        .map(|_| {
            Registrant::pinging_every("0.5", &discovery, "D", &format!("127.0.0.1:{}", free_port()), &format!("127.0.0.1:{}", free_port()))
        })
        .collect();
    assert!(
        eventually(Duration::from_secs(10), || async { refused(&metrics_with_key(&r.url, "k").await, "too_many_from_host") >= 1.0 }).await
    );
    let v = registered(&r.url).await;
    assert_eq!(v["decode_instances"].as_array().unwrap().len() + v["prefill_instances"].as_array().unwrap().len(), 3, "{v}");
    drop(fillers);

    // A flood of malformed messages: counted, logged within a budget.
    let flood = Command::new(python()).args(["-c", FLOOD, &discovery]).status().unwrap();
    assert!(flood.success());
    assert!(eventually(Duration::from_secs(10), || async { refused(&metrics_with_key(&r.url, "k").await, "malformed") >= 2000.0 }).await);
    let lines = r.log_text().lines().filter(|l| l.contains("refused a registration")).count();
    assert!(lines <= 40, "{lines} log lines for a flood of 2000");
    // The engine list is for the admin key only.
    let anonymous: Value = serde_json::from_str(&get(&format!("{}/health", r.url)).await.1).unwrap();
    assert!(anonymous.get("prefill_instances").is_none() && anonymous.get("decode_instances").is_none(), "{anonymous}");
}

#[tokio::test]
async fn with_discovery_allow_a_host_may_register_engines_on_its_networks() {
    let (p_url, _p) = Capture::default().start().await;
    let (d_url, _d) = Capture::default().start().await;
    let discovery = format!("127.0.0.1:{}", free_port());
    let r = router_unready(&["--vllm-discovery-address", &discovery, "--admin-api-key", "k", "--discovery-allow", "127.0.0.0/8"]).await;
    // The captures listen on 127.0.0.1; the registrations come from 127.0.0.1 and name
    // 127.0.0.2 for their KV addresses: allowed on 127/8.
    let _p = Registrant::pinging_every("0.5", &discovery, "P", &addr_of(&p_url), "127.0.0.2:7000");
    let _e = Registrant::pinging_every("0.5", &discovery, "D", &addr_of(&d_url), "127.0.0.2:7001");
    assert!(
        eventually(Duration::from_secs(10), || async {
            registered(&r.url).await["decode_instances"].as_array().is_some_and(|a| a.len() == 1)
        })
        .await,
        "{}",
        r.log_text()
    );
    let _out = Registrant::pinging_every("0.5", &discovery, "D", "10.1.1.1:8100", "10.1.1.1:8101");
    assert!(
        eventually(Duration::from_secs(10), || async { refused(&metrics_with_key(&r.url, "k").await, "outside_networks") >= 1.0 }).await,
        "{}",
        r.log_text()
    );
}

#[tokio::test]
async fn client_keys_never_reach_workers() {
    let (p_url, p) = Capture::default().start().await;
    let (d_url, d) = Capture::default().start().await;
    let body = json!({"prompt": "x", "max_tokens": 2});
    let r = router(&["--prefill", &p_url, "--decode", &d_url, "--client-api-key", "client-secret"]).await;
    let (status, v) = post_with(&format!("{}/v1/completions", r.url), &body, &[("authorization", "Bearer client-secret")]).await;
    assert_eq!(status, 200, "{v}");
    for seen in p.requests("/v1/completions").iter().chain(&d.requests("/v1/completions")) {
        assert!(seen.headers.get("authorization").is_none(), "a client key reached a worker: {:?}", seen.headers);
    }
    // Workers get --api-key, and only it.
    let r = router(&["--prefill", &p_url, "--decode", &d_url, "--client-api-key", "client-secret", "--api-key", "worker-secret"]).await;
    assert_eq!(post_with(&format!("{}/v1/completions", r.url), &body, &[("authorization", "Bearer client-secret")]).await.0, 200);
    let last = d.requests("/v1/completions").pop().unwrap();
    assert_eq!(last.headers["authorization"], "Bearer worker-secret");
}

#[tokio::test]
async fn numbers_past_range_and_deep_nesting_are_400s_not_panics() {
    let (p_url, _p) = Capture::default().start().await;
    let (d_url, _d) = Capture::default().start().await;
    let r = router(&["--prefill", &p_url, "--decode", &d_url]).await;
    let deep = format!("{}1{}", "[".repeat(200), "]".repeat(200));
    for (path, body) in [
        ("/v1/completions", r#"{"prompt":"hello","max_tokens":1e400}"#.to_string()),
        ("/v1/completions", format!(r#"{{"prompt":"hello","n":{deep}}}"#)),
        ("/v1/chat/completions", r#"{"messages":[{"role":"user","content":"hi"}],"temperature":-1e400}"#.to_string()),
        ("/v1/completions", r#"{"prompt":"hello","vllm_xargs":{"kv_transfer_params":{"remote_host":"10.0.0.1"},"x":1e999}}"#.to_string()),
    ] {
        let resp =
            client().post(format!("{}{path}", r.url)).header("content-type", "application/json").body(body.clone()).send().await.unwrap();
        assert_eq!(resp.status().as_u16(), 400, "{body}");
        let v: Value = resp.json().await.expect("a JSON error");
        assert!(v["error"]["message"].is_string(), "{v}");
    }
    assert!(!r.log_text().contains("panicked"), "{}", r.log_text());
}

#[tokio::test]
async fn the_admin_api_adds_no_worker_on_metadata_addresses_or_the_router_itself() {
    let (p_url, _p) = Capture::default().start().await;
    let r = router_unready(&["--admin-api-key", "k", "--vllm-pd-disaggregation"]).await;
    let add = |url: String| {
        let base = r.url.clone();
        async move {
            let resp = client().post(format!("{base}/add_worker?url={url}&role=prefill")).bearer_auth("k").send().await.unwrap();
            (resp.status().as_u16(), resp.json::<Value>().await.unwrap())
        }
    };
    for bad in ["169.254.169.254:80".to_string(), format!("127.0.0.1:{}", r.port), "[fe80::1]:8100".to_string(), "0.0.0.0:8100".to_string()]
    {
        let (status, v) = add(bad.clone()).await;
        assert_eq!(status, 400, "{bad}: {v}");
    }
    assert_eq!(add(addr_of(&p_url)).await.0, 200, "a real worker is still added");
    let r2 = router_unready(&["--admin-api-key", "k", "--vllm-pd-disaggregation", "--worker-allow", "10.0.0.0/8"]).await;
    let resp = client().post(format!("{}/add_worker?url={}&role=prefill", r2.url, addr_of(&p_url))).bearer_auth("k").send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    assert!(resp.text().await.unwrap().contains("--worker-allow"));
}

/// A decode that answers a stream with nothing but comments (`: keep-alive`), as fast as
/// it can: cut off after MAX_COMMENTS, a 502 to the client, no memory or CPU burnt.
#[tokio::test]
async fn a_worker_sending_only_comments_before_its_first_event_is_cut_off() {
    use axum::response::IntoResponse;
    async fn comments_forever(body: axum::body::Bytes) -> axum::response::Response {
        let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        if v["kv_transfer_params"]["do_remote_decode"] == true {
            return axum::Json(
                json!({"choices": [{"index": 0, "text": "x", "finish_reason": "length"}], "kv_transfer_params": {"remote_engine_id": "e"}}),
            )
            .into_response();
        }
        let chunks =
            futures_util::stream::repeat_with(|| Ok::<_, std::convert::Infallible>(axum::body::Bytes::from_static(b": keep-alive\n\n")));
        ([("content-type", "text/event-stream")], axum::body::Body::from_stream(chunks)).into_response()
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let worker = format!("http://{}", listener.local_addr().unwrap());
    let app = axum::Router::new().route("/health", axum::routing::get(|| async { "" })).fallback(comments_forever);
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let r = router(&["--prefill", &worker, "--decode", &worker, "--disable-retries"]).await;
    let pid = r.pid().unwrap();
    let rss_before = proc_status_kib(pid, "VmRSS");
    let started = std::time::Instant::now();
    let (status, events) =
        post_stream(&format!("{}/v1/completions", r.url), &json!({"prompt": "x", "max_tokens": 5, "stream": true})).await;
    assert_eq!(status, 502, "{events:?}");
    assert!(started.elapsed() < Duration::from_secs(5), "cut off at once, not at a timeout: {:?}", started.elapsed());
    assert!(r.log_text().contains("bytes of comments before its first event"), "{}", r.log_text());
    let rss_after = proc_status_kib(pid, "VmRSS");
    assert!(rss_after < rss_before + 16 * 1024, "RSS {rss_before} -> {rss_after} KiB");
}

/// Bodies: a declared Content-Length reserves nothing; one budget bounds the body bytes
/// held over all connections; HTTP/2 streams per connection are capped.
#[tokio::test]
async fn request_bodies_are_bounded_over_all_connections() {
    let (p_url, _p) = Capture::default().start().await;
    let (d_url, _d) = Capture::default().start().await;
    let r = router(&["--prefill", &p_url, "--decode", &d_url, "--max-body-bytes-in-flight", "200000"]).await;
    let pid = r.pid().unwrap();
    let virtual_before = proc_status_kib(pid, "VmSize");
    // 20 heads declaring 32 MB bodies, each followed by one byte.
    let mut open = Vec::new();
    for _ in 0..20 {
        let mut s = TcpStream::connect(addr_of(&r.url)).await.unwrap();
        s.write_all(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 32000000\r\n\r\n{")
            .await
            .unwrap();
        open.push(s);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let virtual_after = proc_status_kib(pid, "VmSize");
    assert!(virtual_after < virtual_before + 64 * 1024, "VmSize {virtual_before} -> {virtual_after} KiB for 20 one-byte bodies");
    drop(open);
    // A slow body holding 150 kB of the 200 kB budget: a second body of 100 kB is refused.
    let mut slow = TcpStream::connect(addr_of(&r.url)).await.unwrap();
    slow.write_all(
        b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 300000\r\n\r\n{\"prompt\":\"",
    )
    .await
    .unwrap();
    slow.write_all(&[b'a'; 150_000]).await.unwrap();
    assert!(
        eventually(Duration::from_secs(5), || async { workers(&r.url).await["body_bytes_in_flight"].as_u64().unwrap_or(0) >= 150_000 })
            .await
    );
    let big = json!({"prompt": "b".repeat(100_000), "max_tokens": 1});
    let (status, v) = post(&format!("{}/v1/completions", r.url), &big).await;
    assert_eq!(status, 503, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("--max-body-bytes-in-flight"), "{v}");
    drop(slow);
    assert!(
        eventually(Duration::from_secs(5), || async { workers(&r.url).await["body_bytes_in_flight"] == 0 }).await,
        "the budget comes back"
    );
    assert_eq!(post(&format!("{}/v1/completions", r.url), &big).await.0, 200);
    // h2c: the server's SETTINGS announce the stream cap.
    let mut h2 = TcpStream::connect(addr_of(&r.url)).await.unwrap();
    h2.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00").await.unwrap();
    let mut head = [0u8; 9];
    tokio::io::AsyncReadExt::read_exact(&mut h2, &mut head).await.unwrap();
    assert_eq!(head[3], 4, "a SETTINGS frame first");
    let mut settings = vec![0u8; usize::from(head[2]) | (usize::from(head[1]) << 8)];
    tokio::io::AsyncReadExt::read_exact(&mut h2, &mut settings).await.unwrap();
    let max_streams = settings.chunks(6).find(|s| s[..2] == [0, 3]).map(|s| u32::from_be_bytes(s[2..6].try_into().unwrap()));
    assert_eq!(max_streams, Some(32), "SETTINGS_MAX_CONCURRENT_STREAMS");
}

/// P2pNccl's leg id names both engines' KV addresses, and vLLM's answer `id` is built
/// from it: the client sees its own request id there, streamed or not, never an address.
#[tokio::test]
async fn answers_name_no_engine_address() {
    let discovery = format!("127.0.0.1:{}", free_port());
    let r = router_unready(&["--vllm-discovery-address", &discovery]).await;
    let _p = Proc::sim(&["--role", "prefill", "--kv-connector", "p2pnccl", "--proxy-address", &discovery]).await;
    let _d = Proc::sim(&["--role", "decode", "--kv-connector", "p2pnccl", "--proxy-address", &discovery]).await;
    assert!(eventually(Duration::from_secs(10), || async { get(&format!("{}/health", r.url)).await.0 == 200 }).await);
    let url = format!("{}/v1/completions", r.url);
    let (status, v) = post_with(&url, &json!({"prompt": "where", "max_tokens": 3}), &[("x-request-id", "client-7")]).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["id"], "cmpl-client-7", "{v}");
    let resp = client()
        .post(&url)
        .header("x-request-id", "client-8")
        .json(&json!({"prompt": "where", "max_tokens": 3, "stream": true}))
        .send()
        .await
        .unwrap();
    let text = resp.text().await.unwrap();
    assert!(!text.contains("addr") && text.contains("\"id\":\"cmpl-client-8\""), "{text}");
    let (status, v) =
        post(&format!("{}/v1/chat/completions", r.url), &json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "n": 2}))
            .await;
    assert_eq!(status, 200, "{v}");
    assert!(!v.to_string().contains("addr"), "{v}");
}

/// kv_aware subscribes to the ranks a worker serves, not to however many publishers its
/// /kv_event_sources lists.
#[tokio::test]
async fn a_worker_listing_more_publishers_than_its_ranks_gets_one_subscription_per_rank() {
    let mut listeners = Vec::new();
    let mut sources = serde_json::Map::new();
    for rank in 0..50 {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        sources.insert(rank.to_string(), json!({"endpoint": format!("tcp://*:{}", l.local_addr().unwrap().port()), "topic": ""}));
        listeners.push(l);
    }
    let (p_url, _p) = Capture { kv_event_sources: Some(Value::Object(sources)), ..Capture::default() }.start().await;
    let (d_url, _d) = Capture::default().start().await;
    let r = router(&["--policy", "kv_aware", "--prefill", &p_url, "--decode", &d_url, "--prefill-dp-size", "2"]).await;
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for l in listeners {
        let accepted = accepted.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                accepted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                // Hold it open, silent: the router's handshake times out and it retries.
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_secs(30)).await;
                    drop(s);
                });
            }
        });
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let n = accepted.load(std::sync::atomic::Ordering::SeqCst);
    assert!((1..=2).contains(&n), "{n} subscriptions for a worker of 2 ranks");
    assert!(r.log_text().contains("lists 50 publishers for 2 DP ranks"), "{}", r.log_text());
}
