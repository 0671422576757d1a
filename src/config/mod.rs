//! Typed TOML configuration: every default lives in one `Default` impl, and `validate` reports all
//! problems at once, each naming its key path.
//!
//! The shipped `pgvigil.example.toml` is checked against these structs by the tests, so the
//! example and the code cannot drift apart.

mod admin;
mod cluster;
mod error;
mod node_control;
mod replication;
mod validate;

pub use admin::{AdminConfig, TOKEN_ENV};
pub use error::{ConfigError, Problem};
pub use node_control::{ControlDriver, NodeControlConfig, AGENT_TOKEN_ENV};

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use pgvigil_proto::classify::FunctionLists;
use serde::{Deserialize, Deserializer, Serialize};

pub use cluster::{endpoint_address, ClusterConfig, EtcdConfig, InstanceConfig};
pub use replication::{ReplicationConfig, SslMode};

/// The whole pgvigil configuration, as read from one TOML file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address clients connect to as if it were PostgreSQL (default `0.0.0.0:9999`).
    #[serde(deserialize_with = "deserialize_listen")]
    pub listen: SocketAddr,
    /// Most client connections at once; beyond it clients get SQLSTATE 53300 (default 1000).
    pub max_client_conn: usize,
    /// Data-plane threads, each accepting on its own `SO_REUSEPORT` listener and running its
    /// sessions; 0 (the default) means one per available core (see [`Config::data_threads`]).
    pub threads: usize,
    /// Largest protocol message accepted, in bytes (default 1 GiB, PostgreSQL's own limit).
    pub max_message_size: usize,
    /// Client-side limits (`[client]`).
    pub client: ClientConfig,
    /// TLS offered to clients (`[tls]`).
    pub tls: TlsConfig,
    /// How pgvigil connects to the nodes (`[backend]`).
    pub backend: BackendConfig,
    /// Server connection pools, one per node (`[pool]`).
    pub pool: PoolConfig,
    /// Health probes of the nodes (`[health]`).
    pub health: HealthConfig,
    /// How reads are spread and which nodes may take them (`[routing]`).
    pub routing: RoutingConfig,
    /// Automatic failover and what clients see during one (`[failover]`).
    pub failover: FailoverConfig,
    /// How repointed standbys connect to a new primary (`[replication]`).
    pub replication: ReplicationConfig,
    /// Several pgvigil instances electing one decider on etcd (`[cluster]`); unused without
    /// `etcd.endpoints`.
    pub cluster: ClusterConfig,
    /// The admin API: status and commands (`[admin]`).
    pub admin: AdminConfig,
    /// The PostgreSQL nodes (`[[nodes]]`); their roles are observed, never taken from this order.
    pub nodes: Vec<NodeConfig>,
    /// The users clients may log in as (`[[users]]`).
    pub users: Vec<UserConfig>,
    /// The file this configuration was read from, which a reload reads again (none when it was
    /// built in code).
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 9999)),
            max_client_conn: 1000,
            threads: 0,
            // PostgreSQL's MaxAllocSize: no single message can be larger than 1 GiB anyway.
            max_message_size: 1 << 30,
            client: ClientConfig::default(),
            tls: TlsConfig::default(),
            backend: BackendConfig::default(),
            pool: PoolConfig::default(),
            health: HealthConfig::default(),
            routing: RoutingConfig::default(),
            failover: FailoverConfig::default(),
            replication: ReplicationConfig::default(),
            cluster: ClusterConfig::default(),
            admin: AdminConfig::default(),
            nodes: Vec::new(),
            users: Vec::new(),
            source: None,
        }
    }
}

/// Limits on client connections (`[client]`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClientConfig {
    /// Time a client has to finish startup and authentication (default 10s, must be > 0).
    #[serde(with = "humantime_serde")]
    pub startup_timeout: Duration,
    /// Longest a unit held by `pgvigil pause` waits before it gets 57014 (PgBouncer's
    /// `query_wait_timeout`; default 120s as there, 0 for no limit).
    #[serde(with = "humantime_serde")]
    pub query_wait_timeout: Duration,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            startup_timeout: Duration::from_secs(10),
            query_wait_timeout: Duration::from_secs(120),
        }
    }
}

/// TLS between clients and pgvigil (`[tls]`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM certificate chain presented to clients (default none); relative to the working directory.
    pub cert: Option<PathBuf>,
    /// PEM private key of `cert` (default none); relative to the working directory.
    pub key: Option<PathBuf>,
    /// Whether clients may or must use TLS (default `allow`).
    pub mode: TlsMode,
}

/// Whether clients may or must use TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TlsMode {
    /// Never offer TLS, even when a certificate is configured.
    Disable,
    /// Offer TLS when `cert` and `key` are set; plain connections are accepted too.
    #[default]
    Allow,
    /// Refuse clients that do not use TLS; needs `cert` and `key`.
    Require,
}

/// How pgvigil connects to the nodes (`[backend]`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackendConfig {
    /// Time allowed to open and authenticate one server connection (default 5s, must be > 0).
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// TLS towards the nodes (default `disable`).
    pub tls: BackendTlsMode,
    /// PEM CA certificates that verify the nodes' certificates (default none); relative to the
    /// working directory.
    pub ca: Option<PathBuf>,
}

impl Default for BackendConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            tls: BackendTlsMode::default(),
            ca: None,
        }
    }
}

/// Whether pgvigil uses TLS towards the nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BackendTlsMode {
    /// Plain connections only.
    #[default]
    Disable,
    /// Use TLS when the node offers it, plain otherwise.
    Prefer,
    /// Fail the connection when the node does not offer TLS.
    Require,
}

/// Server connection pools (`[pool]`); the sizes apply to each node.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolConfig {
    /// When a client's server connection goes back to the pool (default `session`).
    pub mode: PoolMode,
    /// Most server connections per node (default 20, at least 1).
    pub max_size: usize,
    /// Idle server connections kept open per node (default 0, at most `max_size`).
    pub min_idle: usize,
    /// An idle server connection is closed after this long (default 10m, must be > 0).
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// A server connection is closed after this age once it is idle (default 1h, must be > 0).
    #[serde(with = "humantime_serde")]
    pub max_lifetime: Duration,
    /// How long a client waits for a free server connection (default 5s, must be > 0).
    #[serde(with = "humantime_serde")]
    pub checkout_timeout: Duration,
    /// Transaction pooling: most named prepared statements kept on one server connection
    /// (default 200, at least 1); past it the least recently used is closed there (and prepared
    /// again when a session next needs it).
    pub max_prepared_statements: usize,
    /// How long a node removed from `[[nodes]]` by a reload is drained: sessions finish what
    /// they run there and move at their next unit; connections still held after this are
    /// closed, as if the node had failed (default 30s, must be > 0).
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// Transaction pooling: a server connection stays parked with its session between
    /// transactions while no checkout of its pool has had to wait, and goes back as soon as
    /// one needs it (default false: it goes back at the end of every transaction).
    pub park: bool,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            // Session pooling by default: every session feature works in it, while transaction
            // pooling keeps a client on one connection only for what pgvigil can replay.
            mode: PoolMode::Session,
            max_size: 20,
            min_idle: 0,
            idle_timeout: Duration::from_secs(10 * 60),
            max_lifetime: Duration::from_secs(60 * 60),
            checkout_timeout: Duration::from_secs(5),
            // PgBouncer's default for its max_prepared_statements.
            max_prepared_statements: 200,
            drain_timeout: Duration::from_secs(30),
            // Off: about 150 bytes more per idle client in the 5,000-client measurement
            // (tests/it/idle_memory.rs), mostly free chunks the allocator keeps (README).
            park: false,
        }
    }
}

/// When a client's server connection goes back to the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PoolMode {
    /// A client keeps its server connections until it disconnects: everything PostgreSQL offers
    /// a session works, and each client costs a server connection.
    #[default]
    Session,
    /// A client holds a server connection only from the start of a transaction or autocommit
    /// unit to its ReadyForQuery 'I'; a session that did what cannot be replayed (see
    /// `session::replay::Replayable::pinned`) keeps its connection until it ends.
    Transaction,
}

/// Health probes of the nodes (`[health]`).
#[derive(Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// Time between two probes of a node (default 1s, must be > 0).
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Bound on one probe, connecting included (default 1s, must be > 0).
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Consecutive failed probes before a node counts as down (default 3, at least 1).
    pub failures: u32,
    /// Role the probes log in as (default: the first `[[users]]` entry).
    pub user: Option<String>,
    /// Password of `user` (default: that user's `[[users]]` password).
    pub password: Option<String>,
    /// Database the probes connect to (default `postgres`).
    pub database: String,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            failures: 3,
            user: None,
            password: None,
            database: "postgres".into(),
        }
    }
}

impl fmt::Debug for HealthConfig {
    // Passwords must never reach logs, so Debug masks them.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HealthConfig")
            .field("interval", &self.interval)
            .field("timeout", &self.timeout)
            .field("failures", &self.failures)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("database", &self.database)
            .finish()
    }
}

/// How reads are spread and which nodes may take them (`[routing]`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingConfig {
    /// How reads are spread over the nodes that may take them (default `least_connections`).
    pub balance: Balance,
    /// After a session writes, its reads go to a replica only once that replica has replayed the
    /// write (default true).
    pub read_your_writes: bool,
    /// A replica further behind the primary than this many bytes of WAL gets no reads
    /// (default 16 MiB).
    pub max_lag_bytes: u64,
    /// A replica whose replay is further behind than this gets no reads (default 10s, must be > 0).
    #[serde(with = "humantime_serde")]
    pub max_lag: Duration,
    /// Whether the primary takes plain reads only when no replica may (`fallback`, the default)
    /// or shares them with the replicas by its weight (`share`).
    pub primary_reads: PrimaryReads,
    /// Whether a session keeps reading from the node its reads were last balanced to while that
    /// node qualifies (`session`, the default) or every read unit is balanced anew (`unit`).
    pub read_affinity: ReadAffinity,
    /// Functions the classifier must treat as read-only, `name` or `schema.name` (default none).
    pub read_functions: Vec<String>,
    /// Functions the classifier must treat as writing, `name` or `schema.name` (default none).
    pub write_functions: Vec<String>,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        Self {
            balance: Balance::default(),
            read_your_writes: true,
            max_lag_bytes: 16 << 20,
            max_lag: Duration::from_secs(10),
            primary_reads: PrimaryReads::default(),
            read_affinity: ReadAffinity::default(),
            read_functions: Vec::new(),
            write_functions: Vec::new(),
        }
    }
}

/// Automatic failover (`[failover]`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct FailoverConfig {
    /// Promote a standby when the primary is lost (default true); false only alerts.
    pub auto: bool,
    /// How long a statement that needs the primary waits for one before it gets an error
    /// (default 10s, must be > 0).
    #[serde(with = "humantime_serde")]
    pub wait_timeout: Duration,
    /// How long a promotion may take before pgvigil gives up on that standby (default 30s, must
    /// be > 0).
    #[serde(with = "humantime_serde")]
    pub promote_timeout: Duration,
    /// A standby further behind the old primary's last known WAL position than this many bytes
    /// is not promoted (default 1 MiB, like Patroni's `maximum_lag_on_failover`; 0 promotes only
    /// a standby that had everything). With synchronous standbys the synchronous rule applies
    /// instead.
    pub max_lag_bytes: u64,
    /// The `wal_receiver_timeout` pgvigil sets (`ALTER SYSTEM`) on every standby whose own is
    /// longer or off, so that a frozen primary stops looking alive to its standbys within
    /// seconds (default 3s; PostgreSQL's own 60 s would hold a failover for half a minute).
    /// `0s` leaves the standbys' setting alone.
    #[serde(with = "humantime_serde")]
    pub receiver_timeout: Duration,
    /// Directory of the state file (primary, fences) that survives a restart of pgvigil
    /// (default none: nothing is kept, and a warning says so).
    pub state_dir: Option<PathBuf>,
}

impl Default for FailoverConfig {
    fn default() -> Self {
        Self {
            auto: true,
            wait_timeout: Duration::from_secs(10),
            promote_timeout: Duration::from_secs(30),
            max_lag_bytes: 1 << 20,
            receiver_timeout: Duration::from_secs(3),
            state_dir: None,
        }
    }
}

/// How reads are spread over the nodes that may take them (`routing.balance`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    /// The node with the fewest reads in flight for its weight.
    #[default]
    LeastConnections,
    /// Each node in turn, as often as its weight says.
    RoundRobin,
    /// A node drawn at random, with odds in proportion to its weight.
    Random,
}

/// Whether the primary shares plain reads with the replicas (`routing.primary_reads`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PrimaryReads {
    /// Only when no replica may take the read: the primary's capacity is kept for writes.
    #[default]
    Fallback,
    /// With the replicas, in proportion to its weight.
    Share,
}

/// How long a read keeps the node balancing chose for it (`routing.read_affinity`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReadAffinity {
    /// Every read unit is balanced anew: one client's reads spread over the replicas.
    Unit,
    /// A session's reads stay on the node they were last balanced to while it qualifies, as
    /// PgBouncer, HAProxy and pgpool-II (by default) keep a client on one server: one replica
    /// connection per client, and a session's reads never step back to a replica that has
    /// replayed less.
    #[default]
    Session,
}

/// One PostgreSQL node (`[[nodes]]`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    /// Unique name used in logs and commands (`pgvigil failback pg1`); letters, digits, `_`, `-`.
    pub name: String,
    /// Host name or IP address of the node (required).
    pub host: String,
    /// TCP port of the node (default 5432).
    pub port: u16,
    /// Share of load-balanced reads, relative to the other nodes (default 1, at most 1000); 0 means
    /// the node never takes them.
    pub weight: u32,
    /// Preference among standbys equally far in the WAL when one must be promoted: higher wins
    /// (default 1).
    pub priority: u32,
    /// Never promote this node (default false).
    pub no_promote: bool,
    /// How pgvigil stops, starts, rewinds and re-clones it (`[nodes.control]`; default none:
    /// `failback` is refused for this node).
    pub control: Option<NodeControlConfig>,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            name: String::new(),
            host: String::new(),
            port: 5432,
            weight: 1,
            priority: 1,
            no_promote: false,
            control: None,
        }
    }
}

/// One user clients may log in as (`[[users]]`).
#[derive(Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct UserConfig {
    /// Role name, the same on pgvigil and on the nodes.
    pub name: String,
    /// Plaintext password, checked for clients and used to log in to the nodes (required).
    pub password: Option<String>,
    /// How clients authenticate to pgvigil (default `scram-sha-256`).
    pub auth: AuthMethod,
    /// May open the SQL console (`psql -d pgvigil`: SHOW, PAUSE, RESUME, RELOAD); default false.
    pub admin: bool,
}

impl fmt::Debug for UserConfig {
    // Passwords must never reach logs, so Debug masks them.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UserConfig")
            .field("name", &self.name)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("auth", &self.auth)
            .field("admin", &self.admin)
            .finish()
    }
}

/// How a client proves who it is to pgvigil.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AuthMethod {
    /// SCRAM-SHA-256 (RFC 7677), PostgreSQL's default.
    // kebab-case alone would give "scram-sha256"; PostgreSQL spells it "scram-sha-256".
    #[default]
    #[serde(rename = "scram-sha-256")]
    ScramSha256,
    /// MD5 password hash, for old clients.
    Md5,
    /// No password asked.
    Trust,
}

impl Config {
    /// Reads, parses and validates the configuration file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut config = Config::parse(&text)?;
        config.source = Some(path.to_path_buf());
        Ok(config)
    }

    /// Parses and validates TOML text; the only file access is checking that the TLS files are readable.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let config: Config =
            toml::from_str(text).map_err(|e| ConfigError::Syntax(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks the values together and reports every problem found, not just the first.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let problems = validate::problems(self);
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }

    /// How many data-plane threads to run: `threads`, or one per available core when it is 0.
    pub fn data_threads(&self) -> usize {
        match self.threads {
            0 => std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get),
            n => n,
        }
    }

    /// The node called `name`, if configured.
    pub fn node(&self, name: &str) -> Option<&NodeConfig> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// The user called `name`, if configured.
    pub fn user(&self, name: &str) -> Option<&UserConfig> {
        self.users.iter().find(|u| u.name == name)
    }

    /// The classifier's view of `routing.write_functions` and `routing.read_functions`.
    pub fn function_lists(&self) -> FunctionLists {
        FunctionLists::new(&self.routing.write_functions, &self.routing.read_functions)
    }

    /// User and password of the health probes: `[health]` if set, else the first `[[users]]`
    /// entry (with that user's password when only `health.user` names it).
    pub fn health_credentials(&self) -> (&str, &str) {
        let user = self
            .health
            .user
            .as_deref()
            .or_else(|| self.users.first().map(|u| u.name.as_str()))
            .unwrap_or_default();
        let password = self
            .health
            .password
            .as_deref()
            .or_else(|| self.user(user).and_then(|u| u.password.as_deref()))
            .unwrap_or_default();
        (user, password)
    }
}

// serde's own SocketAddr error ("invalid socket address syntax") shows neither the key nor the value.
fn deserialize_listen<'de, D: Deserializer<'de>>(deserializer: D) -> Result<SocketAddr, D::Error> {
    let text = String::deserialize(deserializer)?;
    text.parse().map_err(|e| {
        serde::de::Error::custom(format!("listen: invalid socket address {text:?}: {e}"))
    })
}

#[cfg(test)]
mod tests;
