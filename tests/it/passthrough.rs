//! Everything a client does passes through pgvigil unchanged: the simple and extended query
//! protocols (pipelines, prepared statements, portals), COPY both ways, notifications and notices,
//! errors inside transactions, large results streamed without buffering, fastpath function calls,
//! non-UTF-8 client encodings, and Terminate handing the server connection back to the pool.

use std::io::Write as _;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::Type;
use tokio_postgres::{AsyncMessage, Client, NoTls, SimpleQueryMessage};

use crate::lost_transaction::trust_app;
use crate::support::binary::ProxyProcess;
use crate::support::{
    eventually, start_proxy, test_cluster, test_config, LocalCluster, TestProxy, APP_DB,
    APP_PASSWORD, APP_USER,
};

/// How long anything that should be quick may take on a loaded machine.
const PATIENCE: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread")]
async fn simple_and_extended_queries_reach_the_primary() {
    let cluster = test_cluster(1);
    // The replica takes no reads here (weight 0): everything reaches the primary.
    let proxy = start_proxy(&cluster, |config| config.nodes[1].weight = 0).await;
    let client = proxy.connect_app().await;

    let rows = client.simple_query("SELECT 1; SELECT 2").await.unwrap();
    assert_eq!(simple_values(&rows), ["1", "2"]);

    let port: i32 = client
        .query_one("SELECT inet_server_port()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        port as u16,
        cluster.node(0).port,
        "sessions go to the primary"
    );
    let sum: i32 = client
        .query_one("SELECT $1::int + $2::int", &[&40, &2])
        .await
        .unwrap()
        .get(0);
    assert_eq!(sum, 42);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_prepared_statement_is_described_reused_and_closed() {
    let cluster = test_cluster(0);
    let proxy = start_proxy(&cluster, |_| {}).await;
    let client = proxy.connect_app().await;

    // Parse + Describe + Sync: the client learns parameter and column types from the server.
    let doubled = client
        .prepare("SELECT $1::int * 2 AS doubled, $2::text AS label")
        .await
        .unwrap();
    assert_eq!(doubled.params(), [Type::INT4, Type::TEXT]);
    let columns: Vec<&str> = doubled.columns().iter().map(|c| c.name()).collect();
    assert_eq!(columns, ["doubled", "label"]);

    // Bind + Execute + Sync, three times on the same named statement.
    for n in 1..=3 {
        let row = client.query_one(&doubled, &[&n, &"twice"]).await.unwrap();
        assert_eq!(row.get::<_, i32>("doubled"), 2 * n);
        assert_eq!(row.get::<_, &str>("label"), "twice");
    }
    let open = "SELECT count(*) FROM pg_prepared_statements WHERE statement LIKE '%AS doubled%'";
    assert_eq!(
        simple_values(&client.simple_query(open).await.unwrap()),
        ["1"]
    );

    // Dropping the statement sends Close + Sync; the server forgets it.
    drop(doubled);
    assert_eq!(
        simple_values(&client.simple_query(open).await.unwrap()),
        ["0"]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn pipelined_queries_each_get_their_own_answer_even_when_one_fails() {
    let cluster = test_cluster(0);
    let proxy = start_proxy(&cluster, |_| {}).await;
    let client = proxy.connect_app().await;
    let divide = client.prepare("SELECT $1::int / $2::int").await.unwrap();

    // Polled together, tokio-postgres writes all five requests before reading any answer.
    let (a, b, c, d, e) = tokio::join!(
        client.query_one(&divide, &[&10, &2]),
        client.query_one(&divide, &[&7, &7]),
        client.query_one(&divide, &[&1, &0]),
        client.query_one(&divide, &[&9, &3]),
        client.query_one("SELECT 'last'::text", &[]),
    );
    assert_eq!(a.unwrap().get::<_, i32>(0), 5);
    assert_eq!(b.unwrap().get::<_, i32>(0), 1);
    let error = c.expect_err("1 / 0 must fail");
    assert_eq!(error.code(), Some(&SqlState::DIVISION_BY_ZERO));
    assert_eq!(
        d.unwrap().get::<_, i32>(0),
        3,
        "each query has its own Sync"
    );
    assert_eq!(e.unwrap().get::<_, &str>(0), "last");

    // pgvigil counted every Sync's answer: the connection is clean and goes back to the pool.
    drop((divide, client));
    let pools = &proxy.running.proxy.pools;
    tokio::task::block_in_place(|| {
        eventually(PATIENCE, "the connection is idle in the pool", || {
            pools.idle_count(0) == 1
        })
    });
}

#[tokio::test(flavor = "multi_thread")]
async fn a_portal_returns_rows_in_batches_of_its_row_limit() {
    let cluster = test_cluster(0);
    let proxy = start_proxy(&cluster, |_| {}).await;
    let mut client = proxy.connect_app().await;

    let transaction = client.transaction().await.unwrap();
    let statement = transaction
        .prepare("SELECT generate_series(1, 10)")
        .await
        .unwrap();
    let portal = transaction.bind(&statement, &[]).await.unwrap();
    let mut batches: Vec<Vec<i32>> = Vec::new();
    loop {
        let rows = transaction.query_portal(&portal, 4).await.unwrap();
        if rows.is_empty() {
            break;
        }
        batches.push(rows.iter().map(|r| r.get(0)).collect());
    }
    assert_eq!(batches, [vec![1, 2, 3, 4], vec![5, 6, 7, 8], vec![9, 10]]);
    transaction.commit().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn copy_in_of_100k_rows_and_copy_out_round_trip_byte_for_byte() {
    let cluster = test_cluster(0);
    let proxy = start_proxy(&cluster, |_| {}).await;
    let client = proxy.connect_app().await;
    client
        .batch_execute("CREATE TABLE items (id int PRIMARY KEY, name text)")
        .await
        .unwrap();

    let mut sent = Vec::new();
    for id in 1..=100_000 {
        writeln!(sent, "{id}\titem number {id}").unwrap();
    }
    let sink = client
        .copy_in::<_, Bytes>("COPY items FROM STDIN")
        .await
        .unwrap();
    let mut sink = std::pin::pin!(sink);
    for chunk in sent.chunks(64 * 1024) {
        sink.send(Bytes::copy_from_slice(chunk)).await.unwrap();
    }
    let copied = sink.as_mut().finish().await.unwrap();
    assert_eq!(copied, 100_000);
    let count: i64 = client
        .query_one("SELECT count(*) FROM items", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, 100_000);

    let out = client
        .copy_out("COPY (SELECT * FROM items ORDER BY id) TO STDOUT")
        .await
        .unwrap();
    let mut out = std::pin::pin!(out);
    let mut received = Vec::with_capacity(sent.len());
    while let Some(chunk) = out.next().await {
        received.extend_from_slice(&chunk.unwrap());
    }
    assert!(
        received == sent,
        "COPY TO STDOUT returned {} bytes that differ from the {} bytes copied in",
        received.len(),
        sent.len()
    );

    // tokio-postgres sent a Sync the server ignored in copy-in mode; pgvigil must not wait for
    // its ReadyForQuery, so the connection goes back to the pool.
    drop(client);
    let pools = &proxy.running.proxy.pools;
    tokio::task::block_in_place(|| {
        eventually(PATIENCE, "the connection is idle in the pool", || {
            pools.idle_count(0) == 1
        })
    });
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bad_row_fails_copy_in_and_the_session_goes_on() {
    let cluster = test_cluster(0);
    let proxy = start_proxy(&cluster, |_| {}).await;
    let client = proxy.connect_app().await;
    client
        .batch_execute("CREATE TABLE items (id int PRIMARY KEY)")
        .await
        .unwrap();

    // The server rejects row 3 while the client is still streaming rows after it.
    let sink = client
        .copy_in::<_, Bytes>("COPY items FROM STDIN")
        .await
        .unwrap();
    let mut sink = std::pin::pin!(sink);
    let mut rows = b"1\n2\nthree\n".to_vec();
    for id in 4..=20_000 {
        writeln!(rows, "{id}").unwrap();
    }
    let mut outcome = Ok(0);
    for chunk in rows.chunks(8 * 1024) {
        if let Err(error) = sink.send(Bytes::copy_from_slice(chunk)).await {
            outcome = Err(error);
            break;
        }
    }
    if outcome.is_ok() {
        outcome = sink.as_mut().finish().await;
    }
    let error = outcome.expect_err("a non-integer id must fail the COPY");
    assert_eq!(error.code(), Some(&SqlState::INVALID_TEXT_REPRESENTATION));

    let count: i64 = client
        .query_one("SELECT count(*) FROM items", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, 0, "nothing of the failed COPY is kept");

    drop(client);
    let pools = &proxy.running.proxy.pools;
    tokio::task::block_in_place(|| {
        eventually(PATIENCE, "the connection is idle in the pool", || {
            pools.idle_count(0) == 1
        })
    });
}

#[tokio::test(flavor = "multi_thread")]
async fn psql_copy_round_trips_a_file_both_ways() {
    let cluster = test_cluster(0);
    let proxy = start_proxy(&cluster, |_| {}).await;
    let dir = cluster.base_dir();
    let input = dir.join("lines-in.tsv");
    let output = dir.join("lines-out.tsv");

    // Canonical text-format COPY lines (escaped tab and backslash, NULL, UTF-8), so what COPY TO
    // writes back must equal the input byte for byte.
    let mut lines = Vec::new();
    for id in 1..=10_000 {
        writeln!(
            lines,
            "{id}\tcaf\u{e9} {id}\\twith tab \\\\ and backslash\t\\N"
        )
        .unwrap();
    }
    std::fs::write(&input, &lines).unwrap();
    let script = format!(
        "CREATE TABLE lines (id int PRIMARY KEY, name text, note text);\n\
         \\copy lines FROM '{}'\n\
         SELECT count(*), count(note) FROM lines;\n\
         \\copy (SELECT * FROM lines ORDER BY id) TO '{}'\n",
        input.display(),
        output.display()
    );
    let stdout = psql_through(&proxy, &cluster, "copy.sql", script.as_bytes(), "UTF8").await;
    assert_eq!(String::from_utf8_lossy(&stdout), "10000|0\n");
    let written = std::fs::read(&output).unwrap();
    assert!(
        written == lines,
        "\\copy TO wrote {} bytes that differ from the {} bytes of the input file",
        written.len(),
        lines.len()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn notify_reaches_a_listening_session() {
    let cluster = test_cluster(0);
    let proxy = start_proxy(&cluster, |_| {}).await;
    let (listener, mut messages) = connect_with_messages(&proxy).await;
    listener.batch_execute("LISTEN jobs").await.unwrap();

    let notifier = proxy.connect_app().await;
    notifier
        .batch_execute("NOTIFY jobs, 'job 42 is ready'")
        .await
        .unwrap();

    // The listener is idle: the notification must be relayed without any request of its own.
    let notification = tokio::time::timeout(PATIENCE, async {
        loop {
            match messages.recv().await {
                Some(AsyncMessage::Notification(n)) => return n,
                Some(_) => continue,
                None => panic!("the listening connection closed"),
            }
        }
    })
    .await
    .expect("the notification did not arrive");
    assert_eq!(notification.channel(), "jobs");
    assert_eq!(notification.payload(), "job 42 is ready");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_notice_reaches_the_client() {
    let cluster = test_cluster(0);
    let proxy = start_proxy(&cluster, |_| {}).await;
    let (client, mut messages) = connect_with_messages(&proxy).await;

    client
        .batch_execute("DO $$ BEGIN RAISE NOTICE 'hello'; END $$")
        .await
        .unwrap();
    let notice = tokio::time::timeout(PATIENCE, async {
        loop {
            match messages.recv().await {
                Some(AsyncMessage::Notice(notice)) => return notice,
                Some(_) => continue,
                None => panic!("the connection closed"),
            }
        }
    })
    .await
    .expect("the notice did not arrive");
    assert_eq!(notice.severity(), "NOTICE");
    assert_eq!(notice.message(), "hello");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_error_fails_the_transaction_until_rollback_and_the_session_goes_on() {
    let cluster = test_cluster(0);
    let proxy = start_proxy(&cluster, |_| {}).await;
    let client = proxy.connect_app().await;
    client
        .batch_execute("CREATE TABLE ledger (id int)")
        .await
        .unwrap();

    client.batch_execute("BEGIN").await.unwrap();
    client
        .execute("INSERT INTO ledger VALUES (1)", &[])
        .await
        .unwrap();
    let error = client
        .query_one("SELECT 1 / 0", &[])
        .await
        .expect_err("division by zero must fail");
    assert_eq!(error.code(), Some(&SqlState::DIVISION_BY_ZERO));
    assert_eq!(error.as_db_error().unwrap().message(), "division by zero");

    // The transaction is failed ('E'): everything but ROLLBACK is refused.
    let refused = client
        .query_one("SELECT 1", &[])
        .await
        .expect_err("a failed transaction must refuse statements");
    assert_eq!(refused.code(), Some(&SqlState::IN_FAILED_SQL_TRANSACTION));

    client.batch_execute("ROLLBACK").await.unwrap();
    let count: i64 = client
        .query_one("SELECT count(*) FROM ledger", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, 0, "the insert was rolled back and the session works");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_million_row_result_streams_without_pgvigil_buffering_it() {
    let cluster = test_cluster(0);
    let mut config = test_config(&cluster);
    trust_app(&mut config);
    // The real binary, whose memory is its own: other tests of this process allocate hundreds of
    // megabytes at times (large_messages).
    let proxy = ProxyProcess::start(&config).await;
    let client = crate::large_messages::connect(&proxy).await;
    // DataRow: 5 header + 2 column count + (4 + 4) + (4 + 90) = 109 bytes; 1e6 rows ~ 109 MB.
    let query = "SELECT i, repeat('x', 90) FROM generate_series(1, 1000000) AS i";
    let before = proxy.rss();

    let rows = client
        .query_raw(query, std::iter::empty::<i32>())
        .await
        .unwrap();
    let mut rows = std::pin::pin!(rows);
    let first = rows.next().await.expect("no rows").unwrap();
    assert_eq!(first.get::<_, i32>(0), 1);

    // While the client reads nothing, the backpressure must reach PostgreSQL: the backend ends
    // up blocked writing to its socket instead of pgvigil reading the result into memory.
    let blocked = format!(
        "SELECT count(*) FROM pg_stat_activity \
         WHERE wait_event = 'ClientWrite' AND query = $q${query}$q$"
    );
    tokio::task::block_in_place(|| {
        eventually(PATIENCE, "the backend blocks writing the result", || {
            cluster.psql(0, &blocked).unwrap() == "1"
        })
    });
    let mut peak = proxy.rss();

    let mut count = 1u64;
    while let Some(row) = rows.next().await {
        row.unwrap();
        count += 1;
        if count % 50_000 == 0 {
            peak = peak.max(proxy.rss());
        }
    }
    assert_eq!(count, 1_000_000);
    let growth = peak.saturating_sub(before);
    assert!(
        growth < 50 << 20,
        "memory grew by {} MB while streaming a ~109 MB result",
        growth >> 20
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn large_objects_round_trip_through_fastpath_function_calls() {
    let cluster = test_cluster(0);
    let proxy = start_proxy(&cluster, |_| {}).await;
    let dir = cluster.base_dir();
    let input = dir.join("blob-in.bin");
    let output = dir.join("blob-out.bin");
    // 100 kB with every byte value: libpq writes it in 8 kB lowrite FunctionCalls.
    let mut state = 0x2545_f491_u32;
    let blob: Vec<u8> = (0..100_000)
        .map(|i| {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            if i < 256 {
                i as u8
            } else {
                (state >> 24) as u8
            }
        })
        .collect();
    std::fs::write(&input, &blob).unwrap();

    let script = format!(
        "\\lo_import '{}'\n\
         SELECT length(lo_get(:LASTOID)), md5(lo_get(:LASTOID));\n\
         \\lo_export :LASTOID '{}'\n",
        input.display(),
        output.display()
    );
    let stdout = psql_through(&proxy, &cluster, "lo.sql", script.as_bytes(), "UTF8").await;
    let expected = format!("{}|{}", blob.len(), md5_hex(&blob));
    let stdout = String::from_utf8_lossy(&stdout);
    assert!(
        stdout.lines().any(|line| line == expected),
        "lo_get did not return the imported file: {stdout}"
    );
    assert!(
        std::fs::read(&output).unwrap() == blob,
        "\\lo_export wrote a different file"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn latin1_bytes_pass_unchanged_and_are_stored_as_utf8() {
    let cluster = test_cluster(0);
    let proxy = start_proxy(&cluster, |_| {}).await;
    // "café à la crème ÿ" in LATIN1: é = 0xE9, à = 0xE0, è = 0xE8, ÿ = 0xFF.
    let latin1 = b"caf\xe9 \xe0 la cr\xe8me \xff";
    let mut script = b"CREATE TABLE words (w text);\nINSERT INTO words VALUES ('".to_vec();
    script.extend_from_slice(latin1);
    script.extend_from_slice(b"');\nSELECT w FROM words;\n");

    let stdout = psql_through(&proxy, &cluster, "latin1.sql", &script, "LATIN1").await;
    let mut expected = latin1.to_vec();
    expected.push(b'\n');
    assert_eq!(stdout, expected, "psql gets back the LATIN1 bytes it sent");

    let direct = connect_direct(&cluster).await;
    let stored: String = direct
        .query_one("SELECT w FROM words", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored, "café à la crème ÿ", "the primary stores UTF-8");

    // The server connection psql used goes back to the pool; the next (UTF-8) session reuses
    // it and must not see LATIN1.
    let pools = &proxy.running.proxy.pools;
    tokio::task::block_in_place(|| {
        eventually(PATIENCE, "psql's server connection is pooled", || {
            pools.idle_count(0) == 1
        })
    });
    let client = proxy.connect_app().await;
    let seen: String = client
        .query_one("SELECT w FROM words", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(seen, "café à la crème ÿ");
    assert_eq!(pools.open_count(0), 1, "the pooled connection was reused");
}

#[tokio::test(flavor = "multi_thread")]
async fn terminate_returns_the_server_connection_to_the_pool() {
    let cluster = test_cluster(0);
    let proxy = start_proxy(&cluster, |_| {}).await;
    let pools = &proxy.running.proxy.pools;

    let client = proxy.connect_app().await;
    let backend: i32 = client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!((pools.open_count(0), pools.idle_count(0)), (1, 0));

    // Dropping the client makes tokio-postgres send Terminate.
    drop(client);
    tokio::task::block_in_place(|| {
        eventually(PATIENCE, "the connection is idle in the pool", || {
            pools.idle_count(0) == 1
        })
    });

    // psql ends with \q (Terminate too), on the very same backend.
    let stdout = psql_through(
        &proxy,
        &cluster,
        "quit.sql",
        b"SELECT pg_backend_pid();\n\\q\n",
        "UTF8",
    )
    .await;
    assert_eq!(String::from_utf8_lossy(&stdout), format!("{backend}\n"));
    tokio::task::block_in_place(|| {
        eventually(PATIENCE, "the connection is idle in the pool again", || {
            pools.idle_count(0) == 1
        })
    });
    assert_eq!(pools.open_count(0), 1, "no second server connection");
}

/// The values of the first column of every row of a simple query's answer.
fn simple_values(messages: &[SimpleQueryMessage]) -> Vec<&str> {
    messages
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => r.get(0),
            _ => None,
        })
        .collect()
}

/// Connects `app` through pgvigil and drives the connection here, forwarding every notice and
/// notification to the returned channel.
async fn connect_with_messages(
    proxy: &TestProxy,
) -> (Client, mpsc::UnboundedReceiver<AsyncMessage>) {
    let conninfo = proxy.conninfo(APP_USER, APP_PASSWORD, APP_DB);
    let (client, mut connection) = tokio_postgres::connect(&conninfo, NoTls).await.unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(Ok(message)) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            if tx.send(message).is_err() {
                break;
            }
        }
    });
    (client, rx)
}

/// Connects `app` straight to the primary, bypassing pgvigil.
async fn connect_direct(cluster: &LocalCluster) -> Client {
    let conninfo = cluster.node(0).conninfo(APP_USER, APP_PASSWORD, APP_DB);
    let (client, connection) = tokio_postgres::connect(&conninfo, NoTls).await.unwrap();
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

/// Runs `script` (written to `name` in the cluster's directory) with psql through pgvigil as
/// `app`, in `client_encoding`, stopping at the first error; returns its unaligned tuples-only
/// output.
async fn psql_through(
    proxy: &TestProxy,
    cluster: &LocalCluster,
    name: &str,
    script: &[u8],
    client_encoding: &str,
) -> Vec<u8> {
    let path = cluster.base_dir().join(name);
    std::fs::write(&path, script).unwrap();
    let output = tokio::process::Command::new(cluster.bin_dir().join("psql"))
        .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d"])
        .arg(proxy.conninfo(APP_USER, APP_PASSWORD, APP_DB))
        .arg("-f")
        .arg(&path)
        .env("PGCLIENTENCODING", client_encoding)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(PATIENCE, output)
        .await
        .unwrap_or_else(|_| panic!("psql {} did not finish in {PATIENCE:?}", path.display()))
        .unwrap();
    assert!(
        output.status.success(),
        "psql {} failed: {}",
        path.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    output.stdout
}

/// Lowercase hex MD5, as PostgreSQL's `md5()` prints it.
fn md5_hex(data: &[u8]) -> String {
    use md5::Digest;
    md5::Md5::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
