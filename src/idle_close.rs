//! Accepting and serving HTTP connections, for the router's listener and the simulator's:
//! each connection is served with an idle close: a connection with nothing in flight that receives nothing for its
//! keep-alive time is closed gracefully (hyper's own timers do not cover this: its header
//! timer runs only while a request head is awaited).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tower::ServiceExt;

/// When a connection's idle time starts counting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum IdleFrom {
    /// From the accept (the router: a connection that never sends a request is closed too).
    Accept,
    /// From the end of its first answer, as uvicorn arms its keep-alive timer only when a
    /// response completes (vLLM's server; uvicorn/protocols/http/httptools_impl.py).
    FirstAnswer,
}

/// Serves `app` on `tcp` (plain or TLS) until the client closes, the connection has been idle for
/// `keep_alive`, or `close` resolves (then it closes once its answers are out).
pub(crate) async fn serve_connection<T>(
    builder: &Builder<TokioExecutor>,
    tcp: T,
    app: axum::Router,
    keep_alive: Duration,
    from: IdleFrom,
    close: impl Future<Output = ()>,
) where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let activity = Arc::new(Activity::default());
    activity.touch();
    activity.armed.store(from == IdleFrom::Accept, Ordering::Relaxed);
    let io = TokioIo::new(Watched { inner: tcp, activity: activity.clone() });
    let counting = activity.clone();
    let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
        let in_flight = InFlight::new(&counting);
        let app = app.clone();
        async move {
            let resp = app.oneshot(req).await.unwrap_or_else(|never| match never {});
            Ok::<_, std::convert::Infallible>(resp.map(|inner| Counted { inner, _in_flight: in_flight }))
        }
    });
    let conn = builder.serve_connection_with_upgrades(io, service);
    tokio::pin!(conn);
    let wind_down = async {
        tokio::select! {
            () = idle_for(&activity, keep_alive) => {}
            () = close => {}
        }
    };
    tokio::select! {
        _ = conn.as_mut() => return,
        () = wind_down => conn.as_mut().graceful_shutdown(),
    }
    let _ = conn.await;
}

/// The next connection on `listener`, with TCP_NODELAY (small SSE chunks must not wait on
/// Nagle; vLLM's asyncio transports set it too). Accept errors (out of descriptors, a
/// connection reset before its accept) are logged and retried after a short pause.
pub(crate) async fn accept(listener: &TcpListener) -> TcpStream {
    loop {
        match listener.accept().await {
            Ok((tcp, _)) => {
                let _ = tcp.set_nodelay(true);
                return tcp;
            }
            Err(e) => {
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// Milliseconds since the first call: a cheap clock for activity stamps.
fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// What the idle watchdog of one connection looks at.
#[derive(Default)]
struct Activity {
    last_ms: AtomicU64,
    in_flight: AtomicUsize,
    /// Whether the idle time counts yet.
    armed: AtomicBool,
}

impl Activity {
    fn touch(&self) {
        self.last_ms.store(now_ms(), Ordering::Relaxed);
    }
}

/// A request in flight on a connection, until its response body is gone.
struct InFlight(Arc<Activity>);

impl InFlight {
    fn new(a: &Arc<Activity>) -> Self {
        a.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(a.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.touch();
        self.0.armed.store(true, Ordering::Relaxed);
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The socket, stamping every read that brings bytes.
struct Watched<T> {
    inner: T,
    activity: Arc<Activity>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(mut self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[std::io::IoSlice<'_>]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// A response body that keeps its request counted in flight until it is dropped.
struct Counted {
    inner: Body,
    _in_flight: InFlight,
}

impl http_body::Body for Counted {
    type Data = bytes::Bytes;
    type Error = axum::Error;
    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Resolves once the connection has been idle (nothing in flight, nothing received, its
/// idle time armed) for `limit`.
async fn idle_for(activity: &Activity, limit: Duration) {
    let limit_ms = limit.as_millis() as u64;
    loop {
        let due = activity.last_ms.load(Ordering::Relaxed) + limit_ms;
        let now = now_ms();
        if now >= due && activity.in_flight.load(Ordering::Relaxed) == 0 && activity.armed.load(Ordering::Relaxed) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(due.saturating_sub(now).max(50))).await;
    }
}
