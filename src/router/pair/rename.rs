//! The id a client sees names no engine: P2pNccl's legs carry an id that names both
//! engines' KV addresses (`___prefill_addr_{P}___decode_addr_{D}_{uuid}`), and vLLM builds
//! its answer's `id` from the request id it was sent (`cmpl-{X-Request-Id}`). The answer
//! is relayed with that leg id replaced by the client's request id, whole or streamed
//! (a chunk's tail that may begin the leg id waits for the next chunk; an SSE event's
//! blank line never does, so no event is held back).

use bytes::{BufMut, Bytes, BytesMut};
use memchr::memmem;

pub(crate) struct Rename {
    from: Vec<u8>,
    to: Bytes,
    /// The tail of the last chunk that may be the start of `from`.
    carry: BytesMut,
}

impl Rename {
    pub(crate) fn new(from: &[u8], to: &[u8]) -> Self {
        Rename { from: from.to_vec(), to: Bytes::copy_from_slice(to), carry: BytesMut::new() }
    }

    /// A whole answer with every `from` replaced.
    pub(crate) fn whole(&self, bytes: Bytes) -> Bytes {
        if memmem::find(&bytes, &self.from).is_none() {
            return bytes;
        }
        let mut out = BytesMut::with_capacity(bytes.len());
        self.replace_into(&bytes, &mut out);
        out.freeze()
    }

    fn replace_into(&self, data: &[u8], out: &mut BytesMut) {
        let mut at = 0;
        for found in memmem::find_iter(data, &self.from) {
            out.put_slice(&data[at..found]);
            out.put_slice(&self.to);
            at = found + self.from.len();
        }
        out.put_slice(&data[at..]);
    }

    /// The next piece of a stream, renamed; a tail that may begin `from` is kept for the
    /// next piece.
    pub(crate) fn chunk(&mut self, chunk: &[u8]) -> Bytes {
        let joined;
        let data: &[u8] = if self.carry.is_empty() {
            chunk
        } else {
            self.carry.put_slice(chunk);
            joined = self.carry.split().freeze();
            &joined
        };
        let keep = self.partial_tail(data);
        let (now, later) = data.split_at(data.len() - keep);
        self.carry.put_slice(later);
        let mut out = BytesMut::with_capacity(now.len());
        self.replace_into(now, &mut out);
        out.freeze()
    }

    /// What is held back, at the stream's end.
    pub(crate) fn finish(&mut self) -> Bytes {
        self.carry.split().freeze()
    }

    /// The length of the longest tail of `data` that is a proper prefix of `from` (and
    /// not inside a whole match).
    fn partial_tail(&self, data: &[u8]) -> usize {
        let first = self.from[0];
        let start = data.len().saturating_sub(self.from.len() - 1);
        (start..data.len()).find(|&p| data[p] == first && self.from.starts_with(&data[p..])).map_or(0, |p| data.len() - p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEG: &[u8] = b"___prefill_addr_10.0.0.1:21001___decode_addr_10.0.0.2:22001_abc";

    #[test]
    fn a_whole_answer_names_the_clients_id() {
        let r = Rename::new(LEG, b"req-1");
        let body = Bytes::from([&b"{\"id\":\"cmpl-"[..], LEG, b"\",\"x\":1}"].concat());
        assert_eq!(&r.whole(body)[..], b"{\"id\":\"cmpl-req-1\",\"x\":1}");
        let plain = Bytes::from_static(b"{\"id\":\"cmpl-other\"}");
        assert_eq!(r.whole(plain.clone()), plain);
    }

    #[test]
    fn a_stream_cut_anywhere_is_renamed_and_nothing_after_an_event_waits() {
        let event = [&b"data: {\"id\":\"cmpl-"[..], LEG, b"\",\"choices\":[]}\n\n"].concat();
        let stream = [event.clone(), event.clone(), b"data: [DONE]\n\n".to_vec()].concat();
        let want = stream.windows(LEG.len()).count();
        assert!(want > 0);
        for cut in 0..stream.len() {
            let mut r = Rename::new(LEG, b"req-1");
            let mut out = r.chunk(&stream[..cut]).to_vec();
            out.extend_from_slice(&r.chunk(&stream[cut..]));
            out.extend_from_slice(&r.finish());
            assert!(memmem::find(&out, b"prefill_addr").is_none(), "cut at {cut}");
            assert_eq!(out.len(), stream.len() - 2 * (LEG.len() - 5), "cut at {cut}");
        }
        let mut r = Rename::new(LEG, b"req-1");
        assert_eq!(r.chunk(&event).len(), event.len() - (LEG.len() - 5), "a whole event is not held back");
        assert!(r.finish().is_empty());
    }
}
