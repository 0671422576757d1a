//! The thread-per-core data plane as a user sees it: every data-plane thread's listener accepts
//! clients (`pgvigil_accepted_clients_total{thread}`), their sessions share one pool whose
//! `pool.max_size` holds for all threads together, and one thread alone serves everything.

use std::collections::HashSet;
use std::time::Duration;

use pgvigil::config::PoolMode;
use tokio_postgres::{Client, NoTls};

use crate::metrics::{scrape, value};
use crate::support::{start_proxy, test_cluster, TestProxy};

/// The primary's index in every test cluster.
const PRIMARY: usize = 0;

/// Clients opened at most before both threads must have accepted some: the kernel spreads
/// connections over `SO_REUSEPORT` listeners by a hash of their addresses, so all 64 landing on
/// one of two threads would be a 1 in 2^63 chance.
const MOST_CLIENTS: usize = 64;

/// Clients opened at least, to have several sessions per thread take turns on the pool.
const MIN_CLIENTS: usize = 8;

/// How many clients data-plane thread `thread` accepted, as `/metrics` shows it.
async fn accepted(proxy: &TestProxy, thread: usize) -> f64 {
    let scraped = scrape(proxy.running.admin_addr).await;
    let thread = thread.to_string();
    value(
        &scraped,
        "pgvigil_accepted_clients_total",
        &[("thread", thread.as_str())],
    )
}

/// The backend pid serving `client`'s next transaction.
async fn backend_pid(client: &Client) -> i32 {
    client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .expect("a query through pgvigil")
        .get(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn every_data_plane_thread_accepts_clients_and_they_share_one_pool() {
    let cluster = test_cluster(0);
    let proxy = start_proxy(&cluster, |config| {
        config.threads = 2;
        config.pool.mode = PoolMode::Transaction;
        config.pool.max_size = 2;
    })
    .await;

    let mut clients = Vec::new();
    while clients.len() < MIN_CLIENTS
        || accepted(&proxy, 0).await == 0.0
        || accepted(&proxy, 1).await == 0.0
    {
        assert!(
            clients.len() < MOST_CLIENTS,
            "{MOST_CLIENTS} clients all landed on one thread: thread 0 accepted {}, thread 1 {}",
            accepted(&proxy, 0).await,
            accepted(&proxy, 1).await
        );
        let client = proxy.connect_app().await;
        backend_pid(&client).await;
        clients.push(client);
    }
    let total = accepted(&proxy, 0).await + accepted(&proxy, 1).await;
    assert_eq!(total, clients.len() as f64, "every client counted once");
    println!(
        "{} clients: thread 0 accepted {}, thread 1 {}",
        clients.len(),
        accepted(&proxy, 0).await,
        accepted(&proxy, 1).await
    );

    // Every client at once, three transactions each: the sessions of both threads take turns
    // on the same two server connections, moved between the threads as they go.
    let rounds = clients.iter().map(|client| async move {
        let mut pids = Vec::new();
        for _ in 0..3 {
            pids.push(backend_pid(client).await);
        }
        pids
    });
    let pids: HashSet<i32> = futures_util::future::join_all(rounds)
        .await
        .into_iter()
        .flatten()
        .collect();
    assert!(
        pids.len() <= 2,
        "pool.max_size = 2 holds across threads, yet backends {pids:?} served"
    );
    assert!(proxy.running.proxy.pools.open_count(PRIMARY) <= 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn one_data_plane_thread_serves_queries_cancels_and_pooling() {
    let cluster = test_cluster(0);
    let proxy = start_proxy(&cluster, |config| {
        config.threads = 1;
        config.pool.max_size = 1;
    })
    .await;

    let first = proxy.connect_app().await;
    let pid = backend_pid(&first).await;
    let cancel = first.cancel_token();
    let sleeping = tokio::spawn(async move { first.batch_execute("SELECT pg_sleep(60)").await });
    // Cancel until the sleep ends: a cancel sent before the sleep started is lost, as with
    // PostgreSQL itself.
    let mut cancels = 0;
    let ended = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            cancel
                .cancel_query(NoTls)
                .await
                .expect("the cancel is sent");
            cancels += 1;
            if sleeping.is_finished() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        sleeping.await
    })
    .await
    .expect("the cancelled sleep ended");
    let error = ended
        .expect("the query task ran")
        .expect_err("the sleep was cancelled");
    assert_eq!(
        error.code(),
        Some(&tokio_postgres::error::SqlState::QUERY_CANCELED)
    );

    let second = proxy.connect_app().await;
    assert_eq!(
        backend_pid(&second).await,
        pid,
        "the one server connection is reused"
    );
    assert_eq!(
        accepted(&proxy, 0).await,
        f64::from(2 + cancels),
        "the one thread accepted both clients and every cancel request"
    );
}
