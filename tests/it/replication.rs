//! The replication view as the router will rely on it: every probe round records where each node
//! stands in the WAL; a replica whose replay is paused shows as lagging, in bytes and in time, and
//! as caught up again once replay resumes; a node that stops answering has no position.

use std::time::Duration;

use pgvigil::replication::ReplicationView;
use pgvigil::topology::{NodeId, Primary, Role};

use crate::support::{eventually, node_psql, primary_lsn, start_proxy, test_cluster, TestProxy};

const PRIMARY: NodeId = 0;
const REPLICA: NodeId = 1;

/// Bound on anything the health monitor must observe (probes run every second by default).
const SETTLE: Duration = Duration::from_secs(30);

/// The byte lag the test calls "behind"; the bulk write below makes about 1.3 MB of WAL.
const MAX_LAG: u64 = 100_000;

/// A delay limit no test comes near, to test the byte limit alone.
const HOUR: Duration = Duration::from_secs(3600);

#[tokio::test(flavor = "multi_thread")]
async fn a_replica_with_paused_replay_lags_in_bytes_and_time_and_catches_up_after_resume() {
    let cluster = test_cluster(1);
    let proxy = start_proxy(&cluster, |_| {}).await;
    let generation = wait_for_roles(&proxy);
    let view = wait_for_view(&proxy, "positions of both nodes", |v| {
        v.nodes.iter().all(Option::is_some)
    });
    let primary = view.nodes[PRIMARY].unwrap();
    assert_eq!(primary.received, None, "a primary receives no WAL");
    assert_eq!(primary.replay_delay, Duration::ZERO);
    assert!(view.nodes[REPLICA].unwrap().received.is_some());

    // pg_last_xact_replay_timestamp() is the commit time of the last transaction the replica
    // replayed: replay one commit now, so that the delay can be measured once replay is paused.
    node_psql(&cluster, PRIMARY, "CREATE TABLE marker ()");
    let marker = primary_lsn(&cluster);
    wait_for_view(&proxy, "the replica replays the marker", |v| {
        v.has_replayed(REPLICA, PRIMARY, marker)
    });

    node_psql(&cluster, REPLICA, "SELECT pg_wal_replay_pause()");
    node_psql(
        &cluster,
        PRIMARY,
        "CREATE TABLE bulk AS SELECT generate_series(1, 20000) AS g",
    );
    let bulk_end = primary_lsn(&cluster);
    let view = wait_for_view(&proxy, "both nodes are seen past the bulk write", |v| {
        v.nodes[PRIMARY].is_some_and(|p| p.lsn >= bulk_end)
            && v.nodes[REPLICA].is_some_and(|p| p.received >= Some(bulk_end))
    });
    let lag = view.lag_bytes(REPLICA, PRIMARY).unwrap();
    assert!(lag > MAX_LAG, "paused replay leaves {lag} bytes to replay");
    assert!(!view.caught_up(REPLICA, PRIMARY, MAX_LAG, HOUR));
    assert!(!view.has_replayed(REPLICA, PRIMARY, bulk_end));
    assert!(view.caught_up(PRIMARY, PRIMARY, 0, Duration::ZERO));

    // While WAL waits, the delay is the age of the marker's commit: it grows with the clock.
    let view = wait_for_view(&proxy, "the replay delay passes one second", |v| {
        v.nodes[REPLICA].is_some_and(|p| p.replay_delay >= Duration::from_secs(1))
    });
    assert!(
        !view.caught_up(REPLICA, PRIMARY, u64::MAX, Duration::from_millis(500)),
        "a replica over the delay limit is not caught up, whatever its byte lag"
    );

    node_psql(&cluster, REPLICA, "SELECT pg_wal_replay_resume()");
    let view = wait_for_view(&proxy, "the replica catches up exactly", |v| {
        v.caught_up(REPLICA, PRIMARY, 0, Duration::ZERO)
    });
    assert_eq!(view.lag_bytes(REPLICA, PRIMARY), Some(0));
    assert!(view.has_replayed(REPLICA, PRIMARY, bulk_end));

    assert_eq!(
        proxy.running.proxy.topology.load().generation,
        generation,
        "positions change every round; the topology only when a role does"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_that_stops_answering_has_no_position() {
    let mut cluster = test_cluster(1);
    let proxy = start_proxy(&cluster, |_| {}).await;
    wait_for_view(&proxy, "positions of both nodes", |v| {
        v.nodes.iter().all(Option::is_some)
    });

    cluster.node_mut(REPLICA).kill9();
    let view = wait_for_view(&proxy, "the killed replica has no position", |v| {
        v.nodes[REPLICA].is_none()
    });
    assert!(view.nodes[PRIMARY].is_some());
    assert_eq!(view.lag_bytes(REPLICA, PRIMARY), None);
    assert!(!view.caught_up(REPLICA, PRIMARY, u64::MAX, Duration::MAX));
    assert!(!view.has_replayed(REPLICA, PRIMARY, 0));
}

/// Waits until the topology shows node 0 as primary and node 1 as standby; returns its generation.
fn wait_for_roles(proxy: &TestProxy) -> u64 {
    let topology = &proxy.running.proxy.topology;
    eventually(SETTLE, "primary and standby roles", || {
        let t = topology.load();
        t.primary == Primary::Known(PRIMARY) && t.nodes[REPLICA].role == Role::Standby
    });
    topology.load().generation
}

/// Waits until the published view satisfies `check` and returns that view.
fn wait_for_view(
    proxy: &TestProxy,
    what: &str,
    check: impl Fn(&ReplicationView) -> bool,
) -> ReplicationView {
    let replication = &proxy.running.proxy.replication;
    let mut seen = ReplicationView::default();
    eventually(SETTLE, what, || {
        seen = ReplicationView::clone(&replication.load());
        check(&seen)
    });
    seen
}
