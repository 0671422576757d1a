//! The accept loop of one data-plane thread: limits clients to `max_client_conn` (shared by every
//! thread), tunes sockets, and starts a session task per client on the thread's own runtime.

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

/// Accepts clients until `shutdown` fires, counting them with `accepted` (this thread's
/// `pgvigil_accepted_clients_total`); `limit` holds the sessions of every thread.
pub async fn accept_loop(
    listener: TcpListener,
    accepted: metrics::Counter,
    proxy: Arc<Proxy>,
    limit: Arc<Semaphore>,
    shutdown: CancellationToken,
) {
    loop {
        let accepted_now = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let tcp = match accepted_now {
            Ok((tcp, _)) => tcp,
            Err(error) => {
                // Typically EMFILE: back off briefly instead of spinning.
                warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let _ = tune_socket(&tcp);
        accepted.increment(1);
        match limit.clone().try_acquire_owned() {
            Ok(permit) => {
                tokio::spawn(session::run(tcp, proxy.clone(), permit));
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
