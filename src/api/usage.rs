//! The token counts an answer reports in its `usage`, in each dialect's names: a whole
//! answer's read from its JSON, a stream's from its last bytes (its final usage chunk,
//! Anthropic's `message_delta`, the Responses `response.completed` event).

use serde::Deserialize;

use crate::api::dialect::Dialect;

/// Prompt, output and cached prompt tokens, as far as the answer reported them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Usage {
    pub(crate) prompt: Option<u64>,
    pub(crate) output: Option<u64>,
    pub(crate) cached: Option<u64>,
}

#[derive(Deserialize)]
struct Reported {
    usage: Option<Fields>,
}
#[derive(Deserialize)]
struct Fields {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    prompt_tokens_details: Option<Details>,
    input_tokens_details: Option<Details>,
    cache_read_input_tokens: Option<u64>,
}
#[derive(Deserialize)]
struct Details {
    cached_tokens: Option<u64>,
}

/// The names each dialect gives prompt, output and cached tokens.
fn keys(dialect: Dialect) -> [&'static [u8]; 3] {
    match dialect {
        Dialect::OpenAi => [b"\"prompt_tokens\":", b"\"completion_tokens\":", b"\"cached_tokens\":"],
        Dialect::Responses => [b"\"input_tokens\":", b"\"output_tokens\":", b"\"cached_tokens\":"],
        Dialect::Anthropic => [b"\"input_tokens\":", b"\"output_tokens\":", b"\"cache_read_input_tokens\":"],
    }
}

/// A whole JSON answer's usage (one parse of the answer).
pub(crate) fn whole(body: &[u8], dialect: Dialect) -> Usage {
    let Some(u) = serde_json::from_slice::<Reported>(body).ok().and_then(|r| r.usage) else { return Usage::default() };
    match dialect {
        Dialect::OpenAi => {
            Usage { prompt: u.prompt_tokens, output: u.completion_tokens, cached: u.prompt_tokens_details.and_then(|d| d.cached_tokens) }
        }
        Dialect::Responses => {
            Usage { prompt: u.input_tokens, output: u.output_tokens, cached: u.input_tokens_details.and_then(|d| d.cached_tokens) }
        }
        Dialect::Anthropic => Usage { prompt: u.input_tokens, output: u.output_tokens, cached: u.cache_read_input_tokens },
    }
}

/// The last value of each count in a stream's last bytes.
pub(crate) fn in_stream(tail: &[u8], dialect: Dialect) -> Usage {
    let [prompt, output, cached] = keys(dialect).map(|k| last_number(tail, k));
    Usage { prompt, output, cached }
}

/// The number after the last `key` in `tail`.
fn last_number(tail: &[u8], key: &[u8]) -> Option<u64> {
    let at = memchr::memmem::rfind(tail, key)? + key.len();
    let rest = &tail[at..];
    let rest = &rest[rest.iter().take_while(|b| b.is_ascii_whitespace()).count()..];
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::dialect::Dialect::{Anthropic, OpenAi, Responses};

    #[test]
    fn each_dialects_usage_is_read_whole_and_from_a_streams_end() {
        let whole_openai = br#"{"usage":{"prompt_tokens":70,"completion_tokens":5,"prompt_tokens_details":{"cached_tokens":64}}}"#;
        assert_eq!(whole(whole_openai, OpenAi), Usage { prompt: Some(70), output: Some(5), cached: Some(64) });
        assert_eq!(whole(br#"{"usage":{"prompt_tokens":70}}"#, OpenAi), Usage { prompt: Some(70), output: None, cached: None });
        assert_eq!(whole(b"not json", OpenAi), Usage::default());
        let resp = br#"{"usage":{"input_tokens":9,"output_tokens":3,"input_tokens_details":{"cached_tokens":0}}}"#;
        assert_eq!(whole(resp, Responses), Usage { prompt: Some(9), output: Some(3), cached: Some(0) });
        let msg = br#"{"type":"message","usage":{"input_tokens":6,"output_tokens":2,"cache_read_input_tokens":64}}"#;
        assert_eq!(whole(msg, Anthropic), Usage { prompt: Some(6), output: Some(2), cached: Some(64) });
        let stream = b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":1}}\n\n\
                       data: {\"choices\":[],\"usage\":{\"prompt_tokens\": 12,\"completion_tokens\":7,\"prompt_tokens_details\":{\"cached_tokens\":0}}}\n\ndata: [DONE]\n\n";
        assert_eq!(in_stream(stream, OpenAi), Usage { prompt: Some(12), output: Some(7), cached: Some(0) });
        assert_eq!(in_stream(b"data: [DONE]", OpenAi), Usage::default());
        assert_eq!(in_stream(b"\"prompt_tokens\":", OpenAi).prompt, None, "cut off: nothing to read");
    }
}
