//! The router's listener: HTTP/1 and h2c on one port, with the limits a public server
//! needs: at most --max-connections connections; a request head must arrive within
//! --keep-alive-timeout-secs + --header-read-timeout-secs of the connection's idle start
//! (hyper's header timer, which runs while a connection waits for its next request); a
//! connection with nothing in flight that receives nothing for --keep-alive-timeout-secs
//! is closed; on drain, idle connections close and busy ones close after their request.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower::ServiceExt;

use super::config::Timeouts;
use super::shutdown::{Drain, Phase};

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

/// Resolves once the connection has been idle (nothing in flight, nothing received) for
/// `limit`.
async fn idle_for(activity: &Activity, limit: Duration) {
    let limit_ms = limit.as_millis() as u64;
    loop {
        let due = activity.last_ms.load(Ordering::Relaxed) + limit_ms;
        let now = now_ms();
        if now >= due && activity.in_flight.load(Ordering::Relaxed) == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(due.saturating_sub(now).max(50))).await;
    }
}

/// Serves `app` on `threads` threads, each with a runtime of its own accepting from
/// `listener`: a connection, its requests and their legs' upstream connections (each
/// thread has its own client, legs.rs) all run on the thread that accepted it, so no
/// network event has to wake another thread. At most `max_connections` connections over
/// all threads. Accepting stops at the drain's cut.
pub fn spawn_serving_threads(listener: std::net::TcpListener, threads: usize, app: axum::Router, timeouts: Timeouts, max_connections: usize, drain: Arc<Drain>) -> std::io::Result<Connections> {
    let max_connections = max_connections.min(Semaphore::MAX_PERMITS).min(u32::MAX as usize);
    let slots = Arc::new(Semaphore::new(max_connections));
    let (started, up) = std::sync::mpsc::channel();
    for i in 0..threads {
        let listener = listener.try_clone()?;
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let (app, timeouts, slots, drain, started) = (app.clone(), timeouts.clone(), slots.clone(), drain.clone(), started.clone());
        std::thread::Builder::new().name(format!("disagg-serve-{i}")).spawn(move || {
            runtime.block_on(async move {
                match TcpListener::from_std(listener) {
                    Ok(listener) => {
                        let _ = started.send(Ok(()));
                        serve(listener, app, timeouts, slots, drain).await;
                    }
                    Err(e) => {
                        let _ = started.send(Err(e));
                        return;
                    }
                }
                // The connections still open keep their thread: a stream cut by the drain
                // still gets its error event, until the process exits.
                std::future::pending::<()>().await
            })
        })?;
    }
    // Every thread is serving (or one could not) before the router says it listens.
    for _ in 0..threads {
        up.recv().map_err(|_| std::io::Error::other("a serving thread ended at its start"))??;
    }
    Ok(Connections { slots, max: max_connections as u32 })
}

/// The connections of every serving thread: each holds a slot until it closes.
pub struct Connections {
    slots: Arc<Semaphore>,
    max: u32,
}

impl Connections {
    /// Waits until every connection has closed (after the drain's cut each closes once its
    /// last answer, the error event of a cut stream included, is written), or `limit` passed.
    pub async fn closed(&self, limit: Duration) {
        let _ = tokio::time::timeout(limit, self.slots.acquire_many(self.max)).await;
    }
}

/// Serves `app` on `listener` until the drain is cut, taking a slot of `slots` per connection.
async fn serve(listener: TcpListener, app: axum::Router, timeouts: Timeouts, slots: Arc<Semaphore>, drain: Arc<Drain>) {
    let mut builder = Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(timeouts.keep_alive + timeouts.header_read);
    builder.http2().timer(TokioTimer::new()).keep_alive_interval(Some(Duration::from_secs(20)));
    let builder = Arc::new(builder);
    let mut phase = drain.subscribe();
    loop {
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
            _ = phase.wait_for(|p| *p == Phase::Cut) => return,
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = phase.wait_for(|p| *p == Phase::Cut) => return,
        };
        let (tcp, _) = match accepted {
            Ok(c) => c,
            Err(e) => {
                // Out of descriptors, or a connection reset before accept: back off a little.
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let activity = Arc::new(Activity::default());
        activity.touch();
        let io = TokioIo::new(Watched { inner: tcp, activity: activity.clone() });
        let app = app.clone();
        let counting = activity.clone();
        let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
            let in_flight = InFlight::new(&counting);
            let app = app.clone();
            async move {
                let resp = app.oneshot(req).await.unwrap_or_else(|never| match never {});
                Ok::<_, std::convert::Infallible>(resp.map(|inner| Counted { inner, _in_flight: in_flight }))
            }
        });
        let builder = builder.clone();
        let drain = drain.clone();
        let keep_alive = timeouts.keep_alive;
        tokio::spawn(async move {
            let _slot = slot;
            let existed_before_drain = !drain.draining();
            let mut phase = drain.subscribe();
            let conn = builder.serve_connection_with_upgrades(io, service);
            tokio::pin!(conn);
            let mut closing = false;
            loop {
                tokio::select! {
                    _ = conn.as_mut() => break,
                    () = idle_for(&activity, keep_alive), if !closing => {
                        closing = true;
                        conn.as_mut().graceful_shutdown();
                    }
                    // Connections open before the drain close when idle; newer ones get
                    // `Connection: close` on their answer (so /health can say 503); at the
                    // cut, every one closes once its answer is out.
                    _ = phase.wait_for(|p| *p == Phase::Cut || (*p >= Phase::Draining && existed_before_drain)), if !closing => {
                        closing = true;
                        conn.as_mut().graceful_shutdown();
                    }
                }
            }
        });
    }
}

/// Raises the soft limit of open files to the hard one: each connection and each leg
/// takes a descriptor.
pub fn raise_fd_limit() {
    #[cfg(unix)]
    unsafe {
        let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}
