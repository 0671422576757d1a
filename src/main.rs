//! The `pgvigil` command: run the proxy, or a local demo cluster with the proxy in front, or
//! drive a running pgvigil through its admin API (`status`, `promote`, `attach`, ...).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use pgvigil::admin::api::{self, Refusal};
use pgvigil::admin::client::{Admin, ClientError};
use pgvigil::config::{Config, ConfigError, TOKEN_ENV};
use tracing::{error, info};

/// The command line; `about` is the package description in Cargo.toml.
#[derive(Parser)]
#[command(name = "pgvigil", version, about, long_about = None)]
struct Cli {
    /// Log filter (tracing EnvFilter syntax), e.g. "info" or "pgvigil=debug".
    #[arg(long, global = true, env = "PGVIGIL_LOG", default_value = "info")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy with a configuration file.
    Serve {
        /// Path of the TOML configuration (see pgvigil.example.toml).
        #[arg(long, short, env = "PGVIGIL_CONFIG", default_value = "pgvigil.toml")]
        config: PathBuf,
    },
    /// Start a local primary and streaming replicas, and pgvigil in front of them; Ctrl-C stops all.
    Demo {
        /// Folder for the nodes' data and logs, rebuilt on every run [default: $TMPDIR/pgvigil-demo].
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Port pgvigil listens on.
        #[arg(long, default_value_t = 9999)]
        port: u16,
        /// Number of streaming replicas.
        #[arg(long, default_value_t = 2)]
        replicas: usize,
    },
    /// Show every node (role, health, timeline, WAL positions, lag, fence), the pools and
    /// recent events.
    Status {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Promote NODE in place of a lost primary; with --dry-run, show which node failover would
    /// choose now and why, changing nothing.
    Promote {
        /// The node to promote.
        node: String,
        /// Change nothing: show the choice failover would make now.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Bring a fenced or down former primary back as a standby of the current primary
    /// (pg_rewind, or pg_basebackup with --reclone), through its [nodes.control].
    Failback {
        /// The node to bring back.
        node: String,
        /// Take a fresh copy with pg_basebackup instead of pg_rewind (when its WAL is gone).
        #[arg(long)]
        reclone: bool,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Hand the primary role to another standby while the primary is healthy: writes wait,
    /// transactions in flight drain, nothing acknowledged is lost, the old primary rejoins as a
    /// standby.
    Switchover {
        /// The standby to promote [default: the one failover would choose].
        #[arg(long)]
        to: Option<String>,
        /// How long transactions in flight may take before they are ended (e.g. 5s, 500ms).
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        drain_timeout: std::time::Duration,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Put a detached node back into routing and failover candidacy.
    Attach {
        /// The node to attach.
        node: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Take a node out of routing and failover candidacy without touching it.
    Detach {
        /// The node to detach.
        node: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Hold new transactions (PgBouncer's PAUSE): those running finish, new ones wait for
    /// `resume`; a client's cancel request ends its wait.
    Pause {
        /// Return only once no session is running a statement or inside a transaction block.
        #[arg(long)]
        wait: bool,
        /// With --wait: give up waiting after this long (pgvigil stays paused).
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Release the transactions held by `pause`.
    Resume {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Read the configuration file again and apply what may change live (as SIGHUP does),
    /// nodes added and removed included (a removed one is drained first); an invalid file is
    /// refused with every problem named.
    Reload {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Clear the fence of a node once an operator has dealt with it.
    Unfence {
        /// The node to unfence.
        node: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Run beside one PostgreSQL server and expose its control (status, stop, start, rewind,
    /// reclone, make-standby) over HTTP with a token, for pgvigil's `agent` node control; with
    /// --init, create the cluster in an empty data directory, start it, and stop it on exit.
    Agent(pgvigil::agent::Options),
}

/// How the admin commands reach pgvigil. Exit codes: 0 done, 1 refused (with the reason and
/// what to do next), 2 usage, 3 cannot reach pgvigil.
#[derive(Args)]
struct AdminArgs {
    /// The admin API of the running pgvigil.
    #[arg(long, env = "PGVIGIL_ADMIN", default_value = "http://127.0.0.1:9998")]
    admin: String,
    /// File holding the admin token (else PGVIGIL_ADMIN_TOKEN is used).
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Print the answer as JSON, for scripts.
    #[arg(long)]
    json: bool,
}

/// Exit code of a refused command.
const REFUSED: u8 = 1;
/// Exit code of bad usage (clap's own, too).
const USAGE: u8 = 2;
/// Exit code when pgvigil cannot be reached.
const UNREACHABLE: u8 = 3;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log);
    raise_open_file_limit();
    // serve and demo: this runtime is the control plane (probes, failover, admin API, etcd,
    // reload) on one thread; the data-plane threads get runtimes of their own (`threads`).
    let mut builder = match cli.command {
        Command::Serve { .. } | Command::Demo { .. } => {
            tokio::runtime::Builder::new_current_thread()
        }
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    let runtime = match builder.enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("pgvigil: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command {
        Command::Serve { config } => runtime.block_on(serve(config)),
        Command::Demo {
            dir,
            port,
            replicas,
        } => {
            // Under the temp dir by default: a checkout in root's home is not readable by the
            // unprivileged user the nodes run as.
            let dir = dir.unwrap_or_else(|| std::env::temp_dir().join("pgvigil-demo"));
            runtime.block_on(pgvigil::demo::run(dir, port, replicas))
        }
        Command::Status { admin } => runtime.block_on(status(admin)),
        Command::Promote {
            node,
            dry_run,
            admin,
        } => runtime.block_on(command(admin, api::Command::Promote { node, dry_run })),
        Command::Failback {
            node,
            reclone,
            admin,
        } => runtime.block_on(command(admin, api::Command::Failback { node, reclone })),
        Command::Switchover {
            to,
            drain_timeout,
            admin,
        } => runtime.block_on(command(
            admin,
            api::Command::Switchover { to, drain_timeout },
        )),
        Command::Attach { node, admin } => {
            runtime.block_on(command(admin, api::Command::Attach(node)))
        }
        Command::Detach { node, admin } => {
            runtime.block_on(command(admin, api::Command::Detach(node)))
        }
        Command::Unfence { node, admin } => {
            runtime.block_on(command(admin, api::Command::Unfence(node)))
        }
        Command::Pause {
            wait,
            timeout,
            admin,
        } => {
            let timeout = humantime::format_duration(timeout)
                .to_string()
                .replace(' ', "");
            let path = if wait {
                format!("/pause?wait=true&timeout={timeout}")
            } else {
                "/pause".to_owned()
            };
            runtime.block_on(post(admin, &path))
        }
        Command::Resume { admin } => runtime.block_on(post(admin, "/resume")),
        Command::Reload { admin } => runtime.block_on(post(admin, "/reload")),
        Command::Agent(options) => runtime.block_on(agent(options)),
    }
}

/// `pgvigil agent`: exit 0 after a requested stop, 2 for unusable options, 1 otherwise.
async fn agent(options: pgvigil::agent::Options) -> ExitCode {
    use pgvigil::agent::AgentError;
    match pgvigil::agent::run(options).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            eprintln!("pgvigil agent: {e}");
            match e {
                AgentError::Usage(_) | AgentError::NoToken(_) => ExitCode::from(USAGE),
                AgentError::Bind { .. } | AgentError::Init(_) => ExitCode::FAILURE,
            }
        }
    }
}

/// The admin client for `args`: the token from `--token-file`, else the environment.
fn admin_client(args: &AdminArgs) -> Result<Admin, ExitCode> {
    let token = match &args.token_file {
        Some(path) => match std::fs::read_to_string(path) {
            Ok(text) => Some(text.trim().to_owned()),
            Err(e) => {
                eprintln!("pgvigil: cannot read --token-file {}: {e}", path.display());
                return Err(ExitCode::from(USAGE));
            }
        },
        None => std::env::var(TOKEN_ENV).ok().filter(|t| !t.is_empty()),
    };
    Admin::new(&args.admin, token).map_err(|e| {
        eprintln!("pgvigil: {e}");
        ExitCode::from(USAGE)
    })
}

/// `pgvigil status`.
async fn status(args: AdminArgs) -> ExitCode {
    let admin = match admin_client(&args) {
        Ok(admin) => admin,
        Err(code) => return code,
    };
    match admin.status().await {
        Ok(Ok(status)) => {
            if args.json {
                print_json(&status);
            } else {
                print!("{}", pgvigil::admin::render::status(&status));
            }
            ExitCode::SUCCESS
        }
        Ok(Err(refusal)) => refused(&refusal, args.json),
        Err(e) => unreachable(&e),
    }
}

/// `pgvigil promote|failback|attach|detach|unfence NODE`, `pgvigil switchover`.
async fn command(args: AdminArgs, command: api::Command) -> ExitCode {
    post(args, &pgvigil::admin::client::command_path(&command)).await
}

/// Sends a command to its endpoint `path` and prints the answer.
async fn post(args: AdminArgs, path: &str) -> ExitCode {
    let admin = match admin_client(&args) {
        Ok(admin) => admin,
        Err(code) => return code,
    };
    match admin.post(path).await {
        Ok(Ok(done)) => {
            if args.json {
                print_json(&done);
            } else {
                println!("{}", done.message);
                if let Some(dry_run) = &done.dry_run {
                    print!("{}", pgvigil::admin::render::dry_run(dry_run));
                }
            }
            ExitCode::SUCCESS
        }
        Ok(Err(refusal)) => refused(&refusal, args.json),
        Err(e) => unreachable(&e),
    }
}

fn print_json(value: &impl serde::Serialize) {
    match serde_json::to_string_pretty(value) {
        Ok(text) => println!("{text}"),
        Err(e) => eprintln!("pgvigil: cannot print the answer as JSON: {e}"),
    }
}

/// Prints a refusal (JSON on stdout with `--json`, else the reason and next step on stderr).
fn refused(refusal: &Refusal, json: bool) -> ExitCode {
    if json {
        print_json(refusal);
    } else {
        eprintln!(
            "pgvigil: refused: {}\nnext: {}",
            refusal.refused, refusal.next
        );
    }
    ExitCode::from(REFUSED)
}

fn unreachable(e: &ClientError) -> ExitCode {
    eprintln!("pgvigil: {e}");
    match e {
        ClientError::BadUrl(_) => ExitCode::from(USAGE),
        ClientError::Unreachable { .. } | ClientError::Unexpected { .. } => {
            ExitCode::from(UNREACHABLE)
        }
    }
}

async fn serve(path: PathBuf) -> ExitCode {
    let config = match Config::load(&path) {
        Ok(config) => config,
        Err(e) => return config_failure(&path, &e),
    };
    let running = match pgvigil::proxy::start(config).await {
        Ok(running) => running,
        Err(e) => {
            error!("{e}");
            eprintln!("pgvigil: {e}");
            return ExitCode::FAILURE;
        }
    };
    pgvigil::signals::serve_until_stopped(&running.proxy).await;
    info!("stopping");
    running.shutdown().await;
    ExitCode::SUCCESS
}

/// Prints every configuration problem and returns exit code 2 (bad usage/config).
fn config_failure(path: &std::path::Path, e: &ConfigError) -> ExitCode {
    match e {
        ConfigError::Invalid(_) => {
            eprintln!("pgvigil: invalid configuration in {}:\n{e}", path.display())
        }
        _ => eprintln!("pgvigil: {e}"),
    }
    ExitCode::from(2)
}

fn init_logging(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// Lets the process hold as many sockets as the hard limit allows (the soft limit is often 1024,
/// too few for a proxy: each client can take two descriptors).
fn raise_open_file_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read/write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}
