//! How far each node has come in the WAL, as the latest health probe round saw it.
//!
//! The health monitor is the only writer: it publishes a new [`ReplicationView`] after every probe
//! round. Readers (the router) take the current view with one atomic load and never lock.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use crate::topology::NodeId;

/// One node's WAL position as last observed by a probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    /// Primary: `pg_current_wal_lsn()`; standby: `pg_last_wal_replay_lsn()` (0 if it has none).
    pub lsn: u64,
    /// Standby: `pg_last_wal_receive_lsn()`. None on a primary, and on a standby that has not
    /// asked for streaming since it started.
    pub received: Option<u64>,
    /// Standby: how far replay is behind in time: zero when everything received is replayed,
    /// else `now() - pg_last_xact_replay_timestamp()` (zero while no commit has been replayed).
    /// Zero on a primary.
    pub replay_delay: Duration,
}

/// The positions of every node from the latest probe round (None: not reachable / not probed).
#[derive(Debug, Clone, Default)]
pub struct ReplicationView {
    /// One entry per configured node, in configuration order.
    pub nodes: Vec<Option<Position>>,
    /// When the probe round that produced it started (None before the first round).
    pub observed_at: Option<Instant>,
}

impl ReplicationView {
    /// Bytes of WAL `node` has yet to replay relative to `primary`'s current position (0 if ahead).
    /// None unless both were observed.
    pub fn lag_bytes(&self, node: NodeId, primary: NodeId) -> Option<u64> {
        let node = self.position(node)?;
        let primary = self.position(primary)?;
        // The two probes of a round are not simultaneous: a standby probed after the primary
        // may report a position past the primary's, which means no lag.
        Some(primary.lsn.saturating_sub(node.lsn))
    }

    /// Whether `node` may take reads: observed, behind `primary` by at most `max_bytes` and
    /// `max_delay`. The primary itself always qualifies when observed.
    pub fn caught_up(
        &self,
        node: NodeId,
        primary: NodeId,
        max_bytes: u64,
        max_delay: Duration,
    ) -> bool {
        if node == primary {
            return self.position(node).is_some();
        }
        match (self.position(node), self.lag_bytes(node, primary)) {
            (Some(position), Some(lag)) => lag <= max_bytes && position.replay_delay <= max_delay,
            _ => false,
        }
    }

    /// Whether `node` has replayed at least `lsn` (the primary always has).
    pub fn has_replayed(&self, node: NodeId, primary: NodeId, lsn: u64) -> bool {
        node == primary || self.position(node).is_some_and(|p| p.lsn >= lsn)
    }

    /// `node`'s observed position; None for an unobserved or unknown node.
    fn position(&self, node: NodeId) -> Option<&Position> {
        self.nodes.get(node)?.as_ref()
    }
}

/// The shared current view (ArcSwap); the health monitor is its only writer.
pub struct ReplicationHandle {
    current: ArcSwap<ReplicationView>,
}

impl ReplicationHandle {
    /// Starts with `node_count` unobserved nodes.
    pub fn new(node_count: usize) -> ReplicationHandle {
        ReplicationHandle {
            current: ArcSwap::from_pointee(ReplicationView {
                nodes: vec![None; node_count],
                observed_at: None,
            }),
        }
    }

    /// The current view (one atomic load; do not hold it across `.await`).
    pub fn load(&self) -> arc_swap::Guard<Arc<ReplicationView>> {
        self.current.load()
    }

    /// Replaces the current view.
    pub fn publish(&self, view: ReplicationView) {
        self.current.store(Arc::new(view));
    }
}

/// Parses PostgreSQL's text form of an LSN, "16/B374D848", into a u64 (hi << 32 | lo). None if
/// malformed.
pub fn parse_lsn(text: &str) -> Option<u64> {
    let (hi, lo) = text.split_once('/')?;
    Some(u64::from(parse_half(hi)?) << 32 | u64::from(parse_half(lo)?))
}

/// An LSN in PostgreSQL's text form ("16/B374D848"), the inverse of [`parse_lsn`].
pub fn format_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

/// One half of an LSN: 1 to 8 hex digits (PostgreSQL prints them with `%X`, no sign, no prefix).
fn parse_half(text: &str) -> Option<u32> {
    let hex = |c: char| c.is_ascii_hexdigit();
    if text.is_empty() || text.len() > 8 || !text.chars().all(hex) {
        return None;
    }
    u32::from_str_radix(text, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const PRIMARY: NodeId = 0;
    const STANDBY: NodeId = 1;
    const SECOND: Duration = Duration::from_secs(1);

    fn primary_at(lsn: u64) -> Option<Position> {
        Some(Position {
            lsn,
            received: None,
            replay_delay: Duration::ZERO,
        })
    }

    fn standby_at(lsn: u64, replay_delay: Duration) -> Option<Position> {
        Some(Position {
            lsn,
            received: Some(lsn),
            replay_delay,
        })
    }

    fn view(nodes: Vec<Option<Position>>) -> ReplicationView {
        ReplicationView {
            nodes,
            observed_at: None,
        }
    }

    #[test]
    fn format_lsn_writes_what_parse_lsn_reads() {
        assert_eq!(format_lsn(0x16_B374_D848), "16/B374D848");
        assert_eq!(format_lsn(0), "0/0");
        assert_eq!(parse_lsn(&format_lsn(0x1_0000_0001)), Some(0x1_0000_0001));
    }

    #[test]
    fn parse_lsn_reads_postgres_text_form() {
        let cases: &[(&str, Option<u64>)] = &[
            ("0/0", Some(0)),
            ("0/3000B88", Some(0x0300_0B88)),
            ("16/B374D848", Some(0x16_B374_D848)),
            ("16/b374d848", Some(0x16_B374_D848)),
            ("FFFFFFFF/FFFFFFFF", Some(u64::MAX)),
            ("", None),
            ("16", None),
            ("16/", None),
            ("/B374D848", None),
            ("1/2/3", None),
            ("16/B374D84G", None),
            ("+16/B374D848", None),
            ("0x16/B374D848", None),
            (" 16/B374D848", None),
            ("1FFFFFFFF/0", None),
            ("0/100000000", None),
        ];
        for (text, expected) in cases {
            assert_eq!(parse_lsn(text), *expected, "{text:?}");
        }
    }

    #[test]
    fn lag_bytes_is_how_far_the_node_is_behind_the_primary() {
        let v = view(vec![primary_at(5000), standby_at(3000, SECOND), None]);
        assert_eq!(v.lag_bytes(STANDBY, PRIMARY), Some(2000));
        assert_eq!(v.lag_bytes(PRIMARY, PRIMARY), Some(0));
        assert_eq!(v.lag_bytes(2, PRIMARY), None, "unobserved node");
        assert_eq!(v.lag_bytes(7, PRIMARY), None, "no such node");
        let ahead = view(vec![primary_at(3000), standby_at(5000, Duration::ZERO)]);
        assert_eq!(ahead.lag_bytes(STANDBY, PRIMARY), Some(0));
        let no_primary = view(vec![None, standby_at(3000, Duration::ZERO)]);
        assert_eq!(no_primary.lag_bytes(STANDBY, PRIMARY), None);
    }

    #[test]
    fn caught_up_respects_the_byte_limit() {
        let v = view(vec![primary_at(5000), standby_at(3000, Duration::ZERO)]);
        assert!(v.caught_up(STANDBY, PRIMARY, 2000, SECOND));
        assert!(!v.caught_up(STANDBY, PRIMARY, 1999, SECOND));
    }

    #[test]
    fn caught_up_respects_the_delay_limit() {
        let v = view(vec![primary_at(5000), standby_at(5000, 2 * SECOND)]);
        assert!(v.caught_up(STANDBY, PRIMARY, 0, 2 * SECOND));
        assert!(!v.caught_up(STANDBY, PRIMARY, 0, SECOND));
    }

    #[test]
    fn caught_up_is_false_for_unknown_nodes_or_an_unknown_primary() {
        let v = view(vec![primary_at(5000), None]);
        assert!(!v.caught_up(STANDBY, PRIMARY, u64::MAX, Duration::MAX));
        assert!(!v.caught_up(9, PRIMARY, u64::MAX, Duration::MAX));
        let no_primary = view(vec![None, standby_at(5000, Duration::ZERO)]);
        assert!(!no_primary.caught_up(STANDBY, PRIMARY, u64::MAX, Duration::MAX));
    }

    #[test]
    fn the_observed_primary_is_always_caught_up() {
        let v = view(vec![primary_at(5000), standby_at(0, Duration::MAX)]);
        assert!(v.caught_up(PRIMARY, PRIMARY, 0, Duration::ZERO));
        let unobserved = view(vec![None, standby_at(0, Duration::ZERO)]);
        assert!(!unobserved.caught_up(PRIMARY, PRIMARY, 0, Duration::ZERO));
    }

    #[test]
    fn has_replayed_compares_the_replay_position() {
        let v = view(vec![
            primary_at(5000),
            standby_at(3000, Duration::ZERO),
            None,
        ]);
        assert!(v.has_replayed(STANDBY, PRIMARY, 2999));
        assert!(v.has_replayed(STANDBY, PRIMARY, 3000));
        assert!(!v.has_replayed(STANDBY, PRIMARY, 3001));
        assert!(!v.has_replayed(2, PRIMARY, 0), "unobserved node");
        assert!(!v.has_replayed(9, PRIMARY, 0), "no such node");
        assert!(v.has_replayed(PRIMARY, PRIMARY, u64::MAX));
    }

    #[test]
    fn a_new_handle_has_every_node_unobserved_until_published() {
        let handle = ReplicationHandle::new(2);
        assert_eq!(handle.load().nodes, vec![None, None]);
        handle.publish(view(vec![primary_at(1), None]));
        assert_eq!(handle.load().nodes, vec![primary_at(1), None]);
    }
}
