//! A real `pgvigil agent` process (the built binary) beside a data directory, and a way to call
//! its API.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hyper::Method;
use pgvigil::http_client::Endpoint;

/// How long an agent may take to answer its first request (with `--init`, to create and start
/// its cluster on a loaded machine).
pub const READY: Duration = Duration::from_secs(120);

/// A running `pgvigil agent`, stopped with SIGTERM (then SIGKILL) when dropped.
pub struct AgentProcess {
    child: Child,
    /// Its API, `http://127.0.0.1:PORT`.
    pub url: String,
    /// Where its stdout and stderr go.
    pub log: PathBuf,
    /// The file holding its token, if it has one.
    pub token_file: Option<PathBuf>,
}

impl AgentProcess {
    /// Starts `pgvigil agent` on a free loopback port with `args`, the token `token` (in a
    /// file next to `log`) if given, and `env`; its output goes to `log`.
    pub fn spawn(
        args: &[&str],
        token: Option<&str>,
        env: &[(&str, &str)],
        log: &Path,
    ) -> AgentProcess {
        AgentProcess::spawn_as(None, args, token, env, log)
    }

    /// [`AgentProcess::spawn`], run as the user `uid`/`gid` when given (as in a container,
    /// where the agent is the unprivileged `postgres`).
    pub fn spawn_as(
        user: Option<(u32, u32)>,
        args: &[&str],
        token: Option<&str>,
        env: &[(&str, &str)],
        log: &Path,
    ) -> AgentProcess {
        let port = pgvigil::local_cluster::free_port().expect("a free port");
        let listen = format!("127.0.0.1:{port}");
        let mut command = Command::new(env!("CARGO_BIN_EXE_pgvigil"));
        command
            .arg("agent")
            .args(["--listen", &listen])
            .args(args)
            .env_remove("PGVIGIL_AGENT_TOKEN")
            .env_remove("PGVIGIL_SUPERUSER_PASSWORD")
            .env_remove("PGDATA")
            .env("PGVIGIL_LOG", "info")
            .env("NO_COLOR", "1")
            .envs(env.iter().copied())
            .stdin(Stdio::null());
        let token_file = token.map(|token| {
            let file = log.with_extension("token");
            std::fs::write(&file, token).expect("writing the token file");
            command.arg("--token-file").arg(&file);
            file
        });
        let out = std::fs::File::create(log).expect("creating the agent's log");
        let err = out.try_clone().expect("cloning the log file");
        command.stdout(out).stderr(err);
        if let Some((uid, gid)) = user {
            std::os::unix::process::CommandExt::uid(&mut command, uid);
            std::os::unix::process::CommandExt::gid(&mut command, gid);
        }
        let child = command.spawn().expect("pgvigil agent starts");
        AgentProcess {
            child,
            url: format!("http://{listen}"),
            log: log.to_path_buf(),
            token_file,
        }
    }

    /// `method path` with `token` and `body`; the HTTP status and the body as text.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<&str>,
    ) -> Result<(u16, String), String> {
        let endpoint = Endpoint::parse(&self.url).expect("an http URL");
        let body = body.map(|b| b.as_bytes().to_vec());
        let (code, answer) = endpoint.request(method, path, token, &[], body).await?;
        Ok((code.as_u16(), String::from_utf8_lossy(&answer).into_owned()))
    }

    /// Waits until `GET /status` with `token` answers 200 and `ready` holds for its JSON.
    pub async fn wait_status(
        &self,
        token: Option<&str>,
        ready: impl Fn(&serde_json::Value) -> bool,
    ) {
        let give_up = Instant::now() + READY;
        loop {
            if let Ok((200, text)) = self.call(Method::GET, "/status", token, None).await {
                if serde_json::from_str(&text).is_ok_and(|v| ready(&v)) {
                    return;
                }
            }
            assert!(
                Instant::now() < give_up,
                "the agent was not ready within {READY:?}; its log:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The real user id it runs as (from `/proc`).
    pub fn uid(&self) -> Option<u32> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        let line = status.lines().find(|l| l.starts_with("Uid:"))?;
        line.split_whitespace().nth(1)?.parse().ok()
    }

    /// What it printed so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends SIGTERM and waits for the exit; its exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        if let Ok(pid) = libc::pid_t::try_from(self.child.id()) {
            // SAFETY: kill(2) touches no memory of ours.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
        let give_up = Instant::now() + READY;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return status.code(),
                Ok(None) if Instant::now() < give_up => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                _ => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    return None;
                }
            }
        }
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.terminate();
        }
    }
}
