//! The `pgvigil` binary as an operator runs it: a bad or missing configuration stops it with exit
//! code 2 and a message naming the offending key; `--help` lists the commands; and `serve` with a
//! valid file serves real clients until SIGTERM, then exits 0.

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio_postgres::NoTls;

use crate::auth::{psql, STEP};
use crate::support::{
    test_cluster, test_config, LocalCluster, APP_DB, APP_PASSWORD, APP_USER, MD5_PASSWORD, MD5_USER,
};

/// How long the binary may take to exit after SIGTERM.
const STOP: Duration = Duration::from_secs(30);

/// Config files written by this process so far, to give each its own name.
static FILES: AtomicUsize = AtomicUsize::new(0);

/// A config file under the temp dir, removed when dropped.
pub(crate) struct TempConfig(PathBuf);

impl TempConfig {
    pub(crate) fn new(text: &str) -> TempConfig {
        let n = FILES.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("pgvigil-cli-{}-{n}.toml", std::process::id()));
        std::fs::write(&path, text).unwrap();
        TempConfig(path)
    }

    pub(crate) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempConfig {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The real binary, with a clean environment (no PGVIGIL_CONFIG, no colours in the log).
pub(crate) fn pgvigil(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_pgvigil"));
    command
        .args(args)
        .env_remove("PGVIGIL_CONFIG")
        .env("PGVIGIL_LOG", "info")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    command
}

async fn run(args: &[&str]) -> Output {
    tokio::time::timeout(STEP, pgvigil(args).output())
        .await
        .expect("pgvigil did not exit in time")
        .expect("pgvigil runs")
}

/// Nodes and users that validate; cases below add or change one thing.
const VALID_NODES_AND_USERS: &str = r#"
[[nodes]]
name = "pg1"
host = "127.0.0.1"
port = 5432

[[users]]
name = "app"
password = "app-secret"
"#;

/// Runs `serve` on `text` and checks it exits with 2 and names `key` on stderr.
async fn assert_refused(text: &str, key: &str) {
    let config = TempConfig::new(text);
    let output = run(&["serve", "--config", config.path().to_str().unwrap()]).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(2),
        "exit code for\n{text}\nstderr: {stderr}"
    );
    assert!(
        stderr.contains(key),
        "stderr should name {key:?} for\n{text}\nbut was: {stderr}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn serve_with_a_bad_config_exits_2_naming_the_key() {
    let cases: &[(String, &str)] = &[
        (
            format!("bogus_setting = 1\n{VALID_NODES_AND_USERS}"),
            "unknown field `bogus_setting`",
        ),
        (
            format!("listen = \"localhost:abc\"\n{VALID_NODES_AND_USERS}"),
            "listen: invalid socket address \"localhost:abc\"",
        ),
        (
            format!("{VALID_NODES_AND_USERS}\n[[nodes]]\nname = \"pg1\"\nhost = \"10.0.0.2\"\n"),
            "nodes[1].name: duplicate node name \"pg1\"",
        ),
        (
            format!("{VALID_NODES_AND_USERS}\n[[users]]\nname = \"reporting\"\n"),
            "users[1].password: missing",
        ),
        (
            format!("{VALID_NODES_AND_USERS}\n[pool]\nmax_sise = 3\n"),
            "unknown field `max_sise`",
        ),
        (
            format!("{VALID_NODES_AND_USERS}\n[pool]\nmode = \"statement\"\n"),
            "unknown variant `statement`",
        ),
        (
            format!("{VALID_NODES_AND_USERS}\n[routing]\nread_functions = [\"bad name\"]\n"),
            "routing.read_functions[0]: \"bad name\" is not a function name",
        ),
        (
            format!("{VALID_NODES_AND_USERS}\n[nodes.control]\ndriver = \"agent\"\n"),
            "nodes[0].control.url: node pg1: required with the agent driver",
        ),
        (
            format!(
                "{VALID_NODES_AND_USERS}\n[nodes.control]\ndriver = \"command\"\n\
                 stop = \"pg_ctl stop -D {{datadir}}\"\nstart = \"x\"\nstatus = \"y\"\n"
            ),
            "nodes[0].control.stop: node pg1: unknown placeholder {datadir}",
        ),
    ];
    for (text, key) in cases {
        assert_refused(text, key).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn serve_with_a_missing_config_file_exits_2_naming_the_file() {
    let missing = std::env::temp_dir().join(format!(
        "pgvigil-cli-{}-does-not-exist.toml",
        std::process::id()
    ));
    let missing = missing.to_str().unwrap();
    let output = run(&["serve", "--config", missing]).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "stderr: {stderr}");
    assert!(stderr.contains(missing), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn help_lists_serve_and_demo() {
    let output = run(&["--help"]).await;
    assert!(output.status.success());
    let stdout = String::from_utf8_lossy(&output.stdout);
    let commands: Vec<&str> = stdout
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .collect();
    for command in ["serve", "demo"] {
        assert!(
            commands.contains(&command),
            "{command} missing in\n{stdout}"
        );
    }
}

/// The in-process tests' configuration for `cluster` as a TOML file: every node, the SCRAM and md5
/// users, listening on a port the OS picks. Written from the same structs `serve` reads it into.
fn config_for(cluster: &LocalCluster) -> String {
    let config = test_config(cluster);
    assert_eq!(config.listen.port(), 0);
    toml::to_string(&config).expect("the config serializes")
}

/// Reads pgvigil's log until it says where it listens; returns the port and the log so far.
pub(crate) async fn listening_port(
    child: &mut Child,
) -> (u16, BufReader<tokio::process::ChildStderr>) {
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut log = String::new();
    let found = tokio::time::timeout(STEP, async {
        let mut line = String::new();
        loop {
            line.clear();
            if stderr.read_line(&mut line).await.unwrap() == 0 {
                return None;
            }
            log.push_str(&line);
            if let Some(port) = line
                .contains("pgvigil listening")
                .then(|| port_after(&line, "127.0.0.1:"))
                .flatten()
            {
                return Some(port);
            }
        }
    })
    .await;
    match found {
        Ok(Some(port)) => (port, stderr),
        _ => panic!("pgvigil did not report its address; log:\n{log}"),
    }
}

fn port_after(line: &str, prefix: &str) -> Option<u16> {
    let start = line.find(prefix)? + prefix.len();
    let digits: String = line[start..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

#[tokio::test(flavor = "multi_thread")]
async fn serve_answers_psql_and_stops_cleanly_on_sigterm() {
    let cluster = test_cluster(0);
    let config = TempConfig::new(&config_for(&cluster));
    let mut child = pgvigil(&["serve", "--config", config.path().to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (port, mut stderr) = listening_port(&mut child).await;

    let conninfo = format!(
        "host=127.0.0.1 port={port} user={APP_USER} password={APP_PASSWORD} dbname={APP_DB}"
    );
    let served_by = psql(&conninfo, &["-c", "SELECT inet_server_port()"]).await;
    assert_eq!(served_by, cluster.node(0).port.to_string());
    let md5 = format!(
        "host=127.0.0.1 port={port} user={MD5_USER} password={MD5_PASSWORD} dbname={APP_DB}"
    );
    assert_eq!(psql(&md5, &["-c", "SELECT current_user"]).await, MD5_USER);

    // A client still connected does not hold the stop up; its session ends with the process.
    let (idle_client, connection) =
        tokio::time::timeout(STEP, tokio_postgres::connect(&conninfo, NoTls))
            .await
            .unwrap()
            .unwrap();
    let connection = tokio::spawn(connection);
    idle_client.simple_query("SELECT 1").await.unwrap();

    let pid = child.id().expect("pgvigil is running") as libc::pid_t;
    // SAFETY: kill only sends a signal to the child we spawned (and still own, so not reaped).
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let status = tokio::time::timeout(STOP, child.wait())
        .await
        .expect("pgvigil did not stop within 30 s of SIGTERM")
        .unwrap();
    let mut rest = String::new();
    let _ = stderr.read_to_string(&mut rest).await;
    assert_eq!(status.code(), Some(0), "log after SIGTERM:\n{rest}");
    assert!(rest.contains("stopping"), "{rest}");
    tokio::time::timeout(STEP, connection)
        .await
        .expect("the idle client's connection ends with pgvigil")
        .unwrap()
        .expect_err("the session was cut, not ended by the client");
    assert!(idle_client.is_closed());
}
