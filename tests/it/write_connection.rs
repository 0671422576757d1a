//! What must answer from the connection that runs the session's writes (issue 9): an
//! extended-protocol unit with a Flush before its Sync is routed as a whole, and
//! `pg_backend_pid()` names the primary's backend.

use std::time::Duration;

use pgvigil::topology::{NodeId, Primary, Role};
use pgvigil_proto::encode;

use crate::lost_transaction::trust_app;
use crate::support::wire::{bind_execute, parse, Wire};
use crate::support::{eventually, start_proxy, test_cluster, value, LocalCluster, TestProxy};

const PRIMARY: NodeId = 0;
const REPLICA: NodeId = 1;

/// Bound on anything the proxy or the nodes must get to on a loaded machine.
const PATIENCE: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread")]
async fn a_unit_with_a_flush_before_its_sync_runs_wholly_on_the_primary() {
    let (cluster, proxy) = reads_on_the_replica().await;
    let mut wire = Wire::login(&proxy).await;
    let replica_port = cluster.node(REPLICA).port.to_string();
    let primary_port = cluster.node(PRIMARY).port.to_string();
    assert_eq!(
        wire.query("SELECT inet_server_port()").await.rows,
        [[replica_port.clone()]],
        "a read goes to the replica"
    );
    assert_eq!(wire.query("CREATE TABLE flushed (i int)").await.errors, []);

    // All in one go: the INSERT after the Flush belongs to the unit.
    let answer = wire
        .exchange(|out| {
            parse(out, "", "SELECT inet_server_port()");
            bind_execute(out, "");
            encode::message(out, b'H', |_| {});
            parse(out, "", "INSERT INTO flushed VALUES (1)");
            bind_execute(out, "");
            encode::sync(out);
        })
        .await;
    assert_eq!(answer.errors, [], "no write reached the replica");
    assert_eq!(answer.rows, [[primary_port.clone()]]);

    // The client waits for what it flushed before it sends the rest.
    assert_eq!(
        wire.query("SELECT inet_server_port()").await.rows,
        [[replica_port]],
        "reads still go to the replica"
    );
    wire.send(|out| {
        parse(out, "", "SELECT inet_server_port()");
        bind_execute(out, "");
        encode::message(out, b'H', |_| {});
    })
    .await;
    let mut rows = Vec::new();
    loop {
        match wire.recv().await {
            (b'D', _) => rows.push(()),
            (b'C', _) => break,
            (b'E', body) => panic!("{}", String::from_utf8_lossy(&body)),
            _ => {}
        }
    }
    let answer = wire
        .exchange(|out| {
            parse(out, "", "INSERT INTO flushed VALUES (2)");
            bind_execute(out, "");
            encode::sync(out);
        })
        .await;
    assert_eq!(rows.len(), 1);
    assert_eq!(answer.errors, [], "the rest of the unit ran on the primary");
    assert_eq!(
        wire.query("/* pgvigil:primary */ SELECT count(*) FROM flushed")
            .await
            .rows,
        [["2"]]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn pg_backend_pid_answers_from_the_primary() {
    let (cluster, proxy) = reads_on_the_replica().await;
    let client = proxy.connect_app().await;
    assert_eq!(
        value(&client, "SELECT inet_server_port()").await,
        Some(cluster.node(REPLICA).port.to_string())
    );
    let primary = cluster.node(PRIMARY).port.to_string();
    assert_eq!(
        value(
            &client,
            "SELECT inet_server_port() FROM (SELECT pg_backend_pid()) AS p"
        )
        .await,
        Some(primary)
    );
}

/// A primary and a replica behind pgvigil (app trusted), reads on the replica only (even right
/// after a write); returns
/// once the proxy sees both roles and the replica's position.
async fn reads_on_the_replica() -> (LocalCluster, TestProxy) {
    let cluster = test_cluster(1);
    let proxy = start_proxy(&cluster, |config| {
        trust_app(config);
        config.nodes[PRIMARY].weight = 0;
        // Reads after a write go to the replica at once: only the routing of units is measured.
        config.routing.read_your_writes = false;
        config.health.interval = Duration::from_millis(200);
    })
    .await;
    let shared = &proxy.running.proxy;
    eventually(PATIENCE, "primary and standby in the topology", || {
        let topology = shared.topology.load();
        topology.primary == Primary::Known(PRIMARY)
            && topology.nodes[REPLICA].role == Role::Standby
            && shared.replication.load().nodes.iter().all(Option::is_some)
    });
    (cluster, proxy)
}
