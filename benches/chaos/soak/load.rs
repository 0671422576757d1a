//! The load the soak runs through pgvigil: a writer inserting one id at a time and a checker
//! writing two-row transactions. Every acknowledgement records when the request was sent, when
//! the ack arrived and which node served it (`inet_server_port()`, the node's own port even
//! through a relay); every error records what the client got.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;
use tokio::time::{timeout, MissedTickBehavior};
use tokio_postgres::{Client, NoTls, SimpleQueryMessage};
use tokio_util::sync::CancellationToken;

/// The tables the load fills; `port` says which node took the row.
pub const SCHEMA: &str = "\
    CREATE TABLE chaos_ticks (id bigint PRIMARY KEY, port int DEFAULT inet_server_port()); \
    CREATE TABLE chaos_pairs (txn bigint, part int, port int DEFAULT inet_server_port(), \
                              PRIMARY KEY (txn, part))";

/// Time between two writer inserts.
const WRITER_TICK: Duration = Duration::from_millis(20);

/// Time between two checker transactions.
const CHECKER_TICK: Duration = Duration::from_millis(100);

/// Bound on one attempt (connecting included): longer than pgvigil's `failover.wait_timeout`
/// (10 s), so that the client never gives up on a statement pgvigil is still holding.
const ATTEMPT_DEADLINE: Duration = Duration::from_secs(15);

/// Which client of the load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// One insert per id into `chaos_ticks`.
    Writer,
    /// Two inserts into `chaos_pairs` in one transaction.
    Checker,
}

/// One acknowledged write.
#[derive(Debug, Clone, Copy)]
pub struct Ack {
    /// Writer: the id; checker: the transaction number.
    pub id: i64,
    /// Which client.
    pub source: Source,
    /// When the request (the checker: its transaction's first statement) was sent.
    pub sent: Instant,
    /// When the acknowledgement (the checker: COMMIT's) arrived.
    pub at: Instant,
    /// Port of the node that served it.
    pub port: u16,
}

/// What a failed attempt gave the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// An ErrorResponse from the server side: its SQLSTATE and message.
    Sqlstate(String, String),
    /// No answer within [`ATTEMPT_DEADLINE`]: the client gave up, nothing was received.
    Timeout,
    /// Anything else (closed, refused, reset, protocol error): no SQLSTATE.
    NoSqlstate(String),
}

/// One failed attempt.
#[derive(Debug, Clone)]
pub struct Error {
    /// Which client.
    pub source: Source,
    /// When it failed.
    pub at: Instant,
    /// What it got.
    pub failure: Failure,
}

/// Everything the load saw, in order of arrival.
#[derive(Debug, Clone, Default)]
pub struct LoadLog {
    /// Acknowledged writes of both clients.
    pub acks: Vec<Ack>,
    /// Failed attempts of both clients.
    pub errors: Vec<Error>,
}

/// The two clients, running until stopped.
pub struct Load {
    log: Arc<Mutex<LoadLog>>,
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl Load {
    /// Starts both clients on `conninfo` (pgvigil).
    pub fn start(conninfo: &str) -> Load {
        let log = Arc::new(Mutex::new(LoadLog::default()));
        let stop = CancellationToken::new();
        let tasks = [Source::Writer, Source::Checker]
            .into_iter()
            .map(|source| {
                tokio::spawn(run_client(
                    source,
                    conninfo.to_owned(),
                    Arc::clone(&log),
                    stop.clone(),
                ))
            })
            .collect();
        Load { log, stop, tasks }
    }

    /// A copy of the log so far.
    pub fn log(&self) -> LoadLog {
        lock(&self.log).clone()
    }

    /// Writer acks that arrived after `t`.
    pub fn writer_acks_after(&self, t: Instant) -> usize {
        lock(&self.log)
            .acks
            .iter()
            .filter(|a| a.source == Source::Writer && a.at > t)
            .count()
    }

    /// Stops both clients; an attempt in flight is abandoned.
    pub async fn stop(self) -> LoadLog {
        self.stop.cancel();
        for task in self.tasks {
            let _ = task.await;
        }
        lock(&self.log).clone()
    }
}

/// The log's lock; a panic elsewhere cannot leave the log half-written (pushes are atomic).
fn lock(log: &Mutex<LoadLog>) -> std::sync::MutexGuard<'_, LoadLog> {
    log.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

async fn run_client(
    source: Source,
    conninfo: String,
    log: Arc<Mutex<LoadLog>>,
    stop: CancellationToken,
) {
    let period = match source {
        Source::Writer => WRITER_TICK,
        Source::Checker => CHECKER_TICK,
    };
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut client: Option<Client> = None;
    for id in 1.. {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let sent = Instant::now();
        let attempt = timeout(ATTEMPT_DEADLINE, write(source, &mut client, &conninfo, id));
        let outcome = tokio::select! {
            _ = stop.cancelled() => return,
            outcome = attempt => outcome,
        };
        let at = Instant::now();
        let result = match outcome {
            Ok(Ok(port)) => Ok(port),
            Ok(Err(e)) => Err(classify(&e)),
            Err(_) => Err(Failure::Timeout),
        };
        if result.is_err() {
            // After an error or an abandoned attempt the session state is unknown (an aborted
            // transaction, a statement still running): start over on a new connection.
            client = None;
        }
        let mut log = lock(&log);
        match result {
            Ok(port) => log.acks.push(Ack {
                id,
                source,
                sent,
                at,
                port,
            }),
            Err(failure) => log.errors.push(Error {
                source,
                at,
                failure,
            }),
        }
    }
}

/// One write of `source` with number `id`; returns the serving node's port.
async fn write(
    source: Source,
    client: &mut Option<Client>,
    conninfo: &str,
    id: i64,
) -> Result<u16, tokio_postgres::Error> {
    if client.as_ref().is_some_and(Client::is_closed) {
        *client = None;
    }
    let client = match client {
        Some(client) => client,
        None => client.insert(connect(conninfo).await?),
    };
    match source {
        Source::Writer => {
            let sql = format!("INSERT INTO chaos_ticks (id) VALUES ({id}) RETURNING port");
            Ok(port_of(&client.simple_query(&sql).await?))
        }
        Source::Checker => {
            client.simple_query("BEGIN").await?;
            let first =
                format!("INSERT INTO chaos_pairs (txn, part) VALUES ({id}, 1) RETURNING port");
            let port = port_of(&client.simple_query(&first).await?);
            let second = format!("INSERT INTO chaos_pairs (txn, part) VALUES ({id}, 2)");
            client.simple_query(&second).await?;
            client.simple_query("COMMIT").await?;
            Ok(port)
        }
    }
}

async fn connect(conninfo: &str) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(conninfo, NoTls).await?;
    // The task ends when the client is dropped or the connection breaks.
    tokio::spawn(connection);
    Ok(client)
}

/// The port in the first row of a `RETURNING port`; 0 (no node) if the answer had none.
fn port_of(messages: &[SimpleQueryMessage]) -> u16 {
    messages
        .iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(row) => row.get(0).and_then(|p| p.parse().ok()),
            _ => None,
        })
        .unwrap_or(0)
}

/// What the client got: the server's SQLSTATE when there was an ErrorResponse.
fn classify(e: &tokio_postgres::Error) -> Failure {
    match e.as_db_error() {
        Some(db) => Failure::Sqlstate(db.code().code().to_owned(), db.message().to_owned()),
        None => Failure::NoSqlstate(match std::error::Error::source(e) {
            Some(source) => format!("{e}: {source}"),
            None => e.to_string(),
        }),
    }
}
