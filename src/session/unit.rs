//! A unit of client work: one Query or FunctionCall, or the extended-protocol messages up to a
//! Sync (through any Flush before it). A unit runs on one node; this module reads what it asks
//! for without copying.

use pgvigil_proto::classify::{Classification, Hint, Pin, Reason, TxControl};
use pgvigil_proto::frame::{header, messages, next_message, Message};
use pgvigil_proto::frontend::{self, Bind, Describe, Parse, Query};

use super::replay::Statements;
use super::sql_words::contains_ignore_case;
use crate::classifier::Classifier;

/// Past this many buffered bytes a unit without its Sync is routed on what has been seen
/// (conservatively: as a possible write) instead of waiting for the rest.
pub const LOOKAHEAD_LIMIT: usize = 1 << 20;

/// What a unit asks for, merged over its statements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnitFacts {
    /// Every message of the unit was seen (it ends with Sync, or is a Query or a FunctionCall),
    /// or as much of it as the client sends before it waits (a Flush with nothing after it).
    pub complete: bool,
    /// Bytes of the unit that were inspected (from its first message).
    pub inspected: usize,
    /// The unit names at least one statement (Query, Parse, or Bind/Describe of a statement).
    pub has_statement: bool,
    /// Every statement is provably read-only.
    pub read_only: bool,
    /// Why not.
    pub reason: Option<Reason>,
    /// The routing hint of the first statement.
    pub hint: Option<Hint>,
    /// The access mode of a BEGIN in the unit: `Some(mode)` when there is one (see
    /// `TxControl::Begin`).
    pub begin: Option<Option<bool>>,
    /// The last transaction-control statement of the unit.
    pub tx: Option<TxControl>,
    /// The first reason to pin the session to the primary.
    pub pin: Option<Pin>,
    /// A statement calls `set_config`.
    pub set_config: bool,
    /// A statement changes session state that must be replayed on other nodes.
    pub session_state: bool,
    /// A statement is SET LOCAL.
    pub local_setting: bool,
    /// The session's default transaction mode changes.
    pub session_read_only: Option<bool>,
    /// The number of statements in a Query (0 for extended units).
    pub query_statements: usize,
    /// The unit is a well-formed Query, whose text [`UnitFacts::query_sql`] gives without
    /// reading the message again.
    pub well_formed_query: bool,
    /// The number of statements the unit runs or prepares, whichever protocol carries them.
    pub statements: usize,
    /// The unit binds or describes a named statement made by an earlier unit.
    pub named_refs: bool,
    /// The unit parses a named statement.
    pub parses_named: bool,
    /// The unit executes a portal.
    pub executes: bool,
    /// The client waits after a Flush before it sends the rest of the unit, unseen yet.
    pub awaits_rest: bool,
    /// The unit binds or describes the unnamed statement without parsing it first.
    pub reuses_unnamed: bool,
    /// The unit's first message drops any unnamed statement the server connection had before
    /// anything can use it (see `client_scan::drops_unnamed`, which reads the same from bytes).
    pub drops_unnamed: bool,
    /// The classification of the last unnamed statement parsed in the unit.
    pub unnamed: Option<Classification>,
}

impl Default for UnitFacts {
    fn default() -> Self {
        UnitFacts {
            complete: false,
            inspected: 0,
            has_statement: false,
            read_only: true,
            reason: None,
            hint: None,
            begin: None,
            tx: None,
            pin: None,
            set_config: false,
            session_state: false,
            local_setting: false,
            session_read_only: None,
            query_statements: 0,
            well_formed_query: false,
            statements: 0,
            named_refs: false,
            parses_named: false,
            executes: false,
            awaits_rest: false,
            reuses_unnamed: false,
            drops_unnamed: false,
            unnamed: None,
        }
    }
}

/// What a lost connection needs of the last unit that named a statement (see
/// `loss::aftermath`): the session keeps this rather than the unit's whole facts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ending {
    /// The unit's last transaction-control statement.
    pub tx: Option<TxControl>,
    /// The unit has a BEGIN.
    pub begins: bool,
    /// Every statement of the unit is provably read-only.
    pub read_only: bool,
}

impl Default for Ending {
    /// What a session that has run no statement yet is left with.
    fn default() -> Self {
        UnitFacts::default().ending()
    }
}

impl UnitFacts {
    /// What a lost connection needs of this unit.
    pub fn ending(&self) -> Ending {
        Ending {
            tx: self.tx,
            begins: self.begin.is_some(),
            read_only: self.read_only,
        }
    }

    /// Merges one statement's classification.
    pub fn merge(&mut self, c: &Classification) {
        if !self.has_statement {
            self.hint = c.hint;
        }
        self.has_statement = true;
        // A lone BEGIN without an access mode takes the session's default, which the classifier
        // cannot know: the steering judges it by `begin`.
        let default_mode_begin =
            c.statements == 1 && c.tx == Some(TxControl::Begin { read_only: None });
        if !self.read_only || !(c.read_only || default_mode_begin) {
            self.read_only = false;
            self.reason = self.reason.or(c.reason);
        }
        if let Some(TxControl::Begin { read_only }) = c.tx {
            self.begin = Some(read_only);
        }
        self.tx = c.tx.or(self.tx);
        self.pin = self.pin.or(c.pin);
        self.set_config |= c.set_config;
        self.session_state |= c.session_state;
        self.local_setting |= c.local_setting;
        self.session_read_only = c.session_read_only.or(self.session_read_only);
        self.statements = self.statements.saturating_add(c.statements);
    }

    /// The text of the unit's Query when it is a well-formed one; `unit`: the bytes these facts
    /// were found in, from the unit's first byte (its Query ends where the inspection did).
    pub fn query_sql<'a>(&self, unit: &'a [u8]) -> Option<&'a [u8]> {
        let end = self.inspected.checked_sub(1)?;
        unit.get(5..end).filter(|_| self.well_formed_query)
    }

    /// The unit is one statement that only changes session state (SET, RESET, DISCARD, ...), sent
    /// as a Query or as Parse/Bind/Execute: it writes no WAL, so it holds no read back.
    pub fn lone_setting(&self) -> bool {
        self.session_state && self.statements == 1
    }

    /// A read that asks `pg_backend_pid()` must answer from the connection that runs the
    /// session's writes (the pid the client would cancel or look up), so it is not a read. A
    /// text without `(` calls no function: most reads are spared the search for the name.
    fn asks_backend_pid(&mut self, sql: &[u8], c: &Classification) {
        if c.read_only
            && memchr::memchr(b'(', sql).is_some()
            && contains_ignore_case(sql, b"pg_backend_pid")
        {
            self.read_only = false;
        }
    }

    /// Marks the unit as possibly writing for `reason`.
    pub(super) fn not_read_only(&mut self, reason: Reason) {
        self.read_only = false;
        self.reason = self.reason.or(Some(reason));
    }
}

/// Reads the unit that starts at the beginning of `input`. Stops at the first malformed or unknown
/// message (the relay reports it when it gets there).
pub fn inspect(
    input: &[u8],
    max_message: usize,
    classifier: &Classifier,
    statements: &Statements,
) -> UnitFacts {
    let mut facts = UnitFacts::default();
    let mut iter = messages(input, max_message);
    for message in iter.by_ref() {
        let Ok(message) = message else { break };
        let before = facts.inspected;
        facts.inspected += message.len();
        match message.tag {
            frontend::tag::QUERY => {
                facts.inspected = before;
                if before == 0 {
                    let sql = Query::parse(message.body).map(|q| q.sql).ok();
                    let c = sql
                        .map(|sql| classifier.query(sql))
                        .unwrap_or(Classification::ONE_WRITE);
                    facts.merge(&c);
                    facts.asks_backend_pid(sql.unwrap_or_default(), &c);
                    facts.query_statements = c.statements;
                    facts.inspected = message.len();
                    facts.drops_unnamed = sql.is_some();
                    facts.well_formed_query = sql.is_some();
                }
                // A Query after unsynced extended messages starts its own unit.
                facts.complete = true;
                return facts;
            }
            frontend::tag::FUNCTION_CALL => {
                facts.has_statement = true;
                facts.not_read_only(Reason::WriteFunction);
                facts.complete = true;
                return facts;
            }
            frontend::tag::PARSE => {
                let parsed = Parse::parse(message.body).ok();
                let c = parsed
                    .map(|p| classifier.parse(p.sql))
                    .unwrap_or(Classification::ONE_WRITE);
                facts.merge(&c);
                facts.asks_backend_pid(parsed.map(|p| p.sql).unwrap_or_default(), &c);
                facts.parses_named |= parsed.is_some_and(|p| !p.name.is_empty());
                if parsed.is_some_and(|p| p.name.is_empty()) {
                    facts.unnamed = Some(c);
                    facts.drops_unnamed |= before == 0;
                }
            }
            frontend::tag::BIND => {
                let name = Bind::parse(message.body).ok().map(|b| b.statement);
                // (`refer` judges the unnamed statement without looking back for its Parse.)
                let here = name
                    .is_some_and(|n| !n.is_empty() && parsed_before(input, before, max_message, n));
                refer(&mut facts, name, here, statements);
            }
            frontend::tag::DESCRIBE => match Describe::parse(message.body) {
                Ok(d) if d.kind == b'S' => {
                    let here =
                        !d.name.is_empty() && parsed_before(input, before, max_message, d.name);
                    refer(&mut facts, Some(d.name), here, statements);
                }
                _ => {}
            },
            frontend::tag::FLUSH if facts.inspected < input.len() => {
                // The unit goes on to its Sync, and all of it runs on one node.
            }
            frontend::tag::FLUSH => {
                // The client waits for what it flushed before it sends the rest of the unit,
                // which will run on the same node without being seen now (the steering decides
                // where such a unit may go, and notes the rest's writes as it is forwarded).
                facts.awaits_rest = true;
                facts.complete = true;
                return facts;
            }
            frontend::tag::SYNC | frontend::tag::TERMINATE => {
                facts.complete = true;
                return facts;
            }
            frontend::tag::EXECUTE => facts.executes = true,
            frontend::tag::CLOSE => {}
            // CopyData and the like never start a unit; unknown tags end the inspection.
            _ => {
                facts.inspected = before;
                facts.complete = true;
                return facts;
            }
        }
    }
    if let Some(bind) = large_bind_at(input, facts.inspected, max_message) {
        // Routed on its names (conservatively, as a possible write): its values pass in pieces.
        let here = parsed_before(input, facts.inspected, max_message, bind.statement);
        refer(&mut facts, Some(bind.statement), here, statements);
        facts.complete = true;
        facts.not_read_only(Reason::Unterminated);
        return facts;
    }
    if facts.inspected >= LOOKAHEAD_LIMIT {
        facts.complete = true;
        facts.not_read_only(Reason::Unterminated);
    }
    facts
}

/// The names of a Bind larger than [`LOOKAHEAD_LIMIT`] begun at byte `pos` of `input` and not
/// all there yet: all that routing reads of it, so that its values can pass in pieces.
pub fn large_bind_at(input: &[u8], pos: usize, max_message: usize) -> Option<Bind<'_>> {
    let rest = input.get(pos..)?;
    let (tag, total) = header(rest, max_message).ok()??;
    if tag != frontend::tag::BIND || total <= LOOKAHEAD_LIMIT || rest.len() >= total {
        return None;
    }
    Bind::names(rest.get(5..)?).ok()
}

/// Merges what a Bind or Describe of statement `name` implies; `parsed_here`: the unit parses
/// `name` before it.
fn refer(facts: &mut UnitFacts, name: Option<&[u8]>, parsed_here: bool, statements: &Statements) {
    match name {
        Some([]) => {
            if facts.unnamed.is_none() {
                facts.reuses_unnamed = true;
                facts.has_statement = true;
            }
        }
        // Parse, Describe, Sync is how drivers prepare: the text was merged with the Parse, and
        // the session does not know the statement until that Parse is forwarded.
        Some(_) if parsed_here => facts.has_statement = true,
        Some(name) => match statements.get(name) {
            Some(prepared) => {
                facts.named_refs = true;
                facts.merge(&prepared.class);
            }
            None => {
                facts.has_statement = true;
                facts.not_read_only(Reason::Statement);
            }
        },
        None => {
            facts.has_statement = true;
            facts.not_read_only(Reason::Statement);
        }
    }
}

/// Calls `visit` with every named statement the unit at the start of `input` binds or describes
/// without parsing it earlier in the same unit. Allocates nothing.
pub fn named_references(input: &[u8], max_message: usize, mut visit: impl FnMut(&[u8])) {
    let mut pos = 0;
    while let Some(message) = message_at(input, pos, max_message) {
        let name = match message.tag {
            frontend::tag::BIND => Bind::parse(message.body).ok().map(|b| b.statement),
            frontend::tag::DESCRIBE => Describe::parse(message.body)
                .ok()
                .filter(|d| d.kind == b'S')
                .map(|d| d.name),
            frontend::tag::SYNC | frontend::tag::QUERY => return,
            _ => None,
        };
        if let Some(name) = name.filter(|n| !n.is_empty()) {
            if !parsed_before(input, pos, max_message, name) {
                visit(name);
            }
        }
        pos += message.len();
        if pos > LOOKAHEAD_LIMIT {
            return;
        }
    }
    if let Some(bind) = large_bind_at(input, pos, max_message) {
        if !bind.statement.is_empty() && !parsed_before(input, pos, max_message, bind.statement) {
            visit(bind.statement);
        }
    }
}

/// Whether the unit at the start of `input` binds or describes the unnamed statement before
/// it parses one (so it uses the one an earlier unit parsed).
pub fn reuses_unnamed(input: &[u8], max_message: usize) -> bool {
    let mut pos = 0;
    while let Some(message) = message_at(input, pos, max_message) {
        let body = message.body;
        match message.tag {
            // Even one that fails drops the earlier unnamed statement.
            frontend::tag::PARSE if Parse::parse(body).is_ok_and(|p| p.name.is_empty()) => {
                return false;
            }
            frontend::tag::BIND if Bind::parse(body).is_ok_and(|b| b.statement.is_empty()) => {
                return true;
            }
            frontend::tag::DESCRIBE
                if Describe::parse(body).is_ok_and(|d| d.kind == b'S' && d.name.is_empty()) =>
            {
                return true;
            }
            frontend::tag::SYNC | frontend::tag::QUERY => return false,
            _ => {}
        }
        pos += message.len();
        if pos > LOOKAHEAD_LIMIT {
            return false;
        }
    }
    large_bind_at(input, pos, max_message).is_some_and(|bind| bind.statement.is_empty())
}

/// Whether a Parse of statement `name` comes before byte `end` of the unit.
fn parsed_before(input: &[u8], end: usize, max_message: usize, name: &[u8]) -> bool {
    let mut pos = 0;
    while pos < end {
        let Some(message) = message_at(input, pos, max_message) else {
            return false;
        };
        if message.tag == frontend::tag::PARSE
            && Parse::parse(message.body).is_ok_and(|p| p.name == name)
        {
            return true;
        }
        pos += message.len();
    }
    false
}

fn message_at(input: &[u8], pos: usize, max_message: usize) -> Option<Message<'_>> {
    next_message(input.get(pos..)?, max_message).ok().flatten()
}

#[cfg(test)]
mod tests;
