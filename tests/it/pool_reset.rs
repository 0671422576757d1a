//! Issue 9: the string a connection pool resets its connections with at every release (asyncpg:
//! `SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL;`) returns the session to
//! its startup values, as PostgreSQL does, and does not pin it: under transaction pooling more
//! clients than server connections keep sharing them.

use std::process::Stdio;
use std::time::Duration;

use pgvigil::config::{Balance, PoolMode};
use pgvigil_proto::encode;

use crate::drivers::python_program;
use crate::lost_transaction::one_server_connection;
use crate::read_split::wait_until_every_node_may_read;
use crate::support::wire::{bind_execute, parse, Answer, Wire};
use crate::support::{start_proxy, test_cluster, APP_DB, APP_PASSWORD, APP_USER};
use crate::transaction_pooling::simple_value;

/// What asyncpg 0.32 sends at every release of a pooled connection to PostgreSQL 15.
const ASYNCPG_RESET: &str = "SELECT pg_advisory_unlock_all();\nCLOSE ALL;\nUNLISTEN *;\nRESET ALL;";

/// Bound on a unit that must not wait for a server connection another session holds: far
/// longer than a free one takes, shorter than the wait the test must not see.
const NO_WAIT: Duration = Duration::from_secs(15);

/// One step of a session.
#[derive(Debug, Clone, Copy)]
enum Step {
    /// A simple Query.
    Query(&'static str),
    /// Parse of a named statement, then Sync.
    Prepare(&'static str, &'static str),
    /// Bind and Execute of a named statement, then Sync.
    Run(&'static str),
}

/// What a client sees of one answer: every message's type in order, the CommandComplete tags,
/// the reported parameters (sorted: PostgreSQL's order is its own), SQLSTATEs, rows and the
/// ReadyForQuery status.
type Seen = (
    Vec<u8>,
    Vec<String>,
    Vec<(String, String)>,
    Vec<String>,
    Vec<Vec<String>>,
    u8,
);

fn seen(mut answer: Answer) -> Seen {
    answer.params.sort();
    let codes = answer.codes().into_iter().map(str::to_owned).collect();
    (
        answer.kinds,
        answer.tags,
        answer.params,
        codes,
        answer.rows,
        answer.status,
    )
}

async fn step(wire: &mut Wire, step: Step) -> Answer {
    match step {
        Step::Query(sql) => wire.query(sql).await,
        Step::Prepare(name, sql) => {
            wire.exchange(|out| {
                parse(out, name, sql);
                encode::sync(out);
            })
            .await
        }
        Step::Run(name) => {
            wire.exchange(|out| {
                bind_execute(out, name);
                encode::sync(out);
            })
            .await
        }
    }
}

const STEPS: [Step; 34] = [
    Step::Query("SET application_name = 'changed'"),
    Step::Query("SET DateStyle = 'German'"),
    Step::Query(ASYNCPG_RESET),
    Step::Query("SELECT current_setting('application_name'), current_setting('DateStyle')"),
    // Nothing changes: no ParameterStatus.
    Step::Query(ASYNCPG_RESET),
    Step::Query("SET application_name = 'changed'"),
    Step::Query("SET DateStyle = 'German'"),
    Step::Query("UNLISTEN *; RESET application_name; SET DateStyle TO DEFAULT; CLOSE ALL"),
    Step::Query("SHOW application_name"),
    // An error anywhere rolls the resets back.
    Step::Query("SET application_name = 'changed'"),
    Step::Query("RESET ALL; RESET no_such_setting"),
    Step::Query("SHOW application_name"),
    Step::Query("RESET no_such_setting; UNLISTEN *"),
    // Inside a block: the block's end decides.
    Step::Query("BEGIN"),
    Step::Query("SET application_name = 'in-block'"),
    Step::Query(ASYNCPG_RESET),
    Step::Query("SHOW application_name"),
    Step::Query("COMMIT"),
    Step::Query("SHOW application_name"),
    Step::Query("SET application_name = 'changed'"),
    Step::Query("BEGIN"),
    Step::Query(ASYNCPG_RESET),
    Step::Query("ROLLBACK"),
    Step::Query("SHOW application_name"),
    Step::Query("BEGIN"),
    Step::Query("SELECT 1/0"),
    Step::Query(ASYNCPG_RESET),
    Step::Query("ROLLBACK"),
    // DEALLOCATE ALL drops the session's own statements (and, shared, no other's).
    Step::Prepare("mine", "SELECT 1"),
    Step::Query("SET application_name = 'changed'"),
    Step::Query("DEALLOCATE ALL; RESET ALL"),
    Step::Run("mine"),
    Step::Prepare("mine", "SELECT 2"),
    Step::Run("mine"),
];

/// B's statement on the server connection, with when it was prepared there.
const THEIRS_ON_THE_SERVER: &str = "SELECT name || ' ' || prepare_time::text \
                                    FROM pg_prepared_statements WHERE statement = 'SELECT 3'";

#[tokio::test(flavor = "multi_thread")]
async fn a_pools_reset_string_shows_what_postgresql_shows_in_both_pool_modes() {
    let cluster = test_cluster(0);
    let startup: [(&[u8], &[u8]); 2] = [
        (b"application_name", b"from-startup"),
        (b"DateStyle", b"ISO, DMY"),
    ];
    let node = std::net::SocketAddr::from(([127, 0, 0, 1], cluster.node(0).port));
    let mut direct = Wire::login_with(node, "postgres", &startup).await;
    let mut expected = Vec::new();
    for s in STEPS {
        expected.push(seen(step(&mut direct, s).await));
    }
    for mode in [PoolMode::Session, PoolMode::Transaction] {
        // One server connection: under transaction pooling B's turns take it from A whenever A
        // is idle, which a pinned A would never let it do, and A's settings are rebuilt on it.
        let proxy = one_server_connection(&cluster, mode).await;
        let mut a = Wire::login_with(proxy.addr, APP_USER, &startup).await;
        let mut b = match mode {
            PoolMode::Transaction => Some(Wire::login_at(proxy.addr).await),
            PoolMode::Session => None,
        };
        // B's statement on the shared connection outlives A's DEALLOCATE ALL.
        let theirs = [Step::Prepare("theirs", "SELECT 3"), Step::Run("theirs")];
        let mut prepared_before = Vec::new();
        if let Some(b) = b.as_mut() {
            let prepared = step(b, theirs[0]).await;
            assert!(prepared.errors.is_empty(), "{:?}", prepared.errors);
            prepared_before = b.query(THEIRS_ON_THE_SERVER).await.rows;
            assert_eq!(
                prepared_before.len(),
                1,
                "B's statement is on the shared connection"
            );
        }
        for (s, expected) in STEPS.iter().zip(&expected) {
            let got = seen(step(&mut a, *s).await);
            assert_eq!(&got, expected, "{mode:?}: {s:?}");
            let Some(b) = b.as_mut().filter(|_| got.5 == b'I') else {
                continue;
            };
            let turn = tokio::time::timeout(NO_WAIT, b.query("SET application_name = 'b'"))
                .await
                .unwrap_or_else(|_| panic!("{mode:?}: B waited for A's connection after {s:?}"));
            assert!(
                turn.errors.is_empty(),
                "{mode:?}: B after {s:?}: {:?}",
                turn.errors
            );
        }
        if let Some(b) = b.as_mut() {
            let prepared = b.query(THEIRS_ON_THE_SERVER).await.rows;
            assert_eq!(
                prepared, prepared_before,
                "B's statement neither dropped nor prepared again"
            );
            let ran = step(b, theirs[1]).await;
            assert!(ran.errors.is_empty(), "B's statement: {:?}", ran.errors);
            assert_eq!(ran.rows, [["3"]], "B's statement");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pinned_sessions_deallocate_all_in_a_reset_string_runs_on_its_own_connection() {
    let cluster = test_cluster(0);
    let steps = [
        // The settings the string leaves: a statement's name on the nodes depends on them.
        Step::Query("RESET ALL"),
        // Prepared under pgvigil's name on the shared connection, which a session advisory
        // lock then pins the session to.
        Step::Prepare("mine", "SELECT 1"),
        Step::Query("SELECT pg_advisory_lock(9)"),
        Step::Query("RESET ALL; DEALLOCATE ALL"),
        Step::Run("mine"),
        // The same statement again: prepared anew, not taken for the one that is gone.
        Step::Prepare("mine", "SELECT 1"),
        Step::Run("mine"),
        Step::Query(ASYNCPG_RESET),
    ];
    let node = std::net::SocketAddr::from(([127, 0, 0, 1], cluster.node(0).port));
    let mut direct = Wire::login_with(node, "postgres", &[]).await;
    let mut expected = Vec::new();
    for s in steps {
        expected.push(seen(step(&mut direct, s).await));
    }
    let proxy = one_server_connection(&cluster, PoolMode::Transaction).await;
    let mut through = Wire::login_at(proxy.addr).await;
    for (s, expected) in steps.iter().zip(&expected) {
        assert_eq!(&seen(step(&mut through, *s).await), expected, "{s:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn discard_all_in_a_string_stays_postgresqls_error() {
    let cluster = test_cluster(0);
    let node = std::net::SocketAddr::from(([127, 0, 0, 1], cluster.node(0).port));
    let sql = "UNLISTEN *; DISCARD ALL; RESET ALL";
    let expected = seen(
        Wire::login_with(node, "postgres", &[])
            .await
            .query(sql)
            .await,
    );
    assert_eq!(expected.3, ["25001"], "PostgreSQL refuses it");
    for mode in [PoolMode::Session, PoolMode::Transaction] {
        let proxy = one_server_connection(&cluster, mode).await;
        let got = seen(Wire::login_at(proxy.addr).await.query(sql).await);
        assert_eq!(got, expected, "{mode:?}");
    }
}

/// Bound on one run of the asyncpg program (a few seconds when nothing waits).
const SCRIPT_LIMIT: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread")]
async fn an_asyncpg_pool_keeps_its_startup_settings_and_shares_two_server_connections() {
    const SCRIPT: &str = "asyncpg_pool_reset.py";
    let Some(_) = python_program("asyncpg", SCRIPT).await else {
        return;
    };
    let cluster = test_cluster(0);
    // Six asyncpg connections, two server connections: pinned sessions would hold both and
    // the others' checkouts would time out.
    let proxy = start_proxy(&cluster, |config| {
        config.pool.mode = PoolMode::Transaction;
        config.pool.max_size = 2;
    })
    .await;
    let mut outputs = Vec::new();
    for port in [cluster.node(0).port, proxy.addr.port()] {
        let Some(mut program) = python_program("asyncpg", SCRIPT).await else {
            return;
        };
        program
            .env("PGHOST", "127.0.0.1")
            .env("PGPORT", port.to_string())
            .env("PGUSER", APP_USER)
            .env("PGPASSWORD", APP_PASSWORD)
            .env("PGDATABASE", APP_DB)
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let output = tokio::time::timeout(SCRIPT_LIMIT, program.output())
            .await
            .unwrap_or_else(|_| panic!("port {port}: not done within {SCRIPT_LIMIT:?}"))
            .unwrap_or_else(|e| panic!("port {port}: cannot run {SCRIPT}: {e}"));
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            output.status.success(),
            "port {port}: {}\n--- output\n{stdout}--- errors\n{stderr}",
            output.status
        );
        outputs.push(stdout);
    }
    let (direct, through) = (&outputs[0], &outputs[1]);
    println!("--- through pgvigil\n{through}");
    assert!(
        direct.contains("acquired: pool-reset-app 7s"),
        "PostgreSQL shows the startup values: {direct}"
    );
    let sent = format!("reset query: '{}'", ASYNCPG_RESET.replace('\n', "\\n"));
    assert!(direct.contains(&sent), "asyncpg sends {sent}: {direct}");
    assert_eq!(through, direct, "through pgvigil as on PostgreSQL");
}

/// Plain BEGINs tried after each reset: with random balancing over a primary and two replicas,
/// all of them would reach the primary by chance about once in 500,000 runs.
const TRIES: usize = 12;

#[tokio::test(flavor = "multi_thread")]
async fn after_a_reset_of_a_read_only_default_a_plain_begin_is_read_write_again() {
    let cluster = test_cluster(2);
    let proxy = start_proxy(&cluster, |config| config.routing.balance = Balance::Random).await;
    wait_until_every_node_may_read(&proxy);
    let resets = [
        "RESET ALL",
        ASYNCPG_RESET,
        "UNLISTEN *; SET default_transaction_read_only TO DEFAULT",
    ];
    for reset in resets {
        // A session of its own: after a read-write BEGIN (a write) its reads wait for the
        // replicas to replay it, and would stay on the primary whatever the default.
        let client = proxy.connect_app().await;
        // A plain BEGIN may then go to a replica (see routing.rs); PostgreSQL's RESET makes it
        // read-write again, so it must reach the primary.
        client
            .batch_execute("SET default_transaction_read_only = on")
            .await
            .unwrap();
        client.batch_execute(reset).await.unwrap();
        for i in 0..TRIES {
            client.batch_execute("BEGIN").await.unwrap();
            let read_only = simple_value(&client, "SHOW transaction_read_only").await;
            client.batch_execute("COMMIT").await.unwrap();
            assert_eq!(read_only, "off", "{reset:?}: plain BEGIN #{i}");
        }
    }
}
