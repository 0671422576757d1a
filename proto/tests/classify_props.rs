//! Property tests for the SQL classifier: no input makes it panic or loop, no read-only verdict
//! survives an appended write, and classifying allocates nothing.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use pgvigil_proto::classify::{classify, FunctionLists};
use proptest::prelude::*;

include!("../src/classify/verdict_cases.rs");

/// Counts the allocations made by the current thread, so that parallel tests do not interfere.
struct CountingAllocator;

thread_local! {
    static ALLOCATIONS: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: every call is forwarded unchanged to the system allocator.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

fn lists() -> FunctionLists {
    FunctionLists::new(["audit_log", "app.bump"], ["my_read", "app.fetch"])
}

/// The write appended after any read; the newline ends a trailing `--` comment first.
const APPENDED_WRITE: &[u8] = b"\n; INSERT INTO t VALUES (1)";

/// If `sql` is read-only, it must stop being so with a write appended.
fn check_appended_write(sql: &[u8], lists: &FunctionLists) -> Result<(), TestCaseError> {
    if classify(sql, lists).read_only {
        let mut longer = sql.to_vec();
        longer.extend_from_slice(APPENDED_WRITE);
        let after = classify(&longer, lists);
        prop_assert!(
            !after.read_only,
            "{:?} stayed read-only: {:?}",
            String::from_utf8_lossy(&longer),
            after
        );
    }
    Ok(())
}

/// Bytes that steer random input into comments, literals and keywords.
fn sql_byte() -> impl Strategy<Value = u8> {
    prop_oneof![
        any::<u8>(),
        proptest::sample::select(b"'\"$;()/*-\\eEuU&\n .,0123abcdef".to_vec()),
    ]
}

/// Whole words and delimiters, so random text reaches the keyword state machine.
fn sql_fragment() -> impl Strategy<Value = &'static str> {
    proptest::sample::select(vec![
        "SELECT ",
        "INSERT ",
        "WITH ",
        "EXPLAIN ",
        "ANALYZE ",
        "COPY ",
        "TO ",
        "STDOUT ",
        "(",
        ")",
        ";",
        "'",
        "E'",
        "\\",
        "$$",
        "$a$",
        "/*",
        "*/",
        "--",
        "\n",
        "\"",
        "nextval(",
        "f(",
        "AS ",
        "BEGIN ",
        "ATOMIC ",
        "END ",
        "CASE ",
        "SET ",
        "FOR ",
        "UPDATE ",
        "INTO ",
        "TEMP ",
        ",",
        ".",
        "pg_catalog",
        "x",
        "1",
    ])
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn random_bytes_never_panic_and_appended_writes_count(
        sql in proptest::collection::vec(sql_byte(), 0..256),
    ) {
        check_appended_write(&sql, &lists())?;
    }

    #[test]
    fn random_fragments_never_panic_and_appended_writes_count(
        parts in proptest::collection::vec(sql_fragment(), 0..40),
    ) {
        check_appended_write(parts.concat().as_bytes(), &lists())?;
    }

    #[test]
    fn mutated_table_statements_never_panic_and_appended_writes_count(
        index in any::<proptest::sample::Index>(),
        edits in proptest::collection::vec((any::<proptest::sample::Index>(), sql_byte()), 1..6),
        keep in any::<proptest::sample::Index>(),
    ) {
        let (sql, _, _) = VERDICTS[index.index(VERDICTS.len())];
        let mut bytes = sql.as_bytes().to_vec();
        if !bytes.is_empty() {
            for (at, byte) in &edits {
                let at = at.index(bytes.len());
                bytes[at] = *byte;
            }
            bytes.truncate(keep.index(bytes.len() + 1));
        }
        check_appended_write(&bytes, &lists())?;
    }
}

#[test]
fn every_read_only_table_statement_turns_into_a_write_when_one_is_appended() {
    let lists = lists();
    for &(sql, read_only, why) in VERDICTS {
        if read_only {
            let mut longer = sql.as_bytes().to_vec();
            longer.extend_from_slice(APPENDED_WRITE);
            assert!(!classify(&longer, &lists).read_only, "{why}: {sql:?}");
        }
    }
}

#[test]
fn classifying_allocates_nothing() {
    let lists = lists();
    let probe_before = ALLOCATIONS.with(Cell::get);
    let probe = std::hint::black_box(Vec::<u8>::with_capacity(8));
    assert!(
        ALLOCATIONS.with(Cell::get) > probe_before,
        "the counter sees allocations"
    );
    drop(probe);
    for &(sql, _, why) in VERDICTS {
        let before = ALLOCATIONS.with(Cell::get);
        let verdict = classify(sql.as_bytes(), &lists);
        let after = ALLOCATIONS.with(Cell::get);
        assert_eq!(before, after, "{why}: {sql:?} allocated ({verdict:?})");
    }
}
