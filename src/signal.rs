//! SIGINT / SIGTERM, for every long-running subcommand.

use std::future::Future;

/// Resolves at the first SIGINT (Ctrl-C) or SIGTERM. The handlers are installed when this
/// is called, not when the future is first polled: a signal that comes between the call
/// and the first poll (a launcher that has just said it is ready) is not lost.
pub fn shutdown() -> impl Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut int = signal(SignalKind::interrupt()).ok();
    let mut term = signal(SignalKind::terminate()).ok();
    async move {
        let recv = |s: &mut Option<tokio::signal::unix::Signal>| {
            let s = s.take();
            async move {
                match s {
                    Some(mut s) => {
                        s.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            }
        };
        tokio::select! {
            _ = recv(&mut int) => {}
            _ = recv(&mut term) => {}
        }
    }
}
