//! One ZMTP connection: the greeting and NULL handshake (READY both ways, the peer's socket
//! type checked), then messages and the few commands that follow a handshake.

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

use super::frame::{self, FrameReader, Read};
use super::{tcp_address, Error, Limits, SocketType};

/// What a connection receives after its handshake.
#[derive(Debug, PartialEq)]
pub enum Incoming {
    Message(Vec<Bytes>),
    /// A subscriber's topic prefix (ZMTP 3.0's `\x01topic` message or 3.1's SUBSCRIBE).
    Subscribe(Bytes),
    Cancel(Bytes),
}

/// A connection after its handshake.
pub struct Connection {
    receiver: Receiver,
    writer: Writer,
}

/// The sending half of a connection.
pub struct Writer {
    io: OwnedWriteHalf,
}

impl Writer {
    pub(crate) async fn send(&mut self, parts: &[Bytes]) -> Result<(), Error> {
        self.send_framed(&frame::encode_message(parts)).await
    }

    /// Bytes already framed by `encode_message` (framed once for many subscribers).
    pub(crate) async fn send_framed(&mut self, framed: &[u8]) -> Result<(), Error> {
        self.io.write_all(framed).await?;
        Ok(())
    }
}

/// Connects to `endpoint` (`tcp://host:port` or `host:port`) as `me`.
pub async fn connect(endpoint: &str, me: SocketType, identity: &[u8], limits: Limits) -> Result<Connection, Error> {
    let address = tcp_address(endpoint)?;
    let stream = tokio::time::timeout(limits.handshake, TcpStream::connect(address)).await.map_err(|_| Error::HandshakeTimeout)??;
    handshake(stream, me, identity, limits).await
}

/// The greeting and handshake on a new connection (either end), within `limits.handshake`.
pub async fn handshake(stream: TcpStream, me: SocketType, identity: &[u8], limits: Limits) -> Result<Connection, Error> {
    let _ = stream.set_nodelay(true);
    let (read, mut write) = stream.into_split();
    let mut reader = FrameReader::new(read, limits);
    let exchange = async {
        let mut hello = BytesMut::from(&frame::greeting()[..]);
        hello.extend_from_slice(&frame::ready(&[("Socket-Type", me.name().as_bytes()), ("Identity", identity)]));
        write.write_all(&hello).await?;
        reader.greeting().await?;
        let Read::Command(ready) = reader.read().await? else {
            return Err(Error::Protocol("a message before the handshake".into()));
        };
        if &ready.name[..] == b"ERROR" {
            return Err(Error::Protocol(format!("the peer refused the handshake: {}", String::from_utf8_lossy(&ready.body))));
        }
        if &ready.name[..] != b"READY" {
            return Err(Error::Protocol(format!("`{}` where READY was expected", String::from_utf8_lossy(&ready.name))));
        }
        let props = ready.properties()?;
        let prop = |name: &str| props.iter().find(|(n, _)| n.eq_ignore_ascii_case(name.as_bytes())).map(|(_, v)| v.clone());
        let peer_type = prop("Socket-Type").ok_or_else(|| Error::Protocol("READY without a Socket-Type".into()))?;
        if !me.accepts(&peer_type) {
            return Err(Error::Protocol(format!("a {} socket cannot talk to a {}", me.name(), String::from_utf8_lossy(&peer_type))));
        }
        Ok(())
    };
    tokio::time::timeout(limits.handshake, exchange).await.map_err(|_| Error::HandshakeTimeout)??;
    Ok(Connection { receiver: Receiver { reader, me }, writer: Writer { io: write } })
}

impl Connection {
    pub(crate) async fn recv(&mut self) -> Result<Incoming, Error> {
        self.receiver.recv().await
    }

    /// The next message (subscriptions are not messages: skipped).
    pub async fn recv_message(&mut self) -> Result<Vec<Bytes>, Error> {
        loop {
            if let Incoming::Message(parts) = self.recv().await? {
                return Ok(parts);
            }
        }
    }

    pub async fn send(&mut self, parts: &[Bytes]) -> Result<(), Error> {
        self.writer.send(parts).await
    }

    /// A SUB's subscription to messages whose first part starts with `topic` (ZMTP 3.0's
    /// form, which 3.1 peers take too).
    pub async fn subscribe(&mut self, topic: &[u8]) -> Result<(), Error> {
        let mut sub = Vec::with_capacity(topic.len() + 1);
        sub.push(1u8);
        sub.extend_from_slice(topic);
        self.send(&[Bytes::from(sub)]).await
    }

    /// The receiving end and the sending end, to be driven apart.
    pub(crate) fn split(self) -> (Receiver, Writer) {
        (self.receiver, self.writer)
    }
}

/// The receiving half of a connection.
pub struct Receiver {
    reader: FrameReader<OwnedReadHalf>,
    me: SocketType,
}

impl Receiver {
    /// The next message (or, on a PUB, subscription); commands a peer may send after the
    /// handshake (heartbeats, ...) are skipped.
    pub(crate) async fn recv(&mut self) -> Result<Incoming, Error> {
        loop {
            match self.reader.read().await? {
                Read::Message(mut parts) => {
                    if self.me != SocketType::Pub {
                        return Ok(Incoming::Message(parts));
                    }
                    // A ZMTP 3.0 subscription is a one-part message starting \x01 (\x00: cancel).
                    let (Some(first), true) = (parts.pop(), parts.is_empty()) else { continue };
                    match first.first() {
                        Some(1) => return Ok(Incoming::Subscribe(first.slice(1..))),
                        Some(0) => return Ok(Incoming::Cancel(first.slice(1..))),
                        _ => continue,
                    }
                }
                Read::Command(c) => match &c.name[..] {
                    b"SUBSCRIBE" if self.me == SocketType::Pub => return Ok(Incoming::Subscribe(c.body)),
                    b"CANCEL" if self.me == SocketType::Pub => return Ok(Incoming::Cancel(c.body)),
                    b"ERROR" => return Err(Error::Protocol(format!("the peer sent ERROR: {}", String::from_utf8_lossy(&c.body)))),
                    _ => continue,
                },
            }
        }
    }
}
