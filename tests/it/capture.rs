//! An in-process fake worker that records exactly what a router sends it, for checks of
//! the wire protocol byte by byte. It answers a prefill leg with fixed params and any
//! other request with a small completion (SSE when asked).

use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

#[derive(Clone, Debug)]
pub struct Seen {
    pub path: String,
    /// The router's end of the connection the request came on.
    pub peer: std::net::SocketAddr,
    pub headers: HeaderMap,
    pub body: Bytes,
}

#[derive(Clone, Default)]
pub struct Capture {
    pub seen: Arc<Mutex<Vec<Seen>>>,
    /// `/health` never answers (a worker that hangs its health checks).
    pub hang_health: bool,
    /// While set, every request (health included) gets 503.
    pub down: Arc<std::sync::atomic::AtomicBool>,
    /// A streamed answer opens with an error event (as vLLM's does when its KV load fails).
    pub stream_error_first: bool,
    /// A streamed answer ends without `data: [DONE]`.
    pub no_done: bool,
    /// A prefill leg is answered without `kv_transfer_params` (as vLLM does when the one
    /// token it generates is EOS or hits a stop string).
    pub no_params: bool,
    /// What `/kv_event_sources` answers (kv_aware asks it for each rank's publisher).
    pub kv_event_sources: Option<Value>,
}

pub const PARAMS: &str = r#"{"do_remote_prefill":true,"do_remote_decode":false,"remote_block_ids":[[7,8]],"remote_engine_id":"eng-1","remote_request_id":"cmpl-x-0-1","remote_host":"127.0.0.1","remote_port":5600,"tp_size":1,"extra_future_field":{"a":[1,2]}}"#;

impl Capture {
    /// Serves on a free loopback port; returns its base URL.
    pub async fn start(self) -> (String, Capture) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://127.0.0.1:{}", listener.local_addr().unwrap().port());
        let app = axum::Router::new().fallback(handle).with_state(self.clone());
        let app = app.into_make_service_with_connect_info::<std::net::SocketAddr>();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (url, self)
    }

    pub fn requests(&self, path: &str) -> Vec<Seen> {
        self.seen.lock().unwrap().iter().filter(|s| s.path == path).cloned().collect()
    }

    /// The `prompt` of every generation request received, in order.
    pub fn prompts(&self) -> Vec<String> {
        self.requests("/v1/completions")
            .iter()
            .filter_map(|s| serde_json::from_slice::<Value>(&s.body).ok())
            .filter_map(|v| v["prompt"].as_str().map(str::to_owned))
            .collect()
    }

    pub fn set_down(&self, down: bool) {
        self.down.store(down, std::sync::atomic::Ordering::SeqCst);
    }
}

async fn handle(
    State(c): State<Capture>,
    ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_string();
    if c.down.load(std::sync::atomic::Ordering::SeqCst) {
        return axum::http::StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    if path == "/health" {
        if c.hang_health {
            std::future::pending::<()>().await;
        }
        return ().into_response();
    }
    c.seen.lock().unwrap().push(Seen { path: path.clone(), peer, headers, body: body.clone() });
    if let (Some(sources), "/kv_event_sources") = (&c.kv_event_sources, path.as_str()) {
        return axum::Json(sources.clone()).into_response();
    }
    if path == "/v1/models" {
        return axum::Json(json!({"object": "list", "data": [{"id": "capture", "object": "model"}]})).into_response();
    }
    let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    if v["kv_transfer_params"]["do_remote_decode"] == true {
        let params: Value = if c.no_params { Value::Null } else { serde_json::from_str(PARAMS).unwrap() };
        return axum::Json(
            json!({"id": "cmpl-p", "object": "text_completion", "choices": [{"index": 0, "text": "x", "finish_reason": "length"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}, "kv_transfer_params": params}),
        )
        .into_response();
    }
    if v["stream"] == true {
        let body = if c.stream_error_first {
            "data: {\"error\": {\"message\": \"Internal server error\", \"type\": \"InternalServerError\", \"param\": null, \"code\": 500}}\n\ndata: [DONE]\n\n"
        } else if c.no_done {
            "data: {\"choices\":[{\"index\":0,\"text\":\" hi\",\"finish_reason\":null}]}\n\n"
        } else {
            "data: {\"choices\":[{\"index\":0,\"text\":\" hi\",\"finish_reason\":\"length\"}]}\n\ndata: [DONE]\n\n"
        };
        return ([("content-type", "text/event-stream")], body).into_response();
    }
    axum::Json(json!({"id": "cmpl-d", "object": "text_completion", "choices": [{"index": 0, "text": " hi", "finish_reason": "length"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}))
    .into_response()
}
