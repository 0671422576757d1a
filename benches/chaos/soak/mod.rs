//! The fault soak (issue 10, point 8): a three-node cluster with quorum-synchronous replication
//! (`synchronous_standby_names = 'ANY 1 (*)'`), pgvigil in this process reaching every node
//! through a relay that can be cut, a writer and a checker going through pgvigil, and rounds of
//! faults drawn from a seeded generator. After every round the checks of [`check`] run, then
//! the cluster is brought back to one primary and two streaming standbys (failback by
//! re-cloning, until pgvigil has a failback command) and pgvigil is restarted with an empty
//! state file when it had fenced a node, since nothing else clears a fence.
//!
//! Shared by `benches/chaos/run.rs` (the `chaos` example that benches/chaos.sh runs) and by
//! tests/it/chaos.rs; both provide `super::relay` (tests/it/support/relay.rs).

pub mod check;
pub mod load;
pub mod watch;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use pgvigil::config::Config;
use pgvigil::local_cluster::{
    ClusterError, ClusterSpec, LocalCluster, APP_DB, APP_PASSWORD, APP_USER,
};
use pgvigil::proxy::Running;
use pgvigil::topology::{Primary, Role};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use tokio_postgres::NoTls;

use super::relay::Relay;
use check::{check_round, Found, RoundReport};
use load::Load;
use watch::Watcher;

/// Writer acks that show writes flow (before a fault, and after it to call writes resumed).
const FLOWING: usize = 25;

/// Bound on anything that must happen "eventually" on a loaded two-core machine.
const PATIENCE: Duration = Duration::from_secs(60);

/// How often a condition is polled.
const POLL: Duration = Duration::from_millis(100);

/// How long a standby may take to stream again before it is re-cloned.
const STREAM_AGAIN: Duration = Duration::from_secs(15);

/// Shortest and longest freeze of the primary, and cut of pgvigil's path to it, in
/// milliseconds: the 2-10 s.
pub const HOLD_MS: std::ops::RangeInclusive<u64> = 2_000..=10_000;

/// How long a killed standby stays down before it is started again.
const STANDBY_DOWN: Duration = Duration::from_secs(2);

/// The kinds of fault a round can inject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// SIGKILL of the primary's postmaster and children.
    KillPrimary,
    /// SIGSTOP of the primary for 2-10 s, then SIGCONT.
    FreezePrimary,
    /// SIGKILL of a standby, started again after two seconds.
    KillStandby,
    /// pgvigil's path to the primary cut for 2-10 s (the standbys keep streaming), then healed.
    CutPrimaryPath,
    /// pgvigil shut down and started again with its state file, its clients disconnected.
    RestartPgvigil,
}

impl FaultKind {
    /// Every kind, in the order of the issue.
    pub const ALL: [FaultKind; 5] = [
        FaultKind::KillPrimary,
        FaultKind::FreezePrimary,
        FaultKind::KillStandby,
        FaultKind::CutPrimaryPath,
        FaultKind::RestartPgvigil,
    ];

    /// The name used on the command line and in the table.
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::KillPrimary => "kill9",
            FaultKind::FreezePrimary => "freeze",
            FaultKind::KillStandby => "kill-standby",
            FaultKind::CutPrimaryPath => "cut",
            FaultKind::RestartPgvigil => "restart",
        }
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The fault kind of every round, in order.
    pub schedule: Vec<FaultKind>,
    /// Seed of the generator drawing nodes and durations.
    pub seed: u64,
    /// Directory of the cluster (absent or empty, short: Unix socket paths); deleted at the end.
    pub dir: PathBuf,
    /// Where to copy the nodes' server logs at the end, before the cluster is deleted.
    pub node_logs: Option<PathBuf>,
    /// Lengths of freezes and cuts to draw from, in milliseconds (normally [`HOLD_MS`]).
    pub hold_ms: std::ops::RangeInclusive<u64>,
}

/// Why the soak could not run (as opposed to a violation it found).
#[derive(Debug, thiserror::Error)]
pub enum SoakError {
    /// Building or driving the cluster failed.
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    /// pgvigil did not start.
    #[error("pgvigil did not start: {0}")]
    Pgvigil(String),
    /// A client could not set up the tables.
    #[error("setting up the tables through pgvigil: {0}")]
    Setup(String),
    /// The cluster could not be brought back to three healthy nodes.
    #[error("failback: {0}")]
    Failback(String),
    /// The plan cannot run.
    #[error("{0}")]
    Plan(String),
}

/// Runs the soak; the reports of the rounds it ran, violations included.
pub async fn run(plan: Plan) -> Result<Vec<RoundReport>, SoakError> {
    if plan.schedule.is_empty() {
        return Err(SoakError::Plan("no round to run".into()));
    }
    let mut soak = Soak::start(&plan).await?;
    let mut reports = Vec::with_capacity(plan.schedule.len());
    for (round, &kind) in (1..).zip(&plan.schedule) {
        let report = soak.round(round, kind).await;
        println!("{}", check::row(&report));
        if !report.sqlstates.is_empty() {
            println!(
                "  round {round}: SQLSTATEs the clients got: {:?}",
                report.sqlstates
            );
        }
        for violation in &report.violations {
            println!("  round {round}: {violation}");
        }
        let primary = soak.primary_index(&report.primary);
        reports.push(report);
        match primary {
            Some(primary) => soak.failback(primary).await?,
            None => break,
        }
    }
    soak.stop(plan.node_logs.as_deref()).await;
    Ok(reports)
}

/// The running soak.
struct Soak {
    cluster: LocalCluster,
    /// One relay per node; pgvigil's config names the relays' ports.
    relays: Vec<Relay>,
    /// The clients' way to pgvigil: a restart resets it, so that their connections close as
    /// they would when a pgvigil process dies (an in-process shutdown leaves open sessions
    /// running on the old instance, with a topology nobody updates any more).
    front: Relay,
    config: Config,
    proxy: Option<Running>,
    load: Load,
    /// Asks the nodes directly which accept writes.
    watcher: Watcher,
    /// When pgvigil was down: from the start of a shutdown to the end of the start after it.
    restarts: Vec<(Instant, Instant)>,
    rng: StdRng,
    hold_ms: std::ops::RangeInclusive<u64>,
}

impl Soak {
    async fn start(plan: &Plan) -> Result<Soak, SoakError> {
        // fsync off: a kill -9 of PostgreSQL loses nothing the kernel holds, and durability
        // against power loss is not what the soak measures; it spares the shared disk.
        let spec = ClusterSpec::new(&plan.dir)
            .replicas(2)
            .fast(true)
            .sync_replication(true);
        let cluster = blocking(move || LocalCluster::start(spec))?;
        // Quorum commit on every node (postgresql.auto.conf, which pg_basebackup copies, so
        // re-cloned nodes have it too): a commit waits for either standby.
        for node in 0..cluster.nodes().len() {
            cluster.psql(
                node,
                "ALTER SYSTEM SET synchronous_standby_names = 'ANY 1 (*)'",
            )?;
            cluster.psql(node, "SELECT pg_reload_conf()")?;
        }
        let relays: Vec<Relay> = cluster
            .nodes()
            .iter()
            .map(|n| Relay::start(SocketAddr::from(([127, 0, 0, 1], n.port))))
            .collect();
        let mut config = pgvigil::demo::demo_config(&cluster, 0);
        for (node, relay) in config.nodes.iter_mut().zip(&relays) {
            node.port = relay.port();
        }
        config.health.interval = Duration::from_secs(1);
        config.health.failures = 2;
        config.health.timeout = Duration::from_secs(1);
        // The soak uses no admin API: a port of the system's choice, so that a pgvigil already
        // running on this host (the demo's 9998) does not stop it.
        config.admin.listen = SocketAddr::from(([127, 0, 0, 1], 0));
        let running = pgvigil::proxy::start(config.clone())
            .await
            .map_err(|e| SoakError::Pgvigil(e.to_string()))?;
        // Restarts listen where the front relay forwards.
        config.listen = running.local_addr;
        let front = Relay::start(running.local_addr);
        let conninfo = conninfo(front.port());
        let (client, connection) = tokio_postgres::connect(&conninfo, NoTls)
            .await
            .map_err(|e| SoakError::Setup(e.to_string()))?;
        tokio::spawn(connection);
        client
            .batch_execute(load::SCHEMA)
            .await
            .map_err(|e| SoakError::Setup(e.to_string()))?;
        let watcher = Watcher::start(cluster.nodes().iter().map(|n| n.port).collect());
        let soak = Soak {
            cluster,
            relays,
            front,
            config,
            proxy: Some(running),
            load: Load::start(&conninfo),
            watcher,
            restarts: Vec::new(),
            rng: StdRng::seed_from_u64(plan.seed),
            hold_ms: plan.hold_ms.clone(),
        };
        soak.wait_streaming(0)?;
        Ok(soak)
    }

    /// Starts pgvigil again on its port.
    async fn start_pgvigil(&mut self) -> Result<(), SoakError> {
        let running = pgvigil::proxy::start(self.config.clone())
            .await
            .map_err(|e| SoakError::Pgvigil(e.to_string()))?;
        self.proxy = Some(running);
        Ok(())
    }

    /// Shuts pgvigil down and starts it again; with `forget`, its state file is deleted first.
    async fn restart_pgvigil(&mut self, forget: bool) -> Result<(), SoakError> {
        let down = Instant::now();
        if let Some(running) = self.proxy.take() {
            running.shutdown().await;
        }
        self.front.reset();
        if forget {
            if let Some(dir) = &self.config.failover.state_dir {
                if dir.exists() {
                    std::fs::remove_dir_all(dir).map_err(|e| {
                        SoakError::Failback(format!("deleting {}: {e}", dir.display()))
                    })?;
                }
            }
        }
        let started = self.start_pgvigil().await;
        self.restarts.push((down, Instant::now()));
        started
    }

    /// The node pgvigil routes writes to, if it has one.
    fn routed_primary(&self) -> Option<usize> {
        let proxy = self.proxy.as_ref()?;
        match proxy.proxy.topology.snapshot().primary {
            Primary::Known(node) => Some(node),
            Primary::Unavailable(_) => None,
        }
    }

    fn primary_index(&self, name: &str) -> Option<usize> {
        self.cluster.nodes().iter().position(|n| n.name == name)
    }

    fn name(&self, node: usize) -> String {
        self.cluster.node(node).name.clone()
    }

    /// Waits up to `deadline` for `check`; false if it never held.
    async fn eventually(&self, deadline: Duration, mut check: impl FnMut(&Self) -> bool) -> bool {
        let give_up = Instant::now() + deadline;
        loop {
            if check(self) {
                return true;
            }
            if Instant::now() >= give_up {
                return false;
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// One round: warm up, inject `kind`, wait for writes, check.
    async fn round(&mut self, round: usize, kind: FaultKind) -> RoundReport {
        let began = Instant::now();
        let mut report = RoundReport {
            round,
            ..RoundReport::default()
        };
        let Some(primary) = self.routed_primary() else {
            report.fault = kind.name().into();
            report
                .violations
                .push("no primary at the start of the round".into());
            return report;
        };
        if !self
            .eventually(PATIENCE, |s| s.load.writer_acks_after(began) >= FLOWING)
            .await
        {
            report
                .violations
                .push("writes did not flow before the fault".into());
        }
        tracing::info!(round, kind = kind.name(), primary = %self.name(primary), "chaos: fault begins");
        report.fault = self.inject(kind, primary).await;
        tracing::info!(round, fault = %report.fault, "chaos: fault over");
        let after = Instant::now();
        if !self
            .eventually(PATIENCE, |s| s.load.writer_acks_after(after) >= FLOWING)
            .await
        {
            report.violations.push(format!(
                "writes did not resume within {PATIENCE:?} of the fault's end"
            ));
        }
        let settled = self
            .eventually(PATIENCE, |s| {
                s.routed_primary().is_some_and(|p| {
                    s.cluster
                        .psql(p, "SELECT pg_is_in_recovery()")
                        .is_ok_and(|r| r == "f")
                })
            })
            .await;
        let Some(now_primary) = self.routed_primary().filter(|_| settled) else {
            report
                .violations
                .push("pgvigil routes writes to no node out of recovery".into());
            return report;
        };
        report.primary = self.name(now_primary);
        (report.two_writable_windows, report.two_writable) =
            watch::two_writable(&self.watcher.since(began));
        let log = self.load.log();
        match self.found(now_primary) {
            Ok(found) => check_round(&mut report, &log, &found, began, &self.restarts),
            Err(e) => report
                .violations
                .push(format!("cannot read the primary's rows: {e}")),
        }
        tracing::info!(
            round,
            violations = report.violations.len(),
            "chaos: round checked"
        );
        report
    }

    /// Injects one fault of `kind`; returns its description. Returns once the fault is over
    /// (the node thawed, restarted or the path healed) or, for a kill of the primary, at once.
    async fn inject(&mut self, kind: FaultKind, primary: usize) -> String {
        let name = self.name(primary);
        match kind {
            FaultKind::KillPrimary => {
                blocking(|| self.cluster.node_mut(primary).kill9());
                format!("kill9 {name}")
            }
            FaultKind::FreezePrimary => {
                let hold = Duration::from_millis(self.rng.random_range(self.hold_ms.clone()));
                blocking(|| self.cluster.node_mut(primary).freeze());
                tokio::time::sleep(hold).await;
                blocking(|| self.cluster.node_mut(primary).thaw());
                format!("freeze {name} {:.1}s", hold.as_secs_f64())
            }
            FaultKind::KillStandby => {
                let standbys: Vec<usize> = (0..self.cluster.nodes().len())
                    .filter(|&n| n != primary)
                    .collect();
                let standby = standbys[self.rng.random_range(0..standbys.len())];
                blocking(|| self.cluster.node_mut(standby).kill9());
                tokio::time::sleep(STANDBY_DOWN).await;
                let restarted = blocking(|| self.cluster.node_mut(standby).start());
                let standby_name = self.name(standby);
                match restarted {
                    Ok(()) => format!("kill9 standby {standby_name}"),
                    Err(e) => format!("kill9 standby {standby_name} (restart failed: {e})"),
                }
            }
            FaultKind::CutPrimaryPath => {
                let hold = Duration::from_millis(self.rng.random_range(self.hold_ms.clone()));
                self.relays[primary].cut();
                tokio::time::sleep(hold).await;
                self.relays[primary].heal();
                format!("cut {name} {:.1}s", hold.as_secs_f64())
            }
            FaultKind::RestartPgvigil => match self.restart_pgvigil(false).await {
                Ok(()) => "restart pgvigil".into(),
                Err(e) => format!("restart pgvigil ({e})"),
            },
        }
    }

    /// The load's rows on node `node`, read directly as the superuser.
    fn found(&self, node: usize) -> Result<Found, String> {
        let read = |sql: &str| {
            blocking(|| self.cluster.psql_in(node, APP_DB, sql)).map_err(|e| e.to_string())
        };
        let ticks = read("SELECT coalesce(string_agg(id::text, ','), '') FROM chaos_ticks")?;
        let pairs = read(
            "SELECT coalesce(string_agg(txn || ':' || n, ','), '') \
             FROM (SELECT txn, count(*) AS n FROM chaos_pairs GROUP BY txn) AS t",
        )?;
        Found::parse(&ticks, &pairs)
    }

    /// Brings the cluster back to `primary` and two standbys streaming from it, each through
    /// its real port; re-clones a node that does not stream again, and restarts pgvigil with
    /// an empty state file when it fenced a node or a node was re-cloned.
    async fn failback(&mut self, primary: usize) -> Result<(), SoakError> {
        let mut recloned = false;
        for node in (0..self.cluster.nodes().len()).filter(|&n| n != primary) {
            let name = self.name(node);
            // A node out of recovery (an old primary) or down needs no wait to be re-cloned.
            let standby = blocking(|| self.cluster.psql(node, "SELECT pg_is_in_recovery()"))
                .is_ok_and(|r| r == "t");
            let streams = standby
                && self
                    .eventually(STREAM_AGAIN, |s| s.streams_from(node, primary))
                    .await;
            if !streams {
                tracing::info!(node = %name, "chaos: failback by re-cloning");
                blocking(|| self.cluster.reclone(node, primary))?;
                recloned = true;
            }
            self.point_at(node, primary)?;
        }
        let fenced = self.proxy.as_ref().is_some_and(|p| {
            p.proxy
                .topology
                .snapshot()
                .nodes
                .iter()
                .any(|n| n.role == Role::Fenced)
        });
        if recloned || fenced {
            self.restart_pgvigil(true).await?;
        }
        self.wait_streaming(primary)?;
        let healthy = self
            .eventually(PATIENCE, |s| {
                s.proxy.as_ref().is_some_and(|p| {
                    let topology = p.proxy.topology.snapshot();
                    topology.primary == Primary::Known(primary)
                        && topology.nodes.iter().all(|n| n.role.is_usable())
                })
            })
            .await;
        if !healthy {
            return Err(SoakError::Failback(
                "pgvigil does not see one primary and two standbys".into(),
            ));
        }
        Ok(())
    }

    /// Whether `node` is in recovery and streams from `primary` (asked on the primary, by the
    /// node's application_name).
    fn streams_from(&self, node: usize, primary: usize) -> bool {
        let sql = format!(
            "SELECT count(*) FROM pg_stat_replication WHERE application_name = '{}' \
             AND state = 'streaming'",
            self.name(node)
        );
        let streaming = blocking(|| self.cluster.psql(primary, &sql)).is_ok_and(|n| n == "1");
        streaming
            && blocking(|| self.cluster.psql(node, "SELECT pg_is_in_recovery()"))
                .is_ok_and(|r| r == "t")
    }

    /// Points standby `node` at `primary`'s real port when pgvigil's repointing left it on the
    /// relay: a later cut of pgvigil's path must not cut replication too.
    fn point_at(&self, node: usize, primary: usize) -> Result<(), SoakError> {
        let port = self.cluster.node(primary).port;
        let current = blocking(|| self.cluster.psql(node, "SHOW primary_conninfo"))?;
        if current.contains(&format!("port={port}")) || current.contains(&format!("port='{port}'"))
        {
            return Ok(());
        }
        let conninfo = format!(
            "host=127.0.0.1 port={port} user=postgres application_name={}",
            self.name(node)
        );
        blocking(|| {
            self.cluster.psql(
                node,
                &format!("ALTER SYSTEM SET primary_conninfo = '{conninfo}'"),
            )?;
            self.cluster.psql(node, "SELECT pg_reload_conf()")
        })?;
        Ok(())
    }

    /// Waits until both standbys stream from `primary` and one of them confirms commits.
    fn wait_streaming(&self, primary: usize) -> Result<(), SoakError> {
        let sql = "SELECT count(*) FILTER (WHERE state = 'streaming') || ',' || \
                   count(*) FILTER (WHERE sync_state IN ('sync', 'quorum')) FROM pg_stat_replication";
        let give_up = Instant::now() + PATIENCE;
        loop {
            let seen = blocking(|| self.cluster.psql(primary, sql))?;
            if seen == "2,2" || seen == "2,1" {
                return Ok(());
            }
            if Instant::now() >= give_up {
                return Err(SoakError::Failback(format!(
                    "standbys streaming, synchronous on {}: {seen} after {PATIENCE:?}",
                    self.name(primary)
                )));
            }
            std::thread::sleep(POLL);
        }
    }

    /// Stops the load, pgvigil and the nodes, copying the nodes' logs to `node_logs` first.
    async fn stop(self, node_logs: Option<&std::path::Path>) {
        let Soak {
            cluster,
            relays,
            front,
            proxy,
            load,
            watcher,
            ..
        } = self;
        load.stop().await;
        watcher.stop().await;
        if let Some(dir) = node_logs {
            for node in cluster.nodes() {
                let copied = std::fs::create_dir_all(dir).and_then(|()| {
                    std::fs::copy(node.log_path(), dir.join(format!("{}.log", node.name)))
                });
                if let Err(e) = copied {
                    eprintln!(
                        "chaos: cannot copy the log of {} to {}: {e}",
                        node.name,
                        dir.display()
                    );
                }
            }
        }
        if let Some(running) = proxy {
            running.shutdown().await;
        }
        // Dropping the relays and the cluster (thawing, stopping, deleting) blocks.
        blocking(move || drop((front, relays, cluster)));
    }
}

/// The connection string of the load: pgvigil through the front relay on `port`, as `app`.
fn conninfo(port: u16) -> String {
    format!("host=127.0.0.1 port={port} user={APP_USER} password={APP_PASSWORD} dbname={APP_DB}")
}

/// Runs blocking cluster work on this worker thread without stalling the load's tasks (they
/// move to other workers); the runtime must be multi-threaded.
fn blocking<T>(work: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(work)
}
