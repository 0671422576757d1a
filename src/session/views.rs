//! A session's reads of the state it shares with every other session: the configuration and
//! the topology. Each is swapped whole by its one writer (a reload, the failover coordinator);
//! arc_swap's `load` takes and pays back a debt slot for every read (about 60 instructions,
//! several times per transaction under transaction pooling), where a view keeps the snapshot it
//! read last and sees with one atomic load per kind that it is still the one in force: each
//! read is as fresh as a `load`.
//!
//! An idle session keeps the snapshots it read last, so only state that changes rarely is
//! viewed here: the replication view, published by every probe round, is loaded where it is
//! read (an idle session would otherwise keep a round's view of its own).

use std::sync::Arc;

use arc_swap::cache::Cache;
use arc_swap::ArcSwap;

use crate::config::Config;
use crate::proxy::Proxy;
use crate::topology::Topology;

/// The shared state as one session last read it.
pub struct Views<'p> {
    config: Cache<&'p ArcSwap<Config>, Arc<Config>>,
    topology: Cache<&'p ArcSwap<Topology>, Arc<Topology>>,
}

/// The shared state in force when [`Views::now`] was called. Like an arc_swap guard, not to be
/// held across an `.await`: it borrows the session's views, and would hold old snapshots.
pub struct Now<'v> {
    /// The configuration.
    pub config: &'v Config,
    /// The topology.
    pub topology: &'v Topology,
}

impl<'p> Views<'p> {
    /// Views of `proxy`'s state, read now.
    pub fn new(proxy: &'p Proxy) -> Views<'p> {
        Views {
            config: proxy.config_cache(),
            topology: proxy.topology.cache(),
        }
    }

    /// The state in force now.
    pub fn now(&mut self) -> Now<'_> {
        Now {
            config: self.config.load(),
            topology: self.topology.load(),
        }
    }

    /// The configuration in force now.
    pub fn config(&mut self) -> &Config {
        self.config.load()
    }

    /// The topology in force now.
    pub fn topology(&mut self) -> &Topology {
        self.topology.load()
    }
}
