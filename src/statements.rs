//! Named prepared statements under transaction pooling, on the server side: the names pgvigil
//! gives them on the nodes (`pgv_<id>`), shared by every session that prepares the same text
//! with the same parameter types in the same context, and what each server connection has
//! prepared under those names, least recently used first out.
//!
//! A client's own statement names never reach a shared connection: two clients may both call a
//! statement `s1`, and a connection serves many clients one transaction at a time.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use bytes::{BufMut, BytesMut};

/// A statement's id on the nodes; its server-side name is `pgv_<id>`.
pub type StatementId = u64;

/// An id no statement ever has: closing it closes nothing (PostgreSQL answers a Close of a
/// statement that does not exist with CloseComplete).
pub const NO_STATEMENT: StatementId = 0;

/// Past this many distinct statement keys the registry starts afresh: ids are never reused, so
/// forgetting them only loses sharing, never correctness.
const REGISTRY_LIMIT: usize = 100_000;

/// Writes the server-side name of statement `id` (no terminating NUL).
pub fn put_name(out: &mut BytesMut, id: StatementId) {
    // Digits from the last; without `write!`, whose formatting machinery cost about 300
    // instructions per name.
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut rest = id;
    loop {
        at -= 1;
        digits[at] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    out.put_slice(b"pgv_");
    out.put_slice(&digits[at..]);
}

/// The length of the server-side name of statement `id`.
pub fn name_len(id: StatementId) -> usize {
    let mut digits = 1;
    let mut rest = id / 10;
    while rest > 0 {
        digits += 1;
        rest /= 10;
    }
    "pgv_".len() + digits
}

/// The ids given out, by statement key (database, user, the session's settings, the Parse
/// message without its name): sessions whose statements have the same key share them.
#[derive(Default)]
pub struct Registry {
    ids: Mutex<HashMap<Box<[u8]>, StatementId>>,
    next: AtomicU64,
}

impl Registry {
    /// The shared id of the statement with `key`, given out now if it has none.
    pub fn id_for(&self, key: &[u8]) -> StatementId {
        let mut ids = self.ids.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(&id) = ids.get(key) {
            return id;
        }
        if ids.len() >= REGISTRY_LIMIT {
            ids.clear();
        }
        let id = self.unique();
        ids.insert(key.into(), id);
        id
    }

    /// An id no other statement has or will have (never [`NO_STATEMENT`]).
    pub fn unique(&self) -> StatementId {
        self.next.fetch_add(1, Ordering::Relaxed) + 1
    }
}

/// The statements one server connection has prepared under pgvigil's names, with when each was
/// last used.
#[derive(Debug, Default)]
pub struct ServerStatements {
    /// Hashed with foldhash: pgvigil gives out the ids, so none are chosen to collide.
    used: HashMap<StatementId, u64, foldhash::fast::FixedState>,
    clock: u64,
    /// Statements the connection may have, to close before anything is prepared on it (a Parse
    /// whose outcome could not be followed).
    doubtful: Vec<StatementId>,
    /// A Parse of the unnamed statement was sent since the last simple Query (which drops it,
    /// as does the next such Parse: PostgreSQL docs, "Extended Query").
    unnamed: bool,
    /// Which session's unnamed statement the connection has, by the id that session gave it
    /// when its Parse succeeded ([`NO_STATEMENT`]: none known to be anyone's).
    unnamed_of: StatementId,
}

impl ServerStatements {
    /// Whether the connection has statement `id`.
    pub fn has(&self, id: StatementId) -> bool {
        self.used.contains_key(&id)
    }

    /// The connection prepared statement `id`, or used it now.
    pub fn touch(&mut self, id: StatementId) {
        self.clock += 1;
        self.used.insert(id, self.clock);
    }

    /// The connection no longer has statement `id`.
    pub fn forget(&mut self, id: StatementId) {
        self.used.remove(&id);
    }

    /// The connection may or may not have statement `id`: it is closed before the next Parse.
    pub fn doubt(&mut self, id: StatementId) {
        self.used.remove(&id);
        self.doubtful.push(id);
    }

    /// The connection dropped every prepared statement (`DISCARD ALL`, `DEALLOCATE ALL`).
    pub fn clear(&mut self) {
        self.used.clear();
        self.doubtful.clear();
    }

    /// A Parse of the unnamed statement went to the connection (`true`), or a simple Query that
    /// dropped it ran there (`false`).
    pub fn set_unnamed(&mut self, parsed: bool) {
        self.unnamed = parsed;
        // Whose it is is known only once its Parse succeeded (see `set_unnamed_of`).
        self.unnamed_of = NO_STATEMENT;
    }

    /// The connection has the unnamed statement a session knows as `id` (its Parse succeeded
    /// there).
    pub fn set_unnamed_of(&mut self, id: StatementId) {
        self.unnamed = true;
        self.unnamed_of = id;
    }

    /// Another session takes the connection: it may drop the unnamed statement there with a
    /// simple Query, which is not scanned for that, so whose it is is no longer known.
    pub fn lent(&mut self) {
        self.unnamed_of = NO_STATEMENT;
    }

    /// The id of the session's unnamed statement the connection has, [`NO_STATEMENT`] when
    /// none is known.
    pub fn unnamed_of(&self) -> StatementId {
        self.unnamed_of
    }

    /// Whether the connection may have an unnamed statement.
    pub fn has_unnamed(&self) -> bool {
        self.unnamed
    }

    /// Whether nothing must be closed on the connection before more is prepared there: no
    /// doubtful statement, and at most `max` statements.
    pub fn within(&self, max: usize) -> bool {
        self.doubtful.is_empty() && self.used.len() <= max
    }

    /// How many statements the connection has.
    pub fn len(&self) -> usize {
        self.used.len()
    }

    /// Whether the connection has none.
    pub fn is_empty(&self) -> bool {
        self.used.is_empty()
    }

    /// Takes the statements to close so that at most `keep` remain, the least recently used
    /// first, never one of `needed`, plus the doubtful ones; they count as closed.
    pub fn take_excess(&mut self, keep: usize, needed: &[StatementId]) -> Vec<StatementId> {
        let mut close = std::mem::take(&mut self.doubtful);
        let excess = self.used.len().saturating_sub(keep);
        if excess > 0 {
            let mut by_age: Vec<(u64, StatementId)> = self
                .used
                .iter()
                .filter(|(id, _)| !needed.contains(id))
                .map(|(&id, &stamp)| (stamp, id))
                .collect();
            by_age.sort_unstable();
            for (_, id) in by_age.into_iter().take(excess) {
                self.used.remove(&id);
                close.push(id);
            }
        }
        close
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_key_same_id_and_unique_ids_are_new() {
        let registry = Registry::default();
        let a = registry.id_for(b"select 1");
        assert_eq!(registry.id_for(b"select 1"), a);
        let b = registry.id_for(b"select 2");
        assert_ne!(a, b);
        let u = registry.unique();
        assert!(u != a && u != b && u != NO_STATEMENT);
    }

    #[test]
    fn names_and_their_lengths() {
        for id in [0, 7, 10, 99, 12345, u64::MAX] {
            let mut out = BytesMut::new();
            put_name(&mut out, id);
            assert_eq!(out.as_ref(), format!("pgv_{id}").as_bytes());
            assert_eq!(name_len(id), out.len());
        }
    }

    #[test]
    fn the_least_recently_used_go_first_never_the_needed_ones() {
        let mut server = ServerStatements::default();
        for id in 1..=5 {
            server.touch(id);
        }
        server.touch(1);
        server.doubt(9);
        let closed = server.take_excess(3, &[2]);
        assert_eq!(closed, vec![9, 3, 4]);
        assert!(server.has(1) && server.has(2) && server.has(5));
        assert_eq!(server.len(), 3);
        assert!(server.take_excess(3, &[]).is_empty());
    }
}
