//! The `local` driver: `pg_ctl`, `pg_rewind` and `pg_basebackup` on this host, run as the owner
//! of the node's data directory (PostgreSQL refuses to run as root), each bounded in time.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::process::Command;

use super::{ControlError, NodeControl, Output, OwnSettings, ServerState, Source};
use crate::config::NodeControlConfig;

/// Where `pg_ctl start` sends the server's output, inside the data directory (a rewind or
/// re-clone replaces it, which is fine: it only serves the start that wrote it).
const START_LOG: &str = "pgvigil-start.log";

/// Settings `make_standby` owns in `postgresql.auto.conf`: every line setting one of them is
/// replaced (`default_transaction_read_only` is the fence's, dropped for good).
const OWN_KEYS: [&str; 5] = [
    "port",
    "primary_conninfo",
    "primary_slot_name",
    "recovery_target_timeline",
    "default_transaction_read_only",
];

/// A node whose data directory is on this host.
#[derive(Debug, Clone)]
pub struct Local {
    data_dir: PathBuf,
    bin_dir: Option<PathBuf>,
    timeout: Duration,
}

/// Who runs the tools: the data directory's owner, when we are root and it is someone else.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Owner {
    /// User id.
    pub(crate) uid: u32,
    /// Group id.
    pub(crate) gid: u32,
}

impl Local {
    /// The driver for `config` (its `data_dir`, `bin_dir` and `timeout`).
    pub fn new(config: &NodeControlConfig) -> Local {
        Local {
            data_dir: config.data_dir.clone(),
            bin_dir: config.bin_dir.clone(),
            timeout: config.timeout,
        }
    }

    /// The data directory.
    pub(crate) fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The longest one action may take.
    pub(crate) fn timeout(&self) -> Duration {
        self.timeout
    }

    fn program(&self, name: &str) -> Result<PathBuf, ControlError> {
        let dir = match &self.bin_dir {
            Some(dir) => dir.clone(),
            None => crate::local_cluster::tools::find_bin_dir().ok_or(ControlError::NoBinaries)?,
        };
        Ok(dir.join(name))
    }

    /// The owner of the data directory (of its parent while it does not exist), when the
    /// tools must switch to it.
    pub(crate) fn owner(&self) -> Option<Owner> {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return None;
        }
        let meta = std::fs::metadata(&self.data_dir)
            .or_else(|_| std::fs::metadata(self.parent()))
            .ok()?;
        (meta.uid() != 0).then(|| Owner {
            uid: meta.uid(),
            gid: meta.gid(),
        })
    }

    fn parent(&self) -> &Path {
        self.data_dir.parent().unwrap_or(Path::new("/"))
    }

    /// Runs `program args` as `owner`, with a clean environment plus `env`, bounded by the
    /// timeout; its stdout and stderr together, or why it failed.
    pub(crate) async fn run(
        &self,
        program: &str,
        args: &[&str],
        env: &[(&str, &str)],
        owner: Option<Owner>,
    ) -> Result<Output, ControlError> {
        let path = self.program(program)?;
        let mut command = Command::new(&path);
        command
            .args(args)
            .current_dir(self.parent())
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("HOME", self.parent())
            .env("LC_ALL", "C")
            .env("LANG", "C")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if let Some(owner) = owner {
            command.uid(owner.uid).gid(owner.gid);
        }
        let spawn = |source| ControlError::Spawn {
            program: program.to_owned(),
            source,
        };
        let child = command.spawn().map_err(spawn)?;
        let output = tokio::time::timeout(self.timeout, child.wait_with_output())
            .await
            .map_err(|_| ControlError::Timeout {
                program: program.to_owned(),
                limit: self.timeout,
            })?
            .map_err(spawn)?;
        let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&output.stderr));
        let text = text.trim().to_owned();
        if output.status.success() {
            Ok(text)
        } else {
            Err(ControlError::Failed {
                program: program.to_owned(),
                status: output.status.to_string(),
                output: text,
            })
        }
    }

    fn data_dir_arg(&self) -> String {
        self.data_dir.to_string_lossy().into_owned()
    }

    fn timeout_secs(&self) -> String {
        self.timeout.as_secs().max(1).to_string()
    }

    /// Writes `text` to `name` in the data directory, owned by `owner`.
    pub(crate) fn write_file(
        &self,
        name: &str,
        text: &str,
        owner: Option<Owner>,
    ) -> Result<(), ControlError> {
        let path = self.data_dir.join(name);
        let io = |what: &str, source| ControlError::Io {
            what: format!("{what} {}", path.display()),
            source,
        };
        std::fs::write(&path, text).map_err(|e| io("writing", e))?;
        if let Some(owner) = owner {
            std::os::unix::fs::chown(&path, Some(owner.uid), Some(owner.gid))
                .map_err(|e| io("chown", e))?;
        }
        Ok(())
    }
}

/// libpq `key=value` pairs for `source` (the password travels in PGPASSWORD).
pub(super) fn source_conninfo(source: &Source) -> String {
    let quote = |v: &str| format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"));
    format!(
        "host={} port={} user={} dbname=postgres connect_timeout=10",
        quote(&source.host),
        source.port,
        quote(&source.user)
    )
}

/// `source`'s password as the environment passes it, plus no statement timeout.
fn source_env(source: &Source) -> Vec<(&str, &str)> {
    let mut env = vec![("PGOPTIONS", "-c statement_timeout=0")];
    if let Some(password) = &source.password {
        env.push(("PGPASSWORD", password.as_str()));
    }
    env
}

/// `postgresql.auto.conf` with every line setting one of `OWN_KEYS` dropped and `settings`
/// appended.
fn with_own_settings(auto_conf: &str, settings: &OwnSettings) -> String {
    let mut text: String = auto_conf
        .lines()
        .filter(|line| {
            let key = line
                .trim_start()
                .split(|c: char| c == '=' || c.is_whitespace())
                .next()
                .unwrap_or("");
            !OWN_KEYS.iter().any(|own| key.eq_ignore_ascii_case(own))
        })
        .map(|line| format!("{line}\n"))
        .collect();
    text.push_str(&standby_settings(settings));
    text
}

/// The lines of `postgresql.auto.conf` that make a node the standby `settings` describe.
pub(super) fn standby_settings(settings: &OwnSettings) -> String {
    let quote = |v: &str| format!("'{}'", v.replace('\'', "''"));
    format!(
        "# Written by pgvigil failback.\nport = {}\nprimary_conninfo = {}\nprimary_slot_name = {}\nrecovery_target_timeline = 'latest'\n",
        settings.port,
        quote(&settings.primary_conninfo),
        quote(&settings.primary_slot_name)
    )
}

impl Local {
    /// `pg_controldata`'s "Database cluster state" (`in production`, `in archive recovery`,
    /// `shut down`, ...), or `None` when the data directory has none.
    pub(crate) async fn cluster_state(&self) -> Result<Option<String>, ControlError> {
        if !self.data_dir.join("global/pg_control").exists() {
            return Ok(None);
        }
        let dir = self.data_dir_arg();
        let output = self
            .run("pg_controldata", &["-D", &dir], &[], self.owner())
            .await?;
        Ok(output
            .lines()
            .find_map(|line| line.strip_prefix("Database cluster state:"))
            .map(|state| state.trim().to_owned()))
    }
}

impl NodeControl for Local {
    async fn state(&self) -> Result<ServerState, ControlError> {
        let dir = self.data_dir_arg();
        match self
            .run("pg_ctl", &["status", "-D", &dir], &[], self.owner())
            .await
        {
            Ok(_) => Ok(ServerState::Running),
            // pg_ctl status: 3 when no server runs, 4 when there is no data directory.
            Err(ControlError::Failed { status, .. })
                if status.contains("exit status: 3") || status.contains("exit status: 4") =>
            {
                Ok(ServerState::Stopped)
            }
            Err(e) => Err(e),
        }
    }

    async fn stop(&self) -> Result<Output, ControlError> {
        let (dir, wait) = (self.data_dir_arg(), self.timeout_secs());
        let owner = self.owner();
        let fast = ["stop", "-D", &dir, "-m", "fast", "-w", "-t", &wait];
        match self.run("pg_ctl", &fast, &[], owner).await {
            Ok(output) => Ok(output),
            Err(_) => {
                let immediate = ["stop", "-D", &dir, "-m", "immediate", "-w", "-t", &wait];
                self.run("pg_ctl", &immediate, &[], owner).await
            }
        }
    }

    async fn start(&self) -> Result<Output, ControlError> {
        let (dir, wait) = (self.data_dir_arg(), self.timeout_secs());
        let log = self.data_dir.join(START_LOG).to_string_lossy().into_owned();
        let args = ["start", "-D", &dir, "-w", "-t", &wait, "-l", &log];
        self.run("pg_ctl", &args, &[], self.owner()).await
    }

    async fn rewind(&self, source: &Source) -> Result<Output, ControlError> {
        let dir = self.data_dir_arg();
        let server = format!("--source-server={}", source_conninfo(source));
        let args = ["-D", &dir, &server];
        self.run("pg_rewind", &args, &source_env(source), self.owner())
            .await
    }

    async fn reclone(&self, source: &Source) -> Result<Output, ControlError> {
        let owner = self.owner();
        let stamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let aside = PathBuf::from(format!("{}.pgvigil-old-{stamp}", self.data_dir.display()));
        if self.data_dir.exists() {
            std::fs::rename(&self.data_dir, &aside).map_err(|source| ControlError::Io {
                what: format!("moving {} aside", self.data_dir.display()),
                source,
            })?;
        }
        let (dir, conninfo) = (self.data_dir_arg(), source_conninfo(source));
        let args = ["-D", &dir, "-d", &conninfo, "-X", "stream", "-c", "fast"];
        let output = self
            .run("pg_basebackup", &args, &source_env(source), owner)
            .await?;
        Ok(format!(
            "{output}\nthe old data directory is kept as {}",
            aside.display()
        ))
    }

    async fn make_standby(&self, settings: &OwnSettings) -> Result<(), ControlError> {
        let owner = self.owner();
        let path = self.data_dir.join("postgresql.auto.conf");
        let current = std::fs::read_to_string(&path).unwrap_or_default();
        self.write_file(
            "postgresql.auto.conf",
            &with_own_settings(&current, settings),
            owner,
        )?;
        self.write_file("standby.signal", "", owner)?;
        match std::fs::remove_file(self.data_dir.join("recovery.signal")) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(ControlError::Io {
                what: "removing recovery.signal".into(),
                source,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_settings_replace_the_copied_ones_and_keep_the_rest() {
        let copied = "# Do not edit this file manually!\nprimary_conninfo = 'host=a port=1'\n\
                      wal_receiver_timeout = '3s'\nport=5433\ndefault_transaction_read_only = 'on'\n";
        let settings = OwnSettings {
            port: 5432,
            primary_conninfo: "host=b port=2 user=rep password='it''s'".into(),
            primary_slot_name: "pg1".into(),
        };
        let text = with_own_settings(copied, &settings);
        assert!(text.contains("wal_receiver_timeout = '3s'"), "{text}");
        assert!(!text.contains("host=a") && !text.contains("5433"), "{text}");
        assert!(!text.contains("default_transaction_read_only"), "{text}");
        assert!(text.contains("port = 5432\n"), "{text}");
        assert!(
            text.contains("primary_conninfo = 'host=b port=2 user=rep password=''it''''s'''"),
            "{text}"
        );
        assert!(text.contains("primary_slot_name = 'pg1'"), "{text}");
    }
}
