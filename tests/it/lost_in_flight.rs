//! Issue 9, section 2, in both pool modes where it applies: a statement of a transaction block
//! running when its connection is lost, a COMMIT or autocommit write in flight under transaction
//! pooling, an administrator's terminate of a backend a transaction-pooled session holds, and
//! the end of a session that ran CALL, LOAD or LISTEN when its connection is lost.

use std::time::Duration;

use pgvigil::config::PoolMode;
use pgvigil::topology::{NodeId, Role};
use pgvigil_proto::encode;

use crate::lost_transaction::{trust_app, trusted_proxy};
use crate::replay::holders_end_with_their_connection;
use crate::support::wire::Wire;
use crate::support::{
    eventually, fresh_base_dir, node_psql, start, start_proxy, test_cluster, ClusterSpec,
};

const PRIMARY: NodeId = 0;

/// Bound on anything the proxy or the nodes must get to on a loaded machine.
const PATIENCE: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread")]
async fn a_statement_running_in_a_block_when_its_node_goes_down_fails_the_block_at_once() {
    running_statement_fails_the_block(PoolMode::Session).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_statement_running_in_a_block_when_its_node_goes_down_fails_the_block_at_once_under_transaction_pooling(
) {
    running_statement_fails_the_block(PoolMode::Transaction).await;
}

/// In pool `mode`: a statement inside a transaction block is running when its node goes down.
/// The client is answered with the error and ReadyForQuery 'E' before the node is back, then
/// 25P02 until ROLLBACK, and nothing of the block is left.
async fn running_statement_fails_the_block(mode: PoolMode) {
    let mut cluster = test_cluster(0);
    let proxy = trusted_proxy(&cluster, mode).await;
    let mut wire = Wire::login(&proxy).await;
    assert_eq!(
        wire.query("CREATE TABLE running (i int)").await.status,
        b'I'
    );
    assert_eq!(wire.query("BEGIN").await.status, b'T');
    let insert = wire.query("INSERT INTO running VALUES (1)").await;
    assert_eq!(insert.status, b'T');
    wire.send(|out| encode::query(out, b"SELECT pg_sleep(60)"))
        .await;
    eventually(PATIENCE, "the statement runs", || {
        node_psql(
            &cluster,
            PRIMARY,
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'PgSleep'",
        ) == "1"
    });

    // Fast shutdown: the backend gets FATAL 57P01 and the node refuses logins (a node going
    // down, not an administrator's terminate); it stays down until the answer is read.
    cluster.node_mut(PRIMARY).stop();
    // The node's own error for the statement (pgvigil demotes its FATAL to ERROR: the
    // session goes on, in a failed block).
    let answer = wire.answer().await;
    assert_eq!(answer.codes(), ["57P01"], "{answer:?}");
    assert_eq!(answer.status, b'E', "the block has failed: {answer:?}");
    assert!(
        answer.rows.is_empty() && answer.tags.is_empty(),
        "{answer:?}"
    );

    let topology = &proxy.running.proxy.topology;
    eventually(PATIENCE, "pgvigil sees the node down", || {
        topology.load().nodes[PRIMARY].role == Role::Down
    });
    cluster.node_mut(PRIMARY).start().unwrap();
    for sql in ["INSERT INTO running VALUES (2)", "SELECT 1"] {
        let answer = wire.query(sql).await;
        assert_eq!(answer.codes(), ["25P02"], "{sql}: {answer:?}");
        assert_eq!(answer.status, b'E', "{sql}");
    }
    let rollback = wire.query("ROLLBACK").await;
    assert_eq!(rollback.tags, ["ROLLBACK"], "{rollback:?}");
    assert_eq!(rollback.status, b'I');
    let count = wire.query("SELECT count(*) FROM running").await;
    assert_eq!(count.rows, [["0"]], "{count:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_commit_or_autocommit_write_in_flight_under_transaction_pooling_gets_08007() {
    // A synchronous standby that does not exist: a commit that asks for it hangs until the
    // primary dies.
    let spec = ClusterSpec::new(fresh_base_dir())
        .conf("synchronous_standby_names", "nobody")
        .conf("synchronous_commit", "local");
    let mut cluster = start(spec);
    let proxy = start_proxy(&cluster, |config| {
        config.pool.mode = PoolMode::Transaction;
        trust_app(config);
    })
    .await;
    let mut committing = Wire::login(&proxy).await;
    let mut writing = Wire::login(&proxy).await;
    assert!(committing
        .query("CREATE TABLE in_doubt (i int)")
        .await
        .errors
        .is_empty());
    for wire in [&mut committing, &mut writing] {
        let set = wire.query("SET synchronous_commit = on").await;
        assert!(set.errors.is_empty(), "{set:?}");
    }
    let opened = committing
        .query("BEGIN; INSERT INTO in_doubt VALUES (1)")
        .await;
    assert_eq!(opened.status, b'T', "{opened:?}");
    committing.send(|out| encode::query(out, b"COMMIT")).await;
    writing
        .send(|out| encode::query(out, b"INSERT INTO in_doubt VALUES (2)"))
        .await;
    eventually(PATIENCE, "both commits wait for the standby", || {
        node_psql(
            &cluster,
            PRIMARY,
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'SyncRep'",
        ) == "2"
    });

    cluster.node_mut(PRIMARY).kill9();

    for (what, wire) in [("COMMIT", &mut committing), ("INSERT", &mut writing)] {
        let answer = wire.answer().await;
        assert_eq!(answer.codes(), ["08007"], "{what}: {answer:?}");
        assert!(
            answer
                .errors
                .iter()
                .all(|(_, m)| !m.contains("rolled back")),
            "{what}: {answer:?}"
        );
        assert_eq!(answer.status, b'I', "{what}: the transaction is over");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_administrators_terminate_ends_a_session_in_a_block_under_transaction_pooling() {
    let cluster = test_cluster(0);
    let proxy = start_proxy(&cluster, |config| {
        config.pool.mode = PoolMode::Transaction;
        trust_app(config);
    })
    .await;
    let mut plain = Wire::login(&proxy).await;
    // Inside a block the session holds its connection; an idle one holds none to terminate.
    let mut wire = Wire::login(&proxy).await;
    let pid = wire.query("BEGIN; SELECT pg_backend_pid()").await;
    assert_eq!(pid.status, b'T', "{pid:?}");
    let pid = &pid.rows[0][0];
    let terminated = node_psql(
        &cluster,
        PRIMARY,
        &format!("SELECT pg_terminate_backend({pid})"),
    );
    assert_eq!(terminated, "t");
    assert_eq!(
        wire.last_words().await,
        Some(vec!["FATAL 57P01".to_owned()]),
        "the session ends as it would on PostgreSQL (None: it goes on)"
    );
    assert_eq!(
        plain.query("SELECT 'served'").await.rows,
        [["served"]],
        "other sessions go on"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_session_after_call_load_or_listen_ends_with_fatal_08006_when_its_connection_is_lost() {
    unreplayable_calls_end_the_session(PoolMode::Session).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_session_after_call_load_or_listen_ends_with_fatal_08006_when_its_connection_is_lost_under_transaction_pooling(
) {
    unreplayable_calls_end_the_session(PoolMode::Transaction).await;
}

/// In pool `mode`, sessions that ran CALL, LOAD or LISTEN (state pgvigil cannot give another
/// connection) are told FATAL 08006 and closed when their node restarts.
async fn unreplayable_calls_end_the_session(mode: PoolMode) {
    let mut cluster = test_cluster(0);
    // LOAD of a library outside $libdir/plugins is for superusers.
    node_psql(&cluster, PRIMARY, "ALTER ROLE app SUPERUSER");
    let proxy = trusted_proxy(&cluster, mode).await;
    let mut plain = Wire::login(&proxy).await;
    let created = plain
        .query("CREATE PROCEDURE held_call() LANGUAGE sql AS $$ SELECT 1 $$")
        .await;
    assert!(created.errors.is_empty(), "{created:?}");
    let statements = ["CALL held_call()", "LOAD 'plpgsql'", "LISTEN held_channel"];
    holders_end_with_their_connection(&mut cluster, &proxy, &mut plain, &statements).await;
}
