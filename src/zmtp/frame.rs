//! ZMTP framing: the greeting, frames (short and long), commands, with every length
//! checked against `Limits` before it is read, and buffers grown only as bytes arrive.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

use super::{Error, Limits, MAX_COMMAND};

pub(super) const GREETING_LEN: usize = 64;
const MORE: u8 = 0b001;
const LONG: u8 = 0b010;
const COMMAND: u8 = 0b100;
/// Bytes read from the socket at a time at most (a frame's body grows by reads of this).
const READ_CHUNK: usize = 16 * 1024;

/// Our greeting: ZMTP 3.0 (peers that speak 3.1 fall back to it: subscriptions then travel
/// as messages), NULL security.
pub(super) fn greeting() -> [u8; GREETING_LEN] {
    let mut g = [0u8; GREETING_LEN];
    g[0] = 0xff;
    g[9] = 0x7f;
    g[10] = 3;
    g[11] = 0;
    g[12..16].copy_from_slice(b"NULL");
    g
}

/// Checks a peer's greeting: ZMTP 3.x with NULL security.
pub(super) fn check_greeting(g: &[u8]) -> Result<(), Error> {
    if g[0] != 0xff || g[9] & 1 != 1 {
        return Err(Error::Protocol("not a ZMTP greeting".into()));
    }
    if g[10] < 3 {
        return Err(Error::Protocol(format!("ZMTP {}.{} is not supported (3.x only)", g[10], g[11])));
    }
    if &g[12..16] != b"NULL" || g[16..32].iter().any(|&b| b != 0) {
        return Err(Error::Protocol("only the NULL security mechanism is supported".into()));
    }
    Ok(())
}

/// A command frame: its name and body.
#[derive(Debug, PartialEq)]
pub struct Command {
    pub(crate) name: Bytes,
    pub(crate) body: Bytes,
}

impl Command {
    fn parse(mut frame: Bytes) -> Result<Command, Error> {
        let Some(&len) = frame.first() else { return Err(Error::Protocol("an empty command".into())) };
        let len = usize::from(len);
        if frame.len() < 1 + len {
            return Err(Error::Protocol("a command shorter than its name".into()));
        }
        frame.advance(1);
        let name = frame.split_to(len);
        Ok(Command { name, body: frame })
    }

    /// READY's metadata: (name, value) pairs.
    pub(crate) fn properties(&self) -> Result<Vec<(Bytes, Bytes)>, Error> {
        let mut b = self.body.clone();
        let mut out = Vec::new();
        while !b.is_empty() {
            let name_len = usize::from(b[0]);
            if b.len() < 1 + name_len + 4 {
                return Err(Error::Protocol("a truncated READY property".into()));
            }
            b.advance(1);
            let name = b.split_to(name_len);
            let value_len = b.get_u32() as usize;
            if b.len() < value_len {
                return Err(Error::Protocol("a truncated READY property value".into()));
            }
            out.push((name, b.split_to(value_len)));
        }
        Ok(out)
    }
}

/// A READY command with these properties, framed.
pub(super) fn ready(properties: &[(&str, &[u8])]) -> BytesMut {
    let mut body = BytesMut::new();
    body.put_u8(5);
    body.put_slice(b"READY");
    for (name, value) in properties {
        body.put_u8(name.len() as u8);
        body.put_slice(name.as_bytes());
        body.put_u32(value.len() as u32);
        body.put_slice(value);
    }
    let mut out = BytesMut::with_capacity(body.len() + 9);
    put_header(&mut out, COMMAND, body.len());
    out.put_slice(&body);
    out
}

fn put_header(out: &mut BytesMut, flags: u8, len: usize) {
    if len > 255 {
        out.put_u8(flags | LONG);
        out.put_u64(len as u64);
    } else {
        out.put_u8(flags);
        out.put_u8(len as u8);
    }
}

/// A message's parts, framed (the MORE flag on all but the last).
pub fn encode_message(parts: &[Bytes]) -> BytesMut {
    let mut out = BytesMut::with_capacity(parts.iter().map(|p| p.len() + 9).sum());
    for (i, part) in parts.iter().enumerate() {
        put_header(&mut out, if i + 1 < parts.len() { MORE } else { 0 }, part.len());
        out.put_slice(part);
    }
    if parts.is_empty() {
        put_header(&mut out, 0, 0);
    }
    out
}

/// What a frame reader returns.
#[derive(Debug, PartialEq)]
pub enum Read {
    Message(Vec<Bytes>),
    Command(Command),
}

/// Reads frames from one connection, within `Limits`. Cancel-safe: everything read so
/// far (a part of a frame, the parts of a message) stays in the reader, so a `read`
/// dropped under a timeout loses nothing.
pub struct FrameReader<R> {
    io: R,
    buf: BytesMut,
    limits: Limits,
    /// The parts of the message being read, and their total size.
    parts: Vec<Bytes>,
    total: usize,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(io: R, limits: Limits) -> Self {
        FrameReader { io, buf: BytesMut::new(), limits, parts: Vec::new(), total: 0 }
    }

    /// Reads until `n` bytes are buffered; `n` is bounded by the caller's limits, and the
    /// buffer grows only as bytes arrive.
    async fn fill(&mut self, n: usize) -> Result<(), Error> {
        while self.buf.len() < n {
            self.buf.reserve((n - self.buf.len()).clamp(512, READ_CHUNK));
            if self.io.read_buf(&mut self.buf).await? == 0 {
                return Err(Error::Closed);
            }
        }
        Ok(())
    }

    pub(crate) async fn greeting(&mut self) -> Result<(), Error> {
        self.fill(GREETING_LEN).await?;
        let g = self.buf.split_to(GREETING_LEN);
        check_greeting(&g)
    }

    /// One frame's flags and body; its declared length is checked against `cap_data` (a
    /// command's against MAX_COMMAND) before its body is read.
    async fn frame(&mut self, cap_data: usize) -> Result<(u8, Bytes), Error> {
        self.fill(2).await?;
        let flags = self.buf[0];
        if flags & !(MORE | LONG | COMMAND) != 0 {
            return Err(Error::Protocol(format!("reserved frame flags 0x{flags:02x}")));
        }
        let (header, len) = if flags & LONG != 0 {
            self.fill(9).await?;
            (9, u64::from_be_bytes(self.buf[1..9].try_into().expect("8 bytes")))
        } else {
            (2, u64::from(self.buf[1]))
        };
        let cap = if flags & COMMAND != 0 { MAX_COMMAND } else { cap_data };
        if len > cap as u64 {
            let what = if flags & COMMAND != 0 { "command" } else { "frame" };
            return Err(Error::Protocol(format!("a {len}-byte {what} (at most {cap} accepted)")));
        }
        let len = len as usize;
        self.fill(header + len).await?;
        self.buf.advance(header);
        Ok((flags, self.buf.split_to(len).freeze()))
    }

    /// The next whole message or command; a message past the limits ends the connection.
    pub async fn read(&mut self) -> Result<Read, Error> {
        loop {
            let room = self.limits.max_message - self.total;
            let (flags, body) = self.frame(self.limits.max_frame.min(room)).await?;
            if flags & COMMAND != 0 {
                if !self.parts.is_empty() {
                    return Err(Error::Protocol("a command inside a message".into()));
                }
                if flags & MORE != 0 {
                    return Err(Error::Protocol("a command with the MORE flag".into()));
                }
                return Ok(Read::Command(Command::parse(body)?));
            }
            self.total += body.len();
            self.parts.push(body);
            if flags & MORE == 0 {
                self.total = 0;
                return Ok(Read::Message(std::mem::take(&mut self.parts)));
            }
            if self.parts.len() >= self.limits.max_parts {
                return Err(Error::Protocol(format!("a message of more than {} parts", self.limits.max_parts)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const LIMITS: Limits = Limits { max_frame: 100, max_message: 150, max_parts: 3, handshake: Duration::from_secs(1) };

    async fn read_all(bytes: &[u8]) -> Result<Read, Error> {
        FrameReader::new(bytes, LIMITS).read().await
    }

    #[tokio::test]
    async fn frames_and_commands_are_read() {
        let msg = encode_message(&[Bytes::from_static(b"topic"), Bytes::from(vec![7u8; 90])]);
        assert_eq!(read_all(&msg).await.unwrap(), Read::Message(vec![Bytes::from_static(b"topic"), Bytes::from(vec![7u8; 90])]));
        let ready = ready(&[("Socket-Type", b"SUB"), ("Identity", b"")]);
        let Read::Command(c) = read_all(&ready).await.unwrap() else { panic!("a command") };
        assert_eq!(&c.name[..], b"READY");
        assert_eq!(
            c.properties().unwrap(),
            vec![(Bytes::from_static(b"Socket-Type"), Bytes::from_static(b"SUB")), (Bytes::from_static(b"Identity"), Bytes::new())]
        );
    }

    #[tokio::test]
    async fn declared_lengths_over_the_limits_end_the_connection_before_any_read() {
        // A 2^40-byte frame: refused from its header alone.
        let mut huge = vec![LONG];
        huge.extend_from_slice(&(1u64 << 40).to_be_bytes());
        assert!(matches!(read_all(&huge).await, Err(Error::Protocol(e)) if e.contains("1099511627776-byte frame")));
        // Parts within the frame cap but over the message's.
        let two = encode_message(&[Bytes::from(vec![0u8; 100]), Bytes::from(vec![0u8; 60])]);
        assert!(matches!(read_all(&two).await, Err(Error::Protocol(_))));
        // Endless MORE frames: cut at the part count.
        let many: Vec<u8> = [MORE, 0].repeat(10);
        assert!(matches!(read_all(&many).await, Err(Error::Protocol(e)) if e.contains("parts")));
        // A command past its cap, reserved flags.
        let mut cmd = vec![COMMAND | LONG];
        cmd.extend_from_slice(&((MAX_COMMAND + 1) as u64).to_be_bytes());
        assert!(matches!(read_all(&cmd).await, Err(Error::Protocol(_))));
        assert!(matches!(read_all(&[0x80, 1, 0]).await, Err(Error::Protocol(_))));
    }

    #[tokio::test]
    async fn truncated_input_is_a_closed_connection() {
        let msg = encode_message(&[Bytes::from(vec![1u8; 50])]);
        for cut in 0..msg.len() {
            assert!(matches!(read_all(&msg[..cut]).await, Err(Error::Closed)), "cut at {cut}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_read_cut_by_a_timeout_loses_nothing() {
        use tokio::io::AsyncWriteExt;
        let (mut tx, rx) = tokio::io::duplex(64);
        let parts = [Bytes::from_static(b"topic"), Bytes::from(vec![9u8; 90]), Bytes::from_static(b"end")];
        let msg = encode_message(&parts[..2]);
        let msg2 = encode_message(&parts[2..]);
        tokio::spawn(async move {
            for b in msg.iter().chain(msg2.iter()) {
                tx.write_all(&[*b]).await.unwrap();
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
        });
        let mut reader = FrameReader::new(rx, LIMITS);
        let mut got = Vec::new();
        let mut cuts = 0;
        while got.len() < 2 {
            match tokio::time::timeout(Duration::from_millis(10), reader.read()).await {
                Ok(read) => got.push(read.unwrap()),
                Err(_) => cuts += 1,
            }
        }
        assert!(cuts > 10, "the reads were cut {cuts} times");
        assert_eq!(got, vec![Read::Message(parts[..2].to_vec()), Read::Message(parts[2..].to_vec())]);
    }

    #[test]
    fn greetings_are_checked() {
        assert!(check_greeting(&greeting()).is_ok());
        let mut g = greeting();
        g[10] = 2;
        assert!(check_greeting(&g).is_err());
        let mut g = greeting();
        g[12..17].copy_from_slice(b"PLAIN");
        assert!(check_greeting(&g).is_err());
        assert!(check_greeting(&[0u8; 64]).is_err());
    }
}
