//! The unprivileged OS user that runs PostgreSQL when we are root.
//!
//! `postgres` refuses to start as root ("root" execution of the PostgreSQL server is not
//! permitted), so a root caller runs every server binary as the distribution's `postgres` user,
//! or as a system user `pgvigil` created on first use.

use std::path::Path;
use std::process::Command;
use std::sync::{Mutex, PoisonError};

use super::ClusterError;

/// Numeric identity of the user that runs the server binaries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OsUser {
    /// User id.
    pub(crate) uid: u32,
    /// Primary group id.
    pub(crate) gid: u32,
}

/// Name of the user we create when the host has no `postgres` user.
const OWN_USER: &str = "pgvigil";

/// The user resolved so far; parallel tests must not race to run `useradd`.
static RESOLVED: Mutex<Option<OsUser>> = Mutex::new(None);

/// The user to run server binaries as: `None` when we are not root (run as ourselves).
pub(crate) fn server_user() -> Result<Option<OsUser>, ClusterError> {
    if !running_as_root() {
        return Ok(None);
    }
    let mut resolved = RESOLVED.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(user) = *resolved {
        return Ok(Some(user));
    }
    let user = match lookup("postgres")? {
        Some(user) => user,
        None => lookup_or_create_own_user()?,
    };
    *resolved = Some(user);
    Ok(Some(user))
}

/// Gives `path` to `user` (no-op when not running as root).
pub(crate) fn give_to(user: Option<OsUser>, path: &Path) -> Result<(), ClusterError> {
    let Some(user) = user else { return Ok(()) };
    std::os::unix::fs::chown(path, Some(user.uid), Some(user.gid))
        .map_err(|e| ClusterError::io(format!("chown {}", path.display()), e))
}

fn running_as_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn lookup_or_create_own_user() -> Result<OsUser, ClusterError> {
    if let Some(user) = lookup(OWN_USER)? {
        return Ok(user);
    }
    let output = Command::new("useradd")
        .args([
            "--system",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
            OWN_USER,
        ])
        .output()
        .map_err(|e| ClusterError::io("running useradd", e))?;
    if !output.status.success() {
        return Err(ClusterError::User(format!(
            "useradd {OWN_USER} failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    lookup(OWN_USER)?
        .ok_or_else(|| ClusterError::User(format!("user {OWN_USER} missing after useradd")))
}

/// Looks a user up with `getent passwd`, which also sees NSS sources beyond /etc/passwd.
fn lookup(name: &str) -> Result<Option<OsUser>, ClusterError> {
    let output = Command::new("getent")
        .args(["passwd", name])
        .output()
        .map_err(|e| ClusterError::io("running getent passwd", e))?;
    if !output.status.success() {
        return Ok(None);
    }
    parse_passwd_line(&String::from_utf8_lossy(&output.stdout))
        .map(Some)
        .ok_or_else(|| ClusterError::User(format!("unreadable passwd entry for {name}")))
}

/// Reads uid and gid from a `name:x:uid:gid:gecos:home:shell` line.
fn parse_passwd_line(line: &str) -> Option<OsUser> {
    let mut fields = line.trim().split(':').skip(2);
    let uid = fields.next()?.parse().ok()?;
    let gid = fields.next()?.parse().ok()?;
    Some(OsUser { uid, gid })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwd_line_gives_uid_and_gid() {
        let line = "postgres:x:101:104:PostgreSQL administrator,,,:/var/lib/postgresql:/bin/bash\n";
        assert_eq!(parse_passwd_line(line), Some(OsUser { uid: 101, gid: 104 }));
    }

    #[test]
    fn malformed_passwd_line_is_rejected() {
        assert_eq!(parse_passwd_line("postgres:x:abc:104"), None);
        assert_eq!(parse_passwd_line("postgres"), None);
    }
}
