//! Probes every node and publishes the roles and WAL positions it observes. Each probe is one
//! round trip on a kept connection (the prepared `PROBE_SQL`), bounded by `health.timeout`; a
//! node is down after `health.failures` consecutive failures.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinSet;
use tokio_postgres::{Client, NoTls, Row, Statement};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::proxy::Proxy;
use crate::replication::{parse_lsn, Position, ReplicationView};
use crate::topology::Role;

/// The probe: role and WAL position in one row. LSNs come as text (parsed by [`parse_lsn`]).
///
/// `pg_is_in_recovery()` is read once, in FROM, so that a promotion during the query cannot pair
/// a standby's role with a primary's columns. The delay compares with `>`, not `<>`: a restarted
/// standby reports the start of its streaming segment as received, behind what it has replayed.
/// None of these functions needs a privileged role (checked with a plain login role on
/// PostgreSQL 15).
const PROBE_SQL: &str = "SELECT r, \
    CASE WHEN r THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END::text, \
    CASE WHEN r THEN pg_last_wal_receive_lsn() END::text, \
    CASE WHEN r AND pg_last_wal_receive_lsn() > pg_last_wal_replay_lsn() \
        THEN extract(epoch FROM now() - pg_last_xact_replay_timestamp()) \
        ELSE 0 END::float8 \
    FROM pg_is_in_recovery() AS r";

/// The outcome of probing one node once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// Answered: its role and WAL position.
    Up {
        /// `pg_is_in_recovery()`.
        in_recovery: bool,
        /// Where it stands in the WAL.
        position: Position,
    },
    /// Did not answer within the timeout, refused, or errored.
    Failed,
}

/// Why one probe failed (logged; the node's failure count goes up either way).
#[derive(Debug, thiserror::Error)]
enum ProbeError {
    /// Connecting or running the query failed.
    #[error(transparent)]
    Postgres(#[from] tokio_postgres::Error),
    /// The node answered with an LSN that is not in PostgreSQL's text form.
    #[error("malformed LSN {0:?}")]
    BadLsn(String),
}

/// A kept probe connection with [`PROBE_SQL`] prepared on it.
struct ProbeConn {
    client: Client,
    statement: Statement,
}

/// One node's probe connection, failure count and latest observations.
struct Prober {
    node: usize,
    conn: Option<ProbeConn>,
    failures: u32,
    role: Role,
    position: Option<Position>,
}

impl Prober {
    /// A node not probed yet.
    fn new(node: usize) -> Prober {
        Prober {
            node,
            conn: None,
            failures: 0,
            role: Role::Unknown,
            position: None,
        }
    }
}

/// Probes all nodes every `health.interval` (or at once when nudged) until `shutdown`.
pub async fn monitor(proxy: Arc<Proxy>, shutdown: CancellationToken) {
    let mut probers: Vec<Prober> = (0..proxy.config.nodes.len()).map(Prober::new).collect();
    loop {
        let started = Instant::now();
        probers = probe_all(&proxy, probers).await;
        // Positions first: whoever sees a new topology also sees the positions of its round.
        proxy.replication.publish(ReplicationView {
            nodes: probers.iter().map(|p| p.position).collect(),
            observed_at: Some(started),
        });
        let roles: Vec<Role> = probers.iter().map(|p| p.role).collect();
        let current = proxy.topology.snapshot();
        let next = current.with_roles(&roles);
        if current.generation == 0 || !current.same_roles(&next) {
            info!(
                generation = next.generation,
                roles = ?next.nodes.iter().map(|n| (n.name.as_str(), n.role.as_str())).collect::<Vec<_>>(),
                primary = ?next.primary,
                "topology changed"
            );
            proxy.topology.publish(next);
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(proxy.config.health.interval) => {}
            _ = proxy.probe_now.notified() => {}
        }
    }
}

/// Probes every node concurrently and returns the updated probers.
async fn probe_all(proxy: &Arc<Proxy>, probers: Vec<Prober>) -> Vec<Prober> {
    let mut set = JoinSet::new();
    let count = probers.len();
    for mut prober in probers {
        let proxy = proxy.clone();
        set.spawn(async move {
            let probe = probe_once(&proxy, &mut prober).await;
            prober.record(probe, proxy.config.health.failures);
            prober
        });
    }
    let mut done: Vec<Prober> = Vec::with_capacity(count);
    while let Some(joined) = set.join_next().await {
        match joined {
            Ok(prober) => done.push(prober),
            Err(error) => warn!(%error, "a probe task failed"),
        }
    }
    // A panicked probe task loses its prober: recreate it as unknown rather than forget the node.
    for node in 0..count {
        if !done.iter().any(|p| p.node == node) {
            done.push(Prober::new(node));
        }
    }
    done.sort_by_key(|p| p.node);
    done
}

impl Prober {
    fn record(&mut self, probe: Probe, failures_allowed: u32) {
        match probe {
            Probe::Up {
                in_recovery,
                position,
            } => {
                self.failures = 0;
                self.position = Some(settle_delay(self.position, position));
                self.role = if in_recovery {
                    Role::Standby
                } else {
                    Role::Primary
                };
            }
            Probe::Failed => {
                self.failures += 1;
                self.conn = None;
                self.position = None;
                if self.failures >= failures_allowed || self.role == Role::Unknown {
                    self.role = Role::Down;
                }
            }
        }
    }
}

/// Runs one probe, connecting first if needed; bounded by `health.timeout`.
async fn probe_once(proxy: &Proxy, prober: &mut Prober) -> Probe {
    let timeout = proxy.config.health.timeout;
    match tokio::time::timeout(timeout, probe_inner(proxy, prober, timeout)).await {
        Ok(Ok((in_recovery, position))) => Probe::Up {
            in_recovery,
            position,
        },
        Ok(Err(error)) => {
            debug!(node = prober.node, %error, "probe failed");
            Probe::Failed
        }
        Err(_) => {
            debug!(node = prober.node, "probe timed out");
            Probe::Failed
        }
    }
}

async fn probe_inner(
    proxy: &Proxy,
    prober: &mut Prober,
    timeout: Duration,
) -> Result<(bool, Position), ProbeError> {
    let conn = match prober.conn.take().filter(|c| !c.client.is_closed()) {
        Some(conn) => conn,
        None => connect(proxy, prober.node, timeout).await?,
    };
    let row = conn.client.query_one(&conn.statement, &[]).await?;
    prober.conn = Some(conn);
    read_probe(&row)
}

/// A standby whose replay moved on since the last probe is replaying, not stuck: its delay
/// counts as zero. Without this, WAL that carries no transaction (checkpoints, standby
/// snapshots) arriving on an idle cluster makes the delay read "time since the last commit",
/// possibly minutes, for the instant before it is replayed, and the replica loses its reads.
/// A replica that is really behind still trips `routing.max_lag_bytes`; a stopped replay keeps
/// its delay.
fn settle_delay(previous: Option<Position>, mut now: Position) -> Position {
    if previous.is_some_and(|p| now.lsn > p.lsn) {
        now.replay_delay = Duration::ZERO;
    }
    now
}

/// Reads the role and position from a [`PROBE_SQL`] row.
fn read_probe(row: &Row) -> Result<(bool, Position), ProbeError> {
    let in_recovery = row.try_get(0)?;
    let position = Position {
        // A standby that has replayed nothing yet has no replay LSN: it is at the very start.
        lsn: optional_lsn(row.try_get(1)?)?.unwrap_or(0),
        received: optional_lsn(row.try_get(2)?)?,
        replay_delay: delay_from_seconds(row.try_get(3)?),
    };
    Ok((in_recovery, position))
}

/// Parses an LSN column that may be NULL.
fn optional_lsn(text: Option<&str>) -> Result<Option<u64>, ProbeError> {
    text.map(|t| parse_lsn(t).ok_or_else(|| ProbeError::BadLsn(t.to_owned())))
        .transpose()
}

/// The replay delay from its seconds. NULL (WAL pending but no commit replayed since the standby
/// started, so no timestamp to compare with) counts as zero: the byte lag still shows it. So does
/// a negative value, which only means the standby's clock is behind the primary's.
fn delay_from_seconds(seconds: Option<f64>) -> Duration {
    seconds
        .and_then(|s| Duration::try_from_secs_f64(s).ok())
        .unwrap_or(Duration::ZERO)
}

/// Opens a probe connection to `node` with the health credentials and prepares the probe.
async fn connect(proxy: &Proxy, node: usize, timeout: Duration) -> Result<ProbeConn, ProbeError> {
    let node = &proxy.config.nodes[node];
    let (user, password) = proxy.config.health_credentials();
    let mut config = tokio_postgres::Config::new();
    config
        .host(&node.host)
        .port(node.port)
        .user(user)
        .password(password)
        .dbname(&proxy.config.health.database)
        .application_name("pgvigil health")
        .connect_timeout(timeout);
    let (client, connection) = config.connect(NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let statement = client.prepare(PROBE_SQL).await?;
    Ok(ProbeConn { client, statement })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replay_that_moves_on_has_no_delay_and_a_stopped_one_keeps_it() {
        let at = |lsn, secs| Position {
            lsn,
            received: Some(lsn + 10),
            replay_delay: Duration::from_secs(secs),
        };
        let ninety = Duration::from_secs(90);
        assert_eq!(
            settle_delay(Some(at(100, 0)), at(200, 90)).replay_delay,
            Duration::ZERO
        );
        assert_eq!(
            settle_delay(Some(at(200, 0)), at(200, 90)).replay_delay,
            ninety
        );
        assert_eq!(settle_delay(None, at(200, 90)).replay_delay, ninety);
    }
}
