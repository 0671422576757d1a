//! A client's wait on a node ends when the topology gives up on that node (issue 16): a write
//! that was opening a connection to a primary that froze goes to the new primary as soon as the
//! failover publishes it, not after `backend.connect_timeout`; a read that was setting up its
//! connection on a replica that froze moves to another replica once a probe finds it suspect;
//! a read after a write whose primary froze while pgvigil asked it for the session's write
//! position is answered by the new primary. The measured times are printed (`--nocapture`
//! shows them).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use pgvigil::config::{Balance, Config};
use pgvigil::topology::{NodeId, Primary};

use crate::support::relay::Relay;
use crate::support::writer::{create_ticks, Writer};
use crate::support::{start_proxy, test_cluster, value, TestProxy};

/// The primary the cluster is built with.
const OLD_PRIMARY: NodeId = 0;

/// The replica frozen in the read test, and the one that can take its reads.
const FROZEN_REPLICA: NodeId = 1;
const OTHER_REPLICA: NodeId = 2;

/// The bound: the first write after the freeze comes at most this long after the
/// failover made the new primary known.
const AFTER_FAILOVER: Duration = Duration::from_millis(500);

/// Bound on a read moving off a frozen replica: a probe round (interval + timeout) with room for
/// a loaded machine, far below the read test's `backend.connect_timeout` and the time its
/// probes take to call the replica down.
const READ_MOVES: Duration = Duration::from_secs(10);

/// `backend.connect_timeout` of the read test: a read that waited for it would fail the bound.
const LONG_CONNECT: Duration = Duration::from_secs(30);

/// `health.failures` of the read test: the frozen replica is called down only after about
/// 20 × (interval + timeout), so that only its suspicion can end the read's wait in time.
const MANY_FAILURES: u32 = 20;

/// Generous bound on anything that must happen "eventually" on a loaded two-core machine.
const PATIENCE: Duration = Duration::from_secs(30);

/// Acks that show the writer works: before the freeze, and after it to call writes resumed.
const WARM_UP: usize = 25;

/// The transcript: a writer opening a new connection for every insert (as `psql -c`), a
/// primary frozen with SIGSTOP, and pgvigil opening a new server connection for every session
/// (`pool.max_lifetime` so short that none is pooled). An insert whose session had started on a
/// standby was opening its server connection to the frozen primary, and waited out
/// `backend.connect_timeout` (5 s) although the failover had fenced that node seconds before;
/// now it gives up on the node once the topology does and goes to the new primary.
#[tokio::test(flavor = "multi_thread")]
async fn a_per_insert_writer_connecting_anew_to_a_frozen_primary_writes_right_after_the_failover() {
    writes_resume_with_the_failover(|config| config.pool.max_lifetime = Duration::from_millis(1))
        .await;
}

/// The same with pooled server connections: the session's first statement on an idle pooled
/// connection to the frozen primary (the client's `application_name`) used to wait with no
/// bound at all; now it too ends when the topology gives up on the node.
#[tokio::test(flavor = "multi_thread")]
async fn a_per_insert_writer_on_pooled_connections_to_a_frozen_primary_writes_right_after_the_failover(
) {
    writes_resume_with_the_failover(|_| {}).await;
}

/// Freezes the primary under a per-insert writer and checks that writes come back at most
/// [`AFTER_FAILOVER`] after pgvigil publishes the new primary. That moment comes before its
/// "failover complete" line (the other standby is repointed in between): a stricter bound.
async fn writes_resume_with_the_failover(adjust: impl FnOnce(&mut Config)) {
    let mut cluster = test_cluster(2);
    let proxy = start_proxy(&cluster, |config| {
        fast_health(config);
        adjust(config);
    })
    .await;
    create_ticks(&proxy, &cluster).await;
    let started = Instant::now();
    let writer = Writer::start_per_insert(&proxy, 1);
    writer.wait_for_acks_after(started, WARM_UP, PATIENCE);
    let promoted = new_primary_published(&proxy, OLD_PRIMARY);

    cluster.node_mut(OLD_PRIMARY).freeze();
    let freeze = Instant::now();
    let log = writer.wait_for_acks_after(freeze, WARM_UP, PATIENCE);
    let published = tokio::time::timeout(PATIENCE, promoted)
        .await
        .expect("a new primary is published")
        .expect("the watching task ends");
    cluster.node_mut(OLD_PRIMARY).thaw();

    let resumed = log.resumed(freeze).expect("writes resumed");
    let window = log.unavailability(freeze).expect("writes resumed");
    let lag = resumed.saturating_duration_since(published);
    println!(
        "SIGSTOP, per-insert writer: new primary published {:?} after the freeze, writes \
         resumed {:?} after it ({lag:?} after the failover), window {window:?}; errors: {:?}",
        published - freeze,
        resumed - freeze,
        log.errors_after(freeze)
    );
    assert!(
        lag <= AFTER_FAILOVER,
        "the first write after the freeze came {lag:?} after the new primary was published"
    );
}

/// A read whose replica freezes while the session brings its connection there up to date (the
/// session's setting is replayed first) moves to the other replica once a probe finds the frozen
/// one suspect, long before `backend.connect_timeout` or the replica being called down; the
/// setting follows it.
#[tokio::test(flavor = "multi_thread")]
async fn a_read_on_a_replica_that_freezes_while_its_connection_is_set_up_moves_to_another() {
    let cluster = test_cluster(2);
    let frozen = cluster.node(FROZEN_REPLICA).port;
    let other = cluster.node(OTHER_REPLICA).port;
    let relay = Relay::start(SocketAddr::from(([127, 0, 0, 1], frozen)));
    let proxy = start_proxy(&cluster, |config| {
        fast_health(config);
        config.health.failures = MANY_FAILURES;
        config.backend.connect_timeout = LONG_CONNECT;
        // Reads go to the frozen replica whenever it qualifies, else to the other one.
        config.routing.balance = Balance::RoundRobin;
        for (node, weight) in config.nodes.iter_mut().zip([0, 1000, 1]) {
            node.weight = weight;
        }
        // Only pgvigil goes through the relay; the replica streams from the primary directly.
        config.nodes[FROZEN_REPLICA].port = relay.port();
    })
    .await;
    let client = proxy.connect_app().await;
    let give_up = Instant::now() + PATIENCE;
    while server_port(&client).await != frozen {
        assert!(Instant::now() < give_up, "no read reached the replica");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Runs on the primary; the replica gets it replayed before the session's next read there.
    client
        .batch_execute("SET application_name = 'abandon_waits'")
        .await
        .unwrap();

    relay.cut();
    let cut = Instant::now();
    let read = async {
        let port = server_port(&client).await;
        (port, value(&client, "SHOW application_name").await)
    };
    let (port, setting) = tokio::time::timeout(PATIENCE, read)
        .await
        .expect("the read is answered");
    let took = cut.elapsed();
    println!("a read on a replica frozen under it was answered by port {port} after {took:?}");
    relay.heal();
    assert_eq!(port, other, "the read moved to the other replica");
    assert_eq!(setting.as_deref(), Some("abandon_waits"));
    assert!(took < READ_MOVES, "the read waited {took:?}");
}

/// A read after a write asks the primary for the session's write position first (read your
/// writes). When the primary freezes just then, that question used to wait for an answer with
/// no bound; now it is dropped once the topology calls the primary down, and the read waits for
/// the new primary like any unit that needs one.
#[tokio::test(flavor = "multi_thread")]
async fn a_read_after_a_write_whose_primary_freezes_is_answered_right_after_the_failover() {
    let mut cluster = test_cluster(2);
    let proxy = start_proxy(&cluster, fast_health).await;
    create_ticks(&proxy, &cluster).await;
    let client = proxy.connect_app().await;
    client
        .batch_execute("INSERT INTO ticks (id) VALUES (1)")
        .await
        .unwrap();
    let wrote = Instant::now();
    // Once a probe has started after the write, the next read asks for the write position.
    let shared = proxy.running.proxy.clone();
    let give_up = Instant::now() + PATIENCE;
    while shared
        .replication
        .load()
        .observed_at
        .is_none_or(|at| at <= wrote)
    {
        assert!(Instant::now() < give_up, "no probe after the write");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let promoted = new_primary_published(&proxy, OLD_PRIMARY);

    cluster.node_mut(OLD_PRIMARY).freeze();
    let freeze = Instant::now();
    let read = tokio::time::timeout(PATIENCE, value(&client, "SELECT count(*) FROM ticks")).await;
    let answered = Instant::now();
    cluster.node_mut(OLD_PRIMARY).thaw();
    read.expect("the read is answered");
    let published = tokio::time::timeout(PATIENCE, promoted)
        .await
        .expect("a new primary is published")
        .expect("the watching task ends");
    let lag = answered.saturating_duration_since(published);
    println!(
        "a read after a write, primary frozen: answered {:?} after the freeze, {lag:?} after \
         the new primary was published",
        answered - freeze
    );
    assert!(
        lag <= AFTER_FAILOVER,
        "the read was answered {lag:?} after the new primary was published"
    );
}

/// Probes every second, a node down after two failed probes of at most a second each (the
/// failover tests' settings).
fn fast_health(config: &mut Config) {
    config.health.interval = Duration::from_secs(1);
    config.health.failures = 2;
    config.health.timeout = Duration::from_secs(1);
}

/// A task that returns when pgvigil's topology names a primary other than `old`.
fn new_primary_published(proxy: &TestProxy, old: NodeId) -> tokio::task::JoinHandle<Instant> {
    let shared = proxy.running.proxy.clone();
    // Subscribed before the fault: the change cannot slip by.
    let mut changes = shared.topology.subscribe();
    tokio::spawn(async move {
        loop {
            if matches!(shared.topology.load().primary, Primary::Known(p) if p != old) {
                return Instant::now();
            }
            changes.changed().await.expect("pgvigil is running");
        }
    })
}

/// The port of the server that answered a read through `client`.
async fn server_port(client: &tokio_postgres::Client) -> u16 {
    let port = value(client, "SELECT inet_server_port()").await;
    port.and_then(|p| p.parse().ok()).expect("a port")
}
