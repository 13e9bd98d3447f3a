//! Request traces with hash ids: `--dataset-name timed_trace` (vLLM 0.32's, the same
//! lengths and arrival times as `vllm bench serve`; see [`Layout::Timed`]) and
//! `--dataset-name mooncake_trace` (ours, below) for Mooncake's request traces (FAST'25,
//! kvcache-ai/Mooncake `FAST25-release/traces`): one JSON object per line, `timestamp` (ms from the trace's start), `input_length`,
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
use serde_json::Value;

use super::dataset::{Prompt, SampleRequest, Tok};

/// Tokens per hash id in Mooncake's traces.
pub(crate) const TRACE_BLOCK: usize = 512;

/// The JSON keys of a record's fields (vLLM's `--timed-trace-label-*`).
#[derive(Clone, Debug)]
pub(crate) struct Labels {
    pub(crate) timestamp: String,
    pub(crate) input_length: String,
    pub(crate) output_length: String,
    pub(crate) hash_ids: String,
}

impl Default for Labels {
    fn default() -> Self {
        Labels {
            timestamp: "timestamp".into(),
            input_length: "input_length".into(),
            output_length: "output_length".into(),
            hash_ids: "hash_ids".into(),
        }
    }
}

/// How a trace's records become requests.
#[derive(Clone, Debug)]
pub(crate) enum Layout {
    /// `mooncake_trace` (ours): `block_size` tokens per hash id; the prompt is the first
    /// `input_length * block_size / 512` tokens of its blocks; arrivals at the timestamps
    /// (ms, counted from the first record's) divided by `speedup`.
    Mooncake { block_size: usize, speedup: f64 },
    /// `timed_trace` (vLLM 0.32's TimedTrace, the same lengths and times): `chunk` tokens
    /// per hash id, taken while `input_length` lasts (a last chunk cut short), so the
    /// prompt is shorter when the ids run out; arrivals at timestamp x `sec_multiplier`
    /// seconds from the start.
    Timed { chunk: usize, sec_multiplier: f64, labels: Labels },
}

pub(crate) struct TraceSpec {
    pub(crate) num: usize,
    pub(crate) layout: Layout,
}

/// A well-mixed 64-bit value of `x` (SplitMix64's finalizer).
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// `n` tokens drawn from `seed` alone (a block's: its hash id).
fn tokens_of(seed: u64, n: usize, allowed: &[u32]) -> impl Iterator<Item = u32> + '_ {
    let seed = mix(seed);
    (0..n as u64).map(move |j| allowed[(mix(seed ^ j.wrapping_mul(0x2545_f491_4f6c_dd1d)) % allowed.len() as u64) as usize])
}

fn field<'v>(record: &'v Value, key: &str, n: usize, path: &Path) -> anyhow::Result<&'v Value> {
    record.get(key).with_context(|| {
        let keys: Vec<&String> = record.as_object().map(|o| o.keys().collect()).unwrap_or_default();
        format!("{} line {}: no field `{key}` (the record has {keys:?}; --timed-trace-label-* name the fields)", path.display(), n + 1)
    })
}

fn number(v: &Value, key: &str, n: usize, path: &Path) -> anyhow::Result<f64> {
    v.as_f64()
        .filter(|x| x.is_finite() && *x >= 0.0)
        .with_context(|| format!("{} line {}: `{key}` is not a number of 0 or more: {v}", path.display(), n + 1))
}

/// The first `spec.num` requests of a trace file (fewer if it has fewer).
pub(crate) fn load(tok: &Tok, path: &Path, spec: &TraceSpec) -> anyhow::Result<Vec<SampleRequest>> {
    let (per_id, labels) = match &spec.layout {
        Layout::Mooncake { block_size, .. } => (*block_size, Labels::default()),
        Layout::Timed { chunk, labels, .. } => (*chunk, labels.clone()),
    };
    if per_id == 0 {
        bail!("tokens per hash id (--trace-block-size / --timed-trace-chunk-hash-size) must be at least 1");
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
        let record: Value = serde_json::from_str(raw).with_context(|| format!("{} line {}: not a JSON record", path.display(), n + 1))?;
        let timestamp = number(field(&record, &labels.timestamp, n, path)?, &labels.timestamp, n, path)?;
        let input_length = number(field(&record, &labels.input_length, n, path)?, &labels.input_length, n, path)? as usize;
        let output_length = number(field(&record, &labels.output_length, n, path)?, &labels.output_length, n, path)? as usize;
        let ids: Vec<u64> = match record.get(&labels.hash_ids) {
            None => Vec::new(),
            Some(v) => serde_json::from_value(v.clone())
                .with_context(|| format!("{} line {}: `{}` is not a list of ids", path.display(), n + 1, labels.hash_ids))?,
        };
        let (prompt, arrival): (Vec<u32>, f64) = match &spec.layout {
            Layout::Mooncake { block_size, speedup } => {
                let len = (input_length * block_size / TRACE_BLOCK).max(1);
                let blocks = len.div_ceil(*block_size);
                if ids.len() < blocks {
                    bail!(
                        "{} line {}: input_length {input_length} needs {blocks} hash ids of {TRACE_BLOCK} tokens, the line has {}",
                        path.display(),
                        n + 1,
                        ids.len()
                    );
                }
                let prompt = ids[..blocks].iter().flat_map(|h| tokens_of(*h, *block_size, &allowed)).take(len).collect();
                (prompt, (timestamp - *first_timestamp.get_or_insert(timestamp)).max(0.0) / 1000.0 / speedup)
            }
            Layout::Timed { chunk, sec_multiplier, .. } => {
                // vLLM's _expand_prompt: a chunk per id while the length lasts; a cut chunk
                // has tokens of its own (its key holds its size).
                let mut left = input_length;
                let mut prompt = Vec::new();
                for h in &ids {
                    if left == 0 {
                        break;
                    }
                    let size = (*chunk).min(left);
                    prompt.extend(tokens_of(mix(*h) ^ size as u64, size, &allowed));
                    left -= size;
                }
                (prompt, timestamp * sec_multiplier)
            }
        };
        if prompt.is_empty() {
            bail!("{} line {}: the record makes an empty prompt (no hash ids, or input length 0)", path.display(), n + 1);
        }
        out.push(SampleRequest {
            prompt_len: prompt.len(),
            prompt: Prompt::Tokens(prompt),
            output_len: output_length.max(1),
            arrival: Some(arrival),
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

    fn moon(num: usize, block_size: usize, speedup: f64) -> TraceSpec {
        TraceSpec { num, layout: Layout::Mooncake { block_size, speedup } }
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
        let reqs = load(&Tok::Sim, &p, &moon(10, 512, 2.0)).unwrap();
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
        let small = load(&Tok::Sim, &p, &moon(2, 16, 1.0)).unwrap();
        assert_eq!(small.iter().map(|r| r.prompt_len).collect::<Vec<_>>(), vec![34, 32]);
        assert_eq!(tokens(&small[0])[..32], tokens(&small[1])[..32]);
        assert_ne!(tokens(&small[0])[32..34], tokens(&small[1])[..2]);
        assert_eq!(small[1].arrival, Some(1.5));
        // A slice from the middle of a trace starts at once.
        let middle = trace(&[
            serde_json::json!({"timestamp": 5000, "input_length": 512, "output_length": 1, "hash_ids": [1]}),
            serde_json::json!({"timestamp": 5400, "input_length": 512, "output_length": 1, "hash_ids": [2]}),
        ]);
        let reqs = load(&Tok::Sim, &middle, &moon(2, 512, 2.0)).unwrap();
        assert_eq!(reqs.iter().map(|r| r.arrival.unwrap()).collect::<Vec<_>>(), vec![0.0, 0.2]);
    }

    #[test]
    fn a_line_without_enough_hash_ids_or_not_a_record_is_an_error_naming_it() {
        let short = trace(&[serde_json::json!({"timestamp": 0, "input_length": 2000, "output_length": 1, "hash_ids": [0, 1]})]);
        let e = load(&Tok::Sim, &short, &moon(1, 512, 1.0)).unwrap_err().to_string();
        assert!(e.contains("line 1") && e.contains("needs 4 hash ids"), "{e}");
        let bad = trace(&[serde_json::json!({"timestamp": 0})]);
        let e = load(&Tok::Sim, &bad, &moon(1, 512, 1.0)).unwrap_err().to_string();
        assert!(e.contains("line 1") && e.contains("input_length"), "{e}");
    }

    /// vLLM's timed_trace: 16 tokens per id while input_length lasts (here 40: two chunks
    /// and a cut one of 8), shorter when the ids run out (here 2 x 16 of 100), arrivals at
    /// timestamp x multiplier, not counted from the first record.
    #[test]
    fn timed_trace_lengths_and_times_are_vllms() {
        let p = trace(&[
            serde_json::json!({"timestamp": 1000, "input_length": 40, "output_length": 5, "hash_ids": [1, 2, 3, 4]}),
            serde_json::json!({"timestamp": 3000, "input_length": 100, "output_length": 6, "hash_ids": [1, 2]}),
            serde_json::json!({"ts": 1, "in": 16, "out": 1, "ids": [9]}),
        ]);
        let spec = TraceSpec { num: 2, layout: Layout::Timed { chunk: 16, sec_multiplier: 0.001, labels: Labels::default() } };
        let reqs = load(&Tok::Sim, &p, &spec).unwrap();
        assert_eq!(reqs.iter().map(|r| r.prompt_len).collect::<Vec<_>>(), vec![40, 32]);
        assert_eq!(reqs.iter().map(|r| r.arrival.unwrap()).collect::<Vec<_>>(), vec![1.0, 3.0]);
        assert_eq!(tokens(&reqs[0])[..32], tokens(&reqs[1])[..32], "equal ids, equal chunks");
        let e = load(&Tok::Sim, &p, &TraceSpec { num: 3, ..spec }).unwrap_err().to_string();
        assert!(e.contains("line 3") && e.contains("`timestamp`"), "{e}");
        let labels = Labels { timestamp: "ts".into(), input_length: "in".into(), output_length: "out".into(), hash_ids: "ids".into() };
        let p2 = trace(&[serde_json::json!({"ts": 1, "in": 16, "out": 1, "ids": [9]})]);
        let reqs = load(&Tok::Sim, &p2, &TraceSpec { num: 1, layout: Layout::Timed { chunk: 16, sec_multiplier: 1.0, labels } }).unwrap();
        assert_eq!((reqs[0].prompt_len, reqs[0].arrival), (16, Some(1.0)), "fields under the labels given");
    }
}
