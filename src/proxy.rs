//! The running proxy: state shared by every session (config, users, topology, replication
//! positions, pools, cancel keys, TLS) and the start/shutdown of its tasks.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::{ArcSwap, Guard};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::auth::UserSecret;
use crate::cancel::CancelRegistry;
use crate::config::{BackendTlsMode, Config};
use crate::data_plane::{self, DataPlane};
use crate::pool::{Lease, PoolError, Pools};
use crate::replication::ReplicationHandle;
use crate::router::{Route, RouteError};
use crate::server::LoginTarget;
use crate::topology::{Need, NodeId, Topology, TopologyHandle, TopologyPublisher};
use crate::{admin, cluster, failover, health, tls};

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// TLS files could not be loaded.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// The state file could not be read.
    #[error(transparent)]
    State(#[from] crate::state::StateError),
    /// The admin API would listen beyond this host with no token to ask for.
    #[error(
        "admin.listen {0} is not a loopback address and no admin token is set: set admin.token \
         or PGVIGIL_ADMIN_TOKEN, or listen on 127.0.0.1"
    )]
    AdminWithoutToken(SocketAddr),
    /// A data-plane thread or its runtime could not be started.
    #[error("cannot start the data-plane threads: {0}")]
    Threads(std::io::Error),
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The configured address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
}

/// State shared by every session.
pub struct Proxy {
    /// The configuration in force (swapped whole by a reload).
    config: ArcSwap<Config>,
    /// Configured users with their precomputed SCRAM secrets (swapped by a reload).
    pub users: ArcSwap<HashMap<String, UserSecret>>,
    /// Where the nodes stand.
    pub topology: TopologyHandle,
    /// How far each node has come in the WAL, from the latest probe round.
    pub replication: ReplicationHandle,
    /// Server connection pools.
    pub pools: Pools,
    /// Cancel keys of live sessions.
    pub cancels: Arc<CancelRegistry>,
    /// TLS for clients, when configured.
    pub tls_acceptor: Option<tokio_rustls::TlsAcceptor>,
    /// TLS for connections to nodes, when configured.
    pub backend_tls: Option<Arc<rustls::ClientConfig>>,
    /// Random per-process seed for the mock SCRAM secrets of unknown users.
    pub auth_seed: [u8; 32],
    /// The salted passwords of SCRAM logins to the nodes (see `auth::scram_client`).
    pub salted_passwords: Arc<crate::auth::scram_client::SaltedPasswords>,
    /// Wakes a node's probe task for an immediate probe.
    pub nudges: Arc<health::Nudges>,
    /// The classifier with the function lists in force (swapped by a reload) and its memo.
    pub classifier: crate::classifier::Classifier,
    /// Spreads reads over the nodes that may take them.
    pub balancer: Arc<crate::balance::Balancer>,
    /// The Prometheus metrics served at `/metrics`.
    pub metrics: crate::metrics::Metrics,
    /// The event log (`GET /events`).
    pub events: Arc<crate::events::Events>,
    /// The operator's PAUSE: whether new units wait, and the sessions in flight.
    pub pause: Arc<crate::pause::Pause>,
    /// The failover coordinator's admin side (its view of the nodes), for the SQL console; set
    /// once the coordinator is started.
    pub control: std::sync::OnceLock<failover::Handle>,
    /// Whether this instance may act on the nodes (alone, or the leader elected in etcd).
    pub leadership: Arc<crate::cluster::Leadership>,
    /// Transaction pooling: the server-side names of named prepared statements.
    pub statements: crate::statements::Registry,
}

impl Proxy {
    /// Builds the shared state: user secrets, TLS configurations, empty pools; topology
    /// generations continue from `generation`. The topology's publisher is for the failover
    /// coordinator alone.
    pub fn new(config: Config, generation: u64) -> Result<(Proxy, TopologyPublisher), StartError> {
        tls::install_crypto_provider();
        let tls_acceptor = match (&config.tls.cert, &config.tls.key) {
            (Some(cert), Some(key)) if config.tls.mode != crate::config::TlsMode::Disable => {
                let mut server = (*tls::server_config(cert, key)?).clone();
                // PostgreSQL 17 direct-TLS clients offer ALPN "postgresql".
                server.alpn_protocols = vec![b"postgresql".to_vec()];
                Some(tokio_rustls::TlsAcceptor::from(Arc::new(server)))
            }
            _ => None,
        };
        let backend_tls = match (config.backend.tls, &config.backend.ca) {
            (BackendTlsMode::Disable, _) => None,
            (_, Some(ca)) => Some(tls::client_config_with_ca(ca)?),
            (_, None) => Some(tls::client_config_no_verify()),
        };
        let users = ArcSwap::from_pointee(user_secrets(&config, &HashMap::new()));
        let (topology, publisher) = TopologyHandle::new(Topology::initial(&config, generation));
        let metrics = crate::metrics::Metrics::default();
        let proxy = Proxy {
            topology,
            replication: ReplicationHandle::new(config.nodes.len()),
            pools: Pools::new(config.pool.clone()),
            cancels: Arc::new(CancelRegistry::default()),
            tls_acceptor,
            backend_tls,
            users,
            auth_seed: rand::random(),
            salted_passwords: Arc::default(),
            // Room for every node a reload may add (ids are never reused, up to MAX_NODES).
            nudges: Arc::new(health::Nudges::new(crate::router::MAX_NODES)),
            classifier: crate::classifier::Classifier::new(config.function_lists()),
            balancer: Arc::new(crate::balance::Balancer::new(crate::router::MAX_NODES)),
            metrics,
            events: Arc::new(crate::events::Events::default()),
            pause: Arc::default(),
            control: std::sync::OnceLock::new(),
            leadership: crate::cluster::Leadership::new(&config),
            statements: crate::statements::Registry::default(),
            config: ArcSwap::from_pointee(config),
        };
        for (node, n) in proxy.config().nodes.iter().enumerate() {
            proxy.add_node(node, &n.name);
        }
        Ok((proxy, publisher))
    }

    /// Gives the node with id `node` (the next one) its pool and metrics, before it is
    /// published in the topology (at start, or when a reload adds it).
    pub(crate) fn add_node(&self, node: NodeId, name: &str) {
        self.metrics.add_node(node, name);
        self.pools.add_node(node, self.metrics.pool_wait(name));
    }

    /// What unknown users are asked for: the method most users configured now have, so that
    /// the request itself does not tell them apart (read at each login: a reload may change
    /// the users).
    pub fn unknown_user_method(&self) -> crate::config::AuthMethod {
        most_common_method(&self.config())
    }

    /// The configuration in force now. Hold it briefly: a reload swaps in a new one.
    pub fn config(&self) -> Guard<Arc<Config>> {
        self.config.load()
    }

    /// A cache of the configuration in force, for a reader that keeps it (see
    /// `session::views`): each of its reads sees a reload as [`Proxy::config`] does.
    pub fn config_cache(&self) -> arc_swap::cache::Cache<&ArcSwap<Config>, Arc<Config>> {
        arc_swap::cache::Cache::new(&self.config)
    }

    /// Swaps in a reloaded configuration (see `reload`).
    pub(crate) fn store_config(&self, next: Config) {
        self.config.store(Arc::new(next));
    }

    /// Asks `decide` for a route; while it finds none (no primary during a failover, no usable
    /// node), waits for topology changes up to `failover.wait_timeout` before giving up with the
    /// reason.
    pub async fn wait_for_route(
        &self,
        decide: impl Fn(&Topology) -> Result<Route, RouteError>,
    ) -> Result<Route, RouteError> {
        let mut changes = self.topology.subscribe();
        let deadline = tokio::time::Instant::now() + self.config().failover.wait_timeout;
        loop {
            let error = match decide(&self.topology.load()) {
                Ok(route) => return Ok(route),
                Err(error) => error,
            };
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => continue,
                _ => return Err(error),
            }
        }
    }

    /// Runs `work`, a wait on `node` for `need` (connect, TLS, login, a checkout, setting up a
    /// connection), until it ends or the topology gives up on the node for that need; then
    /// `work` is dropped (closing whatever it had half opened) and the caller routes afresh.
    /// A client thus never waits out `backend.connect_timeout` on a node that failover has
    /// fenced, that went down, or, for work another node can do, that a probe found suspect.
    ///
    /// `work` comes pinned where the caller made it: taken by value, it would be held twice
    /// in this future's state, once as the argument and once pinned (a wait in line for a
    /// connection made a 1,184-byte future, past the sizes glibc's per-thread cache serves).
    pub async fn unless_given_up<T>(
        &self,
        node: NodeId,
        need: Need,
        mut work: Pin<&mut impl Future<Output = T>>,
    ) -> Result<T, PoolError> {
        // Subscribed before the first look: a generation published after it still wakes us.
        let mut changes = self.topology.subscribe();
        loop {
            self.given_up(node, need)?;
            tokio::select! {
                biased;
                done = &mut work => return Ok(done),
                changed = changes.changed() => {
                    if changed.is_err() {
                        // No generation can come any more: only the work itself can end the wait.
                        return Ok(work.await);
                    }
                }
            }
        }
    }

    /// `Abandoned` when the topology gives up on `node` for `need` now (see
    /// [`Proxy::unless_given_up`]).
    pub fn given_up(&self, node: NodeId, need: Need) -> Result<(), PoolError> {
        let topology = self.topology.load();
        match topology.gives_up_on(node, need) {
            None => Ok(()),
            Some(reason) => {
                debug!(node = %topology.name(node), %reason, ?need, "wait on a node abandoned");
                Err(PoolError::Abandoned {
                    node: topology.name(node),
                    reason,
                })
            }
        }
    }

    /// How to log in to `node` for a client's (user, database).
    /// `remembered`: the password to use if a reload removed the user from the configuration.
    pub fn login_target(
        &self,
        node: NodeId,
        user: &str,
        database: &str,
        remembered: &str,
    ) -> LoginTarget {
        let topology = self.topology.load();
        let node_state = &topology.nodes[node];
        let password = self
            .config()
            .user(user)
            .map_or_else(|| Some(remembered.to_owned()), |u| u.password.clone())
            .unwrap_or_default();
        LoginTarget {
            node,
            node_name: node_state.name.clone(),
            host: node_state.host.clone(),
            port: node_state.port,
            user: user.to_string(),
            password,
            database: database.to_string(),
            connect_timeout: self.config().backend.connect_timeout,
            tls: self.config().backend.tls,
            tls_config: self.backend_tls.clone(),
            salted: self.salted_passwords.clone(),
        }
    }

    /// Takes a server connection back from a session: reset with `DISCARD ALL` and pooled when
    /// `reusable`, closed otherwise (a broken connection is never handed out again).
    pub async fn release(&self, mut lease: Lease, reusable: bool) {
        if !reusable {
            return;
        }
        let reset = async {
            if lease.conn.tx != pgvigil_proto::TxStatus::Idle {
                lease.conn.run_internal("ROLLBACK").await?;
            }
            lease.conn.statements.clear();
            lease.conn.run_internal("DISCARD ALL").await
        };
        match tokio::time::timeout(self.config().backend.connect_timeout, reset).await {
            Ok(Ok(())) if lease.conn.rbuf.is_empty() => {
                lease.conn.carries = crate::server::Carried::Nothing;
                self.pools.checkin(lease)
            }
            Ok(Ok(())) => {}
            Ok(Err(error)) => warn!(%error, "server connection reset failed; closing it"),
            Err(_) => warn!("server connection reset timed out; closing it"),
        }
    }

    /// A data-path connection to `node` broke: probe the nodes now instead of at the next tick.
    pub fn report_server_failure(&self, node: NodeId) {
        debug!(node, "data-path failure reported; probing now");
        self.nudges.nudge(node);
    }

    /// Probes every node now instead of at the next tick.
    pub fn probe_all_now(&self) {
        for node in 0..self.config().nodes.len() {
            self.nudges.nudge(node);
        }
    }

    /// Forwards a client's CancelRequest to the backend serving that client, if the key matches.
    pub async fn forward_cancel(&self, pid: u32, key: &[u8]) {
        match self.cancels.lookup(pid, key) {
            Some(target) => {
                if let Err(error) =
                    crate::cancel::send_cancel(&target, self.config().backend.connect_timeout).await
                {
                    warn!(%error, "could not forward a cancel request");
                }
            }
            None => info!("cancel request with an unknown key ignored"),
        }
    }
}

/// The SCRAM secrets of the configured users; a user whose name, password and method are those
/// of one in `known` keeps its secret (computing one costs 4096 HMAC rounds).
pub(crate) fn user_secrets(
    config: &Config,
    known: &HashMap<String, UserSecret>,
) -> HashMap<String, UserSecret> {
    config
        .users
        .iter()
        .map(|u| {
            let password = u.password.clone().unwrap_or_default();
            let secret = known
                .get(&u.name)
                .filter(|s| s.matches(&password, u.auth))
                .cloned()
                .unwrap_or_else(|| UserSecret::new(&u.name, &password, u.auth));
            (u.name.clone(), secret)
        })
        .collect()
}

/// The client authentication method most configured users have (SCRAM on a tie).
fn most_common_method(config: &Config) -> crate::config::AuthMethod {
    use crate::config::AuthMethod;
    let count = |method| config.users.iter().filter(|u| u.auth == method).count();
    let (scram, md5) = (count(AuthMethod::ScramSha256), count(AuthMethod::Md5));
    if md5 > scram {
        AuthMethod::Md5
    } else {
        AuthMethod::ScramSha256
    }
}

/// A started proxy: its address and the handle to stop it.
pub struct Running {
    /// The shared state (for status and tests).
    pub proxy: Arc<Proxy>,
    /// The address it listens on (useful when configured with port 0).
    pub local_addr: SocketAddr,
    /// The address of the admin API.
    pub admin_addr: SocketAddr,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    /// Taken by [`Running::shutdown`] to wait for its threads.
    data_plane: Option<DataPlane>,
}

/// Restores the state file, binds the listen and admin addresses, starts the data-plane threads
/// (see [`crate::data_plane`]) and, on the caller's runtime (the control plane), the admin API,
/// the probes, the failover coordinator, the pool reaper and (with `[cluster]`) the etcd election.
pub async fn start(config: Config) -> Result<Running, StartError> {
    let addr = config.listen;
    let admin_token = config.admin.effective_token();
    let admin_listen = config.admin.listen;
    if admin_token.is_none() && !admin_listen.ip().is_loopback() {
        return Err(StartError::AdminWithoutToken(admin_listen));
    }
    let (memory, generation) = failover::restore(&config)?;
    let (proxy, publisher) = Proxy::new(config, generation)?;
    let proxy = Arc::new(proxy);
    let threads = proxy.config().data_threads();
    let listeners =
        data_plane::bind(addr, threads).map_err(|source| StartError::Bind { addr, source })?;
    let local_addr = listeners
        .first()
        .map(std::net::TcpListener::local_addr)
        .transpose()
        .map_err(|source| StartError::Bind { addr, source })?
        .unwrap_or(addr);
    let admin_listener =
        TcpListener::bind(admin_listen)
            .await
            .map_err(|source| StartError::Bind {
                addr: admin_listen,
                source,
            })?;
    let admin_addr = admin_listener
        .local_addr()
        .map_err(|source| StartError::Bind {
            addr: admin_listen,
            source,
        })?;
    proxy.leadership.admin_bound(admin_addr);
    let shutdown = CancellationToken::new();
    let tasks = TaskTracker::new();
    let (control, inbox) = failover::channel(proxy.config().nodes.len(), proxy.events.clone());
    let _ = proxy.control.set(control.clone());
    tasks.spawn(admin::serve(
        admin_listener,
        proxy.clone(),
        control,
        admin_token,
        shutdown.clone(),
    ));
    tasks.spawn(failover::run(
        proxy.clone(),
        publisher,
        memory,
        inbox,
        tasks.clone(),
        shutdown.clone(),
    ));
    tasks.spawn(reap_pools(proxy.clone(), shutdown.clone()));
    tasks.spawn(cluster::election::run(
        proxy.leadership.clone(),
        shutdown.clone(),
    ));
    tasks.spawn(cluster::shared::run_writer(
        proxy.leadership.clone(),
        shutdown.clone(),
    ));
    tasks.close();
    let data_plane = match DataPlane::start(listeners, &proxy, &shutdown) {
        Ok(data_plane) => data_plane,
        Err(source) => {
            shutdown.cancel();
            tasks.wait().await;
            return Err(StartError::Threads(source));
        }
    };
    info!(%local_addr, %admin_addr, threads, nodes = proxy.config().nodes.len(), "pgvigil listening");
    Ok(Running {
        proxy,
        local_addr,
        admin_addr,
        shutdown,
        tasks,
        data_plane: Some(data_plane),
    })
}

impl Running {
    /// Stops accepting clients, stops the background tasks and the data-plane threads; open
    /// sessions are dropped.
    pub async fn shutdown(mut self) {
        self.shutdown.cancel();
        self.tasks.wait().await;
        if let Some(data_plane) = self.data_plane.take() {
            data_plane.join().await;
        }
    }
}

impl Drop for Running {
    /// A proxy dropped without [`Running::shutdown`] still stops: its data-plane threads are not
    /// tied to the caller's runtime, so nothing else would end them.
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Closes idle connections past their idle timeout or lifetime, and keeps `pool.min_idle`.
async fn reap_pools(proxy: Arc<Proxy>, shutdown: CancellationToken) {
    let period = proxy.config().pool.idle_timeout.min(Duration::from_secs(5));
    let mut tick = tokio::time::interval(period);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        proxy.pools.reap();
        let usable: Vec<NodeId> = proxy
            .topology
            .load()
            .nodes
            .iter()
            .filter(|n| n.role.takes_new_work())
            .map(|n| n.id)
            .collect();
        for node in usable {
            for ((database, user), missing) in proxy.pools.idle_deficit(node) {
                if proxy.config().user(&user).is_none() {
                    // Removed by a reload: its open sessions go on, no new connections are kept.
                    continue;
                }
                let target = proxy.login_target(node, &user, &database, "");
                for _ in 0..missing {
                    if !matches!(proxy.pools.prefill(&target).await, Ok(true)) {
                        break;
                    }
                }
            }
        }
    }
}
