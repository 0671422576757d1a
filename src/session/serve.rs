//! The steady state of a session across nodes: relay on the current node until the next unit
//! goes elsewhere, bring that node up to date (connection, settings, prepared statements), move,
//! and at the end hand every server connection back.

use bytes::{BufMut, BytesMut};
use pgvigil_proto::classify::encoding_is_safe;
use pgvigil_proto::encode;
use pgvigil_proto::sqlstate;
use tokio::io::AsyncWriteExt;
use tracing::{debug, info, warn};

use super::relay::{self, ClientConn, Progress, RelayEnd, Stop};
use super::startup::ClientStartup;
use super::steering::{Decision, Steering};
use super::{apply_params, pool_refusal, refuse, server_refusal, SessionError};
use crate::cancel::CancelKey;
use crate::pool::Lease;
use crate::proxy::Proxy;
use crate::replication::parse_lsn;
use crate::router;
use crate::server::ServerError;
use crate::topology::{NodeId, Primary};

/// The server connections a session holds, at most one per node.
struct Held {
    leases: Vec<Option<Lease>>,
}

/// Relays until the session ends, moving between nodes as units are routed, then returns (or
/// drops) every server connection.
pub async fn serve(
    mut client: ClientConn,
    lease: Lease,
    proxy: &Proxy,
    key: &CancelKey,
    startup: &ClientStartup,
) {
    let first = lease.conn.node;
    let encoding_safe = lease
        .conn
        .params
        .get(b"client_encoding")
        .is_none_or(encoding_is_safe);
    let mut steering = Steering::new(proxy.config.nodes.len(), first, encoding_safe);
    let mut held = Held {
        leases: (0..proxy.config.nodes.len()).map(|_| None).collect(),
    };
    held.leases[first] = Some(lease);
    let mut progress = Progress::default();
    let end = loop {
        let Some(lease) = held.leases[steering.current].as_mut() else {
            break RelayEnd::ClientGone;
        };
        let stop = relay::relay(
            &mut client,
            &mut lease.conn,
            &mut steering,
            &mut progress,
            proxy,
        )
        .await;
        let decision = match stop {
            Stop::End(end) => break end,
            Stop::Decided(decision) => decision,
        };
        if flush_client(&mut client).await.is_err() {
            break RelayEnd::ClientGone;
        }
        if let Err(error) = act(
            decision,
            &mut client,
            &mut held,
            &mut steering,
            key,
            startup,
            proxy,
        )
        .await
        {
            info!(%error, "session ended: its next statement cannot be served");
            refuse(&mut client.stream, &error).await;
            break RelayEnd::ClientGone;
        }
    };
    steering.unit_done(proxy);
    key.set_target(None);
    debug!(?end, "session ended");
    finish(end, &mut client, held, steering.current, &progress, proxy).await;
}

/// Carries out a decision the relay could not: moving to a node, fetching the session's write
/// position, or waiting for a primary.
async fn act(
    decision: Decision,
    client: &mut ClientConn,
    held: &mut Held,
    steering: &mut Steering,
    key: &CancelKey,
    startup: &ClientStartup,
    proxy: &Proxy,
) -> Result<(), SessionError> {
    match decision {
        Decision::Move(node) => match bring(node, client, held, steering, startup, proxy).await {
            Ok(()) => {
                steering.moved_to(node);
                if let Some(lease) = &held.leases[node] {
                    key.set_target(Some(lease.conn.cancel_target()));
                }
                Ok(())
            }
            Err(error) if is_primary(proxy, node) => Err(error),
            Err(error) => {
                // Reads have other places to go: the next decision skips this node.
                info!(node, %error, "a node could not serve this session; reading elsewhere");
                steering.avoid(node);
                Ok(())
            }
        },
        Decision::FetchLsn => {
            let lsn = write_position(held, proxy).await;
            debug!(?lsn, "write position of the session");
            steering.set_write_lsn(lsn);
            Ok(())
        }
        Decision::WaitPrimary => proxy
            .wait_for_route(router::route_write)
            .await
            .map(|_| ())
            .map_err(|e| SessionError::Refused {
                code: sqlstate::CANNOT_CONNECT_NOW,
                message: e.to_string(),
            }),
        Decision::Forward | Decision::Wait => Ok(()),
    }
}

/// Makes `node` ready for the unit at the front of the client's buffer: a connection with the
/// client's startup settings, every session setting the session made since, stale statements
/// closed, and the named statements the unit uses prepared.
async fn bring(
    node: NodeId,
    client: &ClientConn,
    held: &mut Held,
    steering: &mut Steering,
    startup: &ClientStartup,
    proxy: &Proxy,
) -> Result<(), SessionError> {
    if held.leases[node].is_none() {
        let target = proxy.login_target(node, &startup.user, &startup.database);
        let mut lease = if is_primary(proxy, node) {
            proxy.pools.checkout(&target).await
        } else {
            proxy.pools.try_checkout(&target).await
        }
        .map_err(pool_refusal)?;
        if let Err(error) = apply_params(&mut lease, startup).await {
            proxy.release(lease, true).await;
            return Err(error);
        }
        steering.fresh_connection(node);
        held.leases[node] = Some(lease);
    }
    let result = catch_up(node, client, held, steering, proxy).await;
    if let Err(ServerError::Io { .. } | ServerError::Protocol { .. }) = &result {
        // A broken connection is dropped; the session opens a new one next time.
        held.leases[node] = None;
        proxy.report_server_failure(node);
    }
    result.map_err(server_refusal)
}

/// Runs on `node` what it missed. A statement the node rejects is logged and skipped: the node
/// would reject it for the client too, and the client's own statement will say so.
async fn catch_up(
    node: NodeId,
    client: &ClientConn,
    held: &mut Held,
    steering: &mut Steering,
    proxy: &Proxy,
) -> Result<(), ServerError> {
    let Some(lease) = held.leases[node].as_mut() else {
        return Ok(());
    };
    let conn = &mut lease.conn;
    let (replay, closes) = steering.catch_up(node);
    let mut out = BytesMut::new();
    if !closes.is_empty() {
        for name in closes {
            encode::message(&mut out, b'C', |b| {
                b.put_u8(b'S');
                b.put_slice(name);
                b.put_u8(0);
            });
        }
        encode::sync(&mut out);
        skip_rejection(conn.exchange(&mut out).await)?;
    }
    for sql in replay {
        encode::query(&mut out, sql);
        skip_rejection(conn.exchange(&mut out).await)?;
    }
    steering.caught_up(node);
    let max = proxy.config.max_message_size;
    for parse in steering.missing_statements(&client.rbuf, node, max) {
        out.extend_from_slice(&parse);
        encode::sync(&mut out);
        // A node that refuses it (a failed transaction block refuses everything) does not have
        // it: the next unit that needs it there prepares it again.
        if accepted(conn.exchange(&mut out).await)? {
            steering.statement_on(&parse, node);
        }
    }
    Ok(())
}

/// Whether the node accepted a replayed statement; a rejection is logged, any other failure is an
/// error.
fn accepted(result: Result<Option<String>, ServerError>) -> Result<bool, ServerError> {
    match result {
        Err(ServerError::Rejected { node, message, .. }) => {
            debug!(%node, %message, "a replayed statement was rejected");
            Ok(false)
        }
        other => other.map(|_| true),
    }
}

/// Treats a statement the node rejected as done (logged), any other failure as an error.
fn skip_rejection(result: Result<Option<String>, ServerError>) -> Result<(), ServerError> {
    accepted(result).map(|_| ())
}

/// The primary's current WAL position, read on the session's own primary connection (which
/// is idle: the session is between units). None when it cannot be read.
async fn write_position(held: &mut Held, proxy: &Proxy) -> Option<u64> {
    let Primary::Known(primary) = proxy.topology.load().primary.clone() else {
        return None;
    };
    let lease = held.leases[primary].as_mut()?;
    match lease
        .conn
        .query_text("SELECT pg_current_wal_insert_lsn()::text")
        .await
    {
        Ok(text) => text.as_deref().and_then(parse_lsn),
        Err(error) => {
            debug!(%error, "could not read the write position");
            None
        }
    }
}

fn is_primary(proxy: &Proxy, node: NodeId) -> bool {
    proxy.topology.load().primary == Primary::Known(node)
}

/// Writes what the client is owed before the session does anything else.
async fn flush_client(client: &mut ClientConn) -> std::io::Result<()> {
    if !client.pending.is_empty() {
        client.stream.write_all(&client.pending).await?;
        client.stream.flush().await?;
        client.pending.clear();
    }
    Ok(())
}

/// Returns or drops every held server connection once the session is over.
async fn finish(
    end: RelayEnd,
    client: &mut ClientConn,
    mut held: Held,
    current: NodeId,
    progress: &Progress,
    proxy: &Proxy,
) {
    for (node, lease) in held.leases.iter_mut().enumerate() {
        if node != current {
            if let Some(lease) = lease.take() {
                let reusable = lease.conn.rbuf.is_empty();
                proxy.release(lease, reusable).await;
            }
        }
    }
    let Some(lease) = held.leases[current].take() else {
        return;
    };
    let reusable = progress.is_quiet() && lease.conn.rbuf.is_empty();
    match end {
        RelayEnd::Terminated | RelayEnd::ClientGone => {
            if !reusable {
                cancel_running(&lease, progress, proxy).await;
            }
            proxy.release(lease, reusable).await;
        }
        RelayEnd::Violation(message) => {
            let error = SessionError::Refused {
                code: sqlstate::PROTOCOL_VIOLATION,
                message,
            };
            refuse(&mut client.stream, &error).await;
            proxy.release(lease, reusable).await;
        }
        RelayEnd::ServerLost {
            error,
            server_said_fatal,
        } => {
            warn!(node = %lease.conn.node_name, ?error, "server connection lost during a session");
            proxy.report_server_failure(lease.conn.node);
            if !server_said_fatal {
                let error = SessionError::Refused {
                    code: sqlstate::CONNECTION_FAILURE,
                    message: format!(
                        "the connection to node {} was lost; reconnect to continue",
                        lease.conn.node_name
                    ),
                };
                refuse(&mut client.stream, &error).await;
            }
        }
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
        crate::cancel::send_cancel(&target, proxy.config.backend.connect_timeout).await
    {
        debug!(%error, "could not cancel the statement of a client that left");
    }
}
