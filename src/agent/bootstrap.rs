//! `pgvigil agent --init`: when the data directory is empty, create the cluster (a primary
//! with initdb, or a standby copied from `--source` with pg_basebackup); then start the server.
//! The tools run as the data directory's owner, as the `local` driver runs them.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::node_control::{ControlError, Local, NodeControl, ServerState};

/// How often a standby-to-be retries its source.
const SOURCE_RETRY: Duration = Duration::from_secs(1);

/// The superuser `--init` creates and copies as.
const SUPERUSER: &str = "postgres";

/// Client authentication of a cluster made by `--init`: SCRAM from anywhere, trust over the
/// local socket (the server's OS user).
const PG_HBA: &str = "\
# Written by pgvigil agent --init.
local all all trust
local replication all trust
host all all 0.0.0.0/0 scram-sha-256
host all all ::/0 scram-sha-256
host replication all 0.0.0.0/0 scram-sha-256
host replication all ::/0 scram-sha-256
";

/// Settings for streaming replication and pg_rewind (`wal_log_hints`), appended to the
/// primary's `postgresql.conf` (standbys copy it). The short timeouts let a lost primary show
/// on its standbys within seconds (DESIGN.md, "One failover's way").
const SETTINGS: &str = "\
listen_addresses = '*'
wal_level = replica
hot_standby = on
wal_log_hints = on
max_wal_senders = 10
max_replication_slots = 10
wal_keep_size = '256MB'
wal_sender_timeout = '5s'
wal_receiver_timeout = '5s'
";

/// What the cluster is made as when the data directory is empty.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Init {
    /// initdb, the settings for replication, then `--init-sql`.
    Primary,
    /// pg_basebackup -R from `--source`.
    Standby,
}

/// What `--init` makes of an empty data directory.
#[derive(Debug)]
pub(super) enum Make {
    /// A primary, with SQL run once after its first start.
    Primary {
        /// `--init-sql`.
        init_sql: Option<PathBuf>,
    },
    /// A standby of `source`.
    Standby {
        /// `--source`: host and port.
        source: (String, u16),
        /// `--name`: the node's name in pgvigil, its application_name and slot.
        name: Option<String>,
    },
}

/// `--init` with what it needs, checked.
#[derive(Debug)]
pub(super) struct Plan {
    /// What to make.
    pub(super) make: Make,
    /// The server's port.
    pub(super) port: u16,
    /// The superuser's password.
    pub(super) password: String,
}

/// Creates the cluster if the data directory is empty, then starts the server if it is not
/// running.
pub(super) async fn prepare(local: &Local, plan: &Plan) -> Result<(), ControlError> {
    let fresh = is_empty(local.data_dir())?;
    if fresh {
        match &plan.make {
            Make::Primary { .. } => init_primary(local, plan).await?,
            Make::Standby { source, name } => {
                clone_standby(local, plan, source, name.as_deref()).await?;
            }
        }
    } else {
        info!(data_dir = %local.data_dir().display(), "agent: the data directory is there; using it as it is");
    }
    if local.state().await? == ServerState::Stopped {
        let output = local.start().await?;
        info!(%output, "agent: PostgreSQL started");
    }
    if let (
        true,
        Make::Primary {
            init_sql: Some(sql),
        },
    ) = (fresh, &plan.make)
    {
        run_init_sql(local, plan, sql).await?;
    }
    Ok(())
}

/// Whether `dir` is missing or has nothing in it.
fn is_empty(dir: &Path) -> Result<bool, ControlError> {
    match std::fs::read_dir(dir) {
        Ok(mut entries) => Ok(entries.next().is_none()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(true),
        Err(source) => Err(ControlError::Io {
            what: format!("reading {}", dir.display()),
            source,
        }),
    }
}

async fn init_primary(local: &Local, plan: &Plan) -> Result<(), ControlError> {
    let owner = local.owner();
    let dir = local.data_dir().to_string_lossy().into_owned();
    let pwfile = SecretFile::new(local, "password", &plan.password)?;
    let pwfile_arg = format!("--pwfile={}", pwfile.path.display());
    let args = [
        "-D",
        &dir,
        "-U",
        SUPERUSER,
        &pwfile_arg,
        "--auth-local=trust",
        "--auth-host=scram-sha-256",
        "-E",
        "UTF8",
        "--locale=C",
    ];
    let output = local.run("initdb", &args, &[], owner).await?;
    drop(pwfile);
    info!(%output, "agent: initdb done");
    local.write_file("pg_hba.conf", PG_HBA, owner)?;
    let conf = read(local, "postgresql.conf")?;
    let text = format!(
        "{conf}\n# Written by pgvigil agent --init primary.\n{SETTINGS}port = {}\n",
        plan.port
    );
    local.write_file("postgresql.conf", &text, owner)
}

/// Waits until the source accepts connections and copies it (retrying until the timeout:
/// a primary being created at the same time may not let us in at once).
async fn clone_standby(
    local: &Local,
    plan: &Plan,
    (host, port): &(String, u16),
    name: Option<&str>,
) -> Result<(), ControlError> {
    let owner = local.owner();
    let port = port.to_string();
    let dir = local.data_dir().to_string_lossy().into_owned();
    let mut conninfo = format!("host={host} port={port} user={SUPERUSER} connect_timeout=5");
    // -R writes it into primary_conninfo, and the slot into primary_slot_name.
    let slot = name.map(crate::failover::slot_name);
    if let Some(name) = name {
        conninfo.push_str(&format!(" application_name={name}"));
    }
    let deadline = Instant::now() + local.timeout();
    loop {
        let ping = ["-h", host.as_str(), "-p", &port, "-t", "2"];
        let copied = match local.run("pg_isready", &ping, &[], owner).await {
            Ok(_) => copy(local, plan, &dir, &conninfo, slot.as_deref()).await,
            Err(e) => Err(e),
        };
        match copied {
            Ok(output) => {
                info!(%output, source = %host, "agent: pg_basebackup done");
                break;
            }
            Err(e) if Instant::now() < deadline => {
                warn!(error = %e, source = %host, "agent: the source is not ready; retrying");
                tokio::time::sleep(SOURCE_RETRY).await;
            }
            Err(e) => return Err(e),
        }
    }
    // A data directory that existed empty (a volume) keeps its mode through pg_basebackup,
    // and the server refuses to start unless only its owner (and group) may enter it.
    let mode = std::os::unix::fs::PermissionsExt::from_mode(0o700);
    std::fs::set_permissions(local.data_dir(), mode).map_err(|source| ControlError::Io {
        what: format!("chmod 0700 {}", local.data_dir().display()),
        source,
    })?;
    // pg_basebackup copied the primary's postgresql.conf, port included; this node's own
    // port goes where it wins, after the primary_conninfo -R wrote.
    let auto = read(local, "postgresql.auto.conf")?;
    let text = format!(
        "{auto}# Written by pgvigil agent --init standby.\nport = {}\n",
        plan.port
    );
    local.write_file("postgresql.auto.conf", &text, owner)
}

/// Creates `slot` on the source if it is not there, then takes the copy through it.
async fn copy(
    local: &Local,
    plan: &Plan,
    dir: &str,
    conninfo: &str,
    slot: Option<&str>,
) -> Result<String, ControlError> {
    let env = [("PGPASSWORD", plan.password.as_str())];
    let mut args = vec![
        "-D", dir, "-d", conninfo, "-R", "-X", "stream", "-c", "fast",
    ];
    if let Some(slot) = slot {
        // A slot name holds only lowercase letters, digits and '_': no quoting needed.
        let sql = format!(
            "SELECT pg_create_physical_replication_slot('{slot}') WHERE NOT EXISTS \
             (SELECT 1 FROM pg_replication_slots WHERE slot_name = '{slot}')"
        );
        let create = [
            "-X",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            conninfo,
            "-c",
            &sql,
        ];
        local.run("psql", &create, &env, local.owner()).await?;
        args.extend(["-S", slot]);
    }
    local.run("pg_basebackup", &args, &env, local.owner()).await
}

async fn run_init_sql(local: &Local, plan: &Plan, sql: &Path) -> Result<(), ControlError> {
    let text = std::fs::read_to_string(sql).map_err(|source| ControlError::Io {
        what: format!("reading --init-sql {}", sql.display()),
        source,
    })?;
    // A copy the server's OS user can read, whoever may read the original.
    let copy = SecretFile::new(local, "init.sql", &text)?;
    let file = copy.path.to_string_lossy().into_owned();
    let port = plan.port.to_string();
    let args = [
        "-X",
        "-q",
        "-v",
        "ON_ERROR_STOP=1",
        "-h",
        "127.0.0.1",
        "-p",
        &port,
        "-U",
        SUPERUSER,
        "-d",
        "postgres",
        "-f",
        &file,
    ];
    let env = [("PGPASSWORD", plan.password.as_str())];
    let output = local.run("psql", &args, &env, local.owner()).await?;
    info!(%output, sql = %sql.display(), "agent: --init-sql done");
    Ok(())
}

fn read(local: &Local, name: &str) -> Result<String, ControlError> {
    let path = local.data_dir().join(name);
    std::fs::read_to_string(&path).map_err(|source| ControlError::Io {
        what: format!("reading {}", path.display()),
        source,
    })
}

/// A file only the server's OS user can read, removed when dropped.
struct SecretFile {
    path: PathBuf,
}

impl SecretFile {
    fn new(local: &Local, what: &str, text: &str) -> Result<SecretFile, ControlError> {
        let path =
            std::env::temp_dir().join(format!("pgvigil-agent-{}-{what}", std::process::id()));
        let io = |source| ControlError::Io {
            what: format!("writing {}", path.display()),
            source,
        };
        let _ = std::fs::remove_file(&path);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(io)?;
        file.write_all(text.as_bytes()).map_err(io)?;
        if let Some(owner) = local.owner() {
            std::os::unix::fs::chown(&path, Some(owner.uid), Some(owner.gid)).map_err(io)?;
        }
        Ok(SecretFile { path })
    }
}

impl Drop for SecretFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
