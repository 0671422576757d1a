//! What a lost server connection means for the client: whether its session may go on, and where
//! the loss leaves its transaction. The client must never see what PostgreSQL itself could not
//! have shown it: a transaction that goes on after half of it vanished, or "rolled back" for a
//! COMMIT that may have committed.

use pgvigil_proto::classify::TxControl;
use pgvigil_proto::TxStatus;
use tracing::debug;

use super::relay::{LossCause, NodeFatal};
use super::startup::ClientStartup;
use super::unit::Ending;
use crate::proxy::Proxy;
use crate::server::ServerConn;
use crate::topology::NodeId;

/// Where a lost connection leaves the client's transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Aftermath {
    /// Nothing was running and no transaction was open: nothing to tell.
    Quiet,
    /// What was running failed outside any transaction (a read, or a ROLLBACK): an error and
    /// ReadyForQuery 'I'.
    Failed,
    /// A COMMIT or an autocommit write was running and may have committed: 08007
    /// (transaction_resolution_unknown) and ReadyForQuery 'I'.
    InDoubt,
    /// A statement inside a transaction block was running: an error and ReadyForQuery 'E'; the
    /// block stays failed until ROLLBACK.
    Aborted,
    /// A transaction block was open with nothing running: the client hears of it with its next
    /// statement.
    Unannounced,
}

/// Where the loss leaves the client's transaction, from the connection's last ReadyForQuery
/// status, whether requests were unanswered, and the unit forwarded last (the one running).
pub fn aftermath(server_tx: TxStatus, busy: bool, unit: Ending) -> Aftermath {
    let commits = matches!(
        unit.tx,
        Some(TxControl::Commit | TxControl::PrepareTransaction | TxControl::CommitPrepared)
    );
    match (server_tx, busy) {
        (TxStatus::Idle, false) => Aftermath::Quiet,
        (_, false) => Aftermath::Unannounced,
        (TxStatus::Idle, true) => {
            if unit.tx == Some(TxControl::Rollback) {
                Aftermath::Failed
            } else if unit.begins && !commits {
                // The unit opened a transaction block that it did not close.
                Aftermath::Aborted
            } else if !unit.read_only {
                Aftermath::InDoubt
            } else {
                Aftermath::Failed
            }
        }
        (TxStatus::InTransaction, true) if commits => Aftermath::InDoubt,
        (_, true) if commits || unit.tx == Some(TxControl::Rollback) => Aftermath::Failed,
        (_, true) => Aftermath::Aborted,
    }
}

/// Whether the connection ended because an administrator terminated its backend
/// (`pg_terminate_backend`, FATAL 57P01) on a node that stays up: such a session ends as it would
/// directly. A fast shutdown sends the same FATAL, but the postmaster stops accepting connections
/// before it signals the backends, so a login attempt made after the FATAL tells the two apart.
pub async fn terminated_by_admin(
    fatal: Option<&NodeFatal>,
    cause: &LossCause,
    node: NodeId,
    startup: &ClientStartup,
    proxy: &Proxy,
) -> bool {
    if fatal.is_none_or(|f| &f.code != b"57P01") || matches!(cause, LossCause::Unusable(_)) {
        return false;
    }
    let target = proxy.login_target(node, startup.user(), startup.database(), startup.password());
    let login = tokio::time::timeout(proxy.config().health.timeout, ServerConn::connect(&target));
    match login.await {
        Ok(Ok(_)) => true,
        Ok(Err(error)) => {
            debug!(node, %error, "the node refuses logins after a 57P01: it is going down");
            false
        }
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::super::unit::UnitFacts;
    use super::*;
    use pgvigil_proto::classify::{classify, FunctionLists};

    /// The facts of a unit that is the one Query `sql`.
    fn query(sql: &str) -> UnitFacts {
        let mut facts = UnitFacts::default();
        facts.merge(&classify(sql.as_bytes(), &FunctionLists::default()));
        facts
    }

    #[test]
    fn where_a_loss_leaves_the_transaction() {
        use Aftermath::*;
        use TxStatus::{Failed as E, Idle as I, InTransaction as T};
        let cases = [
            (I, false, "SELECT 1", Quiet),
            (T, false, "SELECT 1", Unannounced),
            (E, false, "SELECT 1", Unannounced),
            (I, true, "SELECT 1", Failed),
            (I, true, "INSERT INTO t VALUES (1)", InDoubt),
            (I, true, "BEGIN; INSERT INTO t VALUES (1); COMMIT", InDoubt),
            (I, true, "BEGIN", Aborted),
            (I, true, "BEGIN; INSERT INTO t VALUES (1)", Aborted),
            (I, true, "BEGIN; INSERT INTO t VALUES (1); ROLLBACK", Failed),
            (T, true, "INSERT INTO t VALUES (1)", Aborted),
            (T, true, "ROLLBACK TO SAVEPOINT s", Aborted),
            (T, true, "COMMIT", InDoubt),
            (T, true, "END", InDoubt),
            (T, true, "PREPARE TRANSACTION 'x'", InDoubt),
            (E, true, "COMMIT", Failed),
            (T, true, "ROLLBACK", Failed),
            (E, true, "SELECT 1", Aborted),
        ];
        for (tx, busy, sql, expected) in cases {
            assert_eq!(
                aftermath(tx, busy, query(sql).ending()),
                expected,
                "{tx:?} {busy} {sql}"
            );
        }
    }
}
