//! How pgvigil acts on a node's server (`[nodes.control]`): stop, start, rewind, re-clone.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::Problem;

/// The drivers pgvigil has (`agent` and `command` are to come).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ControlDriver {
    /// `pg_ctl`, `pg_rewind` and `pg_basebackup` on this host, run as the data directory's owner.
    Local,
}

/// Node control of one node (`[nodes.control]`); without it `failback` is refused for the node.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeControlConfig {
    /// The driver (default `local`).
    pub driver: ControlDriver,
    /// The node's data directory on this host (required for `local`).
    pub data_dir: PathBuf,
    /// Directory of `pg_ctl`, `pg_rewind`, `pg_basebackup` (default: `pg_config --bindir`, then
    /// the newest `/usr/lib/postgresql/*/bin`).
    pub bin_dir: Option<PathBuf>,
    /// Longest one action (stop, start, rewind, re-clone) may take (default 120s, must be > 0).
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for NodeControlConfig {
    fn default() -> Self {
        Self {
            driver: ControlDriver::Local,
            data_dir: PathBuf::new(),
            bin_dir: None,
            timeout: Duration::from_secs(120),
        }
    }
}

/// Problems with `nodes[i].control`.
pub(super) fn check(i: usize, control: &NodeControlConfig, problems: &mut Vec<Problem>) {
    let key = |field: &str| format!("nodes[{i}].control.{field}");
    match control.driver {
        ControlDriver::Local if control.data_dir.as_os_str().is_empty() => {
            problems.push(Problem::new(
                key("data_dir"),
                "required with the local driver",
            ));
        }
        ControlDriver::Local if control.data_dir.is_relative() => {
            problems.push(Problem::new(key("data_dir"), "must be an absolute path"));
        }
        ControlDriver::Local => {}
    }
    if control.timeout.is_zero() {
        problems.push(Problem::new(key("timeout"), "must be greater than 0"));
    }
}
