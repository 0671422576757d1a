//! Which node a client's work goes to, and why. Pure: no I/O, one topology snapshot per decision.
//!
//! The session decides *whether* a unit of work may be served by a replica (see
//! `session::steering`); this module knows the cluster: where the primary is, which nodes may take
//! reads (role, weight, lag, the session's last write) and how reads are spread.

use std::time::Duration;

use crate::balance::Balancer;
use crate::config::{Balance, PrimaryReads, ReadAffinity};
use crate::replication::ReplicationView;
use crate::topology::{Node, NodeId, Primary, Role, Topology};

/// Most nodes a read can be spread over.
pub const MAX_NODES: usize = 64;

/// The cluster size up to which [`route_read`] keeps its candidates in a small array.
const FEW_NODES: usize = 8;

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
    /// A session starts here (it gets its parameters there): the primary, or a standby while
    /// the primary is missing or suspect.
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
    /// A read on the node the session's reads stay on (`routing.read_affinity = "session"`).
    SessionAffinity,
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
            RouteReason::SessionAffinity => "read, on the session's node",
        }
    }
}

/// Why no node can be chosen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// No primary is known; the text says why.
    #[error("no primary is available: {0}")]
    NoPrimary(String),
    /// No node can take a new session; the text says why.
    #[error("no node can take a new session: {0}")]
    NoNode(String),
}

/// What reads must respect, from the configuration.
#[derive(Debug, Clone, Copy)]
pub struct ReadPolicy<'a> {
    /// Per-node weight, in node order.
    pub weights: &'a [u32],
    /// How reads are spread.
    pub balance: Balance,
    /// Whether a balanced read places the session's reads or the unit alone (what
    /// `least_connections` counts).
    pub affinity: ReadAffinity,
    /// Most WAL bytes a replica may be behind.
    pub max_lag_bytes: u64,
    /// Most replay delay a replica may have.
    pub max_lag: Duration,
    /// Whether the primary shares reads with the replicas or only takes them as a fallback.
    pub primary_reads: PrimaryReads,
}

/// Chooses the node a new session's first server connection is opened on, skipping the nodes
/// in `skip` (bit per node: the session could not connect there): the primary when it is not
/// suspect, else a standby that is not suspect, else a suspect primary or standby. A session
/// needs no primary to start, and never waits on a node whose probes fail while another can
/// take it.
pub fn route_session(topology: &Topology, skip: u64) -> Result<Route, RouteError> {
    let open = |node: &&Node| {
        node.role.takes_new_work() && node.id < MAX_NODES && skip & (1 << node.id) == 0
    };
    let primary = match topology.primary {
        Primary::Known(p) => topology
            .nodes
            .get(p)
            .filter(|n| n.role == Role::Primary)
            .filter(open),
        Primary::Unavailable(_) => None,
    };
    let standbys = || {
        topology
            .nodes
            .iter()
            .filter(|n| n.role == Role::Standby)
            .filter(open)
    };
    let chosen = primary
        .filter(|n| !n.suspect)
        .or_else(|| standbys().find(|n| !n.suspect))
        .or(primary)
        .or_else(|| standbys().next());
    match chosen {
        Some(node) => Ok(Route {
            node: node.id,
            reason: RouteReason::SessionStart,
        }),
        None => Err(RouteError::NoNode(match &topology.primary {
            Primary::Unavailable(why) => why.clone(),
            Primary::Known(_) if skip != 0 => "every usable node failed to connect".into(),
            Primary::Known(_) => "every node is down or fenced".into(),
        })),
    }
}

/// The node that takes writes.
pub fn route_write(topology: &Topology) -> Result<Route, RouteError> {
    primary(topology).map(|node| Route {
        node,
        reason: RouteReason::Write,
    })
}

/// Chooses a node for a read: a node with weight > 0 that is a standby following the primary
/// (not stale), caught up within the lag limits and, when `min_lsn` is given, past that LSN, or
/// the primary itself when `primary_reads` is `share`; `prefer`'s node, for its reason, if it is
/// one of them, else spread by the balancer. When none qualifies, the primary.
pub fn route_read(
    topology: &Topology,
    replication: &ReplicationView,
    policy: &ReadPolicy<'_>,
    balancer: &Balancer,
    min_lsn: Option<u64>,
    prefer: Option<(NodeId, RouteReason)>,
) -> Result<Route, RouteError> {
    let primary = primary(topology);
    // Room for the candidates is zeroed at every read: for `MAX_NODES` that was 1 KiB, about as
    // much work as the rest of the choice, so clusters of up to `FEW_NODES` use a small array
    // and larger ones a vector sized to them.
    let mut few = [(0, 0); FEW_NODES];
    let mut many = Vec::new();
    let candidates: &mut [(NodeId, u32)] = if topology.nodes.len() <= FEW_NODES {
        &mut few
    } else {
        many.resize(topology.nodes.len().min(MAX_NODES), (0, 0));
        &mut many
    };
    let mut count = 0;
    for node in topology.nodes.iter().take(MAX_NODES) {
        let weight = policy.weights.get(node.id).copied().unwrap_or(0);
        let fallback_only = policy.primary_reads == PrimaryReads::Fallback
            && primary.as_ref().is_ok_and(|&p| p == node.id);
        // A node whose latest probe failed may hang: reads avoid it while it is in doubt.
        if weight > 0
            && !node.suspect
            && !fallback_only
            && node.stale.is_none()
            && may_read(
                node.id,
                node.role,
                primary.as_ref().ok(),
                replication,
                policy,
                min_lsn,
            )
        {
            if let Some((_, reason)) = prefer.filter(|&(preferred, _)| preferred == node.id) {
                return Ok(Route {
                    node: node.id,
                    reason,
                });
            }
            candidates[count] = (node.id, weight);
            count += 1;
        }
    }
    match balancer.pick(&candidates[..count], policy.balance, policy.affinity) {
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
    use crate::topology::Stale;

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
                    stale: None,
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
            affinity: ReadAffinity::Unit,
            max_lag_bytes: 1000,
            max_lag: Duration::from_secs(10),
            primary_reads: PrimaryReads::Share,
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
        assert_eq!(route_session(&t, 0).map(|r| r.node), Ok(1));
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
    fn sessions_start_without_a_primary_and_avoid_suspect_nodes() {
        let mut t = topology(&[Role::Down, Role::Standby, Role::Standby]);
        assert_eq!(route_session(&t, 0).map(|r| r.node), Ok(1), "no primary");
        assert_eq!(route_session(&t, 0b10).map(|r| r.node), Ok(2), "1 failed");
        t = topology(&[Role::Primary, Role::Standby, Role::Standby]);
        t.nodes[0].suspect = true;
        t.nodes[1].suspect = true;
        assert_eq!(route_session(&t, 0).map(|r| r.node), Ok(2), "suspects last");
        t.nodes[2].role = Role::Fenced;
        assert_eq!(
            route_session(&t, 0).map(|r| r.node),
            Ok(0),
            "suspect primary"
        );
        assert_eq!(route_session(&t, 0b1).map(|r| r.node), Ok(1));
        let err = route_session(&t, 0b11).unwrap_err();
        assert!(err.to_string().contains("failed to connect"), "{err}");
        let down = topology(&[Role::Down, Role::Fenced]);
        let err = route_session(&down, 0).unwrap_err();
        assert!(err.to_string().contains("no single primary"), "{err}");
    }

    #[test]
    fn reads_spread_by_weight_and_weight_zero_excludes() {
        let t = topology(&[Role::Primary, Role::Standby, Role::Standby]);
        let view = positions(&[Some(100), Some(100), Some(100)]);
        assert_eq!(spread(&t, &view, &[0, 1, 2], None, 300), vec![0, 100, 200]);
        assert_eq!(spread(&t, &view, &[1, 1, 0], None, 300), vec![150, 150, 0]);
    }

    #[test]
    fn reads_spread_over_a_cluster_larger_than_the_small_array() {
        // Nine standbys and a primary, more nodes than `FEW_NODES`: the first standby has no
        // weight, the eight others and the primary (`policy` shares reads with it) a tenth each.
        let mut roles = vec![Role::Standby; FEW_NODES + 1];
        roles.push(Role::Primary);
        let t = topology(&roles);
        let view = positions(&vec![Some(100); roles.len()]);
        let mut weights = vec![1; roles.len()];
        weights[0] = 0;
        let mut expected = vec![10; roles.len()];
        expected[0] = 0;
        assert_eq!(spread(&t, &view, &weights, None, 90), expected);
    }

    #[test]
    fn by_default_the_primary_reads_only_when_no_replica_may() {
        let t = topology(&[Role::Primary, Role::Standby, Role::Standby]);
        let view = positions(&[Some(100), Some(100), Some(100)]);
        let fallback = ReadPolicy {
            primary_reads: PrimaryReads::Fallback,
            ..policy(&[1, 1, 1])
        };
        let balancer = Balancer::new(3);
        let mut counts = [0; 3];
        for _ in 0..300 {
            counts[route_read(
                &t,
                &view,
                &fallback,
                &balancer,
                None,
                Some((0, RouteReason::WherePrepared)),
            )
            .unwrap()
            .node] += 1;
        }
        assert_eq!(counts, [0, 150, 150], "replicas keep their weights");
        let mut stale = t.clone();
        stale.nodes[1].stale = Some(Stale::NotStreaming);
        stale.nodes[2].stale = Some(Stale::OtherTimeline);
        let r = route_read(&stale, &view, &fallback, &balancer, None, None).unwrap();
        assert_eq!((r.node, r.reason), (0, RouteReason::NoReplicaQualifies));
        assert_eq!(
            spread(&t, &view, &[1, 1, 1], None, 300),
            vec![100, 100, 100]
        );
    }

    #[test]
    fn stale_replicas_get_no_reads() {
        let mut t = topology(&[Role::Primary, Role::Standby, Role::Standby]);
        t.nodes[2].stale = Some(Stale::NotRepointed("no answer".into()));
        let view = positions(&[Some(100), Some(100), Some(100)]);
        assert_eq!(spread(&t, &view, &[0, 1, 1], None, 10), vec![0, 10, 0]);
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
        let read = |prefer: Option<NodeId>| {
            let prefer = prefer.map(|node| (node, RouteReason::WherePrepared));
            route_read(&t, &view, &policy(&[1, 1, 1]), &balancer, None, prefer)
        };
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
