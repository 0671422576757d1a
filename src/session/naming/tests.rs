//! Tests of pgvigil's statement and portal names under transaction pooling.

use super::*;
use pgvigil_proto::backend::ErrorFields;
use pgvigil_proto::classify::{classify, FunctionLists};

fn frame(tag: u8, body: &[u8]) -> BytesMut {
    let mut out = BytesMut::new();
    encode::message(&mut out, tag, |b| b.put_slice(body));
    out
}

#[test]
fn names_are_found_and_replaced_in_every_message_that_carries_one() {
    let cases = [
        (
            b'P',
            &b"s1\0SELECT 1\0\0\0"[..],
            &b"pgv_42\0SELECT 1\0\0\0"[..],
        ),
        (
            b'B',
            b"portal\0s1\0\0\0\0\0\0\0",
            b"portal\0pgv_42\0\0\0\0\0\0\0",
        ),
        (b'D', b"Ss1\0", b"Spgv_42\0"),
        (b'C', b"Ss1\0", b"Spgv_42\0"),
    ];
    for (tag, body, renamed) in cases {
        let original = frame(tag, body);
        let (at, len) = statement_name(tag, &original).unwrap();
        assert_eq!(&original[at..at + len], b"s1");
        let mut out = BytesMut::new();
        rename(&original, at, len, 42, &mut out);
        assert_eq!(out, frame(tag, renamed));
    }
    assert_eq!(
        statement_name(b'P', &frame(b'P', b"\0SELECT 1\0\0\0")),
        None
    );
    assert_eq!(statement_name(b'D', &frame(b'D', b"Pportal\0")), None);
    assert_eq!(statement_name(b'B', &frame(b'B', b"\0")), None);
}

#[test]
fn a_parse_is_recorded_when_answered_and_dropped_when_its_stretch_failed() {
    let class = classify(b"SELECT 1", &FunctionLists::default());
    let mut naming = Naming::default();
    naming.sent_unnamed();
    naming.sent(b"a", b"", class, 1);
    naming.request();
    naming.sent(b"b", b"", class, 2);
    naming.request();
    naming.sent(b"c", b"", class, 3);
    naming.request();
    assert!(naming.parse_complete().0.is_none(), "the unnamed one");
    assert_eq!(naming.parse_complete().0.map(|p| p.id), Some(1));
    assert!(naming.ready(false).is_empty());
    // "b" failed: it never ran; "c" is after the next Sync and still waits.
    naming.error();
    assert!(naming.live(b"b").is_none() && naming.live(b"c").is_some());
    assert!(naming.ready(false).is_empty());
    naming.close(b"c");
    assert!(naming.live(b"c").is_none() && naming.prepares(3));
    assert_eq!(
        naming.ready(true),
        vec![3],
        "unanswered when quiet: in doubt"
    );
}

#[test]
fn deallocate_and_discard_all_are_read_as_postgresql_reads_them() {
    let cases: [(&[u8], Option<SqlDrop>); 9] = [
        (b"DEALLOCATE s1", Some(SqlDrop::Deallocate(b"s1".to_vec()))),
        (
            b"  deallocate prepare S1 ;",
            Some(SqlDrop::Deallocate(b"s1".to_vec())),
        ),
        (
            b"DEALLOCATE \"My \"\"s\"\"\"",
            Some(SqlDrop::Deallocate(b"My \"s\"".to_vec())),
        ),
        (b"DEALLOCATE ALL", Some(SqlDrop::DeallocateAll)),
        (b"deallocate prepare all;", Some(SqlDrop::DeallocateAll)),
        (b"DISCARD ALL", Some(SqlDrop::DiscardAll)),
        (b"DISCARD TEMP", None),
        (b"DEALLOCATE s1; SELECT 1", None),
        (b"SELECT 1", None),
    ];
    for (sql, wanted) in cases {
        assert_eq!(sql_drop(sql), wanted, "{}", String::from_utf8_lossy(sql));
    }
}

#[test]
fn a_duplicate_name_gets_postgresqls_error() {
    let mut naming = Naming::default();
    let mut sent = BytesMut::new();
    naming.send_duplicate(b"s1", &mut sent);
    assert_eq!(statement_name(b'P', &sent), Some((5, 5)));
    let mut out = BytesMut::new();
    assert!(!naming.duplicate_error(b"relation \"t\" does not exist", &mut out));
    let syntax = b"syntax error at or near \"pgvigil_duplicate_statement_name\"";
    assert!(naming.duplicate_error(syntax, &mut out));
    let fields = ErrorFields::parse(&out[5..]).unwrap();
    assert_eq!(fields.sqlstate(), Some(b"42P05".as_slice()));
    assert_eq!(
        fields.message(),
        Some(b"prepared statement \"s1\" already exists".as_slice())
    );
    assert!(
        !naming.duplicate_error(syntax, &mut BytesMut::new()),
        "once"
    );
}

#[test]
fn a_reset_keeps_small_queues_for_the_next_unit_and_frees_large_ones() {
    let class = classify(b"SELECT 1", &FunctionLists::default());
    let spares = || SPARE_QUEUES.with(Spares::len);
    let mut naming = Naming::default();
    naming.sent(b"a", b"", class, 1);
    let at: *const Queues = naming.queues.as_deref().unwrap();
    naming.reset();
    assert!(naming.queues.is_none(), "a reset session holds no queues");
    assert_eq!(spares(), 1);
    let mut next = Naming::default();
    next.sent_unnamed();
    let again = next.queues.as_deref().unwrap();
    assert_eq!(again as *const Queues, at, "the spare was not reused");
    assert_eq!(again.pending.len(), 1, "the spare came back empty");
    assert_eq!(spares(), 0);
    // Room for many Parses in flight is not kept.
    for id in 0..64 {
        next.sent(b"b", b"", class, id);
    }
    next.reset();
    assert_eq!(spares(), 0);
}
