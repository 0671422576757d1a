//! Statements that return settings to their reset values, run by pgvigil for the client.
//!
//! PostgreSQL resets a setting to the value the client's startup packet gave it (its "reset
//! value"), else to the server's default. A pooled server connection logged in without the
//! client's startup parameters (they reach it as SET), so its reset values are the server's:
//! forwarded as they are, `RESET application_name`, `RESET ALL`, `SET name TO DEFAULT` and
//! `DISCARD ALL` would lose the client's startup values. One of these statements sent alone (a
//! simple Query, or one unnamed Parse, Bind, Describe, Execute, Sync) is therefore run by
//! pgvigil: it sends the statement followed by the startup parameters the statement reset, and
//! answers the client as PostgreSQL would have (ParseComplete and the like, CommandComplete, the
//! ParameterStatus of every reported parameter whose value changed, ReadyForQuery). The server
//! then has no unnamed statement left, which a client could only notice by binding it again
//! without a Parse. The settings log records what was run, so that every other connection the
//! session uses ends with the same values. `SET LOCAL name TO DEFAULT` inside a transaction
//! block is run so too (it sets the startup value until the block ends; nothing is logged);
//! anywhere else the server answers it as it is. Notices the server sends reach the client.
//!
//! A simple Query of several statements that resets settings the way connection pools do at
//! every release (asyncpg: `SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET
//! ALL;`) is run by pgvigil too, in one string with the startup parameters' SETs appended: see
//! `string` for which strings and why they are exact.
//!
//! Sent any other way (in another string of several statements, as a named prepared statement,
//! in an extended unit that goes on after it), a resetting statement is forwarded: the server
//! returns to its own defaults, not to the client's startup values. A `RESET ALL` or `DISCARD
//! ALL` so sent pins the session (logged; see `steering`), so that no replay undoes it or
//! repeats it elsewhere.
//!
//! `DISCARD ALL` outside a transaction block under transaction pooling, unless the session is
//! pinned, does not run on the shared connection (it would drop other sessions' prepared
//! statements there): pgvigil runs its settings part (`SET SESSION AUTHORIZATION DEFAULT; RESET
//! ALL`) and forgets the session's own prepared statements. Nothing else it drops can exist for
//! an unpinned session (temporary tables, advisory locks, LISTEN, WITH HOLD cursors pin it).

use std::pin::pin;

use bytes::{BufMut, BytesMut};
use pgvigil_proto::backend::{self, ErrorFields};
use pgvigil_proto::frame::messages;
use pgvigil_proto::frontend::{self, Describe, Execute, Parse, Query};
use pgvigil_proto::{classify::encoding_is_safe, encode, sqlstate, TxStatus};
use tracing::debug;

use super::recover::flush;
use super::relay::{ClientConn, LossCause, RelayEnd};
use super::settings::Scope;
use super::sql_words::{skip_comments, token, word};
use super::startup::ClientStartup;
use super::startup_sql::{push_set, push_set_local, startup_settings};
use super::steering::Steering;
use crate::config::PoolMode;
use crate::proxy::Proxy;
use crate::server::{ReportedParams, ServerConn, ServerError};
use crate::topology::{Need, NodeId};

mod string;

/// A statement that returns settings to their reset values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resetting<'a> {
    /// `DISCARD ALL`.
    DiscardAll,
    /// `RESET ALL`.
    ResetAll,
    /// `RESET name`.
    Reset(&'a [u8]),
    /// `SET [SESSION] name {TO | =} DEFAULT`.
    SetDefault(&'a [u8]),
    /// `SET LOCAL name {TO | =} DEFAULT`.
    SetLocalDefault(&'a [u8]),
}

/// How a unit run by pgvigil ended badly.
pub(super) enum Failed {
    /// The client is gone or broke the protocol.
    Client(RelayEnd),
    /// The server connection was lost; the client's unit is still unanswered, in its buffer.
    Server(LossCause),
}

/// How the client sent its resetting statement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sent {
    /// In a simple Query.
    Query,
    /// As Parse, Bind (no parameters), an optional Describe (of kind `S` or `P`), Execute and
    /// Sync, all of the unnamed statement and portal (psycopg 3 and pgjdbc send statements so).
    Extended(Option<u8>),
    /// In a simple Query of several statements that `string` runs.
    String,
}

/// Whether the unit at the start of `input` is a resetting statement that pgvigil runs itself.
pub fn is_reset(input: &[u8], max_message: usize) -> bool {
    unit_at(input, max_message).is_some()
}

/// Whether `sql` is one `RESET ALL` or `DISCARD ALL`.
pub(super) fn resets_all(sql: &[u8]) -> bool {
    matches!(read(sql), Some(Resetting::ResetAll | Resetting::DiscardAll))
}

/// The resetting statement that starts `input` as a whole unit, how it was sent, and the
/// unit's length in bytes.
fn unit_at(input: &[u8], max_message: usize) -> Option<(&[u8], Sent, usize)> {
    let mut units = messages(input, max_message);
    let mut next = || units.next().and_then(Result::ok);
    let first = next()?;
    if first.tag == frontend::tag::QUERY {
        let sql = Query::parse(first.body).ok()?.sql;
        let sent = match read(sql) {
            Some(_) => Sent::Query,
            None => string::is_string(sql).then_some(Sent::String)?,
        };
        return Some((sql, sent, first.len()));
    }
    let parse = (first.tag == frontend::tag::PARSE)
        .then(|| Parse::parse(first.body).ok())
        .flatten()
        .filter(|p| p.name.is_empty() && p.param_type_count == 0)?;
    read(parse.sql)?;
    let bind = next().filter(|m| m.tag == frontend::tag::BIND && binds_nothing(m.body))?;
    let mut len = first.len() + bind.len();
    let mut message = next()?;
    let mut describe = None;
    if message.tag == frontend::tag::DESCRIBE {
        let kind = Describe::parse(message.body)
            .ok()
            .filter(|d| d.name.is_empty())?
            .kind;
        describe = Some(kind);
        len += message.len();
        message = next()?;
    }
    let executes = message.tag == frontend::tag::EXECUTE
        && Execute::parse(message.body).is_ok_and(|e| e.portal.is_empty());
    if !executes {
        return None;
    }
    len += message.len();
    let sync = next().filter(|m| m.tag == frontend::tag::SYNC)?;
    Some((parse.sql, Sent::Extended(describe), len + sync.len()))
}

/// Whether a Bind body binds the unnamed statement to the unnamed portal with no parameter.
fn binds_nothing(body: &[u8]) -> bool {
    let Some(rest) = body.strip_prefix(b"\0\0") else {
        return false;
    };
    let formats = rest
        .get(..2)
        .map_or(0, |n| usize::from(u16::from_be_bytes([n[0], n[1]])));
    let values = rest.get(2 + 2 * formats..4 + 2 * formats);
    values == Some(&[0, 0][..])
}

/// Reads a Query that is exactly one resetting statement (comments, a `;` and whitespace
/// allowed); a quoted name is left to the server (it is not read here).
fn read(sql: &[u8]) -> Option<Resetting<'_>> {
    let start = skip_comments(sql);
    let (statement, rest) = if let Some(rest) = word(start, b"discard") {
        (Resetting::DiscardAll, word(rest, b"all")?)
    } else if let Some(rest) = word(start, b"reset") {
        match word(rest, b"all") {
            Some(rest) => (Resetting::ResetAll, rest),
            None => {
                let (name, rest) = name(rest)?;
                (Resetting::Reset(name), rest)
            }
        }
    } else {
        let rest = word(start, b"set")?;
        let local = word(rest, b"local");
        let rest = local.or_else(|| word(rest, b"session")).unwrap_or(rest);
        let (name, rest) = name(rest)?;
        let rest = word(rest, b"to").or_else(|| token(rest, b"="))?;
        let statement = match local {
            Some(_) => Resetting::SetLocalDefault(name),
            None => Resetting::SetDefault(name),
        };
        (statement, word(rest, b"default")?)
    };
    let rest = token(rest, b";").unwrap_or(rest);
    skip_comments(rest).is_empty().then_some(statement)
}

/// An unquoted setting name (letters, digits, `_`, `$`, `.`; not starting with a digit) after
/// whitespace, and what follows it. `LOCAL`, `SESSION` and `ALL` are keywords, not names.
fn name(text: &[u8]) -> Option<(&[u8], &[u8])> {
    let text = text.trim_ascii_start();
    let len = text
        .iter()
        .position(|b| !(b.is_ascii_alphanumeric() || matches!(b, b'_' | b'$' | b'.')))
        .unwrap_or(text.len());
    let name = &text[..len];
    let keyword = [b"local".as_slice(), b"session", b"all"]
        .iter()
        .any(|k| name.eq_ignore_ascii_case(k));
    let starts = name
        .first()
        .is_some_and(|b| b.is_ascii_alphabetic() || *b == b'_');
    (starts && !keyword).then(|| (name, &text[len..]))
}

/// What pgvigil runs for a resetting statement: the Queries in order, what the settings log
/// records, and the tag of the CommandComplete the client gets.
struct Plan {
    queries: Vec<String>,
    logged: String,
    scope: Scope,
    tag: &'static [u8],
    /// The session's prepared statements go.
    drops_statements: bool,
}

/// The plan for `statement` (the client's text `sql`); `own_connection`: the connection holds
/// only this session's state (session pooling, or a pinned session).
fn plan(
    statement: Resetting<'_>,
    sql: &[u8],
    startup: &ClientStartup,
    own_connection: bool,
    status: TxStatus,
) -> Plan {
    // The startup parameters were applied when the session began: they parse.
    let settings = startup_settings(startup.params()).unwrap_or_default();
    let all = || {
        let mut sets = String::new();
        for (name, value) in &settings {
            push_set(&mut sets, name, value);
        }
        sets
    };
    let client = || String::from_utf8_lossy(sql).into_owned();
    let startup_value = |name: &[u8]| {
        settings
            .iter()
            .rev()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
    };
    match statement {
        // Inside a block the server refuses it (25001), as it would the client.
        Resetting::DiscardAll if status != TxStatus::Idle => Plan {
            queries: vec![client()],
            logged: String::new(),
            scope: Scope::Adds,
            tag: b"DISCARD ALL",
            drops_statements: false,
        },
        Resetting::DiscardAll => {
            let logged = format!("SET SESSION AUTHORIZATION DEFAULT;RESET ALL;{}", all());
            // DISCARD ALL cannot run in the implicit block of a string of statements.
            let queries = if own_connection {
                vec!["DISCARD ALL".into(), all()]
            } else {
                vec![logged.clone()]
            };
            Plan {
                queries,
                logged,
                scope: Scope::Discards,
                tag: b"DISCARD ALL",
                drops_statements: true,
            }
        }
        Resetting::ResetAll => {
            let logged = format!("RESET ALL;{}", all());
            Plan {
                queries: vec![logged.clone()],
                logged,
                scope: Scope::ResetsAll,
                tag: b"RESET",
                drops_statements: false,
            }
        }
        Resetting::Reset(name) | Resetting::SetDefault(name) => {
            let tag: &'static [u8] = match statement {
                Resetting::Reset(_) => b"RESET",
                _ => b"SET",
            };
            let logged = match startup_value(name) {
                Some((n, value)) => {
                    let mut sets = String::new();
                    push_set(&mut sets, n, value);
                    sets
                }
                None => client(),
            };
            Plan {
                queries: vec![logged.clone()],
                logged,
                scope: Scope::Adds,
                tag,
                drops_statements: false,
            }
        }
        Resetting::SetLocalDefault(name) => {
            // Outside a healthy block the server's own answer (a warning, 25P02) is exact.
            let query = match startup_value(name) {
                Some((n, value)) if status == TxStatus::InTransaction => {
                    let mut set = String::new();
                    push_set_local(&mut set, n, value);
                    set
                }
                _ => client(),
            };
            Plan {
                queries: vec![query],
                logged: String::new(),
                scope: Scope::Adds,
                tag: b"SET",
                drops_statements: false,
            }
        }
    }
}

/// Runs the resetting statement at the front of the client's buffer on `conn` (the session's
/// connection to its current node, which has answered everything before it) and answers the
/// client; see the module's doc.
pub(super) async fn answer(
    client: &mut ClientConn,
    conn: &mut ServerConn,
    steering: &mut Steering,
    startup: &ClientStartup,
    proxy: &Proxy,
) -> Result<(), Failed> {
    let max_message = proxy.config().max_message_size;
    // The whole unit is in the buffer: the steering decided on it.
    let len = unit_at(&client.rbuf, max_message).map_or(0, |(_, _, len)| len);
    let unit = client.rbuf[..len].to_vec();
    if let Some((sql, Sent::String, _)) = unit_at(&unit, max_message) {
        return string::answer(client, conn, steering, startup, proxy, sql, len).await;
    }
    let Some((statement, sql, sent)) =
        unit_at(&unit, max_message).and_then(|(sql, sent, _)| Some((read(sql)?, sql, sent)))
    else {
        return Err(Failed::Client(RelayEnd::Violation(
            "a resetting statement that no longer reads as one".into(),
        )));
    };
    let shared = proxy.config().pool.mode == PoolMode::Transaction;
    let own_connection = !shared || steering.replay.pinned().is_some();
    let plan = plan(statement, sql, startup, own_connection, conn.tx);
    debug!(statement = ?String::from_utf8_lossy(sql), ran = ?plan.queries, "resetting statement run by pgvigil");
    let before = conn.params.clone();
    let node = conn.node;
    let mut notices = BytesMut::new();
    let run = async {
        for query in plan.queries.iter().filter(|q| !q.is_empty()) {
            match conn.query_for_client(query, &mut notices).await {
                Ok(_) => {}
                Err(ServerError::Rejected { frame, .. }) => return Ok(Some(frame)),
                Err(ServerError::Io { source, .. }) => return Err(LossCause::Io(source)),
                Err(ServerError::Protocol { .. }) => return Err(LossCause::Garbled),
                Err(_) => return Err(LossCause::Closed),
            }
        }
        Ok(None)
    };
    let refused = guarded(proxy, node, run).await?;
    let _ = client.rbuf.split_to(len);
    let out = &mut client.pending;
    steering.encoding_safe = conn
        .params
        .get(b"client_encoding")
        .is_none_or(encoding_is_safe);
    // PostgreSQL refuses the Parse itself in a failed transaction block; any other error
    // comes from the Execute.
    let parsed = refused.as_ref().is_none_or(|frame| {
        let fields = frame
            .get(5..)
            .and_then(|body| ErrorFields::parse(body).ok());
        fields.and_then(|f| f.sqlstate().map(<[u8]>::to_vec))
            != Some(sqlstate::IN_FAILED_SQL_TRANSACTION.as_bytes().to_vec())
    });
    if let (Sent::Extended(describe), true) = (sent, parsed) {
        for tag in [backend::tag::PARSE_COMPLETE, backend::tag::BIND_COMPLETE] {
            encode::message(out, tag, |_| {});
        }
        if describe == Some(b'S') {
            encode::message(out, backend::tag::PARAMETER_DESCRIPTION, |b| b.put_u16(0));
        }
        if describe.is_some() {
            encode::message(out, backend::tag::NO_DATA, |_| {});
        }
    }
    out.extend_from_slice(&notices);
    match refused {
        Some(frame) => out.extend_from_slice(&frame),
        None => {
            if plan.drops_statements {
                steering.replay.drop_statements();
                if own_connection && !conn.statements.is_empty() {
                    // A pinned session's DISCARD ALL dropped every statement there.
                    conn.statements.clear();
                    steering.replay.adopt(node, &conn.statements);
                }
            }
            if !plan.logged.is_empty() {
                let logged = plan.logged.as_bytes().into();
                steering
                    .replay
                    .settings
                    .ran(logged, plan.scope, conn.tx, node);
            }
            steering.reset_ran();
            encode::message(out, backend::tag::COMMAND_COMPLETE, |b| {
                b.put_slice(plan.tag);
                b.put_u8(0);
            });
        }
    }
    ready(out, &before, conn);
    flush(client).await.map_err(Failed::Client)
}

/// Runs `run` (work on the connection to `node`) until it ends or, as the relay does, until
/// the topology no longer lets sessions use the node.
async fn guarded<T>(
    proxy: &Proxy,
    node: NodeId,
    run: impl std::future::Future<Output = Result<T, LossCause>>,
) -> Result<T, Failed> {
    match proxy.unless_given_up(node, Need::Usable, pin!(run)).await {
        Ok(Ok(done)) => Ok(done),
        Ok(Err(cause)) => Err(Failed::Server(cause)),
        Err(_) => {
            let role = proxy.topology.load().nodes.get(node).map(|n| n.role);
            Err(Failed::Server(
                role.map_or(LossCause::Closed, LossCause::Unusable),
            ))
        }
    }
}

/// The end of an answer: the ParameterStatus of every reported parameter whose value on `conn`
/// differs from `before` (PostgreSQL reports changes just before ReadyForQuery since version
/// 14), then ReadyForQuery.
fn ready(out: &mut BytesMut, before: &ReportedParams, conn: &ServerConn) {
    for (name, value) in conn.params.iter() {
        if before.get(name) != Some(value) {
            encode::message(out, backend::tag::PARAMETER_STATUS, |b| {
                b.put_slice(name);
                b.put_u8(0);
                b.put_slice(value);
                b.put_u8(0);
            });
        }
    }
    encode::ready_for_query(out, conn.tx);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parse, Bind, an optional Describe of `describe`, Execute and Sync, all unnamed; `values`
    /// parameter values in the Bind.
    fn extended(sql: &str, describe: Option<u8>, values: u16) -> BytesMut {
        let mut out = BytesMut::new();
        encode::message(&mut out, b'P', |b| {
            b.put_u8(0);
            b.put_slice(sql.as_bytes());
            b.put_u8(0);
            b.put_u16(0);
        });
        encode::message(&mut out, b'B', |b| {
            b.put_slice(b"\0\0");
            b.put_u16(0);
            b.put_u16(values);
            for _ in 0..values {
                b.put_i32(-1);
            }
            b.put_u16(0);
        });
        if let Some(kind) = describe {
            encode::message(&mut out, b'D', |b| b.put_slice(&[kind, 0]));
        }
        encode::message(&mut out, b'E', |b| b.put_slice(&[0, 0, 0, 0, 0]));
        encode::sync(&mut out);
        out
    }

    #[test]
    fn a_resetting_unit_is_a_lone_query_or_one_unnamed_extended_statement() {
        let max = 1 << 20;
        let mut query = BytesMut::new();
        encode::query(&mut query, b"RESET ALL");
        assert_eq!(unit_at(&query, max).map(|u| u.1), Some(Sent::Query));
        for describe in [None, Some(b'P'), Some(b'S')] {
            let unit = extended("DISCARD ALL", describe, 0);
            let found = unit_at(&unit, max).map(|(_, sent, len)| (sent, len));
            assert_eq!(found, Some((Sent::Extended(describe), unit.len())));
        }
        assert!(
            unit_at(&extended("RESET ALL", None, 1), max).is_none(),
            "a parameter"
        );
        assert!(unit_at(&extended("SELECT 1", None, 0), max).is_none());
        let mut unsynced = extended("RESET ALL", None, 0);
        unsynced.truncate(unsynced.len() - 5);
        assert!(unit_at(&unsynced, max).is_none(), "no Sync yet");
    }

    #[test]
    fn resetting_statements_are_read_as_postgresql_reads_them() {
        let cases: [(&str, Option<Resetting<'_>>); 14] = [
            ("DISCARD ALL", Some(Resetting::DiscardAll)),
            (" discard all ; ", Some(Resetting::DiscardAll)),
            ("RESET ALL", Some(Resetting::ResetAll)),
            (
                "/* c */ reset application_name;",
                Some(Resetting::Reset(b"application_name")),
            ),
            (
                "SET application_name TO DEFAULT",
                Some(Resetting::SetDefault(b"application_name")),
            ),
            (
                "set session TimeZone = default",
                Some(Resetting::SetDefault(b"TimeZone")),
            ),
            (
                "SET LOCAL work_mem TO DEFAULT",
                Some(Resetting::SetLocalDefault(b"work_mem")),
            ),
            (
                "set local DateStyle = default;",
                Some(Resetting::SetLocalDefault(b"DateStyle")),
            ),
            ("SET LOCAL SESSION work_mem TO DEFAULT", None),
            ("SET work_mem TO '1MB'", None),
            ("RESET \"application_name\"", None),
            ("RESET ALL; SELECT 1", None),
            ("DISCARD TEMP", None),
            ("RESET", None),
        ];
        for (sql, expected) in cases {
            assert_eq!(read(sql.as_bytes()), expected, "{sql}");
        }
    }
}
