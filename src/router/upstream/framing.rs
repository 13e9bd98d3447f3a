//! How an HTTP/1.1 response body is delimited (RFC 9112 §6): by Content-Length, by
//! chunked transfer coding, or by the connection's close; and the chunked decoder, which
//! hands out the data as slices of the bytes read (no copy) and keeps its place between
//! reads byte by byte (no buffer of its own).

use bytes::Bytes;

/// The longest chunk-size line extension or trailer section accepted: uvicorn (h11) sends
/// neither, so anything long is not a worker speaking HTTP.
const MAX_EXTRA: usize = 16 * 1024;

#[derive(Debug)]
pub(crate) enum Framing {
    Length(u64),
    Chunked(Chunked),
    /// The body runs to the connection's end (the connection is not reused).
    UntilClose,
}

impl Framing {
    /// The next data from `input` (consumed as far as it was decoded); `Ok(None)` when
    /// `input` holds no more data: decoded to its end, or the body is complete.
    pub(crate) fn take(&mut self, input: &mut Bytes) -> Result<Option<Bytes>, String> {
        match self {
            Framing::Length(left) => {
                let n = (*left).min(input.len() as u64) as usize;
                *left -= n as u64;
                Ok((n > 0).then(|| input.split_to(n)))
            }
            Framing::Chunked(c) => c.take(input),
            Framing::UntilClose => Ok((!input.is_empty()).then(|| std::mem::take(input))),
        }
    }

    /// Whether the whole body has been taken.
    pub(crate) fn is_complete(&self) -> bool {
        match self {
            Framing::Length(left) => *left == 0,
            Framing::Chunked(c) => c.state == State::Done,
            Framing::UntilClose => false,
        }
    }
}

#[derive(Debug, Default)]
pub(crate) struct Chunked {
    state: State,
    /// Bytes of extensions or trailers seen (bounded by MAX_EXTRA).
    extra: usize,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Before a chunk size's first hex digit.
    #[default]
    SizeStart,
    /// Within a chunk size: its value so far.
    Size(u64),
    /// `;ext...` or whitespace after the size, up to CR.
    Extension(u64),
    SizeLf(u64),
    Data(u64),
    DataCr,
    DataLf,
    /// At the start of a trailer line (or of the final empty line).
    TrailerStart,
    TrailerLine,
    TrailerLineLf,
    EndLf,
    Done,
}

impl Chunked {
    fn take(&mut self, input: &mut Bytes) -> Result<Option<Bytes>, String> {
        while !input.is_empty() {
            if let State::Data(left) = self.state {
                let n = left.min(input.len() as u64) as usize;
                self.state = if n as u64 == left { State::DataCr } else { State::Data(left - n as u64) };
                return Ok(Some(input.split_to(n)));
            }
            if self.state == State::Done {
                return Ok(None);
            }
            let b = input[0];
            let _ = input.split_to(1);
            self.state = self.step(b)?;
        }
        Ok(None)
    }

    fn step(&mut self, b: u8) -> Result<State, String> {
        let hex = |b: u8| (b as char).to_digit(16).map(u64::from);
        let bad = |what: &str| Err(format!("bad chunked encoding: {what}"));
        let mut extra = || {
            self.extra += 1;
            if self.extra > MAX_EXTRA {
                return Err("bad chunked encoding: extensions or trailers too long".to_string());
            }
            Ok(())
        };
        Ok(match (self.state, b) {
            (State::SizeStart, b) => match hex(b) {
                Some(d) => State::Size(d),
                None => return bad("a chunk size expected"),
            },
            (State::Size(v), b) => match hex(b) {
                Some(d) if v >> 60 == 0 => State::Size(v << 4 | d),
                Some(_) => return bad("chunk size too large"),
                None if b == b'\r' => State::SizeLf(v),
                None if b == b';' || b == b' ' || b == b'\t' => {
                    extra()?;
                    State::Extension(v)
                }
                None => return bad("a chunk size expected"),
            },
            (State::Extension(v), b'\r') => State::SizeLf(v),
            (State::Extension(v), b'\n') => return bad(&format!("bare LF after chunk size {v}")),
            (State::Extension(v), _) => {
                extra()?;
                State::Extension(v)
            }
            (State::SizeLf(0), b'\n') => State::TrailerStart,
            (State::SizeLf(v), b'\n') => State::Data(v),
            (State::DataCr, b'\r') => State::DataLf,
            (State::DataLf, b'\n') => State::SizeStart,
            (State::TrailerLineLf, b'\n') => State::TrailerStart,
            (State::TrailerStart, b'\r') => State::EndLf,
            (State::TrailerStart | State::TrailerLine, b) if b != b'\r' && b != b'\n' => {
                extra()?;
                State::TrailerLine
            }
            (State::TrailerLine, b'\r') => State::TrailerLineLf,
            (State::EndLf, b'\n') => State::Done,
            (s, b) => return bad(&format!("byte {b:#04x} in state {s:?}")),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn decode(framing: &mut Framing, parts: &[&[u8]]) -> Result<Vec<u8>, String> {
        let mut out = Vec::new();
        for p in parts {
            let mut input = Bytes::copy_from_slice(p);
            while let Some(d) = framing.take(&mut input)? {
                out.extend_from_slice(&d);
            }
            if framing.is_complete() {
                assert!(input.is_empty(), "bytes after the body: {input:?}");
            }
        }
        Ok(out)
    }

    #[test]
    fn chunked_bodies_as_servers_write_them() {
        // h11's own framing, then extensions, upper-case hex and a trailer.
        let mut f = Framing::Chunked(Chunked::default());
        assert_eq!(decode(&mut f, &[b"5\r\nhello\r\n1\r\n!\r\n0\r\n\r\n"]).unwrap(), b"hello!");
        assert!(f.is_complete());
        let mut f = Framing::Chunked(Chunked::default());
        assert_eq!(decode(&mut f, &[b"A;name=v\r\n0123456789\r\n0\r\nX-Trailer: 1\r\n\r\n"]).unwrap(), b"0123456789");
        assert!(f.is_complete());
        let mut f = Framing::Chunked(Chunked::default());
        assert_eq!(decode(&mut f, &[b"3\r\nabc\r\n"]).unwrap(), b"abc");
        assert!(!f.is_complete(), "no last chunk yet");
    }

    #[test]
    fn broken_chunked_bodies_are_refused() {
        for bad in [&b"x\r\n"[..], b"5\r\nhelloX", b"5\nhello\r\n", b"\r\n", b"3\r\nabc\r\n0\r\nbad\n", b"fffffffffffffffff\r\n"] {
            let mut f = Framing::Chunked(Chunked::default());
            assert!(decode(&mut f, &[bad]).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        let mut f = Framing::Chunked(Chunked::default());
        let long = format!("1;{}\r\n", "e".repeat(MAX_EXTRA + 1));
        assert!(decode(&mut f, &[long.as_bytes()]).is_err(), "unbounded extension");
    }

    #[test]
    fn length_and_close_delimited_bodies() {
        let mut f = Framing::Length(5);
        assert_eq!(decode(&mut f, &[b"he", b"llo"]).unwrap(), b"hello");
        assert!(f.is_complete());
        let mut f = Framing::UntilClose;
        assert_eq!(decode(&mut f, &[b"he", b"llo"]).unwrap(), b"hello");
        assert!(!f.is_complete(), "only the connection's end completes it");
    }

    proptest! {
        /// Any chunks, encoded and cut anywhere, decode to their concatenation and end
        /// exactly at the last chunk's final CRLF.
        #[test]
        fn chunked_decoding_survives_any_split(chunks in prop::collection::vec(prop::collection::vec(any::<u8>(), 1..40), 0..8),
            cuts in prop::collection::vec(0usize..400, 0..12), ext in any::<bool>()) {
            let mut wire = Vec::new();
            for c in &chunks {
                wire.extend_from_slice(format!("{:x}{}\r\n", c.len(), if ext { ";a=b" } else { "" }).as_bytes());
                wire.extend_from_slice(c);
                wire.extend_from_slice(b"\r\n");
            }
            wire.extend_from_slice(b"0\r\n\r\n");
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (wire.len() + 1)).collect();
            cuts.sort_unstable();
            let mut parts = Vec::new();
            let mut at = 0;
            for c in cuts.into_iter().chain([wire.len()]) {
                parts.push(&wire[at..c]);
                at = c;
            }
            let mut f = Framing::Chunked(Chunked::default());
            prop_assert_eq!(decode(&mut f, &parts).unwrap(), chunks.concat());
            prop_assert!(f.is_complete());
        }
    }
}
