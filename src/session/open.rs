//! Opening a session's server connection on a node: a checkout bounded by what the topology
//! allows, then making the connection the session's (resetting what another session left on it,
//! applying the client's startup parameters), or taking it as it is when it already carries
//! that.

use std::pin::pin;

use pgvigil_proto::backend::ErrorFields;

use super::client_scan;
use super::settings::Settings;
use super::startup::{ClientStartup, Context};
use super::startup_sql::set_commands;
use super::{pool_refusal, SessionError};
use crate::pool::{Lease, PoolError, Slot, Turn};
use crate::proxy::Proxy;
use crate::server::{Carried, ServerConn, ServerError};
use crate::topology::{Need, NodeId};

/// Opens the first connection of a session on `node`. While another usable node is left to try,
/// the attempt is bounded by `health.timeout`: a node that hangs (frozen, or cut off without a
/// reset) must not hold the client for `backend.connect_timeout` before pgvigil's probes notice.
/// The last candidate gets the full `backend.connect_timeout`. Either way the attempt ends as
/// soon as the topology gives up on the node (see [`Need`]).
pub(super) async fn open_for_start(
    proxy: &Proxy,
    node: NodeId,
    startup: &ClientStartup,
    tried: u64,
) -> Result<Lease, OpenError> {
    let others = proxy
        .topology
        .load()
        .nodes
        .iter()
        .any(|n| n.id != node && n.role.takes_new_work() && tried & (1 << n.id) == 0);
    if others {
        open_within(proxy, node, startup, None, &[], true, Need::Replaceable).await
    } else {
        open(proxy, node, startup, None, &[], true, Need::Usable).await
    }
}

/// [`open`] bounded by `health.timeout` (a connect or login timeout when it runs out), for
/// connections the session can do without: another node can take the work.
pub(super) async fn open_within(
    proxy: &Proxy,
    node: NodeId,
    startup: &ClientStartup,
    log: Option<&Settings>,
    unit: &[u8],
    wait: bool,
    need: Need,
) -> Result<Lease, OpenError> {
    let bound = proxy.config().health.timeout;
    if bound >= proxy.config().backend.connect_timeout {
        return open(proxy, node, startup, log, unit, wait, need).await;
    }
    match tokio::time::timeout(bound, open(proxy, node, startup, log, unit, wait, need)).await {
        Ok(result) => result,
        Err(_) => Err(OpenError::Pool(PoolError::Connect(ServerError::Timeout {
            node: proxy.config().nodes[node].name.clone(),
            after: bound,
        }))),
    }
}

/// Why a session's connection to a node could not be opened and set up.
#[derive(Debug, thiserror::Error)]
pub(super) enum OpenError {
    /// The checkout, or running the client's settings on the new connection, failed.
    #[error(transparent)]
    Pool(#[from] PoolError),
    /// The client's startup parameters cannot be turned into settings.
    #[error(transparent)]
    Params(SessionError),
}

impl OpenError {
    /// Whether the node could not be reached or is not accepting connections now (another node,
    /// or the same one later, may do); refusals of the client itself are not.
    pub(super) fn unreachable(&self) -> bool {
        match self {
            OpenError::Pool(PoolError::Connect(error)) => match error {
                ServerError::Connect { .. }
                | ServerError::Timeout { .. }
                | ServerError::Io { .. } => true,
                // Class 57 (operator intervention): shutting down, starting up, in recovery.
                ServerError::Rejected { frame, .. } => frame
                    .get(5..)
                    .and_then(|body| ErrorFields::parse(body).ok())
                    .and_then(|fields| fields.sqlstate())
                    .is_some_and(|code| code.starts_with(b"57")),
                ServerError::Tls { .. } | ServerError::Protocol { .. } => false,
            },
            OpenError::Pool(PoolError::Abandoned { .. }) => true,
            OpenError::Pool(PoolError::Exhausted { .. }) | OpenError::Params(_) => false,
        }
    }

    /// What the client is told when the session cannot go on because of it.
    pub(super) fn into_session_error(self) -> SessionError {
        match self {
            OpenError::Pool(error) => pool_refusal(error),
            OpenError::Params(error) => error,
        }
    }
}

/// Opens the session's connection to `node`: a checkout (waiting for a slot when `wait`, else
/// failing at once), then the client's startup parameters, all abandoned once the topology
/// gives up on `node` for `need`. A connection whose setup failed is released (and dropped
/// unless the reset proves it sound). `log`: the session's settings log (none when it starts);
/// `unit`: the unit it is opened for, at the start of the client's buffer (empty when none is
/// known).
pub(super) async fn open(
    proxy: &Proxy,
    node: NodeId,
    startup: &ClientStartup,
    log: Option<&Settings>,
    unit: &[u8],
    wait: bool,
    need: Need,
) -> Result<Lease, OpenError> {
    // The usual case under transaction pooling: an idle connection that is the session's as it
    // is. Nothing is waited for then, so the one look at the topology `unless_given_up` would
    // take first is all it needs (its watch and its select cost ~200 instructions per
    // transaction, callgrind).
    proxy.given_up(node, need)?;
    let max_message = proxy.config().max_message_size;
    let drops_unnamed = || client_scan::drops_unnamed(unit, max_message);
    let (user, database) = (startup.user(), startup.database());
    let target = || proxy.login_target(node, user, database, startup.password());
    let turn = match proxy.pools.reuse(node, database, user) {
        Some(lease) => Some(Turn::Lease(lease)),
        // The usual case when clients outnumber server connections: a wait in line, boxed apart
        // from the setup below, whose state is much larger (a login, a reset) and whose
        // allocation cost ~1,000 instructions per waiting transaction (callgrind).
        None if wait => {
            let wait = Box::pin(async {
                let turn = pin!(proxy.pools.wait_turn(node, database, user, &target));
                proxy.unless_given_up(node, need, turn).await
            });
            Some(wait.await??)
        }
        None => None,
    };
    let source = match turn {
        Some(Turn::Lease(mut lease)) => {
            match adoption(&mut lease.conn, startup, log, drops_unnamed) {
                Adoption::AsIs(settings) => {
                    carry(&mut lease, startup, settings);
                    return Ok(lease);
                }
                adoption => Source::Leased(lease, adoption),
            }
        }
        Some(Turn::Slot(slot)) => Source::Slot(slot),
        None => Source::NoWait,
    };
    // Boxed: the rarer way, whose state (a login, a reset) is large; inline, it would enlarge
    // the future of every move under transaction pooling (allocated per transaction, see
    // `Session::run`).
    let setup = Box::pin(async {
        let setup = pin!(async {
            let (mut lease, adoption) = match source {
                Source::Leased(lease, adoption) => (lease, adoption),
                Source::Slot(slot) => {
                    let mut lease = proxy.pools.open_in(slot, &target()).await?;
                    let adoption = adoption(&mut lease.conn, startup, log, drops_unnamed);
                    (lease, adoption)
                }
                Source::NoWait => {
                    let lease = proxy.pools.try_checkout(node, database, user, target);
                    let mut lease = lease.await?;
                    let adoption = adoption(&mut lease.conn, startup, log, drops_unnamed);
                    (lease, adoption)
                }
            };
            if let Err(error) = adopt(&mut lease, startup, adoption).await {
                proxy.release(lease, true).await;
                return Err(error);
            }
            Ok(lease)
        });
        proxy.unless_given_up(node, need, setup).await
    });
    setup.await?
}

/// [`open`]'s usual case, without waiting: an idle connection that is the session's as it is
/// (see [`adoption`]), taken only then; `None` when there is none (`open` does the rest). The
/// caller has seen that the topology does not give up on `node`; `drops_unnamed`: the unit's
/// first message drops the connection's unnamed statement (`UnitFacts::drops_unnamed`).
pub(super) fn reuse_as_is(
    proxy: &Proxy,
    node: NodeId,
    startup: &ClientStartup,
    log: Option<&Settings>,
    drops_unnamed: bool,
) -> Option<Lease> {
    let (database, user) = Context(startup.context()).names();
    let fits = |conn: &ServerConn| as_is(conn, startup, log, || drops_unnamed);
    let (mut lease, settings) = proxy.pools.reuse_if(node, database, user, fits)?;
    lend(&mut lease.conn, startup);
    carry(&mut lease, startup, settings);
    Some(lease)
}

/// Where [`open`]'s connection comes from when it is not taken as it is.
enum Source {
    /// A connection from the pool that needs setting up.
    Leased(Lease, Adoption),
    /// A slot to open a new connection in.
    Slot(Slot),
    /// Neither yet, and no waiting: an idle connection or a free slot now, or an error.
    NoWait,
}

/// What a checked-out connection needs before it is the session's (see [`adoption`]).
enum Adoption {
    /// Nothing: it is taken as it is, having run this many statements of the session's
    /// settings log.
    AsIs(usize),
    /// Another session's settings reset, then the client's startup parameters.
    Reset,
    /// The client's startup parameters (it carries no session's state).
    Params,
}

/// What a checked-out connection needs to become the session's: another session's settings it
/// carries reset (transaction pooling returns connections without a reset), then the client's
/// startup parameters (see [`adopt`]). Its statements are marked lent when it was another
/// session's.
///
/// A connection that carries this session's state already keeps it (and `sync` gives it only
/// the settings it lacks). One that carries only the startup parameters of a session with the
/// same context, or those and settings that the session's own log (`log`) begins with, is
/// already what they would make it, and is taken as it is (no round trip; `sync` runs the rest
/// of the log) unless it may have an unnamed statement that the unit could use before
/// replacing it. `log`: the session's settings log, none when it starts; `drops_unnamed`:
/// whether the unit's first message drops that statement (see `client_scan::drops_unnamed`),
/// asked only when it matters.
fn adoption(
    conn: &mut ServerConn,
    startup: &ClientStartup,
    log: Option<&Settings>,
    drops_unnamed: impl FnOnce() -> bool,
) -> Adoption {
    let as_is = as_is(conn, startup, log, drops_unnamed);
    lend(conn, startup);
    match (as_is, &conn.carries) {
        (Some(settings), _) => Adoption::AsIs(settings),
        (None, Carried::Session { .. }) => Adoption::Reset,
        (None, Carried::Nothing) => Adoption::Params,
    }
}

/// How many statements of the session's settings log `conn` has run, when [`adoption`] takes it
/// as it is.
fn as_is(
    conn: &ServerConn,
    startup: &ClientStartup,
    log: Option<&Settings>,
    drops_unnamed: impl FnOnce() -> bool,
) -> Option<usize> {
    // A simple Query (the reset) drops the unnamed statement; without one, another session's
    // must not be left for the unit to use.
    let unnamed_safe = owned(conn, startup) || !conn.statements.has_unnamed() || drops_unnamed();
    reusable(&conn.carries, startup, log).filter(|_| unnamed_safe)
}

/// Whether `conn` carries this session's own state.
fn owned(conn: &ServerConn, startup: &ClientStartup) -> bool {
    matches!(&conn.carries, Carried::Session { session, .. } if *session == startup.session)
}

/// Marks the statements of a connection that was another session's as lent (see
/// `sync::unnamed_owed`: the session's own unnamed statement is prepared again where the
/// connection may have lost it).
fn lend(conn: &mut ServerConn, startup: &ClientStartup) {
    if !owned(conn, startup) {
        conn.statements.lent();
    }
}

/// Makes a checked-out connection the session's as [`adoption`] found it must.
/// `SET SESSION AUTHORIZATION DEFAULT` comes first in a reset because `RESET ALL` leaves the
/// role alone; the simple Query also drops the unnamed statement and portal, so no unit can
/// bind another session's.
async fn adopt(
    lease: &mut Lease,
    startup: &ClientStartup,
    adoption: Adoption,
) -> Result<(), OpenError> {
    let settings = match adoption {
        Adoption::AsIs(settings) => settings,
        Adoption::Reset => {
            (lease.conn)
                .run_internal("SET SESSION AUTHORIZATION DEFAULT; RESET ALL")
                .await
                .map_err(|e| OpenError::Pool(PoolError::Connect(e)))?;
            apply_params(lease, startup).await?;
            0
        }
        Adoption::Params => {
            apply_params(lease, startup).await?;
            0
        }
    };
    carry(lease, startup, settings);
    Ok(())
}

/// Marks the connection as carrying the session's state, `settings` statements of its log run.
fn carry(lease: &mut Lease, startup: &ClientStartup, settings: usize) {
    lease.conn.carries = Carried::Session {
        session: startup.session,
        context: startup.context().clone(),
        settings,
        ran: None,
    };
}

/// How many statements of the session's settings log (counted as `Settings::applied` counts
/// them) a pooled connection has run already, if what it carries is a state the session passes
/// through: the session's own earlier state, or the startup parameters of a session with the
/// same context followed by statements the session's log (`log`) begins with.
fn reusable(carries: &Carried, startup: &ClientStartup, log: Option<&Settings>) -> Option<usize> {
    match carries {
        Carried::Session {
            session, settings, ..
        } if *session == startup.session => Some(*settings),
        Carried::Session {
            context,
            settings,
            ran,
            ..
        } if **context == **startup.context() => match (settings, ran) {
            (0, _) => Some(0),
            (_, Some(ran)) => log?.continues(ran),
            (_, None) => None,
        },
        Carried::Session { .. } | Carried::Nothing => None,
    }
}

/// Sends the client's startup parameters to the server as SET commands, skipping those the server
/// already reports with the same value.
async fn apply_params(lease: &mut Lease, startup: &ClientStartup) -> Result<(), OpenError> {
    let commands = set_commands(startup.params(), |name| lease.conn.params.get(name));
    let sql = match commands.map_err(OpenError::Params)? {
        Some(sql) => sql,
        None => return Ok(()),
    };
    lease
        .conn
        .run_internal(&sql)
        .await
        .map_err(|e| OpenError::Pool(PoolError::Connect(e)))
}
