//! Probes every node and publishes the roles it observes. Each probe is one round trip on a kept
//! connection (`SELECT pg_is_in_recovery()`), bounded by `health.timeout`; a node is down after
//! `health.failures` consecutive failures.

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_postgres::{Client, NoTls};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::proxy::Proxy;
use crate::topology::Role;

/// The outcome of probing one node once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// Answered: is it in recovery?
    Up {
        /// `pg_is_in_recovery()`.
        in_recovery: bool,
    },
    /// Did not answer within the timeout, refused, or errored.
    Failed,
}

/// One node's probe connection and failure count.
struct Prober {
    node: usize,
    client: Option<Client>,
    failures: u32,
    role: Role,
}

/// Probes all nodes every `health.interval` (or at once when nudged) until `shutdown`.
pub async fn monitor(proxy: Arc<Proxy>, shutdown: CancellationToken) {
    let mut probers: Vec<Prober> = (0..proxy.config.nodes.len())
        .map(|node| Prober {
            node,
            client: None,
            failures: 0,
            role: Role::Unknown,
        })
        .collect();
    loop {
        probers = probe_all(&proxy, probers).await;
        let roles: Vec<Role> = probers.iter().map(|p| p.role).collect();
        let current = proxy.topology.snapshot();
        let next = current.with_roles(&roles);
        if current.generation == 0 || !current.same_roles(&next) {
            info!(
                generation = next.generation,
                roles = ?next.nodes.iter().map(|n| (n.name.as_str(), n.role.as_str())).collect::<Vec<_>>(),
                primary = ?next.primary,
                "topology changed"
            );
            proxy.topology.publish(next);
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(proxy.config.health.interval) => {}
            _ = proxy.probe_now.notified() => {}
        }
    }
}

/// Probes every node concurrently and returns the updated probers.
async fn probe_all(proxy: &Arc<Proxy>, probers: Vec<Prober>) -> Vec<Prober> {
    let mut set = JoinSet::new();
    let count = probers.len();
    for mut prober in probers {
        let proxy = proxy.clone();
        set.spawn(async move {
            let probe = probe_once(&proxy, &mut prober).await;
            prober.record(probe, proxy.config.health.failures);
            prober
        });
    }
    let mut done: Vec<Prober> = Vec::with_capacity(count);
    while let Some(joined) = set.join_next().await {
        match joined {
            Ok(prober) => done.push(prober),
            Err(error) => warn!(%error, "a probe task failed"),
        }
    }
    // A panicked probe task loses its prober: recreate it as unknown rather than forget the node.
    for node in 0..count {
        if !done.iter().any(|p| p.node == node) {
            done.push(Prober {
                node,
                client: None,
                failures: 0,
                role: Role::Unknown,
            });
        }
    }
    done.sort_by_key(|p| p.node);
    done
}

impl Prober {
    fn record(&mut self, probe: Probe, failures_allowed: u32) {
        match probe {
            Probe::Up { in_recovery } => {
                self.failures = 0;
                self.role = if in_recovery {
                    Role::Standby
                } else {
                    Role::Primary
                };
            }
            Probe::Failed => {
                self.failures += 1;
                self.client = None;
                if self.failures >= failures_allowed || self.role == Role::Unknown {
                    self.role = Role::Down;
                }
            }
        }
    }
}

/// Runs one probe, connecting first if needed; bounded by `health.timeout`.
async fn probe_once(proxy: &Proxy, prober: &mut Prober) -> Probe {
    let timeout = proxy.config.health.timeout;
    match tokio::time::timeout(timeout, probe_inner(proxy, prober, timeout)).await {
        Ok(Ok(in_recovery)) => Probe::Up { in_recovery },
        Ok(Err(error)) => {
            debug!(node = prober.node, %error, "probe failed");
            Probe::Failed
        }
        Err(_) => {
            debug!(node = prober.node, "probe timed out");
            Probe::Failed
        }
    }
}

async fn probe_inner(
    proxy: &Proxy,
    prober: &mut Prober,
    timeout: Duration,
) -> Result<bool, tokio_postgres::Error> {
    let client = match prober.client.take().filter(|c| !c.is_closed()) {
        Some(client) => client,
        None => connect(proxy, prober.node, timeout).await?,
    };
    let row = client.query_one("SELECT pg_is_in_recovery()", &[]).await?;
    prober.client = Some(client);
    row.try_get(0)
}

/// Opens a probe connection to `node` with the health credentials.
async fn connect(
    proxy: &Proxy,
    node: usize,
    timeout: Duration,
) -> Result<Client, tokio_postgres::Error> {
    let node = &proxy.config.nodes[node];
    let (user, password) = proxy.config.health_credentials();
    let mut config = tokio_postgres::Config::new();
    config
        .host(&node.host)
        .port(node.port)
        .user(user)
        .password(password)
        .dbname(&proxy.config.health.database)
        .application_name("pgvigil health")
        .connect_timeout(timeout);
    let (client, connection) = config.connect(NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}
