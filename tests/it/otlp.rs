//! The tests' OTLP receiver (tests/tools/otlp_receiver.py: gRPC and HTTP/protobuf, decoded
//! by opentelemetry-proto from PyPI, in the vLLM venv): the spans it received, as JSON.

use std::time::Duration;

use serde_json::Value;

use crate::support::*;

pub struct Receiver {
    child: std::process::Child,
    pub grpc: String,
    pub http: String,
    out: std::path::PathBuf,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Receiver {
    pub fn start() -> Receiver {
        let python = format!("{}/bin/python", script_var("vllm-env.sh", "VENV"));
        let (g, h) = (free_port(), free_port());
        let out = temp_dir("otlp").join("spans.jsonl");
        let mut child = std::process::Command::new(python)
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/tools/otlp_receiver.py"))
            .args([g.to_string(), h.to_string(), out.to_string_lossy().into_owned()])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("start the OTLP receiver");
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().unwrap()), &mut line).unwrap();
        assert_eq!(line.trim(), "ready", "the OTLP receiver did not start");
        Receiver { child, grpc: format!("127.0.0.1:{g}"), http: format!("http://127.0.0.1:{h}/v1/traces"), out }
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.out).unwrap_or_default().lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
    }

    /// The spans of `trace_id` once `want` says they are all here (or None after `within`).
    pub async fn trace(&self, trace_id: &str, within: Duration, want: impl Fn(&[Value]) -> bool) -> Option<Vec<Value>> {
        let end = std::time::Instant::now() + within;
        loop {
            let spans: Vec<Value> = self.spans().into_iter().filter(|s| s["trace_id"] == trace_id).collect();
            if want(&spans) {
                return Some(spans);
            }
            if std::time::Instant::now() > end {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The one span named `name` among `spans`.
pub fn named<'a>(spans: &'a [Value], name: &str) -> Vec<&'a Value> {
    spans.iter().filter(|s| s["name"] == name).collect()
}

/// A `traceparent` header's trace id and span id.
pub fn ids_of(traceparent: &str) -> (String, String, String) {
    let parts: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(parts.len(), 4, "{traceparent}");
    (parts[1].to_string(), parts[2].to_string(), parts[3].to_string())
}
