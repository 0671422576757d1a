//! Reload (SIGHUP, `pgvigil reload`, the console's `RELOAD`): the configuration file is read
//! again and validated whole; an invalid file changes nothing. What can change live is applied
//! at once without dropping a client (pools, timeouts, users, routing, health, failover
//! settings, node weights and priorities); what cannot (addresses pgvigil listens on, TLS,
//! `[cluster]`, the state directory, the node list itself) keeps its running value and is
//! reported as needing a restart.

use std::sync::Arc;

use tracing::{info, warn};

use crate::admin::api::EventKind;
use crate::config::{Config, ConfigError};
use crate::proxy::Proxy;

/// The keys (and sections) that keep their running value until a restart, as `merge` treats
/// them; the node list's names and addresses too.
pub const RESTART_ONLY: [&str; 9] = [
    "listen",
    "max_client_conn",
    "tls",
    "backend.tls",
    "backend.ca",
    "failover.state_dir",
    "cluster",
    "admin.listen",
    "admin.token",
];

/// Whether a reload changes the key `key` (in SHOW CONFIG's spelling: `pool.max_size`,
/// `nodes[0].weight`) live.
pub fn changes_live(key: &str) -> bool {
    let restart_only = RESTART_ONLY
        .iter()
        .any(|k| key == *k || key.starts_with(&format!("{k}.")));
    let node_address =
        key.starts_with("nodes[") && [".name", ".host", ".port"].iter().any(|f| key.ends_with(f));
    !(restart_only || node_address)
}

/// Why a reload changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The running configuration was not read from a file.
    #[error("pgvigil was started without a configuration file: there is nothing to read again")]
    NoFile,
    /// The file cannot be read, or is not a valid configuration (every problem is named).
    #[error("{0}")]
    Invalid(ConfigError),
}

/// What a reload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reloaded {
    /// The keys that changed and are in force now.
    pub applied: Vec<String>,
    /// The keys that changed in the file but keep their running value until a restart.
    pub needs_restart: Vec<String>,
}

impl Reloaded {
    /// One sentence for the operator, the log and the event log.
    pub fn summary(&self) -> String {
        let applied = if self.applied.is_empty() {
            "nothing changed".to_owned()
        } else {
            format!("applied {}", self.applied.join(", "))
        };
        if self.needs_restart.is_empty() {
            format!("reloaded: {applied}")
        } else {
            format!(
                "reloaded: {applied}; needs a restart to change: {}",
                self.needs_restart.join(", ")
            )
        }
    }
}

/// Reads the configuration file again and applies what may change live; kept in the event log
/// either way.
pub fn reload(proxy: &Proxy) -> Result<Reloaded, ReloadError> {
    let result = read_and_apply(proxy);
    match &result {
        Ok(reloaded) => {
            let summary = reloaded.summary();
            info!(%summary, "configuration reloaded");
            proxy.events.push(EventKind::Reload, None, summary);
        }
        Err(error) => {
            warn!(%error, "configuration reload refused; the running configuration stays");
            let text = error.to_string().replace('\n', "; ");
            proxy
                .events
                .push(EventKind::Reload, None, format!("reload refused: {text}"));
        }
    }
    result
}

fn read_and_apply(proxy: &Proxy) -> Result<Reloaded, ReloadError> {
    let old = proxy.config();
    let path = old.source.clone().ok_or(ReloadError::NoFile)?;
    let new = Config::load(&path).map_err(ReloadError::Invalid)?;
    let (next, reloaded) = merge(&old, new);
    drop(old);
    if !reloaded.applied.is_empty() {
        proxy.replace_config(next);
    }
    Ok(reloaded)
}

/// The configuration to run with: `new`, except for what cannot change live, which keeps its
/// value from `old`; with what changed either way.
fn merge(old: &Config, mut new: Config) -> (Config, Reloaded) {
    let mut needs_restart = Vec::new();
    macro_rules! restart_only {
        ($($field:ident).+, $key:expr) => {
            if new.$($field).+ != old.$($field).+ {
                needs_restart.push($key.to_owned());
                new.$($field).+ = old.$($field).+.clone();
            }
        };
    }
    restart_only!(listen, "listen");
    restart_only!(max_client_conn, "max_client_conn");
    restart_only!(tls, "tls");
    restart_only!(backend.tls, "backend.tls");
    restart_only!(backend.ca, "backend.ca");
    restart_only!(failover.state_dir, "failover.state_dir");
    restart_only!(cluster, "cluster");
    restart_only!(admin.listen, "admin.listen");
    restart_only!(admin.token, "admin.token");
    let address = |c: &Config| {
        c.nodes
            .iter()
            .map(|n| (n.name.clone(), n.host.clone(), n.port))
            .collect::<Vec<_>>()
    };
    if address(&new) != address(old) {
        // Every per-node structure (pools, probes, topology, state file) is sized and indexed
        // by the node list at start.
        needs_restart.push("nodes (added, removed, renamed or moved)".to_owned());
        new.nodes = old.nodes.clone();
    }
    new.source = old.source.clone();

    let mut applied = Vec::new();
    macro_rules! live {
        ($($field:ident).+, $key:expr) => {
            if new.$($field).+ != old.$($field).+ {
                applied.push($key.to_owned());
            }
        };
    }
    live!(max_message_size, "max_message_size");
    live!(client, "client");
    live!(backend.connect_timeout, "backend.connect_timeout");
    live!(pool, "pool");
    live!(health, "health");
    live!(routing, "routing");
    live!(failover, "failover");
    live!(replication, "replication");
    live!(admin.metrics_auth, "admin.metrics_auth");
    for (now, before) in new.nodes.iter().zip(&old.nodes) {
        if now != before {
            applied.push(format!("nodes[{}]", now.name));
        }
    }
    applied.extend(user_changes(old, &new));
    (
        new,
        Reloaded {
            applied,
            needs_restart,
        },
    )
}

/// `users` changes, each naming the users: added, removed, changed.
fn user_changes(old: &Config, new: &Config) -> Vec<String> {
    let names = |from: &Config, keep: &dyn Fn(&str) -> bool| -> Vec<String> {
        from.users
            .iter()
            .filter(|u| keep(&u.name))
            .map(|u| u.name.clone())
            .collect()
    };
    let added = names(new, &|name| old.user(name).is_none());
    let removed = names(old, &|name| new.user(name).is_none());
    let changed = names(new, &|name| {
        old.user(name)
            .is_some_and(|before| Some(before) != new.user(name))
    });
    [
        ("users added", added),
        ("users removed", removed),
        ("users changed", changed),
    ]
    .into_iter()
    .filter(|(_, list)| !list.is_empty())
    .map(|(what, list)| format!("{what} ({})", list.join(", ")))
    .collect()
}

impl Proxy {
    /// Puts a reloaded configuration in force: users' secrets (unchanged ones kept), the
    /// classifier's function lists, the pools' limits, then the configuration every reader sees.
    fn replace_config(&self, next: Config) {
        let users = crate::proxy::user_secrets(&next, &self.users.load());
        self.users.store(Arc::new(users));
        self.functions.store(Arc::new(next.function_lists()));
        self.pools.reconfigure(next.pool.clone());
        self.store_config(next);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{NodeConfig, UserConfig};

    fn config() -> Config {
        Config {
            nodes: vec![NodeConfig {
                name: "pg1".into(),
                host: "127.0.0.1".into(),
                ..NodeConfig::default()
            }],
            users: vec![UserConfig {
                name: "app".into(),
                password: Some("secret".into()),
                ..UserConfig::default()
            }],
            ..Config::default()
        }
    }

    #[test]
    fn live_keys_apply_and_restart_only_keys_keep_their_running_value() {
        let old = config();
        let mut new = config();
        new.pool.max_size = 3;
        new.nodes[0].weight = 5;
        new.listen = "127.0.0.1:1".parse().unwrap();
        new.users.push(UserConfig {
            name: "new_user".into(),
            password: Some("x".into()),
            ..UserConfig::default()
        });
        new.users[0].password = Some("changed".into());
        let (next, reloaded) = merge(&old, new);
        assert_eq!(
            reloaded.applied,
            [
                "pool",
                "nodes[pg1]",
                "users added (new_user)",
                "users changed (app)"
            ]
        );
        assert_eq!(reloaded.needs_restart, ["listen"]);
        assert_eq!(next.listen, old.listen);
        assert_eq!((next.pool.max_size, next.nodes[0].weight), (3, 5));
    }

    #[test]
    fn a_changed_node_list_needs_a_restart() {
        let old = config();
        let mut new = config();
        new.nodes.push(NodeConfig {
            name: "pg2".into(),
            host: "127.0.0.1".into(),
            ..NodeConfig::default()
        });
        new.users.clear();
        let (next, reloaded) = merge(&old, new);
        assert_eq!(next.nodes, old.nodes);
        assert_eq!(
            reloaded.needs_restart,
            ["nodes (added, removed, renamed or moved)"]
        );
        assert_eq!(reloaded.applied, ["users removed (app)"]);
    }
}
