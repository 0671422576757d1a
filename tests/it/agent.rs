//! `pgvigil agent`, the real binary, as pgvigil and an operator meet it: its API wants the token
//! (401 and nothing happens without it), refuses what the server's state does not allow (409),
//! refuses to start on a non-loopback address without a token; and `--init` builds a primary in
//! an empty data directory (the agent running as the server's user, as in a container) and a
//! standby of it (the agent as root), which streams.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper::Method;
use serde_json::Value;

use crate::failback::StopOnDrop;
use crate::support::agent::AgentProcess;
use crate::support::{eventually, fresh_base_dir, node_psql, test_cluster};

/// The token the agents here are given.
const TOKEN: &str = "agent-test-token";

/// The superuser password of the clusters `--init` builds here.
const PASSWORD: &str = "init-secret";

/// How long a server may take to show a change.
const PATIENCE: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread")]
async fn the_agent_api_wants_its_token_and_refuses_what_the_servers_state_does_not_allow() {
    let cluster = test_cluster(0);
    let node = cluster.node(0);
    let _stop = StopOnDrop {
        bin_dir: cluster.bin_dir().to_path_buf(),
        data_dir: node.data_dir.clone(),
    };
    let data_dir = node.data_dir.to_string_lossy().into_owned();
    let bin_dir = cluster.bin_dir().to_string_lossy().into_owned();
    let log = cluster.base_dir().join("agent.log");
    let agent = AgentProcess::spawn(
        &[
            "--data-dir",
            &data_dir,
            "--bin-dir",
            &bin_dir,
            "--timeout",
            "60s",
        ],
        Some(TOKEN),
        &[],
        &log,
    );
    agent
        .wait_status(Some(TOKEN), |s| s["state"] == "running")
        .await;

    for token in [None, Some("wrong-token")] {
        for (method, path) in [(Method::GET, "/status"), (Method::POST, "/stop")] {
            let (code, body) = agent.call(method, path, token, None).await.unwrap();
            println!("{path} with token {token:?}: {code} {body}");
            assert_eq!(code, 401, "{body}");
            assert!(body.contains("token"), "{body}");
        }
    }
    assert_eq!(
        node_psql(&cluster, 0, "SELECT 1"),
        "1",
        "the server was stopped"
    );

    let (code, body) = agent
        .call(Method::GET, "/status", Some(TOKEN), None)
        .await
        .unwrap();
    let status: Value = serde_json::from_str(&body).unwrap();
    println!("status: {body}");
    assert_eq!(code, 200);
    assert_eq!(status["initialised"], true);
    assert_eq!(status["in_recovery"], false);

    let source = r#"{"source":{"host":"127.0.0.1","port":1,"user":"postgres","password":null}}"#;
    let (code, body) = agent
        .call(Method::POST, "/rewind", Some(TOKEN), Some(source))
        .await
        .unwrap();
    println!("rewind while running: {code} {body}");
    assert_eq!(code, 409, "{body}");
    assert!(body.contains("stop"), "{body}");
    let (code, body) = agent
        .call(Method::POST, "/rewind", Some(TOKEN), Some("{\"source\":"))
        .await
        .unwrap();
    assert_eq!(code, 400, "{body}");
    assert_eq!(
        node_psql(&cluster, 0, "SELECT 1"),
        "1",
        "the server was touched"
    );

    let (code, body) = agent
        .call(Method::POST, "/stop", Some(TOKEN), None)
        .await
        .unwrap();
    println!("stop: {code} {body}");
    assert_eq!(code, 200, "{body}");
    assert!(
        cluster.psql(0, "SELECT 1").is_err(),
        "the server still answers"
    );
    let (code, body) = agent
        .call(Method::POST, "/stop", Some(TOKEN), None)
        .await
        .unwrap();
    assert_eq!(code, 409, "stop while stopped: {body}");
    let (code, body) = agent
        .call(Method::POST, "/start", Some(TOKEN), None)
        .await
        .unwrap();
    println!("start: {code} {body}");
    assert_eq!(code, 200, "{body}");
    assert_eq!(node_psql(&cluster, 0, "SELECT 1"), "1");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_on_a_non_loopback_address_without_a_token_refuses_to_start() {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_pgvigil"))
        .args([
            "agent",
            "--listen",
            "0.0.0.0:0",
            "--data-dir",
            "/nonexistent/pgdata",
        ])
        .env_remove("PGVIGIL_AGENT_TOKEN")
        .env_remove("PGVIGIL_AGENT_TOKEN_FILE")
        .env("NO_COLOR", "1")
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(30), output)
        .await
        .expect("the agent exits at once")
        .expect("the agent runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stderr}");
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("without a token"), "{stderr}");
}

/// A directory removed with everything in it when dropped.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A fresh directory the PostgreSQL OS user owns (the agent runs the tools as the owner of the
/// data directory's parent while the data directory does not exist), removed when dropped.
fn base_dir_for_postgres() -> Scratch {
    let base = fresh_base_dir();
    std::fs::create_dir_all(&base).unwrap();
    if let Some((uid, gid)) = server_user() {
        std::os::unix::fs::chown(&base, Some(uid), Some(gid)).unwrap();
    }
    Scratch(base)
}

/// uid and gid of the user the servers run as when the tests run as root (PostgreSQL refuses
/// root); `None` when they do not (everything runs as the tests' user).
fn server_user() -> Option<(u32, u32)> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    (unsafe { libc::geteuid() } == 0).then(test_owner)
}

/// uid and gid of the user the test clusters run as under root: the distribution's postgres,
/// else the one they create.
fn test_owner() -> (u32, u32) {
    for name in ["postgres", "pgvigil"] {
        let out = std::process::Command::new("getent")
            .args(["passwd", name])
            .output()
            .unwrap();
        let line = String::from_utf8_lossy(&out.stdout).into_owned();
        let fields: Vec<&str> = line.trim().split(':').collect();
        if let (Some(uid), Some(gid)) = (fields.get(2), fields.get(3)) {
            return (uid.parse().unwrap(), gid.parse().unwrap());
        }
    }
    panic!("no postgres or pgvigil user on this host");
}

/// `sql` through psql over TCP as the superuser `--init` made.
fn psql(bin_dir: &Path, port: u16, sql: &str) -> Result<String, String> {
    let out = std::process::Command::new(bin_dir.join("psql"))
        .args([
            "-X",
            "-A",
            "-t",
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
            "-d",
            "postgres",
        ])
        .args(["-p", &port.to_string(), "-c", sql])
        .env("PGPASSWORD", PASSWORD)
        .env("PGCONNECT_TIMEOUT", "5")
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn agent_init_primary_then_init_standby_gives_a_streaming_standby_and_sigterm_stops_both() {
    // Dropped last: after the agents and servers have stopped.
    let scratch = base_dir_for_postgres();
    let base = scratch.0.clone();
    let bin_dir = pgvigil::local_cluster::postgres_bin_dir().expect("PostgreSQL binaries");
    let bin = bin_dir.to_string_lossy().into_owned();
    let (primary_dir, standby_dir) = (base.join("primary"), base.join("standby"));
    let _stops = [&primary_dir, &standby_dir].map(|dir| StopOnDrop {
        bin_dir: bin_dir.clone(),
        data_dir: dir.clone(),
    });
    let init_sql = base.join("init.sql");
    std::fs::write(
        &init_sql,
        "CREATE ROLE app LOGIN PASSWORD 'app-secret';\nCREATE DATABASE app OWNER app;\n",
    )
    .unwrap();
    let password_file = base.join("password");
    std::fs::write(&password_file, PASSWORD).unwrap();
    let primary_port = pgvigil::local_cluster::free_port().unwrap();
    let standby_port = pgvigil::local_cluster::free_port().unwrap();
    let (p_port, s_port) = (primary_port.to_string(), standby_port.to_string());
    let source = format!("127.0.0.1:{primary_port}");

    // The standby first: it waits for its source, as in a compose file starting both at once.
    let mut standby = AgentProcess::spawn(
        &[
            "--init",
            "standby",
            "--name",
            "Pg-2",
            "--source",
            &source,
            "--data-dir",
            &standby_dir.to_string_lossy(),
            "--pg-port",
            &s_port,
            "--bin-dir",
            &bin,
            "--timeout",
            "100s",
        ],
        Some(TOKEN),
        &[("PGVIGIL_SUPERUSER_PASSWORD", PASSWORD)],
        &base.join("standby-agent.log"),
    );
    // The primary's agent runs as the server's user, as in a container; the standby's as
    // root, as on a host where it switches to the data directory's owner.
    let mut primary = AgentProcess::spawn_as(
        server_user(),
        &[
            "--init",
            "primary",
            "--data-dir",
            &primary_dir.to_string_lossy(),
            "--pg-port",
            &p_port,
            "--bin-dir",
            &bin,
            "--init-sql",
            &init_sql.to_string_lossy(),
            "--superuser-password-file",
            &password_file.to_string_lossy(),
        ],
        Some(TOKEN),
        &[],
        &base.join("primary-agent.log"),
    );
    primary
        .wait_status(Some(TOKEN), |s| s["in_recovery"] == false)
        .await;
    standby
        .wait_status(Some(TOKEN), |s| s["in_recovery"] == true)
        .await;
    println!("standby agent:\n{}", standby.log_text());

    eventually(PATIENCE, "the standby streams from the primary", || {
        psql(
            &bin_dir,
            standby_port,
            "SELECT status || ' ' || sender_port FROM pg_stat_wal_receiver",
        )
        .is_ok_and(|s| s == format!("streaming {primary_port}"))
    });
    // Named as pgvigil knows the node, through a slot named after it.
    assert_eq!(
        psql(
            &bin_dir,
            primary_port,
            "SELECT application_name || ' ' || slot_name || ' ' || active FROM \
             pg_stat_replication JOIN pg_replication_slots ON active_pid = pid"
        ),
        Ok("Pg-2 pg_2 true".into())
    );
    psql(&bin_dir, primary_port, "CREATE TABLE t AS SELECT 42 AS x").unwrap();
    eventually(
        PATIENCE,
        "a write on the primary reaches the standby",
        || psql(&bin_dir, standby_port, "SELECT x FROM t").is_ok_and(|x| x == "42"),
    );
    assert_eq!(
        psql(
            &bin_dir,
            standby_port,
            "SELECT rolname FROM pg_roles WHERE rolname = 'app'"
        ),
        Ok("app".into()),
        "--init-sql ran on the primary"
    );
    assert_eq!(
        psql(&bin_dir, primary_port, "SHOW wal_log_hints"),
        Ok("on".into())
    );
    assert_eq!(
        psql(&bin_dir, primary_port, "SHOW listen_addresses"),
        Ok("*".into())
    );
    if let Some((uid, _)) = server_user() {
        assert_eq!(
            primary.uid(),
            Some(uid),
            "the primary's agent runs as the server's user"
        );
        assert_eq!(standby.uid(), Some(0), "the standby's agent runs as root");
        assert_eq!(std::fs::metadata(&primary_dir).unwrap().uid(), uid);
        assert_eq!(std::fs::metadata(&standby_dir).unwrap().uid(), uid);
    }

    assert_eq!(standby.terminate(), Some(0), "{}", standby.log_text());
    assert_eq!(primary.terminate(), Some(0), "{}", primary.log_text());
    for dir in [&primary_dir, &standby_dir] {
        assert!(
            !dir.join("postmaster.pid").exists(),
            "{} still runs",
            dir.display()
        );
    }
    assert!(
        primary.log_text().contains("PostgreSQL stopped"),
        "{}",
        primary.log_text()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_waiting_for_its_source_stops_at_once_on_sigterm() {
    // Dropped last: after the agents and servers have stopped.
    let scratch = base_dir_for_postgres();
    let base = scratch.0.clone();
    let nobody = pgvigil::local_cluster::free_port().unwrap();
    let source = format!("127.0.0.1:{nobody}");
    let data_dir = base.join("standby");
    let mut agent = AgentProcess::spawn(
        &[
            "--init",
            "standby",
            "--source",
            &source,
            "--data-dir",
            &data_dir.to_string_lossy(),
        ],
        Some(TOKEN),
        &[("PGVIGIL_SUPERUSER_PASSWORD", PASSWORD)],
        &base.join("agent.log"),
    );
    eventually(PATIENCE, "the agent waits for its source", || {
        agent.log_text().contains("the source is not ready")
    });
    let (code, body) = agent
        .call(Method::POST, "/start", Some(TOKEN), None)
        .await
        .unwrap();
    assert_eq!(code, 409, "an action during --init: {body}");
    let asked = std::time::Instant::now();
    assert_eq!(agent.terminate(), Some(0), "{}", agent.log_text());
    println!("stopped {:?} after SIGTERM", asked.elapsed());
    assert!(
        asked.elapsed() < Duration::from_secs(10),
        "{}",
        agent.log_text()
    );
    assert!(!data_dir.join("PG_VERSION").exists());
}
