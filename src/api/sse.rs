//! Server-sent events as vLLM frames them: `data: <json>\n\n`, ended by `data: [DONE]\n\n`.

use bytes::{BufMut, Bytes, BytesMut};
use serde::Serialize;

pub const DONE: &[u8] = b"data: [DONE]\n\n";
pub const CONTENT_TYPE: &str = "text/event-stream; charset=utf-8";

/// One `data:` event holding `value` serialised as JSON.
pub fn event<T: Serialize + ?Sized>(value: &T) -> Bytes {
    let mut buf = BytesMut::with_capacity(128).writer();
    buf.get_mut().put_slice(b"data: ");
    // Serialising a serde_json::Value or a derived struct into memory cannot fail.
    serde_json::to_writer(&mut buf, value).expect("JSON serialisation into memory");
    let mut buf = buf.into_inner();
    buf.put_slice(b"\n\n");
    buf.freeze()
}

/// Splits a byte stream into SSE events (separated by a blank line), across chunk borders.
#[derive(Default)]
pub struct EventSplitter {
    pending: BytesMut,
}

impl EventSplitter {
    /// Feeds a chunk and returns the complete events it finished, each without its
    /// trailing blank line.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<Bytes> {
        self.pending.extend_from_slice(chunk);
        let mut out = Vec::new();
        loop {
            let Some((end, sep_len)) = find_event_end(&self.pending) else { break };
            let ev = self.pending.split_to(end + sep_len);
            out.push(ev.freeze().slice(..end));
        }
        out
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }
}

fn find_event_end(buf: &[u8]) -> Option<(usize, usize)> {
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|p| (p, 2));
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| (p, 4));
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

/// The payload of an event's `data:` lines (joined by `\n` as the SSE spec says).
pub fn data_of(event: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(event).ok()?;
    let mut data: Option<String> = None;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("data:") {
            let rest = rest.strip_prefix(' ').unwrap_or(rest);
            match &mut data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(rest);
                }
                None => data = Some(rest.to_string()),
            }
        }
    }
    data
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_events_across_chunk_borders() {
        let mut s = EventSplitter::default();
        assert!(s.push(b"data: {\"a\"").is_empty());
        let evs = s.push(b":1}\n\ndata: [DONE]\n\n");
        assert_eq!(evs.len(), 2);
        assert_eq!(data_of(&evs[0]).unwrap(), "{\"a\":1}");
        assert_eq!(data_of(&evs[1]).unwrap(), "[DONE]");
        assert!(s.is_empty());
    }

    #[test]
    fn accepts_crlf_separators() {
        let mut s = EventSplitter::default();
        let evs = s.push(b"data: x\r\n\r\ndata: y\n\n");
        assert_eq!(evs.iter().map(|e| data_of(e).unwrap()).collect::<Vec<_>>(), ["x", "y"]);
    }

    #[test]
    fn event_frames_json() {
        assert_eq!(&event(&serde_json::json!({"k": 1}))[..], b"data: {\"k\":1}\n\n");
    }
}
