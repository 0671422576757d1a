//! A session's reads of the state it shares with every other session: the configuration, the
//! topology and the replication view. Each is swapped whole by its one writer (a reload, the
//! failover coordinator, the probes); arc_swap's `load` takes and pays back a debt slot for
//! every read (about 60 instructions, several times per transaction under transaction
//! pooling), where a view keeps the snapshot it read last and sees with one atomic load per
//! kind that it is still the one in force: each read is as fresh as a `load`.

use std::sync::Arc;

use arc_swap::cache::Cache;
use arc_swap::ArcSwap;

use crate::config::Config;
use crate::proxy::Proxy;
use crate::replication::ReplicationView;
use crate::topology::Topology;

/// The shared state as one session last read it.
pub struct Views<'p> {
    config: Cache<&'p ArcSwap<Config>, Arc<Config>>,
    topology: Cache<&'p ArcSwap<Topology>, Arc<Topology>>,
    replication: Cache<&'p ArcSwap<ReplicationView>, Arc<ReplicationView>>,
}

/// The shared state in force when [`Views::now`] was called. Like an arc_swap guard, not to be
/// held across an `.await`: it borrows the session's views, and would hold old snapshots.
pub struct Now<'v> {
    /// The configuration.
    pub config: &'v Config,
    /// The topology.
    pub topology: &'v Topology,
    /// What the probes last saw of replication.
    pub replication: &'v ReplicationView,
}

impl<'p> Views<'p> {
    /// Views of `proxy`'s state, read now.
    pub fn new(proxy: &'p Proxy) -> Views<'p> {
        Views {
            config: proxy.config_cache(),
            topology: proxy.topology.cache(),
            replication: proxy.replication.cache(),
        }
    }

    /// The state in force now.
    pub fn now(&mut self) -> Now<'_> {
        Now {
            config: self.config.load(),
            topology: self.topology.load(),
            replication: self.replication.load(),
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
