//! A conversation's earlier turns are not tokenized again: each rendered chat is cut
//! where the tokenizer itself cuts it, at its added tokens (`</s>`, `<|im_end|>`,
//! `<|eot_id|>`, ...). The Hugging Face tokenizer splits the text around those before
//! normalizing, pre-tokenizing and running the model on each piece alone, so the tokens
//! of a text are the tokens of its prefix up to such a cut followed by those of the rest.
//! The rest is encoded starting *with* the added token that ends the prefix (and that
//! token's id dropped), so that every piece after it sits at the same non-zero offset as
//! in the whole text (Metaspace's `prepend_scheme: first` looks at that). Exact by
//! construction; tests compare it with whole-text encoding on every turn of conversations.
//!
//! The cache maps a keyed hash (SipHash, a random key per process: a client cannot craft
//! collisions) of the text up to a cut, and its length, to that prefix's token ids. Each
//! chat stores its last cut, which the next turn of the same conversation starts with.
//! Bounded by [`CACHE_TOKENS`] token ids, least recently used out first.

use std::hash::{BuildHasher, Hasher};
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};

use lru::LruCache;
use tokenizers::{OffsetReferential, OffsetType, Tokenizer};

/// Token ids the cache holds at most, all prefixes together (4 bytes each: 32 MiB).
pub(crate) const CACHE_TOKENS: usize = 8 << 20;
/// The last cuts of a text looked up (a new turn adds a few; a text with thousands of
/// added tokens is not searched through under the lock).
const CUTS_LOOKED_UP: usize = 32;
/// Entries at most, whatever their sizes.
const CACHE_ENTRIES: usize = 4096;

#[derive(PartialEq, Eq, Hash, Clone, Copy)]
struct Key {
    hash: u64,
    len: usize,
}

pub(crate) struct TurnCache {
    /// Token ids held at most ([`CACHE_TOKENS`]; tests set less).
    max_tokens: usize,
    /// Ids of the added tokens the tokenizer splits on before normalizing (the cuts).
    cut_ids: std::collections::HashSet<u32>,
    hasher: std::hash::RandomState,
    entries: Mutex<Entries>,
    /// Texts that found a prefix cached.
    hits: std::sync::atomic::AtomicUsize,
}

struct Entries {
    lru: LruCache<Key, Arc<[u32]>>,
    tokens: usize,
}

/// Where the text may be cut: (the added token's start, its end), in bytes.
type Cut = (usize, usize);

impl TurnCache {
    pub(crate) fn new(tokenizer: &Tokenizer) -> Self {
        Self::bounded(tokenizer, CACHE_TOKENS)
    }

    fn bounded(tokenizer: &Tokenizer, max_tokens: usize) -> Self {
        let added = tokenizer.get_added_vocabulary().get_added_tokens_decoder();
        let cut_ids = added.iter().filter(|(_, t)| !t.normalized).map(|(id, _)| *id).collect();
        let entries = Entries { lru: LruCache::new(NonZeroUsize::new(CACHE_ENTRIES).expect("not zero")), tokens: 0 };
        TurnCache { max_tokens, cut_ids, hasher: std::hash::RandomState::new(), entries: Mutex::new(entries), hits: Default::default() }
    }

    /// The text's token ids (no special tokens added), reusing the longest cached prefix.
    pub(crate) fn encode(&self, tokenizer: &Tokenizer, text: &str) -> anyhow::Result<Vec<u32>> {
        let cuts = self.cuts(tokenizer, text);
        let Some(&last) = cuts.last() else { return encode(tokenizer, text) };
        let keys = self.keys(text, &cuts);
        let cached = {
            let mut entries = self.entries.lock().expect("turn cache lock");
            keys.iter().enumerate().rev().take(CUTS_LOOKED_UP).find_map(|(i, k)| entries.lru.get(k).map(|t| (i, t.clone())))
        };
        // The prefix up to the last cut, then the rest after it.
        let lastkey = keys[cuts.len() - 1];
        if cached.is_some() {
            self.hits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let mut ids = match cached {
            Some((i, tokens)) if i == cuts.len() - 1 => tokens.to_vec(),
            found => {
                let head = match found {
                    Some((i, tokens)) => {
                        let mut head = tokens.to_vec();
                        head.extend_from_slice(&encode(tokenizer, &text[cuts[i].0..last.1])?[1..]);
                        head
                    }
                    None => encode(tokenizer, &text[..last.1])?,
                };
                self.store(lastkey, Arc::from(head.as_slice()));
                head
            }
        };
        ids.extend_from_slice(&encode(tokenizer, &text[last.0..])?[1..]);
        Ok(ids)
    }

    /// The added tokens (of `cut_ids`) where the tokenizer splits `text`.
    fn cuts(&self, tokenizer: &Tokenizer, text: &str) -> Vec<Cut> {
        let split = tokenizer.get_added_vocabulary().extract_and_normalize::<tokenizers::NormalizerWrapper>(None, text);
        split
            .get_splits(OffsetReferential::Original, OffsetType::Byte)
            .into_iter()
            .filter(|(_, _, tokens)| tokens.as_ref().is_some_and(|t| t.len() == 1 && self.cut_ids.contains(&t[0].id)))
            .map(|(_, offsets, _)| offsets)
            .collect()
    }

    /// One pass over the text: the key of its prefix up to each cut.
    fn keys(&self, text: &str, cuts: &[Cut]) -> Vec<Key> {
        let mut h = self.hasher.build_hasher();
        let mut at = 0;
        cuts.iter()
            .map(|&(_, end)| {
                h.write(&text.as_bytes()[at..end]);
                at = end;
                Key { hash: h.finish(), len: end }
            })
            .collect()
    }

    fn store(&self, key: Key, tokens: Arc<[u32]>) {
        if tokens.len() > self.max_tokens / 4 {
            return;
        }
        let mut entries = self.entries.lock().expect("turn cache lock");
        let added = tokens.len();
        if let Some((_, old)) = entries.lru.push(key, tokens) {
            entries.tokens -= old.len();
        }
        entries.tokens += added;
        while entries.tokens > self.max_tokens {
            match entries.lru.pop_lru() {
                Some((_, old)) => entries.tokens -= old.len(),
                None => break,
            }
        }
    }

    /// Texts that found a prefix of theirs cached, so far.
    pub(crate) fn hits(&self) -> usize {
        self.hits.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Prefixes held, and their token ids together.
    pub(crate) fn held(&self) -> (usize, usize) {
        let entries = self.entries.lock().expect("turn cache lock");
        (entries.lru.len(), entries.tokens)
    }
}

/// Token ids without special tokens added. Where `text` starts at a cut, its first id
/// is that added token's (callers slice it off: `[1..]`, never empty).
pub(crate) fn encode(tokenizer: &Tokenizer, text: &str) -> anyhow::Result<Vec<u32>> {
    let enc = tokenizer.encode_fast(text, false).map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?;
    Ok(enc.get_ids().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A word-level tokenizer with Metaspace's `prepend_scheme: first` (only a text's very
    /// first piece gets "▁"), an added special token `<eot>` and one with `rstrip`: a cut
    /// encoded at the wrong offset, or split where the tokenizer does not split, gives
    /// other ids.
    fn tokenizer() -> Tokenizer {
        let words = ["[unk]", "▁hi", "hi", "▁there", "there", "▁user", "user", "▁bot", "bot", "▁", "<eot>", "<sep>"];
        let vocab: serde_json::Map<String, serde_json::Value> = words.iter().enumerate().map(|(i, w)| (w.to_string(), i.into())).collect();
        let json = serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null,
            "added_tokens": [
                {"id": 10, "content": "<eot>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
                {"id": 11, "content": "<sep>", "single_word": false, "lstrip": false, "rstrip": true, "normalized": false, "special": true}
            ],
            "normalizer": null,
            "pre_tokenizer": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": true},
            "post_processor": null, "decoder": null,
            "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[unk]"}
        });
        json.to_string().parse().expect("a tokenizer")
    }

    /// Turn `n` of a conversation, rendered as a chat template would: the earlier turns'
    /// questions and answers, this turn's question, the generation prompt (" bot").
    fn turn(n: usize) -> String {
        let question = |k: usize| format!("user hi{}<sep>", if k % 2 == 0 { " there" } else { "" });
        let mut text = String::from("hi there<eot>");
        for k in 0..n {
            text += &(question(k) + " bot there<eot>");
        }
        text + &question(n) + " bot"
    }

    #[test]
    fn every_turn_of_a_conversation_equals_whole_text_encoding_and_reuses_the_last() {
        let tok = tokenizer();
        let cache = TurnCache::new(&tok);
        for n in 0..6 {
            let text = turn(n);
            let whole = encode(&tok, &text).unwrap();
            assert!(!whole.contains(&0), "the test's vocabulary covers the text: {whole:?}");
            assert_eq!(cache.encode(&tok, &text).unwrap(), whole, "turn {n}");
            assert_eq!(cache.hits(), 2 * n, "turn {n} found turn {}'s prefix", n.max(1) - 1);
            assert_eq!(cache.encode(&tok, &text).unwrap(), whole, "turn {n}, again (its own last cut cached)");
        }
        let (entries, tokens) = cache.held();
        assert_eq!(entries, 6, "one prefix per turn");
        assert!(tokens > 0);
        // A first piece gets "▁", a piece after a cut does not: the offsets are kept.
        assert_eq!(encode(&tok, "hi<eot>hi").unwrap(), vec![1, 10, 2]);
        assert_eq!(cache.encode(&tok, "hi<eot>hi").unwrap(), vec![1, 10, 2]);
    }

    #[test]
    fn a_prefix_found_is_only_used_where_the_text_really_continues_it() {
        let tok = tokenizer();
        let cache = TurnCache::new(&tok);
        cache.encode(&tok, "hi there<eot>user hi<sep>bot").unwrap();
        // Same length up to the cut, different text: a different key.
        let other = "hi hi<eot>user hi<sep>bot there";
        assert_eq!(cache.encode(&tok, other).unwrap(), encode(&tok, other).unwrap());
        // No cut at all, and a text that is only a cut.
        assert_eq!(cache.encode(&tok, "hi there").unwrap(), vec![1, 3]);
        assert_eq!(cache.encode(&tok, "<eot>").unwrap(), vec![10]);
        assert_eq!(cache.encode(&tok, "").unwrap(), Vec::<u32>::new());
    }

    #[test]
    fn the_cache_keeps_within_its_token_bound() {
        let tok = tokenizer();
        let cache = TurnCache::bounded(&tok, 1000);
        // Each text stores its prefix up to its last cut (about 200 tokens): one distinct
        // entry per text, the oldest going once they pass 1,000 tokens.
        let long = "hi ".repeat(200);
        for k in 0..6 {
            let text = format!("{}{long}<eot>bot", "there ".repeat(k));
            assert_eq!(cache.encode(&tok, &text).unwrap(), encode(&tok, &text).unwrap());
        }
        let (entries, tokens) = cache.held();
        assert!(tokens <= 1000 && entries == 4, "{entries} entries, {tokens} tokens");
        // Too long for a quarter of the bound: not stored at all.
        cache.encode(&tok, &format!("{}<eot>", "hi ".repeat(300))).unwrap();
        assert_eq!(cache.held().0, 4);
    }
}
