//! pgvigil run as its own process (the real binary, as users run it), for tests that measure
//! its memory: an in-process proxy would share the test's own allocations.

use std::net::SocketAddr;
use std::process::Stdio;

use pgvigil::config::Config;
use tokio::process::Child;

use crate::cli::{listening_port, pgvigil, TempConfig};

/// A pgvigil process serving a config, killed when dropped.
pub struct ProxyProcess {
    /// Its process id.
    pub pid: u32,
    /// Where it listens.
    pub addr: SocketAddr,
    _child: Child,
    _config: TempConfig,
}

impl ProxyProcess {
    /// Starts `serve` with `config`. `PGVIGIL_BIN` runs another build (a release one) than the
    /// test's own.
    pub async fn start(config: &Config) -> ProxyProcess {
        let file = TempConfig::new(&toml::to_string(config).unwrap());
        let mut command = match std::env::var_os("PGVIGIL_BIN") {
            Some(bin) => {
                let mut command = tokio::process::Command::new(bin);
                command.env("PGVIGIL_LOG", "info");
                command
            }
            None => pgvigil(&[]),
        };
        let mut child = command
            .args(["serve", "--config", file.path().to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let pid = child.id().expect("pgvigil runs");
        let (port, mut log) = listening_port(&mut child).await;
        // Its log is read to the end, so that pgvigil never blocks on a full pipe.
        tokio::spawn(async move {
            use tokio::io::AsyncBufReadExt;
            let mut line = String::new();
            while log.read_line(&mut line).await.is_ok_and(|n| n > 0) {
                line.clear();
            }
        });
        ProxyProcess {
            pid,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            _child: child,
            _config: file,
        }
    }

    /// Its resident memory now, in bytes (VmRSS).
    pub fn rss(&self) -> usize {
        status_kb(self.pid, "VmRSS:") * 1024
    }

    /// Its peak resident memory since it started or since [`Self::reset_peak`] (VmHWM), in
    /// bytes.
    pub fn peak_rss(&self) -> usize {
        status_kb(self.pid, "VmHWM:") * 1024
    }

    /// Starts a new peak: the kernel sets VmHWM to the current RSS (`clear_refs` 5, Linux 4.0+).
    pub fn reset_peak(&self) {
        std::fs::write(format!("/proc/{}/clear_refs", self.pid), "5").unwrap();
    }
}

/// A `kB` line of `/proc/PID/status`.
fn status_kb(pid: u32, key: &str) -> usize {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with(key))
        .unwrap_or_else(|| panic!("{key} in /proc/{pid}/status"));
    line.split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{key} in kB"))
}
