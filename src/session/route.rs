//! Where a unit outside a transaction block goes: a pure function of the unit's facts, the
//! session's routing policy and a routing snapshot (topology, replication positions, config,
//! balancer), so that every rule is unit-tested without a running proxy.
//!
//! Rules, in order: a unit that reuses the unnamed statement goes where it was parsed; a unit
//! that may write, a pinned session, an unsafe client encoding or a `/* pgvigil:primary */` hint
//! goes to the primary; a read after an unmeasured write goes to the primary while no replica
//! can have been seen to replay it, else the write's position is measured first; other reads are
//! spread over the nodes that may take them (past the session's last write: read your writes).

use std::time::Instant;

use pgvigil_proto::classify::Hint;

use super::unit::UnitFacts;
use crate::balance::Balancer;
use crate::config::{NodeConfig, RoutingConfig};
use crate::replication::ReplicationView;
use crate::router::{self, ReadPolicy, Route, RouteReason, MAX_NODES};
use crate::topology::{NodeId, Topology};

/// What the session knows that routing depends on.
#[derive(Debug, Clone, Copy)]
pub struct SessionPolicy {
    /// Why the session must stay on the primary, if it must.
    pub pinned: Option<&'static str>,
    /// The session's `default_transaction_read_only`.
    pub default_read_only: bool,
    /// The client encoding keeps ASCII bytes ASCII, so the classifier can be trusted.
    pub encoding_safe: bool,
    /// The node the unnamed statement was last parsed on.
    pub unnamed_on: Option<NodeId>,
    /// Where the session's writes stand for read-your-writes.
    pub writes: Writes,
    /// Nodes the session could not open a connection to (bit per node); not chosen for reads.
    pub avoided: u64,
    /// A node that has the named statements the unit uses (the previous unit prepared them
    /// there): a read goes there when it may.
    pub prefer: Option<NodeId>,
    /// The node the session's reads were last balanced to, when `routing.read_affinity` keeps
    /// them there: a read goes there when it may and `prefer` names no node.
    pub read_home: Option<NodeId>,
}

/// Where the session's writes stand, for read-your-writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Writes {
    /// No write yet.
    None,
    /// A write was sent at this time and its WAL position has not been measured.
    Unmeasured(Instant),
    /// The primary's WAL position after the last write (`u64::MAX`: it could not be read).
    Measured(u64),
}

/// Everything shared that routing reads, taken once per decision.
pub struct Snapshot<'a> {
    /// The nodes' roles and the primary.
    pub topology: &'a Topology,
    /// How far each node has replayed.
    pub replication: &'a ReplicationView,
    /// `[routing]`.
    pub routing: &'a RoutingConfig,
    /// `[[nodes]]`, for their weights.
    pub nodes: &'a [NodeConfig],
    /// Spreads reads.
    pub balancer: &'a Balancer,
}

/// Where a unit goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Routed {
    /// To this node; `writes`: the unit may write (a lone SET or RESET writes no WAL).
    To {
        /// The node and why.
        route: Route,
        /// Whether it counts as a write for read-your-writes.
        writes: bool,
    },
    /// A read after an unmeasured write: the primary's WAL position must be fetched first.
    FetchLsn,
    /// It must go to the primary and there is none right now (or no node can take the read).
    WaitPrimary,
}

/// Chooses the node for a unit outside a transaction block.
pub fn route_unit(facts: &UnitFacts, policy: &SessionPolicy, snap: &Snapshot<'_>) -> Routed {
    if let (Some(node), true) = (policy.unnamed_on, facts.reuses_unnamed) {
        return Routed::To {
            route: Route {
                node,
                reason: RouteReason::UnnamedStatement,
            },
            writes: !facts.read_only,
        };
    }
    let begin_allows = match facts.begin {
        Some(Some(read_only)) => read_only,
        Some(None) => policy.default_read_only,
        None => true,
    };
    let read = begin_allows && (facts.read_only || facts.hint == Some(Hint::Replica));
    let pinned = policy.pinned.is_some() || facts.pin.is_some();
    // A unit that executed something before a Flush and waits has an unseen rest that may
    // write in the same implicit transaction: it runs on the primary. What it has shown so far
    // decides whether it counts as a write; the rest's writes are noted as they are forwarded.
    // One that only prepared (asyncpg's Parse, Describe, Flush) goes where its statement may
    // run: its rest binds and executes what it prepared.
    let must_write_node = facts.awaits_rest && facts.executes;
    if !read
        || must_write_node
        || pinned
        || !policy.encoding_safe
        || facts.hint == Some(Hint::Primary)
    {
        return primary(snap, RouteReason::Write, !read && !facts.lone_setting());
    }
    let min_lsn = match (snap.routing.read_your_writes, policy.writes) {
        (false, _) | (true, Writes::None) => None,
        (true, Writes::Measured(lsn)) => Some(lsn),
        (true, Writes::Unmeasured(at)) => {
            if snap.replication.observed_at.is_none_or(|seen| seen <= at) {
                // No replica can be known to have the write yet: no need to measure it.
                return primary(snap, RouteReason::ReadYourWrites, false);
            }
            return Routed::FetchLsn;
        }
    };
    let mut weights = [0; MAX_NODES];
    for (id, node) in snap.nodes.iter().enumerate().take(MAX_NODES) {
        if policy.avoided & (1 << id) == 0 {
            weights[id] = node.weight;
        }
    }
    let read_policy = ReadPolicy {
        weights: &weights[..snap.nodes.len().min(MAX_NODES)],
        balance: snap.routing.balance,
        affinity: snap.routing.read_affinity,
        max_lag_bytes: snap.routing.max_lag_bytes,
        max_lag: snap.routing.max_lag,
        primary_reads: snap.routing.primary_reads,
    };
    let routed = router::route_read(
        snap.topology,
        snap.replication,
        &read_policy,
        snap.balancer,
        min_lsn,
        (policy.prefer.map(|node| (node, RouteReason::WherePrepared))).or(policy
            .read_home
            .map(|node| (node, RouteReason::SessionAffinity))),
    );
    match routed {
        Ok(route) => Routed::To {
            route,
            writes: false,
        },
        Err(_) => Routed::WaitPrimary,
    }
}

/// The primary, for `reason`; `WaitPrimary` when there is none.
fn primary(snap: &Snapshot<'_>, reason: RouteReason, writes: bool) -> Routed {
    match router::route_write(snap.topology) {
        Ok(route) => Routed::To {
            route: Route { reason, ..route },
            writes,
        },
        Err(_) => Routed::WaitPrimary,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, PrimaryReads};
    use crate::replication::Position;
    use crate::topology::{Node, Primary, Role};
    use pgvigil_proto::classify::Pin;
    use std::time::Duration;

    /// A primary (node 0) and two standbys, every node caught up at `lsn`, observed at `seen`.
    struct World {
        topology: Topology,
        replication: ReplicationView,
        config: Config,
        balancer: Balancer,
    }

    impl World {
        fn new(lsn: u64, seen: Option<Instant>) -> World {
            let roles = [Role::Primary, Role::Standby, Role::Standby];
            let base = Topology {
                generation: 0,
                nodes: (0..roles.len())
                    .map(|id| Node {
                        id,
                        name: format!("pg{}", id + 1),
                        host: "127.0.0.1".into(),
                        port: 5432 + id as u16,
                        role: Role::Unknown,
                        suspect: false,
                        stale: None,
                    })
                    .collect(),
                primary: Primary::Unavailable("unprobed".into()),
            };
            let topology = base.next(&roles, &[false; 3], Primary::Known(0));
            let replication = ReplicationView {
                nodes: (0..3)
                    .map(|_| {
                        Some(Position {
                            lsn,
                            received: Some(lsn),
                            replay_delay: Duration::ZERO,
                        })
                    })
                    .collect(),
                observed_at: seen,
            };
            let mut config = Config {
                nodes: (0..3)
                    .map(|id| NodeConfig {
                        name: format!("pg{}", id + 1),
                        host: "127.0.0.1".into(),
                        port: 5432 + id as u16,
                        ..NodeConfig::default()
                    })
                    .collect(),
                ..Config::default()
            };
            config.routing.primary_reads = PrimaryReads::Fallback;
            World {
                topology,
                replication,
                config,
                balancer: Balancer::new(3),
            }
        }

        fn route(&self, facts: &UnitFacts, policy: &SessionPolicy) -> Routed {
            let snap = Snapshot {
                topology: &self.topology,
                replication: &self.replication,
                routing: &self.config.routing,
                nodes: &self.config.nodes,
                balancer: &self.balancer,
            };
            route_unit(facts, policy, &snap)
        }
    }

    fn policy() -> SessionPolicy {
        SessionPolicy {
            pinned: None,
            default_read_only: false,
            encoding_safe: true,
            unnamed_on: None,
            writes: Writes::None,
            avoided: 0,
            prefer: None,
            read_home: None,
        }
    }

    fn read() -> UnitFacts {
        UnitFacts {
            complete: true,
            has_statement: true,
            read_only: true,
            ..UnitFacts::default()
        }
    }

    fn write() -> UnitFacts {
        UnitFacts {
            read_only: false,
            ..read()
        }
    }

    fn node(routed: Routed) -> Option<NodeId> {
        match routed {
            Routed::To { route, .. } => Some(route.node),
            _ => None,
        }
    }

    #[test]
    fn a_write_goes_to_the_primary_and_counts_as_a_write() {
        let world = World::new(100, Some(Instant::now()));
        let routed = world.route(&write(), &policy());
        assert!(matches!(routed, Routed::To { route, writes: true } if route.node == 0));
    }

    #[test]
    fn reads_are_spread_over_the_standbys() {
        let world = World::new(100, Some(Instant::now()));
        let nodes: Vec<_> = (0..4)
            .map(|_| node(world.route(&read(), &policy())))
            .collect();
        assert!(nodes.iter().all(|n| matches!(n, Some(1 | 2))), "{nodes:?}");
        assert!(
            nodes.contains(&Some(1)) && nodes.contains(&Some(2)),
            "{nodes:?}"
        );
    }

    #[test]
    fn a_pinned_session_an_unsafe_encoding_or_a_primary_hint_reads_on_the_primary() {
        let world = World::new(100, Some(Instant::now()));
        let pinned = SessionPolicy {
            pinned: Some("LISTEN"),
            ..policy()
        };
        assert_eq!(node(world.route(&read(), &pinned)), Some(0));
        let unsafe_encoding = SessionPolicy {
            encoding_safe: false,
            ..policy()
        };
        assert_eq!(node(world.route(&read(), &unsafe_encoding)), Some(0));
        let hinted = UnitFacts {
            hint: Some(Hint::Primary),
            ..read()
        };
        assert_eq!(node(world.route(&hinted, &policy())), Some(0));
        let pins = UnitFacts {
            pin: Some(Pin::TempTable),
            ..read()
        };
        assert_eq!(node(world.route(&pins, &policy())), Some(0));
    }

    #[test]
    fn a_unit_that_executed_before_a_flush_and_waits_runs_on_the_primary() {
        let world = World::new(100, Some(Instant::now()));
        let executed = UnitFacts {
            awaits_rest: true,
            executes: true,
            ..read()
        };
        let routed = world.route(&executed, &policy());
        assert!(matches!(routed, Routed::To { route, writes: false } if route.node == 0));
        let only_prepared = UnitFacts {
            awaits_rest: true,
            ..read()
        };
        assert!(matches!(
            node(world.route(&only_prepared, &policy())),
            Some(1 | 2)
        ));
    }

    #[test]
    fn a_read_write_begin_follows_the_sessions_default_mode() {
        let world = World::new(100, Some(Instant::now()));
        let begin = UnitFacts {
            begin: Some(None),
            ..read()
        };
        assert_eq!(node(world.route(&begin, &policy())), Some(0));
        let read_only_default = SessionPolicy {
            default_read_only: true,
            ..policy()
        };
        assert!(matches!(
            node(world.route(&begin, &read_only_default)),
            Some(1 | 2)
        ));
        let read_only_begin = UnitFacts {
            begin: Some(Some(true)),
            ..read()
        };
        assert!(matches!(
            node(world.route(&read_only_begin, &policy())),
            Some(1 | 2)
        ));
    }

    #[test]
    fn a_read_after_a_write_waits_for_a_replica_that_replayed_it() {
        let wrote = Instant::now();
        let before = World::new(100, Some(wrote - Duration::from_secs(1)));
        let unmeasured = SessionPolicy {
            writes: Writes::Unmeasured(wrote),
            ..policy()
        };
        let routed = before.route(&read(), &unmeasured);
        assert!(
            matches!(routed, Routed::To { route, writes: false }
                if route.node == 0 && route.reason == RouteReason::ReadYourWrites),
            "{routed:?}"
        );
        let after = World::new(100, Some(wrote + Duration::from_secs(1)));
        assert_eq!(after.route(&read(), &unmeasured), Routed::FetchLsn);
        let ahead = SessionPolicy {
            writes: Writes::Measured(200),
            ..policy()
        };
        assert_eq!(
            node(after.route(&read(), &ahead)),
            Some(0),
            "no replica has 200 yet"
        );
        let behind = SessionPolicy {
            writes: Writes::Measured(50),
            ..policy()
        };
        assert!(matches!(node(after.route(&read(), &behind)), Some(1 | 2)));
    }

    #[test]
    fn the_unnamed_statement_and_a_prepared_statement_keep_their_node() {
        let world = World::new(100, Some(Instant::now()));
        let reuses = UnitFacts {
            reuses_unnamed: true,
            ..write()
        };
        let unnamed_on_2 = SessionPolicy {
            unnamed_on: Some(2),
            ..policy()
        };
        let routed = world.route(&reuses, &unnamed_on_2);
        assert!(matches!(routed, Routed::To { route, writes: true } if route.node == 2));
        let prefer_2 = SessionPolicy {
            prefer: Some(2),
            ..policy()
        };
        for _ in 0..3 {
            assert_eq!(node(world.route(&read(), &prefer_2)), Some(2));
        }
    }

    #[test]
    fn a_read_goes_to_the_sessions_node_while_it_qualifies_and_a_prepared_statement_first() {
        let world = World::new(100, Some(Instant::now()));
        let home_2 = SessionPolicy {
            read_home: Some(2),
            ..policy()
        };
        for _ in 0..3 {
            let routed = world.route(&read(), &home_2);
            assert!(
                matches!(routed, Routed::To { route, writes: false }
                    if route.node == 2 && route.reason == RouteReason::SessionAffinity),
                "{routed:?}"
            );
        }
        let prepared_on_1 = SessionPolicy {
            prefer: Some(1),
            ..home_2
        };
        assert_eq!(node(world.route(&read(), &prepared_on_1)), Some(1));
        // Node 2 has not replayed the session's write: the read goes where it may.
        let mut behind = World::new(100, Some(Instant::now()));
        behind.replication.nodes[2] =
            behind.replication.nodes[1].map(|p| Position { lsn: 50, ..p });
        let wrote = SessionPolicy {
            writes: Writes::Measured(80),
            ..home_2
        };
        for _ in 0..3 {
            assert_eq!(node(behind.route(&read(), &wrote)), Some(1));
        }
        // A write still goes to the primary.
        assert_eq!(node(world.route(&write(), &home_2)), Some(0));
    }

    #[test]
    fn an_avoided_node_takes_no_reads_and_no_primary_means_waiting() {
        let world = World::new(100, Some(Instant::now()));
        let avoid_1 = SessionPolicy {
            avoided: 1 << 1,
            ..policy()
        };
        for _ in 0..3 {
            assert_eq!(node(world.route(&read(), &avoid_1)), Some(2));
        }
        let mut leaderless = World::new(100, Some(Instant::now()));
        leaderless.topology = leaderless.topology.next(
            &[Role::Down, Role::Standby, Role::Standby],
            &[false; 3],
            Primary::Unavailable("failover in progress".into()),
        );
        assert_eq!(leaderless.route(&write(), &policy()), Routed::WaitPrimary);
    }
}
