//! A session outlives its server connections (issue 4, "Clients during failover"): a connection
//! lost while idle because its node went down is replaced without the client noticing, its
//! settings and prepared statements re-established; a statement or transaction that was running
//! gets an ERROR and the session goes on; a backend terminated by an administrator on a node that
//! stays up ends the session as it would directly (issue 9); a write with no primary waits `failover.wait_timeout`, then gets 57P03, and
//! the session keeps reading from the replica; new sessions start on a replica while the primary
//! is down; a replica killed under a read, or frozen until the topology says it is down, sends
//! the next read elsewhere.

use std::sync::Arc;
use std::time::{Duration, Instant};

use pgvigil::config::Config;
use pgvigil::replication::parse_lsn;
use pgvigil::topology::{NodeId, Primary, Role};
use tokio_postgres::error::SqlState;
use tokio_postgres::Client;

use crate::lost_transaction::restart;
use crate::support::{
    backend_pid, eventually, node_psql, primary_lsn, start_proxy, test_cluster, value,
    LocalCluster, TestProxy,
};

const PRIMARY: NodeId = 0;
const REPLICA: NodeId = 1;

/// Bound on anything the proxy or the nodes must get to on a loaded machine.
const PATIENCE: Duration = Duration::from_secs(30);

/// How soon a client whose statement lost its server must hear about it.
const PROMPT: Duration = Duration::from_secs(5);

/// `failover.wait_timeout` of the tests that stop the primary.
const WAIT_TIMEOUT: Duration = Duration::from_secs(2);

#[tokio::test(flavor = "multi_thread")]
async fn an_idle_session_whose_node_restarts_goes_on_with_its_settings_and_statements() {
    let mut cluster = test_cluster(0);
    let proxy = start_proxy(&cluster, |_| {}).await;
    let client = proxy.connect_app().await;
    client
        .batch_execute(
            "CREATE SCHEMA survival; CREATE TABLE survival.marker (v text); \
             INSERT INTO survival.marker VALUES ('found')",
        )
        .await
        .unwrap();
    client
        .simple_query("SET search_path TO survival, public")
        .await
        .unwrap();
    let statement = client.prepare("SELECT v FROM marker").await.unwrap();
    let pid = backend_pid(&client).await;

    restart(&mut cluster, &proxy, PRIMARY);

    let rows = client
        .query(&statement, &[])
        .await
        .expect("the prepared statement works on the new connection");
    assert_eq!(rows[0].get::<_, String>(0), "found");
    assert_eq!(
        value(&client, "SHOW search_path").await.as_deref(),
        Some("survival, public")
    );
    assert_ne!(backend_pid(&client).await, pid, "a new backend serves it");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_statement_whose_node_goes_down_gets_an_error_at_once_and_the_session_goes_on() {
    let mut cluster = test_cluster(0);
    let proxy = start_proxy(&cluster, |_| {}).await;
    let client = Arc::new(proxy.connect_app().await);
    let pid = backend_pid(&client).await;
    let sleeping = tokio::spawn({
        let client = client.clone();
        async move { client.simple_query("SELECT pg_sleep(30)").await }
    });
    eventually(PATIENCE, "the sleep is running", || {
        active(&cluster, PRIMARY, &format!("pid = {pid}")) == 1
    });

    let killed_at = Instant::now();
    cluster.node_mut(PRIMARY).stop();
    let error = tokio::time::timeout(PROMPT, sleeping)
        .await
        .expect("the client is told promptly")
        .unwrap()
        .expect_err("the statement fails");
    assert!(killed_at.elapsed() < PROMPT);
    assert_lost(&error);
    cluster.node_mut(PRIMARY).start().unwrap();

    assert_eq!(
        value(&client, "SELECT 'still here'").await.as_deref(),
        Some("still here")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_transaction_whose_node_restarts_is_rolled_back_and_the_next_one_works() {
    let mut cluster = test_cluster(0);
    let proxy = start_proxy(&cluster, |_| {}).await;
    let client = proxy.connect_app().await;
    client
        .batch_execute("CREATE TABLE survival_tx (id int)")
        .await
        .unwrap();
    client.simple_query("BEGIN").await.unwrap();
    client
        .simple_query("INSERT INTO survival_tx VALUES (1)")
        .await
        .unwrap();

    restart(&mut cluster, &proxy, PRIMARY);

    // A COMMIT that ran on a new connection would "succeed" with nothing to commit: the client
    // must hear that its transaction is gone instead.
    let error = client
        .simple_query("COMMIT")
        .await
        .expect_err("the transaction was lost");
    assert_lost(&error);
    assert_eq!(
        value(&client, "SELECT count(*) FROM survival_tx")
            .await
            .as_deref(),
        Some("0"),
        "the row of the rolled-back transaction is not there"
    );
    client
        .batch_execute("BEGIN; INSERT INTO survival_tx VALUES (2); COMMIT")
        .await
        .expect("a new transaction works");
    assert_eq!(
        value(&client, "SELECT count(*) FROM survival_tx WHERE id = 2")
            .await
            .as_deref(),
        Some("1")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_write_without_a_primary_waits_then_gets_57p03_and_reads_go_on_until_it_is_back() {
    let (mut cluster, proxy) = primary_and_replica().await;
    let client = proxy.connect_app().await;
    assert_eq!(read_port(&client).await, cluster.node(REPLICA).port);

    cluster.node_mut(PRIMARY).stop();

    let asked_at = Instant::now();
    let error = client
        .simple_query("INSERT INTO survival_rw VALUES (2)")
        .await
        .expect_err("no primary to write to");
    let waited = asked_at.elapsed();
    assert_eq!(
        error.code(),
        Some(&SqlState::CANNOT_CONNECT_NOW),
        "{error:?}"
    );
    assert!(
        waited >= WAIT_TIMEOUT - Duration::from_millis(100) && waited < WAIT_TIMEOUT * 4,
        "waited {waited:?} for a primary (failover.wait_timeout = {WAIT_TIMEOUT:?})"
    );
    assert_eq!(
        read_port(&client).await,
        cluster.node(REPLICA).port,
        "the session still reads from the replica"
    );

    cluster.node_mut(PRIMARY).start().unwrap();
    wait_for_roles(&proxy);
    client
        .simple_query("INSERT INTO survival_rw VALUES (3)")
        .await
        .expect("the same session writes once the primary is back");
    assert_eq!(
        value(&client, "SELECT count(*) FROM survival_rw WHERE id = 3")
            .await
            .as_deref(),
        Some("1"),
        "read your writes: the row is there"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_new_session_starts_on_the_replica_while_the_primary_is_down() {
    let (mut cluster, proxy) = primary_and_replica().await;
    cluster.node_mut(PRIMARY).stop();
    let topology = &proxy.running.proxy.topology;
    eventually(PATIENCE, "the primary is seen down", || {
        topology.load().nodes[PRIMARY].role == Role::Down
    });

    let client = tokio::time::timeout(PROMPT, proxy.connect_app())
        .await
        .expect("the session starts without waiting for a primary");
    assert_eq!(read_port(&client).await, cluster.node(REPLICA).port);
    assert_eq!(
        value(&client, "SELECT count(*) FROM survival_rw")
            .await
            .as_deref(),
        Some("1")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replica_killed_under_a_read_sends_the_next_read_elsewhere() {
    let (mut cluster, proxy) = primary_and_replica().await;
    let client = Arc::new(proxy.connect_app().await);
    let sleeping = sleep_on_replica(&cluster, &client).await;

    cluster.node_mut(REPLICA).kill9();
    let error = tokio::time::timeout(PROMPT, sleeping)
        .await
        .expect("the client is told promptly")
        .unwrap()
        .expect_err("the read fails");
    assert_lost(&error);

    assert_eq!(
        read_port(&client).await,
        cluster.node(PRIMARY).port,
        "the next read is served by the primary"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_read_hung_on_a_frozen_replica_ends_once_the_replica_is_seen_down() {
    let (mut cluster, proxy) = primary_and_replica().await;
    let client = Arc::new(proxy.connect_app().await);
    let sleeping = sleep_on_replica(&cluster, &client).await;

    // A hung host: the connection neither answers nor breaks. Only the topology can tell.
    cluster.node_mut(REPLICA).freeze();
    let error = tokio::time::timeout(Duration::from_secs(20), sleeping)
        .await
        .expect("the read ends once the replica is down, long before the sleep would")
        .unwrap()
        .expect_err("the read fails");
    assert_eq!(
        error.code(),
        Some(&SqlState::CONNECTION_FAILURE),
        "{error:?}"
    );
    let message = error.as_db_error().map(|e| e.message().to_owned());
    assert!(
        message.as_deref().is_some_and(|m| m.contains("is down")),
        "{message:?}"
    );
    assert_eq!(
        read_port(&client).await,
        cluster.node(PRIMARY).port,
        "the next read is served by the primary"
    );
    cluster.node_mut(REPLICA).thaw();
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idle_session_whose_backend_an_administrator_terminates_ends_with_57p01() {
    let cluster = test_cluster(0);
    let proxy = start_proxy(&cluster, |_| {}).await;
    let client = proxy.connect_app().await;
    let pid = backend_pid(&client).await;

    terminate(&cluster, PRIMARY, pid);

    // As directly: the FATAL comes unsolicited and the connection closes.
    let deadline = Instant::now() + PATIENCE;
    while !client.is_closed() {
        assert!(Instant::now() < deadline, "the session was not ended");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let error = client
        .simple_query("SELECT 1")
        .await
        .expect_err("the session is over");
    assert!(error.is_closed(), "{error:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_statement_whose_backend_an_administrator_terminates_gets_the_fatal_and_the_session_ends()
{
    let cluster = test_cluster(0);
    let proxy = start_proxy(&cluster, |_| {}).await;
    let client = Arc::new(proxy.connect_app().await);
    let pid = backend_pid(&client).await;
    let sleeping = tokio::spawn({
        let client = client.clone();
        async move { client.simple_query("SELECT pg_sleep(30)").await }
    });
    eventually(PATIENCE, "the sleep is running", || {
        active(&cluster, PRIMARY, &format!("pid = {pid}")) == 1
    });

    terminate(&cluster, PRIMARY, pid);

    let error = tokio::time::timeout(PROMPT, sleeping)
        .await
        .expect("the client is told promptly")
        .unwrap()
        .expect_err("the statement fails");
    let db_error = error.as_db_error().expect("the node's own error");
    assert_eq!(db_error.code(), &SqlState::ADMIN_SHUTDOWN);
    assert_eq!(db_error.severity(), "FATAL", "relayed as the node sent it");
    client
        .simple_query("SELECT 1")
        .await
        .expect_err("the session is over");
    assert!(client.is_closed());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cancel_request_ends_a_wait_for_the_primary_at_once_with_57014() {
    let mut cluster = test_cluster(0);
    let wait_timeout = Duration::from_secs(120);
    let proxy = start_proxy(&cluster, |config: &mut Config| {
        config.health.interval = Duration::from_millis(200);
        config.failover.wait_timeout = wait_timeout;
        config.failover.auto = false;
    })
    .await;
    let client = Arc::new(proxy.connect_app().await);
    client
        .batch_execute("CREATE TABLE survival_cancel (id int)")
        .await
        .unwrap();
    cluster.node_mut(PRIMARY).stop();
    let topology = &proxy.running.proxy.topology;
    eventually(PATIENCE, "the primary is seen down", || {
        topology.load().primary != Primary::Known(PRIMARY)
    });
    let waiting = tokio::spawn({
        let client = client.clone();
        async move {
            client
                .simple_query("INSERT INTO survival_cancel VALUES (1)")
                .await
        }
    });
    // When the unit starts waiting cannot be seen from outside: cancel until it ends (a cancel
    // that comes before the wait is ignored, as one between statements is by PostgreSQL).
    let started = Instant::now();
    while !waiting.is_finished() {
        assert!(started.elapsed() < PATIENCE, "the wait did not end");
        client
            .cancel_token()
            .cancel_query(tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let error = waiting.await.unwrap().expect_err("the write was cancelled");
    assert_eq!(error.code(), Some(&SqlState::QUERY_CANCELED), "{error:?}");
    assert!(started.elapsed() < wait_timeout / 4);

    cluster.node_mut(PRIMARY).start().unwrap();
    assert_eq!(
        value(&client, "SELECT count(*) FROM survival_cancel")
            .await
            .as_deref(),
        Some("0"),
        "the session goes on and the cancelled write never ran"
    );
}

/// A primary and one replica behind pgvigil (probing every 200 ms, no automatic failover, writes
/// waiting at most [`WAIT_TIMEOUT`] for a primary, reads on the replica only), with table `survival_rw` holding
/// one row on both; returns once the proxy sees both roles.
async fn primary_and_replica() -> (LocalCluster, TestProxy) {
    let cluster = test_cluster(1);
    let proxy = start_proxy(&cluster, |config: &mut Config| {
        config.health.interval = Duration::from_millis(200);
        config.failover.wait_timeout = WAIT_TIMEOUT;
        // The primary's loss is what these tests watch: nothing is promoted.
        config.failover.auto = false;
        config.nodes[PRIMARY].weight = 0;
        // With the primary gone the replica replays nothing, and its delay since the last commit
        // grows: these tests are about sessions, not lag.
        config.routing.max_lag = Duration::from_secs(3600);
    })
    .await;
    proxy
        .connect_app()
        .await
        .batch_execute("CREATE TABLE survival_rw (id int); INSERT INTO survival_rw VALUES (1)")
        .await
        .unwrap();
    let written = primary_lsn(&cluster);
    eventually(PATIENCE, "the replica has replayed the table", || {
        let replayed = node_psql(&cluster, REPLICA, "SELECT pg_last_wal_replay_lsn()");
        parse_lsn(&replayed).is_some_and(|lsn| lsn >= written)
    });
    wait_for_roles(&proxy);
    (cluster, proxy)
}

/// Waits until the proxy sees node 0 as primary and node 1 as a standby whose position is known.
fn wait_for_roles(proxy: &TestProxy) {
    let proxy = &proxy.running.proxy;
    eventually(PATIENCE, "primary and standby in the topology", || {
        let topology = proxy.topology.load();
        topology.primary == Primary::Known(PRIMARY)
            && topology.nodes[REPLICA].role == Role::Standby
            && proxy.replication.load().nodes.iter().all(Option::is_some)
    });
}

/// The port of the node that serves a read of `client`.
async fn read_port(client: &Client) -> u16 {
    let port = value(client, "SELECT inet_server_port()").await;
    port.and_then(|p| p.parse().ok()).expect("a port")
}

/// The error of a statement whose server connection was lost: 57P01 (the node's own) or 08006.
fn assert_lost(error: &tokio_postgres::Error) {
    let code = error.code().map(SqlState::code);
    assert!(
        matches!(code, Some("57P01" | "08006")),
        "expected 57P01 or 08006, got {error:?}"
    );
}

/// Active backends on `node` matching `condition` (SQL over pg_stat_activity), psql's excluded.
fn active(cluster: &LocalCluster, node: NodeId, condition: &str) -> usize {
    let sql = format!(
        "SELECT count(*) FROM pg_stat_activity \
         WHERE pid <> pg_backend_pid() AND state = 'active' AND {condition}"
    );
    let out = node_psql(cluster, node, &sql);
    out.parse().unwrap_or_else(|_| panic!("{sql}: {out}"))
}

/// Terminates backend `pid` on `node` as the superuser and waits until it has exited.
fn terminate(cluster: &LocalCluster, node: NodeId, pid: i32) {
    let out = node_psql(
        cluster,
        node,
        &format!("SELECT pg_terminate_backend({pid})"),
    );
    assert_eq!(out, "t", "backend {pid} was signalled");
    eventually(PATIENCE, "the terminated backend exits", || {
        node_psql(
            cluster,
            node,
            &format!("SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}"),
        ) == "0"
    });
}

/// Starts a 30 s sleep through `client`, checks it runs on the replica, and returns its task.
async fn sleep_on_replica(
    cluster: &LocalCluster,
    client: &Arc<Client>,
) -> tokio::task::JoinHandle<Result<Vec<tokio_postgres::SimpleQueryMessage>, tokio_postgres::Error>>
{
    assert_eq!(read_port(client).await, cluster.node(REPLICA).port);
    let sleeping = tokio::spawn({
        let client = client.clone();
        async move { client.simple_query("SELECT pg_sleep(30)").await }
    });
    eventually(PATIENCE, "the sleep runs on the replica", || {
        active(cluster, REPLICA, "query = 'SELECT pg_sleep(30)'") == 1
    });
    sleeping
}
