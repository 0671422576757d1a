//! The failover benchmark's writer (driven by benches/failover.sh): inserts a sequence number
//! every `--interval-ms` through one connection string and prints every outcome, so that the
//! script can measure how long writes were unavailable around a fault and which acknowledged
//! writes the new primary lacks.
//!
//! Output on stdout, one event a line, times in seconds since the writer started:
//!
//! ```text
//! ack ID T          the insert of ID committed (its CommandComplete arrived at T)
//! err ID T MESSAGE  the insert of ID failed or timed out at T
//! fault T           SIGUSR1 arrived at T: the script has just injected the fault
//! end T REASON      the writer stops: settled, no-resume, duration or terminated
//! ```
//!
//! Two ways to use connections: `keep` holds one connection and opens a new one only when it
//! breaks (or an attempt times out, since its state is then unknown); `per-insert` opens a new
//! connection for every insert, as the pgpool-II reference figure in issue 4 was measured.

use std::process::ExitCode;
use std::str::FromStr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use tokio::signal::unix::{signal, SignalKind};
use tokio::time::{interval, timeout, MissedTickBehavior};
use tokio_postgres::{Client, Config, NoTls};

/// Command line of the writer.
#[derive(Debug, Parser)]
#[command(about = "Inserts a sequence number periodically and prints every ack and error")]
struct Args {
    /// libpq-style connection string ("host=... port=... user=... password=... dbname=...").
    #[arg(long)]
    conn: String,
    /// Table receiving the ids (it must exist, with a bigint column `id`); letters, digits, `_`.
    #[arg(long, default_value = "failover_writes")]
    table: String,
    /// How the writer uses connections.
    #[arg(long, value_enum, default_value_t = Mode::Keep)]
    mode: Mode,
    /// Milliseconds between the starts of two inserts.
    #[arg(long, default_value_t = 20)]
    interval_ms: u64,
    /// Bound on one attempt (connecting included), in milliseconds.
    #[arg(long, default_value_t = 2000)]
    timeout_ms: u64,
    /// Longest run, in seconds, fault or not.
    #[arg(long, default_value_t = 600)]
    duration: u64,
    /// Seconds after the fault after which the writer stops if no write succeeded since.
    #[arg(long, default_value_t = 30)]
    max_wait: u64,
    /// Seconds the writer goes on once the first write after the fault succeeded.
    #[arg(long, default_value_t = 2)]
    settle: u64,
}

/// How the writer uses connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// One connection, replaced only when it breaks or an attempt times out.
    Keep,
    /// A new connection for every insert.
    PerInsert,
}

/// Why the writer stopped.
#[derive(Debug, Clone, Copy)]
enum StopReason {
    /// Writes resumed after the fault and went on for `--settle` seconds.
    Settled,
    /// No write succeeded within `--max-wait` seconds of the fault.
    NoResume,
    /// `--duration` passed.
    Duration,
    /// SIGTERM.
    Terminated,
}

impl StopReason {
    fn as_str(self) -> &'static str {
        match self {
            StopReason::Settled => "settled",
            StopReason::NoResume => "no-resume",
            StopReason::Duration => "duration",
            StopReason::Terminated => "terminated",
        }
    }
}

/// What the writer must not get wrong: its settings, checked once.
struct Plan {
    config: Config,
    insert_prefix: String,
    mode: Mode,
    attempt_timeout: Duration,
    duration: Duration,
    max_wait: Duration,
    settle: Duration,
}

/// Why one attempt failed.
#[derive(Debug, thiserror::Error)]
enum AttemptError {
    #[error("{0}")]
    Postgres(String),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
}

impl From<tokio_postgres::Error> for AttemptError {
    fn from(e: tokio_postgres::Error) -> Self {
        let text = match e.as_db_error() {
            Some(db) => format!("{} {}", db.code().code(), db.message()),
            None => match std::error::Error::source(&e) {
                Some(source) => format!("{e}: {source}"),
                None => e.to_string(),
            },
        };
        AttemptError::Postgres(text.replace(['\n', '\r'], " "))
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let plan = match plan(&args) {
        Ok(plan) => plan,
        Err(message) => {
            eprintln!("failover_writer: {message}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("failover_writer: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(plan, Duration::from_millis(args.interval_ms))) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("failover_writer: {e}");
            ExitCode::FAILURE
        }
    }
}

fn plan(args: &Args) -> Result<Plan, String> {
    let table_ok = !args.table.is_empty()
        && args
            .table
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !table_ok {
        return Err(format!(
            "--table {:?}: letters, digits and _ only",
            args.table
        ));
    }
    if args.interval_ms == 0 || args.timeout_ms == 0 {
        return Err("--interval-ms and --timeout-ms must be positive".into());
    }
    let config = Config::from_str(&args.conn).map_err(|e| format!("--conn: {e}"))?;
    Ok(Plan {
        config,
        insert_prefix: format!("INSERT INTO {} (id) VALUES (", args.table),
        mode: args.mode,
        attempt_timeout: Duration::from_millis(args.timeout_ms),
        duration: Duration::from_secs(args.duration),
        max_wait: Duration::from_secs(args.max_wait),
        settle: Duration::from_secs(args.settle),
    })
}

async fn run(plan: Plan, period: Duration) -> std::io::Result<()> {
    let start = Instant::now();
    let fault = Arc::new(OnceLock::new());
    // The fault is stamped by its own task: an attempt may block for up to its timeout, and the
    // stamp must not wait for it.
    let mut usr1 = signal(SignalKind::user_defined1())?;
    let stamp = Arc::clone(&fault);
    tokio::spawn(async move {
        if usr1.recv().await.is_some() {
            let now = Instant::now();
            if stamp.set(now).is_ok() {
                println!("fault {:.6}", secs(start, now));
            }
        }
    });
    let mut term = signal(SignalKind::terminate())?;
    let mut ticker = interval(period);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut client: Option<Client> = None;
    let mut resumed: Option<Instant> = None;
    let mut id: i64 = 0;
    let reason = loop {
        tokio::select! {
            _ = term.recv() => break StopReason::Terminated,
            _ = ticker.tick() => {}
        }
        if let Some(reason) = stop_reason(&plan, start, fault.get(), resumed) {
            break reason;
        }
        id += 1;
        let outcome = attempt(&plan, &mut client, id).await;
        let now = Instant::now();
        match outcome {
            Ok(()) => {
                println!("ack {id} {:.6}", secs(start, now));
                if resumed.is_none() && fault.get().is_some_and(|f| *f < now) {
                    resumed = Some(now);
                }
            }
            Err(e) => println!("err {id} {:.6} {e}", secs(start, now)),
        }
    };
    println!("end {:.6} {}", secs(start, Instant::now()), reason.as_str());
    Ok(())
}

fn stop_reason(
    plan: &Plan,
    start: Instant,
    fault: Option<&Instant>,
    resumed: Option<Instant>,
) -> Option<StopReason> {
    if start.elapsed() >= plan.duration {
        return Some(StopReason::Duration);
    }
    match (fault, resumed) {
        (_, Some(resumed)) if resumed.elapsed() >= plan.settle => Some(StopReason::Settled),
        (Some(fault), None) if fault.elapsed() >= plan.max_wait => Some(StopReason::NoResume),
        _ => None,
    }
}

/// One insert, on the kept connection or a new one; drops the connection when it broke, timed
/// out, or is not to be kept.
async fn attempt(plan: &Plan, client: &mut Option<Client>, id: i64) -> Result<(), AttemptError> {
    let outcome = timeout(plan.attempt_timeout, insert(plan, client, id)).await;
    let keep = match &outcome {
        Ok(Ok(())) => plan.mode == Mode::Keep,
        Ok(Err(_)) => plan.mode == Mode::Keep && client.as_ref().is_some_and(|c| !c.is_closed()),
        // The connection's protocol state is unknown once an attempt was abandoned midway.
        Err(_) => false,
    };
    if !keep {
        *client = None;
    }
    match outcome {
        Ok(result) => result,
        Err(_) => Err(AttemptError::Timeout(plan.attempt_timeout)),
    }
}

async fn insert(plan: &Plan, client: &mut Option<Client>, id: i64) -> Result<(), AttemptError> {
    let client = match client {
        Some(client) => client,
        None => client.insert(connect(&plan.config).await?),
    };
    // The simple protocol: one round trip, as psql would do it.
    client
        .simple_query(&format!("{}{id})", plan.insert_prefix))
        .await?;
    Ok(())
}

async fn connect(config: &Config) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = config.connect(NoTls).await?;
    // The task ends when the client is dropped or the connection breaks.
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

fn secs(start: Instant, at: Instant) -> f64 {
    at.saturating_duration_since(start).as_secs_f64()
}
