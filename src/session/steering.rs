//! The routing memory of one session: which node each unit of work goes to, and what every node
//! the session uses must know first (session settings, prepared statements).
//!
//! A unit inside a transaction stays on the transaction's node, and a unit that names no statement
//! (a lone Sync or Close) stays where the session is; every other unit is routed by the pure
//! `route::route_unit`: a session pinned (temporary table, SQL PREPARE, advisory lock, LISTEN, or
//! anything else pgvigil cannot replay: see `classify::Pin`) or a `/* pgvigil:primary */` hint
//! goes to the primary; a unit that reuses the unnamed statement goes where it was parsed; a
//! provably read-only unit (or one hinted `/* pgvigil:replica */`), and a read-only transaction,
//! is spread over the nodes that may take reads (after a write, only those that replayed it: read
//! your writes); everything else goes to the primary. What the session's connections must be
//! given before they serve it is kept in `replay::Replayable`.

use std::time::Instant;

use pgvigil_proto::classify::{Hint, Pin};
use pgvigil_proto::frontend::{self, Parse};
use tracing::debug;

use super::naming::{self, OnServer, Outgoing, SqlDrop};
use super::replay::Replayable;
use super::reset;
use super::route::{self, Routed, SessionPolicy, Snapshot, Writes};
use super::unit::{self, Ending, UnitFacts};
use super::views::{Now, Views};
use crate::balance::ReadHome;
use crate::config::{Config, PoolMode, ReadAffinity};
use crate::metrics::{Bytes, UnitKind};
use crate::pause::{InFlight, Traffic};
use crate::proxy::Proxy;
use crate::router::{self, Route, RouteReason};
use crate::topology::NodeId;

mod noting;

/// What to do with the unit at the front of the client's buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Send it to the current node now.
    Forward,
    /// Its end has not arrived yet; read more first.
    Wait,
    /// It goes to this node, which must be made current (and brought up to date) first.
    Move(NodeId),
    /// It is a read after a write: the primary's WAL position must be fetched first.
    FetchLsn,
    /// It must go to the primary and there is none right now.
    WaitPrimary,
    /// It is a resetting statement that pgvigil runs on the current connection itself, once
    /// the server has answered everything before it (see `reset`).
    Reset,
    /// Transaction pooling: it is a SQL `DEALLOCATE` of the session's own named statements,
    /// answered by pgvigil once the server has answered everything before it (the statements
    /// on the nodes are shared with other sessions and stay).
    Deallocate,
    /// pgvigil is paused: it begins no transaction until RESUME.
    Hold,
}

/// Routing state of one session.
pub struct Steering {
    /// The node the session's work goes to now.
    pub current: NodeId,
    /// The unit running (counted by the balancer), with when it began and what it is, for
    /// the metrics.
    running: Option<(Instant, UnitKind)>,
    /// The next unit goes to `current` without a new decision (it was decided before a move).
    forced: bool,
    /// The facts of the unit being forwarded, and how many of its bytes they cover.
    unit: UnitFacts,
    covered: usize,
    /// What a lost connection needs of the last unit begun that names a statement (a lone
    /// Close or Sync sent after it does not change what that connection may have been running).
    last_statement: Ending,
    /// Where the last unit prepared named statements without executing them (drivers prepare,
    /// then execute in the next unit): that read goes there rather than re-preparing elsewhere.
    prepared_on: Option<NodeId>,
    /// Under `routing.read_affinity = "session"`, the node the session's reads were last
    /// balanced to, claimed so that `least_connections` counts the session there.
    read_home: Option<ReadHome>,
    /// The route of the unit at the front while it waits to be moved.
    waiting_route: Option<Route>,
    /// The unit being forwarded runs inside a transaction block.
    unit_in_transaction: bool,
    /// The last decided unit may write (units inside its transaction inherit it).
    unit_writes: bool,
    default_read_only: bool,
    /// Where the session's writes stand, for read-your-writes.
    writes: Writes,
    /// What every connection the session uses must be given (settings, prepared statements),
    /// what each already has, and what pins the session.
    pub replay: Replayable,
    /// The client encoding keeps ASCII bytes ASCII, so the classifier can be trusted.
    pub encoding_safe: bool,
    /// Nodes this session could not open a connection to (bit per node); not chosen for reads.
    avoided: u64,
    /// The connection to `current` was lost: the next unit is routed afresh, never forwarded.
    detached: bool,
    /// Units begun so far (tells a unit that waits apart from the next one).
    units: u64,
    /// The session is running a unit or inside a transaction block (counted for PAUSE).
    in_flight: Option<InFlight>,
    /// Bytes moved since the last unit was counted (flushed to the metrics per unit).
    bytes: Bytes,
    /// The topology generation the last unit was routed with; 0 before the first (the first
    /// generation is 1). Not an `Option`: that would be 8 bytes more of every idle session.
    generation: u64,
    /// The topology changed since and took new work from a node: the next unit routed to the
    /// current node still goes through a move, which drops the connections the session holds
    /// to such nodes (see `Held::drop_unusable`; a node a reload removes is drained so).
    recheck: bool,
}

impl Steering {
    /// A session whose first connection is to `current`, all its state applied there.
    pub fn new(current: NodeId, encoding_safe: bool) -> Steering {
        Steering {
            current,
            running: None,
            forced: false,
            unit: UnitFacts::default(),
            covered: 0,
            last_statement: Ending::default(),
            prepared_on: None,
            read_home: None,
            waiting_route: None,
            unit_in_transaction: false,
            unit_writes: false,
            default_read_only: false,
            writes: Writes::None,
            replay: Replayable::new(),
            encoding_safe,
            avoided: 0,
            detached: false,
            units: 0,
            in_flight: None,
            bytes: Bytes::default(),
            generation: 0,
            recheck: false,
        }
    }

    /// `n` bytes came from the client.
    pub fn received(&mut self, n: usize) {
        self.bytes.received += n as u64;
    }

    /// `n` bytes came from the server, for the client.
    pub fn sent(&mut self, n: usize) {
        self.bytes.sent += n as u64;
    }

    /// Decides where the unit at the start of `input` goes. `in_transaction`: the current
    /// node's last ReadyForQuery said the session is in a transaction block; `views`: the
    /// session's views of the shared state.
    pub fn decide(
        &mut self,
        input: &[u8],
        in_transaction: bool,
        views: &mut Views<'_>,
        proxy: &Proxy,
    ) -> Decision {
        let now = views.now();
        let (config, max) = (now.config, now.config.max_message_size);
        if std::mem::take(&mut self.forced) {
            return self.forward(input, max, proxy);
        }
        let facts = unit::inspect(input, max, &proxy.classifier, self.replay.statements());
        if !facts.complete {
            return Decision::Wait;
        }
        // A DEALLOCATE is not read-only: a read is not read again for it.
        if !facts.read_only && self.deallocates_own(&facts, input, config) {
            return Decision::Deallocate;
        }
        if !in_transaction && facts.has_statement && proxy.pause.traffic() == Traffic::Paused {
            // PgBouncer's PAUSE: what runs finishes, nothing new begins.
            return Decision::Hold;
        }
        self.unit = facts;
        self.unit_in_transaction = in_transaction || facts.begin.is_some();
        if self.detached && !facts.has_statement {
            // A lone Sync or Close still needs a connection: any node a session may start on.
            return match router::route_session(now.topology, 0) {
                Ok(route) => {
                    self.waiting_route = Some(route);
                    Decision::Move(route.node)
                }
                Err(_) => Decision::WaitPrimary,
            };
        }
        if in_transaction || !facts.has_statement {
            if self.misses_statements(input, self.current, max) {
                // A statement prepared on another node before the transaction began: prepare
                // it here first (a move to the current node only catches it up).
                return Decision::Move(self.current);
            }
            debug!(
                node = self.current,
                route = if in_transaction {
                    "inside a transaction: stays"
                } else {
                    "names no statement: stays"
                },
                "routing decision"
            );
            return self.forward(input, max, proxy);
        }
        // A unit that waited for the node to finish keeps the route it was given: choosing again
        // would take a second balancer turn.
        let route = match self.waiting_route.take() {
            Some(route) => route,
            None => match self.choose(&facts, input, &now, proxy) {
                Ok(route) => route,
                Err(decision) => return decision,
            },
        };
        debug!(
            node = route.node,
            route = route.reason.as_str(),
            why = facts.reason.map(|r| r.as_str()),
            hint = facts.hint.map(hint_text),
            pinned = self.replay.pinned(),
            "routing decision"
        );
        if route.node == self.current
            && !self.detached
            && !std::mem::take(&mut self.recheck)
            && !self.misses_statements(input, route.node, max)
        {
            self.forward(input, max, proxy)
        } else {
            self.waiting_route = Some(route);
            Decision::Move(route.node)
        }
    }

    /// The unit at the start of `input` (whose facts are `self.unit`) goes to the current node:
    /// forwarded, unless it is a resetting statement that pgvigil runs itself. Only a unit the
    /// classifier found to change settings is read again for that (`max`: `max_message_size`).
    fn forward(&mut self, input: &[u8], max: usize, proxy: &Proxy) -> Decision {
        let sets = self.unit.session_state || self.unit.local_setting;
        if sets && reset::is_reset(input, max) {
            return Decision::Reset;
        }
        self.begin_unit(proxy);
        Decision::Forward
    }

    /// pgvigil ran the resetting unit decided last for the client (see `reset`), and it took
    /// effect: the session's default transaction mode follows it as if it had been forwarded
    /// (after a `RESET ALL` a plain BEGIN may write again).
    pub fn reset_ran(&mut self) {
        if let Some(read_only) = self.unit.session_read_only {
            self.default_read_only = read_only;
        }
    }

    /// Chooses the node for a unit outside a transaction (see [`route::route_unit`]), and notes
    /// whether it counts as a write; `now`: the shared state the decision reads.
    fn choose(
        &mut self,
        facts: &UnitFacts,
        input: &[u8],
        now: &Now<'_>,
        proxy: &Proxy,
    ) -> Result<Route, Decision> {
        let config = now.config;
        let max = config.max_message_size;
        let prefer = self
            .prepared_on
            .filter(|&node| facts.named_refs && !self.misses_statements(input, node, max));
        // Transaction pooling: an unnamed statement of an earlier unit is prepared again on
        // the connection the unit gets, so it goes where its statement may run.
        let merged;
        let facts = match self.replay.own_unnamed() {
            Some(own) if facts.reuses_unnamed && self.replay.unnamed().is_none() => {
                let mut with = *facts;
                match own.class {
                    Some(class) => with.merge(&class),
                    None => with.not_read_only(pgvigil_proto::classify::Reason::Unterminated),
                }
                merged = with;
                &merged
            }
            _ => facts,
        };
        let policy = SessionPolicy {
            pinned: self.replay.pinned(),
            default_read_only: self.default_read_only,
            encoding_safe: self.encoding_safe,
            unnamed_on: self.replay.unnamed().map(|(node, _)| node),
            writes: self.writes,
            avoided: self.avoided,
            prefer,
            read_home: self
                .read_home
                .as_ref()
                .map(ReadHome::node)
                .filter(|_| config.routing.read_affinity == ReadAffinity::Session),
        };
        let topology = now.topology;
        let seen = std::mem::replace(&mut self.generation, topology.generation);
        if seen != 0 && seen != topology.generation {
            self.recheck |= topology.nodes.iter().any(|n| !n.role.takes_new_work());
        }
        let replication = proxy.replication.load();
        let snapshot = Snapshot {
            topology,
            replication: &replication,
            routing: &config.routing,
            nodes: &config.nodes,
            balancer: &proxy.balancer,
        };
        match route::route_unit(facts, &policy, &snapshot) {
            Routed::To { route, writes } => {
                self.unit_writes = writes;
                match config.routing.read_affinity {
                    // A reload may have turned the affinity off: the claim is given back.
                    ReadAffinity::Unit => self.read_home = None,
                    ReadAffinity::Session
                        if route.reason == RouteReason::Balanced
                            && self.read_home.as_ref().map(ReadHome::node) != Some(route.node) =>
                    {
                        self.read_home = Some(proxy.balancer.claim_read_home(route.node));
                    }
                    ReadAffinity::Session => {}
                }
                Ok(route)
            }
            Routed::FetchLsn => Err(Decision::FetchLsn),
            Routed::WaitPrimary => Err(Decision::WaitPrimary),
        }
    }

    /// Transaction pooling: whether the unit at the start of `input` (whose facts are `facts`)
    /// is a SQL `DEALLOCATE` that pgvigil answers: of a statement the session prepared through
    /// the protocol, or of all of them when the session prepared none with SQL PREPARE on its
    /// (pinned) connection.
    fn deallocates_own(&self, facts: &UnitFacts, input: &[u8], config: &Config) -> bool {
        if config.pool.mode != PoolMode::Transaction {
            return false;
        }
        match facts.query_sql(input).and_then(naming::sql_drop) {
            Some(SqlDrop::Deallocate(name)) => self.replay.uses_name(&name),
            Some(SqlDrop::DeallocateAll) => self.replay.pinned().is_none(),
            Some(SqlDrop::DiscardAll) | None => false,
        }
    }

    /// Whether the unit binds or describes a named statement that `node` does not have.
    fn misses_statements(&self, input: &[u8], node: NodeId, max: usize) -> bool {
        self.unit.named_refs && self.replay.misses_statements(input, node, max)
    }

    /// The unit decided last is being forwarded to `current`: apply what it does to the session.
    fn begin_unit(&mut self, proxy: &Proxy) {
        if self.in_flight.is_none() {
            self.in_flight = Some(InFlight::enter(&proxy.pause));
        }
        self.waiting_route = None;
        self.units += 1;
        self.prepared_on = (self.unit.parses_named && !self.unit.executes).then_some(self.current);
        self.covered = self.unit.inspected;
        if self.unit.has_statement {
            self.last_statement = self.unit.ending();
        }
        // One clock read for the unit's start and its write.
        let mut now = None;
        // Only statements count as load: a lone Close or Sync is over at once.
        if self.running.is_none() && self.unit.has_statement {
            proxy.balancer.started(self.current);
            let kind = if self.replay.pinned().is_some() || self.unit.pin.is_some() {
                UnitKind::Pinned
            } else if self.unit.hint.is_some() {
                UnitKind::Hinted
            } else if self.unit_writes {
                UnitKind::Write
            } else {
                UnitKind::Read
            };
            self.running = Some((*now.get_or_insert_with(Instant::now), kind));
        }
        if self.unit_writes {
            self.writes = Writes::Unmeasured(*now.get_or_insert_with(Instant::now));
        }
        if let Some(pin) = self.unit.pin {
            self.pin(pin_reason(pin));
        }
        if let Some(read_only) = self.unit.session_read_only {
            self.default_read_only = read_only;
        }
    }

    /// Notes one client message as it is forwarded to `current` (`frame` is the whole message).
    pub fn forwarded(&mut self, tag: u8, frame: &[u8], proxy: &Proxy) {
        self.forwarded_to(tag, frame, None, proxy);
    }

    /// Notes one client message as it is forwarded to `current`, and says how it goes there:
    /// under transaction pooling (`server` given) a message that names a prepared statement
    /// uses the statement's name on the nodes, or is answered by pgvigil (see
    /// [`naming::name_statement`]).
    pub fn forwarded_to(
        &mut self,
        tag: u8,
        frame: &[u8],
        server: Option<OnServer<'_>>,
        proxy: &Proxy,
    ) -> Outgoing {
        // Read once for both.
        let parse = (tag == frontend::tag::PARSE)
            .then(|| Parse::parse(frame.get(5..).unwrap_or_default()).ok())
            .flatten();
        let outgoing = match server {
            Some(server) => {
                let message = (tag, frame, parse);
                naming::name_statement(&mut self.replay, self.current, message, server, proxy)
            }
            None => Outgoing::AsIs,
        };
        self.note_forwarded(tag, frame, parse, proxy);
        outgoing
    }

    fn note_write(&mut self) {
        self.writes = Writes::Unmeasured(Instant::now());
    }

    fn pin(&mut self, reason: &'static str) {
        self.replay.pin(reason);
    }

    /// The session ran its last unit (the node answered everything): the balancer stops counting
    /// it, and outside a transaction block (`in_transaction` false) the session is no longer in
    /// flight.
    pub fn unit_done(&mut self, proxy: &Proxy, in_transaction: bool) {
        if !in_transaction {
            self.in_flight = None;
        }
        if let Some((began, kind)) = self.running.take() {
            proxy.balancer.finished(self.current);
            let bytes = std::mem::take(&mut self.bytes);
            proxy
                .metrics
                .unit_done(self.current, kind, began.elapsed(), bytes, !in_transaction);
            // The configuration is read only for the first write awaited on a new primary.
            if kind == UnitKind::Write && proxy.events.awaits_first_write(self.current) {
                if let Some(node) = proxy.config().nodes.get(self.current) {
                    proxy.events.wrote(self.current, &node.name);
                }
            }
        }
        self.replay.settings.quiet();
        if let Some(why) = self.replay.settings.unreplayable() {
            self.pin(why);
        }
    }

    /// The next unit goes to `node` without a new decision; it was decided already.
    pub fn moved_to(&mut self, node: NodeId) {
        self.current = node;
        self.forced = true;
        self.waiting_route = None;
        self.detached = false;
    }

    /// The connection to the current node was lost: what it had is gone, and the next unit is
    /// routed afresh (possibly back to the same node, on a new connection).
    pub fn lost_current(&mut self) {
        self.replay.settings.lost();
        self.replay.naming.reset();
        self.replay.fresh_connection(self.current);
        self.detached = true;
        self.forced = false;
        self.waiting_route = None;
    }

    /// Transaction pooling took back the connection to the current node: the next unit is
    /// routed afresh (a unit already routed keeps its route) and synced onto whatever
    /// connection it gets.
    pub fn released(&mut self) {
        self.replay.fresh_connection(self.current);
        self.replay.naming.reset();
        self.detached = true;
        self.forced = false;
    }

    /// The route given to the unit at the front cannot be used (its node cannot be reached):
    /// the next decision chooses again.
    pub fn reroute(&mut self) {
        self.waiting_route = None;
    }

    /// The facts of the unit decided last: of the unit at the start of the client's buffer
    /// when the decision was a move (every move is decided on facts found just then).
    pub fn unit(&self) -> &UnitFacts {
        &self.unit
    }

    /// What a lost connection needs of the last unit forwarded that names a statement (the one
    /// running, if any is).
    pub fn last_statement(&self) -> Ending {
        self.last_statement
    }

    /// The topology generation the last unit was routed with; `None` before the first.
    pub fn routed_generation(&self) -> Option<u64> {
        (self.generation != 0).then_some(self.generation)
    }

    /// How many units the session has begun (forwarded after a decision) so far.
    pub fn units_begun(&self) -> u64 {
        self.units
    }

    /// `node` could not serve this session: no more reads go there.
    pub fn avoid(&mut self, node: NodeId) {
        self.avoided |= 1 << node;
        self.waiting_route = None;
    }

    /// Records the primary's WAL position after the session's writes (None: it could not be read,
    /// so reads stay on the primary until the next write is measured).
    pub fn set_write_lsn(&mut self, lsn: Option<u64>) {
        self.writes = Writes::Measured(lsn.unwrap_or(u64::MAX));
    }
}

/// The hint as the application wrote it, for logs.
fn hint_text(hint: Hint) -> &'static str {
    match hint {
        Hint::Primary => "pgvigil:primary",
        Hint::Replica => "pgvigil:replica",
    }
}

fn pin_reason(pin: Pin) -> &'static str {
    match pin {
        Pin::TempTable => "temporary table",
        Pin::Prepare => "SQL PREPARE",
        Pin::AdvisoryLock => "session advisory lock",
        Pin::Listen => "LISTEN",
        Pin::Do => "DO",
        Pin::Call => "CALL",
        Pin::Load => "LOAD",
        Pin::HoldCursor => "a WITH HOLD cursor",
        Pin::UnknownFunction => "a function call whose effects cannot be replayed",
    }
}
