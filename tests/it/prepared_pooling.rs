//! Named prepared statements under transaction pooling, as a user sees them: two hundred clients
//! preparing statements share five server connections without pinning them; a Parse that fails
//! leaves no name behind and answers as PostgreSQL does; a closed or deallocated name can be
//! prepared again with another text while another session's statement of the same text goes on
//! working; more distinct statements than `pool.max_prepared_statements` all work; a statement
//! evicted from the connection of a failed transaction block is refused with 25P02, as PostgreSQL
//! refuses it; pgbench `-M prepared` runs clean with more clients than server connections.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pgvigil::config::PoolMode;
use tokio_postgres::NoTls;

use crate::lost_transaction::{one_server_connection, trust_app};
use crate::pgbench::{assert_clean_run, pgbench, pgbench_path};
use crate::support::wire::{bind_execute, close, parse, Wire};
use crate::support::{start_proxy, test_cluster, APP_DB, APP_PASSWORD, APP_USER};

/// Bound on a client's wait for a server connection: generous for a loaded 2-core machine.
const CHECKOUT: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread")]
async fn two_hundred_clients_share_five_connections_and_their_named_statements() {
    const CLIENTS: usize = 200;
    const POOL: usize = 5;
    const ROUNDS: i32 = 10;
    let cluster = test_cluster(0);
    let proxy = start_proxy(&cluster, |config| {
        config.pool.mode = PoolMode::Transaction;
        config.pool.max_size = POOL;
        config.pool.checkout_timeout = CHECKOUT;
        config.max_client_conn = CLIENTS + 10;
        config.client.startup_timeout = CHECKOUT;
    })
    .await;
    let proxy = Arc::new(proxy);
    let logins = Arc::new(tokio::sync::Semaphore::new(50));
    let connected = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|id| {
            let (proxy, logins, connected) = (proxy.clone(), logins.clone(), connected.clone());
            tokio::spawn(async move {
                let login = logins.acquire().await.unwrap();
                let client = proxy.connect_app().await;
                drop(login);
                // Every client holds its statements before any runs them: were a named statement
                // to pin its session, five would hold the five connections and the others wait.
                let shared = client
                    .prepare("SELECT $1::int * 2 AS doubled, pg_backend_pid() AS pid")
                    .await
                    .unwrap_or_else(|e| panic!("client {id}: prepare: {e}"));
                let own = client
                    .prepare(&format!(
                        "SELECT $1::int + {id} AS plus, pg_backend_pid() AS pid"
                    ))
                    .await
                    .unwrap_or_else(|e| panic!("client {id}: prepare: {e}"));
                connected.fetch_add(1, Ordering::SeqCst);
                let deadline = tokio::time::Instant::now() + CHECKOUT;
                while connected.load(Ordering::SeqCst) < CLIENTS {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "not every client prepared"
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                let mut pids = HashSet::new();
                for n in 0..ROUNDS {
                    let row = client.query_one(&shared, &[&n]).await.unwrap();
                    assert_eq!(row.get::<_, i32>("doubled"), n * 2, "client {id}");
                    pids.insert(row.get::<_, i32>("pid"));
                    let row = client.query_one(&own, &[&n]).await.unwrap();
                    assert_eq!(row.get::<_, i32>("plus"), n + id as i32, "client {id}");
                    pids.insert(row.get::<_, i32>("pid"));
                }
                pids
            })
        })
        .collect();
    let mut all_pids = HashSet::new();
    let mut moved = 0;
    for client in clients {
        let pids = client.await.expect("a client failed");
        moved += usize::from(pids.len() > 1);
        all_pids.extend(pids);
    }
    assert!(
        all_pids.len() <= POOL,
        "at most {POOL} server connections served them, saw {}",
        all_pids.len()
    );
    assert!(
        moved > 0,
        "no session ran its statements on more than one connection: pinned"
    );
    assert!(proxy.running.proxy.pools.open_count(0) <= POOL);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_parse_leaves_no_name_and_the_session_goes_on() {
    let cluster = test_cluster(0);
    let proxy = one_server_connection(&cluster, PoolMode::Transaction).await;
    // What PostgreSQL itself answers, asked directly.
    let node = cluster.node(0);
    let direct = format!(
        "host=127.0.0.1 port={} user={APP_USER} password={APP_PASSWORD} dbname={APP_DB}",
        node.port
    );
    let (pg, connection) = tokio_postgres::connect(&direct, NoTls).await.unwrap();
    tokio::spawn(connection);
    let expected = pg.prepare("SELEC 1").await.unwrap_err();
    let expected = expected.as_db_error().unwrap();

    let mut wire = Wire::login(&proxy).await;
    let failed = wire
        .exchange(|out| {
            parse(out, "s1", "SELEC 1");
            pgvigil_proto::encode::sync(out);
        })
        .await;
    assert_eq!(
        failed.errors,
        vec![(
            expected.code().code().to_owned(),
            expected.message().to_owned()
        )]
    );
    assert_eq!(failed.status, b'I');
    let unknown = wire
        .exchange(|out| {
            bind_execute(out, "s1");
            pgvigil_proto::encode::sync(out);
        })
        .await;
    assert_eq!(
        unknown.errors,
        vec![(
            "26000".to_owned(),
            "prepared statement \"s1\" does not exist".to_owned()
        )]
    );
    // The session goes on: the name is free, then taken.
    let ok = wire
        .exchange(|out| {
            parse(out, "s1", "SELECT 'works'");
            bind_execute(out, "s1");
            pgvigil_proto::encode::sync(out);
        })
        .await;
    assert!(ok.errors.is_empty(), "{:?}", ok.errors);
    assert_eq!(ok.rows, vec![vec!["works".to_owned()]]);
    let duplicate = wire
        .exchange(|out| {
            parse(out, "s1", "SELECT 'other'");
            bind_execute(out, "s1");
            pgvigil_proto::encode::sync(out);
        })
        .await;
    assert_eq!(
        duplicate.errors,
        vec![(
            "42P05".to_owned(),
            "prepared statement \"s1\" already exists".to_owned()
        )]
    );
    assert!(
        duplicate.rows.is_empty(),
        "the rest of the unit was skipped"
    );
    let still = wire
        .exchange(|out| {
            bind_execute(out, "s1");
            pgvigil_proto::encode::sync(out);
        })
        .await;
    assert_eq!(still.rows, vec![vec!["works".to_owned()]]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_closed_or_deallocated_name_takes_a_new_text_and_a_sharing_session_goes_on() {
    let cluster = test_cluster(0);
    let proxy = one_server_connection(&cluster, PoolMode::Transaction).await;
    // Both sessions on the one server connection, with a statement of the same text.
    let mut closer = Wire::login(&proxy).await;
    let mut sharer = Wire::login(&proxy).await;
    for wire in [&mut closer, &mut sharer] {
        let answer = wire
            .exchange(|out| {
                parse(out, "s1", "SELECT 'one'");
                pgvigil_proto::encode::sync(out);
            })
            .await;
        assert!(answer.errors.is_empty(), "{:?}", answer.errors);
    }
    let run = |name: &'static str| {
        move |out: &mut bytes::BytesMut| {
            bind_execute(out, name);
            pgvigil_proto::encode::sync(out);
        }
    };
    let closed = closer
        .exchange(|out| {
            close(out, "s1");
            pgvigil_proto::encode::sync(out);
        })
        .await;
    assert!(closed.errors.is_empty(), "{:?}", closed.errors);
    let gone = closer.exchange(run("s1")).await;
    assert_eq!(gone.codes(), vec!["26000"]);
    assert_eq!(
        sharer.exchange(run("s1")).await.rows,
        vec![vec!["one".to_owned()]],
        "the other session's statement of the same text stays"
    );
    let again = closer
        .exchange(|out| {
            parse(out, "s1", "SELECT 'two'");
            bind_execute(out, "s1");
            pgvigil_proto::encode::sync(out);
        })
        .await;
    assert_eq!(again.rows, vec![vec!["two".to_owned()]]);

    // SQL DEALLOCATE drops the session's own name only.
    let deallocated = closer.query("DEALLOCATE s1").await;
    assert_eq!(deallocated.tags, vec!["DEALLOCATE"]);
    assert_eq!(closer.exchange(run("s1")).await.codes(), vec!["26000"]);
    assert_eq!(
        sharer.exchange(run("s1")).await.rows,
        vec![vec!["one".to_owned()]]
    );
    let all = sharer.query("DEALLOCATE ALL").await;
    assert_eq!(all.tags, vec!["DEALLOCATE ALL"]);
    assert_eq!(sharer.exchange(run("s1")).await.codes(), vec!["26000"]);
    let unknown = closer.query("DEALLOCATE nope").await;
    assert_eq!(
        unknown.errors,
        vec![(
            "26000".to_owned(),
            "prepared statement \"nope\" does not exist".to_owned()
        )]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn more_distinct_statements_than_the_bound_all_work() {
    const BOUND: usize = 3;
    let cluster = test_cluster(0);
    let proxy = start_proxy(&cluster, |config| {
        config.pool.mode = PoolMode::Transaction;
        config.pool.max_size = 2;
        config.pool.max_prepared_statements = BOUND;
    })
    .await;
    let first = proxy.connect_app().await;
    let second = proxy.connect_app().await;
    let mut statements = Vec::new();
    for k in 0..10 {
        let sql = format!("SELECT $1::int + {k} AS n");
        statements.push((k, first.prepare(&sql).await.unwrap()));
    }
    let other = second.prepare("SELECT $1::int * 10 AS n").await.unwrap();
    for round in 0..3 {
        for (k, statement) in &statements {
            let row = first.query_one(statement, &[&round]).await.unwrap();
            assert_eq!(row.get::<_, i32>("n"), round + k);
            let row = second.query_one(&other, &[&round]).await.unwrap();
            assert_eq!(row.get::<_, i32>("n"), round * 10);
        }
    }
    let on_server: i64 = first
        .query_one("SELECT count(*) FROM pg_prepared_statements", &[])
        .await
        .unwrap()
        .get(0);
    assert!(
        on_server as usize <= BOUND,
        "{on_server} statements kept on a connection, bound {BOUND}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn pgbench_prepared_runs_clean_with_more_clients_than_connections() {
    let cluster = test_cluster(0);
    let proxy = start_proxy(&cluster, |config| {
        config.pool.mode = PoolMode::Transaction;
        config.pool.max_size = 4;
    })
    .await;
    let program = pgbench_path(cluster.bin_dir());
    pgbench(&program, &proxy, &["-i", "-s", "1", "-q"]).await;
    // A thread per client: pgbench prepares each statement on its first use with a blocking
    // PQprepare, which on a shared thread would stall that thread's other clients in the middle
    // of their transactions, holding their connections (with any pooler).
    let run = ["-T", "5", "-c", "12", "-j", "12", "-M", "prepared"];
    assert_clean_run(&pgbench(&program, &proxy, &run).await);
    assert!(proxy.running.proxy.pools.open_count(0) <= 4);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_statement_missing_on_the_connection_of_a_failed_block_gets_25p02_as_on_postgresql() {
    let cluster = test_cluster(0);
    // One server connection, shared by both sessions, that keeps one statement: a second one
    // prepared there evicts the least recently used.
    let proxy = start_proxy(&cluster, |config| {
        config.pool.mode = PoolMode::Transaction;
        config.pool.max_size = 1;
        config.pool.max_prepared_statements = 1;
        trust_app(config);
    })
    .await;
    let mut session = Wire::login(&proxy).await;
    let mut other = Wire::login(&proxy).await;
    for (wire, sql) in [
        (&mut session, "SELECT 'prepared'"),
        (&mut other, "SELECT 'other'"),
    ] {
        let prepared = wire
            .exchange(|out| {
                parse(out, "s1", sql);
                pgvigil_proto::encode::sync(out);
            })
            .await;
        assert!(prepared.errors.is_empty(), "{:?}", prepared.errors);
    }
    // The other session's next unit finds two statements on the connection and first closes
    // the least recently used: the session's s1.
    let left = other
        .query("SELECT statement FROM pg_prepared_statements")
        .await;
    assert_eq!(
        left.rows,
        vec![vec!["SELECT 'other'".to_owned()]],
        "only the other session's statement is left on the connection"
    );
    let failed = session.query("BEGIN; SELECT 1/0").await;
    assert_eq!(failed.codes(), vec!["22012"]);
    assert_eq!(failed.status, b'E');

    // PostgreSQL, which has s1, refuses its Bind in the failed block with 25P02; the connection,
    // which cannot prepare s1 again there, would answer 26000.
    let refused = session
        .exchange(|out| {
            bind_execute(out, "s1");
            pgvigil_proto::encode::sync(out);
        })
        .await;
    assert_eq!(
        refused.errors,
        vec![(
            "25P02".to_owned(),
            "current transaction is aborted, commands ignored until end of transaction block"
                .to_owned()
        )]
    );
    assert_eq!(refused.status, b'E');

    // The block ends as usual, and the statement works again.
    assert!(session.query("ROLLBACK").await.errors.is_empty());
    let works = session
        .exchange(|out| {
            bind_execute(out, "s1");
            pgvigil_proto::encode::sync(out);
        })
        .await;
    assert!(works.errors.is_empty(), "{:?}", works.errors);
    assert_eq!(works.rows, vec![vec!["prepared".to_owned()]]);
}
