//! The one question the coordinator asks before acting on the nodes: may this instance act now?
//! Alone, always; with `[cluster]`, only as the leader elected in etcd and while its lease is
//! valid. Followers route from what they observe and leave failovers to the leader; the state
//! the coordinator saves is also handed to the etcd writer (see `crate::cluster`).

use tracing::warn;

use super::{Assessment, Coordinator};
use crate::cluster::shared::SharedState;
use crate::cluster::views::{self, InstanceView};
use crate::state::State;
use crate::topology::{NodeId, Primary};

impl Coordinator {
    /// The gate of every action on the nodes (promote, fence, `ALTER SYSTEM`, repoint): Ok when
    /// this instance decides alone or is the leader with its etcd lease still valid.
    pub(super) fn may_act(&self) -> Result<(), String> {
        self.proxy.leadership.may_act()
    }

    /// The primary is lost (or a promotion pending) but this instance may not act: writes wait
    /// while the leader, if any, fails over; reads go on from the observed topology.
    pub(super) fn leave_to_leader(&mut self, verdict: Assessment, why: String) {
        let primary = self.memory.primary.map_or("?", |n| self.name(n)).to_owned();
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

    /// Hands `state` to the etcd writer, which writes it under the lease while this instance
    /// leads (nothing happens without `[cluster]`).
    pub(super) fn share(&self, state: &State) {
        let timeline = self
            .memory
            .primary
            .and_then(|p| self.board[p].last.as_ref())
            .map(|o| o.timeline);
        let leader = match self.proxy.leadership.member() {
            Some(member) => member.name.clone(),
            None => return,
        };
        self.proxy.leadership.share(SharedState {
            leader,
            generation: state.generation,
            primary: state.primary.clone(),
            timeline,
            fenced: state.fenced.clone(),
            promoting: state.promoting.clone(),
            last_promotion: state.last_promotion.clone(),
        });
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
        self.proxy
            .leadership
            .report_view(InstanceView { reaches, lost });
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
        views::majority_lost(&views, &member.name, self.name(primary))
    }
}
