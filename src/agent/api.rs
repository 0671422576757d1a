//! The agent API's JSON documents, shared by `pgvigil agent` and the `agent` driver.

use serde::{Deserialize, Serialize};

use crate::node_control::{OwnSettings, ServerState, Source};

/// `GET /status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerStatus {
    /// Whether a postmaster runs on the data directory.
    pub state: ServerState,
    /// Whether the data directory holds a cluster (`PG_VERSION`).
    pub initialised: bool,
    /// `pg_controldata`'s cluster state (`in production`, `in archive recovery`, `shut down`,
    /// `shut down in recovery`, ...), when there is a cluster.
    pub cluster_state: Option<String>,
    /// While it runs: whether it is a standby (`in archive recovery`) or not.
    pub in_recovery: Option<bool>,
    /// Whether `standby.signal` is there (it starts as a standby).
    pub standby_signal: bool,
}

/// The body of `POST /rewind` and `POST /reclone`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SourceRequest {
    /// The node to copy from.
    pub source: Source,
}

/// The body of `POST /make-standby`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StandbyRequest {
    /// The settings the node must have of its own.
    pub settings: OwnSettings,
}

/// An action carried out (HTTP 200).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActionDone {
    /// What the tools printed.
    pub output: String,
}

/// A request not carried out: 400 bad body, 401 bad token, 404 no such endpoint, 409 the
/// server is not in the state the action needs (or another action runs), 500 the action
/// failed, 504 it ran out of time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentRefusal {
    /// What went wrong, with the tools' output when an action failed.
    pub error: String,
}
