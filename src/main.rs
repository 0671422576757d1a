//! The `pgvigil` command: run the proxy, or a local demo cluster with the proxy in front.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use pgvigil::config::{Config, ConfigError};
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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log);
    raise_open_file_limit();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
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
    pgvigil::signals::stop_requested().await;
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
