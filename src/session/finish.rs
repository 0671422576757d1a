//! The end of a session: what the client is still owed is written, a statement still running
//! for a client that left is cancelled, and every held server connection is returned to its
//! pool (reset) or dropped.

use pgvigil_proto::sqlstate;
use tokio::io::AsyncWriteExt;
use tracing::debug;

use super::relay::{ClientConn, Progress, RelayEnd};
use super::sync::Held;
use super::{refuse, SessionError};
use crate::pool::Lease;
use crate::proxy::Proxy;
use crate::topology::NodeId;

/// Writes what the client is owed before the session does anything else.
pub(super) async fn flush_client(client: &mut ClientConn) -> std::io::Result<()> {
    if !client.pending.is_empty() {
        client.stream.write_all(&client.pending).await?;
        client.stream.flush().await?;
        client.pending.clear();
    }
    Ok(())
}

/// Returns or drops every held server connection once the session is over.
pub(super) async fn finish(
    end: RelayEnd,
    client: &mut ClientConn,
    mut held: Held,
    current: NodeId,
    progress: &Progress,
    proxy: &Proxy,
) {
    let topology = proxy.topology.snapshot();
    let usable = |node: NodeId| {
        topology
            .nodes
            .get(node)
            .is_some_and(|n| n.role.takes_new_work())
    };
    for (node, lease) in held.leases.iter_mut().enumerate() {
        if node != current {
            if let Some(lease) = lease.take() {
                let reusable = lease.conn.rbuf.is_empty() && usable(node);
                proxy.release(lease, reusable).await;
            }
        }
    }
    let lease = held.leases[current].take();
    let reusable = progress.is_quiet() && usable(current);
    let reusable = reusable && lease.as_ref().is_some_and(|l| l.conn.rbuf.is_empty());
    match end {
        RelayEnd::Terminated | RelayEnd::ClientGone => {
            if let (Some(lease), false) = (&lease, reusable) {
                cancel_running(lease, progress, proxy).await;
            }
        }
        // The client holds part of a message: an error after it would be read as its rest.
        RelayEnd::Violation(_) if progress.from_server.is_open() => {}
        RelayEnd::Violation(message) => {
            let error = SessionError::Refused {
                code: sqlstate::PROTOCOL_VIOLATION,
                message,
            };
            let _ = flush_client(client).await;
            refuse(&mut client.stream, &error).await;
        }
    }
    if let Some(lease) = lease {
        proxy.release(lease, reusable).await;
    }
}

/// Stops a statement still running for a client that left. PostgreSQL does not notice a closed
/// socket until it next writes to it, so without this a long query, in a transaction block or
/// not, keeps its backend busy to the end. The connection is closed right after, so the cancel
/// cannot reach another client's query.
async fn cancel_running(lease: &Lease, progress: &Progress, proxy: &Proxy) {
    if progress.awaiting_ready == 0 {
        return;
    }
    let target = lease.conn.cancel_target();
    if let Err(error) =
        crate::cancel::send_cancel(&target, proxy.config().backend.connect_timeout).await
    {
        debug!(%error, "could not cancel the statement of a client that left");
    }
}
