//! SIGINT / SIGTERM, for every long-running subcommand.

use std::future::Future;

/// Resolves at the first SIGINT (Ctrl-C) or SIGTERM. The handlers are installed when this
/// is called, not when the future is first polled: a signal that comes between the call
/// and the first poll (a launcher that has just said it is ready) is not lost.
pub(crate) fn shutdown() -> impl Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let int = signal(SignalKind::interrupt()).ok();
    let term = signal(SignalKind::terminate()).ok();
    let next = |s: Option<tokio::signal::unix::Signal>| async move {
        match s {
            Some(mut s) => {
                s.recv().await;
            }
            None => std::future::pending::<()>().await,
        }
    };
    async move {
        tokio::select! {
            _ = next(int) => {}
            _ = next(term) => {}
        }
    }
}
