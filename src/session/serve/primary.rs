//! Waiting for a primary, and reading the session's write position on it.

use std::pin::pin;
use std::time::Duration;

use pgvigil_proto::sqlstate;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info};

use super::super::hold;
use super::super::recover::{self, Failure};
use super::super::steering::Steering;
use super::super::sync::{self, Held};
use super::{ended, Place, Session, SessionError};
use crate::cancel::Cancels;
use crate::config::PoolMode;
use crate::proxy::Proxy;
use crate::replication::parse_lsn;
use crate::topology::{Need, NodeId, Primary};

/// Longest pause between two tries to reach a primary that failed to connect, even when the
/// topology does not change (the node may have been restarting).
const PRIMARY_RETRY: Duration = Duration::from_millis(500);

/// The unit at the front of the client's buffer is waiting for a primary until `until`.
#[derive(Debug)]
pub(super) struct PrimaryWait {
    until: Instant,
    /// `Steering::units_begun` when the wait started: once it moves on, this unit was served.
    units: u64,
    /// The client's cancel requests since the wait started: one ends the wait, as PostgreSQL
    /// cancels a statement.
    cancels: Cancels,
    /// Topology generations since the unit was routed. Here rather than in every session,
    /// where it would be 16 bytes of every idle client.
    changes: watch::Receiver<u64>,
}

impl Session<'_> {
    /// The unit at the front needs a primary it cannot have now: waits for the next topology
    /// generation (or a short pause) so that it is routed again, up to `failover.wait_timeout`
    /// since it first waited; past that it is refused with 57P03 and the session goes on.
    pub(super) async fn wait_for_primary(
        &mut self,
        failure: Option<String>,
    ) -> Result<(), SessionError> {
        let units = self.steering.units_begun();
        let wait = match std::mem::replace(&mut self.place, Place::Attached) {
            Place::WaitingForPrimary(wait) if wait.units == units => wait,
            _ => {
                let mut changes = self.proxy.topology.subscribe();
                // A generation published since the unit was routed ends the first pause at
                // once, as one published during it does.
                if self.steering.routed_generation() != Some(*changes.borrow()) {
                    changes.mark_changed();
                }
                Box::new(PrimaryWait {
                    until: Instant::now() + self.proxy.config().failover.wait_timeout,
                    units,
                    cancels: self.key.cancels(),
                    changes,
                })
            }
        };
        let mut wait = wait;
        self.steering.reroute();
        let waiting = hold::Waiting::set(&self.key);
        let until = wait.until;
        let pause = until.min(Instant::now() + PRIMARY_RETRY);
        let mut cancelled = wait.cancels.has_changed();
        if !cancelled {
            tokio::select! {
                changed = wait.changes.changed() => {
                    if changed.is_err() {
                        // No more generations can come: wait out the rest (or a cancel).
                        tokio::select! {
                            _ = tokio::time::sleep_until(until) => {}
                            () = wait.cancels.changed() => cancelled = true,
                        }
                    }
                }
                () = wait.cancels.changed() => cancelled = true,
                _ = tokio::time::sleep_until(pause) => {}
            }
        }
        let max_message = self.proxy.config().max_message_size;
        if cancelled {
            info!("a unit waiting for a primary was cancelled by the client");
            let failure = Failure {
                code: sqlstate::QUERY_CANCELED,
                message: "canceling statement due to user request",
            };
            return recover::reject_unit(&mut self.client, &failure, max_message)
                .await
                .map_err(ended);
        }
        if Instant::now() < until {
            drop(waiting);
            self.enter(Place::WaitingForPrimary(wait));
            return Ok(());
        }
        let reason = match (&self.proxy.topology.load().primary, failure) {
            (Primary::Unavailable(why), _) => format!("no primary is available: {why}"),
            (Primary::Known(_), Some(failure)) => failure,
            (Primary::Known(_), None) => "no node can serve this statement now".into(),
        };
        info!(%reason, "a unit waited for a primary in vain");
        let failure = Failure {
            code: sqlstate::CANNOT_CONNECT_NOW,
            message: &reason,
        };
        recover::reject_unit(&mut self.client, &failure, max_message)
            .await
            .map_err(ended)
    }

    /// Transaction pooling: a session between units that holds no connection to the primary
    /// takes one to read its write position; returns the primary when it did.
    pub(super) async fn borrow_primary(&mut self) -> Option<NodeId> {
        if self.proxy.config().pool.mode != PoolMode::Transaction {
            return None;
        }
        let Primary::Known(primary) = self.proxy.topology.load().primary.clone() else {
            return None;
        };
        if self.held.leases.get(primary).is_some_and(Option::is_some) {
            return None;
        }
        let replay = &mut self.steering.replay;
        match sync::sync(
            primary,
            &mut self.held,
            replay,
            &[],
            &self.startup,
            self.proxy,
        )
        .await
        {
            Ok(()) => Some(primary),
            Err(error) => {
                debug!(%error, "no primary connection to read the write position on");
                None
            }
        }
    }
}

/// The primary's current WAL position, read on the session's own primary connection (which
/// is idle: the session is between units). None when it cannot be read; the connection is
/// dropped when the topology gave up on the primary while waiting for the answer.
pub(super) async fn write_position(
    held: &mut Held,
    steering: &mut Steering,
    proxy: &Proxy,
) -> Option<u64> {
    let Primary::Known(primary) = proxy.topology.load().primary.clone() else {
        return None;
    };
    let lease = held.leases.get_mut(primary)?.as_mut()?;
    let read = lease
        .conn
        .query_text("SELECT pg_current_wal_insert_lsn()::text");
    let outcome = {
        let read = pin!(read);
        proxy.unless_given_up(primary, Need::Primary, read).await
    };
    match outcome {
        Ok(Ok(text)) => text.as_deref().and_then(parse_lsn),
        Ok(Err(error)) => {
            debug!(%error, "could not read the write position");
            None
        }
        Err(error) => {
            // Cut off mid-query: the answer still owed would confuse the next unit.
            info!(%error, "the write position could not be read; connection dropped");
            held.leases[primary] = None;
            if steering.current == primary {
                steering.lost_current();
            } else {
                steering.replay.fresh_connection(primary);
            }
            None
        }
    }
}

pub(super) fn is_primary(proxy: &Proxy, node: NodeId) -> bool {
    proxy.topology.load().primary == Primary::Known(node)
}
