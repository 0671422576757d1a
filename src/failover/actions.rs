//! What a failover does to the nodes, each step on its own connection as the health role and
//! bounded in time: read a standby's position, promote it, repoint another standby, fence a node.

use std::time::Duration;

use tokio::time::Instant;
use tokio_postgres::Client;

use super::choose::Position;
use super::conninfo;
use crate::config::Config;
use crate::health::admin_connect;
use crate::replication::parse_lsn;
use crate::topology::NodeId;

/// Why a step failed.
#[derive(Debug, thiserror::Error)]
pub enum ActionError {
    /// The node refused or the connection failed.
    #[error(transparent)]
    Postgres(#[from] tokio_postgres::Error),
    /// The step did not finish in time.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The standby was still in recovery when the promotion timed out.
    #[error("still in recovery after {0:?}")]
    NotPromoted(Duration),
    /// The node answered something unusable.
    #[error("{0}")]
    Unexpected(String),
    /// A repointed standby did not stream from the new primary in time.
    #[error(
        "not streaming from {primary} on timeline {timeline} within {limit:?} (last seen: {last})"
    )]
    NotStreaming {
        /// How long it was given.
        limit: Duration,
        /// The new primary's host:port.
        primary: String,
        /// The new primary's timeline.
        timeline: u32,
        /// What its WAL receiver showed last.
        last: String,
    },
}

/// How often a repointed standby's WAL receiver is looked at while waiting for it to stream.
const STREAM_POLL: Duration = Duration::from_millis(200);

/// The timeline a node writes on once it has left recovery; NULL while it is still in recovery.
const LEFT_RECOVERY: &str = "CASE WHEN NOT pg_is_in_recovery() THEN \
    ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int END";

/// Where a node asked to promote stands, read now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pending {
    /// It left recovery: it writes on this timeline.
    LeftRecovery(u32),
    /// It is in recovery and its postmaster started since it was asked: the start removed the
    /// promote signal file, so the request is withdrawn and it will stay a standby.
    Withdrawn,
    /// It is in recovery under the postmaster that was asked: the promotion may still finish.
    InRecovery,
}

/// Runs `step` bounded by `limit`.
async fn bounded<T>(
    limit: Duration,
    step: impl std::future::Future<Output = Result<T, ActionError>>,
) -> Result<T, ActionError> {
    tokio::time::timeout(limit, step)
        .await
        .unwrap_or(Err(ActionError::Timeout(limit)))
}

/// A standby's position and postmaster start time, read now.
pub async fn position(config: &Config, node: NodeId) -> Result<Position, ActionError> {
    bounded(config.health.timeout * 2, async {
        let client = admin_connect(config, node, "pgvigil failover").await?;
        let row = client
            .query_one(
                "SELECT pg_is_in_recovery(), pg_last_wal_receive_lsn()::text, \
                 pg_last_wal_replay_lsn()::text, pg_postmaster_start_time()::text",
                &[],
            )
            .await?;
        if !row.try_get::<_, bool>(0)? {
            return Err(ActionError::Unexpected("it is not in recovery".into()));
        }
        let lsn = |i| -> Result<u64, ActionError> {
            let text: Option<&str> = row.try_get(i)?;
            Ok(text.and_then(parse_lsn).unwrap_or(0))
        };
        Ok(Position {
            received: lsn(1)?,
            replayed: lsn(2)?,
            postmaster_start: row.try_get(3)?,
        })
    })
    .await
}

/// Whether a node asked to promote (under the postmaster started at `postmaster_start`) has
/// left recovery, or provably never will for that request.
pub async fn pending(
    config: &Config,
    node: NodeId,
    postmaster_start: &str,
) -> Result<Pending, ActionError> {
    bounded(config.health.timeout * 2, async {
        let client = admin_connect(config, node, "pgvigil failover").await?;
        let row = client
            .query_one(
                &format!("SELECT pg_postmaster_start_time()::text, {LEFT_RECOVERY}"),
                &[],
            )
            .await?;
        let started: String = row.try_get(0)?;
        Ok(match row.try_get::<_, Option<i32>>(1)? {
            Some(timeline) => Pending::LeftRecovery(u32::try_from(timeline).unwrap_or(0)),
            None if started != postmaster_start => Pending::Withdrawn,
            None => Pending::InRecovery,
        })
    })
    .await
}

/// Promotes `node`, waits until it has left recovery (`failover.promote_timeout` in all) and
/// returns its new timeline. If the `pg_promote` call itself fails or times out, the node is asked
/// again whether it is still in recovery: the promotion may have happened anyway.
pub async fn promote(config: &Config, node: NodeId) -> Result<u32, ActionError> {
    let limit = config.failover.promote_timeout;
    let deadline = Instant::now() + limit;
    let wait_seconds = i32::try_from(limit.as_secs().max(1)).unwrap_or(i32::MAX);
    let asked = bounded(limit, async {
        let client = admin_connect(config, node, "pgvigil failover").await?;
        let row = client
            .query_one("SELECT pg_promote(true, $1)", &[&wait_seconds])
            .await?;
        Ok(row.try_get::<_, bool>(0)?)
    })
    .await;
    if let Err(error) = &asked {
        tracing::warn!(node = %config.nodes[node].name, %error, "pg_promote failed; checking whether the node left recovery anyway");
    }
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let check = bounded(remaining.max(config.health.timeout), async {
            let client = admin_connect(config, node, "pgvigil failover").await?;
            let row = client
                .query_one(&format!("SELECT {LEFT_RECOVERY}"), &[])
                .await?;
            Ok(row.try_get::<_, Option<i32>>(0)?)
        })
        .await;
        if let Ok(Some(timeline)) = check {
            return Ok(u32::try_from(timeline).unwrap_or(0));
        }
        if Instant::now() >= deadline {
            return Err(match asked {
                Err(error) => error,
                Ok(_) => ActionError::NotPromoted(limit),
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Points `standby` at `primary`: creates its replication slot there (if it uses one), rewrites
/// its `primary_conninfo` with the primary's host and port, and reloads its configuration (the
/// WAL receiver restarts towards the new primary and follows its timeline). A conninfo that
/// names no user is replaced by one built from `[replication]`, or else by a copy of a sibling's
/// from `siblings` (the other standbys, the new primary included: its conninfo from its standby
/// days still says how this cluster replicates).
///
/// A node whose conninfo is empty because a failover stopped its receiver (`stop_receiver`)
/// counts with the one it had then, from `paused` (per node), the standby and its siblings alike.
pub async fn repoint(
    config: &Config,
    standby: NodeId,
    primary: NodeId,
    siblings: &[NodeId],
    paused: &[Option<String>],
) -> Result<(), ActionError> {
    bounded(config.health.timeout * 4, async {
        let node = admin_connect(config, standby, "pgvigil failover").await?;
        let current = remembered_if_empty(show(&node, "primary_conninfo").await?, paused, standby);
        let slot = show(&node, "primary_slot_name").await?;
        let conninfo = if conninfo::is_complete(&current) {
            let target = &config.nodes[primary];
            conninfo::repoint(&current, &target.host, target.port)
        } else {
            complete_conninfo(config, standby, primary, siblings, paused).await
        }
        .ok_or_else(|| {
            // Not quoting the conninfo: it may hold a password, and this reaches the log.
            ActionError::Unexpected(
                "its primary_conninfo is empty, names no user or cannot be parsed; \
                 [replication] sets no user, and no sibling standby has a complete one"
                    .into(),
            )
        })?;
        if !slot.is_empty() {
            create_slot(config, primary, &slot).await?;
        }
        alter_system(&node, "primary_conninfo", &conninfo).await
    })
    .await
}

/// Stops `standby` streaming from whatever primary it follows: `primary_conninfo` set to ''
/// (reloaded), then waits until `pg_stat_wal_receiver` shows no receiver, all within
/// `health.timeout`. Returns the conninfo it had ('' when it had none: already stopped).
pub async fn stop_receiver(config: &Config, standby: NodeId) -> Result<String, ActionError> {
    bounded(config.health.timeout, async {
        let client = admin_connect(config, standby, "pgvigil failover").await?;
        let before = show(&client, "primary_conninfo").await?;
        if !before.is_empty() {
            alter_system(&client, "primary_conninfo", "").await?;
        }
        // pg_reload_conf() only signals the postmaster: once this session sees the new value
        // the reload has reached the backends, the startup process included, so a receiver
        // that is gone then is not restarted with the old conninfo.
        loop {
            let row = client
                .query_one(
                    "SELECT current_setting('primary_conninfo') = '' \
                     AND NOT EXISTS (SELECT 1 FROM pg_stat_wal_receiver)",
                    &[],
                )
                .await?;
            if row.try_get::<_, bool>(0)? {
                return Ok(before);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
}

/// Creates the physical replication slot `slot` on `primary` unless it exists, reserving WAL
/// from now on.
pub async fn create_slot(config: &Config, primary: NodeId, slot: &str) -> Result<(), ActionError> {
    let client = admin_connect(config, primary, "pgvigil failover").await?;
    client
        .execute(
            "SELECT pg_create_physical_replication_slot($1, true) WHERE NOT EXISTS \
             (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1)",
            &[&slot],
        )
        .await?;
    Ok(())
}

/// Runs a `CHECKPOINT` on `primary` and waits (at most `limit`) until its control file names
/// the timeline it writes on, which `pg_rewind` reads (a just-promoted primary's still names the
/// old one: DESIGN.md, "Known traps"); returns that timeline.
pub async fn checkpoint_on_timeline(
    config: &Config,
    primary: NodeId,
    limit: Duration,
) -> Result<u32, ActionError> {
    bounded(limit, async {
        let client = admin_connect(config, primary, "pgvigil failback").await?;
        let row = client
            .query_one(&format!("SELECT {LEFT_RECOVERY}"), &[])
            .await?;
        let timeline = row
            .try_get::<_, Option<i32>>(0)?
            .and_then(|t| u32::try_from(t).ok())
            .ok_or_else(|| ActionError::Unexpected("the primary is in recovery".into()))?;
        loop {
            client.batch_execute("CHECKPOINT").await?;
            let row = client
                .query_one("SELECT timeline_id FROM pg_control_checkpoint()", &[])
                .await?;
            if u32::try_from(row.try_get::<_, i32>(0)?).ok() == Some(timeline) {
                return Ok(timeline);
            }
            tokio::time::sleep(STREAM_POLL).await;
        }
    })
    .await
}

/// Client transactions on `node` other than pgvigil's own: active statements and open
/// transactions (`xact_start` is set for both).
const IN_FLIGHT: &str = "SELECT pid FROM pg_stat_activity WHERE backend_type = 'client backend' \
    AND pid <> pg_backend_pid() AND xact_start IS NOT NULL \
    AND coalesce(application_name, '') NOT LIKE 'pgvigil%'";

/// Waits at most `limit` for the transactions in flight on `node` to end, then terminates those
/// left (`pg_terminate_backend`: their sessions end); returns how many were terminated.
pub async fn drain(config: &Config, node: NodeId, limit: Duration) -> Result<usize, ActionError> {
    let client = bounded(config.health.timeout * 2, async {
        Ok(admin_connect(config, node, "pgvigil switchover").await?)
    })
    .await?;
    let deadline = Instant::now() + limit;
    loop {
        let rows = bounded(config.health.timeout * 2, async {
            Ok(client.query(IN_FLIGHT, &[]).await?)
        })
        .await?;
        if rows.is_empty() {
            return Ok(0);
        }
        if Instant::now() >= deadline {
            let pids: Vec<i32> = rows
                .iter()
                .map(|r| r.try_get(0))
                .collect::<Result<_, _>>()?;
            bounded(config.health.timeout * 2, async {
                client
                    .execute(
                        "SELECT pg_terminate_backend(pid) FROM unnest($1::int[]) pid",
                        &[&pids],
                    )
                    .await?;
                Ok(())
            })
            .await?;
            return Ok(pids.len());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Terminates the backends `pids` on `node` (pgvigil's own server connections there).
pub async fn terminate(config: &Config, node: NodeId, pids: Vec<i32>) -> Result<(), ActionError> {
    bounded(config.health.timeout * 2, async {
        let client = admin_connect(config, node, "pgvigil node removal").await?;
        client
            .execute(
                "SELECT pg_terminate_backend(pid) FROM unnest($1::int[]) pid",
                &[&pids],
            )
            .await?;
        Ok(())
    })
    .await
}

/// Runs a `CHECKPOINT` on `node` and returns its WAL position right after (writes are held, so
/// every acknowledged commit is at or below it).
pub async fn checkpoint_position(config: &Config, node: NodeId) -> Result<u64, ActionError> {
    bounded(config.failover.promote_timeout, async {
        let client = admin_connect(config, node, "pgvigil switchover").await?;
        client.batch_execute("CHECKPOINT").await?;
        let row = client
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await?;
        let text: String = row.try_get(0)?;
        parse_lsn(&text).ok_or_else(|| ActionError::Unexpected(format!("not an LSN: {text}")))
    })
    .await
}

/// Waits at most `limit` until `standby` has replayed WAL up to `lsn`.
pub async fn await_replay(
    config: &Config,
    standby: NodeId,
    lsn: u64,
    limit: Duration,
) -> Result<(), ActionError> {
    bounded(limit, async {
        let client = admin_connect(config, standby, "pgvigil switchover").await?;
        loop {
            let row = client
                .query_one(
                    "SELECT coalesce(pg_last_wal_replay_lsn()::text, '0/0')",
                    &[],
                )
                .await?;
            let text: String = row.try_get(0)?;
            if parse_lsn(&text).is_some_and(|replayed| replayed >= lsn) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
}

/// A complete conninfo towards `primary` for `standby`, whose own names no user: from
/// `[replication]`, else adopted from the first sibling whose conninfo is complete.
pub async fn complete_conninfo(
    config: &Config,
    standby: NodeId,
    primary: NodeId,
    siblings: &[NodeId],
    paused: &[Option<String>],
) -> Option<String> {
    let (target, name) = (&config.nodes[primary], &config.nodes[standby].name);
    if let Some(pairs) = config.replication.pairs(name) {
        return Some(conninfo::compose(&target.host, target.port, pairs));
    }
    for &sibling in siblings.iter().filter(|&&s| s != standby) {
        let found = async {
            let client = admin_connect(config, sibling, "pgvigil failover").await?;
            show(&client, "primary_conninfo").await
        };
        match found
            .await
            .map(|theirs| remembered_if_empty(theirs, paused, sibling))
        {
            Ok(theirs) => {
                if let Some(adopted) = conninfo::adopt(&theirs, &target.host, target.port, name) {
                    tracing::info!(standby = %name, from = %config.nodes[sibling].name, "its primary_conninfo names no user: adopting a sibling's");
                    return Some(adopted);
                }
            }
            Err(error) => {
                tracing::warn!(sibling = %config.nodes[sibling].name, %error, "cannot read the sibling's primary_conninfo")
            }
        }
    }
    None
}

/// `conninfo` as read from `node`, or when it is empty, the one `paused` remembers for it.
fn remembered_if_empty(conninfo: String, paused: &[Option<String>], node: NodeId) -> String {
    match paused.get(node) {
        Some(Some(remembered)) if conninfo.is_empty() => remembered.clone(),
        _ => conninfo,
    }
}

/// What a standby's WAL receiver shows: status, sender host and port, timeline received.
const RECEIVER_SQL: &str = "SELECT status, sender_host, sender_port, received_tli \
    FROM pg_stat_wal_receiver";

/// Waits until `standby` streams from `primary` on `timeline` (`pg_stat_wal_receiver`), at most
/// `limit`; the error says what it showed last.
pub async fn await_stream(
    config: &Config,
    standby: NodeId,
    primary: NodeId,
    timeline: u32,
    limit: Duration,
) -> Result<(), ActionError> {
    let target = &config.nodes[primary];
    let deadline = Instant::now() + limit;
    let mut client: Option<Client> = None;
    let mut last = String::from("not looked at");
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(ActionError::NotStreaming {
                limit,
                primary: format!("{}:{}", target.host, target.port),
                timeline,
                last,
            });
        }
        let step = bounded(remaining.min(config.health.timeout), async {
            let kept = client.take().filter(|c| !c.is_closed());
            let conn = match kept {
                Some(conn) => conn,
                None => admin_connect(config, standby, "pgvigil failover").await?,
            };
            let rows = conn.query(RECEIVER_SQL, &[]).await?;
            let seen = match rows.first() {
                None => None,
                Some(row) => Some((
                    row.try_get::<_, Option<String>>(0)?.unwrap_or_default(),
                    row.try_get::<_, Option<String>>(1)?.unwrap_or_default(),
                    row.try_get::<_, Option<i32>>(2)?.unwrap_or(0),
                    row.try_get::<_, Option<i32>>(3)?.unwrap_or(0),
                )),
            };
            client = Some(conn);
            Ok(seen)
        })
        .await;
        last = match step {
            Ok(Some((status, host, port, tli))) => {
                let streams = status == "streaming"
                    && host == target.host
                    && u16::try_from(port).ok() == Some(target.port)
                    && u32::try_from(tli).ok() == Some(timeline);
                if streams {
                    return Ok(());
                }
                format!("WAL receiver {status} from {host}:{port} on timeline {tli}")
            }
            Ok(None) => "no WAL receiver running".into(),
            Err(error) => error.to_string(),
        };
        tokio::time::sleep(STREAM_POLL.min(remaining)).await;
    }
}

/// Makes a fenced node refuse writes from whoever still reaches it:
/// `default_transaction_read_only = on`, reloaded.
pub async fn fence(config: &Config, node: NodeId) -> Result<(), ActionError> {
    bounded(config.health.timeout * 2, async {
        let client = admin_connect(config, node, "pgvigil failover").await?;
        alter_system(&client, "default_transaction_read_only", "on").await
    })
    .await
}

/// Undoes `fence`: `ALTER SYSTEM RESET default_transaction_read_only`, reloaded (a node
/// unfenced while read-only would refuse writes once promoted).
pub async fn unfence(config: &Config, node: NodeId) -> Result<(), ActionError> {
    bounded(config.health.timeout * 2, async {
        let client = admin_connect(config, node, "pgvigil unfence").await?;
        client
            .batch_execute("ALTER SYSTEM RESET default_transaction_read_only")
            .await?;
        client.batch_execute("SELECT pg_reload_conf()").await?;
        Ok(())
    })
    .await
}

/// Sets `wal_receiver_timeout` on a standby, reloaded (its WAL receiver takes the new value at
/// once).
pub async fn set_receiver_timeout(
    config: &Config,
    node: NodeId,
    timeout: Duration,
) -> Result<(), ActionError> {
    bounded(config.health.timeout * 2, async {
        let client = admin_connect(config, node, "pgvigil failover").await?;
        let value = format!("{}ms", timeout.as_millis());
        alter_system(&client, "wal_receiver_timeout", &value).await
    })
    .await
}

/// A checkpoint on a new primary, so that its control file names its new timeline (`pg_rewind`
/// of the old primary against it depends on that).
pub async fn checkpoint(config: &Config, node: NodeId) -> Result<(), ActionError> {
    bounded(config.failover.promote_timeout, async {
        let client = admin_connect(config, node, "pgvigil failover").await?;
        client.batch_execute("CHECKPOINT").await?;
        Ok(())
    })
    .await
}

/// Records on a new primary which pgvigil instance promoted it (`stamp`, see
/// `Leadership::promotion_stamp`): `ALTER SYSTEM SET pgvigil.promoted_by`, reloaded, so that any
/// instance's probe, and an operator's `SHOW pgvigil.promoted_by`, can tell. A custom setting
/// must exist in the session before `ALTER SYSTEM` accepts it, hence the `SET` first.
pub async fn stamp_promotion(
    config: &Config,
    node: NodeId,
    stamp: &str,
) -> Result<(), ActionError> {
    bounded(config.health.timeout * 2, async {
        let client = admin_connect(config, node, "pgvigil failover").await?;
        client.batch_execute("SET pgvigil.promoted_by = ''").await?;
        alter_system(&client, "pgvigil.promoted_by", stamp).await
    })
    .await
}

/// `SHOW name` as text.
async fn show(client: &Client, name: &str) -> Result<String, ActionError> {
    let row = client
        .query_one("SELECT current_setting($1)", &[&name])
        .await?;
    Ok(row.try_get(0)?)
}

/// `ALTER SYSTEM SET name = value` (value quoted by the server itself) and a reload.
async fn alter_system(client: &Client, name: &str, value: &str) -> Result<(), ActionError> {
    // A dotted (custom) name is quoted part by part.
    let row = client
        .query_one(
            "SELECT string_agg(quote_ident(part), '.' ORDER BY n), quote_literal($2) \
             FROM unnest(string_to_array($1, '.')) WITH ORDINALITY AS p(part, n)",
            &[&name, &value],
        )
        .await?;
    let (name, value): (String, String) = (row.try_get(0)?, row.try_get(1)?);
    client
        .batch_execute(&format!("ALTER SYSTEM SET {name} = {value}"))
        .await?;
    client.batch_execute("SELECT pg_reload_conf()").await?;
    Ok(())
}
