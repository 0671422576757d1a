//! Free loopback ports for cluster nodes.
//!
//! Tests build clusters on parallel threads; the OS may hand the same ephemeral port to two
//! threads between our probe and postgres binding it, so every port given out is remembered for
//! the life of the process and never given out twice.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, TcpListener};
use std::sync::{Mutex, PoisonError};

use super::ClusterError;

/// Ports already handed to a node by this process.
static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());

/// How far above a preferred port we look before falling back to an ephemeral one.
const PREFERRED_SCAN: u16 = 100;

/// How many ephemeral ports we try before giving up.
const EPHEMERAL_TRIES: usize = 50;

/// Reserves a port that is free now: the first free one at or above `preferred` if given,
/// otherwise (or if none is free there) one chosen by the OS.
pub(crate) fn reserve(preferred: Option<u16>) -> Result<u16, ClusterError> {
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(first) = preferred {
        let last = first.saturating_add(PREFERRED_SCAN);
        if let Some(port) = (first..last).find(|p| !handed_out.contains(p) && is_free(*p)) {
            handed_out.insert(port);
            return Ok(port);
        }
    }
    for _ in 0..EPHEMERAL_TRIES {
        let port = ephemeral()?;
        if handed_out.insert(port) {
            return Ok(port);
        }
    }
    Err(ClusterError::NoFreePort)
}

/// Whether 127.0.0.1:`port` can be bound right now.
fn is_free(port: u16) -> bool {
    port != 0 && TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok()
}

/// A port the OS considers free, released again at once.
fn ephemeral() -> Result<u16, ClusterError> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .map_err(|e| ClusterError::io("binding 127.0.0.1:0 to find a free port", e))?;
    let addr = listener
        .local_addr()
        .map_err(|e| ClusterError::io("reading the address of a probe socket", e))?;
    Ok(addr.port())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn parallel_reservations_never_collide() {
        let handles: Vec<_> = (0..8)
            .map(|_| std::thread::spawn(|| (0..10).map(|_| reserve(None)).collect::<Vec<_>>()))
            .collect();
        let mut seen = HashSet::new();
        for handle in handles {
            for port in handle.join().unwrap_or_default() {
                let port = port.unwrap_or(0);
                assert_ne!(port, 0);
                assert!(seen.insert(port), "port {port} handed out twice");
            }
        }
        assert_eq!(seen.len(), 80);
    }

    #[test]
    fn preferred_port_in_use_is_skipped() {
        let busy = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap_or_else(|e| panic!("{e}"));
        let busy_port = busy.local_addr().map(|a| a.port()).unwrap_or(0);
        let port = reserve(Some(busy_port)).unwrap_or_else(|e| panic!("{e}"));
        assert_ne!(port, busy_port);
    }
}
