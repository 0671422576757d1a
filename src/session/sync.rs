//! Bringing a server connection up to date for a session: whatever node it is on and whether it
//! was just opened, [`sync`] gives it what the session's [`Replayable`] record says it lacks
//! (the client's startup settings on a new connection, every session setting that took effect
//! since, stale statements closed, the named statements the next unit uses prepared). Node
//! moves and session survival are both "take a connection, sync it, go on".

use std::pin::pin;

use bytes::{BufMut, BytesMut};
use pgvigil_proto::encode;
use pgvigil_proto::TxStatus;
use tracing::debug;

use super::naming;
use super::open::{self, open, open_within, OpenError};
use super::replay::Replayable;
use super::startup::ClientStartup;
use super::unit::{self, UnitFacts};
use super::views::Views;
use crate::config::PoolMode;
use crate::pool::{Lease, PoolError};
use crate::proxy::Proxy;
use crate::server::{Carried, ServerConn, ServerError};
use crate::statements::{self, ServerStatements, StatementId, NO_STATEMENT};
use crate::topology::{Need, NodeId, Primary};

/// The server connections a session holds, at most one per node.
pub struct Held {
    /// The connection to node `n`, at `n` (a lease is 24 bytes: the boxed connection and its
    /// slot, so that taking and giving one back allocates nothing). A boxed slice: it grows only
    /// when a reload adds nodes.
    pub leases: Box<[Option<Lease>]>,
}

impl Held {
    /// No connection yet, for a session over `node_count` nodes.
    pub fn new(node_count: usize) -> Held {
        Held {
            leases: (0..node_count).map(|_| None).collect(),
        }
    }

    /// Makes room for nodes a reload added, up to `node_count` (no connection to them yet).
    fn cover(&mut self, node_count: usize) {
        if self.leases.len() < node_count {
            let mut leases = std::mem::take(&mut self.leases).into_vec();
            leases.resize_with(node_count, || None);
            self.leases = leases.into_boxed_slice();
        }
    }

    /// Drops (never pools) the connections to nodes other than `current` that the topology no
    /// longer gives new work (down, fenced, being removed by a reload); what the session had
    /// there is forgotten. Makes room for nodes a reload added when it holds any such
    /// connection.
    pub fn drop_unusable(&mut self, current: NodeId, replay: &mut Replayable, proxy: &Proxy) {
        let others = (self.leases.iter().enumerate()).any(|(n, l)| n != current && l.is_some());
        if !others {
            // Nothing to drop (the usual case under transaction pooling: at most the current
            // connection is held), and no topology to read; `sync` makes room for a node it
            // brings.
            return;
        }
        let topology = proxy.topology.load();
        self.cover(topology.nodes.len());
        for (node, lease) in self.leases.iter_mut().enumerate() {
            let usable = topology
                .nodes
                .get(node)
                .is_some_and(|n| n.role.takes_new_work());
            if node != current && !usable && lease.take().is_some() {
                debug!(
                    node,
                    "connection to a node that is no longer usable dropped"
                );
                replay.fresh_connection(node);
            }
        }
    }

    /// Drops the connection to `node`: what it had is forgotten.
    fn forget(&mut self, node: NodeId, replay: &mut Replayable) {
        self.leases[node] = None;
        replay.fresh_connection(node);
    }
}

/// Makes the session's connection to `node` ready for the unit at the start of `input`: opens
/// one (with the client's startup settings) if the session has none there or the one it has
/// broke while unused, then runs what it missed (see [`catch_up`]). A connection cut off or
/// broken on the way is dropped and the error returned; the caller routes again.
pub async fn sync(
    node: NodeId,
    held: &mut Held,
    replay: &mut Replayable,
    input: &[u8],
    startup: &ClientStartup,
    proxy: &Proxy,
) -> Result<(), OpenError> {
    // A node a reload added after the session began has no slot yet.
    held.cover(node + 1);
    // One read of the configuration for the whole sync (each read costs an atomic dance), and
    // not held across its waits.
    let (shared, bound, max) = {
        let config = proxy.config();
        let shared = config.pool.mode == PoolMode::Transaction;
        (
            shared,
            config.pool.max_prepared_statements,
            config.max_message_size,
        )
    };
    let need = if proxy.topology.load().primary == Primary::Known(node) {
        Need::Primary
    } else {
        Need::Replaceable
    };
    if held.leases[node]
        .as_mut()
        .is_some_and(|lease| lease.conn.looks_broken())
    {
        // It died while the session was elsewhere (its node closed it, or restarted).
        debug!(
            node,
            "a held connection broke while unused; opening a new one"
        );
        held.leases[node] = None;
        proxy.report_server_failure(node);
    }
    if held.leases[node].is_none() {
        // A read can go elsewhere: it does not wait long for a node that hangs. Under
        // transaction pooling a session holds no other connection: it waits for a slot.
        let lease = if need == Need::Primary || shared {
            open(
                proxy,
                node,
                startup,
                Some(&replay.settings),
                input,
                true,
                need,
            )
            .await?
        } else {
            open_within(
                proxy,
                node,
                startup,
                Some(&replay.settings),
                input,
                false,
                need,
            )
            .await?
        };
        attach(lease, held, replay, shared);
    }
    let Some(lease) = held.leases[node].as_mut() else {
        return Ok(());
    };
    let reuses_unnamed = || unit::reuses_unnamed(input, max);
    if in_sync(
        &lease.conn,
        replay,
        input,
        reuses_unnamed,
        (shared, bound, max),
    ) {
        // No round trip, so no wait to bound either.
        return Ok(());
    }
    // Boxed, like `open`'s setup: the rarer way, with a large state that would otherwise
    // enlarge the future of every move under transaction pooling.
    let catching_up = Box::pin(async {
        let catching_up = pin!(catch_up(&mut lease.conn, replay, input, proxy));
        proxy.unless_given_up(node, need, catching_up).await
    });
    let result = catching_up.await;
    let result = match result {
        Ok(result) => result,
        Err(abandoned) => {
            // Cut off mid-exchange: what the node still owes would confuse the next unit.
            held.forget(node, replay);
            return Err(OpenError::Pool(abandoned));
        }
    };
    if let Err(ServerError::Io { .. } | ServerError::Protocol { .. }) = &result {
        // A broken connection is dropped; the session opens a new one next time.
        held.forget(node, replay);
        proxy.report_server_failure(node);
    }
    result.map_err(|e| OpenError::Pool(PoolError::Connect(e)))
}

/// [`sync`] when it needs no wait, as under transaction pooling when the unit's node has an idle
/// connection that is the session's as it is: whether `node` is ready for the unit at the start
/// of `input`, whose facts the steering found just now (`unit`: what it says of the unnamed
/// statement spares reading the unit again). When it is not, [`sync`] does the rest (the
/// connection taken, if one was, is held already). `views`: the session's views of the shared
/// state.
pub fn sync_at_once(
    node: NodeId,
    held: &mut Held,
    replay: &mut Replayable,
    (input, unit): (&[u8], &UnitFacts),
    startup: &ClientStartup,
    (views, proxy): (&mut Views<'_>, &Proxy),
) -> bool {
    held.cover(node + 1);
    if held.leases[node].is_some() {
        return false;
    }
    let now = views.now();
    let config = now.config;
    let limits = (
        config.pool.mode == PoolMode::Transaction,
        config.pool.max_prepared_statements,
        config.max_message_size,
    );
    let need = if now.topology.primary == Primary::Known(node) {
        Need::Primary
    } else {
        Need::Replaceable
    };
    if now.topology.gives_up_on(node, need).is_some() {
        return false;
    }
    let log = Some(&replay.settings);
    let Some(lease) = open::reuse_as_is(proxy, node, startup, log, unit.drops_unnamed) else {
        return false;
    };
    attach(lease, held, replay, limits.0);
    let reuses_unnamed = || unit.reuses_unnamed;
    held.leases[node]
        .as_ref()
        .is_some_and(|lease| in_sync(&lease.conn, replay, input, reuses_unnamed, limits))
}

/// Makes `lease`, just opened or taken from the pool, the session's connection to its node.
/// `shared`: the session is under transaction pooling.
fn attach(lease: Lease, held: &mut Held, replay: &mut Replayable, shared: bool) {
    let node = lease.conn.node;
    replay.fresh_connection(node);
    if let Carried::Session { settings, .. } = lease.conn.carries {
        // Transaction pooling: the session may have had this connection before (`adopt`
        // kept what it carries only then), so it lacks only the settings logged since.
        replay.settings.resume(node, settings);
    }
    if shared {
        // A pooled connection may have the session's statements already.
        replay.adopt(node, &lease.conn.statements);
    }
    held.leases[node] = Some(lease);
}

/// Whether `conn` owes the unit at the start of `input` nothing (see [`catch_up`]).
/// `reuses_unnamed`: whether the unit uses an unnamed statement it does not parse (see
/// [`unnamed_owed`]); `(shared, bound, max)`: transaction pooling,
/// `pool.max_prepared_statements`, `max_message_size`.
fn in_sync(
    conn: &ServerConn,
    replay: &Replayable,
    input: &[u8],
    reuses_unnamed: impl FnOnce() -> bool,
    (shared, bound, max): (bool, usize, usize),
) -> bool {
    let unnamed = shared && unnamed_owed(&conn.statements, replay, reuses_unnamed).is_some();
    replay.nothing_owed(conn.node, input, max)
        && (!shared || conn.statements.within(bound))
        && !unnamed
}

/// Runs on `conn` what it missed: closes of statements replaced or closed elsewhere, the
/// settings log from where it stands, and the named statements the unit at the start of `input`
/// uses. A statement the node rejects is logged and skipped: the node would reject it for the
/// client too, and the client's own statement will say so.
///
/// Under transaction pooling the statements go by their names on the nodes, and the
/// connection keeps at most `pool.max_prepared_statements`: the least recently used ones the
/// unit does not need are closed first.
async fn catch_up(
    conn: &mut ServerConn,
    replay: &mut Replayable,
    input: &[u8],
    proxy: &Proxy,
) -> Result<(), ServerError> {
    let node = conn.node;
    let (settings, closes) = replay.catch_up(node);
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
    let mut discarded = false;
    for sql in settings {
        discarded |= sql
            .trim_ascii_start()
            .get(..7)
            .is_some_and(|w| w.eq_ignore_ascii_case(b"discard"));
        encode::query(&mut out, sql);
        skip_rejection(conn.exchange(&mut out).await)?;
        // A simple Query drops the unnamed statement there (see `unnamed_owed`).
        conn.statements.set_unnamed(false);
    }
    replay.caught_up(node);
    let max = proxy.config().max_message_size;
    let missing = replay.missing_statements(input, node, max);
    let shared = proxy.config().pool.mode == PoolMode::Transaction;
    if shared {
        if discarded {
            // A replayed DISCARD ALL dropped every statement there, other sessions' too.
            conn.statements.clear();
        }
        let keep = proxy
            .config()
            .pool
            .max_prepared_statements
            .saturating_sub(missing.len());
        let excess = conn
            .statements
            .take_excess(keep, &replay.referenced(input, max));
        close_excess(conn, &excess).await?;
        replay.adopt(node, &conn.statements);
    }
    for (parse, id) in missing {
        match naming::statement_name(b'P', &parse).filter(|_| id != NO_STATEMENT) {
            Some((at, len)) => naming::rename(&parse, at, len, id, &mut out),
            None => out.extend_from_slice(&parse),
        }
        encode::sync(&mut out);
        // A node that refuses it (a failed transaction block refuses everything) does not have
        // it: the next unit that needs it there prepares it again.
        if accepted(conn.exchange(&mut out).await)? {
            if id != NO_STATEMENT {
                conn.statements.touch(id);
            }
            replay.statement_on(&parse, node);
        } else if conn.tx == TxStatus::Failed {
            // The unit's Bind will find no statement (26000) where PostgreSQL, which has it,
            // refuses it for the failed block (25P02): the client is told the latter.
            replay.naming.missing_in_failed_block();
        }
    }
    if shared {
        replay.adopt(node, &conn.statements);
        let reuses_unnamed = || unit::reuses_unnamed(input, max);
        if let Some(owed) = unnamed_owed(&conn.statements, replay, reuses_unnamed) {
            give_unnamed(conn, owed).await?;
        }
    }
    Ok(())
}

/// What a connection must be given before the unit at the start of `input` binds the session's
/// unnamed statement there (transaction pooling).
enum UnnamedOwed {
    /// The session's unnamed statement, as its Parse message, known as this id once there.
    Prepare(Box<[u8]>, StatementId),
    /// No unnamed statement: the session has none (PostgreSQL answers 26000), but the connection
    /// may have another one, or an older one of the session's.
    Close,
}

/// Whether the unit binds or describes the unnamed statement without parsing it first
/// (`reuses_unnamed` says, asked only when it matters) on a connection (whose statements are
/// `statements`) that lacks the session's: it is prepared there first, or, when the session
/// has none, the connection's own is dropped, so that the unit finds what it would on
/// PostgreSQL.
fn unnamed_owed(
    statements: &ServerStatements,
    replay: &Replayable,
    reuses_unnamed: impl FnOnce() -> bool,
) -> Option<UnnamedOwed> {
    let own = replay.own_unnamed();
    if own.is_none() && !statements.has_unnamed() {
        return None;
    }
    if own.is_some_and(|o| o.id == statements.unnamed_of()) || !reuses_unnamed() {
        return None;
    }
    match own.and_then(|o| o.parse().map(|parse| (Box::from(parse), o.id))) {
        Some((parse, id)) => Some(UnnamedOwed::Prepare(parse, id)),
        // One too long to keep stays on the connection the session keeps; only when that was
        // lost does the unit find none (as after a lost connection in session pooling).
        None => statements.has_unnamed().then_some(UnnamedOwed::Close),
    }
}

/// Gives `conn` the session's unnamed statement, or drops the one it has (see
/// [`unnamed_owed`]).
async fn give_unnamed(conn: &mut ServerConn, owed: UnnamedOwed) -> Result<(), ServerError> {
    let mut out = BytesMut::new();
    match owed {
        UnnamedOwed::Prepare(parse, id) => {
            debug!(node = %conn.node_name, "preparing the session's unnamed statement");
            out.extend_from_slice(&parse);
            encode::sync(&mut out);
            if accepted(conn.exchange(&mut out).await)? {
                conn.statements.set_unnamed_of(id);
            } else {
                // The node refused it (an object it names is gone): the Bind's own error will
                // say so, as it would on PostgreSQL, where the statement fails when run.
                conn.statements.set_unnamed(false);
            }
        }
        UnnamedOwed::Close => {
            encode::message(&mut out, b'C', |b| {
                b.put_u8(b'S');
                b.put_u8(0);
            });
            encode::sync(&mut out);
            skip_rejection(conn.exchange(&mut out).await)?;
            conn.statements.set_unnamed(false);
        }
    }
    Ok(())
}

/// Closes statements `ids` on `conn` (the least recently used past the bound, or ones whose
/// presence is in doubt); closing one it does not have is no error.
async fn close_excess(conn: &mut ServerConn, ids: &[StatementId]) -> Result<(), ServerError> {
    if ids.is_empty() {
        return Ok(());
    }
    debug!(count = ids.len(), node = %conn.node_name, "closing prepared statements past the bound");
    let mut out = BytesMut::new();
    for &id in ids {
        encode::message(&mut out, b'C', |b| {
            b.put_u8(b'S');
            statements::put_name(b, id);
            b.put_u8(0);
        });
    }
    encode::sync(&mut out);
    skip_rejection(conn.exchange(&mut out).await)
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
