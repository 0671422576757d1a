//! How pgvigil acts on a node's server: stop, start, rewind onto another node, re-clone from it.
//! One trait, one driver per way of reaching the server: `local` runs the PostgreSQL tools on
//! this host, `agent` asks a `pgvigil agent` beside the server over HTTP, `command` runs the
//! operator's own shell commands.

mod agent;
mod command;
mod local;
pub mod template;

use std::future::Future;
use std::time::Duration;

pub use agent::Agent;
pub use command::Commands;
pub use local::Local;

use serde::{Deserialize, Serialize};

use crate::config::{ControlDriver, NodeConfig, NodeControlConfig};

/// Why an action failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The program could not be run at all.
    #[error("cannot run {program}: {source}")]
    Spawn {
        /// What was run.
        program: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// It ran past the node's `control.timeout` and was killed.
    #[error("{program} did not finish within {limit:?}")]
    Timeout {
        /// What was run.
        program: String,
        /// The limit.
        limit: Duration,
    },
    /// It exited with an error; `output` holds what it printed.
    #[error("{program} failed ({status}): {output}")]
    Failed {
        /// What was run.
        program: String,
        /// Its exit status.
        status: String,
        /// Its stdout and stderr.
        output: String,
    },
    /// A file of the data directory could not be read or written.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// No PostgreSQL binaries were found and no bin dir is set.
    #[error("no PostgreSQL binaries found: set nodes[].control.bin_dir (the agent's --bin-dir)")]
    NoBinaries,
    /// The `command` driver has no command for this action.
    #[error("no {action} command is configured in [nodes.control]")]
    NotConfigured {
        /// The action's key.
        action: &'static str,
    },
    /// The agent could not be reached or gave no answer.
    #[error("cannot reach the agent at {url}: {reason}")]
    Unreachable {
        /// The agent's address.
        url: String,
        /// What failed.
        reason: String,
    },
    /// The agent answered with an error.
    #[error("the agent at {url} answered HTTP {code}: {error}")]
    Agent {
        /// The agent's address.
        url: String,
        /// The HTTP status.
        code: u16,
        /// Its explanation (with the action's output when the action failed).
        error: String,
    },
}

/// Where the server of a node stands, as its control sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServerState {
    /// A postmaster runs on the data directory.
    Running,
    /// None does.
    Stopped,
}

/// The source another node copies from: a normal (not replication) connection to it.
#[derive(Clone, Serialize, Deserialize)]
pub struct Source {
    /// Host of the source node.
    pub host: String,
    /// Its port.
    pub port: u16,
    /// A superuser (pg_rewind reads files through SQL functions).
    pub user: String,
    /// Its password, passed in the environment, never on a command line.
    pub password: Option<String>,
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Source")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<hidden>"))
            .finish()
    }
}

/// Settings the node must have of its own after a rewind or re-clone (both copy the source's
/// configuration files).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OwnSettings {
    /// The node's port.
    pub port: u16,
    /// Its complete `primary_conninfo` towards the primary.
    pub primary_conninfo: String,
    /// Its replication slot on the primary.
    pub primary_slot_name: String,
}

/// What one action printed, for the event list.
pub type Output = String;

/// Acting on one node's server. Every action is bounded by the node's `control.timeout`.
pub trait NodeControl {
    /// Whether the server runs.
    fn state(&self) -> impl Future<Output = Result<ServerState, ControlError>> + Send;
    /// Stops the server (fast shutdown, immediate if that does not finish).
    fn stop(&self) -> impl Future<Output = Result<Output, ControlError>> + Send;
    /// Starts the server and waits until it accepts connections.
    fn start(&self) -> impl Future<Output = Result<Output, ControlError>> + Send;
    /// `pg_rewind` of the stopped server onto `source`.
    fn rewind(&self, source: &Source) -> impl Future<Output = Result<Output, ControlError>> + Send;
    /// Replaces the data directory with a fresh `pg_basebackup` of `source` (the old one is
    /// kept aside, renamed).
    fn reclone(&self, source: &Source)
        -> impl Future<Output = Result<Output, ControlError>> + Send;
    /// Writes `settings` and `standby.signal` into the stopped server's data directory.
    fn make_standby(
        &self,
        settings: &OwnSettings,
    ) -> impl Future<Output = Result<(), ControlError>> + Send;
}

/// The control of one node, by its configured driver.
#[derive(Debug, Clone)]
pub enum Driver {
    /// `pg_ctl`, `pg_rewind`, `pg_basebackup` on this host.
    Local(Local),
    /// A `pgvigil agent` beside the server.
    Agent(Agent),
    /// The operator's shell commands.
    Command(Box<Commands>),
}

impl Driver {
    /// The driver `control` names, for `node`.
    pub fn new(node: &NodeConfig, control: &NodeControlConfig) -> Driver {
        match control.driver {
            ControlDriver::Local => Driver::Local(Local::new(control)),
            ControlDriver::Agent => Driver::Agent(Agent::new(control)),
            ControlDriver::Command => Driver::Command(Box::new(Commands::new(node, control))),
        }
    }
}

/// Calls `$call` on whichever driver `$driver` is.
macro_rules! each {
    ($driver:expr, $d:ident => $call:expr) => {
        match $driver {
            Driver::Local($d) => $call,
            Driver::Agent($d) => $call,
            Driver::Command($d) => $call,
        }
    };
}

impl NodeControl for Driver {
    async fn state(&self) -> Result<ServerState, ControlError> {
        each!(self, d => d.state().await)
    }

    async fn stop(&self) -> Result<Output, ControlError> {
        each!(self, d => d.stop().await)
    }

    async fn start(&self) -> Result<Output, ControlError> {
        each!(self, d => d.start().await)
    }

    async fn rewind(&self, source: &Source) -> Result<Output, ControlError> {
        each!(self, d => d.rewind(source).await)
    }

    async fn reclone(&self, source: &Source) -> Result<Output, ControlError> {
        each!(self, d => d.reclone(source).await)
    }

    async fn make_standby(&self, settings: &OwnSettings) -> Result<(), ControlError> {
        each!(self, d => d.make_standby(settings).await)
    }
}
