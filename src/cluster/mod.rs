//! Several pgvigil instances, one decider: leader election on an etcd lease (`election`), and the
//! shared state the leader writes under it (`shared`), over a small client for etcd's JSON
//! gateway (`etcd`). See README, "Several pgvigil instances".
//!
//! [`Leadership`] is what the rest of pgvigil sees: the failover coordinator asks it
//! [`Leadership::may_act`] before every action on the nodes.

pub mod election;
pub mod etcd;
pub mod shared;
pub mod views;

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tracing::{info, warn};

use crate::config::Config;
use etcd::Etcd;
use shared::SharedState;
use views::InstanceView;

/// Where this instance stands, as the election last found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Standing {
    /// No `[cluster]` section: this instance decides alone.
    Alone,
    /// Another instance leads, or no leader is known: this one never acts on the nodes.
    Follower {
        /// The leader's instance name, when known.
        leader: Option<String>,
        /// Why this instance is not the leader.
        why: String,
    },
    /// This instance holds the leader key, attached to `lease`, as long as `deadline` has not
    /// passed (see [`election::deadline`]).
    Leader {
        /// The lease the leader key is attached to; every shared-state write compares it.
        lease: i64,
        /// The leader key's create revision: tells one leadership from the next.
        epoch: i64,
        /// Past this instant the lease may have expired in etcd: no more actions.
        deadline: Instant,
    },
}

/// The etcd keys of one pgvigil cluster (`cluster.etcd.prefix`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    /// The leader key: the leader's instance name, attached to its lease.
    pub leader: String,
    /// The shared state (JSON), written by the leader only.
    pub state: String,
    /// Prefix of the instances' views (`<prefix>/members/<name>`), each on its instance's lease.
    pub members: String,
}

impl Keys {
    /// The keys under `prefix`.
    pub fn new(prefix: &str) -> Keys {
        Keys {
            leader: format!("{prefix}/leader"),
            state: format!("{prefix}/state"),
            members: format!("{prefix}/members/"),
        }
    }
}

/// What a multi-instance pgvigil needs to talk to etcd.
#[derive(Debug)]
pub struct Member {
    /// The etcd client.
    pub etcd: Etcd,
    /// The cluster's keys.
    pub keys: Keys,
    /// This instance's name.
    pub name: String,
    /// The lease TTL asked for.
    pub ttl: Duration,
    /// Where the other instances reach this one's admin API: `cluster.instance.admin_url`, else
    /// set once the admin listener is bound ([`Leadership::admin_bound`]).
    pub admin_url: OnceLock<String>,
}

/// This instance's standing, shared by the election, the shared-state writer and the failover
/// coordinator.
#[derive(Debug)]
pub struct Leadership {
    standing: watch::Sender<Standing>,
    /// The latest state the coordinator wants shared (the writer sends it under the lease).
    state: watch::Sender<Option<SharedState>>,
    /// This instance's latest view of the nodes (the election publishes it under the lease).
    view: watch::Sender<Option<InstanceView>>,
    /// None when this instance decides alone.
    member: Option<Member>,
}

impl Leadership {
    /// The standing `config` starts with: alone without `[cluster]`, else a follower until the
    /// election says otherwise.
    pub fn new(config: &Config) -> Arc<Leadership> {
        let cluster = &config.cluster;
        let (standing, member) = if cluster.enabled() {
            let name = cluster.instance.name.clone().unwrap_or_else(host_name);
            info!(instance = %name, endpoints = ?cluster.etcd.endpoints, prefix = %cluster.etcd.prefix,
                "several pgvigil instances: the leader elected in etcd decides failovers");
            let admin_url = OnceLock::new();
            if let Some(url) = &cluster.instance.admin_url {
                let _ = admin_url.set(url.clone());
            }
            let member = Member {
                etcd: Etcd::new(&cluster.etcd),
                keys: Keys::new(&cluster.etcd.prefix),
                name,
                ttl: cluster.ttl,
                admin_url,
            };
            let standing = Standing::Follower {
                leader: None,
                why: "no leader elected yet".into(),
            };
            (standing, Some(member))
        } else {
            info!("single instance: this pgvigil decides failovers alone (no [cluster] etcd endpoints)");
            (Standing::Alone, None)
        };
        Arc::new(Leadership {
            standing: watch::Sender::new(standing),
            state: watch::Sender::new(None),
            view: watch::Sender::new(None),
            member,
        })
    }

    /// The gate of every action on the nodes (promote, fence, `ALTER SYSTEM`, repoint): Ok when
    /// this instance decides alone or leads with its lease still valid; else why not.
    pub fn may_act(&self) -> Result<(), String> {
        match &*self.standing.borrow() {
            Standing::Alone => Ok(()),
            Standing::Leader { deadline, .. } if Instant::now() < *deadline => Ok(()),
            Standing::Leader { .. } => Err(
                "this instance's etcd lease could not be renewed in time: no action on the \
                 nodes until it is"
                    .into(),
            ),
            Standing::Follower { leader, why } => Err(match leader {
                Some(leader) => format!("pgvigil instance {leader} leads and decides"),
                None => format!("no pgvigil instance leads ({why}): nobody acts on the nodes"),
            }),
        }
    }

    /// The current standing.
    pub fn standing(&self) -> Standing {
        self.standing.borrow().clone()
    }

    /// Announces every change of standing.
    pub fn subscribe(&self) -> watch::Receiver<Standing> {
        self.standing.subscribe()
    }

    /// The etcd side of a multi-instance pgvigil; None when it decides alone.
    pub fn member(&self) -> Option<&Member> {
        self.member.as_ref()
    }

    /// Asks for `state` to be shared in etcd; the shared-state writer sends it while this
    /// instance leads (without `[cluster]` nothing happens).
    pub fn share(&self, state: SharedState) {
        if self.member.is_some() {
            self.state.send_replace(Some(state));
        }
    }

    /// The epoch of this instance's leadership (the leader key's create revision), if it leads.
    pub fn epoch(&self) -> Option<i64> {
        match &*self.standing.borrow() {
            Standing::Leader { epoch, .. } => Some(*epoch),
            _ => None,
        }
    }

    /// Writes `state` to etcd now, guarded by the lease, before an action that must not happen
    /// unrecorded (a promotion): Ok alone or once written; else why not (a refused write makes
    /// this instance a follower at once).
    pub async fn record(&self, state: &SharedState) -> Result<(), String> {
        self.may_act()?;
        let (Some(member), Standing::Leader { lease, .. }) = (&self.member, self.standing()) else {
            return Ok(());
        };
        match shared::write_guarded(member, lease, state).await {
            Ok(()) => Ok(()),
            Err(e @ shared::SharedError::Deposed { .. }) => {
                self.set(Standing::Follower {
                    leader: None,
                    why: "etcd refused a write guarded by this instance's lease".into(),
                });
                Err(e.to_string())
            }
            Err(e) => Err(format!("could not record the promotion in etcd: {e}")),
        }
    }

    /// Records this instance's view of the nodes (with its admin address), for the election to
    /// publish when it changed (without `[cluster]` nothing happens).
    pub fn report_view(&self, mut view: InstanceView) {
        if let Some(member) = &self.member {
            view.admin = member.admin_url.get().cloned();
            self.view.send_if_modified(|current| {
                let changed = current.as_ref() != Some(&view);
                *current = Some(view);
                changed
            });
        }
    }

    /// What a node this instance promotes records as `pgvigil.promoted_by`: the instance, its
    /// leadership epoch and lease (alone: the host name), and the time.
    pub fn promotion_stamp(&self) -> String {
        let at = humantime::format_rfc3339_seconds(std::time::SystemTime::now());
        match (&self.member, self.standing()) {
            (Some(member), Standing::Leader { epoch, lease, .. }) => {
                format!("{} epoch {epoch} lease {lease} at {at}", member.name)
            }
            (Some(member), _) => format!("{} (not leading) at {at}", member.name),
            (None, _) => format!("{} alone at {at}", host_name()),
        }
    }

    /// Tells where the admin API was bound, for the other instances to forward commands to
    /// (unless `cluster.instance.admin_url` says otherwise): `http://` and `bound`, an
    /// unspecified address replaced by the instance name.
    pub fn admin_bound(&self, bound: SocketAddr) {
        if let Some(member) = &self.member {
            member.admin_url.get_or_init(|| {
                if bound.ip().is_unspecified() {
                    format!("http://{}:{}", member.name, bound.port())
                } else {
                    format!("http://{bound}")
                }
            });
        }
    }

    /// Records a new standing, logging changes of role.
    fn set(&self, next: Standing) {
        let previous = self.standing.send_replace(next.clone());
        match (&previous, &next) {
            (Standing::Leader { epoch: was, .. }, Standing::Leader { epoch, .. })
                if was == epoch => {}
            (_, Standing::Leader { epoch, lease, .. }) => {
                info!(
                    epoch,
                    lease, "this instance is the leader: it decides failovers"
                )
            }
            (Standing::Leader { .. }, Standing::Follower { leader, why }) => {
                warn!(?leader, %why, "this instance is no longer the leader")
            }
            (Standing::Follower { leader: was, .. }, Standing::Follower { leader, why })
                if was != leader =>
            {
                info!(?leader, %why, "following")
            }
            _ => {}
        }
    }
}

/// The machine's host name (`instance.name`'s default), "pgvigil" when it cannot be read.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "pgvigil".into())
}
