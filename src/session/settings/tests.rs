//! Tests of the settings log: what is recorded, when, and what each connection has applied.

use super::*;

#[test]
fn set_config_with_constants_is_a_setting() {
    let cases: [(&str, SetConfig); 8] = [
        (
            "SELECT set_config('search_path', 'a, b', false)",
            SetConfig::Session,
        ),
        (
            " select pg_catalog.SET_CONFIG ( 'x.y' , 'it''s' , FALSE ) ; ",
            SetConfig::Session,
        ),
        ("SELECT set_config('a', 'b', true)", SetConfig::Local),
        ("SELECT set_config('a', $1, false)", SetConfig::Unknown),
        ("SELECT set_config('a', 'b\\', false)", SetConfig::Unknown),
        ("SELECT set_config('a', 'b', false), 1", SetConfig::Unknown),
        (
            "SELECT set_config('a', 'b', false); SELECT 2",
            SetConfig::Unknown,
        ),
        (
            "UPDATE t SET v = set_config('a', v, false)",
            SetConfig::Unknown,
        ),
    ];
    for (sql, expected) in cases {
        assert_eq!(set_config(sql.as_bytes()), expected, "{sql}");
    }
}

fn text(sql: &str) -> SqlText {
    sql.as_bytes().into()
}

#[test]
fn a_reset_all_restarts_the_log_and_stale_connections_run_it_whole() {
    let mut s = Settings::default();
    for sql in ["SET SESSION AUTHORIZATION u", "SET a = 1"] {
        s.ran(text(sql), Scope::Adds, TxStatus::Idle, 0);
    }
    let before_reset = s.applied(0);
    s.ran(text("RESET ALL;S"), Scope::ResetsAll, TxStatus::Idle, 0);
    // RESET ALL keeps the session authorization; node 0 ran it all.
    assert_eq!(
        s.log(),
        [text("SET SESSION AUTHORIZATION u"), text("RESET ALL;S")]
    );
    assert!(s.missing(0).is_empty());
    assert_eq!(s.missing(1).len(), 2);
    // A pooled connection that ran the old log runs the new one from its start.
    s.resume(1, before_reset);
    assert_eq!(s.missing(1).len(), 2);
    s.resume(1, s.applied(0));
    assert!(s.missing(1).is_empty());

    // Inside a block, a DISCARD ALL's settings count only once the block commits.
    s.request();
    s.ready(TxStatus::InTransaction, 0);
    s.ran(text("D"), Scope::Discards, TxStatus::InTransaction, 0);
    s.request();
    s.command_complete(b"COMMIT\0");
    s.ready(TxStatus::Idle, 0);
    assert_eq!(s.log(), [text("D")]);
}

#[test]
fn a_log_continues_another_sessions_only_where_it_begins_with_it() {
    let mut other = Settings::default();
    let mut mine = Settings::default();
    assert_eq!(other.ran_on(0), None, "nothing to compare while empty");
    for sql in ["SET a = 1", "SET b = 2"] {
        other.ran(text(sql), Scope::Adds, TxStatus::Idle, 0);
    }
    let ran = other.ran_on(0).unwrap();
    mine.ran(text("SET a = 1"), Scope::Adds, TxStatus::Idle, 0);
    assert_eq!(mine.continues(&ran), None, "shorter");
    mine.ran(text("SET b = 2"), Scope::Adds, TxStatus::Idle, 0);
    mine.ran(text("SET c = 3"), Scope::Adds, TxStatus::Idle, 0);
    assert_eq!(mine.continues(&ran), Some(2));
    mine.resume(0, 2);
    assert_eq!(mine.missing(0), [text("SET c = 3")]);
    other.ran(text("SET z = 9"), Scope::Adds, TxStatus::Idle, 0);
    assert_eq!(mine.continues(&other.ran_on(0).unwrap()), None, "differs");
    // After a restart the counts go on from where the old log ended.
    mine.ran(text("RESET ALL;"), Scope::ResetsAll, TxStatus::Idle, 0);
    let reset = Settings::default().log().to_vec();
    assert_eq!(mine.continues(&reset), Some(3));
}

#[test]
fn a_setting_is_logged_once_it_took_effect() {
    let mut s = Settings::default();
    // SET a: ok. SET b: fails.
    s.request();
    s.sent(b"SET a = 1", true);
    s.ready(TxStatus::Idle, 0);
    s.request();
    s.sent(b"SET b = x", true);
    s.error();
    s.ready(TxStatus::Idle, 0);
    assert_eq!(s.missing(1), [text("SET a = 1")]);
    assert!(s.missing(0).is_empty(), "node 0 ran it");

    // BEGIN; SET c; ROLLBACK: not logged. BEGIN; SET d; COMMIT: logged.
    let blocks = [
        ("SET c = 1", b"ROLLBACK\0".as_slice(), false),
        ("SET d = 1", b"COMMIT\0".as_slice(), true),
    ];
    for (sql, end, kept) in blocks {
        s.request();
        s.ready(TxStatus::InTransaction, 0);
        s.request();
        s.sent(sql.as_bytes(), true);
        s.ready(TxStatus::InTransaction, 0);
        s.request();
        s.command_complete(end);
        s.ready(TxStatus::Idle, 0);
        assert_eq!(s.missing(1).contains(&text(sql)), kept, "{sql}");
    }

    // An extended SET answered at the next Sync; two pipelined, the second one failing.
    s.sent(b"SET e = 1", false);
    s.request();
    s.sent(b"SET f = x", false);
    s.request();
    s.ready(TxStatus::Idle, 0);
    s.error();
    s.ready(TxStatus::Idle, 0);
    s.quiet();
    let missing = s.missing(1);
    assert!(missing.contains(&text("SET e = 1")));
    assert!(!missing.contains(&text("SET f = x")));
    assert_eq!(s.unreplayable(), None);

    // A savepoint rolled back inside a block that changed settings.
    s.request();
    s.ready(TxStatus::InTransaction, 0);
    s.request();
    s.sent(b"SET g = 1", true);
    s.ready(TxStatus::InTransaction, 0);
    s.request();
    s.command_complete(b"ROLLBACK\0");
    s.ready(TxStatus::InTransaction, 0);
    assert!(s.unreplayable().is_some());
}
