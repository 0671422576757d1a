//! The SQL console (PgBouncer's admin console): `psql -d pgvigil` as a user with `admin = true`
//! runs `SHOW NODES|POOLS|CLIENTS|SERVERS|STATS|EVENTS|CONFIG|VERSION`, `PAUSE`, `RESUME` and
//! `RELOAD`. Only the simple query protocol is served; result sets are written with the
//! protocol builders of `pgvigil-proto`, never reaching a node.

mod show;

use bytes::{Buf, BytesMut};
use pgvigil_proto::encode::{self, PgError, Severity};
use pgvigil_proto::frame::next_message;
use pgvigil_proto::frontend::{self, Query};
use pgvigil_proto::{sqlstate, TxStatus};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::info;

use crate::admin::steer;
use crate::cancel::CancelKey;
use crate::proxy::Proxy;
use crate::stream::Stream;

/// The database name that opens the console instead of a session on the nodes.
pub const DATABASE: &str = "pgvigil";

/// Largest message the console accepts (a query naming a command is short).
const MAX_MESSAGE: usize = 64 * 1024;

/// SQLSTATE of a statement with a syntax error.
const SYNTAX_ERROR: &str = "42601";
/// SQLSTATE of a configuration file PostgreSQL cannot use (`config_file_error`).
const CONFIG_FILE_ERROR: &str = "F0000";

/// What the console answers one statement with.
enum Answer {
    /// Rows, then `CommandComplete` with this tag.
    Rows(show::ResultSet),
    /// A command done: a NOTICE with `message`, then `CommandComplete` with `tag`.
    Done { tag: &'static str, message: String },
    /// An ERROR with this SQLSTATE; the session goes on.
    Error { code: &'static str, message: String },
}

/// Serves the console to an authenticated admin client until it leaves: the greeting, then one
/// answer per statement.
pub async fn serve(mut stream: Stream, mut input: BytesMut, proxy: &Proxy, key: &CancelKey) {
    let mut out = BytesMut::with_capacity(1024);
    encode::auth_ok(&mut out);
    for (name, value) in [
        ("server_version", env!("CARGO_PKG_VERSION")),
        ("server_encoding", "UTF8"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO"),
        ("integer_datetimes", "on"),
        ("standard_conforming_strings", "on"),
        ("application_name", ""),
    ] {
        encode::parameter_status(&mut out, name.as_bytes(), value.as_bytes());
    }
    encode::backend_key_data(&mut out, key.pid, &key.secret.to_be_bytes());
    encode::ready_for_query(&mut out, TxStatus::Idle);
    // Set after an extended-protocol message was refused: the rest up to Sync is skipped.
    let mut skipping = false;
    loop {
        if !out.is_empty() {
            if stream.write_all(&out).await.is_err() || stream.flush().await.is_err() {
                return;
            }
            out.clear();
        }
        let (tag, body) = match next_message(&input, MAX_MESSAGE) {
            Ok(Some(message)) => (message.tag, message.body.to_vec()),
            Ok(None) => match stream.read_buf(&mut input).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            },
            Err(error) => {
                fatal(&mut out, sqlstate::PROTOCOL_VIOLATION, &error.to_string());
                let _ = stream.write_all(&out).await;
                return;
            }
        };
        input.advance(5 + body.len());
        match tag {
            frontend::tag::TERMINATE => return,
            frontend::tag::QUERY => {
                let sql = match Query::parse(&body) {
                    Ok(query) => String::from_utf8_lossy(query.sql).into_owned(),
                    Err(error) => {
                        fatal(&mut out, sqlstate::PROTOCOL_VIOLATION, &error.to_string());
                        let _ = stream.write_all(&out).await;
                        return;
                    }
                };
                run_query(&sql, proxy, &mut out).await;
                encode::ready_for_query(&mut out, TxStatus::Idle);
            }
            frontend::tag::SYNC => {
                skipping = false;
                encode::ready_for_query(&mut out, TxStatus::Idle);
            }
            frontend::tag::PARSE
            | frontend::tag::BIND
            | frontend::tag::DESCRIBE
            | frontend::tag::EXECUTE
            | frontend::tag::CLOSE
            | frontend::tag::FLUSH
            | frontend::tag::FUNCTION_CALL => {
                if !skipping {
                    skipping = tag != frontend::tag::FUNCTION_CALL;
                    error(
                        &mut out,
                        sqlstate::FEATURE_NOT_SUPPORTED,
                        "the pgvigil console speaks only the simple query protocol (psql does)",
                    );
                    if tag == frontend::tag::FUNCTION_CALL {
                        encode::ready_for_query(&mut out, TxStatus::Idle);
                    }
                }
            }
            other => {
                let message = format!(
                    "invalid frontend message type {other} ('{}')",
                    char::from(other).escape_default()
                );
                fatal(&mut out, sqlstate::PROTOCOL_VIOLATION, &message);
                let _ = stream.write_all(&out).await;
                return;
            }
        }
    }
}

/// Answers every statement of a simple Query (split at semicolons), stopping at the first
/// error as PostgreSQL does.
async fn run_query(sql: &str, proxy: &Proxy, out: &mut BytesMut) {
    let statements: Vec<&str> = sql
        .split(';')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    if statements.is_empty() {
        encode::empty_query_response(out);
        return;
    }
    for statement in statements {
        info!(statement, "console");
        match answer(statement, proxy).await {
            Answer::Rows(set) => set.encode(out),
            Answer::Done { tag, message } => {
                encode::notice_response(out, "NOTICE", "00000", &message);
                encode::command_complete(out, tag);
            }
            Answer::Error { code, message } => {
                error(out, code, &message);
                return;
            }
        }
    }
}

/// The answer to one statement.
async fn answer(statement: &str, proxy: &Proxy) -> Answer {
    let words: Vec<String> = statement
        .split_whitespace()
        .map(str::to_ascii_uppercase)
        .collect();
    let words: Vec<&str> = words.iter().map(String::as_str).collect();
    match words.as_slice() {
        ["SHOW", item] => match show::show(item, proxy) {
            Some(set) => Answer::Rows(set),
            None => Answer::Error {
                code: sqlstate::FEATURE_NOT_SUPPORTED,
                message: format!(
                    "unknown SHOW item {:?}: the console shows {}",
                    item.to_ascii_lowercase(),
                    show::ITEMS.join(", ")
                ),
            },
        },
        ["PAUSE"] => match steer::pause(proxy, Some(steer::DEFAULT_PAUSE_WAIT)).await {
            Ok(done) => Answer::Done {
                tag: "PAUSE",
                message: done.message,
            },
            Err(refusal) => Answer::Done {
                tag: "PAUSE",
                message: format!("{}; {}", refusal.refused, refusal.next),
            },
        },
        ["RESUME"] => Answer::Done {
            tag: "RESUME",
            message: steer::resume(proxy).message,
        },
        ["RELOAD"] => match steer::reload(proxy).await {
            Ok(done) => Answer::Done {
                tag: "RELOAD",
                message: done.message,
            },
            Err(refusal) => Answer::Error {
                code: CONFIG_FILE_ERROR,
                message: refusal.refused,
            },
        },
        [verb, ..] if ["SHOW", "PAUSE", "RESUME", "RELOAD"].contains(verb) => Answer::Error {
            code: SYNTAX_ERROR,
            message: format!(
                "syntax error in {statement:?}: write SHOW ITEM, PAUSE, RESUME or RELOAD"
            ),
        },
        _ => Answer::Error {
            code: sqlstate::FEATURE_NOT_SUPPORTED,
            message: format!(
                "the pgvigil console does not run {statement:?}: it runs SHOW {}, PAUSE, RESUME and RELOAD",
                show::ITEMS.join("|")
            ),
        },
    }
}

fn error(out: &mut BytesMut, code: &str, message: &str) {
    encode::error_response_with(
        out,
        &PgError {
            severity: Severity::Error,
            code,
            message,
            detail: None,
            hint: None,
        },
    );
}

fn fatal(out: &mut BytesMut, code: &str, message: &str) {
    encode::error_response_with(
        out,
        &PgError {
            severity: Severity::Fatal,
            code,
            message,
            detail: None,
            hint: None,
        },
    );
}
