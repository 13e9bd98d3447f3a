//! ZMTP 3.x, ZeroMQ's wire protocol (rfc.zeromq.org/spec/23, /37), as far as vLLM's
//! sockets need it: NULL security; SUB to a PUB (KV events), DEALER to a ROUTER (the KV
//! events' replay, P2pNccl's registration), and their bound ends for the simulator.
//!
//! Written here rather than taken from a crate because the one maintained pure-Rust
//! implementation (zeromq 0.7) reserves whatever length a frame header declares before
//! reading it (one packet with a 2^40 length aborted the router) and buffers endless
//! MORE frames; libzmq (through the `zmq` binding) caps a frame with ZMQ_MAXMSGSIZE but
//! not the number of parts of a message, which it holds until the last. Here every read
//! is bounded before anything is allocated (`Limits`): a frame's declared length, a
//! message's total size and part count, a command's size, and the time a peer has to
//! finish its greeting and handshake. Anything else ends that connection, never the
//! process.

mod frame;
mod listen;
mod socket;

use std::time::Duration;

pub use frame::{encode_message, Command, FrameReader, Read};
pub(crate) use listen::{serve, Accepted, ConnectionLimits, Inbound};
pub use socket::{connect, handshake, Connection, Incoming, Receiver, Writer};

/// What a peer may send: checked before a byte of it is allocated.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Largest frame (one part of a message).
    pub max_frame: usize,
    /// Largest message (all its parts together).
    pub max_message: usize,
    /// Most parts in one message.
    pub max_parts: usize,
    /// Time a peer has for its greeting and handshake once connected.
    pub handshake: Duration,
}

impl Limits {
    /// Small messages only (P2pNccl registrations, replay requests): 4 KiB.
    pub const SMALL: Limits = Limits { max_frame: 4096, max_message: 4096, max_parts: 4, handshake: Duration::from_secs(5) };
}

/// Largest command frame (a READY's metadata, a SUBSCRIBE's topic).
pub(crate) const MAX_COMMAND: usize = 16 * 1024;

/// The socket types used here, as ZMTP names them in READY's `Socket-Type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SocketType {
    Pub,
    Sub,
    Dealer,
    Router,
}

impl SocketType {
    pub(crate) fn name(self) -> &'static str {
        match self {
            SocketType::Pub => "PUB",
            SocketType::Sub => "SUB",
            SocketType::Dealer => "DEALER",
            SocketType::Router => "ROUTER",
        }
    }

    /// Whether a peer of `peer` type may talk to this one (ZMTP 3's compatibility table).
    pub(crate) fn accepts(self, peer: &[u8]) -> bool {
        let ok: &[&[u8]] = match self {
            SocketType::Pub => &[b"SUB", b"XSUB"],
            SocketType::Sub => &[b"PUB", b"XPUB"],
            SocketType::Dealer => &[b"REP", b"DEALER", b"ROUTER"],
            SocketType::Router => &[b"REQ", b"DEALER", b"ROUTER"],
        };
        ok.contains(&peer)
    }
}

/// Why a connection ended.
#[derive(Debug)]
pub enum Error {
    Io(std::io::Error),
    /// The peer closed the connection.
    Closed,
    /// The peer broke the protocol or a limit; the connection is dropped.
    Protocol(String),
    /// The greeting and handshake did not finish in time.
    HandshakeTimeout,
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Io(e) => write!(f, "{e}"),
            Error::Closed => f.write_str("the peer closed the connection"),
            Error::Protocol(why) => write!(f, "ZMTP: {why}"),
            Error::HandshakeTimeout => f.write_str("ZMTP: no greeting and handshake in time"),
        }
    }
}

impl std::error::Error for Error {}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            Error::Closed
        } else {
            Error::Io(e)
        }
    }
}

/// `tcp://host:port` (or `host:port`) -> `host:port`; other transports are refused.
pub(crate) fn tcp_address(endpoint: &str) -> Result<&str, Error> {
    match endpoint.split_once("://") {
        Some(("tcp", rest)) => Ok(rest),
        Some((other, _)) => Err(Error::Protocol(format!("transport `{other}` is not supported (tcp only)"))),
        None => Ok(endpoint),
    }
}
