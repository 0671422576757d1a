//! The session's replayable state in one record: the settings that took effect, the named
//! prepared statements by the client's name, the unnamed statement, and why the session is
//! pinned (what it did that cannot be replayed); and, per node, what the session's connection
//! there already has of it. `sync::sync` reads this record to bring a connection up to date.
//!
//! A session holds at most one connection per node, so "what node `n` has" is what the session's
//! connection to `n` has; a fresh connection to `n` starts from nothing
//! ([`Replayable::fresh_connection`]).

use std::collections::HashMap;
use std::ops::Deref;
use std::sync::{Arc, LazyLock};

use bytes::Bytes;
use pgvigil_proto::classify::Classification;
use pgvigil_proto::frontend::Parse;
use tracing::info;

use super::naming::{Naming, PendingParse};
use super::settings::Settings;
use super::unit;
use super::unnamed::OwnUnnamed;
use crate::statements::{ServerStatements, StatementId, NO_STATEMENT};
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
    /// Transaction pooling: its statement on the nodes (`pgv_<id>`); [`NO_STATEMENT`] in
    /// session pooling, where the nodes know it by the client's name.
    pub server: StatementId,
}

/// A statement text or name, as the client sent it.
pub type SqlText = Box<[u8]>;

/// The session's named prepared statements by name. Hashed with foldhash (a seed drawn at
/// random per process, varied per map): looked up several times per unit under transaction
/// pooling, where SipHash cost about 1.5k instructions per `-M prepared` transaction; the names
/// are the session's own, so names chosen to collide would slow that session alone.
pub type Statements = HashMap<Box<[u8]>, Prepared, foldhash::fast::RandomState>;

/// The session's named statements, a map allocated with the first one: most sessions prepare
/// none by name, and an empty map inline would be 48 bytes of every session.
#[derive(Debug, Default)]
struct Named(Option<Box<Statements>>);

/// What [`Named`] reads as before its first statement.
static NO_STATEMENTS: LazyLock<Statements> = LazyLock::new(Statements::default);

impl Deref for Named {
    type Target = Statements;

    fn deref(&self) -> &Statements {
        self.0.as_deref().unwrap_or(&NO_STATEMENTS)
    }
}

impl Named {
    fn insert(&mut self, name: Box<[u8]>, prepared: Prepared) -> Option<Prepared> {
        self.0.get_or_insert_default().insert(name, prepared)
    }

    fn remove(&mut self, name: &[u8]) -> Option<Prepared> {
        self.0.as_mut()?.remove(name)
    }

    fn get_mut(&mut self, name: &[u8]) -> Option<&mut Prepared> {
        self.0.as_mut()?.get_mut(name)
    }

    fn values_mut(&mut self) -> impl Iterator<Item = &mut Prepared> {
        self.0.iter_mut().flat_map(|map| map.values_mut())
    }

    /// Forgets every statement, and the map with them.
    fn clear(&mut self) {
        self.0 = None;
    }
}

/// Everything another connection must be given before it can serve the session, and what each
/// of the session's connections already has.
pub struct Replayable {
    /// Session-state statements (SET, RESET, ...) that took effect, and what each node has run.
    pub settings: Settings,
    /// Named prepared statements by the client's name, with the nodes that have each.
    statements: Named,
    /// Statements to close on a node before its next use (closed or replaced elsewhere), by
    /// node; empty until the first such close (most sessions never have one).
    pending_close: Box<[Vec<SqlText>]>,
    /// Where the unnamed statement was last parsed, and what it is.
    unnamed: Option<(NodeId, Classification)>,
    /// Transaction pooling: the session's unnamed statement, once its Parse succeeded, until a
    /// simple Query or a Parse of another drops it (boxed: most sessions never have one).
    own_unnamed: Option<Box<OwnUnnamed>>,
    /// Why the session must stay on its primary connection, once it must.
    pinned: Option<&'static str>,
    /// Transaction pooling: named Parses in flight on the current connection.
    pub naming: Naming,
    /// Transaction pooling: what every statement key of this session starts with (database,
    /// user, startup parameters).
    context: Arc<[u8]>,
}

impl Replayable {
    /// Nothing to replay.
    pub fn new() -> Replayable {
        Replayable {
            settings: Settings::default(),
            statements: Named::default(),
            pending_close: Box::default(),
            unnamed: None,
            own_unnamed: None,
            pinned: None,
            naming: Naming::default(),
            context: Arc::from([].as_slice()),
        }
    }

    /// Transaction pooling: statements are shared only between sessions with the same
    /// `context` (database, user, startup parameters) and the same settings log.
    pub fn set_context(&mut self, context: Arc<[u8]>) {
        self.context = context;
    }

    /// Transaction pooling: the key under which the statement of a Parse is shared, given the
    /// Parse's body after its name: the same text with the same parameter types, parsed with the
    /// same settings (a search_path changes what the names in it mean).
    pub fn statement_key(&self, body_after_name: &[u8]) -> Vec<u8> {
        let mut key = Vec::with_capacity(self.context.len() + body_after_name.len() + 64);
        key.extend_from_slice(&self.context);
        for sql in self.settings.log() {
            key.extend_from_slice(sql);
            key.push(0);
        }
        key.push(0);
        key.extend_from_slice(body_after_name);
        key
    }

    /// Transaction pooling: whether the client's name `name` is in use (prepared, or its Parse
    /// in flight).
    pub fn uses_name(&self, name: &[u8]) -> bool {
        self.statements.contains_key(name) || self.naming.live(name).is_some()
    }

    /// Transaction pooling: the statement on the nodes that the client's `name` stands for.
    pub fn server_id(&self, name: &[u8]) -> Option<StatementId> {
        match self.naming.live(name) {
            Some(pending) => Some(pending.id),
            None => self
                .statements
                .get(name)
                .map(|p| p.server)
                .filter(|id| *id != NO_STATEMENT),
        }
    }

    /// Transaction pooling: the client's Parse was answered by pgvigil, as statement `id` that
    /// the connection to `node` has.
    pub fn prepared_shared(
        &mut self,
        name: &[u8],
        frame: &[u8],
        class: Classification,
        id: StatementId,
        node: NodeId,
    ) {
        let prepared = Prepared {
            parse: Bytes::copy_from_slice(frame),
            class,
            on: 1 << node,
            server: id,
        };
        self.statements.insert(name.into(), prepared);
    }

    /// The server answered a Parse in flight on `node` with ParseComplete.
    pub fn parse_complete(&mut self, node: NodeId, server: &mut ServerStatements) {
        let (named, unnamed) = self.naming.parse_complete();
        if let Some(own) = unnamed {
            server.set_unnamed_of(own.id);
            if let Some(old) = self.own_unnamed.replace(own) {
                OwnUnnamed::recycle(old);
            }
        }
        let Some(pending) = named else {
            return;
        };
        let PendingParse {
            name,
            parse,
            class,
            id,
            closed,
            replaced,
        } = *pending;
        if id == NO_STATEMENT {
            // Session pooling: recorded when forwarded; the statement it replaced is closed on
            // the other nodes that have it.
            if let Some(old) = replaced {
                self.close_elsewhere(&name, old.on, node);
            }
            return;
        }
        server.touch(id);
        if !closed {
            let prepared = Prepared {
                parse,
                class,
                on: 1 << node,
                server: id,
            };
            self.statements.insert(name, prepared);
        }
    }

    /// Transaction pooling: the connection to `node` is the session's now; its statements are
    /// there when that connection has them.
    pub fn adopt(&mut self, node: NodeId, server: &ServerStatements) {
        for prepared in self.statements.values_mut() {
            if prepared.server != NO_STATEMENT && server.has(prepared.server) {
                prepared.on |= 1 << node;
            } else {
                prepared.on &= !(1 << node);
            }
        }
    }

    /// Transaction pooling: the connection to `node` no longer has statement `id`.
    pub fn gone(&mut self, id: StatementId, node: NodeId) {
        for prepared in self.statements.values_mut() {
            if prepared.server == id {
                prepared.on &= !(1 << node);
            }
        }
    }

    /// The client dropped every named statement (`DEALLOCATE ALL`, `DISCARD ALL`).
    pub fn drop_statements(&mut self) {
        let names: Vec<Box<[u8]>> = self.statements.keys().cloned().collect();
        for name in names {
            self.naming.close(&name);
        }
        self.statements.clear();
    }

    /// Transaction pooling: the client deallocated its statement `name` (SQL `DEALLOCATE`).
    pub fn deallocated(&mut self, name: &[u8]) {
        self.naming.close(name);
        self.statements.remove(name);
    }

    /// The named prepared statements, by name.
    pub fn statements(&self) -> &Statements {
        &self.statements
    }

    /// Where the unnamed statement was last parsed, and what it is.
    pub fn unnamed(&self) -> Option<(NodeId, Classification)> {
        self.unnamed
    }

    /// Transaction pooling: the session's unnamed statement, if it has one.
    pub fn own_unnamed(&self) -> Option<&OwnUnnamed> {
        self.own_unnamed.as_deref()
    }

    /// The client sent a simple Query, which drops the unnamed statement (whether forwarded or
    /// answered by pgvigil).
    pub fn unnamed_dropped(&mut self) {
        self.own_unnamed = None;
    }

    /// Transaction pooling: the session must keep its connection, which has its unnamed
    /// statement, because that statement is too long to keep for preparing it elsewhere.
    pub fn holds_connection(&self) -> bool {
        self.own_unnamed
            .as_ref()
            .is_some_and(|o| o.parse().is_none())
    }

    /// The unnamed statement was parsed on `node` as `class`.
    pub fn parsed_unnamed(&mut self, node: NodeId, class: Classification) {
        self.unnamed = Some((node, class));
    }

    /// Session pooling: the client's Parse message `frame` of the named statement `name` went to
    /// `node`. It is recorded at once (the next units are routed by it), and undone should the
    /// server refuse it (see [`Replayable::parse_failed`]); once it succeeds, one of the same
    /// name made before is closed on the other nodes that have it.
    pub fn parsed_named(&mut self, name: &[u8], frame: &[u8], class: Classification, node: NodeId) {
        let prepared = Prepared {
            parse: Bytes::copy_from_slice(frame),
            class,
            on: 1 << node,
            server: NO_STATEMENT,
        };
        let replaced = self.statements.insert(name.into(), prepared);
        self.naming.sent_recorded(name, class, replaced);
    }

    /// The server sent an ErrorResponse: the Parses in flight before the next Sync never ran.
    /// Under session pooling the record is put back as it was before them (a Parse of a name in
    /// use fails with 42P05, and the statement of that name stays).
    pub fn parse_failed(&mut self) {
        let (failed, unnamed) = self.naming.error();
        if unnamed {
            // It failed (PostgreSQL dropped the previous one first) or was skipped (the
            // previous one stays): taken as the former, the common case.
            self.own_unnamed = None;
        }
        for failed in failed.into_iter().rev() {
            if failed.id != NO_STATEMENT || failed.closed {
                continue;
            }
            match failed.replaced {
                Some(old) => self.statements.insert(failed.name, old),
                None => self.statements.remove(&failed.name),
            };
        }
    }

    /// The client closed its named statement `name` on `node`: the other nodes that have it
    /// close it before their next use. (Under transaction pooling the statement on the nodes is
    /// shared and stays: only the session forgets it.)
    pub fn closed(&mut self, name: &[u8], node: NodeId) {
        self.naming.close(name);
        if let Some(old) = self.statements.remove(name) {
            if old.server == NO_STATEMENT {
                self.close_elsewhere(name, old.on, node);
            }
        }
    }

    /// Queues a close of `name` on every node in `on` but `current`.
    fn close_elsewhere(&mut self, name: &[u8], on: u64, current: NodeId) {
        let others = on & !(1 << current);
        let nodes = (u64::BITS - others.leading_zeros()) as usize;
        if self.pending_close.len() < nodes {
            let mut pending = std::mem::take(&mut self.pending_close).into_vec();
            pending.resize_with(nodes, Vec::new);
            self.pending_close = pending.into_boxed_slice();
        }
        for (node, closes) in self.pending_close.iter_mut().enumerate() {
            if others & (1 << node) != 0 {
                closes.push(name.into());
            }
        }
    }

    /// The statements to close on `node` before its next use.
    fn closes(&self, node: NodeId) -> &[SqlText] {
        self.pending_close.get(node).map_or(&[], Vec::as_slice)
    }

    /// `node` has nothing left to close.
    fn closes_done(&mut self, node: NodeId) {
        if let Some(closes) = self.pending_close.get_mut(node) {
            closes.clear();
        }
    }

    /// Pins the session (the first reason stays), logged: it did something that cannot be
    /// replayed on another connection.
    pub fn pin(&mut self, reason: &'static str) {
        if self.pinned.is_none() {
            // Info, not debug: pinned sessions are what keeps connections under transaction
            // pooling, so operators look for them.
            info!(reason, "session pinned to the primary");
            self.pinned = Some(reason);
        }
    }

    /// Why the session must stay on the primary's connection, if it must: state there (a
    /// temporary table, a SQL PREPARE, an advisory lock, LISTEN, DO, CALL, LOAD, a WITH HOLD
    /// cursor, an unknown function's effects, settings that cannot be replayed) that another
    /// connection would not have.
    pub fn pinned(&self) -> Option<&'static str> {
        self.pinned
    }

    /// What `node` must run before it can serve: session-state statements it has not run, and
    /// statements to close.
    pub fn catch_up(&self, node: NodeId) -> (&[SqlText], &[SqlText]) {
        (self.settings.missing(node), self.closes(node))
    }

    /// Whether the session's connection to `node` lacks nothing the unit at the start of
    /// `input` needs: no setting or close owed there, and no named statement the unit uses
    /// missing.
    pub fn nothing_owed(&self, node: NodeId, input: &[u8], max: usize) -> bool {
        self.settings.missing(node).is_empty()
            && self.closes(node).is_empty()
            && (self.statements.is_empty() || !self.misses_statements(input, node, max))
    }

    /// `node` ran everything [`Replayable::catch_up`] listed.
    pub fn caught_up(&mut self, node: NodeId) {
        self.settings.caught_up(node);
        self.closes_done(node);
    }

    /// A fresh connection to `node` replaced whatever the session had there.
    pub fn fresh_connection(&mut self, node: NodeId) {
        self.settings.fresh_connection(node);
        self.closes_done(node);
        for prepared in self.statements.values_mut() {
            prepared.on &= !(1 << node);
        }
        if self.unnamed.is_some_and(|(n, _)| n == node) {
            self.unnamed = None;
        }
    }

    /// Whether the unit at the start of `input` binds or describes a named statement that
    /// `node` does not have.
    pub fn misses_statements(&self, input: &[u8], node: NodeId, max: usize) -> bool {
        let mut missing = false;
        unit::named_references(input, max, |name| {
            missing |= self
                .statements
                .get(name)
                .is_some_and(|p| p.on & (1 << node) == 0);
        });
        missing
    }

    /// Named statements the unit at the start of `input` needs and `node` does not have, with
    /// their Parse messages and their statements on the nodes.
    pub fn missing_statements(
        &self,
        input: &[u8],
        node: NodeId,
        max: usize,
    ) -> Vec<(Bytes, StatementId)> {
        let mut missing: Vec<(Bytes, StatementId)> = Vec::new();
        unit::named_references(input, max, |name| {
            if let Some(p) = self.statements.get(name) {
                if p.on & (1 << node) == 0 && !missing.iter().any(|(m, _)| *m == p.parse) {
                    missing.push((p.parse.clone(), p.server));
                }
            }
        });
        missing
    }

    /// Transaction pooling: the statements on the nodes that the unit at the start of `input`
    /// binds or describes.
    pub fn referenced(&self, input: &[u8], max: usize) -> Vec<StatementId> {
        let mut ids = Vec::new();
        unit::named_references(input, max, |name| {
            ids.extend(self.statements.get(name).map(|p| p.server));
        });
        ids
    }

    /// `node` now has the statement whose Parse message is `parse`.
    pub fn statement_on(&mut self, parse: &[u8], node: NodeId) {
        let name = Parse::parse(parse.get(5..).unwrap_or_default()).map(|p| p.name);
        if let Some(p) = name.ok().and_then(|n| self.statements.get_mut(n)) {
            p.on |= 1 << node;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::{BufMut, BytesMut};
    use pgvigil_proto::classify::{classify, FunctionLists};
    use pgvigil_proto::encode;

    fn parse_frame(name: &str, sql: &str) -> BytesMut {
        let mut out = BytesMut::new();
        encode::message(&mut out, b'P', |b| {
            b.put_slice(name.as_bytes());
            b.put_u8(0);
            b.put_slice(sql.as_bytes());
            b.put_u8(0);
            b.put_u16(0);
        });
        out
    }

    fn bind_and_sync(statement: &str) -> BytesMut {
        let mut out = BytesMut::new();
        encode::message(&mut out, b'B', |b| {
            b.put_u8(0);
            b.put_slice(statement.as_bytes());
            b.put_u8(0);
            b.put_u16(0);
            b.put_u16(0);
            b.put_u16(0);
        });
        encode::sync(&mut out);
        out
    }

    #[test]
    fn a_statement_is_replayed_where_missing_and_closed_where_replaced() {
        let functions = FunctionLists::default();
        let mut replay = Replayable::new();
        let parse = parse_frame("s1", "select 1");
        replay.parsed_named(b"s1", &parse, classify(b"select 1", &functions), 0);
        replay.parse_complete(0, &mut ServerStatements::default());
        let unit = bind_and_sync("s1");
        assert!(!replay.misses_statements(&unit, 0, 1 << 20));
        assert!(replay.misses_statements(&unit, 1, 1 << 20));
        assert_eq!(
            replay.missing_statements(&unit, 1, 1 << 20),
            vec![(parse.clone().freeze(), NO_STATEMENT)]
        );
        replay.statement_on(&parse, 1);
        assert!(!replay.misses_statements(&unit, 1, 1 << 20));

        // Replaced on node 0: once that succeeded, node 1 closes its copy before its next use.
        replay.parsed_named(b"s1", &parse, classify(b"select 1", &functions), 0);
        assert!(replay.catch_up(1).1.is_empty(), "not before the answer");
        replay.parse_complete(0, &mut ServerStatements::default());
        assert_eq!(replay.catch_up(1).1, &[SqlText::from(&b"s1"[..])]);
        replay.caught_up(1);
        assert!(replay.catch_up(1).1.is_empty());

        // A fresh connection has nothing.
        replay.fresh_connection(0);
        assert!(replay.misses_statements(&unit, 0, 1 << 20));
    }

    #[test]
    fn a_named_parse_the_server_refuses_leaves_the_record_as_it_was() {
        let functions = FunctionLists::default();
        let mut replay = Replayable::new();
        let one = parse_frame("s1", "select 1");
        replay.parsed_named(b"s1", &one, classify(b"select 1", &functions), 1);
        replay.naming.request();
        replay.parse_complete(1, &mut ServerStatements::default());
        assert!(replay.naming.ready(true).is_empty());
        // A second Parse of the name (42P05 on the server), and one of a new name, both refused.
        let two = parse_frame("s1", "select 2");
        replay.parsed_named(b"s1", &two, classify(b"select 2", &functions), 0);
        replay.parsed_named(b"s2", &two, classify(b"select 2", &functions), 0);
        replay.parse_failed();
        replay.naming.request();
        assert_eq!(
            replay.statements().get(&b"s1"[..]).map(|p| &p.parse[..]),
            Some(&one[..])
        );
        assert_eq!(
            replay.statements().get(&b"s1"[..]).map(|p| p.on),
            Some(1 << 1)
        );
        assert!(replay.statements().get(&b"s2"[..]).is_none());
        assert!(replay.catch_up(1).1.is_empty(), "node 1 keeps its s1");
    }

    #[test]
    fn the_first_pin_reason_stays() {
        let mut replay = Replayable::new();
        assert_eq!(replay.pinned(), None);
        replay.pin("LISTEN");
        replay.pin("temporary table");
        assert_eq!(replay.pinned(), Some("LISTEN"));
    }
}
