//! The first step of a failover: every standby that might replace the lost primary stops
//! streaming from it before positions are read, so that the positions are final and no standby
//! receives WAL past the fork point from an old primary that thaws meanwhile (it could not follow
//! the new timeline, and with `ANY 1` synchronous replication every commit would wait for it).
//! Each standby's `primary_conninfo` is remembered, in memory and in the state file, until it is
//! pointed at a primary again: the new one, or the old one when it comes back before a promotion.

use tokio::task::JoinSet;
use tracing::{info, warn};

use super::actions;
use super::Coordinator;
use crate::topology::{NodeId, Role};

impl Coordinator {
    /// Stops every standby that might replace `old` streaming, concurrently, and remembers
    /// (and saves) the conninfo each had. Returns the standbys that could not be stopped, with
    /// why: they count as unreadable for the choice.
    pub(super) async fn stop_receivers(
        &mut self,
        old: NodeId,
        roles: &[Role],
    ) -> Vec<(NodeId, String)> {
        let mut stops = JoinSet::new();
        let candidates = (0..roles.len()).filter(|&n| {
            n != old
                && roles[n] == Role::Standby
                && !self.memory.fenced[n]
                && !self.memory.detached[n]
        });
        for node in candidates {
            let config = self.proxy.config().clone();
            stops.spawn(async move { (node, actions::stop_receiver(&config, node).await) });
        }
        let mut failed = Vec::new();
        while let Some(joined) = stops.join_next().await {
            match joined {
                // An empty conninfo: stopped by an earlier attempt, whose remembered one stays.
                Ok((node, Ok(conninfo))) if !conninfo.is_empty() => {
                    info!(standby = %self.name(node), "stopped streaming from the lost primary");
                    self.memory.paused[node] = Some(conninfo);
                }
                Ok((_, Ok(_))) => {}
                Ok((node, Err(e))) => {
                    warn!(standby = %self.name(node), error = %e, "cannot stop the standby streaming from the lost primary");
                    failed.push((node, format!("it could not be stopped streaming ({e})")));
                }
                Err(e) => warn!(error = %e, "a receiver stop failed"),
            }
        }
        self.save(self.publisher.snapshot().generation);
        failed
    }

    /// Points the standbys a failover stopped (and that answer as standbys now) at `primary`
    /// with the conninfo they had: the old primary came back before any promotion, so the
    /// failover is abandoned, or pgvigil restarted after a promotion had finished.
    pub(super) fn resume_paused(&mut self, primary: NodeId, roles: &[Role]) {
        let paused: Vec<NodeId> = (0..roles.len())
            .filter(|&n| self.memory.paused[n].is_some() && roles[n] == Role::Standby)
            .collect();
        // Only the instance that may act touches the nodes (see `gate`).
        if paused.is_empty() || self.may_act().is_err() {
            return;
        }
        let timeline = self.board[primary].last.as_ref().map_or(0, |o| o.timeline);
        info!(
            primary = %self.name(primary),
            standbys = ?paused.iter().map(|&n| self.name(n)).collect::<Vec<_>>(),
            "standbys stopped by a failover that did not promote follow the primary again"
        );
        let mut standbys = paused.clone();
        standbys.push(primary);
        self.followers.repoint(
            &self.proxy.config(),
            &standbys,
            primary,
            timeline,
            &self.memory.paused,
        );
        for node in paused {
            self.memory.paused[node] = None;
        }
        self.save(self.publisher.snapshot().generation);
    }
}
