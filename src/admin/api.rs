//! The admin API's JSON documents, shared by the server, the coordinator and the CLI.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// An operator's command, as the coordinator carries it out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Put a detached node back into routing and failover candidacy.
    Attach(String),
    /// Take a node out of routing and failover candidacy without touching it.
    Detach(String),
    /// Clear the fence of a node an operator has dealt with.
    Unfence(String),
    /// Bring a fenced or down former primary back as a standby: rewound, or re-cloned.
    Failback {
        /// The node.
        node: String,
        /// Take a fresh copy with `pg_basebackup` instead of `pg_rewind`.
        reclone: bool,
    },
    /// Hand the primary role over to `to` (or the standby failover would choose) while the
    /// primary is healthy: writes held, in-flight transactions drained for at most
    /// `drain_timeout`, nothing acknowledged lost; the old primary rejoins as a standby.
    Switchover {
        /// The standby to promote, or the one failover would choose.
        to: Option<String>,
        /// How long transactions in flight may take before they are ended.
        drain_timeout: Duration,
    },
    /// Promote this node; with `dry_run`, only say which node failover would choose now and why.
    Promote {
        /// The node asked for.
        node: String,
        /// Change nothing; explain the choice.
        dry_run: bool,
    },
}

impl Command {
    /// The verb, as in the CLI and the API path.
    pub fn verb(&self) -> &'static str {
        match self {
            Command::Attach(_) => "attach",
            Command::Detach(_) => "detach",
            Command::Unfence(_) => "unfence",
            Command::Failback { .. } => "failback",
            Command::Switchover { .. } => "switchover",
            Command::Promote { .. } => "promote",
        }
    }

    /// The node it is about, if one.
    pub fn node(&self) -> Option<&str> {
        match self {
            Command::Attach(node) | Command::Detach(node) | Command::Unfence(node) => Some(node),
            Command::Promote { node, .. } | Command::Failback { node, .. } => Some(node),
            Command::Switchover { to, .. } => to.as_deref(),
        }
    }
}

/// A command carried out (HTTP 200).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Done {
    /// What was done, in one sentence.
    pub message: String,
    /// For `promote --dry-run`: the choice failover would make now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dry_run: Option<DryRun>,
    /// For a switchover: how long new writes were held, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub write_pause_ms: Option<u64>,
}

/// A command not carried out (HTTP 409, 404 or 401), with what to do next.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    /// Why nothing was done.
    pub refused: String,
    /// What the operator can do about it.
    pub next: String,
}

impl Refusal {
    /// A refusal with its reason and next step.
    pub fn new(refused: impl Into<String>, next: impl Into<String>) -> Refusal {
        Refusal {
            refused: refused.into(),
            next: next.into(),
        }
    }
}

/// Which node failover would promote now, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DryRun {
    /// The primary it would replace.
    pub primary: String,
    /// That primary's last known WAL position.
    pub primary_lsn: Option<String>,
    /// The node failover would promote, if any.
    pub candidate: Option<String>,
    /// Why none would be, when none would.
    pub refusal: Option<String>,
    /// Every other node, with what the choice weighed.
    pub standbys: Vec<Candidate>,
}

/// One node as the failover choice sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Candidate {
    /// Node name.
    pub name: String,
    /// `pg_last_wal_receive_lsn()`, read now.
    pub received: Option<String>,
    /// `pg_last_wal_replay_lsn()`, read now.
    pub replayed: Option<String>,
    /// Bytes behind the primary's last known position.
    pub behind_bytes: Option<u64>,
    /// `sync_state` on the primary (`async`, `potential`, `sync`, `quorum`), if it streams.
    pub sync_state: Option<String>,
    /// Its configured `priority`.
    pub priority: u32,
    /// Why it is not in the running at all (`no_promote`, fenced, detached, unreadable), if so.
    pub excluded: Option<String>,
}

/// `GET /status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// The topology generation.
    pub generation: u64,
    /// The node writes go to.
    pub primary: Option<String>,
    /// Why writes cannot go anywhere, when they cannot.
    pub primary_unavailable: Option<String>,
    /// Whether new units flow or are held by `pgvigil pause`.
    #[serde(default)]
    pub traffic: crate::pause::Traffic,
    /// Sessions running a unit or inside a transaction block.
    #[serde(default)]
    pub in_flight: usize,
    /// Units held by the pause now.
    #[serde(default)]
    pub held: usize,
    /// Every configured node, in configuration order.
    pub nodes: Vec<NodeStatus>,
    /// The most recent events, oldest first.
    pub events: Vec<Event>,
    /// With `[cluster]`: this instance's standing and what every live instance sees.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterStatus>,
}

/// The instances of a multi-instance pgvigil, as `GET /status` shows them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// This instance's name.
    pub instance: String,
    /// `leader`, `follower`, or `leader (lease not renewed)` when it may not act.
    pub standing: String,
    /// The leading instance, when known.
    pub leader: Option<String>,
    /// Why this instance does not lead, when it does not.
    pub why: Option<String>,
    /// Every live instance's published view, by name.
    pub instances: Vec<InstanceStatus>,
    /// Why the views could not be read from etcd, when they could not.
    pub views_unavailable: Option<String>,
}

/// One live instance's view of the nodes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceStatus {
    /// Its name.
    pub name: String,
    /// The nodes its probes cannot reach.
    pub cannot_reach: Vec<String>,
    /// The primary it finds lost, if any.
    pub lost: Option<String>,
    /// Its admin API address.
    pub admin: Option<String>,
}

/// One node in `GET /status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// Configured name.
    pub name: String,
    /// `host:port`.
    pub address: String,
    /// Role in the topology (`primary`, `standby`, `down`, `fenced`, `detached`, `unknown`).
    pub role: String,
    /// `up`, `failing` (some probes failed), `down` or `not probed`.
    pub health: String,
    /// Consecutive failed probes.
    pub failures: u32,
    /// Timeline at the last probe.
    pub timeline: Option<u32>,
    /// Primary: current WAL position; standby: replayed position.
    pub lsn: Option<String>,
    /// Standby: received position.
    pub received: Option<String>,
    /// Standby: bytes of WAL behind the primary.
    pub lag_bytes: Option<u64>,
    /// Standby: replay delay in milliseconds.
    pub replay_delay_ms: Option<u64>,
    /// Why the node is fenced, when it is.
    pub fenced: Option<String>,
    /// Whether an operator detached it.
    pub detached: bool,
    /// On a primary pgvigil promoted: which instance did, and when (`pgvigil.promoted_by`).
    #[serde(default)]
    pub promoted_by: Option<String>,
    /// Server connections pgvigil holds to it (idle and lent).
    pub connections: usize,
    /// Of those, idle in the pool.
    pub idle_connections: usize,
    /// Client sessions whose reads stay on it (`routing.read_affinity = "session"`).
    #[serde(default)]
    pub read_sessions: u64,
}

/// Something pgvigil did or saw, kept in the in-memory event log (`GET /events`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// What sort of event.
    pub kind: EventKind,
    /// The node it is about, if one.
    pub node: Option<String>,
    /// What happened.
    pub message: String,
}

/// What sort of event an [`Event`] is; a failover's phases come in the order listed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// Where writes go changed (a primary known, or none).
    Topology,
    /// Failover: the primary was found lost.
    Detected,
    /// Failover: the standby to promote was chosen.
    Decided,
    /// Failover or switchover: the standby left recovery and takes writes.
    Promoted,
    /// Failover: a standby streams from the new primary.
    Repointed,
    /// Failover: the first write unit finished on the new primary.
    FirstWrite,
    /// A node was fenced.
    Fence,
    /// An operator's command, carried out or refused.
    Command,
    /// The configuration file was read again: what changed, or why it was refused.
    Reload,
}

impl EventKind {
    /// The name used in the JSON and the log.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Topology => "topology",
            EventKind::Detected => "detected",
            EventKind::Decided => "decided",
            EventKind::Promoted => "promoted",
            EventKind::Repointed => "repointed",
            EventKind::FirstWrite => "first_write",
            EventKind::Fence => "fence",
            EventKind::Command => "command",
            EventKind::Reload => "reload",
        }
    }
}
