//! One watcher of the topology per data-plane thread, waking that thread's relays when the
//! topology changes (a relay must give up a connection whose node is no longer usable, even while
//! it waits on that node). A relay registers its wake-up once, in a list only its own thread
//! touches: registering with the topology's channel instead takes a lock shared by every thread,
//! and under transaction pooling a relay starts (and registered) at every unit.

use std::cell::RefCell;
use std::task::{Context, Waker};

use tokio::sync::watch;

/// The watch of the calling data-plane thread.
struct Watch {
    /// Topology generations announced since the thread started.
    generation: u64,
    /// The registered relays' wake-ups; `None` in a free slot.
    wakers: Vec<Option<Waker>>,
    /// Slots free for the next registration.
    free: Vec<usize>,
}

thread_local! {
    static WATCH: RefCell<Watch> = const {
        RefCell::new(Watch {
            generation: 0,
            wakers: Vec::new(),
            free: Vec::new(),
        })
    };
}

/// Wakes the relays of this thread at every topology generation announced on `changes`, until
/// the proxy stops announcing. Spawned once on each data-plane thread, before it accepts.
pub async fn watch_topology(mut changes: watch::Receiver<u64>) {
    while changes.changed().await.is_ok() {
        WATCH.with(|watch| {
            let mut watch = watch.borrow_mut();
            watch.generation += 1;
            // Waking only schedules the relays' tasks on this thread: none runs here.
            for waker in watch.wakers.iter().flatten() {
                waker.wake_by_ref();
            }
        });
    }
}

/// A relay's place among the wake-ups of its thread, given up when dropped.
#[derive(Debug)]
pub struct Registration {
    slot: Option<usize>,
    /// The generation the relay last looked at.
    seen: u64,
}

impl Registration {
    /// A registration that sees the generations announced from now on.
    pub fn new() -> Registration {
        Registration {
            slot: None,
            seen: WATCH.with(|watch| watch.borrow().generation),
        }
    }

    /// Whether a generation was announced since the last call; the task of `cx` is woken at the
    /// next one.
    pub fn changed(&mut self, cx: &Context<'_>) -> bool {
        WATCH.with(|watch| {
            let mut watch = watch.borrow_mut();
            match self.slot {
                Some(slot) => match &mut watch.wakers[slot] {
                    Some(waker) if waker.will_wake(cx.waker()) => {}
                    entry => *entry = Some(cx.waker().clone()),
                },
                None => {
                    let waker = Some(cx.waker().clone());
                    let slot = match watch.free.pop() {
                        Some(slot) => {
                            watch.wakers[slot] = waker;
                            slot
                        }
                        None => {
                            watch.wakers.push(waker);
                            watch.wakers.len() - 1
                        }
                    };
                    self.slot = Some(slot);
                }
            }
            let changed = watch.generation != self.seen;
            self.seen = watch.generation;
            changed
        })
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(slot) = self.slot {
            // A thread being torn down may have dropped its list already: nothing to give back.
            let _ = WATCH.try_with(|watch| {
                let mut watch = watch.borrow_mut();
                watch.wakers[slot] = None;
                watch.free.push(slot);
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::task::Wake;

    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_registered_relay_is_woken_and_sees_each_generation_once() {
        let (tx, rx) = watch::channel(0u64);
        let watcher = tokio::spawn(watch_topology(rx));
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        let cx = Context::from_waker(&waker);
        let mut relay = Registration::new();
        assert!(!relay.changed(&cx), "nothing announced yet");
        tx.send_replace(1);
        // Let the watcher run on this thread.
        while count.0.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        assert!(relay.changed(&cx));
        assert!(!relay.changed(&cx), "a generation is seen once");
        // A relay that is gone is no longer woken, and its slot serves the next one.
        drop(relay);
        let mut next = Registration::new();
        assert!(!next.changed(&cx));
        assert_eq!(WATCH.with(|w| w.borrow().wakers.len()), 1);
        drop(tx);
        watcher.await.unwrap();
    }
}
