//! Server connections cached per (node, database, user): checkout with a bound, reset, reuse,
//! idle and lifetime reaping. A connection that broke is never handed out again.

mod open_list;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tracing::warn;

use crate::config::PoolConfig;
use crate::server::{LoginTarget, ServerConn, ServerError};
use crate::topology::{GiveUp, NodeId};
use open_list::OpenList;
pub use open_list::{Listed, ServerInfo, ServerRow};

/// Why a checkout failed.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// Every connection to the node is in use and none came back in time.
    #[error(
        "the pool for node {node} is exhausted: {max_size} server connections in use \
         (pool.max_size), none freed within {waited:?} (pool.checkout_timeout)"
    )]
    Exhausted {
        /// Node name.
        node: String,
        /// The configured limit.
        max_size: usize,
        /// How long the checkout waited.
        waited: Duration,
    },
    /// Opening a new connection failed.
    #[error(transparent)]
    Connect(#[from] ServerError),
    /// The session stopped waiting on the node: the topology gave up on it for this work.
    #[error("stopped waiting on node {node}: {reason}")]
    Abandoned {
        /// Node name.
        node: String,
        /// What the topology says about the node.
        reason: GiveUp,
    },
}

/// A server connection lent to one session; give it back with [`Pools::checkin`].
pub struct Lease {
    /// The connection, boxed once when it opens: a lease and an idle entry then move a pointer,
    /// not the whole connection, at every checkout and checkin.
    pub conn: Box<ServerConn>,
    permit: OwnedSemaphorePermit,
}

type Key = (String, String);

struct Idle {
    conn: Box<ServerConn>,
    permit: OwnedSemaphorePermit,
}

/// The idle connections of one (database, user) pair, the most recently returned last. A node
/// serves few pairs: a list searched by name costs less per checkout than hashing (and cloning)
/// a key.
struct IdleList {
    database: String,
    user: String,
    conns: Vec<Idle>,
}

impl IdleList {
    fn is_for(&self, database: &str, user: &str) -> bool {
        self.database == database && self.user == user
    }
}

/// The pools of one node: a slot limit shared by every (database, user) pair, and idle lists.
struct NodePool {
    slots: Arc<Semaphore>,
    idle: Mutex<Vec<IdleList>>,
    /// Wakes waiting checkouts when a connection goes back to an idle list: it keeps its slot, so
    /// waiting on `slots` alone would miss it.
    returned: Notify,
    /// Checkouts that may wait for `returned`: a checkin wakes them only when there are any
    /// (notifying takes `returned`'s lock, which every data-plane thread shares).
    watching: AtomicUsize,
    /// Slots a smaller `pool.max_size` took away that were in use: each connection that comes
    /// back closes and gives its slot up until none is owed.
    owed: AtomicUsize,
    waits: WaitMetrics,
    /// Microseconds checkouts spent waiting in all (SHOW STATS' `total_wait_time`).
    wait_us: AtomicU64,
    /// The checkouts waiting now, by id, with their pair and since when (SHOW POOLS' maxwait).
    waiters: Mutex<HashMap<u64, (Key, Instant)>>,
}

/// A checkout listed as waiting until this is dropped.
struct Waiter<'a> {
    pool: &'a NodePool,
    id: u64,
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        lock(&self.pool.waiters).remove(&self.id);
    }
}

/// A checkout counted in its pool's `watching` until this is dropped.
struct Watching<'a> {
    pool: &'a NodePool,
}

impl<'a> Watching<'a> {
    fn new(pool: &'a NodePool) -> Watching<'a> {
        pool.watching.fetch_add(1, Ordering::SeqCst);
        Watching { pool }
    }
}

impl Drop for Watching<'_> {
    fn drop(&mut self) {
        self.pool.watching.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The handles a node's pool records its waits with.
pub struct WaitMetrics {
    /// `pgvigil_pool_waits_total{node}`: checkouts that had to wait.
    pub waits: metrics::Counter,
    /// `pgvigil_pool_wait_seconds{node}`: how long each waited.
    pub seconds: metrics::Histogram,
}

/// All pools, one per node, indexed by node id.
pub struct Pools {
    /// Grows when a reload adds a node; a removed node's pool stays, empty.
    nodes: boxcar::Vec<NodePool>,
    /// Every open server connection (opened here, closed anywhere).
    open: OpenList,
    next_id: AtomicU64,
    /// `[pool]` in force (swapped by a reload, see [`Pools::reconfigure`]).
    config: ArcSwap<PoolConfig>,
}

impl Pools {
    /// No pool yet; [`Pools::add_node`] adds one per node.
    pub fn new(config: PoolConfig) -> Pools {
        Pools {
            nodes: boxcar::Vec::new(),
            open: OpenList::default(),
            next_id: AtomicU64::new(1),
            config: ArcSwap::from_pointee(config),
        }
    }

    /// An empty pool for `node`, which must be the next id (the number of pools so far), its
    /// waits recorded with `waits`.
    pub fn add_node(&self, node: NodeId, waits: WaitMetrics) {
        if node != self.nodes.count() {
            return;
        }
        // Two reloads are never applied at once (the failover coordinator applies them), so
        // the size read here is the one the pool keeps until the next `reconfigure`.
        self.nodes.push(NodePool {
            slots: Arc::new(Semaphore::new(self.config.load().max_size)),
            idle: Mutex::new(Vec::new()),
            returned: Notify::new(),
            watching: AtomicUsize::new(0),
            owed: AtomicUsize::new(0),
            waits,
            wait_us: AtomicU64::new(0),
            waiters: Mutex::new(HashMap::new()),
        });
    }

    /// Applies a reloaded `[pool]`: a larger `max_size` frees slots at once; a smaller one takes
    /// free slots and idle connections away now, and the rest from connections as they come back
    /// (none in use is closed under a session).
    pub fn reconfigure(&self, config: PoolConfig) {
        let old = self.config.swap(Arc::new(config.clone()));
        for (_, pool) in &self.nodes {
            if config.max_size >= old.max_size {
                let mut more = config.max_size - old.max_size;
                // Slots still owed from an earlier shrink are forgiven first.
                let _ = pool
                    .owed
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |owed| {
                        let forgiven = owed.min(more);
                        more -= forgiven;
                        Some(owed - forgiven)
                    });
                pool.slots.add_permits(more);
                continue;
            }
            let fewer = old.max_size - config.max_size;
            let mut owed = fewer - pool.slots.forget_permits(fewer);
            let mut idle = lock(&pool.idle);
            for list in idle.iter_mut() {
                while owed > 0 {
                    let Some(Idle { permit, .. }) = list.conns.pop() else {
                        break;
                    };
                    permit.forget();
                    owed -= 1;
                }
            }
            idle.retain(|list| !list.conns.is_empty());
            pool.owed.fetch_add(owed, Ordering::AcqRel);
        }
    }

    /// Opens a connection for `target` and lists it among the open ones.
    async fn open(&self, target: &LoginTarget) -> Result<ServerConn, ServerError> {
        let mut conn = ServerConn::connect(target).await?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let info = ServerInfo {
            node: conn.node,
            user: conn.user.clone(),
            database: conn.database.clone(),
            addr: conn.addr.clone(),
            backend_pid: conn.backend_pid,
            connected_at: SystemTime::now(),
        };
        lock(&self.open).insert(id, info);
        conn.listed = Some(Listed::new(self.open.clone(), id));
        Ok(conn)
    }

    /// Every open server connection, idle or lent, in the order they were opened.
    pub fn servers(&self) -> Vec<ServerRow> {
        let idle: std::collections::HashSet<u64> = self
            .nodes
            .iter()
            .flat_map(|(_, pool)| {
                lock(&pool.idle)
                    .iter()
                    .flat_map(|list| &list.conns)
                    .filter_map(|i| i.conn.listed.as_ref().map(|l| l.id))
                    .collect::<Vec<_>>()
            })
            .collect();
        let mut rows: Vec<(u64, ServerRow)> = lock(&self.open)
            .iter()
            .map(|(id, info)| {
                let row = ServerRow {
                    info: info.clone(),
                    idle: idle.contains(id),
                };
                (*id, row)
            })
            .collect();
        rows.sort_by_key(|(id, _)| *id);
        rows.into_iter().map(|(_, row)| row).collect()
    }

    /// The `[pool]` in force.
    fn config(&self) -> arc_swap::Guard<Arc<PoolConfig>> {
        self.config.load()
    }

    /// Lends a connection for (node, database, user): an idle one if there is one, else a new one
    /// when a slot is free (closing an idle connection of another pair if needed), else waits up
    /// to `pool.checkout_timeout` for either to become possible.
    pub async fn checkout(&self, target: &LoginTarget) -> Result<Lease, PoolError> {
        let pool = &self.nodes[target.node];
        let (database, user) = (target.database.as_str(), target.user.as_str());
        let deadline = tokio::time::Instant::now() + self.config().checkout_timeout;
        // Set once the checkout had to wait: recorded when it ends, served or not.
        let mut waiting_since: Option<Instant> = None;
        // Listed among the waiters while it waits (dropped when the checkout ends).
        let mut _waiter: Option<Waiter<'_>> = None;
        // Counted before the first look: a connection checked in after the look then notifies.
        let _watching = Watching::new(pool);
        let permit = loop {
            // Enabled before looking: a connection checked in just after the look still wakes us.
            let returned = pool.returned.notified();
            tokio::pin!(returned);
            returned.as_mut().enable();
            if let Some(lease) = take_idle(pool, database, user) {
                pool.waited(waiting_since);
                return Ok(lease);
            }
            if let Ok(permit) = pool.slots.clone().try_acquire_owned() {
                break permit;
            }
            if let Some(permit) = evict_other(pool, database, user) {
                break permit;
            }
            if waiting_since.is_none() {
                let since = Instant::now();
                waiting_since = Some(since);
                let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                lock(&pool.waiters).insert(id, ((database.to_owned(), user.to_owned()), since));
                _waiter = Some(Waiter { pool, id });
            }
            tokio::select! {
                Ok(permit) = pool.slots.clone().acquire_owned() => break permit,
                () = &mut returned => {}
                () = tokio::time::sleep_until(deadline) => {
                    pool.waited(waiting_since);
                    return Err(PoolError::Exhausted {
                        node: target.node_name.clone(),
                        max_size: self.config().max_size,
                        waited: self.config().checkout_timeout,
                    })
                }
            }
        };
        pool.waited(waiting_since);
        let conn = Box::new(self.open(target).await?);
        Ok(Lease { conn, permit })
    }

    /// An idle connection for (`database`, `user`) on `node`, when one is at hand: the first try
    /// of every checkout, without building a [`LoginTarget`].
    pub fn reuse(&self, node: NodeId, database: &str, user: &str) -> Option<Lease> {
        take_idle(&self.nodes[node], database, user)
    }

    /// Like [`Pools::checkout`] but never waits for a slot: an idle connection, or a new one when
    /// a slot is free, else `Exhausted` at once. Sessions use it for extra nodes (replicas for
    /// reads), so that a session holding one connection never waits for another.
    pub async fn try_checkout(&self, target: &LoginTarget) -> Result<Lease, PoolError> {
        let pool = &self.nodes[target.node];
        let (database, user) = (target.database.as_str(), target.user.as_str());
        if let Some(lease) = take_idle(pool, database, user) {
            return Ok(lease);
        }
        let permit = match pool.slots.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => evict_other(pool, database, user).ok_or_else(|| PoolError::Exhausted {
                node: target.node_name.clone(),
                max_size: self.config().max_size,
                waited: Duration::ZERO,
            })?,
        };
        let conn = Box::new(self.open(target).await?);
        Ok(Lease { conn, permit })
    }

    /// Takes back a lent connection. The caller has seen it idle (ReadyForQuery 'I', nothing
    /// unread) and either reset it (`DISCARD ALL`) or left its `owner` set, so that the next
    /// session resets what it carries; anything else must be dropped instead.
    pub fn checkin(&self, mut lease: Lease) {
        let now = Instant::now();
        let pool = &self.nodes[lease.conn.node];
        let owed = pool
            .owed
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
        if owed.is_ok() {
            // The pool shrank while this connection was lent: it closes and its slot goes.
            lease.permit.forget();
            return;
        }
        if now.duration_since(lease.conn.created) >= self.config().max_lifetime {
            return;
        }
        if lease.conn.rbuf.capacity() > 64 * 1024 {
            lease.conn.rbuf = bytes::BytesMut::with_capacity(8192);
        }
        lease.conn.idle_since = now;
        let mut idle = lock(&pool.idle);
        let at = match idle
            .iter()
            .position(|list| list.is_for(&lease.conn.database, &lease.conn.user))
        {
            Some(at) => at,
            None => {
                idle.push(IdleList {
                    database: lease.conn.database.clone(),
                    user: lease.conn.user.clone(),
                    conns: Vec::new(),
                });
                idle.len() - 1
            }
        };
        idle[at].conns.push(Idle {
            conn: lease.conn,
            permit: lease.permit,
        });
        drop(idle);
        // Ordered by the idle lists' lock: a checkout counted after this checkin's look at the
        // count took that lock after the push, and finds the connection.
        if pool.watching.load(Ordering::SeqCst) > 0 {
            pool.returned.notify_waiters();
        }
    }

    /// Closes idle connections past `pool.idle_timeout` or `pool.max_lifetime`.
    pub fn reap(&self) {
        let now = Instant::now();
        let config = self.config();
        for (_, pool) in &self.nodes {
            let mut idle = lock(&pool.idle);
            for list in idle.iter_mut() {
                list.conns.retain(|i| {
                    now.duration_since(i.conn.idle_since) < config.idle_timeout
                        && now.duration_since(i.conn.created) < config.max_lifetime
                });
            }
            idle.retain(|list| !list.conns.is_empty());
        }
    }

    /// Closes every idle connection to `node` (it is down or fenced: they must not be lent).
    pub fn discard_idle(&self, node: NodeId) {
        if let Some(pool) = self.nodes.get(node) {
            lock(&pool.idle).clear();
        }
    }

    /// How long the longest-waiting checkout of each (database, user) pair waiting on `node`
    /// has waited so far.
    pub fn max_waits(&self, node: NodeId) -> HashMap<Key, Duration> {
        let mut longest: HashMap<Key, Duration> = HashMap::new();
        if let Some(pool) = self.nodes.get(node) {
            for (key, since) in lock(&pool.waiters).values() {
                let waited = since.elapsed();
                let entry = longest.entry(key.clone()).or_default();
                *entry = (*entry).max(waited);
            }
        }
        longest
    }

    /// Microseconds checkouts on `node` spent waiting for a server connection, in all.
    pub fn wait_us(&self, node: NodeId) -> u64 {
        self.nodes
            .get(node)
            .map_or(0, |pool| pool.wait_us.load(Ordering::Relaxed))
    }

    /// Number of idle connections to `node` (for tests and status).
    pub fn idle_count(&self, node: NodeId) -> usize {
        lock(&self.nodes[node].idle)
            .iter()
            .map(|list| list.conns.len())
            .sum()
    }

    /// Number of connections to `node` that exist, idle or lent.
    pub fn open_count(&self, node: NodeId) -> usize {
        let pool = &self.nodes[node];
        (self.config().max_size + pool.owed.load(Ordering::Acquire))
            .saturating_sub(pool.slots.available_permits())
    }

    /// Pairs that have been used on `node` and have fewer than `pool.min_idle` idle connections,
    /// with how many are missing.
    pub fn idle_deficit(&self, node: NodeId) -> Vec<(Key, usize)> {
        let min_idle = self.config().min_idle;
        let idle = lock(&self.nodes[node].idle);
        idle.iter()
            .filter(|list| list.conns.len() < min_idle)
            .map(|list| {
                let key = (list.database.clone(), list.user.clone());
                (key, min_idle - list.conns.len())
            })
            .collect()
    }

    /// Opens one idle connection for `target` if a slot is free (used to keep `pool.min_idle`).
    pub async fn prefill(&self, target: &LoginTarget) -> Result<bool, ServerError> {
        let pool = &self.nodes[target.node];
        let Ok(permit) = pool.slots.clone().try_acquire_owned() else {
            return Ok(false);
        };
        let conn = Box::new(self.open(target).await?);
        self.checkin(Lease { conn, permit });
        Ok(true)
    }
}

impl NodePool {
    /// Records a checkout's wait, if it waited (since `since`).
    fn waited(&self, since: Option<Instant>) {
        if let Some(since) = since {
            let waited = since.elapsed();
            self.waits.waits.increment(1);
            self.waits.seconds.record(waited.as_secs_f64());
            let micros = u64::try_from(waited.as_micros()).unwrap_or(u64::MAX);
            self.wait_us.fetch_add(micros, Ordering::Relaxed);
        }
    }
}

/// An idle connection for (`database`, `user`), moved to the caller's runtime: the most recently
/// returned one registered there, else the most recently returned of all (the least likely to
/// have been closed); broken ones met on the way are dropped, and so is one that cannot move.
fn take_idle(pool: &NodePool, database: &str, user: &str) -> Option<Lease> {
    let here = crate::data_plane::here();
    let mut idle = lock(&pool.idle);
    let list = idle.iter_mut().find(|list| list.is_for(database, user))?;
    let mut lease = loop {
        let at = list
            .conns
            .iter()
            .rposition(|i| i.conn.home == here)
            .or_else(|| list.conns.len().checked_sub(1))?;
        let Idle { mut conn, permit } = list.conns.remove(at);
        if !conn.looks_broken() {
            break Lease { conn, permit };
        }
    };
    drop(idle);
    match lease.conn.move_here() {
        Ok(()) => Some(lease),
        Err(error) => {
            // Its slot is freed with it: the caller opens a new connection instead.
            warn!(%error, "cannot move an idle server connection to this thread; closing it");
            None
        }
    }
}

/// Closes the oldest idle connection of another (database, user) pair and keeps its slot.
fn evict_other(pool: &NodePool, database: &str, user: &str) -> Option<OwnedSemaphorePermit> {
    let mut idle = lock(&pool.idle);
    let victim = idle
        .iter_mut()
        .filter(|list| !list.is_for(database, user) && !list.conns.is_empty())
        .min_by_key(|list| list.conns[0].conn.idle_since)?;
    let Idle { permit, .. } = victim.conns.remove(0);
    Some(permit)
}

/// Locks a mutex, recovering the data if a panicking thread poisoned it (the lists stay valid).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pools(max_size: usize) -> Pools {
        let config = PoolConfig {
            max_size,
            ..PoolConfig::default()
        };
        let waits = WaitMetrics {
            waits: metrics::Counter::noop(),
            seconds: metrics::Histogram::noop(),
        };
        let pools = Pools::new(config);
        pools.add_node(0, waits);
        pools
    }

    #[test]
    fn a_reloaded_max_size_changes_the_free_slots() {
        let pools = pools(3);
        pools.reconfigure(PoolConfig {
            max_size: 1,
            ..PoolConfig::default()
        });
        assert_eq!(pools.nodes[0].slots.available_permits(), 1);
        assert_eq!(pools.nodes[0].owed.load(Ordering::Acquire), 0);
        assert_eq!(pools.open_count(0), 0);
        pools.reconfigure(PoolConfig {
            max_size: 4,
            ..PoolConfig::default()
        });
        assert_eq!(pools.nodes[0].slots.available_permits(), 4);
        assert_eq!(pools.open_count(0), 0);
    }
}
