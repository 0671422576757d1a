//! Connections parked with their session between two units under transaction pooling: the
//! session keeps its connection while no checkout needs one, which spares a checkin and a
//! checkout per transaction; a checkout that would wait claims one instead (see
//! [`super::Pools::park`]).

use std::sync::Arc;
use std::task::Waker;
use std::time::{Duration, Instant};

use super::Pair;
use crate::topology::NodeId;

/// The connection a session parks (see [`super::Pools::park`]), named by its parts: the session
/// holds the rest of it borrowed while it relays.
#[derive(Debug, Clone, Copy)]
pub struct Parkable<'a> {
    /// Its node.
    pub node: NodeId,
    /// The database it is logged in to.
    pub database: &'a str,
    /// The role it is logged in as.
    pub user: &'a str,
    /// Its backend's process id.
    pub pid: u32,
    /// When it was opened.
    pub created: Instant,
}

/// Where a parked connection is in its node's [`ParkedList`], given to the session that parked
/// it to take it back with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParkTicket {
    index: usize,
    /// The connection's backend: no other connection to the node has it while this one lives.
    pid: u32,
}

/// What became of a parked connection when its session came back for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unparked {
    /// Still the session's.
    Kept,
    /// A checkout needs it: the session gives it back to the pool.
    Claimed,
    /// Past `pool.idle_timeout` or `pool.max_lifetime`: the session closes it.
    Expired,
}

/// One parked connection.
struct Parked {
    pid: u32,
    pair: Arc<Pair>,
    /// When its session parked it.
    since: Instant,
    /// When it was opened.
    created: Instant,
    /// Wakes the session's task, which then takes its connection back.
    waker: Waker,
    /// Set once a checkout or the reaper wants it back.
    claim: Option<Unparked>,
}

/// The parked connections of one node. Entries keep their place until their session takes them
/// back, so that a ticket finds its entry without a search.
#[derive(Default)]
pub(super) struct ParkedList {
    entries: Vec<Option<Parked>>,
    /// Indexes of empty entries.
    free: Vec<usize>,
    /// Entries not claimed yet: a checkout that queues looks through the entries only when
    /// there are some.
    unclaimed: usize,
}

impl ParkedList {
    /// Records `conn`, of `pair`, as parked at `now` by the task `waker` wakes.
    pub(super) fn park(
        &mut self,
        conn: &Parkable<'_>,
        pair: Arc<Pair>,
        now: Instant,
        waker: &Waker,
    ) -> ParkTicket {
        let pid = conn.pid;
        let parked = Parked {
            pid,
            pair,
            since: now,
            created: conn.created,
            waker: waker.clone(),
            claim: None,
        };
        self.unclaimed += 1;
        let index = match self.free.pop() {
            Some(index) => {
                self.entries[index] = Some(parked);
                index
            }
            None => {
                self.entries.push(Some(parked));
                self.entries.len() - 1
            }
        };
        ParkTicket { index, pid }
    }

    /// Takes the entry of `ticket` out: whether it was claimed meanwhile. An entry that is not
    /// there (not expected) counts as claimed: the connection goes back to the pool.
    pub(super) fn unpark(&mut self, ticket: ParkTicket) -> Unparked {
        let Some(slot) = self.entries.get_mut(ticket.index) else {
            return Unparked::Claimed;
        };
        if slot.as_ref().is_none_or(|parked| parked.pid != ticket.pid) {
            return Unparked::Claimed;
        }
        let claim = slot.take().and_then(|parked| parked.claim);
        self.free.push(ticket.index);
        claim.unwrap_or_else(|| {
            self.unclaimed -= 1;
            Unparked::Kept
        })
    }

    /// Claims the longest-parked connection not yet claimed, of `pair` when there is one, else
    /// of any pair (its slot then serves the checkout's): the waker of its session, to be woken
    /// once the pool's lock is released. None when every parked connection is claimed already.
    pub(super) fn claim(&mut self, pair: Option<&Pair>) -> Option<Waker> {
        if self.unclaimed == 0 {
            return None;
        }
        let of_pair = |parked: &Parked| {
            pair.is_some_and(|pair| {
                std::ptr::eq(&*parked.pair, pair)
                    || parked
                        .pair
                        .is(pair.database.as_bytes(), pair.user.as_bytes())
            })
        };
        // One pass: the pair's first, then the longest parked.
        let mut chosen: Option<(bool, Instant, usize)> = None;
        for (index, parked) in self.entries.iter().enumerate() {
            let Some(parked) = parked.as_ref().filter(|p| p.claim.is_none()) else {
                continue;
            };
            let mine = of_pair(parked);
            let better = chosen.is_none_or(|(chosen_mine, since, _)| {
                (mine && !chosen_mine) || (mine == chosen_mine && parked.since < since)
            });
            if better {
                chosen = Some((mine, parked.since, index));
            }
        }
        let parked = self.entries.get_mut(chosen?.2)?.as_mut()?;
        parked.claim = Some(Unparked::Claimed);
        self.unclaimed -= 1;
        Some(parked.waker.clone())
    }

    /// How many connections are parked, claimed or not.
    pub(super) fn len(&self) -> usize {
        self.entries.iter().flatten().count()
    }

    /// Whether a parked connection is not claimed yet.
    pub(super) fn has_unclaimed(&self) -> bool {
        self.unclaimed > 0
    }

    /// Marks the connections parked for `idle_timeout` or open for `max_lifetime` expired: the
    /// wakers of their sessions, which close them.
    pub(super) fn expire(
        &mut self,
        now: Instant,
        idle_timeout: Duration,
        max_lifetime: Duration,
    ) -> Vec<Waker> {
        let expired: Vec<Waker> = self
            .entries
            .iter_mut()
            .flatten()
            .filter(|p| {
                p.claim.is_none()
                    && (now.duration_since(p.since) >= idle_timeout
                        || now.duration_since(p.created) >= max_lifetime)
            })
            .map(|p| {
                p.claim = Some(Unparked::Expired);
                p.waker.clone()
            })
            .collect();
        self.unclaimed -= expired.len();
        expired
    }
}

#[cfg(test)]
pub(super) mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::Wake;

    use super::*;

    /// Counts its wake-ups.
    #[derive(Default)]
    pub(in crate::pool) struct Wakes(AtomicUsize);

    impl Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    impl Wakes {
        pub(in crate::pool) fn count(&self) -> usize {
            self.0.load(Ordering::SeqCst)
        }
    }

    fn pair(database: &str, user: &str) -> Arc<Pair> {
        Arc::new(Pair {
            database: database.into(),
            user: user.into(),
        })
    }

    pub(in crate::pool) fn conn(pid: u32, user: &str) -> Parkable<'_> {
        Parkable {
            node: 0,
            database: "db",
            user,
            pid,
            created: Instant::now(),
        }
    }

    #[test]
    fn a_parked_connection_is_kept_until_claimed_and_its_place_is_reused() {
        let mut list = ParkedList::default();
        let wakes = Arc::new(Wakes::default());
        let waker = Waker::from(Arc::clone(&wakes));
        let first = list.park(&conn(1, "u"), pair("db", "u"), Instant::now(), &waker);
        assert_eq!(list.unpark(first), Unparked::Kept);
        assert_eq!(list.unpark(first), Unparked::Claimed, "taken back already");
        let second = list.park(&conn(2, "u"), pair("db", "u"), Instant::now(), &waker);
        assert_eq!(second.index, first.index, "the empty place is reused");
        assert_eq!(
            list.unpark(first),
            Unparked::Claimed,
            "another connection's place"
        );
        assert!(list.has_unclaimed());
        assert!(list.claim(Some(&pair("db", "u"))).is_some());
        assert!(!list.has_unclaimed());
        assert!(list.claim(Some(&pair("db", "u"))).is_none(), "claimed once");
        assert_eq!(list.unpark(second), Unparked::Claimed);
        assert_eq!(wakes.count(), 0, "the caller wakes the claimed one");
    }

    #[test]
    fn a_claim_takes_the_longest_parked_of_the_pair_else_of_any_pair() {
        let mut list = ParkedList::default();
        let waker = Waker::from(Arc::new(Wakes::default()));
        let other = list.park(
            &conn(1, "other"),
            pair("db", "other"),
            Instant::now(),
            &waker,
        );
        let older = list.park(&conn(2, "u"), pair("db", "u"), Instant::now(), &waker);
        let younger = list.park(&conn(3, "u"), pair("db", "u"), Instant::now(), &waker);
        list.claim(Some(&pair("db", "u")));
        assert_eq!(
            list.unpark(older),
            Unparked::Claimed,
            "the older of the pair"
        );
        let again = list.park(&conn(2, "u"), pair("db", "u"), Instant::now(), &waker);
        list.claim(Some(&pair("db", "u")));
        assert_eq!(
            list.unpark(younger),
            Unparked::Claimed,
            "the pair's, now the older"
        );
        list.claim(Some(&pair("db", "nobody")));
        assert_eq!(
            list.unpark(other),
            Unparked::Claimed,
            "none of the pair: the oldest"
        );
        assert_eq!(list.unpark(again), Unparked::Kept);
        assert!(list.claim(None).is_none());
    }

    #[test]
    fn connections_parked_past_the_idle_timeout_or_open_past_their_lifetime_expire() {
        let mut list = ParkedList::default();
        let wakes = Arc::new(Wakes::default());
        let waker = Waker::from(Arc::clone(&wakes));
        let old = Parkable {
            created: Instant::now() - Duration::from_secs(60),
            ..conn(1, "u")
        };
        let aged = list.park(&old, pair("db", "u"), Instant::now(), &waker);
        let fresh = list.park(&conn(2, "u"), pair("db", "u"), Instant::now(), &waker);
        let hour = Duration::from_secs(3600);
        let now = Instant::now();
        assert_eq!(list.expire(now, hour, Duration::from_secs(30)).len(), 1);
        assert_eq!(list.unpark(aged), Unparked::Expired, "past its lifetime");
        let later = now + Duration::from_secs(2);
        let expired = list.expire(later, Duration::from_secs(1), hour);
        expired.into_iter().for_each(Waker::wake);
        assert_eq!(wakes.count(), 1);
        assert!(!list.has_unclaimed(), "none left to claim");
        assert_eq!(
            list.unpark(fresh),
            Unparked::Expired,
            "parked past the idle timeout"
        );
    }
}
