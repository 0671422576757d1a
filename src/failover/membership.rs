//! Nodes added to and removed from `[[nodes]]` by a reload, carried out by the coordinator
//! between its own steps (never during a failover), since it alone publishes the topology.
//!
//! Node ids are positions in the running configuration's node list and are never reused while
//! pgvigil runs: an added node takes the next id (its pool, metrics, probe task and per-node
//! state are made before the topology shows it); a removed node keeps its id and place in the
//! running list, first `Leaving` (drained), then `Removed` (no longer probed or shown). A name
//! added again after its removal takes its old id back, with the address now configured.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use super::{actions, Coordinator};
use crate::admin::api::EventKind;
use crate::config::Config;
use crate::health::{self, NodeHealth, Report};
use crate::proxy::Proxy;
use crate::topology::{NodeId, Primary, Role};

/// Where a configured node stands with the running node list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Membership {
    /// In the configuration file: probed, routed to by its role.
    Member,
    /// Removed by a reload at `since`: sessions finish what they run on it, nothing new goes to
    /// it; removed once no server connection to it is open, or after `pool.drain_timeout`.
    Leaving {
        /// When the reload removed it.
        since: Instant,
    },
    /// Drained, or its drain timed out, at `since`: out of the topology. The server connections
    /// sessions still hold to it (idle sessions that used it) are closed on the node one
    /// `health.interval` later: by then a session whose current connection it was has seen the
    /// topology and dropped it quietly (it would otherwise get the backend's FATAL 57P01).
    Closing {
        /// When it left the topology.
        since: Instant,
    },
    /// Removed and drained: not probed, not shown; its id is kept.
    Removed,
}

/// A reloaded configuration whose node list changed, as `reload` merged it: the running nodes
/// keep their ids (a removed one stays in `next.nodes`), added ones follow.
#[derive(Debug)]
pub struct NodeChange {
    /// The configuration to run with.
    pub next: Config,
    /// Nodes of `next` that are new, or whose name a reload had removed and now adds again.
    pub added: Vec<NodeId>,
    /// Nodes that are no longer in the file.
    pub removed: Vec<NodeId>,
}

/// The probe tasks, one per node that is not removed.
pub struct Probes {
    proxy: Arc<Proxy>,
    reports: mpsc::Sender<Report>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
    /// Stops each node's task, by node id.
    running: Vec<Option<CancellationToken>>,
}

impl Probes {
    /// Starts a probe task for every configured node; reports go to `reports`.
    pub fn start(
        proxy: Arc<Proxy>,
        reports: mpsc::Sender<Report>,
        tasks: TaskTracker,
        shutdown: CancellationToken,
    ) -> Probes {
        let mut probes = Probes {
            proxy,
            reports,
            tasks,
            shutdown,
            running: Vec::new(),
        };
        for node in 0..probes.proxy.config().nodes.len() {
            probes.start_node(node);
        }
        probes
    }

    /// Starts probing `node` (again).
    fn start_node(&mut self, node: NodeId) {
        self.stop_node(node);
        let stop = self.shutdown.child_token();
        self.tasks.spawn(health::probe_node(
            self.proxy.clone(),
            node,
            self.proxy.nudges.clone(),
            self.reports.clone(),
            stop.clone(),
        ));
        if self.running.len() <= node {
            self.running.resize(node + 1, None);
        }
        self.running[node] = Some(stop);
    }

    /// Stops probing `node`.
    fn stop_node(&mut self, node: NodeId) {
        if let Some(stop) = self.running.get_mut(node).and_then(Option::take) {
            stop.cancel();
        }
    }
}

impl Coordinator {
    /// Puts `change` in force, or refuses it whole with the reason (the running configuration
    /// stays): removing the node that is (or is being made) the primary, or adding back a name
    /// whose node is still being drained.
    /// `started`: the first verdict has been reached (the topology then shows the change at
    /// once; before, with the first verdict).
    pub(super) async fn change_nodes(
        &mut self,
        change: NodeChange,
        started: bool,
    ) -> Result<(), String> {
        let NodeChange {
            next,
            added,
            removed,
        } = change;
        let topology = self.publisher.snapshot();
        let name = |node: NodeId| next.nodes[node].name.clone();
        let mut problems = Vec::new();
        for &node in &removed {
            let primary = topology.primary == Primary::Known(node)
                || self.memory.primary == Some(node)
                || self
                    .memory
                    .promoting
                    .as_ref()
                    .is_some_and(|p| p.node == node || p.old_primary == node);
            if primary {
                problems.push(format!(
                    "nodes: {} is the primary and cannot be removed: switch over to another \
                     node first (`pgvigil switchover`), then reload",
                    name(node)
                ));
            }
        }
        for &node in &added {
            if matches!(
                self.membership.get(node),
                Some(Membership::Leaving { .. } | Membership::Closing { .. })
            ) {
                problems.push(format!(
                    "nodes: {} is still being drained after its removal: add it again once \
                     `pgvigil status` no longer shows it",
                    name(node)
                ));
            }
        }
        if !problems.is_empty() {
            return Err(problems.join("\n"));
        }
        let count = next.nodes.len();
        self.cover(count);
        for &node in &added {
            self.proxy.add_node(node, &next.nodes[node].name);
        }
        self.proxy.replace_config(next);
        for &node in &added {
            self.forget(node);
            self.membership[node] = Membership::Member;
            self.memory.detached[node] = false;
            self.probes.start_node(node);
            self.events
                .push(EventKind::Reload, Some(&self.name(node)), "node added");
            info!(node = %self.name(node), "node added by reload; probing it");
        }
        let since = Instant::now();
        for &node in &removed {
            self.membership[node] = Membership::Leaving { since };
            // Out of failover candidacy at once, as a detached node is.
            self.memory.detached[node] = true;
            self.proxy.pools.discard_idle(node);
            self.events.push(
                EventKind::Reload,
                Some(&self.name(node)),
                "node removed: draining it",
            );
            info!(node = %self.name(node), "node removed by reload; draining it");
        }
        if started {
            self.evaluate().await;
        }
        self.publish_view();
        Ok(())
    }

    /// Removes the leaving nodes that have no server connection open any more, or whose
    /// `pool.drain_timeout` has run out (the sessions still holding a connection to them lose
    /// it, as after a failover); the next evaluation publishes it. A `health.interval` later,
    /// the connections still held to it are terminated on the node (their sessions drop them
    /// unused: they are not current there).
    pub(super) fn finish_leaving(&mut self) {
        let drain = self.config().pool.drain_timeout;
        for node in 0..self.membership.len() {
            match self.membership[node] {
                Membership::Leaving { since } => {
                    // Connections back from their sessions are not lent again.
                    self.proxy.pools.discard_idle(node);
                    let open = self.proxy.pools.open_count(node);
                    if open > 0 && since.elapsed() < drain {
                        continue;
                    }
                    self.membership[node] = Membership::Closing {
                        since: Instant::now(),
                    };
                    self.probes.stop_node(node);
                    self.forget(node);
                    let message = if open == 0 {
                        "node removed: drained".to_owned()
                    } else {
                        format!(
                            "node removed: {open} server connections still held after \
                             pool.drain_timeout are closed"
                        )
                    };
                    info!(node = %self.name(node), %message, "node left");
                    self.events
                        .push(EventKind::Reload, Some(&self.name(node)), message);
                }
                Membership::Closing { since } => {
                    if since.elapsed() < self.config().health.interval {
                        continue;
                    }
                    self.membership[node] = Membership::Removed;
                    self.close_held(node);
                }
                Membership::Member | Membership::Removed => {}
            }
        }
    }

    /// Terminates on `node` the server connections sessions still hold to it, in the
    /// background.
    fn close_held(&self, node: NodeId) {
        let pids: Vec<i32> = (self.proxy.pools.servers().into_iter())
            .filter(|row| row.info.node == node)
            .filter_map(|row| i32::try_from(row.info.backend_pid).ok())
            .collect();
        if pids.is_empty() {
            return;
        }
        let config = self.proxy.config().clone();
        let name = self.name(node);
        tokio::spawn(async move {
            match actions::terminate(&config, node, pids).await {
                Ok(()) => {
                    info!(node = %name, "server connections still held to the removed node closed")
                }
                Err(error) => {
                    warn!(node = %name, %error, "could not close the server connections still held to the removed node")
                }
            }
        });
    }

    /// The role the topology shows for `node`, observed as `role`.
    pub(super) fn shown_role(&self, node: NodeId, role: Role) -> Role {
        match (self.membership.get(node), role) {
            (Some(Membership::Closing { .. } | Membership::Removed), _) => Role::Removed,
            (Some(Membership::Leaving { .. }), Role::Primary | Role::Standby) => Role::Leaving,
            (Some(Membership::Leaving { .. }), role) => role,
            (_, Role::Primary | Role::Standby) if self.memory.detached[node] => Role::Detached,
            (_, role) => role,
        }
    }

    /// Whether `node` is in the configuration file (neither leaving nor removed).
    pub(super) fn is_member(&self, node: NodeId) -> bool {
        self.membership.get(node) == Some(&Membership::Member)
    }

    /// Makes room in every per-node table for `count` nodes.
    fn cover(&mut self, count: usize) {
        if self.board.len() >= count {
            return;
        }
        self.board.resize(count, NodeHealth::default());
        self.fence_reasons.resize(count, None);
        self.fence_attempts.resize(count, None);
        self.receiver_attempts.resize(count, None);
        self.stale_before.resize(count, None);
        self.membership.resize(count, Membership::Member);
        self.memory.fenced.resize(count, false);
        self.memory.detached.resize(count, false);
        self.memory.paused.resize(count, None);
        self.followers.cover(count);
    }

    /// Forgets what was observed and remembered of `node` (added again, or removed).
    fn forget(&mut self, node: NodeId) {
        self.board[node] = NodeHealth::default();
        self.fence_reasons[node] = None;
        self.fence_attempts[node] = None;
        self.receiver_attempts[node] = None;
        self.stale_before[node] = None;
        self.memory.fenced[node] = false;
        self.memory.paused[node] = None;
        self.followers.forget(node);
    }
}
