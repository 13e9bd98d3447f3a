//! A prompt's token ids as the engine will see them, for `kv_aware`: token-id prompts (and
//! `/inference/v1/generate`'s `token_ids`) as they are; text through the model's own tokenizer (`--model-path`: tokenizer.json, BOS
//! as the model adds it) and a chat through its chat template (tokenize.rs, minijinja),
//! the way vLLM renders and tokenizes them. Without a tokenizer, the engine's own render
//! endpoint (`/v1/completions/render`, `/v1/chat/completions/render`: vLLM's
//! `--enable-scale-out`) tokenizes text, and Anthropic's Messages always (`/v1/messages/
//! render`: vLLM's own conversion); where it cannot, `kv_aware` routes by load alone.

use serde_json::{Map, Value};

use crate::api::dialect::Dialect;
use crate::router::request::body::ClientBody;
use crate::router::workers::topology::Topology;
use crate::router::workers::Role;
use crate::tokenize::ModelTokenizer;

/// The keys of a chat body the template reads.
const TEMPLATE_KEYS: [&str; 4] = ["messages", "tools", "add_generation_prompt", "chat_template_kwargs"];

pub fn prompt_tokens(body: &ClientBody, tokenizer: Option<&ModelTokenizer>) -> Option<Vec<u32>> {
    // /inference/v1/generate: the engine's own token ids, exact by construction.
    if let Some(raw) = body.get("token_ids") {
        return serde_json::from_slice::<Vec<u32>>(raw).ok();
    }
    if body.has("messages") {
        let tok = tokenizer?;
        let map: Map<String, Value> = TEMPLATE_KEYS.iter().filter_map(|k| body.hint(k).map(|v| (k.to_string(), v))).collect();
        return tok.encode_chat(&map).ok();
    }
    let raw = body.get("prompt")?;
    if raw.first() == Some(&b'[') {
        // A flat list of token ids, decoded straight into numbers (no JSON tree).
        if let Ok(ids) = serde_json::from_slice::<Vec<u32>>(raw) {
            return Some(ids);
        }
    }
    match body.hint("prompt")? {
        Value::String(s) => tokenizer?.encode(&s).ok(),
        Value::Array(items) => match items.as_slice() {
            // One prompt of token ids, or a list holding one prompt (fan-out sends each alone).
            [Value::String(s)] => tokenizer?.encode(s).ok(),
            [Value::Array(ids)] => ids.iter().map(|t| t.as_u64().and_then(|t| u32::try_from(t).ok())).collect(),
            // A flat list of valid ids was taken above: this one holds something else.
            _ => None,
        },
        _ => None,
    }
}

/// Whether the prompt is text (a chat, or a completions string) rather than token ids.
pub(crate) fn is_text(body: &ClientBody) -> bool {
    body.has("messages") || body.get("prompt").is_some_and(|raw| raw.first() == Some(&b'"') || raw.starts_with(b"[\""))
}

/// The prompt's token ids from a worker's render endpoint (one that serves prefills, or
/// any worker in colocated mode); None when none answers within 2 s.
pub(crate) async fn render(
    topology: &Topology,
    auth: Option<&axum::http::HeaderValue>,
    body: &ClientBody,
    dialect: Dialect,
) -> Option<Vec<u32>> {
    let path = match dialect {
        Dialect::Anthropic => "/v1/messages/render",
        Dialect::Responses => "/v1/responses/render",
        Dialect::OpenAi if body.has("messages") => "/v1/chat/completions/render",
        Dialect::OpenAi => "/v1/completions/render",
    };
    let worker = topology.workers().into_iter().find(|w| w.is_healthy() && w.role != Role::Decode)?;
    let mut req = crate::router::upstream::legs::client()
        .post(format!("{}{path}", worker.url))
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body.raw().clone())
        .timeout(std::time::Duration::from_secs(2));
    if let Some(auth) = auth {
        req = req.header(reqwest::header::AUTHORIZATION, auth.clone());
    }
    let resp = req.send().await.ok().filter(|r| r.status().is_success())?;
    let v: Value = resp.json().await.ok()?;
    // Completions: one object per prompt (a fanned-out request has one); chat: one object.
    let one = match &v {
        Value::Array(list) if list.len() == 1 => &list[0],
        Value::Object(_) => &v,
        _ => return None,
    };
    one.get("token_ids")?.as_array()?.iter().map(|t| t.as_u64().and_then(|t| u32::try_from(t).ok())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(v: Value) -> ClientBody {
        ClientBody::parse(bytes::Bytes::from(serde_json::to_vec(&v).unwrap())).unwrap()
    }

    #[test]
    fn token_prompts_are_taken_as_they_are_and_text_needs_a_tokenizer() {
        assert_eq!(prompt_tokens(&body(serde_json::json!({"prompt": [5, 6, 7]})), None), Some(vec![5, 6, 7]));
        assert_eq!(prompt_tokens(&body(serde_json::json!({"prompt": [[5, 6]]})), None), Some(vec![5, 6]));
        let generate = serde_json::json!({"token_ids": [9, 8, 7], "sampling_params": {"max_tokens": 2}});
        assert_eq!(prompt_tokens(&body(generate), None), Some(vec![9, 8, 7]));
        assert_eq!(prompt_tokens(&body(serde_json::json!({"prompt": "text"})), None), None);
        assert_eq!(prompt_tokens(&body(serde_json::json!({"prompt": [1, -2]})), None), None);
        assert_eq!(prompt_tokens(&body(serde_json::json!({"messages": []})), None), None);
        assert!(is_text(&body(serde_json::json!({"prompt": "t"}))) && is_text(&body(serde_json::json!({"prompt": ["t"]}))));
        assert!(is_text(&body(serde_json::json!({"messages": []}))));
        assert!(!is_text(&body(serde_json::json!({"prompt": [1, 2]}))));
    }
}
