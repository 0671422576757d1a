//! A real PostgreSQL cluster on this machine: a primary and N streaming replicas.
//!
//! Used by `pgvigil demo` and by every integration test. Built with initdb and pg_basebackup,
//! run as plain child processes (no pg_ctl daemon mode, no Docker) so that kill, freeze and
//! restart act on exact pids, and torn down on drop, even while a test panics.
//! Everything here is blocking: a cluster takes seconds to build and tests call it directly.

mod conf;
mod node;
mod os_user;
mod ports;
mod process;
mod setup;
pub(crate) mod tools;

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use node::LocalNode;

/// A free loopback port no other node or fixture of this process was given (for other servers
/// the tests start beside the cluster, such as etcd).
pub fn free_port() -> Result<u16, ClusterError> {
    ports::reserve(None)
}

/// The directory of this host's PostgreSQL binaries: `pg_config --bindir` if it holds a server,
/// else the newest `/usr/lib/postgresql/*/bin`.
pub fn postgres_bin_dir() -> Option<PathBuf> {
    tools::find_bin_dir()
}

use conf::SharedSettings;
use node::Shutdown;
use tools::PgTools;

/// Login role with a SCRAM-SHA-256 password, owner of [`APP_DB`].
pub const APP_USER: &str = "app";
/// Password of [`APP_USER`].
pub const APP_PASSWORD: &str = "app-secret";
/// Database owned by [`APP_USER`].
pub const APP_DB: &str = "app";
/// Login role whose password is stored as an md5 hash.
pub const MD5_USER: &str = "app_md5";
/// Password of [`MD5_USER`].
pub const MD5_PASSWORD: &str = "md5-secret";
/// Superuser pgvigil probes and fails over as (SCRAM password).
pub const ADMIN_USER: &str = "pgvigil_admin";
/// Password of [`ADMIN_USER`].
pub const ADMIN_PASSWORD: &str = "admin-secret";

/// Longest Unix socket path the kernel accepts (`sun_path` is 108 bytes with the NUL).
const MAX_SOCKET_PATH: usize = 107;

/// Why a cluster could not be built or driven.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// No PostgreSQL installation was found.
    #[error(
        "PostgreSQL server binaries not found: install postgresql (apt-get install postgresql) \
         or put pg_config on PATH"
    )]
    BinariesNotFound,
    /// The spec cannot work.
    #[error("invalid cluster spec: {0}")]
    Spec(String),
    /// A file or process operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What we were doing.
        context: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A PostgreSQL tool exited with an error.
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        /// The command line.
        command: String,
        /// Its exit status.
        status: String,
        /// What it printed on stderr.
        stderr: String,
    },
    /// The unprivileged user could not be found or created.
    #[error("cannot run PostgreSQL as an unprivileged user: {0}")]
    User(String),
    /// No free loopback port was found.
    #[error("no free TCP port on 127.0.0.1")]
    NoFreePort,
    /// A server exited while starting.
    #[error("{node} exited during startup ({status}); last lines of its log:\n{log_tail}")]
    Exited {
        /// Node name.
        node: String,
        /// Its exit status.
        status: String,
        /// The end of its log.
        log_tail: String,
    },
    /// A server did not accept connections in time.
    #[error(
        "{node} did not accept connections within {seconds} s; last lines of its log:\n{log_tail}"
    )]
    NotReady {
        /// Node name.
        node: String,
        /// The deadline.
        seconds: u64,
        /// The end of its log.
        log_tail: String,
    },
    /// Replication did not reach the expected state in time.
    #[error("expected {expected} {what} within {seconds} s, saw {seen}")]
    ReplicationTimeout {
        /// What was counted.
        what: &'static str,
        /// How many we wanted.
        expected: usize,
        /// How many there were at the deadline.
        seen: usize,
        /// The deadline.
        seconds: u64,
    },
    /// A node index out of range.
    #[error("no node {0} in this cluster")]
    NoSuchNode(usize),
}

impl ClusterError {
    fn io(context: impl Into<String>, source: io::Error) -> Self {
        ClusterError::Io {
            context: context.into(),
            source,
        }
    }
}

/// What to build.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    /// Number of streaming replicas besides the primary.
    pub replicas: usize,
    /// Directory holding data dirs, logs and sockets; must be absent or empty, and is removed
    /// when the cluster is dropped. Keep it short: Unix socket paths are limited to 107 bytes.
    pub base_dir: PathBuf,
    /// Commits wait for one standby (`synchronous_standby_names = '*'`).
    pub sync_replication: bool,
    /// Extra postgresql.conf settings, `(name, unquoted value)`, applied after ours.
    pub extra_conf: Vec<(String, String)>,
    /// Give nodes the first free ports from here up (the demo uses 5432); `None`: any free port.
    pub first_port: Option<u16>,
    /// `fsync=off` and no syncing in initdb/pg_basebackup: fast but unsafe, for tests only.
    pub fast: bool,
    /// PEM certificate and key the nodes serve TLS with (`ssl = on`); `None`: no TLS.
    pub tls: Option<(PathBuf, PathBuf)>,
}

impl ClusterSpec {
    /// Two asynchronous replicas, durable settings, any free ports.
    pub fn new(base_dir: impl Into<PathBuf>) -> Self {
        ClusterSpec {
            replicas: 2,
            base_dir: base_dir.into(),
            sync_replication: false,
            extra_conf: Vec::new(),
            first_port: None,
            fast: false,
            tls: None,
        }
    }

    /// Sets the number of replicas.
    pub fn replicas(mut self, replicas: usize) -> Self {
        self.replicas = replicas;
        self
    }

    /// Turns synchronous replication on or off.
    pub fn sync_replication(mut self, on: bool) -> Self {
        self.sync_replication = on;
        self
    }

    /// Adds a postgresql.conf setting (value unquoted).
    pub fn conf(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.extra_conf.push((name.into(), value.into()));
        self
    }

    /// Prefers ports from `port` upwards.
    pub fn first_port(mut self, port: u16) -> Self {
        self.first_port = Some(port);
        self
    }

    /// Chooses speed over durability (tests) or not (demo).
    pub fn fast(mut self, fast: bool) -> Self {
        self.fast = fast;
        self
    }

    /// Serves TLS on every node with this PEM certificate and key.
    pub fn tls(mut self, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        self.tls = Some((cert.into(), key.into()));
        self
    }

    fn shared_settings(&self, sync_replication: bool) -> SharedSettings<'_> {
        SharedSettings {
            socket_dir: &self.base_dir,
            fast: self.fast,
            sync_replication,
            extra: &self.extra_conf,
            tls: self.tls.is_some(),
        }
    }

    fn validate(&self) -> Result<(), ClusterError> {
        if self.sync_replication && self.replicas == 0 {
            return Err(ClusterError::Spec(
                "sync_replication needs at least one replica, or every commit would hang".into(),
            ));
        }
        let socket = self.base_dir.join(".s.PGSQL.65535");
        if socket.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(ClusterError::Spec(format!(
                "base dir {} is too long for a Unix socket path (max {MAX_SOCKET_PATH} bytes)",
                self.base_dir.display()
            )));
        }
        if !self.base_dir.is_absolute() {
            return Err(ClusterError::Spec(format!(
                "base dir {} must be an absolute path",
                self.base_dir.display()
            )));
        }
        Ok(())
    }
}

/// A running primary with its replicas; stopped and deleted on drop.
#[derive(Debug)]
pub struct LocalCluster {
    base_dir: PathBuf,
    tools: Arc<PgTools>,
    nodes: Vec<LocalNode>,
    /// The spec's `fast`, for nodes cloned again later.
    fast: bool,
}

impl LocalCluster {
    /// Builds and starts the cluster, returning once every replica streams (and, with
    /// `sync_replication`, one is synchronous). A failure part-way tears down what was built.
    pub fn start(spec: ClusterSpec) -> Result<LocalCluster, ClusterError> {
        spec.validate()?;
        let tools = Arc::new(PgTools::discover(&spec.base_dir)?);
        refuse_non_empty(&spec.base_dir)?;
        std::fs::create_dir_all(&spec.base_dir)
            .map_err(|e| ClusterError::io(format!("creating {}", spec.base_dir.display()), e))?;
        // From here on, dropping `cluster` (also on `?`) stops nodes and removes the base dir.
        let mut cluster = LocalCluster {
            base_dir: spec.base_dir.clone(),
            tools,
            nodes: Vec::with_capacity(spec.replicas + 1),
            fast: spec.fast,
        };
        cluster.hand_base_dir_to_server_user()?;
        cluster.start_primary(&spec)?;
        for _ in 0..spec.replicas {
            cluster.add_replica(&spec)?;
        }
        let primary = cluster.node_checked(0)?;
        setup::wait_streaming(primary, spec.replicas)?;
        if spec.sync_replication {
            cluster.enable_sync_replication(&spec)?;
        }
        Ok(cluster)
    }

    /// All nodes; index 0 is the primary the cluster was created with.
    pub fn nodes(&self) -> &[LocalNode] {
        &self.nodes
    }

    /// Node `i`.
    ///
    /// # Panics
    /// If `i` is not below `nodes().len()` (a bug in the calling test).
    pub fn node(&self, i: usize) -> &LocalNode {
        &self.nodes[i]
    }

    /// Node `i`, mutably (to kill, freeze, stop or start it).
    ///
    /// # Panics
    /// If `i` is not below `nodes().len()` (a bug in the calling test).
    pub fn node_mut(&mut self, i: usize) -> &mut LocalNode {
        &mut self.nodes[i]
    }

    /// Directory of the PostgreSQL binaries in use (for pg_rewind, pgbench, ...).
    pub fn bin_dir(&self) -> &Path {
        self.tools.bin_dir()
    }

    /// The directory holding data dirs, logs and Unix sockets.
    pub fn base_dir(&self) -> &Path {
        &self.base_dir
    }

    /// Runs `sql` on node `node` as superuser `postgres`; returns psql's trimmed output.
    pub fn psql(&self, node: usize, sql: &str) -> Result<String, ClusterError> {
        self.node_checked(node)?.psql(sql)
    }

    /// Runs `sql` on node `node` as superuser `postgres` in database `db`.
    pub fn psql_in(&self, node: usize, db: &str, sql: &str) -> Result<String, ClusterError> {
        self.node_checked(node)?.psql_in(db, sql)
    }

    /// Stops every node at once (immediate shutdown, SIGKILL after 5 s); data dirs stay.
    pub fn stop(&mut self) {
        // Signal all first so the grace periods overlap instead of adding up.
        for node in &self.nodes {
            node.signal_immediate();
        }
        for node in &mut self.nodes {
            node.shutdown(Shutdown::Immediate);
        }
    }

    /// Makes node `node` a fresh streaming standby of node `source`: stops it, deletes its data
    /// dir, clones `source` with pg_basebackup (through a slot named after the node, created when
    /// missing) and starts it. The way back for a failed or fenced primary until pgvigil has a
    /// failback command; the node keeps its name and port.
    pub fn reclone(&mut self, node: usize, source: usize) -> Result<(), ClusterError> {
        if node == source {
            return Err(ClusterError::Spec(format!(
                "node {node} cannot be cloned from itself"
            )));
        }
        self.node_checked(source)?;
        let target = self
            .nodes
            .get_mut(node)
            .ok_or(ClusterError::NoSuchNode(node))?;
        target.shutdown(Shutdown::Immediate);
        if target.data_dir.exists() {
            std::fs::remove_dir_all(&target.data_dir).map_err(|e| {
                ClusterError::io(format!("deleting {}", target.data_dir.display()), e)
            })?;
        }
        setup::clone_replica(&self.nodes[source], &self.nodes[node], self.fast)?;
        self.nodes[node].start()
    }

    /// The server user must own the base dir: it creates data dirs and sockets there.
    fn hand_base_dir_to_server_user(&self) -> Result<(), ClusterError> {
        let mode = std::fs::Permissions::from_mode(0o700);
        std::fs::set_permissions(&self.base_dir, mode)
            .map_err(|e| ClusterError::io(format!("chmod 0700 {}", self.base_dir.display()), e))?;
        os_user::give_to(self.tools.run_as(), &self.base_dir)
    }

    fn node_checked(&self, i: usize) -> Result<&LocalNode, ClusterError> {
        self.nodes.get(i).ok_or(ClusterError::NoSuchNode(i))
    }

    fn new_node(&self, spec: &ClusterSpec) -> Result<LocalNode, ClusterError> {
        let name = format!("pg{}", self.nodes.len() + 1);
        let port = ports::reserve(spec.first_port)?;
        Ok(LocalNode::new(
            name,
            port,
            &self.base_dir,
            Arc::clone(&self.tools),
        ))
    }

    fn start_primary(&mut self, spec: &ClusterSpec) -> Result<(), ClusterError> {
        let node = self.new_node(spec)?;
        setup::init_primary(&node, &spec.shared_settings(false))?;
        if let Some((cert, key)) = &spec.tls {
            setup::install_tls_files(&node, cert, key)?;
        }
        self.nodes.push(node);
        let primary = self.nodes.last_mut().ok_or(ClusterError::NoSuchNode(0))?;
        setup::start_new_node(primary)?;
        setup::create_roles(primary)
    }

    fn add_replica(&mut self, spec: &ClusterSpec) -> Result<(), ClusterError> {
        let node = self.new_node(spec)?;
        setup::clone_replica(self.node_checked(0)?, &node, spec.fast)?;
        self.nodes.push(node);
        let index = self.nodes.len() - 1;
        setup::start_new_node(self.node_mut(index))
    }

    /// Turns synchronous replication on everywhere only now: had the primary been synchronous
    /// from the start, creating roles before any standby existed would have hung.
    fn enable_sync_replication(&self, spec: &ClusterSpec) -> Result<(), ClusterError> {
        let shared = spec.shared_settings(true);
        for node in &self.nodes {
            conf::write_shared(&node.data_dir, &shared, self.tools.run_as())?;
            node.psql("SELECT pg_reload_conf()")?;
        }
        setup::wait_sync_standby(self.node_checked(0)?)
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        self.stop();
        if let Err(e) = std::fs::remove_dir_all(&self.base_dir) {
            tracing::warn!(dir = %self.base_dir.display(), error = %e, "could not remove cluster dir");
        }
    }
}

/// Refuses a non-empty base dir: Drop deletes it, and it may hold someone's data.
fn refuse_non_empty(dir: &Path) -> Result<(), ClusterError> {
    let non_empty = std::fs::read_dir(dir).is_ok_and(|mut entries| entries.next().is_some());
    if non_empty {
        return Err(ClusterError::Spec(format!(
            "base dir {} is not empty (it is deleted when the cluster stops)",
            dir.display()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rejected(spec: &ClusterSpec) -> bool {
        matches!(spec.validate(), Err(ClusterError::Spec(_)))
    }

    #[test]
    fn spec_defaults_suit_the_demo() {
        let spec = ClusterSpec::new("/tmp/c");
        assert_eq!(
            (spec.replicas, spec.sync_replication, spec.fast),
            (2, false, false)
        );
        assert!(spec.validate().is_ok());
    }

    #[test]
    fn unusable_specs_are_rejected() {
        assert!(rejected(
            &ClusterSpec::new("/tmp/c")
                .replicas(0)
                .sync_replication(true)
        ));
        assert!(rejected(&ClusterSpec::new("relative/dir")));
        assert!(rejected(&ClusterSpec::new(format!(
            "/tmp/{}",
            "x".repeat(100)
        ))));
    }

    #[test]
    fn non_empty_base_dir_is_refused() {
        let dir = std::env::temp_dir().join(format!("pgvigil-unit-{}", std::process::id()));
        let file = dir.join("keep-me");
        std::fs::create_dir_all(&dir)
            .and_then(|()| std::fs::write(&file, b"data"))
            .ok();
        let result = LocalCluster::start(ClusterSpec::new(&dir).replicas(0));
        assert!(matches!(result, Err(ClusterError::Spec(_))), "{result:?}");
        assert!(file.exists(), "the caller's file was deleted");
        std::fs::remove_dir_all(&dir).ok();
    }
}
