//! What a session gives up when it goes idle, kept per data-plane thread for the next unit of
//! any session on the same thread instead of going back to the allocator: under transaction
//! pooling every transaction would otherwise allocate and free it anew. Here the empty read
//! buffers (see [`super::relay::ClientConn::release_buffers`]); elsewhere the records of
//! unnamed statements and the queues of Parses in flight, through [`Spares`].

use std::cell::RefCell;

use bytes::BytesMut;

/// Spares kept per thread, of each kind: enough for the buffers of the sessions a thread has in
/// flight at once under load, up to three each (32 left 0.44 of a 16 KiB buffer allocated per
/// transaction at -c 16 on one thread, callgrind); for the buffers at most 64 × 32 KiB, 2 MiB,
/// per thread.
const KEEP: usize = 64;

/// Up to [`KEEP`] values of one kind, in a `thread_local!` of the thread they serve (so taking
/// and giving need no lock).
pub struct Spares<T>(RefCell<Vec<T>>);

impl<T> Spares<T> {
    /// None kept yet.
    pub const fn new() -> Spares<T> {
        Spares(RefCell::new(Vec::new()))
    }

    /// A kept value, if there is one.
    pub fn take(&self) -> Option<T> {
        self.0.borrow_mut().pop()
    }

    /// Keeps `value` if fewer than [`KEEP`] are kept; drops it otherwise.
    pub fn give(&self, value: T) {
        let mut kept = self.0.borrow_mut();
        if kept.len() < KEEP {
            kept.push(value);
        }
    }

    /// How many are kept.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.0.borrow().len()
    }
}

/// Buffers larger than this are freed rather than kept (a large message passed through them;
/// the relay reads 16 KiB at a time).
const LARGEST_KEPT: usize = 32 * 1024;

/// Buffers smaller than this are freed rather than kept: taken for a read of 16 KiB, such a
/// spare would be reallocated at once.
const SMALLEST_KEPT: usize = 4 * 1024;

thread_local! {
    static SPARE: Spares<BytesMut> = const { Spares::new() };
}

/// An empty buffer with room for at least `wanted` bytes: a spare one when the thread has one.
pub fn take(wanted: usize) -> BytesMut {
    let spare = SPARE.with(Spares::take);
    match spare {
        Some(mut buf) => {
            // A spare may have been advanced: reserving on an empty buffer reclaims its room.
            buf.reserve(wanted);
            buf
        }
        None => BytesMut::with_capacity(wanted),
    }
}

/// Gives up `buf`, which must be empty: kept as a spare when there is room, else freed.
pub fn give(mut buf: BytesMut) {
    debug_assert!(buf.is_empty());
    if !(SMALLEST_KEPT..=LARGEST_KEPT).contains(&buf.capacity()) {
        return;
    }
    buf.clear();
    SPARE.with(|spare| spare.give(buf));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_given_buffer_is_taken_again_and_the_spares_are_bounded() {
        let buf = take(16 * 1024);
        let at = buf.as_ptr();
        give(buf);
        let again = take(1024);
        assert_eq!(again.as_ptr(), at, "the spare was not reused");
        assert!(again.capacity() >= 16 * 1024);
        for _ in 0..KEEP + 4 {
            give(BytesMut::with_capacity(SMALLEST_KEPT));
        }
        assert_eq!(SPARE.with(Spares::len), KEEP);
        while SPARE.with(Spares::take).is_some() {}
        give(BytesMut::with_capacity(LARGEST_KEPT + 1));
        give(BytesMut::with_capacity(SMALLEST_KEPT - 1));
        assert_eq!(SPARE.with(Spares::len), 0, "a spare too large or too small");
    }
}
