//! OpenAI's Responses API with the conversation kept by the router. vLLM keeps a stored
//! response in the memory of the API server that made it (in PD, the decode), so the next
//! turn's `previous_response_id` means nothing to the prefill that serves it. The router
//! keeps each stored response and its conversation itself (store.rs) and sends the engines
//! the whole input, so any prefill and decode can serve any turn; they are told
//! `store: false`, and each response gets the router's id (`request_id`), never a client's.
//!
//! A turn's history is built as vLLM 0.32 builds it from its own store (entrypoints/openai/
//! responses/utils.py, `construct_input_messages`): the previous turn's input (its own
//! history included) without system messages — instructions do not carry over — then the
//! previous output's message texts as assistant messages (reasoning and tool calls are not
//! carried, as in vLLM), then the new input. So a chain through the router renders the same
//! prompt as a chain on one vLLM with `VLLM_ENABLE_RESPONSES_API_STORE=1`.
//!
//! Reads, continuations, cancels and deletes are by owner: a digest of the client key that
//! made the response (any client, where the router checks no keys); another key's
//! response is not found (404), as an unknown id.

pub(crate) mod capture;
pub(crate) mod store;

use std::sync::Arc;

use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde_json::{json, Value};

use crate::api::fields::{validation_error, Fields};
use crate::api::{ApiError, ErrorKind};
use crate::router::config::responses::ResponsesConfig;
use crate::router::config::AuthConfig;
use crate::router::request::body::ClientBody;
use crate::router::tenants::Tenants;
use store::{Owner, ResponseStore, StoredResponse};

/// The router's Responses state: the store and its bounds.
pub(crate) struct Responses {
    pub(crate) store: ResponseStore,
    max_bytes: usize,
}

/// One `/v1/responses` request on its way: what is stored when its answer is complete.
pub(crate) struct Turn {
    responses: Arc<Responses>,
    /// The response's id (the router's, sent as the legs' `request_id`).
    pub(crate) id: String,
    owner: Owner,
    /// The client's `previous_response_id`, shown in the answer as vLLM shows it.
    previous_id: Option<String>,
    /// The input the engines were sent: the history, then this turn's items.
    sent_input: Vec<Value>,
    store: bool,
}

fn not_found(id: &str) -> ApiError {
    ApiError { status: StatusCode::NOT_FOUND, ..ApiError::new(ErrorKind::InvalidRequest, format!("Response with id '{id}' not found.")) }
        .param("response_id")
}

fn store_failed(e: String) -> ApiError {
    tracing::warn!("responses store: {e}");
    ApiError::new(ErrorKind::ServiceUnavailable, "the router's Responses store is not available; try again")
}

impl Responses {
    pub(crate) fn new(cfg: &ResponsesConfig) -> Self {
        Responses { store: ResponseStore::new(cfg), max_bytes: cfg.max_bytes }
    }

    /// Whose responses a request may see: the digest of the client key it presented (the
    /// front door's guard has checked it: one of --client-api-key's, or a tenant's), or
    /// everyone's where no keys are configured.
    pub(crate) fn owner(headers: &HeaderMap, auth: &AuthConfig, tenants: &Tenants) -> Owner {
        let key = match (auth.client_key_of(headers), tenants.key_of(headers)) {
            (Some(key), _) => key.as_bytes(),
            (None, Some((key, _))) => key,
            (None, None) if auth.client_keys.is_empty() && !tenants.configured() => return Owner(String::new()),
            (None, None) => b"",
        };
        let digest = ring::digest::digest(&ring::digest::SHA256, key);
        Owner(digest.as_ref().iter().map(|b| format!("{b:02x}")).collect())
    }

    /// A create request made ready for the engines: its history in `input` (when it
    /// continues a stored response), the router's id, `store: false`; refused before any
    /// prefill where the router cannot serve it.
    pub(crate) async fn prepare(self: &Arc<Self>, owner: Owner, body: ClientBody) -> Result<(ClientBody, Turn), ApiError> {
        let fields = body.subset(&["previous_response_id", "store", "background", "previous_input_messages"])?;
        let f = Fields::body(&fields);
        if f.boolean("background")? == Some(true) {
            return Err(ApiError::bad_request(
                "background responses are not served by disagg route: send the request without `background` (streamed, if it is long)",
            )
            .param("background"));
        }
        let previous_id = match fields.get("previous_response_id") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(other) => {
                return Err(validation_error("body.previous_response_id", "string_type", "Input should be a valid string", other))
            }
        };
        if previous_id.is_some() && fields.get("previous_input_messages").is_some_and(|v| !v.is_null()) {
            return Err(ApiError::bad_request("Only one of `previous_input_messages` and `previous_response_id` can be set.")
                .param("previous_response_id"));
        }
        let store = f.boolean("store")?.unwrap_or(true) && self.store.enabled();
        let input = match body.value("input")? {
            Some(Value::String(s)) => vec![json!({"role": "user", "content": s})],
            Some(Value::Array(items)) => items,
            other => {
                let input = other.unwrap_or(Value::Null);
                return Err(validation_error("body.input", "missing", "Field required: a string or a list of input items", &input));
            }
        };
        let mut sent_input = Vec::new();
        if let Some(id) = &previous_id {
            let stored = self.store.get(id, &owner).await.map_err(store_failed)?.ok_or_else(|| not_found(id))?;
            sent_input = serde_json::from_str(&stored.history).map_err(|e| ApiError::internal(format!("a stored conversation: {e}")))?;
        }
        let id = format!("resp_{}", uuid::Uuid::new_v4().simple());
        let mut set: Vec<(&str, Vec<u8>)> = vec![("request_id", serde_json::to_vec(&id).expect("a string")), ("store", b"false".to_vec())];
        if previous_id.is_some() {
            sent_input.extend(input);
            set.push(("input", serde_json::to_vec(&sent_input).expect("JSON values serialise")));
        } else {
            sent_input = input;
        }
        let set: Vec<(&str, &[u8])> = set.iter().map(|(k, v)| (*k, v.as_slice())).collect();
        let rewritten = ClientBody::parse_without_blocking(body.with_fields(&["previous_response_id"], &set)).await?;
        let turn = Turn { responses: self.clone(), id, owner, previous_id, sent_input, store };
        Ok((rewritten, turn))
    }

    /// `GET /v1/responses/{id}`: the stored response, as the client got it.
    pub(crate) async fn retrieve(&self, id: &str, owner: &Owner, stream: bool) -> Response {
        if stream {
            return ApiError::bad_request("stream=true replays background responses, which disagg route does not run")
                .param("stream")
                .into_response();
        }
        match self.store.get(id, owner).await {
            Ok(Some(s)) => json_response(StatusCode::OK, s.response.into()),
            Ok(None) => not_found(id).into_response(),
            Err(e) => store_failed(e).into_response(),
        }
    }

    /// `POST /v1/responses/{id}/cancel`: vLLM cancels only background responses, and the
    /// router stores only finished ones: a stored response answers vLLM's 400.
    pub(crate) async fn cancel(&self, id: &str, owner: &Owner) -> Response {
        match self.store.get(id, owner).await {
            Ok(Some(_)) => {
                ApiError::new(ErrorKind::InvalidRequest, "Cannot cancel a synchronous response.").param("response_id").into_response()
            }
            Ok(None) => not_found(id).into_response(),
            Err(e) => store_failed(e).into_response(),
        }
    }

    /// `DELETE /v1/responses/{id}` (OpenAI's; vLLM has none): gone for good.
    pub(crate) async fn delete(&self, id: &str, owner: &Owner) -> Response {
        match self.store.delete(id, owner).await {
            Ok(true) => json_response(StatusCode::OK, Bytes::from(json!({"id": id, "object": "response", "deleted": true}).to_string())),
            Ok(false) => not_found(id).into_response(),
            Err(e) => store_failed(e).into_response(),
        }
    }
}

fn json_response(status: StatusCode, body: Bytes) -> Response {
    (status, [(axum::http::header::CONTENT_TYPE, "application/json")], body).into_response()
}

impl Turn {
    /// A response object as the client sees it: its `previous_response_id` as the client
    /// sent it (the engines were sent none), no transfer params.
    pub(crate) fn show(&self, response: &mut Value) {
        if let Some(obj) = response.as_object_mut() {
            obj.insert("previous_response_id".into(), self.previous_id.clone().map_or(Value::Null, Value::String));
            if obj.contains_key("kv_transfer_params") {
                obj.insert("kv_transfer_params".into(), Value::Null);
            }
        }
    }

    /// The finished response as the client sees it (`show`), stored with the conversation
    /// the next turn continues.
    pub(crate) async fn finish(&self, response: &mut Value) {
        self.show(response);
        let finished = matches!(response.get("status").and_then(Value::as_str), Some("completed" | "incomplete"));
        if !self.store || !finished || response.get("id").and_then(Value::as_str) != Some(self.id.as_str()) {
            return;
        }
        let stored = StoredResponse { response: response.to_string(), history: self.history_after(response).to_string() };
        if stored.response.len() + stored.history.len() > self.responses.max_bytes {
            tracing::warn!(id = %self.id, "a response over --responses-max-bytes was answered but not stored");
            return;
        }
        if let Err(e) = self.responses.store.put(&self.id, &self.owner, &stored).await {
            tracing::warn!(id = %self.id, "responses store: {e}; the response was answered but not stored");
        }
    }

    /// The input a turn continuing `response` starts with (vLLM's construction).
    fn history_after(&self, response: &Value) -> Value {
        let mut items: Vec<Value> =
            self.sent_input.iter().filter(|item| item.get("role").and_then(Value::as_str) != Some("system")).cloned().collect();
        for out in response.get("output").and_then(Value::as_array).into_iter().flatten() {
            if out.get("type").and_then(Value::as_str) != Some("message") {
                continue;
            }
            for part in out.get("content").and_then(Value::as_array).into_iter().flatten() {
                if let Some(text) = part.get("text").and_then(Value::as_str) {
                    items.push(json!({"role": "assistant", "content": text}));
                }
            }
        }
        Value::Array(items)
    }
}

#[cfg(test)]
mod tests {
    use crate::router::config::responses::StoreKind;
    use crate::router::responses::*;

    fn responses() -> Arc<Responses> {
        Arc::new(Responses::new(&ResponsesConfig {
            store: StoreKind::Off,
            ttl: std::time::Duration::from_secs(60),
            max_stored: 10,
            max_bytes: 1 << 20,
            timeout: std::time::Duration::from_secs(10),
        }))
    }

    #[tokio::test]
    async fn the_engines_get_the_routers_id_and_no_store_and_background_is_refused() {
        let r = responses();
        let body = ClientBody::parse(Bytes::from(
            json!({"model": "m", "input": "hi", "request_id": "resp_someone_elses", "store": true}).to_string(),
        ))
        .unwrap();
        let (sent, turn) = r.prepare(Owner(String::new()), body).await.unwrap();
        let v: Value = serde_json::from_slice(sent.raw()).unwrap();
        assert_eq!(v["request_id"], Value::String(turn.id.clone()));
        assert!(turn.id.starts_with("resp_") && turn.id != "resp_someone_elses");
        assert_eq!(v["store"], false);
        assert_eq!(v["input"], "hi", "an input without history is sent as it came");
        let bg = ClientBody::parse(Bytes::from(json!({"input": "hi", "background": true}).to_string())).unwrap();
        let Err(refused) = r.prepare(Owner(String::new()), bg).await else { panic!("background is refused") };
        assert!(refused.message.contains("background"));
    }

    #[test]
    fn history_drops_system_items_and_carries_the_output_texts_only() {
        let r = responses();
        let turn = Turn {
            responses: r,
            id: "resp_1".into(),
            owner: Owner(String::new()),
            previous_id: None,
            sent_input: vec![json!({"role": "system", "content": "s"}), json!({"role": "user", "content": "u"})],
            store: false,
        };
        let response = json!({"output": [
            {"type": "reasoning", "content": [{"type": "reasoning_text", "text": "r"}]},
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "a"}]},
            {"type": "function_call", "name": "f", "arguments": "{}"}]});
        assert_eq!(turn.history_after(&response), json!([{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]));
    }

    #[test]
    fn owners_are_digests_of_the_key_presented() {
        let keys = AuthConfig { client_keys: vec!["sk-a".to_string(), "sk-b".to_string()], ..AuthConfig::default() };
        let with = |k: &str| {
            let mut h = HeaderMap::new();
            h.insert(axum::http::header::AUTHORIZATION, format!("Bearer {k}").parse().unwrap());
            Responses::owner(&h, &keys, &Tenants::none())
        };
        assert_ne!(with("sk-a"), with("sk-b"));
        assert_eq!(with("sk-a"), with("sk-a"));
        assert!(!with("sk-a").0.contains("sk-a"));
        let mut x = HeaderMap::new();
        x.insert("x-api-key", "sk-a".parse().unwrap());
        assert_eq!(Responses::owner(&x, &keys, &Tenants::none()), with("sk-a"), "the same key by either header");
        assert_eq!(Responses::owner(&x, &AuthConfig::default(), &Tenants::none()).0, "", "no keys: one owner");
    }
}
