//! Mooncake's request traces (FAST'25, kvcache-ai/Mooncake `FAST25-release/traces`): one
//! JSON object per line, `timestamp` (ms from the trace's start), `input_length`,
//! `output_length` (tokens) and `hash_ids`, one per block of 512 prompt tokens, remapped so
//! that equal ids mean an equal (shareable) block.
//!
//! Replayed as token-id prompts (no tokenizer round trip can change them): block i is
//! `block_size` tokens drawn from hash_ids[i] alone, so equal ids give equal blocks and
//! different ids different ones; the prompt is the first `input_length * block_size / 512`
//! tokens of its blocks (`--trace-block-size`, default 512: the trace's own lengths), never
//! a special token. Requests arrive at their timestamps (counted from the first record's,
//! so a slice from the middle of a trace starts at once) divided by `--trace-speedup`, and
//! generate their recorded output length (with `--ignore-eos`, exactly).

use std::path::Path;

use anyhow::{bail, Context};
use serde::Deserialize;

use super::dataset::{Prompt, SampleRequest, Tok};

/// Tokens per hash id in the traces.
pub const TRACE_BLOCK: usize = 512;

#[derive(Deserialize)]
struct Line {
    timestamp: f64,
    input_length: usize,
    output_length: usize,
    hash_ids: Vec<u64>,
}

pub struct TraceSpec {
    pub num: usize,
    /// Tokens per hash id in the replay.
    pub block_size: usize,
    /// Arrivals come this many times faster than recorded.
    pub speedup: f64,
}

/// A well-mixed 64-bit value of `x` (SplitMix64's finalizer).
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The tokens of the block with hash id `id`: a function of the id alone.
pub fn block_tokens(id: u64, block_size: usize, allowed: &[u32]) -> impl Iterator<Item = u32> + '_ {
    let seed = mix(id);
    (0..block_size as u64).map(move |j| allowed[(mix(seed ^ j.wrapping_mul(0x2545_f491_4f6c_dd1d)) % allowed.len() as u64) as usize])
}

/// The first `spec.num` requests of a trace file (fewer if it has fewer).
pub fn mooncake(tok: &Tok, path: &Path, spec: &TraceSpec) -> anyhow::Result<Vec<SampleRequest>> {
    if spec.block_size == 0 {
        bail!("--trace-block-size must be at least 1");
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let special = tok.special_ids();
    let allowed: Vec<u32> = (0..tok.vocab_size() as u32).filter(|t| !special.contains(t)).collect();
    if allowed.is_empty() {
        bail!("the tokenizer has no ordinary token to build prompts from");
    }
    let mut out = Vec::new();
    let mut first_timestamp = None;
    for (n, raw) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        if out.len() >= spec.num {
            break;
        }
        let line: Line = serde_json::from_str(raw).with_context(|| format!("{} line {}: not a Mooncake trace record", path.display(), n + 1))?;
        let prompt_len = (line.input_length * spec.block_size / TRACE_BLOCK).max(1);
        let blocks = prompt_len.div_ceil(spec.block_size);
        if line.hash_ids.len() < blocks {
            bail!("{} line {}: input_length {} needs {blocks} hash ids of {} tokens, the line has {}",
                path.display(), n + 1, line.input_length, TRACE_BLOCK, line.hash_ids.len());
        }
        let ids: Vec<u32> = line.hash_ids[..blocks].iter().flat_map(|h| block_tokens(*h, spec.block_size, &allowed)).take(prompt_len).collect();
        out.push(SampleRequest {
            prompt: Prompt::Tokens(ids),
            prompt_len,
            output_len: line.output_length.max(1),
            arrival: Some((line.timestamp - *first_timestamp.get_or_insert(line.timestamp)).max(0.0) / 1000.0 / spec.speedup),
        });
    }
    if out.is_empty() {
        bail!("{} holds no request", path.display());
    }
    if out.len() < spec.num {
        eprintln!("{} holds {} requests; replaying them all (--num-prompts {})", path.display(), out.len(), spec.num);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trace(lines: &[serde_json::Value]) -> std::path::PathBuf {
        let p = std::env::temp_dir().join(format!("trace-{}-{}.jsonl", std::process::id(), rand::random::<u32>()));
        std::fs::write(&p, lines.iter().map(|l| l.to_string() + "\n").collect::<String>()).unwrap();
        p
    }

    fn tokens(r: &SampleRequest) -> &[u32] {
        match &r.prompt {
            Prompt::Tokens(t) => t,
            Prompt::Text(_) => panic!("token ids"),
        }
    }

    #[test]
    fn equal_hash_ids_give_equal_blocks_and_lengths_are_exact() {
        let p = trace(&[
            serde_json::json!({"timestamp": 0, "input_length": 1100, "output_length": 7, "hash_ids": [0, 1, 2]}),
            serde_json::json!({"timestamp": 1500, "input_length": 1030, "output_length": 0, "hash_ids": [0, 1, 5]}),
            serde_json::json!({"timestamp": 3000, "input_length": 600, "output_length": 3, "hash_ids": [9, 1]}),
        ]);
        let reqs = mooncake(&Tok::Sim, &p, &TraceSpec { num: 10, block_size: 512, speedup: 2.0 }).unwrap();
        assert_eq!(reqs.iter().map(|r| r.prompt_len).collect::<Vec<_>>(), vec![1100, 1030, 600]);
        assert!(reqs.iter().all(|r| tokens(r).len() == r.prompt_len), "the prompt is exactly input_length tokens");
        assert_eq!(reqs.iter().map(|r| r.output_len).collect::<Vec<_>>(), vec![7, 1, 3]);
        assert_eq!(reqs.iter().map(|r| r.arrival.unwrap()).collect::<Vec<_>>(), vec![0.0, 0.75, 1.5], "timestamps / speedup");
        let (a, b, c) = (tokens(&reqs[0]), tokens(&reqs[1]), tokens(&reqs[2]));
        assert_eq!(a[..1024], b[..1024], "hash ids 0, 1 shared: the first two blocks are equal");
        assert_ne!(a[1024..1030], b[1024..1030], "ids 2 and 5 differ");
        assert_ne!(a[..512], c[..512], "ids 0 and 9 differ");
        assert_eq!(a[512..600], c[512..600], "id 1 at the same position: the same block");
        let special = Tok::Sim.special_ids();
        assert!(a.iter().all(|t| !special.contains(t)), "no special token");

        // Scaled to 16 tokens per hash id: lengths scale, sharing stays.
        let small = mooncake(&Tok::Sim, &p, &TraceSpec { num: 2, block_size: 16, speedup: 1.0 }).unwrap();
        assert_eq!(small.iter().map(|r| r.prompt_len).collect::<Vec<_>>(), vec![34, 32]);
        assert_eq!(tokens(&small[0])[..32], tokens(&small[1])[..32]);
        assert_ne!(tokens(&small[0])[32..34], tokens(&small[1])[..2]);
        assert_eq!(small[1].arrival, Some(1.5));
        // A slice from the middle of a trace starts at once.
        let middle = trace(&[
            serde_json::json!({"timestamp": 5000, "input_length": 512, "output_length": 1, "hash_ids": [1]}),
            serde_json::json!({"timestamp": 5400, "input_length": 512, "output_length": 1, "hash_ids": [2]}),
        ]);
        let reqs = mooncake(&Tok::Sim, &middle, &TraceSpec { num: 2, block_size: 512, speedup: 2.0 }).unwrap();
        assert_eq!(reqs.iter().map(|r| r.arrival.unwrap()).collect::<Vec<_>>(), vec![0.0, 0.2]);
    }

    #[test]
    fn a_line_without_enough_hash_ids_or_not_a_record_is_an_error_naming_it() {
        let short = trace(&[serde_json::json!({"timestamp": 0, "input_length": 2000, "output_length": 1, "hash_ids": [0, 1]})]);
        let e = mooncake(&Tok::Sim, &short, &TraceSpec { num: 1, block_size: 512, speedup: 1.0 }).unwrap_err().to_string();
        assert!(e.contains("line 1") && e.contains("needs 4 hash ids"), "{e}");
        let bad = trace(&[serde_json::json!({"timestamp": 0})]);
        let e = mooncake(&Tok::Sim, &bad, &TraceSpec { num: 1, block_size: 512, speedup: 1.0 }).unwrap_err().to_string();
        assert!(e.contains("line 1"), "{e}");
    }
}
