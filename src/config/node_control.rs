//! How pgvigil acts on a node's server (`[nodes.control]`): stop, start, rewind, re-clone.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::Problem;
use crate::node_control::template::{self, Action};

/// The environment variable that gives the agent token when `token_file` is not set (the
/// agent itself reads the same variable).
pub const AGENT_TOKEN_ENV: &str = "PGVIGIL_AGENT_TOKEN";

/// The drivers pgvigil has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ControlDriver {
    /// `pg_ctl`, `pg_rewind` and `pg_basebackup` on this host, run as the data directory's owner.
    Local,
    /// A `pgvigil agent` beside the server, over HTTP with a token.
    Agent,
    /// The operator's own shell commands, one per action.
    Command,
}

/// Node control of one node (`[nodes.control]`); without it `failback` is refused for the node.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeControlConfig {
    /// The driver (default `local`).
    pub driver: ControlDriver,
    /// The node's data directory on this host (required for `local`; `{data_dir}` of `command`).
    pub data_dir: PathBuf,
    /// `local`: directory of `pg_ctl`, `pg_rewind`, `pg_basebackup` (default: `pg_config
    /// --bindir`, then the newest `/usr/lib/postgresql/*/bin`).
    pub bin_dir: Option<PathBuf>,
    /// Longest one action (stop, start, rewind, re-clone) may take (default 120s, must be > 0).
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// `agent`: the agent's address, `http://HOST:PORT` (required).
    pub url: Option<String>,
    /// `agent`: file holding the agent's token (default: `PGVIGIL_AGENT_TOKEN`).
    pub token_file: Option<PathBuf>,
    /// `command`: stops the server (required).
    pub stop: Option<String>,
    /// `command`: starts the server and returns once it accepts connections (required).
    pub start: Option<String>,
    /// `command`: exits 0 when the server runs, 3 (or 4) when it does not, as `pg_ctl status`
    /// does (required).
    pub status: Option<String>,
    /// `command`: rewinds the stopped server onto the source (failback without `--reclone`).
    pub rewind: Option<String>,
    /// `command`: replaces the data directory with a copy of the source (`--reclone`).
    pub reclone: Option<String>,
    /// `command`: writes the standby settings and `standby.signal` (needed by failback).
    pub make_standby: Option<String>,
}

impl Default for NodeControlConfig {
    fn default() -> Self {
        Self {
            driver: ControlDriver::Local,
            data_dir: PathBuf::new(),
            bin_dir: None,
            timeout: Duration::from_secs(120),
            url: None,
            token_file: None,
            stop: None,
            start: None,
            status: None,
            rewind: None,
            reclone: None,
            make_standby: None,
        }
    }
}

impl NodeControlConfig {
    /// The command template of `action`, if set.
    pub fn template(&self, action: Action) -> Option<&str> {
        match action {
            Action::Stop => self.stop.as_deref(),
            Action::Start => self.start.as_deref(),
            Action::Status => self.status.as_deref(),
            Action::Rewind => self.rewind.as_deref(),
            Action::Reclone => self.reclone.as_deref(),
            Action::MakeStandby => self.make_standby.as_deref(),
        }
    }
}

/// Problems with `nodes[i].control` of node `name`.
pub(super) fn check(
    i: usize,
    name: &str,
    control: &NodeControlConfig,
    problems: &mut Vec<Problem>,
) {
    let key = |field: &str| format!("nodes[{i}].control.{field}");
    let mut problem = |field: &str, reason: String| {
        problems.push(Problem::new(key(field), format!("node {name}: {reason}")));
    };
    let driver = match control.driver {
        ControlDriver::Local => "local",
        ControlDriver::Agent => "agent",
        ControlDriver::Command => "command",
    };
    if control.driver == ControlDriver::Local {
        if control.data_dir.as_os_str().is_empty() {
            problem("data_dir", "required with the local driver".into());
        }
    } else if control.bin_dir.is_some() {
        problem(
            "bin_dir",
            format!("only the local driver uses it, not {driver}"),
        );
    }
    if !control.data_dir.as_os_str().is_empty() && control.data_dir.is_relative() {
        problem("data_dir", "must be an absolute path".into());
    }
    if control.driver == ControlDriver::Agent {
        match control.url.as_deref() {
            None => problem(
                "url",
                "required with the agent driver (http://HOST:9997)".into(),
            ),
            Some(url) if crate::http_client::Endpoint::parse(url).is_none() => {
                problem("url", format!("{url:?} is not an http://HOST:PORT address"));
            }
            Some(_) => {}
        }
        if !control.data_dir.as_os_str().is_empty() {
            problem(
                "data_dir",
                "the agent knows its data directory (--data-dir); leave it out".into(),
            );
        }
    } else {
        for (field, set) in [
            ("url", control.url.is_some()),
            ("token_file", control.token_file.is_some()),
        ] {
            if set {
                problem(
                    field,
                    format!("only the agent driver uses it, not {driver}"),
                );
            }
        }
    }
    for action in Action::ALL {
        let field = action.key();
        match (control.driver, control.template(action)) {
            (ControlDriver::Command, Some(text)) => {
                if let Err(e) =
                    template::check(text, action, !control.data_dir.as_os_str().is_empty())
                {
                    problem(field, e);
                }
            }
            (ControlDriver::Command, None) if action.required() => {
                problem(field, "required with the command driver".into());
            }
            (ControlDriver::Command, None) => {}
            (_, Some(_)) => problem(
                field,
                format!("only the command driver uses it, not {driver}"),
            ),
            (_, None) => {}
        }
    }
    let copies = control.rewind.is_some() || control.reclone.is_some();
    if control.driver == ControlDriver::Command && copies && control.make_standby.is_none() {
        problem(
            "make_standby",
            "required with rewind or reclone: failback writes the node's standby settings with it"
                .into(),
        );
    }
    if control.timeout.is_zero() {
        problem("timeout", "must be greater than 0".into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(control: &NodeControlConfig) -> Vec<String> {
        let mut problems = Vec::new();
        check(1, "pg2", control, &mut problems);
        problems.iter().map(Problem::to_string).collect()
    }

    fn commands() -> NodeControlConfig {
        NodeControlConfig {
            driver: ControlDriver::Command,
            stop: Some("ssh {host} pg_ctl stop".into()),
            start: Some("ssh {host} pg_ctl start".into()),
            status: Some("ssh {host} pg_ctl status".into()),
            ..NodeControlConfig::default()
        }
    }

    #[test]
    fn the_agent_driver_needs_an_http_url_and_only_its_own_keys() {
        let agent = NodeControlConfig {
            driver: ControlDriver::Agent,
            ..NodeControlConfig::default()
        };
        assert_eq!(
            problems(&agent),
            ["nodes[1].control.url: node pg2: required with the agent driver (http://HOST:9997)"]
        );
        let wrong = NodeControlConfig {
            url: Some("db2:9997".into()),
            stop: Some("x".into()),
            ..agent.clone()
        };
        assert_eq!(
            problems(&wrong),
            [
                "nodes[1].control.url: node pg2: \"db2:9997\" is not an http://HOST:PORT address",
                "nodes[1].control.stop: node pg2: only the command driver uses it, not agent",
            ]
        );
        let good = NodeControlConfig {
            url: Some("http://db2:9997".into()),
            token_file: Some("/etc/pgvigil/agent.token".into()),
            ..agent
        };
        assert!(problems(&good).is_empty());
    }

    #[test]
    fn command_templates_are_required_where_needed_and_their_placeholders_known() {
        assert!(problems(&commands()).is_empty());
        let missing = NodeControlConfig {
            status: None,
            rewind: Some("my-rewind {node} {source_conninfo}".into()),
            ..commands()
        };
        assert_eq!(
            problems(&missing),
            [
                "nodes[1].control.status: node pg2: required with the command driver",
                "nodes[1].control.make_standby: node pg2: required with rewind or reclone: failback writes the node's standby settings with it",
            ]
        );
        let unknown = NodeControlConfig {
            stop: Some("pg_ctl stop -D {datadir}".into()),
            rewind: Some("pg_rewind -D {data_dir}".into()),
            make_standby: Some("echo {slot}".into()),
            url: Some("http://x:1".into()),
            ..commands()
        };
        assert_eq!(
            problems(&unknown),
            [
                "nodes[1].control.url: node pg2: only the agent driver uses it, not command",
                "nodes[1].control.stop: node pg2: unknown placeholder {datadir}: stop knows {node}, {host}, {port}, {data_dir}",
                "nodes[1].control.rewind: node pg2: {data_dir} is used but data_dir is not set",
            ]
        );
    }
}
