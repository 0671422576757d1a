//! Transaction pooling (`pool.mode = "transaction"`) as a user sees it: a thousand clients
//! connected at once share twenty server connections, each holding one only for a transaction;
//! a session's settings and startup parameters follow it onto whatever connection serves its
//! next transaction and never show in another session, and reach a connection only when it
//! lacks them; a session that prepares a named
//! statement is not pinned to a connection (see prepared_pooling.rs); an idle session holds no
//! connection but a parked one (see parking.rs), which a kill -9 failover closes under it unseen,
//! and its next statement runs on the new primary with its settings and its prepared statements.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pgvigil::config::PoolMode;
use pgvigil_proto::encode;
use tokio_postgres::{Client, NoTls, SimpleQueryMessage};

use crate::failover::{Scene, OLD_PRIMARY, STANDBYS};
use crate::lost_transaction::one_server_connection;
use crate::pgbench::{assert_clean_run, pgbench, pgbench_path};
use crate::support::wire::{bind_execute, parse, Wire};
use crate::support::writer::{describe, tick_ids};
use crate::support::{
    eventually, fresh_base_dir, node_psql, start, start_proxy, test_cluster, ClusterSpec,
    LocalCluster, TestProxy, APP_DB, APP_PASSWORD, APP_USER,
};

/// Server connections per node in the thousand-client test.
const POOL: usize = 20;

/// Bound on a client's wait for a server connection: generous for a loaded 2-core machine.
const CHECKOUT: Duration = Duration::from_secs(120);

/// Bound on the thousand clients' logins: generous for a loaded 2-core machine.
const ALL_CONNECTED: Duration = Duration::from_secs(120);

/// The first column of the first row of a simple-protocol answer.
pub(crate) async fn simple_value(client: &Client, sql: &str) -> String {
    let messages = client
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    messages
        .into_iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
            _ => None,
        })
        .unwrap_or_else(|| panic!("{sql}: no row"))
}

/// Connects through pgvigil with `extra` added to the connection string.
async fn connect_with(proxy: &TestProxy, extra: &str) -> Client {
    let conninfo = format!("{} {extra}", proxy.conninfo(APP_USER, APP_PASSWORD, APP_DB));
    proxy
        .connect(&conninfo)
        .await
        .unwrap_or_else(|e| panic!("could not connect through pgvigil: {e}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_thousand_clients_share_twenty_server_connections_one_transaction_at_a_time() {
    const CLIENTS: usize = 1000;
    const TRANSACTIONS: usize = 20;
    let cluster = test_cluster(0);
    let proxy = start_proxy(&cluster, |config| {
        config.pool.mode = PoolMode::Transaction;
        config.pool.max_size = POOL;
        config.pool.checkout_timeout = CHECKOUT;
        config.max_client_conn = CLIENTS + 10;
        config.client.startup_timeout = ALL_CONNECTED;
    })
    .await;
    let setup = proxy.connect_app().await;
    setup
        .batch_execute("CREATE TABLE ledger (client int, n int)")
        .await
        .unwrap();
    drop(setup);

    // Server connections of `app` on the node, seen from a direct connection of its own.
    let node = cluster.node(0);
    let direct = format!(
        "host=127.0.0.1 port={} user={APP_USER} password={APP_PASSWORD} dbname={APP_DB}",
        node.port
    );
    let (monitor, connection) = tokio_postgres::connect(&direct, NoTls).await.unwrap();
    tokio::spawn(connection);
    let most_seen = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(tokio::sync::Notify::new());
    let watcher = {
        let (most_seen, done) = (most_seen.clone(), done.clone());
        tokio::spawn(async move {
            let count = "SELECT count(*)::text FROM pg_stat_activity \
                         WHERE usename = 'app' AND backend_type = 'client backend' \
                         AND pid <> pg_backend_pid()";
            loop {
                let seen: usize = simple_value(&monitor, count).await.parse().unwrap();
                most_seen.fetch_max(seen, Ordering::Relaxed);
                tokio::select! {
                    () = done.notified() => return,
                    () = tokio::time::sleep(Duration::from_millis(50)) => {}
                }
            }
        })
    };

    // Every client is connected before any of them starts: a thousand sessions at once. They
    // connect a hundred at a time (logins are CPU work on a loaded machine), and wait for the
    // others with a deadline, so that a failed login fails the test instead of hanging it.
    let logins = Arc::new(tokio::sync::Semaphore::new(100));
    let connected = Arc::new(AtomicUsize::new(0));
    let proxy = Arc::new(proxy);
    let clients: Vec<_> = (0..CLIENTS)
        .map(|id| {
            let (proxy, logins, connected) = (proxy.clone(), logins.clone(), connected.clone());
            tokio::spawn(async move {
                let login = logins.acquire().await.unwrap();
                let client = proxy.connect_app().await;
                drop(login);
                connected.fetch_add(1, Ordering::SeqCst);
                let deadline = tokio::time::Instant::now() + ALL_CONNECTED;
                while connected.load(Ordering::SeqCst) < CLIENTS {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "not every client connected within {ALL_CONNECTED:?}"
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                let mut written = 0;
                for n in 0..TRANSACTIONS {
                    if n % 2 == 0 {
                        client
                            .batch_execute(&format!(
                                "BEGIN; INSERT INTO ledger VALUES ({id}, {n}); COMMIT"
                            ))
                            .await
                            .unwrap_or_else(|e| panic!("client {id}, write {n}: {e}"));
                        written += 1;
                    } else {
                        let sql = format!("SELECT count(*)::text FROM ledger WHERE client = {id}");
                        let seen: usize = simple_value(&client, &sql).await.parse().unwrap();
                        assert_eq!(seen, written, "client {id} reads its own writes");
                    }
                }
            })
        })
        .collect();
    for client in clients {
        client.await.expect("a client failed");
    }
    done.notify_one();
    watcher.await.unwrap();

    let check = proxy.connect_app().await;
    let rows = simple_value(&check, "SELECT count(*)::text FROM ledger").await;
    assert_eq!(rows, (CLIENTS * TRANSACTIONS / 2).to_string());
    let most = most_seen.load(Ordering::Relaxed);
    assert!(
        (1..=POOL).contains(&most),
        "at most {POOL} server connections, seen {most}"
    );
    assert!(proxy.running.proxy.pools.open_count(0) <= POOL);
}

#[tokio::test(flavor = "multi_thread")]
async fn settings_follow_their_session_across_shared_connections_and_never_leak() {
    let cluster = test_cluster(0);
    let proxy = start_proxy(&cluster, |config| {
        config.pool.mode = PoolMode::Transaction;
        config.pool.max_size = 2;
    })
    .await;
    // A startup parameter, a SET, and a client that changes nothing.
    let named = connect_with(&proxy, "application_name=ledger-ui").await;
    let timed = proxy.connect_app().await;
    timed
        .batch_execute("SET statement_timeout = '7s'")
        .await
        .unwrap();
    let rolled_back = proxy.connect_app().await;
    rolled_back
        .batch_execute("BEGIN; SET statement_timeout = '9s'; ROLLBACK")
        .await
        .unwrap();
    let plain = proxy.connect_app().await;

    let ask = "SELECT current_setting('application_name') || ' ' || \
               current_setting('statement_timeout') || ' ' || pg_backend_pid()";
    let mut served_by: HashMap<String, HashSet<&str>> = HashMap::new();
    for round in 0..20 {
        for (who, client, wanted) in [
            ("named", &named, "ledger-ui 0"),
            ("timed", &timed, " 7s"),
            ("rolled_back", &rolled_back, " 0"),
            ("plain", &plain, " 0"),
        ] {
            let answer = simple_value(client, ask).await;
            let (settings, pid) = answer.rsplit_once(' ').unwrap();
            assert_eq!(settings, wanted, "{who}, round {round}");
            served_by.entry(pid.to_owned()).or_default().insert(who);
        }
    }
    assert!(
        served_by.len() <= 2,
        "two server connections: {served_by:?}"
    );
    assert!(
        served_by.values().any(|clients| clients.len() > 1),
        "connections are shared between sessions: {served_by:?}"
    );
}

/// How many times the simple-protocol statement `sql` ran on node 0 of `cluster`, from its log
/// (`log_statement = all`).
fn calls(cluster: &LocalCluster, sql: &str) -> usize {
    let log = std::fs::read_to_string(cluster.node(0).log_path()).unwrap_or_default();
    let line = format!("statement: {sql}");
    log.lines().filter(|l| l.ends_with(&line)).count()
}

/// A primary that logs every statement (`log_statement = all`, see [`calls`]), and pgvigil in
/// transaction pooling over one server connection to it: every unit of every session runs on it.
async fn one_logged_connection() -> (LocalCluster, TestProxy) {
    let cluster = start(
        ClusterSpec::new(fresh_base_dir())
            .replicas(0)
            .conf("log_statement", "all"),
    );
    let proxy = start_proxy(&cluster, |config| {
        config.pool.mode = PoolMode::Transaction;
        config.pool.max_size = 1;
    })
    .await;
    (cluster, proxy)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_connection_the_session_left_in_sync_is_given_only_what_it_lacks() {
    let (cluster, proxy) = one_logged_connection().await;
    let first = "SET work_mem = '3MB'";
    let second = "SET lock_timeout = '4s'";
    let ask = "SELECT current_setting('work_mem') || ' ' || current_setting('lock_timeout')";
    let tuned = proxy.connect_app().await;
    let plain = proxy.connect_app().await;

    tuned.batch_execute(first).await.unwrap();
    for _ in 0..5 {
        assert_eq!(simple_value(&tuned, ask).await, "3MB 0");
    }
    assert_eq!(
        calls(&cluster, first),
        1,
        "nothing replayed on a connection in sync"
    );

    // Another session takes the connection: it sees none of the settings, and the first
    // session gets them back there once.
    assert_eq!(simple_value(&plain, ask).await, "4MB 0");
    for _ in 0..3 {
        assert_eq!(simple_value(&tuned, ask).await, "3MB 0");
    }
    assert_eq!(
        calls(&cluster, first),
        2,
        "replayed once after another session"
    );

    // A setting added later: the connection runs it once, and nothing before it again.
    tuned.batch_execute(second).await.unwrap();
    for _ in 0..3 {
        assert_eq!(simple_value(&tuned, ask).await, "3MB 4s");
    }
    assert_eq!(simple_value(&plain, ask).await, "4MB 0");
    assert_eq!(simple_value(&tuned, ask).await, "3MB 4s");
    assert_eq!(calls(&cluster, first), 3);
    assert_eq!(calls(&cluster, second), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_connection_left_as_startup_made_it_is_taken_without_a_reset_yet_never_lends_an_unnamed_statement(
) {
    let cluster = test_cluster(0);
    // Every statement the node runs goes to its log: the resets pgvigil sends show there.
    node_psql(&cluster, 0, "ALTER SYSTEM SET log_statement = 'all'");
    node_psql(&cluster, 0, "SELECT pg_reload_conf()");
    eventually(Duration::from_secs(30), "log_statement = all", || {
        node_psql(&cluster, 0, "SHOW log_statement").trim() == "all"
    });
    let resets = || {
        let log = std::fs::read_to_string(cluster.node(0).log_path()).unwrap();
        log.matches("RESET ALL").count()
    };
    let proxy = one_server_connection(&cluster, PoolMode::Transaction).await;
    // Same startup parameters, no settings: the connection each leaves is what the other's
    // startup parameters would make it.
    let mut first = Wire::login(&proxy).await;
    let mut second = Wire::login(&proxy).await;
    let before = resets();
    for _ in 0..10 {
        for wire in [&mut first, &mut second] {
            let one = wire.query("SELECT 1").await;
            assert_eq!(one.rows, vec![vec!["1".to_owned()]]);
        }
    }
    assert_eq!(
        resets(),
        before,
        "the connection was reset between the sessions"
    );

    // An unnamed statement the first session left on the connection is not the second's.
    let parsed = first
        .exchange(|out| {
            parse(out, "", "SELECT 'the first session''s'");
            encode::sync(out);
        })
        .await;
    assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
    let bound = second
        .exchange(|out| {
            bind_execute(out, "");
            encode::sync(out);
        })
        .await;
    assert!(
        bound.rows.is_empty(),
        "another session's statement ran: {bound:?}"
    );
    assert_eq!(
        bound.codes(),
        vec!["26000"],
        "as PostgreSQL answers: {bound:?}"
    );
    // A unit that parses its own unnamed statement first is served as it is.
    first
        .exchange(|out| {
            parse(out, "", "SELECT 'the first session''s'");
            encode::sync(out);
        })
        .await;
    let own = second
        .exchange(|out| {
            parse(out, "", "SELECT 'the second session''s'");
            bind_execute(out, "");
            encode::sync(out);
        })
        .await;
    assert_eq!(own.rows, vec![vec!["the second session's".to_owned()]]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_session_with_a_named_statement_is_not_pinned_to_its_connection() {
    let cluster = test_cluster(0);
    let proxy = start_proxy(&cluster, |config| {
        config.pool.mode = PoolMode::Transaction;
        // One server connection: were the preparing session pinned to it, the others would
        // wait for it and fail.
        config.pool.max_size = 1;
    })
    .await;
    // tokio-postgres prepares every statement under a name of its own.
    let preparing = proxy.connect_app().await;
    let statement = preparing
        .prepare("SELECT $1::int + 1 AS next")
        .await
        .unwrap();
    let others: Vec<Client> =
        futures_util::future::join_all((0..3).map(|_| proxy.connect_app())).await;
    for n in 0..10 {
        let row = preparing.query_one(&statement, &[&n]).await.unwrap();
        assert_eq!(row.get::<_, i32>("next"), n + 1);
        for other in &others {
            assert_eq!(
                simple_value(other, "SELECT 'still served'").await,
                "still served"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idle_session_keeps_its_settings_and_prepared_statements_across_a_kill_9_failover() {
    let mut scene = Scene::start(test_cluster(2), |config| {
        config.pool.mode = PoolMode::Transaction;
    })
    .await;
    let idle = scene.proxy.connect_app().await;
    for set in [
        "SET application_name = 'survivor'",
        "SET search_path = pg_catalog, public",
    ] {
        idle.batch_execute(set).await.unwrap();
    }
    // A protocol-level named statement, prepared on the old primary only.
    let insert = idle
        .prepare("INSERT INTO ticks (id) VALUES ($1) RETURNING inet_server_port()")
        .await
        .unwrap();
    let kill = scene.kill(OLD_PRIMARY);
    scene.writes_resume(kill, "kill -9 under an idle session in transaction mode");
    let new = scene.sole_primary(&STANDBYS);

    // The same client, never reconnected: its statement runs on the new primary, and whatever
    // connection serves it carries the session's settings.
    let row = idle
        .query_one(&insert, &[&-7i32])
        .await
        .unwrap_or_else(|e| panic!("the idle session's next write failed: {}", describe(&e)));
    assert_eq!(
        row.get::<_, i32>(0),
        i32::from(scene.cluster.node(new).port)
    );
    assert!(tick_ids(&scene.cluster, new).contains(&-7));
    let settings = "SELECT current_setting('application_name') || '|' || \
                    current_setting('search_path')";
    assert_eq!(
        simple_value(&idle, settings).await,
        "survivor|pg_catalog, public"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn pgbench_runs_in_every_query_mode_with_more_clients_than_server_connections() {
    let cluster = test_cluster(0);
    let proxy = start_proxy(&cluster, |config| {
        config.pool.mode = PoolMode::Transaction;
        config.pool.max_size = 4;
    })
    .await;
    let program = pgbench_path(cluster.bin_dir());
    pgbench(&program, &proxy, &["-i", "-s", "1", "-q"]).await;
    // Eight clients over four server connections: under session pooling the last four would
    // wait for a connection and fail.
    for mode in ["simple", "extended"] {
        let run = ["-T", "5", "-c", "8", "-j", "2", "-M", mode];
        assert_clean_run(&pgbench(&program, &proxy, &run).await);
    }
    // Named statements are shared too. A thread per client: pgbench prepares each statement
    // with a blocking PQprepare on first use, which would stall a thread's other clients in the
    // middle of their transactions.
    let prepared = ["-T", "5", "-c", "8", "-j", "8", "-M", "prepared"];
    assert_clean_run(&pgbench(&program, &proxy, &prepared).await);
    assert!(proxy.running.proxy.pools.open_count(0) <= 4);
}

#[tokio::test(flavor = "multi_thread")]
async fn sessions_that_ran_the_same_settings_take_each_others_connection_as_it_is() {
    let (cluster, proxy) = one_logged_connection().await;
    // What an application runs on every connection it opens (ActiveRecord runs four like these).
    let sets = ["SET work_mem = '3MB'", "SET lock_timeout = '4s'"];
    let ask = "SELECT current_setting('work_mem') || ' ' || current_setting('lock_timeout')";
    let (first, second) = (proxy.connect_app().await, proxy.connect_app().await);
    let late = proxy.connect_app().await;
    for client in [&first, &second] {
        for set in sets {
            client.batch_execute(set).await.unwrap();
        }
    }
    late.batch_execute(sets[0]).await.unwrap();
    let resets = || {
        let log = std::fs::read_to_string(cluster.node(0).log_path()).unwrap_or_default();
        log.matches("RESET ALL").count()
    };
    // The connection last ran `late`'s one setting: the first session runs only its second.
    let replays_first = calls(&cluster, sets[1]);
    assert_eq!(simple_value(&first, ask).await, "3MB 4s");
    assert_eq!(calls(&cluster, sets[1]), replays_first + 1);
    let (resets_before, replays_before) = (resets(), calls(&cluster, sets[1]));
    for _ in 0..10 {
        for client in [&first, &second] {
            assert_eq!(simple_value(client, ask).await, "3MB 4s");
        }
    }
    let (resets_after, replays_after) = (resets(), calls(&cluster, sets[1]));
    println!(
        "20 alternating units: {} resets, {} replays of a setting",
        resets_after - resets_before,
        replays_after - replays_before
    );
    assert_eq!(
        resets_after, resets_before,
        "no reset between equal sessions"
    );
    assert_eq!(
        replays_after, replays_before,
        "no replay between equal sessions"
    );

    // A session that ran the first setting only lacks the second: it gets just that.
    assert_eq!(simple_value(&late, ask).await, "3MB 0");
    assert!(
        resets() > resets_after,
        "a session that ran less resets the connection"
    );
    assert_eq!(simple_value(&first, ask).await, "3MB 4s");
    assert_eq!(calls(&cluster, sets[1]), replays_after + 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn clients_waiting_for_a_server_connection_get_it_in_the_order_they_came() {
    const WAITERS: usize = 8;
    let cluster = test_cluster(0);
    let proxy = start_proxy(&cluster, |config| {
        config.pool.mode = PoolMode::Transaction;
        config.pool.max_size = 1;
        config.pool.checkout_timeout = CHECKOUT;
        // On one thread: with more, a checkout on the thread of the connection coming back may
        // go before older ones on another (a bounded number of times; see `pool::Stock`).
        config.threads = 1;
    })
    .await;
    let holder = proxy.connect_app().await;
    holder
        .batch_execute("CREATE TABLE served (seq serial, client int)")
        .await
        .unwrap();
    let mut waiters = Vec::new();
    for _ in 0..WAITERS {
        waiters.push(Arc::new(proxy.connect_app().await));
    }
    // The one server connection is the holder's until its transaction ends.
    holder.batch_execute("BEGIN").await.unwrap();
    let pools = &proxy.running.proxy.pools;
    let mut inserts = Vec::new();
    for (n, client) in waiters.iter().enumerate() {
        let client = client.clone();
        inserts.push(tokio::spawn(async move {
            let insert = format!("INSERT INTO served (client) VALUES ({n})");
            client.batch_execute(&insert).await
        }));
        // Each joins the line before the next asks.
        eventually(CHECKOUT, &format!("{} client(s) wait", n + 1), || {
            pools.waiting_count(0) == n + 1
        });
    }
    holder.batch_execute("COMMIT").await.unwrap();
    for insert in inserts {
        insert.await.unwrap().unwrap();
    }
    let order = simple_value(
        &holder,
        "SELECT string_agg(client::text, ',' ORDER BY seq) FROM served",
    )
    .await;
    let expected: Vec<String> = (0..WAITERS).map(|n| n.to_string()).collect();
    assert_eq!(order, expected.join(","), "served in the order they asked");
}
