//! RESET ALL and DISCARD ALL under transaction pooling: a session that resets returns to its own
//! startup values, as it would on PostgreSQL directly, and touches no other session sharing
//! its server connection. A reset pgvigil cannot run itself pins the session.

use bytes::BufMut;
use pgvigil::config::PoolMode;
use pgvigil_proto::encode;
use tokio_postgres::error::SqlState;
use tokio_postgres::Client;

use crate::lost_transaction::{one_server_connection, trust_app};
use crate::support::wire::{bind_execute, parse, Wire};
use crate::support::{start_proxy, test_cluster, TestProxy, APP_DB, APP_PASSWORD, APP_USER};
use crate::transaction_pooling::simple_value;

/// Transaction pooling over one server connection: every unit of every session runs on it.
async fn one_shared_connection() -> (TestProxy, crate::support::LocalCluster) {
    let cluster = test_cluster(0);
    let proxy = start_proxy(&cluster, |config| {
        config.pool.mode = PoolMode::Transaction;
        config.pool.max_size = 1;
    })
    .await;
    (proxy, cluster)
}

/// Connects through pgvigil with `application_name` as a startup parameter.
async fn named(proxy: &TestProxy, name: &str) -> Client {
    let conninfo = format!(
        "{} application_name={name}",
        proxy.conninfo(APP_USER, APP_PASSWORD, APP_DB)
    );
    proxy
        .connect(&conninfo)
        .await
        .unwrap_or_else(|e| panic!("could not connect through pgvigil: {e}"))
}

/// application_name, statement_timeout and the backend's pid.
const ASK: &str = "SELECT current_setting('application_name') || ' ' || \
                   current_setting('statement_timeout') || ' ' || pg_backend_pid()";

/// The settings part of [`ASK`]'s answer, and the pid.
async fn settings_and_pid(client: &Client) -> (String, String) {
    let answer = simple_value(client, ASK).await;
    let (settings, pid) = answer.rsplit_once(' ').unwrap();
    (settings.to_owned(), pid.to_owned())
}

#[tokio::test(flavor = "multi_thread")]
async fn reset_all_and_discard_all_return_only_their_own_session_to_its_startup_values() {
    let (proxy, _cluster) = one_shared_connection().await;
    let a = named(&proxy, "from-a").await;
    let b = named(&proxy, "from-b").await;
    for (client, who, timeout) in [(&a, "a", "7s"), (&b, "b", "8s")] {
        client
            .batch_execute(&format!("SET application_name = 'set-{who}'"))
            .await
            .unwrap();
        client
            .batch_execute(&format!("SET statement_timeout = '{timeout}'"))
            .await
            .unwrap();
    }
    let (_, pid_a) = settings_and_pid(&a).await;
    let (_, pid_b) = settings_and_pid(&b).await;
    assert_eq!(
        pid_a, pid_b,
        "both sessions share the one server connection"
    );

    a.batch_execute("RESET ALL").await.unwrap();
    assert_eq!(
        settings_and_pid(&a).await.0,
        "from-a 0",
        "A after its RESET ALL"
    );
    assert_eq!(
        settings_and_pid(&b).await.0,
        "set-b 8s",
        "B after A's RESET ALL"
    );
    assert_eq!(settings_and_pid(&a).await.0, "from-a 0", "A after B's turn");

    b.batch_execute("DISCARD ALL").await.unwrap();
    assert_eq!(
        settings_and_pid(&b).await.0,
        "from-b 0",
        "B after its DISCARD ALL"
    );
    a.batch_execute("SET statement_timeout = '9s'")
        .await
        .unwrap();
    assert_eq!(
        settings_and_pid(&a).await.0,
        "from-a 9s",
        "A after B's DISCARD ALL"
    );
    assert_eq!(settings_and_pid(&b).await.0, "from-b 0", "B after A's turn");

    // A setting made after a reset is replayed after another session's turn.
    b.batch_execute("SET application_name = 'again-b'")
        .await
        .unwrap();
    assert_eq!(settings_and_pid(&a).await.0, "from-a 9s");
    assert_eq!(settings_and_pid(&b).await.0, "again-b 0");
}

/// The server connection's prepared statements, by name with the time each was prepared.
const PREPARED: &str = "SELECT string_agg(name || ' ' || prepare_time::text, ', ' ORDER BY name) \
                        FROM pg_prepared_statements";

#[tokio::test(flavor = "multi_thread")]
async fn discard_all_drops_the_sessions_own_prepared_statements_and_no_others() {
    let (proxy, _cluster) = one_shared_connection().await;
    let a = proxy.connect_app().await;
    let b = proxy.connect_app().await;
    let mine = a.prepare("SELECT 1::int").await.unwrap();
    let theirs = b.prepare("SELECT 2::int").await.unwrap();
    assert_eq!(a.query_one(&mine, &[]).await.unwrap().get::<_, i32>(0), 1);
    assert_eq!(b.query_one(&theirs, &[]).await.unwrap().get::<_, i32>(0), 2);
    let before = simple_value(&b, PREPARED).await;

    // Inside a transaction block PostgreSQL refuses it, and the block fails.
    a.batch_execute("BEGIN").await.unwrap();
    let refused = a.batch_execute("DISCARD ALL").await.unwrap_err();
    assert_eq!(refused.code(), Some(&SqlState::ACTIVE_SQL_TRANSACTION));
    a.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(a.query_one(&mine, &[]).await.unwrap().get::<_, i32>(0), 1);

    a.batch_execute("DISCARD ALL").await.unwrap();
    let gone = a.query_one(&mine, &[]).await.unwrap_err();
    assert_eq!(
        gone.code(),
        Some(&SqlState::INVALID_SQL_STATEMENT_NAME),
        "A's statement is gone: {gone}"
    );
    assert_eq!(b.query_one(&theirs, &[]).await.unwrap().get::<_, i32>(0), 2);
    assert_eq!(
        simple_value(&b, PREPARED).await,
        before,
        "B's statement neither dropped nor prepared again on the shared connection"
    );
}

/// What a client sees of one answer: every message's type, tags, reported parameters
/// (sorted: their order means nothing), SQLSTATEs, rows and the ReadyForQuery status.
type Seen = (
    Vec<u8>,
    Vec<String>,
    Vec<(String, String)>,
    Vec<String>,
    Vec<Vec<String>>,
    u8,
);

/// How a test sends a statement.
#[derive(Debug, Clone, Copy)]
enum Send {
    /// A simple Query.
    Simple,
    /// Parse, Bind, Describe of this kind if any, Execute, Sync, all unnamed.
    Extended(Option<u8>),
}

async fn seen(wire: &mut Wire, sql: &str, send: Send) -> Seen {
    let mut answer = match send {
        Send::Simple => wire.query(sql).await,
        Send::Extended(describe) => {
            wire.exchange(|out| {
                parse(out, "", sql);
                bind_execute(out, "");
                let execute = out.split_off(out.len() - 10);
                if let Some(kind) = describe {
                    encode::message(out, b'D', |b| {
                        b.put_u8(kind);
                        b.put_u8(0);
                    });
                }
                out.unsplit(execute);
                encode::sync(out);
            })
            .await
        }
    };
    answer.params.sort();
    // ParameterStatus messages are compared by content, above.
    let mut kinds = answer.kinds.clone();
    kinds.retain(|&k| k != b'S');
    let codes = answer.codes().into_iter().map(str::to_owned).collect();
    (
        kinds,
        answer.tags,
        answer.params,
        codes,
        answer.rows,
        answer.status,
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_sees_exactly_what_postgresql_shows_it_for_resets_in_both_pool_modes() {
    let cluster = test_cluster(0);
    let startup: [(&[u8], &[u8]); 2] = [
        (b"application_name", b"from-startup"),
        (b"DateStyle", b"ISO, DMY"),
    ];
    let steps = [
        "SET application_name = 'changed'",
        "RESET application_name",
        "SET application_name = 'changed'",
        "SET application_name TO DEFAULT",
        "SET application_name = 'changed'",
        "SET DateStyle = 'German'",
        "RESET ALL",
        "RESET ALL",
        "SET application_name = 'changed'",
        "DISCARD ALL",
        "BEGIN",
        "SET application_name = 'in-block'",
        "RESET ALL",
        "SHOW application_name",
        "ROLLBACK",
        "SHOW application_name",
        "BEGIN",
        "DISCARD ALL",
        "RESET ALL",
        "ROLLBACK",
        "RESET no_such_setting",
        // SET LOCAL ... DEFAULT: the startup value until the block ends, then the session's.
        "SET application_name = 'changed'",
        "BEGIN",
        "SET LOCAL application_name TO DEFAULT",
        "SHOW application_name",
        "SET DateStyle = 'German'",
        "SET LOCAL DateStyle = DEFAULT",
        "SHOW DateStyle",
        "COMMIT",
        "SHOW application_name",
        "SET LOCAL application_name TO DEFAULT",
        "SELECT current_setting('application_name'), current_setting('DateStyle')",
    ];
    let node = std::net::SocketAddr::from(([127, 0, 0, 1], cluster.node(0).port));
    let sends = [
        Send::Simple,
        Send::Extended(Some(b'P')),
        Send::Extended(Some(b'S')),
        Send::Extended(None),
    ];
    let mut expected = Vec::new();
    for send in sends {
        let mut direct = Wire::login_with(node, "postgres", &startup).await;
        for sql in steps {
            expected.push(seen(&mut direct, sql, send).await);
        }
    }
    for mode in [PoolMode::Session, PoolMode::Transaction] {
        let proxy = one_server_connection(&cluster, mode).await;
        let mut expected = expected.iter();
        for send in sends {
            let mut through = Wire::login_with(proxy.addr, APP_USER, &startup).await;
            for sql in steps {
                let got = seen(&mut through, sql, send).await;
                assert_eq!(Some(&got), expected.next(), "{mode:?}, {send:?}: {sql}");
            }
        }
    }
}

/// How a test session runs a statement that pgvigil cannot run for it.
#[derive(Debug, Clone, Copy)]
enum Unrun {
    /// `RESET ALL` prepared as a named statement, executed in a later unit.
    NamedReset,
    /// `RESET ALL` in a string of statements.
    InString,
    /// `RESET ALL` as the unnamed statement, in a unit that goes on after it.
    InPipeline,
}

/// application_name and the backend's pid, as one row.
const NAME_AND_PID: &str = "SELECT current_setting('application_name') || ' ' || pg_backend_pid()";

#[tokio::test(flavor = "multi_thread")]
async fn a_reset_pgvigil_cannot_run_itself_is_never_undone_by_a_replay() {
    let cluster = test_cluster(0);
    let startup: [(&[u8], &[u8]); 1] = [(b"application_name", b"from-startup")];
    for mode in [PoolMode::Session, PoolMode::Transaction] {
        // Two connections: B gets the one A used, so that A's settings must be rebuilt on it,
        // unless A is pinned (then B opens the other).
        let proxy = start_proxy(&cluster, |config| {
            config.pool.mode = mode;
            config.pool.max_size = 2;
            trust_app(config);
        })
        .await;
        let unruns = [Unrun::NamedReset, Unrun::InString, Unrun::InPipeline];
        for unrun in unruns {
            let mut a = Wire::login_with(proxy.addr, APP_USER, &startup).await;
            if let Unrun::NamedReset = unrun {
                a.exchange(|out| {
                    parse(out, "reset", "RESET ALL");
                    encode::sync(out);
                })
                .await;
            }
            a.query("SET application_name = 'changed'").await;
            let ran = match unrun {
                Unrun::NamedReset => {
                    a.exchange(|out| {
                        bind_execute(out, "reset");
                        encode::sync(out);
                    })
                    .await
                }
                Unrun::InString => a.query("SELECT 1; RESET ALL").await,
                Unrun::InPipeline => {
                    a.exchange(|out| {
                        parse(out, "", "RESET ALL");
                        bind_execute(out, "");
                        parse(out, "", "SELECT 1");
                        bind_execute(out, "");
                        encode::sync(out);
                    })
                    .await
                }
            };
            assert!(
                ran.errors.is_empty(),
                "{mode:?}, {unrun:?}: {:?}",
                ran.errors
            );
            let before = a.query(NAME_AND_PID).await.rows;
            let mut b = Wire::login_at(proxy.addr).await;
            b.query("SET application_name = 'b'").await;
            let after = a.query(NAME_AND_PID).await.rows;
            assert_eq!(after, before, "{mode:?}, {unrun:?}: A after B's turn");
            // PostgreSQL would show from-startup; the server's own default is what a pooled
            // connection can give (see `session::reset`).
            let name = after[0][0].rsplit_once(' ').map(|(name, _)| name);
            assert_eq!(name, Some(""), "{mode:?}, {unrun:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_named_setting_run_again_in_a_later_unit_is_replayed_in_its_turn() {
    let cluster = test_cluster(0);
    let proxy = one_server_connection(&cluster, PoolMode::Transaction).await;
    let mut a = Wire::login_at(proxy.addr).await;
    let mut b = Wire::login_at(proxy.addr).await;
    a.exchange(|out| {
        parse(out, "reset", "RESET statement_timeout");
        parse(out, "eight", "SET statement_timeout = '8s'");
        encode::sync(out);
    })
    .await;
    for (set, run, expected) in [("7s", "reset", "0"), ("9s", "eight", "8s")] {
        a.query(&format!("SET statement_timeout = '{set}'")).await;
        let ran = a
            .exchange(|out| {
                bind_execute(out, run);
                encode::sync(out);
            })
            .await;
        assert!(ran.errors.is_empty(), "{run}: {:?}", ran.errors);
        // B's turn on the one connection: A's settings are replayed on its next.
        b.query("SET statement_timeout = '1s'").await;
        let shown = a.query("SHOW statement_timeout").await.rows;
        assert_eq!(shown, [[expected]], "after {run} and B's turn");
    }
}
