//! The cluster fixture itself: replication, logins, crashes and cleanup behave as tests assume.

use std::io::ErrorKind;
use std::net::{Ipv4Addr, TcpStream};
use std::time::Duration;

use tokio_postgres::NoTls;

use crate::support::{
    self, eventually, node_psql, test_cluster, ClusterSpec, APP_DB, APP_PASSWORD, APP_USER,
    MD5_PASSWORD, MD5_USER,
};

const WAIT: Duration = Duration::from_secs(30);

fn refuses_connections(port: u16) -> bool {
    TcpStream::connect((Ipv4Addr::LOCALHOST, port))
        .is_err_and(|e| e.kind() == ErrorKind::ConnectionRefused)
}

#[test]
fn row_written_on_primary_reaches_both_replicas_and_drop_removes_everything() {
    let cluster = test_cluster(2);
    let names: Vec<&str> = cluster.nodes().iter().map(|n| n.name.as_str()).collect();
    assert_eq!(names, ["pg1", "pg2", "pg3"]);
    assert_eq!(
        node_psql(
            &cluster,
            0,
            "SELECT string_agg(application_name, ',' ORDER BY 1) FROM pg_stat_replication"
        ),
        "pg2,pg3"
    );
    assert_eq!(node_psql(&cluster, 1, "SELECT pg_is_in_recovery()"), "t");
    assert!(node_psql(&cluster, 2, "SHOW primary_conninfo").contains("application_name=pg3"));

    node_psql(
        &cluster,
        0,
        "CREATE TABLE fixture(id int); INSERT INTO fixture VALUES (42)",
    );
    for replica in [1, 2] {
        eventually(WAIT, "the row reaches the replica", || {
            cluster
                .psql(replica, "SELECT id FROM fixture")
                .is_ok_and(|out| out == "42")
        });
    }

    let base_dir = cluster.base_dir().to_path_buf();
    let pids: Vec<u32> = cluster.nodes().iter().filter_map(|n| n.pid()).collect();
    assert_eq!(pids.len(), 3);
    drop(cluster);
    assert!(
        !base_dir.exists(),
        "{} survived the drop",
        base_dir.display()
    );
    for pid in pids {
        assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists() || is_zombie(pid));
    }
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
    })
}

#[tokio::test]
async fn app_users_log_in_over_tcp_and_a_wrong_password_is_refused() {
    let cluster = test_cluster(0);
    let primary = cluster.node(0);

    let (client, connection) =
        tokio_postgres::connect(&primary.conninfo(APP_USER, APP_PASSWORD, APP_DB), NoTls)
            .await
            .unwrap_or_else(|e| panic!("app login: {e}"));
    tokio::spawn(connection);
    let row = client
        .query_one("SELECT current_user, current_database()", &[])
        .await
        .unwrap_or_else(|e| panic!("query as app: {e}"));
    assert_eq!(
        (row.get::<_, String>(0), row.get::<_, String>(1)),
        (APP_USER.into(), APP_DB.into())
    );

    let (md5_client, md5_connection) =
        tokio_postgres::connect(&primary.conninfo(MD5_USER, MD5_PASSWORD, APP_DB), NoTls)
            .await
            .unwrap_or_else(|e| panic!("md5 login: {e}"));
    tokio::spawn(md5_connection);
    let stored = node_psql(
        &cluster,
        0,
        &format!("SELECT left(rolpassword, 3) FROM pg_authid WHERE rolname = '{MD5_USER}'"),
    );
    assert_eq!(stored, "md5");
    md5_client
        .simple_query("SELECT 1")
        .await
        .unwrap_or_else(|e| panic!("query as app_md5: {e}"));

    let refused =
        tokio_postgres::connect(&primary.conninfo(APP_USER, "wrong", APP_DB), NoTls).await;
    let error = refused
        .err()
        .unwrap_or_else(|| panic!("a wrong password was accepted"));
    assert_eq!(
        error.as_db_error().map(|e| e.code().code()),
        Some("28P01"),
        "expected invalid_password, got {error}"
    );
}

#[test]
fn killed_replica_refuses_connections_until_started_and_then_streams_again() {
    let mut cluster = test_cluster(1);
    let port = cluster.node(1).port;

    cluster.node_mut(1).kill9();
    assert!(!cluster.node(1).is_running());
    assert!(
        refuses_connections(port),
        "port {port} still accepts after kill -9"
    );

    cluster
        .node_mut(1)
        .start()
        .unwrap_or_else(|e| panic!("restart after kill -9: {e}"));
    assert_eq!(node_psql(&cluster, 1, "SELECT pg_is_in_recovery()"), "t");
    eventually(WAIT, "the restarted replica streams again", || {
        cluster
            .psql(
                0,
                "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'",
            )
            .is_ok_and(|n| n == "1")
    });
}

#[tokio::test]
async fn frozen_primary_hangs_logins_until_thawed() {
    let mut cluster = test_cluster(0);
    let conninfo = cluster.node(0).conninfo(APP_USER, APP_PASSWORD, APP_DB);

    cluster.node_mut(0).freeze();
    assert!(
        cluster.node(0).is_running(),
        "a frozen postmaster is still a live process"
    );
    assert!(
        !refuses_connections(cluster.node(0).port),
        "the kernel still completes TCP handshakes for a frozen server"
    );
    let hung = tokio::time::timeout(
        Duration::from_secs(2),
        tokio_postgres::connect(&conninfo, NoTls),
    )
    .await;
    assert!(hung.is_err(), "a login to a frozen server completed");

    cluster.node_mut(0).thaw();
    let (client, connection) = tokio_postgres::connect(&conninfo, NoTls)
        .await
        .unwrap_or_else(|e| panic!("login after thaw: {e}"));
    tokio::spawn(connection);
    client
        .simple_query("SELECT 1")
        .await
        .unwrap_or_else(|e| panic!("query after thaw: {e}"));
}

#[test]
fn sync_replication_makes_the_standby_synchronous() {
    let cluster = support::start(
        ClusterSpec::new(support::fresh_base_dir())
            .replicas(1)
            .sync_replication(true)
            .conf("work_mem", "8MB"),
    );
    assert_eq!(
        node_psql(&cluster, 0, "SHOW synchronous_standby_names"),
        "*"
    );
    assert_eq!(
        node_psql(&cluster, 0, "SELECT sync_state FROM pg_stat_replication"),
        "sync"
    );
    assert_eq!(node_psql(&cluster, 1, "SHOW work_mem"), "8MB");
    node_psql(&cluster, 0, "CREATE TABLE committed_on_two_nodes(id int)");
}
