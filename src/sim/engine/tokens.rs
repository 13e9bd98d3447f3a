//! The simulator's token model: a deterministic word-piece tokenizer and a generator whose
//! output is a pure function of the prompt and the sampling fields, as greedy decoding is
//! on a real engine. A disaggregated request and a colocated one therefore produce the
//! same text, which is what PD equality checks need.

use serde_json::Value;

pub(crate) const BOS: u32 = 1;
pub const EOS: u32 = 2;
const FIRST_TEXT_ID: u32 = 3;
pub(crate) const VOCAB: u32 = 32_000;
/// One generated token in this many is EOS (when EOS is honoured).
const EOS_ONE_IN: u64 = 100;

/// 64-bit FNV-1a of `bytes` (crate::api::fnv1a from the start).
pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    crate::api::fnv1a(crate::api::FNV_OFFSET, bytes)
}

/// splitmix64 finaliser: a cheap, well-mixed bijection.
pub(crate) fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[derive(Clone, Copy, PartialEq)]
enum Class {
    Word,
    Space,
    Other,
}

fn class(c: char) -> Class {
    if c.is_alphanumeric() || c == '_' {
        Class::Word
    } else if c.is_whitespace() {
        Class::Space
    } else {
        Class::Other
    }
}

/// Splits text into pieces: a word with at most one leading space, a run of other
/// whitespace, or a single punctuation character; each piece is one token.
pub(crate) fn tokenize(text: &str) -> Vec<u32> {
    let mut out = Vec::with_capacity(text.len() / 4 + 1);
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    let mut i = 0;
    while i < chars.len() {
        let start = chars[i].0;
        let c = chars[i].1;
        let mut j = i + 1;
        match class(c) {
            Class::Word => {
                while j < chars.len() && class(chars[j].1) == Class::Word {
                    j += 1;
                }
            }
            Class::Space => {
                while j < chars.len() && class(chars[j].1) == Class::Space {
                    j += 1;
                }
                // The last space of a run joins the word after it.
                if j < chars.len() && class(chars[j].1) == Class::Word && chars[j - 1].1 == ' ' {
                    if j - 1 > i {
                        j -= 1;
                    } else {
                        while j < chars.len() && class(chars[j].1) == Class::Word {
                            j += 1;
                        }
                    }
                }
            }
            Class::Other => {}
        }
        let end = chars.get(j).map_or(text.len(), |(p, _)| *p);
        out.push(piece_id(&text[start..end]));
        i = j;
    }
    out
}

fn piece_id(piece: &str) -> u32 {
    FIRST_TEXT_ID + (fnv1a(piece.as_bytes()) % u64::from(VOCAB - FIRST_TEXT_ID)) as u32
}

const ONSETS: [&str; 16] = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "ch", "sh"];
const VOWELS: [&str; 8] = ["a", "e", "i", "o", "u", "ai", "ou", "ee"];

/// The text of a generated token: a space and a pronounceable pseudo-word.
pub(crate) fn token_text(id: u32) -> String {
    match id {
        BOS => "<s>".into(),
        EOS => String::new(),
        _ => {
            let h = mix(u64::from(id));
            let syllables = 1 + (h % 3) as usize;
            let mut s = String::from(" ");
            for k in 0..syllables {
                let bits = h >> (8 + 8 * k);
                s.push_str(ONSETS[(bits & 15) as usize]);
                s.push_str(VOWELS[((bits >> 4) & 7) as usize]);
            }
            s
        }
    }
}

/// A stable fingerprint of a token sequence: what a decode compares with the blocks it
/// pulled, standing in for the KV content itself.
pub(crate) fn fingerprint(tokens: &[u32]) -> u64 {
    tokens.iter().fold(0x5151_5151_u64, |h, t| mix(h ^ u64::from(*t)))
}

/// The deterministic sampler. `seed` folds in the prompt and every sampling field that
/// changes which tokens come out (not the ones that only cut the output short).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Generator {
    seed: u64,
    /// A token a large `logit_bias` forces at every step.
    forced: Option<u32>,
}

/// Sampling fields that select tokens; `max_tokens`, `min_tokens`, `stop` and `ignore_eos`
/// only decide where the same sequence ends.
pub(crate) const SAMPLING_FIELDS: &[&str] =
    &["temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty", "frequency_penalty", "repetition_penalty"];

impl Generator {
    #[cfg(test)]
    pub(crate) fn new(prompt_fingerprint: u64, body: &serde_json::Map<String, Value>) -> Self {
        let seed = body.get("seed").and_then(Value::as_i64);
        Generator::for_choice(prompt_fingerprint, body, seed, 0, 1)
    }

    /// Choice `j` of `n`: with a seed, sampled as a request seeded `seed + j` is (vLLM
    /// seeds its child requests so); without one, each choice differs.
    pub(crate) fn for_choice(
        prompt_fingerprint: u64,
        body: &serde_json::Map<String, Value>,
        seed: Option<i64>,
        j: usize,
        n: usize,
    ) -> Self {
        let mut state = prompt_fingerprint;
        for field in SAMPLING_FIELDS {
            let value = match (*field, seed) {
                ("seed", Some(s)) => Some((i128::from(s) + j as i128).to_string()),
                _ => body.get(*field).filter(|v| !v.is_null()).map(Value::to_string),
            };
            if let Some(v) = value {
                state = mix(state ^ fnv1a(field.as_bytes()) ^ fnv1a(v.as_bytes()));
            }
        }
        if seed.is_none() && n > 1 && j > 0 {
            state = mix(state ^ j as u64);
        }
        Generator { seed: state, forced: None }
    }

    /// This generator with every token forced (request.rs: `logit_bias`).
    pub(crate) fn with_forced(self, forced: Option<u32>) -> Self {
        Generator { forced, ..self }
    }

    /// The token at output position `i` (0-based).
    pub(crate) fn token(&self, i: usize) -> u32 {
        if let Some(t) = self.forced {
            return t;
        }
        let h = mix(self.seed ^ mix(i as u64 + 1));
        if h % EOS_ONE_IN == 0 {
            EOS
        } else {
            FIRST_TEXT_ID + ((h >> 8) % u64::from(VOCAB - FIRST_TEXT_ID)) as u32
        }
    }
}

/// A text token that stands in for EOS when `ignore_eos` asks to keep going.
pub(crate) fn non_eos(id: u32, i: usize) -> u32 {
    if id == EOS {
        FIRST_TEXT_ID + (mix(i as u64) % u64::from(VOCAB - FIRST_TEXT_ID)) as u32
    } else {
        id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokenizer_splits_words_spaces_and_punctuation() {
        assert_eq!(tokenize("Hello, world").len(), 3); // "Hello" "," " world"
        assert_eq!(tokenize("a  b").len(), 3); // "a" " " " b"
        assert_eq!(tokenize("").len(), 0);
        assert_eq!(tokenize("héllo wörld"), tokenize("héllo wörld"));
        assert_ne!(tokenize("one"), tokenize("two"));
    }

    #[test]
    fn generator_is_a_function_of_prompt_and_sampling_fields() {
        let body: serde_json::Map<String, Value> = serde_json::from_str(r#"{"temperature":0,"max_tokens":5}"#).unwrap();
        let other_max: serde_json::Map<String, Value> = serde_json::from_str(r#"{"temperature":0,"max_tokens":99}"#).unwrap();
        let hot: serde_json::Map<String, Value> = serde_json::from_str(r#"{"temperature":0.9}"#).unwrap();
        let fp = fingerprint(&tokenize("the prompt"));
        let a = Generator::new(fp, &body);
        let b = Generator::new(fp, &other_max);
        let c = Generator::new(fp, &hot);
        let seq = |g: Generator| (0..50).map(|i| g.token(i)).collect::<Vec<_>>();
        assert_eq!(seq(a), seq(b));
        assert_ne!(seq(a), seq(c));
    }

    #[test]
    fn generated_text_is_nonempty_words() {
        for id in 3..200 {
            let t = token_text(id);
            assert!(t.starts_with(' ') && t.len() > 1, "{id}: {t:?}");
        }
    }
}
