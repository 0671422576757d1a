//! Cancel requests: pgvigil gives each client its own BackendKeyData and maps it to the backend
//! that is serving that client right now, so a cancel reaches exactly that backend, at once.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::BytesMut;
use pgvigil_proto::encode;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::Notify;

use crate::session::startup::Context;

/// The backend a cancel must reach.
#[derive(Debug, Clone)]
pub struct CancelTarget {
    /// Node host.
    pub host: String,
    /// Node port.
    pub port: u16,
    /// Backend process id.
    pub pid: u32,
    /// Backend cancel secret.
    pub key: Vec<u8>,
}

/// What a logged-in client is, as SHOW CLIENTS lists it. Its user, database and
/// application name are read from its session's context (see `ClientStartup::context`),
/// which it shares.
#[derive(Debug)]
pub struct ClientInfo {
    /// The session's startup context.
    context: Arc<[u8]>,
    /// Its address.
    pub addr: Option<std::net::SocketAddr>,
    /// When its session started.
    pub connected_at: std::time::SystemTime,
}

/// Whether a client's next unit waits (PgBouncer's `cl_active` and `cl_waiting`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientState {
    /// Logged in, running or idle.
    Active = 0,
    /// Its unit waits: held by PAUSE, for a primary or for a server connection.
    Waiting = 1,
}

impl ClientInfo {
    /// A client that has just logged in with this startup `context`.
    pub fn new(context: Arc<[u8]>, addr: Option<std::net::SocketAddr>) -> ClientInfo {
        ClientInfo {
            context,
            addr,
            connected_at: std::time::SystemTime::now(),
        }
    }

    /// The role it logged in as.
    pub fn user(&self) -> &str {
        Context(&self.context).user()
    }

    /// The database it asked for.
    pub fn database(&self) -> &str {
        Context(&self.context).database()
    }

    /// Its `application_name` startup parameter (empty when it sent none).
    pub fn application_name(&self) -> Cow<'_, str> {
        Context(&self.context).application_name()
    }
}

/// One session's registration, shared by its [`CancelKey`] and the registry: one allocation
/// per session for everything the registry knows of it.
#[derive(Debug)]
struct Cell {
    secret: u32,
    /// A [`ClientState`].
    state: AtomicU8,
    /// The backend serving the session now.
    target: Mutex<Option<Arc<CancelTarget>>>,
    /// Counts the cancel requests that matched, for a session that waits without a backend.
    /// (A `watch` channel would do, at about 400 bytes per session; this is a tenth of it.)
    count: AtomicU64,
    arrived: Notify,
    /// What the client is, once it has logged in.
    client: OnceLock<ClientInfo>,
}

/// A logged-in client, as [`CancelRegistry::clients`] lists it.
#[derive(Debug, Clone)]
pub struct LoggedIn(Arc<Cell>);

impl LoggedIn {
    /// What the client is.
    pub fn info(&self) -> Option<&ClientInfo> {
        self.0.client.get()
    }

    /// Whether its next unit waits.
    pub fn state(&self) -> ClientState {
        if self.0.state.load(Ordering::Relaxed) == ClientState::Waiting as u8 {
            ClientState::Waiting
        } else {
            ClientState::Active
        }
    }
}

/// A session's view of its cancel requests from some moment on (see [`CancelKey::cancels`]).
#[derive(Debug)]
pub struct Cancels {
    shared: Arc<Cell>,
    seen: u64,
}

impl Cancels {
    /// Whether a cancel request arrived since this view was taken.
    pub fn has_changed(&self) -> bool {
        self.shared.count.load(Ordering::Acquire) != self.seen
    }

    /// Waits for a cancel request that arrived since this view was taken (at once if one has).
    pub async fn changed(&self) {
        loop {
            let arrived = self.shared.arrived.notified();
            if self.has_changed() {
                return;
            }
            arrived.await;
        }
    }
}

/// Every live session's key, shared by all sessions.
#[derive(Default)]
pub struct CancelRegistry {
    sessions: Mutex<HashMap<u32, Arc<Cell>>>,
}

/// A session's registration; removes itself when dropped.
pub struct CancelKey {
    registry: Arc<CancelRegistry>,
    cell: Arc<Cell>,
    /// The process id pgvigil reports to the client.
    pub pid: u32,
    /// The secret pgvigil reports to the client.
    pub secret: u32,
}

impl CancelRegistry {
    /// Registers a new session under a fresh random key.
    pub fn register(self: &Arc<Self>) -> CancelKey {
        let mut sessions = lock(&self.sessions);
        loop {
            let pid = rand::random::<u32>() & 0x7fff_ffff;
            if pid != 0 && !sessions.contains_key(&pid) {
                let secret = rand::random::<u32>();
                let cell = Arc::new(Cell {
                    secret,
                    state: AtomicU8::new(ClientState::Active as u8),
                    target: Mutex::new(None),
                    count: AtomicU64::new(0),
                    arrived: Notify::new(),
                    client: OnceLock::new(),
                });
                sessions.insert(pid, cell.clone());
                return CancelKey {
                    registry: self.clone(),
                    cell,
                    pid,
                    secret,
                };
            }
        }
    }

    /// The backend to cancel for a client's (pid, secret), if both match a live session whose
    /// unit does not wait. A match is also announced to the session (see
    /// [`CancelKey::cancels`]).
    ///
    /// A waiting unit (held by PAUSE, waiting for a primary or a connection) has reached no
    /// backend: the session refuses it itself, and the backend it may hold is not interrupted.
    /// Forwarded there, the request could land late, in the session's next statement.
    pub fn lookup(&self, pid: u32, secret: &[u8]) -> Option<Arc<CancelTarget>> {
        let cell = lock(&self.sessions).get(&pid)?.clone();
        let matches =
            secret.len() == 4 && crate::auth::constant_time_eq(&cell.secret.to_be_bytes(), secret);
        if !matches {
            return None;
        }
        cell.count.fetch_add(1, Ordering::AcqRel);
        cell.arrived.notify_waiters();
        if cell.state.load(Ordering::Acquire) == ClientState::Waiting as u8 {
            return None;
        }
        let target = lock(&cell.target).clone();
        target
    }

    /// The logged-in clients with their cancel pids, in no particular order.
    pub fn clients(&self) -> Vec<(u32, LoggedIn)> {
        lock(&self.sessions)
            .iter()
            .filter(|(_, cell)| cell.client.get().is_some())
            .map(|(pid, cell)| (*pid, LoggedIn(cell.clone())))
            .collect()
    }

    /// Number of registered sessions.
    pub fn len(&self) -> usize {
        lock(&self.sessions).len()
    }

    /// Whether no session is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl CancelKey {
    /// Says what the client is, for SHOW CLIENTS (once, after it logged in).
    pub fn describe(&self, info: ClientInfo) {
        let _ = self.cell.client.set(info);
    }

    /// Notes whether the client's next unit waits.
    pub fn set_state(&self, state: ClientState) {
        self.cell.state.store(state as u8, Ordering::Release);
    }

    /// Points this session's key at the backend now serving it (or at none).
    pub fn set_target(&self, target: Option<Arc<CancelTarget>>) {
        *lock(&self.cell.target) = target;
    }

    /// Cancel requests for this session from now on: it changes with every one that matches,
    /// so that a session waiting without a backend (for a primary) can stop waiting.
    pub fn cancels(&self) -> Cancels {
        Cancels {
            shared: self.cell.clone(),
            seen: self.cell.count.load(Ordering::Acquire),
        }
    }
}

impl Drop for CancelKey {
    fn drop(&mut self) {
        lock(&self.registry.sessions).remove(&self.pid);
    }
}

/// Sends a CancelRequest to the backend; PostgreSQL never answers one, so this only connects,
/// writes and closes, bounded by `timeout`.
pub async fn send_cancel(target: &CancelTarget, timeout: Duration) -> std::io::Result<()> {
    let send = async {
        let mut stream = TcpStream::connect((target.host.as_str(), target.port)).await?;
        let mut buf = BytesMut::with_capacity(16);
        encode::cancel_request(&mut buf, target.pid, &target.key);
        stream.write_all(&buf).await?;
        stream.shutdown().await
    };
    tokio::time::timeout(timeout, send)
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A registry with one session, whose backend has pid 42.
    fn served_session() -> (Arc<CancelRegistry>, CancelKey) {
        let registry = Arc::new(CancelRegistry::default());
        let key = registry.register();
        let target = CancelTarget {
            host: "127.0.0.1".into(),
            port: 5432,
            pid: 42,
            key: vec![1, 2, 3, 4],
        };
        key.set_target(Some(Arc::new(target)));
        (registry, key)
    }

    #[test]
    fn a_key_finds_its_target_only_with_the_right_secret() {
        let (registry, key) = served_session();
        assert_eq!(
            registry
                .lookup(key.pid, &key.secret.to_be_bytes())
                .map(|t| t.pid),
            Some(42)
        );
        let wrong = key.secret.wrapping_add(1).to_be_bytes();
        let cancels = key.cancels();
        assert!(registry.lookup(key.pid, &wrong).is_none());
        assert!(registry.lookup(key.pid, &[0; 3]).is_none());
        assert!(!cancels.has_changed(), "only a matching key counts");
        key.set_target(None);
        assert!(registry
            .lookup(key.pid, &key.secret.to_be_bytes())
            .is_none());
        assert!(cancels.has_changed(), "announced without a backend too");
    }

    #[test]
    fn a_waiting_unit_is_cancelled_by_the_session_and_not_at_its_backend() {
        let (registry, key) = served_session();
        let secret = key.secret.to_be_bytes();
        let cancels = key.cancels();
        key.set_state(ClientState::Waiting);
        assert!(registry.lookup(key.pid, &secret).is_none());
        assert!(cancels.has_changed(), "the waiting session is told");
        key.set_state(ClientState::Active);
        assert_eq!(registry.lookup(key.pid, &secret).map(|t| t.pid), Some(42));
    }

    #[test]
    fn a_dropped_session_cannot_be_cancelled() {
        let registry = Arc::new(CancelRegistry::default());
        let key = registry.register();
        let (pid, secret) = (key.pid, key.secret);
        drop(key);
        assert!(registry.lookup(pid, &secret.to_be_bytes()).is_none());
        assert!(registry.is_empty());
    }
}
