//! Server-sent events as vLLM frames them: `data: <json>\n\n`, ended by `data: [DONE]\n\n`.

use bytes::{BufMut, Bytes, BytesMut};
use serde::Serialize;

pub(crate) const DONE: &[u8] = b"data: [DONE]\n\n";
pub(crate) const CONTENT_TYPE: &str = "text/event-stream; charset=utf-8";

/// One `data:` event holding `value` serialised as JSON.
pub(crate) fn event<T: Serialize + ?Sized>(value: &T) -> Bytes {
    let mut buf = BytesMut::with_capacity(128).writer();
    buf.get_mut().put_slice(b"data: ");
    // Serialising a serde_json::Value or a derived struct into memory cannot fail.
    serde_json::to_writer(&mut buf, value).expect("JSON serialisation into memory");
    let mut buf = buf.into_inner();
    buf.put_slice(b"\n\n");
    buf.freeze()
}

/// Splits a byte stream into SSE events (separated by a blank line), across chunk borders.
/// Each byte is scanned once (a chunk is searched from where the last search ended), and
/// an event longer than the splitter's limit is an error, not a buffer without end.
pub struct EventSplitter {
    pending: BytesMut,
    /// How far `pending` has been searched for a blank line.
    scanned: usize,
    max_event: usize,
}

/// An event longer than the splitter's limit.
#[derive(Debug, PartialEq, Eq)]
pub struct EventTooLong(pub usize);

impl std::fmt::Display for EventTooLong {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "an SSE event longer than {} bytes", self.0)
    }
}

impl Default for EventSplitter {
    /// Events up to 64 MiB.
    fn default() -> Self {
        EventSplitter::new(64 << 20)
    }
}

impl EventSplitter {
    pub fn new(max_event: usize) -> Self {
        EventSplitter { pending: BytesMut::new(), scanned: 0, max_event }
    }

    /// Feeds a chunk and returns the complete events it finished, each without its
    /// trailing blank line.
    pub fn push(&mut self, chunk: &[u8]) -> Result<Vec<Bytes>, EventTooLong> {
        self.pending.extend_from_slice(chunk);
        let mut out = Vec::new();
        loop {
            // A separator may straddle the previous search's end: look back 3 bytes.
            let from = self.scanned.saturating_sub(3);
            let Some((end, sep_len)) = find_event_end(&self.pending[from..]).map(|(e, l)| (e + from, l)) else {
                self.scanned = self.pending.len();
                if self.pending.len() > self.max_event {
                    return Err(EventTooLong(self.max_event));
                }
                return Ok(out);
            };
            let ev = self.pending.split_to(end + sep_len);
            self.scanned = 0;
            out.push(ev.freeze().slice(..end));
        }
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }
}

/// Where the first event ends: the start of its `\n\n` or `\r\n\r\n`, and its length.
fn find_event_end(buf: &[u8]) -> Option<(usize, usize)> {
    let mut at = 0;
    while let Some(i) = memchr::memchr(b'\n', &buf[at..]).map(|i| i + at) {
        // With its first `\n` at i, a CRLF separator starts at i - 1, before an LF one at i.
        if i >= 1 && buf[i - 1] == b'\r' && buf.get(i + 1..i + 3) == Some(b"\r\n") {
            return Some((i - 1, 4));
        }
        if buf.get(i + 1) == Some(&b'\n') {
            return Some((i, 2));
        }
        at = i + 1;
    }
    None
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
        assert!(s.push(b"data: {\"a\"").unwrap().is_empty());
        let evs = s.push(b":1}\n\ndata: [DONE]\n\n").unwrap();
        assert_eq!(evs.len(), 2);
        assert_eq!(data_of(&evs[0]).unwrap(), "{\"a\":1}");
        assert_eq!(data_of(&evs[1]).unwrap(), "[DONE]");
        assert!(s.is_empty());
    }

    #[test]
    fn accepts_crlf_separators() {
        let mut s = EventSplitter::default();
        let evs = s.push(b"data: x\r\n\r\ndata: y\n\n").unwrap();
        assert_eq!(evs.iter().map(|e| data_of(e).unwrap()).collect::<Vec<_>>(), ["x", "y"]);
    }

    #[test]
    fn an_event_past_the_limit_is_an_error_and_bytes_are_scanned_once() {
        let mut s = EventSplitter::new(1000);
        for _ in 0..9 {
            assert_eq!(s.push(&[b'x'; 100]).unwrap(), Vec::<Bytes>::new());
        }
        assert_eq!(s.push(&[b'x'; 200]), Err(EventTooLong(1000)));
        // A separator split across chunks at every point is still found.
        for cut in 1..4 {
            let text = b"data: a\r\n\r\ndata: b\n\n";
            let mut s = EventSplitter::new(100);
            let mut evs = s.push(&text[..6 + cut]).unwrap();
            evs.extend(s.push(&text[6 + cut..]).unwrap());
            assert_eq!(evs.iter().map(|e| data_of(e).unwrap()).collect::<Vec<_>>(), ["a", "b"], "cut {cut}");
        }
    }

    #[test]
    fn event_frames_json() {
        assert_eq!(&event(&serde_json::json!({"k": 1}))[..], b"data: {\"k\":1}\n\n");
    }
}
