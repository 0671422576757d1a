//! Table-driven cases: each names the SQL, the expected answer and why.

use super::*;

/// The user lists every case runs with.
fn lists() -> FunctionLists {
    FunctionLists::new(["audit_log", "app.bump"], ["my_read", "app.fetch"])
}

include!("verdict_cases.rs");

/// An expectation about one field of the classification.
#[derive(Debug)]
enum Expect {
    Tx(Option<TxControl>),
    Pin(Option<Pin>),
    Session(bool, Option<bool>),
    Local(bool),
    Hint(Option<Hint>),
    Reason(Option<Reason>),
    Statements(usize),
    SetConfig(bool),
}

const fn begin(read_only: Option<bool>) -> Expect {
    Expect::Tx(Some(TxControl::Begin { read_only }))
}

const fn tx(control: TxControl) -> Expect {
    Expect::Tx(Some(control))
}

const fn pin(pin: Pin) -> Expect {
    Expect::Pin(Some(pin))
}

/// `(sql, expectation, why)`.
const FLAGS: &[(&str, Expect, &str)] = &[
    (
        "BEGIN",
        begin(None),
        "plain BEGIN: the session default applies",
    ),
    ("BEGIN READ ONLY", begin(Some(true)), "BEGIN READ ONLY"),
    (
        "BEGIN ISOLATION LEVEL SERIALIZABLE",
        begin(Some(false)),
        "serializable never on a standby",
    ),
    (
        "begin transaction read only, isolation level repeatable read",
        begin(Some(true)),
        "modes",
    ),
    (
        "START TRANSACTION READ WRITE",
        begin(Some(false)),
        "START ... READ WRITE",
    ),
    (
        "BEGIN READ ONLY ISOLATION LEVEL SERIALIZABLE",
        begin(Some(false)),
        "serializable",
    ),
    ("COMMIT", tx(TxControl::Commit), "COMMIT"),
    ("END WORK", tx(TxControl::Commit), "END WORK"),
    ("COMMIT AND CHAIN", tx(TxControl::Commit), "AND CHAIN"),
    ("ROLLBACK", tx(TxControl::Rollback), "ROLLBACK"),
    ("ABORT TRANSACTION", tx(TxControl::Rollback), "ABORT"),
    ("SAVEPOINT a", tx(TxControl::Savepoint), "SAVEPOINT"),
    (
        "RELEASE a",
        tx(TxControl::Release),
        "RELEASE without SAVEPOINT",
    ),
    (
        "ROLLBACK WORK TO a",
        tx(TxControl::RollbackToSavepoint),
        "ROLLBACK TO",
    ),
    (
        "PREPARE TRANSACTION 'g'",
        tx(TxControl::PrepareTransaction),
        "PREPARE TRANSACTION",
    ),
    (
        "COMMIT PREPARED 'g'",
        tx(TxControl::CommitPrepared),
        "COMMIT PREPARED",
    ),
    (
        "ROLLBACK PREPARED 'g'",
        tx(TxControl::RollbackPrepared),
        "ROLLBACK PREPARED",
    ),
    (
        "BEGIN; SELECT 1; COMMIT",
        tx(TxControl::Commit),
        "the last one counts",
    ),
    ("SELECT 1", Expect::Tx(None), "no transaction control"),
    ("EXPLAIN ANALYZE SELECT 1", Expect::Tx(None), "EXPLAIN"),
    (
        "CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1; END",
        Expect::Tx(None),
        "END of an atomic body is no COMMIT",
    ),
    ("CREATE TEMP TABLE x (a int)", pin(Pin::TempTable), "TEMP"),
    (
        "CREATE TEMPORARY TABLE x AS SELECT 1",
        pin(Pin::TempTable),
        "TEMPORARY",
    ),
    (
        "CREATE GLOBAL TEMPORARY TABLE x (a int)",
        pin(Pin::TempTable),
        "GLOBAL TEMPORARY",
    ),
    (
        "create local temp table x ()",
        pin(Pin::TempTable),
        "LOCAL TEMP",
    ),
    (
        "CREATE OR REPLACE TEMP VIEW v AS SELECT 1",
        pin(Pin::TempTable),
        "temporary view",
    ),
    (
        "CREATE TEMP SEQUENCE s",
        pin(Pin::TempTable),
        "temporary sequence",
    ),
    (
        "SELECT * INTO TEMP x FROM t",
        pin(Pin::TempTable),
        "SELECT INTO TEMP",
    ),
    (
        "CREATE TABLE t (temp int)",
        Expect::Pin(None),
        "column named temp",
    ),
    (
        "CREATE TABLE temp_stuff (a int)",
        Expect::Pin(None),
        "table named temp_stuff",
    ),
    (
        "PREPARE p (int) AS SELECT $1",
        pin(Pin::Prepare),
        "PREPARE with types",
    ),
    (
        "prepare p as select 1",
        pin(Pin::Prepare),
        "lower-case PREPARE",
    ),
    (
        "SELECT pg_advisory_lock(1)",
        pin(Pin::AdvisoryLock),
        "session advisory lock",
    ),
    (
        "SELECT pg_try_advisory_lock_shared(1)",
        pin(Pin::AdvisoryLock),
        "try, shared",
    ),
    (
        "SELECT pg_advisory_xact_lock(1)",
        Expect::Pin(None),
        "transaction lock ends with it",
    ),
    ("LISTEN ch", pin(Pin::Listen), "LISTEN"),
    (
        "UNLISTEN *",
        Expect::Pin(None),
        "UNLISTEN leaves nothing to keep",
    ),
    (
        "EXPLAIN CREATE TEMP TABLE x AS SELECT 1",
        Expect::Pin(None),
        "plain EXPLAIN runs nothing",
    ),
    (
        "EXPLAIN ANALYZE CREATE TEMP TABLE x AS SELECT 1",
        pin(Pin::TempTable),
        "ANALYZE runs it",
    ),
    (
        "SELECT 1; LISTEN a; PREPARE p AS SELECT 1",
        pin(Pin::Listen),
        "the first pin counts",
    ),
    ("NOTIFY ch", Expect::Pin(None), "NOTIFY does not pin"),
    (
        "WITH a(x) AS (SELECT 1), l AS (SELECT pg_advisory_lock(1)) SELECT 1",
        pin(Pin::AdvisoryLock),
        "lock inside a CTE",
    ),
    ("SET search_path = app", Expect::Session(true, None), "SET"),
    (
        "SET SESSION search_path TO app",
        Expect::Session(true, None),
        "SET SESSION",
    ),
    (
        "set time zone 'UTC'",
        Expect::Session(true, None),
        "SET TIME ZONE",
    ),
    ("SET ROLE bob", Expect::Session(true, None), "SET ROLE"),
    (
        "SET SESSION AUTHORIZATION bob",
        Expect::Session(true, None),
        "SET SESSION AUTHORIZATION",
    ),
    ("RESET search_path", Expect::Session(true, None), "RESET"),
    ("RESET ALL", Expect::Session(true, Some(false)), "RESET ALL"),
    (
        "DISCARD ALL",
        Expect::Session(true, Some(false)),
        "DISCARD ALL",
    ),
    (
        "SET LOCAL search_path = app",
        Expect::Session(false, None),
        "SET LOCAL",
    ),
    (
        "SET LOCAL search_path = app",
        Expect::Local(true),
        "SET LOCAL",
    ),
    (
        "SELECT 1; set local work_mem to default",
        Expect::Local(true),
        "SET LOCAL in a string",
    ),
    ("SET search_path = app", Expect::Local(false), "SET"),
    (
        "SET CONSTRAINTS ALL DEFERRED",
        Expect::Local(false),
        "SET CONSTRAINTS",
    ),
    (
        "SET TRANSACTION READ ONLY",
        Expect::Session(false, None),
        "SET TRANSACTION",
    ),
    (
        "SET CONSTRAINTS ALL DEFERRED",
        Expect::Session(false, None),
        "SET CONSTRAINTS",
    ),
    (
        "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",
        Expect::Session(true, Some(true)),
        "session characteristics read only",
    ),
    (
        "set session characteristics as transaction read write",
        Expect::Session(true, Some(false)),
        "session characteristics read write",
    ),
    (
        "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE, READ ONLY",
        Expect::Session(true, Some(false)),
        "serializable default cannot run on a standby",
    ),
    (
        "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL REPEATABLE READ",
        Expect::Session(true, None),
        "isolation only",
    ),
    (
        "SET default_transaction_read_only = on",
        Expect::Session(true, Some(true)),
        "GUC on",
    ),
    (
        "SET default_transaction_read_only TO 'on'",
        Expect::Session(true, Some(true)),
        "quoted",
    ),
    (
        "SET default_transaction_read_only = off",
        Expect::Session(true, Some(false)),
        "GUC off",
    ),
    (
        "SET default_transaction_read_only = 1",
        Expect::Session(true, Some(true)),
        "GUC 1",
    ),
    (
        "SET default_transaction_read_only TO DEFAULT",
        Expect::Session(true, Some(false)),
        "DEFAULT",
    ),
    (
        "RESET default_transaction_read_only",
        Expect::Session(true, Some(false)),
        "RESET GUC",
    ),
    (
        "SELECT 1",
        Expect::Session(false, None),
        "no session change",
    ),
    (
        "SET a.b = 1; SELECT 1",
        Expect::Session(true, None),
        "SET in a batch",
    ),
    ("SHOW search_path", Expect::Session(false, None), "SHOW"),
    (
        "/* pgvigil:primary */ SELECT 1",
        Expect::Hint(Some(Hint::Primary)),
        "primary hint",
    ),
    (
        "  /*pgvigil:replica*/ SELECT my_func()",
        Expect::Hint(Some(Hint::Replica)),
        "replica",
    ),
    (
        "/* PGVIGIL:REPLICA */SELECT 1",
        Expect::Hint(Some(Hint::Replica)),
        "case",
    ),
    (
        "-- note\n/* pgvigil:primary */ SELECT 1",
        Expect::Hint(Some(Hint::Primary)),
        "after --",
    ),
    (
        "/* other */ /* pgvigil:replica */ SELECT 1",
        Expect::Hint(Some(Hint::Replica)),
        "second",
    ),
    (
        "SELECT 1 /* pgvigil:primary */",
        Expect::Hint(None),
        "not leading",
    ),
    ("/* pgvigil:primary", Expect::Hint(None), "unterminated"),
    (
        "/* pgvigil:replicas */ SELECT 1",
        Expect::Hint(None),
        "not exactly the hint",
    ),
    (
        "INSERT INTO t VALUES (1)",
        Expect::Reason(Some(Reason::Statement)),
        "statement",
    ),
    (
        "WITH d AS (DELETE FROM t) SELECT 1",
        Expect::Reason(Some(Reason::DataModifying)),
        "CTE",
    ),
    (
        "SELECT * INTO x FROM t",
        Expect::Reason(Some(Reason::SelectInto)),
        "INTO",
    ),
    (
        "SELECT * FROM t FOR UPDATE",
        Expect::Reason(Some(Reason::RowLock)),
        "row lock",
    ),
    (
        "SELECT nextval('s')",
        Expect::Reason(Some(Reason::WriteFunction)),
        "write function",
    ),
    (
        "SELECT f()",
        Expect::Reason(Some(Reason::UnknownFunction)),
        "unknown function",
    ),
    (
        "SELECT 'abc",
        Expect::Reason(Some(Reason::Unterminated)),
        "unterminated",
    ),
    (
        "SELECT 'a\\b'",
        Expect::Reason(Some(Reason::AmbiguousBackslash)),
        "backslash",
    ),
    (
        "SELECT 1; SELECT f(); DELETE",
        Expect::Reason(Some(Reason::UnknownFunction)),
        "first",
    ),
    ("SELECT 1", Expect::Reason(None), "read-only has no reason"),
    (
        "SELECT 1; SELECT 2;",
        Expect::Statements(2),
        "two statements",
    ),
    (";;", Expect::Statements(0), "empty statements do not count"),
    ("", Expect::Statements(0), "empty string"),
    (
        "CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1; \
         SELECT CASE WHEN true THEN 1 END; END; SELECT 1",
        Expect::Statements(2),
        "semicolons inside BEGIN ATOMIC",
    ),
    (
        "SELECT f(1)",
        pin(Pin::UnknownFunction),
        "a read's call of a function on no list",
    ),
    (
        "SELECT lower(a), my_read(b), app.fetch(c) FROM t",
        Expect::Pin(None),
        "built-in and listed reads",
    ),
    (
        "INSERT INTO t VALUES (f(1))",
        pin(Pin::UnknownFunction),
        "a call in VALUES",
    ),
    (
        "insert into t (a, b) values (1, now())",
        Expect::Pin(None),
        "the column list is no call",
    ),
    (
        "INSERT INTO s.t (a) SELECT g(x) FROM u",
        pin(Pin::UnknownFunction),
        "a call in INSERT's query",
    ),
    (
        "INSERT INTO public.t AS x (a) VALUES (1)",
        Expect::Pin(None),
        "column list after an alias",
    ),
    (
        "INSERT INTO \"T\" (\"a\") VALUES (1)",
        Expect::Pin(None),
        "quoted table and column names",
    ),
    (
        "INSERT INTO t (a) VALUES (1) ON CONFLICT (a) DO UPDATE SET a = excluded.a",
        Expect::Pin(None),
        "the conflict target is no call",
    ),
    (
        "INSERT INTO t (a) VALUES (1) ON CONFLICT (a) DO UPDATE SET a = f(excluded.a)",
        pin(Pin::UnknownFunction),
        "a call in the conflict action",
    ),
    (
        "INSERT INTO t SELECT a FROM u JOIN v ON conflict(u.a)",
        Expect::Pin(None),
        "a write's `ON conflict(`, read as the conflict target (known miss: only the pin is lost, the statement writes anyway)",
    ),
    (
        "SELECT a FROM u JOIN v ON conflict(u.a)",
        pin(Pin::UnknownFunction),
        "a read's `ON conflict(` is a call",
    ),
    (
        "INSERT INTO t WITH c(a) AS (SELECT 1) SELECT a FROM c",
        Expect::Pin(None),
        "a CTE column list inside INSERT",
    ),
    (
        "UPDATE t SET (a, b) = (1, 2) WHERE c IN (1, 2)",
        Expect::Pin(None),
        "grouping and lists",
    ),
    (
        "UPDATE t SET a = my_fn(b)",
        pin(Pin::UnknownFunction),
        "a call in SET",
    ),
    (
        "UPDATE t SET a = audit_log(b), c = app.bump(c)",
        Expect::Pin(None),
        "the user's write list is known",
    ),
    (
        "UPDATE t SET a = nextval('s'), b = lower(c)",
        Expect::Pin(None),
        "built-in write and read",
    ),
    (
        "DELETE FROM t WHERE id IN (SELECT f(x) FROM u)",
        pin(Pin::UnknownFunction),
        "a call in a subquery of DELETE",
    ),
    (
        "DELETE FROM t USING u AS v(a) WHERE t.a = v.a",
        Expect::Pin(None),
        "an alias column list",
    ),
    (
        "MERGE INTO t USING s ON t.a = s.a WHEN NOT MATCHED THEN INSERT (a) VALUES (s.a)",
        Expect::Pin(None),
        "MERGE's INSERT column list",
    ),
    (
        "MERGE INTO t USING s ON t.a = s.a WHEN MATCHED THEN UPDATE SET a = f(s.a)",
        pin(Pin::UnknownFunction),
        "a call in MERGE",
    ),
    (
        "WITH x AS (SELECT 1) INSERT INTO t (a) SELECT * FROM x",
        Expect::Pin(None),
        "INSERT after a CTE",
    ),
    (
        "WITH x AS (INSERT INTO t (a) VALUES (1) RETURNING a) SELECT f(a) FROM x",
        pin(Pin::UnknownFunction),
        "a call beside a data-modifying CTE",
    ),
    (
        "EXPLAIN INSERT INTO t VALUES (f(1))",
        Expect::Pin(None),
        "plain EXPLAIN runs nothing",
    ),
    (
        "EXPLAIN ANALYZE INSERT INTO t VALUES (f(1))",
        pin(Pin::UnknownFunction),
        "EXPLAIN ANALYZE runs it",
    ),
    (
        "CREATE INDEX ON t (f(a))",
        Expect::Pin(None),
        "DDL is not read for calls",
    ),
    (
        "CREATE TABLE t AS SELECT (x).f(1) FROM u",
        Expect::Pin(None),
        "DDL is not read for calls, odd ones included",
    ),
    (
        "UPDATE t SET a = pg_advisory_lock(1)",
        pin(Pin::AdvisoryLock),
        "a session lock in a write",
    ),
    (
        "INSERT INTO users (id, pw) VALUES (uuid_generate_v4(), crypt($1, gen_salt('bf')))",
        Expect::Pin(None),
        "uuid-ossp and pgcrypto functions are known reads",
    ),
    (
        "/* pgvigil:replica */ SELECT f(1)",
        Expect::Pin(None),
        "the hint vouches for the call",
    ),
    ("DO $$ BEGIN END $$", pin(Pin::Do), "DO"),
    ("/* c */ -- x\n call p()", pin(Pin::Call), "CALL after comments"),
    ("LOAD 'auto_explain'", pin(Pin::Load), "LOAD"),
    ("SELECT 1; do $$ $$", pin(Pin::Do), "DO after another statement"),
    ("SELECT 'DO $$ $$; CALL p()'", Expect::Pin(None), "DO and CALL in a literal"),
    (
        "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
        pin(Pin::HoldCursor),
        "WITH HOLD cursor",
    ),
    (
        "BEGIN; DECLARE c NO SCROLL CURSOR WITH HOLD FOR SELECT 1; COMMIT",
        pin(Pin::HoldCursor),
        "WITH HOLD cursor in a transaction block",
    ),
    (
        "DECLARE c CURSOR WITHOUT HOLD FOR SELECT 1",
        Expect::Pin(None),
        "WITHOUT HOLD",
    ),
    (
        "DECLARE c CURSOR FOR WITH hold AS (SELECT 1) SELECT * FROM hold",
        Expect::Pin(None),
        "a CTE named hold",
    ),
    ("DOMAIN", Expect::Pin(None), "a word that starts like DO"),
    (
        "SELECT set_config('a', 'b', false)",
        Expect::SetConfig(true),
        "set_config",
    ),
    (
        "CREATE TABLE t AS SELECT myschema.SET_CONFIG('a', 'b', false)",
        Expect::SetConfig(true),
        "set_config in DDL and any schema",
    ),
    (
        "SELECT 'set_config(1)'",
        Expect::SetConfig(false),
        "set_config in a literal",
    ),
    (
        "EXPLAIN SELECT set_config('a', 'b', false)",
        Expect::SetConfig(false),
        "plain EXPLAIN runs nothing",
    ),
];

#[test]
fn verdicts_table() {
    let lists = lists();
    let mut failures = Vec::new();
    for &(sql, read_only, why) in VERDICTS {
        let got = classify(sql.as_bytes(), &lists);
        if got.read_only != read_only {
            failures.push(format!(
                "{why}: {sql:?} expected read_only={read_only}, got {got:?}"
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn flags_table() {
    let lists = lists();
    let mut failures = Vec::new();
    for (sql, expect, why) in FLAGS {
        let got = classify(sql.as_bytes(), &lists);
        let ok = match *expect {
            Expect::Tx(tx) => got.tx == tx,
            Expect::Pin(pin) => got.pin == pin,
            Expect::Session(state, read_only) => {
                got.session_state == state && got.session_read_only == read_only
            }
            Expect::Local(local) => got.local_setting == local,
            Expect::Hint(hint) => got.hint == hint,
            Expect::Reason(reason) => got.reason == reason,
            Expect::Statements(n) => got.statements == n,
            Expect::SetConfig(called) => got.set_config == called,
        };
        if !ok {
            failures.push(format!("{why}: {sql:?} expected {expect:?}, got {got:?}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn tables_hold_enough_cases() {
    assert!(VERDICTS.len() + FLAGS.len() >= 150);
}

#[test]
fn non_utf8_text_is_lexed_as_bytes() {
    let lists = lists();
    let read = b"SELECT '\xff\xfe; DELETE' AS \xe9t\xe9, \"\xa4\" FROM t\xe9 -- \xff\n";
    assert!(classify(read, &lists).read_only);
    let write = b"SELECT 1; DELETE FROM \xff\xfe";
    assert!(!classify(write, &lists).read_only);
    let latin1_call = b"SELECT f\xe9(1)";
    assert_eq!(
        classify(latin1_call, &lists).reason,
        Some(Reason::UnknownFunction)
    );
}

#[test]
fn reasons_read_as_phrases() {
    assert_eq!(Reason::RowLock.to_string(), "row-locking clause");
}

#[test]
fn the_fast_path_answers_as_the_full_path_on_every_table_case() {
    let lists = lists();
    let texts = VERDICTS
        .iter()
        .map(|c| c.0)
        .chain(FLAGS.iter().map(|c| c.0));
    let mut fast_answers = 0;
    for sql in texts {
        let fast = fast::plain_select(sql.as_bytes())
            .or_else(|| fast::plain_write(sql.as_bytes()))
            .or_else(|| fast::lone_tx_word(sql.as_bytes()));
        if let Some(fast) = fast {
            fast_answers += 1;
            assert_eq!(fast, classify_full(sql.as_bytes(), &lists), "{sql:?}");
        }
    }
    assert!(fast_answers >= 5, "the tables exercise the fast path");
}

#[test]
fn writes_that_call_functions_take_the_full_path() {
    // A call may be of unknown code, which the session must know of: only grouping, VALUES and
    // IN lists and INSERT's column list pass the write fast path.
    for sql in [
        "UPDATE t SET a = my_function(1)",
        "UPDATE t SET a = lower (b)",
        "INSERT INTO t SELECT f(x) FROM u",
        "UPDATE t SET a = pg_catalog.nextval(s)",
        "insert into t (a, b) values (now(), $1)",
        "INSERT INTO t AS x (a) VALUES (1)",
        // INTO names a table only right after INSERT.
        "UPDATE into t (a)",
        "INSERT INTO t SELECT * FROM u into (1)",
    ] {
        assert_eq!(fast::plain_write(sql.as_bytes()), None, "{sql:?}");
    }
    for sql in [
        "INSERT INTO s.t (a, b) VALUES ((1 + 2), $1)",
        "UPDATE t SET a = (b + 1) WHERE c IN (1, 2)",
        "delete from t where (a) = (1)",
        "DELETE FROM t WHERE a IN (SELECT b FROM u FOR UPDATE)",
    ] {
        let fast = fast::plain_write(sql.as_bytes());
        assert_eq!(
            fast,
            Some(classify_full(sql.as_bytes(), &lists())),
            "{sql:?}"
        );
    }
}

proptest::proptest! {
    /// Text made of the fast path's alphabet and its near misses: whenever the fast path
    /// answers, the full path gives the same classification.
    #[test]
    fn the_fast_path_never_disagrees_with_the_full_path(
        start in proptest::sample::select(vec![
            "SELECT", "select", " Select", "SELECTx", "WITH", "UPDATE", "insert", " Delete",
            "UPDATEx", "BEGIN", " commit", "End", "rollback", "abort", "BEGINx", "",
        ]),
        parts in proptest::collection::vec(
            (
                proptest::sample::select(vec![
                    " ", "", ",", ".", "=", "<>", "*", ";", " ;", "(", ")", "'", "-", "/", ":",
                    "\n", "$", "+", " -", "--", " (", "/*",
                ]),
                proptest::sample::select(vec![
                    "a", "t", "aid", "FROM", "where", "for", "FOR", "update", "Share", "into",
                    "temp", "insert", "Delete", "merge", "1", "1.5", "1into", "1e5", "$1", "$a",
                    "$12", "nextval", "pg_backend_pid", "pg_advisory_lock", "é", "select", "x$1",
                    "PG_TRY_ADVISORY_LOCK", "pg_catalog", "set", "values", "begin", "temp", "in",
                    "my_fn", "audit_log", "conflict", "on", "as",
                ]),
            ),
            0..12,
        ),
    ) {
        let mut sql = String::from(start);
        for (separator, word) in parts {
            sql.push_str(separator);
            sql.push_str(word);
        }
        if let Some(fast) = fast::plain_select(sql.as_bytes()) {
            proptest::prop_assert_eq!(fast, classify_full(sql.as_bytes(), &lists()), "{:?}", sql);
        }
        if let Some(fast) = fast::plain_write(sql.as_bytes()) {
            proptest::prop_assert_eq!(fast, classify_full(sql.as_bytes(), &lists()), "{:?}", sql);
        }
        if let Some(fast) = fast::lone_tx_word(sql.as_bytes()) {
            proptest::prop_assert_eq!(fast, classify_full(sql.as_bytes(), &lists()), "{:?}", sql);
        }
    }
}
