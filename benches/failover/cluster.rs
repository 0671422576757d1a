//! The failover benchmark's cluster (driven by benches/failover.sh): a primary and two streaming
//! standbys built with `pgvigil::local_cluster`, with durable settings, and the fault injector.
//!
//! Prints one line per node, `node NAME PORT PID`, the primary first, then `ready`. Then reads
//! commands on stdin, one a line, and answers each with `done COMMAND AT` (AT: when the fault
//! landed, in seconds since the Unix epoch, to set against the proxy's own log) or
//! `error MESSAGE`:
//!
//! ```text
//! kill9 N    SIGKILL node N's postmaster and its children (a crash: the port refuses at once)
//! freeze N   SIGSTOP them (a hung host: the kernel accepts connections that are never served)
//! quit       stop every node and delete the directory (also on EOF and SIGTERM)
//! ```
//!
//! Node N is the index in the printed order (0: the primary the cluster was built with). Faults
//! go through this process so that the teardown knows which nodes are frozen and thaws them.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use clap::Parser;
use pgvigil::local_cluster::{ClusterSpec, LocalCluster};
use tokio::sync::mpsc;

/// Command line of the cluster process.
#[derive(Debug, Parser)]
#[command(about = "Builds a 3-node local cluster, injects faults on command, tears it down")]
struct Args {
    /// Directory for data dirs, logs and sockets: absent or empty, short (Unix socket paths),
    /// deleted at the end.
    #[arg(long)]
    dir: PathBuf,
    /// Synchronous replication: `synchronous_standby_names = '*'`, `synchronous_commit = on`.
    #[arg(long)]
    sync: bool,
}

/// A fault to inject into one node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// SIGKILL the postmaster and its children.
    Kill9,
    /// SIGSTOP the postmaster and its children.
    Freeze,
}

/// A command read from stdin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Command {
    /// Inject this fault into the node of this index.
    Fault(Fault, usize),
    /// Tear down and exit.
    Quit,
}

impl Command {
    fn parse(line: &str) -> Result<Command, String> {
        let words: Vec<&str> = line.split_whitespace().collect();
        let fault = match words.as_slice() {
            ["quit"] => return Ok(Command::Quit),
            ["kill9", _] => Fault::Kill9,
            ["freeze", _] => Fault::Freeze,
            _ => return Err(format!("cannot read {line:?}: kill9 N, freeze N or quit")),
        };
        let index = words[1]
            .parse()
            .map_err(|_| format!("{:?} is not a node index", words[1]))?;
        Ok(Command::Fault(fault, index))
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("failover_cluster: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(args))
}

async fn run(args: Args) -> ExitCode {
    let spec = spec(args.dir, args.sync);
    let mut cluster = match tokio::task::spawn_blocking(move || LocalCluster::start(spec)).await {
        Ok(Ok(cluster)) => cluster,
        Ok(Err(e)) => return fail(&e.to_string()),
        Err(e) => return fail(&format!("the cluster builder failed: {e}")),
    };
    for node in cluster.nodes() {
        let pid = node.pid().map_or_else(|| "-".to_owned(), |p| p.to_string());
        println!("node {} {} {pid}", node.name, node.port);
    }
    println!("ready");
    let mut commands = read_commands();
    let stop = pgvigil::signals::stop_requested();
    tokio::pin!(stop);
    loop {
        let line = tokio::select! {
            line = commands.recv() => line,
            () = &mut stop => None,
        };
        let Some(line) = line else { break };
        match Command::parse(&line) {
            Ok(Command::Quit) => break,
            Ok(Command::Fault(fault, index)) => match inject(&mut cluster, fault, index) {
                Ok(()) => println!("done {} {:.6}", line.trim(), unix_now()),
                Err(message) => println!("error {message}"),
            },
            Err(message) => println!("error {message}"),
        }
    }
    // Dropping the cluster thaws frozen nodes, stops them all and deletes the directory.
    let _ = tokio::task::spawn_blocking(move || drop(cluster)).await;
    ExitCode::SUCCESS
}

/// Three nodes, durable (fsync on: lost writes are what is measured), with the replication
/// timeouts of the benchmark spelled out rather than inherited from the builder's defaults.
fn spec(dir: PathBuf, sync: bool) -> ClusterSpec {
    let spec = ClusterSpec::new(dir)
        .replicas(2)
        .fast(false)
        .sync_replication(sync)
        .conf("wal_receiver_timeout", "5s")
        .conf("wal_sender_timeout", "5s")
        .conf("wal_receiver_status_interval", "1s");
    if sync {
        spec.conf("synchronous_commit", "on")
    } else {
        spec
    }
}

fn inject(cluster: &mut LocalCluster, fault: Fault, index: usize) -> Result<(), String> {
    if index >= cluster.nodes().len() {
        return Err(format!("no node {index}"));
    }
    let node = cluster.node_mut(index);
    match fault {
        Fault::Kill9 => node.kill9(),
        Fault::Freeze => node.freeze(),
    }
    Ok(())
}

/// The wall clock in seconds since the Unix epoch (0 for a clock set before it).
fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

/// Lines of stdin, read on a thread of their own (tokio's stdin needs a feature we do not
/// enable); the channel closes at EOF.
fn read_commands() -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel(8);
    std::thread::spawn(move || {
        for line in std::io::stdin().lines() {
            let Ok(line) = line else { break };
            if tx.blocking_send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn fail(message: &str) -> ExitCode {
    eprintln!("failover_cluster: {message}");
    ExitCode::FAILURE
}
