//! Two configurations of `disagg route` side by side in one run (TLS against plain, tracing
//! on against off), and the OTLP sink the traced router sends to.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde_json::{json, Value};

use super::{point, Case, Mode, Target};

/// An OTLP/HTTP receiver that accepts every export (an empty ExportTraceServiceResponse)
/// and counts them.
pub(crate) struct OtlpSink {
    pub(crate) url: String,
    exports: Arc<AtomicU64>,
    bytes: Arc<AtomicU64>,
}

impl OtlpSink {
    pub(crate) async fn start() -> OtlpSink {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://127.0.0.1:{}/v1/traces", listener.local_addr().unwrap().port());
        let (exports, bytes) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let (e, b) = (exports.clone(), bytes.clone());
        let app = axum::Router::new().route(
            "/v1/traces",
            axum::routing::post(move |body: axum::body::Bytes| {
                let (e, b) = (e.clone(), b.clone());
                async move {
                    e.fetch_add(1, Ordering::Relaxed);
                    b.fetch_add(body.len() as u64, Ordering::Relaxed);
                    ([("content-type", "application/x-protobuf")], Vec::<u8>::new())
                }
            }),
        );
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        OtlpSink { url, exports, bytes }
    }
    pub(crate) fn exports(&self) -> u64 {
        self.exports.load(Ordering::Relaxed)
    }
    pub(crate) fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
}

/// `a` and `b` over `cases`, in rotating order: p50, requests/s and the router's CPU per 1k
/// requests, with b's ratio to a; the rows for the results file.
pub(crate) async fn side_by_side(t: &Arc<Target>, title: &str, a: (&str, Mode), b: (&str, Mode), cases: &[Case], secs: f64) -> Vec<Value> {
    println!();
    println!("{title}");
    println!(
        "{:>6} {:>7} {:>5} | {:>9} {:>9} {:>6} | {:>8} {:>8} {:>6} | {:>9} {:>9}",
        "stream",
        "prompt",
        "conc",
        a.0,
        b.0,
        "ratio",
        a.0,
        b.0,
        "ratio",
        format!("CPU {}", a.0),
        format!("CPU {}", b.0)
    );
    println!("{:>20} | {:>26} | {:>24} | {:>19}", "", "p50 latency (ms)", "requests/s", "s per 1k requests");
    let mut rows = Vec::new();
    for &case in cases {
        let [x, y] = point(t, &[a.1, b.1], case, secs).await[..] else { unreachable!("two modes") };
        println!(
            "{:>6} {:>7} {:>5} | {:>9.3} {:>9.3} {:>6.2} | {:>8.0} {:>8.0} {:>6.2} | {:>9.3} {:>9.3}",
            case.stream,
            case.prompt_tokens,
            case.concurrency,
            x.p50,
            y.p50,
            y.p50 / x.p50,
            x.rps,
            y.rps,
            y.rps / x.rps,
            x.cpu_per_1k,
            y.cpu_per_1k
        );
        let fig = |f: &super::Figures| json!({"rps": f.rps, "p50_ms": f.p50, "p99_ms": f.p99, "cpu_s_per_1k": f.cpu_per_1k, "failures": f.failures});
        rows.push(json!({"compare": title, "stream": case.stream, "prompt_tokens": case.prompt_tokens, "concurrency": case.concurrency,
            a.0: fig(&x), b.0: fig(&y)}));
        if x.failures + y.failures > 0 {
            println!("    failures: {} {}, {} {}", a.0, x.failures, b.0, y.failures);
        }
    }
    rows
}
