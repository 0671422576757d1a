//! The coordinator's promotion steps: choose a standby, remember the choice, promote it, and
//! finish (or keep waiting for) a promotion asked for earlier.

use std::time::{Duration, Instant};

use tokio::task::JoinSet;
use tracing::{error, info, warn};

use super::actions::{self, Pending};
use super::assess::Assessment;
use super::choose::{choose, Choice, Promotion, Reading};
use super::Coordinator;
use crate::admin::api::EventKind;
use crate::metrics::FailoverPhase;
use crate::replication::format_lsn;
use crate::topology::{NodeId, Primary, Role};

/// How soon a failover refused for want of a majority of the instances' views is tried again.
const JOINT_VIEW_RETRY: Duration = Duration::from_millis(100);

impl Coordinator {
    /// A promotion pgvigil asked for has not been seen to finish: that node stays the only
    /// candidate until it is seen as primary, or proven to stay a standby (its postmaster
    /// restarted since, which removed the promote signal file; `pg_promote` itself cannot be
    /// withdrawn). Meanwhile no other standby is asked, whatever happens.
    pub(super) async fn on_pending_promotion(&mut self, promotion: Promotion, verdict: Assessment) {
        let node = promotion.node;
        if verdict.primary == Primary::Known(node) {
            let timeline = self.board[node].last.as_ref().map_or(0, |o| o.timeline);
            self.finish(promotion, timeline, verdict.roles, &verdict.suspect)
                .await;
            return;
        }
        if self.retry_at.is_some_and(|at| Instant::now() < at) {
            return;
        }
        let began = Instant::now();
        let outcome =
            match actions::pending(&self.config(), node, &promotion.postmaster_start).await {
                Ok(Pending::LeftRecovery(timeline)) => Ok(timeline),
                Ok(Pending::Withdrawn) => {
                    warn!(
                        standby = %self.name(node),
                        "the standby asked to promote restarted and is still in recovery: the \
                         request is withdrawn; choosing again"
                    );
                    self.memory.promoting = None;
                    let old = promotion.old_primary;
                    self.fail_over(old, verdict).await;
                    return;
                }
                Ok(Pending::InRecovery) => {
                    info!(standby = %self.name(node), "asking the same standby to promote again");
                    actions::promote(&self.config(), node).await
                }
                Err(e) => Err(e),
            };
        match outcome {
            Ok(timeline) => {
                info!(standby = %self.name(node), timeline, took = ?began.elapsed(), "promoted");
                self.finish(promotion, timeline, verdict.roles, &verdict.suspect)
                    .await;
            }
            Err(e) => {
                let reason = format!(
                    "failover in progress: {} was asked to promote and has not finished ({e}); \
                     no other standby is promoted while it still may",
                    self.name(node)
                );
                self.give_up(&verdict.roles, &verdict.suspect, reason);
            }
        }
    }

    /// Promotes the standby `choose` picks in place of `old`, once the instances' joint view
    /// agrees (`gate`); every step is logged with its duration. The choice is remembered (and saved) before the standby is asked, with the old
    /// primary fenced: from then on only that standby may take its place.
    pub(super) async fn fail_over(&mut self, old: NodeId, verdict: Assessment) {
        let began = Instant::now();
        if let Err(why) = self.joint_view(old).await {
            self.give_up(&verdict.roles, &verdict.suspect, why);
            // The other instances publish their views as their probes find the primary lost:
            // asked again at the next probe report rather than a whole interval later.
            self.retry_at = Some(Instant::now() + JOINT_VIEW_RETRY);
            return;
        }
        warn!(
            primary = %self.name(old),
            failures = self.board[old].failures,
            "primary lost: no answer to its probes and no standby receives WAL from it; failing over"
        );
        self.events.push(
            EventKind::Detected,
            Some(self.name(old).as_str()),
            "primary lost: no answer to its probes and no standby receives WAL from it",
        );
        let roles = verdict.roles;
        // While attempts are refused, clients keep seeing why rather than "in progress".
        if self.refused.is_none() {
            let waiting = format!("failover in progress: primary {} was lost", self.name(old));
            self.publish(&roles, &verdict.suspect, Primary::Unavailable(waiting));
        }
        let unstopped = self.stop_receivers(old, &roles).await;
        let (promotion, decided) = match self.choose(old, &roles, &unstopped).await {
            Choice::Promote(promotion) => {
                self.events.push(
                    EventKind::Decided,
                    Some(self.name(promotion.node).as_str()),
                    format!("chosen to replace {}", self.name(old)),
                );
                (promotion, Instant::now())
            }
            Choice::Refuse(reason) => {
                self.give_up(&roles, &verdict.suspect, reason);
                return;
            }
        };
        if self.carry_out(promotion, roles, &verdict.suspect).await {
            info!(took = ?began.elapsed(), "failover complete");
            self.proxy.metrics.failover_done([
                (FailoverPhase::Decide, decided - began),
                (FailoverPhase::Promote, decided.elapsed()),
            ]);
        }
    }

    /// Promotes the chosen standby in place of the old primary, which is fenced; the choice is
    /// remembered (and saved) before the standby is asked. False when the promotion did not
    /// finish (writes then stay refused with the reason).
    pub(super) async fn carry_out(
        &mut self,
        promotion: Promotion,
        roles: Vec<Role>,
        suspect: &[bool],
    ) -> bool {
        // Recorded in etcd under the lease first (with `[cluster]`), which also checks again
        // that this instance may act: reading the standbys took time.
        if let Err(why) = self.announce(&promotion).await {
            self.give_up(&roles, suspect, why);
            return false;
        }
        let (new, old) = (promotion.node, promotion.old_primary);
        self.memory.promoting = Some(promotion.clone());
        let reason = format!(
            "it was lost as primary and {} was promoted in its place",
            self.name(new)
        );
        self.fence(old, reason);
        let mut roles = roles;
        roles[old] = Role::Fenced;
        let asked = format!(
            "failover in progress: promoting {} in place of {}",
            self.name(new),
            self.name(old)
        );
        // Saved before the standby is asked, whether or not the topology changes: a pgvigil
        // restarted mid-promotion must not ask a second standby.
        self.save(self.publisher.snapshot().generation);
        self.publish(&roles, suspect, Primary::Unavailable(asked));
        let step = Instant::now();
        let timeline = match actions::promote(&self.config(), new).await {
            Ok(timeline) => timeline,
            Err(e) => {
                error!(standby = %self.name(new), error = %e, took = ?step.elapsed(), "promotion did not finish in time; no other standby is asked while it still may");
                self.give_up(
                    &roles,
                    suspect,
                    format!(
                        "failover in progress: {} was asked to promote and has not finished \
                         ({e}); no other standby is promoted while it still may",
                        self.name(new)
                    ),
                );
                return false;
            }
        };
        info!(standby = %self.name(new), timeline, took = ?step.elapsed(), "promoted");
        self.finish(promotion, timeline, roles, suspect).await;
        true
    }

    /// `promotion` left recovery on `timeline`: writes go to it, the other standbys follow it,
    /// the old primary stays fenced, and the positions are logged and saved.
    pub(super) async fn finish(
        &mut self,
        promotion: Promotion,
        timeline: u32,
        mut roles: Vec<Role>,
        suspect: &[bool],
    ) {
        let (new, old) = (promotion.node, promotion.old_primary);
        let reason = format!(
            "it was lost as primary and {} was promoted in its place",
            self.name(new)
        );
        self.fence(old, reason);
        self.events.await_first_write(new);
        self.events.push(
            EventKind::Promoted,
            Some(self.name(new).as_str()),
            format!(
                "promoted in place of {} on timeline {timeline}",
                self.name(old)
            ),
        );
        self.memory.primary = Some(new);
        self.memory.promoting = None;
        self.memory.last_promotion = Some(promotion.clone());
        self.retry_at = None;
        self.refused = None;
        self.stale_before[new] = Some(Instant::now());
        // pgvigil has just heard from it: failures counted while it was unreachable (a pending
        // promotion finishing after a freeze) must not make the new primary look lost at once.
        self.board[new].failures = 0;
        if let Some(observation) = self.board[new].last.as_mut() {
            observation.in_recovery = false;
            observation.timeline = timeline;
            observation.receiver = None;
        }
        roles[old] = Role::Fenced;
        roles[new] = Role::Primary;
        self.publish(&roles, suspect, Primary::Known(new));
        let lost = promotion.loss();
        let record = format!("up to {lost} bytes of asynchronous commits may be lost");
        let (old_lsn, new_lsn) = (format_lsn(promotion.old_lsn), format_lsn(promotion.new_lsn));
        if lost > 0 {
            warn!(primary = %self.name(new), fenced = %self.name(old), %old_lsn, %new_lsn, lost_bytes = lost, "writes go to the new primary; {record}");
        } else {
            info!(primary = %self.name(new), fenced = %self.name(old), %old_lsn, %new_lsn, lost_bytes = lost, "writes go to the new primary; {record}");
        }
        // The new primary stays in the list: its conninfo from its standby days may be the one a
        // user-less sibling adopts.
        let standbys: Vec<NodeId> = (0..roles.len())
            .filter(|&n| n == new || roles[n] == Role::Standby)
            .collect();
        if self.may_act().is_ok() {
            self.followers.repoint(
                &self.proxy.config(),
                &standbys,
                new,
                timeline,
                &self.memory.paused,
            );
            for &node in &standbys {
                self.memory.paused[node] = None;
            }
            self.save(self.publisher.snapshot().generation);
            self.fence_reachable();
            self.settle_new_primary(new);
        }
    }

    /// Reads every standby that might replace `old` now (but those of `unreadable`) and lets
    /// `choose` decide.
    pub(super) async fn choose(
        &self,
        old: NodeId,
        roles: &[Role],
        unreadable: &[(NodeId, String)],
    ) -> Choice {
        let step = Instant::now();
        let readings = self.read_candidates(old, roles, unreadable).await;
        let choice = choose(&self.config(), &self.board, old, &readings);
        info!(
            readings = ?readings
                .iter()
                .map(|(n, reading)| (self.name(*n), reading))
                .collect::<Vec<_>>(),
            ?choice,
            took = ?step.elapsed(),
            "standby chosen"
        );
        choice
    }

    /// The position of every standby that might replace `old`, read now, in node order. A
    /// standby that does not answer its probes is not read, but counts as unreadable (it may be
    /// the one that holds the most); nor is one of `unreadable`, which counts as unreadable for
    /// the reason given.
    pub(super) async fn read_candidates(
        &self,
        old: NodeId,
        roles: &[Role],
        unreadable: &[(NodeId, String)],
    ) -> Vec<(NodeId, Reading)> {
        let mut readings = Vec::new();
        let mut reads = JoinSet::new();
        // Fenced and detached nodes are out of the running and not even read.
        let candidates = (0..roles.len())
            .filter(|&n| n != old && !self.memory.fenced[n] && !self.memory.detached[n]);
        for node in candidates {
            if let Some((_, reason)) = unreadable.iter().find(|(n, _)| *n == node) {
                readings.push((node, Reading::Unreadable(reason.clone())));
                continue;
            }
            match roles[node] {
                Role::Standby => {
                    let config = self.proxy.config().clone();
                    reads.spawn(async move { (node, actions::position(&config, node).await) });
                }
                Role::Primary | Role::Fenced | Role::Detached | Role::Leaving | Role::Removed => {}
                Role::Down | Role::Unknown => readings.push((
                    node,
                    Reading::Unreadable("it does not answer its probes".into()),
                )),
            }
        }
        while let Some(joined) = reads.join_next().await {
            match joined {
                Ok((node, Ok(position))) => readings.push((node, Reading::Read(position))),
                Ok((node, Err(e))) => {
                    warn!(standby = %self.name(node), error = %e, "cannot read the standby's position");
                    readings.push((node, Reading::Unreadable(e.to_string())));
                }
                Err(e) => warn!(error = %e, "a position read failed"),
            }
        }
        readings.sort_by_key(|(node, _)| *node);
        readings
    }
}
