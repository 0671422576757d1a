//! The configuration files every node gets.
//!
//! `postgresql.conf` ends with two includes: `pgvigil.conf` (settings shared by the whole cluster)
//! and `node.conf` (this node's port and name). pg_basebackup and pg_rewind copy both from the
//! source node, so `node.conf` is rewritten before every start.

use std::fmt::Write as _;
use std::fs::OpenOptions;
use std::io::Write as _;
use std::path::Path;

use super::os_user::{self, OsUser};
use super::ClusterError;

/// File name of the cluster-wide settings, included from postgresql.conf.
const SHARED_FILE: &str = "pgvigil.conf";

/// File name of the per-node settings, included last so they win.
const NODE_FILE: &str = "node.conf";

/// Client authentication for every node.
///
/// `app_md5` gets an `md5` line because a `scram-sha-256` line refuses users whose stored
/// password is an md5 hash; everyone else must use SCRAM over TCP.
const PG_HBA: &str = "\
local all all trust
host all postgres 127.0.0.1/32 trust
host all postgres ::1/128 trust
host replication all 127.0.0.1/32 trust
host replication all ::1/128 trust
host all app_md5 127.0.0.1/32 md5
host all app_md5 ::1/128 md5
host all all 127.0.0.1/32 scram-sha-256
host all all ::1/128 scram-sha-256
";

/// What the cluster-wide settings depend on.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SharedSettings<'a> {
    /// Directory of the Unix sockets (the cluster's base dir).
    pub(crate) socket_dir: &'a Path,
    /// Trade durability for speed (`fsync=off`): tests only.
    pub(crate) fast: bool,
    /// Make commits wait for one standby.
    pub(crate) sync_replication: bool,
    /// Caller's extra `name = value` lines, written after ours.
    pub(crate) extra: &'a [(String, String)],
    /// Serve TLS with the data dir's server.crt and server.key.
    pub(crate) tls: bool,
}

/// Writes pg_hba.conf, the shared settings and the includes into a fresh data dir.
pub(crate) fn configure_new_data_dir(
    data_dir: &Path,
    shared: &SharedSettings<'_>,
    owner: Option<OsUser>,
) -> Result<(), ClusterError> {
    write_owned(&data_dir.join("pg_hba.conf"), PG_HBA, owner)?;
    write_shared(data_dir, shared, owner)?;
    let includes = format!("\ninclude '{SHARED_FILE}'\ninclude '{NODE_FILE}'\n");
    let conf = data_dir.join("postgresql.conf");
    OpenOptions::new()
        .append(true)
        .open(&conf)
        .and_then(|mut file| file.write_all(includes.as_bytes()))
        .map_err(|e| ClusterError::io(format!("appending to {}", conf.display()), e))
}

/// (Re)writes the cluster-wide settings of one node.
pub(crate) fn write_shared(
    data_dir: &Path,
    shared: &SharedSettings<'_>,
    owner: Option<OsUser>,
) -> Result<(), ClusterError> {
    write_owned(&data_dir.join(SHARED_FILE), &shared_text(shared), owner)
}

/// (Re)writes a node's own port and name.
pub(crate) fn write_node(
    data_dir: &Path,
    name: &str,
    port: u16,
    owner: Option<OsUser>,
) -> Result<(), ClusterError> {
    let text = format!("port = {port}\ncluster_name = {}\n", quote(name));
    write_owned(&data_dir.join(NODE_FILE), &text, owner)
}

fn shared_text(shared: &SharedSettings<'_>) -> String {
    let socket_dir = shared.socket_dir.to_string_lossy();
    let mut settings: Vec<(&str, &str)> = vec![
        ("listen_addresses", "127.0.0.1"),
        ("unix_socket_directories", &socket_dir),
        ("wal_level", "replica"),
        ("max_wal_senders", "10"),
        ("max_replication_slots", "10"),
        ("wal_log_hints", "on"),
        ("hot_standby", "on"),
        ("hot_standby_feedback", "on"),
        ("wal_keep_size", "256MB"),
        // A vanished primary must show up on its standbys within seconds, not the default 60 s
        // (see DESIGN.md, "One failover's way").
        ("wal_receiver_timeout", "2s"),
        ("wal_sender_timeout", "5s"),
        ("wal_receiver_status_interval", "1s"),
        // A standby repointed after a failover reconnects within a second, not five.
        ("wal_retrieve_retry_interval", "1s"),
        ("max_connections", "200"),
        ("shared_buffers", "32MB"),
        ("log_line_prefix", "%m [%p] "),
    ];
    if shared.fast {
        settings.push(("fsync", "off"));
    }
    if shared.sync_replication {
        settings.push(("synchronous_standby_names", "*"));
    }
    if shared.tls {
        settings.push(("ssl", "on"));
    }
    let extra = shared.extra.iter().map(|(k, v)| (k.as_str(), v.as_str()));
    let mut text = String::from("# Written by pgvigil's local cluster builder.\n");
    for (name, value) in settings.into_iter().chain(extra) {
        // Writing to a String cannot fail.
        let _ = writeln!(text, "{name} = {}", quote(value));
    }
    text
}

/// A postgresql.conf string literal: single quotes, embedded quotes doubled.
fn quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

fn write_owned(path: &Path, text: &str, owner: Option<OsUser>) -> Result<(), ClusterError> {
    std::fs::write(path, text)
        .map_err(|e| ClusterError::io(format!("writing {}", path.display()), e))?;
    // Tools that run as the server user (pg_rewind) must be able to overwrite it.
    os_user::give_to(owner, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared<'a>(extra: &'a [(String, String)], sync: bool) -> SharedSettings<'a> {
        SharedSettings {
            socket_dir: Path::new("/tmp/x"),
            fast: true,
            sync_replication: sync,
            extra,
            tls: false,
        }
    }

    #[test]
    fn quotes_are_doubled() {
        assert_eq!(quote("it's"), "'it''s'");
        assert_eq!(quote("%m [%p] "), "'%m [%p] '");
    }

    #[test]
    fn sync_standby_names_only_when_asked() {
        assert!(!shared_text(&shared(&[], false)).contains("synchronous_standby_names"));
        assert!(shared_text(&shared(&[], true)).contains("synchronous_standby_names = '*'"));
    }

    #[test]
    fn extra_settings_come_last() {
        let extra = [("work_mem".to_owned(), "8MB".to_owned())];
        let text = shared_text(&shared(&extra, false));
        assert!(text.ends_with("work_mem = '8MB'\n"), "{text}");
        assert!(text.contains("unix_socket_directories = '/tmp/x'\n"));
        assert!(text.contains("fsync = 'off'\n"));
    }
}
