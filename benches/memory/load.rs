//! The client side of `RUNS=memory` in benches/pgbench.sh: what a proxy's memory costs when
//! clients sit idle, or when a 256 MiB value passes through it. It reads the proxy's resident
//! memory from /proc (VmRSS, and the peak VmHWM, reset first through `clear_refs` when allowed)
//! around each step and prints one line per step; values are checked byte-exact against
//! PostgreSQL's md5().

use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use clap::{Parser, ValueEnum};
use futures_util::{SinkExt, TryStreamExt};
use md5::{Digest, Md5};
use tokio_postgres::{Client, NoTls};

#[derive(Debug, Parser)]
#[command(about = "Measures a proxy's memory with idle clients or one 256 MiB value")]
struct Args {
    /// libpq-style connection string to the proxy.
    #[arg(long)]
    conn: String,
    /// The proxy's process id.
    #[arg(long)]
    pid: u32,
    /// What to do through it.
    #[arg(long, value_enum)]
    step: Step,
    /// Idle clients to open (`idle`).
    #[arg(long, default_value_t = 5000)]
    clients: usize,
    /// A label for the printed lines.
    #[arg(long)]
    label: String,
}

/// What to do through the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Step {
    /// Open `clients` connections, run one query on each, and hold them idle.
    Idle,
    /// Read a 256 MiB bytea row, copy it out, insert it as a parameter, and copy it back in.
    Large,
}

/// The large value: 8 Mi SHA-256 digests of consecutive integers.
const VALUE_LEN: usize = 256 << 20;
/// Longest one step through a proxy may take before it is reported as not done.
const STEP_LIMIT: Duration = Duration::from_secs(120);
/// PostgreSQL's binary COPY header.
const COPY_HEADER: &[u8] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    match args.step {
        Step::Idle => idle(&args).await,
        Step::Large => large(&args).await,
    }
}

async fn idle(args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    // Warm up: the proxy's pools and the allocator's first arenas.
    let mut clients = Vec::new();
    for _ in 0..50 {
        clients.push(connect(&args.conn).await?);
    }
    let before = status_kb(args.pid, "VmRSS:")?;
    let started = Instant::now();
    for _ in (0..args.clients).step_by(100) {
        let batch = futures_util::future::try_join_all((0..100).map(|_| async {
            let client = connect(&args.conn).await?;
            client.simple_query("SELECT 1").await?;
            Ok::<_, tokio_postgres::Error>(client)
        }))
        .await?;
        clients.extend(batch);
    }
    let opened = started.elapsed();
    // Let the proxy settle what it released with the clients' last answers.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = status_kb(args.pid, "VmRSS:")?;
    println!(
        "{}: {} idle clients: RSS {:.1} MB -> {:.1} MB, {} bytes per client (opened in {:.1} s)",
        args.label,
        args.clients,
        before as f64 / 1e3,
        after as f64 / 1e3,
        after.saturating_sub(before) * 1024 / args.clients as u64,
        opened.as_secs_f64()
    );
    Ok(())
}

async fn large(args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    let client = connect(&args.conn).await?;
    client
        .batch_execute(
            "DROP TABLE IF EXISTS memory_bench;
             CREATE TABLE memory_bench (id int PRIMARY KEY, data bytea);
             ALTER TABLE memory_bench ALTER data SET STORAGE EXTERNAL;
             INSERT INTO memory_bench SELECT 1, string_agg(sha256(int4send(g)), '' ORDER BY g)
               FROM generate_series(1, 8388608) g",
        )
        .await?;
    let expected = md5_of(&client, 1).await?;

    let value = measured(args, "SELECT of a 256 MiB bytea", async {
        let row = client
            .query_one("SELECT data FROM memory_bench WHERE id = 1", &[])
            .await?;
        Ok(row.try_get::<_, Vec<u8>>(0)?)
    })
    .await?;
    check(&value, &expected, "the row")?;

    let copied = measured(args, "COPY TO STDOUT of a 256 MiB row", async {
        let out = client
            .copy_out("COPY (SELECT data FROM memory_bench WHERE id = 1) TO STDOUT (FORMAT binary)")
            .await?;
        let chunks: Vec<Bytes> = out.try_collect().await?;
        let mut all = BytesMut::new();
        chunks.iter().for_each(|c| all.put_slice(c));
        Ok(all.freeze())
    })
    .await?;
    check(copied_value(&copied)?, &expected, "COPY TO STDOUT")?;

    measured(args, "INSERT with a 256 MiB Bind parameter", async {
        Ok(client
            .execute("INSERT INTO memory_bench VALUES (3, $1)", &[&value])
            .await?)
    })
    .await?;
    if md5_of(&client, 3).await? != expected {
        return Err("the INSERT stored another value".into());
    }

    let mut data = BytesMut::with_capacity(VALUE_LEN + 64);
    data.put_slice(COPY_HEADER);
    data.put_i16(2);
    data.put_i32(4);
    data.put_i32(2);
    data.put_i32(i32::try_from(value.len())?);
    data.put_slice(&value);
    data.put_i16(-1);
    drop(value);
    measured(args, "COPY FROM STDIN of a 256 MiB row", async {
        let sink = client
            .copy_in("COPY memory_bench (id, data) FROM STDIN (FORMAT binary)")
            .await?;
        futures_util::pin_mut!(sink);
        sink.send(data.freeze()).await?;
        Ok(sink.finish().await?)
    })
    .await?;
    if md5_of(&client, 2).await? != expected {
        return Err("COPY FROM STDIN stored another value".into());
    }
    client.batch_execute("DROP TABLE memory_bench").await?;
    Ok(())
}

/// Runs `step` and prints the proxy's memory before it and at its peak during it; a step that
/// takes longer than [`STEP_LIMIT`] is an error.
async fn measured<T>(
    args: &Args,
    what: &str,
    step: impl std::future::Future<Output = Result<T, Box<dyn std::error::Error>>>,
) -> Result<T, Box<dyn std::error::Error>> {
    let before = status_kb(args.pid, "VmRSS:")?;
    // Without the right to reset the peak (not root, another user's process) it is the peak
    // since the proxy started.
    let reset = std::fs::write(format!("/proc/{}/clear_refs", args.pid), "5").is_ok();
    let started = Instant::now();
    let out = tokio::time::timeout(STEP_LIMIT, step).await.map_err(|_| {
        format!(
            "{}: {what} did not finish within {STEP_LIMIT:?}",
            args.label
        )
    })??;
    let elapsed = started.elapsed();
    let peak = status_kb(args.pid, "VmHWM:")?;
    println!(
        "{}: {what}: RSS {:.1} MB, peak {:.1} MB{} (+{:.1} MB), {:.1} s",
        args.label,
        before as f64 / 1e3,
        peak as f64 / 1e3,
        if reset { "" } else { " since start" },
        peak.saturating_sub(before) as f64 / 1e3,
        elapsed.as_secs_f64()
    );
    Ok(out)
}

async fn connect(conninfo: &str) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(conninfo, NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

async fn md5_of(client: &Client, id: i32) -> Result<String, tokio_postgres::Error> {
    let row = client
        .query_one("SELECT md5(data) FROM memory_bench WHERE id = $1", &[&id])
        .await?;
    row.try_get(0)
}

fn check(value: &[u8], expected: &str, what: &str) -> Result<(), Box<dyn std::error::Error>> {
    let digest: String = Md5::digest(value)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    if value.len() != VALUE_LEN || digest != expected {
        return Err(format!("{what} differs from the value in PostgreSQL").into());
    }
    Ok(())
}

/// The one value of the one row of a binary COPY of one column.
fn copied_value(copy: &[u8]) -> Result<&[u8], Box<dyn std::error::Error>> {
    let mut rest = copy
        .strip_prefix(COPY_HEADER)
        .ok_or("no binary COPY header")?;
    if rest.remaining() < 6 || rest.get_i16() != 1 {
        return Err("not one column".into());
    }
    let len = usize::try_from(rest.get_i32())?;
    rest.get(..len).ok_or_else(|| "a short value".into())
}

/// A `kB` line of /proc/PID/status.
fn status_kb(pid: u32, key: &str) -> Result<u64, Box<dyn std::error::Error>> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let value = status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .ok_or_else(|| format!("no {key} in /proc/{pid}/status"))?;
    Ok(value.parse()?)
}
