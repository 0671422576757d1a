//! The session's settings log: the statements that changed session state (SET, RESET,
//! `set_config(name, value, false)`, ...) and took effect, in order, to replay on every other
//! connection the session uses; and what each connection has run of it.
//!
//! A statement enters the log only once it is known to have taken effect, from what the server
//! answered: its ReadyForQuery with no error since the one before (an error rolls back every
//! setting of its implicit transaction), and, inside a transaction block, the block's COMMIT (a
//! rolled-back block undoes its settings). A ROLLBACK TO SAVEPOINT inside a block that changed
//! settings cannot be followed: which of them it undid is unknown, so the session is pinned.

use std::sync::Arc;

use pgvigil_proto::TxStatus;

use super::replay::SqlText;
use super::sql_words::{skip_comments, string, token, word};
use crate::topology::NodeId;

/// Most statements replayed on a node; beyond it the session stays on the primary.
const REPLAY_LIMIT: usize = 256;

/// The settings log of one session.
///
/// A `RESET ALL` or `DISCARD ALL` restarts the log: what came before is undone, so the log then
/// begins with the statement pgvigil ran for it (which also applies the client's startup
/// parameters again). Counts of statements run are absolute (since the session began), so that
/// a connection that ran statements of the log before a restart runs the new log from its
/// start.
#[derive(Default)]
pub struct Settings {
    /// Requests forwarded that a ReadyForQuery answers (Query, FunctionCall, Sync).
    requests: u64,
    /// ReadyForQuery messages relayed.
    readies: u64,
    /// What the server said since its last ReadyForQuery.
    since_ready: Outcome,
    /// Why the log cannot rebuild the session's state, once it cannot.
    unreplayable: Option<&'static str>,
    /// Allocated with the first setting sent or run: most sessions set nothing, and every node
    /// of a session without one has run all of its (empty) log.
    log: Option<Box<Log>>,
}

/// What [`Settings`] keeps once the session has sent or run a setting.
#[derive(Default)]
struct Log {
    /// Statements that took effect, in order, since the log last restarted.
    statements: Vec<SqlText>,
    /// How many statements the log held before its last restart, in all.
    base: usize,
    /// How many statements of `statements` each node's connection has run, by node (a node
    /// past the end has run none).
    applied: Vec<usize>,
    /// Sent and not answered yet, each with the number of the ReadyForQuery that answers it.
    sent: Vec<(u64, SqlText)>,
    /// Took effect inside the open transaction block: logged if the block commits.
    in_block: Vec<(SqlText, Scope)>,
    /// `statements` shared with the connections the session returns to the pool (see
    /// [`Settings::ran_on`]), made once per change of the log.
    shared: Option<Arc<[SqlText]>>,
}

impl Log {
    /// How many statements of the log `node` has run.
    fn applied(&self, node: NodeId) -> usize {
        self.applied.get(node).copied().unwrap_or(0)
    }

    /// `node` has run the first `n` statements of the log.
    fn set_applied(&mut self, node: NodeId, n: usize) {
        if self.applied.len() <= node {
            self.applied.resize(node + 1, 0);
        }
        self.applied[node] = n;
    }

    /// Logs statements that took effect on `node` (which therefore has them); `unreplayable`
    /// is set when the log cannot take one more.
    fn append(
        &mut self,
        statements: Vec<(SqlText, Scope)>,
        node: NodeId,
        unreplayable: &mut Option<&'static str>,
    ) {
        if !statements.is_empty() {
            self.shared = None;
        }
        for (sql, scope) in statements {
            let caught_up = self.applied(node) == self.statements.len();
            match scope {
                Scope::Adds if self.statements.len() >= REPLAY_LIMIT => {
                    unreplayable.get_or_insert("too many session settings to replay");
                    return;
                }
                Scope::Adds => self.statements.push(sql),
                Scope::ResetsAll | Scope::Discards => {
                    // `RESET ALL` leaves the session authorization as it is.
                    let kept: Vec<SqlText> = match scope {
                        Scope::ResetsAll => self
                            .statements
                            .iter()
                            .filter(|sql| sets_authorization(sql))
                            .cloned()
                            .collect(),
                        Scope::Adds | Scope::Discards => Vec::new(),
                    };
                    self.base += self.statements.len();
                    self.statements = kept;
                    self.statements.push(sql);
                    self.applied.fill(0);
                }
            }
            if caught_up {
                let len = self.statements.len();
                self.set_applied(node, len);
            }
        }
    }
}

/// What a statement that took effect does to the statements logged before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// It adds to them.
    Adds,
    /// It undoes them all but `SET SESSION AUTHORIZATION` (`RESET ALL`, then the startup
    /// parameters): the log restarts with those and it.
    ResetsAll,
    /// It undoes them all (`DISCARD ALL`'s settings, then the startup parameters): the log
    /// restarts with it.
    Discards,
}

/// What the server answered between two ReadyForQuery messages.
#[derive(Debug, Default, Clone, Copy)]
struct Outcome {
    error: bool,
    commit: bool,
    rollback: bool,
}

impl Settings {
    /// The log, allocated now if the session had none.
    fn log_mut(&mut self) -> &mut Log {
        self.log.get_or_insert_default()
    }

    /// A request that a ReadyForQuery will answer was forwarded.
    pub fn request(&mut self) {
        self.requests += 1;
    }

    /// A session-state statement was forwarded; `in_query`: in a Query (already counted by
    /// [`Settings::request`]), else in a Parse (answered at the next Sync).
    pub fn sent(&mut self, sql: &[u8], in_query: bool) {
        let answered_by = self.requests + u64::from(!in_query);
        self.log_mut().sent.push((answered_by, sql.into()));
    }

    /// The server sent an ErrorResponse (not FATAL).
    pub fn error(&mut self) {
        self.since_ready.error = true;
    }

    /// The server sent CommandComplete with `tag`.
    pub fn command_complete(&mut self, tag: &[u8]) {
        match tag {
            b"COMMIT\0" => self.since_ready.commit = true,
            b"ROLLBACK\0" => self.since_ready.rollback = true,
            _ => {}
        }
    }

    /// The connection to `node` sent ReadyForQuery with `status`: the statements it answers
    /// took effect, or did not.
    pub fn ready(&mut self, status: TxStatus, node: NodeId) {
        self.readies += 1;
        let outcome = std::mem::take(&mut self.since_ready);
        let Some(log) = self.log.as_deref_mut() else {
            // Nothing sent, nothing in a block: nothing to log.
            return;
        };
        let unreplayable = &mut self.unreplayable;
        let answered = log
            .sent
            .iter()
            .take_while(|(n, _)| *n <= self.readies)
            .count();
        let answered = log.sent.drain(..answered);
        let mut took_effect: Vec<(SqlText, Scope)> = Vec::new();
        if !outcome.error {
            took_effect.extend(answered.map(|(_, sql)| (sql, Scope::Adds)));
        } else {
            drop(answered);
        }
        match status {
            TxStatus::Idle => {
                let block = std::mem::take(&mut log.in_block);
                if outcome.commit && !outcome.error {
                    log.append(block, node, unreplayable);
                }
                if outcome.rollback && !outcome.commit && !took_effect.is_empty() {
                    // A ROLLBACK in the same unit as the settings may have undone them.
                    unreplayable.get_or_insert("a setting and a ROLLBACK in one unit");
                }
                log.append(took_effect, node, unreplayable);
            }
            TxStatus::InTransaction | TxStatus::Failed => {
                if outcome.rollback && !(log.in_block.is_empty() && took_effect.is_empty()) {
                    unreplayable
                        .get_or_insert("a setting inside a transaction met ROLLBACK TO SAVEPOINT");
                }
                log.in_block.extend(took_effect);
            }
        }
    }

    /// pgvigil ran `sql` for the client on the connection to `node` (see `reset`), and it took
    /// effect there; `status`: the connection's transaction status after it.
    pub fn ran(&mut self, sql: SqlText, scope: Scope, status: TxStatus, node: NodeId) {
        let unreplayable = &mut self.unreplayable;
        let log = self.log.get_or_insert_default();
        match status {
            TxStatus::Idle => log.append(vec![(sql, scope)], node, unreplayable),
            // Logged if the block commits, like a SET inside it.
            TxStatus::InTransaction => log.in_block.push((sql, scope)),
            // A statement that took effect leaves no failed block.
            TxStatus::Failed => {}
        }
    }

    /// Every request was answered: statements still waiting for an answer were miscounted (a
    /// Sync the server ignored in COPY mode), so their outcome is unknown.
    pub fn quiet(&mut self) {
        self.requests = self.readies;
        if let Some(log) = self.log.as_deref_mut().filter(|log| !log.sent.is_empty()) {
            log.sent.clear();
            self.cannot_replay("a setting whose outcome is unknown");
        }
    }

    /// The current connection was lost: what it had sent or set inside its transaction block
    /// died with it (the block rolled back).
    pub fn lost(&mut self) {
        if let Some(log) = self.log.as_deref_mut() {
            log.sent.clear();
            log.in_block.clear();
        }
        self.requests = self.readies;
        self.since_ready = Outcome::default();
    }

    /// Why the log cannot rebuild the session's state, if it cannot.
    pub fn unreplayable(&self) -> Option<&'static str> {
        self.unreplayable
    }

    /// Every statement that took effect, in order.
    pub fn log(&self) -> &[SqlText] {
        self.log.as_deref().map_or(&[], |log| &log.statements)
    }

    /// What `node` has not run yet.
    pub fn missing(&self, node: NodeId) -> &[SqlText] {
        let Some(log) = self.log.as_deref() else {
            return &[];
        };
        let applied = log.applied(node).min(log.statements.len());
        &log.statements[applied..]
    }

    /// `node` ran everything [`Settings::missing`] listed.
    pub fn caught_up(&mut self, node: NodeId) {
        if let Some(log) = self.log.as_deref_mut() {
            log.set_applied(node, log.statements.len());
        }
    }

    /// A fresh connection to `node` replaced whatever the session had there.
    pub fn fresh_connection(&mut self, node: NodeId) {
        if let Some(log) = self.log.as_deref_mut() {
            log.set_applied(node, 0);
        }
    }

    /// How many statements the connection to `node` has run, counted since the session began
    /// (see [`Settings::resume`]).
    pub fn applied(&self, node: NodeId) -> usize {
        self.log
            .as_deref()
            .map_or(0, |log| log.base + log.applied(node))
    }

    /// The connection to `node` is one that has run the first `applied` statements (counted
    /// as [`Settings::applied`] counts them) already (transaction pooling: the session had it
    /// before). One that ran them before the log last restarted runs the new log whole.
    pub fn resume(&mut self, node: NodeId, applied: usize) {
        if let Some(log) = self.log.as_deref_mut() {
            let n = applied.saturating_sub(log.base).min(log.statements.len());
            log.set_applied(node, n);
        }
    }

    /// What the connection to `node` carries back to the pool for other sessions to compare
    /// with their own logs (see [`Settings::continues`]): the log, when the connection has run
    /// all of it and it is not empty.
    pub fn ran_on(&mut self, node: NodeId) -> Option<Arc<[SqlText]>> {
        let log = self.log.as_deref_mut()?;
        if log.statements.is_empty() || log.applied(node) != log.statements.len() {
            return None;
        }
        let statements = &log.statements;
        Some(
            log.shared
                .get_or_insert_with(|| statements.as_slice().into())
                .clone(),
        )
    }

    /// A connection that ran the client's startup parameters and then `ran` (another session's
    /// log, from [`Settings::ran_on`]) is in the state this log makes after its first
    /// `ran.len()` statements if the log begins with `ran` (the same statements from the same
    /// state end in the same state): how many statements it has run then, counted as
    /// [`Settings::applied`] counts them.
    pub fn continues(&self, ran: &[SqlText]) -> Option<usize> {
        let base = self.log.as_deref().map_or(0, |log| log.base);
        self.log().starts_with(ran).then(|| base + ran.len())
    }

    fn cannot_replay(&mut self, reason: &'static str) {
        self.unreplayable.get_or_insert(reason);
    }
}

/// Whether `sql` is a `SET SESSION AUTHORIZATION`, which `RESET ALL` does not undo.
fn sets_authorization(sql: &[u8]) -> bool {
    word(skip_comments(sql), b"set")
        .and_then(|rest| word(rest, b"session"))
        .and_then(|rest| word(rest, b"authorization"))
        .is_some()
}

/// What a statement's call of `set_config` does to the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetConfig {
    /// `SELECT set_config('name', 'value', false)` with constants: session state like SET.
    Session,
    /// `SELECT set_config('name', 'value', true)` with constants: lasts for the transaction.
    Local,
    /// Any other call: the value cannot be known, so it cannot be replayed.
    Unknown,
}

/// Reads what `sql`, which calls `set_config` (the classifier says so), does with it. Only the
/// exact form `SELECT [pg_catalog.]set_config('name', 'value', false | true)` (standard strings
/// without backslashes, an optional `;`) is understood; any other is `Unknown`.
pub fn set_config(sql: &[u8]) -> SetConfig {
    match constant_call(sql) {
        Some(true) => SetConfig::Local,
        Some(false) => SetConfig::Session,
        None => SetConfig::Unknown,
    }
}

/// `Some(is_local)` for a `SELECT set_config('..', '..', bool)` of constants.
fn constant_call(sql: &[u8]) -> Option<bool> {
    let mut rest = word(sql, b"select")?;
    rest = word(rest, b"pg_catalog.").unwrap_or(rest);
    rest = token(rest, b"set_config")?;
    rest = token(rest, b"(")?;
    rest = string(rest)?;
    rest = token(rest, b",")?;
    rest = string(rest)?;
    rest = token(rest, b",")?;
    let (local, after) = match word(rest, b"true") {
        Some(after) => (true, after),
        None => (false, word(rest, b"false")?),
    };
    rest = token(after, b")")?;
    rest = token(rest, b";").unwrap_or(rest);
    rest.trim_ascii().is_empty().then_some(local)
}

#[cfg(test)]
mod tests;
