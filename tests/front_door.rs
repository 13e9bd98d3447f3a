//! A structure-aware fuzz of the router's front door: bodies with extreme numbers, deep
//! nesting and wrong types in every field the router reads, on the three generation APIs
//! (completions, chat, Anthropic's messages),
//! through a real `disagg route` process. Every answer is a 2xx or a 4xx with a JSON body
//! (or an SSE stream), and the router never panics. Cases: FRONT_DOOR_CASES (default 5000).

use std::time::Duration;

use axum::response::IntoResponse;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};

const BIN: &str = env!("CARGO_BIN_EXE_disagg");

/// Every top-level field the router decodes or rewrites, in either API.
const FIELDS: &[&str] = &[
    "prompt",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "min_tokens",
    "min_completion_tokens",
    "n",
    "seed",
    "temperature",
    "stream",
    "stream_options",
    "kv_transfer_params",
    "ec_transfer_params",
    "vllm_xargs",
    "user",
    "tools",
    "add_generation_prompt",
    "chat_template_kwargs",
    "model",
    "logprobs",
    "echo",
    "system",
    "thinking",
    "stop_sequences",
];

/// The generation APIs the front door serves.
#[derive(Clone, Copy, Debug)]
enum Api {
    Completions,
    Chat,
    Messages,
}

impl Api {
    fn path(self) -> &'static str {
        match self {
            Api::Completions => "/v1/completions",
            Api::Chat => "/v1/chat/completions",
            Api::Messages => "/v1/messages",
        }
    }
}

/// JSON text a hostile client may send: numbers past every range, escapes, every type.
fn leaf() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "1e400",
            "-1e400",
            "1e-400",
            "18446744073709551616",
            "-9223372036854775809",
            "4294967296",
            "2147483648",
            "0",
            "-1",
            "1",
            "1.5",
            "-0",
            "0.0",
            "true",
            "false",
            "null",
            "\"\"",
            "\"x\"",
            "\"\\ud800\"",
            "\"\\u0000\"",
            "{}",
            "[]",
            "[1,2,3]",
            "[[1],[2]]",
            "[\"a\",\"b\"]",
            "{\"include_usage\":1e400}",
            "{\"kv_transfer_params\":{\"remote_host\":\"10.0.0.1\"}}",
            "[{\"role\":\"user\",\"content\":\"hi\"}]",
            "[{\"role\":1e400,\"content\":[{\"type\":\"text\",\"text\":null}]}]",
        ])
        .prop_map(str::to_owned),
        any::<i64>().prop_map(|n| n.to_string()),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(|f| f.to_string()),
        "\\PC{0,8}".prop_map(|s| serde_json::to_string(&s).unwrap()),
    ]
}

/// A leaf wrapped in up to 300 arrays or objects.
fn value() -> impl Strategy<Value = String> {
    (leaf(), 0usize..300, any::<bool>(), prop::bool::weighted(0.7)).prop_map(|(leaf, depth, objects, shallow)| {
        let depth = if shallow { depth % 3 } else { depth };
        let (open, close) = if objects { ("{\"a\":", "}") } else { ("[", "]") };
        format!("{}{leaf}{}", open.repeat(depth), close.repeat(depth))
    })
}

fn body() -> impl Strategy<Value = (Api, String)> {
    let api = prop::sample::select(vec![Api::Completions, Api::Chat, Api::Messages]);
    (api, prop::collection::vec((prop::sample::select(FIELDS), value()), 1..6), any::<bool>()).prop_map(|(api, fields, base)| {
        let mut parts: Vec<String> = Vec::new();
        if base {
            // A valid request underneath, so the hostile fields reach further in.
            parts.push(match api {
                Api::Completions => r#""prompt":"hi""#.into(),
                Api::Chat | Api::Messages => r#""messages":[{"role":"user","content":"hi"}]"#.into(),
            });
            parts.push(r#""max_tokens":2"#.into());
        }
        parts.extend(fields.into_iter().map(|(k, v)| format!("\"{k}\":{v}")));
        (api, format!("{{{}}}", parts.join(",")))
    })
}

/// A worker that answers every leg as vLLM would in shape (params for a prefill leg).
async fn worker() -> String {
    async fn answer(uri: axum::http::Uri, body: axum::body::Bytes) -> axum::response::Response {
        let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let messages = uri.path() == "/v1/messages";
        if v["kv_transfer_params"]["do_remote_decode"] == true {
            return axum::Json(json!({"id": "p", "choices": [{"index": 0, "text": "x", "finish_reason": "length"}],
                "kv_transfer_params": {"do_remote_prefill": true, "remote_engine_id": "e", "remote_block_ids": [1], "remote_host": "127.0.0.1", "remote_port": 1}}))
            .into_response();
        }
        if v["stream"] == true && messages {
            return (
                [("content-type", "text/event-stream")],
                "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"m\"}}\n\nevent: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
            )
                .into_response();
        }
        if v["stream"] == true {
            return (
                [("content-type", "text/event-stream")],
                "data: {\"choices\":[{\"index\":0,\"text\":\"a\",\"finish_reason\":\"length\"}]}\n\ndata: [DONE]\n\n",
            )
                .into_response();
        }
        axum::Json(json!({"id": "d", "object": "text_completion", "choices": [{"index": 0, "text": "a", "finish_reason": "length"}]}))
            .into_response()
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let app = axum::Router::new().route("/health", axum::routing::get(|| async { "" })).fallback(answer);
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    url
}

/// One router for every case (harness = false: a plain main).
fn main() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (p, d) = rt.block_on(async { (worker().await, worker().await) });
    let log = std::env::temp_dir().join(format!("front-door-{}.log", std::process::id()));
    let mut child = rt.block_on(async {
        tokio::process::Command::new(BIN)
            .args(["route", "--port", "0", "--prefill", &p, "--decode", &d, "--health-check-interval-secs", "0.2"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .kill_on_drop(true)
            .spawn()
            .unwrap()
    });
    let banner = rt.block_on(async {
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        tokio::time::timeout(Duration::from_secs(20), lines.next_line()).await.unwrap().unwrap().unwrap()
    });
    let url = banner.split_whitespace().find(|w| w.starts_with("http://")).unwrap().to_string();
    let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).pool_idle_timeout(Duration::from_secs(4)).build().unwrap();
    rt.block_on(async {
        for _ in 0..100 {
            if http.get(format!("{url}/health")).send().await.is_ok_and(|r| r.status() == 200) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("the router never became healthy");
    });
    let cases = std::env::var("FRONT_DOOR_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(5000);
    let mut runner = TestRunner::new(Config { cases, failure_persistence: None, ..Config::default() });
    let statuses = std::sync::Mutex::new(std::collections::BTreeMap::<u16, usize>::new());
    let result = runner.run(&body(), |(api, body)| {
        let path = api.path();
        let (status, content_type, text) = rt.block_on(async {
            let resp = http
                .post(format!("{url}{path}"))
                .header("content-type", "application/json")
                .body(body.clone())
                .send()
                .await
                .expect("an answer, not a reset");
            let status = resp.status().as_u16();
            let ct = resp.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
            (status, ct, resp.text().await.expect("a whole body"))
        });
        *statuses.lock().unwrap().entry(status).or_default() += 1;
        prop_assert!((200..300).contains(&status) || (400..500).contains(&status), "{status} for {body}: {text}");
        let messages = matches!(api, Api::Messages);
        if content_type.starts_with("text/event-stream") {
            let end = if messages { "data: {\"type\":\"message_stop\"}\n\n" } else { "data: [DONE]\n\n" };
            prop_assert!(text.ends_with(end), "{text}");
        } else {
            let v: Result<Value, _> = serde_json::from_str(&text);
            prop_assert!(v.is_ok(), "not JSON ({status}) for {body}: {text}");
            let v = v.unwrap();
            if status >= 400 && messages {
                prop_assert!(v["type"] == "error" && v["error"]["message"].is_string(), "not Anthropic's error shape: {text}");
            } else if status >= 400 {
                prop_assert!(v["error"]["message"].is_string(), "not OpenAI's error shape: {text}");
            }
        }
        Ok(())
    });
    println!("front door: {cases} cases, answers by status {:?}", statuses.lock().unwrap());
    let _ = child.start_kill();
    let logged = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(!logged.contains("panicked"), "the router panicked:\n{logged}");
    if let Err(e) = result {
        panic!("{e}");
    }
}
