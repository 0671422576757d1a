//! Transaction pooling, the session's side of statement names: how each client message that
//! names a prepared statement goes to the server (renamed to the connection's `pgv_<id>`, or
//! answered by pgvigil), and the named Parses forwarded and not answered yet.
//!
//! A named statement is recorded only once the server answered its Parse with ParseComplete:
//! one that fails leaves no name behind, as on PostgreSQL. Answers come in the order of the
//! requests, so the first Parse waiting is the one a ParseComplete answers; an ErrorResponse
//! makes the server skip every message up to the next Sync (PostgreSQL docs, "Extended Query"),
//! so the Parses waiting in the same Sync-delimited stretch as the error never ran.

use std::collections::VecDeque;

use bytes::{BufMut, Bytes, BytesMut};
use pgvigil_proto::backend;
use pgvigil_proto::classify::Classification;
use pgvigil_proto::encode::{self, PgError, Severity};
use pgvigil_proto::frontend::{self, Parse};
use pgvigil_proto::sqlstate;
use pgvigil_proto::TxStatus;

use super::recover::IN_FAILED;
use super::replay::{Prepared, Replayable};
use super::spare::Spares;
use super::unnamed::OwnUnnamed;
use crate::proxy::Proxy;
use crate::statements::{self, ServerStatements, StatementId, NO_STATEMENT};
use crate::topology::NodeId;

/// How a client message goes to the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outgoing {
    /// Unchanged.
    AsIs,
    /// With the statement name at bytes `at..at + len` of the frame replaced by `pgv_<id>`.
    Renamed {
        /// Where the client's name starts in the frame.
        at: usize,
        /// Its length.
        len: usize,
        /// The server-side statement.
        id: StatementId,
    },
    /// Not sent: a Parse of a statement the connection already has, answered with
    /// ParseComplete by pgvigil.
    Answered,
    /// A Parse of a name the client already uses: replaced by a Parse the server rejects, whose
    /// error is then replaced by PostgreSQL's own for the client's name (see
    /// [`Naming::duplicate_error`]). The client's name is at bytes `at..at + len`.
    Duplicate {
        /// Where the client's name starts in the frame.
        at: usize,
        /// Its length.
        len: usize,
    },
}

/// SQL the server cannot parse, sent instead of a Parse that reuses a client's name: its syntax
/// error, which quotes this word, marks the place of PostgreSQL's "already exists" error.
const DUPLICATE_MARKER: &[u8] = b"pgvigil_duplicate_statement_name";

/// A named Parse forwarded, waiting for its answer.
#[derive(Debug)]
pub struct PendingParse {
    /// The client's name for it.
    pub name: Box<[u8]>,
    /// The client's Parse message, whole.
    pub parse: Bytes,
    /// What its text is.
    pub class: Classification,
    /// Its server-side statement.
    pub id: StatementId,
    /// The client closed it before the answer came.
    pub closed: bool,
    /// Session pooling: the client's statement of the same name it replaces in the session's
    /// record, put back should this Parse fail (the nodes keep that one then).
    pub replaced: Option<Prepared>,
}

/// A Parse forwarded (named or not: answers come in order), waiting for its answer.
#[derive(Debug)]
struct InFlight {
    named: Option<Box<PendingParse>>,
    /// Transaction pooling: the client's Parse of the unnamed statement, which becomes the
    /// session's unnamed statement if it succeeds.
    unnamed: Option<Box<OwnUnnamed>>,
    /// The requests answered by ReadyForQuery (Sync, Query, FunctionCall) forwarded before it.
    epoch: u64,
}

/// The Parses in flight on the current connection.
#[derive(Debug, Default)]
pub struct Naming {
    /// Allocated with the first Parse forwarded since the connection was last reset (see
    /// [`Naming::reset`]): an idle session under transaction pooling has none.
    queues: Option<Box<Queues>>,
    /// A statement the unit in flight uses could not be prepared on the connection because
    /// its transaction block had failed: the server's 26000 for it stands for PostgreSQL's
    /// 25P02 (PostgreSQL, which has the statement, refuses the Bind for the failed block).
    missing_in_failed_block: bool,
    /// Requests answered by ReadyForQuery forwarded since the connection was last quiet.
    requests: u64,
    /// ReadyForQuery messages seen since then.
    readies: u64,
}

/// Queues with room for more entries than this are freed rather than kept.
const SPARE_QUEUES_ROOM: usize = 16;

thread_local! {
    /// Queues kept for the next unit that forwards a Parse: under transaction pooling a client
    /// that parses in every unit (the extended protocol's usual way) would otherwise allocate
    /// and free them, and their room, at every unit.
    static SPARE_QUEUES: Spares<Box<Queues>> = const { Spares::new() };
}

/// What [`Naming`] keeps of the Parses in flight.
#[derive(Debug, Default)]
struct Queues {
    pending: VecDeque<InFlight>,
    /// Client names of Parses sent as [`Outgoing::Duplicate`], in order.
    duplicates: VecDeque<Box<[u8]>>,
}

impl Naming {
    /// A request that a ReadyForQuery answers (Sync, Query, FunctionCall) was forwarded.
    pub fn request(&mut self) {
        self.requests += 1;
    }

    /// A named Parse was forwarded as statement `id`.
    pub fn sent(&mut self, name: &[u8], parse: &[u8], class: Classification, id: StatementId) {
        let named = PendingParse {
            name: name.into(),
            parse: Bytes::copy_from_slice(parse),
            class,
            id,
            closed: false,
            replaced: None,
        };
        let epoch = self.requests;
        let named = Some(Box::new(named));
        let unnamed = None;
        self.queues().pending.push_back(InFlight {
            named,
            unnamed,
            epoch,
        });
    }

    /// Session pooling: a Parse of the client's `name`, recorded as it was forwarded, replacing
    /// `replaced` in the record until its answer comes.
    pub fn sent_recorded(
        &mut self,
        name: &[u8],
        class: Classification,
        replaced: Option<Prepared>,
    ) {
        let named = PendingParse {
            name: name.into(),
            parse: Bytes::new(),
            class,
            id: NO_STATEMENT,
            closed: false,
            replaced,
        };
        let epoch = self.requests;
        let named = Some(Box::new(named));
        let unnamed = None;
        self.queues().pending.push_back(InFlight {
            named,
            unnamed,
            epoch,
        });
    }

    /// A Parse that prepares no named statement was forwarded.
    pub fn sent_unnamed(&mut self) {
        let epoch = self.requests;
        self.queues().pending.push_back(InFlight {
            named: None,
            unnamed: None,
            epoch,
        });
    }

    /// Transaction pooling: the client's Parse of the unnamed statement was forwarded; it is
    /// the session's unnamed statement `own` once the server answers ParseComplete.
    pub fn sent_own_unnamed(&mut self, own: Box<OwnUnnamed>) {
        let epoch = self.requests;
        self.queues().pending.push_back(InFlight {
            named: None,
            unnamed: Some(own),
            epoch,
        });
    }

    fn queues(&mut self) -> &mut Queues {
        self.queues
            .get_or_insert_with(|| SPARE_QUEUES.with(Spares::take).unwrap_or_default())
    }

    fn named(&self) -> impl DoubleEndedIterator<Item = &PendingParse> {
        let pending = self.queues.iter().flat_map(|q| q.pending.iter());
        pending.filter_map(|p| p.named.as_deref())
    }

    /// The latest Parse in flight of the client's `name` that the client has not closed.
    pub fn live(&self, name: &[u8]) -> Option<&PendingParse> {
        self.named().rev().find(|p| !p.closed && &*p.name == name)
    }

    /// Whether a Parse in flight prepares statement `id` on the connection.
    pub fn prepares(&self, id: StatementId) -> bool {
        self.named().any(|p| p.id == id)
    }

    /// The client closed its `name`: a Parse of it in flight no longer names a statement.
    pub fn close(&mut self, name: &[u8]) {
        let pending = self.queues.iter_mut().flat_map(|q| q.pending.iter_mut());
        for p in pending.filter_map(|p| p.named.as_deref_mut()) {
            if &*p.name == name {
                p.closed = true;
            }
        }
    }

    /// The client's unnamed Parse forwarded last is a statement of class `class`.
    pub fn classified_unnamed(&mut self, class: Classification) {
        let last = self.queues.as_mut().and_then(|q| q.pending.back_mut());
        if let Some(own) = last.and_then(|p| p.unnamed.as_deref_mut()) {
            own.class = Some(class);
        }
    }

    /// The server answered the first Parse in flight with ParseComplete: the named one it
    /// prepared, if it was named, or the session's unnamed statement it prepared, if it was
    /// the client's unnamed Parse under transaction pooling.
    pub fn parse_complete(&mut self) -> (Option<Box<PendingParse>>, Option<Box<OwnUnnamed>>) {
        let first = self.queues.as_mut().and_then(|q| q.pending.pop_front());
        first.map_or((None, None), |p| (p.named, p.unnamed))
    }

    /// The server sent an ErrorResponse: the Parses in flight before the next Sync never ran;
    /// the named ones are returned, in the order they were sent, and whether one of them was
    /// the client's unnamed Parse under transaction pooling.
    pub fn error(&mut self) -> (Vec<PendingParse>, bool) {
        let readies = self.readies;
        let mut failed = Vec::new();
        let mut unnamed = false;
        let Some(queues) = self.queues.as_mut() else {
            return (failed, unnamed);
        };
        queues.pending.retain_mut(|p| {
            if p.epoch != readies {
                return true;
            }
            failed.extend(p.named.take().map(|named| *named));
            unnamed |= p.unnamed.is_some();
            false
        });
        (failed, unnamed)
    }

    /// The server sent ReadyForQuery; `quiet`: it answered every request. Named Parses still in
    /// flight then were miscounted (a Sync the server ignored in COPY mode): returned, their
    /// statements' presence on the connection unknown.
    pub fn ready(&mut self, quiet: bool) -> Vec<StatementId> {
        self.readies += 1;
        self.missing_in_failed_block = false;
        if !quiet {
            return Vec::new();
        }
        self.requests = 0;
        self.readies = 0;
        let Some(queues) = self.queues.as_mut() else {
            return Vec::new();
        };
        queues.duplicates.clear();
        queues
            .pending
            .drain(..)
            .filter_map(|p| p.named.map(|n| n.id))
            .filter(|id| *id != NO_STATEMENT)
            .collect()
    }

    /// The connection is gone or given back: nothing in flight on it matters any more. The
    /// queues' room is kept for the next unit of any session on this thread when it is small.
    pub fn reset(&mut self) {
        if let Some(mut queues) = std::mem::take(self).queues {
            if queues.pending.capacity() <= SPARE_QUEUES_ROOM
                && queues.duplicates.capacity() <= SPARE_QUEUES_ROOM
            {
                queues.pending.clear();
                queues.duplicates.clear();
                SPARE_QUEUES.with(|spare| spare.give(queues));
            }
        }
    }

    /// A Parse of the client's `name`, which it already uses, goes to the server as the failing
    /// Parse written to `out`.
    pub fn send_duplicate(&mut self, name: &[u8], out: &mut BytesMut) {
        self.queues().duplicates.push_back(name.into());
        self.sent_unnamed();
        encode::message(out, b'P', |b| {
            statements::put_name(b, statements::NO_STATEMENT);
            b.put_u8(0);
            b.put_slice(DUPLICATE_MARKER);
            b.put_u8(0);
            b.put_u16(0);
        });
    }

    /// A statement the next unit uses was refused on the connection: its transaction block
    /// has failed (see [`Naming::failed_block_error`]).
    pub fn missing_in_failed_block(&mut self) {
        self.missing_in_failed_block = true;
    }

    /// Writes to `out` what the client is owed instead of the server's error `code`, when that
    /// error is the 26000 of a statement missing on a connection whose transaction block failed:
    /// the 25P02 PostgreSQL answers there. Once per unit.
    pub fn failed_block_error(&mut self, code: Option<&[u8]>, out: &mut BytesMut) -> bool {
        if !(self.missing_in_failed_block
            && code == Some(sqlstate::INVALID_SQL_STATEMENT_NAME.as_bytes()))
        {
            return false;
        }
        self.missing_in_failed_block = false;
        IN_FAILED.encode(out);
        true
    }

    /// Whether a failing Parse sent by [`Naming::send_duplicate`] waits for its error.
    pub fn expects_duplicate(&self) -> bool {
        self.queues
            .as_ref()
            .is_some_and(|q| !q.duplicates.is_empty())
    }

    /// When the ErrorResponse `message` (its M field) answers a failing Parse sent by
    /// [`Naming::send_duplicate`], PostgreSQL's error for the client's name, written to `out`.
    pub fn duplicate_error(&mut self, message: &[u8], out: &mut BytesMut) -> bool {
        let ours = self.expects_duplicate()
            && message
                .windows(DUPLICATE_MARKER.len())
                .any(|w| w == DUPLICATE_MARKER);
        let queues = self.queues.as_mut().filter(|_| ours);
        let Some(name) = queues.and_then(|q| q.duplicates.pop_front()) else {
            return false;
        };
        encode::error_response_with(
            out,
            &PgError {
                severity: Severity::Error,
                code: sqlstate::DUPLICATE_PREPARED_STATEMENT,
                message: &format!(
                    "prepared statement \"{}\" already exists",
                    String::from_utf8_lossy(&name)
                ),
                detail: None,
                hint: None,
            },
        );
        true
    }
}

/// The current server connection, as the relay sees it when a client message that names a
/// prepared statement goes to it under transaction pooling.
pub struct OnServer<'a> {
    /// The statements the connection has under pgvigil's names.
    pub statements: &'a mut ServerStatements,
    /// The server has answered everything and nothing was sent to it since: pgvigil may answer
    /// the message itself.
    pub fresh: bool,
    /// The connection's transaction status.
    pub tx: TxStatus,
}

/// Transaction pooling: how a client message that names a prepared statement goes to the
/// server. A Parse gets the shared statement of its key, or one of its own when the
/// connection has the shared one already and pgvigil cannot answer for it (the server
/// owes earlier answers, or is in a failed transaction block, which refuses a Parse); a
/// Parse of a name the client uses already fails as on PostgreSQL. Bind and Describe use
/// the statement's name on the nodes; Close forgets the client's name and closes nothing
/// there (other sessions share the statement). `(tag, frame, parse)`: the message's type, the
/// whole message, and the message read as a Parse when it is a well-formed one.
pub fn name_statement(
    replay: &mut Replayable,
    current: NodeId,
    (tag, frame, parse): (u8, &[u8], Option<Parse<'_>>),
    server: OnServer<'_>,
    proxy: &Proxy,
) -> Outgoing {
    let Some((at, len)) = statement_name(tag, frame) else {
        if tag == frontend::tag::PARSE {
            match parse {
                Some(parse) if parse.name.is_empty() => {
                    // (Classified as it is noted: see `Naming::classified_unnamed`.)
                    let own = OwnUnnamed::new(proxy.statements.unique(), frame);
                    replay.naming.sent_own_unnamed(own);
                }
                _ => replay.naming.sent_unnamed(),
            }
        }
        return Outgoing::AsIs;
    };
    let name = &frame[at..at + len];
    match tag {
        frontend::tag::PARSE => {
            if replay.uses_name(name) {
                return Outgoing::Duplicate { at, len };
            }
            let Some(after_name) = frame.get(at + len + 1..) else {
                replay.naming.sent_unnamed();
                return Outgoing::AsIs;
            };
            let key = replay.statement_key(after_name);
            let mut id = proxy.statements.id_for(&key);
            let class = match parse {
                Some(parse) => proxy.classifier.parse(parse.sql),
                None => {
                    replay.naming.sent_unnamed();
                    return Outgoing::AsIs;
                }
            };
            if server.statements.has(id) || replay.naming.prepares(id) {
                if server.fresh && server.tx != TxStatus::Failed {
                    server.statements.touch(id);
                    replay.prepared_shared(name, frame, class, id, current);
                    return Outgoing::Answered;
                }
                id = proxy.statements.unique();
            }
            replay.naming.sent(name, frame, class, id);
            Outgoing::Renamed { at, len, id }
        }
        frontend::tag::CLOSE => match replay.server_id(name) {
            Some(_) => Outgoing::Renamed {
                at,
                len,
                id: NO_STATEMENT,
            },
            None => Outgoing::AsIs,
        },
        _ => match replay.server_id(name) {
            Some(id) => {
                // A use keeps the statement recent; one the connection lacks (refused there in
                // a failed block: the server answers 26000) is not recorded as there.
                if server.statements.has(id) {
                    server.statements.touch(id);
                }
                Outgoing::Renamed { at, len, id }
            }
            None => Outgoing::AsIs,
        },
    }
}

/// Writes what goes instead of the client message `frame` for `outgoing`: to the server
/// (`out`), or pgvigil's own answer to the client (`to_client`).
pub fn replace(
    outgoing: Outgoing,
    frame: &[u8],
    naming: &mut Naming,
    out: &mut BytesMut,
    to_client: &mut BytesMut,
) {
    match outgoing {
        Outgoing::AsIs => out.extend_from_slice(frame),
        Outgoing::Renamed { at, len, id } => rename(frame, at, len, id, out),
        Outgoing::Answered => encode::message(to_client, backend::tag::PARSE_COMPLETE, |_| {}),
        Outgoing::Duplicate { at, len } => naming.send_duplicate(&frame[at..at + len], out),
    }
}

/// Writes `frame` to `out` with bytes `at..at + len` (a statement name) replaced by the name
/// of statement `id`.
pub fn rename(frame: &[u8], at: usize, len: usize, id: StatementId, out: &mut BytesMut) {
    rename_start(frame, frame.len(), at, len, id, out);
}

/// Like [`rename`] for the start of a message of `total` bytes that passes in pieces: the
/// header says the renamed message's length, and the rest follows as it arrives.
pub fn rename_start(
    frame: &[u8],
    total: usize,
    at: usize,
    len: usize,
    id: StatementId,
    out: &mut BytesMut,
) {
    let Some((head, tail)) = frame.get(5..at).zip(frame.get(at + len..)) else {
        out.extend_from_slice(frame);
        return;
    };
    let rest = total.saturating_sub(at + len);
    let body = head.len() + statements::name_len(id) + rest;
    out.put_u8(frame[0]);
    out.put_u32((body + 4) as u32);
    out.put_slice(head);
    statements::put_name(out, id);
    out.put_slice(tail);
}

/// Where the statement name of a Parse, Bind, Describe or Close frame starts and how long it
/// is; `None` when it has none (unnamed, a portal) or the frame is malformed.
pub fn statement_name(tag: u8, frame: &[u8]) -> Option<(usize, usize)> {
    let body = frame.get(5..)?;
    let at = match tag {
        b'P' => 5,
        b'B' => 5 + body.iter().position(|b| *b == 0)? + 1,
        b'D' | b'C' if body.first() == Some(&b'S') => 6,
        _ => return None,
    };
    let len = frame.get(at..)?.iter().position(|b| *b == 0)?;
    (len > 0).then_some((at, len))
}

/// A SQL statement that drops named prepared statements.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SqlDrop {
    /// `DEALLOCATE [PREPARE] ALL`.
    DeallocateAll,
    /// `DEALLOCATE [PREPARE] name`, with the name as PostgreSQL reads it.
    Deallocate(Vec<u8>),
    /// `DISCARD ALL`.
    DiscardAll,
}

/// Reads a Query that is one `DEALLOCATE` or `DISCARD ALL` (an optional `;` and whitespace
/// after it); anything else is `None`.
pub fn sql_drop(sql: &[u8]) -> Option<SqlDrop> {
    // Runs on every Query under transaction pooling: most start with another letter.
    if sql.trim_ascii_start().first()? | 0x20 != b'd' {
        return None;
    }
    let mut words = Words(sql);
    let first = words.next()?;
    let drop = if first.eq_ignore_ascii_case(b"discard") {
        let all = words.next()?;
        all.eq_ignore_ascii_case(b"all")
            .then_some(SqlDrop::DiscardAll)?
    } else if first.eq_ignore_ascii_case(b"deallocate") {
        let mut name = words.next()?;
        if name.eq_ignore_ascii_case(b"prepare") {
            name = words.next()?;
        }
        if name.eq_ignore_ascii_case(b"all") {
            SqlDrop::DeallocateAll
        } else {
            SqlDrop::Deallocate(identifier(name)?)
        }
    } else {
        return None;
    };
    let rest = words.0.trim_ascii();
    (rest.is_empty() || rest == b";").then_some(drop)
}

/// An identifier as PostgreSQL reads it: a quoted one as written (`""` for `"`), an unquoted
/// one folded to lower case (ASCII letters only, as PostgreSQL does for multibyte encodings).
fn identifier(word: &[u8]) -> Option<Vec<u8>> {
    match word.strip_prefix(b"\"") {
        Some(quoted) => {
            let inner = quoted.strip_suffix(b"\"")?;
            let mut name = Vec::with_capacity(inner.len());
            let mut bytes = inner.iter();
            while let Some(&b) = bytes.next() {
                if b == b'"' && bytes.next() != Some(&b'"') {
                    return None;
                }
                name.push(b);
            }
            (!name.is_empty()).then_some(name)
        }
        None => word
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'_' || *b == b'$' || !b.is_ascii())
            .then(|| word.to_ascii_lowercase()),
    }
}

/// Splits SQL into words: whitespace separates them, a `"quoted identifier"` is one word, and
/// `;` ends the words (what follows is left in place).
struct Words<'a>(&'a [u8]);

impl<'a> Iterator for Words<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        let rest = self.0.trim_ascii_start();
        if rest.is_empty() || rest[0] == b';' {
            self.0 = rest;
            return None;
        }
        let end = if rest[0] == b'"' {
            let mut i = 1;
            loop {
                match rest.get(i) {
                    None => break rest.len(),
                    Some(b'"') if rest.get(i + 1) == Some(&b'"') => i += 2,
                    Some(b'"') => break i + 1,
                    Some(_) => i += 1,
                }
            }
        } else {
            rest.iter()
                .position(|b| b.is_ascii_whitespace() || *b == b';')
                .unwrap_or(rest.len())
        };
        let (word, after) = rest.split_at(end);
        self.0 = after;
        Some(word)
    }
}

#[cfg(test)]
mod tests;
