//! The cluster as pgvigil sees it: an immutable snapshot of every node and its role.
//!
//! Readers take a snapshot with one atomic load (`TopologyHandle::load`) and never lock; one writer
//! publishes a new snapshot with a higher generation and announces it on a watch channel. That
//! writer is whoever holds the one `TopologyPublisher` (`TopologyHandle::new` makes exactly one):
//! the failover coordinator.

use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::sync::watch;

use crate::config::Config;

/// Index of a node in the configuration's `[[nodes]]` list.
pub type NodeId = usize;

/// What a node was last observed to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Not yet probed.
    Unknown,
    /// Accepts writes (`pg_is_in_recovery()` is false).
    Primary,
    /// A streaming replica (`pg_is_in_recovery()` is true).
    Standby,
    /// Did not answer its last probes.
    Down,
    /// Lost its primary role to a promoted standby (or sits on an older timeline): it never gets
    /// a query, whatever it claims, until an operator clears the fence.
    Fenced,
    /// Taken out of routing and failover candidacy by an operator (`pgvigil detach`), whatever
    /// it is; still probed, untouched, until `pgvigil attach`.
    Detached,
    /// Removed from `[[nodes]]` by a reload and being drained: sessions finish what they run on
    /// it (a transaction ends there), but no new unit, connection or session goes to it.
    Leaving,
    /// Removed by a reload and drained: no longer probed, connected to or shown. Its id is not
    /// reused (every per-node table is indexed by it) unless a reload adds its name again.
    Removed,
}

impl Role {
    /// The lowercase name used in logs and status output.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Unknown => "unknown",
            Role::Primary => "primary",
            Role::Standby => "standby",
            Role::Down => "down",
            Role::Fenced => "fenced",
            Role::Detached => "detached",
            Role::Leaving => "leaving",
            Role::Removed => "removed",
        }
    }

    /// Whether sessions may go on using what they hold on a node in this role (a leaving node
    /// lets a transaction running on it finish).
    pub fn is_usable(self) -> bool {
        matches!(self, Role::Primary | Role::Standby | Role::Leaving)
    }

    /// Whether new work (a unit routed afresh, a new server connection, a pooled one) may go to
    /// a node in this role.
    pub fn takes_new_work(self) -> bool {
        matches!(self, Role::Primary | Role::Standby)
    }
}

/// What a session waits on a node for; it decides when the topology has given up on the node
/// for that session (see [`Topology::gives_up_on`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Work only the primary may do (a write): the node must stay the primary.
    Primary,
    /// Work another node could do (a read, a session start): a suspect node is given up on
    /// while another usable node is not suspect.
    Replaceable,
    /// The last node left to try: given up on only once sessions may not use it at all.
    Usable,
}

/// Why the topology no longer lets a session wait on a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum GiveUp {
    /// Its role keeps sessions off it (down, fenced, not yet probed).
    #[error("it is {}", .0.as_str())]
    Unusable(Role),
    /// The work needs the primary, and this node is not (or no longer) it.
    #[error("it is not the primary")]
    NotPrimary,
    /// Its latest probe failed and another node can take the work.
    #[error("its latest probe failed and another node can serve")]
    Suspect,
}

/// Why a standby takes no reads whatever its lag: its data may be stale or diverged from the
/// primary's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stale {
    /// Its WAL receiver is not streaming (not running, or still connecting).
    NotStreaming,
    /// It heard nothing from its sender for longer than `routing.max_lag` while the primary
    /// had WAL it had not received.
    Silent,
    /// It is on another timeline than the primary.
    OtherTimeline,
    /// It holds WAL past the primary's current position: WAL the primary never had.
    Ahead,
    /// Repointing it at a new primary failed, or it did not stream from it in time; the text
    /// says why. Cleared once it is seen streaming from the primary on its timeline.
    NotRepointed(String),
}

impl Stale {
    /// A short phrase for logs and status.
    pub fn describe(&self) -> String {
        match self {
            Stale::NotStreaming => "its WAL receiver is not streaming".into(),
            Stale::Silent => {
                "it has not heard from its primary for longer than routing.max_lag".into()
            }
            Stale::OtherTimeline => "it is on another timeline than the primary".into(),
            Stale::Ahead => "it holds WAL past the primary's position".into(),
            Stale::NotRepointed(why) => format!("it was not repointed at the new primary: {why}"),
        }
    }
}

/// One node in a snapshot.
#[derive(Debug, Clone)]
pub struct Node {
    /// Its position in the configuration.
    pub id: NodeId,
    /// Its configured name.
    pub name: String,
    /// Host name or address pgvigil connects to.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Its observed role.
    pub role: Role,
    /// Its latest probe failed, though not yet `health.failures` times in a row: new sessions
    /// avoid it while another node can take them.
    pub suspect: bool,
    /// Why this standby takes no reads (None: it follows the primary, or it is no standby).
    pub stale: Option<Stale>,
}

/// Where writes go right now, and why not when they cannot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Primary {
    /// Exactly one reachable node accepts writes.
    Known(NodeId),
    /// No node can take writes; the reason is shown to clients and in status.
    Unavailable(String),
}

/// An immutable view of the cluster.
#[derive(Debug, Clone)]
pub struct Topology {
    /// Increases by one with every published change.
    pub generation: u64,
    /// Every configured node, in configuration order.
    pub nodes: Vec<Node>,
    /// The node that takes writes.
    pub primary: Primary,
}

impl Topology {
    /// The starting snapshot: every node unknown, no primary until the first probe; generations
    /// continue from `generation` (the one remembered across restarts).
    pub fn initial(config: &Config, generation: u64) -> Topology {
        let nodes = config
            .nodes
            .iter()
            .enumerate()
            .map(|(id, n)| Node {
                id,
                name: n.name.clone(),
                host: n.host.clone(),
                port: n.port,
                role: Role::Unknown,
                suspect: false,
                stale: None,
            })
            .collect();
        Topology {
            generation,
            nodes,
            primary: Primary::Unavailable("the nodes have not been probed yet".into()),
        }
    }

    /// The next snapshot: these roles, suspicions and primary (one per node, same order), one
    /// generation later.
    pub fn next(&self, roles: &[Role], suspect: &[bool], primary: Primary) -> Topology {
        let mut nodes = self.nodes.clone();
        for (i, node) in nodes.iter_mut().enumerate() {
            node.role = roles.get(i).copied().unwrap_or(Role::Unknown);
            node.suspect = suspect.get(i).copied().unwrap_or(false);
        }
        Topology {
            generation: self.generation + 1,
            nodes,
            primary,
        }
    }

    /// This snapshot with a node for every one of `config.nodes` (added ones not yet probed) and
    /// the addresses configured now (a removed node's name added again may have moved).
    pub fn with_members(mut self, config: &Config) -> Topology {
        for (id, n) in config.nodes.iter().enumerate() {
            match self.nodes.get_mut(id) {
                Some(node) => {
                    node.host.clone_from(&n.host);
                    node.port = n.port;
                }
                None => self.nodes.push(Node {
                    id,
                    name: n.name.clone(),
                    host: n.host.clone(),
                    port: n.port,
                    role: Role::Unknown,
                    suspect: false,
                    stale: None,
                }),
            }
        }
        self
    }

    /// This snapshot with each standby's reason to take no reads (one per node, same order).
    pub fn with_stale(mut self, stale: &[Option<Stale>]) -> Topology {
        for (i, node) in self.nodes.iter_mut().enumerate() {
            node.stale = stale.get(i).cloned().flatten();
        }
        self
    }

    /// Whether `other` has the same nodes, addresses, roles, suspicions, stale standbys and
    /// primary (publishing it would change nothing).
    pub fn same_state(&self, other: &Topology) -> bool {
        self.primary == other.primary
            && self.nodes.len() == other.nodes.len()
            && self.nodes.iter().zip(&other.nodes).all(|(a, b)| {
                a.role == b.role
                    && a.suspect == b.suspect
                    && a.stale == b.stale
                    && (&a.host, a.port) == (&b.host, b.port)
            })
    }

    /// Why a session waiting on `node` for `need` (connecting, logging in, checking out, setting
    /// up a connection) must stop and route its work afresh; `None` while it may go on waiting.
    pub fn gives_up_on(&self, node: NodeId, need: Need) -> Option<GiveUp> {
        let Some(state) = self.nodes.get(node) else {
            return Some(GiveUp::Unusable(Role::Unknown));
        };
        if !state.role.takes_new_work() {
            return Some(GiveUp::Unusable(state.role));
        }
        match need {
            Need::Primary => (self.primary != Primary::Known(node)).then_some(GiveUp::NotPrimary),
            Need::Replaceable => {
                let elsewhere = self
                    .nodes
                    .iter()
                    .any(|n| n.id != node && n.role.takes_new_work() && !n.suspect);
                (state.suspect && elsewhere).then_some(GiveUp::Suspect)
            }
            Need::Usable => None,
        }
    }

    /// The name of `node` ("node N" if there is no such node).
    pub fn name(&self, node: NodeId) -> String {
        self.nodes
            .get(node)
            .map_or_else(|| format!("node {node}"), |n| n.name.clone())
    }
}

/// The snapshot and its change channel, shared by the handle and the publisher.
struct Shared {
    current: ArcSwap<Topology>,
    changes: watch::Sender<u64>,
}

/// The shared, atomically swapped current topology, for readers.
pub struct TopologyHandle {
    shared: Arc<Shared>,
}

/// The only way to publish a snapshot; not `Clone`, so whoever owns it is the one writer.
pub struct TopologyPublisher {
    shared: Arc<Shared>,
}

impl TopologyHandle {
    /// Starts with `initial`; the publisher goes to the failover coordinator.
    pub fn new(initial: Topology) -> (TopologyHandle, TopologyPublisher) {
        let (changes, _) = watch::channel(initial.generation);
        let shared = Arc::new(Shared {
            current: ArcSwap::from_pointee(initial),
            changes,
        });
        let publisher = TopologyPublisher {
            shared: shared.clone(),
        };
        (TopologyHandle { shared }, publisher)
    }

    /// The current snapshot (one atomic load; do not hold it across `.await`).
    pub fn load(&self) -> arc_swap::Guard<Arc<Topology>> {
        self.shared.current.load()
    }

    /// A cache of the current snapshot, for a reader that keeps it: each of its reads sees a
    /// new snapshot as [`TopologyHandle::load`] does, with one atomic load when none came.
    pub fn cache(&self) -> arc_swap::cache::Cache<&ArcSwap<Topology>, Arc<Topology>> {
        arc_swap::cache::Cache::new(&self.shared.current)
    }

    /// The current snapshot as an owned `Arc`, for tasks that keep it.
    pub fn snapshot(&self) -> Arc<Topology> {
        self.shared.current.load_full()
    }

    /// A receiver that sees every published generation.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.shared.changes.subscribe()
    }
}

impl TopologyPublisher {
    /// The snapshot in force, to build the next one from.
    pub fn snapshot(&self) -> Arc<Topology> {
        self.shared.current.load_full()
    }

    /// Publishes a new snapshot and wakes everyone waiting for a change.
    pub fn publish(&self, next: Topology) {
        let generation = next.generation;
        self.shared.current.store(Arc::new(next));
        self.shared.changes.send_replace(generation);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Three nodes: pg1 primary, pg2 and pg3 standbys, none suspect.
    fn three() -> Topology {
        let node = |id: NodeId, role| Node {
            id,
            name: format!("pg{}", id + 1),
            host: "127.0.0.1".into(),
            port: 5432,
            role,
            suspect: false,
            stale: None,
        };
        Topology {
            generation: 1,
            nodes: vec![
                node(0, Role::Primary),
                node(1, Role::Standby),
                node(2, Role::Standby),
            ],
            primary: Primary::Known(0),
        }
    }

    #[test]
    fn a_healthy_node_keeps_every_wait() {
        let t = three();
        for need in [Need::Primary, Need::Replaceable, Need::Usable] {
            assert_eq!(t.gives_up_on(0, need), None, "{need:?}");
        }
        assert_eq!(t.gives_up_on(1, Need::Replaceable), None);
    }

    #[test]
    fn a_down_or_fenced_node_ends_every_wait() {
        let mut t = three();
        t.nodes[0].role = Role::Down;
        t.nodes[1].role = Role::Fenced;
        for need in [Need::Primary, Need::Replaceable, Need::Usable] {
            assert_eq!(t.gives_up_on(0, need), Some(GiveUp::Unusable(Role::Down)));
            assert_eq!(t.gives_up_on(1, need), Some(GiveUp::Unusable(Role::Fenced)));
        }
        assert_eq!(
            t.gives_up_on(7, Need::Usable),
            Some(GiveUp::Unusable(Role::Unknown))
        );
    }

    #[test]
    fn a_write_stops_waiting_on_a_node_that_is_no_longer_the_primary() {
        let mut t = three();
        t.primary = Primary::Known(1);
        t.nodes[1].role = Role::Primary;
        assert_eq!(t.gives_up_on(0, Need::Primary), Some(GiveUp::NotPrimary));
        assert_eq!(t.gives_up_on(1, Need::Primary), None);
        t.primary = Primary::Unavailable("failover in progress".into());
        assert_eq!(t.gives_up_on(1, Need::Primary), Some(GiveUp::NotPrimary));
    }

    #[test]
    fn a_suspect_node_is_given_up_only_where_another_can_serve() {
        let mut t = three();
        t.nodes[1].suspect = true;
        assert_eq!(t.gives_up_on(1, Need::Replaceable), Some(GiveUp::Suspect));
        assert_eq!(t.gives_up_on(1, Need::Usable), None);
        // A suspect primary still takes writes: no other node can.
        t.nodes[0].suspect = true;
        assert_eq!(t.gives_up_on(0, Need::Primary), None);
        // Every other node suspect or unusable: nowhere better to go.
        t.nodes[2].role = Role::Down;
        assert_eq!(t.gives_up_on(1, Need::Replaceable), None);
    }
}
