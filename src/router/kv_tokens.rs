//! A prompt's token ids as the engine will see them, for `kv_aware`: token-id prompts as
//! they are; text through the model's own tokenizer (`--model-path`: tokenizer.json, BOS
//! as the model adds it) and a chat through its chat template (tokenize.rs, minijinja),
//! the way vLLM renders and tokenizes them. Without a tokenizer a text prompt has no
//! tokens here and `kv_aware` routes it by load alone.

use serde_json::{Map, Value};

use super::body::ClientBody;
use crate::tokenize::ModelTokenizer;

/// The keys of a chat body the template reads.
const TEMPLATE_KEYS: [&str; 4] = ["messages", "tools", "add_generation_prompt", "chat_template_kwargs"];

pub fn prompt_tokens(body: &ClientBody, tokenizer: Option<&ModelTokenizer>) -> Option<Vec<u32>> {
    if body.has("messages") {
        let tok = tokenizer?;
        let map: Map<String, Value> = TEMPLATE_KEYS.iter().filter_map(|k| body.value(k).map(|v| (k.to_string(), v))).collect();
        return tok.encode_chat(&map).ok();
    }
    match body.value("prompt")? {
        Value::String(s) => tokenizer?.encode(&s).ok(),
        Value::Array(items) => match items.as_slice() {
            // One prompt of token ids, or a list holding one prompt (fan-out sends each alone).
            [Value::String(s)] => tokenizer?.encode(s).ok(),
            [Value::Array(ids)] => ids.iter().map(|t| t.as_u64().and_then(|t| u32::try_from(t).ok())).collect(),
            ids => ids.iter().map(|t| t.as_u64().and_then(|t| u32::try_from(t).ok())).collect(),
        },
        _ => None,
    }
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
        assert_eq!(prompt_tokens(&body(serde_json::json!({"prompt": "text"})), None), None);
        assert_eq!(prompt_tokens(&body(serde_json::json!({"prompt": [1, -2]})), None), None);
        assert_eq!(prompt_tokens(&body(serde_json::json!({"messages": []})), None), None);
    }
}
