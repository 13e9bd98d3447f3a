//! vLLM's render endpoints (`--enable-scale-out`): the token ids a completions or chat
//! request would run (chat template applied), without generating. vLLM answers 403
//! without the flag, and so does the simulator. Completions answer one object per prompt
//! (a list), chat one object, each with vLLM 0.32's keys.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use super::generate::hex16;
use super::http::{Sim, MAX_BODY};
use crate::api::body::{parse_object, read_limited, require_json};
use crate::api::ApiError;
use crate::sim::engine::request::{self, Api};

pub(crate) fn forbidden() -> Response {
    let err = ApiError::with_status(
        StatusCode::FORBIDDEN,
        "Scale-out endpoints are disabled. Restart vllm serve with --enable-scale-out to enable them.",
    );
    let mut body = err.body();
    body["error"]["type"] = json!("PermissionDeniedError");
    (StatusCode::FORBIDDEN, axum::Json(body)).into_response()
}

fn rendered(sim: &Sim, id: String, tokens: Vec<u32>) -> Value {
    json!({"request_id": id, "token_ids": tokens, "token_offsets": null, "features": null, "content_parts": null,
        "model": sim.args.model, "kv_transfer_params": null, "ec_transfer_params": null})
}

/// What a render request is: its API's body, and what it answers.
#[derive(Clone, Copy)]
enum Form {
    /// One rendered prompt per prompt of the list.
    Completions,
    Chat,
    /// Anthropic's Messages: rendered as the chat request vLLM converts them to.
    Messages,
    /// OpenAI's Responses: rendered as the chat messages vLLM builds from them.
    Responses,
}

async fn render(sim: Arc<Sim>, form: Form, headers: HeaderMap, body: Body) -> Response {
    if !sim.args.enable_scale_out {
        return forbidden();
    }
    let result = async {
        require_json(&headers)?;
        let body = parse_object(&read_limited(&headers, body, MAX_BODY).await?)?;
        request::check_model(&body, &sim.args.model)?;
        let one = |prompts: Vec<Vec<u32>>| prompts.into_iter().next().unwrap_or_default();
        Ok::<_, ApiError>(match form {
            Form::Completions => {
                let prompts = request::prompt_tokens(Api::Completions, &body, sim.tokenizer.as_deref())?;
                Value::Array(prompts.into_iter().map(|p| rendered(&sim, format!("cmpl-{}", hex16()), p)).collect())
            }
            Form::Chat => {
                rendered(&sim, format!("chatcmpl-{}", hex16()), one(request::prompt_tokens(Api::Chat, &body, sim.tokenizer.as_deref())?))
            }
            Form::Messages => {
                let chat = super::messages::chat_request(&body)?;
                rendered(&sim, format!("msg-{}", hex16()), one(request::prompt_tokens(Api::Chat, &chat, sim.tokenizer.as_deref())?))
            }
            Form::Responses => {
                let chat = super::responses::chat_request(&body)?;
                rendered(&sim, format!("resp_{}", hex16()), one(request::prompt_tokens(Api::Chat, &chat, sim.tokenizer.as_deref())?))
            }
        })
    }
    .await;
    match result {
        Ok(v) => axum::Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

pub(crate) async fn completions(State(sim): State<Arc<Sim>>, headers: HeaderMap, body: Body) -> Response {
    render(sim, Form::Completions, headers, body).await
}

pub(crate) async fn chat(State(sim): State<Arc<Sim>>, headers: HeaderMap, body: Body) -> Response {
    render(sim, Form::Chat, headers, body).await
}

/// `/v1/messages/render`: a Messages request's token ids, as its chat request renders.
pub(crate) async fn messages(State(sim): State<Arc<Sim>>, headers: HeaderMap, body: Body) -> Response {
    render(sim, Form::Messages, headers, body).await
}

/// `/v1/responses/render`: a Responses request's token ids, as its chat messages render.
pub(crate) async fn responses(State(sim): State<Arc<Sim>>, headers: HeaderMap, body: Body) -> Response {
    render(sim, Form::Responses, headers, body).await
}
