//! A unit of client work: one Query or FunctionCall, or the extended-protocol messages up to a
//! Sync or Flush. A unit runs on one node; this module reads what it asks for without copying.

use pgvigil_proto::classify::{
    classify, Classification, FunctionLists, Hint, Pin, Reason, TxControl,
};
use pgvigil_proto::frame::{messages, next_message, Message};
use pgvigil_proto::frontend::{self, Bind, Describe, Parse, Query};

use super::steering::Statements;

/// Past this many buffered bytes a unit without its Sync is routed on what has been seen
/// (conservatively: as a possible write) instead of waiting for the rest.
pub const LOOKAHEAD_LIMIT: usize = 1 << 20;

/// What a unit asks for, merged over its statements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnitFacts {
    /// Every message of the unit was seen (it ends with Sync or Flush, or is a Query or a
    /// FunctionCall).
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
    /// The first reason to pin the session to the primary.
    pub pin: Option<Pin>,
    /// A statement changes session state that must be replayed on other nodes.
    pub session_state: bool,
    /// The session's default transaction mode changes.
    pub session_read_only: Option<bool>,
    /// The number of statements in a Query (0 for extended units).
    pub query_statements: usize,
    /// The unit binds or describes a named statement.
    pub named_refs: bool,
    /// The unit binds or describes the unnamed statement without parsing it first.
    pub reuses_unnamed: bool,
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
            pin: None,
            session_state: false,
            session_read_only: None,
            query_statements: 0,
            named_refs: false,
            reuses_unnamed: false,
            unnamed: None,
        }
    }
}

impl UnitFacts {
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
        self.pin = self.pin.or(c.pin);
        self.session_state |= c.session_state;
        self.session_read_only = c.session_read_only.or(self.session_read_only);
    }

    /// Marks the unit as possibly writing for `reason`.
    fn not_read_only(&mut self, reason: Reason) {
        self.read_only = false;
        self.reason = self.reason.or(Some(reason));
    }
}

/// Reads the unit that starts at the beginning of `input`. Stops at the first malformed or unknown
/// message (the relay reports it when it gets there).
pub fn inspect(
    input: &[u8],
    max_message: usize,
    functions: &FunctionLists,
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
                    let c = Query::parse(message.body)
                        .map(|q| classify(q.sql, functions))
                        .unwrap_or(UNREADABLE);
                    facts.merge(&c);
                    facts.query_statements = c.statements;
                    facts.inspected = message.len();
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
                    .map(|p| classify(p.sql, functions))
                    .unwrap_or(UNREADABLE);
                facts.merge(&c);
                if parsed.is_some_and(|p| p.name.is_empty()) {
                    facts.unnamed = Some(c);
                }
            }
            frontend::tag::BIND => {
                let name = Bind::parse(message.body).map(|b| b.statement);
                refer(
                    &mut facts,
                    name.ok(),
                    statements,
                    input,
                    before,
                    max_message,
                );
            }
            frontend::tag::DESCRIBE => match Describe::parse(message.body) {
                Ok(d) if d.kind == b'S' => refer(
                    &mut facts,
                    Some(d.name),
                    statements,
                    input,
                    before,
                    max_message,
                ),
                _ => {}
            },
            frontend::tag::SYNC | frontend::tag::FLUSH | frontend::tag::TERMINATE => {
                facts.complete = true;
                return facts;
            }
            frontend::tag::CLOSE | frontend::tag::EXECUTE => {}
            // CopyData and the like never start a unit; unknown tags end the inspection.
            _ => {
                facts.inspected = before;
                facts.complete = true;
                return facts;
            }
        }
    }
    if facts.inspected >= LOOKAHEAD_LIMIT {
        facts.complete = true;
        facts.not_read_only(Reason::Unterminated);
    }
    facts
}

/// Merges what a Bind or Describe of statement `name`, at byte `at` of the unit in `input`,
/// implies.
fn refer(
    facts: &mut UnitFacts,
    name: Option<&[u8]>,
    statements: &Statements,
    input: &[u8],
    at: usize,
    max_message: usize,
) {
    match name {
        // Parsed earlier in this unit (as drivers send Parse + Describe + Sync): its text was
        // classified there, and any older statement of that name is replaced by then.
        Some(name) if !name.is_empty() && parsed_before(input, at, max_message, name) => {}
        Some([]) => {
            if facts.unnamed.is_none() {
                facts.reuses_unnamed = true;
                facts.has_statement = true;
            }
        }
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

/// The classification of a message that cannot be read: not read-only.
const UNREADABLE: Classification = Classification {
    read_only: false,
    reason: Some(Reason::Statement),
    tx: None,
    session_state: false,
    session_read_only: None,
    pin: None,
    hint: None,
    statements: 1,
};

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
            frontend::tag::SYNC | frontend::tag::FLUSH | frontend::tag::QUERY => return,
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
mod tests {
    use bytes::{BufMut, BytesMut};
    use pgvigil_proto::encode;

    use super::*;

    const MAX: usize = 1 << 20;

    fn parse(out: &mut BytesMut, name: &[u8], sql: &[u8]) {
        encode::message(out, frontend::tag::PARSE, |b| {
            b.put_slice(name);
            b.put_u8(0);
            b.put_slice(sql);
            b.put_u8(0);
            b.put_i16(0);
        });
    }

    fn describe_statement(out: &mut BytesMut, name: &[u8]) {
        encode::message(out, frontend::tag::DESCRIBE, |b| {
            b.put_u8(b'S');
            b.put_slice(name);
            b.put_u8(0);
        });
    }

    fn facts_of(unit: &[u8]) -> UnitFacts {
        inspect(unit, MAX, &FunctionLists::default(), &Statements::new())
    }

    /// Parse + Describe + Sync of statement `name`, as drivers prepare.
    fn prepare(name: &[u8], sql: &[u8]) -> BytesMut {
        let mut unit = BytesMut::new();
        parse(&mut unit, name, sql);
        describe_statement(&mut unit, name);
        encode::sync(&mut unit);
        unit
    }

    #[test]
    fn a_statement_described_where_it_is_parsed_is_judged_by_its_text() {
        let read = facts_of(&prepare(b"s0", b"SELECT 1"));
        assert!(read.complete && read.read_only, "{read:?}");
        assert!(!read.named_refs);
        let write = facts_of(&prepare(b"s1", b"INSERT INTO t VALUES (1)"));
        assert!(!write.read_only, "{write:?}");
    }

    #[test]
    fn a_statement_the_session_never_parsed_is_not_a_read() {
        let mut unit = BytesMut::new();
        parse(&mut unit, b"s0", b"SELECT 1");
        describe_statement(&mut unit, b"other");
        encode::sync(&mut unit);
        let facts = facts_of(&unit);
        assert!(!facts.read_only, "{facts:?}");
        assert_eq!(facts.reason, Some(Reason::Statement));
    }

    #[test]
    fn a_lone_begin_leaves_its_access_mode_to_the_session() {
        let query = |sql: &[u8]| {
            let mut unit = BytesMut::new();
            encode::query(&mut unit, sql);
            facts_of(&unit)
        };
        let begin = query(b"BEGIN");
        assert_eq!((begin.read_only, begin.begin), (true, Some(None)));
        let read_write = query(b"BEGIN READ WRITE");
        assert_eq!(read_write.begin, Some(Some(false)));
        assert!(!read_write.read_only);
        let with_a_write = query(b"BEGIN; INSERT INTO t VALUES (1); COMMIT");
        assert!(!with_a_write.read_only, "{with_a_write:?}");
    }
}
