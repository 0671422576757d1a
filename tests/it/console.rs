//! The SQL console through real psql (`psql -d pgvigil` as a user with `admin = true`): every
//! SHOW with its columns and a plausible value, PAUSE, RESUME and RELOAD; a user without
//! `admin` is refused as PostgreSQL refuses a database without CONNECT (42501); anything else
//! gets an error naming what the console runs, and the extended protocol a clear 0A000.

use std::time::Duration;

use pgvigil::config::Config;
use pgvigil::pause::Traffic;
use tokio_postgres::error::SqlState;

use crate::auth::{psql_path, STEP};
use crate::cli::TempConfig;
use crate::support::{test_cluster, test_config, TestProxy, APP_PASSWORD, APP_USER};

/// A result set as psql prints it unaligned with headers: the header's columns, then the rows.
struct Table {
    columns: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// The rows whose `column` is `value`.
    fn rows_where(&self, column: &str, value: &str) -> Vec<&Vec<String>> {
        let i = self.index(column);
        self.rows.iter().filter(|r| r[i] == value).collect()
    }

    fn index(&self, column: &str) -> usize {
        self.columns
            .iter()
            .position(|c| c == column)
            .unwrap_or_else(|| panic!("no column {column} in {:?}", self.columns))
    }

    fn get<'a>(&self, row: &'a [String], column: &str) -> &'a str {
        &row[self.index(column)]
    }
}

/// Runs `sql` with psql on the console; returns (success, stdout, stderr).
async fn psql_console(port: u16, user: &str, sql: &str) -> (bool, String, String) {
    let conninfo =
        format!("host=127.0.0.1 port={port} user={user} password={APP_PASSWORD} dbname=pgvigil");
    let mut command = tokio::process::Command::new(psql_path());
    command
        .env_clear()
        .args([
            "-X",
            "-w",
            "-A",
            "-F",
            "|",
            "-P",
            "footer=off",
            "-v",
            "ON_ERROR_STOP=1",
        ])
        .args(["-d", &conninfo, "-c", sql])
        .kill_on_drop(true);
    let output = tokio::time::timeout(STEP, command.output())
        .await
        .expect("psql did not finish in time")
        .expect("psql runs");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// `SHOW item` through psql, parsed; checks the header is `columns`.
async fn show(port: u16, item: &str, columns: &[&str]) -> Table {
    let (ok, stdout, stderr) = psql_console(port, APP_USER, &format!("SHOW {item}")).await;
    assert!(ok, "SHOW {item} failed: {stderr}");
    let mut lines = stdout.lines();
    let header: Vec<String> = lines
        .next()
        .unwrap_or_default()
        .split('|')
        .map(str::to_owned)
        .collect();
    assert_eq!(header, columns, "SHOW {item} columns");
    let rows = lines
        .map(|l| l.split('|').map(str::to_owned).collect())
        .collect();
    Table {
        columns: header,
        rows,
    }
}

/// pgvigil in front of `cluster` with `app` an admin, started from a config file (for RELOAD).
async fn start(cluster: &crate::support::LocalCluster) -> (TestProxy, TempConfig) {
    start_with(cluster, |_| {}).await
}

/// Like [`start`], with `tweak` applied to the configuration first.
async fn start_with(
    cluster: &crate::support::LocalCluster,
    tweak: impl FnOnce(&mut Config),
) -> (TestProxy, TempConfig) {
    let mut config = test_config(cluster);
    config.users[0].admin = true;
    tweak(&mut config);
    let file = TempConfig::new(&toml::to_string(&config).unwrap());
    let config = Config::load(file.path()).unwrap();
    let running = pgvigil::proxy::start(config).await.unwrap();
    let addr = running.local_addr;
    (TestProxy { running, addr }, file)
}

#[tokio::test(flavor = "multi_thread")]
async fn every_show_and_command_works_through_psql() {
    let cluster = test_cluster(1);
    let (proxy, _file) = start(&cluster).await;
    let port = proxy.addr.port();
    // Some traffic, and a session that keeps its server connection.
    let app = proxy.connect_app().await;
    app.simple_query("SELECT 1").await.unwrap();
    app.batch_execute(
        "CREATE TABLE IF NOT EXISTS console_t (n int); INSERT INTO console_t VALUES (1)",
    )
    .await
    .unwrap();
    // One transaction of four units, on pg1.
    for statement in [
        "BEGIN",
        "INSERT INTO console_t VALUES (2)",
        "INSERT INTO console_t VALUES (3)",
        "COMMIT",
    ] {
        app.simple_query(statement).await.unwrap();
    }

    let nodes = show(
        port,
        "NODES",
        &[
            "name",
            "host",
            "port",
            "role",
            "health",
            "timeline",
            "lsn",
            "lag_bytes",
            "weight",
            "fenced",
            "sv_open",
            "sv_idle",
        ],
    )
    .await;
    let pg1 = nodes.rows_where("name", "pg1");
    assert_eq!(nodes.get(pg1[0], "role"), "primary");
    assert_eq!(nodes.get(pg1[0], "port"), cluster.node(0).port.to_string());
    assert_eq!(nodes.rows.len(), 2);

    let pools = show(
        port,
        "POOLS",
        &[
            "database",
            "user",
            "node",
            "cl_active",
            "cl_waiting",
            "sv_active",
            "sv_idle",
            "maxwait",
            "maxwait_us",
            "pool_mode",
        ],
    )
    .await;
    let app_pg1: Vec<_> = pools
        .rows_where("node", "pg1")
        .into_iter()
        .filter(|r| pools.get(r, "user") == APP_USER && pools.get(r, "database") == "app")
        .collect();
    assert_eq!(pools.get(app_pg1[0], "cl_active"), "1");
    assert_eq!(pools.get(app_pg1[0], "sv_active"), "1");
    assert_eq!(pools.get(app_pg1[0], "pool_mode"), "session");

    let clients = show(
        port,
        "CLIENTS",
        &[
            "type",
            "user",
            "database",
            "state",
            "addr",
            "port",
            "connect_time",
            "pid",
            "application_name",
        ],
    )
    .await;
    assert_eq!(clients.rows_where("database", "app").len(), 1);
    let console = clients.rows_where("database", "pgvigil");
    assert_eq!(console.len(), 1, "the console's own psql");
    assert_eq!(clients.get(console[0], "application_name"), "psql");
    assert_eq!(clients.get(console[0], "state"), "active");

    let servers = show(
        port,
        "SERVERS",
        &[
            "type",
            "user",
            "database",
            "state",
            "node",
            "addr",
            "port",
            "connect_time",
            "remote_pid",
        ],
    )
    .await;
    // The app session's connections: to the primary (its write), and maybe the replica.
    let active = servers.rows_where("state", "active");
    assert!(active.iter().all(|r| servers.get(r, "user") == APP_USER));
    let on_pg1: Vec<_> = active
        .iter()
        .filter(|r| servers.get(r, "node") == "pg1")
        .collect();
    assert_eq!(on_pg1.len(), 1, "{:?}", servers.rows);
    assert!(servers.get(on_pg1[0], "remote_pid").parse::<u32>().unwrap() > 0);

    let stats = show(
        port,
        "STATS",
        &[
            "node",
            "total_xact_count",
            "total_query_count",
            "total_received",
            "total_sent",
            "total_query_time",
            "total_wait_time",
            "avg_query_time",
        ],
    )
    .await;
    let count = |row: &Vec<String>| stats.get(row, "total_query_count").parse::<u64>().unwrap();
    assert!(
        stats.rows.iter().map(count).sum::<u64>() >= 2,
        "SELECT 1 and the batch"
    );
    let pg1 = stats.rows_where("node", "pg1");
    assert!(count(pg1[0]) >= 1, "the batch wrote on pg1");
    let xacts = stats
        .get(pg1[0], "total_xact_count")
        .parse::<u64>()
        .unwrap();
    assert!(xacts >= 2, "the batch and the block: {xacts}");
    assert!(
        count(pg1[0]) >= xacts + 3,
        "the block's four units are one transaction: {:?}",
        stats.rows
    );
    assert_eq!(
        stats.get(pg1[0], "total_wait_time"),
        "0",
        "no checkout waited"
    );
    assert!(stats.get(pg1[0], "total_received").parse::<u64>().unwrap() > 0);
    assert!(stats.get(pg1[0], "total_sent").parse::<u64>().unwrap() > 0);

    let events = show(port, "EVENTS", &["time", "kind", "node", "message"]).await;
    assert!(!events.rows_where("kind", "topology").is_empty());

    let config = show(port, "CONFIG", &["key", "value", "default", "changeable"]).await;
    let max_size = config.rows_where("key", "pool.max_size");
    assert_eq!(config.get(max_size[0], "value"), "20");
    assert_eq!(config.get(max_size[0], "default"), "20");
    assert_eq!(config.get(max_size[0], "changeable"), "yes");
    let listen = config.rows_where("key", "listen");
    assert_eq!(config.get(listen[0], "changeable"), "no");
    let password = config.rows_where("key", "users[0].password");
    assert_eq!(config.get(password[0], "value"), "********");

    let version = show(port, "VERSION", &["version"]).await;
    assert_eq!(
        version.rows,
        [[format!("pgvigil {}", env!("CARGO_PKG_VERSION"))]]
    );

    let (ok, stdout, stderr) = psql_console(port, APP_USER, "PAUSE").await;
    assert!(ok && stdout.trim() == "PAUSE", "{stdout} {stderr}");
    assert!(stderr.contains("paused"), "{stderr}");
    assert_eq!(proxy.running.proxy.pause.traffic(), Traffic::Paused);
    let (ok, stdout, _) = psql_console(port, APP_USER, "RESUME").await;
    assert!(ok && stdout.trim() == "RESUME");
    assert_eq!(proxy.running.proxy.pause.traffic(), Traffic::Flowing);
    let (ok, stdout, stderr) = psql_console(port, APP_USER, "reload").await;
    assert!(ok && stdout.trim() == "RELOAD", "{stdout} {stderr}");
    assert!(stderr.contains("reloaded: nothing changed"), "{stderr}");
    // The session that was open all along still works.
    assert_eq!(
        crate::support::value(&app, "SELECT count(*)::text FROM console_t")
            .await
            .as_deref(),
        Some("3")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_user_without_admin_cannot_open_the_console() {
    let cluster = test_cluster(0);
    let (proxy, _file) = start(&cluster).await;
    let conninfo = format!(
        "host=127.0.0.1 port={} user={} password={} dbname=pgvigil",
        proxy.addr.port(),
        crate::support::MD5_USER,
        crate::support::MD5_PASSWORD
    );
    let Err(error) = proxy.connect(&conninfo).await else {
        panic!("a user without admin opened the console")
    };
    assert_eq!(error.code(), Some(&SqlState::INSUFFICIENT_PRIVILEGE));
    let message = error.as_db_error().map(|e| e.message().to_owned());
    assert!(
        message
            .as_deref()
            .is_some_and(|m| m.starts_with("permission denied for database")),
        "{message:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn anything_else_gets_a_clear_error_and_the_console_goes_on() {
    let cluster = test_cluster(0);
    let (proxy, _file) = start(&cluster).await;
    let port = proxy.addr.port();
    let (ok, _, stderr) = psql_console(port, APP_USER, "SELECT 1").await;
    assert!(
        !ok && stderr.contains("the pgvigil console does not run"),
        "{stderr}"
    );

    let conninfo = format!(
        "host=127.0.0.1 port={port} user={APP_USER} password={APP_PASSWORD} dbname=pgvigil"
    );
    let console = proxy.connect(&conninfo).await.unwrap();
    for (sql, code) in [
        ("SELECT 1", SqlState::FEATURE_NOT_SUPPORTED),
        ("SHOW FOO", SqlState::FEATURE_NOT_SUPPORTED),
        ("PAUSE NOW", SqlState::SYNTAX_ERROR),
    ] {
        let error = console.simple_query(sql).await.err();
        assert_eq!(error.as_ref().and_then(|e| e.code()), Some(&code), "{sql}");
    }
    // The extended protocol (a prepared statement) is refused, and the console goes on.
    let error = console.query("SHOW VERSION", &[]).await.err();
    assert_eq!(
        error.as_ref().and_then(|e| e.code()),
        Some(&SqlState::FEATURE_NOT_SUPPORTED)
    );
    let rows = console.simple_query("SHOW VERSION").await.unwrap();
    assert!(rows
        .iter()
        .any(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_))));
}

#[tokio::test(flavor = "multi_thread")]
async fn show_pools_has_how_long_a_checkout_waits_for_a_full_pool() {
    let cluster = test_cluster(0);
    let (proxy, _file) = start_with(&cluster, |config| {
        config.pool.max_size = 1;
        config.pool.checkout_timeout = Duration::from_secs(60);
    })
    .await;
    let port = proxy.addr.port();
    // Session pooling: the holder keeps pg1's one server connection while it is open.
    let holder = proxy.connect_app().await;
    holder.simple_query("SELECT 1").await.unwrap();
    let waiter = tokio::spawn({
        let conninfo = proxy.conninfo(APP_USER, APP_PASSWORD, "app");
        async move {
            let (client, connection) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls)
                .await
                .expect("the waiter is served once the holder leaves");
            tokio::spawn(connection);
            client.simple_query("SELECT 1").await.map(|_| ())
        }
    });
    let columns = [
        "database",
        "user",
        "node",
        "cl_active",
        "cl_waiting",
        "sv_active",
        "sv_idle",
        "maxwait",
        "maxwait_us",
        "pool_mode",
    ];
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let pools = show(port, "POOLS", &columns).await;
        let row = pools
            .rows_where("database", "app")
            .into_iter()
            .find(|r| pools.get(r, "user") == APP_USER)
            .cloned();
        let waited = row.as_ref().map_or(0, |r| {
            pools.get(r, "maxwait").parse::<u64>().unwrap() * 1_000_000
                + pools.get(r, "maxwait_us").parse::<u64>().unwrap()
        });
        if waited > 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no wait shown: {:?}",
            pools.rows
        );
    }
    drop(holder);
    let served = tokio::time::timeout(Duration::from_secs(30), waiter)
        .await
        .expect("the waiter was served")
        .unwrap();
    assert!(served.is_ok(), "{served:?}");
    let pools = show(port, "POOLS", &columns).await;
    for row in pools.rows_where("database", "app") {
        assert_eq!(
            (pools.get(row, "maxwait"), pools.get(row, "maxwait_us")),
            ("0", "0"),
            "nobody waits any more"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_waiting_for_a_server_connection_shows_as_waiting() {
    let cluster = test_cluster(0);
    let (proxy, _file) = start_with(&cluster, |config| {
        config.pool.mode = pgvigil::config::PoolMode::Transaction;
        config.pool.max_size = 1;
        config.pool.checkout_timeout = Duration::from_secs(60);
    })
    .await;
    let port = proxy.addr.port();
    let waiter = proxy.connect_app().await;
    let holder = proxy.connect_app().await;
    // Transaction pooling: the holder keeps pg1's one server connection until its COMMIT.
    holder.batch_execute("BEGIN; SELECT 1").await.unwrap();
    let waiting = tokio::spawn(async move { waiter.simple_query("SELECT 1").await.map(|_| ()) });
    let columns = [
        "type",
        "user",
        "database",
        "state",
        "addr",
        "port",
        "connect_time",
        "pid",
        "application_name",
    ];
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let clients = show(port, "CLIENTS", &columns).await;
        let app = clients.rows_where("database", "app");
        let waiting: Vec<_> = app
            .iter()
            .filter(|r| clients.get(r, "state") == "waiting")
            .collect();
        if waiting.len() == 1 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no client shown waiting: {:?}",
            clients.rows
        );
    }
    holder.batch_execute("COMMIT").await.unwrap();
    let served = tokio::time::timeout(Duration::from_secs(30), waiting)
        .await
        .expect("the waiter was served after the holder's COMMIT")
        .unwrap();
    assert!(served.is_ok(), "{served:?}");
    let clients = show(port, "CLIENTS", &columns).await;
    assert!(clients
        .rows_where("database", "app")
        .iter()
        .all(|r| clients.get(r, "state") != "waiting"));
}
