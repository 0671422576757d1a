//! Large messages pass through in pieces: a 256 MiB bytea row read, copied out, bound as a
//! parameter and copied in through a pgvigil process arrives byte-exact (its digest computed by PostgreSQL equals the
//! client's), while pgvigil's resident memory grows by less than 16 MB, in both pool modes.
//! A backend lost in the middle of such a row leaves the client half a row and a closed
//! connection, as PostgreSQL itself would. The figures are printed (`--nocapture`);
//! `PGVIGIL_BIN=target/release/pgvigil` measures a release build instead of the test's own.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures_util::{SinkExt, TryStreamExt};
use md5::{Digest, Md5};
use pgvigil::config::PoolMode;
use tokio_postgres::{Client, NoTls};

use crate::lost_transaction::trust_app;
use crate::support::binary::ProxyProcess;
use crate::support::wire::Wire;
use crate::support::{
    eventually, node_psql, start_proxy, test_cluster, test_config, APP_DB, APP_USER,
};

/// The value's size: 8 Mi SHA-256 digests of consecutive integers, so that no two pieces of it
/// look alike and a piece out of place changes its digest.
const VALUE_LEN: usize = 256 << 20;

/// The bound on pgvigil's growth while one value passes (the target).
const GROWTH_BOUND: usize = 16 << 20;

/// Generous bound on anything that must happen "eventually" on a loaded two-core machine.
const PATIENCE: std::time::Duration = std::time::Duration::from_secs(30);

/// PostgreSQL's binary COPY header: signature, flags, header extension length.
const COPY_HEADER: &[u8] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";

#[tokio::test(flavor = "multi_thread")]
async fn a_256_mib_row_and_copy_pass_through_byte_exact_in_bounded_memory() {
    let cluster = test_cluster(0);
    for mode in [PoolMode::Session, PoolMode::Transaction] {
        let mut config = test_config(&cluster);
        config.pool.mode = mode;
        trust_app(&mut config);
        let proxy = ProxyProcess::start(&config).await;
        let client = connect(&proxy).await;
        client
            .batch_execute(
                "DROP TABLE IF EXISTS big;
                 CREATE TABLE big (id int PRIMARY KEY, data bytea);
                 ALTER TABLE big ALTER data SET STORAGE EXTERNAL;
                 INSERT INTO big SELECT 1, string_agg(sha256(int4send(g)), '' ORDER BY g)
                   FROM generate_series(1, 8388608) g",
            )
            .await
            .unwrap();
        let expected = md5_in_postgres(&client, 1).await;

        // A row: one DataRow of 256 MiB.
        let value = passing(&proxy, mode, "SELECT", async {
            let row = client
                .query_one("SELECT data FROM big WHERE id = 1", &[])
                .await
                .unwrap();
            row.get::<_, Vec<u8>>(0)
        })
        .await;
        assert_eq!(value.len(), VALUE_LEN);
        assert_eq!(hex_md5(&value), expected, "the row read through pgvigil");

        // COPY TO STDOUT: one CopyData of 256 MiB.
        let copied = passing(&proxy, mode, "COPY TO", async {
            let out = client
                .copy_out("COPY (SELECT data FROM big WHERE id = 1) TO STDOUT (FORMAT binary)")
                .await
                .unwrap();
            let chunks: Vec<Bytes> = out.try_collect().await.unwrap();
            let mut all = BytesMut::new();
            chunks.iter().for_each(|c| all.put_slice(c));
            all.freeze()
        })
        .await;
        assert_eq!(hex_md5(copied_value(&copied)), expected, "COPY TO STDOUT");

        // A Bind: the row back as a parameter of 256 MiB, in a unit the Bind starts
        // (tokio-postgres prepared the statement in a unit of its own).
        let inserted = passing(&proxy, mode, "INSERT with a Bind", async {
            client
                .execute("INSERT INTO big VALUES (3, $1)", &[&value])
                .await
                .unwrap()
        })
        .await;
        assert_eq!(inserted, 1);
        assert_eq!(
            md5_in_postgres(&client, 3).await,
            expected,
            "a Bind's value"
        );

        // COPY FROM STDIN: the row back as one CopyData of 256 MiB.
        let mut data = BytesMut::with_capacity(VALUE_LEN + 64);
        data.put_slice(COPY_HEADER);
        data.put_i16(2);
        data.put_i32(4);
        data.put_i32(2);
        data.put_i32(VALUE_LEN as i32);
        data.put_slice(&value);
        data.put_i16(-1);
        drop(value);
        let rows = passing(&proxy, mode, "COPY FROM", async {
            let sink = client
                .copy_in("COPY big (id, data) FROM STDIN (FORMAT binary)")
                .await
                .unwrap();
            futures_util::pin_mut!(sink);
            sink.send(data.freeze()).await.unwrap();
            sink.finish().await.unwrap()
        })
        .await;
        assert_eq!(rows, 1);
        assert_eq!(
            md5_in_postgres(&client, 2).await,
            expected,
            "COPY FROM STDIN"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backend_lost_in_the_middle_of_a_large_row_leaves_the_client_half_a_row_and_a_close() {
    let cluster = test_cluster(0);
    let proxy = start_proxy(&cluster, trust_app).await;
    let setup = proxy.connect_app().await;
    setup
        .batch_execute(
            "CREATE TABLE big (data bytea);
             ALTER TABLE big ALTER data SET STORAGE EXTERNAL;
             INSERT INTO big SELECT string_agg(sha256(int4send(g)), '' ORDER BY g)
               FROM generate_series(1, 2097152) g",
        )
        .await
        .unwrap();
    let row_len = 64 << 20;

    // The client reads the start of the 64 MiB row and stops: pgvigil stops reading from the
    // node once its buffer for the client is full, and the backend blocks writing the rest.
    let mut wire = Wire::login(&proxy).await;
    wire.send(|out| pgvigil_proto::encode::query(out, b"SELECT data FROM big"))
        .await;
    wire.read_at_least(1 << 20).await;
    eventually(
        PATIENCE,
        "the backend sending the row is terminated",
        || {
            node_psql(
                &cluster,
                0,
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
             WHERE query = 'SELECT data FROM big' AND wait_event = 'ClientWrite'",
            ) == "1"
        },
    );

    // PostgreSQL closes a connection it cannot finish a message on without another word, and
    // so does pgvigil: anything after half a row would be read as the rest of the row.
    let received = wire.read_until_closed().await;
    assert!(
        received.len() < row_len,
        "{} bytes: the row cannot have been whole",
        received.len()
    );
    assert_eq!(
        received.first(),
        Some(&b'T'),
        "RowDescription, then the row"
    );
    let client = proxy.connect_app().await;
    let one: i32 = client.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1, "pgvigil serves the next client");
}

/// Runs `transfer` through `proxy` and checks how much pgvigil's memory grew meanwhile.
async fn passing<T>(
    proxy: &ProxyProcess,
    mode: PoolMode,
    what: &str,
    transfer: impl std::future::Future<Output = T>,
) -> T {
    let before = proxy.rss();
    proxy.reset_peak();
    let out = transfer.await;
    let growth = proxy.peak_rss().saturating_sub(before);
    println!(
        "{mode:?} pooling, {what}: pgvigil RSS {:.1} MB, peak {:.1} MB while 256 MiB passed",
        before as f64 / 1e6,
        (before + growth) as f64 / 1e6
    );
    assert!(
        growth < GROWTH_BOUND,
        "{mode:?} pooling, {what}: pgvigil grew by {growth} bytes, bound {GROWTH_BOUND}"
    );
    out
}

/// A client of `proxy` as the application user (trust, see `trust_app`).
pub(crate) async fn connect(proxy: &ProxyProcess) -> Client {
    let conninfo = format!(
        "host=127.0.0.1 port={} user={APP_USER} dbname={APP_DB}",
        proxy.addr.port()
    );
    let (client, connection) = tokio_postgres::connect(&conninfo, NoTls).await.unwrap();
    tokio::spawn(connection);
    client
}

async fn md5_in_postgres(client: &Client, id: i32) -> String {
    let row = client
        .query_one("SELECT md5(data) FROM big WHERE id = $1", &[&id])
        .await
        .unwrap();
    row.get(0)
}

fn hex_md5(data: &[u8]) -> String {
    Md5::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The one value of the one row of a binary COPY of one column.
fn copied_value(copy: &[u8]) -> &[u8] {
    let mut rest = copy.strip_prefix(COPY_HEADER).expect("binary COPY header");
    assert_eq!(rest.get_i16(), 1, "one column");
    let len = usize::try_from(rest.get_i32()).expect("not NULL");
    let (value, trailer) = rest.split_at(len);
    assert_eq!(trailer, (-1i16).to_be_bytes(), "one row, then the trailer");
    value
}
