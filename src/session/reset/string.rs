//! A resetting statement inside a simple Query of several statements, run by pgvigil.
//!
//! Connection pools reset a connection at every release with one string: asyncpg's `Pool`
//! sends `SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL;`. Forwarded as
//! it is, its `RESET ALL` would return the settings to the server connection's reset values
//! (the server's defaults, see the parent module) and pin the session. pgvigil runs such a
//! string itself when it is made only of:
//! - resetting statements: `RESET ALL`, `RESET name`, `SET [SESSION] name {TO | =} DEFAULT`
//!   (at least one);
//! - release statements, which can neither fail nor show the value of a setting:
//!   `SELECT [pg_catalog.]pg_advisory_unlock_all()` (returns one void value), `CLOSE ALL`,
//!   `UNLISTEN *`, `UNLISTEN name`, `DEALLOCATE [PREPARE] ALL`. The classifier pins none of
//!   them (only taking a session advisory lock, LISTEN, SQL PREPARE and temporary tables pin),
//!   and none changes a setting, so none needs the settings log.
//!
//! pgvigil sends the client's statements with the SETs of the startup parameters they reset
//! appended at the end of the same string: the same implicit transaction (or the client's
//! block), so an error anywhere rolls the SETs back with the rest, as PostgreSQL would roll back
//! the resets. The statements after the first resetting one run before the SETs, with the
//! server's defaults where PostgreSQL would have the startup values; that is why only
//! statements that cannot observe settings may follow it: resetting ones and release ones. An
//! error of a later `RESET no_such_name` reads the same (its text is ASCII) unless the client
//! gave `lc_messages` at startup (only a superuser may): such a string is run as it is, without
//! the SETs, and pins the session, as a forwarded one would. An unqualified
//! `pg_advisory_unlock_all()` follows only before the first reset, as it depends on
//! `search_path`. Quotes, dollar quotes and comments are not read: with none, every `;` ends a
//! statement.
//!
//! The client gets what PostgreSQL would have sent for its own string: the node's answers to
//! its statements (the CommandComplete of each appended SET is dropped), the ParameterStatus of
//! each reported parameter whose value changed, ReadyForQuery. The settings log records each
//! resetting statement as the lone path does, so the session's other connections end with the
//! same values; the session is not pinned.
//!
//! Under transaction pooling an unpinned session's `DEALLOCATE ALL` is answered by pgvigil, as
//! when it is sent alone: run on the shared connection it would drop other sessions'
//! statements. It takes effect (the session's own statements are forgotten) if every statement
//! before it succeeded: DEALLOCATE is not undone by a rollback. In a failed transaction block
//! the string is sent as it is and the node refuses its first statement.

use bytes::{BufMut, Bytes, BytesMut};
use pgvigil_proto::backend;
use pgvigil_proto::classify::encoding_is_safe;
use pgvigil_proto::{encode, TxStatus};
use tracing::debug;

use super::super::recover::flush;
use super::super::relay::{ClientConn, LossCause};
use super::super::sql_words::{contains_ignore_case, token, word};
use super::super::startup::ClientStartup;
use super::super::startup_sql::{push_set, startup_settings};
use super::super::steering::Steering;
use super::{guarded, name, plan, read, ready, Failed, Resetting};
use crate::config::PoolMode;
use crate::proxy::Proxy;
use crate::server::{ServerConn, ServerError};

/// A statement that can neither fail nor show a setting's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Release {
    /// `SELECT pg_advisory_unlock_all()`; `qualified`: written `pg_catalog.pg_advisory_unlock_all`.
    UnlockAll { qualified: bool },
    /// `CLOSE ALL`.
    CloseAll,
    /// `UNLISTEN *` or `UNLISTEN name`.
    Unlisten,
    /// `DEALLOCATE [PREPARE] ALL`.
    DeallocateAll,
}

/// What one statement of the string is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind<'a> {
    Resetting(Resetting<'a>),
    Release(Release),
}

/// One statement of the string and its text (without the `;`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Part<'a> {
    text: &'a [u8],
    kind: Kind<'a>,
}

/// Whether `sql` is a string that pgvigil runs itself (see the module doc).
pub(super) fn is_string(sql: &[u8]) -> bool {
    read_string(sql).is_some()
}

/// The statements of `sql` when it is a string that pgvigil runs itself.
fn read_string(sql: &[u8]) -> Option<Vec<Part<'_>>> {
    let unread = sql.iter().any(|b| matches!(b, b'\'' | b'"' | b'$' | b'\\'))
        || contains_ignore_case(sql, b"--")
        || contains_ignore_case(sql, b"/*");
    if unread {
        return None;
    }
    let parts = sql
        .split(|b| *b == b';')
        .map(<[u8]>::trim_ascii)
        .filter(|text| !text.is_empty())
        .map(part)
        .collect::<Option<Vec<_>>>()?;
    let first = parts
        .iter()
        .position(|p| matches!(p.kind, Kind::Resetting(_)))?;
    let after_ok = parts[first + 1..].iter().all(|p| {
        !matches!(
            p.kind,
            Kind::Release(Release::UnlockAll { qualified: false })
        )
    });
    (parts.len() > 1 && after_ok).then_some(parts)
}

/// Reads one statement (no `;`, no comment, no quote).
fn part(text: &[u8]) -> Option<Part<'_>> {
    let kind = match release(text) {
        Some(release) => Kind::Release(release),
        None => match read(text)? {
            statement @ (Resetting::ResetAll | Resetting::Reset(_) | Resetting::SetDefault(_)) => {
                Kind::Resetting(statement)
            }
            // DISCARD ALL cannot run in a string (PostgreSQL refuses it in the implicit block);
            // SET LOCAL is left to the server too.
            Resetting::DiscardAll | Resetting::SetLocalDefault(_) => return None,
        },
    };
    Some(Part { text, kind })
}

/// Reads a release statement.
fn release(text: &[u8]) -> Option<Release> {
    let (release, rest) = if let Some(rest) = word(text, b"select") {
        let qualified = word(rest, b"pg_catalog").and_then(|r| token(r, b"."));
        let rest = word(qualified.unwrap_or(rest), b"pg_advisory_unlock_all")?;
        let rest = token(token(rest, b"(")?, b")")?;
        let qualified = qualified.is_some();
        (Release::UnlockAll { qualified }, rest)
    } else if let Some(rest) = word(text, b"close") {
        (Release::CloseAll, word(rest, b"all")?)
    } else if let Some(rest) = word(text, b"unlisten") {
        let rest = token(rest, b"*").or_else(|| name(rest).map(|(_, rest)| rest))?;
        (Release::Unlisten, rest)
    } else {
        let rest = word(text, b"deallocate")?;
        let rest = word(rest, b"prepare").unwrap_or(rest);
        (Release::DeallocateAll, word(rest, b"all")?)
    };
    rest.trim_ascii().is_empty().then_some(release)
}

/// Runs the string `sql` (the client's Query, `len` bytes at the front of its buffer) on `conn`
/// and answers the client; see the module doc.
pub(super) async fn answer(
    client: &mut ClientConn,
    conn: &mut ServerConn,
    steering: &mut Steering,
    startup: &ClientStartup,
    proxy: &Proxy,
    sql: &[u8],
    len: usize,
) -> Result<(), Failed> {
    let Some(parts) = read_string(sql) else {
        return Err(Failed::Client(super::RelayEnd::Violation(
            "a resetting string that no longer reads as one".into(),
        )));
    };
    let shared = proxy.config().pool.mode == PoolMode::Transaction;
    let own_connection = !shared || steering.replay.pinned().is_some();
    let refused_block = conn.tx == TxStatus::Failed;
    // The startup parameters were applied when the session began: they parse.
    let settings = startup_settings(startup.params()).unwrap_or_default();
    let exact = !messages_may_differ(&parts, &settings);
    // pgvigil answers DEALLOCATE ALL on a shared connection (in a failed block the node
    // refuses the string's first statement, whatever it is).
    let answered_here = |p: &Part<'_>| {
        !own_connection && !refused_block && p.kind == Kind::Release(Release::DeallocateAll)
    };
    let mut text = String::new();
    for p in parts.iter().filter(|p| !answered_here(p)) {
        text.push_str(&String::from_utf8_lossy(p.text));
        text.push_str(";\n");
    }
    if !refused_block && exact {
        text.push_str(&startup_sets(&parts, &settings));
    }
    debug!(statement = ?String::from_utf8_lossy(sql), ran = %text, "resetting string run by pgvigil");
    let before = conn.params.clone();
    let node = conn.node;
    let run = async {
        match conn.query_answers(&text).await {
            Ok(answers) => Ok(answers),
            Err(ServerError::Io { source, .. }) => Err(LossCause::Io(source)),
            Err(ServerError::Protocol { .. }) => Err(LossCause::Garbled),
            Err(_) => Err(LossCause::Closed),
        }
    };
    let answers = guarded(proxy, node, run).await?;
    let _ = client.rbuf.split_to(len);
    steering.encoding_safe = conn
        .params
        .get(b"client_encoding")
        .is_none_or(encoding_is_safe);
    let out = &mut client.pending;
    let Relayed {
        done,
        failed,
        deallocated,
    } = relay(&parts, &answered_here, answers, out);
    if !failed && !exact {
        steering.reset_ran();
        steering
            .replay
            .pin("a reset string pgvigil cannot run exactly");
    } else if !failed {
        steering.reset_ran();
        for p in &parts {
            if let Kind::Resetting(statement) = p.kind {
                let plan = plan(statement, p.text, startup, own_connection, conn.tx);
                if !plan.logged.is_empty() {
                    let logged = plan.logged.as_bytes().into();
                    steering
                        .replay
                        .settings
                        .ran(logged, plan.scope, conn.tx, node);
                }
            }
        }
    }
    let dropped = parts[..done]
        .iter()
        .any(|p| p.kind == Kind::Release(Release::DeallocateAll));
    if dropped {
        steering.replay.drop_statements();
        if deallocated && !conn.statements.is_empty() {
            // It ran on the session's own connection: every statement there is gone.
            conn.statements.clear();
            steering.replay.adopt(node, &conn.statements);
        }
    }
    ready(out, &before, conn);
    flush(client).await.map_err(Failed::Client)
}

/// How far the client's statements got, as [`relay`] found.
#[derive(Debug, PartialEq, Eq)]
struct Relayed {
    /// How many of them took effect (DEALLOCATE answered by pgvigil included).
    done: usize,
    /// The node sent an error (the transaction undid the resets).
    failed: bool,
    /// A DEALLOCATE ALL ran on the node.
    deallocated: bool,
}

/// Writes to `out` what the client gets of the node's `answers` to the string of `parts`: the
/// answers to its statements, the CommandComplete of each statement pgvigil answers itself
/// (`answered_here`) in its turn, and nothing of the appended SETs'.
fn relay(
    parts: &[Part<'_>],
    answered_here: &impl Fn(&Part<'_>) -> bool,
    answers: Vec<Bytes>,
    out: &mut BytesMut,
) -> Relayed {
    // The client's statement answered next (answers past the last are the appended SETs').
    let mut next = 0;
    let mut failed = false;
    let mut deallocated = false;
    let answer_here = |next: &mut usize, out: &mut BytesMut| {
        while parts.get(*next).is_some_and(answered_here) {
            command_complete(out, b"DEALLOCATE ALL");
            *next += 1;
        }
    };
    for frame in answers {
        if !failed {
            answer_here(&mut next, out);
        }
        let tag = frame.first().copied().unwrap_or_default();
        match tag {
            backend::tag::COMMAND_COMPLETE => {
                if let Some(p) = parts.get(next).filter(|_| !failed) {
                    deallocated |= p.kind == Kind::Release(Release::DeallocateAll);
                    out.extend_from_slice(&frame);
                    next += 1;
                }
            }
            // An error of an appended SET is relayed too: it undid the client's resets, and
            // the client must not believe they happened (the startup values were accepted at
            // login, so it is not expected).
            backend::tag::ERROR_RESPONSE => {
                failed = true;
                out.extend_from_slice(&frame);
            }
            backend::tag::NOTICE_RESPONSE | backend::tag::NOTIFICATION => {
                out.extend_from_slice(&frame)
            }
            _ if next < parts.len() => out.extend_from_slice(&frame),
            _ => {}
        }
    }
    if !failed {
        answer_here(&mut next, out);
    }
    Relayed {
        done: next,
        failed,
        deallocated,
    }
}

/// Whether an error of a resetting statement after the first could read otherwise than on
/// PostgreSQL, in the language of the server's `lc_messages` rather than the client's: the
/// client gave `lc_messages` at startup (`settings`), and a later statement resets a parameter
/// it did not give (which may not exist).
fn messages_may_differ(parts: &[Part<'_>], settings: &[(Vec<u8>, Vec<u8>)]) -> bool {
    let given = |name: &[u8]| settings.iter().any(|(n, _)| n.eq_ignore_ascii_case(name));
    let mut resets = parts.iter().filter_map(|p| match p.kind {
        Kind::Resetting(statement) => Some(statement),
        Kind::Release(_) => None,
    });
    resets.next();
    given(b"lc_messages")
        && resets.any(|r| matches!(r, Resetting::Reset(n) | Resetting::SetDefault(n) if !given(n)))
}

/// The SETs of the startup parameters (`settings`) that the string's resetting statements reset.
fn startup_sets(parts: &[Part<'_>], settings: &[(Vec<u8>, Vec<u8>)]) -> String {
    let reset = |name: &[u8]| {
        parts.iter().any(|p| match p.kind {
            Kind::Resetting(Resetting::ResetAll) => true,
            Kind::Resetting(Resetting::Reset(n) | Resetting::SetDefault(n)) => {
                n.eq_ignore_ascii_case(name)
            }
            _ => false,
        })
    };
    let mut sets = String::new();
    for (name, value) in settings.iter().filter(|(name, _)| reset(name)) {
        push_set(&mut sets, name, value);
    }
    sets
}

fn command_complete(out: &mut BytesMut, tag: &[u8]) {
    encode::message(out, backend::tag::COMMAND_COMPLETE, |b| {
        b.put_slice(tag);
        b.put_u8(0);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(sql: &str) -> Option<Vec<Kind<'_>>> {
        read_string(sql.as_bytes()).map(|parts| parts.iter().map(|p| p.kind).collect())
    }

    /// A message of type `tag` with `body`.
    fn message(tag: u8, body: &[u8]) -> Bytes {
        let mut out = BytesMut::new();
        encode::message(&mut out, tag, |b| b.put_slice(body));
        out.freeze()
    }

    fn complete(tag: &str) -> Bytes {
        message(
            backend::tag::COMMAND_COMPLETE,
            format!("{tag}\0").as_bytes(),
        )
    }

    /// The CommandComplete tags (or the message type) of `out`, in order.
    fn tags(mut out: &[u8]) -> Vec<String> {
        let mut tags = Vec::new();
        while let Some((&tag, rest)) = out.split_first() {
            let len = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
            let body = &rest[4..len];
            tags.push(match tag {
                backend::tag::COMMAND_COMPLETE => {
                    String::from_utf8_lossy(&body[..body.len() - 1]).into_owned()
                }
                other => char::from(other).to_string(),
            });
            out = &rest[len..];
        }
        tags
    }

    /// Relays `answers` to `sql`, DEALLOCATE ALL answered here when `shared`.
    fn relayed(sql: &str, shared: bool, answers: Vec<Bytes>) -> (Vec<String>, Relayed) {
        let parts = read_string(sql.as_bytes()).unwrap_or_default();
        assert!(!parts.is_empty(), "{sql}");
        let here = |p: &Part<'_>| shared && p.kind == Kind::Release(Release::DeallocateAll);
        let mut out = BytesMut::new();
        let relayed = relay(&parts, &here, answers, &mut out);
        (tags(&out), relayed)
    }

    fn to_strings(tags: &[&str]) -> Vec<String> {
        tags.iter().map(|t| (*t).to_owned()).collect()
    }

    #[test]
    fn the_client_gets_its_statements_answers_and_none_of_the_appended_sets() {
        let error = message(backend::tag::ERROR_RESPONSE, b"SERROR\0C42704\0\0");
        let row = [
            message(backend::tag::ROW_DESCRIPTION, b"\0\0"),
            message(backend::tag::DATA_ROW, b"\0\x01\0\0\0\0"),
        ];
        let asyncpg = "SELECT pg_advisory_unlock_all();\nCLOSE ALL;\nUNLISTEN *;\nRESET ALL;";
        let mut answers = row.to_vec();
        for tag in [
            "SELECT 1",
            "CLOSE CURSOR ALL",
            "UNLISTEN",
            "RESET",
            "SET",
            "SET",
        ] {
            answers.push(complete(tag));
        }
        let ran = |done| Relayed {
            done,
            failed: false,
            deallocated: false,
        };
        let failed = |done| Relayed {
            done,
            failed: true,
            deallocated: false,
        };
        let cases = [
            (
                asyncpg,
                answers,
                vec![
                    "T",
                    "D",
                    "SELECT 1",
                    "CLOSE CURSOR ALL",
                    "UNLISTEN",
                    "RESET",
                ],
                ran(4),
            ),
            // Answered by pgvigil in its turn, before the SETs' answers or after the last.
            (
                "RESET ALL; DEALLOCATE ALL",
                vec![complete("RESET"), complete("SET")],
                vec!["RESET", "DEALLOCATE ALL"],
                ran(2),
            ),
            (
                "RESET ALL; DEALLOCATE ALL",
                vec![complete("RESET")],
                vec!["RESET", "DEALLOCATE ALL"],
                ran(2),
            ),
            // A DEALLOCATE before an error took effect; one after it did not.
            (
                "DEALLOCATE ALL; RESET no_such",
                vec![error.clone()],
                vec!["DEALLOCATE ALL", "E"],
                failed(1),
            ),
            (
                "RESET no_such; DEALLOCATE ALL",
                vec![error.clone()],
                vec!["E"],
                failed(0),
            ),
            // An appended SET's error is the client's too: its resets were undone.
            (
                "UNLISTEN *; RESET ALL",
                vec![complete("UNLISTEN"), complete("RESET"), error],
                vec!["UNLISTEN", "RESET", "E"],
                failed(2),
            ),
        ];
        for (sql, answers, expected, outcome) in cases {
            assert_eq!(
                relayed(sql, true, answers),
                (to_strings(&expected), outcome),
                "{sql}"
            );
        }
        // On the session's own connection the node runs it.
        let answers = vec![
            complete("RESET"),
            complete("DEALLOCATE ALL"),
            complete("SET"),
        ];
        let expected = Relayed {
            done: 2,
            failed: false,
            deallocated: true,
        };
        assert_eq!(
            relayed("RESET ALL; DEALLOCATE ALL", false, answers),
            (to_strings(&["RESET", "DEALLOCATE ALL"]), expected)
        );
    }

    #[test]
    fn a_later_reset_that_may_fail_is_exact_unless_the_client_chose_lc_messages() {
        let settings = |names: &[&str]| -> Vec<(Vec<u8>, Vec<u8>)> {
            names
                .iter()
                .map(|n| (n.as_bytes().to_vec(), b"x".to_vec()))
                .collect()
        };
        let chose = settings(&["application_name", "lc_messages"]);
        let cases = [
            (
                "RESET ALL; RESET no_such",
                settings(&["application_name"]),
                false,
            ),
            ("RESET ALL; RESET no_such", chose.clone(), true),
            ("RESET ALL; SET no_such TO DEFAULT", chose.clone(), true),
            ("RESET no_such; UNLISTEN *; RESET ALL", chose.clone(), false),
            ("RESET ALL; RESET application_name", chose.clone(), false),
            ("RESET ALL; RESET LC_MESSAGES; RESET ALL", chose, false),
        ];
        for (sql, settings, differ) in cases {
            let parts = read_string(sql.as_bytes()).unwrap_or_default();
            assert!(!parts.is_empty(), "{sql}");
            assert_eq!(messages_may_differ(&parts, &settings), differ, "{sql}");
        }
    }

    #[test]
    fn asyncpgs_release_string_is_run_by_pgvigil() {
        let asyncpg = "SELECT pg_advisory_unlock_all();\nCLOSE ALL;\nUNLISTEN *;\nRESET ALL;";
        assert_eq!(
            kinds(asyncpg),
            Some(vec![
                Kind::Release(Release::UnlockAll { qualified: false }),
                Kind::Release(Release::CloseAll),
                Kind::Release(Release::Unlisten),
                Kind::Resetting(Resetting::ResetAll),
            ])
        );
    }

    #[test]
    fn only_strings_whose_statements_after_a_reset_cannot_observe_settings_are_run() {
        let run = [
            "RESET ALL; DEALLOCATE ALL",
            "deallocate prepare all; reset application_name; set work_mem = default;",
            "UNLISTEN chan; SET SESSION TimeZone TO DEFAULT; UNLISTEN *",
            "RESET ALL; SELECT pg_catalog . pg_advisory_unlock_all ( )",
            "RESET ALL;;RESET ALL",
        ];
        for sql in run {
            assert!(kinds(sql).is_some(), "{sql}");
        }
        let forwarded = [
            "RESET ALL",
            "RESET ALL;",
            "UNLISTEN *; CLOSE ALL",
            "RESET ALL; SELECT 1",
            "SELECT 1; RESET ALL",
            "SET work_mem = '1MB'; RESET ALL",
            "RESET ALL; SELECT pg_advisory_unlock_all()",
            "CLOSE ALL; DISCARD ALL",
            "RESET ALL; SET LOCAL work_mem TO DEFAULT",
            "RESET ALL; /* ; */ UNLISTEN *",
            "RESET ALL; -- UNLISTEN *",
            "RESET \"application_name\"; UNLISTEN *",
            "RESET ALL; UNLISTEN $$x$$",
            "BEGIN; RESET ALL; COMMIT",
            "RESET ALL; DEALLOCATE name",
            "RESET ALL; CLOSE cursor_name",
            "RESET ALL; SELECT pg_advisory_unlock_all() x",
        ];
        for sql in forwarded {
            assert!(kinds(sql).is_none(), "{sql}");
        }
    }
}
