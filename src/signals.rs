//! The signals a running pgvigil answers: SIGINT and SIGTERM stop it, SIGHUP reloads its
//! configuration file.

use tracing::warn;

use crate::proxy::Proxy;

/// Resolves on SIGINT (Ctrl-C) or SIGTERM (`kill`, `docker stop`, systemd).
pub async fn stop_requested() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Reloads the configuration on every SIGHUP (see `reload`; the outcome is logged and kept in
/// the event log) until SIGINT or SIGTERM.
pub async fn serve_until_stopped(proxy: &Proxy) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hangups = match signal(SignalKind::hangup()) {
        Ok(hangups) => hangups,
        Err(error) => {
            warn!(%error, "cannot listen for SIGHUP: reload with `pgvigil reload` instead");
            return stop_requested().await;
        }
    };
    let stop = stop_requested();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => return,
            Some(()) = hangups.recv() => {
                // The outcome is logged and kept in the event log by `reload` itself.
                let _ = crate::reload::reload(proxy).await;
            }
        }
    }
}
