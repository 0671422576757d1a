//! Promotion safety as clients see it: pgvigil promotes only a standby that loses nothing beyond
//! the bound (lag-bounded, synchronous-aware), never asks a second standby while a timed-out
//! promotion may still finish, and never fences a healthy primary because someone else promoted
//! a standby. Each test builds its own three-node cluster with the scene of `failover.rs`.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use pgvigil::topology::{NodeId, Primary, Role};
use tokio_postgres::error::SqlState;

use crate::failover::{other_standby, Scene, FAILURES, INTERVAL, OLD_PRIMARY, PATIENCE, STANDBYS};
use crate::support::relay::Relay;
use crate::support::writer::{describe, tick_ids};
use crate::support::{
    eventually, fresh_base_dir, in_recovery, node_psql, primary_lsn, received_lsn, start,
    test_cluster, ClusterSpec, LocalCluster, APP_DB,
};

/// How long a test watches that nothing is promoted: several failover attempts' worth.
const WATCH: Duration = Duration::from_secs(8);

/// The bound for a frozen primary with PostgreSQL's default receiver timeouts.
const FROZEN_WINDOW: Duration = Duration::from_secs(5);

/// `failover.wait_timeout` of the tests that check a refused write.
const WAIT: Duration = Duration::from_secs(2);

#[tokio::test(flavor = "multi_thread")]
async fn standbys_further_behind_than_max_lag_bytes_are_not_promoted_and_reads_go_on() {
    let mut scene = Scene::start(test_cluster(2), |config| {
        config.failover.wait_timeout = WAIT;
    })
    .await;
    // Both standbys stop receiving; the primary then writes well past the default 1 MiB bound.
    for standby in STANDBYS {
        node_psql(
            &scene.cluster,
            standby,
            "ALTER SYSTEM SET primary_conninfo = ''",
        );
        node_psql(&scene.cluster, standby, "SELECT pg_reload_conf()");
    }
    for standby in STANDBYS {
        eventually(PATIENCE, "the standby's WAL receiver stops", || {
            node_psql(
                &scene.cluster,
                standby,
                "SELECT count(*) FROM pg_stat_wal_receiver",
            ) == "0"
        });
    }
    scene
        .cluster
        .psql_in(
            OLD_PRIMARY,
            APP_DB,
            "INSERT INTO ticks (id) SELECT g FROM generate_series(-100000, -1000) AS g",
        )
        .unwrap_or_else(|e| panic!("the bulk write failed: {e}"));
    let written = primary_lsn(&scene.cluster);
    eventually(
        PATIENCE,
        "pgvigil probes the primary past the bulk write",
        || {
            scene.proxy.running.proxy.replication.load().nodes[OLD_PRIMARY]
                .is_some_and(|p| p.lsn >= written)
        },
    );

    let kill = scene.kill(OLD_PRIMARY);
    eventually(PATIENCE, "the refusal is the reason writes wait", || {
        reason(&scene).is_some_and(|r| r.contains("failover.max_lag_bytes"))
    });
    println!("lag bound: {:?}", reason(&scene));
    let client = scene.proxy.connect_app().await;
    let rows = client
        .query_one("SELECT count(*) FROM ticks", &[])
        .await
        .unwrap_or_else(|e| panic!("a read failed: {}", describe(&e)));
    assert!(rows.get::<_, i64>(0) > 0);
    let error = client
        .simple_query("INSERT INTO ticks (id) VALUES (-5)")
        .await
        .expect_err("a write succeeded with no standby close enough");
    assert_eq!(
        error.code(),
        Some(&SqlState::CANNOT_CONNECT_NOW),
        "{}",
        describe(&error)
    );
    assert!(
        describe(&error).contains("max_lag_bytes"),
        "{}",
        describe(&error)
    );
    watch_nothing_promoted(&scene, kill, &STANDBYS);
}

#[tokio::test(flavor = "multi_thread")]
async fn with_the_synchronous_standby_lost_too_nothing_is_promoted_until_it_answers() {
    let (mut scene, name, sync, other) = synchronous_scene().await;

    // The primary and its synchronous standby die together: only the other one answers.
    let kill = scene.kill(OLD_PRIMARY);
    scene.kill(sync);
    eventually(
        PATIENCE,
        "pgvigil says it waits for the synchronous standby",
        || reason(&scene).is_some_and(|r| r.contains(&format!("waiting for {name}"))),
    );
    println!("synchronous: {:?}", reason(&scene));
    watch_nothing_promoted(&scene, kill, &[other]);

    // Back, it vouches for every acknowledged commit: it, or the other if that one has as much
    // WAL, is promoted.
    let back = Instant::now();
    scene.cluster.node_mut(sync).start().unwrap();
    scene.writes_resume(back, "the synchronous standby back");
    let new = scene.sole_primary(&STANDBYS);
    let log = scene.writer.stop().await;
    let lost = log.missing_on(&scene.cluster, new);
    assert!(lost.is_empty(), "acknowledged ids lost: {lost:?}");
}

/// A standby outside the synchronous set may receive a commit before the synchronous one does;
/// if the primary dies then, promoting the synchronous one would leave the other ahead of the
/// new timeline's fork, unable to follow it (and with `synchronous_standby_names = '*'` on the
/// new primary, commits may wait for it: a CI run saw that). The further one holds everything
/// the synchronous one holds, so it is promoted and the synchronous one follows it.
#[tokio::test(flavor = "multi_thread")]
async fn a_standby_ahead_of_the_synchronous_one_is_promoted_and_the_synchronous_one_follows() {
    let (mut scene, name, sync, other) = synchronous_scene().await;

    // The primary's WAL sender to the synchronous standby stops: from then on the writer's
    // commits wait for it, while the other standby receives what the primary writes. Past the
    // position read after the stop, the synchronous one can have nothing.
    let sender: u32 = node_psql(
        &scene.cluster,
        OLD_PRIMARY,
        &format!("SELECT pid FROM pg_stat_replication WHERE application_name = '{name}'"),
    )
    .parse()
    .expect("the primary streams to the synchronous standby");
    signal("-STOP", sender);
    let stopped_at = primary_lsn(&scene.cluster);
    // A write that does not wait for the standby moves the WAL on whatever the writer does.
    node_psql(
        &scene.cluster,
        OLD_PRIMARY,
        "SET synchronous_commit = local; CREATE TABLE ahead (id int)",
    );
    eventually(
        PATIENCE,
        "the standby outside the synchronous set receives what came after the stop",
        || received_lsn(&scene.cluster, other) > stopped_at,
    );
    let kill = scene.kill(OLD_PRIMARY);
    scene.writes_resume(kill, "kill -9 with a standby ahead of the synchronous one");
    assert_eq!(scene.sole_primary(&STANDBYS), other);

    let log = scene.writer.stop().await;
    let last = log.last_id().expect("writes after the failover");
    eventually(PATIENCE, "the synchronous standby follows", || {
        tick_ids(&scene.cluster, sync).contains(&last)
    });
    assert!(in_recovery(&scene.cluster, sync));
    let lost = log.missing_on(&scene.cluster, other);
    assert!(lost.is_empty(), "acknowledged ids lost: {lost:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_promotion_that_timed_out_stays_the_only_candidate_and_one_node_leaves_recovery() {
    let (mut scene, asked, other) = stalled_promotion().await;
    // The standby asked cannot be reached any more, and the other one could promote at once.
    scene.cluster.node_mut(asked).freeze();
    scene.release(other);
    let frozen = Instant::now();
    watch_nothing_promoted(&scene, frozen, &[other]);
    let why = reason(&scene).unwrap_or_default();
    println!("timed-out promotion: {why}");
    let asked_name = &scene.cluster.node(asked).name;
    assert!(
        why.contains(&format!("{asked_name} was asked to promote")),
        "{why}"
    );

    // Thawed, it finishes the promotion it was asked for, and pgvigil takes it as primary.
    scene.cluster.node_mut(asked).thaw();
    let thawed = Instant::now();
    scene.writes_resume(thawed, "the standby asked to promote thawed");
    assert_eq!(scene.sole_primary(&STANDBYS), asked);
    assert_eq!(scene.topology().primary, Primary::Known(asked));
    let last = scene.writer.log().last_id().unwrap();
    eventually(
        PATIENCE,
        "the other standby follows the promoted one",
        || tick_ids(&scene.cluster, other).contains(&last),
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_standby_asked_to_promote_then_restarted_does_not_block_the_failover() {
    let (mut scene, asked, other) = stalled_promotion().await;
    // A restart removes the promote signal file: the request is withdrawn, and the node comes
    // back a standby: pgvigil then chooses again (either node), and exactly one leaves recovery.
    scene.cluster.node_mut(asked).kill9();
    scene.cluster.node_mut(asked).start().unwrap();
    scene.release(other);
    let restarted = Instant::now();
    scene.writes_resume(restarted, "the standby asked to promote restarted");
    let new = scene.sole_primary(&STANDBYS);
    assert_eq!(scene.topology().primary, Primary::Known(new));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_standby_promoted_by_hand_while_the_one_asked_is_gone_is_taken_and_the_other_fenced() {
    let (mut scene, asked, other) = stalled_promotion().await;
    scene.cluster.node_mut(asked).freeze();
    scene.release(other);
    // The operator's way out when the standby asked is gone: promote another by hand.
    node_psql(&scene.cluster, other, "SELECT pg_promote()");
    let promoted = Instant::now();
    scene.writes_resume(promoted, "another standby promoted by hand");
    assert_eq!(scene.topology().primary, Primary::Known(other));
    assert_eq!(scene.topology().nodes[asked].role, Role::Fenced);

    // Thawed, the standby asked finishes its promotion, but stays fenced and gets no write.
    scene.cluster.node_mut(asked).thaw();
    eventually(PATIENCE, "the standby asked is made read-only", || {
        node_psql(&scene.cluster, asked, "SHOW default_transaction_read_only") == "on"
    });
    let before = tick_ids(&scene.cluster, asked);
    let log = scene
        .writer
        .wait_for_acks_after(Instant::now(), 50, PATIENCE);
    assert_eq!(
        tick_ids(&scene.cluster, asked),
        before,
        "the fenced node got writes"
    );
    assert!(tick_ids(&scene.cluster, other).contains(&log.last_id().unwrap()));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_standby_promoted_behind_pgvigils_back_is_refused_and_the_primary_is_not_fenced() {
    let mut scene = Scene::start(test_cluster(2), |config| {
        config.failover.wait_timeout = WAIT;
    })
    .await;
    let (rogue, follower) = (STANDBYS[0], STANDBYS[1]);
    node_psql(&scene.cluster, rogue, "SELECT pg_promote()");
    let promoted = Instant::now();
    eventually(PATIENCE, "writes are refused, naming both nodes", || {
        reason(&scene).is_some_and(|r| r.contains("pg2 left recovery") && r.contains("pg1"))
    });
    println!("foreign promotion: {:?}", reason(&scene));

    let client = scene.proxy.connect_app().await;
    let error = client
        .simple_query("INSERT INTO ticks (id) VALUES (-5)")
        .await
        .expect_err("a write succeeded with two primaries");
    assert_eq!(
        error.code(),
        Some(&SqlState::CANNOT_CONNECT_NOW),
        "{}",
        describe(&error)
    );
    let message = describe(&error);
    assert!(
        message.contains("pg2") && message.contains("pg1"),
        "{message}"
    );
    let rogue_port = i32::from(scene.cluster.node(rogue).port);
    for _ in 0..10 {
        let row = client
            .query_one("SELECT inet_server_port()", &[])
            .await
            .unwrap_or_else(|e| panic!("a read failed: {}", describe(&e)));
        assert_ne!(
            row.get::<_, i32>(0),
            rogue_port,
            "a read went to the rogue node"
        );
    }
    while promoted.elapsed() < WATCH {
        let topology = scene.topology();
        assert_eq!(
            topology.nodes[OLD_PRIMARY].role,
            Role::Primary,
            "{topology:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        node_psql(
            &scene.cluster,
            OLD_PRIMARY,
            "SHOW default_transaction_read_only"
        ),
        "off",
        "the healthy primary was fenced"
    );
    assert!(in_recovery(&scene.cluster, follower));
    let log = scene.writer.stop().await;
    let lost = log.missing_on(&scene.cluster, OLD_PRIMARY);
    assert!(
        lost.is_empty(),
        "acknowledged ids not on the primary: {lost:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_frozen_primary_with_postgres_default_receiver_timeouts_is_replaced_within_5s() {
    let mut scene = Scene::start(start(default_timeouts()), |_| {}).await;
    wait_for_short_receiver_timeouts(&scene);
    scene.cluster.node_mut(OLD_PRIMARY).freeze();
    let freeze = Instant::now();
    let window = scene.writes_resume(freeze, "SIGSTOP, PostgreSQL's default receiver timeouts");
    assert_ne!(scene.topology().primary, Primary::Known(OLD_PRIMARY));
    scene.cluster.node_mut(OLD_PRIMARY).thaw();
    assert!(
        window < FROZEN_WINDOW,
        "writes were unavailable for {window:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn with_default_receiver_timeouts_cutting_only_pgvigils_path_is_still_no_failover() {
    let cluster = start(default_timeouts());
    let primary = SocketAddr::from(([127, 0, 0, 1], cluster.node(OLD_PRIMARY).port));
    let relay = Relay::start(primary);
    let scene = Scene::start(cluster, |config| {
        config.nodes[OLD_PRIMARY].port = relay.port();
    })
    .await;
    wait_for_short_receiver_timeouts(&scene);
    relay.cut();
    let cut = Instant::now();
    while cut.elapsed() < WATCH {
        if let Primary::Known(node) = scene.topology().primary {
            assert_eq!(node, OLD_PRIMARY, "failed over during a cut");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    for standby in STANDBYS {
        assert!(
            in_recovery(&scene.cluster, standby),
            "node {standby} was promoted"
        );
    }
    relay.heal();
    let healed = Instant::now();
    scene.writer.wait_for_acks_after(healed, 25, PATIENCE);
    assert_eq!(scene.topology().primary, Primary::Known(OLD_PRIMARY));
}

/// The fault soak's freeze (issue 10, point 8) aimed at its worst moment: the primary thaws just
/// as pgvigil declares it lost. Had the other standby gone on streaming from it, it would have
/// received WAL past the fork point and could not follow the new primary; with `ANY 1`
/// synchronous replication every commit would then wait for it. pgvigil stops every standby
/// streaming before it reads their positions, so writes resume, acknowledged by the third node.
#[tokio::test(flavor = "multi_thread")]
async fn a_primary_thawed_as_it_is_declared_lost_leaves_the_third_node_following_the_new_one() {
    let mut scene = Scene::start(quorum_sync_cluster(), |_| {}).await;
    scene.cluster.node_mut(OLD_PRIMARY).freeze();
    // Writes stop going to it once pgvigil declares it lost (a failover in progress, or done).
    eventually(PATIENCE, "pgvigil declares the frozen primary lost", || {
        scene.topology().primary != Primary::Known(OLD_PRIMARY)
    });
    scene.cluster.node_mut(OLD_PRIMARY).thaw();
    let thaw = Instant::now();
    // A commit on the new primary waits for its only standby: writes resuming is the third
    // node streaming from it.
    scene.writes_resume(
        thaw,
        "SIGSTOP, thawed as pgvigil declared it lost, ANY 1 (*)",
    );
    let new = scene.sole_primary(&STANDBYS);
    let third = other_standby(new);
    let port = scene.cluster.node(new).port;
    eventually(
        PATIENCE,
        "the third node streams from the new primary",
        || {
            node_psql(
                &scene.cluster,
                third,
                "SELECT status || ' ' || sender_port FROM pg_stat_wal_receiver",
            ) == format!("streaming {port}")
        },
    );
    let last = scene.writer.log().last_id().unwrap();
    eventually(
        PATIENCE,
        "the third node replays the last acknowledged write",
        || tick_ids(&scene.cluster, third).contains(&last),
    );
    assert_eq!(scene.topology().primary, Primary::Known(new));
}

/// A primary and two standbys with quorum synchronous replication (`ANY 1 (*)`): a commit waits
/// for either standby.
pub(crate) fn quorum_sync_cluster() -> LocalCluster {
    let cluster = start(
        ClusterSpec::new(fresh_base_dir())
            .replicas(2)
            .sync_replication(true),
    );
    for node in 0..cluster.nodes().len() {
        node_psql(
            &cluster,
            node,
            "ALTER SYSTEM SET synchronous_standby_names = 'ANY 1 (*)'",
        );
        node_psql(&cluster, node, "SELECT pg_reload_conf()");
    }
    cluster
}

/// A cluster with PostgreSQL's own replication timeouts instead of the fixture's short ones.
fn default_timeouts() -> ClusterSpec {
    ClusterSpec::new(fresh_base_dir())
        .replicas(2)
        .conf("wal_receiver_timeout", "60s")
        .conf("wal_sender_timeout", "60s")
        .conf("wal_receiver_status_interval", "10s")
}

/// Waits until pgvigil has set `failover.receiver_timeout` (3 s by default) on both standbys.
fn wait_for_short_receiver_timeouts(scene: &Scene) {
    for standby in STANDBYS {
        eventually(
            PATIENCE,
            "pgvigil shortens the standby's wal_receiver_timeout",
            || node_psql(&scene.cluster, standby, "SHOW wal_receiver_timeout") == "3s",
        );
    }
}

/// A scene whose primary was killed while both standbys' startup processes were stopped: they
/// take a promote request but cannot act on it, so the promotion outlasts promote_timeout (1 s).
/// Returns once pgvigil has asked one (the first node), with the other (the second).
async fn stalled_promotion() -> (StalledScene, NodeId, NodeId) {
    let mut scene = Scene::start(test_cluster(2), |config| {
        config.failover.promote_timeout = Duration::from_secs(1);
    })
    .await;
    let startups: Vec<u32> = STANDBYS
        .iter()
        .map(|&n| startup_process(&scene.cluster, n))
        .collect();
    for &pid in &startups {
        signal("-STOP", pid);
    }
    scene.kill(OLD_PRIMARY);
    let mut asked = None;
    eventually(PATIENCE, "pgvigil asks a standby to promote", || {
        asked = STANDBYS
            .into_iter()
            .find(|&n| promote_signal_file(&scene.cluster.node(n).data_dir));
        asked.is_some()
    });
    let asked = asked.unwrap();
    (
        StalledScene { scene, startups },
        asked,
        other_standby(asked),
    )
}

/// A scene from [`stalled_promotion`], with the standbys' stopped startup processes.
struct StalledScene {
    scene: Scene,
    startups: Vec<u32>,
}

impl StalledScene {
    /// Lets standby `node`'s startup process go on (it acts on a promote request at once).
    fn release(&self, node: NodeId) {
        let index = STANDBYS.iter().position(|&n| n == node).unwrap();
        signal("-CONT", self.startups[index]);
    }
}

impl std::ops::Deref for StalledScene {
    type Target = Scene;
    fn deref(&self) -> &Scene {
        &self.scene
    }
}

impl std::ops::DerefMut for StalledScene {
    fn deref_mut(&mut self) -> &mut Scene {
        &mut self.scene
    }
}

/// Why writes wait, if they do.
fn reason(scene: &Scene) -> Option<String> {
    match &scene.topology().primary {
        Primary::Unavailable(reason) => Some(reason.clone()),
        Primary::Known(_) => None,
    }
}

/// Until `WATCH` (and at least several failover attempts) after `since`, none of `standbys`
/// leaves recovery and writes stay refused.
fn watch_nothing_promoted(scene: &Scene, since: Instant, standbys: &[NodeId]) {
    let until = (since + WATCH).max(since + INTERVAL * FAILURES * 3);
    while Instant::now() < until {
        assert!(
            reason(scene).is_some(),
            "writes went somewhere: {:?}",
            scene.topology()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    for &standby in standbys {
        assert!(
            in_recovery(&scene.cluster, standby),
            "node {standby} was promoted"
        );
    }
}

/// The index of the node called `name`.
fn node_named(cluster: &LocalCluster, name: &str) -> NodeId {
    cluster
        .nodes()
        .iter()
        .position(|n| n.name == name)
        .unwrap_or_else(|| panic!("no node named {name:?}"))
}

/// pgvigil in front of a cluster with synchronous replication (`synchronous_standby_names =
/// '*'`), writing: the scene, the synchronous standby's name and node, and the other standby.
async fn synchronous_scene() -> (Scene, String, NodeId, NodeId) {
    let spec = ClusterSpec::new(fresh_base_dir())
        .replicas(2)
        .sync_replication(true);
    let scene = Scene::start(start(spec), |_| {}).await;
    let name = node_psql(
        &scene.cluster,
        OLD_PRIMARY,
        "SELECT application_name FROM pg_stat_replication WHERE sync_state = 'sync'",
    );
    let sync = node_named(&scene.cluster, &name);
    (scene, name, sync, other_standby(sync))
}

/// Whether `pg_promote` left its signal file in `data_dir` (the startup process removes it once
/// it acts on it).
pub(crate) fn promote_signal_file(data_dir: &Path) -> bool {
    data_dir.join("promote").exists()
}

/// The pid of node `node`'s startup process (the one that replays WAL and ends recovery).
pub(crate) fn startup_process(cluster: &LocalCluster, node: NodeId) -> u32 {
    let postmaster = cluster.node(node).pid().expect("the node runs");
    let entries = std::fs::read_dir("/proc").expect("/proc is readable");
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // The parent pid is the second field after the parenthesised command name.
            let parent = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok());
            let command =
                std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            parent == Some(postmaster) && command.contains("startup")
        })
        .unwrap_or_else(|| panic!("node {node} has no startup process"))
}

/// Sends `signal` (as `kill` spells it) to `pid`, a process of a cluster this test built.
pub(crate) fn signal(signal: &str, pid: u32) {
    let status = std::process::Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success(), "kill {signal} {pid} failed");
}
