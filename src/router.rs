//! Which node a client's work goes to, and why. Pure: no I/O, one topology snapshot per decision.
//!
//! The session decides *whether* a unit of work may be served by a replica (see
//! `session::steering`); this module knows the cluster: where the primary is, which nodes may take
//! reads (role, weight, lag, the session's last write) and how reads are spread.

use std::time::Duration;

use crate::balance::Balancer;
use crate::config::Balance;
use crate::replication::ReplicationView;
use crate::topology::{NodeId, Primary, Role, Topology};

/// Most nodes a read can be spread over (the candidate list lives on the stack).
pub const MAX_NODES: usize = 64;

/// A routing decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    /// The chosen node.
    pub node: NodeId,
    /// Why it was chosen (logged at debug level).
    pub reason: RouteReason,
}

/// The reason behind a [`Route`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteReason {
    /// A session starts on the primary: it gets its parameters and key there.
    SessionStart,
    /// Not provably read-only (the classifier's reason is logged with it).
    Write,
    /// A read spread over the nodes that may take it.
    Balanced,
    /// A read, but no replica qualifies (weight, lag, the session's last write).
    NoReplicaQualifies,
    /// A read after a write no replica has been seen to replay yet.
    ReadYourWrites,
    /// It uses the unnamed statement, which lives on the node that parsed it.
    UnnamedStatement,
    /// A read of the statement the previous unit prepared, on the node that prepared it.
    WherePrepared,
}

impl RouteReason {
    /// A short phrase for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            RouteReason::SessionStart => "session start",
            RouteReason::Write => "may write",
            RouteReason::Balanced => "read, balanced",
            RouteReason::NoReplicaQualifies => "read, but no replica qualifies",
            RouteReason::ReadYourWrites => "read after a write no replica was seen to replay yet",
            RouteReason::UnnamedStatement => "uses the unnamed statement parsed there",
            RouteReason::WherePrepared => "read of the statement just prepared there",
        }
    }
}

/// Why no node can be chosen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// No primary is known; the text says why.
    #[error("no primary is available: {0}")]
    NoPrimary(String),
}

/// What reads must respect, from the configuration.
#[derive(Debug, Clone, Copy)]
pub struct ReadPolicy<'a> {
    /// Per-node weight, in node order.
    pub weights: &'a [u32],
    /// How reads are spread.
    pub balance: Balance,
    /// Most WAL bytes a replica may be behind.
    pub max_lag_bytes: u64,
    /// Most replay delay a replica may have.
    pub max_lag: Duration,
}

/// Chooses the node a new session's first server connection is opened on.
pub fn route_session(topology: &Topology) -> Result<Route, RouteError> {
    primary(topology).map(|node| Route {
        node,
        reason: RouteReason::SessionStart,
    })
}

/// The node that takes writes.
pub fn route_write(topology: &Topology) -> Result<Route, RouteError> {
    primary(topology).map(|node| Route {
        node,
        reason: RouteReason::Write,
    })
}

/// Chooses a node for a read: a node with weight > 0 that is the primary or a standby caught up
/// within the lag limits and, when `min_lsn` is given, past that LSN; `prefer` if it is one of
/// them, else spread by the balancer. When none qualifies, the primary.
pub fn route_read(
    topology: &Topology,
    replication: &ReplicationView,
    policy: &ReadPolicy<'_>,
    balancer: &Balancer,
    min_lsn: Option<u64>,
    prefer: Option<NodeId>,
) -> Result<Route, RouteError> {
    let primary = primary(topology);
    let mut candidates = [(0, 0); MAX_NODES];
    let mut count = 0;
    for node in topology.nodes.iter().take(MAX_NODES) {
        let weight = policy.weights.get(node.id).copied().unwrap_or(0);
        if weight > 0
            && may_read(
                node.id,
                node.role,
                primary.as_ref().ok(),
                replication,
                policy,
                min_lsn,
            )
        {
            if prefer == Some(node.id) {
                return Ok(Route {
                    node: node.id,
                    reason: RouteReason::WherePrepared,
                });
            }
            candidates[count] = (node.id, weight);
            count += 1;
        }
    }
    match balancer.pick(&candidates[..count], policy.balance) {
        Some(node) => Ok(Route {
            node,
            reason: RouteReason::Balanced,
        }),
        None => primary.map(|node| Route {
            node,
            reason: RouteReason::NoReplicaQualifies,
        }),
    }
}

/// Whether `node` may serve a read now.
fn may_read(
    node: NodeId,
    role: Role,
    primary: Option<&NodeId>,
    replication: &ReplicationView,
    policy: &ReadPolicy<'_>,
    min_lsn: Option<u64>,
) -> bool {
    match (role, primary) {
        (Role::Primary, Some(&p)) => p == node,
        (Role::Standby, Some(&p)) => {
            replication.caught_up(node, p, policy.max_lag_bytes, policy.max_lag)
                && min_lsn.is_none_or(|lsn| replication.has_replayed(node, p, lsn))
        }
        // Without a primary there is nothing to measure lag against, nor a session write to
        // wait for: a standby whose replay is not delayed may still serve reads.
        (Role::Standby, None) => {
            min_lsn.is_none()
                && replication
                    .nodes
                    .get(node)
                    .copied()
                    .flatten()
                    .is_some_and(|p| p.replay_delay <= policy.max_lag)
        }
        _ => false,
    }
}

fn primary(topology: &Topology) -> Result<NodeId, RouteError> {
    match &topology.primary {
        Primary::Known(node) => Ok(*node),
        Primary::Unavailable(why) => Err(RouteError::NoPrimary(why.clone())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replication::Position;
    use crate::topology::Node;

    fn topology(roles: &[Role]) -> Topology {
        let base = Topology {
            generation: 0,
            nodes: roles
                .iter()
                .enumerate()
                .map(|(id, _)| Node {
                    id,
                    name: format!("pg{}", id + 1),
                    host: "127.0.0.1".into(),
                    port: 5432 + id as u16,
                    role: Role::Unknown,
                    suspect: false,
                })
                .collect(),
            primary: Primary::Unavailable("unprobed".into()),
        };
        let primaries: Vec<usize> = (0..roles.len())
            .filter(|&i| roles[i] == Role::Primary)
            .collect();
        let primary = match primaries.as_slice() {
            [one] => Primary::Known(*one),
            _ => Primary::Unavailable("no single primary".into()),
        };
        base.next(roles, &vec![false; roles.len()], primary)
    }

    fn positions(lsns: &[Option<u64>]) -> ReplicationView {
        ReplicationView {
            nodes: lsns
                .iter()
                .map(|lsn| {
                    lsn.map(|lsn| Position {
                        lsn,
                        received: Some(lsn),
                        replay_delay: Duration::ZERO,
                    })
                })
                .collect(),
            observed_at: None,
        }
    }

    fn policy(weights: &[u32]) -> ReadPolicy<'_> {
        ReadPolicy {
            weights,
            balance: Balance::RoundRobin,
            max_lag_bytes: 1000,
            max_lag: Duration::from_secs(10),
        }
    }

    /// The nodes `route_read` picks over `n` calls, counted per node.
    fn spread(
        t: &Topology,
        view: &ReplicationView,
        weights: &[u32],
        min: Option<u64>,
        n: usize,
    ) -> Vec<usize> {
        let balancer = Balancer::new(t.nodes.len());
        let mut counts = vec![0; t.nodes.len()];
        for _ in 0..n {
            counts[route_read(t, view, &policy(weights), &balancer, min, None)
                .unwrap()
                .node] += 1;
        }
        counts
    }

    #[test]
    fn sessions_go_to_the_observed_primary_not_the_first_node() {
        let t = topology(&[Role::Standby, Role::Primary, Role::Standby]);
        assert_eq!(route_session(&t).map(|r| r.node), Ok(1));
        assert_eq!(route_write(&t).map(|r| r.node), Ok(1));
    }

    #[test]
    fn no_primary_is_an_error_with_the_topologys_reason() {
        for roles in [[Role::Standby, Role::Down], [Role::Primary, Role::Primary]] {
            let err = route_write(&topology(&roles)).unwrap_err();
            assert_eq!(
                err.to_string(),
                "no primary is available: no single primary"
            );
        }
    }

    #[test]
    fn reads_spread_by_weight_and_weight_zero_excludes() {
        let t = topology(&[Role::Primary, Role::Standby, Role::Standby]);
        let view = positions(&[Some(100), Some(100), Some(100)]);
        assert_eq!(spread(&t, &view, &[0, 1, 2], None, 300), vec![0, 100, 200]);
        assert_eq!(spread(&t, &view, &[1, 1, 0], None, 300), vec![150, 150, 0]);
    }

    #[test]
    fn lagging_down_or_unknown_replicas_get_no_reads() {
        let t = topology(&[Role::Primary, Role::Standby, Role::Down]);
        let view = positions(&[Some(5000), Some(100), Some(5000)]);
        assert_eq!(spread(&t, &view, &[0, 1, 1], None, 10), vec![10, 0, 0]);
        let r = route_read(
            &t,
            &view,
            &policy(&[0, 1, 1]),
            &Balancer::new(3),
            None,
            None,
        )
        .unwrap();
        assert_eq!(r.reason, RouteReason::NoReplicaQualifies);
        let unobserved = positions(&[Some(100), None, None]);
        assert_eq!(
            spread(&t, &unobserved, &[0, 1, 1], None, 10),
            vec![10, 0, 0]
        );
    }

    #[test]
    fn a_session_write_keeps_reads_off_replicas_that_have_not_replayed_it() {
        let t = topology(&[Role::Primary, Role::Standby, Role::Standby]);
        let view = positions(&[Some(900), Some(900), Some(800)]);
        assert_eq!(spread(&t, &view, &[0, 1, 1], Some(850), 10), vec![0, 10, 0]);
        assert_eq!(spread(&t, &view, &[0, 1, 1], Some(901), 10), vec![10, 0, 0]);
    }

    #[test]
    fn a_preferred_node_is_taken_only_when_it_qualifies() {
        let t = topology(&[Role::Primary, Role::Standby, Role::Standby]);
        let view = positions(&[Some(3000), Some(3000), Some(100)]);
        let balancer = Balancer::new(3);
        let read = |prefer| route_read(&t, &view, &policy(&[1, 1, 1]), &balancer, None, prefer);
        assert_eq!(read(Some(1)).unwrap().reason, RouteReason::WherePrepared);
        assert_eq!(read(Some(1)).unwrap().node, 1);
        assert_eq!(
            read(Some(2)).unwrap().reason,
            RouteReason::Balanced,
            "lagging"
        );
    }

    #[test]
    fn without_a_primary_reads_still_reach_replicas_but_writes_are_refused() {
        let t = topology(&[Role::Down, Role::Standby]);
        let view = positions(&[None, Some(100)]);
        assert_eq!(spread(&t, &view, &[1, 1], None, 4), vec![0, 4]);
        assert!(route_read(
            &t,
            &view,
            &policy(&[1, 1]),
            &Balancer::new(2),
            Some(1),
            None
        )
        .is_err());
    }
}
