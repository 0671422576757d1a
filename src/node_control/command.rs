//! The `command` driver: the operator's own shell commands, one per action, run with `sh -c`
//! as pgvigil's user, each bounded by the node's `control.timeout` (the whole process group is
//! killed past it) and its output kept for the event log. Placeholders are in `template`;
//! secrets travel in the environment: `PGPASSWORD` (the source's password, rewind and reclone),
//! `PGVIGIL_PRIMARY_CONNINFO` and `PGVIGIL_STANDBY_SETTINGS` (make_standby).

use std::io::{Read, Seek};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::process::Command;

use super::template::{self, Action};
use super::{ControlError, NodeControl, Output, OwnSettings, ServerState, Source};
use crate::config::{NodeConfig, NodeControlConfig};

/// Output files made by this process so far, to give each its own name.
static OUTPUTS: AtomicU64 = AtomicU64::new(0);

/// `status` exit codes that mean "not running" (`pg_ctl status`: 3 no server, 4 no data dir).
const STOPPED_CODES: [i32; 2] = [3, 4];

/// A node driven by the operator's commands.
#[derive(Debug, Clone)]
pub struct Commands {
    control: NodeControlConfig,
    node: String,
    host: String,
    port: u16,
}

impl Commands {
    /// The driver for `node` with the templates of `control`.
    pub fn new(node: &NodeConfig, control: &NodeControlConfig) -> Commands {
        Commands {
            control: control.clone(),
            node: node.name.clone(),
            host: node.host.clone(),
            port: node.port,
        }
    }

    /// Runs the template of `action` with `values` beyond the common placeholders and `env`
    /// added to the environment; its exit status and output.
    async fn run(
        &self,
        action: Action,
        values: Vec<(&str, String)>,
        env: &[(&str, &str)],
    ) -> Result<(ExitStatus, Output), ControlError> {
        let template = self
            .control
            .template(action)
            .ok_or(ControlError::NotConfigured {
                action: action.key(),
            })?;
        let mut all = vec![
            ("node", self.node.clone()),
            ("host", self.host.clone()),
            ("port", self.port.to_string()),
        ];
        if !self.control.data_dir.as_os_str().is_empty() {
            all.push((
                "data_dir",
                self.control.data_dir.to_string_lossy().into_owned(),
            ));
        }
        all.extend(values);
        let program = format!("the {} command", action.key());
        let script = template::render(template, &all).map_err(|reason| ControlError::Failed {
            program: program.clone(),
            status: "not run".into(),
            output: reason,
        })?;
        run_shell(&program, &script, env, self.control.timeout).await
    }

    /// Runs `action`; its output, or an error when it does not exit 0.
    async fn act(
        &self,
        action: Action,
        values: Vec<(&str, String)>,
        env: &[(&str, &str)],
    ) -> Result<Output, ControlError> {
        let (status, output) = self.run(action, values, env).await?;
        if status.success() {
            Ok(output)
        } else {
            Err(ControlError::Failed {
                program: format!("the {} command", action.key()),
                status: status.to_string(),
                output,
            })
        }
    }

    fn source_values(source: &Source) -> Vec<(&'static str, String)> {
        vec![
            ("source_host", source.host.clone()),
            ("source_port", source.port.to_string()),
            ("source_user", source.user.clone()),
            ("source_conninfo", super::local::source_conninfo(source)),
        ]
    }
}

/// A fresh file, already unlinked, for a command's stdout and stderr: a file rather than a
/// pipe, because a server the command starts may keep the descriptors open long after the
/// command has exited.
fn output_file() -> std::io::Result<std::fs::File> {
    let n = OUTPUTS.fetch_add(1, Ordering::Relaxed);
    let path: PathBuf =
        std::env::temp_dir().join(format!("pgvigil-command-{}-{n}.out", std::process::id()));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)?;
    std::fs::remove_file(&path)?;
    Ok(file)
}

/// Runs `script` with `sh -c` in its own process group, pgvigil's environment without its own
/// `PGVIGIL_*` variables plus `env`; kills the group past `limit`.
async fn run_shell(
    program: &str,
    script: &str,
    env: &[(&str, &str)],
    limit: Duration,
) -> Result<(ExitStatus, Output), ControlError> {
    let io = |what: &str, source| ControlError::Io {
        what: format!("{what} for {program}"),
        source,
    };
    let mut file = output_file().map_err(|e| io("creating the output file", e))?;
    let stdout = file
        .try_clone()
        .map_err(|e| io("opening the output file", e))?;
    let stderr = file
        .try_clone()
        .map_err(|e| io("opening the output file", e))?;
    let mut command = Command::new("/bin/sh");
    command
        .arg("-c")
        .arg(script)
        .stdin(Stdio::null())
        .stdout(Stdio::from(stdout))
        .stderr(Stdio::from(stderr))
        .process_group(0)
        .kill_on_drop(true);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("PGVIGIL_") {
            command.env_remove(key);
        }
    }
    command.envs(env.iter().copied());
    let mut child = command.spawn().map_err(|source| ControlError::Spawn {
        program: program.to_owned(),
        source,
    })?;
    let group = child.id();
    let status = match tokio::time::timeout(limit, child.wait()).await {
        Ok(status) => status.map_err(|source| ControlError::Spawn {
            program: program.to_owned(),
            source,
        })?,
        Err(_) => {
            if let Some(group) = group.and_then(|g| libc::pid_t::try_from(g).ok()) {
                // SAFETY: kill(2) touches no memory of ours; a gone group only yields ESRCH.
                unsafe {
                    libc::kill(-group, libc::SIGKILL);
                }
            }
            let _ = child.wait().await;
            return Err(ControlError::Timeout {
                program: program.to_owned(),
                limit,
            });
        }
    };
    let mut text = String::new();
    file.rewind()
        .and_then(|()| file.read_to_string(&mut text))
        .map_err(|e| io("reading the output", e))?;
    Ok((status, text.trim().to_owned()))
}

impl NodeControl for Commands {
    async fn state(&self) -> Result<ServerState, ControlError> {
        let (status, output) = self.run(Action::Status, Vec::new(), &[]).await?;
        match status.code() {
            Some(0) => Ok(ServerState::Running),
            Some(code) if STOPPED_CODES.contains(&code) => Ok(ServerState::Stopped),
            _ => Err(ControlError::Failed {
                program: "the status command".into(),
                status: match status.signal() {
                    Some(signal) => format!("killed by signal {signal}"),
                    None => format!("{status} (0 means running, 3 or 4 stopped)"),
                },
                output,
            }),
        }
    }

    async fn stop(&self) -> Result<Output, ControlError> {
        self.act(Action::Stop, Vec::new(), &[]).await
    }

    async fn start(&self) -> Result<Output, ControlError> {
        self.act(Action::Start, Vec::new(), &[]).await
    }

    async fn rewind(&self, source: &Source) -> Result<Output, ControlError> {
        let env: Vec<(&str, &str)> = source
            .password
            .as_deref()
            .map(|p| ("PGPASSWORD", p))
            .into_iter()
            .collect();
        self.act(Action::Rewind, Self::source_values(source), &env)
            .await
    }

    async fn reclone(&self, source: &Source) -> Result<Output, ControlError> {
        let env: Vec<(&str, &str)> = source
            .password
            .as_deref()
            .map(|p| ("PGPASSWORD", p))
            .into_iter()
            .collect();
        self.act(Action::Reclone, Self::source_values(source), &env)
            .await
    }

    async fn make_standby(&self, settings: &OwnSettings) -> Result<(), ControlError> {
        let lines = super::local::standby_settings(settings);
        let env = [
            (
                "PGVIGIL_PRIMARY_CONNINFO",
                settings.primary_conninfo.as_str(),
            ),
            ("PGVIGIL_STANDBY_SETTINGS", lines.as_str()),
        ];
        let values = vec![("slot", settings.primary_slot_name.clone())];
        self.act(Action::MakeStandby, values, &env).await.map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ControlDriver;

    fn driver(status: &str, stop: &str, timeout: Duration) -> Commands {
        let node = NodeConfig {
            name: "pg1".into(),
            host: "db1".into(),
            ..NodeConfig::default()
        };
        let control = NodeControlConfig {
            driver: ControlDriver::Command,
            status: Some(status.into()),
            stop: Some(stop.into()),
            start: Some("true".into()),
            timeout,
            ..NodeControlConfig::default()
        };
        Commands::new(&node, &control)
    }

    #[tokio::test]
    async fn status_exit_codes_mean_running_stopped_or_an_error_with_the_output() {
        let limit = Duration::from_secs(30);
        let running = driver("exit 0", "true", limit).state().await;
        assert!(matches!(running, Ok(ServerState::Running)), "{running:?}");
        let stopped = driver("exit 3", "true", limit).state().await;
        assert!(matches!(stopped, Ok(ServerState::Stopped)), "{stopped:?}");
        let broken = driver("echo no route to {host} >&2; exit 255", "true", limit)
            .state()
            .await;
        assert!(
            matches!(&broken, Err(ControlError::Failed { output, .. }) if output == "no route to db1"),
            "{broken:?}"
        );
    }

    #[tokio::test]
    async fn output_is_kept_when_a_started_process_outlives_the_command() {
        // The background sleep keeps the command's stdout open, as a started server would.
        let stop = driver(
            "true",
            "sleep 30 & echo stopped {node}",
            Duration::from_secs(20),
        );
        let began = std::time::Instant::now();
        let output = stop.stop().await;
        assert!(
            matches!(&output, Ok(text) if text == "stopped pg1"),
            "{output:?}"
        );
        assert!(began.elapsed() < Duration::from_secs(20));
    }

    #[tokio::test]
    async fn a_command_past_its_timeout_is_killed_with_its_children() {
        let marker =
            std::env::temp_dir().join(format!("pgvigil-command-test-{}", std::process::id()));
        let script = format!("(sleep 2; touch {}) & sleep 30", marker.display());
        let stop = driver("true", &script, Duration::from_millis(300));
        let output = stop.stop().await;
        assert!(
            matches!(output, Err(ControlError::Timeout { .. })),
            "{output:?}"
        );
        // The grandchild would have touched the marker after 2 s had it survived.
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(
            !marker.exists(),
            "a child of the command outlived its timeout"
        );
    }

    #[tokio::test]
    async fn pgvigils_own_variables_stay_out_of_the_commands_environment() {
        std::env::set_var("PGVIGIL_COMMAND_TEST_SECRET", "secret");
        let stop = driver(
            "true",
            "echo \"[$PGVIGIL_COMMAND_TEST_SECRET]\"",
            Duration::from_secs(20),
        );
        let output = stop.stop().await;
        assert!(matches!(&output, Ok(text) if text == "[]"), "{output:?}");
    }
}
