//! The console's SHOW result sets, in PgBouncer's column style (lower-case names, counts as
//! `bigint`, times as text `YYYY-MM-DD HH:MM:SS` in UTC), read from pgvigil's own state.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use pgvigil_proto::encode::{self, ColumnType};

use crate::cancel::ClientState;
use crate::proxy::Proxy;
use crate::topology::{NodeId, Role};

use ColumnType::{Int8, Text};

/// The SHOW items the console knows, lower-case.
pub const ITEMS: [&str; 8] = [
    "nodes", "pools", "clients", "servers", "stats", "events", "config", "version",
];

/// Keys whose values SHOW CONFIG never shows.
const SECRET_SUFFIXES: [&str; 2] = ["password", "token"];

/// A result set: its columns and rows, all values as text (`None` is NULL).
pub struct ResultSet {
    columns: Vec<(&'static str, ColumnType)>,
    rows: Vec<Vec<Option<String>>>,
}

impl ResultSet {
    fn new(columns: &[(&'static str, ColumnType)]) -> ResultSet {
        ResultSet {
            columns: columns.to_vec(),
            rows: Vec::new(),
        }
    }

    fn push(&mut self, row: Vec<Option<String>>) {
        self.rows.push(row);
    }

    /// RowDescription, a DataRow per row, and `CommandComplete("SHOW")`.
    pub fn encode(&self, out: &mut BytesMut) {
        encode::row_description(out, &self.columns);
        for row in &self.rows {
            let values: Vec<Option<&str>> = row.iter().map(Option::as_deref).collect();
            encode::data_row(out, &values);
        }
        encode::command_complete(out, "SHOW");
    }
}

/// `SHOW item` (upper-case), or None when the item is unknown.
pub fn show(item: &str, proxy: &Proxy) -> Option<ResultSet> {
    Some(match item {
        "NODES" => nodes(proxy),
        "POOLS" => pools(proxy),
        "CLIENTS" => clients(proxy),
        "SERVERS" => servers(proxy),
        "STATS" => stats(proxy),
        "EVENTS" => events(proxy),
        "CONFIG" => config(proxy),
        "VERSION" => {
            let mut set = ResultSet::new(&[("version", Text)]);
            set.push(vec![Some(format!("pgvigil {}", env!("CARGO_PKG_VERSION")))]);
            set
        }
        _ => return None,
    })
}

fn text(value: impl ToString) -> Option<String> {
    Some(value.to_string())
}

/// `YYYY-MM-DD HH:MM:SS` in UTC.
fn timestamp(at: SystemTime) -> Option<String> {
    let secs = at.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    let text = humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(secs));
    Some(text.to_string().trim_end_matches('Z').replacen('T', " ", 1))
}

fn nodes(proxy: &Proxy) -> ResultSet {
    let mut set = ResultSet::new(&[
        ("name", Text),
        ("host", Text),
        ("port", Int8),
        ("role", Text),
        ("health", Text),
        ("timeline", Int8),
        ("lsn", Text),
        ("lag_bytes", Int8),
        ("weight", Int8),
        ("fenced", Text),
        ("sv_open", Int8),
        ("sv_idle", Int8),
    ]);
    let Some(control) = proxy.control.get() else {
        return set;
    };
    let status = crate::admin::status::status(proxy, control);
    let config = proxy.config();
    for seen in &status.nodes {
        let Some(node) = config.nodes.iter().find(|n| n.name == seen.name) else {
            continue;
        };
        set.push(vec![
            text(&node.name),
            text(&node.host),
            text(node.port),
            text(&seen.role),
            text(&seen.health),
            seen.timeline.map(|t| t.to_string()),
            seen.lsn.clone(),
            seen.lag_bytes.map(|l| l.to_string()),
            text(node.weight),
            seen.fenced.clone(),
            text(seen.connections),
            text(seen.idle_connections),
        ]);
    }
    set
}

fn pools(proxy: &Proxy) -> ResultSet {
    let mut set = ResultSet::new(&[
        ("database", Text),
        ("user", Text),
        ("node", Text),
        ("cl_active", Int8),
        ("cl_waiting", Int8),
        ("sv_active", Int8),
        ("sv_idle", Int8),
        ("maxwait", Int8),
        ("maxwait_us", Int8),
        ("pool_mode", Text),
    ]);
    let config = proxy.config();
    // (database, user) → clients active, waiting; (database, user, node) → servers active, idle.
    let mut clients: BTreeMap<(String, String), [u64; 2]> = BTreeMap::new();
    for (_, client) in proxy.cancels.clients() {
        let Some(info) = client.info() else {
            continue;
        };
        let entry = clients
            .entry((info.database().to_owned(), info.user().to_owned()))
            .or_default();
        entry[usize::from(client.state() == ClientState::Waiting)] += 1;
    }
    let mut servers: BTreeMap<(String, String, usize), [u64; 2]> = BTreeMap::new();
    for row in proxy.pools.servers() {
        let info = row.info;
        let entry = servers
            .entry((info.database, info.user, info.node))
            .or_default();
        entry[usize::from(row.idle)] += 1;
    }
    let topology = proxy.topology.snapshot();
    let shown = |node: NodeId| {
        topology
            .nodes
            .get(node)
            .is_some_and(|n| n.role != Role::Removed)
    };
    for (database, user) in clients.keys() {
        for node in (0..config.nodes.len()).filter(|&n| shown(n)) {
            servers
                .entry((database.clone(), user.clone(), node))
                .or_default();
        }
    }
    // How long the longest checkout of each (database, user, node) waiting now has waited.
    let mut waits = BTreeMap::new();
    for node in (0..config.nodes.len()).filter(|&n| shown(n)) {
        for ((database, user), waited) in proxy.pools.max_waits(node) {
            servers
                .entry((database.clone(), user.clone(), node))
                .or_default();
            waits.insert((database, user, node), waited);
        }
    }
    let mode = format!("{:?}", config.pool.mode).to_ascii_lowercase();
    for ((database, user, node), [active, idle]) in servers {
        if database == super::DATABASE || !shown(node) {
            continue;
        }
        let [cl_active, cl_waiting] = clients
            .get(&(database.clone(), user.clone()))
            .copied()
            .unwrap_or_default();
        let name = config.nodes.get(node).map_or("?", |n| n.name.as_str());
        let waited = waits
            .get(&(database.clone(), user.clone(), node))
            .copied()
            .unwrap_or_default();
        set.push(vec![
            text(&database),
            text(&user),
            text(name),
            text(cl_active),
            text(cl_waiting),
            text(active),
            text(idle),
            text(waited.as_secs()),
            text(waited.subsec_micros()),
            text(&mode),
        ]);
    }
    set
}

fn clients(proxy: &Proxy) -> ResultSet {
    let mut set = ResultSet::new(&[
        ("type", Text),
        ("user", Text),
        ("database", Text),
        ("state", Text),
        ("addr", Text),
        ("port", Int8),
        ("connect_time", Text),
        ("pid", Int8),
        ("application_name", Text),
    ]);
    let mut clients = proxy.cancels.clients();
    clients.sort_by_key(|(_, c)| c.info().map(|info| info.connected_at));
    for (pid, client) in clients {
        let Some(info) = client.info() else {
            continue;
        };
        let state = match client.state() {
            ClientState::Active => "active",
            ClientState::Waiting => "waiting",
        };
        set.push(vec![
            text("C"),
            text(info.user()),
            text(info.database()),
            text(state),
            info.addr.map(|a| a.ip().to_string()),
            info.addr.map(|a| a.port().to_string()),
            timestamp(info.connected_at),
            text(pid),
            text(info.application_name()),
        ]);
    }
    set
}

fn servers(proxy: &Proxy) -> ResultSet {
    let mut set = ResultSet::new(&[
        ("type", Text),
        ("user", Text),
        ("database", Text),
        ("state", Text),
        ("node", Text),
        ("addr", Text),
        ("port", Int8),
        ("connect_time", Text),
        ("remote_pid", Int8),
    ]);
    let config = proxy.config();
    for row in proxy.pools.servers() {
        let info = row.info;
        let name = config.nodes.get(info.node).map_or("?", |n| n.name.as_str());
        set.push(vec![
            text("S"),
            text(&info.user),
            text(&info.database),
            text(if row.idle { "idle" } else { "active" }),
            text(name),
            text(&info.addr.0),
            text(info.addr.1),
            timestamp(info.connected_at),
            text(info.backend_pid),
        ]);
    }
    set
}

fn stats(proxy: &Proxy) -> ResultSet {
    let mut set = ResultSet::new(&[
        ("node", Text),
        ("total_xact_count", Int8),
        ("total_query_count", Int8),
        ("total_received", Int8),
        ("total_sent", Int8),
        ("total_query_time", Int8),
        ("total_wait_time", Int8),
        ("avg_query_time", Int8),
    ]);
    let config = proxy.config();
    let topology = proxy.topology.snapshot();
    let shown = |node: NodeId| {
        topology
            .nodes
            .get(node)
            .is_some_and(|n| n.role != Role::Removed)
    };
    for (id, node) in config.nodes.iter().enumerate().filter(|&(id, _)| shown(id)) {
        let totals = proxy.metrics.totals(id);
        let avg = totals.unit_us.checked_div(totals.units).unwrap_or(0);
        set.push(vec![
            text(&node.name),
            text(totals.transactions),
            text(totals.units),
            text(totals.received),
            text(totals.sent),
            text(totals.unit_us),
            text(proxy.pools.wait_us(id)),
            text(avg),
        ]);
    }
    set
}

fn events(proxy: &Proxy) -> ResultSet {
    let mut set = ResultSet::new(&[
        ("time", Text),
        ("kind", Text),
        ("node", Text),
        ("message", Text),
    ]);
    for event in proxy.events.list() {
        set.push(vec![
            timestamp(UNIX_EPOCH + Duration::from_millis(event.at_ms)),
            text(event.kind.as_str()),
            event.node,
            text(event.message),
        ]);
    }
    set
}

fn config(proxy: &Proxy) -> ResultSet {
    let mut set = ResultSet::new(&[
        ("key", Text),
        ("value", Text),
        ("default", Text),
        ("changeable", Text),
    ]);
    // The node list as the file has it: without the nodes a reload removed (leaving or gone).
    let mut in_force = crate::config::Config::clone(&proxy.config());
    let topology = proxy.topology.snapshot();
    let mut id = 0;
    in_force.nodes.retain(|_| {
        let role = topology.nodes.get(id).map(|n| n.role);
        id += 1;
        !matches!(role, Some(Role::Leaving | Role::Removed))
    });
    let running = flatten(&in_force);
    let defaults: BTreeMap<String, String> = flatten(&crate::config::Config::default())
        .into_iter()
        .collect();
    for (key, value) in running {
        let secret = SECRET_SUFFIXES.iter().any(|s| key.ends_with(s));
        let changeable = crate::reload::changes_live(&key);
        set.push(vec![
            text(&key),
            text(if secret { "********" } else { &value }),
            defaults.get(&key).cloned(),
            text(if changeable { "yes" } else { "no" }),
        ]);
    }
    set
}

/// Every key of `config` with its value, in TOML spelling (`pool.max_size`, `nodes[0].weight`).
fn flatten(config: &crate::config::Config) -> Vec<(String, String)> {
    let mut out = Vec::new();
    if let Ok(value) = toml::Value::try_from(config) {
        walk(String::new(), &value, &mut out);
    }
    out
}

fn walk(prefix: String, value: &toml::Value, out: &mut Vec<(String, String)>) {
    match value {
        toml::Value::Table(table) => {
            for (key, value) in table {
                let key = if prefix.is_empty() {
                    key.clone()
                } else {
                    format!("{prefix}.{key}")
                };
                walk(key, value, out);
            }
        }
        toml::Value::Array(items)
            if items.iter().all(toml::Value::is_table) && !items.is_empty() =>
        {
            for (i, item) in items.iter().enumerate() {
                walk(format!("{prefix}[{i}]"), item, out);
            }
        }
        toml::Value::String(text) => out.push((prefix, text.clone())),
        other => out.push((prefix, other.to_string())),
    }
}
