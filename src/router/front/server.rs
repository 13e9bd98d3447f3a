//! The router's listener: HTTP/1 and h2c on one port, with the limits a public server
//! needs: at most --max-connections connections; a request head must arrive within
//! --keep-alive-timeout-secs + --header-read-timeout-secs of the connection's idle start
//! (hyper's header timer, which runs while a connection waits for its next request); a
//! connection with nothing in flight that receives nothing for --keep-alive-timeout-secs
//! is closed (idle_close.rs); on drain, idle connections close and busy ones close after
//! their request.

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::idle_close::{accept, IdleFrom};
use crate::router::config::Timeouts;
use crate::router::flow::drain::{Drain, Phase};
use crate::tls::ServerTls;

/// Serves `app` on `threads` threads, each with a runtime of its own accepting from
/// `listener`: a connection, its requests and their legs' upstream connections (each
/// thread has its own client, legs.rs) all run on the thread that accepted it, so no
/// network event has to wake another thread. At most `max_connections` connections over
/// all threads. Accepting stops at the drain's cut.
pub(crate) fn spawn_serving_threads(
    listener: std::net::TcpListener,
    threads: usize,
    app: axum::Router,
    timeouts: Timeouts,
    limits: ConnectionLimits,
    tls: Option<Arc<ServerTls>>,
    drain: Arc<Drain>,
) -> std::io::Result<Connections> {
    let max_connections = limits.max_connections.min(Semaphore::MAX_PERMITS).min(u32::MAX as usize);
    let slots = Arc::new(Semaphore::new(max_connections));
    let (started, up) = std::sync::mpsc::channel();
    for i in 0..threads {
        let listener = listener.try_clone()?;
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let (app, timeouts, slots, drain, started, tls) =
            (app.clone(), timeouts.clone(), slots.clone(), drain.clone(), started.clone(), tls.clone());
        std::thread::Builder::new().name(format!("disagg-serve-{i}")).spawn(move || {
            runtime.block_on(async move {
                match TcpListener::from_std(listener) {
                    Ok(listener) => {
                        let _ = started.send(Ok(()));
                        serve(listener, app, timeouts, limits.h2_streams, tls, slots, drain).await;
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

/// Bounds on the client connections.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ConnectionLimits {
    pub(crate) max_connections: usize,
    /// Requests in flight on one HTTP/2 connection.
    pub(crate) h2_streams: u32,
}

/// The connections of every serving thread: each holds a slot until it closes.
pub(crate) struct Connections {
    slots: Arc<Semaphore>,
    max: u32,
}

impl Connections {
    /// Waits until every connection has closed (after the drain's cut each closes once its
    /// last answer, the error event of a cut stream included, is written), or `limit` passed.
    pub(crate) async fn closed(&self, limit: Duration) {
        let _ = tokio::time::timeout(limit, self.slots.acquire_many(self.max)).await;
    }
}

/// Serves `app` on `listener` until the drain is cut, taking a slot of `slots` per connection.
async fn serve(
    listener: TcpListener,
    app: axum::Router,
    timeouts: Timeouts,
    h2_streams: u32,
    tls: Option<Arc<ServerTls>>,
    slots: Arc<Semaphore>,
    drain: Arc<Drain>,
) {
    let mut builder = Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(timeouts.keep_alive + timeouts.header_read);
    builder.http2().timer(TokioTimer::new()).keep_alive_interval(Some(Duration::from_secs(20))).max_concurrent_streams(h2_streams);
    let builder = Arc::new(builder);
    let mut phase = drain.subscribe();
    loop {
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
            _ = phase.wait_for(|p| *p == Phase::Cut) => return,
        };
        let tcp = tokio::select! {
            tcp = accept(&listener) => tcp,
            _ = phase.wait_for(|p| *p == Phase::Cut) => return,
        };
        let builder = builder.clone();
        let drain = drain.clone();
        let (app, keep_alive, handshake) = (app.clone(), timeouts.keep_alive, timeouts.header_read);
        let tls = tls.as_ref().map(|t| t.acceptor());
        tokio::spawn(async move {
            let _slot = slot;
            let existed_before_drain = !drain.draining();
            let mut phase = drain.subscribe();
            // Connections open before the drain close when idle; newer ones get
            // `Connection: close` on their answer (so /health can say 503); at the cut,
            // every one closes once its answer is out.
            let close = async move {
                let _ = phase.wait_for(|p| *p == Phase::Cut || (*p >= Phase::Draining && existed_before_drain)).await;
            };
            match tls {
                None => crate::idle_close::serve_connection(&builder, tcp, app, keep_alive, IdleFrom::Accept, close).await,
                // The handshake within the head's time: a client that connects and stalls holds nothing long.
                Some(acceptor) => match tokio::time::timeout(handshake, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => crate::idle_close::serve_connection(&builder, tls, app, keep_alive, IdleFrom::Accept, close).await,
                    Ok(Err(e)) => tracing::debug!("TLS handshake with a client failed: {}", crate::tls::describe(&e)),
                    Err(_) => tracing::debug!("a client did not finish its TLS handshake within {handshake:?}"),
                },
            }
        });
    }
}
