//! Property-based fuzzing (proptest) of the code that takes untrusted bytes apart: the
//! router's request-body surgery, the SSE splitter, and the launch YAML parser. CI runs
//! it with PROPTEST_CASES set (scripts/test.sh); a failure prints the minimal input, which
//! then becomes a plain regression test below.

use bytes::Bytes;
use proptest::prelude::*;
use serde_json::{Map, Value};

use disagg::api::sse::EventSplitter;
use disagg::router::request::body::ClientBody;
use disagg::router::request::LegBodies;

/// JSON values a client might send, strings with escapes and non-ASCII included.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(Value::from),
        "\\PC{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::vec(("[a-z_]{1,6}", inner), 0..4).prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// Top-level keys, the ones the router treats specially among them.
fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("kv_transfer_params".to_string()),
        Just("ec_transfer_params".to_string()),
        Just("vllm_xargs".to_string()),
        Just("prompt".to_string()),
        Just("stream".to_string()),
        Just("max_tokens".to_string()),
        "[a-z_]{1,10}",
    ]
}

/// Writes an object by hand: duplicate keys kept, keys sometimes escaped, random spaces.
fn write_object(entries: &[(String, Value)], escape: &[bool], spaces: &[u8]) -> String {
    let sp = |i: usize| " \n\t ".chars().take(spaces.get(i).copied().unwrap_or(0) as usize % 3).collect::<String>();
    let mut out = format!("{}{{", sp(0));
    for (i, (k, v)) in entries.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let key = if escape.get(i).copied().unwrap_or(false) {
            format!("\"{}\"", k.chars().map(|c| format!("\\u{:04x}", c as u32)).collect::<String>())
        } else {
            serde_json::to_string(k).unwrap()
        };
        out.push_str(&format!("{}{key}{}:{}{}", sp(i + 1), sp(i + 2), sp(i + 3), serde_json::to_string(v).unwrap()));
    }
    out.push_str(&format!("{}}}{}", sp(7), sp(8)));
    out
}

/// What Python's json (vLLM) makes of such an object: the last value of each key (each
/// value as serde_json reads its own output back, so float parsing compares equal).
fn last_wins(entries: &[(String, Value)]) -> Map<String, Value> {
    let mut m = Map::new();
    for (k, v) in entries {
        m.insert(k.clone(), reparsed(v));
    }
    m
}

fn reparsed(v: &Value) -> Value {
    serde_json::from_str(&serde_json::to_string(v).unwrap()).unwrap()
}

proptest! {
    #[test]
    fn body_surgery_keeps_every_other_field_and_drops_what_it_must(
        entries in prop::collection::vec((key(), json_value()), 0..8),
        escape in prop::collection::vec(any::<bool>(), 8),
        spaces in prop::collection::vec(any::<u8>(), 10),
        params in json_value(),
    ) {
        let text = write_object(&entries, &escape, &spaces);
        let body = ClientBody::parse(Bytes::from(text.clone())).expect("a JSON object scans");
        let want = last_wins(&entries);
        for (k, v) in &want {
            let got: Value = serde_json::from_slice(body.get(k).unwrap()).unwrap();
            prop_assert_eq!(&got, v);
        }
        let params_raw = serde_json::to_vec(&params).unwrap();
        let out = body.with_fields(&["kv_transfer_params", "max_tokens"], &[("kv_transfer_params", &params_raw)]);
        let parsed: Map<String, Value> = serde_json::from_slice(&out).expect("a rewritten body is JSON");
        prop_assert_eq!(&parsed["kv_transfer_params"], &reparsed(&params));
        prop_assert!(!parsed.contains_key("max_tokens"));
        for (k, v) in &want {
            if k != "kv_transfer_params" && k != "max_tokens" {
                prop_assert_eq!(&parsed[k], v);
            }
        }
        // No leg carries a transfer parameter of the client's.
        let legs = LegBodies::new(ClientBody::parse(Bytes::from(text)).unwrap());
        for leg in [legs.prefill(), legs.decode(None), legs.colocated()].map(|p| p.to_bytes()) {
            let v: Map<String, Value> = serde_json::from_slice(&leg).expect("a leg body is JSON");
            prop_assert!(!v.contains_key("ec_transfer_params"));
            if let Some(Value::Object(x)) = v.get("vllm_xargs") {
                prop_assert!(!x.contains_key("kv_transfer_params") && !x.contains_key("ec_transfer_params"));
            }
            if let Some(p) = v.get("kv_transfer_params") {
                prop_assert_eq!(&p["do_remote_decode"], &Value::Bool(true), "only the router's own prefill params");
            }
        }
    }

    #[test]
    fn body_scanning_never_panics(raw in prop::collection::vec(any::<u8>(), 0..256)) {
        if let Ok(b) = ClientBody::parse(Bytes::from(raw)) {
            let _ = b.with_fields(&["a"], &[("b", b"1")]);
            let legs = LegBodies::new(b);
            let _ = (legs.prefill(), legs.decode(Some(b"{\"x\":1}")), legs.colocated());
        }
    }

    #[test]
    fn sse_events_survive_any_chunking(
        events in prop::collection::vec("[ -~]{0,40}", 1..8),
        crlf in any::<bool>(),
        cuts in prop::collection::vec(any::<usize>(), 0..12),
    ) {
        let sep = if crlf { "\r\n\r\n" } else { "\n\n" };
        let stream: String = events.iter().map(|e| format!("data: {}{sep}", e.replace(['\r', '\n'], " "))).collect();
        let bytes = stream.as_bytes();
        let mut points: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
        points.push(0);
        points.push(bytes.len());
        points.sort_unstable();
        let mut splitter = EventSplitter::default();
        let mut got = Vec::new();
        for w in points.windows(2) {
            got.extend(splitter.push(&bytes[w[0]..w[1]]).unwrap());
        }
        let want: Vec<String> = events.iter().map(|e| e.replace(['\r', '\n'], " ")).collect();
        let got: Vec<String> = got.iter().map(|e| disagg::api::sse::data_of(e).unwrap_or_default()).collect();
        prop_assert_eq!(got, want);
        prop_assert!(splitter.is_empty());
    }

    #[test]
    fn the_sse_splitter_never_panics_and_splits_as_a_whole_buffer_would(chunks in prop::collection::vec(prop::collection::vec(prop::sample::select(vec![b'\r', b'\n', b'a', b':', 0xff]), 0..64), 0..8)) {
        let mut s = EventSplitter::new(1 << 20);
        let mut got = Vec::new();
        for c in &chunks {
            for e in s.push(c).unwrap() {
                let _ = disagg::api::sse::data_of(&e);
                got.push(e.to_vec());
            }
        }
        // The reference: the whole stream searched from the start after each event.
        let mut rest: Vec<u8> = chunks.concat();
        let mut want = Vec::new();
        loop {
            let lf = rest.windows(2).position(|w| w == b"\n\n").map(|p| (p, 2));
            let crlf = rest.windows(4).position(|w| w == b"\r\n\r\n").map(|p| (p, 4));
            let Some((end, len)) = [lf, crlf].into_iter().flatten().min_by_key(|(p, _)| *p) else { break };
            want.push(rest[..end].to_vec());
            rest.drain(..end + len);
        }
        prop_assert_eq!(got, want);
        let mut small = EventSplitter::new(10);
        for c in &chunks {
            let _ = small.push(c);
        }
    }

    #[test]
    fn the_launch_parser_never_panics(text in "\\PC{0,400}") {
        let _ = disagg::launch::spec::config::parse("fuzz.yaml", &text);
    }

    #[test]
    fn mutated_example_launch_files_never_panic(at in any::<usize>(), with in "\\PC{0,6}", drop in 0usize..20) {
        for example in [include_str!("../examples/deepseek-2p2d.yaml"), include_str!("../examples/vllm-cpu-1p1d.yaml"), include_str!("../src/launch/demo.yaml")] {
            let mut s = example.to_string();
            let mut i = at % (s.len() + 1);
            while !s.is_char_boundary(i) {
                i -= 1;
            }
            let mut j = (i + drop).min(s.len());
            while !s.is_char_boundary(j) {
                j += 1;
            }
            s.replace_range(i..j, &with);
            let _ = disagg::launch::spec::config::parse("fuzz.yaml", &s);
        }
    }
}

/// The ZMQ frame reader on any bytes, bare or after a valid greeting and READY: an answer
/// or an error, never a panic, and never a buffer larger than its limits allow.
fn zmtp_read(bytes: &[u8]) -> Vec<Result<disagg::zmtp::Read, String>> {
    use disagg::zmtp::{FrameReader, Limits};
    let limits = Limits { max_frame: 512, max_message: 1024, max_parts: 4, handshake: std::time::Duration::from_secs(1) };
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    rt.block_on(async {
        let mut reader = FrameReader::new(bytes, limits);
        let mut out = Vec::new();
        for _ in 0..64 {
            match reader.read().await {
                Ok(r) => out.push(Ok(r)),
                Err(e) => {
                    out.push(Err(e.to_string()));
                    break;
                }
            }
        }
        out
    })
}

fn framed(parts: &[Vec<u8>]) -> Vec<u8> {
    let parts: Vec<Bytes> = parts.iter().map(|p| Bytes::from(p.clone())).collect();
    disagg::zmtp::encode_message(&parts).to_vec()
}

proptest! {
    #[test]
    fn the_zmq_frame_reader_never_panics(raw in prop::collection::vec(any::<u8>(), 0..600), flips in prop::collection::vec((any::<usize>(), any::<u8>()), 0..4)) {
        let _ = zmtp_read(&raw);
        // Valid frames with a few bytes changed anywhere (lengths, flags, bodies).
        let mut msg = framed(&[raw.clone(), b"topic".to_vec()]);
        for (at, b) in flips {
            let len = msg.len();
            msg[at % len] = b;
        }
        for r in zmtp_read(&msg) {
            if let Ok(disagg::zmtp::Read::Message(parts)) = r {
                prop_assert!(parts.len() <= 4 && parts.iter().map(Bytes::len).sum::<usize>() <= 1024, "a message past the limits was returned");
            }
        }
    }

    #[test]
    fn the_kv_event_decoder_never_panics(raw in prop::collection::vec(any::<u8>(), 0..512), at in any::<usize>(), with in any::<u8>(), cut in any::<usize>()) {
        use disagg::api::kv_events::{decode, encode, EventBatch, KvEvent};
        let _ = decode(&raw);
        let batch = EventBatch { ts: 1.5, dp_rank: Some(0), events: vec![
            KvEvent::Stored { hashes: vec![1, u64::MAX], parent: Some(7), token_ids: (0..32).collect(), block_size: 16 },
            KvEvent::Removed { hashes: vec![1] },
            KvEvent::AllCleared,
        ] };
        let mut bytes = encode(&batch);
        prop_assert_eq!(decode(&bytes).unwrap(), batch);
        let len = bytes.len();
        bytes[at % len] = with;
        let _ = decode(&bytes);
        let _ = decode(&bytes[..cut % (len + 1)]);
    }
}
