//! Real `pgbench` runs through pgvigil: initialisation (COPY), read-only and TPC-B-like
//! workloads in both query protocols, and a new connection per transaction.

use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

use crate::support::{start_proxy, test_cluster, TestProxy, APP_DB, APP_PASSWORD, APP_USER};

/// More server connections than any run below opens at once, so nobody waits for the pool.
const POOL_SIZE: usize = 16;

/// pgbench of the cluster's own installation, as `LocalCluster::bin_dir` found it.
pub(crate) fn pgbench_path(bin_dir: &std::path::Path) -> PathBuf {
    let bundled = bin_dir.join("pgbench");
    if bundled.exists() {
        bundled
    } else {
        PathBuf::from("pgbench")
    }
}

/// Runs pgbench as `app` against pgvigil with `args`, without blocking the proxy's runtime;
/// panics with pgbench's output unless it exits with status 0. Returns its stdout.
pub(crate) async fn pgbench(program: &std::path::Path, proxy: &TestProxy, args: &[&str]) -> String {
    let port = proxy.addr.port().to_string();
    let output: Output = tokio::process::Command::new(program)
        .args(["-h", "127.0.0.1", "-p", &port, "-U", APP_USER])
        .args(args)
        .arg(APP_DB)
        .env("PGPASSWORD", APP_PASSWORD)
        .env_remove("PGSERVICE")
        .kill_on_drop(true)
        .output()
        .await
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "pgbench {args:?} failed ({}):\nstdout:\n{stdout}\nstderr:\n{stderr}",
        output.status
    );
    stdout
}

/// The value after `label` on the first line that starts with it, up to the next space.
fn reported<'a>(report: &'a str, label: &str) -> Option<&'a str> {
    report
        .lines()
        .find_map(|line| line.trim().strip_prefix(label))
        .and_then(|rest| rest.split_whitespace().next())
}

/// Checks a benchmark run's report: no failed transaction and some throughput.
pub(crate) fn assert_clean_run(report: &str) {
    assert_eq!(
        reported(report, "number of failed transactions:"),
        Some("0"),
        "pgbench reported failures:\n{report}"
    );
    let tps: f64 = reported(report, "tps =")
        .and_then(|tps| tps.parse().ok())
        .unwrap_or_else(|| panic!("no tps line in the report:\n{report}"));
    assert!(tps > 0.0, "no throughput:\n{report}");
}

#[tokio::test(flavor = "multi_thread")]
async fn pgbench_initialises_and_runs_every_workload_without_failures() {
    let cluster = test_cluster(0);
    let proxy = start_proxy(&cluster, |config| {
        config.pool.max_size = POOL_SIZE;
        // Not a test of failure detection: on the CI machine, with other tests' clusters busy
        // beside this one, three 1 s probes in a row once went unanswered during the
        // `-S` run, and the primary was called down under pgbench.
        config.health.timeout = Duration::from_secs(5);
    })
    .await;
    let program = pgbench_path(cluster.bin_dir());

    // Client-side generation loads pgbench_accounts with COPY FROM STDIN.
    pgbench(&program, &proxy, &["-i", "-s", "1", "-q"]).await;

    let read_only = ["-S", "-T", "10", "-c", "4", "-j", "2", "-M", "extended"];
    assert_clean_run(&pgbench(&program, &proxy, &read_only).await);

    let tpcb_like = ["-T", "10", "-c", "4", "-j", "2", "-M", "simple"];
    assert_clean_run(&pgbench(&program, &proxy, &tpcb_like).await);

    let connect_each_time = ["-C", "-S", "-T", "5", "-c", "4"];
    assert_clean_run(&pgbench(&program, &proxy, &connect_each_time).await);
}

#[test]
fn report_values_are_read_from_their_lines() {
    let report = "number of failed transactions: 0 (0.000%)\n\
                  latency average = 1.234 ms\n\
                  tps = 812.5 (without initial connection time)\n";
    assert_eq!(
        reported(report, "number of failed transactions:"),
        Some("0")
    );
    assert_eq!(reported(report, "tps ="), Some("812.5"));
    assert_eq!(reported(report, "missing:"), None);
    assert_clean_run(report);
}
