//! Finding the PostgreSQL binaries and running them as the right user, in a clean environment.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::os_user::{self, OsUser};
use super::ClusterError;

/// Where distribution packages (Debian/Ubuntu) install each major version's binaries.
const DISTRO_ROOT: &str = "/usr/lib/postgresql";

/// The PostgreSQL binaries of one installation and the identity to run them under.
#[derive(Debug)]
pub(crate) struct PgTools {
    bin_dir: PathBuf,
    run_as: Option<OsUser>,
    work_dir: PathBuf,
}

impl PgTools {
    /// Finds the server binaries and the user to run them as; commands run in `work_dir`.
    pub(crate) fn discover(work_dir: &Path) -> Result<Self, ClusterError> {
        let bin_dir = find_bin_dir().ok_or(ClusterError::BinariesNotFound)?;
        Ok(PgTools {
            bin_dir,
            run_as: os_user::server_user()?,
            work_dir: work_dir.to_path_buf(),
        })
    }

    /// Directory holding `postgres`, `initdb`, `psql`, ...
    pub(crate) fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    /// The unprivileged user commands run as, `None` when we are not root.
    pub(crate) fn run_as(&self) -> Option<OsUser> {
        self.run_as
    }

    /// A command for `program` from the bin dir, run as the server user.
    ///
    /// The working directory and HOME point at the cluster's base dir because root's home and
    /// current directory may be unreadable for the server user (initdb fails on an unreadable
    /// cwd); inherited `PG*` variables are removed so that a caller's PGHOST or PGPASSWORD
    /// cannot redirect our commands; messages are forced to English so logs can be matched.
    pub(crate) fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(self.bin_dir.join(program));
        cmd.current_dir(&self.work_dir)
            .env("HOME", &self.work_dir)
            .env("LC_ALL", "C")
            .env("LANG", "C")
            .stdin(Stdio::null());
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("PG") {
                cmd.env_remove(key);
            }
        }
        if let Some(user) = self.run_as {
            std::os::unix::process::CommandExt::uid(&mut cmd, user.uid);
            std::os::unix::process::CommandExt::gid(&mut cmd, user.gid);
        }
        cmd
    }

    /// Runs `program args...` to completion; returns its stdout, or an error holding its stderr.
    pub(crate) fn run<I, S>(&self, program: &str, args: I) -> Result<String, ClusterError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let args: Vec<S> = args.into_iter().collect();
        let shown = describe(program, &args);
        let output = self
            .command(program)
            .args(&args)
            .output()
            .map_err(|e| ClusterError::io(format!("running {shown}"), e))?;
        if output.status.success() {
            return Ok(String::from_utf8_lossy(&output.stdout).into_owned());
        }
        Err(ClusterError::Command {
            command: shown,
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    }
}

/// `program arg1 arg2` for error messages.
fn describe<S: AsRef<OsStr>>(program: &str, args: &[S]) -> String {
    let mut shown = program.to_owned();
    for arg in args {
        shown.push(' ');
        shown.push_str(&arg.as_ref().to_string_lossy());
    }
    shown
}

/// `pg_config --bindir` if it holds a server, else the newest `/usr/lib/postgresql/*/bin`.
pub(crate) fn find_bin_dir() -> Option<PathBuf> {
    pg_config_bin_dir()
        .filter(|dir| has_server(dir))
        .or_else(newest_distro_bin_dir)
}

fn pg_config_bin_dir() -> Option<PathBuf> {
    let output = Command::new("pg_config").arg("--bindir").output().ok()?;
    if !output.status.success() {
        return None;
    }
    let dir = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    (!dir.is_empty()).then(|| PathBuf::from(dir))
}

fn has_server(dir: &Path) -> bool {
    dir.join("postgres").is_file() && dir.join("initdb").is_file()
}

fn newest_distro_bin_dir() -> Option<PathBuf> {
    std::fs::read_dir(DISTRO_ROOT)
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let version = parse_version(&entry.file_name().to_string_lossy())?;
            let bin = entry.path().join("bin");
            has_server(&bin).then_some((version, bin))
        })
        .max_by(|a, b| a.0.cmp(&b.0))
        .map(|(_, bin)| bin)
}

/// "15" -> [15], "9.6" -> [9, 6]; directory names that are not versions are ignored.
fn parse_version(name: &str) -> Option<Vec<u32>> {
    name.split('.').map(|part| part.parse().ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_order_numerically() {
        assert!(parse_version("15") > parse_version("9.6"));
        assert!(parse_version("10") > parse_version("9.6"));
        assert_eq!(parse_version("common"), None);
    }

    #[test]
    fn installed_server_is_found() {
        let dir = find_bin_dir().unwrap_or_else(|| panic!("no PostgreSQL binaries on this host"));
        assert!(has_server(&dir), "{} lacks postgres/initdb", dir.display());
    }
}
