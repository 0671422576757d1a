//! Which standbys follow the primary, and so may take reads (see `health::following`), and the
//! repointing of standbys after a promotion: each one rewritten, then watched in a task until it
//! streams from the new primary on its timeline, so that the coordinator goes on meanwhile and a
//! standby that never follows is recorded as such, not as "repointed".

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::{JoinError, JoinSet};
use tracing::{error, info, warn};

use super::actions::{self, ActionError};
use super::following::{following, streams_from, Following, PrimaryTrail, PrimaryView, ProbeTime};
use crate::config::Config;
use crate::health::{NodeHealth, Report};
use crate::topology::{NodeId, Primary, Role, Stale};

/// How long a repointed standby has to stream from the new primary before pgvigil calls the
/// repoint failed (a WAL receiver restarts within `wal_retrieve_retry_interval`, 5 s by default).
const STREAM_WAIT: Duration = Duration::from_secs(10);

/// What a repoint task reports: the standby, and how it went.
type Repointed = (NodeId, NodeId, Result<Duration, ActionError>);

/// The standbys' standing and the repoints in flight.
pub struct Followers {
    /// The primary's recent positions.
    trail: PrimaryTrail,
    /// Why each node takes no reads; None for nodes that follow (or are no standbys).
    stale: Vec<Option<Stale>>,
    /// When each node's latest successful probe ran.
    probed: Vec<Option<ProbeTime>>,
    /// Repoints being made and verified.
    repoints: JoinSet<Repointed>,
}

impl Followers {
    /// Nothing known yet, for `node_count` nodes.
    pub fn new(node_count: usize) -> Followers {
        Followers {
            trail: PrimaryTrail::default(),
            stale: vec![None; node_count],
            probed: vec![None; node_count],
            repoints: JoinSet::new(),
        }
    }

    /// Makes room for nodes a reload added, up to `node_count`; `node` (added again after its
    /// removal) starts afresh.
    pub fn cover(&mut self, node_count: usize) {
        self.stale.resize(node_count.max(self.stale.len()), None);
        self.probed.resize(node_count.max(self.probed.len()), None);
    }

    /// Forgets what was known of `node` (a reload removed it or added it again).
    pub fn forget(&mut self, node: NodeId) {
        if let (Some(stale), Some(probed)) = (self.stale.get_mut(node), self.probed.get_mut(node)) {
            *stale = None;
            *probed = None;
        }
    }

    /// Each node's reason to take no reads, in node order.
    pub fn stale(&self) -> &[Option<Stale>] {
        &self.stale
    }

    /// Takes in a probe report as it arrives (the primary's positions form the trail).
    pub fn note(&mut self, report: &Report, primary: Option<NodeId>) {
        let Ok(observation) = &report.outcome else {
            return;
        };
        // Now is after the node answered: an upper bound on when it read its state.
        let time = ProbeTime {
            started: report.started,
            answered: Instant::now(),
        };
        if let Some(slot) = self.probed.get_mut(report.node) {
            *slot = Some(time);
        }
        if primary == Some(report.node) && !observation.in_recovery {
            self.trail
                .record(report.node, time, observation.position.lsn);
        }
    }

    /// Judges every standby against the primary. Without a known primary only a failed repoint
    /// is kept: there is nothing to follow, and reads go on from the standbys as they are.
    pub fn judge(
        &mut self,
        config: &Config,
        board: &[NodeHealth],
        roles: &[Role],
        primary: &Primary,
    ) {
        for node in 0..self.stale.len() {
            let previous = self.stale[node].take();
            let next = match (roles.get(node), primary) {
                (Some(Role::Standby), Primary::Known(p)) => {
                    self.judge_one(config, board, node, *p, previous.clone())
                }
                (Some(Role::Standby), Primary::Unavailable(_)) => previous
                    .clone()
                    .filter(|s| matches!(s, Stale::NotRepointed(_))),
                _ => None,
            };
            if next != previous {
                let name = &config.nodes[node].name;
                match &next {
                    Some(stale) => {
                        warn!(standby = %name, reason = %stale.describe(), "standby takes no reads")
                    }
                    None if roles.get(node) == Some(&Role::Standby) => {
                        info!(standby = %name, "standby takes reads again")
                    }
                    None => {}
                }
            }
            self.stale[node] = next;
        }
    }

    fn judge_one(
        &self,
        config: &Config,
        board: &[NodeHealth],
        node: NodeId,
        primary: NodeId,
        previous: Option<Stale>,
    ) -> Option<Stale> {
        let (Some(observation), Some(time)) = (board[node].current(), self.probed[node]) else {
            // Its latest probe failed: it is suspect, and reads avoid it anyway.
            return previous;
        };
        let Some(primary_seen) = board.get(primary).and_then(|h| h.last.as_ref()) else {
            return previous;
        };
        let target = &config.nodes[primary];
        if matches!(previous, Some(Stale::NotRepointed(_)))
            && !streams_from(
                observation,
                (&target.host, target.port),
                primary_seen.timeline,
            )
        {
            return previous;
        }
        let view = PrimaryView {
            node: primary,
            timeline: primary_seen.timeline,
            answers: board[primary].current().is_some(),
            trail: &self.trail,
        };
        match following(observation, time, view, config.routing.max_lag) {
            Following::Yes => None,
            Following::No(stale) => Some(stale),
            Following::Pending(stale) => previous.filter(|s| *s == stale),
        }
    }

    /// Repoints every standby of `standbys` but `primary` at it, each in a task that then waits
    /// for it to stream on `timeline`; repoints still running from an earlier failover stop.
    /// `paused` holds, per node, the conninfo a failover stopped it streaming with.
    pub fn repoint(
        &mut self,
        config: &Arc<Config>,
        standbys: &[NodeId],
        primary: NodeId,
        timeline: u32,
        paused: &[Option<String>],
    ) {
        self.repoints.abort_all();
        let siblings: Arc<[NodeId]> = standbys.into();
        let paused: Arc<[Option<String>]> = paused.into();
        for &standby in standbys.iter().filter(|&&s| s != primary) {
            self.stale[standby] = None;
            let config = config.clone();
            let siblings = siblings.clone();
            let paused = paused.clone();
            self.repoints.spawn(async move {
                let began = Instant::now();
                let result = async {
                    actions::repoint(&config, standby, primary, &siblings, &paused).await?;
                    actions::await_stream(&config, standby, primary, timeline, STREAM_WAIT).await
                }
                .await;
                (standby, primary, result.map(|()| began.elapsed()))
            });
        }
    }

    /// Whether repoints are in flight.
    pub fn repointing(&self) -> bool {
        !self.repoints.is_empty()
    }

    /// The next repoint to finish (pending forever while none runs).
    pub async fn next_repoint(&mut self) -> Option<Result<Repointed, JoinError>> {
        self.repoints.join_next().await
    }

    /// Records how a repoint ended: a standby that does not stream from the new primary takes
    /// no reads, with the reason in the topology.
    pub fn settle(&mut self, config: &Config, outcome: Result<Repointed, JoinError>) {
        match outcome {
            Ok((standby, primary, Ok(took))) => info!(
                standby = %config.nodes[standby].name,
                primary = %config.nodes[primary].name,
                ?took,
                "standby repointed: it streams from the new primary"
            ),
            Ok((standby, primary, Err(e))) => {
                error!(
                    standby = %config.nodes[standby].name,
                    primary = %config.nodes[primary].name,
                    error = %e,
                    "standby not repointed: it takes no reads until it streams from the primary"
                );
                if let Some(slot) = self.stale.get_mut(standby) {
                    *slot = Some(Stale::NotRepointed(e.to_string()));
                }
            }
            Err(e) if e.is_cancelled() => {}
            Err(e) => error!(error = %e, "a repoint task failed"),
        }
    }
}
