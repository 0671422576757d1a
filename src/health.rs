//! Probes the nodes. One task per node runs the prepared `PROBE_SQL` on a kept connection every
//! `health.interval` (sooner when the data path reports a broken connection), bounded by
//! `health.timeout`, and sends each outcome to the failover coordinator, which alone decides what
//! the outcomes mean (see `failover`).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, Notify};
use tokio::time::MissedTickBehavior;
use tokio_postgres::{Client, NoTls, Row, Statement};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::config::Config;
use crate::replication::{parse_lsn, Position};
use crate::topology::{NodeId, Stale};

/// Primary probes kept in a [`PrimaryTrail`]: more than enough to find one probe before and one
/// after any standby probe of the last few intervals.
const TRAIL_LEN: usize = 16;

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
    current_setting('default_transaction_read_only') = 'on' \
    FROM pg_is_in_recovery() AS r LEFT JOIN pg_stat_wal_receiver AS w ON true";

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

impl Observation {
    /// The furthest WAL position this standby holds: received or replayed, whichever is further
    /// (a restarted standby reports the start of its streaming segment as received).
    fn held(&self) -> u64 {
        self.position
            .received
            .map_or(self.position.lsn, |r| r.max(self.position.lsn))
    }

    /// Whether this standby streams from `sender` (host, port) on `timeline`.
    pub fn streams_from(&self, sender: (&str, u16), timeline: u32) -> bool {
        self.timeline == timeline
            && self.receiver.as_ref().is_some_and(|r| {
                r.streaming
                    && r.sender
                        .as_ref()
                        .is_some_and(|(h, p)| (h.as_str(), *p) == sender)
            })
    }
}

/// When a probe ran: it read the node's state somewhere between these two instants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeTime {
    /// The probe started (before connecting, if it had to).
    pub started: Instant,
    /// Its answer had reached the coordinator.
    pub answered: Instant,
}

/// The primary's WAL positions from its latest probes, with when each ran, so that a standby's
/// position is compared only with one the primary surely had before the standby's probe (is it
/// missing WAL?) or surely read after it (does it hold WAL the primary never had?). Positions
/// read at overlapping times say nothing: a write in between makes either look wrong.
#[derive(Debug, Default)]
pub struct PrimaryTrail {
    /// The node the positions are of.
    node: Option<NodeId>,
    /// (when, `pg_current_wal_lsn()`), oldest first.
    probes: VecDeque<(ProbeTime, u64)>,
}

impl PrimaryTrail {
    /// Takes in a successful probe of `node`, the primary; a new primary starts a new trail.
    pub fn record(&mut self, node: NodeId, time: ProbeTime, lsn: u64) {
        if self.node != Some(node) {
            self.node = Some(node);
            self.probes.clear();
        }
        if self.probes.len() == TRAIL_LEN {
            self.probes.pop_front();
        }
        self.probes.push_back((time, lsn));
    }

    /// The position of the latest primary probe answered before `at`.
    fn before(&self, node: NodeId, at: Instant) -> Option<u64> {
        self.of(node)?
            .iter()
            .rev()
            .find(|(time, _)| time.answered <= at)
            .map(|&(_, lsn)| lsn)
    }

    /// The position of the earliest primary probe started after `at`.
    fn after(&self, node: NodeId, at: Instant) -> Option<u64> {
        self.of(node)?
            .iter()
            .find(|(time, _)| time.started >= at)
            .map(|&(_, lsn)| lsn)
    }

    fn of(&self, node: NodeId) -> Option<&VecDeque<(ProbeTime, u64)>> {
        (self.node == Some(node)).then_some(&self.probes)
    }
}

/// How the primary looks to a judgement of its standbys.
#[derive(Debug, Clone, Copy)]
pub struct PrimaryView<'a> {
    /// The primary's node.
    pub node: NodeId,
    /// Its timeline.
    pub timeline: u32,
    /// Its latest probe succeeded: a standby that does not stream from it is not excused by the
    /// primary's own trouble.
    pub answers: bool,
    /// Its recent positions.
    pub trail: &'a PrimaryTrail,
}

/// The verdict on one standby.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Following {
    /// It follows the primary.
    Yes,
    /// It does not, for this reason.
    No(Stale),
    /// This reason would hold if a probe of the primary that started after the standby's
    /// confirmed it (the standby is ahead of it, or it answered while the standby did not
    /// stream): keep the previous verdict until then.
    Pending(Stale),
}

/// Whether `standby`, observed by a probe that ran at `time`, follows the primary: same
/// timeline; while the primary answers, a streaming WAL receiver that heard from its sender
/// within `max_lag` unless it already holds everything the primary had; and no WAL past the
/// primary's. An idle primary may leave its standbys unspoken to for half their
/// `wal_receiver_timeout` (30 s by default), which is why silence alone is not staleness. A
/// receiver that stopped counts only once the primary has answered a later probe: a primary that
/// has just died stops its standbys' receivers before its own probes fail, and its standbys must
/// keep serving reads meanwhile.
pub fn following(
    standby: &Observation,
    time: ProbeTime,
    primary: PrimaryView<'_>,
    max_lag: Duration,
) -> Following {
    if standby.timeline != primary.timeline {
        return Following::No(Stale::OtherTimeline);
    }
    let held = standby.held();
    let later = primary.trail.after(primary.node, time.answered);
    if primary.answers {
        let Some(receiver) = standby.receiver.as_ref().filter(|r| r.streaming) else {
            return match later {
                Some(_) => Following::No(Stale::NotStreaming),
                None => Following::Pending(Stale::NotStreaming),
            };
        };
        let silent = receiver.last_message_age.is_some_and(|age| age > max_lag);
        let missing = primary
            .trail
            .before(primary.node, time.started)
            .is_some_and(|lsn| held < lsn);
        if silent && missing {
            return Following::No(Stale::Silent);
        }
    }
    match later {
        Some(lsn) if held > lsn => Following::No(Stale::Ahead),
        Some(_) => Following::Yes,
        None => Following::Pending(Stale::Ahead),
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
    config: Arc<Config>,
    node: NodeId,
    nudges: Arc<Nudges>,
    reports: mpsc::Sender<Report>,
    shutdown: CancellationToken,
) {
    let interval = config.health.interval;
    // Nudged probes come at most this often, so that a burst of broken sessions does not count
    // as several consecutive failures within milliseconds.
    let min_gap = interval / 4;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut conn: Option<ProbeConn> = None;
    let mut last_start: Option<Instant> = None;
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
                if let Some(wait) = last_start.and_then(|at| min_gap.checked_sub(at.elapsed())) {
                    tokio::time::sleep(wait).await;
                }
                tick.reset();
            }
        }
        let started = Instant::now();
        last_start = Some(started);
        let outcome = probe_once(&config, node, &mut conn).await;
        if let Err(error) = &outcome {
            debug!(node = %config.nodes[node].name, %error, "probe failed");
        }
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
    *conn = Some(probe);
    read_probe(&row)
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
    Ok(ProbeConn { client, statement })
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

    /// A standby on timeline 1 holding `held`, its receiver in `status` and last heard `age` ago.
    fn standby(held: u64, status: Option<&str>, age: u64) -> Observation {
        Observation {
            in_recovery: true,
            timeline: 1,
            position: Position {
                lsn: held,
                received: Some(held),
                replay_delay: Duration::ZERO,
            },
            receiver: status.map(|status| Receiver {
                streaming: status == "streaming",
                sender: Some(("127.0.0.1".into(), 5432)),
                last_message_age: Some(Duration::from_secs(age)),
                timeout: Duration::from_secs(60),
            }),
            read_only: false,
        }
    }

    const MAX_LAG: Duration = Duration::from_secs(10);

    /// A probe that started `ms` after `base` and was answered 10 ms later.
    fn probe_at(base: Instant, ms: u64) -> ProbeTime {
        let started = base + Duration::from_millis(ms);
        ProbeTime {
            started,
            answered: started + Duration::from_millis(10),
        }
    }

    /// A trail of primary probes at `base` + each offset (ms), at the given positions.
    fn trail(base: Instant, probes: &[(u64, u64)]) -> PrimaryTrail {
        let mut trail = PrimaryTrail::default();
        for &(ms, lsn) in probes {
            trail.record(0, probe_at(base, ms), lsn);
        }
        trail
    }

    fn judge(
        standby: &Observation,
        at: ProbeTime,
        trail: &PrimaryTrail,
        answers: bool,
    ) -> Following {
        let view = PrimaryView {
            node: 0,
            timeline: 1,
            answers,
            trail,
        };
        following(standby, at, view, MAX_LAG)
    }

    #[test]
    fn an_idle_standby_that_streams_and_holds_everything_follows_however_quiet() {
        let base = Instant::now();
        let at = probe_at(base, 1000);
        let idle = trail(base, &[(0, 500), (2000, 500)]);
        let quiet = standby(500, Some("streaming"), 25);
        assert_eq!(judge(&quiet, at, &idle, true), Following::Yes);
        let busy = trail(base, &[(0, 900), (2000, 1000)]);
        assert_eq!(
            judge(&quiet, at, &busy, true),
            Following::No(Stale::Silent),
            "quiet for 25 s while the primary had WAL it lacks"
        );
        let heard = standby(500, Some("streaming"), 1);
        assert_eq!(
            judge(&heard, at, &busy, true),
            Following::Yes,
            "just behind"
        );
    }

    #[test]
    fn a_standby_whose_receiver_is_off_or_connecting_does_not_follow() {
        let base = Instant::now();
        let at = probe_at(base, 1000);
        let idle = trail(base, &[(0, 500), (2000, 500)]);
        for status in [None, Some("waiting"), Some("starting")] {
            assert_eq!(
                judge(&standby(500, status, 0), at, &idle, true),
                Following::No(Stale::NotStreaming),
                "{status:?}"
            );
            // A primary that does not answer explains it: its standbys keep serving reads.
            assert_eq!(
                judge(&standby(500, status, 0), at, &idle, false),
                Following::Yes
            );
            // So may a primary whose latest answer predates the standby's.
            let earlier = trail(base, &[(0, 500)]);
            assert_eq!(
                judge(&standby(500, status, 0), at, &earlier, true),
                Following::Pending(Stale::NotStreaming)
            );
        }
    }

    #[test]
    fn another_timeline_or_wal_past_the_primarys_does_not_follow() {
        let base = Instant::now();
        let at = probe_at(base, 1000);
        let mut forked = standby(500, Some("streaming"), 0);
        forked.timeline = 2;
        let idle = trail(base, &[(0, 500), (2000, 500)]);
        assert_eq!(
            judge(&forked, at, &idle, false),
            Following::No(Stale::OtherTimeline)
        );
        let ahead = standby(600, Some("streaming"), 0);
        assert_eq!(judge(&ahead, at, &idle, true), Following::No(Stale::Ahead));
        // Only a primary probe that started after the standby's can tell.
        let before_only = trail(base, &[(0, 500)]);
        assert_eq!(
            judge(&ahead, at, &before_only, true),
            Following::Pending(Stale::Ahead)
        );
        let overlapping = trail(base, &[(0, 500), (1005, 500)]);
        assert_eq!(
            judge(&ahead, at, &overlapping, true),
            Following::Pending(Stale::Ahead)
        );
        let just_after = trail(base, &[(0, 500), (1010, 500)]);
        assert_eq!(
            judge(&ahead, at, &just_after, true),
            Following::No(Stale::Ahead)
        );
        // A primary probed later has moved on past a busy standby: no verdict of ahead.
        let moved = trail(base, &[(0, 400), (2000, 700)]);
        assert_eq!(judge(&ahead, at, &moved, true), Following::Yes);
    }

    #[test]
    fn a_trail_is_of_one_primary_and_keeps_the_latest_probes() {
        let base = Instant::now();
        let mut trail = trail(base, &[(0, 1)]);
        trail.record(1, probe_at(base, 0), 7);
        assert_eq!(trail.after(0, base), None);
        assert_eq!(trail.after(1, base), Some(7));
        for i in 0..(TRAIL_LEN as u64 + 4) {
            trail.record(1, probe_at(base, i * 1000), i);
        }
        assert_eq!(trail.probes.len(), TRAIL_LEN);
        assert_eq!(
            trail.before(1, base + Duration::from_secs(100)),
            Some(TRAIL_LEN as u64 + 3)
        );
    }

    #[test]
    fn a_node_that_never_answered_is_down_at_once() {
        let mut health = NodeHealth::default();
        health.record(&report(Err("refused".into())));
        assert!(health.is_down(3));
    }
}
