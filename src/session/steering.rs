//! The routing memory of one session: which node each unit of work goes to, and what every node
//! the session uses must know first (session settings, prepared statements).
//!
//! Rules, in order: a unit inside a transaction stays on the transaction's node; a session pinned
//! (temporary table, SQL PREPARE, advisory lock, LISTEN, or anything else pgvigil cannot replay:
//! see `settings::effect`) or a `/* pgvigil:primary */` hint goes to the primary; a unit that reuses the unnamed statement goes where it was parsed; a provably
//! read-only unit (or one hinted `/* pgvigil:replica */`), and a read-only transaction, is spread
//! over the nodes that may take reads (after a write, only those that replayed it: read your
//! writes); everything else goes to the primary.

use std::collections::HashMap;
use std::time::Instant;

use bytes::Bytes;
use pgvigil_proto::classify::{classify, Classification, Hint, Pin, Reason};
use pgvigil_proto::frontend::{self, Bind, Close, Parse, Query};
use tracing::debug;

use super::settings::{self, Effect, Settings};
use super::unit::{self, UnitFacts};
use crate::proxy::Proxy;
use crate::router::{self, ReadPolicy, Route, RouteReason, MAX_NODES};
use crate::topology::NodeId;

/// A named prepared statement the client made.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// The client's Parse message, whole, to replay on another node.
    pub parse: Bytes,
    /// What its text is.
    pub class: Classification,
    /// Bit `n` set: it exists on the session's connection to node `n`.
    pub on: u64,
}

/// A statement text or name, as the client sent it.
pub type SqlText = Box<[u8]>;

/// The session's named prepared statements by name.
pub type Statements = HashMap<Box<[u8]>, Prepared>;

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
}

/// Routing state of one session.
pub struct Steering {
    /// The node the session's work goes to now.
    pub current: NodeId,
    /// Whether a unit is running (counted by the balancer).
    pub in_flight: bool,
    /// The next unit goes to `current` without a new decision (it was decided before a move).
    forced: bool,
    /// The facts of the unit being forwarded, and how many of its bytes they cover.
    unit: UnitFacts,
    covered: usize,
    /// The facts of the last unit begun that names a statement (a lone Close or Sync sent after
    /// it does not change what a lost connection may have been running).
    last_statement: UnitFacts,
    /// Where the last unit prepared named statements without executing them (drivers prepare,
    /// then execute in the next unit): that read goes there rather than re-preparing elsewhere.
    prepared_on: Option<NodeId>,
    /// The route of the unit at the front while it waits to be moved.
    waiting_route: Option<Route>,
    /// The unit being forwarded runs inside a transaction block.
    unit_in_transaction: bool,
    /// The last decided unit may write (units inside its transaction inherit it).
    unit_writes: bool,
    pinned: Option<&'static str>,
    default_read_only: bool,
    /// A write was sent since the last WAL position fetch, and when the last one was.
    wrote: bool,
    wrote_at: Instant,
    /// The primary's WAL position after the session's last write.
    write_lsn: Option<u64>,
    /// Session-state statements (SET, RESET, ...) that took effect, and what each node has run.
    pub settings: Settings,
    /// Statements to close on a node before its next use.
    pending_close: Vec<Vec<Box<[u8]>>>,
    statements: Statements,
    /// Where the unnamed statement was last parsed, and what it is.
    unnamed: Option<(NodeId, Classification)>,
    /// The client encoding keeps ASCII bytes ASCII, so the classifier can be trusted.
    pub encoding_safe: bool,
    /// Nodes this session could not open a connection to (bit per node); not chosen for reads.
    avoided: u64,
    /// The connection to `current` was lost: the next unit is routed afresh, never forwarded.
    detached: bool,
    /// Units begun so far (tells a unit that waits apart from the next one).
    units: u64,
}

impl Steering {
    /// A session whose first connection is to `current`, all its state applied there.
    pub fn new(node_count: usize, current: NodeId, encoding_safe: bool) -> Steering {
        Steering {
            current,
            in_flight: false,
            forced: false,
            unit: UnitFacts::default(),
            covered: 0,
            last_statement: UnitFacts::default(),
            prepared_on: None,
            waiting_route: None,
            unit_in_transaction: false,
            unit_writes: false,
            pinned: None,
            default_read_only: false,
            wrote: false,
            wrote_at: Instant::now(),
            write_lsn: None,
            settings: Settings::new(node_count),
            pending_close: vec![Vec::new(); node_count],
            statements: HashMap::new(),
            unnamed: None,
            encoding_safe,
            avoided: 0,
            detached: false,
            units: 0,
        }
    }

    /// Decides where the unit at the start of `input` goes. `in_transaction`: the current
    /// node's last ReadyForQuery said the session is in a transaction block.
    pub fn decide(&mut self, input: &[u8], in_transaction: bool, proxy: &Proxy) -> Decision {
        if std::mem::take(&mut self.forced) {
            self.begin_unit(proxy);
            return Decision::Forward;
        }
        let max = proxy.config.max_message_size;
        let facts = unit::inspect(input, max, &proxy.functions, &self.statements);
        if !facts.complete {
            return Decision::Wait;
        }
        self.unit = facts;
        self.unit_in_transaction = in_transaction || facts.begin.is_some();
        if self.detached && !facts.has_statement {
            // A lone Sync or Close still needs a connection: any node a session may start on.
            let topology = proxy.topology.load();
            return match router::route_session(&topology, 0) {
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
            self.begin_unit(proxy);
            return Decision::Forward;
        }
        // A unit that waited for the node to finish keeps the route it was given: choosing again
        // would take a second balancer turn.
        let route = match self.waiting_route.take() {
            Some(route) => route,
            None => match self.choose(&facts, input, proxy) {
                Ok(route) => route,
                Err(decision) => return decision,
            },
        };
        debug!(
            node = route.node,
            route = route.reason.as_str(),
            why = facts.reason.map(|r| r.as_str()),
            hint = facts.hint.map(hint_text),
            pinned = self.pinned,
            "routing decision"
        );
        if route.node == self.current
            && !self.detached
            && !self.misses_statements(input, route.node, max)
        {
            self.begin_unit(proxy);
            Decision::Forward
        } else {
            self.waiting_route = Some(route);
            Decision::Move(route.node)
        }
    }

    /// Chooses the node for a unit outside a transaction.
    fn choose(
        &mut self,
        facts: &UnitFacts,
        input: &[u8],
        proxy: &Proxy,
    ) -> Result<Route, Decision> {
        let topology = proxy.topology.load();
        let pinned = self.pinned.or(facts.pin.map(pin_reason));
        let begin_allows = match facts.begin {
            Some(Some(read_only)) => read_only,
            Some(None) => self.default_read_only,
            None => true,
        };
        let read = begin_allows && (facts.read_only || facts.hint == Some(Hint::Replica));
        // A unit that executed something before a Flush and waits has an unseen rest that may
        // write in the same implicit transaction: it runs on the primary. What it has shown so far
        // decides whether it counts as a write; the rest's writes are noted as they are
        // forwarded. One that only prepared (asyncpg's Parse, Describe, Flush) goes where its
        // statement may run: its rest binds and executes what it prepared.
        let must_write_node = facts.awaits_rest && facts.executes;
        if let (Some((node, _)), true) = (self.unnamed, facts.reuses_unnamed) {
            self.unit_writes = !facts.read_only;
            return Ok(Route {
                node,
                reason: RouteReason::UnnamedStatement,
            });
        }
        if !read
            || must_write_node
            || pinned.is_some()
            || !self.encoding_safe
            || facts.hint == Some(Hint::Primary)
        {
            // A lone SET or RESET writes no WAL: it does not hold the session's reads back.
            self.unit_writes = !read && !facts.lone_setting();
            return router::route_write(&topology).map_err(|_| Decision::WaitPrimary);
        }
        self.unit_writes = false;
        let replication = proxy.replication.load();
        let min_lsn = if proxy.config.routing.read_your_writes {
            if self.wrote {
                if replication.observed_at.is_none_or(|at| at <= self.wrote_at) {
                    // No replica can be known to have the write yet: no need to measure it.
                    return router::route_write(&topology)
                        .map(|route| Route {
                            reason: RouteReason::ReadYourWrites,
                            ..route
                        })
                        .map_err(|_| Decision::WaitPrimary);
                }
                return Err(Decision::FetchLsn);
            }
            self.write_lsn
        } else {
            None
        };
        let weights = self.read_weights(proxy);
        let policy = ReadPolicy {
            weights: &weights[..proxy.config.nodes.len().min(MAX_NODES)],
            balance: proxy.config.routing.balance,
            max_lag_bytes: proxy.config.routing.max_lag_bytes,
            max_lag: proxy.config.routing.max_lag,
            primary_reads: proxy.config.routing.primary_reads,
        };
        let max = proxy.config.max_message_size;
        let prefer = self
            .prepared_on
            .take()
            .filter(|&node| facts.named_refs && !self.misses_statements(input, node, max));
        let balancer = &proxy.balancer;
        router::route_read(&topology, &replication, &policy, balancer, min_lsn, prefer)
            .map_err(|_| Decision::WaitPrimary)
    }

    /// The configured weights, with 0 for nodes this session could not reach.
    fn read_weights(&self, proxy: &Proxy) -> [u32; MAX_NODES] {
        let mut weights = [0; MAX_NODES];
        for (id, node) in proxy.config.nodes.iter().enumerate().take(MAX_NODES) {
            if self.avoided & (1 << id) == 0 {
                weights[id] = node.weight;
            }
        }
        weights
    }

    /// Whether the unit binds or describes a named statement that `node` does not have.
    fn misses_statements(&self, input: &[u8], node: NodeId, max: usize) -> bool {
        if !self.unit.named_refs {
            return false;
        }
        let mut missing = false;
        unit::named_references(input, max, |name| {
            missing |= self
                .statements
                .get(name)
                .is_some_and(|p| p.on & (1 << node) == 0);
        });
        missing
    }

    /// The unit decided last is being forwarded to `current`: apply what it does to the session.
    fn begin_unit(&mut self, proxy: &Proxy) {
        self.waiting_route = None;
        self.units += 1;
        self.prepared_on = (self.unit.parses_named && !self.unit.executes).then_some(self.current);
        self.covered = self.unit.inspected;
        if self.unit.has_statement {
            self.last_statement = self.unit;
        }
        // Only statements count as load: a lone Close or Sync is over at once.
        if !self.in_flight && self.unit.has_statement {
            proxy.balancer.started(self.current);
            self.in_flight = true;
        }
        if self.unit_writes {
            self.note_write();
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
        let covered = self.covered >= frame.len();
        self.covered = self.covered.saturating_sub(frame.len());
        let body = frame.get(5..).unwrap_or_default();
        match tag {
            frontend::tag::QUERY => {
                self.settings.request();
                let Ok(query) = Query::parse(body) else {
                    return;
                };
                let (session_state, statements, reason, hint) = if covered {
                    let u = &self.unit;
                    (u.session_state, u.query_statements, u.reason, u.hint)
                } else {
                    let class = classify(query.sql, &proxy.functions);
                    self.uncovered(&class);
                    (
                        class.session_state,
                        class.statements,
                        class.reason,
                        class.hint,
                    )
                };
                if session_state {
                    self.record_state(query.sql, statements, true);
                }
                self.note_effects(query.sql, reason, hint, true);
            }
            frontend::tag::PARSE => self.parsed(frame, body, covered, proxy),
            frontend::tag::BIND if !covered => self.bound_unseen(body),
            frontend::tag::CLOSE => {
                if let Ok(close) = Close::parse(body) {
                    if close.kind == b'S' && !close.name.is_empty() {
                        if let Some(old) = self.statements.remove(close.name) {
                            self.close_elsewhere(close.name, old.on);
                        }
                    }
                }
            }
            frontend::tag::FUNCTION_CALL => {
                self.settings.request();
                self.note_write();
                self.pin("a fast-path function call");
            }
            frontend::tag::SYNC => self.settings.request(),
            _ => {}
        }
    }

    /// Notes what a statement forwarded to `current` does beyond its classification (see
    /// [`settings::effect`]); `reason`: why it is not read-only, if it is not.
    fn note_effects(
        &mut self,
        sql: &[u8],
        reason: Option<Reason>,
        hint: Option<Hint>,
        query: bool,
    ) {
        match settings::effect(sql, reason, hint) {
            Effect::None => {}
            Effect::Setting => self.record_state(sql, 1, query),
            Effect::Pin(why) => self.pin(why),
        }
    }

    fn parsed(&mut self, frame: &[u8], body: &[u8], covered: bool, proxy: &Proxy) {
        let Ok(parse) = Parse::parse(body) else {
            return;
        };
        let known = match (covered, parse.name.is_empty(), self.unit.unnamed) {
            (true, true, Some(class)) if !self.unit.session_state => Some(class),
            _ => None,
        };
        let class = known.unwrap_or_else(|| classify(parse.sql, &proxy.functions));
        if !covered {
            self.uncovered(&class);
        }
        if class.session_state {
            self.record_state(parse.sql, class.statements, false);
        }
        self.note_effects(parse.sql, class.reason, class.hint, false);
        if parse.name.is_empty() {
            self.unnamed = Some((self.current, class));
            return;
        }
        let prepared = Prepared {
            parse: Bytes::copy_from_slice(frame),
            class,
            on: 1 << self.current,
        };
        if let Some(old) = self.statements.insert(parse.name.into(), prepared) {
            self.close_elsewhere(parse.name, old.on);
        }
    }

    /// A Bind forwarded without having been inspected (it followed a Flush): running a named
    /// statement that may write is a write. (An unnamed one was judged at its Parse.)
    fn bound_unseen(&mut self, body: &[u8]) {
        let Ok(bind) = Bind::parse(body) else {
            return;
        };
        if bind.statement.is_empty() {
            return;
        }
        let writes = self
            .statements
            .get(bind.statement)
            .is_none_or(|p| !p.class.read_only && !p.class.lone_setting());
        if writes {
            self.note_write();
        }
    }

    /// Effects of a statement forwarded without having been inspected (it followed a Flush, or
    /// the unit was larger than the lookahead).
    fn uncovered(&mut self, class: &Classification) {
        if !class.read_only && !class.lone_setting() {
            self.note_write();
        }
        if let Some(pin) = class.pin {
            self.pin(pin_reason(pin));
        }
        if let Some(read_only) = class.session_read_only {
            self.default_read_only = read_only;
        }
    }

    /// Queues a close of `name` on every node in `on` but the current one.
    fn close_elsewhere(&mut self, name: &[u8], on: u64) {
        for (node, closes) in self.pending_close.iter_mut().enumerate() {
            if node != self.current && on & (1 << node) != 0 {
                closes.push(name.into());
            }
        }
    }

    /// Notes a session-state statement sent to `current`, to replay on the session's other
    /// nodes once it took effect; `in_query`: sent in a Query (else in a Parse).
    fn record_state(&mut self, sql: &[u8], statements: usize, in_query: bool) {
        if statements > 1 {
            // Replaying the whole string could repeat its other statements.
            self.pin("session state changed in a multi-statement string");
            return;
        }
        self.settings.sent(sql, in_query);
    }

    fn note_write(&mut self) {
        self.wrote = true;
        self.wrote_at = Instant::now();
    }

    fn pin(&mut self, reason: &'static str) {
        if self.pinned.is_none() {
            debug!(reason, "session pinned to the primary");
            self.pinned = Some(reason);
        }
    }

    /// The session ran its last unit (the node answered everything): the balancer stops counting it.
    pub fn unit_done(&mut self, proxy: &Proxy) {
        if std::mem::take(&mut self.in_flight) {
            proxy.balancer.finished(self.current);
        }
        self.settings.quiet();
        if let Some(why) = self.settings.unreplayable() {
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
        self.settings.lost();
        self.fresh_connection(self.current);
        self.detached = true;
        self.forced = false;
        self.waiting_route = None;
    }

    /// The route given to the unit at the front cannot be used (its node cannot be reached):
    /// the next decision chooses again.
    pub fn reroute(&mut self) {
        self.waiting_route = None;
    }

    /// Why the session must stay on the primary's connection, if it must: state there (a
    /// temporary table, a SQL PREPARE, an advisory lock, LISTEN, DO, CALL, LOAD, a WITH HOLD
    /// cursor, an unknown function's effects, settings that cannot be replayed) that another
    /// connection would not have.
    pub fn pinned(&self) -> Option<&'static str> {
        self.pinned
    }

    /// The facts of the last unit forwarded that names a statement (the one running, if any is).
    pub fn last_statement(&self) -> &UnitFacts {
        &self.last_statement
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

    /// What `node` must run before it can serve: session-state statements it has not run, and
    /// statements to close.
    pub fn catch_up(&self, node: NodeId) -> (&[SqlText], &[SqlText]) {
        (self.settings.missing(node), &self.pending_close[node])
    }

    /// `node` ran everything [`Steering::catch_up`] listed.
    pub fn caught_up(&mut self, node: NodeId) {
        self.settings.caught_up(node);
        self.pending_close[node].clear();
    }

    /// A fresh connection to `node` replaced whatever the session had there.
    pub fn fresh_connection(&mut self, node: NodeId) {
        self.settings.fresh_connection(node);
        self.pending_close[node].clear();
        for prepared in self.statements.values_mut() {
            prepared.on &= !(1 << node);
        }
        if self.unnamed.is_some_and(|(n, _)| n == node) {
            self.unnamed = None;
        }
    }

    /// Named statements the unit at the start of `input` needs and `node` does not have, with
    /// their Parse messages.
    pub fn missing_statements(&self, input: &[u8], node: NodeId, max: usize) -> Vec<Bytes> {
        let mut missing: Vec<Bytes> = Vec::new();
        unit::named_references(input, max, |name| {
            if let Some(p) = self.statements.get(name) {
                if p.on & (1 << node) == 0 && !missing.contains(&p.parse) {
                    missing.push(p.parse.clone());
                }
            }
        });
        missing
    }

    /// `node` now has the statement whose Parse message is `parse`.
    pub fn statement_on(&mut self, parse: &[u8], node: NodeId) {
        let name = Parse::parse(parse.get(5..).unwrap_or_default()).map(|p| p.name);
        if let Some(p) = name.ok().and_then(|n| self.statements.get_mut(n)) {
            p.on |= 1 << node;
        }
    }

    /// Records the primary's WAL position after the session's writes (None: it could not be read,
    /// so reads stay on the primary until the next write is measured).
    pub fn set_write_lsn(&mut self, lsn: Option<u64>) {
        self.wrote = false;
        self.write_lsn = Some(lsn.unwrap_or(u64::MAX));
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
    }
}
