//! Builders that append whole protocol messages to a [`BytesMut`], with no intermediate buffer.
//!
//! Server-role builders are what pgvigil sends to its clients (authentication, errors, session
//! state); client-role builders are what it sends to PostgreSQL nodes. Strings are written as C
//! strings: one holding a NUL is cut at the NUL, because a NUL inside would end the field early
//! and desynchronise the peer's parser.

use bytes::{BufMut, BytesMut};

use crate::backend::tag as be;
use crate::frontend::tag as fe;
use crate::startup::{ProtocolVersion, CANCEL_REQUEST_CODE, SSL_REQUEST_CODE};
use crate::TxStatus;

/// Appends one tagged message: writes `tag` and a placeholder length, lets `body` append the
/// body, then back-patches the length.
///
/// Bodies must stay under 2 GiB, the protocol's Int32 limit; pgvigil's own messages are tiny.
pub fn message(buf: &mut BytesMut, tag: u8, body: impl FnOnce(&mut BytesMut)) {
    buf.put_u8(tag);
    length_prefixed(buf, body);
}

/// Appends an Int32 length placeholder, the body, and patches the length (which counts itself).
fn length_prefixed(buf: &mut BytesMut, body: impl FnOnce(&mut BytesMut)) {
    let start = buf.len();
    buf.put_u32(0);
    body(buf);
    let len = buf.len() - start;
    debug_assert!(
        len <= i32::MAX as usize,
        "message body over the protocol's 2 GiB limit"
    );
    // The four bytes at `start` were written just above, so this range is in bounds.
    buf[start..start + 4].copy_from_slice(&(len as u32).to_be_bytes());
}

/// Appends `s` and a NUL, cutting `s` at its first NUL if it has one.
fn put_cstr(buf: &mut BytesMut, s: &[u8]) {
    let end = s.iter().position(|&b| b == 0).unwrap_or(s.len());
    buf.put_slice(s.get(..end).unwrap_or_default());
    buf.put_u8(0);
}

/// The severities pgvigil reports in its own ErrorResponses.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Severity {
    /// The current statement failed; the session goes on.
    Error,
    /// The session is over; pgvigil closes the connection after sending it.
    Fatal,
}

impl Severity {
    /// The severity word PostgreSQL writes in the 'S' and 'V' fields.
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "ERROR",
            Severity::Fatal => "FATAL",
        }
    }
}

/// An error pgvigil reports to a client, as an ErrorResponse.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct PgError<'a> {
    /// ERROR or FATAL.
    pub severity: Severity,
    /// The SQLSTATE, one of [`crate::sqlstate`].
    pub code: &'a str,
    /// The primary message: short, lower case, no trailing period (PostgreSQL style).
    pub message: &'a str,
    /// An optional detail line with facts.
    pub detail: Option<&'a str>,
    /// An optional hint saying what to do.
    pub hint: Option<&'a str>,
}

/// Appends the fields of an ErrorResponse or NoticeResponse body and the final NUL.
fn error_fields(
    buf: &mut BytesMut,
    severity: &str,
    code: &str,
    message: &str,
    extra: &[(u8, Option<&str>)],
) {
    // 'V' is the non-localised severity (PostgreSQL 9.6+); we never localise, so both match.
    for (field, value) in [
        (b'S', severity),
        (b'V', severity),
        (b'C', code),
        (b'M', message),
    ] {
        buf.put_u8(field);
        put_cstr(buf, value.as_bytes());
    }
    for &(field, value) in extra {
        if let Some(value) = value {
            buf.put_u8(field);
            put_cstr(buf, value.as_bytes());
        }
    }
    buf.put_u8(0);
}

/// Appends an ErrorResponse with severity, SQLSTATE and message.
pub fn error_response(buf: &mut BytesMut, severity: &str, sqlstate: &str, message: &str) {
    self::message(buf, be::ERROR_RESPONSE, |b| {
        error_fields(b, severity, sqlstate, message, &[])
    });
}

/// Appends an ErrorResponse for `err`, with its detail ('D') and hint ('H') when present.
pub fn error_response_with(buf: &mut BytesMut, err: &PgError<'_>) {
    message(buf, be::ERROR_RESPONSE, |b| {
        let extra = [(b'D', err.detail), (b'H', err.hint)];
        error_fields(b, err.severity.as_str(), err.code, err.message, &extra);
    });
}

/// Appends a NoticeResponse; `severity` is WARNING, NOTICE, INFO, LOG or DEBUG.
pub fn notice_response(buf: &mut BytesMut, severity: &str, sqlstate: &str, message: &str) {
    self::message(buf, be::NOTICE_RESPONSE, |b| {
        error_fields(b, severity, sqlstate, message, &[])
    });
}

/// Appends an Authentication message with `code` and a body tail written by `rest`.
fn authentication(buf: &mut BytesMut, code: i32, rest: impl FnOnce(&mut BytesMut)) {
    message(buf, be::AUTHENTICATION, |b| {
        b.put_i32(code);
        rest(b);
    });
}

/// Appends AuthenticationOk.
pub fn auth_ok(buf: &mut BytesMut) {
    authentication(buf, 0, |_| {});
}

/// Appends AuthenticationCleartextPassword.
pub fn auth_cleartext_password(buf: &mut BytesMut) {
    authentication(buf, 3, |_| {});
}

/// Appends AuthenticationMD5Password with `salt`.
pub fn auth_md5_password(buf: &mut BytesMut, salt: [u8; 4]) {
    authentication(buf, 5, |b| b.put_slice(&salt));
}

/// Appends AuthenticationSASL offering `mechanisms` in order of preference.
pub fn auth_sasl(buf: &mut BytesMut, mechanisms: &[&str]) {
    authentication(buf, 10, |b| {
        for mechanism in mechanisms.iter().filter(|m| !m.is_empty()) {
            put_cstr(b, mechanism.as_bytes());
        }
        b.put_u8(0);
    });
}

/// Appends AuthenticationSASLContinue carrying `data` (the SCRAM server-first-message).
pub fn auth_sasl_continue(buf: &mut BytesMut, data: &[u8]) {
    authentication(buf, 11, |b| b.put_slice(data));
}

/// Appends AuthenticationSASLFinal carrying `data` (the SCRAM server-final-message).
pub fn auth_sasl_final(buf: &mut BytesMut, data: &[u8]) {
    authentication(buf, 12, |b| b.put_slice(data));
}

/// Appends ParameterStatus `name = value`.
pub fn parameter_status(buf: &mut BytesMut, name: &[u8], value: &[u8]) {
    message(buf, be::PARAMETER_STATUS, |b| {
        put_cstr(b, name);
        put_cstr(b, value);
    });
}

/// Appends BackendKeyData; `key` is 4 bytes for protocol 3.0 clients, up to 256 for 3.2.
pub fn backend_key_data(buf: &mut BytesMut, pid: u32, key: &[u8]) {
    message(buf, be::BACKEND_KEY_DATA, |b| {
        b.put_u32(pid);
        b.put_slice(key);
    });
}

/// Appends ReadyForQuery with the session's transaction status.
pub fn ready_for_query(buf: &mut BytesMut, status: TxStatus) {
    message(buf, be::READY_FOR_QUERY, |b| b.put_u8(status.as_byte()));
}

/// The type of a column pgvigil itself returns (its SQL console's result sets).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum ColumnType {
    /// `text` (OID 25).
    Text,
    /// `bigint` (OID 20).
    Int8,
}

impl ColumnType {
    fn oid_and_size(self) -> (u32, i16) {
        match self {
            ColumnType::Text => (25, -1),
            ColumnType::Int8 => (20, 8),
        }
    }
}

/// Appends RowDescription for columns (name, type), every one in text format and from no table.
pub fn row_description(buf: &mut BytesMut, columns: &[(&str, ColumnType)]) {
    message(buf, be::ROW_DESCRIPTION, |b| {
        b.put_u16(columns.len() as u16);
        for (name, ty) in columns {
            let (oid, size) = ty.oid_and_size();
            put_cstr(b, name.as_bytes());
            b.put_u32(0); // table OID
            b.put_u16(0); // column number
            b.put_u32(oid);
            b.put_i16(size);
            b.put_i32(-1); // type modifier
            b.put_u16(0); // text format
        }
    });
}

/// Appends DataRow with `values` in text format (`None` is SQL NULL).
pub fn data_row(buf: &mut BytesMut, values: &[Option<&str>]) {
    message(buf, be::DATA_ROW, |b| {
        b.put_u16(values.len() as u16);
        for value in values {
            match value {
                Some(text) => {
                    b.put_u32(text.len() as u32);
                    b.put_slice(text.as_bytes());
                }
                None => b.put_i32(-1),
            }
        }
    });
}

/// Appends CommandComplete with its command tag (`SHOW`, `PAUSE`, ...).
pub fn command_complete(buf: &mut BytesMut, tag: &str) {
    message(buf, be::COMMAND_COMPLETE, |b| put_cstr(b, tag.as_bytes()));
}

/// Appends EmptyQueryResponse (the answer to a Query holding no statement).
pub fn empty_query_response(buf: &mut BytesMut) {
    message(buf, be::EMPTY_QUERY_RESPONSE, |_| {});
}

/// Appends NegotiateProtocolVersion: protocol 3.`newest_minor` is the best we speak, and the
/// `_pq_.` options in `unrecognized` were ignored.
pub fn negotiate_protocol_version(buf: &mut BytesMut, newest_minor: u32, unrecognized: &[&[u8]]) {
    message(buf, be::NEGOTIATE_PROTOCOL_VERSION, |b| {
        // The docs call this field the "newest minor version", but PostgreSQL sends and libpq
        // reads the whole version code (major << 16 | minor).
        b.put_u32((3 << 16) | (newest_minor & 0xffff));
        b.put_u32(unrecognized.len() as u32);
        for option in unrecognized {
            put_cstr(b, option);
        }
    });
}

/// Appends a protocol 3.0 StartupMessage with `params`; pairs with an empty name are skipped,
/// since an empty name ends the list.
pub fn startup_message(buf: &mut BytesMut, params: &[(&[u8], &[u8])]) {
    length_prefixed(buf, |b| {
        b.put_u32(ProtocolVersion::V3_0.code());
        for (name, value) in params
            .iter()
            .filter(|(name, _)| name.first().is_some_and(|&c| c != 0))
        {
            put_cstr(b, name);
            put_cstr(b, value);
        }
        b.put_u8(0);
    });
}

/// Appends an SSLRequest.
pub fn ssl_request(buf: &mut BytesMut) {
    length_prefixed(buf, |b| b.put_u32(SSL_REQUEST_CODE));
}

/// Appends a CancelRequest for backend `pid` with its secret `key`.
pub fn cancel_request(buf: &mut BytesMut, pid: u32, key: &[u8]) {
    length_prefixed(buf, |b| {
        b.put_u32(CANCEL_REQUEST_CODE);
        b.put_u32(pid);
        b.put_slice(key);
    });
}

/// Appends a PasswordMessage (cleartext or `md5...` hash); the NUL is added here.
pub fn password_message(buf: &mut BytesMut, password: &[u8]) {
    message(buf, fe::PASSWORD, |b| put_cstr(b, password));
}

/// Appends a SASLInitialResponse choosing `mechanism` with the client-first-message `data`.
pub fn sasl_initial_response(buf: &mut BytesMut, mechanism: &str, data: &[u8]) {
    message(buf, fe::PASSWORD, |b| {
        put_cstr(b, mechanism.as_bytes());
        b.put_u32(data.len() as u32);
        b.put_slice(data);
    });
}

/// Appends a SASLResponse carrying `data` (the SCRAM client-final-message).
pub fn sasl_response(buf: &mut BytesMut, data: &[u8]) {
    message(buf, fe::PASSWORD, |b| b.put_slice(data));
}

/// Appends a simple-protocol Query.
pub fn query(buf: &mut BytesMut, sql: &[u8]) {
    message(buf, fe::QUERY, |b| put_cstr(b, sql));
}

/// Appends a Sync.
pub fn sync(buf: &mut BytesMut) {
    message(buf, fe::SYNC, |_| {});
}

/// Appends a Terminate.
pub fn terminate(buf: &mut BytesMut) {
    message(buf, fe::TERMINATE, |_| {});
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{
        Authentication, BackendKeyData, ErrorFields, ParameterStatus, ReadyForQuery,
    };
    use crate::frontend::{PasswordMessage, Query, SaslInitialResponse, SaslResponse};
    use crate::startup::{parse_startup, StartupPacket};
    use crate::{next_message, Message, DEFAULT_MAX_MESSAGE_SIZE};

    /// A builder taking no arguments besides the buffer.
    type Builder = fn(&mut BytesMut);

    /// Builds one message with `build` and reads it back as a single whole frame.
    fn one(build: impl FnOnce(&mut BytesMut)) -> (u8, Vec<u8>) {
        let mut buf = BytesMut::new();
        build(&mut buf);
        let Message { tag, body } = next_message(&buf, DEFAULT_MAX_MESSAGE_SIZE)
            .unwrap()
            .unwrap();
        assert_eq!(5 + body.len(), buf.len(), "exactly one frame");
        (tag, body.to_vec())
    }

    #[test]
    fn result_set_messages_have_their_fields_in_order() {
        let (tag, body) = one(|b| row_description(b, &[("n", ColumnType::Int8)]));
        assert_eq!(tag, b'T');
        assert_eq!(
            &body[..],
            b"\0\x01n\0\0\0\0\0\0\0\0\0\0\x14\0\x08\xff\xff\xff\xff\0\0"
        );
        let (tag, body) = one(|b| data_row(b, &[Some("ab"), None]));
        assert_eq!(tag, b'D');
        assert_eq!(&body[..], b"\0\x02\0\0\0\x02ab\xff\xff\xff\xff");
        let (tag, body) = one(|b| command_complete(b, "SHOW"));
        assert_eq!((tag, &body[..]), (b'C', &b"SHOW\0"[..]));
    }

    #[test]
    fn message_back_patches_the_length_after_existing_bytes() {
        let mut buf = BytesMut::from(&b"xyz"[..]);
        message(&mut buf, b'Q', |b| b.put_slice(b"ab"));
        assert_eq!(&buf[..], b"xyzQ\0\0\0\x06ab");
    }

    #[test]
    fn error_response_round_trips() {
        let (tag, body) = one(|b| error_response(b, "FATAL", "57P01", "terminating"));
        assert_eq!(tag, be::ERROR_RESPONSE);
        let fields = ErrorFields::parse(&body).unwrap();
        assert_eq!(fields.severity(), Some(&b"FATAL"[..]));
        assert_eq!(fields.get(b'S'), Some(&b"FATAL"[..]));
        assert_eq!(fields.sqlstate(), Some(&b"57P01"[..]));
        assert_eq!(fields.message(), Some(&b"terminating"[..]));
        assert_eq!(fields.iter().count(), 4);
    }

    #[test]
    fn error_response_with_detail_and_hint_round_trips() {
        let err = PgError {
            severity: Severity::Error,
            code: crate::sqlstate::CANNOT_CONNECT_NOW,
            message: "no primary is available",
            detail: Some("failover in progress"),
            hint: None,
        };
        let (_, body) = one(|b| error_response_with(b, &err));
        let fields = ErrorFields::parse(&body).unwrap();
        let codes: Vec<u8> = fields.iter().map(|(c, _)| c).collect();
        assert_eq!(codes, b"SVCMD");
        assert_eq!(fields.get(b'D'), Some(&b"failover in progress"[..]));
        assert_eq!(fields.get(b'H'), None);
        assert_eq!(fields.severity(), Some(&b"ERROR"[..]));
    }

    #[test]
    fn notice_response_uses_its_own_tag() {
        let (tag, body) = one(|b| notice_response(b, "WARNING", "01000", "careful"));
        assert_eq!(tag, be::NOTICE_RESPONSE);
        assert_eq!(
            ErrorFields::parse(&body).unwrap().message(),
            Some(&b"careful"[..])
        );
    }

    #[test]
    fn embedded_nul_is_cut_not_smuggled() {
        let (_, body) = one(|b| error_response(b, "ERROR", "XX000", "bad\0M-injected"));
        let fields = ErrorFields::parse(&body).unwrap();
        assert_eq!(fields.message(), Some(&b"bad"[..]));
        assert_eq!(fields.iter().count(), 4);
    }

    #[test]
    fn authentication_messages_round_trip() {
        let cases: [(Builder, Authentication<'_>); 6] = [
            (auth_ok, Authentication::Ok),
            (auth_cleartext_password, Authentication::CleartextPassword),
            (
                |b| auth_md5_password(b, *b"salt"),
                Authentication::Md5Password { salt: *b"salt" },
            ),
            (
                |b| auth_sasl_continue(b, b"r=abc"),
                Authentication::SaslContinue { data: b"r=abc" },
            ),
            (
                |b| auth_sasl_final(b, b"v=xyz"),
                Authentication::SaslFinal { data: b"v=xyz" },
            ),
            (
                |b| auth_sasl(b, &["SCRAM-SHA-256", "SCRAM-SHA-256-PLUS"]),
                Authentication::Sasl {
                    mechanisms: b"SCRAM-SHA-256\0SCRAM-SHA-256-PLUS\0",
                },
            ),
        ];
        for (build, expected) in cases {
            let (tag, body) = one(build);
            assert_eq!(tag, be::AUTHENTICATION);
            assert_eq!(Authentication::parse(&body), Ok(expected));
        }
        let (_, body) = one(|b| auth_sasl(b, &["SCRAM-SHA-256", "SCRAM-SHA-256-PLUS"]));
        let names: Vec<&[u8]> = Authentication::parse(&body)
            .unwrap()
            .sasl_mechanisms()
            .collect();
        assert_eq!(names, [&b"SCRAM-SHA-256"[..], b"SCRAM-SHA-256-PLUS"]);
    }

    #[test]
    fn session_state_messages_round_trip() {
        let (_, body) = one(|b| parameter_status(b, b"server_version", b"17.2"));
        let ps = ParameterStatus::parse(&body).unwrap();
        assert_eq!((ps.name, ps.value), (&b"server_version"[..], &b"17.2"[..]));
        let (_, body) = one(|b| backend_key_data(b, 4242, b"k3y!"));
        assert_eq!(
            BackendKeyData::parse(&body),
            Ok(BackendKeyData {
                pid: 4242,
                key: b"k3y!"
            })
        );
        for status in [TxStatus::Idle, TxStatus::InTransaction, TxStatus::Failed] {
            let (tag, body) = one(|b| ready_for_query(b, status));
            assert_eq!(tag, be::READY_FOR_QUERY);
            assert_eq!(ReadyForQuery::parse(&body), Ok(status));
        }
    }

    #[test]
    fn negotiate_protocol_version_layout() {
        let (tag, body) = one(|b| negotiate_protocol_version(b, 0, &[b"_pq_.x", b"_pq_.y"]));
        assert_eq!(tag, be::NEGOTIATE_PROTOCOL_VERSION);
        assert_eq!(body, b"\0\x03\0\0\0\0\0\x02_pq_.x\0_pq_.y\0");
    }

    #[test]
    fn client_messages_round_trip() {
        let (tag, body) = one(|b| query(b, b"select 1"));
        assert_eq!(
            (tag, Query::parse(&body).unwrap().sql),
            (fe::QUERY, &b"select 1"[..])
        );
        let (tag, body) = one(|b| password_message(b, b"md5abc"));
        assert_eq!(
            (tag, PasswordMessage::parse(&body).unwrap().password),
            (fe::PASSWORD, &b"md5abc"[..])
        );
        let (_, body) = one(|b| sasl_initial_response(b, "SCRAM-SHA-256", b"n,,n=,r=x"));
        assert_eq!(
            SaslInitialResponse::parse(&body),
            Ok(SaslInitialResponse {
                mechanism: b"SCRAM-SHA-256",
                data: Some(b"n,,n=,r=x")
            })
        );
        let (_, body) = one(|b| sasl_response(b, b"c=biws"));
        assert_eq!(SaslResponse::parse(&body).unwrap().data, b"c=biws");
        assert_eq!(one(sync), (fe::SYNC, vec![]));
        assert_eq!(one(terminate), (fe::TERMINATE, vec![]));
    }

    #[test]
    fn startup_phase_packets_round_trip() {
        let mut buf = BytesMut::new();
        startup_message(
            &mut buf,
            &[(b"user", b"alice"), (b"", b"skipped"), (b"database", b"db")],
        );
        let (packet, used) = parse_startup(&buf).unwrap().unwrap();
        assert_eq!(used, buf.len());
        let StartupPacket::Startup { version, params } = packet else {
            panic!("{packet:?}")
        };
        assert_eq!(version, ProtocolVersion::V3_0);
        let pairs: Vec<_> = params.iter().collect();
        assert_eq!(pairs, [(&b"user"[..], &b"alice"[..]), (b"database", b"db")]);

        let mut buf = BytesMut::new();
        ssl_request(&mut buf);
        assert_eq!(
            parse_startup(&buf),
            Ok(Some((StartupPacket::SslRequest, 8)))
        );

        let mut buf = BytesMut::new();
        cancel_request(&mut buf, 99, b"abcd");
        assert_eq!(
            parse_startup(&buf),
            Ok(Some((
                StartupPacket::Cancel {
                    pid: 99,
                    key: b"abcd"
                },
                16
            )))
        );
    }
}
