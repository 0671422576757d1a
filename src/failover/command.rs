//! The operator's commands, carried out by the coordinator between its own steps: attach,
//! detach, unfence and promote (or its dry run).

use tracing::{info, warn};

use super::assess::assess;
use super::choose::{choose, Choice, Reading};
use super::control::Reply;
use super::Coordinator;
use crate::admin::api::{Candidate, Command, Done, DryRun, EventKind, Refusal};
use crate::health::{NodeHealth, SyncState};
use crate::replication::format_lsn;
use crate::topology::{NodeId, Primary, Role};

/// What to do when the status is worth a look before retrying.
const SEE_STATUS: &str = "see `pgvigil status`";

impl Coordinator {
    /// Carries out `command` and says how it went; the answer is logged and kept as an event.
    /// `started`: the first verdict has been reached (before it nothing is known to act on).
    pub(super) async fn execute(&mut self, command: Command, started: bool) -> Reply {
        let answer = self.carry_out_command(&command, started).await;
        let node = command.node();
        match &answer {
            Ok(done) => {
                info!(command = command.verb(), ?node, message = %done.message, "admin command done");
                if !matches!(command, Command::Promote { dry_run: true, .. }) {
                    self.events
                        .push(EventKind::Command, node, done.message.clone());
                }
            }
            Err(refusal) => {
                warn!(command = command.verb(), ?node, reason = %refusal.refused, "admin command refused");
                self.events.push(
                    EventKind::Command,
                    node,
                    format!("{} refused: {}", command.verb(), refusal.refused),
                );
            }
        }
        self.publish_view();
        answer
    }

    async fn carry_out_command(&mut self, command: &Command, started: bool) -> Reply {
        let node = command.node().map(|n| self.node_named(n)).transpose()?;
        if !started {
            return Err(Refusal::new(
                "pgvigil has not heard from every node yet",
                "retry in a few seconds",
            ));
        }
        // Only the instance that may act on the nodes carries out commands (a dry run changes
        // nothing).
        if !matches!(command, Command::Promote { dry_run: true, .. }) {
            if let Err(why) = self.may_act() {
                return Err(Refusal::new(
                    why,
                    "send the command to the leading pgvigil instance",
                ));
            }
        }
        if let Some(promotion) = &self.memory.promoting {
            if !matches!(command, Command::Promote { dry_run: true, .. }) {
                return Err(Refusal::new(
                    format!(
                        "a failover is in progress: {} was asked to promote in place of {}",
                        self.name(promotion.node),
                        self.name(promotion.old_primary)
                    ),
                    format!("wait until it finishes ({SEE_STATUS}), then retry"),
                ));
            }
        }
        match (command, node) {
            (Command::Switchover { drain_timeout, .. }, to) => {
                self.switchover(to, *drain_timeout).await
            }
            (_, None) => Err(Refusal::new(
                format!("{} needs a node", command.verb()),
                format!("name one of: {}", self.node_names()),
            )),
            (Command::Attach(_), Some(node)) => self.attach(node).await,
            (Command::Detach(_), Some(node)) => self.detach(node).await,
            (Command::Unfence(_), Some(node)) => self.unfence(node).await,
            (Command::Failback { reclone, .. }, Some(node)) => self.failback(node, *reclone).await,
            (Command::Promote { dry_run: true, .. }, Some(node)) => self.dry_run(node).await,
            (Command::Promote { dry_run: false, .. }, Some(node)) => {
                self.promote_by_hand(node).await
            }
        }
    }

    fn node_named(&self, name: &str) -> Result<NodeId, Refusal> {
        self.config()
            .nodes
            .iter()
            .position(|n| n.name == name)
            .filter(|&node| self.is_member(node))
            .ok_or_else(|| {
                Refusal::new(
                    format!("no node is called {name:?}"),
                    format!("use one of the configured nodes: {}", self.node_names()),
                )
            })
    }

    /// The configured node names, comma-separated.
    fn node_names(&self) -> String {
        let config = self.config();
        let names: Vec<&str> = (config.nodes.iter().enumerate())
            .filter(|&(node, _)| self.is_member(node))
            .map(|(_, n)| n.name.as_str())
            .collect();
        names.join(", ")
    }

    async fn attach(&mut self, node: NodeId) -> Reply {
        if !self.memory.detached[node] {
            return Err(Refusal::new(
                format!("{} is not detached", self.name(node)),
                format!("nothing to do; {SEE_STATUS}"),
            ));
        }
        self.memory.detached[node] = false;
        self.evaluate().await;
        Ok(done(format!(
            "{} attached: it takes reads and may be promoted again",
            self.name(node)
        )))
    }

    async fn detach(&mut self, node: NodeId) -> Reply {
        if self.memory.detached[node] {
            return Err(Refusal::new(
                format!("{} is already detached", self.name(node)),
                format!("`pgvigil attach {}` puts it back", self.name(node)),
            ));
        }
        if self.publisher.snapshot().primary == Primary::Known(node) {
            return Err(Refusal::new(
                format!(
                    "{} is the primary: writes have nowhere else to go",
                    self.name(node)
                ),
                "promote another node first, then detach this one",
            ));
        }
        self.memory.detached[node] = true;
        self.evaluate().await;
        Ok(done(format!(
            "{} detached: no reads, never promoted, still probed; `pgvigil attach {}` puts it back",
            self.name(node),
            self.name(node)
        )))
    }

    async fn unfence(&mut self, node: NodeId) -> Reply {
        if !self.memory.fenced[node] {
            return Err(Refusal::new(
                format!("{} is not fenced", self.name(node)),
                format!("nothing to do; {SEE_STATUS}"),
            ));
        }
        // Judged on the latest probe before anything is changed: once fenced, the node answers
        // read-only, so a probe taken after the fence was applied no longer shows it as a
        // writable primary, yet it would be one again as soon as the reset below took effect.
        if self.stale_primary(node) {
            return Err(self.fenced_again(node));
        }
        // Reset first: a node unfenced while still read-only would refuse writes if promoted.
        let reset = super::actions::unfence(&self.config(), node).await;
        self.memory.fenced[node] = false;
        self.fence_reasons[node] = None;
        self.fence_attempts[node] = None;
        self.evaluate().await;
        // The fence comes straight back if the node still claims to be primary on an older
        // timeline: say so rather than pretend it worked.
        if self.memory.fenced[node] {
            return Err(self.fenced_again(node));
        }
        let mut message = format!(
            "{} unfenced: it is routed to again by its observed role",
            self.name(node)
        );
        if let Err(e) = reset {
            message = format!(
                "{message}; default_transaction_read_only could not be reset ({e}): run \
                 `ALTER SYSTEM RESET default_transaction_read_only` on it by hand"
            );
        }
        Ok(done(message))
    }

    /// Whether `node` was last seen out of recovery on an older timeline than the known
    /// primary's: unfenced, it would be fenced again at once.
    fn stale_primary(&self, node: NodeId) -> bool {
        let Primary::Known(primary) = self.publisher.snapshot().primary else {
            return false;
        };
        stale_primary(&self.board, self.config().health.failures, primary, node)
    }

    fn fenced_again(&self, node: NodeId) -> Refusal {
        Refusal::new(
            format!(
                "{} is fenced again at once: it still claims to be primary on an older timeline \
                 than the current primary",
                self.name(node)
            ),
            format!(
                "make it a standby of the current primary first (pg_rewind, standby.signal), \
                 then `pgvigil unfence {}`",
                self.name(node)
            ),
        )
    }

    /// `promote NODE` while the primary is lost (automatic failover off, or refused): the same
    /// choice failover makes, carried out only if it picks NODE.
    async fn promote_by_hand(&mut self, node: NodeId) -> Reply {
        let verdict = assess(&self.config(), &self.board, &self.memory);
        let name = self.name(node).to_owned();
        let old = match (&verdict.primary, verdict.lost) {
            (Primary::Known(primary), _) if *primary == node => {
                return Err(Refusal::new(
                    format!("{name} is already the primary"),
                    format!("nothing to do; {SEE_STATUS}"),
                ))
            }
            // The primary is healthy: promoting another node is a switchover.
            (Primary::Known(_), _) => {
                return self
                    .switchover(Some(node), super::switchover::DEFAULT_DRAIN)
                    .await
            }
            (_, Some(lost)) => lost,
            (Primary::Unavailable(reason), None) => {
                return Err(Refusal::new(
                    format!("no lost primary to replace: {reason}"),
                    format!("wait for the nodes to settle ({SEE_STATUS}), then retry"),
                ))
            }
        };
        let roles = self.candidate_roles(verdict.roles.clone());
        match self.choose(old, &roles, &[]).await {
            Choice::Promote(promotion) if promotion.node == node => {
                if self.carry_out(promotion, roles, &verdict.suspect).await {
                    Ok(done(format!(
                        "{name} promoted in place of {}",
                        self.name(old)
                    )))
                } else {
                    Err(Refusal::new(
                        format!("{name} was asked to promote and has not finished"),
                        format!("{SEE_STATUS}: it stays the only candidate until it does"),
                    ))
                }
            }
            Choice::Promote(promotion) => Err(Refusal::new(
                format!(
                    "failover would promote {}, not {name}: it holds more of the WAL or ranks higher",
                    self.name(promotion.node)
                ),
                format!(
                    "`pgvigil promote {} --dry-run` shows why; promote that one instead",
                    self.name(promotion.node)
                ),
            )),
            Choice::Refuse(reason) => Err(Refusal::new(
                reason,
                format!("`pgvigil promote {name} --dry-run` shows each standby's position"),
            )),
        }
    }

    /// Which node failover would promote now in place of the current (or lost) primary, and
    /// what the choice weighed; changes nothing.
    async fn dry_run(&mut self, asked: NodeId) -> Reply {
        let Some(old) = self.memory.primary else {
            return Err(Refusal::new(
                "no primary has been seen yet, so there is nothing to fail over from",
                format!("wait for the first probes ({SEE_STATUS})"),
            ));
        };
        let verdict = assess(&self.config(), &self.board, &self.memory);
        let roles = self.candidate_roles(verdict.roles);
        let readings = self.read_candidates(old, &roles, &[]).await;
        let choice = choose(&self.config(), &self.board, old, &readings);
        let last = self.board[old].last.as_ref();
        let primary_lsn = last.map(|o| o.position.lsn);
        let sync_state = |node: NodeId| {
            let senders = last?.senders.as_ref()?;
            let row = senders
                .standbys
                .iter()
                .find(|s| s.name == self.config().nodes[node].name)?;
            Some(sync_name(row.sync).to_owned())
        };
        let standbys = (0..roles.len())
            .filter(|&n| n != old)
            .map(|node| {
                let reading = readings.iter().find(|(n, _)| *n == node).map(|(_, r)| r);
                let position = match reading {
                    Some(Reading::Read(p)) => Some(p),
                    _ => None,
                };
                let excluded = if self.config().nodes[node].no_promote {
                    Some("no_promote is set".to_owned())
                } else if self.memory.fenced[node] {
                    Some("fenced".to_owned())
                } else if self.memory.detached[node] {
                    Some("detached".to_owned())
                } else {
                    match reading {
                        Some(Reading::Unreadable(why)) => Some(format!("cannot be read: {why}")),
                        Some(Reading::Read(_)) => None,
                        None => Some(format!("it is {}", roles[node].as_str())),
                    }
                };
                Candidate {
                    name: self.name(node).to_owned(),
                    received: position.map(|p| format_lsn(p.received)),
                    replayed: position.map(|p| format_lsn(p.replayed)),
                    behind_bytes: position
                        .zip(primary_lsn)
                        .map(|(p, lsn)| lsn.saturating_sub(p.received.max(p.replayed))),
                    sync_state: sync_state(node),
                    priority: self.config().nodes[node].priority,
                    excluded,
                }
            })
            .collect();
        let (candidate, refusal, message) = match &choice {
            Choice::Promote(promotion) => {
                let chosen = self.name(promotion.node).to_owned();
                let message = if promotion.node == asked {
                    format!("failover would promote {chosen} now")
                } else {
                    format!(
                        "failover would promote {chosen} now, not {}",
                        self.name(asked)
                    )
                };
                (Some(chosen), None, message)
            }
            Choice::Refuse(reason) => (
                None,
                Some(reason.clone()),
                format!("failover would promote nothing now: {reason}"),
            ),
        };
        Ok(Done {
            message,
            dry_run: Some(DryRun {
                primary: self.name(old).to_owned(),
                primary_lsn: primary_lsn.map(format_lsn),
                candidate,
                refusal,
                standbys,
            }),
            write_pause_ms: None,
        })
    }

    /// `roles` with detached nodes shown as detached, as the topology shows them.
    pub(super) fn candidate_roles(&self, mut roles: Vec<Role>) -> Vec<Role> {
        for (node, role) in roles.iter_mut().enumerate() {
            if self.memory.detached[node] && role.is_usable() {
                *role = Role::Detached;
            }
        }
        roles
    }
}

fn done(message: String) -> Done {
    Done {
        message,
        dry_run: None,
        write_pause_ms: None,
    }
}

/// `sync_state` as PostgreSQL spells it.
fn sync_name(state: SyncState) -> &'static str {
    match state {
        SyncState::Async => "async",
        SyncState::Potential => "potential",
        SyncState::Sync => "sync",
        SyncState::Quorum => "quorum",
    }
}

/// Whether `node` was last seen out of recovery on an older timeline than `primary`. Judged,
/// as roles are, on the latest observation of each unless it is down: one probe that failed on
/// a loaded machine does not let a stale primary be unfenced.
fn stale_primary(board: &[NodeHealth], failures: u32, primary: NodeId, node: NodeId) -> bool {
    let known = |n: NodeId| {
        board
            .get(n)
            .filter(|h| !h.is_down(failures))
            .and_then(|h| h.last.as_ref())
            .map(|o| (o.in_recovery, o.timeline))
    };
    match (known(node), known(primary)) {
        (Some((false, mine)), Some((_, current))) => primary != node && mine < current,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::health::{Observation, Report};

    fn observed(in_recovery: bool, timeline: u32) -> Observation {
        Observation {
            in_recovery,
            read_only: !in_recovery,
            ..Observation::primary_for_test(timeline)
        }
    }

    fn probed(outcomes: Vec<Result<Observation, String>>) -> NodeHealth {
        let mut health = NodeHealth::default();
        for outcome in outcomes {
            health.record(&Report {
                node: 0,
                started: Instant::now(),
                outcome,
            });
        }
        health
    }

    #[test]
    fn a_fenced_primary_on_an_older_timeline_stays_stale_through_one_failed_probe() {
        let primary = probed(vec![Ok(observed(false, 2))]);
        let old = |failed: usize| {
            let mut outcomes = vec![Ok(observed(false, 1))];
            outcomes.extend((0..failed).map(|_| Err("timeout".to_owned())));
            probed(outcomes)
        };
        assert!(stale_primary(&[old(0), primary.clone()], 3, 1, 0));
        assert!(stale_primary(&[old(1), primary.clone()], 3, 1, 0));
        // Down, it may be being rebuilt as a standby: unfencing it is allowed.
        assert!(!stale_primary(&[old(3), primary.clone()], 3, 1, 0));
        // The primary's own failed probe does not hide its timeline either.
        let mut flaky = primary;
        flaky.record(&Report {
            node: 1,
            started: Instant::now(),
            outcome: Err("timeout".to_owned()),
        });
        assert!(stale_primary(&[old(0), flaky], 3, 1, 0));
    }

    #[test]
    fn a_standby_or_a_node_on_the_current_timeline_is_not_stale() {
        let primary = probed(vec![Ok(observed(false, 2))]);
        let standby = probed(vec![Ok(observed(true, 1))]);
        let same = probed(vec![Ok(observed(false, 2))]);
        assert!(!stale_primary(&[standby, primary.clone()], 3, 1, 0));
        assert!(!stale_primary(&[same, primary.clone()], 3, 1, 0));
        assert!(!stale_primary(&[primary], 3, 0, 0));
    }
}
