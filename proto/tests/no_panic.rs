//! Property tests: no input, random or a mutated valid frame, makes the parsers panic, and the
//! message iterator only ever consumes whole messages.

use bytes::BytesMut;
use pgvigil_proto::backend::{
    Authentication, BackendKeyData, CommandComplete, ErrorFields, NotificationResponse,
    ParameterStatus, ReadyForQuery,
};
use pgvigil_proto::frame::messages;
use pgvigil_proto::frontend::{
    Bind, Close, Describe, Execute, Parse, PasswordMessage, Query, SaslInitialResponse,
    SaslResponse,
};
use pgvigil_proto::startup::{parse_startup, StartupPacket};
use pgvigil_proto::{encode, header, next_message, TxStatus, DEFAULT_MAX_MESSAGE_SIZE};
use proptest::prelude::*;

/// Runs every body view over `body`; only panics matter, results are discarded.
fn parse_with_every_view(body: &[u8]) {
    let _ = Query::parse(body);
    let _ = Parse::parse(body);
    let _ = Bind::parse(body);
    let _ = Describe::parse(body);
    let _ = Close::parse(body);
    let _ = Execute::parse(body);
    let _ = PasswordMessage::parse(body);
    let _ = SaslInitialResponse::parse(body);
    let _ = SaslResponse::parse(body);
    if let Ok(auth) = Authentication::parse(body) {
        let _ = auth.sasl_mechanisms().count();
    }
    let _ = ReadyForQuery::parse(body);
    if let Ok(fields) = ErrorFields::parse(body) {
        let _ = fields.iter().count();
        let _ = (fields.sqlstate(), fields.message(), fields.severity());
    }
    let _ = ParameterStatus::parse(body);
    let _ = BackendKeyData::parse(body);
    let _ = CommandComplete::parse(body);
    let _ = NotificationResponse::parse(body);
}

/// Checks the framing invariants on `buf` with limit `max`.
fn check_framing(buf: &[u8], max: usize) {
    let _ = header(buf, max);
    let _ = next_message(buf, max);
    let mut it = messages(buf, max);
    let mut boundary = 0;
    for message in it.by_ref() {
        match message {
            Ok(m) => {
                boundary += m.len();
                assert!(m.len() <= max);
                parse_with_every_view(m.body);
            }
            Err(_) => break,
        }
    }
    assert!(it.consumed() <= buf.len());
    assert_eq!(
        it.consumed(),
        boundary,
        "consumed is the sum of whole frames yielded"
    );
    // The tail left over must not start with a whole valid frame, or the iterator stopped early.
    if let Some(tail) = buf.get(it.consumed()..) {
        assert!(!matches!(next_message(tail, max), Ok(Some(_))));
    }
}

/// Checks the startup parser on `buf`: a parsed packet never claims more than was given.
fn check_startup(buf: &[u8]) {
    if let Ok(Some((packet, used))) = parse_startup(buf) {
        assert!(used <= buf.len());
        if let StartupPacket::Startup { params, .. } = packet {
            for (name, value) in params.iter() {
                assert!(!name.is_empty());
                assert!(!name.contains(&0) && !value.contains(&0));
            }
            let _ = params.get("user");
        }
    }
}

/// A stream of valid messages of the kinds the proxy reads, built with the encoders.
fn valid_stream() -> BytesMut {
    let mut buf = BytesMut::new();
    encode::query(&mut buf, b"select 1");
    encode::auth_sasl(&mut buf, &["SCRAM-SHA-256"]);
    encode::error_response(&mut buf, "ERROR", "42P01", "no such table");
    encode::parameter_status(&mut buf, b"TimeZone", b"UTC");
    encode::backend_key_data(&mut buf, 1, b"abcd");
    encode::sasl_initial_response(&mut buf, "SCRAM-SHA-256", b"n,,n=,r=abc");
    encode::ready_for_query(&mut buf, TxStatus::InTransaction);
    encode::message(&mut buf, b'B', |b| {
        b.extend_from_slice(b"p\0s\0\0\x01\0\x01\0\x01\0\0\0\x02ab\0\0");
    });
    encode::message(&mut buf, b'P', |b| {
        b.extend_from_slice(b"s\0select $1\0\0\x01\0\0\0\x17")
    });
    buf
}

/// A valid StartupMessage.
fn valid_startup() -> BytesMut {
    let mut buf = BytesMut::new();
    encode::startup_message(&mut buf, &[(b"user", b"alice"), (b"database", b"db")]);
    buf
}

/// Applies `(position, byte)` overwrites and a truncation to `buf`.
fn mutate(mut buf: Vec<u8>, edits: &[(usize, u8)], keep: usize) -> Vec<u8> {
    let len = buf.len();
    for &(pos, byte) in edits {
        if let Some(slot) = buf.get_mut(pos % len.max(1)) {
            *slot = byte;
        }
    }
    buf.truncate(keep % (len + 1));
    buf
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn random_bytes_never_panic(buf in proptest::collection::vec(any::<u8>(), 0..512), max in 0usize..1024) {
        check_framing(&buf, max);
        check_framing(&buf, DEFAULT_MAX_MESSAGE_SIZE);
        check_startup(&buf);
        parse_with_every_view(&buf);
    }

    #[test]
    fn mutated_valid_frames_never_panic(
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..8),
        keep in any::<usize>(),
    ) {
        let stream = mutate(valid_stream().to_vec(), &edits, keep);
        check_framing(&stream, DEFAULT_MAX_MESSAGE_SIZE);
        let startup = mutate(valid_startup().to_vec(), &edits, keep);
        check_startup(&startup);
    }

    #[test]
    fn valid_stream_split_anywhere_consumes_a_prefix_of_boundaries(cut in 0usize..512) {
        let stream = valid_stream();
        let cut = cut % (stream.len() + 1);
        let whole = messages(&stream, DEFAULT_MAX_MESSAGE_SIZE).count();
        let mut it = messages(&stream[..cut], DEFAULT_MAX_MESSAGE_SIZE);
        let seen = it.by_ref().filter(Result::is_ok).count();
        prop_assert!(seen <= whole);
        prop_assert!(it.consumed() <= cut);
        check_framing(&stream[..cut], DEFAULT_MAX_MESSAGE_SIZE);
    }

    #[test]
    fn random_startup_bodies_with_valid_lengths_never_panic(
        code in prop_oneof![Just(80_877_102u32), Just(80_877_103), Just(80_877_104), Just(196_608), Just(196_610), any::<u32>()],
        body in proptest::collection::vec(prop_oneof![Just(0u8), any::<u8>()], 0..300),
    ) {
        let mut buf = ((body.len() + 8) as u32).to_be_bytes().to_vec();
        buf.extend_from_slice(&code.to_be_bytes());
        buf.extend_from_slice(&body);
        check_startup(&buf);
    }

    #[test]
    fn random_bodies_in_valid_frames_never_panic(
        tag in any::<u8>(),
        body in proptest::collection::vec(prop_oneof![Just(0u8), Just(0xffu8), any::<u8>()], 0..300),
    ) {
        let mut buf = BytesMut::new();
        encode::message(&mut buf, tag, |b| b.extend_from_slice(&body));
        check_framing(&buf, DEFAULT_MAX_MESSAGE_SIZE);
        prop_assert_eq!(messages(&buf, DEFAULT_MAX_MESSAGE_SIZE).count(), 1);
    }
}
