//! The accept loop: limits clients to `max_client_conn`, tunes sockets, and starts a session task
//! per client.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use pgvigil_proto::encode::{self, PgError, Severity};
use pgvigil_proto::sqlstate;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::proxy::Proxy;
use crate::session;
use crate::stream::tune_socket;

/// Accepts clients until `shutdown` fires.
pub async fn accept_loop(listener: TcpListener, proxy: Arc<Proxy>, shutdown: CancellationToken) {
    let limit = Arc::new(Semaphore::new(proxy.config().max_client_conn));
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let tcp = match accepted {
            Ok((tcp, _)) => tcp,
            Err(error) => {
                // Typically EMFILE: back off briefly instead of spinning.
                warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let _ = tune_socket(&tcp);
        match limit.clone().try_acquire_owned() {
            Ok(permit) => {
                let proxy = proxy.clone();
                tokio::spawn(async move {
                    proxy.metrics.client_opened();
                    session::run(tcp, proxy.clone()).await;
                    proxy.metrics.client_closed();
                    drop(permit);
                });
            }
            Err(_) => {
                proxy
                    .metrics
                    .client_rejected(crate::metrics::Rejection::TooManyClients);
                tokio::spawn(refuse_too_many(tcp, proxy.config().max_client_conn));
            }
        }
    }
}

/// Tells a client over the limit why it cannot connect (libpq reads an ErrorResponse even in
/// answer to its SSLRequest), then closes.
async fn refuse_too_many(mut tcp: TcpStream, limit: usize) {
    let mut out = BytesMut::new();
    let message = format!("sorry, too many clients already (max_client_conn = {limit})");
    encode::error_response_with(
        &mut out,
        &PgError {
            severity: Severity::Fatal,
            code: sqlstate::TOO_MANY_CONNECTIONS,
            message: &message,
            detail: None,
            hint: None,
        },
    );
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let _ = tcp.write_all(&out).await;
        let _ = tcp.shutdown().await;
    })
    .await;
}
