//! Tests of what a unit's messages say about it: statements, protocol, settings and names.

use super::*;
use crate::session::replay::Prepared;
use bytes::{BufMut, Bytes, BytesMut};
use pgvigil_proto::classify::{classify, FunctionLists};

fn frame(out: &mut BytesMut, tag: u8, body: &[u8]) {
    out.put_u8(tag);
    out.put_u32(body.len() as u32 + 4);
    out.put_slice(body);
}

fn parse(out: &mut BytesMut, name: &str, sql: &str) {
    frame(out, b'P', format!("{name}\0{sql}\0\0\0").as_bytes());
}

fn bind(out: &mut BytesMut, statement: &str) {
    frame(out, b'B', format!("\0{statement}\0\0\0\0\0\0\0").as_bytes());
}

fn facts(input: &[u8], statements: &Statements) -> UnitFacts {
    inspect(input, 1 << 20, &default_classifier(), statements)
}

/// The classifier with no configured function lists.
fn default_classifier() -> Classifier {
    Classifier::new(FunctionLists::default())
}

#[test]
fn an_extended_unit_is_read_only_when_every_parse_is_and_complete_at_sync() {
    let none = Statements::default();
    let mut unit = BytesMut::new();
    parse(&mut unit, "", "SELECT 1");
    bind(&mut unit, "");
    frame(&mut unit, b'E', b"\0\0\0\0\0");
    assert!(!facts(&unit, &none).complete, "no Sync yet: wait");
    frame(&mut unit, b'S', b"");
    let f = facts(&unit, &none);
    assert!(f.complete && f.read_only && f.has_statement && !f.reuses_unnamed);
    assert_eq!(f.inspected, unit.len());

    let mut write = BytesMut::new();
    parse(&mut write, "", "SELECT 1");
    parse(&mut write, "", "INSERT INTO t VALUES (1)");
    frame(&mut write, b'S', b"");
    assert!(!facts(&write, &none).read_only);
}

#[test]
fn a_large_bind_is_routed_on_its_names_before_it_is_whole() {
    let none = Statements::default();
    let mut unit = BytesMut::new();
    parse(&mut unit, "", "SELECT $1");
    let bind_at = unit.len();
    unit.put_u8(b'B');
    unit.put_u32(4 + 2 * LOOKAHEAD_LIMIT as u32);
    unit.put_slice(b"\0s1\0\0\0\0\x01");
    let inspect_large = |input: &[u8]| inspect(input, 1 << 30, &default_classifier(), &none);
    let f = inspect_large(&unit);
    assert!(
        f.complete && !f.read_only,
        "routed at once, as a possible write"
    );
    assert_eq!(
        large_bind_at(&unit, bind_at, 1 << 30).map(|b| b.statement),
        Some(&b"s1"[..])
    );
    let mut names = Vec::new();
    named_references(&unit, 1 << 30, |n| names.push(n.to_vec()));
    assert_eq!(
        names,
        [b"s1".to_vec()],
        "its statement is looked for on the node"
    );

    let mut cut = BytesMut::new();
    cut.put_u8(b'B');
    cut.put_u32(4 + 2 * LOOKAHEAD_LIMIT as u32);
    cut.put_slice(b"\0s1");
    assert!(
        !inspect_large(&cut).complete,
        "its names are not all there: wait"
    );
    let mut small = BytesMut::new();
    bind(&mut small, "s1");
    small.truncate(small.len() - 2);
    assert!(
        large_bind_at(&small, 0, 1 << 30).is_none(),
        "a small Bind is read whole"
    );
}

#[test]
fn a_query_is_a_unit_of_its_own() {
    let mut input = BytesMut::new();
    frame(&mut input, b'Q', b"/* pgvigil:replica */ SELECT f()\0");
    frame(&mut input, b'Q', b"INSERT INTO t VALUES (1)\0");
    let f = facts(&input, &Statements::default());
    assert!(f.complete && !f.read_only);
    assert_eq!(f.hint, Some(Hint::Replica));
    assert_eq!(f.query_statements, 1);
    assert_eq!(f.inspected, input.len() - 30, "only the first Query");
}

#[test]
fn binds_of_known_and_unknown_statements() {
    let mut statements = Statements::default();
    let class = classify(b"SELECT 1", &FunctionLists::default());
    statements.insert(
        b"s1".as_slice().into(),
        Prepared {
            parse: Bytes::new(),
            class,
            on: 1,
            server: 0,
        },
    );
    let mut known = BytesMut::new();
    bind(&mut known, "s1");
    frame(&mut known, b'S', b"");
    let f = facts(&known, &statements);
    assert!(f.read_only && f.named_refs);

    let mut unknown = BytesMut::new();
    bind(&mut unknown, "s2");
    frame(&mut unknown, b'S', b"");
    assert!(!facts(&unknown, &statements).read_only);

    let mut unnamed = BytesMut::new();
    bind(&mut unnamed, "");
    frame(&mut unnamed, b'S', b"");
    assert!(facts(&unnamed, &statements).reuses_unnamed);
}

#[test]
fn named_references_skip_statements_parsed_in_the_same_unit() {
    let mut unit = BytesMut::new();
    parse(&mut unit, "a", "SELECT 1");
    bind(&mut unit, "a");
    bind(&mut unit, "b");
    frame(&mut unit, b'S', b"");
    bind(&mut unit, "c");
    let mut seen = Vec::new();
    named_references(&unit, 1 << 20, |name| seen.push(name.to_vec()));
    assert_eq!(seen, vec![b"b".to_vec()]);
}

fn describe_statement(out: &mut BytesMut, name: &str) {
    frame(out, b'D', format!("S{name}\0").as_bytes());
}

#[test]
fn a_statement_prepared_and_described_in_one_unit_is_what_its_text_says() {
    // How drivers prepare a named statement: Parse, Describe, Sync.
    let mut read = BytesMut::new();
    parse(&mut read, "s0", "SELECT 1");
    describe_statement(&mut read, "s0");
    frame(&mut read, b'S', b"");
    let f = facts(&read, &Statements::default());
    assert!(f.complete && f.has_statement);
    assert!(f.read_only, "{:?}", f.reason);
    assert!(!f.named_refs, "nothing to prepare elsewhere first");

    let mut write = BytesMut::new();
    parse(&mut write, "s1", "DELETE FROM t");
    describe_statement(&mut write, "s1");
    frame(&mut write, b'S', b"");
    assert!(!facts(&write, &Statements::default()).read_only);
}

#[test]
fn a_named_statement_the_session_never_parsed_may_write() {
    let mut unit = BytesMut::new();
    describe_statement(&mut unit, "elsewhere");
    frame(&mut unit, b'S', b"");
    let f = facts(&unit, &Statements::default());
    assert!(f.has_statement && !f.read_only);
}

#[test]
fn a_lone_setting_is_one_whichever_protocol_carries_it() {
    let none = Statements::default();
    let query = |sql: &str| {
        let mut unit = BytesMut::new();
        frame(&mut unit, b'Q', format!("{sql}\0").as_bytes());
        facts(&unit, &none)
    };
    assert!(query("SET application_name = 'x'").lone_setting());
    assert!(!query("SET a.b = 1; SET a.c = 2").lone_setting());
    assert!(!query("SET a.b = 1; INSERT INTO t VALUES (1)").lone_setting());
    assert!(!query("SELECT 1").lone_setting());

    // How pgjdbc sends its connect-time settings: Parse/Bind/Execute/Sync of the unnamed
    // statement.
    let mut extended = BytesMut::new();
    parse(&mut extended, "", "SET extra_float_digits = 3");
    bind(&mut extended, "");
    frame(&mut extended, b'E', b"\0\0\0\0\0");
    frame(&mut extended, b'S', b"");
    let f = facts(&extended, &none);
    assert!(f.lone_setting() && !f.read_only, "{f:?}");

    let mut with_a_write = BytesMut::new();
    parse(&mut with_a_write, "", "RESET application_name");
    parse(&mut with_a_write, "", "INSERT INTO t VALUES (1)");
    frame(&mut with_a_write, b'S', b"");
    assert!(!facts(&with_a_write, &none).lone_setting());

    // tokio-postgres prepares a named statement, then runs it in a unit of its own.
    let mut statements = Statements::default();
    let class = classify(b"SET application_name = 'x'", &FunctionLists::default());
    statements.insert(
        b"s0".as_slice().into(),
        Prepared {
            parse: Bytes::new(),
            class,
            on: 1,
            server: 0,
        },
    );
    let mut run = BytesMut::new();
    bind(&mut run, "s0");
    frame(&mut run, b'E', b"\0\0\0\0\0");
    frame(&mut run, b'S', b"");
    assert!(facts(&run, &statements).lone_setting());
}

#[test]
fn a_flush_does_not_end_a_unit_and_a_unit_waiting_after_one_awaits_its_rest() {
    let none = Statements::default();
    let mut unit = BytesMut::new();
    parse(&mut unit, "", "SELECT 1");
    bind(&mut unit, "");
    frame(&mut unit, b'H', b"");
    let waiting = facts(&unit, &none);
    assert!(
        waiting.complete && waiting.awaits_rest,
        "the rest is unseen"
    );
    assert!(
        waiting.read_only && !waiting.executes,
        "what it shows only prepares a read"
    );
    parse(&mut unit, "", "INSERT INTO t VALUES (1)");
    assert!(!facts(&unit, &none).complete, "goes on to its Sync");
    frame(&mut unit, b'S', b"");
    let whole = facts(&unit, &none);
    assert!(whole.complete && !whole.read_only);
    assert_eq!(whole.inspected, unit.len());
}

#[test]
fn pg_backend_pid_is_not_a_read() {
    for sql in [
        "SELECT PG_BACKEND_PID()",
        "select pg_backend_pid()",
        "SELECT pg_backend_pid ( )",
        "SELECT 1 FROM t WHERE p = pg_backend_pid() AND q = (1)",
    ] {
        let mut unit = BytesMut::new();
        frame(&mut unit, b'Q', format!("{sql}\0").as_bytes());
        assert!(!facts(&unit, &Statements::default()).read_only, "{sql}");
    }
    // Without a `(` the name is a column's: no function is called.
    for sql in [
        "SELECT pg_backend_pi",
        "SELECT pgXbackend_pid",
        "SELECT 1",
        "SELECT Pg_Backend_Pid",
        "SELECT 1 FROM t WHERE p = pg_backend_pid",
    ] {
        let mut unit = BytesMut::new();
        frame(&mut unit, b'Q', format!("{sql}\0").as_bytes());
        assert!(facts(&unit, &Statements::default()).read_only, "{sql}");
    }
}

#[test]
fn a_lone_begin_leaves_its_access_mode_to_the_session() {
    let query = |sql: &str| {
        let mut unit = BytesMut::new();
        frame(&mut unit, b'Q', format!("{sql}\0").as_bytes());
        facts(&unit, &Statements::default())
    };
    let begin = query("BEGIN");
    assert_eq!((begin.read_only, begin.begin), (true, Some(None)));
    let read_write = query("BEGIN READ WRITE");
    assert_eq!(read_write.begin, Some(Some(false)));
    assert!(!read_write.read_only);
    let with_a_write = query("BEGIN; INSERT INTO t VALUES (1); COMMIT");
    assert!(!with_a_write.read_only, "{with_a_write:?}");
}

#[test]
fn a_unit_reuses_the_unnamed_statement_only_when_it_binds_or_describes_it_before_parsing_one() {
    let max = 1 << 20;
    let mut binds = BytesMut::new();
    parse(&mut binds, "a", "SELECT 1");
    bind(&mut binds, "");
    frame(&mut binds, b'S', b"");
    assert!(reuses_unnamed(&binds, max));

    let mut describes = BytesMut::new();
    frame(&mut describes, b'D', b"S\0");
    frame(&mut describes, b'S', b"");
    assert!(reuses_unnamed(&describes, max));

    let mut parses_first = BytesMut::new();
    parse(&mut parses_first, "", "SELECT 1");
    bind(&mut parses_first, "");
    frame(&mut parses_first, b'S', b"");
    assert!(!reuses_unnamed(&parses_first, max));

    // A named Bind, and a Bind after the unit's Sync, use no earlier unnamed statement.
    let mut named = BytesMut::new();
    bind(&mut named, "a");
    frame(&mut named, b'S', b"");
    bind(&mut named, "");
    assert!(!reuses_unnamed(&named, max));

    // The facts say the same (the move done at once reads them instead).
    let none = Statements::default();
    for unit in [&binds, &describes, &parses_first, &named] {
        assert_eq!(facts(unit, &none).reuses_unnamed, reuses_unnamed(unit, max));
    }
}

#[test]
fn the_facts_give_the_text_of_a_well_formed_query_only() {
    let none = Statements::default();
    let mut query = BytesMut::new();
    frame(&mut query, b'Q', b"DEALLOCATE ALL\0");
    frame(&mut query, b'Q', b"SELECT 2\0");
    assert_eq!(
        facts(&query, &none).query_sql(&query),
        Some(&b"DEALLOCATE ALL"[..])
    );
    let mut two_texts = BytesMut::new();
    frame(&mut two_texts, b'Q', b"SELECT 1\0SELECT 2\0");
    let mut unterminated = BytesMut::new();
    frame(&mut unterminated, b'Q', b"SELECT 1");
    let mut extended = BytesMut::new();
    parse(&mut extended, "", "SELECT 1");
    frame(&mut extended, b'S', b"");
    for unit in [&two_texts, &unterminated, &extended] {
        assert_eq!(facts(unit, &none).query_sql(unit), None, "{unit:?}");
    }
}

#[test]
fn the_facts_say_whether_the_first_message_drops_the_unnamed_statement_as_its_bytes_do() {
    use crate::session::client_scan::drops_unnamed;
    let none = Statements::default();
    let mut query = BytesMut::new();
    frame(&mut query, b'Q', b"SELECT 1\0");
    let mut unnamed = BytesMut::new();
    parse(&mut unnamed, "", "SELECT 1");
    frame(&mut unnamed, b'S', b"");
    let mut named = BytesMut::new();
    parse(&mut named, "a", "SELECT 1");
    parse(&mut named, "", "SELECT 1");
    frame(&mut named, b'S', b"");
    let mut binds_first = BytesMut::new();
    bind(&mut binds_first, "");
    parse(&mut binds_first, "", "SELECT 1");
    frame(&mut binds_first, b'S', b"");
    // No parameter count: PostgreSQL rejects it before it drops anything.
    let mut malformed = BytesMut::new();
    frame(&mut malformed, b'P', b"\0SELECT 1\0");
    frame(&mut malformed, b'S', b"");
    let mut bad_query = BytesMut::new();
    frame(&mut bad_query, b'Q', b"SELECT 1");
    let cases = [
        (&query, true),
        (&unnamed, true),
        (&named, false),
        (&binds_first, false),
        (&malformed, false),
        (&bad_query, false),
    ];
    for (unit, drops) in cases {
        assert_eq!(drops_unnamed(unit, 1 << 20), drops, "{unit:?}");
        assert_eq!(facts(unit, &none).drops_unnamed, drops, "{unit:?}");
    }
}
