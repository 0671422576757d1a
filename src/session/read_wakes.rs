//! The relay's two reads, each with a waker of its own, so that a wake-up says which socket
//! became readable: the relay then polls that read again and not the other one, which stays
//! registered and would only say "not ready" once more (two such polls per round trip, about
//! 300 instructions each, before).
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

/// The bit of the client's read in [`ReadWakes::enter`]'s answer.
pub const CLIENT: u8 = 1;
/// The bit of the server's read.
pub const SERVER: u8 = 2;

thread_local! {
    static SPARE: Spares<ReadWakes> = const { Spares::new() };
}

/// The wakers of one relay's reads.
pub struct ReadWakes {
    woken: Arc<Woken>,
    client: Waker,
    server: Waker,
}

/// What the two wakers share: which reads were woken since the relay last looked, and the
/// relay's task, which each wake-up wakes.
#[derive(Default)]
struct Woken {
    reads: AtomicU8,
    task: AtomicWaker,
}

/// The waker of one read.
struct ReadWaker {
    woken: Arc<Woken>,
    read: u8,
}

impl Wake for ReadWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.reads.fetch_or(self.read, Ordering::AcqRel);
        self.woken.task.wake();
    }
}

impl ReadWakes {
    /// A relay's wakers: kept ones when the thread has them.
    pub fn take() -> ReadWakes {
        let wakes = SPARE.with(Spares::take).unwrap_or_else(|| {
            let woken = Arc::new(Woken::default());
            let waker = |read| {
                Waker::from(Arc::new(ReadWaker {
                    woken: woken.clone(),
                    read,
                }))
            };
            ReadWakes {
                client: waker(CLIENT),
                server: waker(SERVER),
                woken,
            }
        });
        // A wake-up meant for the relay before is no news to this one.
        wakes.woken.reads.store(0, Ordering::Release);
        wakes
    }

    /// Gives the wakers up for the thread's next relay.
    pub fn give(self) {
        // Not keeping the task alive.
        self.woken.task.take();
        SPARE.with(|spare| spare.give(self));
    }

    /// Registers `task` as the one to wake and says which reads were woken since the last call
    /// ([`CLIENT`], [`SERVER`]).
    pub fn enter(&mut self, task: &Waker) -> u8 {
        // Again at every poll: a wake-up takes the task out.
        self.woken.task.register(task);
        self.woken.reads.swap(0, Ordering::AcqRel)
    }

    /// The waker to poll the client's read with.
    pub fn client(&self) -> &Waker {
        &self.client
    }

    /// The waker to poll the server's read with.
    pub fn server(&self) -> &Waker {
        &self.server
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
        let mut wakes = ReadWakes::take();
        assert_eq!(wakes.enter(&task), 0);
        wakes.server().wake_by_ref();
        assert_eq!(wakes.enter(&task), SERVER);
        // By value, as tokio wakes a waker it took out of its slot.
        let taken = wakes.client().clone();
        taken.wake();
        wakes.server().wake_by_ref();
        assert_eq!(wakes.enter(&task), CLIENT | SERVER);
        assert_eq!(wakes.enter(&task), 0, "told once");
        // Woken once per poll: the second wake-up finds the task woken already.
        assert_eq!(count.0.load(Ordering::Relaxed), 2);
        // Kept, and handed over without the last relay's news.
        wakes.client().wake_by_ref();
        wakes.give();
        let mut again = ReadWakes::take();
        assert_eq!(again.enter(&task), 0);
    }
}
