//! One PostgreSQL server of a local cluster: a `postgres -D DIR` child process we signal by pid.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::tools::PgTools;
use super::{conf, os_user, process, ClusterError};

/// How long a node may take to accept connections after it is started.
const READY_DEADLINE: Duration = Duration::from_secs(60);

/// How often readiness is probed.
const READY_POLL: Duration = Duration::from_millis(100);

/// How many log lines a startup error quotes.
const LOG_TAIL_LINES: usize = 30;

/// What we hold of the server process.
#[derive(Debug)]
enum NodeState {
    Stopped,
    Running(Child),
    /// Postmaster and children are SIGSTOPped.
    Frozen(Child),
}

/// How to ask the postmaster to stop, and how long to wait before SIGKILL.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Shutdown {
    /// SIGINT: abort transactions, checkpoint, exit cleanly.
    Fast,
    /// SIGQUIT: exit at once; crash recovery on next start.
    Immediate,
}

impl Shutdown {
    fn signal(self) -> libc::c_int {
        match self {
            Shutdown::Fast => libc::SIGINT,
            Shutdown::Immediate => libc::SIGQUIT,
        }
    }

    fn grace(self) -> Duration {
        match self {
            Shutdown::Fast => Duration::from_secs(15),
            Shutdown::Immediate => Duration::from_secs(5),
        }
    }
}

/// One server of a [`LocalCluster`](super::LocalCluster).
#[derive(Debug)]
pub struct LocalNode {
    /// "pg1" (the first primary), "pg2", ...; also its `cluster_name` and replication slot.
    pub name: String,
    /// TCP port on 127.0.0.1.
    pub port: u16,
    /// The data directory.
    pub data_dir: PathBuf,
    log_path: PathBuf,
    tools: Arc<PgTools>,
    state: NodeState,
}

impl LocalNode {
    pub(crate) fn new(name: String, port: u16, base_dir: &Path, tools: Arc<PgTools>) -> Self {
        LocalNode {
            data_dir: base_dir.join(&name),
            log_path: base_dir.join(format!("{name}.log")),
            name,
            port,
            tools,
            state: NodeState::Stopped,
        }
    }

    /// Pid of the postmaster while we consider it started (running or frozen).
    pub fn pid(&self) -> Option<u32> {
        match &self.state {
            NodeState::Stopped => None,
            NodeState::Running(child) | NodeState::Frozen(child) => Some(child.id()),
        }
    }

    /// Whether the postmaster process exists (a frozen one counts).
    pub fn is_running(&self) -> bool {
        self.pid().is_some_and(process::is_alive)
    }

    /// SIGKILLs the postmaster and its children: the port refuses connections at once.
    pub fn kill9(&mut self) {
        if let NodeState::Running(mut child) | NodeState::Frozen(mut child) =
            std::mem::replace(&mut self.state, NodeState::Stopped)
        {
            process::kill_tree(&mut child);
        }
    }

    /// SIGSTOPs the postmaster and all its children: connections hang instead of failing.
    pub fn freeze(&mut self) {
        if let NodeState::Running(child) = std::mem::replace(&mut self.state, NodeState::Stopped) {
            let pid = child.id();
            // The postmaster first: once it is stopped it cannot fork new children behind us.
            process::send(pid, libc::SIGSTOP);
            for c in process::children_of(pid) {
                process::send(c, libc::SIGSTOP);
            }
            self.state = NodeState::Frozen(child);
        }
    }

    /// SIGCONTs what [`freeze`](Self::freeze) stopped.
    pub fn thaw(&mut self) {
        if let NodeState::Frozen(child) = std::mem::replace(&mut self.state, NodeState::Stopped) {
            continue_tree(child.id());
            self.state = NodeState::Running(child);
        }
    }

    /// Fast shutdown with a bounded wait, then SIGKILL.
    pub fn stop(&mut self) {
        self.shutdown(Shutdown::Fast);
    }

    /// Starts the server on its data dir and port and waits until it accepts connections.
    ///
    /// A running node is left alone; a frozen one is thawed.
    pub fn start(&mut self) -> Result<(), ClusterError> {
        match &self.state {
            NodeState::Frozen(_) => {
                self.thaw();
                return Ok(());
            }
            NodeState::Running(_) if self.is_running() => return Ok(()),
            NodeState::Running(_) | NodeState::Stopped => self.shutdown(Shutdown::Immediate),
        }
        // The port and name may have been overwritten by pg_basebackup or pg_rewind.
        conf::write_node(&self.data_dir, &self.name, self.port, self.tools.run_as())?;
        self.spawn()?;
        self.wait_ready()
    }

    /// libpq connection string for this node over TCP.
    pub fn conninfo(&self, user: &str, password: &str, db: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user={} password={} dbname={}",
            self.port,
            conninfo_value(user),
            conninfo_value(password),
            conninfo_value(db)
        )
    }

    /// File receiving the server's stdout and stderr (appended across restarts).
    pub fn log_path(&self) -> PathBuf {
        self.log_path.clone()
    }

    /// Runs `sql` with psql as superuser `postgres` and returns the trimmed unaligned output.
    pub fn psql(&self, sql: &str) -> Result<String, ClusterError> {
        self.psql_in("postgres", sql)
    }

    /// Runs `sql` with psql as superuser `postgres` in database `db`; returns the trimmed
    /// unaligned output.
    pub fn psql_in(&self, db: &str, sql: &str) -> Result<String, ClusterError> {
        let port = self.port.to_string();
        let args = ["-X", "-A", "-t", "-h", "127.0.0.1", "-p", &port];
        let out = self.tools.run(
            "psql",
            args.into_iter()
                .chain(["-U", "postgres", "-d", db, "-c", sql]),
        )?;
        Ok(out.trim().to_owned())
    }

    /// Stops the server with `mode`, SIGKILLing it (and its children) if it outlives the grace.
    pub(crate) fn shutdown(&mut self, mode: Shutdown) {
        let mut child = match std::mem::replace(&mut self.state, NodeState::Stopped) {
            NodeState::Stopped => return,
            NodeState::Running(child) => child,
            NodeState::Frozen(child) => {
                // A stopped postmaster would never act on the shutdown signal.
                continue_tree(child.id());
                child
            }
        };
        if process::wait_exit(&mut child, Duration::ZERO) {
            return;
        }
        process::send(child.id(), mode.signal());
        if !process::wait_exit(&mut child, mode.grace()) {
            process::kill_tree(&mut child);
        }
    }

    /// Sends the first signal of an immediate shutdown without waiting (to stop many at once).
    pub(crate) fn signal_immediate(&self) {
        if let NodeState::Running(child) | NodeState::Frozen(child) = &self.state {
            continue_tree(child.id());
            process::send(child.id(), Shutdown::Immediate.signal());
        }
    }

    /// The last lines of the server log, for error messages.
    pub(crate) fn log_tail(&self) -> String {
        let bytes = std::fs::read(&self.log_path).unwrap_or_default();
        let text = String::from_utf8_lossy(&bytes);
        let lines: Vec<&str> = text.lines().collect();
        let first = lines.len().saturating_sub(LOG_TAIL_LINES);
        lines.get(first..).unwrap_or_default().join("\n")
    }

    /// Changes the port (before a start); used when another process took ours.
    pub(crate) fn set_port(&mut self, port: u16) {
        self.port = port;
    }

    pub(crate) fn tools(&self) -> &PgTools {
        &self.tools
    }

    fn spawn(&mut self) -> Result<(), ClusterError> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .map_err(|e| ClusterError::io(format!("opening {}", self.log_path.display()), e))?;
        os_user::give_to(self.tools.run_as(), &self.log_path)?;
        let log_err = log
            .try_clone()
            .map_err(|e| ClusterError::io("duplicating the log file handle", e))?;
        let child = self
            .tools
            .command("postgres")
            .arg("-D")
            .arg(&self.data_dir)
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err))
            .spawn()
            .map_err(|e| ClusterError::io(format!("starting postgres for {}", self.name), e))?;
        self.state = NodeState::Running(child);
        Ok(())
    }

    /// Polls `pg_isready` until the server accepts connections, it exits, or the deadline passes.
    fn wait_ready(&mut self) -> Result<(), ClusterError> {
        let deadline = Instant::now() + READY_DEADLINE;
        loop {
            if let NodeState::Running(child) = &mut self.state {
                if let Ok(Some(status)) = child.try_wait() {
                    self.state = NodeState::Stopped;
                    return Err(ClusterError::Exited {
                        node: self.name.clone(),
                        status: status.to_string(),
                        log_tail: self.log_tail(),
                    });
                }
            }
            if self.accepts_connections() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                self.shutdown(Shutdown::Immediate);
                return Err(ClusterError::NotReady {
                    node: self.name.clone(),
                    seconds: READY_DEADLINE.as_secs(),
                    log_tail: self.log_tail(),
                });
            }
            std::thread::sleep(READY_POLL);
        }
    }

    fn accepts_connections(&self) -> bool {
        let port = self.port.to_string();
        self.tools
            .command("pg_isready")
            .args(["-q", "-t", "1", "-h", "127.0.0.1", "-p", &port])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success())
    }
}

impl Drop for LocalNode {
    fn drop(&mut self) {
        self.shutdown(Shutdown::Immediate);
    }
}

/// SIGCONTs the children, then the postmaster.
fn continue_tree(pid: u32) {
    for c in process::children_of(pid) {
        process::send(c, libc::SIGCONT);
    }
    process::send(pid, libc::SIGCONT);
}

/// A libpq keyword value, quoted when it is empty or holds spaces, quotes or backslashes.
fn conninfo_value(value: &str) -> String {
    if !value.is_empty() && !value.contains([' ', '\'', '\\']) {
        return value.to_owned();
    }
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "\\'"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conninfo_values_are_quoted_only_when_needed() {
        assert_eq!(conninfo_value("app"), "app");
        assert_eq!(conninfo_value(""), "''");
        assert_eq!(conninfo_value("a b"), "'a b'");
        assert_eq!(conninfo_value(r"it's\"), r"'it\'s\\'");
    }
}
