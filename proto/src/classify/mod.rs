//! Is this SQL text provably read-only? A zero-allocation, single-pass lexer answers.
//!
//! [`classify`] reads the text of a Query or Parse message as bytes (any ASCII-safe client
//! encoding; see [`encoding_is_safe`]) the way PostgreSQL's scanner splits it: `--` and nested
//! `/* */` comments, `"quoted identifiers"`, `'standard'`, `E'escape'`, `U&'unicode'` and
//! `$tag$dollar$tag$` strings, `$1` parameters. A `;` or keyword inside any of them counts for
//! nothing. It allocates nothing and never recurses; cost is linear in the text. A plain SELECT
//! of names, numbers and parameters (no parenthesis, literal, comment or locking word) is
//! answered by a one-pass check before the lexer runs, and so is a plain INSERT, UPDATE or DELETE
//! (no literal, comment or call that may pin).
//!
//! # Policy: unknown means primary
//! A statement is read-only only when every rule below proves it:
//! - It starts (after any `(`) with SELECT, VALUES, TABLE, WITH or SHOW; or it is EXPLAIN without
//!   ANALYZE (nothing runs), or EXPLAIN ANALYZE of a read-only statement; or `COPY table TO
//!   STDOUT` / `COPY (read-only query) TO STDOUT`; or transaction control that writes nothing
//!   (`BEGIN READ ONLY`, COMMIT, ROLLBACK, SAVEPOINT, ...: the router keeps those on the
//!   transaction's node anyway).
//! - Its body holds no INSERT, UPDATE, DELETE or MERGE (data-modifying CTEs), no INTO
//!   (`SELECT INTO`), no `FOR UPDATE | SHARE | NO KEY UPDATE | KEY SHARE`.
//! - Every function call in it is known not to write. A call is a name followed by `(` unless
//!   the name is grammar (`IN (`, `OVER (`, ...), a column alias list (`AS t(a, b)`) or a CTE
//!   column list (`WITH t(a) AS (`). A call is read-only when the name (unqualified or in
//!   `pg_catalog`) is on a built-in list of common pure functions (aggregates, string, date,
//!   math, `json_*`, `array_*`, casts such as `varchar(10)`, `pg_sleep`, `inet_server_port`,
//!   `pg_is_in_recovery`, `current_setting`, uuid-ossp's and pgcrypto's functions, ...) or on
//!   the user's `read_functions`; it writes when it is on the built-in write list (`nextval`,
//!   `setval`, `currval`, `lastval`, `pg_advisory_*`, `txid_current*`, `pg_current_xact_id*`,
//!   `pg_notify`, `lo_*`, `set_config`, `pg_switch_wal`, ...) or the user's `write_functions`.
//!   Write lists win.
//!   Any other function, including every user function and every name in another schema, is
//!   treated as writing: a wrong "read" sends a write to a standby, a wrong "write" only costs
//!   the primary one statement. `pg_terminate_backend` and `pg_cancel_backend` are not listed
//!   as reads on purpose: they act on a backend pid, which is only meaningful on the node the
//!   client saw it on.
//! - The text is complete (no unterminated comment or literal) and no plain `'...'` string
//!   holds a backslash: where such a string ends depends on `standard_conforming_strings`.
//!
//! What the lexer cannot see: a view, operator, cast or default that calls a writing function.
//! A standby rejects such a statement with SQLSTATE 25006 (read_only_sql_transaction), so the
//! mistake is loud, never silent.
//!
//! Calls count beyond routing too: a function on neither list called by a query or by an
//! INSERT, UPDATE, DELETE or MERGE (where an INSERT's column list and the `ON CONFLICT (...)`
//! target are not calls) is code whose effect on the session is unknown, and pins it
//! ([`Pin::UnknownFunction`]) unless a `/* pgvigil:replica */` hint vouches for the string.
//! Other statements (DDL) are not read for it.
//!
//! A string of several statements is read-only only if every statement is; pins and session
//! changes accumulate, and [`Classification::tx`] is the last transaction-control statement.
//! An empty string (or only `;` and comments) is read-only: the server answers
//! EmptyQueryResponse without touching data, so any node will do.

mod blocks;
mod encoding;
mod fast;
mod functions;
mod keyword;
mod lexer;
mod statement;
mod wordtable;

pub use encoding::encoding_is_safe;
pub use functions::FunctionLists;

use lexer::{Lexer, Tok};
use statement::Statement;

/// What the router needs to know about one Query string (or one Parse statement).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Classification {
    /// Every statement is provably read-only (true for an empty string).
    pub read_only: bool,
    /// Why the string is not read-only: the first reason found.
    pub reason: Option<Reason>,
    /// The last transaction-control statement in the string.
    pub tx: Option<TxControl>,
    /// A statement changes session state that must be replayed on every node the session uses
    /// (SET or RESET of a session variable, `SET SESSION CHARACTERISTICS`, DISCARD); not SET
    /// LOCAL, SET TRANSACTION or SET CONSTRAINTS.
    pub session_state: bool,
    /// A statement is SET LOCAL: it changes a setting until the transaction ends.
    pub local_setting: bool,
    /// Set when the session's default transaction mode changes: `Some(true)` after `SET SESSION
    /// CHARACTERISTICS AS TRANSACTION READ ONLY` or `SET default_transaction_read_only = on`,
    /// `Some(false)` after anything that may make it read-write again (READ WRITE, RESET,
    /// DISCARD ALL, a SERIALIZABLE default, a value other than a plain "on").
    pub session_read_only: Option<bool>,
    /// The first reason the session must stay on the primary from now on.
    pub pin: Option<Pin>,
    /// A statement calls `set_config`, whose effect on the session depends on its arguments.
    pub set_config: bool,
    /// The routing hint of a leading `/* pgvigil:primary */` or `/* pgvigil:replica */`.
    pub hint: Option<Hint>,
    /// The number of non-empty statements.
    pub statements: usize,
}

impl Classification {
    /// One statement that may write, with nothing else to report: a plain write, or a text that
    /// cannot be read.
    pub const ONE_WRITE: Classification = Classification {
        read_only: false,
        reason: Some(Reason::Statement),
        tx: None,
        session_state: false,
        local_setting: false,
        session_read_only: None,
        pin: None,
        set_config: false,
        hint: None,
        statements: 1,
    };

    /// The string is one statement that only changes session state: it writes no WAL.
    pub fn lone_setting(&self) -> bool {
        self.session_state && self.statements == 1
    }
}

/// Why a string is not provably read-only.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Reason {
    /// The statement is not a read (DML, DDL, COPY FROM, CALL, SET, a read-write BEGIN, ...)
    /// or is not understood.
    Statement,
    /// INSERT, UPDATE, DELETE or MERGE inside a query (a data-modifying CTE).
    DataModifying,
    /// `SELECT ... INTO` creates a table.
    SelectInto,
    /// `FOR UPDATE` / `FOR SHARE` row locks, which a standby refuses.
    RowLock,
    /// A call of a function that writes or needs the primary.
    WriteFunction,
    /// A call of a function on no list.
    UnknownFunction,
    /// The text ends inside a comment, a literal, a quoted identifier or parentheses.
    Unterminated,
    /// A backslash in a plain `'...'` string, whose end depends on `standard_conforming_strings`.
    AmbiguousBackslash,
}

impl Reason {
    /// A short phrase for debug logs of routing decisions.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Statement => "statement is not a read",
            Reason::DataModifying => "data-modifying statement inside a query",
            Reason::SelectInto => "SELECT INTO",
            Reason::RowLock => "row-locking clause",
            Reason::WriteFunction => "call of a writing function",
            Reason::UnknownFunction => "call of a function not known to be read-only",
            Reason::Unterminated => "unterminated comment, literal or parenthesis",
            Reason::AmbiguousBackslash => "backslash in a standard string",
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A transaction-control statement.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum TxControl {
    /// BEGIN or START TRANSACTION.
    Begin {
        /// `Some(true)`: READ ONLY and not SERIALIZABLE, so a replica may run it; `Some(false)`:
        /// READ WRITE or SERIALIZABLE (a standby refuses serializable transactions); `None`: no
        /// access mode given, the session's default applies.
        read_only: Option<bool>,
    },
    /// COMMIT or END.
    Commit,
    /// ROLLBACK or ABORT.
    Rollback,
    /// SAVEPOINT.
    Savepoint,
    /// RELEASE [SAVEPOINT].
    Release,
    /// ROLLBACK [WORK | TRANSACTION] TO [SAVEPOINT].
    RollbackToSavepoint,
    /// PREPARE TRANSACTION (two-phase commit: primary only).
    PrepareTransaction,
    /// COMMIT PREPARED.
    CommitPrepared,
    /// ROLLBACK PREPARED.
    RollbackPrepared,
}

/// Why a session must stay on the primary for the rest of its life.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Pin {
    /// CREATE TEMP TABLE / VIEW / SEQUENCE, or SELECT INTO TEMP.
    TempTable,
    /// SQL-level PREPARE.
    Prepare,
    /// A session-level advisory lock (`pg_advisory_lock*`, `pg_try_advisory_lock*`).
    AdvisoryLock,
    /// LISTEN.
    Listen,
    /// DO: an anonymous code block, whose effects are unknown.
    Do,
    /// CALL of a procedure, whose effects are unknown.
    Call,
    /// LOAD of a shared library.
    Load,
    /// DECLARE ... WITH HOLD: a cursor that outlives its transaction on that connection.
    HoldCursor,
    /// A call of a function on neither list (unless a `/* pgvigil:replica */` hint vouches for
    /// the string), in a query or in an INSERT, UPDATE, DELETE or MERGE.
    UnknownFunction,
}

/// A routing hint written by the application.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Hint {
    /// `/* pgvigil:primary */`: send to the primary.
    Primary,
    /// `/* pgvigil:replica */`: a replica may run it even if it is not provably read-only.
    Replica,
}

/// Classifies a SQL string of one or more statements; see the module doc for the rules.
pub fn classify(sql: &[u8], functions: &FunctionLists) -> Classification {
    classify_fast(sql).unwrap_or_else(|| classify_full(sql, functions))
}

/// [`classify`]'s answer when one of its fast paths gives it, which needs no function lists:
/// a plain SELECT (no parenthesis, literal, comment or locking word), a plain INSERT, UPDATE
/// or DELETE, or a lone BEGIN, COMMIT or ROLLBACK, answered in one pass. `None`: ask
/// [`classify_full`].
pub fn classify_fast(sql: &[u8]) -> Option<Classification> {
    fast::plain_select(sql)
        .or_else(|| fast::plain_write(sql))
        .or_else(|| fast::lone_tx_word(sql))
}

/// [`classify`] without its fast path: the lexer and the statement machine.
pub fn classify_full(sql: &[u8], functions: &FunctionLists) -> Classification {
    // Nothing seen yet: an empty string is read-only.
    let mut out = Classification {
        read_only: true,
        reason: None,
        hint: leading_hint(sql),
        statements: 0,
        ..Classification::ONE_WRITE
    };
    let mut lexer = Lexer::new(sql);
    let mut statement = Statement::new();
    while let Some(tok) = lexer.next_token() {
        match tok {
            Tok::Semi if statement.ends_at_semicolon() => {
                std::mem::replace(&mut statement, Statement::new()).finish(&mut out);
            }
            Tok::Unterminated => statement.fail(Reason::Unterminated),
            tok => statement.feed(tok, functions),
        }
    }
    statement.finish(&mut out);
    out
}

/// The hint in a block comment before the first token, if any (the first hint wins).
fn leading_hint(sql: &[u8]) -> Option<Hint> {
    let mut pos = 0;
    loop {
        while sql.get(pos).copied().is_some_and(lexer::is_space) {
            pos += 1;
        }
        let rest = sql.get(pos..)?;
        if rest.starts_with(b"--") {
            pos += rest.iter().position(|&b| b == b'\n')?;
            continue;
        }
        if !rest.starts_with(b"/*") {
            return None;
        }
        let end = lexer::block_comment_end(sql, pos)?;
        let text = sql.get(pos + 2..end - 2)?.trim_ascii();
        if text.eq_ignore_ascii_case(b"pgvigil:primary") {
            return Some(Hint::Primary);
        }
        if text.eq_ignore_ascii_case(b"pgvigil:replica") {
            return Some(Hint::Replica);
        }
        pos = end;
    }
}

#[cfg(test)]
mod tests;
