//! Signals and process-table lookups for postmasters and their children (Linux `/proc`).

use std::process::Child;
use std::time::{Duration, Instant};

/// How often we look at a process we are waiting for.
const POLL: Duration = Duration::from_millis(20);

/// Sends `signal` to `pid`; a process that is already gone is not an error.
pub(crate) fn send(pid: u32, signal: libc::c_int) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: kill(2) touches no memory of ours; a stale pid only yields ESRCH.
    unsafe {
        libc::kill(pid, signal);
    }
}

/// Pids whose parent is `pid` (a postmaster's backends and auxiliary processes).
pub(crate) fn children_of(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&candidate| stat(candidate).is_some_and(|s| s.ppid == pid))
        .collect()
}

/// Whether `pid` exists and is not a zombie (a stopped process counts as alive).
pub(crate) fn is_alive(pid: u32) -> bool {
    stat(pid).is_some_and(|s| !matches!(s.state, 'Z' | 'X'))
}

/// Waits up to `grace` for `child` to exit and reaps it; true if it did.
pub(crate) fn wait_exit(child: &mut Child, grace: Duration) -> bool {
    let deadline = Instant::now() + grace;
    loop {
        match child.try_wait() {
            Ok(Some(_)) | Err(_) => return true,
            Ok(None) if Instant::now() >= deadline => return false,
            Ok(None) => std::thread::sleep(POLL),
        }
    }
}

/// SIGKILLs `child` and every child of it, then reaps it and waits (bounded) for the others.
///
/// The children are killed too: orphaned backends keep the shared memory segment attached and
/// a restart on the same data dir would fail with "pre-existing shared memory block is still in
/// use".
pub(crate) fn kill_tree(child: &mut Child) {
    let pid = child.id();
    let children = children_of(pid);
    send(pid, libc::SIGKILL);
    for &c in &children {
        send(c, libc::SIGKILL);
    }
    let _ = child.wait();
    let deadline = Instant::now() + Duration::from_secs(5);
    while children.iter().any(|&c| is_alive(c)) && Instant::now() < deadline {
        std::thread::sleep(POLL);
    }
}

/// The two fields of `/proc/PID/stat` we need.
struct Stat {
    state: char,
    ppid: u32,
}

fn stat(pid: u32) -> Option<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text)
}

/// Parses "pid (comm) state ppid ..."; comm may hold spaces and parentheses, so we split after
/// the last ')'.
fn parse_stat(text: &str) -> Option<Stat> {
    let (_, rest) = text.rsplit_once(')')?;
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some(Stat { state, ppid })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_odd_command_name_parses() {
        let parsed =
            parse_stat("4242 (postgres: a) b) S 17 4242 4242 0 -1").map(|s| (s.state, s.ppid));
        assert_eq!(parsed, Some(('S', 17)));
        assert!(parse_stat("garbage").is_none());
    }

    #[test]
    fn own_process_is_alive_and_child_is_listed() {
        assert!(is_alive(std::process::id()));
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(children_of(std::process::id()).contains(&child.id()));
        kill_tree(&mut child);
        assert!(!is_alive(child.id()));
    }
}
