//! The failover coordinator: the only writer of the topology. It takes in every probe outcome,
//! judges them (`assess`), publishes roles and the primary, fences stale primaries, and when the
//! primary is lost promotes the standby `choose` allows (`promote`), repoints the others, fences
//! the old primary and remembers all that in the state file (see DESIGN.md, "One failover's
//! way", and README, "Failover", for the promotion rules).

mod actions;
mod assess;
mod choose;
mod command;
mod conninfo;
mod control;
mod failback;
mod followers;
mod following;
mod gate;
mod membership;
mod pause;
mod persist;
mod promote;
mod switchover;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

pub use assess::Memory;
use control::Request;
pub use control::{channel, Handle, Inbox, NodeView, Reply};
pub use failback::slot_name;
pub use membership::NodeChange;
use membership::{Membership, Probes};
pub use persist::restore;
pub use switchover::DEFAULT_DRAIN;

use crate::admin::api::EventKind;
use crate::config::Config;
use crate::events::Events;
use crate::health::{NodeHealth, Report};
use crate::proxy::Proxy;
use crate::replication::ReplicationView;
use crate::state::StateFile;
use crate::topology::{NodeId, Primary, Role, Topology, TopologyPublisher};
use assess::{assess, Assessment};
use choose::Promotion;
use followers::Followers;

/// How often pgvigil tries again to make a reachable fenced node read-only, or to set a
/// standby's `wal_receiver_timeout`.
const FENCE_RETRY: Duration = Duration::from_secs(10);

/// Takes in probe reports and operators' commands until `shutdown`, keeping the topology true
/// to them; `publisher` makes it the topology's only writer.
/// It starts the probe tasks (on `tasks`) and those of nodes a reload adds.
pub async fn run(
    proxy: Arc<Proxy>,
    publisher: TopologyPublisher,
    memory: Memory,
    inbox: Inbox,
    tasks: TaskTracker,
    shutdown: CancellationToken,
) {
    let Inbox {
        mut commands,
        view,
        events,
    } = inbox;
    // Room for a few reports from every node there may be, so that probes rarely wait.
    let (sender, mut reports) = mpsc::channel(4 * crate::router::MAX_NODES);
    let probes = Probes::start(proxy.clone(), sender, tasks, shutdown.clone());
    let mut coordinator = Coordinator::new(proxy, publisher, memory, view, events, probes);
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
                if let Ok((standby, primary, Ok(_))) = &outcome {
                    coordinator.events.push(
                        EventKind::Repointed,
                        Some(coordinator.name(*standby).as_str()),
                        format!("streams from the new primary {}", coordinator.name(*primary)),
                    );
                }
                coordinator.followers.settle(&coordinator.proxy.config(), outcome);
            }
            // One command at a time, between two steps: never during a failover (that step
            // is awaited below before the loop comes back here).
            Some(request) = commands.recv() => {
                // The sender may have given up waiting; nothing to undo then.
                match request {
                    Request::Command { command, reply } => {
                        let answer = coordinator.execute(command, started).await;
                        let _ = reply.send(answer);
                    }
                    Request::Nodes { change, reply } => {
                        let answer = coordinator.change_nodes(*change, started).await;
                        let _ = reply.send(answer);
                    }
                }
                continue;
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
        coordinator.finish_leaving();
        coordinator.publish_positions();
        coordinator.evaluate().await;
        coordinator.publish_view();
    }
}

/// The coordinator's state between reports.
struct Coordinator {
    proxy: Arc<Proxy>,
    publisher: TopologyPublisher,
    board: Vec<NodeHealth>,
    memory: Memory,
    /// Why each fenced node was fenced (None for a fence restored from the state file).
    fence_reasons: Vec<Option<String>>,
    /// Where the per-node view for status goes.
    view: tokio::sync::watch::Sender<Arc<Vec<NodeView>>>,
    /// The recent events, for status.
    events: Arc<Events>,
    state_file: Option<StateFile>,
    /// Reports of probes that started before this are stale (a probe that began before the
    /// node's promotion and says it is in recovery).
    stale_before: Vec<Option<Instant>>,
    /// When each fenced node was last made read-only (or tried).
    fence_attempts: Vec<Option<Instant>>,
    /// When each standby's `wal_receiver_timeout` was last set (or tried).
    receiver_attempts: Vec<Option<Instant>>,
    /// No new failover attempt before this (after one failed).
    retry_at: Option<Instant>,
    /// The lost primary already alerted about (automatic failover off).
    alerted: Option<NodeId>,
    /// The nodes promoted behind pgvigil's back already alerted about.
    foreign_alerted: Vec<NodeId>,
    /// Why the last failover attempt did not complete (logged at error once, not every retry).
    refused: Option<String>,
    /// Why this instance last left a lost primary to the leader (logged once, not every round).
    held: Option<String>,
    /// The leadership epoch whose shared state was last checked for a pending promotion.
    adopted: Option<i64>,
    /// The primary the leader shared that this instance, leaving a failover to it, already
    /// probed at once (see `gate`).
    hinted: Option<NodeId>,
    /// When this instance, following a leader, last took the fences from the shared state.
    fences_read: Option<Instant>,
    /// Which standbys follow the primary; repoints in flight.
    followers: Followers,
    /// Whether each node is in the configuration file, leaving or removed (see `membership`).
    membership: Vec<Membership>,
    /// The probe tasks.
    probes: Probes,
    published: bool,
}

impl Coordinator {
    fn new(
        proxy: Arc<Proxy>,
        publisher: TopologyPublisher,
        memory: Memory,
        view: tokio::sync::watch::Sender<Arc<Vec<NodeView>>>,
        events: Arc<Events>,
        probes: Probes,
    ) -> Coordinator {
        let nodes = proxy.config().nodes.len();
        Coordinator {
            publisher,
            fence_reasons: vec![None; nodes],
            view,
            events,
            state_file: proxy
                .config()
                .failover
                .state_dir
                .as_deref()
                .map(StateFile::new),
            board: vec![NodeHealth::default(); nodes],
            fence_attempts: vec![None; nodes],
            receiver_attempts: vec![None; nodes],
            stale_before: vec![None; nodes],
            memory,
            proxy,
            retry_at: None,
            alerted: None,
            foreign_alerted: Vec::new(),
            refused: None,
            held: None,
            adopted: None,
            hinted: None,
            fences_read: None,
            followers: Followers::new(nodes),
            membership: vec![Membership::Member; nodes],
            probes,
            published: false,
        }
    }

    /// The configuration in force now (a reload may swap it between two steps).
    fn config(&self) -> arc_swap::Guard<Arc<Config>> {
        self.proxy.config()
    }

    fn name(&self, node: NodeId) -> String {
        self.proxy.config().nodes[node].name.clone()
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
        let mut verdict = assess(&self.config(), &self.board, &self.memory);
        if let Some(promotion) = self.memory.promoting.clone() {
            if let Primary::Known(other) = verdict.primary {
                if other != promotion.node {
                    self.promoted_by_hand(&promotion, other);
                    verdict = assess(&self.config(), &self.board, &self.memory);
                }
            }
        }
        self.followers.judge(
            &self.proxy.config(),
            &self.board,
            &verdict.roles,
            &verdict.primary,
        );
        for &node in &verdict.fence {
            warn!(
                node = %self.name(node),
                "fenced: it claims to be primary on an older timeline than another node"
            );
            self.fence(
                node,
                "it claimed to be primary on an older timeline than another node".into(),
            );
        }
        self.alert_foreign(&verdict);
        self.report_view(&verdict);
        let Some(verdict) = self.pass_gate(verdict).await else {
            return;
        };
        if let Some(promotion) = self.memory.promoting.clone() {
            self.on_pending_promotion(promotion, verdict).await;
            return;
        }
        if let Some(lost) = verdict.lost {
            self.on_lost_primary(lost, verdict).await;
            return;
        }
        self.alerted = None;
        self.refused = None;
        if verdict.witness.is_some() {
            // The witness may have been probed before the primary went quiet: ask the standbys
            // again now rather than at their next tick (their tasks space probes out).
            for node in (0..self.board.len()).filter(|&n| verdict.roles[n] == Role::Standby) {
                self.proxy.nudges.nudge(node);
            }
        }
        if let Primary::Known(primary) = verdict.primary {
            self.memory.primary = Some(primary);
            self.resume_paused(primary, &verdict.roles);
        }
        self.publish(&verdict.roles, &verdict.suspect, verdict.primary);
        self.fence_reachable();
        self.shorten_receiver_timeouts();
    }

    /// Sets `failover.receiver_timeout` on standbys whose `wal_receiver_timeout` is longer or off,
    /// in the background (at most every `FENCE_RETRY` per node). A standby's receiver asks its
    /// sender for a reply after half that much silence, so a live primary is heard from within
    /// it and a frozen one stops being a witness (see `assess::witness`) within seconds.
    fn shorten_receiver_timeouts(&mut self) {
        let target = self.config().failover.receiver_timeout;
        if target.is_zero() || self.may_act().is_err() {
            return;
        }
        for node in 0..self.board.len() {
            let longer = self.board[node]
                .current()
                .and_then(|o| o.receiver.as_ref())
                .is_some_and(|r| r.timeout.is_zero() || r.timeout > target);
            let recent = self.receiver_attempts[node].is_some_and(|at| at.elapsed() < FENCE_RETRY);
            if !longer || recent {
                continue;
            }
            self.receiver_attempts[node] = Some(Instant::now());
            let config = self.proxy.config().clone();
            tokio::spawn(async move {
                let name = &config.nodes[node].name;
                match actions::set_receiver_timeout(&config, node, target).await {
                    Ok(()) => {
                        info!(node = %name, timeout = ?target, "standby's wal_receiver_timeout set (failover.receiver_timeout)")
                    }
                    Err(e) => {
                        warn!(node = %name, error = %e, "could not set the standby's wal_receiver_timeout")
                    }
                }
            });
        }
    }

    /// While pgvigil waited for the standby it asked to promote, another one left recovery (an
    /// operator's `pg_ctl promote`, the way out when the one asked is gone for good). The old
    /// primary is down, so the newer timeline is accepted; the standby asked is fenced, since it
    /// may still finish its promotion.
    fn promoted_by_hand(&mut self, promotion: &Promotion, other: NodeId) {
        error!(
            asked = %self.name(promotion.node),
            promoted = %self.name(other),
            "another standby left recovery while a promotion was pending: taking it as primary \
             and fencing the one asked"
        );
        let reason = format!(
            "it was asked to promote while {} was promoted by hand",
            self.name(other)
        );
        self.fence(promotion.node, reason);
        self.memory.promoting = None;
        self.retry_at = None;
        self.refused = None;
    }

    /// Logs at error, once per change, a node that left recovery without pgvigil promoting it
    /// while the known primary is up.
    fn alert_foreign(&mut self, verdict: &Assessment) {
        if verdict.foreign == self.foreign_alerted {
            return;
        }
        if let Primary::Unavailable(reason) = &verdict.primary {
            if !verdict.foreign.is_empty() {
                error!(
                    nodes = ?verdict.foreign.iter().map(|&n| self.name(n)).collect::<Vec<_>>(),
                    primary = ?self.memory.primary.map(|n| self.name(n)),
                    %reason,
                    "a standby was promoted behind pgvigil's back; the primary is not fenced"
                );
            }
        }
        self.foreign_alerted.clone_from(&verdict.foreign);
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
            // Between attempts clients keep seeing why the last one was refused.
            let primary = self
                .refused
                .clone()
                .map_or(verdict.primary, Primary::Unavailable);
            self.publish(&verdict.roles, &verdict.suspect, primary);
        } else {
            self.fail_over(lost, verdict).await;
        }
    }

    /// A failover could not finish: writes stay refused with `reason`; try again after one
    /// probe interval.
    fn give_up(&mut self, roles: &[Role], suspect: &[bool], reason: String) {
        if self.refused.as_ref() != Some(&reason) {
            error!(%reason, "failover did not complete; trying again after the next probes");
            self.refused = Some(reason.clone());
        }
        self.retry_at = Some(Instant::now() + self.config().health.interval);
        self.publish(roles, suspect, Primary::Unavailable(reason));
    }

    /// Makes fenced nodes that answer as writable primaries read-only, in the background (at
    /// most every `FENCE_RETRY` per node).
    fn fence_reachable(&mut self) {
        if self.may_act().is_err() {
            return;
        }
        for node in 0..self.board.len() {
            let writable = self.board[node]
                .current()
                .is_some_and(|o| !o.in_recovery && !o.read_only);
            let recent = self.fence_attempts[node].is_some_and(|at| at.elapsed() < FENCE_RETRY);
            if !self.memory.fenced[node] || !writable || recent {
                continue;
            }
            self.fence_attempts[node] = Some(Instant::now());
            let config = self.proxy.config().clone();
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

    /// In the background, on a new primary: the promotion's stamp (which instance promoted it,
    /// `actions::stamp_promotion`), then a checkpoint (`actions::checkpoint`).
    fn settle_new_primary(&self, primary: NodeId) {
        let config = self.proxy.config().clone();
        let stamp = self.proxy.leadership.promotion_stamp();
        tokio::spawn(async move {
            if let Err(e) = actions::stamp_promotion(&config, primary, &stamp).await {
                warn!(node = %config.nodes[primary].name, error = %e, "could not record which instance promoted the node");
            }
            if let Err(e) = actions::checkpoint(&config, primary).await {
                warn!(node = %config.nodes[primary].name, error = %e, "checkpoint after promotion failed");
            }
        });
    }

    /// Publishes the next topology when it differs from the current one, saving the state first.
    /// A detached node that would be usable is shown as detached, a node a reload removed as
    /// leaving, then removed: nothing new is routed to them (see `membership`).
    fn publish(&mut self, roles: &[Role], suspect: &[bool], primary: Primary) {
        let roles: Vec<Role> = roles
            .iter()
            .enumerate()
            .map(|(node, &role)| self.shown_role(node, role))
            .collect();
        let current = self.publisher.snapshot();
        let next = Topology::clone(&current)
            .with_members(&self.config())
            .next(&roles, suspect, primary)
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
        for node in next.nodes.iter().filter(|n| !n.role.takes_new_work()) {
            self.proxy.pools.discard_idle(node.id);
        }
        if next.primary != current.primary {
            let message = match &next.primary {
                Primary::Known(node) => format!("primary is {}", self.name(*node)),
                Primary::Unavailable(reason) => format!("no primary: {reason}"),
            };
            self.events.push(EventKind::Topology, None, message);
        }
        self.publisher.publish(next);
    }
}
