//! The relay's branches that wait for a wake-up, each with a waker of its own: the two reads
//! and the topology watch. A wake-up says which one to poll again; the others stay registered
//! and would only say "not ready" once more (two polls of a read per round trip, about 300
//! instructions each, and two looks at the topology, before).
//!
//! Wake-ups are only ever hints: a spurious one costs a poll, and a read whose registration
//! was replaced by another waker is polled again when the relay starts (each relay starts with
//! every read to poll). The wakers are kept per data-plane thread between relays (see
//! [`Spares`]), so an idle session holds none.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Wake, Waker};

use atomic_waker::AtomicWaker;

use super::spare::Spares;

/// The bit of the client's read in [`Wakes::enter`]'s answer.
pub const CLIENT: u8 = 1;
/// The bit of the server's read.
pub const SERVER: u8 = 2;
/// The bit of the topology watch.
pub const TOPOLOGY: u8 = 4;

thread_local! {
    static SPARE: Spares<Wakes> = const { Spares::new() };
}

/// The wakers of one relay's branches.
pub struct Wakes {
    woken: Arc<Woken>,
    client: Waker,
    server: Waker,
    topology: Waker,
}

/// What the wakers share: which branches were woken since the relay last looked, and the
/// relay's task, which each wake-up wakes.
#[derive(Default)]
struct Woken {
    branches: AtomicU8,
    task: AtomicWaker,
}

/// The waker of one branch.
struct BranchWaker {
    woken: Arc<Woken>,
    branch: u8,
}

impl Wake for BranchWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.branches.fetch_or(self.branch, Ordering::AcqRel);
        self.woken.task.wake();
    }
}

impl Wakes {
    /// A relay's wakers: kept ones when the thread has them.
    pub fn take() -> Wakes {
        let wakes = SPARE.with(Spares::take).unwrap_or_else(|| {
            let woken = Arc::new(Woken::default());
            let waker = |branch| {
                Waker::from(Arc::new(BranchWaker {
                    woken: woken.clone(),
                    branch,
                }))
            };
            Wakes {
                client: waker(CLIENT),
                server: waker(SERVER),
                topology: waker(TOPOLOGY),
                woken,
            }
        });
        // A wake-up meant for the relay before is no news to this one.
        wakes.woken.branches.store(0, Ordering::Release);
        wakes
    }

    /// Gives the wakers up for the thread's next relay.
    pub fn give(self) {
        // Not keeping the task alive.
        self.woken.task.take();
        SPARE.with(|spare| spare.give(self));
    }

    /// Registers `task` as the one to wake and says which branches were woken since the last
    /// call ([`CLIENT`], [`SERVER`], [`TOPOLOGY`]).
    pub fn enter(&mut self, task: &Waker) -> u8 {
        // Again at every poll: a wake-up takes the task out.
        self.woken.task.register(task);
        self.woken.branches.swap(0, Ordering::AcqRel)
    }

    /// The waker to poll the client's read with.
    pub fn client(&self) -> &Waker {
        &self.client
    }

    /// The waker to poll the server's read with.
    pub fn server(&self) -> &Waker {
        &self.server
    }

    /// The waker to register with the topology watch.
    pub fn topology(&self) -> &Waker {
        &self.topology
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_waker_marks_its_read_and_wakes_the_task() {
        struct Count(std::sync::atomic::AtomicUsize);
        impl Wake for Count {
            fn wake(self: Arc<Self>) {
                self.0.fetch_add(1, Ordering::Relaxed);
            }
        }
        let count = Arc::new(Count(0.into()));
        let task = Waker::from(count.clone());
        let mut wakes = Wakes::take();
        assert_eq!(wakes.enter(&task), 0);
        wakes.server().wake_by_ref();
        assert_eq!(wakes.enter(&task), SERVER);
        // By value, as tokio wakes a waker it took out of its slot.
        let taken = wakes.client().clone();
        taken.wake();
        wakes.server().wake_by_ref();
        wakes.topology().wake_by_ref();
        assert_eq!(wakes.enter(&task), CLIENT | SERVER | TOPOLOGY);
        assert_eq!(wakes.enter(&task), 0, "told once");
        // Woken once per poll: the second wake-up finds the task woken already.
        assert_eq!(count.0.load(Ordering::Relaxed), 2);
        // Kept, and handed over without the last relay's news.
        wakes.client().wake_by_ref();
        wakes.give();
        let mut again = Wakes::take();
        assert_eq!(again.enter(&task), 0);
    }
}
