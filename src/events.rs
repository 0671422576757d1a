//! The event log: what pgvigil did or saw (topology changes, each failover phase, operators'
//! commands, fences), each logged when it happens and the last [`EVENTS_KEPT`] kept in memory
//! for `GET /events` and `GET /status`.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::info;

use crate::admin::api::{Event, EventKind};
use crate::topology::NodeId;

/// Events kept in memory; older ones are dropped (the log keeps them all).
pub const EVENTS_KEPT: usize = 1000;

/// No first write awaited (see [`Events::await_first_write`]).
const NONE_AWAITED: usize = usize::MAX;

/// The recent events, newest last.
#[derive(Debug)]
pub struct Events {
    list: Mutex<VecDeque<Event>>,
    /// The node a failover just made primary, until a write unit finishes there; checked by
    /// every write unit with one atomic load, so it costs the hot path nothing measurable.
    first_write: AtomicUsize,
}

impl Default for Events {
    fn default() -> Self {
        Events {
            list: Mutex::new(VecDeque::with_capacity(EVENTS_KEPT)),
            first_write: AtomicUsize::new(NONE_AWAITED),
        }
    }
}

impl Events {
    /// Records and logs `message` of `kind` (about `node`, if any), dropping the oldest beyond
    /// [`EVENTS_KEPT`].
    pub fn push(&self, kind: EventKind, node: Option<&str>, message: impl Into<String>) {
        let message = message.into();
        info!(kind = kind.as_str(), node = node.unwrap_or(""), %message, "event");
        let at_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let mut events = self.list.lock().unwrap_or_else(PoisonError::into_inner);
        if events.len() == EVENTS_KEPT {
            events.pop_front();
        }
        events.push_back(Event {
            at_ms,
            kind,
            node: node.map(str::to_owned),
            message,
        });
    }

    /// A copy of the events, oldest first.
    pub fn list(&self) -> Vec<Event> {
        let events = self.list.lock().unwrap_or_else(PoisonError::into_inner);
        events.iter().cloned().collect()
    }

    /// A failover made `node` primary: the first write unit to finish there is an event.
    pub fn await_first_write(&self, node: NodeId) {
        self.first_write.store(node, Ordering::Release);
    }

    /// Whether the first write on `node` is awaited (see [`Events::await_first_write`]): one
    /// atomic load, so that a write that finished looks up its node's name only then.
    pub fn awaits_first_write(&self, node: NodeId) -> bool {
        self.first_write.load(Ordering::Acquire) == node
    }

    /// A write unit finished on `node` (named `name`): records the first one after a failover.
    pub fn wrote(&self, node: NodeId, name: &str) {
        if self.awaits_first_write(node)
            && self
                .first_write
                .compare_exchange(node, NONE_AWAITED, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            self.push(
                EventKind::FirstWrite,
                Some(name),
                "first write on the new primary finished",
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_last_thousand_are_kept_and_the_first_write_once() {
        let events = Events::default();
        for i in 0..EVENTS_KEPT + 5 {
            events.push(EventKind::Topology, None, format!("{i}"));
        }
        let list = events.list();
        assert_eq!(list.len(), EVENTS_KEPT);
        assert_eq!(list[0].message, "5");
        events.await_first_write(1);
        events.wrote(0, "pg1");
        events.wrote(1, "pg2");
        events.wrote(1, "pg2");
        let firsts = events
            .list()
            .iter()
            .filter(|e| e.kind == EventKind::FirstWrite)
            .count();
        assert_eq!(firsts, 1);
    }
}
