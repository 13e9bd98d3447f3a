//! The requests of a run: vLLM's random dataset (same length distributions and prompt
//! construction; our own RNG, so not the same prompts for a given seed), ShareGPT files
//! (the same requests as vLLM's, in the same way), vLLM's prefix_repetition, and
//! Mooncake's request traces (trace.rs).

use std::path::Path;

use anyhow::{bail, Context};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use tokenizers::PostProcessor;

use crate::sim::engine::tokens as sim_tokens;

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(untagged)]
pub(crate) enum Prompt {
    Text(String),
    /// Sent as token ids, so that no tokenizer round trip changes it (traces).
    Tokens(Vec<u32>),
}

impl From<String> for Prompt {
    fn from(s: String) -> Self {
        Prompt::Text(s)
    }
}

#[derive(Debug, Clone)]
pub(crate) struct SampleRequest {
    pub(crate) prompt: Prompt,
    pub(crate) prompt_len: usize,
    pub(crate) output_len: usize,
    /// When it is sent, in seconds from the run's start, where the dataset says (traces).
    pub(crate) arrival: Option<f64>,
}

/// A tokenizer: a HF tokenizer.json, or the simulator's word pieces.
pub(crate) enum Tok {
    Hf(Box<tokenizers::Tokenizer>),
    Sim,
}

const SIM_VOCAB: usize = 32_000;

impl Tok {
    pub(crate) fn load(spec: &str) -> anyhow::Result<Tok> {
        if spec == "sim" {
            return Ok(Tok::Sim);
        }
        let path = Path::new(spec);
        let file = if path.is_dir() { path.join("tokenizer.json") } else { path.to_path_buf() };
        let t =
            tokenizers::Tokenizer::from_file(&file).map_err(|e| anyhow::anyhow!("cannot load the tokenizer {}: {e}", file.display()))?;
        Ok(Tok::Hf(Box::new(t)))
    }

    /// Token ids of `text`; `special` adds the tokenizer's special tokens (BOS ...).
    pub(crate) fn encode(&self, text: &str, special: bool) -> Vec<u32> {
        match self {
            Tok::Hf(t) => t.encode(text, special).map(|e| e.get_ids().to_vec()).unwrap_or_default(),
            Tok::Sim => sim_tokens::tokenize(text),
        }
    }

    pub(crate) fn decode(&self, ids: &[u32]) -> String {
        match self {
            Tok::Hf(t) => t.decode(ids, true).unwrap_or_default(),
            Tok::Sim => ids.iter().map(|i| sim_tokens::token_text(*i)).collect(),
        }
    }

    pub(crate) fn vocab_size(&self) -> usize {
        match self {
            Tok::Hf(t) => t.get_vocab_size(true),
            Tok::Sim => SIM_VOCAB,
        }
    }

    pub(crate) fn special_ids(&self) -> Vec<u32> {
        match self {
            Tok::Hf(t) => t.get_added_tokens_decoder().iter().filter(|(_, a)| a.special).map(|(id, _)| *id).collect(),
            Tok::Sim => vec![0, sim_tokens::BOS, sim_tokens::EOS],
        }
    }

    /// Special tokens the tokenizer adds to a single sequence (vLLM subtracts them).
    pub(crate) fn num_special_tokens_to_add(&self) -> usize {
        match self {
            Tok::Hf(t) => t.get_post_processor().map_or(0, |p| p.added_tokens(false)),
            Tok::Sim => 0,
        }
    }
}

/// vLLM's decode-then-encode loop: keeps a prompt's token count at the target although
/// some token sequences re-tokenize differently.
fn prompt_of_len(tok: &Tok, mut ids: Vec<u32>, target: usize, rng: &mut StdRng) -> (String, Vec<u32>) {
    let mut tries = 10;
    loop {
        let prompt = tok.decode(&ids);
        ids = tok.encode(&prompt, false);
        if tries == 0 || ids.len() == target {
            return (prompt, ids);
        }
        if ids.len() < target {
            let v = tok.vocab_size() as u32;
            ids.extend((ids.len()..target).map(|_| rng.random_range(0..v)));
        } else {
            ids.truncate(target);
        }
        tries -= 1;
    }
}

pub(crate) struct RandomSpec {
    pub(crate) num: usize,
    pub(crate) input_len: usize,
    pub(crate) output_len: usize,
    pub(crate) range_ratio: f64,
    pub(crate) prefix_len: usize,
    pub(crate) seed: u64,
}

/// The length ranges vLLM samples from (get_sampling_params).
pub(crate) fn length_ranges(spec: &RandomSpec, num_special: usize) -> ((usize, usize), (usize, usize)) {
    let real_input = spec.input_len.saturating_sub(num_special) as f64;
    let r = spec.range_ratio;
    let input = ((real_input * (1.0 - r)).floor() as usize, (real_input * (1.0 + r)).ceil() as usize);
    let out = spec.output_len as f64;
    let output = (((out * (1.0 - r)).floor() as usize).max(1), ((out * (1.0 + r)).ceil() as usize).max(1));
    (input, output)
}

pub(crate) fn random(tok: &Tok, spec: &RandomSpec) -> anyhow::Result<Vec<SampleRequest>> {
    let mut rng = StdRng::seed_from_u64(spec.seed);
    let ((in_lo, in_hi), (out_lo, out_hi)) = length_ranges(spec, tok.num_special_tokens_to_add());
    if spec.prefix_len + in_lo < 1 {
        bail!("--random-input-len is too small: the shortest prompt would have no token; raise it or --random-prefix-len, or lower --random-range-ratio");
    }
    let special = tok.special_ids();
    let allowed: Vec<u32> = (0..tok.vocab_size() as u32).filter(|t| !special.contains(t)).collect();
    let prefix: Vec<u32> = if spec.prefix_len > 0 {
        let ids = (0..spec.prefix_len).map(|_| allowed[rng.random_range(0..allowed.len())]).collect();
        prompt_of_len(tok, ids, spec.prefix_len, &mut rng).1
    } else {
        Vec::new()
    };
    let lens: Vec<(usize, usize, usize)> = (0..spec.num)
        .map(|_| (rng.random_range(in_lo..=in_hi), rng.random_range(out_lo..=out_hi), rng.random_range(0..tok.vocab_size())))
        .collect();
    let mut out = Vec::with_capacity(spec.num);
    for (i, (input_len, output_len, offset)) in lens.into_iter().enumerate() {
        let mut ids = prefix.clone();
        ids.extend((0..input_len).map(|k| allowed[(offset + i + k) % allowed.len()]));
        let (prompt, ids) = prompt_of_len(tok, ids, spec.prefix_len + input_len, &mut rng);
        out.push(SampleRequest { prompt: prompt.into(), prompt_len: ids.len(), output_len, arrival: None });
    }
    Ok(out)
}

/// vLLM's `prefix_repetition` (PrefixRepetitionRandomDataset): `num_prefixes` random
/// prefixes of `prefix_len` tokens, each followed by `num / num_prefixes` random suffixes
/// of `suffix_len` tokens (each part decoded and re-encoded to its exact length), shuffled
/// with the seed unless disabled.
pub(crate) struct PrefixRepetitionSpec {
    pub(crate) num: usize,
    pub(crate) prefix_len: usize,
    pub(crate) suffix_len: usize,
    pub(crate) num_prefixes: usize,
    pub(crate) output_len: usize,
    pub(crate) shuffle: bool,
    pub(crate) seed: u64,
}

pub(crate) fn prefix_repetition(tok: &Tok, spec: &PrefixRepetitionSpec) -> anyhow::Result<Vec<SampleRequest>> {
    let per_prefix = spec.num / spec.num_prefixes.max(1);
    if per_prefix == 0 {
        bail!("num_requests ({}) must be greater than or equal to num_prefixes ({})", spec.num, spec.num_prefixes);
    }
    let mut rng = StdRng::seed_from_u64(spec.seed);
    let v = tok.vocab_size() as u32;
    let part = |len: usize, rng: &mut StdRng| {
        let ids: Vec<u32> = (0..len).map(|_| rng.random_range(0..v)).collect();
        prompt_of_len(tok, ids, len, rng).1
    };
    let mut out = Vec::with_capacity(per_prefix * spec.num_prefixes);
    for _ in 0..spec.num_prefixes {
        let prefix = part(spec.prefix_len, &mut rng);
        for _ in 0..per_prefix {
            let mut ids = prefix.clone();
            ids.extend(part(spec.suffix_len, &mut rng));
            out.push(SampleRequest { prompt: tok.decode(&ids).into(), prompt_len: ids.len(), output_len: spec.output_len, arrival: None });
        }
    }
    if spec.shuffle {
        out.shuffle(&mut rng);
    }
    Ok(out)
}

/// vLLM's ShareGPT sampling: entries with at least two turns, shuffled with the seed
/// unless disabled; prompt = first turn, output length = the second turn's token count
/// (or the given length); pairs outside vLLM's bounds (prompt < 4 or > 1024 tokens,
/// output < 4, total > 2048) are skipped.
pub(crate) fn sharegpt(
    tok: &Tok,
    path: &Path,
    num: usize,
    output_len: Option<usize>,
    shuffle: bool,
    seed: u64,
) -> anyhow::Result<Vec<SampleRequest>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let data: Vec<serde_json::Value> = serde_json::from_str(&text).with_context(|| format!("{} is not a JSON list", path.display()))?;
    let mut entries: Vec<(String, String)> = data
        .iter()
        .filter_map(|e| {
            let c = e.get("conversations")?.as_array()?;
            if c.len() < 2 {
                return None;
            }
            Some((c[0].get("value")?.as_str()?.to_string(), c[1].get("value")?.as_str()?.to_string()))
        })
        .collect();
    if shuffle {
        entries.shuffle(&mut StdRng::seed_from_u64(seed));
    }
    let mut out = Vec::new();
    for (prompt, completion) in entries {
        if out.len() >= num {
            break;
        }
        let prompt_len = tok.encode(&prompt, true).len();
        let out_len = output_len.unwrap_or_else(|| tok.encode(&completion, true).len());
        let too_short = prompt_len < 4 || (output_len.is_none() && out_len < 4);
        if too_short || prompt_len > 1024 || prompt_len + out_len > 2048 {
            continue;
        }
        out.push(SampleRequest { prompt: prompt.into(), prompt_len, output_len: out_len, arrival: None });
    }
    if out.is_empty() {
        bail!("{} has no usable conversation (two turns, prompt 4..=1024 tokens)", path.display());
    }
    // vLLM oversamples up to --num-prompts.
    let mut rng = StdRng::seed_from_u64(seed);
    while out.len() < num {
        let pick = out[rng.random_range(0..out.len())].clone();
        out.push(pick);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(r: &SampleRequest) -> &str {
        match &r.prompt {
            Prompt::Text(s) => s,
            Prompt::Tokens(_) => panic!("a text prompt"),
        }
    }

    #[test]
    fn random_lengths_follow_vllms_ranges() {
        let spec = RandomSpec { num: 4000, input_len: 100, output_len: 50, range_ratio: 0.2, prefix_len: 0, seed: 7 };
        let ((ilo, ihi), (olo, ohi)) = length_ranges(&spec, 0);
        assert_eq!((ilo, ihi, olo, ohi), (80, 120, 40, 60));
        let reqs = random(&Tok::Sim, &spec).unwrap();
        assert_eq!(reqs.len(), 4000);
        let ins: Vec<usize> = reqs.iter().map(|r| r.prompt_len).collect();
        let outs: Vec<usize> = reqs.iter().map(|r| r.output_len).collect();
        assert!(ins.iter().all(|l| (80..=120).contains(l)) && outs.iter().all(|l| (40..=60).contains(l)));
        // Uniform: every value appears, the mean is the middle, each tenth of the range ~10%.
        let mean = |v: &[usize]| v.iter().sum::<usize>() as f64 / v.len() as f64;
        assert!((mean(&ins) - 100.0).abs() < 1.0, "{}", mean(&ins));
        assert!((mean(&outs) - 50.0).abs() < 0.5, "{}", mean(&outs));
        assert_eq!(outs.iter().collect::<std::collections::HashSet<_>>().len(), 21);
        let low = ins.iter().filter(|l| **l < 100).count() as f64 / 4000.0;
        assert!((low - 20.0 / 41.0).abs() < 0.03, "{low}");
        // The sim tokenizer keeps exactly the sampled length.
        assert_eq!(Tok::Sim.encode(text(&reqs[0]), false).len(), reqs[0].prompt_len);
    }

    #[test]
    fn zero_ratio_gives_fixed_lengths_and_a_shared_prefix() {
        let spec = RandomSpec { num: 20, input_len: 30, output_len: 9, range_ratio: 0.0, prefix_len: 10, seed: 1 };
        let reqs = random(&Tok::Sim, &spec).unwrap();
        assert!(reqs.iter().all(|r| r.prompt_len == 40 && r.output_len == 9));
        let first: Vec<&str> = text(&reqs[0]).split(' ').take(11).collect();
        assert!(reqs.iter().all(|r| text(r).split(' ').take(11).collect::<Vec<_>>() == first), "shared prefix");
        assert_ne!(reqs[0].prompt, reqs[1].prompt);
        let again = random(&Tok::Sim, &spec).unwrap();
        assert_eq!(again[5].prompt, reqs[5].prompt, "seeded");
    }

    #[test]
    fn sharegpt_takes_first_turns_and_skips_what_vllm_skips() {
        let dir = std::env::temp_dir().join(format!("sg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("sg.json");
        let long = "word ".repeat(1100);
        std::fs::write(&p, serde_json::json!([
            {"conversations": [{"from": "human", "value": "tell me about the sea please"}, {"from": "gpt", "value": "the sea is big and blue and deep"}]},
            {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "a long enough answer here"}]},
            {"conversations": [{"from": "human", "value": long}, {"from": "gpt", "value": "a long enough answer here"}]},
            {"conversations": [{"from": "human", "value": "only one turn"}]},
        ]).to_string()).unwrap();
        let reqs = sharegpt(&Tok::Sim, &p, 1, None, false, 0).unwrap();
        assert_eq!(text(&reqs[0]), "tell me about the sea please");
        assert_eq!(reqs[0].output_len, Tok::Sim.encode("the sea is big and blue and deep", true).len());
        let over = sharegpt(&Tok::Sim, &p, 3, Some(7), false, 0).unwrap();
        assert_eq!(over.len(), 3, "oversampled");
        assert!(over.iter().all(|r| r.output_len == 7 && text(r) == "tell me about the sea please"));
    }

    #[test]
    fn prefix_repetition_shares_each_prefix_among_its_suffixes() {
        let spec = PrefixRepetitionSpec { num: 26, prefix_len: 12, suffix_len: 5, num_prefixes: 4, output_len: 7, shuffle: true, seed: 3 };
        let reqs = prefix_repetition(&Tok::Sim, &spec).unwrap();
        assert_eq!(reqs.len(), 24, "num // num_prefixes per prefix, as vLLM");
        assert!(reqs.iter().all(|r| r.output_len == 7 && r.prompt_len == 17));
        let mut groups = std::collections::HashMap::new();
        for r in &reqs {
            let prefix = Tok::Sim.encode(text(r), false)[..12].to_vec();
            *groups.entry(prefix).or_insert(0) += 1;
        }
        assert_eq!(groups.len(), 4);
        assert!(groups.values().all(|n| *n == 6));
        assert!(prefix_repetition(&Tok::Sim, &PrefixRepetitionSpec { num: 3, ..spec }).is_err());
    }
}
