//! Prometheus metrics (`GET /metrics` on the admin listener).
//!
//! Each proxy owns its recorder rather than installing a global one: several proxies may run in
//! one process (the integration tests do), and each must report only its own traffic. Handles
//! for the hot path (units per node and kind, their latency, probes) are registered once here,
//! so recording is an atomic add with no key lookup or allocation. What the proxy already keeps
//! (node roles and health, lag, pool sizes, the topology generation) is copied into gauges when
//! `/metrics` is scraped, so it costs nothing between scrapes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Label, Metadata, Recorder, Unit};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusRecorder};

mod histogram;

use histogram::LatencyHistogram;

use crate::admin::api::Status;
use crate::pause::Traffic;
use crate::topology::NodeId;

/// Latency buckets in seconds, from half a millisecond to ten seconds (wave2.md §6.4).
const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// What a routed unit was, for `pgvigil_units_total{kind}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnitKind {
    /// Provably read-only, sent where reads may go.
    Read,
    /// May write: sent to the primary.
    Write,
    /// The session is pinned to its node (session state that cannot be replayed).
    Pinned,
    /// Sent where a routing hint comment asked.
    Hinted,
}

impl UnitKind {
    const ALL: [UnitKind; 4] = [
        UnitKind::Read,
        UnitKind::Write,
        UnitKind::Pinned,
        UnitKind::Hinted,
    ];

    fn as_str(self) -> &'static str {
        match self {
            UnitKind::Read => "read",
            UnitKind::Write => "write",
            UnitKind::Pinned => "pinned",
            UnitKind::Hinted => "hinted",
        }
    }
}

/// Why a client was turned away, for `pgvigil_rejected_clients_total{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// `max_client_conn` sessions were open already.
    TooManyClients,
    /// Its password or authentication method was refused (SQLSTATE class 28).
    Authentication,
    /// Its startup was refused for another reason (protocol, TLS, unknown database).
    Startup,
    /// It was authenticated but no node could start its session.
    NoServer,
}

impl Rejection {
    const ALL: [Rejection; 4] = [
        Rejection::TooManyClients,
        Rejection::Authentication,
        Rejection::Startup,
        Rejection::NoServer,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Rejection::TooManyClients => "too_many_clients",
            Rejection::Authentication => "authentication",
            Rejection::Startup => "startup",
            Rejection::NoServer => "no_server",
        }
    }
}

/// A phase of the last failover, for `pgvigil_last_failover_phase_seconds{phase}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailoverPhase {
    /// From finding the primary lost to choosing the standby.
    Decide,
    /// From choosing the standby to writes going to it.
    Promote,
}

impl FailoverPhase {
    const ALL: [FailoverPhase; 2] = [FailoverPhase::Decide, FailoverPhase::Promote];

    fn as_str(self) -> &'static str {
        match self {
            FailoverPhase::Decide => "decide",
            FailoverPhase::Promote => "promote",
        }
    }
}

/// What a node has served so far (SHOW STATS), in plain counters read back by the console.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    /// Transactions ended (an autocommit unit, or the unit that ended a block).
    pub transactions: u64,
    /// Units served.
    pub units: u64,
    /// Their time in all, in microseconds.
    pub unit_us: u64,
    /// Bytes received from clients.
    pub received: u64,
    /// Bytes sent to clients.
    pub sent: u64,
}

/// The bytes a session moved for the units it ran on one node since the last count.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Bytes {
    /// From the client.
    pub received: u64,
    /// To the client.
    pub sent: u64,
}

/// The handles of one node's hot-path metrics.
struct NodeMetrics {
    /// The node's configured name.
    name: String,
    /// `pgvigil_client_received_bytes_total{node}`, `pgvigil_client_sent_bytes_total{node}`.
    received: Counter,
    sent: Counter,
    /// The same sums, readable for SHOW STATS.
    xacts_sum: AtomicU64,
    units_sum: AtomicU64,
    unit_us_sum: AtomicU64,
    received_sum: AtomicU64,
    sent_sum: AtomicU64,
    /// `pgvigil_units_total{node, kind}`, indexed like [`UnitKind::ALL`].
    units: [Counter; 4],
    /// `pgvigil_unit_duration_seconds{node}`, rendered by pgvigil (count and sum are
    /// `units_sum` and `unit_us_sum`).
    unit_duration: LatencyHistogram,
    probe_duration: Histogram,
    probe_failures: Counter,
}

/// The proxy's metrics: its recorder and the handles registered at start.
pub struct Metrics {
    recorder: PrometheusRecorder,
    /// Indexed by node id; grows when a reload adds a node (a node removed keeps its slot, and
    /// its counters keep their totals).
    nodes: boxcar::Vec<NodeMetrics>,
    failovers: Counter,
    switchovers: Counter,
    failbacks: Counter,
    /// Indexed like [`FailoverPhase::ALL`].
    last_failover: [Gauge; 2],
    /// Indexed like [`Rejection::ALL`].
    rejected: [Counter; 4],
    /// Client connections accepted and not yet closed (logged in or not).
    clients_open: AtomicU64,
}

/// The logged-in clients by what they do, counted when `/metrics` is scraped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClientCounts {
    /// Logged-in client sessions (console included).
    pub logged_in: usize,
    /// Of those, running a unit or inside a transaction block.
    pub active: usize,
    /// Of those, with a unit waiting (held by PAUSE, or for a primary).
    pub waiting: usize,
}

/// The per-unit and probe handles of the node called `name`.
fn node_metrics(recorder: &PrometheusRecorder, name: &str) -> NodeMetrics {
    let node = || Label::new("node", name.to_owned());
    NodeMetrics {
        name: name.to_owned(),
        units: UnitKind::ALL.map(|kind| {
            recorder.register_counter(
                &Key::from_parts(
                    "pgvigil_units_total",
                    vec![node(), Label::new("kind", kind.as_str())],
                ),
                &METADATA,
            )
        }),
        unit_duration: LatencyHistogram::default(),
        probe_duration: recorder.register_histogram(
            &Key::from_parts("pgvigil_probe_duration_seconds", vec![node()]),
            &METADATA,
        ),
        probe_failures: recorder.register_counter(
            &Key::from_parts("pgvigil_probe_failures_total", vec![node()]),
            &METADATA,
        ),
        received: recorder.register_counter(
            &Key::from_parts("pgvigil_client_received_bytes_total", vec![node()]),
            &METADATA,
        ),
        sent: recorder.register_counter(
            &Key::from_parts("pgvigil_client_sent_bytes_total", vec![node()]),
            &METADATA,
        ),
        xacts_sum: AtomicU64::new(0),
        units_sum: AtomicU64::new(0),
        unit_us_sum: AtomicU64::new(0),
        received_sum: AtomicU64::new(0),
        sent_sum: AtomicU64::new(0),
    }
}

/// Where the metrics macros' call sites would be; the exporter ignores it but the API asks.
static METADATA: Metadata<'static> =
    Metadata::new(module_path!(), metrics::Level::INFO, Some(module_path!()));

impl Default for Metrics {
    /// A recorder with the latency buckets and no node yet ([`Metrics::add_node`] adds them).
    fn default() -> Metrics {
        // `set_buckets` only fails on an empty list, and ours is not; without buckets
        // histograms would render as summaries, which cannot be aggregated across instances.
        let builder = PrometheusBuilder::new()
            .set_buckets(&LATENCY_BUCKETS)
            .unwrap_or_else(|_| PrometheusBuilder::new());
        let recorder = builder.build_recorder();
        describe(&recorder);
        let nodes = boxcar::Vec::new();
        let counter = |name: &'static str| {
            let counter = recorder.register_counter(&Key::from_name(name), &METADATA);
            // Present from the start, so that a dashboard shows 0 rather than no data.
            counter.absolute(0);
            counter
        };
        let failovers = counter("pgvigil_failovers_total");
        let switchovers = counter("pgvigil_switchovers_total");
        let failbacks = counter("pgvigil_failbacks_total");
        let last_failover = FailoverPhase::ALL.map(|phase| {
            recorder.register_gauge(
                &Key::from_parts(
                    "pgvigil_last_failover_phase_seconds",
                    vec![Label::new("phase", phase.as_str())],
                ),
                &METADATA,
            )
        });
        let rejected = Rejection::ALL.map(|reason| {
            let counter = recorder.register_counter(
                &Key::from_parts(
                    "pgvigil_rejected_clients_total",
                    vec![Label::new("reason", reason.as_str())],
                ),
                &METADATA,
            );
            counter.absolute(0);
            counter
        });
        recorder
            .register_gauge(
                &Key::from_parts(
                    "pgvigil_build_info",
                    vec![Label::new("version", env!("CARGO_PKG_VERSION"))],
                ),
                &METADATA,
            )
            .set(1.0);
        Metrics {
            recorder,
            nodes,
            failovers,
            switchovers,
            failbacks,
            last_failover,
            rejected,
            clients_open: AtomicU64::new(0),
        }
    }
}

impl Metrics {
    /// A unit of `kind` on `node` finished after `took`, having moved `bytes` (counted by the
    /// session since its last unit: one flush per unit, nothing per message); `ended_transaction`:
    /// the session is no longer in a transaction block after it.
    pub fn unit_done(
        &self,
        node: NodeId,
        kind: UnitKind,
        took: Duration,
        bytes: Bytes,
        ended_transaction: bool,
    ) {
        if let Some(m) = self.nodes.get(node) {
            let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
            m.units[kind as usize].increment(1);
            m.unit_duration.record(micros);
            m.received.increment(bytes.received);
            m.sent.increment(bytes.sent);
            if ended_transaction {
                m.xacts_sum.fetch_add(1, Ordering::Relaxed);
            }
            m.units_sum.fetch_add(1, Ordering::Relaxed);
            m.unit_us_sum.fetch_add(micros, Ordering::Relaxed);
            m.received_sum.fetch_add(bytes.received, Ordering::Relaxed);
            m.sent_sum.fetch_add(bytes.sent, Ordering::Relaxed);
        }
    }

    /// What `node` has served so far.
    pub fn totals(&self, node: NodeId) -> Totals {
        self.nodes
            .get(node)
            .map_or_else(Totals::default, |m| Totals {
                transactions: m.xacts_sum.load(Ordering::Relaxed),
                units: m.units_sum.load(Ordering::Relaxed),
                unit_us: m.unit_us_sum.load(Ordering::Relaxed),
                received: m.received_sum.load(Ordering::Relaxed),
                sent: m.sent_sum.load(Ordering::Relaxed),
            })
    }

    /// A probe of `node` finished after `took`, failed or not.
    pub fn probe_done(&self, node: NodeId, took: Duration, failed: bool) {
        if let Some(m) = self.nodes.get(node) {
            m.probe_duration.record(took.as_secs_f64());
            if failed {
                m.probe_failures.increment(1);
            }
        }
    }

    /// A standby was promoted in place of a lost primary; `phases` gives each phase's time.
    pub fn failover_done(&self, phases: [(FailoverPhase, Duration); 2]) {
        self.failovers.increment(1);
        for (phase, took) in phases {
            self.last_failover[phase as usize].set(took.as_secs_f64());
        }
    }

    /// A switchover handed the primary role over.
    pub fn switchover_done(&self) {
        self.switchovers.increment(1);
    }

    /// A former primary streams as a standby again.
    pub fn failback_done(&self) {
        self.failbacks.increment(1);
    }

    /// A client was turned away.
    pub fn client_rejected(&self, reason: Rejection) {
        self.rejected[reason as usize].increment(1);
    }

    /// `pgvigil_accepted_clients_total{thread}`: the counter of data-plane thread `thread`.
    pub fn accepted_on(&self, thread: usize) -> Counter {
        let label = Label::new("thread", thread.to_string());
        let key = Key::from_parts("pgvigil_accepted_clients_total", vec![label]);
        let counter = self.recorder.register_counter(&key, &METADATA);
        // Present from the start, so that every thread shows, 0 or not.
        counter.absolute(0);
        counter
    }

    /// A client connection was accepted.
    pub fn client_opened(&self) {
        self.clients_open.fetch_add(1, Ordering::Relaxed);
    }

    /// A client connection closed.
    pub fn client_closed(&self) {
        self.clients_open.fetch_sub(1, Ordering::Relaxed);
    }

    /// Handles for a node a reload added, as the started nodes have them: its id must be the
    /// next one (the number of nodes so far).
    pub fn add_node(&self, node: NodeId, name: &str) {
        if node == self.nodes.count() {
            self.nodes.push(node_metrics(&self.recorder, name));
        }
    }

    /// The `pgvigil_pool_waits_total` and `pgvigil_pool_wait_seconds` handles of the node
    /// called `name`, for its pool to record the checkouts that had to wait.
    pub fn pool_wait(&self, name: &str) -> crate::pool::WaitMetrics {
        let node = || vec![Label::new("node", name.to_owned())];
        let waits = self.recorder.register_counter(
            &Key::from_parts("pgvigil_pool_waits_total", node()),
            &METADATA,
        );
        waits.absolute(0);
        crate::pool::WaitMetrics {
            waits,
            seconds: self.recorder.register_histogram(
                &Key::from_parts("pgvigil_pool_wait_seconds", node()),
                &METADATA,
            ),
        }
    }

    /// The text exposition as of now: the gauges read from `status` and `clients` first, then
    /// everything.
    pub fn render(&self, status: &Status, clients: ClientCounts) -> String {
        let gauge = |name: &'static str, labels: Vec<Label>, value: f64| {
            self.recorder
                .register_gauge(&Key::from_parts(name, labels), &METADATA)
                .set(value);
        };
        // Lossy u64 → f64 is fine for a gauge: Prometheus values are f64.
        gauge(
            "pgvigil_topology_generation",
            vec![],
            status.generation as f64,
        );
        let open = usize::try_from(self.clients_open.load(Ordering::Relaxed)).unwrap_or(0);
        let idle = clients
            .logged_in
            .saturating_sub(clients.active + clients.waiting);
        for (state, count) in [
            ("login", open.saturating_sub(clients.logged_in)),
            ("idle", idle),
            ("active", clients.active),
            ("waiting", clients.waiting),
        ] {
            gauge(
                "pgvigil_client_connections",
                vec![Label::new("state", state)],
                count as f64,
            );
        }
        gauge(
            "pgvigil_paused",
            vec![],
            f64::from(u8::from(status.traffic == Traffic::Paused)),
        );
        let node_gauges = |name: &str, values: [f64; 8]| {
            let label = || vec![Label::new("node", name.to_owned())];
            let [up, primary, timeline, lag_bytes, replay_lag, idle, active, read_sessions] =
                values;
            gauge("pgvigil_node_up", label(), up);
            gauge("pgvigil_node_is_primary", label(), primary);
            gauge("pgvigil_node_timeline", label(), timeline);
            gauge("pgvigil_node_replication_lag_bytes", label(), lag_bytes);
            gauge("pgvigil_node_replay_lag_seconds", label(), replay_lag);
            gauge("pgvigil_node_read_sessions", label(), read_sessions);
            for (state, count) in [("idle", idle), ("active", active)] {
                gauge(
                    "pgvigil_server_connections",
                    vec![
                        Label::new("node", name.to_owned()),
                        Label::new("state", state),
                    ],
                    count,
                );
            }
        };
        for node in &status.nodes {
            let idle = node.idle_connections;
            node_gauges(
                &node.name,
                [
                    f64::from(u8::from(node.health == "up")),
                    f64::from(u8::from(node.role == "primary")),
                    node.timeline.map_or(0.0, f64::from),
                    node.lag_bytes.unwrap_or(0) as f64,
                    node.replay_delay_ms.unwrap_or(0) as f64 / 1000.0,
                    idle as f64,
                    node.connections.saturating_sub(idle) as f64,
                    node.read_sessions as f64,
                ],
            );
        }
        // A node a reload removed keeps its series (the exporter cannot drop them): its
        // gauges read 0, its counters keep their totals.
        for (_, m) in &self.nodes {
            if !status.nodes.iter().any(|n| n.name == m.name) {
                node_gauges(&m.name, [0.0; 8]);
            }
        }
        // Rendering ourselves means no upkeep task runs: do it here, or histograms grow
        // without bound (metrics-exporter-prometheus, "Upkeep and maintenance").
        let handle = self.recorder.handle();
        handle.run_upkeep();
        let mut text = handle.render();
        let name = "pgvigil_unit_duration_seconds";
        text.push_str(&format!("# HELP {name} {UNIT_DURATION_HELP}\n"));
        text.push_str(&format!("# TYPE {name} histogram\n"));
        for (_, m) in &self.nodes {
            let sum = m.unit_us_sum.load(Ordering::Relaxed);
            m.unit_duration.render(name, &m.name, sum, &mut text);
        }
        text
    }
}

/// `pgvigil_unit_duration_seconds`' help (rendered by pgvigil, see `histogram`).
const UNIT_DURATION_HELP: &str =
    "Time from forwarding a unit to its node until the node answered all of it";

/// Help text and units for every metric.
fn describe(recorder: &PrometheusRecorder) {
    let counters: [(&'static str, &'static str); 10] = [
        (
            "pgvigil_accepted_clients_total",
            "Client connections accepted, per data-plane thread (see the threads key)",
        ),
        (
            "pgvigil_pool_waits_total",
            "Checkouts that found no free server connection and waited, per node",
        ),
        (
            "pgvigil_client_received_bytes_total",
            "Bytes received from clients, per node their units went to",
        ),
        (
            "pgvigil_client_sent_bytes_total",
            "Bytes sent to clients, per node that answered",
        ),
        ("pgvigil_switchovers_total", "Switchovers carried out"),
        (
            "pgvigil_failbacks_total",
            "Former primaries brought back as standbys",
        ),
        (
            "pgvigil_rejected_clients_total",
            "Clients turned away, per reason",
        ),
        (
            "pgvigil_units_total",
            "Units (a statement, or a transaction's statements sent as one) routed, per node and kind",
        ),
        (
            "pgvigil_probe_failures_total",
            "Health probes that failed, per node",
        ),
        (
            "pgvigil_failovers_total",
            "Standbys promoted in place of a lost primary",
        ),
    ];
    for (name, help) in counters {
        recorder.describe_counter(KeyName::from(name), None, help.into());
    }
    let histograms: [(&'static str, &'static str); 2] = [
        (
            "pgvigil_pool_wait_seconds",
            "How long checkouts that waited for a server connection waited, per node",
        ),
        (
            "pgvigil_probe_duration_seconds",
            "Time a health probe took, per node",
        ),
    ];
    for (name, help) in histograms {
        recorder.describe_histogram(KeyName::from(name), Some(Unit::Seconds), help.into());
    }
    let gauges: [(&'static str, &'static str); 12] = [
        (
            "pgvigil_paused",
            "1 while `pgvigil pause` holds new transactions",
        ),
        (
            "pgvigil_last_failover_phase_seconds",
            "How long each phase of the last failover took",
        ),
        ("pgvigil_build_info", "Always 1; the version is a label"),
        (
            "pgvigil_client_connections",
            "Client connections by state: login (not logged in yet), idle, active (in a unit or transaction), waiting (held by PAUSE or for a primary)",
        ),
        (
            "pgvigil_server_connections",
            "Server connections held, per node and state (idle in the pool, active lent to a session)",
        ),
        ("pgvigil_topology_generation", "The topology's generation: it grows with every change"),
        ("pgvigil_node_up", "1 when the node's last probes succeeded"),
        ("pgvigil_node_is_primary", "1 for the node writes go to"),
        ("pgvigil_node_timeline", "The node's timeline at its last probe"),
        (
            "pgvigil_node_replication_lag_bytes",
            "Bytes of WAL a standby is behind the primary",
        ),
        (
            "pgvigil_node_replay_lag_seconds",
            "How far a standby's replay is behind, in seconds",
        ),
        (
            "pgvigil_node_read_sessions",
            "Client sessions whose reads stay on the node (routing.read_affinity = \"session\")",
        ),
    ];
    for (name, help) in gauges {
        recorder.describe_gauge(KeyName::from(name), None, help.into());
    }
}
