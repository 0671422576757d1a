//! Cancel requests through pgvigil reach exactly the backend serving the session that holds the
//! key: a query is cancelled quickly and the session goes on, a wrong key cancels nothing, and
//! cancelling one session leaves the others running.

use std::time::{Duration, Instant};

use pgvigil_proto::encode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_postgres::error::SqlState;
use tokio_postgres::{CancelToken, NoTls, SimpleQueryMessage};

use crate::support::{eventually, start_proxy, test_cluster, LocalCluster, TestProxy};

/// How long anything that should be quick may take on a loaded machine.
const PATIENCE: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread")]
async fn cancel_stops_a_running_query_and_the_session_goes_on() {
    let cluster = test_cluster(0);
    let proxy = start_proxy(&cluster, |_| {}).await;
    let client = proxy.connect_app().await;
    let token = client.cancel_token();

    let sleeping = tokio::spawn(async move {
        let result = client.simple_query("SELECT pg_sleep(60)").await;
        (client, result)
    });
    wait_until_running(&cluster, "SELECT pg_sleep(60)", 1);
    let cancelled_at = Instant::now();
    token.cancel_query(NoTls).await.unwrap();

    let (client, result) = tokio::time::timeout(PATIENCE, sleeping)
        .await
        .expect("the cancelled query did not end")
        .unwrap();
    let error = result.expect_err("the query was cancelled");
    assert_eq!(error.code(), Some(&SqlState::QUERY_CANCELED));
    assert!(
        cancelled_at.elapsed() < Duration::from_secs(10),
        "the cancel took {:?}",
        cancelled_at.elapsed()
    );

    let rows = client.simple_query("SELECT 'still here'").await.unwrap();
    assert_eq!(first_value(&rows), Some("still here"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cancel_request_with_a_wrong_key_cancels_nothing() {
    let cluster = test_cluster(0);
    let proxy = start_proxy(&cluster, |_| {}).await;
    let client = proxy.connect_app().await;
    let (pid, secret) = cancel_key(&client.cancel_token()).await;
    let mut wrong = secret;
    wrong[3] ^= 0x5a;

    let short = tokio::spawn(async move {
        let result = client.simple_query("SELECT pg_sleep(3)").await;
        (client, result)
    });
    wait_until_running(&cluster, "SELECT pg_sleep(3)", 1);
    send_raw_cancel(&proxy, pid, &wrong).await;
    assert!(
        !short.is_finished(),
        "the cancel was sent while the query ran"
    );
    let (client, result) = tokio::time::timeout(PATIENCE, short)
        .await
        .expect("the query did not end")
        .unwrap();
    result.expect("a wrong key must not cancel the query");

    // The same request with the right secret does cancel: only the key made the difference.
    let long = tokio::spawn(async move { client.simple_query("SELECT pg_sleep(60)").await });
    wait_until_running(&cluster, "SELECT pg_sleep(60)", 1);
    send_raw_cancel(&proxy, pid, &secret).await;
    let error = tokio::time::timeout(PATIENCE, long)
        .await
        .expect("the cancelled query did not end")
        .unwrap()
        .expect_err("the right key cancels");
    assert_eq!(error.code(), Some(&SqlState::QUERY_CANCELED));
}

#[tokio::test(flavor = "multi_thread")]
async fn cancelling_one_session_leaves_another_running() {
    let cluster = test_cluster(0);
    let proxy = start_proxy(&cluster, |_| {}).await;
    let victim = proxy.connect_app().await;
    let bystander = proxy.connect_app().await;
    let token = victim.cancel_token();

    let cancelled = tokio::spawn(async move { victim.simple_query("SELECT pg_sleep(60)").await });
    let untouched = tokio::spawn(async move {
        bystander
            .simple_query("SELECT pg_sleep(5), 'finished'")
            .await
    });
    wait_until_running(&cluster, "SELECT pg_sleep(60)", 1);
    wait_until_running(&cluster, "SELECT pg_sleep(5), 'finished'", 1);
    token.cancel_query(NoTls).await.unwrap();

    let error = tokio::time::timeout(PATIENCE, cancelled)
        .await
        .expect("the cancelled query did not end")
        .unwrap()
        .expect_err("the victim's query was cancelled");
    assert_eq!(error.code(), Some(&SqlState::QUERY_CANCELED));
    let rows = tokio::time::timeout(PATIENCE, untouched)
        .await
        .expect("the other query did not end")
        .unwrap()
        .expect("the other session's query is not cancelled");
    let finished = rows.iter().find_map(|m| match m {
        SimpleQueryMessage::Row(row) => row.get(1),
        _ => None,
    });
    assert_eq!(finished, Some("finished"));
}

/// Waits until `count` backends are running exactly `sql`.
fn wait_until_running(cluster: &LocalCluster, sql: &str, count: usize) {
    let check = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query = $q${sql}$q$"
    );
    tokio::task::block_in_place(|| {
        eventually(PATIENCE, &format!("{sql} is running"), || {
            cluster.psql(0, &check).unwrap() == count.to_string()
        })
    });
}

/// The (process id, secret) pgvigil gave this client, read from the CancelRequest tokio-postgres
/// would send (layout: length, code, pid, secret; PostgreSQL docs, "CancelRequest").
async fn cancel_key(token: &CancelToken) -> (u32, [u8; 4]) {
    let (ours, mut theirs) = tokio::io::duplex(64);
    token.cancel_query_raw(ours, NoTls).await.unwrap();
    let mut packet = Vec::new();
    theirs.read_to_end(&mut packet).await.unwrap();
    assert_eq!(packet.len(), 16, "a CancelRequest is 16 bytes");
    let pid = u32::from_be_bytes(packet[8..12].try_into().unwrap());
    (pid, packet[12..16].try_into().unwrap())
}

/// Sends a CancelRequest for (`pid`, `secret`) to pgvigil over a fresh TCP connection.
async fn send_raw_cancel(proxy: &TestProxy, pid: u32, secret: &[u8]) {
    let mut packet = bytes::BytesMut::new();
    encode::cancel_request(&mut packet, pid, secret);
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream.write_all(&packet).await.unwrap();
    // pgvigil, like PostgreSQL, answers a CancelRequest only by closing the connection.
    let mut rest = Vec::new();
    tokio::time::timeout(PATIENCE, stream.read_to_end(&mut rest))
        .await
        .expect("pgvigil did not close the cancel connection")
        .unwrap();
    assert!(rest.is_empty(), "a CancelRequest gets no answer");
}

fn first_value(messages: &[SimpleQueryMessage]) -> Option<&str> {
    messages.iter().find_map(|m| match m {
        SimpleQueryMessage::Row(row) => row.get(0),
        _ => None,
    })
}
