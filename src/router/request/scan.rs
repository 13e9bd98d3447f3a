//! The fast path of the body's one scan (body.rs). A 100k-token prompt is ~660 KB of
//! digits, and serde_json validates it number by number (the router's top CPU cost in
//! docs/PERFORMANCE.md's profile). Here a top-level object whose keys have no escapes,
//! and whose array values are token ids written as JSON writers write them (`[1,2,3]` or
//! Python's `[1, 2, 3]`), is checked 64 bytes at a time (AVX2 where the CPU has it, else
//! SSE2); other values go to serde_json one by one. Anything else (nested arrays or
//! objects, escaped keys, any error) answers None and body.rs scans the whole body with
//! serde_json, so this never accepts what serde_json would refuse: every byte of an
//! accepted token array is checked against JSON's grammar.

use std::borrow::Cow;
use std::fmt;
use std::ops::Range;

use serde::de::{DeserializeSeed, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

/// A top-level key (decoded) and where its value lies in the body.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Field {
    pub(crate) key: Box<str>,
    pub(crate) value: Range<usize>,
}

/// The body's top-level fields: the fast path, else serde_json's scan (and its error).
pub(super) fn scan(raw: &[u8]) -> Result<Vec<Field>, serde_json::Error> {
    top_level(raw).map_or_else(|| with_serde(raw), Ok)
}

/// serde_json's scan: every byte checked, keys decoded.
fn with_serde(raw: &[u8]) -> Result<Vec<Field>, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_slice(raw);
    TopLevel { base: raw.as_ptr() as usize }.deserialize(&mut de).and_then(|f| de.end().map(|()| f))
}

/// Records each top-level key and the byte range of its value.
struct TopLevel {
    base: usize,
}

impl<'de> DeserializeSeed<'de> for TopLevel {
    type Value = Vec<Field>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Vec<Field>, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for TopLevel {
    type Value = Vec<Field>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Vec<Field>, A::Error> {
        let mut fields = Vec::with_capacity(16);
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            let value: &'de RawValue = map.next_value()?;
            let start = value.get().as_ptr() as usize - self.base;
            fields.push(Field { key: key.into(), value: start..start + value.get().len() });
        }
        Ok(fields)
    }
}

/// Each top-level key and the byte range of its value, or None (serde_json decides).
fn top_level(raw: &[u8]) -> Option<Vec<Field>> {
    let mut i = skip_ws(raw, 0);
    if raw.get(i) != Some(&b'{') {
        return None;
    }
    i = skip_ws(raw, i + 1);
    let mut fields = Vec::with_capacity(16);
    if raw.get(i) == Some(&b'}') {
        return (skip_ws(raw, i + 1) == raw.len()).then_some(fields);
    }
    loop {
        if raw.get(i) != Some(&b'"') {
            return None;
        }
        let start = i + 1;
        let end = start + memchr::memchr2(b'"', b'\\', &raw[start..])?;
        if raw[end] != b'"' || raw[start..end].iter().any(|&b| b < 0x20) {
            return None;
        }
        let key = std::str::from_utf8(&raw[start..end]).ok()?;
        i = skip_ws(raw, end + 1);
        if raw.get(i) != Some(&b':') {
            return None;
        }
        i = skip_ws(raw, i + 1);
        let value_end = match raw.get(i)? {
            b'[' => token_ids(raw, i)?,
            // serde_json's depth limit counts from the top-level object: nested values are
            // left to the whole-body scan.
            b'{' => return None,
            _ => scalar(raw, i)?,
        };
        fields.push(Field { key: key.into(), value: i..value_end });
        i = skip_ws(raw, value_end);
        match raw.get(i)? {
            b',' => i = skip_ws(raw, i + 1),
            b'}' => return (skip_ws(raw, i + 1) == raw.len()).then_some(fields),
            _ => return None,
        }
    }
}

fn skip_ws(raw: &[u8], mut i: usize) -> usize {
    while matches!(raw.get(i), Some(b' ' | b'\n' | b'\r' | b'\t')) {
        i += 1;
    }
    i
}

/// The end of the string, number, `true`, `false` or `null` at `at`, as serde_json reads it.
fn scalar(raw: &[u8], at: usize) -> Option<usize> {
    let mut de = serde_json::Deserializer::from_slice(&raw[at..]);
    let value: &RawValue = serde::Deserialize::deserialize(&mut de).ok()?;
    Some(value.get().as_ptr() as usize - raw.as_ptr() as usize + value.get().len())
}

/// The end of the array at `open` if it is non-negative integers separated by `,` or `, `,
/// checked 64 bytes at a time: up to the first `]` only digits, commas and spaces, with no
/// `,,`, `  `, `<digit> `, ` ,`, nor a `0` that starts a number and is followed by a digit;
/// the first and last bytes digits (or nothing: `[]`).
fn token_ids(raw: &[u8], open: usize) -> Option<usize> {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: this CPU has AVX2 (checked just above).
        return unsafe { token_ids_avx2(raw, open) };
    }
    check_token_ids(raw, open, Masks::of)
}

/// `token_ids` compiled for AVX2, its masks 32 bytes at a time.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn token_ids_avx2(raw: &[u8], open: usize) -> Option<usize> {
    // SAFETY: the caller checked that this CPU has AVX2.
    check_token_ids(raw, open, |block| unsafe { Masks::avx2(block) })
}

#[inline(always)]
fn check_token_ids(raw: &[u8], open: usize, masks_of: impl Fn(&[u8; 64]) -> Masks) -> Option<usize> {
    let inner = &raw[open + 1..];
    // The previous block's classes: bits 63 and 62 are the two bytes before this block.
    let (mut prev, mut bad) = (Masks::default(), 0u64);
    for (n, block) in inner.chunks(64).enumerate() {
        let m = match block.try_into() {
            Ok(full) => masks_of(full),
            Err(_) => {
                let mut padded = [b']'; 64];
                padded[..block.len()].copy_from_slice(block);
                masks_of(&padded)
            }
        };
        let other = !(m.digit | m.comma | m.space);
        let before = |now: u64, then: u64| (now << 1) | (then >> 63);
        let (d1, c1, s1, z1) =
            (before(m.digit, prev.digit), before(m.comma, prev.comma), before(m.space, prev.space), before(m.zero, prev.zero));
        let d2 = (m.digit << 2) | (prev.digit >> 62);
        let wrong = (m.comma & (c1 | s1))
            | (m.space & (s1 | d1))
            // byte i a digit after a `0` that is not after a digit: a leading zero
            | (m.digit & z1 & !d2);
        if other != 0 {
            // The first byte of another class must be the closing bracket.
            let at = other.trailing_zeros() as usize;
            let close = n * 64 + at;
            bad |= wrong & ((1u64 << at) - 1);
            let edges = close == 0 || (inner[0].is_ascii_digit() && inner[close - 1].is_ascii_digit());
            return (bad == 0 && inner.get(close) == Some(&b']') && edges).then_some(open + close + 2);
        }
        bad |= wrong;
        prev = m;
    }
    None
}

/// A 64-byte block's masks with one x86 SIMD width: `$width` bytes per lane, each byte a
/// digit when `byte - '0'` (wrapping) is at most 9, unsigned.
#[cfg(target_arch = "x86_64")]
macro_rules! lane_masks {
    ($block:expr, $width:literal, $bits:ty, $load:ident, $set1:ident, $sub:ident, $max:ident, $cmpeq:ident, $movemask:ident) => {{
        use std::arch::x86_64::*;
        let mut m = Masks::default();
        for (i, chunk) in $block.chunks_exact($width).enumerate() {
            // SAFETY: the CPU has these instructions (said where this is used); the load
            // reads exactly the `$width` bytes of `chunk`, unaligned.
            let lanes = unsafe {
                let v = $load(chunk.as_ptr().cast());
                let nine = $set1(9);
                let offset = $sub(v, $set1(b'0' as i8));
                let eq = |b: u8| $movemask($cmpeq(v, $set1(b as i8)));
                [$movemask($cmpeq($max(offset, nine), nine)), eq(b','), eq(b' '), eq(b'0')]
            };
            m.put($width * i, lanes.map(|bits| u64::from(bits as $bits)));
        }
        m
    }};
}

/// One bit per byte of 64: digits, commas, spaces, and `0`s.
#[derive(Default, Clone, Copy, Debug, PartialEq)]
struct Masks {
    digit: u64,
    comma: u64,
    space: u64,
    zero: u64,
}

impl Masks {
    #[cfg(target_arch = "x86_64")]
    fn of(block: &[u8; 64]) -> Masks {
        // SSE2 is part of every x86_64 CPU.
        lane_masks!(block, 16, u16, _mm_loadu_si128, _mm_set1_epi8, _mm_sub_epi8, _mm_max_epu8, _mm_cmpeq_epi8, _mm_movemask_epi8)
    }

    /// As `of`, 32 bytes at a time.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn avx2(block: &[u8; 64]) -> Masks {
        // The caller checked that this CPU has AVX2.
        lane_masks!(
            block,
            32,
            u32,
            _mm256_loadu_si256,
            _mm256_set1_epi8,
            _mm256_sub_epi8,
            _mm256_max_epu8,
            _mm256_cmpeq_epi8,
            _mm256_movemask_epi8
        )
    }

    /// Adds one lane's masks (digits, commas, spaces, zeros) for the bytes from `at` on.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    fn put(&mut self, at: usize, [digit, comma, space, zero]: [u64; 4]) {
        self.digit |= digit << at;
        self.comma |= comma << at;
        self.space |= space << at;
        self.zero |= zero << at;
    }

    #[cfg(not(target_arch = "x86_64"))]
    fn of(block: &[u8; 64]) -> Masks {
        Masks::scalar(block)
    }

    #[cfg_attr(target_arch = "x86_64", allow(dead_code))]
    fn scalar(block: &[u8; 64]) -> Masks {
        let bits = |f: &dyn Fn(u8) -> bool| block.iter().enumerate().fold(0u64, |m, (i, &b)| m | (u64::from(f(b)) << i));
        Masks { digit: bits(&|b| b.is_ascii_digit()), comma: bits(&|b| b == b','), space: bits(&|b| b == b' '), zero: bits(&|b| b == b'0') }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn fast(raw: &str) -> Option<Vec<(String, String)>> {
        top_level(raw.as_bytes()).map(|f| f.into_iter().map(|f| (f.key.into(), raw[f.value].to_string())).collect())
    }

    #[test]
    fn token_arrays_are_checked_to_the_byte() {
        for ok in ["[]", "[0]", "[1,2,3]", "[10, 0, 7]", "[1234567890123456789012345678901234567890]"] {
            let body = format!(r#"{{"prompt": {ok}, "max_tokens": 3}}"#);
            assert_eq!(fast(&body), Some(vec![("prompt".into(), ok.into()), ("max_tokens".into(), "3".into())]), "{body}");
        }
        for bad in [
            "[01]",
            "[1,,2]",
            "[1 ,2]",
            "[1  2]",
            "[1 2]",
            "[1,]",
            "[,1]",
            "[1,  2]",
            "[1,2 ]",
            "[-1]",
            "[1.5]",
            "[1e3]",
            "[ 1]",
            "[1,\n2]",
            "[1,00]",
            "[1,2,3,4,5,6,7,8,9,10,11,012]",
        ] {
            let body = format!(r#"{{"prompt": {bad}}}"#);
            assert_eq!(fast(&body), None, "{body}");
        }
    }

    /// Bodies in the shapes the fast path takes, and near misses of them.
    fn body() -> impl Strategy<Value = String> {
        let token = prop_oneof![Just("0".to_string()), Just("00".into()), Just("-1".into()), Just("1.5".into()), "[1-9][0-9]{0,6}"];
        let sep = prop_oneof![4 => Just(",".to_string()), 4 => Just(", ".into()), 1 => Just(",,".into()), 1 => Just(" ,".into()), 1 => Just(",\n".into()), 1 => Just(" ".into())];
        let array = prop::collection::vec((token, sep), 0..40).prop_map(|items| {
            let n = items.len();
            let inner: String = items.into_iter().enumerate().map(|(i, (t, s))| if i + 1 < n { t + &s } else { t }).collect();
            format!("[{inner}]")
        });
        let value = prop_oneof![4 => array, 1 => Just("\"p\\\"q\"".to_string()), 1 => Just("true".into()), 1 => Just("{\"a\":[1]}".into()), 1 => Just("[[1],[2]]".into()), 1 => Just("12x".into()), 1 => Just("[1".into())];
        let key = prop_oneof![Just("prompt".to_string()), Just("max_tokens".into()), Just("k\\u0065y".into()), Just("p\u{e9}".into())];
        prop::collection::vec((key, value, prop_oneof![Just(""), Just(" "), Just("\n\t")]), 0..4).prop_map(|fields| {
            let inner: Vec<String> = fields.into_iter().map(|(k, v, ws)| format!("{ws}\"{k}\"{ws}:{ws}{v}{ws}")).collect();
            format!("{{{}}}", inner.join(","))
        })
    }

    proptest! {
        /// Whenever the fast path answers, serde_json accepts the body and finds the same
        /// fields at the same places.
        #[test]
        fn the_fast_path_agrees_with_serde(raw in body(), cut in 0usize..200) {
            let cut = (0..=cut.min(raw.len())).rev().find(|&i| raw.is_char_boundary(i)).unwrap_or(0);
            for candidate in [raw.clone(), raw[..cut].to_string()] {
                if let Some(fast) = top_level(candidate.as_bytes()) {
                    prop_assert_eq!(Some(fast), with_serde(candidate.as_bytes()).ok(), "{}", candidate);
                }
            }
        }

        #[test]
        fn simd_masks_match_the_scalar_ones(bytes in prop::collection::vec(prop_oneof![Just(b'0'), Just(b'9'), Just(b','), Just(b' '), Just(b'/'), Just(b':'), any::<u8>()], 64)) {
            let block: [u8; 64] = bytes.try_into().unwrap();
            prop_assert_eq!(Masks::of(&block), Masks::scalar(&block));
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: AVX2 checked just above.
                prop_assert_eq!(unsafe { Masks::avx2(&block) }, Masks::scalar(&block));
            }
        }
    }

    /// A defect at every byte offset, across the 64-byte blocks' edges, is found.
    #[test]
    fn defects_across_block_edges_are_found() {
        for pad in 0..140 {
            let lead = "7".repeat(pad % 9 + 1);
            let fill: String = std::iter::repeat_n("5,", pad / 2).collect();
            let ok = format!("{{\"prompt\":[{fill}{lead},0, 10]}}");
            assert!(top_level(ok.as_bytes()).is_some(), "{ok}");
            // Not JSON, and JSON in another shape (left to serde_json).
            for (defect, json) in [(",,", false), (" ", false), (" ,", true), (",  ", true)] {
                let other = format!("{{\"prompt\":[{fill}{lead}{defect}0, 10]}}");
                assert_eq!(top_level(other.as_bytes()), None, "{other}");
                assert_eq!(with_serde(other.as_bytes()).is_ok(), json, "{other}");
            }
            let zero = format!("{{\"prompt\":[{fill}{lead},01, 10]}}");
            assert_eq!(top_level(zero.as_bytes()), None, "{zero}");
        }
    }

    /// A Python client's token prompt (`json.dumps`: `, `) and a compact one take the fast
    /// path: the case it is for.
    #[test]
    fn prompts_of_token_ids_take_the_fast_path() {
        let ids: Vec<u32> = (0..5000).map(|i| (i * 7919) % 128_000).collect();
        let compact = serde_json::to_string(&serde_json::json!({"model": "m", "prompt": ids, "max_tokens": 1})).unwrap();
        let python = compact.replace(',', ", ");
        for raw in [compact, python] {
            let fast = top_level(raw.as_bytes()).expect("takes the fast path");
            assert_eq!(fast, with_serde(raw.as_bytes()).unwrap());
        }
    }
}
