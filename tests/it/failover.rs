//! Failover as clients see it. A writer inserts through pgvigil every 20 ms while the primary is
//! killed, frozen or cut off from pgvigil alone: writes resume on a promoted standby within the
//! issue's bounds, no acknowledged write is lost with a synchronous standby, the other standby
//! follows the new primary, and the old primary never takes a write again. Every test builds its
//! own three-node cluster and prints the measured windows (`--nocapture` shows them).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgvigil::config::Config;
use pgvigil::topology::{NodeId, Primary, Role, Topology};
use tokio_postgres::NoTls;

use crate::support::relay::Relay;
use crate::support::writer::{create_ticks, describe, tick_ids, Writer};
use crate::support::{
    eventually, fresh_base_dir, in_recovery, node_psql, start, start_proxy, test_cluster,
    ClusterSpec, LocalCluster, TestProxy, APP_DB, APP_PASSWORD, APP_USER,
};

/// The primary the cluster is built with.
pub(crate) const OLD_PRIMARY: NodeId = 0;

/// The two standbys the cluster is built with.
pub(crate) const STANDBYS: [NodeId; 2] = [1, 2];

/// `health.interval`, `health.failures` and `health.timeout` of every test here.
pub(crate) const INTERVAL: Duration = Duration::from_secs(1);
pub(crate) const FAILURES: u32 = 2;
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// The bound on the write-unavailability window after a kill -9.
const KILL_WINDOW: Duration = Duration::from_secs(5);

/// The bound for a frozen primary: interval × failures + timeout + 2 s.
const FREEZE_WINDOW: Duration = Duration::from_secs(2 + 1 + 2);

/// Bound on a new client's connect plus one read while the primary is frozen: under
/// interval × failures, so that a start that waited for the failover would fail.
const CLIENT_START: Duration = Duration::from_secs(2);

/// Bound on the first write through a restarted pgvigil: one probe round at most.
const AT_ONCE: Duration = Duration::from_secs(2);

/// Generous bound on anything that must happen "eventually" on a loaded two-core machine.
pub(crate) const PATIENCE: Duration = Duration::from_secs(30);

/// Acks that show the writer works: before an event, and after it to call writes resumed.
const WARM_UP: usize = 25;

/// About a second of the writer's acks.
const A_SECOND_OF_WRITES: usize = 50;

#[tokio::test(flavor = "multi_thread")]
async fn after_kill9_of_the_primary_writes_resume_within_5s_and_the_third_node_follows() {
    let mut scene = Scene::start(test_cluster(2), |_| {}).await;
    let kill = scene.kill(OLD_PRIMARY);
    let window = scene.writes_resume(kill, "kill -9, asynchronous replication");
    assert!(
        window < KILL_WINDOW,
        "writes were unavailable for {window:?}"
    );

    let new = scene.sole_primary(&STANDBYS);
    let third = other_standby(new);
    assert!(
        in_recovery(&scene.cluster, third),
        "node {third} left recovery"
    );
    let log = scene.writer.log();
    let last = log.last_id().unwrap();
    eventually(
        PATIENCE,
        "the third node receives the rows written after the failover",
        || tick_ids(&scene.cluster, third).contains(&last),
    );
    let lost = log
        .acked_ids()
        .difference(&tick_ids(&scene.cluster, new))
        .count();
    println!("kill -9, asynchronous replication: {lost} acknowledged writes lost");

    let topology = scene.topology();
    assert_eq!(topology.primary, Primary::Known(new));
    assert_eq!(topology.nodes[OLD_PRIMARY].role, Role::Fenced);
    // A single instance stamps the node it promoted with its host name.
    eventually(PATIENCE, "the new primary says who promoted it", || {
        let stamp = node_psql(
            &scene.cluster,
            new,
            "SELECT coalesce(current_setting('pgvigil.promoted_by', true), '')",
        );
        stamp.contains(" alone at ")
    });
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idle_session_keeps_its_settings_and_prepared_statements_on_the_new_primary() {
    let mut scene = Scene::start(test_cluster(2), |_| {}).await;
    let idle = scene.proxy.connect_app().await;
    // One SET per statement: a multi-statement string that sets something pins the session to
    // its connection (it cannot be replayed statement by statement).
    for set in [
        "SET application_name = 'survivor'",
        "SET search_path = pg_catalog, public",
    ] {
        idle.batch_execute(set).await.unwrap();
    }
    let insert = idle
        .prepare("INSERT INTO ticks (id) VALUES ($1) RETURNING inet_server_port()")
        .await
        .unwrap();
    let kill = scene.kill(OLD_PRIMARY);
    scene.writes_resume(kill, "kill -9 under an idle session");
    let new = scene.sole_primary(&STANDBYS);

    // The same client, never reconnected: its statement runs on the new primary.
    let row = idle
        .query_one(&insert, &[&-7i32])
        .await
        .unwrap_or_else(|e| panic!("the idle session's next write failed: {}", describe(&e)));
    assert_eq!(
        row.get::<_, i32>(0),
        i32::from(scene.cluster.node(new).port)
    );
    assert!(tick_ids(&scene.cluster, new).contains(&-7));
    let row = idle
        .query_one(
            "SELECT current_setting('application_name'), current_setting('search_path')",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "survivor");
    assert_eq!(row.get::<_, String>(1), "pg_catalog, public");
}

#[tokio::test(flavor = "multi_thread")]
async fn with_a_synchronous_standby_every_acknowledged_write_is_on_the_new_primary() {
    let spec = ClusterSpec::new(fresh_base_dir())
        .replicas(2)
        .sync_replication(true);
    let mut scene = Scene::start(start(spec), |_| {}).await;
    let kill = scene.kill(OLD_PRIMARY);
    let window = scene.writes_resume(kill, "kill -9, synchronous replication");
    let new = scene.sole_primary(&STANDBYS);

    let log = scene.writer.stop().await;
    let lost = log.missing_on(&scene.cluster, new);
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged ids are not on the new primary: {lost:?}",
        lost.len(),
        log.acks.len()
    );
    assert!(
        window < KILL_WINDOW,
        "writes were unavailable for {window:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_old_primary_restarted_as_it_was_stays_fenced_and_gets_no_write() {
    let mut scene = Scene::start(test_cluster(2), |_| {}).await;
    let kill = scene.kill(OLD_PRIMARY);
    scene.writes_resume(kill, "kill -9 before the old primary restarts");

    scene.cluster.node_mut(OLD_PRIMARY).start().unwrap();
    assert!(
        !in_recovery(&scene.cluster, OLD_PRIMARY),
        "the old primary comes back claiming to be primary (the premise of this test)"
    );
    scene.assert_fenced_without_writes(OLD_PRIMARY);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_frozen_primary_is_replaced_within_the_bound_without_blocking_new_clients() {
    let mut scene = Scene::start(test_cluster(2), |_| {}).await;
    scene.cluster.node_mut(OLD_PRIMARY).freeze();
    let freeze = Instant::now();
    // Clients arriving at once and a second later, while pgvigil still counts failed probes.
    let starts = [Duration::ZERO, Duration::from_secs(1)].map(|delay| {
        let conninfo = scene.proxy.conninfo(APP_USER, APP_PASSWORD, APP_DB);
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            (delay, timed_client_start(&conninfo).await)
        })
    });
    let window = scene.writes_resume(freeze, "SIGSTOP");
    let mut client_starts = Vec::new();
    for start in starts {
        let (delay, outcome) = start.await.unwrap();
        println!("SIGSTOP: a client arriving {delay:?} after the freeze: {outcome:?}");
        client_starts.push(outcome);
    }

    scene.cluster.node_mut(OLD_PRIMARY).thaw();
    scene.assert_fenced_without_writes(OLD_PRIMARY);
    // The bounds are checked last, so that a slow failover still shows whether the fence holds.
    for outcome in client_starts {
        let took = outcome.unwrap_or_else(|e| panic!("a new client {e}"));
        assert!(took < CLIENT_START, "a new client waited {took:?}");
    }
    assert!(
        window < FREEZE_WINDOW,
        "writes were unavailable for {window:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn cutting_only_pgvigils_path_to_the_primary_while_standbys_stream_is_no_failover() {
    let cluster = test_cluster(2);
    let primary_addr = SocketAddr::from(([127, 0, 0, 1], cluster.node(OLD_PRIMARY).port));
    let relay = Relay::start(primary_addr);
    // Only pgvigil goes through the relay; the standbys keep streaming from the real port.
    let scene = Scene::start(cluster, |config| {
        config.nodes[OLD_PRIMARY].port = relay.port();
    })
    .await;

    relay.cut();
    let cut = Instant::now();
    let watch = INTERVAL * FAILURES * 3;
    let mut reasons = Vec::new();
    while cut.elapsed() < watch {
        match &scene.topology().primary {
            Primary::Known(id) => assert_eq!(*id, OLD_PRIMARY, "failed over during a cut"),
            Primary::Unavailable(reason) => {
                assert!(!reason.is_empty(), "no primary, and no reason given");
                reasons.push(reason.clone());
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    println!(
        "cut: over {watch:?}, {} topology samples had no primary, the first because {:?}",
        reasons.len(),
        reasons.first()
    );
    for standby in STANDBYS {
        assert!(
            in_recovery(&scene.cluster, standby),
            "node {standby} was promoted"
        );
    }

    relay.heal();
    scene
        .writer
        .wait_for_acks_after(Instant::now(), WARM_UP, PATIENCE);
    assert_eq!(scene.topology().primary, Primary::Known(OLD_PRIMARY));
    assert!(!in_recovery(&scene.cluster, OLD_PRIMARY));
}

#[tokio::test(flavor = "multi_thread")]
async fn two_failovers_in_a_row_leave_writes_working_on_the_last_node() {
    let mut scene = Scene::start(test_cluster(2), |_| {}).await;
    let first_kill = scene.kill(OLD_PRIMARY);
    let first = scene.writes_resume(first_kill, "first kill -9 of two");
    let second_primary = scene.sole_primary(&STANDBYS);
    let last = other_standby(second_primary);
    // Killing the second primary before the last node follows it would lose the later rows.
    let id = scene.writer.log().last_id().unwrap();
    eventually(PATIENCE, "the last node follows the second primary", || {
        tick_ids(&scene.cluster, last).contains(&id)
    });

    let second_kill = scene.kill(second_primary);
    let second = scene.writes_resume(second_kill, "second kill -9 of two");
    assert!(
        !in_recovery(&scene.cluster, last),
        "node {last} was not promoted"
    );
    assert_eq!(scene.topology().primary, Primary::Known(last));
    let id = scene.writer.log().last_id().unwrap();
    assert!(tick_ids(&scene.cluster, last).contains(&id));
    assert!(
        first < KILL_WINDOW,
        "first failover: {first:?} without writes"
    );
    assert!(
        second < KILL_WINDOW,
        "second failover: {second:?} without writes"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn pgvigil_restarted_after_a_failover_routes_writes_to_the_new_primary_at_once() {
    let mut scene = Scene::start(test_cluster(2), |_| {}).await;
    let kill = scene.kill(OLD_PRIMARY);
    scene.writes_resume(kill, "kill -9 before pgvigil restarts");
    let new = scene.sole_primary(&STANDBYS);
    let Scene {
        mut cluster,
        proxy,
        mut writer,
    } = scene;
    writer.stop().await;
    proxy.running.shutdown().await;
    // Two nodes claim to be primary now; only the state file can tell which one is stale.
    cluster.node_mut(OLD_PRIMARY).start().unwrap();

    let restart = Instant::now();
    let proxy = start_proxy(&cluster, fast_health).await;
    let marker = -1;
    proxy
        .connect_app()
        .await
        .simple_query(&format!("INSERT INTO ticks (id) VALUES ({marker})"))
        .await
        .unwrap();
    let took = restart.elapsed();
    println!("restart: the first write went through in {took:?}");
    assert!(took < AT_ONCE, "the first write took {took:?}");
    assert!(tick_ids(&cluster, new).contains(&marker));
    assert!(!tick_ids(&cluster, OLD_PRIMARY).contains(&marker));

    let scene = Scene::writing(cluster, proxy, 1_000_000);
    scene.assert_fenced_without_writes(OLD_PRIMARY);
}

#[tokio::test(flavor = "multi_thread")]
async fn with_automatic_failover_off_a_lost_primary_is_only_reported_and_reads_go_on() {
    let wait = Duration::from_secs(2);
    let scene = Scene::start(test_cluster(2), |config| {
        config.failover.auto = false;
        config.failover.wait_timeout = wait;
    })
    .await;
    let reader = scene.proxy.connect_app().await;
    let mut scene = scene;
    let kill = scene.kill(OLD_PRIMARY);
    eventually(
        PATIENCE,
        "the loss is reported as the reason writes wait",
        || {
            matches!(&scene.topology().primary,
            Primary::Unavailable(reason) if reason.contains("automatic failover is off"))
        },
    );
    // Reads go on from the replicas, on a session opened before the loss and on a new one.
    let fresh = scene.proxy.connect_app().await;
    for client in [&reader, &fresh] {
        for _ in 0..20 {
            let row = client
                .query_one("SELECT count(*) FROM ticks", &[])
                .await
                .unwrap_or_else(|e| panic!("a read failed without a primary: {}", describe(&e)));
            assert!(row.get::<_, i64>(0) > 0);
        }
    }
    let asked = Instant::now();
    let error = fresh
        .simple_query("INSERT INTO ticks (id) VALUES (-5)")
        .await
        .expect_err("a write succeeded without a primary");
    let waited = asked.elapsed();
    assert_eq!(
        error.code(),
        Some(&tokio_postgres::error::SqlState::CANNOT_CONNECT_NOW),
        "{}",
        describe(&error)
    );
    assert!(
        waited >= wait - Duration::from_millis(100),
        "refused after {waited:?}"
    );
    // The session is still usable, and nothing was promoted all along.
    fresh.simple_query("SELECT 1").await.unwrap();
    while kill.elapsed() < INTERVAL * FAILURES * 3 {
        std::thread::sleep(Duration::from_millis(100));
    }
    for standby in STANDBYS {
        assert!(
            in_recovery(&scene.cluster, standby),
            "node {standby} was promoted"
        );
    }
}

/// A cluster, pgvigil with fast health checks in front of it, and a writer going through it.
pub(crate) struct Scene {
    pub(crate) cluster: LocalCluster,
    pub(crate) proxy: TestProxy,
    pub(crate) writer: Writer,
}

impl Scene {
    /// Starts pgvigil on `cluster` (its config changed by `adjust`), creates the table and starts
    /// the writer.
    pub(crate) async fn start(cluster: LocalCluster, adjust: impl FnOnce(&mut Config)) -> Scene {
        let proxy = start_proxy(&cluster, |config| {
            fast_health(config);
            adjust(config);
        })
        .await;
        create_ticks(&proxy, &cluster).await;
        Scene::writing(cluster, proxy, 1)
    }

    /// Starts the writer with ids from `first_id` and waits until it writes.
    pub(crate) fn writing(cluster: LocalCluster, proxy: TestProxy, first_id: i32) -> Scene {
        let started = Instant::now();
        let writer = Writer::start(&proxy, first_id);
        writer.wait_for_acks_after(started, WARM_UP, PATIENCE);
        Scene {
            cluster,
            proxy,
            writer,
        }
    }

    /// Kills node `node` with SIGKILL; returns when it is dead.
    pub(crate) fn kill(&mut self, node: NodeId) -> Instant {
        self.cluster.node_mut(node).kill9();
        Instant::now()
    }

    /// Waits until writes flow again after `event`; prints and returns the write-unavailability
    /// window.
    pub(crate) fn writes_resume(&self, event: Instant, what: &str) -> Duration {
        let log = self.writer.wait_for_acks_after(event, WARM_UP, PATIENCE);
        let window = log.unavailability(event).unwrap();
        let errors = log.errors_after(event);
        println!(
            "{what}: writes unavailable for {window:?}; {} errors meanwhile, the first: {:?}",
            errors.len(),
            errors.first()
        );
        window
    }

    /// The only node of `candidates` out of recovery, asked directly.
    pub(crate) fn sole_primary(&self, candidates: &[NodeId]) -> NodeId {
        let primaries: Vec<NodeId> = candidates
            .iter()
            .copied()
            .filter(|&n| !in_recovery(&self.cluster, n))
            .collect();
        assert_eq!(primaries.len(), 1, "nodes out of recovery: {primaries:?}");
        primaries[0]
    }

    pub(crate) fn topology(&self) -> Arc<Topology> {
        self.proxy.running.proxy.topology.snapshot()
    }

    /// `node`, running again, ends up fenced and read-only, and its rows stay as they are while
    /// the writer goes on writing to the primary.
    fn assert_fenced_without_writes(&self, node: NodeId) {
        eventually(PATIENCE, "the old primary is fenced", || {
            self.topology().nodes[node].role == Role::Fenced
        });
        eventually(PATIENCE, "the old primary is made read-only", || {
            node_psql(&self.cluster, node, "SHOW default_transaction_read_only") == "on"
        });
        // Read only now: a frozen node commits what it had in hand once thawed.
        let before = tick_ids(&self.cluster, node);
        let log = self
            .writer
            .wait_for_acks_after(Instant::now(), A_SECOND_OF_WRITES, PATIENCE);
        assert_eq!(
            tick_ids(&self.cluster, node),
            before,
            "the fenced node got writes"
        );
        let topology = self.topology();
        assert_eq!(topology.nodes[node].role, Role::Fenced);
        let Primary::Known(primary) = topology.primary else {
            panic!("no primary: {:?}", topology.primary);
        };
        assert_ne!(primary, node);
        assert!(tick_ids(&self.cluster, primary).contains(&log.last_id().unwrap()));
    }
}

/// Probes every second, a node down after two failed probes of at most a second each.
pub(crate) fn fast_health(config: &mut Config) {
    config.health.interval = INTERVAL;
    config.health.failures = FAILURES;
    config.health.timeout = PROBE_TIMEOUT;
}

/// The standby that is not `node`.
pub(crate) fn other_standby(node: NodeId) -> NodeId {
    STANDBYS.into_iter().find(|&n| n != node).unwrap()
}

/// How long a new client takes to connect through pgvigil and run one read, or why it could not.
async fn timed_client_start(conninfo: &str) -> Result<Duration, String> {
    let started = Instant::now();
    let session = async {
        let (client, connection) = tokio_postgres::connect(conninfo, NoTls).await?;
        tokio::spawn(connection);
        client.simple_query("SELECT 1").await
    };
    match tokio::time::timeout(PATIENCE, session).await {
        Ok(Ok(_)) => Ok(started.elapsed()),
        Ok(Err(e)) => Err(format!(
            "failed after {:?}: {}",
            started.elapsed(),
            describe(&e)
        )),
        Err(_) => Err(format!("no answer in {PATIENCE:?}")),
    }
}
