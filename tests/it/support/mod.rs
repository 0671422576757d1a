//! What every integration test needs: a fresh real cluster and a way to wait for a condition.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

pub use pgvigil::local_cluster::{
    ClusterSpec, LocalCluster, APP_DB, APP_PASSWORD, APP_USER, MD5_PASSWORD, MD5_USER,
};

/// How often [`eventually`] re-checks its condition.
const POLL: Duration = Duration::from_millis(50);

/// Clusters built by this process so far, to give each its own directory.
static CLUSTERS: AtomicUsize = AtomicUsize::new(0);

/// A directory for a new cluster, unique per process and cluster, short enough for sockets.
pub fn fresh_base_dir() -> PathBuf {
    let n = CLUSTERS.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir().join(format!("pgvigil-{}-{n}", std::process::id()))
}

/// A primary and `replicas` streaming replicas with test settings (fsync off), on free ports.
pub fn test_cluster(replicas: usize) -> LocalCluster {
    start(ClusterSpec::new(fresh_base_dir()).replicas(replicas))
}

/// Starts a cluster from `spec` with test settings, panicking with the reason on failure.
pub fn start(spec: ClusterSpec) -> LocalCluster {
    LocalCluster::start(spec.fast(true))
        .unwrap_or_else(|e| panic!("could not build the test cluster: {e}"))
}

/// Polls `check` every 50 ms until it holds; panics naming `what` once `deadline` has passed.
pub fn eventually(deadline: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let give_up = Instant::now() + deadline;
    while !check() {
        assert!(Instant::now() < give_up, "not within {deadline:?}: {what}");
        std::thread::sleep(POLL);
    }
}

/// Runs `sql` with psql as the superuser on node `node`; panics with the reason on failure.
pub fn node_psql(cluster: &LocalCluster, node: usize, sql: &str) -> String {
    cluster
        .psql(node, sql)
        .unwrap_or_else(|e| panic!("psql on node {node}: {e}"))
}

/// The current WAL position of node 0 (the primary the fixture builds).
pub fn primary_lsn(cluster: &LocalCluster) -> u64 {
    let text = node_psql(cluster, 0, "SELECT pg_current_wal_lsn()");
    pgvigil::replication::parse_lsn(&text).unwrap_or_else(|| panic!("not an LSN: {text:?}"))
}

/// How far standby `node` has received WAL (`pg_last_wal_receive_lsn()`, 0 when it has none).
pub fn received_lsn(cluster: &LocalCluster, node: usize) -> u64 {
    let text = node_psql(cluster, node, "SELECT pg_last_wal_receive_lsn()");
    pgvigil::replication::parse_lsn(&text).unwrap_or(0)
}

/// Whether node `node` is a standby (`pg_is_in_recovery()`), asked directly.
pub fn in_recovery(cluster: &LocalCluster, node: usize) -> bool {
    node_psql(cluster, node, "SELECT pg_is_in_recovery()") == "t"
}

/// `ALTER SYSTEM SET primary_conninfo` on `node` and a reload: its WAL receiver stops (empty
/// value) or restarts with the new one.
pub fn set_primary_conninfo(cluster: &LocalCluster, node: usize, conninfo: &str) {
    let quoted = conninfo.replace('\'', "''");
    node_psql(
        cluster,
        node,
        &format!("ALTER SYSTEM SET primary_conninfo = '{quoted}'"),
    );
    node_psql(cluster, node, "SELECT pg_reload_conf()");
}

/// The first column of the first row `sql` returns through `client`, `None` for SQL NULL.
pub async fn value(client: &tokio_postgres::Client, sql: &str) -> Option<String> {
    let messages = client
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    messages
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(row) => Some(row.get(0).map(str::to_owned)),
            _ => None,
        })
        .unwrap_or_else(|| panic!("{sql} returned no row"))
}

/// The pid of the backend serving `client`'s current unit.
pub async fn backend_pid(client: &tokio_postgres::Client) -> i32 {
    let pid = value(client, "SELECT pg_backend_pid()").await;
    pid.and_then(|p| p.parse().ok()).expect("a pid")
}

pub mod agent;
pub mod binary;
pub mod etcd;
mod proxy;
pub mod relay;
pub mod wire;
pub mod writer;
pub use proxy::{start_proxy, test_config, TestProxy};
