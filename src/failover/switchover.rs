//! `pgvigil switchover [--to NODE]` (and `promote NODE` while the primary is healthy): the
//! primary role handed over with nothing acknowledged lost, the old primary back as a standby.

use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::actions;
use super::assess::assess;
use super::choose::{choose, Choice, Promotion, Reading};
use super::control::Reply;
use super::Coordinator;
use crate::admin::api::{Done, EventKind, Refusal};
use crate::node_control::{Driver, NodeControl};
use crate::topology::{NodeId, Primary, Role};

/// How long transactions in flight may take when `promote NODE` switches over (the CLI's
/// `switchover --drain-timeout` default too).
pub const DEFAULT_DRAIN: Duration = Duration::from_secs(5);

impl Coordinator {
    /// Holds new writes, drains the transactions in flight on the primary (terminating those
    /// left after `drain`), checkpoints and stops it cleanly, waits until the target has
    /// replayed its last position, promotes the target (the other standbys follow it), and
    /// brings the old primary back as a standby of it. The write pause is logged and returned.
    pub(super) async fn switchover(&mut self, to: Option<NodeId>, drain: Duration) -> Reply {
        let topology = self.publisher.snapshot();
        let Primary::Known(old) = topology.primary else {
            return Err(Refusal::new(
                "there is no healthy primary to switch over from",
                "a lost primary is replaced by failover (or `pgvigil promote NODE` with \
                 failover.auto off); see `pgvigil status`",
            ));
        };
        let old_name = self.name(old).to_owned();
        let Some(control) = self.config().nodes[old].control.clone() else {
            return Err(Refusal::new(
                format!("{old_name} has no node control, so it cannot be stopped cleanly"),
                format!("add a [nodes.control] section for {old_name} and restart pgvigil"),
            ));
        };
        let verdict = assess(&self.config(), &self.board, &self.memory);
        let roles = self.candidate_roles(verdict.roles.clone());
        let readings = self.read_candidates(old, &roles, &[]).await;
        let target = match to {
            Some(node) if node == old => {
                return Err(Refusal::new(
                    format!("{old_name} is already the primary"),
                    "nothing to do",
                ))
            }
            Some(node) => {
                let readable = readings
                    .iter()
                    .any(|(n, r)| *n == node && matches!(r, Reading::Read(_)));
                if !readable || self.config().nodes[node].no_promote {
                    return Err(Refusal::new(
                        format!(
                            "{} is not a standby that may be promoted (it is {}{})",
                            self.name(node),
                            roles[node].as_str(),
                            if self.config().nodes[node].no_promote {
                                ", no_promote"
                            } else {
                                ""
                            }
                        ),
                        "`pgvigil promote NODE --dry-run` lists the standbys that may",
                    ));
                }
                node
            }
            None => match choose(&self.config(), &self.board, old, &readings) {
                Choice::Promote(promotion) => promotion.node,
                Choice::Refuse(reason) => return Err(Refusal::new(
                    reason,
                    "name the standby with `--to NODE`, or see `pgvigil promote NODE --dry-run`",
                )),
            },
        };
        let new_name = self.name(target).to_owned();
        let driver = Driver::new(&self.config().nodes[old], &control);
        let held = Instant::now();
        self.publish(
            &verdict.roles,
            &verdict.suspect,
            Primary::Unavailable(format!(
                "switchover in progress: {old_name} hands over to {new_name}"
            )),
        );
        let last = match self.hand_over(old, target, &driver, drain).await {
            Ok(last) => last,
            Err(refusal) => {
                // The old primary runs again (or never stopped): writes go back to it.
                self.evaluate().await;
                return Err(refusal);
            }
        };
        let postmaster_start = match actions::position(&self.config(), target).await {
            Ok(position) => position.postmaster_start,
            Err(e) => {
                warn!(standby = %new_name, error = %e, "cannot read the target's start time");
                String::new()
            }
        };
        let promotion = Promotion {
            node: target,
            old_primary: old,
            old_lsn: last,
            new_lsn: last,
            postmaster_start,
        };
        let mut roles = verdict.roles;
        roles[old] = Role::Fenced;
        if !self.carry_out(promotion, roles, &verdict.suspect).await {
            return Err(Refusal::new(
                format!("{new_name} was asked to promote and has not finished"),
                "writes wait for it; see `pgvigil status`",
            ));
        }
        let pause = held.elapsed();
        let pause_ms = u64::try_from(pause.as_millis()).unwrap_or(u64::MAX);
        info!(from = %old_name, to = %new_name, write_pause = ?pause, "switchover: writes go to the new primary");
        self.proxy.metrics.switchover_done();
        self.events.push(
            EventKind::Command,
            Some(&new_name),
            format!("switchover from {old_name}: writes paused {pause_ms} ms"),
        );
        self.fence_reasons[old] = Some("switched over: rejoining as a standby".into());
        let rejoin = self
            .failback_steps(old, target, &driver, false, control.timeout)
            .await;
        let message = match rejoin {
            Ok(_) => {
                self.rejoined(old).await;
                format!(
                    "switched over from {old_name} to {new_name}: writes paused {pause_ms} ms; \
                     {old_name} is a standby of {new_name}"
                )
            }
            Err(refusal) => {
                self.fence_reasons[old] = Some(format!("rejoin failed: {}", refusal.refused));
                format!(
                    "switched over from {old_name} to {new_name}: writes paused {pause_ms} ms; \
                     {old_name} did not rejoin ({}): {}",
                    refusal.refused, refusal.next
                )
            }
        };
        Ok(Done {
            message,
            dry_run: None,
            write_pause_ms: Some(pause_ms),
        })
    }

    /// Drains and stops `old`, then waits until `target` has replayed its last position, which
    /// it returns. On failure `old` is running again (started back if it was stopped).
    async fn hand_over(
        &self,
        old: NodeId,
        target: NodeId,
        driver: &Driver,
        drain: Duration,
    ) -> Result<u64, Refusal> {
        let retry = "see `pgvigil status`, then retry the switchover";
        let old_name = self.name(old).to_owned();
        let ended = actions::drain(&self.config(), old, drain)
            .await
            .map_err(|e| Refusal::new(format!("cannot drain {old_name}: {e}"), retry))?;
        if ended > 0 {
            self.events.push(
                EventKind::Command,
                Some(&old_name),
                format!(
                    "switchover: {ended} transactions still running after {drain:?} were ended"
                ),
            );
        }
        let last = actions::checkpoint_position(&self.config(), old)
            .await
            .map_err(|e| Refusal::new(format!("cannot checkpoint {old_name}: {e}"), retry))?;
        // A clean stop: the WAL senders hand everything up to the shutdown checkpoint to the
        // standbys before they exit.
        driver
            .stop()
            .await
            .map_err(|e| Refusal::new(format!("cannot stop {old_name}: {e}"), retry))?;
        let limit = self.config().failover.promote_timeout;
        if let Err(e) = actions::await_replay(&self.config(), target, last, limit).await {
            let restarted = driver.start().await;
            return Err(Refusal::new(
                format!(
                    "{} did not replay {old_name}'s last position in time ({e}); {old_name} {}",
                    self.name(target),
                    match restarted {
                        Ok(_) => "was started again".to_owned(),
                        Err(e) => format!("could not be started again: {e}"),
                    }
                ),
                retry,
            ));
        }
        Ok(last)
    }
}
