//! Table-driven cases: each names the SQL, the expected answer and why.

use super::*;

/// The user lists every case runs with.
fn lists() -> FunctionLists {
    FunctionLists::new(["audit_log", "app.bump"], ["my_read", "app.fetch"])
}

/// `(sql, read_only, why)`.
const VERDICTS: &[(&str, bool, &str)] = &[
    // Reads.
    ("SELECT 1", true, "plain SELECT"),
    ("select abalance from pgbench_accounts where aid = $1", true, "pgbench read, lower case"),
    ("SeLeCt 1", true, "mixed case"),
    ("  \n\tSELECT 1", true, "leading whitespace"),
    ("(SELECT 1)", true, "leading parenthesis"),
    ("((SELECT 1) UNION (SELECT 2))", true, "nested parentheses"),
    ("VALUES (1), (2)", true, "VALUES"),
    ("TABLE accounts", true, "TABLE"),
    ("SHOW search_path", true, "SHOW"),
    ("SHOW ALL", true, "SHOW ALL"),
    ("WITH t AS (SELECT 1) SELECT * FROM t", true, "read-only CTE"),
    (
        "WITH RECURSIVE t(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM t WHERE n < 5) SELECT * FROM t",
        true,
        "recursive CTE with a column list",
    ),
    (
        "WITH a(x) AS (SELECT 1), b(y) AS MATERIALIZED (SELECT 2) SELECT * FROM a, b",
        true,
        "CTE column lists after a comma, MATERIALIZED",
    ),
    ("WITH a(x) AS NOT MATERIALIZED (SELECT 1) SELECT x FROM a", true, "NOT MATERIALIZED"),
    ("SELECT count(*), sum(x), avg(x), min(x), max(x) FROM t", true, "aggregates"),
    (
        "SELECT now(), coalesce(a, b), lower(s), upper(s), length(s), substr(s, 1, 2) FROM t",
        true,
        "common functions",
    ),
    (
        "SELECT to_char(now(), 'YYYY'), date_trunc('day', ts), extract(year FROM ts) FROM t",
        true,
        "date functions",
    ),
    (
        "SELECT array_agg(x), string_agg(s, ','), jsonb_build_object('a', 1), json_agg(t) FROM t",
        true,
        "array and json builders",
    ),
    ("SELECT pg_sleep(0.1)", true, "pg_sleep"),
    (
        "SELECT inet_server_port(), pg_is_in_recovery(), version(), current_setting('search_path')",
        true,
        "node markers",
    ),
    ("SELECT pg_catalog.lower('A')", true, "pg_catalog-qualified built-in"),
    ("SELECT PG_CATALOG.NOW()", true, "qualified built-in in upper case"),
    ("SELECT \"lower\"('A')", true, "quoted built-in name, exact case"),
    (
        "SELECT x::varchar(10), CAST(y AS numeric(10,2)), z::character varying(5) FROM t",
        true,
        "type modifiers are not calls",
    ),
    (
        "SELECT * FROM t WHERE id IN (1, 2) AND EXISTS (SELECT 1) AND v = ANY (ARRAY[1])",
        true,
        "grammar words before (",
    ),
    ("SELECT count(*) FILTER (WHERE x > 0) OVER (PARTITION BY y) FROM t", true, "FILTER and OVER"),
    ("SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY x) FROM t", true, "WITHIN GROUP"),
    ("SELECT * FROM unnest(ARRAY[1,2]) WITH ORDINALITY AS u(x, n)", true, "alias list after AS"),
    (
        "SELECT * FROM t JOIN u USING (id) LEFT JOIN (SELECT 1 AS id) s ON (s.id = t.id)",
        true,
        "USING, JOIN and ON parentheses",
    ),
    ("SELECT a FROM t GROUP BY GROUPING SETS ((a), ())", true, "grouping sets"),
    ("SELECT DISTINCT ON (a) a FROM t ORDER BY a LIMIT (5) OFFSET (1)", true, "DISTINCT ON, LIMIT ("),
    ("SELECT * FROM t TABLESAMPLE BERNOULLI (10) REPEATABLE (1)", true, "TABLESAMPLE"),
    ("SELECT substring(s FROM 2 FOR 3) FROM t", true, "FOR inside substring is no row lock"),
    ("SELECT current_timestamp(3), localtimestamp", true, "SQL-standard time functions"),
    ("SELECT 'update t set x = 1'", true, "write keyword in a string"),
    ("SELECT '; DELETE FROM t'", true, "semicolon in a string"),
    ("SELECT 1 -- ; DELETE FROM t", true, "line comment"),
    ("SELECT 1 /* ; DELETE FROM t */", true, "block comment"),
    ("SELECT 1 /* outer /* inner */ ; DELETE FROM t */", true, "nested block comment"),
    ("SELECT $$; DELETE FROM t$$", true, "dollar-quoted string"),
    ("SELECT $fn$ $$; DELETE $$ $fn$", true, "tagged dollar quote holding $$"),
    ("SELECT E'\\'; DELETE FROM t; '", true, "E-string backslash-escaped quote"),
    ("SELECT e'it''s'", true, "E-string doubled quote"),
    ("SELECT 'it''s; DELETE'", true, "doubled quote"),
    ("SELECT \"delete\" FROM t", true, "quoted identifier spelled like a keyword"),
    ("SELECT \"a;b\" FROM t", true, "semicolon in a quoted identifier"),
    ("SELECT U&'d\\0061t\\+000061'", true, "U& string backslashes are not ambiguous"),
    ("SELECT $1, $2::int", true, "parameters are not dollar quotes"),
    ("SELECT 1; SELECT 2", true, "two reads"),
    ("SELECT 1;", true, "trailing semicolon"),
    (";;", true, "only empty statements"),
    ("", true, "empty string: EmptyQueryResponse anywhere"),
    ("/* only a comment */", true, "only a comment"),
    ("EXPLAIN SELECT 1", true, "EXPLAIN"),
    ("EXPLAIN INSERT INTO t VALUES (1)", true, "plain EXPLAIN of a write runs nothing"),
    ("EXPLAIN (COSTS OFF) DELETE FROM t", true, "EXPLAIN with options, of a write"),
    ("EXPLAIN ANALYZE SELECT * FROM t", true, "EXPLAIN ANALYZE of a read"),
    ("EXPLAIN (ANALYZE, BUFFERS) SELECT 1", true, "option-list ANALYZE of a read"),
    ("EXPLAIN (ANALYZE off) INSERT INTO t VALUES (1)", true, "ANALYZE off"),
    ("EXPLAIN (ANALYZE false, VERBOSE) UPDATE t SET x = 1", true, "ANALYZE false"),
    ("EXPLAIN VERBOSE SELECT 1", true, "EXPLAIN VERBOSE"),
    ("EXPLAIN SELECT nextval('s')", true, "plain EXPLAIN does not call"),
    ("COPY t TO STDOUT", true, "COPY TO STDOUT"),
    (
        "COPY public.t (a, b) TO STDOUT WITH (FORMAT csv, FORCE_QUOTE (a))",
        true,
        "COPY TO STDOUT with columns and options",
    ),
    ("COPY (SELECT * FROM t WHERE x > 1) TO STDOUT", true, "COPY of a query TO STDOUT"),
    ("BEGIN READ ONLY", true, "read-only transaction"),
    ("START TRANSACTION READ ONLY", true, "START TRANSACTION READ ONLY"),
    ("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY", true, "modes with a comma"),
    ("COMMIT", true, "COMMIT"),
    ("ROLLBACK", true, "ROLLBACK"),
    ("END", true, "END"),
    ("ABORT", true, "ABORT"),
    ("SAVEPOINT s1", true, "SAVEPOINT"),
    ("RELEASE SAVEPOINT s1", true, "RELEASE"),
    ("ROLLBACK TO SAVEPOINT s1", true, "ROLLBACK TO"),
    ("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ", true, "SET TRANSACTION, not read-write"),
    ("SELECT 1 FROM t WHERE x = 'a''b' AND y = \"c\"\"d\"", true, "doubled quotes"),
    ("SELECT x FROM t -- comment without newline", true, "comment to the end"),
    ("SELECT my_read(1)", true, "user read list"),
    ("SELECT MY_READ(1)", true, "user read list ignores case"),
    ("SELECT app.fetch(1)", true, "qualified user read function"),
    ("SELECT 1 AS x, 'a' AS y", true, "aliases"),
    ("SELECT x FROM t WHERE a BETWEEN (1) AND (2) OR NOT (b)", true, "operators before ("),
    ("SELECT CASE WHEN (a) THEN (b) ELSE (c) END FROM t", true, "CASE with parentheses"),
    ("select 1.5e3, .5, 0x1F", true, "numbers"),
    ("SELECT row_number() OVER w FROM t WINDOW w AS (ORDER BY x)", true, "WINDOW clause"),
    // Writes.
    ("INSERT INTO t VALUES (1)", false, "INSERT"),
    ("UPDATE t SET x = 1", false, "UPDATE"),
    ("DELETE FROM t", false, "DELETE"),
    ("MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN DELETE", false, "MERGE"),
    ("insert into t values (1)", false, "lower-case INSERT"),
    ("(INSERT INTO t VALUES (1))", false, "a write in parentheses"),
    ("CREATE TABLE t (a int)", false, "DDL"),
    ("DROP TABLE t", false, "DROP"),
    ("ALTER TABLE t ADD COLUMN b int", false, "ALTER"),
    ("TRUNCATE t", false, "TRUNCATE"),
    ("GRANT SELECT ON t TO bob", false, "GRANT"),
    ("COPY t FROM STDIN", false, "COPY FROM"),
    ("COPY t (a) FROM '/tmp/x'", false, "COPY FROM a file"),
    ("COPY t TO '/tmp/out'", false, "COPY to a server file"),
    ("COPY t TO PROGRAM 'gzip'", false, "COPY to a program"),
    ("COPY (SELECT nextval('s')) TO STDOUT", false, "COPY of a writing query"),
    ("COPY (DELETE FROM t RETURNING *) TO STDOUT", false, "COPY of DELETE RETURNING"),
    ("CALL p()", false, "CALL"),
    ("DO $$BEGIN NULL; END$$", false, "DO"),
    ("LOCK TABLE t", false, "LOCK"),
    ("LISTEN ch", false, "LISTEN"),
    ("UNLISTEN *", false, "UNLISTEN"),
    ("NOTIFY ch, 'x'", false, "NOTIFY"),
    ("VACUUM t", false, "VACUUM"),
    ("ANALYZE t", false, "ANALYZE"),
    ("REINDEX TABLE t", false, "REINDEX"),
    ("CLUSTER t", false, "CLUSTER"),
    ("REFRESH MATERIALIZED VIEW v", false, "REFRESH"),
    ("CHECKPOINT", false, "CHECKPOINT"),
    ("DECLARE c CURSOR FOR SELECT 1", false, "cursor lives on one node"),
    ("FETCH 10 FROM c", false, "FETCH"),
    ("EXECUTE stmt(1)", false, "EXECUTE of a prepared statement"),
    ("PREPARE p AS SELECT 1", false, "PREPARE pins to the primary"),
    ("DEALLOCATE p", false, "DEALLOCATE"),
    ("SELECT * FROM t FOR UPDATE", false, "FOR UPDATE"),
    ("SELECT * FROM t FOR SHARE", false, "FOR SHARE"),
    ("SELECT * FROM t FOR NO KEY UPDATE", false, "FOR NO KEY UPDATE"),
    ("SELECT * FROM t FOR KEY SHARE SKIP LOCKED", false, "FOR KEY SHARE"),
    ("select * from t for update of t nowait", false, "lower-case row lock"),
    ("SELECT * INTO new_t FROM t", false, "SELECT INTO"),
    ("SELECT 1into t", false, "number glued to INTO"),
    ("WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d", false, "DELETE CTE"),
    ("WITH i AS (INSERT INTO t VALUES (1) RETURNING id) SELECT id FROM i", false, "INSERT CTE"),
    ("WITH u AS (UPDATE t SET x = 1 RETURNING *) SELECT 1", false, "UPDATE CTE"),
    (
        "WITH m AS (MERGE INTO t USING s ON true WHEN MATCHED THEN DELETE RETURNING *) SELECT 1",
        false,
        "MERGE CTE",
    ),
    ("EXPLAIN ANALYZE INSERT INTO t VALUES (1)", false, "EXPLAIN ANALYZE of INSERT"),
    ("EXPLAIN ANALYSE DELETE FROM t", false, "British ANALYSE"),
    ("EXPLAIN (ANALYZE) UPDATE t SET x = 1", false, "option-list ANALYZE of UPDATE"),
    ("EXPLAIN (ANALYZE true, FORMAT JSON) DELETE FROM t", false, "ANALYZE true"),
    ("EXPLAIN (FORMAT JSON, ANALYZE) SELECT nextval('s')", false, "ANALYZE of a writing call"),
    ("EXPLAIN ANALYZE VERBOSE CREATE TABLE x AS SELECT 1", false, "ANALYZE of CREATE TABLE AS"),
    ("SELECT nextval('s')", false, "nextval"),
    ("SELECT setval('s', 1)", false, "setval"),
    ("SELECT currval('s')", false, "currval"),
    ("SELECT lastval()", false, "lastval"),
    ("SELECT pg_advisory_lock(1)", false, "advisory lock"),
    ("SELECT pg_try_advisory_xact_lock(1)", false, "transaction advisory lock"),
    ("SELECT pg_advisory_unlock_all()", false, "advisory unlock"),
    ("SELECT txid_current()", false, "txid_current"),
    ("SELECT txid_current_if_assigned()", false, "txid_current_if_assigned"),
    ("SELECT pg_current_xact_id()", false, "pg_current_xact_id"),
    ("SELECT pg_notify('c', 'x')", false, "pg_notify"),
    ("SELECT lo_import('/tmp/x')", false, "lo_import"),
    ("SELECT lo_create(0)", false, "lo_create"),
    ("SELECT lo_unlink(1)", false, "lo_unlink"),
    ("SELECT lo_from_bytea(0, 'x')", false, "lo_from_bytea"),
    ("SELECT set_config('a.b', 'c', false)", false, "set_config"),
    ("SELECT pg_switch_wal()", false, "pg_switch_wal"),
    ("SELECT pg_create_restore_point('x')", false, "pg_create_restore_point"),
    ("SELECT pg_terminate_backend(123)", false, "a pid is one node's: primary"),
    ("SELECT pg_current_wal_lsn()", false, "fails on a standby: not listed"),
    ("SELECT NEXTVAL('s')", false, "upper-case nextval"),
    ("SELECT pg_catalog.nextval('s')", false, "qualified nextval"),
    ("SELECT \"nextval\"('s')", false, "quoted nextval"),
    ("SELECT \"NextVal\"('s')", false, "quoted mixed case: unknown"),
    ("SELECT my_func(1)", false, "unknown user function"),
    ("SELECT public.lower('a')", false, "built-in name in another schema"),
    ("SELECT audit_log(1)", false, "user write list"),
    ("SELECT app.bump()", false, "qualified user write list"),
    ("SELECT * FROM my_srf()", false, "unknown set-returning function"),
    ("SELECT count(*), f(x) FROM t", false, "unknown call after a comma"),
    ("SELECT a FROM t WHERE x = g(1)", false, "unknown call in WHERE"),
    ("SELECT (SELECT nextval('s'))", false, "nested write call"),
    ("SELECT coalesce(nextval('s'), 0)", false, "write call inside a read call"),
    ("SELECT 1 FROM t x(a)", false, "alias list without AS is taken as a call"),
    ("WITH a(x) AS (SELECT 1) SELECT my_f(x) FROM a", false, "call after a CTE"),
    ("SELECT x, my_f(a, b) AS y FROM t", false, "identifier arguments after a comma"),
    ("SELECT (x).f(1) FROM t", false, "call on an expression"),
    ("VALUES (nextval('s'))", false, "write call in VALUES"),
    ("SELECT 1 AS update", false, "unreserved keyword alias taken conservatively"),
    ("SELECT 1; DELETE FROM t", false, "second statement writes"),
    ("/* ; */ INSERT INTO t VALUES (1)", false, "comment before a write"),
    ("SELECT 1; SELECT nextval('s')", false, "second statement calls nextval"),
    ("SELECT 1;;INSERT INTO t VALUES (1)", false, "write after an empty statement"),
    ("SELECT 'C:\\dir'", false, "backslash in a standard string is ambiguous"),
    ("SELECT '\\'; DELETE FROM t; --'", false, "ambiguous backslash hiding a statement"),
    ("SELECT 'x\\' , $$' ; DELETE FROM t; -- $$", false, "standard_conforming_strings=off trick"),
    ("SELECT 'abc", false, "unterminated string"),
    ("SELECT 1 /* open", false, "unterminated comment"),
    ("SELECT $$abc", false, "unterminated dollar quote"),
    ("SELECT \"abc", false, "unterminated quoted identifier"),
    ("SELECT E'abc\\'", false, "unterminated E-string"),
    ("SELECT 1; /* open", false, "unterminated after a complete read"),
    ("SET search_path = app", false, "SET goes to the primary and is replayed"),
    ("SET LOCAL statement_timeout = '1s'", false, "SET LOCAL"),
    ("RESET ALL", false, "RESET"),
    ("DISCARD ALL", false, "DISCARD"),
    ("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY", false, "session command"),
    ("BEGIN", false, "read-write transaction"),
    ("BEGIN READ WRITE", false, "explicit READ WRITE"),
    ("BEGIN ISOLATION LEVEL SERIALIZABLE READ ONLY", false, "a standby refuses serializable"),
    ("START TRANSACTION", false, "START TRANSACTION"),
    ("SET TRANSACTION READ WRITE", false, "SET TRANSACTION READ WRITE"),
    ("PREPARE TRANSACTION 'x'", false, "two-phase commit"),
    ("COMMIT PREPARED 'x'", false, "COMMIT PREPARED"),
    ("ROLLBACK PREPARED 'x'", false, "ROLLBACK PREPARED"),
    ("CREATE TEMP TABLE x (a int)", false, "temporary table"),
    (
        "CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1; SELECT 2; END",
        false,
        "SQL-standard function body",
    ),
    ("(", false, "lone parenthesis"),
    ("'abc'", false, "starts with a literal"),
    ("garbage words", false, "unknown statement"),
];

/// An expectation about one field of the classification.
#[derive(Debug)]
enum Expect {
    Tx(Option<TxControl>),
    Pin(Option<Pin>),
    Session(bool, Option<bool>),
    Hint(Option<Hint>),
    Reason(Option<Reason>),
    Statements(usize),
}

const fn begin(read_only: bool) -> Expect {
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
    ("BEGIN", begin(false), "plain BEGIN"),
    ("BEGIN READ ONLY", begin(true), "BEGIN READ ONLY"),
    (
        "begin transaction read only, isolation level repeatable read",
        begin(true),
        "modes",
    ),
    (
        "START TRANSACTION READ WRITE",
        begin(false),
        "START ... READ WRITE",
    ),
    (
        "BEGIN READ ONLY ISOLATION LEVEL SERIALIZABLE",
        begin(false),
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
    ("UNLISTEN *", pin(Pin::Listen), "UNLISTEN"),
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
            Expect::Hint(hint) => got.hint == hint,
            Expect::Reason(reason) => got.reason == reason,
            Expect::Statements(n) => got.statements == n,
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
