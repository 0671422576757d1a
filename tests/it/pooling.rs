//! Session pooling as a user sees it: a server connection outlives its client and serves the next
//! client of the same (database, user), reset in between; users never share one; the pool and
//! client limits answer 53300; idle connections are reaped or kept to `pool.min_idle`; and a
//! server connection that dies, idle or mid-session, is never handed out again.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls};

use crate::support::{
    backend_pid, eventually, start_proxy, test_cluster, value, LocalCluster, TestProxy, APP_DB,
    APP_PASSWORD, APP_USER, MD5_PASSWORD, MD5_USER,
};

/// The primary's index in every test cluster.
const PRIMARY: usize = 0;

/// Bound on anything the proxy does in the background (release, reap, refill); generous for a
/// loaded 2-core machine.
const SETTLE: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread")]
async fn the_next_client_of_the_same_user_reuses_the_server_connection() {
    let cluster = test_cluster(0);
    let proxy = start_proxy(&cluster, |_| {}).await;

    let first = proxy.connect_app().await;
    let first_pid = backend_pid(&first).await;
    drop(first);
    wait_until_pooled(&proxy, 1);

    let second = proxy.connect_app().await;
    assert_eq!(
        backend_pid(&second).await,
        first_pid,
        "the second session runs on the first session's server connection"
    );
    assert_eq!(proxy.running.proxy.pools.open_count(PRIMARY), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reused_server_connection_carries_nothing_over_from_the_previous_session() {
    let cluster = test_cluster(0);
    let proxy = start_proxy(&cluster, |_| {}).await;
    let setup = proxy.connect_app().await;
    setup
        .batch_execute("CREATE TABLE ledger (id int)")
        .await
        .unwrap();
    drop(setup);
    wait_until_pooled(&proxy, 1);

    let first = proxy.connect_app().await;
    let first_pid = backend_pid(&first).await;
    first
        .batch_execute(
            "SET work_mem = '77MB';
             CREATE TEMP TABLE scratch (x int);
             PREPARE leftover AS SELECT 1;
             BEGIN;
             INSERT INTO ledger VALUES (1);",
        )
        .await
        .unwrap();
    // The client leaves in the middle of its transaction.
    drop(first);
    wait_until_pooled(&proxy, 1);

    let second = proxy.connect_app().await;
    assert_eq!(
        backend_pid(&second).await,
        first_pid,
        "same server connection"
    );
    assert_eq!(
        value(&second, "SHOW work_mem").await.as_deref(),
        Some("4MB")
    );
    assert_eq!(
        value(&second, "SELECT to_regclass('pg_temp.scratch')::text").await,
        None,
        "the temp table is gone"
    );
    assert_eq!(
        value(&second, "SELECT count(*) FROM pg_prepared_statements")
            .await
            .as_deref(),
        Some("0"),
        "the prepared statement is gone"
    );
    assert_eq!(
        value(&second, "SELECT count(*) FROM ledger")
            .await
            .as_deref(),
        Some("0"),
        "the open transaction was rolled back"
    );
    assert_eq!(
        value(&second, "SELECT now() = statement_timestamp()")
            .await
            .as_deref(),
        Some("t"),
        "the second session starts outside any transaction"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn different_users_never_share_a_server_connection() {
    let cluster = test_cluster(0);
    let proxy = start_proxy(&cluster, |_| {}).await;

    let app = proxy.connect_app().await;
    let app_pid = backend_pid(&app).await;
    drop(app);
    wait_until_pooled(&proxy, 1);

    // app's idle connection is right there, but app_md5 must get its own.
    let md5 = connect_md5(&proxy).await;
    assert_ne!(backend_pid(&md5).await, app_pid);
    assert_eq!(
        value(&md5, "SELECT session_user").await.as_deref(),
        Some(MD5_USER)
    );
    drop(md5);
    wait_until_pooled(&proxy, 2);

    let app = proxy.connect_app().await;
    assert_eq!(backend_pid(&app).await, app_pid, "app gets its own back");
    assert_eq!(
        value(&app, "SELECT session_user").await.as_deref(),
        Some("app")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_beyond_pool_max_size_gets_53300_pool_exhausted_until_one_leaves() {
    let cluster = test_cluster(0);
    let proxy = start_proxy(&cluster, |config| {
        config.pool.max_size = 2;
        config.pool.checkout_timeout = Duration::from_millis(500);
    })
    .await;
    let first = proxy.connect_app().await;
    let _second = proxy.connect_app().await;

    let started = Instant::now();
    let refused = proxy
        .connect(&proxy.conninfo(APP_USER, APP_PASSWORD, APP_DB))
        .await
        .expect_err("a third client cannot get a server connection");
    assert_eq!(
        refused.code(),
        Some(&SqlState::TOO_MANY_CONNECTIONS),
        "{refused}"
    );
    let message = refused.as_db_error().map(|e| e.message()).unwrap_or("");
    assert!(message.contains("exhausted"), "{message}");
    assert!(
        started.elapsed() >= Duration::from_millis(450),
        "the client waited pool.checkout_timeout before being refused"
    );

    drop(first);
    let third = connect_with_retry(&proxy).await;
    assert_eq!(value(&third, "SELECT 1").await.as_deref(), Some("1"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_waiting_for_a_full_pool_gets_the_connection_a_leaving_client_returns() {
    let cluster = test_cluster(0);
    let proxy = start_proxy(&cluster, |config| {
        config.pool.max_size = 1;
        config.pool.checkout_timeout = Duration::from_secs(30);
    })
    .await;
    let first = proxy.connect_app().await;
    let first_pid = backend_pid(&first).await;

    let conninfo = proxy.conninfo(APP_USER, APP_PASSWORD, APP_DB);
    let waiting = tokio::spawn(async move {
        let (client, connection) = tokio_postgres::connect(&conninfo, NoTls).await?;
        tokio::spawn(connection);
        Ok::<Client, tokio_postgres::Error>(client)
    });
    // A session registers its cancel key once authenticated, just before it asks the pool.
    let cancels = proxy.running.proxy.cancels.clone();
    eventually(SETTLE, "the second client is authenticated", || {
        cancels.len() == 2
    });

    drop(first);
    let second = tokio::time::timeout(Duration::from_secs(20), waiting)
        .await
        .expect("the waiting client is served within checkout_timeout")
        .unwrap()
        .expect("the waiting client connects");
    assert_eq!(
        backend_pid(&second).await,
        first_pid,
        "it got the connection the first client returned"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_beyond_max_client_conn_gets_53300_too_many_clients() {
    let cluster = test_cluster(0);
    let proxy = start_proxy(&cluster, |config| config.max_client_conn = 3).await;
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(proxy.connect_app().await);
    }

    for attempt in 0..3 {
        let refused = proxy
            .connect(&proxy.conninfo(APP_USER, APP_PASSWORD, APP_DB))
            .await
            .expect_err("a fourth client is refused");
        assert_eq!(
            refused.code(),
            Some(&SqlState::TOO_MANY_CONNECTIONS),
            "attempt {attempt}: {refused}"
        );
        let message = refused.as_db_error().map(|e| e.message()).unwrap_or("");
        assert!(message.contains("too many clients"), "{message}");
    }

    for client in &clients {
        assert_eq!(value(client, "SELECT 1").await.as_deref(), Some("1"));
    }
    clients.pop();
    let fourth = connect_with_retry(&proxy).await;
    assert_eq!(value(&fourth, "SELECT 1").await.as_deref(), Some("1"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_connection_killed_while_idle_is_never_handed_out() {
    let cluster = test_cluster(0);
    let proxy = start_proxy(&cluster, |_| {}).await;
    let first = proxy.connect_app().await;
    let killed_pid = backend_pid(&first).await;
    drop(first);
    wait_until_pooled(&proxy, 1);

    terminate_backend(&cluster, killed_pid);

    let next = proxy.connect_app().await;
    let pid = backend_pid(&next).await;
    assert_ne!(pid, killed_pid, "the dead connection was not reused");
    assert_eq!(value(&next, "SELECT 1").await.as_deref(), Some("1"));
    assert_eq!(proxy.running.proxy.pools.open_count(PRIMARY), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_server_connections_are_closed_after_idle_timeout() {
    let cluster = test_cluster(0);
    let proxy = start_proxy(&cluster, |config| {
        config.pool.idle_timeout = Duration::from_secs(1);
    })
    .await;
    let client = proxy.connect_app().await;
    let pid = backend_pid(&client).await;
    drop(client);
    wait_until_pooled(&proxy, 1);

    let pools = &proxy.running.proxy.pools;
    eventually(SETTLE, "the idle connection is reaped", || {
        pools.idle_count(PRIMARY) == 0
    });
    assert_eq!(pools.open_count(PRIMARY), 0);
    eventually(SETTLE, "its backend exits", || {
        backend_count(&cluster, &format!("pid = {pid}")) == 0
    });
    let after = proxy.connect_app().await;
    assert_eq!(value(&after, "SELECT 1").await.as_deref(), Some("1"));
}

#[tokio::test(flavor = "multi_thread")]
async fn min_idle_keeps_two_idle_connections_for_a_pair_that_was_used() {
    let cluster = test_cluster(0);
    let proxy = start_proxy(&cluster, |config| config.pool.min_idle = 2).await;
    let pools = &proxy.running.proxy.pools;
    assert_eq!(pools.open_count(PRIMARY), 0, "nothing is opened before use");

    let client = proxy.connect_app().await;
    drop(client);
    eventually(SETTLE, "two idle connections for app", || {
        pools.idle_count(PRIMARY) == 2
    });
    assert_eq!(pools.open_count(PRIMARY), 2);
    assert_eq!(
        backend_count(&cluster, "datname = 'app' AND usename = 'app'"),
        2,
        "two backends wait for app"
    );
    assert_eq!(
        backend_count(&cluster, &format!("usename = '{MD5_USER}'")),
        0,
        "a pair that was never used gets none"
    );

    // Taking one leaves a deficit that is filled again.
    let client = proxy.connect_app().await;
    eventually(SETTLE, "the pool refills to two idle", || {
        pools.idle_count(PRIMARY) == 2
    });
    assert_eq!(value(&client, "SELECT 1").await.as_deref(), Some("1"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_session_whose_server_is_killed_gets_an_error_and_the_next_session_works() {
    let cluster = test_cluster(0);
    let proxy = start_proxy(&cluster, |_| {}).await;
    let client = Arc::new(proxy.connect_app().await);
    let pid = backend_pid(&client).await;

    let sleeping = tokio::spawn({
        let client = client.clone();
        async move { client.simple_query("SELECT pg_sleep(30)").await }
    });
    eventually(SETTLE, "the query is running", || {
        backend_count(&cluster, &format!("pid = {pid} AND state = 'active'")) == 1
    });
    terminate_backend(&cluster, pid);

    let error = tokio::time::timeout(Duration::from_secs(20), sleeping)
        .await
        .expect("the client is told at once, not after the query would have ended")
        .unwrap()
        .expect_err("the query fails");
    let code = error.code().map(SqlState::code);
    assert!(
        matches!(code, Some("57P01" | "08006")),
        "expected 57P01 or 08006, got {error}"
    );

    let next = proxy.connect_app().await;
    assert_ne!(backend_pid(&next).await, pid);
    assert_eq!(value(&next, "SELECT 1").await.as_deref(), Some("1"));
    assert_eq!(proxy.running.proxy.pools.open_count(PRIMARY), 1);
}

/// Waits until `count` server connections sit idle in the primary's pool (a client's connection
/// lands there only after its session ended and the reset succeeded).
fn wait_until_pooled(proxy: &TestProxy, count: usize) {
    let pools = &proxy.running.proxy.pools;
    eventually(
        SETTLE,
        &format!("{count} idle server connection(s)"),
        || pools.idle_count(PRIMARY) == count,
    );
}

/// Backends on the primary matching `condition` (SQL over pg_stat_activity), psql's own excluded.
pub(crate) fn backend_count(cluster: &LocalCluster, condition: &str) -> usize {
    let sql = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE pid <> pg_backend_pid() AND {condition}"
    );
    let out = cluster.psql(PRIMARY, &sql).unwrap();
    out.parse().unwrap_or_else(|_| panic!("{sql}: {out}"))
}

/// Terminates backend `pid` on the primary as the superuser and waits until it has exited.
pub(crate) fn terminate_backend(cluster: &LocalCluster, pid: i32) {
    let out = cluster
        .psql(PRIMARY, &format!("SELECT pg_terminate_backend({pid})"))
        .unwrap();
    assert_eq!(out, "t", "backend {pid} was signalled");
    eventually(SETTLE, "the terminated backend exits", || {
        backend_count(cluster, &format!("pid = {pid}")) == 0
    });
}

async fn connect_md5(proxy: &TestProxy) -> Client {
    proxy
        .connect(&proxy.conninfo(MD5_USER, MD5_PASSWORD, APP_DB))
        .await
        .unwrap_or_else(|e| panic!("app_md5 could not connect: {e}"))
}

/// Connects `app`, retrying while the proxy still refuses with 53300: a session's slots are
/// freed just after its client sees the connection close.
async fn connect_with_retry(proxy: &TestProxy) -> Client {
    let conninfo = proxy.conninfo(APP_USER, APP_PASSWORD, APP_DB);
    let give_up = Instant::now() + SETTLE;
    loop {
        match proxy.connect(&conninfo).await {
            Ok(client) => return client,
            Err(e) if e.code() == Some(&SqlState::TOO_MANY_CONNECTIONS) => {
                assert!(
                    Instant::now() < give_up,
                    "still refused after {SETTLE:?}: {e}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("could not connect: {e}"),
        }
    }
}
