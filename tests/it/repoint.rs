//! Repointing after a failover (issue 10, point 5), as the transcript: one standby's WAL
//! receiver is switched off (`primary_conninfo = ''`) before the primary is killed with SIGKILL.
//! pgvigil gives that standby a complete conninfo (a sibling's, or one built from
//! `[replication]`) and it streams from the new primary within 10 s of the promotion; a standby
//! that cannot is recorded as not repointed and takes no reads. As in the transcript, only a
//! replication role the standbys' conninfo names may replicate: the role a user-less conninfo
//! falls back to (the server's operating-system user) is refused.

use std::time::{Duration, Instant};

use pgvigil::config::Config;
use pgvigil::topology::{NodeId, Primary, Role, Stale};

use crate::support::{
    eventually, in_recovery, node_psql, set_primary_conninfo, start_proxy, test_cluster,
    LocalCluster, TestProxy,
};

const OLD_PRIMARY: NodeId = 0;

/// The standby that stays connected: it gets the write made after the other's receiver is off,
/// so it is the most advanced one and is promoted.
const PROMOTED: NodeId = 1;

/// The standby whose receiver is off when the primary dies.
const RECEIVER_OFF: NodeId = 2;

/// The bound: the standby streams from the new primary within this of the promotion.
const STREAMS_WITHIN: Duration = Duration::from_secs(10);

/// The one role the nodes let replicate.
const REPLICATOR: &str = "replicator";

/// Generous bound on anything that must happen "eventually" on a loaded two-core machine.
const PATIENCE: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread")]
async fn a_standby_with_its_receiver_off_adopts_a_siblings_conninfo_and_streams_from_the_new_primary(
) {
    let scene = Scene::fail_over(|_| {}).await;
    let took = scene.wait_until_it_streams();
    println!(
        "sibling's conninfo: the standby streams from the new primary {took:?} after the promotion"
    );
    assert!(took < STREAMS_WITHIN, "streaming only after {took:?}");
    let conninfo = node_psql(&scene.cluster, RECEIVER_OFF, "SHOW primary_conninfo");
    let name = &scene.cluster.node(RECEIVER_OFF).name;
    assert!(
        conninfo.contains(&format!("user='{REPLICATOR}'"))
            && conninfo.contains(&format!("application_name='{name}'")),
        "a sibling's user under its own name: {conninfo}"
    );
    scene.wait_until_it_takes_reads();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_standby_with_its_receiver_off_gets_the_replication_section_and_streams_from_the_new_primary(
) {
    let scene = Scene::fail_over(|config| {
        config.replication.user = Some(REPLICATOR.into());
        config
            .replication
            .conninfo
            .insert("keepalives_idle".into(), "30".into());
    })
    .await;
    let took = scene.wait_until_it_streams();
    println!(
        "[replication]: the standby streams from the new primary {took:?} after the promotion"
    );
    assert!(took < STREAMS_WITHIN, "streaming only after {took:?}");
    let conninfo = node_psql(&scene.cluster, RECEIVER_OFF, "SHOW primary_conninfo");
    let expected = format!(
        "host='127.0.0.1' port='{}' user='{REPLICATOR}' application_name='{}' keepalives_idle='30'",
        scene.cluster.node(PROMOTED).port,
        scene.cluster.node(RECEIVER_OFF).name
    );
    assert_eq!(conninfo, expected);
    scene.wait_until_it_takes_reads();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_standby_that_does_not_stream_after_repointing_is_recorded_as_not_repointed_and_gets_no_reads(
) {
    // A role the nodes do not have: the standby's WAL receiver cannot log in.
    let scene = Scene::fail_over(|config| config.replication.user = Some("nobody".into())).await;
    let mut reason = String::new();
    eventually(
        PATIENCE,
        "the standby is recorded as not repointed",
        || match &scene.proxy.running.proxy.topology.load().nodes[RECEIVER_OFF].stale {
            Some(Stale::NotRepointed(why)) => {
                reason = why.clone();
                true
            }
            _ => false,
        },
    );
    println!("not repointed: {reason}");
    assert!(reason.contains("not streaming"), "{reason}");
    let topology = scene.proxy.running.proxy.topology.load();
    assert_eq!(topology.nodes[RECEIVER_OFF].role, Role::Standby);
    let port = i32::from(scene.cluster.node(RECEIVER_OFF).port);
    let client = scene.proxy.connect_app().await;
    for _ in 0..50 {
        let row = client
            .query_one("SELECT inet_server_port()", &[])
            .await
            .unwrap_or_else(|e| panic!("a read failed: {e}"));
        assert_ne!(
            row.get::<_, i32>(0),
            port,
            "a read reached the standby that was not repointed"
        );
    }
}

/// A failed-over cluster: the old primary killed, `PROMOTED` the new primary, `RECEIVER_OFF`
/// being repointed.
struct Scene {
    // Declared first: the proxy stops before the nodes it talks to.
    proxy: TestProxy,
    cluster: LocalCluster,
    /// When pgvigil's topology first showed the new primary.
    promoted: Instant,
}

impl Scene {
    /// Builds the cluster, starts pgvigil (config changed by `adjust`), switches the receiver of
    /// `RECEIVER_OFF` off, writes once so that `PROMOTED` is ahead, kills the primary and waits
    /// for the promotion.
    async fn fail_over(adjust: impl FnOnce(&mut Config)) -> Scene {
        let mut cluster = test_cluster(2);
        let proxy = start_proxy(&cluster, |config| {
            config.health.interval = Duration::from_secs(1);
            config.health.failures = 2;
            config.health.timeout = Duration::from_secs(1);
            adjust(config);
        })
        .await;
        let shared = proxy.running.proxy.clone();
        eventually(PATIENCE, "node 0 primary, the others standbys", || {
            let topology = shared.topology.load();
            topology.primary == Primary::Known(OLD_PRIMARY)
                && [PROMOTED, RECEIVER_OFF]
                    .iter()
                    .all(|&n| topology.nodes[n].role == Role::Standby)
        });
        only_the_replicator_replicates(&cluster);
        set_primary_conninfo(&cluster, RECEIVER_OFF, "");
        node_psql(&cluster, OLD_PRIMARY, "CREATE TABLE after_off ()");
        eventually(PATIENCE, "the connected standby replays the write", || {
            node_psql(
                &cluster,
                PROMOTED,
                "SELECT to_regclass('after_off') IS NOT NULL",
            ) == "t"
        });
        eventually(
            PATIENCE,
            "the standby with its receiver off gets no reads",
            || shared.topology.load().nodes[RECEIVER_OFF].stale == Some(Stale::NotStreaming),
        );
        cluster.node_mut(OLD_PRIMARY).kill9();
        eventually(PATIENCE, "pgvigil promotes the connected standby", || {
            shared.topology.load().primary == Primary::Known(PROMOTED)
        });
        let promoted = Instant::now();
        assert!(!in_recovery(&cluster, PROMOTED));
        assert!(in_recovery(&cluster, RECEIVER_OFF));
        Scene {
            proxy,
            cluster,
            promoted,
        }
    }

    /// Waits until `RECEIVER_OFF` streams from the new primary, as both ends show it; returns the
    /// time since the promotion.
    fn wait_until_it_streams(&self) -> Duration {
        let primary_port = self.cluster.node(PROMOTED).port;
        let name = &self.cluster.node(RECEIVER_OFF).name;
        eventually(PATIENCE, "the standby streams from the new primary", || {
            let receiver = node_psql(
                &self.cluster,
                RECEIVER_OFF,
                "SELECT status || ' ' || sender_port FROM pg_stat_wal_receiver",
            );
            let sender = node_psql(
                &self.cluster,
                PROMOTED,
                &format!(
                    "SELECT count(*) FROM pg_stat_replication \
                     WHERE application_name = '{name}' AND state = 'streaming'"
                ),
            );
            receiver == format!("streaming {primary_port}") && sender == "1"
        });
        self.promoted.elapsed()
    }

    /// Waits until pgvigil sees `RECEIVER_OFF` following the new primary again.
    fn wait_until_it_takes_reads(&self) {
        let shared = &self.proxy.running.proxy;
        eventually(PATIENCE, "the repointed standby takes reads again", || {
            shared.topology.load().nodes[RECEIVER_OFF].stale.is_none()
        });
    }
}

/// Creates [`REPLICATOR`], lets only it replicate (pg_hba.conf lines put first, reloaded), and
/// points `PROMOTED` at the primary as it. Streams already open stay open.
fn only_the_replicator_replicates(cluster: &LocalCluster) {
    node_psql(
        cluster,
        OLD_PRIMARY,
        &format!("CREATE ROLE {REPLICATOR} LOGIN REPLICATION"),
    );
    let first = format!(
        "host replication {REPLICATOR} 127.0.0.1/32 trust\n\
         host replication all 127.0.0.1/32 reject\n"
    );
    for node in [OLD_PRIMARY, PROMOTED, RECEIVER_OFF] {
        let path = node_psql(cluster, node, "SHOW hba_file");
        let rules = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        std::fs::write(&path, format!("{first}{rules}")).unwrap_or_else(|e| panic!("{path}: {e}"));
        node_psql(cluster, node, "SELECT pg_reload_conf()");
    }
    let conninfo = format!(
        "host=127.0.0.1 port={} user={REPLICATOR} application_name={}",
        cluster.node(OLD_PRIMARY).port,
        cluster.node(PROMOTED).name
    );
    set_primary_conninfo(cluster, PROMOTED, &conninfo);
    eventually(
        PATIENCE,
        "the promoted-to-be standby streams as the replicator",
        || {
            node_psql(
                cluster,
                OLD_PRIMARY,
                &format!(
                    "SELECT count(*) FROM pg_stat_replication \
                 WHERE usename = '{REPLICATOR}' AND state = 'streaming'"
                ),
            ) == "1"
        },
    );
}
