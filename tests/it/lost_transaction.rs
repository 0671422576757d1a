//! A transaction whose server connection is lost behaves as PostgreSQL would let it (issue 9,
//! "PostgreSQL-exact transaction semantics"): the block stays failed (ReadyForQuery 'E') and
//! runs nothing until ROLLBACK (in either pool mode), a COMMIT answers ROLLBACK, and a COMMIT
//! or autocommit write that was running when the primary died answers 08007 instead of "rolled
//! back".

use std::sync::Arc;
use std::time::Duration;

use bytes::BufMut;
use pgvigil::config::{AuthMethod, PoolMode};
use pgvigil::topology::{NodeId, Role};
use pgvigil_proto::encode;
use tokio_postgres::error::SqlState;

use crate::support::wire::{bind_execute, parse, Wire};
use crate::support::{
    eventually, fresh_base_dir, node_psql, start, start_proxy, test_cluster, ClusterSpec,
    LocalCluster, TestProxy, APP_DB, APP_PASSWORD, APP_USER,
};

const PRIMARY: NodeId = 0;

/// Bound on anything the proxy or the nodes must get to on a loaded machine.
const PATIENCE: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread")]
async fn a_transaction_whose_node_goes_down_stays_failed_until_rollback_and_runs_nothing() {
    stays_failed_until_rollback_and_runs_nothing(PoolMode::Session).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_transaction_whose_node_goes_down_stays_failed_until_rollback_and_runs_nothing_under_transaction_pooling(
) {
    stays_failed_until_rollback_and_runs_nothing(PoolMode::Transaction).await;
}

/// A transaction block whose connection is lost while the client is idle in it, in pool `mode`:
/// the block stays failed until its end, nothing of it runs, and COMMIT answers ROLLBACK.
async fn stays_failed_until_rollback_and_runs_nothing(mode: PoolMode) {
    let mut cluster = test_cluster(0);
    let proxy = trusted_proxy(&cluster, mode).await;
    let mut wire = Wire::login(&proxy).await;
    assert_eq!(
        wire.query("CREATE TABLE lost_tx (i int)").await.status,
        b'I'
    );
    assert_eq!(wire.query("BEGIN").await.status, b'T');
    assert_eq!(wire.query("SAVEPOINT s").await.status, b'T');
    assert_eq!(
        wire.query("INSERT INTO lost_tx VALUES (1)").await.status,
        b'T'
    );

    // The node goes down (fast shutdown: its backends get FATAL 57P01, and it stops accepting
    // connections), then comes back at once: nothing of the transaction may run there.
    restart(&mut cluster, &proxy, PRIMARY);

    let answer = wire.query("INSERT INTO lost_tx VALUES (2)").await;
    assert_eq!(answer.codes(), ["08006"], "{answer:?}");
    assert_eq!(
        answer.status, b'E',
        "the client is in a failed transaction block"
    );
    for sql in [
        "INSERT INTO lost_tx VALUES (3)",
        "SELECT 1",
        "ROLLBACK TO SAVEPOINT s",
    ] {
        let answer = wire.query(sql).await;
        assert_eq!(answer.codes(), ["25P02"], "{sql}: {answer:?}");
        assert_eq!(answer.status, b'E', "{sql}");
    }
    let answer = wire
        .exchange(|out| {
            parse(out, "", "INSERT INTO lost_tx VALUES (4)");
            bind_execute(out, "");
            parse(out, "", "INSERT INTO lost_tx VALUES (5)");
            bind_execute(out, "");
            encode::sync(out);
        })
        .await;
    assert_eq!(answer.codes(), ["25P02"], "one error, the rest skipped");
    assert_eq!(answer.tags, Vec::<String>::new());
    assert_eq!(answer.status, b'E');
    for (what, answer) in [
        ("a lone Sync", wire.exchange(encode::sync).await),
        ("an empty query", wire.query(" ").await),
    ] {
        assert_eq!(answer.errors, [], "{what}");
        assert_eq!(answer.status, b'E', "{what}");
    }

    let answer = wire.query("COMMIT").await;
    assert_eq!(answer.tags, ["ROLLBACK"], "{answer:?}");
    assert_eq!(answer.status, b'I');

    let answer = wire.query("SELECT count(*) FROM lost_tx").await;
    assert_eq!(answer.rows, [["0"]], "{answer:?}");
    assert_eq!(app_psql(&cluster, "SELECT count(*) FROM lost_tx"), "0");
    assert_eq!(
        wire.query("INSERT INTO lost_tx VALUES (6)").await.status,
        b'I'
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_extended_rollback_ends_a_lost_transaction() {
    let mut cluster = test_cluster(0);
    let proxy = start_proxy(&cluster, trust_app).await;
    let mut wire = Wire::login(&proxy).await;
    assert_eq!(wire.query("BEGIN").await.status, b'T');
    restart(&mut cluster, &proxy, PRIMARY);
    assert_eq!(wire.query("SELECT 1").await.status, b'E');

    // How JDBC ends a transaction: the unnamed statement, described, bound and executed.
    let answer = wire
        .exchange(|out| {
            parse(out, "", "ROLLBACK");
            encode::message(out, b'D', |b| b.put_slice(b"S\0"));
            bind_execute(out, "");
            encode::sync(out);
        })
        .await;
    assert!(answer.errors.is_empty(), "{answer:?}");
    assert_eq!(answer.tags, ["ROLLBACK"]);
    assert_eq!(answer.status, b'I');
    assert_eq!(wire.query("SELECT 1").await.rows, [["1"]]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_psql_script_without_on_error_stop_commits_nothing_of_a_transaction_whose_node_went_down()
{
    let mut cluster = test_cluster(0);
    let proxy = start_proxy(&cluster, |_| {}).await;
    proxy
        .connect_app()
        .await
        .batch_execute("CREATE TABLE lost_psql (i int)")
        .await
        .unwrap();
    let dir = cluster.base_dir().to_path_buf();
    let (ready, go) = (dir.join("psql-ready"), dir.join("psql-go"));
    // The script waits (at most 60 s) between its first and second INSERT for the test to stop
    // the node.
    let script = format!(
        "\\set AUTOCOMMIT off\n\
         INSERT INTO lost_psql VALUES (1);\n\
         \\! touch {ready}; i=0; while [ ! -f {go} ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done\n\
         INSERT INTO lost_psql VALUES (2);\n\
         \\echo after-loss :SQLSTATE\n\
         INSERT INTO lost_psql VALUES (3);\n\
         \\echo next :SQLSTATE\n\
         COMMIT;\n\
         \\echo commit :SQLSTATE\n",
        ready = ready.display(),
        go = go.display(),
    );
    let path = dir.join("lost.sql");
    std::fs::write(&path, script).unwrap();
    let psql = tokio::process::Command::new(cluster.bin_dir().join("psql"))
        .args(["-X", "-A", "-t", "-d"])
        .arg(proxy.conninfo(APP_USER, APP_PASSWORD, APP_DB))
        .arg("-f")
        .arg(&path)
        .kill_on_drop(true)
        .output();
    let psql = tokio::spawn(psql);
    eventually(PATIENCE, "psql inserted its first row", || ready.exists());
    cluster.node_mut(PRIMARY).stop();
    std::fs::write(&go, b"").unwrap();

    let output = tokio::time::timeout(PATIENCE, psql)
        .await
        .expect("psql finishes")
        .unwrap()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(lines.contains(&"after-loss 08006"), "{stdout}\n{stderr}");
    assert!(lines.contains(&"next 25P02"), "{stdout}\n{stderr}");
    assert!(
        lines.ends_with(&["ROLLBACK", "commit 00000"]),
        "COMMIT answers ROLLBACK: {stdout}\n{stderr}"
    );
    cluster.node_mut(PRIMARY).start().unwrap();
    assert_eq!(
        app_psql(&cluster, "SELECT count(*) FROM lost_psql"),
        "0",
        "the table ends empty"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_commit_or_autocommit_write_in_flight_when_the_primary_is_killed_gets_08007() {
    // A synchronous standby that does not exist: a commit that asks for it hangs until the
    // primary dies.
    let spec = ClusterSpec::new(fresh_base_dir())
        .conf("synchronous_standby_names", "nobody")
        .conf("synchronous_commit", "local");
    let mut cluster = start(spec);
    let proxy = start_proxy(&cluster, trust_app).await;
    let committing = Arc::new(proxy.connect_app().await);
    let writing = Arc::new(proxy.connect_app().await);
    committing
        .batch_execute("CREATE TABLE lost_commit (i int)")
        .await
        .unwrap();
    for client in [&committing, &writing] {
        client
            .batch_execute("SET synchronous_commit = on")
            .await
            .unwrap();
    }
    committing
        .batch_execute("BEGIN; INSERT INTO lost_commit VALUES (1)")
        .await
        .unwrap();
    let commit = tokio::spawn({
        let client = committing.clone();
        async move { client.simple_query("COMMIT").await }
    });
    let write = tokio::spawn({
        let client = writing.clone();
        async move {
            client
                .execute("INSERT INTO lost_commit VALUES (2)", &[])
                .await
        }
    });
    // A COMMIT followed, before its answer, by a unit that names no statement (a driver closing
    // a statement it dropped): the COMMIT is still what was running.
    let mut wire = Wire::login(&proxy).await;
    for sql in [
        "SET synchronous_commit = on",
        "BEGIN",
        "INSERT INTO lost_commit VALUES (3)",
    ] {
        assert_eq!(wire.query(sql).await.errors, [], "{sql}");
    }
    wire.send(|out| {
        encode::query(out, b"COMMIT");
        encode::message(out, b'C', |b| b.put_slice(b"Sunused\0"));
        encode::sync(out);
    })
    .await;
    eventually(PATIENCE, "the three commits wait for the standby", || {
        node_psql(
            &cluster,
            PRIMARY,
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'SyncRep'",
        ) == "3"
    });

    cluster.node_mut(PRIMARY).kill9();

    let answer = wire.answer().await;
    assert_eq!(answer.codes(), ["08007"], "{answer:?}");
    assert_eq!(
        answer.status, b'I',
        "the transaction is over, whatever became of it"
    );

    let commit = tokio::time::timeout(PATIENCE, commit)
        .await
        .unwrap()
        .unwrap();
    let write = tokio::time::timeout(PATIENCE, write)
        .await
        .unwrap()
        .unwrap();
    for (what, error) in [
        ("COMMIT", commit.expect_err("no answer")),
        ("autocommit INSERT", write.expect_err("no answer")),
    ] {
        assert_eq!(
            error.code(),
            Some(&SqlState::TRANSACTION_RESOLUTION_UNKNOWN),
            "{what}: {error:?}"
        );
        let message = error.as_db_error().map(|e| e.message().to_owned());
        assert!(
            message
                .as_deref()
                .is_some_and(|m| !m.contains("rolled back")),
            "{what}: {message:?}"
        );
    }
}

/// Stops `node` (fast shutdown: its backends get FATAL 57P01 and it refuses logins), waits until
/// pgvigil sees it down (its sessions judged their loss long before, against a node refusing
/// logins: a node going down, not an administrator's terminate), and starts it again.
pub(crate) fn restart(cluster: &mut LocalCluster, proxy: &TestProxy, node: NodeId) {
    cluster.node_mut(node).stop();
    let topology = &proxy.running.proxy.topology;
    eventually(PATIENCE, "pgvigil sees the node down", || {
        topology.load().nodes[node].role == Role::Down
    });
    cluster.node_mut(node).start().unwrap();
}

/// Runs `sql` on the primary as the superuser in the application's database.
fn app_psql(cluster: &LocalCluster, sql: &str) -> String {
    cluster
        .psql_in(PRIMARY, APP_DB, sql)
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// Lets `app` log in without a password, for the hand-written protocol client.
pub(crate) fn trust_app(config: &mut pgvigil::config::Config) {
    let app = config.users.iter_mut().find(|u| u.name == APP_USER);
    app.unwrap().auth = AuthMethod::Trust;
}

/// pgvigil in pool `mode`, `app` trusted for the hand-written protocol client.
pub(crate) async fn trusted_proxy(cluster: &LocalCluster, mode: PoolMode) -> TestProxy {
    start_proxy(cluster, |config| {
        config.pool.mode = mode;
        trust_app(config);
    })
    .await
}

/// pgvigil in pool `mode` over a single server connection (every unit of every session runs on
/// the same backend), `app` trusted for the hand-written protocol client.
pub(crate) async fn one_server_connection(cluster: &LocalCluster, mode: PoolMode) -> TestProxy {
    start_proxy(cluster, |config| {
        config.pool.mode = mode;
        config.pool.max_size = 1;
        trust_app(config);
    })
    .await
}
