//! The classifier as sessions use it: the function lists in force, and a memo per thread of its
//! answers for statement texts that come again.
//!
//! A Parse's text is usually the same at every execution (its values travel in the Bind), and
//! most drivers parse the unnamed statement again before each one: its text is looked up in the
//! memo first. A Query's text usually carries its values and is seldom sent twice, so it is
//! looked up only when the one-pass fast path cannot answer (a literal, a parenthesis, a quoted
//! identifier: the full lexer would run, at about 30 instructions per byte). An answer depends
//! only on the text and the function lists, so each memo entry records which lists it was made
//! with and a reload's new lists match none of the old entries.

use std::cell::RefCell;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use pgvigil_proto::classify::{classify_fast, classify_full, Classification, FunctionLists};

/// Texts longer than this are classified at every use, never remembered: with [`SETS`] x
/// [`WAYS`] entries a thread's memo holds at most 512 KiB of text.
const TEXT_MAX: usize = 2048;
/// Sets of the memo; a text's hash picks its set.
const SETS: usize = 64;
/// Entries per set; a new text replaces the set's least recently used one.
const WAYS: usize = 4;

/// The last id given to a set of function lists; ids are unique across the process, so two
/// proxies in one process (the tests run several) never share memo entries.
static LAST_LISTS_ID: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// The answers remembered on this thread (each data-plane thread runs its own sessions).
    static MEMO: RefCell<Memo> = RefCell::new(Memo::default());
}

/// The classifier's function lists (built-in plus `routing.read_functions`/`write_functions`),
/// swapped by a reload, and the way to the memo.
pub struct Classifier {
    functions: ArcSwap<FunctionLists>,
    /// The id of the lists in `functions`: memo entries made with other lists are stale.
    lists_id: AtomicU64,
}

impl Classifier {
    /// A classifier with `lists`.
    pub fn new(lists: FunctionLists) -> Classifier {
        Classifier {
            functions: ArcSwap::from_pointee(lists),
            lists_id: AtomicU64::new(next_lists_id()),
        }
    }

    /// Puts `lists` in force (a reload): no answer made with the old lists is given again.
    pub fn replace(&self, lists: FunctionLists) {
        self.functions.store(Arc::new(lists));
        // After the store: a reader that sees the new id also sees the new lists.
        self.lists_id.store(next_lists_id(), Ordering::Release);
    }

    /// The classification of a Query's text (see
    /// [`classify`](pgvigil_proto::classify::classify)).
    pub fn query(&self, sql: &[u8]) -> Classification {
        classify_fast(sql).unwrap_or_else(|| self.remembered(sql, |sql| self.full(sql)))
    }

    /// The classification of a Parse's statement text.
    pub fn parse(&self, sql: &[u8]) -> Classification {
        self.remembered(sql, |sql| {
            classify_fast(sql).unwrap_or_else(|| self.full(sql))
        })
    }

    /// The full path, reading the function lists (each read costs an atomic dance, so only
    /// here).
    fn full(&self, sql: &[u8]) -> Classification {
        classify_full(sql, &self.functions.load())
    }

    /// The memo's answer for `sql`, or `compute`'s, then remembered.
    fn remembered(
        &self,
        sql: &[u8],
        compute: impl FnOnce(&[u8]) -> Classification,
    ) -> Classification {
        if sql.len() > TEXT_MAX {
            return compute(sql);
        }
        // Read before `compute` reads the lists, which are then at least as new as this id:
        // no entry holds an answer made with lists older than its id's.
        let lists = self.lists_id.load(Ordering::Acquire);
        let looked = MEMO.with(|memo| {
            let mut memo = memo.try_borrow_mut().ok()?;
            let hash = memo.hasher.hash_one(sql);
            Some(memo.get(lists, hash, sql).ok_or(hash))
        });
        match looked {
            Some(Ok(class)) => class,
            Some(Err(hash)) => {
                let class = compute(sql);
                MEMO.with(|memo| {
                    if let Ok(mut memo) = memo.try_borrow_mut() {
                        memo.put(lists, hash, sql, class);
                    }
                });
                class
            }
            // Not reached: nothing classifies while the memo is borrowed.
            None => compute(sql),
        }
    }
}

/// A new id for a set of function lists (never 0, which marks an empty entry).
fn next_lists_id() -> u64 {
    LAST_LISTS_ID.fetch_add(1, Ordering::Relaxed) + 1
}

/// One thread's remembered answers: [`SETS`] sets of [`WAYS`] entries, allocated at the first
/// answer remembered.
#[derive(Default)]
struct Memo {
    sets: Vec<[Entry; WAYS]>,
    /// Counts the answers made and found: an entry's `used` is the count at its last one.
    tick: u64,
    /// Seeded at random per thread, so that no client can choose texts that share a set.
    hasher: foldhash::fast::RandomState,
}

/// A remembered answer.
struct Entry {
    /// The id of the function lists it was made with; 0 while the entry is empty.
    lists: u64,
    hash: u64,
    /// When it was last made or found (see [`Memo::tick`]).
    used: u64,
    text: Vec<u8>,
    class: Classification,
}

impl Entry {
    const EMPTY: Entry = Entry {
        lists: 0,
        hash: 0,
        used: 0,
        text: Vec::new(),
        class: Classification::ONE_WRITE,
    };
}

/// The set of a text's hash (its top bits: the low ones pick nothing else).
fn set_of(hash: u64) -> usize {
    (hash >> (u64::BITS - SETS.trailing_zeros())) as usize
}

impl Memo {
    /// The answer remembered for `sql` with the lists `lists`.
    fn get(&mut self, lists: u64, hash: u64, sql: &[u8]) -> Option<Classification> {
        let set = self.sets.get_mut(set_of(hash))?;
        let entry = set
            .iter_mut()
            .find(|e| e.hash == hash && e.lists == lists && e.text == sql)?;
        self.tick += 1;
        entry.used = self.tick;
        Some(entry.class)
    }

    /// Remembers `class` as the answer for `sql` with the lists `lists`, in place of an entry
    /// made with other lists (or empty), else of the set's least recently used one.
    fn put(&mut self, lists: u64, hash: u64, sql: &[u8], class: Classification) {
        if self.sets.is_empty() {
            self.sets = (0..SETS).map(|_| [const { Entry::EMPTY }; WAYS]).collect();
        }
        self.tick += 1;
        let Some(set) = self.sets.get_mut(set_of(hash)) else {
            return;
        };
        let Some(entry) = set
            .iter_mut()
            .min_by_key(|e| if e.lists == lists { e.used } else { 0 })
        else {
            return;
        };
        entry.lists = lists;
        entry.hash = hash;
        entry.used = self.tick;
        if entry.text.capacity() < sql.len() {
            // Exactly its length: no entry's copy grows past TEXT_MAX.
            entry.text = sql.to_vec();
        } else {
            entry.text.clear();
            entry.text.extend_from_slice(sql);
        }
        entry.class = class;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pgvigil_proto::classify::classify;

    /// Whether this thread's memo holds `sql` for `classifier`'s lists.
    fn remembered(classifier: &Classifier, sql: &str) -> bool {
        let lists = classifier.lists_id.load(Ordering::Acquire);
        MEMO.with(|memo| {
            let mut memo = memo.borrow_mut();
            let hash = memo.hasher.hash_one(sql.as_bytes());
            memo.get(lists, hash, sql.as_bytes()).is_some()
        })
    }

    /// Texts that the fast path answers and texts it leaves to the full path.
    const TEXTS: [&str; 8] = [
        "SELECT abalance FROM pgbench_accounts WHERE aid = $1",
        "UPDATE t SET a = a + 1 WHERE id = $1",
        "BEGIN",
        r#"SELECT "users".* FROM "users" WHERE "users"."id" = $1 LIMIT $2"#,
        "SELECT nextval('s')",
        "SET search_path = app",
        "SELECT pg_advisory_lock($1)",
        "SELECT my_read($1), audit_log()",
    ];

    #[test]
    fn answers_are_the_classifiers_whether_made_or_remembered() {
        let lists = || FunctionLists::new(["audit_log"], ["my_read"]);
        let classifier = Classifier::new(lists());
        for _ in 0..3 {
            for sql in TEXTS {
                let expected = classify(sql.as_bytes(), &lists());
                assert_eq!(classifier.parse(sql.as_bytes()), expected, "{sql}");
                assert_eq!(classifier.query(sql.as_bytes()), expected, "{sql}");
            }
        }
    }

    #[test]
    fn a_parse_is_remembered_a_plain_query_and_a_long_text_are_not() {
        let classifier = Classifier::new(FunctionLists::default());
        let plain = "SELECT a FROM t WHERE id = 1";
        let quoted = r#"SELECT "a" FROM t WHERE id = 1"#;
        let parsed = "SELECT a FROM t WHERE id = $1";
        classifier.query(plain.as_bytes());
        classifier.query(quoted.as_bytes());
        classifier.parse(parsed.as_bytes());
        assert!(!remembered(&classifier, plain), "the fast path answers it");
        assert!(remembered(&classifier, quoted), "the full path ran");
        assert!(remembered(&classifier, parsed));
        let long = format!("SELECT a FROM t WHERE id = $1 {}", " ".repeat(TEXT_MAX));
        classifier.parse(long.as_bytes());
        assert!(!remembered(&classifier, &long));
    }

    #[test]
    fn new_lists_match_no_old_answer_and_two_classifiers_share_none() {
        let sql = "SELECT my_read($1)";
        let classifier = Classifier::new(FunctionLists::default());
        assert!(
            !classifier.parse(sql.as_bytes()).read_only,
            "unknown: may write"
        );
        let other = Classifier::new(FunctionLists::new(["x"], ["my_read"]));
        assert!(
            other.parse(sql.as_bytes()).read_only,
            "another proxy's lists"
        );
        assert!(!classifier.parse(sql.as_bytes()).read_only);
        classifier.replace(FunctionLists::new(["x"], ["my_read"]));
        assert!(!remembered(&classifier, sql));
        assert!(
            classifier.parse(sql.as_bytes()).read_only,
            "a reload's lists"
        );
    }

    #[test]
    fn a_full_set_gives_up_its_least_recently_used_text() {
        let classifier = Classifier::new(FunctionLists::default());
        // Texts that share a set under this thread's seed.
        let set = |sql: &String| MEMO.with(|m| set_of(m.borrow().hasher.hash_one(sql.as_bytes())));
        let texts: Vec<String> = (0..)
            .map(|i| format!("SELECT a FROM t{i} WHERE id = $1"))
            .filter(|sql| set(sql) == 0)
            .take(WAYS + 1)
            .collect();
        for sql in &texts[..WAYS] {
            classifier.parse(sql.as_bytes());
        }
        // The first is found again (used last), so the second is the one to go.
        classifier.parse(texts[0].as_bytes());
        classifier.parse(texts[WAYS].as_bytes());
        assert!(remembered(&classifier, &texts[0]));
        assert!(!remembered(&classifier, &texts[1]));
        for sql in &texts[2..] {
            assert!(remembered(&classifier, sql), "{sql}");
        }
    }
}
