//! The failover coordinator: the only writer of the topology. It takes in every probe outcome,
//! judges them (`assess`), publishes roles and the primary, fences stale primaries, and when the
//! primary is lost promotes the most advanced standby, repoints the others, fences the old
//! primary and remembers all that in the state file (see DESIGN.md, "One failover's way").

mod actions;
mod assess;
mod conninfo;
mod followers;
mod following;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

pub use assess::Memory;

use crate::config::Config;
use crate::health::{NodeHealth, Report};
use crate::proxy::Proxy;
use crate::replication::ReplicationView;
use crate::state::{State, StateError, StateFile};
use crate::topology::{NodeId, Primary, Role};
use assess::{assess, choose_candidate, Assessment};
use followers::Followers;

/// How often pgvigil tries again to make a reachable fenced node read-only.
const FENCE_RETRY: Duration = Duration::from_secs(10);

/// What pgvigil remembered from its state file, and the generation to continue from.
pub fn restore(config: &Config) -> Result<(Memory, u64), StateError> {
    let mut memory = Memory::empty(config.nodes.len());
    let Some(dir) = &config.failover.state_dir else {
        warn!("failover.state_dir is not set: fences and the primary are forgotten when pgvigil restarts");
        return Ok((memory, 0));
    };
    let file = StateFile::new(dir);
    let Some(state) = file.load()? else {
        info!(path = %file.path().display(), "no state file yet: discovering the primary");
        return Ok((memory, 0));
    };
    let id = |name: &str| config.nodes.iter().position(|n| n.name == name);
    memory.primary = state.primary.as_deref().and_then(id);
    for name in &state.fenced {
        match id(name) {
            Some(node) => memory.fenced[node] = true,
            None => {
                warn!(node = %name, "the state file fences a node the configuration no longer has")
            }
        }
    }
    info!(
        path = %file.path().display(),
        primary = ?state.primary,
        fenced = ?state.fenced,
        generation = state.generation,
        "state restored; checking it against the nodes"
    );
    Ok((memory, state.generation))
}

/// Takes in probe reports until `shutdown`, keeping the topology true to them.
pub async fn run(
    proxy: Arc<Proxy>,
    memory: Memory,
    mut reports: mpsc::Receiver<Report>,
    shutdown: CancellationToken,
) {
    let mut coordinator = Coordinator::new(proxy, memory);
    // The first verdict waits until every node has answered or failed once.
    let first = tokio::time::Instant::now()
        + coordinator.config().health.timeout
        + coordinator.config().health.interval;
    let mut started = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            report = reports.recv() => match report {
                Some(report) => coordinator.record(&report),
                None => return,
            },
            Some(outcome) = coordinator.followers.next_repoint(), if coordinator.followers.repointing() => {
                coordinator.followers.settle(&coordinator.proxy.config, outcome);
            }
            _ = tokio::time::sleep_until(first), if !started => {}
        }
        while let Ok(report) = reports.try_recv() {
            coordinator.record(&report);
        }
        if !started {
            let everyone = coordinator.board.iter().all(|h| h.probed);
            if !everyone && tokio::time::Instant::now() < first {
                continue;
            }
            started = true;
        }
        coordinator.publish_positions();
        coordinator.evaluate().await;
    }
}

/// The coordinator's state between reports.
struct Coordinator {
    proxy: Arc<Proxy>,
    board: Vec<NodeHealth>,
    memory: Memory,
    state_file: Option<StateFile>,
    /// Reports of probes that started before this are stale (a probe that began before the
    /// node's promotion and says it is in recovery).
    stale_before: Vec<Option<Instant>>,
    /// When each fenced node was last made read-only (or tried).
    fence_attempts: Vec<Option<Instant>>,
    /// No new failover attempt before this (after one failed).
    retry_at: Option<Instant>,
    /// The lost primary already alerted about (automatic failover off).
    alerted: Option<NodeId>,
    /// Which standbys follow the primary; repoints in flight.
    followers: Followers,
    published: bool,
}

impl Coordinator {
    fn new(proxy: Arc<Proxy>, memory: Memory) -> Coordinator {
        let nodes = proxy.config.nodes.len();
        Coordinator {
            state_file: proxy
                .config
                .failover
                .state_dir
                .as_deref()
                .map(StateFile::new),
            board: vec![NodeHealth::default(); nodes],
            fence_attempts: vec![None; nodes],
            stale_before: vec![None; nodes],
            memory,
            proxy,
            retry_at: None,
            alerted: None,
            followers: Followers::new(nodes),
            published: false,
        }
    }

    fn config(&self) -> &Config {
        &self.proxy.config
    }

    fn name(&self, node: NodeId) -> &str {
        &self.proxy.config.nodes[node].name
    }

    fn record(&mut self, report: &Report) {
        let stale = self
            .stale_before
            .get(report.node)
            .copied()
            .flatten()
            .is_some_and(|at| report.started < at);
        if stale {
            return;
        }
        if let Some(health) = self.board.get_mut(report.node) {
            health.record(report);
        }
        self.followers.note(report, self.memory.primary);
    }

    /// Publishes every node's latest position (kept while a node is merely suspect, so that a
    /// primary missing one probe does not make every replica look unmeasurable); `observed_at`
    /// is the start of the newest probe among them (read-your-writes asks whether any probe
    /// started after a write).
    fn publish_positions(&self) {
        let failures = self.config().health.failures;
        let known = |h: &&NodeHealth| !h.is_down(failures);
        let nodes = self
            .board
            .iter()
            .map(|h| {
                Some(h)
                    .filter(known)
                    .and_then(|h| h.last.as_ref())
                    .map(|o| o.position)
            })
            .collect();
        let observed_at = self
            .board
            .iter()
            .filter(known)
            .filter_map(|h| h.observed_at)
            .max();
        self.proxy
            .replication
            .publish(ReplicationView { nodes, observed_at });
    }

    /// Judges the board and acts on the verdict.
    async fn evaluate(&mut self) {
        let verdict = assess(self.config(), &self.board, &self.memory);
        self.followers.judge(
            &self.proxy.config,
            &self.board,
            &verdict.roles,
            &verdict.primary,
        );
        for &node in &verdict.fence {
            warn!(
                node = %self.name(node),
                "fenced: it claims to be primary on an older timeline than another node"
            );
            self.memory.fenced[node] = true;
        }
        if let Some(lost) = verdict.lost {
            self.on_lost_primary(lost, verdict).await;
            return;
        }
        self.alerted = None;
        if verdict.witness.is_some() {
            // The witness may have been probed before the primary went quiet: ask the standbys
            // again now rather than at their next tick (their tasks space probes out).
            for node in (0..self.board.len()).filter(|&n| verdict.roles[n] == Role::Standby) {
                self.proxy.nudges.nudge(node);
            }
        }
        if let Primary::Known(primary) = verdict.primary {
            self.memory.primary = Some(primary);
        }
        self.publish(&verdict.roles, &verdict.suspect, verdict.primary);
        self.fence_reachable();
    }

    /// The primary is down and nobody hears from it: fail over, or only alert.
    async fn on_lost_primary(&mut self, lost: NodeId, verdict: Assessment) {
        let waiting = self.retry_at.is_some_and(|at| Instant::now() < at);
        if !self.config().failover.auto {
            if self.alerted != Some(lost) {
                error!(
                    primary = %self.name(lost),
                    "the primary is lost and failover.auto is off: writes wait for an operator"
                );
                self.alerted = Some(lost);
            }
            let reason = format!(
                "primary {} is lost and automatic failover is off",
                self.name(lost)
            );
            self.publish(
                &verdict.roles,
                &verdict.suspect,
                Primary::Unavailable(reason),
            );
        } else if waiting {
            self.publish(&verdict.roles, &verdict.suspect, verdict.primary);
        } else {
            self.fail_over(lost, verdict).await;
        }
    }

    /// Promotes the most advanced standby in place of `old`; every step is logged with its
    /// duration.
    async fn fail_over(&mut self, old: NodeId, verdict: Assessment) {
        let began = Instant::now();
        warn!(
            primary = %self.name(old),
            failures = self.board[old].failures,
            "primary lost: no answer to its probes and no standby receives WAL from it; failing over"
        );
        let mut roles = verdict.roles;
        let waiting = format!("failover in progress: primary {} was lost", self.name(old));
        self.publish(&roles, &verdict.suspect, Primary::Unavailable(waiting));
        let standbys: Vec<NodeId> = (0..roles.len())
            .filter(|&n| roles[n] == Role::Standby)
            .collect();
        let Some(new) = self.choose(&standbys).await else {
            self.give_up(
                &roles,
                &verdict.suspect,
                format!(
                    "primary {} is lost and no standby can be promoted",
                    self.name(old)
                ),
            );
            return;
        };
        let step = Instant::now();
        let timeline = match actions::promote(self.config(), new).await {
            Ok(timeline) => timeline,
            Err(e) => {
                error!(standby = %self.name(new), error = %e, took = ?step.elapsed(), "promotion failed");
                self.give_up(
                    &roles,
                    &verdict.suspect,
                    format!("failover failed: promoting {}: {e}", self.name(new)),
                );
                return;
            }
        };
        info!(standby = %self.name(new), timeline, took = ?step.elapsed(), "promoted");
        self.memory.fenced[old] = true;
        self.memory.primary = Some(new);
        self.retry_at = None;
        self.stale_before[new] = Some(Instant::now());
        if let Some(observation) = self.board[new].last.as_mut() {
            observation.in_recovery = false;
            observation.timeline = timeline;
            observation.receiver = None;
        }
        roles[old] = Role::Fenced;
        roles[new] = Role::Primary;
        self.publish(&roles, &verdict.suspect, Primary::Known(new));
        info!(
            primary = %self.name(new),
            fenced = %self.name(old),
            took = ?began.elapsed(),
            "writes go to the new primary"
        );
        self.followers
            .repoint(&self.proxy.config, &standbys, new, timeline);
        self.fence_reachable();
        self.checkpoint_later(new);
        info!(took = ?began.elapsed(), "failover complete");
    }

    /// Reads the candidates' positions now and picks the one to promote.
    async fn choose(&self, standbys: &[NodeId]) -> Option<NodeId> {
        let step = Instant::now();
        let mut reads = JoinSet::new();
        for &node in standbys {
            let config = self.proxy.config.clone();
            reads.spawn(async move { (node, actions::position(&config, node).await) });
        }
        let mut positions = Vec::new();
        while let Some(joined) = reads.join_next().await {
            match joined {
                Ok((node, Ok((received, replayed)))) => positions.push((node, received, replayed)),
                Ok((node, Err(e))) => {
                    warn!(standby = %self.name(node), error = %e, "cannot read the standby's position; not promoting it")
                }
                Err(e) => warn!(error = %e, "a position read failed"),
            }
        }
        let chosen = choose_candidate(self.config(), &positions);
        info!(
            positions = ?positions
                .iter()
                .map(|&(n, received, replayed)| (self.name(n), received, replayed))
                .collect::<Vec<_>>(),
            chosen = ?chosen.map(|n| self.name(n)),
            took = ?step.elapsed(),
            "standby chosen"
        );
        chosen
    }

    /// A failover could not finish: writes stay refused with `reason`; try again after one
    /// probe interval.
    fn give_up(&mut self, roles: &[Role], suspect: &[bool], reason: String) {
        error!(%reason, "failover did not complete; trying again after the next probes");
        self.retry_at = Some(Instant::now() + self.config().health.interval);
        self.publish(roles, suspect, Primary::Unavailable(reason));
    }

    /// Makes fenced nodes that answer as writable primaries read-only, in the background (at
    /// most every `FENCE_RETRY` per node).
    fn fence_reachable(&mut self) {
        for node in 0..self.board.len() {
            let writable = self.board[node]
                .current()
                .is_some_and(|o| !o.in_recovery && !o.read_only);
            let recent = self.fence_attempts[node].is_some_and(|at| at.elapsed() < FENCE_RETRY);
            if !self.memory.fenced[node] || !writable || recent {
                continue;
            }
            self.fence_attempts[node] = Some(Instant::now());
            let config = self.proxy.config.clone();
            tokio::spawn(async move {
                let name = &config.nodes[node].name;
                match actions::fence(&config, node).await {
                    Ok(()) => {
                        warn!(node = %name, "fenced node made read-only (default_transaction_read_only = on)")
                    }
                    Err(e) => {
                        warn!(node = %name, error = %e, "could not make the fenced node read-only")
                    }
                }
            });
        }
    }

    /// A checkpoint on the new primary, in the background (see `actions::checkpoint`).
    fn checkpoint_later(&self, primary: NodeId) {
        let config = self.proxy.config.clone();
        tokio::spawn(async move {
            if let Err(e) = actions::checkpoint(&config, primary).await {
                warn!(node = %config.nodes[primary].name, error = %e, "checkpoint after promotion failed");
            }
        });
    }

    /// Publishes the next topology when it differs from the current one, saving the state first.
    fn publish(&mut self, roles: &[Role], suspect: &[bool], primary: Primary) {
        let current = self.proxy.topology.snapshot();
        let next = current
            .next(roles, suspect, primary)
            .with_stale(self.followers.stale());
        if self.published && current.same_state(&next) {
            return;
        }
        self.published = true;
        self.save(next.generation);
        info!(
            generation = next.generation,
            roles = ?next.nodes.iter().map(|n| (n.name.as_str(), n.role.as_str())).collect::<Vec<_>>(),
            suspect = ?next.nodes.iter().filter(|n| n.suspect).map(|n| n.name.as_str()).collect::<Vec<_>>(),
            stale = ?next.nodes.iter().filter_map(|n| Some((n.name.as_str(), n.stale.as_ref()?.describe()))).collect::<Vec<_>>(),
            primary = ?next.primary,
            "topology changed"
        );
        for node in next.nodes.iter().filter(|n| !n.role.is_usable()) {
            self.proxy.pools.discard_idle(node.id);
        }
        self.proxy.topology.publish(next);
    }

    /// Writes the state file (when configured); a failure is logged, not fatal: the nodes'
    /// timelines still tell a stale primary after a restart.
    fn save(&self, generation: u64) {
        let Some(file) = &self.state_file else {
            return;
        };
        let state = State {
            generation,
            primary: self.memory.primary.map(|n| self.name(n).to_owned()),
            fenced: (0..self.memory.fenced.len())
                .filter(|&n| self.memory.fenced[n])
                .map(|n| self.name(n).to_owned())
                .collect(),
        };
        if let Err(e) = file.save(&state) {
            error!(error = %e, "could not save the state file");
        }
    }
}
