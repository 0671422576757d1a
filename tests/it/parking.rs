//! Transaction pooling's parked connections (`pool.park`) as a user sees them: between two
//! transactions a session keeps its server connection while no other client waits for one, and
//! gives it up as soon as a client needs one; a parked connection the node closed, or one parked
//! past `pool.idle_timeout`, is closed, and the session's next statement runs on another
//! connection without the client seeing anything of it.

use std::time::Duration;

use pgvigil::config::PoolMode;

use crate::pooling::{backend_count, terminate_backend};
use crate::support::{backend_pid, eventually, start_proxy, test_cluster};

/// Bound on a client's statement or wait: generous for a loaded 2-core machine.
const PATIENCE: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread")]
async fn a_parked_connection_goes_to_the_next_client_that_needs_one() {
    let cluster = test_cluster(0);
    let proxy = start_proxy(&cluster, |config| {
        config.pool.mode = PoolMode::Transaction;
        config.pool.park = true;
        config.pool.max_size = 2;
        // Were the parked connection never given up, the third client would wait this long.
        config.pool.checkout_timeout = Duration::from_secs(600);
    })
    .await;
    let pools = &proxy.running.proxy.pools;
    let parking = proxy.connect_app().await;
    let pid = backend_pid(&parking).await;
    eventually(PATIENCE, "the connection parks with its session", || {
        pools.parked_count(0) == 1
    });
    // The other connection, held in a transaction block: no slot is left, nothing is idle.
    let holding = proxy.connect_app().await;
    holding.batch_execute("BEGIN").await.unwrap();
    assert_ne!(backend_pid(&holding).await, pid);
    // Its login needs a connection too.
    let third = tokio::time::timeout(PATIENCE, proxy.connect_app())
        .await
        .expect("the third client logs in on the parked connection");
    let served = tokio::time::timeout(PATIENCE, backend_pid(&third)).await;
    assert_eq!(served.expect("served"), pid, "the connection parked before");
    holding.batch_execute("COMMIT").await.unwrap();
    for client in [&parking, &holding, &third] {
        tokio::time::timeout(PATIENCE, backend_pid(client))
            .await
            .expect("every client is served");
    }
    assert_eq!(pools.open_count(0), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_parked_connection_the_node_closed_is_replaced_unseen() {
    let cluster = test_cluster(0);
    let proxy = start_proxy(&cluster, |config| {
        config.pool.mode = PoolMode::Transaction;
        config.pool.park = true;
    })
    .await;
    let pools = &proxy.running.proxy.pools;
    let client = proxy.connect_app().await;
    client
        .batch_execute("SET application_name = 'parked'")
        .await
        .unwrap();
    let pid = backend_pid(&client).await;
    eventually(PATIENCE, "the connection parks with its session", || {
        pools.parked_count(0) == 1
    });
    terminate_backend(&cluster, pid);
    let row = client
        .query_one(
            "SELECT pg_backend_pid(), current_setting('application_name')",
            &[],
        )
        .await
        .expect("served on another connection");
    assert_ne!(row.get::<_, i32>(0), pid, "a new backend");
    assert_eq!(
        row.get::<_, &str>(1),
        "parked",
        "with the session's settings"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_connection_parked_past_the_idle_timeout_is_closed() {
    let cluster = test_cluster(0);
    let proxy = start_proxy(&cluster, |config| {
        config.pool.mode = PoolMode::Transaction;
        config.pool.park = true;
        config.pool.idle_timeout = Duration::from_secs(1);
    })
    .await;
    let pools = &proxy.running.proxy.pools;
    let client = proxy.connect_app().await;
    let pid = backend_pid(&client).await;
    eventually(PATIENCE, "the parked connection is closed", || {
        pools.open_count(0) == 0
    });
    eventually(PATIENCE, "its backend exits", || {
        backend_count(&cluster, &format!("pid = {pid}")) == 0
    });
    assert_ne!(
        backend_pid(&client).await,
        pid,
        "the next statement on a new one"
    );
}
