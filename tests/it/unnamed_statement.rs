//! The session's unnamed statement under transaction pooling: directly on PostgreSQL it lives
//! until the next Parse of the unnamed statement or simple Query, across transactions, so a
//! unit that binds it may follow the unit that parsed it on another server connection.

use bytes::BytesMut;
use pgvigil::config::PoolMode;
use pgvigil_proto::encode;

use crate::lost_transaction::{one_server_connection, trust_app};
use crate::support::wire::{bind_execute, parse, Answer, Wire};
use crate::support::{start_proxy, test_cluster, TestProxy};

/// The statement the session parses: which backend runs it, and whose it is.
const MINE: &str = "SELECT pg_backend_pid()::text, 'mine'";

/// Parse of the unnamed statement, alone in its unit.
fn parse_alone(sql: &str) -> impl FnOnce(&mut BytesMut) + '_ {
    move |out| {
        parse(out, "", sql);
        encode::sync(out);
    }
}

/// Bind and Execute of the unnamed statement, without a Parse.
fn bind_alone(out: &mut BytesMut) {
    bind_execute(out, "");
    encode::sync(out);
}

/// The backend pid and the value of an answer to [`MINE`].
fn pid_and_value(answer: &Answer) -> (String, String) {
    assert!(answer.errors.is_empty(), "{answer:?}");
    match answer.rows.as_slice() {
        [row] => (row[0].clone(), row[1].clone()),
        _ => panic!("one row expected: {answer:?}"),
    }
}

/// Two other sessions each hold one of the pool's two connections in a transaction block; the
/// one holding a connection that is not `keep` then commits, so that the session's next unit
/// can take only that one (after parsing an unnamed statement of its own there when
/// `theirs`, else running only simple Queries, which drop the unnamed statement). Returns the
/// holder still in its block.
async fn free_all_but(proxy: &TestProxy, keep: &str, theirs: bool) -> Wire {
    let mut holders = Vec::new();
    for _ in 0..2 {
        let mut holder = Wire::login(proxy).await;
        let pid = holder.query("BEGIN; SELECT pg_backend_pid()::text").await;
        assert_eq!(pid.status, b'T', "{pid:?}");
        holders.push((pid.rows[0][0].clone(), holder));
    }
    let at = holders.iter().position(|(pid, _)| pid == keep);
    let at = at.expect("one holder has the session's last connection");
    let (_, mut kept) = holders.swap_remove(at);
    let (_, mut other) = holders.remove(0);
    // Another session's unnamed statement on the connection the session gets next: never the
    // session's to run.
    if theirs {
        let theirs = other
            .exchange(parse_alone("SELECT 'theirs', 'theirs'"))
            .await;
        assert!(theirs.errors.is_empty(), "{theirs:?}");
    }
    assert_eq!(other.query("COMMIT").await.status, b'I');
    // `kept` stays in its block (and on its connection) until the caller drops it.
    let _ = kept.query("SELECT 1").await;
    kept
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unnamed_statement_parsed_in_one_unit_is_bound_in_a_later_one_on_another_connection() {
    let cluster = test_cluster(0);
    let node = std::net::SocketAddr::from(([127, 0, 0, 1], cluster.node(0).port));
    let proxy = start_proxy(&cluster, |config| {
        config.pool.mode = PoolMode::Transaction;
        config.pool.max_size = 2;
        trust_app(config);
    })
    .await;

    // What PostgreSQL answers directly: the statement runs in a later round trip, until a
    // simple Query drops it (26000 then).
    let mut direct = Wire::login_with(node, "postgres", &[]).await;
    assert!(direct.exchange(parse_alone(MINE)).await.errors.is_empty());
    let first = direct.exchange(bind_alone).await;
    let second = direct.exchange(bind_alone).await;
    assert_eq!(pid_and_value(&first).1, "mine");
    assert_eq!(first.kinds, second.kinds);
    let _ = direct.query("SELECT 1").await;
    let dropped = direct.exchange(bind_alone).await;
    assert_eq!(dropped.codes(), vec!["26000"], "{dropped:?}");

    let mut session = Wire::login(&proxy).await;
    let parsed = session.exchange(parse_alone(MINE)).await;
    assert!(parsed.errors.is_empty(), "{parsed:?}");
    let bound = session.exchange(bind_alone).await;
    assert_eq!(bound.kinds, first.kinds, "as directly: {bound:?}");
    let (pid, value) = pid_and_value(&bound);
    assert_eq!(value, "mine");

    // The next unit can only take the other connection, which has another session's unnamed
    // statement.
    let mut holder = free_all_but(&proxy, &pid, true).await;
    let moved = session.exchange(bind_alone).await;
    assert_eq!(moved.kinds, first.kinds, "as directly: {moved:?}");
    let (moved_pid, value) = pid_and_value(&moved);
    assert_ne!(moved_pid, pid, "the connection did not change");
    assert_eq!(value, "mine", "not the session's own statement: {moved:?}");
    assert_eq!(holder.query("COMMIT").await.status, b'I');

    // Back on the first connection, where another session's simple Queries dropped it.
    let holder = free_all_but(&proxy, &moved_pid, false).await;
    let back = session.exchange(bind_alone).await;
    assert_eq!(back.kinds, first.kinds, "as directly: {back:?}");
    assert_eq!(pid_and_value(&back), (pid.clone(), "mine".to_owned()));
    drop(holder);

    // A simple Query drops it, wherever the next unit runs.
    let _ = session.query("SELECT 1").await;
    let dropped = session.exchange(bind_alone).await;
    assert_eq!(dropped.codes(), vec!["26000"], "as directly: {dropped:?}");
    assert_eq!(dropped.status, b'I');
}

#[tokio::test(flavor = "multi_thread")]
async fn a_session_keeps_its_connection_while_its_unnamed_statement_is_too_long_to_keep() {
    let cluster = test_cluster(0);
    let proxy = start_proxy(&cluster, |config| {
        config.pool.mode = PoolMode::Transaction;
        config.pool.max_size = 2;
        trust_app(config);
    })
    .await;
    let mut session = Wire::login(&proxy).await;
    // Longer than pgvigil keeps to prepare it again elsewhere (16 KiB).
    let long = format!("{MINE} /* {} */", "x".repeat(20 * 1024));
    assert!(session.exchange(parse_alone(&long)).await.errors.is_empty());
    let (pid, _) = pid_and_value(&session.exchange(bind_alone).await);
    // Only one connection is free for others: the session keeps its own.
    let mut other = Wire::login(&proxy).await;
    let held = other.query("BEGIN; SELECT pg_backend_pid()::text").await;
    assert_ne!(
        held.rows[0][0], pid,
        "the session's connection was given away"
    );
    let again = session.exchange(bind_alone).await;
    assert_eq!(pid_and_value(&again), (pid.clone(), "mine".to_owned()));
    assert_eq!(other.query("COMMIT").await.status, b'I');
    // Once a simple Query dropped it, the connection goes back to the pool.
    let _ = session.query("SELECT 1").await;
    let mut third = Wire::login(&proxy).await;
    let taken = third.query("BEGIN; SELECT pg_backend_pid()::text").await;
    let mut fourth = Wire::login(&proxy).await;
    let also = fourth.query("BEGIN; SELECT pg_backend_pid()::text").await;
    let pids = [taken.rows[0][0].clone(), also.rows[0][0].clone()];
    assert!(
        pids.contains(&pid),
        "the connection was not given back: {pids:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn another_sessions_simple_query_on_the_shared_connection_does_not_lose_the_unnamed_statement(
) {
    let cluster = test_cluster(0);
    // One server connection: every unit of both sessions runs on it, taken as it is (same
    // startup parameters, no settings), without a reset.
    let proxy = one_server_connection(&cluster, PoolMode::Transaction).await;
    let mut session = Wire::login(&proxy).await;
    let mut other = Wire::login(&proxy).await;
    assert!(session.exchange(parse_alone(MINE)).await.errors.is_empty());
    let (pid, value) = pid_and_value(&session.exchange(bind_alone).await);
    assert_eq!(value, "mine");
    // Its simple Query drops the unnamed statement on the connection.
    assert_eq!(other.query("SELECT 1").await.rows, [["1"]]);
    let again = session.exchange(bind_alone).await;
    assert_eq!(pid_and_value(&again), (pid, "mine".to_owned()), "{again:?}");
}
