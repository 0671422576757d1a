//! The list of every open server connection, for SHOW SERVERS: a connection enters it when it
//! opens and leaves it when it is dropped, wherever that happens.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use super::lock;
use crate::topology::NodeId;

/// An open server connection as SHOW SERVERS lists it.
#[derive(Debug, Clone)]
pub struct ServerInfo {
    /// The node it is open to.
    pub node: NodeId,
    /// Role it is logged in as.
    pub user: String,
    /// Database it is logged in to.
    pub database: String,
    /// The node's host and port.
    pub addr: (String, u16),
    /// The backend's process id.
    pub backend_pid: u32,
    /// When it was opened.
    pub connected_at: SystemTime,
}

/// Every open server connection by id; each leaves when its [`Listed`] is dropped.
pub(super) type OpenList = Arc<Mutex<HashMap<u64, ServerInfo>>>;

/// A server connection's place in the list of open connections; dropped with the connection.
#[derive(Debug)]
pub struct Listed {
    open: OpenList,
    /// Its key in the list.
    pub(super) id: u64,
}

impl Listed {
    /// Lists nothing itself: the caller has put the connection in `open` under `id`.
    pub(super) fn new(open: OpenList, id: u64) -> Listed {
        Listed { open, id }
    }
}

impl Drop for Listed {
    fn drop(&mut self) {
        lock(&self.open).remove(&self.id);
    }
}

/// A server connection and whether it is idle in a pool or lent to a session.
#[derive(Debug, Clone)]
pub struct ServerRow {
    /// What it is.
    pub info: ServerInfo,
    /// Idle in a pool (else lent to a session).
    pub idle: bool,
}
