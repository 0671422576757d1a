//! The operator's PAUSE (PgBouncer's): while paused, a session's next unit outside a transaction
//! block is held before it is routed; units and transactions already running finish. RESUME
//! releases the held units. Sessions count themselves in flight from the start of a unit until
//! they are idle outside a transaction again, so that `pause --wait` knows when none is left.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

/// Whether new units may start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Traffic {
    /// New units are routed as they come.
    #[default]
    Flowing,
    /// New units outside a transaction block wait for RESUME.
    Paused,
}

impl Traffic {
    /// The name shown in status and the console.
    pub fn as_str(self) -> &'static str {
        match self {
            Traffic::Flowing => "flowing",
            Traffic::Paused => "paused",
        }
    }
}

/// The pause switch and the count of sessions in flight.
#[derive(Debug)]
pub struct Pause {
    traffic: watch::Sender<Traffic>,
    in_flight: AtomicUsize,
    /// Units held now.
    held: AtomicUsize,
    /// Woken when the last session in flight becomes idle.
    idle: Notify,
}

impl Default for Pause {
    fn default() -> Self {
        Pause {
            traffic: watch::Sender::new(Traffic::Flowing),
            in_flight: AtomicUsize::new(0),
            held: AtomicUsize::new(0),
            idle: Notify::new(),
        }
    }
}

impl Pause {
    /// Holds new units from now on; returns whether traffic was flowing before.
    pub fn pause(&self) -> bool {
        self.traffic.send_replace(Traffic::Paused) == Traffic::Flowing
    }

    /// Releases the held units; returns whether traffic was paused before.
    pub fn resume(&self) -> bool {
        self.traffic.send_replace(Traffic::Flowing) == Traffic::Paused
    }

    /// Whether new units flow or wait.
    pub fn traffic(&self) -> Traffic {
        *self.traffic.borrow()
    }

    /// Changes of the switch, for a held session.
    pub fn subscribe(&self) -> watch::Receiver<Traffic> {
        self.traffic.subscribe()
    }

    /// Sessions running a unit or inside a transaction block now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Units held by the pause now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Acquire)
    }

    /// Counts one more unit held until the returned guard is dropped.
    pub fn holding(&self) -> Holding<'_> {
        self.held.fetch_add(1, Ordering::AcqRel);
        Holding(self)
    }

    /// Waits until no session is in flight, up to `deadline`; returns how many still are.
    pub async fn until_idle(&self, deadline: Instant) -> usize {
        loop {
            // Enabled before looking: the last session leaving just after the look still wakes us.
            let idle = self.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            let left = self.in_flight();
            if left == 0 {
                return 0;
            }
            if tokio::time::timeout_at(deadline, idle).await.is_err() {
                return self.in_flight();
            }
        }
    }
}

/// One session in flight; it leaves the count when dropped.
#[derive(Debug)]
pub struct InFlight(Arc<Pause>);

impl InFlight {
    /// Counts one more session in flight.
    pub fn enter(pause: &Arc<Pause>) -> InFlight {
        pause.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(pause.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// One unit held by the pause; it leaves the count when dropped.
#[derive(Debug)]
pub struct Holding<'a>(&'a Pause);

impl Drop for Holding<'_> {
    fn drop(&mut self) {
        self.0.held.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn until_idle_returns_when_the_last_session_leaves() {
        let pause = Arc::new(Pause::default());
        assert!(pause.pause() && !pause.pause());
        let first = InFlight::enter(&pause);
        let second = InFlight::enter(&pause);
        let soon = Instant::now() + Duration::from_millis(20);
        assert_eq!(pause.until_idle(soon).await, 2);
        drop(first);
        let waiter = {
            let pause = pause.clone();
            tokio::spawn(async move {
                pause
                    .until_idle(Instant::now() + Duration::from_secs(10))
                    .await
            })
        };
        drop(second);
        assert_eq!(waiter.await.ok(), Some(0));
        assert!(pause.resume() && pause.traffic() == Traffic::Flowing);
    }
}
