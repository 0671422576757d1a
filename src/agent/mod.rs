//! `pgvigil agent`: runs beside one PostgreSQL server (on its host, or as its container's
//! entrypoint) and exposes the server's control over HTTP with a bearer token, for pgvigil's
//! `agent` node control driver. The agent is a thin face over the `local` driver. With
//! `--init`, it first creates the cluster when the data directory is empty (a primary with
//! initdb, or a standby with pg_basebackup), starts PostgreSQL, keeps running while pgvigil
//! stops, starts, rewinds or re-clones it, and stops it cleanly on SIGTERM or SIGINT.

pub mod api;
mod bootstrap;
mod server;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use bootstrap::Init;

use crate::config::{NodeControlConfig, AGENT_TOKEN_ENV};
use crate::node_control::{ControlError, Local, NodeControl, ServerState};
use server::Served;

/// The environment variable holding the superuser's password for `--init`.
pub const SUPERUSER_PASSWORD_ENV: &str = "PGVIGIL_SUPERUSER_PASSWORD";

/// `pgvigil agent`'s options; each can also come from the environment variable named.
#[derive(Debug, clap::Args)]
pub struct Options {
    /// Address of the agent's HTTP API; a non-loopback address needs a token.
    #[arg(long, env = "PGVIGIL_AGENT_LISTEN", default_value = "127.0.0.1:9997")]
    pub listen: SocketAddr,
    /// The server's data directory (absolute).
    #[arg(long, env = "PGDATA")]
    pub data_dir: PathBuf,
    /// Directory of pg_ctl, pg_rewind, pg_basebackup, initdb [default: pg_config --bindir,
    /// then the newest /usr/lib/postgresql/*/bin].
    #[arg(long, env = "PGVIGIL_AGENT_BIN_DIR")]
    pub bin_dir: Option<PathBuf>,
    /// The server's port (written by --init; pgvigil's failback writes the node's own port).
    #[arg(long, env = "PGVIGIL_AGENT_PG_PORT", default_value_t = 5432)]
    pub pg_port: u16,
    /// Longest one action may take (keep it below the node's control.timeout in pgvigil).
    #[arg(long, env = "PGVIGIL_AGENT_TIMEOUT", default_value = "100s",
          value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// File holding the bearer token requests must carry [default: PGVIGIL_AGENT_TOKEN].
    #[arg(long, env = "PGVIGIL_AGENT_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// Create the cluster when the data directory is empty (a primary with initdb, or a
    /// standby of --source with pg_basebackup), then start PostgreSQL, and stop it on exit.
    #[arg(long, env = "PGVIGIL_AGENT_INIT", value_enum)]
    pub init: Option<Init>,
    /// With --init standby: HOST:PORT of the primary to copy (waited for until --timeout).
    #[arg(long, env = "PGVIGIL_AGENT_SOURCE", required_if_eq("init", "standby"))]
    pub source: Option<String>,
    /// With --init standby: the node's name in pgvigil's configuration, given to the standby as
    /// its application_name, with a replication slot of that name on the source (pgvigil
    /// matches standbys by application_name).
    #[arg(long, env = "PGVIGIL_AGENT_NAME")]
    pub name: Option<String>,
    /// With --init primary: SQL file run once as the superuser after the first start.
    #[arg(long, env = "PGVIGIL_AGENT_INIT_SQL")]
    pub init_sql: Option<PathBuf>,
    /// With --init: file holding the password of the superuser `postgres` [default:
    /// PGVIGIL_SUPERUSER_PASSWORD].
    #[arg(long, env = "PGVIGIL_SUPERUSER_PASSWORD_FILE")]
    pub superuser_password_file: Option<PathBuf>,
}

/// Why the agent stopped or could not start.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The options cannot work.
    #[error("{0}")]
    Usage(String),
    /// A non-loopback listen address without a token.
    #[error(
        "refusing to listen on {0} without a token: anyone who can reach it could stop the \
         server; give --token-file or PGVIGIL_AGENT_TOKEN, or listen on 127.0.0.1"
    )]
    NoToken(SocketAddr),
    /// The listen address could not be bound.
    #[error("cannot listen on {listen}: {source}")]
    Bind {
        /// The address.
        listen: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// Creating or starting the cluster failed.
    #[error("--init failed: {0}")]
    Init(ControlError),
}

impl Options {
    /// The token: `--token-file`'s first line, else a non-empty `PGVIGIL_AGENT_TOKEN`.
    fn token(&self) -> Result<Option<String>, AgentError> {
        match &self.token_file {
            Some(path) => std::fs::read_to_string(path)
                .map(|text| Some(text.trim().to_owned()).filter(|t| !t.is_empty()))
                .map_err(|e| {
                    AgentError::Usage(format!("cannot read --token-file {}: {e}", path.display()))
                }),
            None => Ok(std::env::var(AGENT_TOKEN_ENV)
                .ok()
                .filter(|t| !t.is_empty())),
        }
    }

    /// What `--init` asks for, checked.
    fn plan(&self) -> Result<Option<bootstrap::Plan>, AgentError> {
        let Some(init) = self.init else {
            return Ok(None);
        };
        let password = match &self.superuser_password_file {
            Some(path) => std::fs::read_to_string(path)
                .map(|text| text.trim().to_owned())
                .map_err(|e| {
                    AgentError::Usage(format!(
                        "cannot read --superuser-password-file {}: {e}",
                        path.display()
                    ))
                })?,
            None => std::env::var(SUPERUSER_PASSWORD_ENV).unwrap_or_default(),
        };
        if password.is_empty() {
            return Err(AgentError::Usage(format!(
                "--init needs the superuser's password: --superuser-password-file or \
                 {SUPERUSER_PASSWORD_ENV}"
            )));
        }
        let make = match init {
            Init::Primary => bootstrap::Make::Primary {
                init_sql: self.init_sql.clone(),
            },
            Init::Standby => {
                let source = self.source.as_deref().unwrap_or_default();
                let source = parse_host_port(source).ok_or_else(|| {
                    AgentError::Usage(format!(
                        "--init standby needs --source HOST:PORT, not {source:?}"
                    ))
                })?;
                let name = self.name.clone();
                if let Some(name) = &name {
                    let allowed = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
                    if name.is_empty() || !name.chars().all(allowed) {
                        return Err(AgentError::Usage(format!(
                            "--name {name:?} may hold only letters, digits, '_' and '-', as a \
                             node name"
                        )));
                    }
                }
                bootstrap::Make::Standby { source, name }
            }
        };
        Ok(Some(bootstrap::Plan {
            make,
            port: self.pg_port,
            password,
        }))
    }
}

/// `HOST:PORT` (IPv6 in brackets) as its parts.
fn parse_host_port(text: &str) -> Option<(String, u16)> {
    let (host, port) = text.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = port.parse().ok()?;
    (!host.is_empty()).then(|| (host.to_owned(), port))
}

/// Runs the agent until SIGTERM or SIGINT.
pub async fn run(options: Options) -> Result<(), AgentError> {
    let token = options.token()?;
    if token.is_none() && !options.listen.ip().is_loopback() {
        return Err(AgentError::NoToken(options.listen));
    }
    if options.data_dir.is_relative() {
        return Err(AgentError::Usage(format!(
            "--data-dir {} must be an absolute path",
            options.data_dir.display()
        )));
    }
    let plan = options.plan()?;
    let local = Local::new(&NodeControlConfig {
        data_dir: options.data_dir.clone(),
        bin_dir: options.bin_dir.clone(),
        timeout: options.timeout,
        ..NodeControlConfig::default()
    });
    let listener = TcpListener::bind(options.listen)
        .await
        .map_err(|source| AgentError::Bind {
            listen: options.listen,
            source,
        })?;
    let listen = listener.local_addr().unwrap_or(options.listen);
    info!(%listen, data_dir = %options.data_dir.display(), "agent: API listening");
    let served = Arc::new(Served {
        local,
        token,
        busy: Mutex::new(()),
    });
    let shutdown = CancellationToken::new();
    let api = tokio::spawn(server::serve(listener, served.clone(), shutdown.clone()));
    let stop = crate::signals::stop_requested();
    tokio::pin!(stop);
    let mut outcome = Ok(());
    let mut stopped_early = false;
    if let Some(plan) = &plan {
        // Until the cluster is there, actions are refused (409, another action is running).
        let _busy = served.busy.lock().await;
        tokio::select! {
            prepared = bootstrap::prepare(&served.local, plan) => {
                outcome = prepared.map_err(AgentError::Init);
            }
            () = &mut stop => {
                info!("agent: stop requested during --init");
                stopped_early = true;
            }
        }
    }
    if outcome.is_ok() && !stopped_early {
        info!("agent: ready");
        (&mut stop).await;
        info!("agent: stopping");
    }
    shutdown.cancel();
    let _ = api.await;
    if plan.is_some() {
        stop_server(&served.local).await;
    }
    outcome
}

/// Stops the server the agent started, if it runs.
async fn stop_server(local: &Local) {
    match local.state().await {
        Ok(ServerState::Stopped) => {}
        Ok(ServerState::Running) | Err(_) => match local.stop().await {
            Ok(_) => info!("agent: PostgreSQL stopped"),
            Err(e) => warn!(error = %e, "agent: cannot stop PostgreSQL"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::parse_host_port;

    #[test]
    fn sources_are_host_and_port() {
        assert_eq!(parse_host_port("db1:5432"), Some(("db1".into(), 5432)));
        assert_eq!(parse_host_port("[::1]:5433"), Some(("::1".into(), 5433)));
        assert_eq!(parse_host_port("db1"), None);
        assert_eq!(parse_host_port(":5432"), None);
        assert_eq!(parse_host_port("db1:x"), None);
    }
}
