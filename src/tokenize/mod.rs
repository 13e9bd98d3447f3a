//! A model's tokens as vLLM makes them: the Hugging Face tokenizer (tokenizer.json) and
//! the model's chat template (chat_template.jinja, or `chat_template` in
//! tokenizer_config.json) rendered with minijinja and the Python string methods HF
//! templates use (minijinja-contrib's pycompat). Completions prompts are encoded with the
//! tokenizer's special tokens (`add_special_tokens=True`), rendered chats without (the
//! template writes them), as vLLM does. Shared by the simulator and the router.

use std::path::Path;

mod turns;

use anyhow::Context;
use minijinja::{Environment, ErrorKind, Value};
use serde_json::Value as Json;

pub struct ModelTokenizer {
    tokenizer: std::sync::Arc<tokenizers::Tokenizer>,
    /// Earlier turns of a conversation, tokenized once (turns.rs).
    turns: turns::TurnCache,
    template: Option<Environment<'static>>,
    bos: String,
    eos: String,
}

/// A special token in tokenizer_config.json: a string or `{"content": ..}`.
fn special(cfg: &Json, key: &str) -> String {
    match cfg.get(key) {
        Some(Json::String(s)) => s.clone(),
        Some(Json::Object(o)) => o.get("content").and_then(Json::as_str).unwrap_or_default().to_string(),
        _ => String::new(),
    }
}

fn raise_exception(msg: String) -> Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
}

fn strftime_now(fmt: String) -> String {
    chrono::Local::now().format(&fmt).to_string()
}

/// A model directory's tokenizer.json, as vLLM uses it: prompts whole (no truncation, no
/// padding). The one place the file is read.
pub(crate) fn load_tokenizer(dir: &str) -> anyhow::Result<tokenizers::Tokenizer> {
    let file = Path::new(dir).join("tokenizer.json");
    let mut tokenizer = tokenizers::Tokenizer::from_file(&file).map_err(|e| anyhow::anyhow!("cannot load {}: {e}", file.display()))?;
    tokenizer.with_truncation(None).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    tokenizer.with_padding(None);
    Ok(tokenizer)
}

impl ModelTokenizer {
    pub fn load(dir: &str) -> anyhow::Result<Self> {
        Self::with_tokenizer(dir, std::sync::Arc::new(load_tokenizer(dir)?))
    }

    /// The model's chat template and special tokens from `dir`, over a tokenizer already
    /// loaded from it (load_tokenizer).
    pub(crate) fn with_tokenizer(dir: &str, tokenizer: std::sync::Arc<tokenizers::Tokenizer>) -> anyhow::Result<Self> {
        let dir = Path::new(dir);
        let turns = turns::TurnCache::new(&tokenizer);
        let cfg: Json = match std::fs::read_to_string(dir.join("tokenizer_config.json")) {
            Ok(text) => serde_json::from_str(&text).context("tokenizer_config.json is not JSON")?,
            Err(_) => Json::Null,
        };
        let source = match std::fs::read_to_string(dir.join("chat_template.jinja")) {
            Ok(t) => Some(t),
            Err(_) => cfg.get("chat_template").and_then(Json::as_str).map(str::to_owned),
        };
        let template = match source {
            Some(src) => {
                let mut env = Environment::new();
                // HF renders chat templates with trim_blocks and lstrip_blocks.
                env.set_syntax(
                    minijinja::syntax::SyntaxConfig::builder().trim_blocks(true).lstrip_blocks(true).build().expect("default delimiters"),
                );
                env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
                env.add_function("raise_exception", raise_exception);
                env.add_function("strftime_now", strftime_now);
                env.add_template_owned("chat", src).context("the chat template does not parse")?;
                Some(env)
            }
            None => None,
        };
        Ok(ModelTokenizer { tokenizer, turns, template, bos: special(&cfg, "bos_token"), eos: special(&cfg, "eos_token") })
    }

    /// A completions prompt's token ids.
    pub fn encode(&self, text: &str) -> anyhow::Result<Vec<u32>> {
        let enc = self.tokenizer.encode_fast(text, true).map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Token ids back to text, special tokens kept (vLLM's /detokenize).
    pub(crate) fn decode(&self, ids: &[u32]) -> anyhow::Result<String> {
        self.tokenizer.decode(ids, false).map_err(|e| anyhow::anyhow!("detokenizing: {e}"))
    }

    /// The chat template applied to a chat request's body (messages, tools,
    /// `add_generation_prompt`, `chat_template_kwargs`).
    pub fn render_chat(&self, body: &serde_json::Map<String, Json>) -> anyhow::Result<String> {
        let env = self.template.as_ref().context("the model has no chat template")?;
        let mut ctx = serde_json::Map::new();
        ctx.insert("messages".into(), body.get("messages").cloned().unwrap_or(Json::Array(Vec::new())));
        if let Some(tools) = body.get("tools").filter(|t| !t.is_null()) {
            ctx.insert("tools".into(), tools.clone());
        }
        let add_gen = body.get("add_generation_prompt").and_then(Json::as_bool).unwrap_or(true);
        ctx.insert("add_generation_prompt".into(), Json::Bool(add_gen));
        ctx.insert("bos_token".into(), Json::String(self.bos.clone()));
        ctx.insert("eos_token".into(), Json::String(self.eos.clone()));
        if let Some(Json::Object(kw)) = body.get("chat_template_kwargs") {
            for (k, v) in kw {
                ctx.insert(k.clone(), v.clone());
            }
        }
        let tmpl = env.get_template("chat").expect("added at load");
        tmpl.render(Value::from(minijinja::value::Serde(&ctx))).map_err(|e| anyhow::anyhow!("rendering the chat template: {e}"))
    }

    /// A chat request's token ids: the rendered template, encoded without adding special
    /// tokens again; a conversation's earlier turns come from the turn cache.
    pub fn encode_chat(&self, body: &serde_json::Map<String, Json>) -> anyhow::Result<Vec<u32>> {
        self.turns.encode(&self.tokenizer, &self.render_chat(body)?)
    }

    /// A rendered chat's token ids, tokenized whole (no cache): what `encode_chat` must equal.
    pub fn encode_rendered_whole(&self, text: &str) -> anyhow::Result<Vec<u32>> {
        turns::encode(&self.tokenizer, text)
    }

    /// Prefixes the turn cache holds, and their token ids together.
    pub fn turns_held(&self) -> (usize, usize) {
        self.turns.held()
    }

    /// Chats that found an earlier turn of theirs in the turn cache, so far.
    pub fn turn_hits(&self) -> usize {
        self.turns.hits()
    }
}
