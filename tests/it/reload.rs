//! Reload as an operator uses it: the configuration file edited, then `pgvigil reload` (or
//! SIGHUP to the real binary). A weight and a pool size change live under load with no client
//! error; an invalid file is refused with every problem named and changes nothing; users added
//! log in, users removed cannot, and a removed user's open session goes on.

use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pgvigil::admin::api::{Done, EventKind};
use pgvigil::config::{Config, PoolMode};
use tokio::io::AsyncBufReadExt;
use tokio_postgres::error::SqlState;

use crate::admin::cli;
use crate::auth::{psql, psql_output};
use crate::cli::{listening_port, pgvigil, TempConfig};
use crate::support::{
    eventually, test_cluster, test_config, value, LocalCluster, TestProxy, APP_DB, APP_PASSWORD,
    APP_USER, MD5_PASSWORD, MD5_USER,
};

/// How long anything that should be quick may take on a loaded machine.
const PATIENCE: Duration = Duration::from_secs(30);

/// `config` as the TOML file pgvigil reads.
fn toml_of(config: &Config) -> String {
    toml::to_string(config).expect("the config serializes")
}

/// Starts pgvigil in-process from `file`, as `serve --config` would.
async fn start_from(file: &TempConfig) -> TestProxy {
    let config = Config::load(file.path()).unwrap_or_else(|e| panic!("{e}"));
    let running = pgvigil::proxy::start(config)
        .await
        .unwrap_or_else(|e| panic!("pgvigil did not start: {e}"));
    let addr = running.local_addr;
    TestProxy { running, addr }
}

/// Overwrites `file` with `config`.
fn rewrite(file: &TempConfig, config: &Config) {
    std::fs::write(file.path(), toml_of(config)).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_weight_and_a_pool_size_change_live_under_load_with_no_client_error() {
    let cluster = test_cluster(2);
    let mut config = test_config(&cluster);
    config.pool.mode = PoolMode::Transaction;
    let file = TempConfig::new(&toml_of(&config));
    let proxy = start_from(&file).await;
    crate::read_split::wait_until_every_node_may_read(&proxy);
    let shared = proxy.running.proxy.clone();

    proxy
        .connect_app()
        .await
        .batch_execute("CREATE TABLE IF NOT EXISTS reload_load (n int)")
        .await
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for n in 0..6 {
        let client = proxy.connect_app().await;
        let (stop, done) = (stop.clone(), done.clone());
        clients.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                if n % 3 == 0 {
                    client
                        .execute("INSERT INTO reload_load VALUES ($1)", &[&n])
                        .await?;
                } else {
                    client.simple_query("SELECT inet_server_port()").await?;
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<_, tokio_postgres::Error>(())
        }));
    }
    eventually(PATIENCE, "load running", || {
        done.load(Ordering::Relaxed) > 100
    });

    // pg2 takes no more reads; the pools shrink to 2 connections per node.
    config.nodes[1].weight = 0;
    config.pool.max_size = 2;
    rewrite(&file, &config);
    let reloaded: Done = cli(proxy.running.admin_addr, None, &["reload", "--json"])
        .await
        .exits(0)
        .json();
    assert!(
        reloaded.message.contains("pool") && reloaded.message.contains("nodes[pg2]"),
        "{}",
        reloaded.message
    );
    assert_eq!(shared.config().pool.max_size, 2);
    eventually(PATIENCE, "every pool down to 2 connections", || {
        (0..3).all(|node| shared.pools.open_count(node) <= 2)
    });
    let before = done.load(Ordering::Relaxed);
    eventually(PATIENCE, "load going on after the reload", || {
        done.load(Ordering::Relaxed) > before + 200
    });

    // Reads now land on pg3 only (and never on pg2).
    let reader = proxy.connect_app().await;
    let pg2 = cluster.node(1).port.to_string();
    for _ in 0..50 {
        let port = value(&reader, "SELECT inet_server_port()").await;
        assert_ne!(port.as_deref(), Some(pg2.as_str()), "a read went to pg2");
    }

    stop.store(true, Ordering::Relaxed);
    for client in clients {
        let outcome = tokio::time::timeout(PATIENCE, client)
            .await
            .unwrap()
            .unwrap();
        assert!(outcome.is_ok(), "a client got an error: {outcome:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_invalid_file_is_refused_with_every_problem_named_and_changes_nothing() {
    let cluster = test_cluster(0);
    let config = test_config(&cluster);
    let file = TempConfig::new(&toml_of(&config));
    let proxy = start_from(&file).await;
    let shared = proxy.running.proxy.clone();

    let mut bad = config.clone();
    bad.pool.max_size = 0;
    bad.users[1].password = None;
    rewrite(&file, &bad);
    let refusal = cli(proxy.running.admin_addr, None, &["reload", "--json"])
        .await
        .refusal();
    for key in ["pool.max_size", "users[1].password"] {
        assert!(
            refusal.refused.contains(key),
            "{key} not named: {refusal:?}"
        );
    }
    assert_eq!(shared.config().pool.max_size, config.pool.max_size);
    let events = shared.events.list();
    let reload = events
        .iter()
        .rfind(|e| e.kind == EventKind::Reload)
        .expect("the reload in the event log");
    assert!(reload.message.contains("refused"), "{}", reload.message);
    // Still serving with the old configuration.
    let client = proxy.connect_app().await;
    assert_eq!(value(&client, "SELECT 'up'").await.as_deref(), Some("up"));

    // A change that cannot apply live is reported, the rest applied.
    let mut moved = config.clone();
    moved.listen = "127.0.0.1:1".parse().unwrap();
    moved.pool.checkout_timeout = Duration::from_secs(7);
    rewrite(&file, &moved);
    let done: Done = cli(proxy.running.admin_addr, None, &["reload", "--json"])
        .await
        .exits(0)
        .json();
    assert!(
        done.message.contains("applied pool")
            && done.message.contains("needs a restart to change: listen"),
        "{}",
        done.message
    );
    assert_eq!(
        shared.config().pool.checkout_timeout,
        Duration::from_secs(7)
    );
    assert_ne!(shared.config().listen.port(), 1);
}

/// A connection string to pgvigil at `port` as `user`.
fn conninfo(port: u16, user: &str, password: &str) -> String {
    format!("host=127.0.0.1 port={port} user={user} password={password} dbname={APP_DB}")
}

#[tokio::test(flavor = "multi_thread")]
async fn users_added_log_in_removed_ones_cannot_and_open_sessions_go_on() {
    let cluster = test_cluster(0);
    let mut config = test_config(&cluster);
    let md5_user = config.users.pop().expect("the md5 user");
    let file = TempConfig::new(&toml_of(&config));
    let proxy = start_from(&file).await;
    let admin = proxy.running.admin_addr;
    let md5 = conninfo(proxy.addr.port(), MD5_USER, MD5_PASSWORD);
    let Err(refused) = proxy.connect(&md5).await else {
        panic!("not a user yet")
    };
    assert_eq!(refused.code(), Some(&SqlState::INVALID_PASSWORD));

    config.users.push(md5_user);
    rewrite(&file, &config);
    let done: Done = cli(admin, None, &["reload", "--json"])
        .await
        .exits(0)
        .json();
    assert!(
        done.message.contains("users added (app_md5)"),
        "{}",
        done.message
    );
    let session = proxy.connect(&md5).await.expect("an added user logs in");
    assert_eq!(
        value(&session, "SELECT current_user").await.as_deref(),
        Some(MD5_USER)
    );

    config.users.pop();
    rewrite(&file, &config);
    let done: Done = cli(admin, None, &["reload", "--json"])
        .await
        .exits(0)
        .json();
    assert!(
        done.message.contains("users removed (app_md5)"),
        "{}",
        done.message
    );
    let Err(refused) = proxy.connect(&md5).await else {
        panic!("a removed user is refused")
    };
    assert_eq!(refused.code(), Some(&SqlState::INVALID_PASSWORD));
    // Its open session goes on, as in PgBouncer.
    assert_eq!(
        value(&session, "SELECT 'still here'").await.as_deref(),
        Some("still here")
    );
    let app = proxy
        .connect(&conninfo(proxy.addr.port(), APP_USER, APP_PASSWORD))
        .await;
    assert!(app.is_ok(), "the remaining user logs in");
}

/// SIGHUP to the real binary: the file is read again (a user added logs in), and the log says
/// what was applied.
#[tokio::test(flavor = "multi_thread")]
async fn sighup_reloads_the_configuration_of_the_running_binary() {
    let cluster: LocalCluster = test_cluster(0);
    let mut config = test_config(&cluster);
    let md5_user = config.users.pop().expect("the md5 user");
    let file = TempConfig::new(&toml_of(&config));
    let mut child = pgvigil(&["serve", "--config", file.path().to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (port, mut stderr) = listening_port(&mut child).await;
    let md5 = conninfo(port, MD5_USER, MD5_PASSWORD);
    let before = psql_output(&md5, &["-c", "SELECT 1"]).await;
    assert!(
        !before.status.success(),
        "app_md5 logged in before the reload"
    );

    config.users.push(md5_user);
    rewrite(&file, &config);
    let pid = child.id().expect("pgvigil is running") as libc::pid_t;
    // SAFETY: kill only sends a signal to the child we spawned (and still own, so not reaped).
    assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
    let logged = tokio::time::timeout(PATIENCE, async {
        let mut line = String::new();
        loop {
            line.clear();
            if stderr.read_line(&mut line).await.unwrap() == 0 {
                return None;
            }
            if line.contains("configuration reloaded") {
                return Some(line.clone());
            }
        }
    })
    .await
    .expect("no reload in the log within 30 s")
    .expect("pgvigil exited");
    assert!(logged.contains("users added (app_md5)"), "{logged}");
    assert_eq!(psql(&md5, &["-c", "SELECT current_user"]).await, MD5_USER);
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let status = tokio::time::timeout(PATIENCE, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}");
}

/// With transaction pooling, a removed user's open session needs new server connections: it
/// logs in to the node with the password it had when it logged in.
#[tokio::test(flavor = "multi_thread")]
async fn a_removed_users_session_opens_new_server_connections_under_transaction_pooling() {
    let cluster = test_cluster(0);
    let mut config = test_config(&cluster);
    config.pool.mode = PoolMode::Transaction;
    let file = TempConfig::new(&toml_of(&config));
    let proxy = start_from(&file).await;
    let md5 = conninfo(proxy.addr.port(), MD5_USER, MD5_PASSWORD);
    let session = proxy.connect(&md5).await.expect("app_md5 logs in");
    assert_eq!(
        value(&session, "SELECT 1::text").await.as_deref(),
        Some("1")
    );

    config.users.retain(|u| u.name != MD5_USER);
    rewrite(&file, &config);
    cli(proxy.running.admin_addr, None, &["reload"])
        .await
        .exits(0);
    // No idle connection to reuse: the next transaction logs in to the node afresh.
    proxy.running.proxy.pools.discard_idle(0);
    assert_eq!(
        value(&session, "SELECT current_user").await.as_deref(),
        Some(MD5_USER)
    );
}

/// Clients reading and writing through `proxy` until `stop`, each counting into `done`; each
/// returns the first error it got.
async fn load(
    proxy: &TestProxy,
    clients: usize,
    stop: &Arc<AtomicBool>,
    done: &Arc<AtomicUsize>,
) -> Vec<tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>> {
    proxy
        .connect_app()
        .await
        .batch_execute("CREATE TABLE IF NOT EXISTS reload_nodes (n int)")
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for n in 0..clients {
        let client = proxy.connect_app().await;
        let (stop, done) = (stop.clone(), done.clone());
        let n = i32::try_from(n).unwrap();
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                if n % 3 == 0 {
                    client
                        .execute("INSERT INTO reload_nodes VALUES ($1)", &[&n])
                        .await?;
                } else {
                    client.simple_query("SELECT inet_server_port()").await?;
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
            Ok(())
        }));
    }
    tasks
}

/// Stops the load and asserts no client got an error.
async fn no_client_error(
    stop: &AtomicBool,
    tasks: Vec<tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>>,
) {
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        let outcome = tokio::time::timeout(PATIENCE, task).await.unwrap().unwrap();
        assert!(outcome.is_ok(), "a client got an error: {outcome:?}");
    }
}

/// Waits until `done` has moved on by `more` units.
fn load_goes_on(done: &AtomicUsize, more: usize, what: &str) {
    let before = done.load(Ordering::Relaxed);
    eventually(PATIENCE, what, || {
        done.load(Ordering::Relaxed) > before + more
    });
}

/// The status as `pgvigil status --json` prints it.
async fn status(proxy: &TestProxy) -> pgvigil::admin::api::Status {
    cli(proxy.running.admin_addr, None, &["status", "--json"])
        .await
        .exits(0)
        .json()
}

/// Server connections of the application user open on `node` (pgvigil's pools and probes).
fn app_backends(cluster: &LocalCluster, node: usize) -> usize {
    let sql = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE pid <> pg_backend_pid() \
         AND backend_type = 'client backend' AND usename = '{APP_USER}'"
    );
    let out = cluster.psql(node, &sql).unwrap();
    out.parse().unwrap_or_else(|_| panic!("{sql}: {out}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_standby_added_by_reload_under_load_takes_reads_with_no_client_error() {
    let cluster = test_cluster(2);
    let mut config = test_config(&cluster);
    let pg3 = config.nodes.pop().expect("three nodes");
    let file = TempConfig::new(&toml_of(&config));
    let proxy = start_from(&file).await;
    let shared = proxy.running.proxy.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let clients = load(&proxy, 6, &stop, &done).await;
    load_goes_on(&done, 100, "load running");

    config.nodes.push(pg3);
    rewrite(&file, &config);
    let reloaded: Done = cli(proxy.running.admin_addr, None, &["reload", "--json"])
        .await
        .exits(0)
        .json();
    assert!(
        reloaded.message.contains("nodes added (pg3)"),
        "{}",
        reloaded.message
    );
    // Probed, found a standby, caught up: it takes reads.
    eventually(PATIENCE, "pg3 a caught-up standby", || {
        let topology = shared.topology.load();
        let routing = &shared.config().routing;
        topology
            .nodes
            .get(2)
            .is_some_and(|n| n.role == pgvigil::topology::Role::Standby && n.stale.is_none())
            && shared
                .replication
                .load()
                .caught_up(2, 0, routing.max_lag_bytes, routing.max_lag)
    });
    let reader = proxy.connect_app().await;
    let pg3_port = cluster.node(2).port.to_string();
    let mut reached = false;
    for _ in 0..200 {
        if value(&reader, "SELECT inet_server_port()").await.as_deref() == Some(&pg3_port) {
            reached = true;
            break;
        }
    }
    assert!(reached, "no read reached pg3 in 200");
    load_goes_on(&done, 200, "load going on after the reload");
    let seen = status(&proxy).await;
    let node = seen
        .nodes
        .iter()
        .find(|n| n.name == "pg3")
        .expect("pg3 in status");
    assert_eq!(node.role, "standby");
    assert!(shared
        .events
        .list()
        .iter()
        .any(|e| e.node.as_deref() == Some("pg3") && e.message == "node added"));
    no_client_error(&stop, clients).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_standby_removed_by_reload_under_load_is_drained_and_leaves_with_no_client_error() {
    let cluster = test_cluster(2);
    let mut config = test_config(&cluster);
    let file = TempConfig::new(&toml_of(&config));
    let proxy = start_from(&file).await;
    crate::read_split::wait_until_every_node_may_read(&proxy);
    let shared = proxy.running.proxy.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let clients = load(&proxy, 6, &stop, &done).await;
    eventually(PATIENCE, "load running, some of it on pg3", || {
        done.load(Ordering::Relaxed) > 100 && shared.pools.open_count(2) > 0
    });

    config.nodes.pop();
    rewrite(&file, &config);
    let reloaded: Done = cli(proxy.running.admin_addr, None, &["reload", "--json"])
        .await
        .exits(0)
        .json();
    assert!(
        reloaded.message.contains("nodes removed (pg3)"),
        "{}",
        reloaded.message
    );
    // The sessions move at their next statement: drained well before pool.drain_timeout.
    eventually(PATIENCE, "pg3 drained and removed", || {
        eprintln!(
            "DEBUG role {:?} open {} idle {}",
            shared.topology.load().nodes[2].role,
            shared.pools.open_count(2),
            shared.pools.idle_count(2)
        );
        shared.topology.load().nodes[2].role == pgvigil::topology::Role::Removed
    });
    let events = shared.events.list();
    let removed = events
        .iter()
        .rfind(|e| e.node.as_deref() == Some("pg3"))
        .expect("pg3's removal in the event log");
    assert_eq!(removed.message, "node removed: drained");
    eventually(PATIENCE, "no connection of pgvigil's left on pg3", || {
        app_backends(&cluster, 2) == 0
    });
    let seen = status(&proxy).await;
    assert!(
        seen.nodes.iter().all(|n| n.name != "pg3"),
        "pg3 still in status: {:?}",
        seen.nodes
    );
    load_goes_on(&done, 200, "load going on after the removal");
    let pg3_port = cluster.node(2).port.to_string();
    let reader = proxy.connect_app().await;
    for _ in 0..50 {
        let port = value(&reader, "SELECT inet_server_port()").await;
        assert_ne!(
            port.as_deref(),
            Some(pg3_port.as_str()),
            "a read went to pg3"
        );
    }
    no_client_error(&stop, clients).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn removing_the_primary_is_refused_and_the_running_configuration_stays() {
    let cluster = test_cluster(1);
    let config = test_config(&cluster);
    let file = TempConfig::new(&toml_of(&config));
    let proxy = start_from(&file).await;
    let shared = proxy.running.proxy.clone();
    eventually(PATIENCE, "pg1 the primary", || {
        shared.topology.load().primary == pgvigil::topology::Primary::Known(0)
    });

    let mut without_primary = config.clone();
    without_primary.nodes.remove(0);
    without_primary.pool.max_size = 3;
    rewrite(&file, &without_primary);
    let refusal = cli(proxy.running.admin_addr, None, &["reload", "--json"])
        .await
        .refusal();
    assert!(
        refusal
            .refused
            .contains("pg1 is the primary and cannot be removed"),
        "{refusal:?}"
    );
    assert_eq!(shared.config().pool.max_size, config.pool.max_size);
    assert_eq!(shared.config().nodes.len(), 2);
    let seen = status(&proxy).await;
    assert_eq!(seen.primary.as_deref(), Some("pg1"));
    assert!(seen.nodes.iter().all(|n| n.role != "leaving"));

    // Nor may a node keep its name at another address.
    let mut moved = config.clone();
    moved.nodes[1].port = 1;
    rewrite(&file, &moved);
    let refusal = cli(proxy.running.admin_addr, None, &["reload", "--json"])
        .await
        .refusal();
    assert!(
        refusal
            .refused
            .contains("nodes[pg2]: its address cannot change live"),
        "{refusal:?}"
    );
    let client = proxy.connect_app().await;
    assert_eq!(value(&client, "SELECT 'up'").await.as_deref(), Some("up"));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idle_session_on_a_removed_standby_moves_at_its_next_statement() {
    let cluster = test_cluster(1);
    let mut config = test_config(&cluster);
    config.pool.drain_timeout = Duration::from_secs(2);
    let file = TempConfig::new(&toml_of(&config));
    let proxy = start_from(&file).await;
    let shared = proxy.running.proxy.clone();
    eventually(PATIENCE, "pg2 a caught-up standby", || {
        let topology = shared.topology.load();
        let routing = &shared.config().routing;
        topology.primary == pgvigil::topology::Primary::Known(0)
            && topology.nodes[1].role == pgvigil::topology::Role::Standby
            && topology.nodes[1].stale.is_none()
            && shared
                .replication
                .load()
                .caught_up(1, 0, routing.max_lag_bytes, routing.max_lag)
    });
    // Session pooling: this client keeps its connection to pg2 while it sits idle.
    let idle = proxy.connect_app().await;
    let pg2_port = cluster.node(1).port.to_string();
    let mut on_pg2 = false;
    for _ in 0..200 {
        if value(&idle, "SELECT inet_server_port()").await.as_deref() == Some(&pg2_port) {
            on_pg2 = true;
            break;
        }
    }
    assert!(on_pg2, "no read reached pg2 in 200");

    config.nodes.pop();
    rewrite(&file, &config);
    cli(proxy.running.admin_addr, None, &["reload"])
        .await
        .exits(0);
    eventually(PATIENCE, "pg2 removed after pool.drain_timeout", || {
        shared.topology.load().nodes[1].role == pgvigil::topology::Role::Removed
    });
    let removed = shared
        .events
        .list()
        .into_iter()
        .rfind(|e| e.node.as_deref() == Some("pg2"))
        .expect("pg2's removal in the event log");
    assert_eq!(
        removed.message,
        "node removed: 1 server connections still held after pool.drain_timeout are closed"
    );
    eventually(PATIENCE, "no connection of pgvigil's left on pg2", || {
        app_backends(&cluster, 1) == 0
    });
    // Its next statement runs elsewhere, with no error.
    let port = value(&idle, "SELECT inet_server_port()").await;
    assert_eq!(port, Some(cluster.node(0).port.to_string()));
}

/// The authentication request an unknown user gets first (5: md5, 10: SASL).
async fn unknown_user_request(proxy: &TestProxy) -> i32 {
    let mut raw = crate::auth::RawClient::connect(proxy.addr).await;
    let mut startup = bytes::BytesMut::new();
    pgvigil_proto::encode::startup_message(
        &mut startup,
        &[(b"user", b"nobody"), (b"database", APP_DB.as_bytes())],
    );
    raw.send(&startup).await;
    raw.recv().await.auth_code()
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_users_are_asked_for_the_method_most_users_have_after_a_reload_too() {
    let cluster = test_cluster(0);
    let mut config = test_config(&cluster);
    let file = TempConfig::new(&toml_of(&config));
    let proxy = start_from(&file).await;
    // One SCRAM user, one md5 user: a tie goes to SCRAM.
    assert_eq!(unknown_user_request(&proxy).await, 10);

    config.users.retain(|u| u.name == MD5_USER);
    rewrite(&file, &config);
    cli(proxy.running.admin_addr, None, &["reload"])
        .await
        .exits(0);
    assert_eq!(unknown_user_request(&proxy).await, 5);
}

/// Where one extended-protocol read of `reload_where()` ran: the port of its node.
async fn where_read_ran(client: &tokio_postgres::Client) -> u16 {
    let row = client
        .query_one("SELECT reload_where()", &[])
        .await
        .unwrap_or_else(|e| panic!("SELECT reload_where(): {e:?}"));
    let port: i32 = row.get(0);
    u16::try_from(port).expect("a port")
}

/// The classifier remembers what a statement's text is (per data-plane thread, one thread
/// here so that every session shares one memo), yet a reload's function lists decide: a call
/// of a function pgvigil does not know goes to the primary; once `routing.read_functions` names
/// it, the same text, parsed again by a new session, goes to a replica.
#[tokio::test(flavor = "multi_thread")]
async fn a_function_named_a_read_by_reload_sends_the_same_statement_to_the_replicas() {
    let cluster = test_cluster(2);
    let mut config = test_config(&cluster);
    config.threads = 1;
    let file = TempConfig::new(&toml_of(&config));
    let proxy = start_from(&file).await;
    crate::read_split::wait_until_every_node_may_read(&proxy);
    cluster
        .psql_in(
            0,
            APP_DB,
            "CREATE FUNCTION reload_where() RETURNS int LANGUAGE sql \
             AS 'SELECT inet_server_port()'",
        )
        .unwrap_or_else(|e| panic!("{e}"));
    for replica in [1, 2] {
        eventually(PATIENCE, "the function on the replica", || {
            cluster
                .psql_in(
                    replica,
                    APP_DB,
                    "SELECT count(*) FROM pg_proc WHERE proname = 'reload_where'",
                )
                .is_ok_and(|out| out.trim() == "1")
        });
    }
    let primary = cluster.node(0).port;

    let before = proxy.connect_app().await;
    for _ in 0..20 {
        assert_eq!(
            where_read_ran(&before).await,
            primary,
            "an unknown function"
        );
    }
    config.routing.read_functions = vec!["reload_where".into()];
    rewrite(&file, &config);
    cli(proxy.running.admin_addr, None, &["reload"])
        .await
        .exits(0);
    let after = proxy.connect_app().await;
    for _ in 0..20 {
        assert_ne!(where_read_ran(&after).await, primary, "a read function");
    }
}
