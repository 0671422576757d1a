//! What the probes mean: each node's role, which node takes writes, which nodes must be fenced,
//! and whether the primary is lost. Pure: no I/O, so every rule is unit-tested.

use super::choose::Promotion;
use crate::config::Config;
use crate::health::{NodeHealth, Observation};
use crate::topology::{NodeId, Primary, Role};

/// What pgvigil remembers beyond the latest probes (and keeps in its state file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Memory {
    /// The node that was primary last time one was known.
    pub primary: Option<NodeId>,
    /// Nodes that never get a query until an operator clears them.
    pub fenced: Vec<bool>,
    /// A promotion pgvigil asked for and has not seen finish: that node stays the only
    /// candidate until it is seen as primary or proven still a standby (see `fail_over`).
    pub promoting: Option<Promotion>,
    /// The latest promotion that finished, with its positions (for the record).
    pub last_promotion: Option<Promotion>,
    /// Nodes an operator took out of routing and candidacy (`pgvigil detach`).
    pub detached: Vec<bool>,
    /// The `primary_conninfo` each standby had before a failover stopped it streaming from the
    /// lost primary (see `Coordinator::stop_receivers`), until it is pointed at a primary again.
    pub paused: Vec<Option<String>>,
}

impl Memory {
    /// Nothing remembered, for `node_count` nodes.
    pub fn empty(node_count: usize) -> Memory {
        Memory {
            primary: None,
            fenced: vec![false; node_count],
            promoting: None,
            last_promotion: None,
            detached: vec![false; node_count],
            paused: vec![None; node_count],
        }
    }

    fn is_fenced(&self, node: NodeId) -> bool {
        self.fenced.get(node).copied().unwrap_or(false)
    }
}

/// The verdict on one set of observations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assessment {
    /// Each node's role, in configuration order.
    pub roles: Vec<Role>,
    /// Nodes whose latest probe failed but that are not down yet.
    pub suspect: Vec<bool>,
    /// Where writes go, or why they cannot.
    pub primary: Primary,
    /// Nodes that claim to be primary but must not be: on an older timeline than another node.
    pub fence: Vec<NodeId>,
    /// The remembered primary is down and no standby still receives WAL from it.
    pub lost: Option<NodeId>,
    /// Nodes that left recovery without pgvigil promoting them while the known primary is up
    /// and answering: not accepted, and writes are refused until an operator decides.
    pub foreign: Vec<NodeId>,
    /// The remembered primary is down but this standby still hears from it (as of its latest
    /// probe, which may predate the primary's trouble: worth probing again at once).
    pub witness: Option<NodeId>,
}

/// Judges the observations in `board` (one per node) against what `memory` holds.
pub fn assess(config: &Config, board: &[NodeHealth], memory: &Memory) -> Assessment {
    let failures = config.health.failures;
    let mut roles: Vec<Role> = board
        .iter()
        .enumerate()
        .map(|(node, health)| observed_role(health, failures, memory.is_fenced(node)))
        .collect();
    let suspect = board
        .iter()
        .zip(&roles)
        .map(|(health, role)| role.is_usable() && health.failures > 0)
        .collect();
    let timeline = |node: NodeId| board[node].last.as_ref().map_or(0, |o| o.timeline);
    let claimants: Vec<NodeId> = (0..board.len())
        .filter(|&n| roles[n] == Role::Primary)
        .collect();
    // The known primary, up and answering as a writable primary. While a promotion pgvigil
    // asked for is pending, the old primary was lost and is no longer the reference.
    let known = memory
        .primary
        .filter(|&k| roles.get(k) == Some(&Role::Primary))
        .filter(|_| memory.promoting.is_none());
    // A newer timeline wins automatically only when pgvigil promoted it or the known primary
    // is down: anything else is someone else's promotion, and a healthy primary is never
    // fenced for it.
    let foreign: Vec<NodeId> = match known {
        Some(k) => claimants
            .iter()
            .copied()
            .filter(|&c| c != k && timeline(c) > timeline(k))
            .collect(),
        None => Vec::new(),
    };
    for &node in &foreign {
        roles[node] = Role::Fenced;
    }
    // The newest timeline any live node is on: a primary behind it is stale.
    let newest = (0..board.len())
        .filter(|&n| roles[n].is_usable())
        .map(timeline)
        .max()
        .unwrap_or(0);
    let (stale, current): (Vec<NodeId>, Vec<NodeId>) = claimants
        .iter()
        .filter(|n| !foreign.contains(n))
        .partition(|&&n| Some(n) != known && timeline(n) < newest);
    for &node in &stale {
        roles[node] = Role::Fenced;
    }
    let name = |node: NodeId| config.nodes[node].name.as_str();
    let mut lost = None;
    let mut witnessed = None;
    let primary = match current.as_slice() {
        _ if !foreign.is_empty() => Primary::Unavailable(format!(
            "{} left recovery without pgvigil promoting it while primary {} is up and \
             answering: writes are refused until an operator stops one of them",
            foreign
                .iter()
                .map(|&n| name(n))
                .collect::<Vec<_>>()
                .join(" and "),
            known.map_or("?", name)
        )),
        [one] => Primary::Known(*one),
        [] => match memory.primary {
            Some(old) if roles[old] == Role::Down => match witness(config, board, &roles, old) {
                Some(standby) => {
                    witnessed = Some(standby);
                    Primary::Unavailable(format!(
                        "primary {} does not answer pgvigil, but standby {} still receives WAL \
                         from it: not failing over",
                        name(old),
                        name(standby)
                    ))
                }
                None => {
                    lost = Some(old);
                    Primary::Unavailable(format!("primary {} is lost", name(old)))
                }
            },
            Some(old) if roles[old] == Role::Unknown => {
                Primary::Unavailable("the nodes have not been probed yet".into())
            }
            _ => Primary::Unavailable("no reachable node accepts writes".into()),
        },
        many => {
            Primary::Unavailable(format!(
            "{} claim to be primary on the same timeline {newest}; writes are refused until an \
             operator fences all but one",
            many.iter().map(|&n| name(n)).collect::<Vec<_>>().join(" and ")
        ))
        }
    };
    Assessment {
        roles,
        suspect,
        primary,
        fence: stale,
        lost,
        foreign,
        witness: witnessed,
    }
}

/// A node's role from its probes alone.
fn observed_role(health: &NodeHealth, failures: u32, fenced: bool) -> Role {
    if fenced {
        return Role::Fenced;
    }
    if !health.probed {
        return Role::Unknown;
    }
    if health.is_down(failures) {
        return Role::Down;
    }
    match &health.last {
        Some(observation) if observation.in_recovery => Role::Standby,
        // Out of recovery but read-only: fenced by another pgvigil instance (or an operator).
        Some(observation) if observation.read_only => Role::Fenced,
        Some(_) => Role::Primary,
        None => Role::Down,
    }
}

/// A standby that shows `primary` is alive although pgvigil cannot reach it: it streams, it heard
/// from its sender recently, and that sender is not another node pgvigil knows (a cascading
/// standby's sender). "Recently" is half the standby's `wal_receiver_timeout` (a live sender is
/// heard from at least that often, because the receiver asks for a reply after that much
/// silence) plus one probe interval. A streaming receiver whose details are hidden (the health
/// role lacks `pg_monitor`) counts as a witness: pgvigil then fails over only once the standby
/// itself gives up on its sender.
fn witness(
    config: &Config,
    board: &[NodeHealth],
    roles: &[Role],
    primary: NodeId,
) -> Option<NodeId> {
    (0..board.len()).find(|&node| {
        node != primary
            && roles[node] == Role::Standby
            && board[node]
                .current()
                .is_some_and(|o| hears_from(config, o, primary))
    })
}

/// Whether this standby observation shows a live stream from `primary`.
fn hears_from(config: &Config, observation: &Observation, primary: NodeId) -> bool {
    let Some(receiver) = &observation.receiver else {
        return false;
    };
    if !receiver.streaming {
        return false;
    }
    let from_other_node = receiver.sender.as_ref().is_some_and(|(host, port)| {
        config
            .nodes
            .iter()
            .enumerate()
            .any(|(id, n)| id != primary && n.host == *host && n.port == *port)
    });
    if from_other_node {
        return false;
    }
    match receiver.last_message_age {
        None => true,
        Some(_) if receiver.timeout.is_zero() => true,
        Some(age) => age <= receiver.timeout / 2 + config.health.interval,
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::config::NodeConfig;
    use crate::health::{Receiver, Report};

    fn config(nodes: usize) -> Config {
        let mut config = Config::default();
        config.health.failures = 2;
        config.health.interval = Duration::from_secs(1);
        config.nodes = (0..nodes)
            .map(|i| NodeConfig {
                name: format!("pg{}", i + 1),
                host: "127.0.0.1".into(),
                port: 5432 + i as u16,
                ..NodeConfig::default()
            })
            .collect();
        config
    }

    fn primary(timeline: u32) -> Observation {
        Observation::primary_for_test(timeline)
    }

    /// A standby streaming from port `from`, last heard from `age` ago.
    fn standby(timeline: u32, from: u16, age: Duration) -> Observation {
        Observation {
            in_recovery: true,
            receiver: Some(Receiver {
                streaming: true,
                sender: Some(("127.0.0.1".into(), from)),
                last_message_age: Some(age),
                timeout: Duration::from_secs(2),
            }),
            ..primary(timeline)
        }
    }

    fn up(observation: Observation) -> NodeHealth {
        let mut health = NodeHealth::default();
        health.record(&Report {
            node: 0,
            started: Instant::now(),
            outcome: Ok(observation),
        });
        health
    }

    fn failed(mut health: NodeHealth, times: u32) -> NodeHealth {
        for _ in 0..times {
            health.record(&Report {
                node: 0,
                started: Instant::now(),
                outcome: Err("connection refused".into()),
            });
        }
        health
    }

    fn remembering(primary: Option<NodeId>, fenced: &[NodeId], nodes: usize) -> Memory {
        let mut memory = Memory::empty(nodes);
        memory.primary = primary;
        for &n in fenced {
            memory.fenced[n] = true;
        }
        memory
    }

    const FRESH: Duration = Duration::from_millis(100);
    const STALE: Duration = Duration::from_secs(5);

    #[test]
    fn the_node_not_in_recovery_is_primary() {
        let board = [
            up(standby(1, 5432, FRESH)),
            up(primary(1)),
            up(standby(1, 5433, FRESH)),
        ];
        let verdict = assess(&config(3), &board, &Memory::empty(3));
        assert_eq!(verdict.primary, Primary::Known(1));
        assert_eq!(verdict.roles, [Role::Standby, Role::Primary, Role::Standby]);
        assert!(verdict.fence.is_empty() && verdict.lost.is_none());
    }

    #[test]
    fn of_two_primaries_the_one_on_the_older_timeline_is_fenced() {
        // Both when pgvigil knows the newer one as primary and when it knows neither.
        let board = [up(primary(1)), up(primary(2)), up(standby(2, 5433, FRESH))];
        for memory in [remembering(Some(1), &[], 3), Memory::empty(3)] {
            let verdict = assess(&config(3), &board, &memory);
            assert_eq!(verdict.primary, Primary::Known(1));
            assert_eq!(verdict.fence, vec![0]);
            assert_eq!(verdict.roles[0], Role::Fenced);
        }
    }

    #[test]
    fn a_standby_promoted_behind_pgvigils_back_never_fences_the_healthy_primary() {
        let board = [up(primary(1)), up(primary(2)), up(standby(1, 5432, FRESH))];
        let verdict = assess(&config(3), &board, &remembering(Some(0), &[], 3));
        assert!(verdict.fence.is_empty(), "{:?}", verdict.fence);
        assert_eq!(verdict.foreign, vec![1]);
        assert_eq!(verdict.roles, [Role::Primary, Role::Fenced, Role::Standby]);
        match verdict.primary {
            Primary::Unavailable(reason) => {
                assert!(
                    reason.contains("pg2 left recovery without pgvigil"),
                    "{reason}"
                );
                assert!(reason.contains("primary pg1 is up"), "{reason}");
            }
            other => panic!("expected writes refused, got {other:?}"),
        }
    }

    #[test]
    fn the_newer_timeline_wins_when_pgvigil_promoted_it_or_the_old_primary_is_down() {
        let config = config(3);
        // The old primary is down.
        let board = [
            failed(up(primary(1)), 2),
            up(primary(2)),
            up(standby(1, 5432, STALE)),
        ];
        let verdict = assess(&config, &board, &remembering(Some(0), &[], 3));
        assert_eq!(verdict.primary, Primary::Known(1));
        assert!(verdict.foreign.is_empty());
        // pgvigil asked pg2 to promote (and the old primary came back meanwhile).
        let board = [up(primary(1)), up(primary(2)), up(standby(1, 5432, STALE))];
        let mut memory = remembering(Some(0), &[], 3);
        memory.promoting = Some(Promotion {
            node: 1,
            old_primary: 0,
            old_lsn: 100,
            new_lsn: 100,
            postmaster_start: "t0".into(),
        });
        let verdict = assess(&config, &board, &memory);
        assert_eq!(verdict.primary, Primary::Known(1));
        assert_eq!(verdict.fence, vec![0]);
        // The known primary answers read-only: another instance fenced it.
        let fenced = Observation {
            read_only: true,
            ..primary(1)
        };
        let board = [up(fenced), up(primary(2)), up(standby(2, 5433, FRESH))];
        let verdict = assess(&config, &board, &remembering(Some(0), &[], 3));
        assert_eq!(verdict.roles[0], Role::Fenced);
        assert_eq!(verdict.primary, Primary::Known(1));
    }

    #[test]
    fn a_lone_primary_behind_a_standby_timeline_is_stale() {
        let board = [
            up(primary(1)),
            failed(up(primary(2)), 2),
            up(standby(2, 5433, STALE)),
        ];
        let verdict = assess(&config(3), &board, &Memory::empty(3));
        assert_eq!(verdict.fence, vec![0]);
        assert!(matches!(verdict.primary, Primary::Unavailable(_)));
    }

    #[test]
    fn two_primaries_on_one_timeline_refuse_writes_with_the_reason() {
        let board = [up(primary(3)), up(primary(3))];
        let verdict = assess(&config(2), &board, &Memory::empty(2));
        match verdict.primary {
            Primary::Unavailable(reason) => {
                assert!(reason.contains("pg1 and pg2"), "{reason}");
                assert!(reason.contains("timeline 3"), "{reason}");
            }
            other => panic!("expected no primary, got {other:?}"),
        }
        assert!(verdict.fence.is_empty());
    }

    #[test]
    fn a_fenced_node_never_gets_a_role_whatever_it_claims() {
        let board = [up(primary(1)), up(primary(2))];
        let verdict = assess(&config(2), &board, &remembering(Some(1), &[0], 2));
        assert_eq!(verdict.roles, [Role::Fenced, Role::Primary]);
        assert_eq!(verdict.primary, Primary::Known(1));
    }

    #[test]
    fn a_primary_is_suspect_then_down_then_lost() {
        let config = config(2);
        let memory = remembering(Some(0), &[], 2);
        let once = [failed(up(primary(1)), 1), up(standby(1, 5432, STALE))];
        let verdict = assess(&config, &once, &memory);
        assert_eq!(verdict.primary, Primary::Known(0), "one failure is a blip");
        assert!(verdict.suspect[0]);
        let twice = [failed(up(primary(1)), 2), up(standby(1, 5432, STALE))];
        let verdict = assess(&config, &twice, &memory);
        assert_eq!(verdict.lost, Some(0));
        assert_eq!(verdict.roles[0], Role::Down);
    }

    #[test]
    fn a_standby_still_hearing_from_the_primary_prevents_the_failover() {
        let config = config(2);
        let memory = remembering(Some(0), &[], 2);
        let board = [failed(up(primary(1)), 5), up(standby(1, 5432, FRESH))];
        let verdict = assess(&config, &board, &memory);
        assert_eq!(verdict.lost, None);
        assert_eq!(verdict.witness, Some(1));
        match verdict.primary {
            Primary::Unavailable(reason) => {
                assert!(reason.contains("pg2 still receives"), "{reason}")
            }
            other => panic!("expected no primary, got {other:?}"),
        }
        // A sender known by another address (pgvigil reaches the primary through a proxy or
        // another interface) still counts.
        let board = [failed(up(primary(1)), 5), up(standby(1, 15432, FRESH))];
        assert_eq!(assess(&config, &board, &memory).lost, None);
    }

    #[test]
    fn a_stale_or_cascading_stream_is_no_witness() {
        let config = config(3);
        let memory = remembering(Some(0), &[], 3);
        // pg2 last heard 5 s ago (more than 2 s / 2 + 1 s); pg3 streams from pg2.
        let board = [
            failed(up(primary(1)), 2),
            up(standby(1, 5432, STALE)),
            up(standby(1, 5433, FRESH)),
        ];
        assert_eq!(assess(&config, &board, &memory).lost, Some(0));
    }

    #[test]
    fn a_node_never_reached_is_down_and_an_unprobed_one_unknown() {
        let board = [failed(NodeHealth::default(), 1), NodeHealth::default()];
        let verdict = assess(&config(2), &board, &Memory::empty(2));
        assert_eq!(verdict.roles, [Role::Down, Role::Unknown]);
        assert!(matches!(verdict.primary, Primary::Unavailable(_)));
        assert_eq!(verdict.lost, None, "nothing to fail over from");
    }
}
