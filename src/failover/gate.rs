//! The one question the coordinator asks before acting on the nodes: may this instance act now?
//! Alone, always; with `[cluster]`, only as the leader elected in etcd and while its lease is
//! valid. Followers route from what they observe and leave failovers to the leader; the state
//! the coordinator saves is also handed to the etcd writer (see `crate::cluster`).

use std::time::Instant;

use tracing::{info, warn};

use super::choose::Promotion;
use super::persist::promotion_from;
use super::{assess, Assessment, Coordinator};
use crate::cluster::shared::{self, SharedState};
use crate::cluster::views::{self, InstanceView};
use crate::cluster::Standing;
use crate::state::State;
use crate::topology::{NodeId, Primary};

impl Coordinator {
    /// The gate of every action on the nodes (promote, fence, `ALTER SYSTEM`, repoint): Ok when
    /// this instance decides alone or is the leader with its etcd lease still valid.
    pub(super) fn may_act(&self) -> Result<(), String> {
        self.proxy.leadership.may_act()
    }

    /// Before acting on a lost primary or a pending promotion: the verdict to act on (judged
    /// again once a pending promotion changed hands), or None when this instance leaves the
    /// matter to the leader (clients are told why).
    pub(super) async fn pass_gate(&mut self, verdict: Assessment) -> Option<Assessment> {
        self.follow_leaders_fences().await;
        let unsettled =
            |c: &Coordinator, v: &Assessment| c.memory.promoting.is_some() || v.lost.is_some();
        if !unsettled(self, &verdict) {
            self.held = None;
            return Some(verdict);
        }
        let (verdict, why) = match self.may_act() {
            Err(why) if self.finished_elsewhere(&verdict) => {
                (assess(&self.config(), &self.board, &self.memory), why)
            }
            Err(why) => (verdict, why),
            Ok(()) => match self.adopt_pending().await {
                Ok(()) => {
                    self.held = None;
                    return Some(assess(&self.config(), &self.board, &self.memory));
                }
                Err(why) => (verdict, why),
            },
        };
        if !unsettled(self, &verdict) {
            self.held = None;
            self.hinted = None;
            return Some(verdict);
        }
        self.probe_leaders_primary().await;
        self.leave_to_leader(verdict, why);
        None
    }

    /// Following a leader: its fences, as it shared them in etcd, become this instance's (read at
    /// most once per `health.interval`), so that a node the leader fenced gets nothing routed
    /// here either, and one it failed back or unfenced is used again.
    async fn follow_leaders_fences(&mut self) {
        let Standing::Follower {
            leader: Some(leader),
            ..
        } = self.proxy.leadership.standing()
        else {
            return;
        };
        let interval = self.config().health.interval;
        if self.fences_read.is_some_and(|at| at.elapsed() < interval) {
            return;
        }
        let Some(member) = self.proxy.leadership.member() else {
            return;
        };
        self.fences_read = Some(Instant::now());
        let Ok(Some(state)) = shared::read(member).await else {
            return;
        };
        if state.leader != leader {
            return;
        }
        for node in 0..self.memory.fenced.len() {
            let fenced = state.fenced.iter().any(|name| *name == self.name(node));
            if fenced && !self.memory.fenced[node] {
                self.fence(node, format!("fenced by the leading instance {leader}"));
            } else if !fenced && self.memory.fenced[node] {
                info!(node = %self.name(node), %leader, "the leading instance lifted the fence");
                self.memory.fenced[node] = false;
                self.fence_reasons[node] = None;
            }
        }
    }

    /// While the leader fails over: a new primary it shared in etcd is probed at once, so that
    /// this instance's writes follow it without waiting for that node's next probe.
    async fn probe_leaders_primary(&mut self) {
        let Some(member) = self.proxy.leadership.member() else {
            return;
        };
        let Ok(Some(state)) = shared::read(member).await else {
            return;
        };
        let node = state
            .primary
            .and_then(|name| self.config().nodes.iter().position(|n| n.name == name));
        let Some(node) = node else {
            return;
        };
        if self.memory.primary == Some(node) || self.hinted == Some(node) {
            return;
        }
        info!(primary = %self.name(node), leader = %state.leader, "the leader shared a new primary: probing it now");
        self.hinted = Some(node);
        self.proxy.nudges.nudge(node);
    }

    /// The primary is lost (or a promotion pending) but this instance may not act: writes wait
    /// while the leader, if any, fails over; reads go on from the observed topology.
    pub(super) fn leave_to_leader(&mut self, verdict: Assessment, why: String) {
        let primary = self
            .memory
            .primary
            .map_or_else(|| "?".to_owned(), |n| self.name(n));
        if self.held.as_ref() != Some(&why) {
            warn!(%primary, %why, "the primary is lost; this instance does not fail over");
            self.held = Some(why.clone());
        }
        let reason = format!("primary {primary} is lost: {why}");
        self.publish(
            &verdict.roles,
            &verdict.suspect,
            Primary::Unavailable(reason),
        );
    }

    /// A promotion this instance left pending (as a leader that lost its lease meanwhile, or
    /// from its state file) finished without it: the standby asked is the observed primary.
    /// Forgets it, so that writes go there; true if so.
    pub(super) fn finished_elsewhere(&mut self, verdict: &Assessment) -> bool {
        match (&self.memory.promoting, &verdict.primary) {
            (Some(promotion), Primary::Known(primary)) if promotion.node == *primary => {
                info!(
                    primary = %self.name(*primary),
                    "the pending promotion finished without this instance"
                );
                self.memory.primary = Some(*primary);
                self.memory.last_promotion = self.memory.promoting.take();
                true
            }
            _ => false,
        }
    }

    /// Hands `state` to the etcd writer, which writes it under the lease while this instance
    /// leads (nothing happens without `[cluster]`).
    pub(super) fn share(&self, state: &State) {
        if let Some(member) = self.proxy.leadership.member() {
            let shared = self.shared_state(state, member.name.clone());
            self.proxy.leadership.share(shared);
        }
    }

    /// `state` as the leader shares it, with the primary's timeline.
    fn shared_state(&self, state: &State, leader: String) -> SharedState {
        let timeline = self
            .memory
            .primary
            .and_then(|p| self.board[p].last.as_ref())
            .map(|o| o.timeline);
        SharedState {
            leader,
            epoch: self.proxy.leadership.epoch().unwrap_or(0),
            generation: state.generation,
            primary: state.primary.clone(),
            timeline,
            fenced: state.fenced.clone(),
            promoting: state.promoting.clone(),
            last_promotion: state.last_promotion.clone(),
        }
    }

    /// Tells the other instances (through etcd) which nodes this one reaches and whether it
    /// finds the primary lost.
    pub(super) fn report_view(&self, verdict: &Assessment) {
        let failures = self.config().health.failures;
        let reaches = (0..self.board.len())
            .filter(|&n| !self.board[n].is_down(failures))
            .map(|n| self.name(n).to_owned())
            .collect();
        let lost = verdict.lost.map(|n| self.name(n).to_owned());
        self.proxy.leadership.report_view(InstanceView {
            reaches,
            lost,
            admin: None,
        });
    }

    /// Ok when the failover of `primary` may go ahead on the instances' joint view: alone
    /// always; with `[cluster]`, when a majority of the live instances find it lost.
    pub(super) async fn joint_view(&self, primary: NodeId) -> Result<(), String> {
        let Some(member) = self.proxy.leadership.member() else {
            return Ok(());
        };
        let views = views::read_all(member)
            .await
            .map_err(|e| format!("could not read the pgvigil instances' views from etcd: {e}"))?;
        views::majority_lost(&views, &member.name, &self.name(primary))
    }

    /// Once per leadership epoch, before acting on a lost primary: a promotion the previous
    /// leader recorded in etcd and did not see finish becomes this instance's pending promotion,
    /// so that no second standby is promoted. Err (no action) while the state cannot be read.
    pub(super) async fn adopt_pending(&mut self) -> Result<(), String> {
        let (Some(member), Some(epoch)) = (
            self.proxy.leadership.member(),
            self.proxy.leadership.epoch(),
        ) else {
            return Ok(());
        };
        if self.adopted == Some(epoch) {
            return Ok(());
        }
        let state = shared::read(member)
            .await
            .map_err(|e| format!("could not read the shared state from etcd: {e}"))?;
        self.adopted = Some(epoch);
        let Some(record) = state.and_then(|s| s.promoting) else {
            return Ok(());
        };
        if self.memory.promoting.is_some() {
            return Ok(());
        }
        if let Some(promotion) = promotion_from(&self.config(), &record) {
            warn!(
                standby = %record.node,
                old_primary = %record.old_primary,
                "the previous leader asked this standby to promote and did not see it finish: \
                 it stays the only candidate"
            );
            self.memory.fenced[promotion.old_primary] = true;
            self.memory.promoting = Some(promotion);
        }
        Ok(())
    }

    /// Records `promotion` in etcd under the lease before the standby is asked (alone: nothing
    /// to do), so that a later leader finishes it instead of promoting another standby, and a
    /// deposed leader cannot promote at all.
    pub(super) async fn announce(&self, promotion: &Promotion) -> Result<(), String> {
        let Some(member) = self.proxy.leadership.member() else {
            return Ok(());
        };
        let mut state = self.state(self.proxy.topology.load().generation);
        state.promoting = Some(self.promotion_record(promotion));
        let old = self.name(promotion.old_primary).to_owned();
        if !state.fenced.contains(&old) {
            state.fenced.push(old);
        }
        let shared = self.shared_state(&state, member.name.clone());
        self.proxy.leadership.record(&shared).await
    }
}
