//! The HTTP/1.1 client of the legs (vLLM serves HTTP/1.1 only), written for their shape:
//! one POST, its answer read on the request's own task.
//! - No connection task and no channel in between (hyper's client drives each connection
//!   from a task of its own, so every leg hops between two tasks and back).
//! - An open stream holds its socket and the framing's few words, and no buffer: a read
//!   copies out of a buffer on the stack, and the chunked decoder keeps its place byte by
//!   byte (hyper's client holds ~25 KiB per connection: a read buffer, a buffer for request
//!   heads, a block of its channel).
//! - The head and every piece of the body go out in one vectored write.
//! - Idle connections are kept per serving thread (each drives its own sockets) and reused
//!   only while idle under `WORKER_CONNECTION_IDLE` and still open.
//!
//! Response heads are parsed by httparse (hyper's parser); bodies are delimited by
//! http1_framing.rs.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::io::{self, IoSlice};
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{ready, Context, Poll};
use std::time::Instant;

use axum::http::{HeaderValue, StatusCode};
use bytes::{Bytes, BytesMut};
use futures_util::{Stream, StreamExt};
use tokio::io::AsyncRead;
use tokio::net::TcpStream;

use crate::router::upstream::framing::{Chunked, Framing};
use crate::router::upstream::legs::WORKER_CONNECTION_IDLE;

/// The client configuration for https workers (--worker-ssl-*), set once at start.
static TLS: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();

/// Sets how https workers are reached (once, before any leg).
pub(crate) fn use_tls(config: Arc<rustls::ClientConfig>) {
    let _ = TLS.set(config);
}

/// How https workers are reached, when set.
pub(crate) fn tls() -> Option<Arc<rustls::ClientConfig>> {
    TLS.get().cloned()
}

/// Whether https workers are shown a client certificate (--worker-ssl-certfile).
pub(crate) fn presents_client_certificate() -> bool {
    TLS.get().is_some_and(|c| c.client_auth_cert_resolver.has_certs())
}

/// Bytes read from a socket at a time.
const READ_CHUNK: usize = 8 * 1024;
/// A response head longer than this is not a worker's.
const MAX_HEAD: usize = 64 * 1024;
const MAX_HEADERS: usize = 64;
const MAX_IDLE_PER_WORKER: usize = 4096;

#[derive(Debug)]
pub(crate) enum Error {
    /// No connection could be made (nothing was sent).
    Connect(String),
    /// The exchange broke after the connection was made.
    Broken(String),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Connect(e) | Error::Broken(e) => f.write_str(e),
        }
    }
}

/// A POST to a worker.
pub(crate) struct Request<'a> {
    /// The worker's URL as normalised (`http://host:port[/prefix]`, workers::url::normalize_url).
    pub(crate) url: &'a str,
    pub(crate) path: &'a str,
    /// Headers besides Host and Content-Length (values are `HeaderValue`s: no CR or LF).
    pub(crate) headers: &'a [(&'static str, &'a HeaderValue)],
    pub(crate) body: &'a [Bytes],
}

pub(crate) struct Response {
    pub(crate) status: StatusCode,
    pub(crate) content_type: Option<HeaderValue>,
    pub(crate) body: Body,
}

/// Sends `req`; `on_sent` is called once the whole request is written. A kept
/// connection found closed before any answer came (the worker closed it as it was
/// taken) is replaced by a new one, once.
pub(crate) async fn post(req: &Request<'_>, mut on_sent: impl FnMut()) -> Result<Response, Error> {
    let (secure, rest) = match (req.url.strip_prefix("https://"), req.url.strip_prefix("http://")) {
        (Some(rest), _) => (true, rest),
        (None, Some(rest)) => (false, rest),
        (None, None) => return Err(Error::Connect(format!("not an http(s):// URL: {}", req.url))),
    };
    let (authority, prefix) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    // Idle connections are kept per scheme and authority.
    let key = &req.url[..req.url.len() - prefix.len()];
    let head = request_head(req, authority, prefix);
    let mut replacing = Replacing::No;
    if let Some(conn) = checkout(key) {
        match exchange(conn, &head, req.body, &mut on_sent, Origin::Kept).await {
            Err(Attempt::Stale) => replacing = Replacing::AKeptOneThatClosed,
            Err(Attempt::Failed(e)) => return Err(e),
            Ok(r) => return Ok(r),
        }
    }
    let failed_connect = |e: io::Error| match replacing {
        // The kept connection may have carried the request to a worker that then died:
        // not a worker that was never reached.
        Replacing::AKeptOneThatClosed => {
            Error::Broken(format!("{authority}: the kept connection closed unanswered, and a new one failed: {e}"))
        }
        Replacing::No => Error::Connect(format!("{authority}: {e}")),
    };
    let stream = TcpStream::connect(authority).await.map_err(failed_connect)?;
    stream.set_nodelay(true).map_err(failed_connect)?;
    let io = if secure {
        Transport::Tls(Box::new(handshake(stream, authority).await.map_err(failed_connect)?))
    } else {
        Transport::Plain(stream)
    };
    let conn = Conn { io, key: key.into() };
    exchange(conn, &head, req.body, &mut on_sent, Origin::New).await.map_err(|a| match a {
        Attempt::Stale => unreachable!("only a kept connection is stale"),
        Attempt::Failed(e) => e,
    })
}

fn request_head(req: &Request<'_>, authority: &str, prefix: &str) -> Vec<u8> {
    let len: usize = req.body.iter().map(Bytes::len).sum();
    let mut head = Vec::with_capacity(160 + req.headers.iter().map(|(n, v)| n.len() + v.len() + 4).sum::<usize>());
    for part in [b"POST ", prefix.as_bytes(), req.path.as_bytes(), b" HTTP/1.1\r\nhost: ", authority.as_bytes(), b"\r\ncontent-length: "] {
        head.extend_from_slice(part);
    }
    head.extend_from_slice(len.to_string().as_bytes());
    for (name, value) in req.headers {
        for part in [b"\r\n", name.as_bytes(), b": ", value.as_bytes()] {
            head.extend_from_slice(part);
        }
    }
    head.extend_from_slice(b"\r\n\r\n");
    head
}

/// A TLS handshake with an https worker (--worker-ssl-*), named by its URL's host.
async fn handshake(stream: TcpStream, authority: &str) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let config = tls().ok_or_else(|| io::Error::other("an https worker, and no TLS client configured"))?;
    let host = authority.rsplit_once(':').map_or(authority, |(h, _)| h);
    let name = crate::tls::server_name(host).map_err(io::Error::other)?;
    tokio_rustls::TlsConnector::from(config).connect(name, stream).await.map_err(|e| io::Error::other(crate::tls::describe(&e)))
}

/// A connection to a worker: plain, or TLS (rustls keeps its record buffers; nothing else
/// is held per connection).
enum Transport {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl Transport {
    fn tcp(&self) -> &TcpStream {
        match self {
            Transport::Plain(s) => s,
            Transport::Tls(s) => s.get_ref().0,
        }
    }
}

struct Conn {
    io: Transport,
    /// `scheme://host:port`: the idle pool it goes back to.
    key: Box<str>,
}

enum Attempt {
    /// A kept connection that was closed before any answer: try a new one.
    Stale,
    Failed(Error),
}

/// Whether a connection was kept from an earlier request (it may have been closed by the
/// worker meanwhile) or made for this one.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Origin {
    Kept,
    New,
}

/// Whether a new connection replaces a kept one found closed.
#[derive(Clone, Copy)]
enum Replacing {
    No,
    AKeptOneThatClosed,
}

async fn exchange(mut conn: Conn, head: &[u8], body: &[Bytes], on_sent: &mut impl FnMut(), origin: Origin) -> Result<Response, Attempt> {
    let reused = origin == Origin::Kept;
    let broken = |what: &str, e: io::Error| if reused { Attempt::Stale } else { Attempt::Failed(Error::Broken(format!("{what}: {e}"))) };
    let mut slices: Vec<IoSlice<'_>> = std::iter::once(IoSlice::new(head)).chain(body.iter().map(|b| IoSlice::new(b))).collect();
    write_all(&mut conn.io, &mut slices).await.map_err(|e| broken("sending the request", e))?;
    drop(slices);
    on_sent();
    // The head usually comes whole in one read: parsed from that read's bytes, with no
    // buffer held while the worker works on the answer.
    let mut pending = BytesMut::new();
    let mut answered = false;
    loop {
        let read = std::future::poll_fn(|cx| poll_read_copy(&mut conn.io, cx)).await;
        let first = !std::mem::replace(&mut answered, true);
        let read = read.map_err(|e| {
            if first {
                broken("reading the answer", e)
            } else {
                Attempt::Failed(Error::Broken(format!("reading the answer: {e}")))
            }
        })?;
        if read.is_empty() {
            return Err(if first && reused {
                Attempt::Stale
            } else {
                Attempt::Failed(Error::Broken("the worker closed the connection before its answer's head".into()))
            });
        }
        let mut buf = if pending.is_empty() {
            read
        } else {
            pending.extend_from_slice(&read);
            pending.split().freeze()
        };
        while let Some(parsed) = parse_head(&buf).map_err(|e| Attempt::Failed(Error::Broken(e)))? {
            let rest = buf.slice(parsed.len..);
            if parsed.informational {
                // 100 Continue and the like: the answer's head follows.
                buf = rest;
                continue;
            }
            let body = Body { conn: Some(conn), input: rest, framing: parsed.framing, keep_alive: parsed.keep_alive };
            return Ok(Response { status: parsed.status, content_type: parsed.content_type, body });
        }
        if buf.len() > MAX_HEAD {
            return Err(Attempt::Failed(Error::Broken("the answer's head is too long".into())));
        }
        // A head in pieces: kept until it is whole (no copy when `buf` is the only owner).
        pending = BytesMut::from(buf);
    }
}

async fn write_all(io: &mut Transport, mut slices: &mut [IoSlice<'_>]) -> io::Result<()> {
    let stream = match io {
        Transport::Plain(stream) => stream,
        Transport::Tls(tls) => {
            // rustls seals what it is given into records; one flush sends them.
            while !slices.is_empty() {
                let n = tokio::io::AsyncWriteExt::write_vectored(&mut **tls, slices).await?;
                if n == 0 {
                    return Err(io::ErrorKind::WriteZero.into());
                }
                IoSlice::advance_slices(&mut slices, n);
            }
            return tokio::io::AsyncWriteExt::flush(&mut **tls).await;
        }
    };
    while !slices.is_empty() {
        stream.writable().await?;
        match stream.try_write_vectored(slices) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut slices, n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

struct Head {
    len: usize,
    informational: bool,
    status: StatusCode,
    content_type: Option<HeaderValue>,
    framing: Framing,
    keep_alive: bool,
}

/// The response head at the start of `buf`, once complete.
fn parse_head(buf: &[u8]) -> Result<Option<Head>, String> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(format!("the answer's head is not HTTP/1.1: {e}")),
    };
    let code = resp.code.unwrap_or_default();
    let status = StatusCode::from_u16(code).map_err(|_| format!("the answer's status {code} is not valid"))?;
    if code == 101 {
        return Err("the worker switched protocols".into());
    }
    let (mut content_type, mut length, mut chunked, mut transfer_encoded) = (None, None, false, false);
    let mut keep_alive = resp.version == Some(1);
    for h in resp.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-type") {
            content_type = HeaderValue::from_bytes(h.value).ok();
        } else if h.name.eq_ignore_ascii_case("content-length") {
            let n = std::str::from_utf8(h.value)
                .ok()
                .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|v| v.parse::<u64>().ok());
            match (n, length) {
                (Some(n), None) => length = Some(n),
                (Some(n), Some(m)) if n == m => {}
                _ => return Err("the answer's Content-Length is not valid".into()),
            }
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            transfer_encoded = true;
            chunked = h.value.rsplit(|b| *b == b',').next().is_some_and(|c| c.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if h.name.eq_ignore_ascii_case("connection") {
            keep_alive &= !h.value.split(|b| *b == b',').any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"));
        }
    }
    let informational = (100..200).contains(&code);
    let framing = if informational || code == 204 || code == 304 {
        Framing::Length(0)
    } else if transfer_encoded {
        // Both headers is how requests are smuggled: read it as chunked, keep nothing after.
        keep_alive &= length.is_none() && chunked;
        if chunked {
            Framing::Chunked(Chunked::default())
        } else {
            Framing::UntilClose
        }
    } else {
        length.map_or(Framing::UntilClose, Framing::Length)
    };
    keep_alive &= !matches!(framing, Framing::UntilClose);
    Ok(Some(Head { len, informational, status, content_type, framing, keep_alive }))
}

/// A response body, as it arrives. Read to its end, its connection is kept for the next
/// request; dropped before, the connection is closed (vLLM then aborts the request).
pub(crate) struct Body {
    conn: Option<Conn>,
    /// Read and not yet decoded.
    input: Bytes,
    framing: Framing,
    keep_alive: bool,
}

impl Body {
    /// The whole body, refused when over `limit` bytes.
    pub(crate) async fn collect(mut self, limit: usize) -> Result<Bytes, Error> {
        let too_large = || Error::Broken(format!("the answer is over {limit} bytes"));
        let mut out = BytesMut::new();
        if let Framing::Length(n) = self.framing {
            if n > limit as u64 {
                return Err(too_large());
            }
            if self.input.len() as u64 == n {
                let whole = std::mem::take(&mut self.input);
                self.framing = Framing::Length(0);
                self.finish();
                return Ok(whole);
            }
            out.reserve(n as usize);
        }
        while let Some(data) = self.next().await {
            out.extend_from_slice(&data?);
            if out.len() > limit {
                return Err(too_large());
            }
        }
        Ok(out.freeze())
    }

    /// At the body's end: the connection goes back to this thread's idle ones when it can
    /// carry another request.
    fn finish(&mut self) {
        if let Some(conn) = self.conn.take() {
            if self.keep_alive && self.input.is_empty() {
                checkin(conn);
            }
        }
    }
}

impl Stream for Body {
    type Item = Result<Bytes, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            match this.framing.take(&mut this.input) {
                Ok(Some(data)) => return Poll::Ready(Some(Ok(data))),
                Ok(None) => {}
                Err(e) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(Error::Broken(e))));
                }
            }
            if this.framing.is_complete() {
                this.finish();
                return Poll::Ready(None);
            }
            let Some(conn) = &mut this.conn else { return Poll::Ready(None) };
            match ready!(poll_read_copy(&mut conn.io, cx)) {
                Ok(read) if read.is_empty() => {
                    this.conn = None;
                    let early = !matches!(this.framing, Framing::UntilClose);
                    return Poll::Ready(
                        early.then(|| Err(Error::Broken("the worker closed the connection before the end of its answer".into()))),
                    );
                }
                Ok(read) => this.input = read,
                Err(e) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(Error::Broken(format!("reading the answer: {e}")))));
                }
            }
        }
    }
}

/// What the socket has, copied out of a buffer on the stack (so a body waiting for its
/// next bytes holds none); empty at the connection's end.
fn poll_read_copy(io: &mut Transport, cx: &mut Context<'_>) -> Poll<io::Result<Bytes>> {
    let stream = match io {
        Transport::Plain(stream) => stream,
        Transport::Tls(tls) => {
            let mut buf = [0u8; READ_CHUNK];
            let mut read = tokio::io::ReadBuf::new(&mut buf);
            ready!(Pin::new(&mut **tls).poll_read(cx, &mut read))?;
            return Poll::Ready(Ok(Bytes::copy_from_slice(read.filled())));
        }
    };
    loop {
        ready!(stream.poll_read_ready(cx))?;
        let mut buf = [0u8; READ_CHUNK];
        match stream.try_read(&mut buf) {
            Ok(n) => return Poll::Ready(Ok(Bytes::copy_from_slice(&buf[..n]))),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Poll::Ready(Err(e)),
        }
    }
}

/// Idle connections per worker (`host:port`), each with when it went idle, oldest first.
type IdleConnections = HashMap<Box<str>, VecDeque<(Transport, Instant)>>;

thread_local! {
    /// This thread's idle connections per worker (`host:port`), oldest first.
    static IDLE: RefCell<IdleConnections> = RefCell::default();
}

fn checkout(key: &str) -> Option<Conn> {
    IDLE.with_borrow_mut(|idle| {
        let kept = idle.get_mut(key)?;
        while let Some((io, since)) = kept.pop_back() {
            if since.elapsed() >= WORKER_CONNECTION_IDLE {
                kept.clear();
                break;
            }
            if still_open(io.tcp()) {
                return Some(Conn { io, key: key.into() });
            }
        }
        None
    })
}

fn checkin(conn: Conn) {
    IDLE.with_borrow_mut(|idle| {
        // Connections idle too long are dropped as others come back.
        for kept in idle.values_mut() {
            while kept.front().is_some_and(|(_, since)| since.elapsed() >= WORKER_CONNECTION_IDLE) {
                kept.pop_front();
            }
        }
        idle.retain(|_, kept| !kept.is_empty());
        let kept = idle.entry(conn.key).or_default();
        if kept.len() < MAX_IDLE_PER_WORKER {
            kept.push_back((conn.io, Instant::now()));
        }
    })
}

/// Whether an idle connection is still open and silent (the worker has not closed it, nor
/// sent anything unasked: over TLS, a close_notify), asked of the socket itself.
fn still_open(stream: &TcpStream) -> bool {
    let mut byte = 0u8;
    // SAFETY: a one-byte peek into a valid buffer, on a socket this process owns.
    let n = unsafe { libc::recv(stream.as_raw_fd(), (&mut byte as *mut u8).cast(), 1, libc::MSG_PEEK | libc::MSG_DONTWAIT) };
    n < 0 && matches!(io::Error::last_os_error().kind(), io::ErrorKind::WouldBlock)
}

#[cfg(test)]
#[path = "client_tests.rs"]
mod tests;
