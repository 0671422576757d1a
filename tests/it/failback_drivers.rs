//! `pgvigil failback` through the `agent` and `command` node controls, end to end: after a
//! kill -9 of the primary and a failover, pg1 comes back as a standby of the new primary,
//! streams from it, serves reads, and has the writes made after it came back; the agent is the
//! real `pgvigil agent` process beside pg1's data directory, the commands are shell templates
//! around pg_ctl, pg_rewind and pg_basebackup. With pg1's WAL gone, failback is refused naming
//! `--reclone`, which brings it back through either. A switchover through the agent stops pg1
//! cleanly and brings it back as a standby.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use pgvigil::admin::api::{Done, Status};
use pgvigil::config::{ControlDriver, NodeControlConfig};
use pgvigil::local_cluster::LocalCluster;

use crate::failback::{back_as_standby, failback, failed_over_with, remove_wal, StopOnDrop};
use crate::failover::{Scene, OLD_PRIMARY};
use crate::support::agent::AgentProcess;
use crate::support::test_cluster;
use crate::switchover::switch_to;

/// The agent's token.
const TOKEN: &str = "failback-agent-token";

/// Longest one node control action may take here (a loaded two-core machine).
const ACTION: Duration = Duration::from_secs(60);

/// Runs the failback, prints how long it took, and checks pg1 is back as a standby with reads
/// and later writes; returns pgvigil's status afterwards.
async fn fails_back(scene: &Scene, new: usize, driver: &str) -> Status {
    let started = Instant::now();
    let done: Done = failback(scene, &[]).await.exits(0).json();
    println!(
        "failback through the {driver} driver took {:?} as the CLI saw it: {}",
        started.elapsed(),
        done.message
    );
    assert!(done.message.contains("failed back"), "{done:?}");
    back_as_standby(scene, new).await;
    crate::admin::cli(scene.proxy.running.admin_addr, None, &["status", "--json"])
        .await
        .exits(0)
        .json()
}

/// A real `pgvigil agent` beside pg1's data directory in `cluster`, ready.
async fn agent_beside_pg1(cluster: &LocalCluster) -> AgentProcess {
    let node = cluster.node(OLD_PRIMARY);
    let agent = AgentProcess::spawn(
        &[
            "--data-dir",
            &node.data_dir.to_string_lossy(),
            "--bin-dir",
            &cluster.bin_dir().to_string_lossy(),
            "--timeout",
            "50s",
        ],
        Some(TOKEN),
        &[],
        &cluster.base_dir().join("pg1-agent.log"),
    );
    agent
        .wait_status(Some(TOKEN), |s| s["state"] == "running")
        .await;
    agent
}

/// pg1's node control: `agent`.
fn agent_control(agent: &AgentProcess) -> NodeControlConfig {
    NodeControlConfig {
        driver: ControlDriver::Agent,
        url: Some(agent.url.clone()),
        token_file: agent.token_file.clone(),
        timeout: ACTION,
        ..NodeControlConfig::default()
    }
}

/// A scene whose pg1 has a real `pgvigil agent` as its node control, was killed and replaced;
/// returns it with the agent and the new primary.
async fn failed_over_with_an_agent() -> (AgentProcess, Scene, usize, StopOnDrop) {
    let cluster = test_cluster(2);
    let agent = agent_beside_pg1(&cluster).await;
    let control = agent_control(&agent);
    let (scene, new, stop) = failed_over_with(cluster, |config, _, _| {
        config.nodes[OLD_PRIMARY].control = Some(control);
    })
    .await;
    (agent, scene, new, stop)
}

#[tokio::test(flavor = "multi_thread")]
async fn switchover_through_the_agent_stops_pg1_cleanly_and_brings_it_back_as_a_standby() {
    let cluster = test_cluster(2);
    let agent = agent_beside_pg1(&cluster).await;
    let control = agent_control(&agent);
    let _stop = StopOnDrop {
        bin_dir: cluster.bin_dir().to_path_buf(),
        data_dir: cluster.node(OLD_PRIMARY).data_dir.clone(),
    };
    let scene = Scene::start(cluster, |config| {
        config.nodes[OLD_PRIMARY].control = Some(control);
    })
    .await;
    let pause = switch_to(&scene, 1, OLD_PRIMARY).await;
    println!("switchover through the agent: writes paused {pause} ms");
    back_as_standby(&scene, 1).await;
    let log = agent.log_text();
    for action in ["stop", "rewind", "make-standby", "start"] {
        assert!(
            log.contains(&format!("action=\"{action}\"")),
            "no {action}: {log}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn failback_through_a_pgvigil_agent_brings_pg1_back_as_a_streaming_standby_with_reads() {
    let (agent, scene, new, _stop) = failed_over_with_an_agent().await;
    let status = fails_back(&scene, new, "agent").await;
    for event in status.events.iter().rev().take(8).rev() {
        println!(
            "  {} {}: {}",
            event.at_ms,
            event.node.as_deref().unwrap_or("-"),
            event.message
        );
    }
    let rewound = status
        .events
        .iter()
        .find(|e| e.message.starts_with("rewound"))
        .unwrap_or_else(|| panic!("no rewound event: {:?}", status.events));
    assert!(rewound.message.contains("pg_rewind"), "{rewound:?}");
    assert!(
        agent.log_text().contains("action=\"rewind\""),
        "{}",
        agent.log_text()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn through_the_agent_a_node_whose_wal_is_gone_is_refused_naming_reclone_which_brings_it_back()
{
    let (agent, scene, new, _stop) = failed_over_with_an_agent().await;
    remove_wal(&scene);
    let refusal = failback(&scene, &[]).await.refusal();
    println!("without its WAL, through the agent: {refusal:?}");
    assert!(refusal.refused.contains("pg_rewind"), "{refusal:?}");
    assert!(refusal.refused.contains("HTTP 500"), "{refusal:?}");
    assert!(refusal.next.contains("--reclone"), "{refusal:?}");
    let started = Instant::now();
    let done: Done = failback(&scene, &["--reclone"]).await.exits(0).json();
    println!(
        "failback --reclone through the agent took {:?}: {}",
        started.elapsed(),
        done.message
    );
    back_as_standby(&scene, new).await;
    assert!(
        agent.log_text().contains("action=\"reclone\""),
        "{}",
        agent.log_text()
    );
}

/// The command driver's templates for a node on this host: pg_ctl and pg_rewind, run as the
/// data directory's owner when the tests run as root (PostgreSQL refuses root).
fn command_control(data_dir: &Path, bin_dir: &Path) -> NodeControlConfig {
    let meta = std::fs::metadata(data_dir).expect("the data directory");
    // SAFETY: geteuid has no preconditions and cannot fail.
    let as_owner = if unsafe { libc::geteuid() } == 0 {
        format!(
            "setpriv --reuid={} --regid={} --clear-groups ",
            meta.uid(),
            meta.gid()
        )
    } else {
        String::new()
    };
    let bin = bin_dir.display();
    let run = |rest: &str| Some(format!("cd / && {as_owner}{bin}/{rest}"));
    NodeControlConfig {
        driver: ControlDriver::Command,
        data_dir: data_dir.to_path_buf(),
        timeout: ACTION,
        status: run("pg_ctl status -D {data_dir}"),
        stop: run("pg_ctl stop -D {data_dir} -m fast -w"),
        start: run("pg_ctl start -D {data_dir} -w -l {data_dir}/command-start.log"),
        rewind: run("pg_rewind -D {data_dir} --source-server={source_conninfo}"),
        reclone: Some(format!(
            "cd / && mv {{data_dir}} {{data_dir}}.old && {as_owner}{bin}/pg_basebackup \
             -D {{data_dir}} -d {{source_conninfo}} -X stream -c fast"
        )),
        make_standby: Some(format!(
            "printf '%s\\n' \"$PGVIGIL_STANDBY_SETTINGS\" | {as_owner}tee -a \
             {{data_dir}}/postgresql.auto.conf >/dev/null && {as_owner}touch {{data_dir}}/standby.signal"
        )),
        ..NodeControlConfig::default()
    }
}

/// A scene whose pg1 has the command templates as its node control, was killed and replaced;
/// returns it with the new primary.
async fn failed_over_with_commands() -> (Scene, usize, StopOnDrop) {
    let cluster = test_cluster(2);
    failed_over_with(cluster, |config, data_dirs, bin_dir| {
        let control = command_control(&data_dirs[OLD_PRIMARY], bin_dir);
        config.nodes[OLD_PRIMARY].control = Some(control);
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn through_command_templates_a_node_whose_wal_is_gone_is_brought_back_by_reclone() {
    let (scene, new, _stop) = failed_over_with_commands().await;
    remove_wal(&scene);
    let refusal = failback(&scene, &[]).await.refusal();
    assert!(
        refusal.refused.contains("the rewind command"),
        "{refusal:?}"
    );
    assert!(refusal.next.contains("--reclone"), "{refusal:?}");
    let started = Instant::now();
    let done: Done = failback(&scene, &["--reclone"]).await.exits(0).json();
    println!(
        "failback --reclone through the command template took {:?}: {}",
        started.elapsed(),
        done.message
    );
    back_as_standby(&scene, new).await;
    let old = scene
        .cluster
        .node(OLD_PRIMARY)
        .data_dir
        .with_extension("old");
    assert!(
        old.join("PG_VERSION").exists(),
        "the template kept the old data directory"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn failback_through_shell_command_templates_brings_pg1_back_as_a_streaming_standby() {
    let (scene, new, _stop) = failed_over_with_commands().await;
    let status = fails_back(&scene, new, "command").await;
    for step in ["rewound", "started"] {
        let event = status.events.iter().find(|e| e.message.starts_with(step));
        println!("event: {event:?}");
        assert!(event.is_some(), "no {step} event: {:?}", status.events);
    }
}
