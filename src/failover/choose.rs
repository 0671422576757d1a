//! Which standby may replace a lost primary: only one that loses nothing acknowledged beyond the
//! bound, decided on a complete enough view (README, "Failover"). Pure: no I/O, so every rule is
//! unit-tested.

use std::fmt::Write as _;

use crate::config::Config;
use crate::health::{NodeHealth, Senders, SyncState};
use crate::replication::format_lsn;
use crate::topology::NodeId;

/// A standby's WAL positions, read just before the choice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    /// `pg_last_wal_receive_lsn()` (0 when it has none).
    pub received: u64,
    /// `pg_last_wal_replay_lsn()` (0 when it has none).
    pub replayed: u64,
    /// `pg_postmaster_start_time()` as text: a restart withdraws a promote request.
    pub postmaster_start: String,
}

impl Position {
    /// How far it has the WAL, received or replayed.
    fn furthest(&self) -> u64 {
        self.received.max(self.replayed)
    }
}

/// What the failover could learn about one standby it might promote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reading {
    /// Its position, read now.
    Read(Position),
    /// It could not be read, and why.
    Unreadable(String),
}

/// A promotion pgvigil decided on (or asked for), with what it knew when it decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Promotion {
    /// The standby promoted.
    pub node: NodeId,
    /// The primary it replaces.
    pub old_primary: NodeId,
    /// The old primary's last known WAL position.
    pub old_lsn: u64,
    /// The promoted standby's position when it was chosen.
    pub new_lsn: u64,
    /// The standby's `pg_postmaster_start_time()` when it was asked: a restart withdraws the
    /// request (the postmaster removes the promote signal file when it starts).
    pub postmaster_start: String,
}

impl Promotion {
    /// Bytes of WAL the old primary had (as last seen) that the promoted one did not: an upper
    /// bound on the asynchronous commits lost.
    pub fn loss(&self) -> u64 {
        self.old_lsn.saturating_sub(self.new_lsn)
    }
}

/// The decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Choice {
    /// Promote this standby.
    Promote(Promotion),
    /// Promote nothing, for this reason (shown to clients whose writes wait).
    Refuse(String),
}

/// The synchronous standbys the old primary's commits waited for, as its last probe saw them.
struct SyncSet<'a> {
    /// Names (`application_name`) of the standbys in the synchronous set.
    members: Vec<&'a str>,
    /// Every commit acknowledged as of that probe is at or below this LSN on the set.
    point: u64,
}

impl<'a> SyncSet<'a> {
    /// None when the primary had no synchronous standby (asynchronous replication, or
    /// synchronous replication with no standby connected: commits then wait, nothing acked).
    fn of(senders: &'a Senders) -> Option<SyncSet<'a>> {
        let flushes = |state| -> Vec<u64> {
            senders
                .standbys
                .iter()
                .filter(|s| s.sync == state)
                .map(|s| s.flush.unwrap_or(0))
                .collect()
        };
        let members = |state| -> Vec<&'a str> {
            senders
                .standbys
                .iter()
                .filter(|s| s.sync == state)
                .map(|s| s.name.as_str())
                .collect()
        };
        // Priority mode (`FIRST k (...)`): a commit waits for every synchronous standby, so it
        // is at or below the least flushed of them.
        let sync = flushes(SyncState::Sync);
        if let Some(&point) = sync.iter().min() {
            return Some(SyncSet {
                members: members(SyncState::Sync),
                point,
            });
        }
        // Quorum (`ANY k (...)`): a commit waits for k of them, so it is at or below the k-th
        // most flushed.
        let mut quorum = flushes(SyncState::Quorum);
        if quorum.is_empty() {
            return None;
        }
        quorum.sort_unstable_by(|a, b| b.cmp(a));
        let k = quorum_size(&senders.synchronous_standby_names).clamp(1, quorum.len());
        Some(SyncSet {
            members: members(SyncState::Quorum),
            point: quorum[k - 1],
        })
    }
}

/// The k of `ANY k (...)`; 1 when it cannot be read (the most cautious reading).
fn quorum_size(names: &str) -> usize {
    let text = names.trim_start();
    let Some(rest) = text
        .get(..3)
        .filter(|any| any.eq_ignore_ascii_case("any"))
        .map(|_| text[3..].trim_start())
    else {
        return 1;
    };
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().unwrap_or(1)
}

/// Picks the standby to promote in place of `old`, or says why none may be.
///
/// `board` holds every node's probes (the old primary's last observation gives its last known
/// position and its synchronous standbys; a standby's gives its last known position);
/// `readings` holds every standby that might be promoted, read now or not.
///
/// Rules, in order:
/// - The old primary's last position must be known, or no loss can be bounded.
/// - If the old primary had synchronous standbys, a standby may be promoted only if it holds
///   every acknowledged commit, and the lag bound does not apply (nothing acknowledged is lost).
///   A synchronous one that can be read and has the WAL up to the synchronous commit point
///   holds them all; so does any standby last seen on the old primary's timeline with at least
///   as much WAL as it (the WAL of one timeline is one sequence, so it holds all that one does).
///   Promoting the furthest of those leaves no standby ahead of the new timeline's fork, unable
///   to follow it.
/// - Otherwise a standby further behind the old primary's last position than
///   `failover.max_lag_bytes` is not promoted; and if a standby that cannot be read was last
///   seen ahead of the best one that can, nothing is promoted (it may hold commits the other
///   lacks).
/// - Among those left: the furthest WAL, then the highest `priority`, then the furthest
///   replayed, then the first in the configuration; `no_promote` nodes never.
pub fn choose(
    config: &Config,
    board: &[NodeHealth],
    old: NodeId,
    readings: &[(NodeId, Reading)],
) -> Choice {
    let name = |node: NodeId| config.nodes[node].name.as_str();
    let Some(last) = board.get(old).and_then(|h| h.last.as_ref()) else {
        return Choice::Refuse(format!(
            "the last WAL position of primary {} is unknown (pgvigil never saw it answer), so \
             no promotion can be bounded",
            name(old)
        ));
    };
    let old_lsn = last.position.lsn;
    let all_read: Vec<(NodeId, &Position)> = readings
        .iter()
        .filter_map(|(node, reading)| match reading {
            Reading::Read(position) => Some((*node, position)),
            Reading::Unreadable(_) => None,
        })
        .collect();
    let read: Vec<(NodeId, &Position)> = all_read
        .iter()
        .copied()
        .filter(|(node, _)| !config.nodes[*node].no_promote)
        .collect();
    let unreadable = || {
        readings.iter().filter_map(|(node, reading)| match reading {
            Reading::Unreadable(why) => Some((*node, why.as_str())),
            Reading::Read(_) => None,
        })
    };
    let promotion = |node: NodeId, position: &Position| {
        Choice::Promote(Promotion {
            node,
            old_primary: old,
            old_lsn,
            new_lsn: position.furthest(),
            postmaster_start: position.postmaster_start.clone(),
        })
    };
    let sync = last.senders.as_ref().and_then(SyncSet::of);
    if let Some(sync) = sync {
        // The witness may be a `no_promote` standby: it vouches for the WAL, not for itself.
        let holds_every_ack = all_read
            .iter()
            .filter(|(node, p)| sync.members.contains(&name(*node)) && p.furthest() >= sync.point)
            .map(|(_, p)| p.furthest())
            .max();
        if let Some(witness) = holds_every_ack {
            // Positions compare only along one history: one outside the set must have been
            // last seen on the old primary's timeline (one left on an older timeline by an
            // earlier failover may be further on it, yet lack what came after its fork).
            let same_timeline = |node: NodeId| {
                let seen = board.get(node).and_then(|h| h.last.as_ref());
                seen.is_some_and(|o| o.timeline == last.timeline)
            };
            let eligible = read.iter().filter(|(node, p)| {
                p.furthest() >= witness
                    && (sync.members.contains(&name(*node)) || same_timeline(*node))
            });
            if let Some(&(node, position)) = best(config, eligible) {
                return promotion(node, position);
            }
        }
        let mut reason = format!(
            "primary {} is lost and no standby that was synchronous with it (of {}) can be read \
             and holds every acknowledged commit (up to {})",
            name(old),
            sync.members.join(", "),
            format_lsn(sync.point)
        );
        let missing: Vec<String> = unreadable()
            .filter(|&(node, _)| sync.members.contains(&name(node)))
            .map(|(node, why)| format!("{} ({why})", name(node)))
            .collect();
        if !missing.is_empty() {
            let _ = write!(reason, "; waiting for {}", missing.join(", "));
        }
        let unknown: Vec<&str> = sync
            .members
            .iter()
            .copied()
            .filter(|member| !config.nodes.iter().any(|n| n.name == *member))
            .collect();
        if !unknown.is_empty() {
            let _ = write!(
                reason,
                "; {} is no configured node (each standby's application_name must be its node \
                 name)",
                unknown.join(", ")
            );
        }
        return Choice::Refuse(reason);
    }
    let bound = config.failover.max_lag_bytes;
    let (close, far): (Vec<_>, Vec<_>) = read
        .iter()
        .partition(|(_, p)| old_lsn.saturating_sub(p.furthest()) <= bound);
    let Some(&(node, position)) = best(config, close.iter().copied()) else {
        let mut reason = format!(
            "primary {} is lost and no standby is within failover.max_lag_bytes ({bound}) of \
             its last known position {}",
            name(old),
            format_lsn(old_lsn)
        );
        for (node, p) in &far {
            let _ = write!(
                reason,
                "; {} is {} bytes behind",
                name(*node),
                old_lsn - p.furthest()
            );
        }
        for (node, why) in unreadable() {
            let _ = write!(reason, "; {} cannot be read ({why})", name(node));
        }
        return Choice::Refuse(reason);
    };
    // A `no_promote` standby ahead is no reason to wait: it could never be promoted anyway.
    let ahead = unreadable().find(|&(other, _)| {
        !config.nodes[other].no_promote
            && board[other].last.as_ref().is_some_and(|o| {
                o.position.received.unwrap_or(0).max(o.position.lsn) > position.furthest()
            })
    });
    if let Some((other, why)) = ahead {
        return Choice::Refuse(format!(
            "primary {} is lost; standby {} cannot be read ({why}) and was last seen ahead of \
             {}, the best standby that can: waiting for it",
            name(old),
            name(other),
            name(node)
        ));
    }
    promotion(node, position)
}

/// The furthest WAL, then the highest priority, then the furthest replayed, then the first in the
/// configuration. Priority outranks replay: a promoted standby replays all it received before it
/// takes writes, so two that received the same WAL hold the same data, and a moment of replay lag
/// (common right after the primary's loss) must not override the operator's preference.
fn best<'a>(
    config: &Config,
    candidates: impl Iterator<Item = &'a (NodeId, &'a Position)>,
) -> Option<&'a (NodeId, &'a Position)> {
    candidates.max_by_key(|(node, p)| {
        (
            p.furthest(),
            config.nodes[*node].priority,
            p.replayed,
            std::cmp::Reverse(*node),
        )
    })
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::config::NodeConfig;
    use crate::health::{Observation, Report, SenderRow};
    use crate::replication::Position as Seen;

    const MIB: u64 = 1 << 20;

    fn config(nodes: usize) -> Config {
        Config {
            nodes: (0..nodes)
                .map(|i| NodeConfig {
                    name: format!("pg{}", i + 1),
                    host: "127.0.0.1".into(),
                    port: 5432 + i as u16,
                    ..NodeConfig::default()
                })
                .collect(),
            ..Config::default()
        }
    }

    fn seen(in_recovery: bool, lsn: u64, senders: Option<Senders>) -> NodeHealth {
        let mut health = NodeHealth::default();
        health.record(&Report {
            node: 0,
            started: Instant::now(),
            outcome: Ok(Observation {
                in_recovery,
                timeline: 1,
                position: Seen {
                    lsn,
                    received: in_recovery.then_some(lsn),
                    replay_delay: Duration::ZERO,
                },
                receiver: None,
                read_only: false,
                promoted_by: None,
                senders,
            }),
        });
        health
    }

    /// pg1 was primary at `lsn` with these standbys; pg2.. were last seen at `standbys`.
    fn board(lsn: u64, senders: Option<Senders>, standbys: &[u64]) -> Vec<NodeHealth> {
        let mut board = vec![seen(false, lsn, senders)];
        board.extend(standbys.iter().map(|&at| seen(true, at, None)));
        board
    }

    fn senders(names: &str, rows: &[(&str, SyncState, u64)]) -> Option<Senders> {
        Some(Senders {
            synchronous_standby_names: names.into(),
            standbys: rows
                .iter()
                .map(|&(name, sync, flush)| SenderRow {
                    name: name.into(),
                    sync,
                    flush: Some(flush),
                })
                .collect(),
        })
    }

    fn at(received: u64) -> Reading {
        Reading::Read(Position {
            received,
            replayed: received,
            postmaster_start: "t0".into(),
        })
    }

    fn gone() -> Reading {
        Reading::Unreadable("connection refused".into())
    }

    fn promoted(choice: &Choice) -> Option<NodeId> {
        match choice {
            Choice::Promote(p) => Some(p.node),
            Choice::Refuse(_) => None,
        }
    }

    fn refusal(choice: &Choice) -> &str {
        match choice {
            Choice::Refuse(reason) => reason,
            Choice::Promote(p) => panic!("expected a refusal, got {p:?}"),
        }
    }

    #[test]
    fn each_rule_picks_or_refuses_as_the_table_says() {
        use SyncState::{Async, Potential, Quorum, Sync};
        let cfg = config(3);
        let asynchronous = senders("", &[("pg2", Async, 0), ("pg3", Async, 0)]);
        // (what, old primary's last lsn, its senders, last seen standbys, readings, expected)
        type Case = (
            &'static str,
            u64,
            Option<Senders>,
            [u64; 2],
            [Reading; 2],
            Option<NodeId>,
        );
        let cases: Vec<Case> = vec![
            (
                "async: the furthest within the bound",
                10 * MIB,
                asynchronous.clone(),
                [0, 0],
                [at(10 * MIB - 10), at(10 * MIB - 5)],
                Some(2),
            ),
            (
                "async: exactly the bound behind still qualifies",
                10 * MIB,
                asynchronous.clone(),
                [0, 0],
                [at(9 * MIB), gone()],
                Some(1),
            ),
            (
                "async: every standby beyond the bound: nothing",
                10 * MIB,
                asynchronous.clone(),
                [0, 0],
                [at(8 * MIB), at(9 * MIB - 1)],
                None,
            ),
            (
                "async: an unreadable standby last seen ahead blocks",
                10 * MIB,
                asynchronous.clone(),
                [0, 10 * MIB],
                [at(10 * MIB - 100), gone()],
                None,
            ),
            (
                "async: an unreadable standby last seen behind does not",
                10 * MIB,
                asynchronous.clone(),
                [0, 5 * MIB],
                [at(10 * MIB - 100), gone()],
                Some(1),
            ),
            (
                "sync: a standby further than the synchronous one holds all it holds: the furthest",
                10 * MIB,
                senders("*", &[("pg2", Potential, 10 * MIB), ("pg3", Sync, 9 * MIB)]),
                [0, 0],
                [at(10 * MIB), at(9 * MIB)],
                Some(1),
            ),
            (
                "sync: never one behind the synchronous one",
                10 * MIB,
                senders("*", &[("pg2", Sync, 9 * MIB), ("pg3", Potential, 10 * MIB)]),
                [0, 0],
                [at(9 * MIB), at(9 * MIB - 176)],
                Some(1),
            ),
            (
                "sync: the synchronous one behind its commit point vouches for nothing",
                10 * MIB,
                senders("*", &[("pg2", Potential, 9 * MIB), ("pg3", Sync, 9 * MIB)]),
                [0, 0],
                [at(9 * MIB), at(8 * MIB)],
                None,
            ),
            (
                "sync: the synchronous one unreadable: nothing, never the other",
                10 * MIB,
                senders(
                    "*",
                    &[("pg2", Potential, 10 * MIB), ("pg3", Sync, 10 * MIB)],
                ),
                [0, 0],
                [at(10 * MIB), gone()],
                None,
            ),
            (
                "sync: the lag bound does not apply to a synchronous standby",
                100 * MIB,
                senders("*", &[("pg2", Sync, 10 * MIB), ("pg3", Async, 0)]),
                [0, 0],
                [at(10 * MIB), at(0)],
                Some(1),
            ),
            (
                "quorum: ANY 1: the one holding the most flushed commit",
                10 * MIB,
                senders(
                    "ANY 1 (pg2, pg3)",
                    &[("pg2", Quorum, 8 * MIB), ("pg3", Quorum, 9 * MIB)],
                ),
                [0, 0],
                [at(8 * MIB), at(9 * MIB)],
                Some(2),
            ),
            (
                "quorum: ANY 1 with the most flushed unreadable: nothing",
                10 * MIB,
                senders(
                    "ANY 1 (pg2, pg3)",
                    &[("pg2", Quorum, 8 * MIB), ("pg3", Quorum, 9 * MIB)],
                ),
                [0, 0],
                [at(8 * MIB), gone()],
                None,
            ),
            (
                "quorum: ANY 2: each holds every acknowledged commit",
                10 * MIB,
                senders(
                    "any 2 (pg2, pg3)",
                    &[("pg2", Quorum, 8 * MIB), ("pg3", Quorum, 9 * MIB)],
                ),
                [0, 0],
                [at(8 * MIB), gone()],
                Some(1),
            ),
            (
                "synchronous names set but no standby synchronous: the lag rule",
                10 * MIB,
                senders("pg4", &[("pg2", Async, 0)]),
                [0, 0],
                [at(10 * MIB), at(0)],
                Some(1),
            ),
        ];
        for (what, lsn, senders, last, readings, expected) in cases {
            let board = board(lsn, senders, &last);
            let [r1, r2] = readings;
            let choice = choose(&cfg, &board, 0, &[(1, r1), (2, r2)]);
            assert_eq!(promoted(&choice), expected, "{what}: {choice:?}");
        }
    }

    #[test]
    fn a_refusal_says_why_and_names_the_nodes() {
        let cfg = config(3);
        let lagging = board(10 * MIB, None, &[0, 0]);
        let choice = choose(&cfg, &lagging, 0, &[(1, at(8 * MIB)), (2, gone())]);
        let reason = refusal(&choice);
        assert!(
            reason.contains("failover.max_lag_bytes (1048576)"),
            "{reason}"
        );
        assert!(reason.contains("pg2 is 2097152 bytes behind"), "{reason}");
        assert!(reason.contains("pg3 cannot be read"), "{reason}");

        let synchronous = board(
            MIB,
            senders(
                "*",
                &[
                    ("pg3", SyncState::Sync, MIB),
                    ("walreceiver", SyncState::Sync, MIB),
                ],
            ),
            &[0, 0],
        );
        let choice = choose(&cfg, &synchronous, 0, &[(1, at(MIB)), (2, gone())]);
        let reason = refusal(&choice);
        assert!(
            reason.contains("waiting for pg3 (connection refused)"),
            "{reason}"
        );
        assert!(
            reason.contains("walreceiver is no configured node"),
            "{reason}"
        );

        let never_seen = vec![NodeHealth::default(), seen(true, 0, None)];
        let choice = choose(&config(2), &never_seen, 0, &[(1, at(MIB))]);
        assert!(refusal(&choice).contains("unknown"));
    }

    #[test]
    fn the_furthest_standby_wins_then_priority_and_no_promote_is_skipped() {
        let mut cfg = config(3);
        let board = board(MIB, None, &[0, 0]);
        let pick =
            |cfg: &Config, a, b| promoted(&choose(cfg, &board, 0, &[(1, at(a)), (2, at(b))]));
        assert_eq!(pick(&cfg, 50, 60), Some(2));
        assert_eq!(pick(&cfg, 60, 60), Some(1));
        cfg.nodes[2].priority = 5;
        assert_eq!(pick(&cfg, 60, 60), Some(2));
        // The same WAL received, the preferred one still replaying it: priority decides.
        let replaying = Reading::Read(Position {
            received: 60,
            replayed: 40,
            postmaster_start: "t0".into(),
        });
        let chosen = choose(&cfg, &board, 0, &[(1, at(60)), (2, replaying.clone())]);
        assert_eq!(promoted(&chosen), Some(2));
        // With equal priorities, the one further replayed.
        cfg.nodes[2].priority = 1;
        let chosen = choose(&cfg, &board, 0, &[(1, at(60)), (2, replaying)]);
        assert_eq!(promoted(&chosen), Some(1));
        cfg.nodes[2].priority = 5;
        cfg.nodes[2].no_promote = true;
        assert_eq!(pick(&cfg, 10, 60), Some(1));
    }

    #[test]
    fn a_no_promote_synchronous_standby_vouches_for_one_with_as_much_wal() {
        let mut cfg = config(3);
        cfg.nodes[1].no_promote = true;
        let sync = board(
            10 * MIB,
            senders(
                "pg2",
                &[
                    ("pg2", SyncState::Sync, 9 * MIB),
                    ("pg3", SyncState::Async, 0),
                ],
            ),
            &[0, 0],
        );
        let pick = |b| promoted(&choose(&cfg, &sync, 0, &[(1, at(9 * MIB)), (2, at(b))]));
        assert_eq!(pick(9 * MIB), Some(2));
        assert_eq!(pick(9 * MIB - 1), None);
    }

    #[test]
    fn a_standby_further_on_an_older_timeline_is_not_taken_for_one_holding_every_ack() {
        let cfg = config(3);
        let mut board = board(
            10 * MIB,
            senders("*", &[("pg2", SyncState::Sync, 9 * MIB)]),
            &[0, 0],
        );
        for (node, timeline) in [(0, 2), (1, 2), (2, 1)] {
            if let Some(o) = board[node].last.as_mut() {
                o.timeline = timeline;
            }
        }
        let choice = choose(&cfg, &board, 0, &[(1, at(9 * MIB)), (2, at(10 * MIB))]);
        assert_eq!(promoted(&choice), Some(1));
        // On the same timeline, the further one is taken.
        if let Some(o) = board[2].last.as_mut() {
            o.timeline = 2;
        }
        let choice = choose(&cfg, &board, 0, &[(1, at(9 * MIB)), (2, at(10 * MIB))]);
        assert_eq!(promoted(&choice), Some(2));
    }

    #[test]
    fn a_promotion_reports_the_bytes_it_may_lose() {
        let board = board(10 * MIB, None, &[0, 0]);
        let Choice::Promote(p) = choose(&config(3), &board, 0, &[(1, at(10 * MIB - 300))]) else {
            panic!("nothing promoted");
        };
        assert_eq!(
            (p.old_lsn, p.new_lsn, p.loss()),
            (10 * MIB, 10 * MIB - 300, 300)
        );
        assert_eq!(p.postmaster_start, "t0");
    }

    #[test]
    fn the_quorum_size_is_read_from_any_k() {
        assert_eq!(quorum_size("ANY 2 (a, b, c)"), 2);
        assert_eq!(quorum_size("  any 3(a,b,c)"), 3);
        assert_eq!(quorum_size("FIRST 2 (a, b)"), 1);
        assert_eq!(quorum_size("*"), 1);
        assert_eq!(quorum_size(""), 1);
    }
}
