//! Probes the nodes. One task per node runs the prepared `PROBE_SQL` on a kept connection every
//! `health.interval` (sooner when the data path reports a broken connection), bounded by
//! `health.timeout`, and sends each outcome to the failover coordinator, which alone decides what
//! the outcomes mean (see `failover`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, Notify};
use tokio::time::MissedTickBehavior;
use tokio_postgres::{Client, NoTls, Row, Statement};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::Config;
use crate::replication::{parse_lsn, Position};
use crate::topology::NodeId;

/// The probe: role, timeline, WAL positions and the WAL receiver's state in one row. LSNs come as
/// text (parsed by [`parse_lsn`]).
///
/// `pg_is_in_recovery()` is read once, in FROM, so that a promotion during the query cannot pair
/// a standby's role with a primary's columns. A primary's timeline is read from the name of its
/// current WAL file, because `pg_control_checkpoint()` still names the old timeline until the
/// first checkpoint after a promotion. The delay compares with `>`, not `<>`: a restarted standby
/// reports the start of its streaming segment as received, behind what it has replayed. The
/// receiver's sender and message time are visible to superusers and `pg_monitor` only.
const PROBE_SQL: &str = "SELECT r, \
    CASE WHEN r THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END::text, \
    CASE WHEN r THEN pg_last_wal_receive_lsn() END::text, \
    CASE WHEN r AND pg_last_wal_receive_lsn() > pg_last_wal_replay_lsn() \
        THEN extract(epoch FROM now() - pg_last_xact_replay_timestamp()) \
        ELSE 0 END::float8, \
    CASE WHEN r THEN coalesce(w.received_tli, (SELECT timeline_id FROM pg_control_checkpoint())) \
        ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int END, \
    w.status, w.sender_host, w.sender_port, \
    extract(epoch FROM now() - w.last_msg_receipt_time)::float8, \
    (SELECT setting::int FROM pg_settings WHERE name = 'wal_receiver_timeout'), \
    current_setting('default_transaction_read_only') = 'on', \
    current_setting('pgvigil.promoted_by', true) \
    FROM pg_is_in_recovery() AS r LEFT JOIN pg_stat_wal_receiver AS w ON true";

/// Run on a node the probe found out of recovery: its standbys as `pg_stat_replication` shows
/// them, and the synchronous replication setting they are judged by. Standbys are known by
/// `application_name`, which must be the node's configured name (README, "Failover"). The
/// columns are visible to superusers and `pg_monitor` only; hidden ones read as NULL.
const SENDERS_SQL: &str = "SELECT application_name, sync_state, flush_lsn::text, \
    current_setting('synchronous_standby_names') FROM pg_stat_replication";

/// What one successful probe saw.
#[derive(Debug, Clone, PartialEq)]
pub struct Observation {
    /// `pg_is_in_recovery()`.
    pub in_recovery: bool,
    /// The timeline it writes (primary) or receives/replays (standby).
    pub timeline: u32,
    /// Where it stands in the WAL.
    pub position: Position,
    /// Its WAL receiver; None on a primary and on a standby with no receiver running.
    pub receiver: Option<Receiver>,
    /// `default_transaction_read_only` is on (a fenced node should say so).
    pub read_only: bool,
    /// `pgvigil.promoted_by`: which pgvigil instance (and leadership epoch) promoted this node,
    /// when one did (see `failover::actions::stamp_promotion`).
    pub promoted_by: Option<String>,
    /// On a primary: its standbys and its synchronous replication setting. None on a standby.
    pub senders: Option<Senders>,
}

/// A primary's standbys, read at every probe: which ones its commits wait for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Senders {
    /// `synchronous_standby_names` (empty: asynchronous replication).
    pub synchronous_standby_names: String,
    /// One per `pg_stat_replication` row.
    pub standbys: Vec<SenderRow>,
}

/// One standby as its primary's `pg_stat_replication` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SenderRow {
    /// Its `application_name` (a configured node's name, when set up as README says).
    pub name: String,
    /// Whether commits wait for it.
    pub sync: SyncState,
    /// The WAL it has flushed (None when not visible or not reported yet).
    pub flush: Option<u64>,
}

/// `pg_stat_replication.sync_state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncState {
    /// Commits do not wait for it (`async`, or a state pgvigil cannot see).
    Async,
    /// Next in line should a synchronous standby fail (`potential`); commits do not wait for it.
    Potential,
    /// Commits wait for it (`sync`, priority-based synchronous replication).
    Sync,
    /// One of a quorum commits wait for (`quorum`, `ANY k (...)`).
    Quorum,
}

impl SyncState {
    /// From `sync_state`'s text; NULL (hidden from an unprivileged role) counts as `Async`.
    fn parse(text: Option<&str>) -> SyncState {
        match text {
            Some("sync") => SyncState::Sync,
            Some("quorum") => SyncState::Quorum,
            Some("potential") => SyncState::Potential,
            _ => SyncState::Async,
        }
    }
}

/// A standby's WAL receiver as `pg_stat_wal_receiver` shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct Receiver {
    /// Its status is `streaming`.
    pub streaming: bool,
    /// Host and port it receives from (None when not visible).
    pub sender: Option<(String, u16)>,
    /// Time since it last heard from its sender (None when not visible).
    pub last_message_age: Option<Duration>,
    /// The standby's `wal_receiver_timeout`: a live sender is heard from well within half of it.
    pub timeout: Duration,
}

#[cfg(test)]
impl Observation {
    /// A writable primary on `timeline`, at a fixed position: the fixture the failover tests
    /// vary.
    pub fn primary_for_test(timeline: u32) -> Observation {
        Observation {
            in_recovery: false,
            timeline,
            position: crate::replication::Position {
                lsn: 100,
                received: None,
                replay_delay: Duration::ZERO,
            },
            receiver: None,
            read_only: false,
            promoted_by: None,
            senders: None,
        }
    }
}

/// The outcome of probing one node once.
#[derive(Debug, Clone)]
pub struct Report {
    /// The node probed.
    pub node: NodeId,
    /// When the probe started.
    pub started: Instant,
    /// What it saw, or why it failed.
    pub outcome: Result<Observation, String>,
}

/// One node's health as the coordinator keeps it: the latest observation and the failure count.
#[derive(Debug, Clone, Default)]
pub struct NodeHealth {
    /// Consecutive failed probes.
    pub failures: u32,
    /// Whether at least one probe has finished.
    pub probed: bool,
    /// The latest successful observation (kept through failures, for the record).
    pub last: Option<Observation>,
    /// When the probe that produced `last` started.
    pub observed_at: Option<Instant>,
}

impl NodeHealth {
    /// Takes in one probe outcome.
    pub fn record(&mut self, report: &Report) {
        self.probed = true;
        match &report.outcome {
            Ok(observation) => {
                let mut observation = observation.clone();
                if let Some(previous) = &self.last {
                    observation.position = settle_delay(previous.position, observation.position);
                }
                self.failures = 0;
                self.last = Some(observation);
                self.observed_at = Some(report.started);
            }
            Err(_) => self.failures = self.failures.saturating_add(1),
        }
    }

    /// Failed `failures_allowed` probes in a row (or never answered at all).
    pub fn is_down(&self, failures_allowed: u32) -> bool {
        self.failures >= failures_allowed || (self.probed && self.last.is_none())
    }

    /// The latest observation when the latest probe succeeded.
    pub fn current(&self) -> Option<&Observation> {
        self.last.as_ref().filter(|_| self.failures == 0)
    }
}

/// Wakes a node's probe task when the data path saw a connection to it break.
pub struct Nudges(Vec<Notify>);

impl Nudges {
    /// One per node.
    pub fn new(node_count: usize) -> Nudges {
        Nudges((0..node_count).map(|_| Notify::new()).collect())
    }

    /// Asks for an immediate probe of `node`.
    pub fn nudge(&self, node: NodeId) {
        if let Some(notify) = self.0.get(node) {
            notify.notify_one();
        }
    }

    fn of(&self, node: NodeId) -> Option<&Notify> {
        self.0.get(node)
    }
}

/// Probes `node` until `shutdown`, sending every outcome to `reports`.
pub async fn probe_node(
    proxy: Arc<crate::proxy::Proxy>,
    node: NodeId,
    nudges: Arc<Nudges>,
    reports: mpsc::Sender<Report>,
    shutdown: CancellationToken,
) {
    let mut interval = proxy.config().health.interval;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut conn: Option<ProbeConn> = None;
    let mut last_start: Option<Instant> = None;
    let mut failing = 0u32;
    loop {
        let nudge = async {
            match nudges.of(node) {
                Some(notify) => notify.notified().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
            _ = nudge => {
                // Nudged probes come at most this often, so that a burst of broken sessions
                // does not count as several consecutive failures within milliseconds.
                let min_gap = interval / 4;
                if let Some(wait) = last_start.and_then(|at| min_gap.checked_sub(at.elapsed())) {
                    tokio::time::sleep(wait).await;
                }
                tick.reset();
            }
        }
        // Read again every round: a reload may change `[health]` (the interval takes effect
        // from the next tick) or the credentials (from the next connection).
        let config = proxy.config().clone();
        if config.health.interval != interval {
            interval = config.health.interval;
            tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
            tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        }
        let started = Instant::now();
        last_start = Some(started);
        let outcome = probe_once(&config, node, &mut conn).await;
        proxy
            .metrics
            .probe_done(node, started.elapsed(), outcome.is_err());
        let name = &config.nodes[node].name;
        match &outcome {
            // The first failure of a run says why; the rest of the run only at debug level (a
            // node down for hours would otherwise log every interval).
            Err(error) if failing == 0 => {
                warn!(node = %name, %error, "probe failed");
            }
            Err(error) => debug!(node = %name, %error, failed = failing + 1, "probe failed"),
            Ok(_) if failing > 0 => info!(node = %name, failed = failing, "probe answered again"),
            Ok(_) => {}
        }
        failing = if outcome.is_err() { failing + 1 } else { 0 };
        let report = Report {
            node,
            started,
            outcome,
        };
        if reports.send(report).await.is_err() {
            return;
        }
    }
}

/// A kept probe connection with [`PROBE_SQL`] prepared on it.
struct ProbeConn {
    client: Client,
    statement: Statement,
    senders: Statement,
}

/// Why one probe failed.
#[derive(Debug, thiserror::Error)]
enum ProbeError {
    /// Connecting or running the query failed.
    #[error(transparent)]
    Postgres(#[from] tokio_postgres::Error),
    /// The node answered with an LSN that is not in PostgreSQL's text form.
    #[error("malformed LSN {0:?}")]
    BadLsn(String),
    /// No answer within `health.timeout`.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

/// Runs one probe, connecting first if needed; bounded by `health.timeout`. A failed probe drops
/// the connection, so the next one starts afresh.
async fn probe_once(
    config: &Config,
    node: NodeId,
    conn: &mut Option<ProbeConn>,
) -> Result<Observation, String> {
    let timeout = config.health.timeout;
    let result = match tokio::time::timeout(timeout, probe_inner(config, node, conn)).await {
        Ok(result) => result,
        Err(_) => Err(ProbeError::Timeout(timeout)),
    };
    if result.is_err() {
        *conn = None;
    }
    result.map_err(|e| e.to_string())
}

async fn probe_inner(
    config: &Config,
    node: NodeId,
    conn: &mut Option<ProbeConn>,
) -> Result<Observation, ProbeError> {
    let kept = conn.take().filter(|c| !c.client.is_closed());
    let probe = match kept {
        Some(probe) => probe,
        None => connect(config, node).await?,
    };
    let row = probe.client.query_one(&probe.statement, &[]).await?;
    let mut observation = read_probe(&row)?;
    if !observation.in_recovery {
        let rows = probe.client.query(&probe.senders, &[]).await?;
        observation.senders = Some(read_senders(&rows)?);
    }
    *conn = Some(probe);
    Ok(observation)
}

/// Reads the [`SENDERS_SQL`] rows (no row: no standby, and no setting either, which is then
/// irrelevant).
fn read_senders(rows: &[Row]) -> Result<Senders, ProbeError> {
    let mut senders = Senders::default();
    for row in rows {
        senders.standbys.push(SenderRow {
            name: row.try_get::<_, Option<String>>(0)?.unwrap_or_default(),
            sync: SyncState::parse(row.try_get(1)?),
            flush: optional_lsn(row.try_get(2)?)?,
        });
        senders.synchronous_standby_names = row.try_get(3)?;
    }
    Ok(senders)
}

/// A standby whose replay moved on since the last probe is replaying, not stuck: its delay
/// counts as zero. Without this, WAL that carries no transaction (checkpoints, standby
/// snapshots) arriving on an idle cluster makes the delay read "time since the last commit",
/// possibly minutes, for the instant before it is replayed, and the replica loses its reads.
/// A replica that is really behind still trips `routing.max_lag_bytes`; a stopped replay keeps
/// its delay.
fn settle_delay(previous: Position, mut now: Position) -> Position {
    if now.lsn > previous.lsn {
        now.replay_delay = Duration::ZERO;
    }
    now
}

/// Reads a [`PROBE_SQL`] row.
fn read_probe(row: &Row) -> Result<Observation, ProbeError> {
    let in_recovery: bool = row.try_get(0)?;
    let position = Position {
        // A standby that has replayed nothing yet has no replay LSN: it is at the very start.
        lsn: optional_lsn(row.try_get(1)?)?.unwrap_or(0),
        received: optional_lsn(row.try_get(2)?)?,
        replay_delay: duration_from_seconds(row.try_get(3)?),
    };
    let timeline: Option<i32> = row.try_get(4)?;
    let status: Option<&str> = row.try_get(5)?;
    let receiver = status.map(|status| -> Result<Receiver, ProbeError> {
        let host: Option<&str> = row.try_get(6)?;
        let port: Option<i32> = row.try_get(7)?;
        let age: Option<f64> = row.try_get(8)?;
        let timeout_ms: Option<i32> = row.try_get(9)?;
        Ok(Receiver {
            streaming: status == "streaming",
            sender: host
                .zip(port.and_then(|p| u16::try_from(p).ok()))
                .map(|(h, p)| (h.to_owned(), p)),
            last_message_age: age.map(|s| duration_from_seconds(Some(s))),
            timeout: Duration::from_millis(
                timeout_ms
                    .and_then(|ms| u64::try_from(ms).ok())
                    .unwrap_or(0),
            ),
        })
    });
    Ok(Observation {
        in_recovery,
        timeline: timeline.and_then(|t| u32::try_from(t).ok()).unwrap_or(0),
        position,
        receiver: receiver.transpose()?,
        read_only: row.try_get(10)?,
        promoted_by: row
            .try_get::<_, Option<String>>(11)?
            .filter(|text| !text.is_empty()),
        senders: None,
    })
}

/// Parses an LSN column that may be NULL.
fn optional_lsn(text: Option<&str>) -> Result<Option<u64>, ProbeError> {
    text.map(|t| parse_lsn(t).ok_or_else(|| ProbeError::BadLsn(t.to_owned())))
        .transpose()
}

/// A duration from seconds. NULL (for the replay delay: WAL pending but no commit replayed since
/// the standby started, so no timestamp to compare with) counts as zero: the byte lag still shows
/// it. So does a negative value, which only means one clock is behind another.
fn duration_from_seconds(seconds: Option<f64>) -> Duration {
    seconds
        .and_then(|s| Duration::try_from_secs_f64(s).ok())
        .unwrap_or(Duration::ZERO)
}

/// Opens a probe connection to `node` with the health credentials and prepares the probe.
async fn connect(config: &Config, node: NodeId) -> Result<ProbeConn, ProbeError> {
    let client = admin_connect(config, node, "pgvigil health").await?;
    let statement = client.prepare(PROBE_SQL).await?;
    let senders = client.prepare(SENDERS_SQL).await?;
    Ok(ProbeConn {
        client,
        statement,
        senders,
    })
}

/// Opens a connection to `node` as the health role (probes and failover actions use it),
/// bounded by `health.timeout`.
pub async fn admin_connect(
    config: &Config,
    node: NodeId,
    application_name: &str,
) -> Result<Client, tokio_postgres::Error> {
    let node = &config.nodes[node];
    let (user, password) = config.health_credentials();
    let mut pg = tokio_postgres::Config::new();
    pg.host(&node.host)
        .port(node.port)
        .user(user)
        .password(password)
        .dbname(&config.health.database)
        .application_name(application_name)
        .connect_timeout(config.health.timeout);
    let (client, connection) = pg.connect(NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(lsn: u64, secs: u64) -> Position {
        Position {
            lsn,
            received: Some(lsn + 10),
            replay_delay: Duration::from_secs(secs),
        }
    }

    #[test]
    fn a_replay_that_moves_on_has_no_delay_and_a_stopped_one_keeps_it() {
        assert_eq!(
            settle_delay(at(100, 0), at(200, 90)).replay_delay,
            Duration::ZERO
        );
        assert_eq!(
            settle_delay(at(200, 0), at(200, 90)).replay_delay,
            Duration::from_secs(90)
        );
    }

    fn observed(lsn: u64) -> Result<Observation, String> {
        Ok(Observation {
            in_recovery: true,
            timeline: 1,
            position: at(lsn, 0),
            receiver: None,
            read_only: false,
            promoted_by: None,
            senders: None,
        })
    }

    fn report(outcome: Result<Observation, String>) -> Report {
        Report {
            node: 0,
            started: Instant::now(),
            outcome,
        }
    }

    #[test]
    fn a_node_is_down_after_the_allowed_failures_in_a_row() {
        let mut health = NodeHealth::default();
        assert!(!health.is_down(2), "not probed yet is not down");
        health.record(&report(observed(1)));
        health.record(&report(Err("refused".into())));
        assert!(!health.is_down(2));
        assert!(health.current().is_none());
        assert!(health.last.is_some(), "the last observation is kept");
        health.record(&report(Err("refused".into())));
        assert!(health.is_down(2));
        health.record(&report(observed(2)));
        assert!(!health.is_down(2));
        assert_eq!(health.current().map(|o| o.position.lsn), Some(2));
    }

    #[test]
    fn a_node_that_never_answered_is_down_at_once() {
        let mut health = NodeHealth::default();
        health.record(&report(Err("refused".into())));
        assert!(health.is_down(3));
    }
}
