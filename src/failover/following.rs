//! Whether a standby follows the primary, and so may take reads: its WAL receiver streams, it
//! has heard from its sender recently or holds all the primary had, it is on the primary's
//! timeline and holds no WAL past the primary's. Pure: no I/O, so every rule is unit-tested.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::health::Observation;
use crate::topology::{NodeId, Stale};

/// Primary probes kept in a [`PrimaryTrail`]: more than enough to find one probe before and one
/// after any standby probe of the last few intervals.
const TRAIL_LEN: usize = 16;

/// The furthest WAL position a standby holds: received or replayed, whichever is further (a
/// restarted standby reports the start of its streaming segment as received).
fn held(standby: &Observation) -> u64 {
    let position = standby.position;
    position
        .received
        .map_or(position.lsn, |r| r.max(position.lsn))
}

/// Whether `standby` streams from `sender` (host, port) on `timeline`.
pub fn streams_from(standby: &Observation, sender: (&str, u16), timeline: u32) -> bool {
    standby.timeline == timeline
        && standby.receiver.as_ref().is_some_and(|r| {
            r.streaming
                && r.sender
                    .as_ref()
                    .is_some_and(|(h, p)| (h.as_str(), *p) == sender)
        })
}

/// When a probe ran: it read the node's state somewhere between these two instants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeTime {
    /// The probe started (before connecting, if it had to).
    pub started: Instant,
    /// Its answer had reached the coordinator.
    pub answered: Instant,
}

/// The primary's WAL positions from its latest probes, with when each ran, so that a standby's
/// position is compared only with one the primary surely had before the standby's probe (is it
/// missing WAL?) or surely read after it (does it hold WAL the primary never had?). Positions
/// read at overlapping times say nothing: a write in between makes either look wrong.
#[derive(Debug, Default)]
pub struct PrimaryTrail {
    /// The node the positions are of.
    node: Option<NodeId>,
    /// (when, `pg_current_wal_lsn()`), oldest first.
    probes: VecDeque<(ProbeTime, u64)>,
}

impl PrimaryTrail {
    /// Takes in a successful probe of `node`, the primary; a new primary starts a new trail.
    pub fn record(&mut self, node: NodeId, time: ProbeTime, lsn: u64) {
        if self.node != Some(node) {
            self.node = Some(node);
            self.probes.clear();
        }
        if self.probes.len() == TRAIL_LEN {
            self.probes.pop_front();
        }
        self.probes.push_back((time, lsn));
    }

    /// The position of the latest primary probe answered before `at`.
    fn before(&self, node: NodeId, at: Instant) -> Option<u64> {
        self.of(node)?
            .iter()
            .rev()
            .find(|(time, _)| time.answered <= at)
            .map(|&(_, lsn)| lsn)
    }

    /// The position of the earliest primary probe started after `at`.
    fn after(&self, node: NodeId, at: Instant) -> Option<u64> {
        self.of(node)?
            .iter()
            .find(|(time, _)| time.started >= at)
            .map(|&(_, lsn)| lsn)
    }

    fn of(&self, node: NodeId) -> Option<&VecDeque<(ProbeTime, u64)>> {
        (self.node == Some(node)).then_some(&self.probes)
    }
}

/// How the primary looks to a judgement of its standbys.
#[derive(Debug, Clone, Copy)]
pub struct PrimaryView<'a> {
    /// The primary's node.
    pub node: NodeId,
    /// Its timeline.
    pub timeline: u32,
    /// Its latest probe succeeded: a standby that does not stream from it is not excused by the
    /// primary's own trouble.
    pub answers: bool,
    /// Its recent positions.
    pub trail: &'a PrimaryTrail,
}

/// The verdict on one standby.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Following {
    /// It follows the primary.
    Yes,
    /// It does not, for this reason.
    No(Stale),
    /// This reason would hold if a probe of the primary that started after the standby's
    /// confirmed it (the standby is ahead of it, or it answered while the standby did not
    /// stream): keep the previous verdict until then.
    Pending(Stale),
}

/// Whether `standby`, observed by a probe that ran at `time`, follows the primary: same
/// timeline; while the primary answers, a streaming WAL receiver that heard from its sender
/// within `max_lag` unless it already holds everything the primary had; and no WAL past the
/// primary's. An idle primary may leave its standbys unspoken to for half their
/// `wal_receiver_timeout` (30 s by default), which is why silence alone is not staleness. A
/// receiver that stopped counts only once the primary has answered a later probe: a primary that
/// has just died stops its standbys' receivers before its own probes fail, and its standbys must
/// keep serving reads meanwhile.
pub fn following(
    standby: &Observation,
    time: ProbeTime,
    primary: PrimaryView<'_>,
    max_lag: Duration,
) -> Following {
    if standby.timeline != primary.timeline {
        return Following::No(Stale::OtherTimeline);
    }
    let held = held(standby);
    let later = primary.trail.after(primary.node, time.answered);
    if primary.answers {
        let Some(receiver) = standby.receiver.as_ref().filter(|r| r.streaming) else {
            return match later {
                Some(_) => Following::No(Stale::NotStreaming),
                None => Following::Pending(Stale::NotStreaming),
            };
        };
        let silent = receiver.last_message_age.is_some_and(|age| age > max_lag);
        let missing = primary
            .trail
            .before(primary.node, time.started)
            .is_some_and(|lsn| held < lsn);
        if silent && missing {
            return Following::No(Stale::Silent);
        }
    }
    match later {
        Some(lsn) if held > lsn => Following::No(Stale::Ahead),
        Some(_) => Following::Yes,
        None => Following::Pending(Stale::Ahead),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::Receiver;
    use crate::replication::Position;

    /// A standby on timeline 1 holding `held`, its receiver in `status` and last heard `age` ago.
    fn standby(held: u64, status: Option<&str>, age: u64) -> Observation {
        Observation {
            in_recovery: true,
            timeline: 1,
            position: Position {
                lsn: held,
                received: Some(held),
                replay_delay: Duration::ZERO,
            },
            receiver: status.map(|status| Receiver {
                streaming: status == "streaming",
                sender: Some(("127.0.0.1".into(), 5432)),
                last_message_age: Some(Duration::from_secs(age)),
                timeout: Duration::from_secs(60),
            }),
            read_only: false,
            promoted_by: None,
            senders: None,
        }
    }

    const MAX_LAG: Duration = Duration::from_secs(10);

    /// A probe that started `ms` after `base` and was answered 10 ms later.
    fn probe_at(base: Instant, ms: u64) -> ProbeTime {
        let started = base + Duration::from_millis(ms);
        ProbeTime {
            started,
            answered: started + Duration::from_millis(10),
        }
    }

    /// A trail of primary probes at `base` + each offset (ms), at the given positions.
    fn trail(base: Instant, probes: &[(u64, u64)]) -> PrimaryTrail {
        let mut trail = PrimaryTrail::default();
        for &(ms, lsn) in probes {
            trail.record(0, probe_at(base, ms), lsn);
        }
        trail
    }

    fn judge(
        standby: &Observation,
        at: ProbeTime,
        trail: &PrimaryTrail,
        answers: bool,
    ) -> Following {
        let view = PrimaryView {
            node: 0,
            timeline: 1,
            answers,
            trail,
        };
        following(standby, at, view, MAX_LAG)
    }

    #[test]
    fn an_idle_standby_that_streams_and_holds_everything_follows_however_quiet() {
        let base = Instant::now();
        let at = probe_at(base, 1000);
        let idle = trail(base, &[(0, 500), (2000, 500)]);
        let quiet = standby(500, Some("streaming"), 25);
        assert_eq!(judge(&quiet, at, &idle, true), Following::Yes);
        let busy = trail(base, &[(0, 900), (2000, 1000)]);
        assert_eq!(
            judge(&quiet, at, &busy, true),
            Following::No(Stale::Silent),
            "quiet for 25 s while the primary had WAL it lacks"
        );
        let heard = standby(500, Some("streaming"), 1);
        assert_eq!(
            judge(&heard, at, &busy, true),
            Following::Yes,
            "just behind"
        );
    }

    #[test]
    fn a_standby_whose_receiver_is_off_or_connecting_does_not_follow() {
        let base = Instant::now();
        let at = probe_at(base, 1000);
        let idle = trail(base, &[(0, 500), (2000, 500)]);
        for status in [None, Some("waiting"), Some("starting")] {
            assert_eq!(
                judge(&standby(500, status, 0), at, &idle, true),
                Following::No(Stale::NotStreaming),
                "{status:?}"
            );
            // A primary that does not answer explains it: its standbys keep serving reads.
            assert_eq!(
                judge(&standby(500, status, 0), at, &idle, false),
                Following::Yes
            );
            // So may a primary whose latest answer predates the standby's.
            let earlier = trail(base, &[(0, 500)]);
            assert_eq!(
                judge(&standby(500, status, 0), at, &earlier, true),
                Following::Pending(Stale::NotStreaming)
            );
        }
    }

    #[test]
    fn another_timeline_or_wal_past_the_primarys_does_not_follow() {
        let base = Instant::now();
        let at = probe_at(base, 1000);
        let mut forked = standby(500, Some("streaming"), 0);
        forked.timeline = 2;
        let idle = trail(base, &[(0, 500), (2000, 500)]);
        assert_eq!(
            judge(&forked, at, &idle, false),
            Following::No(Stale::OtherTimeline)
        );
        let ahead = standby(600, Some("streaming"), 0);
        assert_eq!(judge(&ahead, at, &idle, true), Following::No(Stale::Ahead));
        // Only a primary probe that started after the standby's can tell.
        let before_only = trail(base, &[(0, 500)]);
        assert_eq!(
            judge(&ahead, at, &before_only, true),
            Following::Pending(Stale::Ahead)
        );
        let overlapping = trail(base, &[(0, 500), (1005, 500)]);
        assert_eq!(
            judge(&ahead, at, &overlapping, true),
            Following::Pending(Stale::Ahead)
        );
        let just_after = trail(base, &[(0, 500), (1010, 500)]);
        assert_eq!(
            judge(&ahead, at, &just_after, true),
            Following::No(Stale::Ahead)
        );
        // A primary probed later has moved on past a busy standby: no verdict of ahead.
        let moved = trail(base, &[(0, 400), (2000, 700)]);
        assert_eq!(judge(&ahead, at, &moved, true), Following::Yes);
    }

    #[test]
    fn a_trail_is_of_one_primary_and_keeps_the_latest_probes() {
        let base = Instant::now();
        let mut trail = trail(base, &[(0, 1)]);
        trail.record(1, probe_at(base, 0), 7);
        assert_eq!(trail.after(0, base), None);
        assert_eq!(trail.after(1, base), Some(7));
        for i in 0..(TRAIL_LEN as u64 + 4) {
            trail.record(1, probe_at(base, i * 1000), i);
        }
        assert_eq!(trail.probes.len(), TRAIL_LEN);
        assert_eq!(
            trail.before(1, base + Duration::from_secs(100)),
            Some(TRAIL_LEN as u64 + 3)
        );
    }
}
