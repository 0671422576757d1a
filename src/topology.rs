//! The cluster as pgvigil sees it: an immutable snapshot of every node and its role.
//!
//! Readers take a snapshot with one atomic load (`TopologyHandle::load`) and never lock; one writer
//! publishes a new snapshot with a higher generation and announces it on a watch channel.

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
        }
    }

    /// Whether sessions may use a node in this role.
    pub fn is_usable(self) -> bool {
        matches!(self, Role::Primary | Role::Standby)
    }
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

    /// This snapshot with each standby's reason to take no reads (one per node, same order).
    pub fn with_stale(mut self, stale: &[Option<Stale>]) -> Topology {
        for (i, node) in self.nodes.iter_mut().enumerate() {
            node.stale = stale.get(i).cloned().flatten();
        }
        self
    }

    /// Whether `other` has the same roles, suspicions, stale standbys and primary (publishing it
    /// would change nothing).
    pub fn same_state(&self, other: &Topology) -> bool {
        self.primary == other.primary
            && self
                .nodes
                .iter()
                .zip(&other.nodes)
                .all(|(a, b)| a.role == b.role && a.suspect == b.suspect && a.stale == b.stale)
    }

    /// The name of `node` ("node N" if there is no such node).
    pub fn name(&self, node: NodeId) -> String {
        self.nodes
            .get(node)
            .map_or_else(|| format!("node {node}"), |n| n.name.clone())
    }
}

/// The shared, atomically swapped current topology.
pub struct TopologyHandle {
    current: ArcSwap<Topology>,
    changes: watch::Sender<u64>,
}

impl TopologyHandle {
    /// Starts with `initial`.
    pub fn new(initial: Topology) -> TopologyHandle {
        let (changes, _) = watch::channel(initial.generation);
        TopologyHandle {
            current: ArcSwap::from_pointee(initial),
            changes,
        }
    }

    /// The current snapshot (one atomic load; do not hold it across `.await`).
    pub fn load(&self) -> arc_swap::Guard<Arc<Topology>> {
        self.current.load()
    }

    /// The current snapshot as an owned `Arc`, for tasks that keep it.
    pub fn snapshot(&self) -> Arc<Topology> {
        self.current.load_full()
    }

    /// Publishes a new snapshot and wakes everyone waiting for a change.
    pub fn publish(&self, next: Topology) {
        let generation = next.generation;
        self.current.store(Arc::new(next));
        self.changes.send_replace(generation);
    }

    /// A receiver that sees every published generation.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }
}
