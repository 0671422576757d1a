//! `pgvigil failback` with the local node control: after a kill -9 of the primary and a
//! failover, the old primary comes back as a standby of the new one (pg_rewind), streams from it,
//! serves reads, and has the writes made after it came back; with its WAL gone, failback is
//! refused naming `--reclone`, which then brings it back from a fresh copy.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use pgvigil::admin::api::{Done, Status};
use pgvigil::config::{Config, NodeControlConfig, TOKEN_ENV};
use pgvigil::local_cluster::LocalCluster;
use pgvigil::topology::{NodeId, Role};

use crate::admin::{read_ports, Run};
use crate::cli::pgvigil;
use crate::failover::{Scene, OLD_PRIMARY, PATIENCE, STANDBYS};
use crate::support::writer::tick_ids;
use crate::support::{eventually, in_recovery, node_psql, test_cluster};

/// Bound on one failback on a loaded machine (the target is 5 s; the figure is printed).
pub(crate) const FAILBACK: Duration = Duration::from_secs(120);

/// Gives every node of the test cluster the local node control.
pub(crate) fn local_control(config: &mut Config, data_dirs: &[PathBuf], bin_dir: &Path) {
    for (node, data_dir) in config.nodes.iter_mut().zip(data_dirs) {
        node.control = Some(NodeControlConfig {
            data_dir: data_dir.clone(),
            bin_dir: Some(bin_dir.to_path_buf()),
            timeout: Duration::from_secs(60),
            ..NodeControlConfig::default()
        });
    }
}

/// Stops, when dropped, the server pgvigil started on `data_dir` (the test cluster does not
/// know about it: its own process for that node was killed).
pub(crate) struct StopOnDrop {
    pub(crate) bin_dir: PathBuf,
    pub(crate) data_dir: PathBuf,
}

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        let mut command = std::process::Command::new(self.bin_dir.join("pg_ctl"));
        command
            .args(["stop", "-m", "immediate", "-w", "-D"])
            .arg(&self.data_dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        if let Ok(meta) = std::fs::metadata(&self.data_dir) {
            // SAFETY: geteuid has no preconditions and cannot fail.
            if unsafe { libc::geteuid() } == 0 && meta.uid() != 0 {
                std::os::unix::process::CommandExt::uid(&mut command, meta.uid());
                std::os::unix::process::CommandExt::gid(&mut command, meta.gid());
            }
        }
        let _ = command.status();
    }
}

/// A scene with the local node control on every node, whose primary was killed and replaced;
/// returns it with the new primary.
async fn failed_over() -> (Scene, NodeId, StopOnDrop) {
    let cluster = test_cluster(2);
    failed_over_with(cluster, local_control).await
}

/// A scene on `cluster` with node control set by `control` (given the nodes' data directories
/// and the binaries' directory), whose primary was killed and replaced; returns it with the
/// new primary.
pub(crate) async fn failed_over_with(
    cluster: LocalCluster,
    control: impl FnOnce(&mut Config, &[PathBuf], &Path),
) -> (Scene, NodeId, StopOnDrop) {
    let data_dirs: Vec<PathBuf> = cluster.nodes().iter().map(|n| n.data_dir.clone()).collect();
    let bin_dir = cluster.bin_dir().to_path_buf();
    let mut scene = Scene::start(cluster, |config| {
        control(config, &data_dirs, &bin_dir);
    })
    .await;
    let kill = scene.kill(OLD_PRIMARY);
    scene.writes_resume(kill, "kill -9 before failback");
    let new = scene.sole_primary(&STANDBYS);
    eventually(PATIENCE, "the old primary is fenced", || {
        scene.topology().nodes[OLD_PRIMARY].role == Role::Fenced
    });
    let guard = StopOnDrop {
        bin_dir,
        data_dir: data_dirs[OLD_PRIMARY].clone(),
    };
    (scene, new, guard)
}

/// Runs `pgvigil failback pg1 [extra] --json` against the scene's admin API.
pub(crate) async fn failback(scene: &Scene, extra: &[&str]) -> Run {
    let url = format!("http://{}", scene.proxy.running.admin_addr);
    let mut args = vec!["failback", "pg1", "--json", "--admin", &url];
    args.extend(extra);
    let mut command = pgvigil(&args);
    command.env_remove(TOKEN_ENV);
    let output = tokio::time::timeout(FAILBACK, command.output())
        .await
        .expect("failback answered in time")
        .expect("the CLI runs");
    Run {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// pg1 is a standby streaming from `new`, takes reads through pgvigil, and has a write the
/// writer made after the failback.
pub(crate) async fn back_as_standby(scene: &Scene, new: NodeId) {
    assert!(
        in_recovery(&scene.cluster, OLD_PRIMARY),
        "pg1 is not a standby"
    );
    let sender = node_psql(
        &scene.cluster,
        OLD_PRIMARY,
        "SELECT status || ' ' || sender_port FROM pg_stat_wal_receiver",
    );
    assert_eq!(
        sender,
        format!("streaming {}", scene.cluster.node(new).port)
    );
    let port = scene.cluster.node(OLD_PRIMARY).port;
    crate::routing::until("reads reach pg1 again", || async {
        read_ports(&scene.proxy, 10).await.contains(&port)
    })
    .await;
    let after = scene
        .writer
        .wait_for_acks_after(Instant::now(), 5, PATIENCE)
        .last_id()
        .expect("the writer goes on");
    eventually(
        PATIENCE,
        "a write made after the failback reaches pg1",
        || tick_ids(&scene.cluster, OLD_PRIMARY).contains(&after),
    );
    assert_eq!(scene.topology().nodes[OLD_PRIMARY].role, Role::Standby);
}

#[tokio::test(flavor = "multi_thread")]
async fn after_a_kill9_and_a_failover_failback_brings_pg1_back_as_a_streaming_standby_with_reads() {
    let (scene, new, _stop) = failed_over().await;
    let started = Instant::now();
    let done: Done = failback(&scene, &[]).await.exits(0).json();
    println!(
        "failback (pg_rewind) took {:?} as the CLI saw it: {}",
        started.elapsed(),
        done.message
    );
    assert!(done.message.contains("failed back"), "{done:?}");
    back_as_standby(&scene, new).await;
    let status: Status =
        crate::admin::cli(scene.proxy.running.admin_addr, None, &["status", "--json"])
            .await
            .exits(0)
            .json();
    assert_eq!(status.nodes[OLD_PRIMARY].fenced, None);
    assert!(status
        .events
        .iter()
        .any(|e| e.message.starts_with("rewound")));
    let table = crate::admin::cli(scene.proxy.running.admin_addr, None, &["status"]).await;
    println!("{}", table.exits(0).stdout);
}

/// Removes the WAL files of the old primary, so that pg_rewind cannot work.
pub(crate) fn remove_wal(scene: &Scene) {
    let wal = scene.cluster.node(OLD_PRIMARY).data_dir.join("pg_wal");
    for entry in std::fs::read_dir(&wal).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            std::fs::remove_file(path).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn with_its_wal_gone_failback_is_refused_naming_reclone_which_then_brings_pg1_back() {
    let (scene, new, _stop) = failed_over().await;
    remove_wal(&scene);
    let refusal = failback(&scene, &[]).await.refusal();
    println!("without its WAL: {refusal:?}");
    assert!(refusal.refused.contains("pg_rewind"), "{refusal:?}");
    assert!(refusal.next.contains("--reclone"), "{refusal:?}");
    assert_eq!(scene.topology().nodes[OLD_PRIMARY].role, Role::Fenced);

    let started = Instant::now();
    let done: Done = failback(&scene, &["--reclone"]).await.exits(0).json();
    println!(
        "failback (--reclone) took {:?} as the CLI saw it: {}",
        started.elapsed(),
        done.message
    );
    back_as_standby(&scene, new).await;
}
