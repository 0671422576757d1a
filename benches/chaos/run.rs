//! The fault soak (run by benches/chaos.sh): rounds of random faults against a three-node
//! cluster with synchronous replication under a writer and a checker going through pgvigil,
//! with the checks of `soak::check` after every round. Prints one line per round, then the
//! table; exits 1 on any violation, 2 when the soak itself could not run.
//!
//! pgvigil runs in this process, its log goes to `--log`; every round writes a
//! "chaos: fault injected" line there, to find what pgvigil did around a violation.

#[path = "../../tests/it/support/relay.rs"]
mod relay;
mod soak;

use std::fs::File;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Mutex;

use clap::Parser;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use soak::{FaultKind, Plan};

/// Command line of the soak.
#[derive(Debug, Parser)]
#[command(about = "Rounds of random faults under load through pgvigil, checked after each")]
struct Args {
    /// Number of rounds.
    #[arg(long, default_value_t = 30)]
    rounds: usize,
    /// Seed of the fault generator (default: drawn, and printed so that a run can be repeated).
    #[arg(long)]
    seed: Option<u64>,
    /// Fault kinds to draw from, comma-separated: kill9, freeze, kill-standby, cut, restart.
    #[arg(long, default_value = "kill9,freeze,kill-standby,cut,restart")]
    faults: String,
    /// Draw the faults at random, or take the kinds in turn.
    #[arg(long, value_enum, default_value_t = Order::Random)]
    order: Order,
    /// Directory for the cluster: absent or empty, short (Unix socket paths), deleted at the end.
    #[arg(long)]
    dir: PathBuf,
    /// File receiving pgvigil's log.
    #[arg(long)]
    log: PathBuf,
    /// Shortest and longest freeze and cut, in milliseconds, as MIN-MAX (the 2-10 s by
    /// default; narrow it to aim at a moment, e.g. 2800-3200 for a thaw during the promotion).
    #[arg(long)]
    hold_ms: Option<String>,
    /// Directory receiving a copy of every node's server log at the end.
    #[arg(long)]
    node_logs: Option<PathBuf>,
}

/// How rounds pick their fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Order {
    /// Drawn by the seeded generator.
    Random,
    /// The kinds of `--faults` in turn.
    InTurn,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let kinds: Result<Vec<FaultKind>, String> = args
        .faults
        .split(',')
        .map(|name| {
            let name = name.trim();
            FaultKind::ALL
                .into_iter()
                .find(|k| k.name() == name)
                .ok_or_else(|| format!("unknown fault kind {name:?}"))
        })
        .collect();
    let kinds = match kinds {
        Ok(kinds) => kinds,
        Err(message) => return fail(&message),
    };
    let hold_ms = match args.hold_ms.as_deref().map(parse_range) {
        None => soak::HOLD_MS,
        Some(Some(range)) => range,
        Some(None) => return fail("--hold-ms: MIN-MAX in milliseconds, MIN <= MAX"),
    };
    let log = match File::create(&args.log) {
        Ok(file) => file,
        Err(e) => return fail(&format!("cannot create {}: {e}", args.log.display())),
    };
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
        .with_ansi(false)
        .with_writer(Mutex::new(log))
        .init();
    let seed = args.seed.unwrap_or_else(rand::random);
    println!(
        "chaos: {} rounds, seed {seed}, faults {}, pgvigil log {}",
        args.rounds,
        args.faults,
        args.log.display()
    );
    // The schedule has a generator of its own, so that the same seed gives the same faults
    // whatever the rounds draw for durations and nodes.
    let mut draw = StdRng::seed_from_u64(seed);
    let schedule = (0..args.rounds)
        .map(|round| match args.order {
            Order::Random => kinds[draw.random_range(0..kinds.len())],
            Order::InTurn => kinds[round % kinds.len()],
        })
        .collect();
    let plan = Plan {
        schedule,
        seed,
        dir: args.dir,
        node_logs: args.node_logs,
        hold_ms,
    };
    // Multi-threaded: cluster work blocks a worker while the load runs on the other.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => return fail(&format!("cannot start the runtime: {e}")),
    };
    // On SIGINT or SIGTERM the soak is dropped, and with it the cluster: its nodes are thawed,
    // stopped and deleted instead of outliving this process.
    let outcome = runtime.block_on(async {
        tokio::select! {
            outcome = soak::run(plan) => Some(outcome),
            () = pgvigil::signals::stop_requested() => None,
        }
    });
    let Some(outcome) = outcome else {
        eprintln!("chaos: interrupted (seed {seed})");
        return ExitCode::from(2);
    };
    match outcome {
        Ok(reports) => {
            println!();
            print!("{}", soak::check::table(&reports));
            println!("seed {seed}");
            let violated =
                reports.len() < args.rounds || reports.iter().any(|r| !r.violations.is_empty());
            if violated {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            eprintln!("chaos: {e} (seed {seed})");
            ExitCode::from(2)
        }
    }
}

/// `MIN-MAX` as a range, `None` unless both are numbers and MIN <= MAX.
fn parse_range(text: &str) -> Option<std::ops::RangeInclusive<u64>> {
    let (min, max) = text.split_once('-')?;
    let (min, max) = (min.parse().ok()?, max.parse().ok()?);
    (min <= max).then_some(min..=max)
}

fn fail(message: &str) -> ExitCode {
    eprintln!("chaos: {message}");
    ExitCode::from(2)
}
