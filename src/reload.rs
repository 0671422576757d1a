//! Reload (SIGHUP, `pgvigil reload`, the console's `RELOAD`): the configuration file is read
//! again and validated whole; an invalid file changes nothing. What can change live is applied
//! at once without dropping a client (pools, timeouts, users, routing, health, failover
//! settings, node weights and priorities, nodes added or removed); what cannot (addresses
//! pgvigil listens on, TLS, `[cluster]`, the state directory) keeps its running value and is
//! reported as needing a restart. A node list change the failover coordinator refuses (the
//! primary removed, a node given another address) refuses the whole reload.

use std::sync::Arc;

use tracing::{info, warn};

use crate::admin::api::EventKind;
use crate::config::{Config, ConfigError, NodeConfig};
use crate::failover::NodeChange;
use crate::proxy::Proxy;
use crate::topology::NodeId;

/// The keys (and sections) that keep their running value until a restart, as `merge` treats
/// them.
pub const RESTART_ONLY: [&str; 10] = [
    "listen",
    "max_client_conn",
    "threads",
    "tls",
    "backend.tls",
    "backend.ca",
    "failover.state_dir",
    "cluster",
    "admin.listen",
    "admin.token",
];

/// Whether a reload changes the key `key` (in SHOW CONFIG's spelling: `pool.max_size`,
/// `nodes[0].weight`) live. A node's name and address do not change: the node is removed and
/// another added.
pub fn changes_live(key: &str) -> bool {
    let restart_only = RESTART_ONLY
        .iter()
        .any(|k| key == *k || key.starts_with(&format!("{k}.")));
    let node_identity =
        key.starts_with("nodes[") && [".name", ".host", ".port"].iter().any(|f| key.ends_with(f));
    !(restart_only || node_identity)
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
    /// The node list cannot change that way live (every problem is named).
    #[error("{}", .0.join("\n"))]
    Nodes(Vec<String>),
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
pub async fn reload(proxy: &Proxy) -> Result<Reloaded, ReloadError> {
    let result = read_and_apply(proxy).await;
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

async fn read_and_apply(proxy: &Proxy) -> Result<Reloaded, ReloadError> {
    let old = proxy.config();
    let path = old.source.clone().ok_or(ReloadError::NoFile)?;
    let new = Config::load(&path).map_err(ReloadError::Invalid)?;
    // Nodes leaving or removed by an earlier reload, as the coordinator last published them.
    let control = proxy.control.get();
    let view = control.map(|c| c.view()).unwrap_or_default();
    let gone = |node: NodeId| view.get(node).is_some_and(|v| v.removed);
    let (next, reloaded, nodes) = merge(&old, new, &gone).map_err(ReloadError::Nodes)?;
    drop(old);
    if nodes.added.is_empty() && nodes.removed.is_empty() {
        if !reloaded.applied.is_empty() {
            proxy.replace_config(next);
        }
        return Ok(reloaded);
    }
    let Some(control) = control else {
        return Err(ReloadError::Nodes(vec![
            "nodes: pgvigil is still starting: reload again in a moment".into(),
        ]));
    };
    let change = NodeChange {
        next,
        added: nodes.added,
        removed: nodes.removed,
    };
    control
        .change_nodes(change)
        .await
        .map_err(|why| ReloadError::Nodes(why.lines().map(str::to_owned).collect()))?;
    Ok(reloaded)
}

/// The ids of the nodes a reload adds and removes.
#[derive(Debug, Default, PartialEq, Eq)]
struct NodeIds {
    added: Vec<NodeId>,
    removed: Vec<NodeId>,
}

/// The running node list for the nodes `file` names: a running node keeps its id (and, once
/// removed, its place: ids are never reused), a name added again after its removal takes its
/// old id back, and a new name takes the next id. `gone`: whether a running node is leaving or
/// removed. A node that stays may not change its address (refused: it would be another
/// server under the same name).
fn merge_nodes(
    running: &[NodeConfig],
    file: Vec<NodeConfig>,
    gone: &dyn Fn(NodeId) -> bool,
) -> Result<(Vec<NodeConfig>, NodeIds), Vec<String>> {
    let mut nodes = running.to_vec();
    let mut ids = NodeIds::default();
    let mut problems = Vec::new();
    for (node, before) in running.iter().enumerate() {
        if !gone(node) && !file.iter().any(|n| n.name == before.name) {
            ids.removed.push(node);
        }
    }
    for now in file {
        match running.iter().position(|n| n.name == now.name) {
            Some(node) if gone(node) => {
                ids.added.push(node);
                nodes[node] = now;
            }
            Some(node) if (&now.host, now.port) != (&nodes[node].host, nodes[node].port) => {
                problems.push(format!(
                    "nodes[{}]: its address cannot change live ({}:{} to {}:{}): remove the \
                     node (reload), then add it with its new address (reload), or give it \
                     another name",
                    now.name, nodes[node].host, nodes[node].port, now.host, now.port
                ));
            }
            Some(node) => nodes[node] = now,
            None => {
                ids.added.push(nodes.len());
                nodes.push(now);
            }
        }
    }
    if nodes.len() > crate::router::MAX_NODES {
        problems.push(format!(
            "nodes: pgvigil can run with {} nodes added since it started (removed ones \
             included); restart it to add more",
            crate::router::MAX_NODES
        ));
    }
    if problems.is_empty() {
        Ok((nodes, ids))
    } else {
        Err(problems)
    }
}

/// The configuration to run with: `new`, except for what cannot change live, which keeps its
/// value from `old`, and the node list as [`merge_nodes`] makes it; with what changed either
/// way.
fn merge(
    old: &Config,
    mut new: Config,
    gone: &dyn Fn(NodeId) -> bool,
) -> Result<(Config, Reloaded, NodeIds), Vec<String>> {
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
    restart_only!(threads, "threads");
    restart_only!(tls, "tls");
    restart_only!(backend.tls, "backend.tls");
    restart_only!(backend.ca, "backend.ca");
    restart_only!(failover.state_dir, "failover.state_dir");
    restart_only!(cluster, "cluster");
    restart_only!(admin.listen, "admin.listen");
    restart_only!(admin.token, "admin.token");
    let (nodes, ids) = merge_nodes(&old.nodes, std::mem::take(&mut new.nodes), gone)?;
    new.nodes = nodes;
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
    for (node, (now, before)) in new.nodes.iter().zip(&old.nodes).enumerate() {
        if now != before && !ids.added.contains(&node) {
            applied.push(format!("nodes[{}]", now.name));
        }
    }
    let names = |list: &[NodeId]| -> Vec<&str> {
        list.iter().map(|&n| new.nodes[n].name.as_str()).collect()
    };
    if !ids.added.is_empty() {
        applied.push(format!("nodes added ({})", names(&ids.added).join(", ")));
    }
    if !ids.removed.is_empty() {
        applied.push(format!(
            "nodes removed ({})",
            names(&ids.removed).join(", ")
        ));
    }
    applied.extend(user_changes(old, &new));
    Ok((
        new,
        Reloaded {
            applied,
            needs_restart,
        },
        ids,
    ))
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
    pub(crate) fn replace_config(&self, next: Config) {
        let users = crate::proxy::user_secrets(&next, &self.users.load());
        self.users.store(Arc::new(users));
        self.classifier.replace(next.function_lists());
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

    fn node(name: &str, port: u16) -> NodeConfig {
        NodeConfig {
            name: name.into(),
            host: "127.0.0.1".into(),
            port,
            ..NodeConfig::default()
        }
    }

    const NONE_GONE: &dyn Fn(NodeId) -> bool = &|_| false;

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
        let (next, reloaded, ids) = merge(&old, new, NONE_GONE).unwrap();
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
        assert_eq!(ids, NodeIds::default());
        assert_eq!(next.listen, old.listen);
        assert_eq!((next.pool.max_size, next.nodes[0].weight), (3, 5));
    }

    #[test]
    fn running_nodes_keep_their_ids_and_added_ones_follow() {
        let running = vec![node("pg1", 1), node("pg2", 2), node("pg3", 3)];
        // The file drops pg2, lists the others in another order and adds pg4.
        let file = vec![node("pg4", 4), node("pg3", 3), node("pg1", 1)];
        let (nodes, ids) = merge_nodes(&running, file, NONE_GONE).unwrap();
        let names: Vec<&str> = nodes.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["pg1", "pg2", "pg3", "pg4"]);
        assert_eq!(
            ids,
            NodeIds {
                added: vec![3],
                removed: vec![1]
            }
        );
    }

    #[test]
    fn a_removed_name_added_again_takes_its_id_back_at_its_new_address() {
        let running = vec![node("pg1", 1), node("pg2", 2)];
        let gone: &dyn Fn(NodeId) -> bool = &|n| n == 1;
        // Still gone: nothing to do.
        let (_, ids) = merge_nodes(&running, vec![node("pg1", 1)], gone).unwrap();
        assert_eq!(ids, NodeIds::default());
        let (nodes, ids) =
            merge_nodes(&running, vec![node("pg1", 1), node("pg2", 9)], gone).unwrap();
        assert_eq!((nodes.len(), nodes[1].port), (2, 9));
        assert_eq!(ids.added, [1]);
    }

    #[test]
    fn a_node_given_another_address_under_its_name_is_refused() {
        let running = vec![node("pg1", 1), node("pg2", 2)];
        let problems =
            merge_nodes(&running, vec![node("pg1", 1), node("pg2", 7)], NONE_GONE).unwrap_err();
        assert_eq!(problems.len(), 1);
        assert!(problems[0].starts_with(
            "nodes[pg2]: its address cannot change live (127.0.0.1:2 to 127.0.0.1:7)"
        ));
    }

    #[test]
    fn more_nodes_than_ids_is_refused() {
        let running: Vec<NodeConfig> = (0..crate::router::MAX_NODES)
            .map(|i| node(&format!("pg{i}"), 1))
            .collect();
        let mut file = running.clone();
        file.push(node("one_more", 1));
        let problems = merge_nodes(&running, file, NONE_GONE).unwrap_err();
        assert!(
            problems[0].contains("restart it to add more"),
            "{problems:?}"
        );
    }
}
