//! The steady state of a session across nodes: relay on the current node until the next unit
//! goes elsewhere, bring that node up to date (connection, settings, prepared statements), move,
//! and at the end hand every server connection back (see `finish`).

mod primary;

use pgvigil_proto::classify::encoding_is_safe;
use pgvigil_proto::sqlstate;
use pgvigil_proto::TxStatus;
use tracing::{debug, info, warn};

use primary::{is_primary, write_position, PrimaryWait};

use super::aborted::{self, LostTransaction};
use super::finish::{finish, flush_client};
use super::hold;
use super::loss::{self, Aftermath};
use super::open::OpenError;
use super::recover::{self, Failure};
use super::relay::{self, ClientConn, Loss, LossCause, Progress, RelayEnd, Stop};
use super::reset;
use super::server_side::downgrade_fatal;
use super::startup::ClientStartup;
use super::steering::{Decision, Steering};
use super::sync::{self, Held};
use super::views::Views;
use super::{refuse, SessionError};
use crate::cancel::CancelKey;
use crate::config::PoolMode;
use crate::pool::{Lease, PoolError};
use crate::proxy::Proxy;
use crate::server::Carried;
use crate::topology::NodeId;

/// Where a session is between relays. Every change goes through [`Session::enter`].
#[derive(Debug)]
enum Place {
    /// Relaying on its current connection, or routing its next unit when it has none.
    Attached,
    /// The connection was lost inside the client's transaction block, and the client is owed
    /// a failed block: until the client ends it, its units are answered without a server, so
    /// that nothing runs outside the transaction the client believes it is in. (Boxed, like
    /// the wait: both are rare, and inline they would enlarge every idle session.)
    Detached(Box<LostTransaction>),
    /// The unit at the front of the client's buffer waits for a primary.
    WaitingForPrimary(Box<PrimaryWait>),
}

/// What a session goes on with between relays.
pub(super) struct Session<'a> {
    client: ClientConn,
    held: Held,
    steering: Steering,
    progress: Progress,
    /// Where the session is.
    place: Place,
    /// The client's cancel key, unregistered when the session is dropped.
    key: CancelKey,
    startup: ClientStartup,
    proxy: &'a Proxy,
    /// The session's views of `proxy`'s shared state.
    views: Views<'a>,
}

impl<'a> Session<'a> {
    /// A session attached to its first server connection, `lease`.
    ///
    /// Built outside [`serve`] on purpose: an async function keeps room for its arguments and
    /// for every local it moves elsewhere for its whole life, and an idle session is that
    /// future; built here, only the session itself is kept.
    pub(super) fn new(
        client: ClientConn,
        lease: Lease,
        proxy: &'a Proxy,
        key: CancelKey,
        startup: ClientStartup,
    ) -> Session<'a> {
        let first = lease.conn.node;
        let encoding_safe = lease
            .conn
            .params
            .get(b"client_encoding")
            .is_none_or(encoding_is_safe);
        let mut held = Held::new(proxy.config().nodes.len());
        held.leases[first] = Some(lease);
        let mut steering = Steering::new(first, encoding_safe);
        if proxy.config().pool.mode == PoolMode::Transaction {
            steering.replay.set_context(startup.context().clone());
        }
        Session {
            client,
            held,
            steering,
            progress: Progress::default(),
            place: Place::Attached,
            key,
            startup,
            proxy,
            views: Views::new(proxy),
        }
    }
}

/// Relays until the session ends, moving between nodes as units are routed and surviving the
/// loss of server connections, then returns (or drops) every server connection.
///
/// An idle session (no server connection, nothing owed to the client, none of its bytes) waits
/// here for its client's next bytes with nothing but `session` and that read: the future of
/// [`Session::run`] is boxed and dropped while idle, so that an idle client costs its session's
/// state and little more.
pub(super) async fn serve(mut session: Box<Session<'_>>) {
    let ran = loop {
        match Box::pin(session.run()).await {
            Ok(Pause::Idle) => {}
            Ok(Pause::End(end)) => break Ok(end),
            Err(error) => break Err(error),
        }
        if let Err(end) = recover::first_bytes(&mut session.client).await {
            break Ok(end);
        }
    };
    // Boxed too: inline, the end's state would be part of every idle session's task (128
    // bytes more per idle client, the task's size being rounded up to 128 bytes).
    Box::pin(end(session, ran)).await;
}

/// Ends the session: tells the client why when it must, and hands back (or drops) every server
/// connection (see [`finish`]).
async fn end(mut session: Box<Session<'_>>, ran: Result<RelayEnd, SessionError>) {
    let proxy = session.proxy;
    let end = match ran {
        Ok(end) => end,
        Err(error) => {
            info!(%error, "session ended: its next statement cannot be served");
            let client = &mut session.client;
            let _ = flush_client(client).await;
            refuse(&mut client.stream, &error).await;
            RelayEnd::ClientGone
        }
    };
    session.steering.unit_done(proxy, false);
    session.key.set_target(None);
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

/// Why [`Session::run`] returned.
enum Pause {
    /// The session is idle: it waits for the client's next bytes.
    Idle,
    /// The session is over.
    End(RelayEnd),
}

impl Session<'_> {
    /// Moves the session to `next`. A wait for a primary that is left was for a unit now
    /// served or refused; a failed block that is left was ended by the client.
    fn enter(&mut self, next: Place) {
        match (&self.place, &next) {
            (Place::Attached, Place::Attached) => {}
            (Place::WaitingForPrimary(_), Place::WaitingForPrimary(_)) => {}
            (from, to) => debug!(?from, ?to, "session place"),
        }
        self.place = next;
    }

    /// The session's steady state: relay, act on decisions, recover from lost connections; until
    /// the session ends or is idle.
    async fn run(&mut self) -> Result<Pause, SessionError> {
        loop {
            let current = self.steering.current;
            self.held
                .drop_unusable(current, &mut self.steering.replay, self.proxy);
            if let Place::Detached(lost) = &self.place {
                let lost = LostTransaction::clone(lost);
                // Boxed, like the relay: rare, and inline it would enlarge every session.
                let answer =
                    aborted::answer_unit(&mut self.client, lost, &mut self.steering, self.proxy);
                let after = Box::pin(answer).await.map_err(ended)?;
                self.enter(after.map_or(Place::Attached, |lost| Place::Detached(Box::new(lost))));
                continue;
            }
            let stop = match self.held.leases[current].as_mut() {
                // Not boxed, unlike `recover`, `act` and `finish`, whose state is large: the
                // relay's is small, and this future is itself boxed and dropped when the session
                // idles (see `serve`), so a box of its own would only cost an allocation per
                // unit under transaction pooling.
                Some(lease) => {
                    relay::relay(
                        &mut self.client,
                        &mut lease.conn,
                        &mut self.steering,
                        &mut self.progress,
                        (&mut self.views, self.proxy),
                    )
                    .await
                }
                None => {
                    let state = (&mut self.views, self.proxy);
                    recover::next_unit(&mut self.client, &mut self.steering, state).await
                }
            };
            let decision = match stop {
                Stop::End(end) => return Ok(Pause::End(end)),
                Stop::Idle => return Ok(Pause::Idle),
                Stop::Lost(loss) => {
                    Box::pin(self.recover(loss)).await?;
                    continue;
                }
                Stop::Decided(decision) => decision,
                Stop::Release => {
                    // The relay found it idle and releasable just now.
                    self.give_back(self.steering.current);
                    continue;
                }
                Stop::Discard => {
                    self.discard(self.steering.current);
                    continue;
                }
            };
            if flush_client(&mut self.client).await.is_err() {
                return Ok(Pause::End(RelayEnd::ClientGone));
            }
            if let Decision::Move(node) = decision {
                if self.move_at_once(node) {
                    continue;
                }
            }
            // Boxed in a statement of its own: a temporary of the awaiting statement can keep
            // the room of the `act` future in this one's state too (`size_of_val` showed this
            // future, boxed per idle-to-busy turn, at 3,400 bytes rather than 568 when `act`
            // was 3.3 KB).
            let act = Box::pin(self.act(decision));
            act.await?;
        }
    }

    /// The connection to the current node is lost: unless the session held what cannot be
    /// rebuilt elsewhere, the client is answered for what it awaited (ERROR, ReadyForQuery) and
    /// the session goes on, its next unit routed afresh. A transaction block open on the lost
    /// connection stays failed for the client until it ends it (see [`aborted`]).
    ///
    /// Losses that end the session: a backend terminated by an administrator on a node that stays
    /// up (the node's FATAL is relayed, as a direct connection would get it); a loss while a
    /// large server message was passing through (the connection is closed: the client holds
    /// half a message); and with FATAL 08006, a loss during COPY FROM STDIN or while a large
    /// client message was passing through (the client is streaming data and cannot be told to
    /// stop and resend), or of a connection holding what cannot be replayed (see
    /// `Steering::pinned`), which died with it.
    async fn recover(&mut self, loss: Loss) -> Result<(), SessionError> {
        let node = self.steering.current;
        let Some(lease) = self.held.leases[node].take() else {
            return Ok(());
        };
        let name = lease.conn.node_name.clone();
        let server_tx = lease.conn.tx;
        drop(lease);
        if self.progress.from_server.is_open() {
            // The client holds the first part of a message whose rest died with the node:
            // nothing more can be said to it. A backend dying mid-message leaves its client
            // the same way: a connection closed in the middle of a message.
            warn!(node = %name, cause = %loss.cause, "server connection lost while a large message was passing through; the session ends");
            self.proxy.report_server_failure(node);
            return Err(SessionError::Closed);
        }
        warn!(node = %name, cause = %loss.cause, "server connection lost during a session");
        self.proxy.report_server_failure(node);
        // Settings still unanswered died with the connection: they must not count as a
        // setting of unknown outcome when the unit is closed.
        self.steering.replay.settings.lost();
        self.steering.unit_done(self.proxy, false);
        self.key.set_target(None);
        let fatal = loss.fatal.as_ref();
        if loss::terminated_by_admin(fatal, &loss.cause, node, &self.startup, self.proxy).await {
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
        } else if self.progress.from_client.is_open() {
            // Part of a large message went to the lost connection and pgvigil kept no copy.
            Some("while a large message was passing through")
        } else {
            self.steering.replay.pinned()
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
                let lost = LostTransaction::Unannounced(rolled_back);
                self.enter(Place::Detached(Box::new(lost)));
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
        let max_message = self.proxy.config().max_message_size;
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
            self.enter(Place::Detached(Box::new(LostTransaction::Aborted)));
        }
        Ok(())
    }

    /// Carries out a decision the relay could not: moving to a node, fetching the session's
    /// write position, or waiting for a primary.
    async fn act(&mut self, decision: Decision) -> Result<(), SessionError> {
        match decision {
            Decision::Move(node) => {
                if node != self.steering.current {
                    // Transaction pooling holds one connection at a time.
                    self.release(self.steering.current);
                }
                self.move_to(node).await
            }
            Decision::FetchLsn => {
                let borrowed = self.borrow_primary().await;
                // Boxed: its state is the largest of the decisions' (1,064 bytes); inline, it
                // made the future of every decision 1,144 bytes, past the 1,032 that glibc's
                // per-thread cache serves (it is allocated per transaction under transaction
                // pooling, see `run`).
                let position = write_position(&mut self.held, &mut self.steering, self.proxy);
                let lsn = Box::pin(position).await;
                if let Some(primary) = borrowed {
                    self.release(primary);
                }
                if self.held.leases[self.steering.current].is_none() {
                    // Its connection was dropped: no cancel may reach that backend any more.
                    self.key.set_target(None);
                }
                debug!(?lsn, "write position of the session");
                self.steering.set_write_lsn(lsn);
                Ok(())
            }
            Decision::WaitPrimary => self.wait_for_primary(None).await,
            Decision::Deallocate => {
                // A simple Query: on PostgreSQL it drops the unnamed statement.
                self.steering.replay.unnamed_dropped();
                let status = self.held.leases[self.steering.current]
                    .as_ref()
                    .map_or(TxStatus::Idle, |lease| lease.conn.tx);
                let max = self.proxy.config().max_message_size;
                recover::answer_deallocate(&mut self.client, &mut self.steering, status, max)
                    .await
                    .map_err(ended)
            }
            Decision::Reset => {
                // A simple Query or an unnamed Parse: either drops the client's unnamed
                // statement on PostgreSQL.
                self.steering.replay.unnamed_dropped();
                let current = self.steering.current;
                let Some(lease) = self.held.leases[current].as_mut() else {
                    // No connection: the unit is routed again.
                    return Ok(());
                };
                let conn = &mut lease.conn;
                let (steering, startup) = (&mut self.steering, &self.startup);
                let answer = reset::answer(&mut self.client, conn, steering, startup, self.proxy);
                match Box::pin(answer).await {
                    Ok(()) => Ok(()),
                    Err(reset::Failed::Client(end)) => Err(ended(end)),
                    Err(reset::Failed::Server(cause)) => {
                        // The unit is still the client's next: it is served again elsewhere.
                        Box::pin(self.recover(Loss { cause, fatal: None })).await
                    }
                }
            }
            Decision::Hold => hold::hold(&mut self.client, &self.key, self.proxy)
                .await
                .map_err(ended),
            Decision::Forward | Decision::Wait => Ok(()),
        }
    }

    /// [`Session::act`] on a move when no wait is needed (see [`sync::sync_at_once`]): the usual
    /// case under transaction pooling, carried out without the future of `act`, which is
    /// allocated. Whether the session moved; when it did not, `act` does the rest.
    fn move_at_once(&mut self, node: NodeId) -> bool {
        if node != self.steering.current {
            // Transaction pooling holds one connection at a time.
            self.release(self.steering.current);
        }
        // The decision to move was made on the unit at the start of the buffer just now.
        let facts = *self.steering.unit();
        let (held, replay) = (&mut self.held, &mut self.steering.replay);
        let unit = (&self.client.rbuf[..], &facts);
        let state = (&mut self.views, self.proxy);
        if !sync::sync_at_once(node, held, replay, unit, &self.startup, state) {
            return false;
        }
        self.moved(node);
        true
    }

    /// Makes `node`, brought up to date, the session's current node.
    fn moved(&mut self, node: NodeId) {
        self.steering.moved_to(node);
        self.enter(Place::Attached);
        if let Some(lease) = &self.held.leases[node] {
            self.key.set_target(Some(lease.conn.cancel_target()));
        }
    }

    /// Brings `node` up to date and makes it current; when it cannot be, waits for a primary,
    /// routes afresh or reads elsewhere.
    async fn move_to(&mut self, node: NodeId) -> Result<(), SessionError> {
        match self.bring(node).await {
            Ok(()) => {
                self.moved(node);
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
        }
    }

    /// Transaction pooling: gives the connection to `node` back to its pool without a reset
    /// (the next session to take it resets and syncs it, see `adopt`); after the current one,
    /// the next unit is routed afresh. Kept when it is not idle, its node is no longer usable,
    /// or the session is pinned.
    fn release(&mut self, node: NodeId) {
        let idle = (self.held.leases[node].as_ref())
            .is_some_and(|lease| lease.conn.tx == TxStatus::Idle && lease.conn.rbuf.is_empty());
        let shared = self.views.config().pool.mode == PoolMode::Transaction;
        if idle && relay::releasable(shared, &self.steering) {
            self.give_back(node);
        }
    }

    /// [`Session::release`] once the connection to `node` is known to be idle and the session
    /// to let it go (the relay's `Stop::Release` says so): given back unless its node is no
    /// longer usable.
    fn give_back(&mut self, node: NodeId) {
        let Some(mut lease) = self.held.leases[node].take() else {
            return;
        };
        let usable = self
            .views
            .topology()
            .nodes
            .get(node)
            .is_some_and(|n| n.role.takes_new_work());
        if !usable {
            self.held.leases[node] = Some(lease);
            return;
        }
        // The next unit of this session that takes it back gives it only what it lacks; one of
        // another session with the same context takes it as it is if its own log begins with
        // what this session ran here.
        let settings = &mut self.steering.replay.settings;
        lease.conn.carries = Carried::Session {
            session: self.startup.session,
            context: self.startup.context().clone(),
            settings: settings.applied(node),
            ran: settings.ran_on(node),
        };
        // Before the checkin: from then on the backend may serve another session, which this
        // client's cancel requests must not reach.
        self.let_go(node);
        self.proxy.pools.checkin(lease);
    }

    /// Closes the connection to `node` (see [`Stop::Discard`]); the next unit is routed afresh.
    fn discard(&mut self, node: NodeId) {
        if self.held.leases[node].take().is_some() {
            self.let_go(node);
        }
    }

    /// The session no longer has its connection to `node`.
    fn let_go(&mut self, node: NodeId) {
        if node == self.steering.current {
            self.key.set_target(None);
            self.steering.released();
            // Its buffers go once what the client is owed is written (see `next_unit`).
            self.client.release_buffers();
        } else {
            self.steering.replay.fresh_connection(node);
        }
    }

    /// Makes `node` ready for the unit at the front of the client's buffer (see
    /// [`sync::sync`]). Without a connection there yet, the client shows as waiting (SHOW
    /// CLIENTS, SHOW POOLS, metrics) until it has one, as in PgBouncer's `cl_waiting`.
    async fn bring(&mut self, node: NodeId) -> Result<(), OpenError> {
        let _waiting = (self.held.leases.get(node))
            .is_none_or(Option::is_none)
            .then(|| hold::Waiting::set(&self.key));
        let input = &self.client.rbuf;
        sync::sync(
            node,
            &mut self.held,
            &mut self.steering.replay,
            input,
            &self.startup,
            self.proxy,
        )
        .await
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
