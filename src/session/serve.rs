//! The steady state of a session across nodes: relay on the current node until the next unit
//! goes elsewhere, bring that node up to date (connection, settings, prepared statements), move,
//! and at the end hand every server connection back.

use std::time::Duration;

use bytes::{BufMut, BytesMut};
use pgvigil_proto::classify::encoding_is_safe;
use pgvigil_proto::encode;
use pgvigil_proto::sqlstate;
use pgvigil_proto::TxStatus;
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::aborted::{self, LostTransaction};
use super::loss::{self, Aftermath};
use super::recover::{self, Failure};
use super::relay::{self, ClientConn, Loss, LossCause, Progress, RelayEnd, Stop};
use super::server_side::downgrade_fatal;
use super::startup::ClientStartup;
use super::steering::{Decision, Steering};
use super::{open, open_within, refuse, OpenError, SessionError};
use crate::cancel::CancelKey;
use crate::pool::{Lease, PoolError};
use crate::proxy::Proxy;
use crate::replication::parse_lsn;
use crate::server::ServerError;
use crate::topology::{Need, NodeId, Primary};

/// Longest pause between two tries to reach a primary that failed to connect, even when the
/// topology does not change (the node may have been restarting).
const PRIMARY_RETRY: Duration = Duration::from_millis(500);

/// The server connections a session holds, at most one per node.
struct Held {
    leases: Vec<Option<Lease>>,
}

impl Held {
    /// Drops (never pools) the connections to nodes other than `current` that the topology no
    /// longer lets sessions use; what the session had there is forgotten.
    fn drop_unusable(&mut self, current: NodeId, steering: &mut Steering, proxy: &Proxy) {
        let topology = proxy.topology.load();
        for (node, lease) in self.leases.iter_mut().enumerate() {
            let usable = topology.nodes.get(node).is_some_and(|n| n.role.is_usable());
            if node != current && !usable && lease.take().is_some() {
                debug!(
                    node,
                    "connection to a node that is no longer usable dropped"
                );
                steering.fresh_connection(node);
            }
        }
    }
}

/// The unit at the front of the client's buffer is waiting for a primary until `until`.
struct PrimaryWait {
    until: Instant,
    /// `Steering::units_begun` when the wait started: once it moves on, this unit was served.
    units: u64,
    /// The client's cancel requests since the wait started: one ends the wait, as PostgreSQL
    /// cancels a statement.
    cancels: watch::Receiver<u64>,
}

/// What a session goes on with between relays.
struct Session<'a> {
    client: ClientConn,
    held: Held,
    steering: Steering,
    progress: Progress,
    /// Topology generations, watched while relaying.
    changes: watch::Receiver<u64>,
    /// The connection was lost inside the client's transaction block: until the client ends
    /// it, its units are answered without a server, so that nothing runs outside the
    /// transaction the client believes it is in.
    lost: Option<LostTransaction>,
    primary_wait: Option<PrimaryWait>,
    key: &'a CancelKey,
    startup: &'a ClientStartup,
    proxy: &'a Proxy,
}

/// Relays until the session ends, moving between nodes as units are routed and surviving the
/// loss of server connections, then returns (or drops) every server connection.
pub async fn serve(
    client: ClientConn,
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
    let mut held = Held {
        leases: (0..proxy.config.nodes.len()).map(|_| None).collect(),
    };
    held.leases[first] = Some(lease);
    let mut session = Session {
        client,
        held,
        steering: Steering::new(proxy.config.nodes.len(), first, encoding_safe),
        progress: Progress::default(),
        changes: proxy.topology.subscribe(),
        lost: None,
        primary_wait: None,
        key,
        startup,
        proxy,
    };
    let end = match session.run().await {
        Ok(end) => end,
        Err(error) => {
            info!(%error, "session ended: its next statement cannot be served");
            let _ = flush_client(&mut session.client).await;
            refuse(&mut session.client.stream, &error).await;
            RelayEnd::ClientGone
        }
    };
    session.steering.unit_done(proxy);
    key.set_target(None);
    debug!(?end, "session ended");
    finish(
        end,
        &mut session.client,
        session.held,
        session.steering.current,
        &session.progress,
        proxy,
    )
    .await;
}

impl Session<'_> {
    /// The session's steady state: relay, act on decisions, recover from lost connections.
    async fn run(&mut self) -> Result<RelayEnd, SessionError> {
        loop {
            let current = self.steering.current;
            self.held
                .drop_unusable(current, &mut self.steering, self.proxy);
            if let Some(lost) = self.lost.take() {
                self.lost =
                    aborted::answer_unit(&mut self.client, lost, &mut self.steering, self.proxy)
                        .await
                        .map_err(ended)?;
                continue;
            }
            let stop = match self.held.leases[current].as_mut() {
                Some(lease) => {
                    relay::relay(
                        &mut self.client,
                        &mut lease.conn,
                        &mut self.steering,
                        &mut self.progress,
                        &mut self.changes,
                        self.proxy,
                    )
                    .await
                }
                None => recover::next_unit(&mut self.client, &mut self.steering, self.proxy).await,
            };
            let decision = match stop {
                Stop::End(end) => return Ok(end),
                Stop::Lost(loss) => {
                    self.recover(loss).await?;
                    continue;
                }
                Stop::Decided(decision) => decision,
            };
            if flush_client(&mut self.client).await.is_err() {
                return Ok(RelayEnd::ClientGone);
            }
            self.act(decision).await?;
        }
    }

    /// The connection to the current node is lost: unless the session held what cannot be
    /// rebuilt elsewhere, the client is answered for what it awaited (ERROR, ReadyForQuery) and
    /// the session goes on, its next unit routed afresh. A transaction block open on the lost
    /// connection stays failed for the client until it ends it (see [`aborted`]).
    ///
    /// Losses that end the session: a backend terminated by an administrator on a node that stays
    /// up (the node's FATAL is relayed, as a direct connection would get it); and with FATAL 08006,
    /// a loss during COPY FROM STDIN (the client is streaming data and cannot be told to stop and
    /// resend), or of a connection holding what cannot be replayed (see `Steering::pinned`),
    /// which died with it.
    async fn recover(&mut self, loss: Loss) -> Result<(), SessionError> {
        let node = self.steering.current;
        let Some(lease) = self.held.leases[node].take() else {
            return Ok(());
        };
        let name = lease.conn.node_name.clone();
        let server_tx = lease.conn.tx;
        drop(lease);
        warn!(node = %name, cause = %loss.cause, "server connection lost during a session");
        self.proxy.report_server_failure(node);
        // Settings still unanswered died with the connection: they must not count as a
        // setting of unknown outcome when the unit is closed.
        self.steering.settings.lost();
        self.steering.unit_done(self.proxy);
        self.key.set_target(None);
        let fatal = loss.fatal.as_ref();
        if loss::terminated_by_admin(fatal, &loss.cause, node, self.startup, self.proxy).await {
            info!(node = %name, "backend terminated by an administrator; the session ends with it");
            let frame = fatal.map(|f| f.frame.clone()).unwrap_or_default();
            return Err(SessionError::NodeRefused(
                "terminated by an administrator".into(),
                frame,
            ));
        }
        let lost = match &loss.cause {
            LossCause::Unusable(role) => format!("node {name} is {}", role.as_str()),
            _ => format!("the connection to node {name} was lost"),
        };
        let fatal_reason = if self.progress.copy_in {
            Some("during COPY FROM STDIN")
        } else {
            self.steering.pinned()
        };
        if let Some(reason) = fatal_reason {
            return Err(SessionError::Refused {
                code: sqlstate::CONNECTION_FAILURE,
                message: format!(
                    "{lost} and the session cannot go on without it ({reason}); reconnect to continue"
                ),
            });
        }
        self.steering.lost_current();
        let busy = !self.progress.is_quiet();
        let aftermath = loss::aftermath(server_tx, busy, self.steering.last_statement());
        debug!(?aftermath, "where the loss leaves the client");
        let rolled_back = format!("{lost}; the transaction was rolled back");
        let (code, message, status) = match aftermath {
            Aftermath::Quiet => return Ok(()),
            Aftermath::Unannounced => {
                self.lost = Some(LostTransaction::Unannounced(rolled_back));
                return Ok(());
            }
            Aftermath::Failed => (sqlstate::CONNECTION_FAILURE, lost, TxStatus::Idle),
            Aftermath::InDoubt => (
                sqlstate::TRANSACTION_RESOLUTION_UNKNOWN,
                format!(
                    "{lost} while the transaction was committing: it may or may not have committed"
                ),
                TxStatus::Idle,
            ),
            Aftermath::Aborted => (
                sqlstate::CONNECTION_FAILURE,
                format!("{rolled_back}; end the transaction block with ROLLBACK"),
                TxStatus::Failed,
            ),
        };
        // The node's own error answers the request it interrupted, except when the outcome is in
        // doubt: its 57P01 would read as "not committed".
        let first = fatal
            .filter(|f| f.answering && aftermath != Aftermath::InDoubt)
            .map(|f| {
                let mut frame = f.frame.to_vec();
                downgrade_fatal(&mut frame);
                frame
            });
        let failure = Failure {
            code,
            message: &message,
        };
        let max_message = self.proxy.config.max_message_size;
        recover::answer_lost(
            &mut self.client,
            &mut self.progress,
            first.as_deref(),
            &failure,
            status,
            max_message,
        )
        .await
        .map_err(ended)?;
        if aftermath == Aftermath::Aborted {
            self.lost = Some(LostTransaction::Aborted);
        }
        Ok(())
    }

    /// Carries out a decision the relay could not: moving to a node, fetching the session's
    /// write position, or waiting for a primary.
    async fn act(&mut self, decision: Decision) -> Result<(), SessionError> {
        match decision {
            Decision::Move(node) => match self.bring(node).await {
                Ok(()) => {
                    self.steering.moved_to(node);
                    self.primary_wait = None;
                    if let Some(lease) = &self.held.leases[node] {
                        self.key.set_target(Some(lease.conn.cancel_target()));
                    }
                    Ok(())
                }
                Err(error) if is_primary(self.proxy, node) && error.unreachable() => {
                    info!(node, %error, "the primary cannot be reached; waiting");
                    self.proxy.report_server_failure(node);
                    self.wait_for_primary(Some(error.to_string())).await
                }
                Err(error) if is_primary(self.proxy, node) => Err(error.into_session_error()),
                Err(error @ OpenError::Pool(PoolError::Abandoned { .. })) => {
                    // The topology moved on (a new primary, a suspect replica): route afresh;
                    // the router already steers clear of that node.
                    info!(node, %error, "routing the unit afresh");
                    self.steering.reroute();
                    Ok(())
                }
                Err(error) => {
                    // Reads have other places to go: the next decision skips this node.
                    info!(node, %error, "a node could not serve this session; reading elsewhere");
                    self.steering.avoid(node);
                    Ok(())
                }
            },
            Decision::FetchLsn => {
                let lsn = write_position(&mut self.held, &mut self.steering, self.proxy).await;
                if self.held.leases[self.steering.current].is_none() {
                    // Its connection was dropped: no cancel may reach that backend any more.
                    self.key.set_target(None);
                }
                debug!(?lsn, "write position of the session");
                self.steering.set_write_lsn(lsn);
                Ok(())
            }
            Decision::WaitPrimary => self.wait_for_primary(None).await,
            Decision::Forward | Decision::Wait => Ok(()),
        }
    }

    /// The unit at the front needs a primary it cannot have now: waits for the next topology
    /// generation (or a short pause) so that it is routed again, up to `failover.wait_timeout`
    /// since it first waited; past that it is refused with 57P03 and the session goes on.
    async fn wait_for_primary(&mut self, failure: Option<String>) -> Result<(), SessionError> {
        let units = self.steering.units_begun();
        let mut wait = match self.primary_wait.take() {
            Some(wait) if wait.units == units => wait,
            _ => PrimaryWait {
                until: Instant::now() + self.proxy.config.failover.wait_timeout,
                units,
                cancels: self.key.cancels(),
            },
        };
        self.steering.reroute();
        let until = wait.until;
        let pause = until.min(Instant::now() + PRIMARY_RETRY);
        let mut cancelled = wait.cancels.has_changed().unwrap_or(false);
        if !cancelled {
            tokio::select! {
                changed = self.changes.changed() => {
                    if changed.is_err() {
                        // No more generations can come: wait out the rest (or a cancel).
                        tokio::select! {
                            _ = tokio::time::sleep_until(until) => {}
                            c = wait.cancels.changed() => cancelled = c.is_ok(),
                        }
                    }
                }
                c = wait.cancels.changed() => cancelled = c.is_ok(),
                _ = tokio::time::sleep_until(pause) => {}
            }
        }
        let max_message = self.proxy.config.max_message_size;
        if cancelled {
            info!("a unit waiting for a primary was cancelled by the client");
            let failure = Failure {
                code: sqlstate::QUERY_CANCELED,
                message: "canceling statement due to user request",
            };
            return recover::reject_unit(&mut self.client, &failure, max_message)
                .await
                .map_err(ended);
        }
        if Instant::now() < until {
            self.primary_wait = Some(wait);
            return Ok(());
        }
        let reason = match (&self.proxy.topology.load().primary, failure) {
            (Primary::Unavailable(why), _) => format!("no primary is available: {why}"),
            (Primary::Known(_), Some(failure)) => failure,
            (Primary::Known(_), None) => "no node can serve this statement now".into(),
        };
        info!(%reason, "a unit waited for a primary in vain");
        let failure = Failure {
            code: sqlstate::CANNOT_CONNECT_NOW,
            message: &reason,
        };
        recover::reject_unit(&mut self.client, &failure, max_message)
            .await
            .map_err(ended)
    }

    /// Makes `node` ready for the unit at the front of the client's buffer: a connection with
    /// the client's startup settings, every session setting the session made since, stale
    /// statements closed, and the named statements the unit uses prepared.
    async fn bring(&mut self, node: NodeId) -> Result<(), OpenError> {
        let proxy = self.proxy;
        let need = if is_primary(proxy, node) {
            Need::Primary
        } else {
            Need::Replaceable
        };
        if let Some(lease) = self.held.leases[node].as_mut() {
            if lease.conn.looks_broken() {
                // It died while the session was elsewhere (its node closed it, or restarted).
                debug!(
                    node,
                    "a held connection broke while unused; opening a new one"
                );
                self.held.leases[node] = None;
                proxy.report_server_failure(node);
            }
        }
        if self.held.leases[node].is_none() {
            // A read can go elsewhere: it does not wait long for a node that hangs.
            let lease = if need == Need::Primary {
                open(proxy, node, self.startup, true, need).await?
            } else {
                open_within(proxy, node, self.startup, false, need).await?
            };
            self.steering.fresh_connection(node);
            self.held.leases[node] = Some(lease);
        }
        let result = proxy
            .unless_given_up(
                node,
                need,
                catch_up(
                    node,
                    &self.client,
                    &mut self.held,
                    &mut self.steering,
                    proxy,
                ),
            )
            .await;
        let result = match result {
            Ok(result) => result,
            Err(abandoned) => {
                // Cut off mid-exchange: what the node still owes would confuse the next unit.
                self.held.leases[node] = None;
                self.steering.fresh_connection(node);
                return Err(OpenError::Pool(abandoned));
            }
        };
        if let Err(ServerError::Io { .. } | ServerError::Protocol { .. }) = &result {
            // A broken connection is dropped; the session opens a new one next time.
            self.held.leases[node] = None;
            self.steering.fresh_connection(node);
            proxy.report_server_failure(node);
        }
        result.map_err(|e| OpenError::Pool(PoolError::Connect(e)))
    }
}

/// What the client is told when a session ends while it talks to the client directly.
fn ended(end: RelayEnd) -> SessionError {
    match end {
        RelayEnd::Terminated | RelayEnd::ClientGone => SessionError::Closed,
        RelayEnd::Violation(message) => SessionError::Refused {
            code: sqlstate::PROTOCOL_VIOLATION,
            message,
        },
    }
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
/// is idle: the session is between units). None when it cannot be read; the connection is
/// dropped when the topology gave up on the primary while waiting for the answer.
async fn write_position(held: &mut Held, steering: &mut Steering, proxy: &Proxy) -> Option<u64> {
    let Primary::Known(primary) = proxy.topology.load().primary.clone() else {
        return None;
    };
    let lease = held.leases[primary].as_mut()?;
    let read = lease
        .conn
        .query_text("SELECT pg_current_wal_insert_lsn()::text");
    match proxy.unless_given_up(primary, Need::Primary, read).await {
        Ok(Ok(text)) => text.as_deref().and_then(parse_lsn),
        Ok(Err(error)) => {
            debug!(%error, "could not read the write position");
            None
        }
        Err(error) => {
            // Cut off mid-query: the answer still owed would confuse the next unit.
            info!(%error, "the write position could not be read; connection dropped");
            held.leases[primary] = None;
            if steering.current == primary {
                steering.lost_current();
            } else {
                steering.fresh_connection(primary);
            }
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
    let topology = proxy.topology.snapshot();
    let usable = |node: NodeId| topology.nodes.get(node).is_some_and(|n| n.role.is_usable());
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
        crate::cancel::send_cancel(&target, proxy.config.backend.connect_timeout).await
    {
        debug!(%error, "could not cancel the statement of a client that left");
    }
}
