//! P2pNccl xPyD: engines register with `disagg route --vllm-discovery-address` the way
//! vLLM's p2p_nccl_engine.py does (its `ping` thread: a pyzmq DEALER whose identity is the
//! engine's zmq address, sending a msgpack map every 3 s; see docs/PROTOCOLS.md §3), and
//! every request's legs carry the id that names both KV addresses.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

use crate::capture::Capture;
use crate::support::*;

/// vLLM's `P2pNcclEngine.ping`, as written there, with pyzmq and msgpack.
const REGISTRANT: &str = r#"
import sys, time, zmq, msgpack
proxy_address, kind, http_address, zmq_address, every = sys.argv[1:]
context = zmq.Context()
sock = context.socket(zmq.DEALER)
sock.setsockopt_string(zmq.IDENTITY, zmq_address)
sock.connect(f"tcp://{proxy_address}")
data = {"type": kind, "http_address": http_address, "zmq_address": zmq_address}
while True:
    sock.send(msgpack.dumps(data))
    time.sleep(float(every))
"#;

/// A registering engine's ping thread, stopped when dropped.
pub(crate) struct Registrant(Child);

impl Registrant {
    /// Pings every 3 s, as vLLM's engine.
    pub(crate) fn start(proxy: &str, kind: &str, http: &str, zmq: &str) -> Registrant {
        Registrant::pinging_every("3", proxy, kind, http, zmq)
    }

    pub(crate) fn pinging_every(secs: &str, proxy: &str, kind: &str, http: &str, zmq: &str) -> Registrant {
        let venv = script_var("ray-env.sh", "RAY_VENV");
        let python = format!("{venv}/bin/python");
        assert!(std::path::Path::new(&python).exists(), "no {python}: run scripts/ray-env.sh (it installs pyzmq and msgpack)");
        let child = Command::new(python).args(["-c", REGISTRANT, proxy, kind, http, zmq, secs]).stdin(Stdio::null()).spawn().unwrap();
        Registrant(child)
    }
}

impl Drop for Registrant {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// /health as the admin sees it (with the key, registered engines are listed).
async fn health(router: &str) -> (u16, Value) {
    let resp = client().get(format!("{router}/health")).bearer_auth("k").send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn engines_register_as_vllm_does_and_legs_name_both_kv_addresses() {
    let (p_url, p) = Capture::default().start().await;
    let (d_url, d) = Capture::default().start().await;
    let discovery = format!("127.0.0.1:{}", free_port());
    let r = router_unready(&[
        "--vllm-pd-disaggregation",
        "--vllm-discovery-address",
        &discovery,
        "--admin-api-key",
        "k",
        "--log-level",
        "info,disagg=debug",
    ])
    .await;
    assert!(r.banner.contains("connector=p2pnccl"), "{}", r.banner);
    let (status, v) = health(&r.url).await;
    assert_eq!(status, 503, "nothing registered yet: {v}");

    let (pz, dz) = (format!("127.0.0.1:{}", free_port()), format!("127.0.0.1:{}", free_port()));
    let host_port = |u: &str| u.trim_start_matches("http://").to_string();
    let mut prefill_engine = Some(Registrant::start(&discovery, "P", &host_port(&p_url), &pz));
    let _decode_engine = Registrant::start(&discovery, "D", &host_port(&d_url), &dz);
    assert!(eventually(Duration::from_secs(15), || async { health(&r.url).await.0 == 200 }).await, "{}", r.log_text());
    let (_, v) = health(&r.url).await;
    assert_eq!(v["prefill_instances"], json!([{"http": p_url, "zmq": pz}]), "{v}");
    assert_eq!(v["decode_instances"], json!([{"http": d_url, "zmq": dz}]), "{v}");
    assert!(r.log_text().contains("discovery: registered"), "registration is logged as it happens");

    // A client's id with the markers never reaches the engines: the legs' id is the router's.
    let body = json!({"prompt": "xPyD", "max_tokens": 7, "temperature": 0});
    let (status, out) = post_with(
        &format!("{}/v1/completions", r.url),
        &body,
        &[("x-request-id", "___prefill_addr_10.9.9.9:1___decode_addr_10.9.9.9:2_x")],
    )
    .await;
    assert_eq!(status, 200, "{out}");
    let (pre, dec) = (p.requests("/v1/completions"), d.requests("/v1/completions"));
    assert_eq!((pre.len(), dec.len()), (1, 1));
    let id = pre[0].headers["x-request-id"].to_str().unwrap().to_string();
    let prefix = format!("___prefill_addr_{pz}___decode_addr_{dz}_");
    let uuid = id.strip_prefix(&prefix).unwrap_or_else(|| panic!("{id}"));
    assert!(uuid.len() == 32 && uuid.chars().all(|c| c.is_ascii_hexdigit()), "{id}");
    assert_eq!(dec[0].headers["x-request-id"], id.as_str(), "both legs carry the same id");
    let (pb, db): (Value, Value) = (serde_json::from_slice(&pre[0].body).unwrap(), serde_json::from_slice(&dec[0].body).unwrap());
    assert_eq!(pb["max_tokens"], 1);
    assert!(pb.get("kv_transfer_params").is_none() && db.get("kv_transfer_params").is_none(), "P2pNccl has no params: {pb} {db}");
    assert_eq!(db, body, "the decode gets the client's request");
    assert!(r.log_text().contains(&format!("prefill={p_url} decode={d_url}")), "the pair is logged at debug");

    // The prefill engine stops pinging: gone after 5 s, and requests say so clearly.
    prefill_engine.take();
    let gone = eventually(Duration::from_secs(12), || async { health(&r.url).await.0 == 503 }).await;
    assert!(gone, "an engine silent for 5 s leaves");
    let (status, v) = post(&format!("{}/v1/completions", r.url), &body).await;
    assert_eq!(status, 503, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("no healthy prefill worker"), "{v}");
    // It comes back.
    let _again = Registrant::start(&discovery, "P", &host_port(&p_url), &pz);
    assert!(eventually(Duration::from_secs(15), || async { health(&r.url).await.0 == 200 }).await);
    assert_eq!(post(&format!("{}/v1/completions", r.url), &body).await.0, 200);
    assert_idle_as(&r.url, Some("k")).await;
}

#[tokio::test]
async fn connector_flags_that_cannot_work_are_refused() {
    for (args, says) in [
        (
            vec!["--kv-connector", "p2pnccl", "--prefill", "http://127.0.0.1:1", "--decode", "http://127.0.0.1:2"],
            "needs --vllm-discovery-address",
        ),
        (vec!["--kv-connector", "nixl", "--vllm-discovery-address", "127.0.0.1:0"], "does not go with --kv-connector nixl"),
        (
            vec!["--vllm-discovery-address", "127.0.0.1:1", "--prefill", "http://127.0.0.1:1", "--decode", "http://127.0.0.1:2"],
            "drop --prefill/--decode",
        ),
        (vec!["--vllm-discovery-address", "nowhere"], "expected HOST:PORT"),
        (vec!["--kv-connector", "mooncake", "--vllm-discovery-address", "127.0.0.1:0"], "does not go with --kv-connector mooncake"),
        (
            vec!["--kv-connector", "lmcache", "--prefill", "http://127.0.0.1:1", "--decode", "http://127.0.0.1:2"],
            "possible values: nixl, p2pnccl, mooncake",
        ),
    ] {
        let out = std::process::Command::new(BIN).arg("route").args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(says), "{args:?}: {err}");
    }
}

#[tokio::test]
async fn the_admin_api_cannot_add_a_p2pnccl_engine_without_its_kv_address() {
    let discovery = format!("127.0.0.1:{}", free_port());
    let r = router_unready(&["--vllm-discovery-address", &discovery, "--admin-api-key", "k"]).await;
    let resp = client().post(format!("{}/add_worker?url=127.0.0.1:9&role=prefill", r.url)).bearer_auth("k").send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    let v: Value = resp.json().await.unwrap();
    assert!(v["error"]["message"].as_str().unwrap().contains("join by registering"), "{v}");
}
