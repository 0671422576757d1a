//! Statements that return settings to their reset values, run by pgvigil for the client.
//!
//! PostgreSQL resets a setting to the value the client's startup packet gave it (its "reset
//! value"), else to the server's default. A pooled server connection logged in without the
//! client's startup parameters (they reach it as SET), so its reset values are the server's:
//! forwarded as they are, `RESET application_name`, `RESET ALL`, `SET name TO DEFAULT` and
//! `DISCARD ALL` would lose the client's startup values. A simple Query that is one of these
//! statements is therefore run by pgvigil: it sends the statement followed by the startup
//! parameters the statement reset, and answers the client as PostgreSQL would have (the
//! ParameterStatus of every reported parameter whose value changed, CommandComplete,
//! ReadyForQuery). The settings log records what was run, so that every other connection the
//! session uses ends with the same values.
//!
//! `DISCARD ALL` outside a transaction block under transaction pooling, unless the session is
//! pinned, does not run on the shared connection (it would drop other sessions' prepared
//! statements there): pgvigil runs its settings part (`SET SESSION AUTHORIZATION DEFAULT; RESET
//! ALL`) and forgets the session's own prepared statements. Nothing else it drops can exist for
//! an unpinned session (temporary tables, advisory locks, LISTEN, WITH HOLD cursors pin it).

use bytes::BufMut;
use pgvigil_proto::frame::next_message;
use pgvigil_proto::frontend::{self, Query};
use pgvigil_proto::{backend, classify::encoding_is_safe, encode, TxStatus};
use tracing::debug;

use super::recover::{first_message, flush};
use super::relay::{ClientConn, LossCause, RelayEnd};
use super::settings::{skip_comments, token, word, Scope};
use super::startup::ClientStartup;
use super::steering::Steering;
use super::{push_set, startup_settings};
use crate::config::PoolMode;
use crate::proxy::Proxy;
use crate::server::{ServerConn, ServerError};
use crate::topology::Need;

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
}

/// How a unit run by pgvigil ended badly.
pub(super) enum Failed {
    /// The client is gone or broke the protocol.
    Client(RelayEnd),
    /// The server connection was lost; the client's unit is still unanswered, in its buffer.
    Server(LossCause),
}

/// Whether the unit at the start of `input` is a simple Query that pgvigil runs itself.
pub fn is_reset(input: &[u8], max_message: usize) -> bool {
    let Ok(Some(message)) = next_message(input, max_message) else {
        return false;
    };
    message.tag == frontend::tag::QUERY
        && Query::parse(message.body)
            .ok()
            .and_then(|q| read(q.sql))
            .is_some()
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
        let rest = word(rest, b"session").unwrap_or(rest);
        let (name, rest) = name(rest)?;
        let rest = word(rest, b"to").or_else(|| token(rest, b"="))?;
        (Resetting::SetDefault(name), word(rest, b"default")?)
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
    let settings = startup_settings(&startup.params).unwrap_or_default();
    let all = || {
        let mut sets = String::new();
        for (name, value) in &settings {
            push_set(&mut sets, name, value);
        }
        sets
    };
    let client = || String::from_utf8_lossy(sql).into_owned();
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
            let startup_value = settings
                .iter()
                .rev()
                .find(|(n, _)| n.eq_ignore_ascii_case(name));
            let logged = match startup_value {
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
    let (_, len) = first_message(client, max_message)
        .await
        .map_err(Failed::Client)?;
    let frame = client.rbuf[..len].to_vec();
    let sql = Query::parse(&frame[5..]).map(|q| q.sql).unwrap_or_default();
    let Some(statement) = read(sql) else {
        // `is_reset` said it is one: it cannot change in the buffer.
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
    let run = async {
        for query in plan.queries.iter().filter(|q| !q.is_empty()) {
            match conn.query_text(query).await {
                Ok(_) => {}
                Err(ServerError::Rejected { frame, .. }) => return Ok(Some(frame)),
                Err(ServerError::Io { source, .. }) => return Err(LossCause::Io(source)),
                Err(ServerError::Protocol { .. }) => return Err(LossCause::Garbled),
                Err(_) => return Err(LossCause::Closed),
            }
        }
        Ok(None)
    };
    // As the relay does, the wait ends once the topology no longer lets sessions use the node.
    let refused = match proxy.unless_given_up(node, Need::Usable, run).await {
        Ok(Ok(refused)) => refused,
        Ok(Err(cause)) => return Err(Failed::Server(cause)),
        Err(_) => {
            let role = proxy.topology.load().nodes.get(node).map(|n| n.role);
            return Err(Failed::Server(
                role.map_or(LossCause::Closed, LossCause::Unusable),
            ));
        }
    };
    let _ = client.rbuf.split_to(len);
    let out = &mut client.pending;
    steering.encoding_safe = conn
        .params
        .get(b"client_encoding")
        .is_none_or(encoding_is_safe);
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
            encode::message(out, backend::tag::COMMAND_COMPLETE, |b| {
                b.put_slice(plan.tag);
                b.put_u8(0);
            });
        }
    }
    // PostgreSQL reports changed parameters just before ReadyForQuery (since version 14).
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
    flush(client).await.map_err(Failed::Client)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resetting_statements_are_read_as_postgresql_reads_them() {
        let cases: [(&str, Option<Resetting<'_>>); 12] = [
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
            ("SET LOCAL work_mem TO DEFAULT", None),
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
