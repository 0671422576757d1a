//! The thread-per-core data plane: `threads` OS threads, each a `current_thread` tokio runtime
//! with its own `SO_REUSEPORT` listener on the client address, accepting its clients and running
//! their sessions itself, so that no message is handed from one thread to another. The control
//! plane (probes, failover, admin API, etcd, reload, pool reaper) runs on the runtime that started
//! the proxy, so that data-path load never delays failure detection.
//!
//! A tokio socket belongs to the I/O driver of the runtime it was registered with, and a
//! `current_thread` runtime only drives its driver while it runs: each socket therefore records
//! its [`Home`], and the pools move a connection to the caller's runtime before lending it
//! elsewhere (see `Stream::reregister`).

use std::cell::Cell;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::error;

use crate::listener;
use crate::proxy::Proxy;

/// The runtime whose I/O driver a socket is registered with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Home {
    /// The control runtime (or any runtime that is not a data-plane thread).
    Control,
    /// Data-plane thread number `n`.
    Data(usize),
}

thread_local! {
    static HOME: Cell<Home> = const { Cell::new(Home::Control) };
}

/// The runtime the calling thread runs.
pub fn here() -> Home {
    HOME.get()
}

/// Backlog of each listener (tokio's own default for `TcpListener::bind`).
const BACKLOG: i32 = 1024;

/// Binds `count` listeners to `addr` with `SO_REUSEPORT`, so that the kernel spreads new
/// connections over them; with port 0, a free port is chosen once for all of them.
///
/// A port another process already listens on is refused (`AddrInUse`), as a plain bind would
/// refuse it, even when that process set `SO_REUSEPORT` too (a second pgvigil of the same user):
/// the kernel would otherwise share the clients between the two.
pub fn bind(addr: SocketAddr, count: usize) -> io::Result<Vec<std::net::TcpListener>> {
    let addr = claim(addr)?;
    let mut listeners = Vec::with_capacity(count);
    for _ in 0..count {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&addr.into())?;
        socket.listen(BACKLOG)?;
        let listener = std::net::TcpListener::from(socket);
        listeners.push(listener);
    }
    Ok(listeners)
}

/// Binds `addr` without `SO_REUSEPORT` (which fails when anyone listens there) and lets it go:
/// the address to bind the data plane's listeners to, its port chosen when `addr` has port 0.
fn claim(addr: SocketAddr) -> io::Result<SocketAddr> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket
        .local_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::other("the bound address is not an IP address"))
}

/// The running data-plane threads.
pub struct DataPlane {
    threads: Vec<JoinHandle<()>>,
}

impl DataPlane {
    /// Starts one thread per listener, each accepting until `shutdown` fires and then dropping the
    /// sessions it still runs; `limit` holds `max_client_conn` for all of them together.
    pub fn start(
        listeners: Vec<std::net::TcpListener>,
        proxy: &Arc<Proxy>,
        shutdown: &CancellationToken,
    ) -> io::Result<DataPlane> {
        let limit = Arc::new(Semaphore::new(proxy.config().max_client_conn));
        let mut threads = Vec::with_capacity(listeners.len());
        for (n, listener) in listeners.into_iter().enumerate() {
            // Built here so that a failure is reported by `start` rather than lost in the thread.
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            // Registered before the thread starts: every thread shows in /metrics at once.
            let accepted = proxy.metrics.accepted_on(n);
            let (proxy, limit, shutdown) = (proxy.clone(), limit.clone(), shutdown.clone());
            let thread = std::thread::Builder::new()
                .name(format!("pgvigil-data-{n}"))
                .spawn(move || {
                    HOME.set(Home::Data(n));
                    runtime.block_on(async move {
                        // Before the first session: every relay of this thread relies on it.
                        tokio::spawn(crate::session::watch_topology(proxy.topology.subscribe()));
                        match tokio::net::TcpListener::from_std(listener) {
                            Ok(listener) => {
                                listener::accept_loop(listener, accepted, proxy, limit, shutdown)
                                    .await
                            }
                            Err(error) => error!(%error, thread = n, "cannot register listener"),
                        }
                    });
                    // Dropping the runtime here drops the sessions it still runs.
                })?;
            threads.push(thread);
        }
        Ok(DataPlane { threads })
    }

    /// Waits for every thread to end (once the shutdown token fired).
    pub async fn join(self) {
        let threads = self.threads;
        let _ = tokio::task::spawn_blocking(move || {
            for thread in threads {
                let _ = thread.join();
            }
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_someone_listens_on_is_refused_even_with_reuseport() {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        let first = bind(any, 2).expect("a free port");
        let addr = first[0].local_addr().expect("bound");
        assert!(first.iter().all(|l| l.local_addr().ok() == Some(addr)));
        // A second pgvigil (SO_REUSEPORT as well) must not share the first one's clients.
        let second = bind(addr, 2).expect_err("the port is taken");
        assert_eq!(second.kind(), io::ErrorKind::AddrInUse);
        drop(first);
        // Nor the port of a plain listener.
        let plain = std::net::TcpListener::bind(any).expect("a free port");
        let taken = bind(plain.local_addr().expect("bound"), 1).expect_err("the port is taken");
        assert_eq!(taken.kind(), io::ErrorKind::AddrInUse);
    }
}
