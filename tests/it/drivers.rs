//! The driver matrix of issue 17: pgjdbc, psycopg 3 and asyncpg, each through pgvigil in front of a
//! primary and two streaming replicas, run their program in `tests/drivers/` (one line per check,
//! `ok NAME` or `FAIL NAME: why`, and a non-zero exit status on any failure); a test fails with
//! the program's output unless every check the issue asks of that driver passed. Each runs in both
//! pool modes: in transaction mode their named prepared statements are shared per connection.
//!
//! Runtimes: pgjdbc runs as a single source file with `java` and Debian's
//! `libpostgresql-jdbc-java` jar; the Python drivers run in a virtual environment this test
//! creates under the target directory (`CARGO_TARGET_TMPDIR`) with `python3 -m venv` and fills
//! from `tests/drivers/python/requirements.txt`, again only when that file changes. `.ci/run`
//! installs the Debian packages. A missing runtime fails the test when `CI=true`, and skips it
//! with a message otherwise.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use pgvigil::config::PoolMode;
use tokio::process::Command;

use crate::read_split::wait_until_every_node_may_read;
use crate::support::{start_proxy, test_cluster, APP_DB, APP_PASSWORD, APP_USER};

/// The driver programs.
const PROGRAMS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/drivers");

/// Where Debian's libpostgresql-jdbc-java puts the driver.
const JDBC_JAR: &str = "/usr/share/java/postgresql.jar";

/// Bound on one driver's whole program (its checks take a few seconds; the cancel checks wait
/// 0.5 s each, and the JVM compiles the program first), generous for a loaded machine.
const RUN_LIMIT: Duration = Duration::from_secs(300);

/// What every driver must pass; `pipeline` where the driver has a pipeline mode of its own.
const COMMON_CHECKS: [&str; 10] = [
    "connect",
    "prepared_past_threshold",
    "batch",
    "transaction_error_then_rollback",
    "copy_in_and_out",
    "listen_notify",
    "cancel",
    "cursor_with_fetch_size",
    "reads_on_a_fresh_connection",
    "read_only_transactions",
];

#[tokio::test(flavor = "multi_thread")]
async fn pgjdbc_passes_every_check_through_pgvigil() {
    if let Err(why) = jdbc_runtime() {
        return missing_runtime("pgjdbc", &why);
    }
    let mut program = Command::new("java");
    program
        .args(["-cp", JDBC_JAR])
        .arg(Path::new(PROGRAMS).join("jdbc/Main.java"));
    // pgjdbc's batches are its pipeline: every row's Bind/Execute, then one Sync.
    run_checks("pgjdbc", program, &["batch_rewritten"], PoolMode::Session).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn pgjdbc_passes_every_check_through_pgvigil_in_transaction_mode() {
    if let Err(why) = jdbc_runtime() {
        return missing_runtime("pgjdbc", &why);
    }
    let mut program = Command::new("java");
    program
        .args(["-cp", JDBC_JAR])
        .arg(Path::new(PROGRAMS).join("jdbc/Main.java"));
    run_checks(
        "pgjdbc",
        program,
        &["batch_rewritten"],
        PoolMode::Transaction,
    )
    .await;
}

/// What psycopg must pass beyond the common checks.
const PSYCOPG_EXTRA: [&str; 4] = [
    "pipeline",
    "reads_after_an_extended_set",
    "reads_after_a_set_in_a_pipeline",
    "write_after_a_pipeline",
];

#[tokio::test(flavor = "multi_thread")]
async fn psycopg_passes_every_check_through_pgvigil() {
    let Some(program) = python_program("psycopg", "psycopg_checks.py").await else {
        return;
    };
    run_checks("psycopg", program, &PSYCOPG_EXTRA, PoolMode::Session).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn psycopg_passes_every_check_through_pgvigil_in_transaction_mode() {
    let Some(program) = python_program("psycopg", "psycopg_checks.py").await else {
        return;
    };
    run_checks("psycopg", program, &PSYCOPG_EXTRA, PoolMode::Transaction).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn asyncpg_passes_every_check_through_pgvigil() {
    let Some(program) = python_program("asyncpg", "asyncpg_checks.py").await else {
        return;
    };
    run_checks("asyncpg", program, &[], PoolMode::Session).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn asyncpg_passes_every_check_through_pgvigil_in_transaction_mode() {
    let Some(program) = python_program("asyncpg", "asyncpg_checks.py").await else {
        return;
    };
    run_checks("asyncpg", program, &[], PoolMode::Transaction).await;
}

/// Builds a primary and two replicas with pgvigil in front (pooling in `mode`), runs `program`
/// against it with the connection parameters in libpq's environment variables, and fails unless
/// it exits 0 having passed every common check and every one of `extra`.
async fn run_checks(driver: &str, mut program: Command, extra: &[&str], mode: PoolMode) {
    let cluster = test_cluster(2);
    let proxy = start_proxy(&cluster, |config| config.pool.mode = mode).await;
    // Reads may land on the replicas only once pgvigil has seen them catch up.
    wait_until_every_node_may_read(&proxy);
    let replica_ports = [1, 2].map(|n| cluster.node(n).port.to_string()).join(",");
    // The output goes to files, so that a program killed at the time limit still shows how far
    // it got.
    let out_path = cluster.base_dir().join(format!("{driver}.out"));
    let err_path = cluster.base_dir().join(format!("{driver}.err"));
    let create =
        |path: &Path| File::create(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    program
        .env("PGHOST", "127.0.0.1")
        .env("PGPORT", proxy.addr.port().to_string())
        .env("PGUSER", APP_USER)
        .env("PGPASSWORD", APP_PASSWORD)
        .env("PGDATABASE", APP_DB)
        .env("PGVIGIL_REPLICA_PORTS", &replica_ports)
        // No __pycache__ in the source tree.
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stdin(Stdio::null())
        .stdout(create(&out_path))
        .stderr(create(&err_path))
        .kill_on_drop(true);
    let mut child = program
        .spawn()
        .unwrap_or_else(|e| panic!("{driver}: cannot start {program:?}: {e}"));
    let status = match tokio::time::timeout(RUN_LIMIT, child.wait()).await {
        Ok(Ok(status)) => Some(status),
        Ok(Err(e)) => panic!("{driver}: waiting for the program: {e}"),
        Err(_) => {
            let _ = child.kill().await;
            None
        }
    };
    let read = |path: &Path| std::fs::read_to_string(path).unwrap_or_else(|e| format!("({e})"));
    let (stdout, stderr) = (read(&out_path), read(&err_path));
    println!("{stdout}");
    if let Err(why) = verdict(&stdout, status, extra) {
        panic!("{driver}: {why}\n--- output\n{stdout}--- errors\n{stderr}");
    }
}

/// Why the run failed, from its output and exit status (`None`: killed at the time limit).
fn verdict(stdout: &str, status: Option<ExitStatus>, extra: &[&str]) -> Result<(), String> {
    let failed: Vec<&str> = stdout.lines().filter(|l| l.starts_with("FAIL")).collect();
    if !failed.is_empty() {
        return Err(format!("{} check(s) failed: {failed:#?}", failed.len()));
    }
    let passed = |name: &str| {
        stdout.lines().any(|l| {
            l.strip_prefix("ok ")
                .and_then(|rest| rest.strip_prefix(name))
                .is_some_and(|rest| rest.is_empty() || rest.starts_with([':', ' ']))
        })
    };
    let absent: Vec<&str> = COMMON_CHECKS
        .iter()
        .chain(extra)
        .copied()
        .filter(|name| !passed(name))
        .collect();
    match status {
        None => Err(format!(
            "not done within {RUN_LIMIT:?}; never passed: {absent:?}"
        )),
        Some(status) if !status.success() => Err(format!("the program exited with {status}")),
        Some(_) if !absent.is_empty() => Err(format!("checks that never passed: {absent:?}")),
        Some(_) => Ok(()),
    }
}

/// A driver's runtime is not installed: the test fails under CI (`CI=true`), where that must
/// never pass unseen, and is skipped with a message elsewhere.
fn missing_runtime(driver: &str, why: &str) {
    let message = format!("{driver}: its runtime is missing: {why}");
    if std::env::var("CI").is_ok_and(|ci| ci == "true") {
        panic!("{message} (.ci/run installs it)");
    }
    eprintln!("SKIPPED {message} (with CI=true this fails)");
}

/// Whether `java` runs and the pgjdbc jar is there.
fn jdbc_runtime() -> Result<(), String> {
    if !Path::new(JDBC_JAR).is_file() {
        return Err(format!("no {JDBC_JAR} (Debian's libpostgresql-jdbc-java)"));
    }
    run_blocking(std::process::Command::new("java").arg("-version"))
        .map_err(|e| format!("{e} (Debian's default-jdk-headless)"))
}

/// `python <script>` in the drivers' virtual environment, or `None` when it cannot be had here
/// (and the test is skipped).
pub(crate) async fn python_program(driver: &str, script: &str) -> Option<Command> {
    let venv = tokio::task::spawn_blocking(python_venv)
        .await
        .unwrap_or_else(|e| panic!("building the virtual environment: {e}"));
    match venv {
        Ok(venv) => {
            let mut program = Command::new(venv.join("bin/python"));
            program.arg(Path::new(PROGRAMS).join("python").join(script));
            Some(program)
        }
        Err(why) => {
            missing_runtime(driver, &why);
            None
        }
    }
}

/// The virtual environment with the pinned Python drivers, built once per test process.
fn python_venv() -> Result<PathBuf, String> {
    static VENV: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    VENV.get_or_init(build_venv).clone()
}

/// Builds (or reuses) the virtual environment for the current requirements file.
fn build_venv() -> Result<PathBuf, String> {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let venv = dir.join("drivers-venv");
    let requirements = Path::new(PROGRAMS).join("python/requirements.txt");
    let wanted =
        std::fs::read(&requirements).map_err(|e| format!("{}: {e}", requirements.display()))?;
    let stamp = |venv: &Path| venv.join("requirements.installed");
    let current = |venv: &Path| std::fs::read(stamp(venv)).is_ok_and(|done| done == wanted);
    if current(&venv) {
        return Ok(venv);
    }
    // Built aside and renamed into place whole: other test processes may build it at the same
    // time (nextest runs each test in a process of its own), and a build cut short must not
    // look finished.
    let building = dir.join(format!("drivers-venv.{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&building);
    run_blocking(
        std::process::Command::new("python3")
            .args(["-m", "venv"])
            .arg(&building),
    )
    .map_err(|e| format!("{e} (Debian's python3-venv)"))?;
    run_blocking(
        std::process::Command::new(building.join("bin/python"))
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .arg("-r")
            .arg(&requirements),
    )?;
    std::fs::write(stamp(&building), &wanted)
        .map_err(|e| format!("{}: {e}", building.display()))?;
    if !current(&venv) {
        // An environment for an older requirements file.
        let _ = std::fs::remove_dir_all(&venv);
    }
    match std::fs::rename(&building, &venv) {
        Ok(()) => Ok(venv),
        Err(_) if current(&venv) => {
            let _ = std::fs::remove_dir_all(&building);
            Ok(venv)
        }
        Err(e) => Err(format!("{} -> {}: {e}", building.display(), venv.display())),
    }
}

/// Runs `command` to its end; its stderr is the error when it cannot start or fails.
fn run_blocking(command: &mut std::process::Command) -> Result<(), String> {
    let output = command
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{command:?}: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{command:?}: {}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}
