//! A thousand SCRAM sessions that each held a connection to the primary when it was killed are
//! all served on the new primary: each needs a new server login there at the same moment. The
//! time they took is printed (`--nocapture`), not asserted (timing lives in `benches/`).

use std::time::{Duration, Instant};

use futures_util::future::join_all;
use pgvigil::topology::Primary;

use crate::support::writer::describe;
use crate::support::{eventually, fresh_base_dir, start, start_proxy, ClusterSpec};

/// Sessions that reconnect at once.
const SESSIONS: usize = 1000;

/// Sessions logged in at a time while they are opened.
const BATCH: usize = 100;

/// Generous bound on anything that must happen "eventually" on a loaded two-core machine.
const PATIENCE: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread")]
async fn a_thousand_scram_sessions_are_all_served_on_the_new_primary_after_a_failover() {
    let mut cluster = start(
        ClusterSpec::new(fresh_base_dir())
            .replicas(1)
            .conf("max_connections", (SESSIONS + 100).to_string()),
    );
    let proxy = start_proxy(&cluster, |config| {
        // Probes that wait for a node busy forking a thousand backends do not call it down.
        config.health.timeout = Duration::from_secs(5);
        config.max_client_conn = SESSIONS + 50;
        config.pool.max_size = SESSIONS + 20;
        // Not timed here: every login may take its turn on the two shared cores.
        config.backend.connect_timeout = PATIENCE;
        config.pool.checkout_timeout = PATIENCE;
    })
    .await;

    // Each session holds a connection to the primary: pg_backend_pid() is answered there.
    let mut sessions = Vec::with_capacity(SESSIONS);
    for _ in 0..SESSIONS / BATCH {
        let batch = join_all((0..BATCH).map(|_| async {
            let client = proxy.connect_app().await;
            client
                .query_one("SELECT pg_backend_pid()", &[])
                .await
                .unwrap();
            client
        }))
        .await;
        sessions.extend(batch);
    }

    cluster.node_mut(0).kill9();
    eventually(PATIENCE, "the standby is promoted", || {
        let topology = proxy.running.proxy.topology.snapshot();
        matches!(topology.primary, Primary::Known(1))
    });

    let started = Instant::now();
    let served = join_all(sessions.iter().map(|client| async move {
        client
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .map_err(|e| describe(&e))
    }))
    .await;
    let elapsed = started.elapsed();
    let failed: Vec<&String> = served.iter().filter_map(|r| r.as_ref().err()).collect();
    println!(
        "{SESSIONS} SCRAM sessions served on the new primary in {elapsed:?} ({} failed)",
        failed.len()
    );
    assert!(
        failed.is_empty(),
        "{} failed, the first: {}",
        failed.len(),
        failed[0]
    );
}
