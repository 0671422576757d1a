//! A client that writes through pgvigil all the time, as an application would, to measure how long
//! writes were unavailable and which acknowledged writes survived.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;
use tokio::time::{timeout, MissedTickBehavior};
use tokio_postgres::{Client, NoTls};
use tokio_util::sync::CancellationToken;

use super::{eventually, LocalCluster, TestProxy, APP_DB, APP_PASSWORD, APP_USER};

/// Time between two inserts.
pub const TICK: Duration = Duration::from_millis(20);

/// How long the writer gives one connect or insert before it drops the connection and starts
/// over; as long as pgvigil's default `failover.wait_timeout`, so that it never cuts short a
/// statement pgvigil is still holding for a new primary.
const STATEMENT_DEADLINE: Duration = Duration::from_secs(10);

/// How many of the latest errors a failed wait quotes.
const LATEST_ERRORS: usize = 5;

/// The table the writer fills, one row per acknowledged id.
const CREATE_TICKS: &str = "CREATE TABLE ticks (id int PRIMARY KEY, at timestamptz DEFAULT now())";

/// One insert pgvigil acknowledged.
#[derive(Debug, Clone, Copy)]
pub struct Ack {
    /// The id inserted.
    pub id: i32,
    /// When the acknowledgement arrived.
    pub at: Instant,
}

/// Everything the writer saw, in order.
#[derive(Debug, Clone, Default)]
pub struct WriteLog {
    /// Acknowledged inserts.
    pub acks: Vec<Ack>,
    /// Failed connects and inserts: when, and what the client said.
    pub errors: Vec<(Instant, String)>,
}

impl WriteLog {
    /// How long writes were unavailable around `event`: from the last ack before it to the first
    /// ack after it, `None` while either is missing. An ack already on its way when the event
    /// struck (a frozen server may answer before its SIGSTOP lands) arrives just after it, so
    /// the window is measured as the longest gap between consecutive acks from the last one
    /// before `event` on.
    pub fn unavailability(&self, event: Instant) -> Option<Duration> {
        let before = self.acks.iter().rposition(|a| a.at <= event)?;
        let since = &self.acks[before..];
        since.windows(2).map(|pair| pair[1].at - pair[0].at).max()
    }

    /// When writes came back after `event`: the ack that ended the window measured by
    /// [`WriteLog::unavailability`].
    pub fn resumed(&self, event: Instant) -> Option<Instant> {
        let before = self.acks.iter().rposition(|a| a.at <= event)?;
        self.acks[before..]
            .windows(2)
            .max_by_key(|pair| pair[1].at - pair[0].at)
            .map(|pair| pair[1].at)
    }

    /// Number of acks that arrived after `t`.
    pub fn acks_after(&self, t: Instant) -> usize {
        self.acks.iter().filter(|a| a.at > t).count()
    }

    /// Every acknowledged id.
    pub fn acked_ids(&self) -> BTreeSet<i32> {
        self.acks.iter().map(|a| a.id).collect()
    }

    /// The acknowledged ids that node `node` of `cluster` does not have.
    pub fn missing_on(&self, cluster: &LocalCluster, node: usize) -> Vec<i32> {
        let there = tick_ids(cluster, node);
        self.acked_ids().difference(&there).copied().collect()
    }

    /// The id acknowledged last, if any.
    pub fn last_id(&self) -> Option<i32> {
        self.acks.last().map(|a| a.id)
    }

    /// The errors that arrived after `t`, for assertion messages.
    pub fn errors_after(&self, t: Instant) -> Vec<&str> {
        self.errors
            .iter()
            .filter(|(at, _)| *at > t)
            .map(|(_, e)| e.as_str())
            .collect()
    }
}

/// How a writer uses connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Connections {
    /// One connection, replaced only when it breaks.
    Keep,
    /// A new connection for every insert, closed after it, named in `application_name` (as
    /// `psql -c` in a loop: pgvigil sets the name on every server connection it lends).
    PerInsert,
}

/// A task inserting an increasing id into `ticks` through pgvigil every [`TICK`], reconnecting
/// whenever its connection breaks; every attempt uses a fresh id.
pub struct Writer {
    log: Arc<Mutex<WriteLog>>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Writer {
    /// Starts writing through `proxy` as `app`, with ids from `first_id` up.
    pub fn start(proxy: &TestProxy, first_id: i32) -> Writer {
        Writer::spawn(proxy, first_id, Connections::Keep)
    }

    /// Like [`Writer::start`], but every insert opens its own connection and closes it after.
    pub fn start_per_insert(proxy: &TestProxy, first_id: i32) -> Writer {
        Writer::spawn(proxy, first_id, Connections::PerInsert)
    }

    fn spawn(proxy: &TestProxy, first_id: i32, connections: Connections) -> Writer {
        let mut conninfo = proxy.conninfo(APP_USER, APP_PASSWORD, APP_DB);
        if connections == Connections::PerInsert {
            conninfo.push_str(" application_name=psql");
        }
        let log = Arc::new(Mutex::new(WriteLog::default()));
        let stop = CancellationToken::new();
        let task = tokio::spawn(write_ticks(
            conninfo,
            first_id,
            connections,
            Arc::clone(&log),
            stop.clone(),
        ));
        Writer { log, stop, task }
    }

    /// A copy of the log so far.
    pub fn log(&self) -> WriteLog {
        self.log.lock().unwrap().clone()
    }

    /// Waits until `count` acks arrived after `t`; returns the log. Panics after `deadline`,
    /// quoting the latest errors.
    pub fn wait_for_acks_after(&self, t: Instant, count: usize, deadline: Duration) -> WriteLog {
        let give_up = Instant::now() + deadline;
        loop {
            let log = self.log();
            let acked = log.acks_after(t);
            if acked >= count {
                return log;
            }
            let errors = log.errors_after(t);
            let latest = &errors[errors.len().saturating_sub(LATEST_ERRORS)..];
            assert!(
                Instant::now() < give_up,
                "{acked} acknowledged writes, not {count}, within {deadline:?}; {} errors, \
                 the latest: {latest:?}",
                errors.len()
            );
            std::thread::sleep(TICK);
        }
    }

    /// Stops writing (an insert in flight is abandoned) and returns the log.
    pub async fn stop(&mut self) -> WriteLog {
        self.stop.cancel();
        (&mut self.task).await.unwrap();
        self.log()
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn write_ticks(
    conninfo: String,
    first_id: i32,
    connections: Connections,
    log: Arc<Mutex<WriteLog>>,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut client: Option<Client> = None;
    for id in first_id.. {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let attempt = timeout(STATEMENT_DEADLINE, insert(&mut client, &conninfo, id));
        let outcome = tokio::select! {
            _ = stop.cancelled() => return,
            outcome = attempt => outcome,
        };
        let at = Instant::now();
        if connections == Connections::PerInsert {
            client = None;
        }
        let mut log = log.lock().unwrap();
        match outcome {
            Ok(Ok(())) => log.acks.push(Ack { id, at }),
            Ok(Err(e)) => log.errors.push((at, describe(&e))),
            Err(_) => {
                log.errors
                    .push((at, format!("no answer in {STATEMENT_DEADLINE:?}")));
                // The abandoned statement would hold up the next one on this connection.
                client = None;
            }
        }
    }
}

/// Inserts `id`, connecting first when there is no usable connection.
async fn insert(
    client: &mut Option<Client>,
    conninfo: &str,
    id: i32,
) -> Result<(), tokio_postgres::Error> {
    if client.as_ref().is_none_or(Client::is_closed) {
        *client = None;
        let (fresh, connection) = tokio_postgres::connect(conninfo, NoTls).await?;
        tokio::spawn(connection);
        *client = Some(fresh);
    }
    let client = client.as_ref().unwrap();
    // The simple protocol: one round trip per insert, as the tightest measure of the window.
    let sql = format!("INSERT INTO ticks (id) VALUES ({id})");
    client.simple_query(&sql).await.map(drop)
}

/// The server's SQLSTATE and message when there is one, else the client's error.
pub fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {}", db.code().code(), db.message()),
        None => e.to_string(),
    }
}

/// Creates `ticks` through `proxy` and waits until every node of `cluster` has it.
pub async fn create_ticks(proxy: &TestProxy, cluster: &LocalCluster) {
    proxy
        .connect_app()
        .await
        .batch_execute(CREATE_TICKS)
        .await
        .unwrap();
    for node in 0..cluster.nodes().len() {
        eventually(
            Duration::from_secs(30),
            &format!("node {node} has the ticks table"),
            || {
                let sql = "SELECT to_regclass('ticks') IS NOT NULL";
                cluster
                    .psql_in(node, APP_DB, sql)
                    .is_ok_and(|out| out == "t")
            },
        );
    }
}

/// The ids in `ticks` on node `node`, read directly from that node.
pub fn tick_ids(cluster: &LocalCluster, node: usize) -> BTreeSet<i32> {
    let sql = "SELECT coalesce(string_agg(id::text, ','), '') FROM ticks";
    let out = cluster
        .psql_in(node, APP_DB, sql)
        .unwrap_or_else(|e| panic!("reading ticks on node {node}: {e}"));
    out.split(',')
        .filter(|id| !id.is_empty())
        .map(|id| id.parse().unwrap())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log_at(start: Instant, millis: &[u64]) -> WriteLog {
        let acks = millis
            .iter()
            .zip(1..)
            .map(|(&ms, id)| Ack {
                id,
                at: start + Duration::from_millis(ms),
            })
            .collect();
        WriteLog {
            acks,
            errors: Vec::new(),
        }
    }

    #[test]
    fn the_window_runs_from_the_last_ack_before_the_event_to_the_first_after_it() {
        let start = Instant::now();
        let log = log_at(start, &[0, 20, 40, 1540, 1560]);
        let event = start + Duration::from_millis(50);
        assert_eq!(log.unavailability(event), Some(Duration::from_millis(1500)));
    }

    #[test]
    fn an_ack_on_its_way_at_the_event_does_not_end_the_window() {
        let start = Instant::now();
        let log = log_at(start, &[0, 20, 40, 60, 3060, 3080]);
        let event = start + Duration::from_millis(50);
        assert_eq!(log.unavailability(event), Some(Duration::from_millis(3000)));
        assert_eq!(
            log.resumed(event),
            Some(start + Duration::from_millis(3060))
        );
    }

    #[test]
    fn no_window_until_writes_resume() {
        let start = Instant::now();
        let log = log_at(start, &[0, 20]);
        assert_eq!(log.unavailability(start + Duration::from_millis(30)), None);
        assert_eq!(log.unavailability(start - Duration::from_millis(1)), None);
    }
}
