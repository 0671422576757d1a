//! A session survives a lost connection only with what pgvigil can replay (issue 9): settings
//! that took effect (SET, constant `set_config(..., false)`) come back on the new connection, a
//! SET whose transaction rolled back does not, and a session that did what cannot be replayed
//! (DO, a session advisory lock, a WITH HOLD cursor, a temporary table) ends as it would on
//! PostgreSQL, with a FATAL error and a closed connection, in either pool mode. A named statement
//! is what its successful Parse made it: one refused (42P05) changes nothing.

use std::time::{Duration, Instant};

use pgvigil::config::PoolMode;
use pgvigil::topology::NodeId;
use pgvigil_proto::encode;
use tokio_postgres::Client;

use crate::lost_transaction::{restart, trust_app, trusted_proxy};
use crate::support::wire::{bind_execute, parse, Wire};
use crate::support::{start_proxy, test_cluster, value, LocalCluster, TestProxy};

const PRIMARY: NodeId = 0;

/// Bound on anything the proxy or the nodes must get to on a loaded machine.
const PATIENCE: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread")]
async fn settings_that_took_effect_are_replayed_and_rolled_back_ones_are_not() {
    let mut cluster = test_cluster(0);
    let proxy = start_proxy(&cluster, |_| {}).await;
    let client = proxy.connect_app().await;
    client
        .batch_execute("SELECT set_config('search_path', 'by_set_config, public', false)")
        .await
        .unwrap();
    client
        .batch_execute("SELECT set_config('work_mem', '7MB', true)")
        .await
        .unwrap();
    client.batch_execute("BEGIN").await.unwrap();
    client
        .batch_execute("SET application_name = 'rolled back'")
        .await
        .unwrap();
    client.batch_execute("ROLLBACK").await.unwrap();
    client.batch_execute("BEGIN").await.unwrap();
    client
        .batch_execute("SET statement_timeout = '42s'")
        .await
        .unwrap();
    client
        .batch_execute("SET LOCAL idle_in_transaction_session_timeout = '43s'")
        .await
        .unwrap();
    client.batch_execute("COMMIT").await.unwrap();
    client
        .batch_execute("SET lock_timeout = 'not a duration'")
        .await
        .expect_err("an invalid value is refused");

    restart(&mut cluster, &proxy, PRIMARY);

    assert_eq!(show(&client, "search_path").await, "by_set_config, public");
    assert_eq!(show(&client, "statement_timeout").await, "42s");
    assert_eq!(show(&client, "application_name").await, "");
    assert_eq!(
        show(&client, "work_mem").await,
        "4MB",
        "set_config(.., true) is local"
    );
    assert_eq!(show(&client, "lock_timeout").await, "0");
    assert_eq!(
        show(&client, "idle_in_transaction_session_timeout").await,
        "0",
        "SET LOCAL is never replayed"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_session_holding_what_cannot_be_replayed_ends_when_its_connection_is_lost() {
    unreplayable_state_ends_the_session_with_its_connection(PoolMode::Session).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_session_holding_what_cannot_be_replayed_ends_when_its_connection_is_lost_under_transaction_pooling(
) {
    unreplayable_state_ends_the_session_with_its_connection(PoolMode::Transaction).await;
}

/// In pool `mode`, sessions that did what pgvigil cannot replay on another connection are told
/// FATAL 08006 and closed when their node restarts, as PostgreSQL closes its own; a plain session
/// (whose writes call only known functions) goes on.
async fn unreplayable_state_ends_the_session_with_its_connection(mode: PoolMode) {
    let mut cluster = test_cluster(0);
    let proxy = trusted_proxy(&cluster, mode).await;
    let mut plain = Wire::login(&proxy).await;
    for sql in [
        "CREATE TABLE held_rows (i int PRIMARY KEY)",
        // A function of the user's, on no list, that leaves a session lock behind.
        "CREATE FUNCTION lock_and_return(i int) RETURNS int LANGUAGE sql \
         AS $$ SELECT pg_advisory_lock(i); SELECT i $$",
        "INSERT INTO held_rows (i) VALUES (abs(-1)) ON CONFLICT (i) DO NOTHING",
    ] {
        let answer = plain.query(sql).await;
        assert!(answer.errors.is_empty(), "{sql}: {answer:?}");
    }
    let statements = [
        "DO $$ BEGIN PERFORM set_config('application_name', 'by DO', false); END $$",
        "SELECT pg_advisory_lock(9)",
        "BEGIN; DECLARE held CURSOR WITH HOLD FOR SELECT 1; COMMIT",
        "SELECT set_config('search_path', current_setting('search_path'), false)",
        "CREATE TEMPORARY TABLE held (i int)",
        "INSERT INTO held_rows (i) VALUES (lock_and_return(8))",
        "UPDATE held_rows SET i = lock_and_return(i + 10) WHERE i = 1",
    ];
    holders_end_with_their_connection(&mut cluster, &proxy, &mut plain, &statements).await;
}

/// Each of `statements` is run by a session of its own through `proxy`; after the primary
/// restarts, each of those sessions is told FATAL 08006 and closed, and `plain`, which ran none,
/// goes on.
pub(crate) async fn holders_end_with_their_connection(
    cluster: &mut LocalCluster,
    proxy: &TestProxy,
    plain: &mut Wire,
    statements: &[&str],
) {
    let mut holders = Vec::new();
    for &sql in statements {
        let mut wire = Wire::login(proxy).await;
        let answer = wire.query(sql).await;
        assert!(answer.errors.is_empty(), "{sql}: {answer:?}");
        holders.push((sql, wire));
    }

    restart(cluster, proxy, PRIMARY);

    for (sql, wire) in &mut holders {
        assert_eq!(
            wire.last_words().await,
            Some(vec!["FATAL 08006".to_owned()]),
            "the session after {sql:?} (None: it goes on)"
        );
    }
    assert_eq!(
        plain.query("SELECT 'survived'").await.rows,
        [["survived"]],
        "a session without such state goes on"
    );
}

/// The value of setting `name` in `client`'s session.
async fn show(client: &Client, name: &str) -> String {
    value(client, &format!("SHOW {name}"))
        .await
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_named_parse_refused_for_a_name_in_use_leaves_the_statement_as_it_was() {
    let cluster = test_cluster(1);
    let proxy = start_proxy(&cluster, trust_app).await;
    let primary = cluster.node(PRIMARY).port.to_string();
    let replica = cluster.node(1).port.to_string();
    let mut wire = Wire::login(&proxy).await;
    // Reads reach the replica once pgvigil has seen it streaming.
    let give_up = Instant::now() + PATIENCE;
    while wire.query("SELECT inet_server_port()").await.rows != vec![vec![replica.clone()]] {
        assert!(Instant::now() < give_up, "no read reached the replica");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let first = wire
        .exchange(|out| {
            parse(out, "s1", "SELECT 'one', inet_server_port()");
            bind_execute(out, "s1");
            encode::sync(out);
        })
        .await;
    assert!(first.errors.is_empty(), "{:?}", first.errors);
    assert_eq!(first.rows, vec![vec!["one".to_owned(), replica]]);

    // The name is in use: the node refuses the Parse, and s1 stays what it was.
    let again = wire
        .exchange(|out| {
            parse(out, "s1", "SELECT 'two', inet_server_port()");
            encode::sync(out);
        })
        .await;
    assert_eq!(again.codes(), vec!["42P05"]);

    // In a transaction block on the primary, s1 is prepared there from the session's record.
    assert!(wire.query("BEGIN").await.errors.is_empty());
    let on_primary = wire
        .exchange(|out| {
            bind_execute(out, "s1");
            encode::sync(out);
        })
        .await;
    assert!(on_primary.errors.is_empty(), "{:?}", on_primary.errors);
    assert_eq!(on_primary.rows, vec![vec!["one".to_owned(), primary]]);
    assert!(wire.query("ROLLBACK").await.errors.is_empty());
}
