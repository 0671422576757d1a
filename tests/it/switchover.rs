//! `pgvigil switchover` there and back under two writers (an insert every 20 ms on a kept
//! connection, and one connection per insert): no acknowledged write is lost, the longest write
//! gap and the write pause pgvigil measured are printed, the old primary rejoins as a standby
//! each time, and an idle session keeps its settings and prepared statement throughout; in
//! session and in transaction pooling.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use pgvigil::admin::api::Done;
use pgvigil::config::PoolMode;
use pgvigil::topology::{NodeId, Primary, Role};

use crate::admin::cli;
use crate::failback::{local_control, StopOnDrop};
use crate::failover::{Scene, PATIENCE};
use crate::support::writer::{tick_ids, WriteLog, Writer};
use crate::support::{eventually, in_recovery, test_cluster};

/// The longest time between two acknowledged writes from `since` on.
fn longest_gap(log: &WriteLog, since: Instant) -> Duration {
    let times: Vec<Instant> = log
        .acks
        .iter()
        .map(|a| a.at)
        .filter(|&at| at >= since)
        .collect();
    times
        .windows(2)
        .map(|w| w[1].saturating_duration_since(w[0]))
        .max()
        .unwrap_or_default()
}

/// Switches over to `to` (node index) through the CLI and checks it became the primary, the
/// other node of the pair a standby again; returns the write pause pgvigil reports.
pub(crate) async fn switch_to(scene: &Scene, to: NodeId, from: NodeId) -> u64 {
    let name = format!("pg{}", to + 1);
    // A node that just rejoined is a candidate once the probes have seen it as a standby.
    eventually(PATIENCE, "the target is seen as a standby", || {
        scene.topology().nodes[to].role == Role::Standby
    });
    let done: Done = cli(
        scene.proxy.running.admin_addr,
        None,
        &["switchover", "--to", &name, "--json"],
    )
    .await
    .exits(0)
    .json();
    println!("switchover to {name}: {}", done.message);
    assert!(done.message.contains("is a standby of"), "{done:?}");
    assert_eq!(scene.topology().primary, Primary::Known(to));
    assert!(!in_recovery(&scene.cluster, to));
    assert!(
        in_recovery(&scene.cluster, from),
        "the old primary did not rejoin"
    );
    done.write_pause_ms
        .expect("a switchover reports its write pause")
}

#[tokio::test(flavor = "multi_thread")]
async fn switchover_there_and_back_under_writers_loses_no_acknowledged_write() {
    there_and_back(PoolMode::Session).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn switchover_there_and_back_in_transaction_pooling_loses_nothing_and_keeps_the_idle_session()
{
    there_and_back(PoolMode::Transaction).await;
}

/// Switches over there and back under the writers, in pool mode `mode`, checking what the
/// module's doc says.
async fn there_and_back(mode: PoolMode) {
    let cluster = test_cluster(2);
    let data_dirs: Vec<PathBuf> = cluster.nodes().iter().map(|n| n.data_dir.clone()).collect();
    let bin_dir = cluster.bin_dir().to_path_buf();
    let scene = Scene::start(cluster, |config| {
        local_control(config, &data_dirs, &bin_dir);
        config.pool.mode = mode;
    })
    .await;
    let _stop: Vec<StopOnDrop> = data_dirs[..2]
        .iter()
        .map(|dir| StopOnDrop {
            bin_dir: bin_dir.clone(),
            data_dir: dir.clone(),
        })
        .collect();
    let per_insert = Writer::start_per_insert(&scene.proxy, 1_000_000);
    per_insert.wait_for_acks_after(Instant::now(), 10, PATIENCE);
    let idle = scene.proxy.connect_app().await;
    idle.batch_execute("SET application_name = 'survivor'")
        .await
        .unwrap();
    let insert = idle
        .prepare("INSERT INTO ticks (id) VALUES ($1) RETURNING inet_server_port()")
        .await
        .unwrap();
    let began = Instant::now();

    let there = switch_to(&scene, 1, 0).await;
    let row = idle.query_one(&insert, &[&-7i32]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), i32::from(scene.cluster.node(1).port));
    let back = switch_to(&scene, 0, 1).await;
    let row = idle.query_one(&insert, &[&-8i32]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), i32::from(scene.cluster.node(0).port));
    let name = idle.query_one("SHOW application_name", &[]).await.unwrap();
    assert_eq!(name.get::<_, String>(0), "survivor");

    let kept = scene
        .writer
        .wait_for_acks_after(Instant::now(), 10, PATIENCE);
    let fresh = per_insert.wait_for_acks_after(Instant::now(), 10, PATIENCE);
    for (what, log) in [
        ("kept connection", &kept),
        ("connection per insert", &fresh),
    ] {
        let acked = log.acked_ids();
        let lost: Vec<i32> = acked
            .difference(&tick_ids(&scene.cluster, 0))
            .copied()
            .collect();
        assert!(
            lost.is_empty(),
            "{what}: acknowledged writes lost: {lost:?}"
        );
        println!(
            "switchover there and back ({mode:?} pooling), {what}: {} acknowledged writes, none \
             lost, longest write gap {:?}, {} errors",
            acked.len(),
            longest_gap(log, began),
            log.errors_after(began).len()
        );
    }
    println!(
        "write pause measured by pgvigil ({mode:?} pooling): {there} ms there, {back} ms back"
    );
    eventually(PATIENCE, "the third node follows pg1 again", || {
        tick_ids(&scene.cluster, 2).contains(&-8)
    });
}

#[tokio::test(flavor = "multi_thread")]
async fn a_transaction_open_past_the_drain_timeout_is_ended_and_the_switchover_goes_on() {
    let cluster = test_cluster(1);
    let data_dirs: Vec<PathBuf> = cluster.nodes().iter().map(|n| n.data_dir.clone()).collect();
    let bin_dir = cluster.bin_dir().to_path_buf();
    let scene = Scene::start(cluster, |config| {
        local_control(config, &data_dirs, &bin_dir);
    })
    .await;
    let _stop = StopOnDrop {
        bin_dir: bin_dir.clone(),
        data_dir: data_dirs[0].clone(),
    };
    let open = scene.proxy.connect_app().await;
    open.batch_execute("BEGIN; INSERT INTO ticks (id) VALUES (-9)")
        .await
        .unwrap();
    let asked = Instant::now();
    let done: Done = cli(
        scene.proxy.running.admin_addr,
        None,
        &["switchover", "--drain-timeout", "1s", "--json"],
    )
    .await
    .exits(0)
    .json();
    let took = asked.elapsed();
    println!(
        "switchover with a transaction left open: {} ({took:?})",
        done.message
    );
    assert!(
        took >= Duration::from_secs(1),
        "the drain did not wait: {took:?}"
    );
    assert_eq!(scene.topology().primary, Primary::Known(1));
    let error = open
        .batch_execute("COMMIT")
        .await
        .expect_err("the open transaction survived the switchover");
    println!("the open transaction got: {error}");
    assert!(!tick_ids(&scene.cluster, 1).contains(&-9));
    let status: pgvigil::admin::api::Status =
        cli(scene.proxy.running.admin_addr, None, &["status", "--json"])
            .await
            .exits(0)
            .json();
    assert!(
        status
            .events
            .iter()
            .any(|e| e.message.contains("transactions still running")),
        "{:?}",
        status.events
    );
    scene
        .writer
        .wait_for_acks_after(Instant::now(), 10, PATIENCE);
}
