//! Server connections cached per (node, database, user): checkout with a bound, reset, reuse,
//! idle and lifetime reaping. A connection that broke is never handed out again. Checkouts that
//! wait are served first come, first served, but for a bounded preference for the thread a
//! connection is registered with: a connection coming back is handed to one checkout (see
//! [`Stock::next_for`]), and wakes no other. Under transaction pooling with `pool.park` a
//! session keeps its connection parked between transactions while the pool is not busy, and
//! gives it back as soon as a checkout claims it (see [`Pools::park`]).

mod open_list;
mod parked;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Waker;
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};
use tracing::warn;

use crate::config::PoolConfig;
use crate::data_plane::{self, Home};
use crate::server::{LoginTarget, ServerConn, ServerError};
use crate::topology::{GiveUp, NodeId};
use open_list::OpenList;
pub use open_list::{Listed, ServerInfo, ServerRow};
use parked::ParkedList;
pub use parked::{ParkTicket, Parkable, Unparked};

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

/// What a checkout's turn brings (see [`Pools::wait_turn`]).
pub enum Turn {
    /// A connection, idle until now.
    Lease(Lease),
    /// The right to open one.
    Slot(Slot),
}

impl Turn {
    fn slot(permit: OwnedSemaphorePermit) -> Turn {
        Turn::Slot(Slot { permit })
    }
}

/// A free slot of a node's pool: the right to open one connection there (see
/// [`Pools::open_in`]); dropped, it is free again.
pub struct Slot {
    permit: OwnedSemaphorePermit,
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

/// A (database, user) pair, shared by its idle list and the checkouts waiting for one of its
/// connections, so that joining the line copies no name (two allocations per waiting checkout
/// before, about 400 instructions, callgrind).
struct Pair {
    database: String,
    user: String,
}

impl Pair {
    fn is(&self, database: &[u8], user: &[u8]) -> bool {
        self.database.as_bytes() == database && self.user.as_bytes() == user
    }
}

/// The idle connections of one (database, user) pair, the most recently returned last. A node
/// serves few pairs: a list searched by name costs less per checkout than hashing (and cloning)
/// a key.
struct IdleList {
    pair: Arc<Pair>,
    conns: Vec<Idle>,
}

impl IdleList {
    fn is_for(&self, database: &[u8], user: &[u8]) -> bool {
        self.pair.is(database, user)
    }
}

/// What a node's pool holds under one lock: its idle connections, the checkouts waiting for
/// one, and the connections parked with their sessions. A connection that comes back goes to a
/// checkout of its pair (see [`Stock::next_for`]), waking that one alone, and to the idle lists
/// only when none waits.
#[derive(Default)]
struct Stock {
    idle: Vec<IdleList>,
    /// Oldest first.
    waiting: VecDeque<Waiting>,
    parked: ParkedList,
}

/// A checkout waiting for a connection (see [`Stock`]).
struct Waiting {
    id: u64,
    pair: Arc<Pair>,
    since: Instant,
    /// The thread its session runs on, where the connection it gets will be registered.
    home: Home,
    /// How many times a younger checkout took a connection while this one was the oldest of
    /// its pair (at most [`MAX_PASSED`]).
    passed: u32,
    handoff: oneshot::Sender<Handoff>,
}

impl Waiting {
    fn is_for(&self, database: &str, user: &str) -> bool {
        self.pair.is(database.as_bytes(), user.as_bytes())
    }
}

/// What a waiting checkout is handed.
enum Handoff {
    /// An idle connection of its pair.
    Conn(Idle),
    /// The slot of a connection of another pair, which no checkout waited for and was closed:
    /// the checkout opens a new connection with it.
    Slot(OwnedSemaphorePermit),
}

/// The pools of one node: a slot limit shared by every (database, user) pair, idle lists, and
/// the checkouts waiting.
struct NodePool {
    slots: Arc<Semaphore>,
    stock: Mutex<Stock>,
    /// Slots a smaller `pool.max_size` took away that were in use: each connection that comes
    /// back closes and gives its slot up until none is owed.
    owed: AtomicUsize,
    waits: WaitMetrics,
    /// Microseconds checkouts spent waiting in all (SHOW STATS' `total_wait_time`).
    wait_us: AtomicU64,
    /// Checkouts that have had to wait (see [`Pools::queued`]).
    queued: AtomicU64,
}

/// A checkout in its pool's waiting line until this is dropped; what it was handed and did not
/// take (it stopped waiting: a slot came first, its deadline, its session) goes to the next.
struct Queued<'a> {
    pool: &'a NodePool,
    id: u64,
    since: Instant,
    /// None once it took what it was handed.
    handed: Option<oneshot::Receiver<Handoff>>,
}

impl Queued<'_> {
    /// What a checkin hands it (never ready if the pool is dropped first).
    async fn handed(&mut self) -> Handoff {
        if let Some(receiver) = self.handed.as_mut() {
            if let Ok(handoff) = receiver.await {
                self.handed = None;
                return handoff;
            }
        }
        std::future::pending().await
    }
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        let Some(mut receiver) = self.handed.take() else {
            return;
        };
        let mut stock = lock(&self.pool.stock);
        if let Some(at) = stock.waiting.iter().position(|w| w.id == self.id) {
            stock.waiting.remove(at);
            return;
        }
        drop(stock);
        // Out of the line: handed something (under the lock) that it no longer takes.
        if let Ok(handoff) = receiver.try_recv() {
            self.pool.restock(handoff);
        }
    }
}

/// What a checkout found at its first look.
enum Found<'a> {
    /// An idle connection of its pair.
    Idle(Idle),
    /// A free slot.
    Slot(OwnedSemaphorePermit),
    /// Nothing: it is in the waiting line.
    Queued(Queued<'a>),
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
            stock: Mutex::new(Stock::default()),
            owed: AtomicUsize::new(0),
            waits,
            wait_us: AtomicU64::new(0),
            queued: AtomicU64::new(0),
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
            let mut stock = lock(&pool.stock);
            for list in stock.idle.iter_mut() {
                while owed > 0 {
                    let Some(Idle { permit, .. }) = list.conns.pop() else {
                        break;
                    };
                    permit.forget();
                    owed -= 1;
                }
            }
            stock.idle.retain(|list| !list.conns.is_empty());
            pool.owed.fetch_add(owed, Ordering::AcqRel);
            // Parked connections come back too, to close (see `checkin`).
            let claimed: Vec<Waker> = (0..owed).map_while(|_| stock.parked.claim(None)).collect();
            drop(stock);
            claimed.into_iter().for_each(Waker::wake);
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
                lock(&pool.stock)
                    .idle
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

    /// A turn for (node, database, user): an idle connection if there is one, else a free slot
    /// (closing an idle connection of another pair if needed), else a place in line until a
    /// connection or a slot is handed over, for up to `pool.checkout_timeout`. A slot is opened
    /// with [`Pools::open_in`]. `target` is called only to name the node in an error.
    pub async fn wait_turn(
        &self,
        node: NodeId,
        database: &str,
        user: &str,
        target: &impl Fn() -> LoginTarget,
    ) -> Result<Turn, PoolError> {
        let pool = &self.nodes[node];
        let deadline = tokio::time::Instant::now() + self.config().checkout_timeout;
        let permit = match pool.take_or_queue(database, user, &self.next_id) {
            Found::Idle(idle) => return Ok(lease_here(idle).map_or_else(Turn::slot, Turn::Lease)),
            Found::Slot(permit) => permit,
            Found::Queued(mut queued) => {
                let since = queued.since;
                // A connection handed over first: it is there, a slot is only the right to
                // open one.
                let served = tokio::select! {
                    biased;
                    handoff = queued.handed() => match handoff {
                        Handoff::Conn(idle) => lease_here(idle),
                        Handoff::Slot(permit) => Err(permit),
                    },
                    Ok(permit) = pool.slots.clone().acquire_owned() => Err(permit),
                    () = tokio::time::sleep_until(deadline) => {
                        pool.waited(Some(since));
                        return Err(PoolError::Exhausted {
                            node: target().node_name,
                            max_size: self.config().max_size,
                            waited: self.config().checkout_timeout,
                        });
                    }
                };
                pool.waited(Some(since));
                return Ok(served.map_or_else(Turn::slot, Turn::Lease));
            }
        };
        Ok(Turn::slot(permit))
    }

    /// Opens a connection for `target` in a slot [`Pools::wait_turn`] gave.
    pub async fn open_in(&self, slot: Slot, target: &LoginTarget) -> Result<Lease, PoolError> {
        let conn = Box::new(self.open(target).await?);
        Ok(Lease {
            conn,
            permit: slot.permit,
        })
    }

    /// An idle connection for (`database`, `user`) on `node`, when one is at hand: the first try
    /// of every checkout, without building a [`LoginTarget`].
    pub fn reuse(&self, node: NodeId, database: &str, user: &str) -> Option<Lease> {
        self.nodes[node].take_idle(database, user)
    }

    /// The idle connection [`Pools::reuse`] would take, only when `fits` finds it usable as it
    /// is (what it returns comes with it); otherwise it stays idle. The names are compared as
    /// bytes.
    pub fn reuse_if<T>(
        &self,
        node: NodeId,
        database: &[u8],
        user: &[u8],
        fits: impl FnOnce(&ServerConn) -> Option<T>,
    ) -> Option<(Lease, T)> {
        let pool = &self.nodes[node];
        let (idle, fit) = lock(&pool.stock).take_idle_if(database, user, fits)?;
        Some((lease_here(idle).ok()?, fit))
    }

    /// Like [`Pools::wait_turn`] and [`Pools::open_in`] but never waits: an idle connection, or
    /// a new one when a slot is free, else `Exhausted` at once. Sessions use it for extra nodes
    /// (replicas for reads), so that a session holding one connection never waits for another.
    pub async fn try_checkout(
        &self,
        node: NodeId,
        database: &str,
        user: &str,
        target: impl Fn() -> LoginTarget,
    ) -> Result<Lease, PoolError> {
        let pool = &self.nodes[node];
        if let Some(lease) = pool.take_idle(database, user) {
            return Ok(lease);
        }
        let free = pool.slots.clone().try_acquire_owned().ok();
        let Some(permit) = free.or_else(|| lock(&pool.stock).evict_other(database, user)) else {
            if lock(&pool.stock).parked.has_unclaimed() {
                // A parked connection is given back as soon as it is claimed: waiting for it
                // holds nothing up (see `Pools::park`).
                return match self.wait_turn(node, database, user, &target).await? {
                    Turn::Lease(lease) => Ok(lease),
                    Turn::Slot(slot) => self.open_in(slot, &target()).await,
                };
            }
            return Err(PoolError::Exhausted {
                node: target().node_name,
                max_size: self.config().max_size,
                waited: Duration::ZERO,
            });
        };
        let conn = Box::new(self.open(&target()).await?);
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
        pool.restock(Handoff::Conn(Idle {
            conn: lease.conn,
            permit: lease.permit,
        }));
    }

    /// Transaction pooling: keeps `conn`, lent and idle (ReadyForQuery 'I', nothing unread),
    /// with its session between two units, its task woken by `waker` when the pool wants it
    /// back. The session takes it back with [`Pools::unpark`] before it uses it again, and
    /// parks it again after; a checkout that would wait claims it meanwhile (see
    /// [`NodePool::take_or_queue`]), and so does the reaper once it has been parked for
    /// `pool.idle_timeout`. None when a checkout waits already or the pool is shrinking: the
    /// session gives it back now. Sessions park only while no checkout has had to wait since
    /// (see [`Pools::queued`]): in a busy pool parking would cost each checkout a wait where it
    /// finds an idle connection.
    pub fn park(&self, conn: &Parkable<'_>, waker: &Waker) -> Option<ParkTicket> {
        let pool = self.nodes.get(conn.node)?;
        if pool.owed.load(Ordering::Acquire) > 0 {
            return None;
        }
        let now = Instant::now();
        let mut stock = lock(&pool.stock);
        if !stock.waiting.is_empty() {
            return None;
        }
        let pair = stock.pair(conn.database, conn.user);
        Some(stock.parked.park(conn, pair, now, waker))
    }

    /// How many checkouts of `node`'s pool have had to wait so far: a session that sees it
    /// changed since its connection's previous transaction gives the connection back rather
    /// than park it.
    pub fn queued(&self, node: NodeId) -> u64 {
        self.nodes
            .get(node)
            .map_or(0, |pool| pool.queued.load(Ordering::Relaxed))
    }

    /// Takes back the connection to `node` parked with `ticket`: whether it is still the
    /// session's.
    pub fn unpark(&self, node: NodeId, ticket: ParkTicket) -> Unparked {
        self.nodes.get(node).map_or(Unparked::Claimed, |pool| {
            lock(&pool.stock).parked.unpark(ticket)
        })
    }

    /// Closes idle connections past `pool.idle_timeout` or `pool.max_lifetime`, and has parked
    /// ones past them closed by their sessions.
    pub fn reap(&self) {
        let now = Instant::now();
        let config = self.config();
        for (_, pool) in &self.nodes {
            let mut stock = lock(&pool.stock);
            for list in stock.idle.iter_mut() {
                list.conns.retain(|i| {
                    now.duration_since(i.conn.idle_since) < config.idle_timeout
                        && now.duration_since(i.conn.created) < config.max_lifetime
                });
            }
            stock.idle.retain(|list| !list.conns.is_empty());
            let expired = stock
                .parked
                .expire(now, config.idle_timeout, config.max_lifetime);
            drop(stock);
            expired.into_iter().for_each(Waker::wake);
        }
    }

    /// Closes every idle connection to `node`, and has its sessions close the parked ones (it is
    /// down, fenced or leaving: they must not be lent, nor used again).
    pub fn discard_idle(&self, node: NodeId) {
        if let Some(pool) = self.nodes.get(node) {
            let mut stock = lock(&pool.stock);
            stock.idle.clear();
            let parked = stock
                .parked
                .expire(Instant::now(), Duration::ZERO, Duration::ZERO);
            drop(stock);
            parked.into_iter().for_each(Waker::wake);
        }
    }

    /// How long the longest-waiting checkout of each (database, user) pair waiting on `node`
    /// has waited so far.
    pub fn max_waits(&self, node: NodeId) -> HashMap<Key, Duration> {
        let mut longest: HashMap<Key, Duration> = HashMap::new();
        if let Some(pool) = self.nodes.get(node) {
            for waiting in &lock(&pool.stock).waiting {
                let key = (waiting.pair.database.clone(), waiting.pair.user.clone());
                let entry = longest.entry(key).or_default();
                *entry = (*entry).max(waiting.since.elapsed());
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
        lock(&self.nodes[node].stock)
            .idle
            .iter()
            .map(|list| list.conns.len())
            .sum()
    }

    /// Number of connections to `node` parked with their sessions (for tests).
    pub fn parked_count(&self, node: NodeId) -> usize {
        lock(&self.nodes[node].stock).parked.len()
    }

    /// Number of checkouts waiting in line for a connection to `node` (for tests).
    pub fn waiting_count(&self, node: NodeId) -> usize {
        lock(&self.nodes[node].stock).waiting.len()
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
        let stock = lock(&self.nodes[node].stock);
        stock
            .idle
            .iter()
            .filter(|list| list.conns.len() < min_idle)
            .map(|list| {
                let key = (list.pair.database.clone(), list.pair.user.clone());
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

    /// An idle connection for (`database`, `user`) moved to the caller's runtime (see
    /// [`Stock::take_idle`]); none when there is none, or the one found cannot move (its slot is
    /// freed with it: the caller opens a new connection instead).
    fn take_idle(&self, database: &str, user: &str) -> Option<Lease> {
        let idle = lock(&self.stock).take_idle(database, user)?;
        lease_here(idle).ok()
    }

    /// The first look of a checkout that may wait, under one lock so that no connection comes
    /// back unseen between the look and joining the line: an idle connection of the pair, a
    /// free slot, the slot of another pair's idle connection (closed), or a place in the line,
    /// a parked connection claimed for it when there is one (see [`Pools::park`]).
    fn take_or_queue<'a>(&'a self, database: &str, user: &str, ids: &AtomicU64) -> Found<'a> {
        let mut stock = lock(&self.stock);
        if let Some(idle) = stock.take_idle(database, user) {
            return Found::Idle(idle);
        }
        if let Ok(permit) = self.slots.clone().try_acquire_owned() {
            return Found::Slot(permit);
        }
        if let Some(permit) = stock.evict_other(database, user) {
            return Found::Slot(permit);
        }
        let (handoff, handed) = oneshot::channel();
        let id = ids.fetch_add(1, Ordering::Relaxed);
        let since = Instant::now();
        let pair = stock.pair(database, user);
        // A parked connection comes back sooner than any other.
        let claimed = stock.parked.claim(Some(&pair));
        self.queued.fetch_add(1, Ordering::Relaxed);
        stock.waiting.push_back(Waiting {
            id,
            pair,
            since,
            home: data_plane::here(),
            passed: 0,
            handoff,
        });
        drop(stock);
        if let Some(waker) = claimed {
            waker.wake();
        }
        Found::Queued(Queued {
            pool: self,
            id,
            since,
            handed: Some(handed),
        })
    }

    /// Puts a connection (or a slot) back: to a waiting checkout of its pair, else,
    /// closing the connection, its slot to the longest-waiting checkout of another pair, else
    /// (a connection) on its pair's idle list or (a slot) back to the semaphore.
    fn restock(&self, mut handoff: Handoff) {
        // Closed after the lock is released (declared first, dropped last).
        let mut closed = None;
        let mut stock = lock(&self.stock);
        while !stock.waiting.is_empty() {
            let same_pair = match &handoff {
                Handoff::Conn(idle) => {
                    let conn = &idle.conn;
                    stock.next_for(&conn.database, &conn.user, conn.home)
                }
                Handoff::Slot(_) => None,
            };
            let Some(waiting) = stock.waiting.remove(same_pair.unwrap_or(0)) else {
                break;
            };
            if same_pair.is_none() {
                if let Handoff::Conn(Idle { conn, permit }) = handoff {
                    closed = Some(conn);
                    handoff = Handoff::Slot(permit);
                }
            }
            match waiting.handoff.send(handoff) {
                Ok(()) => return,
                // Its checkout is gone (it leaves the line before it drops its receiver, so
                // this is not expected): the next one.
                Err(back) => handoff = back,
            }
        }
        match handoff {
            Handoff::Conn(idle) => stock.shelve(idle),
            Handoff::Slot(permit) => drop(permit),
        }
        drop(stock);
        drop(closed);
    }
}

/// How many times the longest-waiting checkout of a pair may be passed over for younger ones
/// on the thread of the connections coming back (see [`Stock::next_for`]).
const MAX_PASSED: u32 = 8;

impl Stock {
    /// Where in line the checkout is that a connection of (`database`, `user`) registered with
    /// `home` goes to: the longest-waiting one of the pair, unless it runs on another thread
    /// and a younger one of the pair runs on `home`. That one takes it then, which spares moving
    /// the socket to another thread's reactor, and the longest-waiting one is passed over, at
    /// most [`MAX_PASSED`] times. None when no checkout of the pair waits.
    fn next_for(&mut self, database: &str, user: &str, home: Home) -> Option<usize> {
        let oldest = self.waiting.iter().position(|w| w.is_for(database, user))?;
        let first = &self.waiting[oldest];
        if first.home == home || first.passed >= MAX_PASSED {
            return Some(oldest);
        }
        let younger = self
            .waiting
            .iter()
            .skip(oldest + 1)
            .position(|w| w.home == home && w.is_for(database, user));
        match younger {
            Some(after) => {
                self.waiting[oldest].passed += 1;
                Some(oldest + 1 + after)
            }
            None => Some(oldest),
        }
    }

    /// Puts a connection on its pair's idle list.
    fn shelve(&mut self, idle: Idle) {
        let at = self.list_for(&idle.conn.database, &idle.conn.user);
        self.idle[at].conns.push(idle);
    }

    /// The pair (`database`, `user`), from its idle list.
    fn pair(&mut self, database: &str, user: &str) -> Arc<Pair> {
        let at = self.list_for(database, user);
        Arc::clone(&self.idle[at].pair)
    }

    /// Where the idle list of (`database`, `user`) is, made (empty) when there is none.
    fn list_for(&mut self, database: &str, user: &str) -> usize {
        let (db, us) = (database.as_bytes(), user.as_bytes());
        match self.idle.iter().position(|list| list.is_for(db, us)) {
            Some(at) => at,
            None => {
                let pair = Pair {
                    database: database.to_owned(),
                    user: user.to_owned(),
                };
                self.idle.push(IdleList {
                    pair: Arc::new(pair),
                    conns: Vec::new(),
                });
                self.idle.len() - 1
            }
        }
    }

    /// An idle connection for (`database`, `user`): the most recently returned one registered
    /// with the caller's runtime, else the most recently returned of all (the least likely to
    /// have been closed); broken ones met on the way are dropped.
    fn take_idle(&mut self, database: &str, user: &str) -> Option<Idle> {
        self.take_idle_if(database.as_bytes(), user.as_bytes(), |_| Some(()))
            .map(|(idle, ())| idle)
    }

    /// [`Stock::take_idle`]'s choice, taken only when `fits` returns something for it.
    fn take_idle_if<T>(
        &mut self,
        database: &[u8],
        user: &[u8],
        fits: impl FnOnce(&ServerConn) -> Option<T>,
    ) -> Option<(Idle, T)> {
        let here = data_plane::here();
        let list = self
            .idle
            .iter_mut()
            .find(|list| list.is_for(database, user))?;
        loop {
            let at = list
                .conns
                .iter()
                .rposition(|i| i.conn.home == here)
                .or_else(|| list.conns.len().checked_sub(1))?;
            if list.conns[at].conn.looks_broken() {
                list.conns.remove(at);
                continue;
            }
            let fit = fits(&list.conns[at].conn)?;
            // Usually the last one: popped without a call to shift the rest.
            let idle = if at + 1 == list.conns.len() {
                list.conns.pop()?
            } else {
                list.conns.remove(at)
            };
            return Some((idle, fit));
        }
    }

    /// Closes the oldest idle connection of another (database, user) pair and keeps its slot.
    fn evict_other(&mut self, database: &str, user: &str) -> Option<OwnedSemaphorePermit> {
        let victim = self
            .idle
            .iter_mut()
            .filter(|list| {
                !list.is_for(database.as_bytes(), user.as_bytes()) && !list.conns.is_empty()
            })
            .min_by_key(|list| list.conns[0].conn.idle_since)?;
        let Idle { permit, .. } = victim.conns.remove(0);
        Some(permit)
    }
}

/// An idle connection made a lease, moved to the caller's runtime; when it cannot move, it is
/// closed and its slot returned, for a new connection.
fn lease_here(idle: Idle) -> Result<Lease, OwnedSemaphorePermit> {
    let Idle { conn, permit } = idle;
    match conn.move_here() {
        Ok(conn) => Ok(Lease { conn, permit }),
        Err(error) => {
            warn!(%error, "cannot move an idle server connection to this thread; closing it");
            Err(permit)
        }
    }
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

    /// Puts a checkout of (`database`, `user`) in node 0's line: its slots are all taken.
    fn queue<'a>(pools: &'a Pools, database: &str, user: &str) -> Queued<'a> {
        match pools.nodes[0].take_or_queue(database, user, &pools.next_id) {
            Found::Queued(queued) => queued,
            _ => panic!("a free slot or an idle connection"),
        }
    }

    /// Puts a checkout of `pair` running on `home` at the end of `stock`'s line.
    fn wait(stock: &mut Stock, pair: &Arc<Pair>, home: Home) -> oneshot::Receiver<Handoff> {
        let (handoff, handed) = oneshot::channel();
        stock.waiting.push_back(Waiting {
            id: stock.waiting.len() as u64,
            pair: Arc::clone(pair),
            since: Instant::now(),
            home,
            passed: 0,
            handoff,
        });
        handed
    }

    #[test]
    fn a_connection_goes_to_a_checkout_on_its_thread_passing_the_oldest_a_bounded_number_of_times()
    {
        let mut stock = Stock::default();
        let pair = stock.pair("db", "u");
        let other = stock.pair("db", "other");
        let _handed = [
            wait(&mut stock, &pair, Home::Data(1)),
            wait(&mut stock, &other, Home::Data(0)),
            wait(&mut stock, &pair, Home::Data(0)),
        ];
        assert_eq!(
            stock.next_for("db", "u", Home::Data(1)),
            Some(0),
            "the oldest runs on the connection's thread"
        );
        for _ in 0..MAX_PASSED {
            assert_eq!(
                stock.next_for("db", "u", Home::Data(0)),
                Some(2),
                "the younger one of the pair on the connection's thread, not the other pair's"
            );
        }
        assert_eq!(
            stock.next_for("db", "u", Home::Data(0)),
            Some(0),
            "passed over as often as it may be"
        );
        assert_eq!(
            stock.next_for("db", "u", Home::Control),
            Some(0),
            "none of the pair on the connection's thread"
        );
        assert_eq!(stock.next_for("db", "nobody", Home::Data(0)), None);
    }

    #[tokio::test]
    async fn a_slot_handed_to_a_checkout_that_stopped_waiting_goes_to_the_next_one() {
        let pools = pools(1);
        let Found::Slot(permit) = pools.nodes[0].take_or_queue("db", "u", &pools.next_id) else {
            panic!("the free slot");
        };
        let first = queue(&pools, "db", "u");
        let mut second = queue(&pools, "db", "other");
        assert_eq!(pools.waiting_count(0), 2);
        pools.nodes[0].restock(Handoff::Slot(permit));
        assert_eq!(
            pools.waiting_count(0),
            1,
            "the first left the line with the slot"
        );
        drop(first);
        let handed = tokio::time::timeout(Duration::from_secs(5), second.handed()).await;
        assert!(matches!(handed, Ok(Handoff::Slot(_))), "the second got it");
        assert_eq!(pools.waiting_count(0), 0);
    }

    #[test]
    fn a_checkout_that_stops_waiting_leaves_the_line_and_a_slot_nobody_waits_for_is_freed() {
        let pools = pools(1);
        let Found::Slot(permit) = pools.nodes[0].take_or_queue("db", "u", &pools.next_id) else {
            panic!("the free slot");
        };
        drop(queue(&pools, "db", "u"));
        assert_eq!(pools.waiting_count(0), 0);
        pools.nodes[0].restock(Handoff::Slot(permit));
        assert_eq!(pools.nodes[0].slots.available_permits(), 1);
    }

    #[test]
    fn a_checkout_that_would_wait_claims_a_parked_connection() {
        let pools = pools(1);
        let Found::Slot(_slot) = pools.nodes[0].take_or_queue("db", "u", &pools.next_id) else {
            panic!("the free slot");
        };
        let wakes = Arc::new(parked::tests::Wakes::default());
        let waker = Waker::from(Arc::clone(&wakes));
        let park = || pools.park(&parked::tests::conn(7, "u"), &waker);
        let ticket = park().expect("nobody waits: it parks");
        assert_eq!(pools.queued(0), 0);
        let queued = queue(&pools, "db", "u");
        assert_eq!(pools.queued(0), 1, "a checkout waits");
        assert_eq!(wakes.count(), 1, "its session is woken");
        assert_eq!(pools.unpark(0, ticket), Unparked::Claimed);
        assert!(park().is_none(), "a checkout waits: it goes back");
        drop(queued);
        let ticket = park().expect("nobody waits");
        assert_eq!(pools.unpark(0, ticket), Unparked::Kept);
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
