//! Borrowed views of the server messages the proxy has to read.
//!
//! Each view's `parse` takes a message body (after tag and length, see [`crate::frame`]).
//! Layouts follow PostgreSQL docs §55.7; anything not read here (DataRow, RowDescription...)
//! passes through as bytes.

use crate::cursor::{split_cstr, Cursor};
use crate::startup::MAX_CANCEL_KEY_LEN;
use crate::{ProtoError, TxStatus};

/// Type bytes of backend (server to client) messages.
pub mod tag {
    /// Authentication request or result (the Int32 code says which).
    pub const AUTHENTICATION: u8 = b'R';
    /// ParameterStatus: a run-time parameter's current value.
    pub const PARAMETER_STATUS: u8 = b'S';
    /// BackendKeyData: process id and cancel key.
    pub const BACKEND_KEY_DATA: u8 = b'K';
    /// ReadyForQuery, carrying the transaction status.
    pub const READY_FOR_QUERY: u8 = b'Z';
    /// ErrorResponse.
    pub const ERROR_RESPONSE: u8 = b'E';
    /// NoticeResponse.
    pub const NOTICE_RESPONSE: u8 = b'N';
    /// CommandComplete, carrying the command tag.
    pub const COMMAND_COMPLETE: u8 = b'C';
    /// DataRow: one result row.
    pub const DATA_ROW: u8 = b'D';
    /// RowDescription: the columns of the rows to come.
    pub const ROW_DESCRIPTION: u8 = b'T';
    /// CopyInResponse: the server waits for COPY FROM STDIN data.
    pub const COPY_IN_RESPONSE: u8 = b'G';
    /// CopyOutResponse: COPY TO STDOUT data follows.
    pub const COPY_OUT_RESPONSE: u8 = b'H';
    /// CopyBothResponse: streaming replication's bidirectional copy.
    pub const COPY_BOTH_RESPONSE: u8 = b'W';
    /// CopyData from the server.
    pub const COPY_DATA: u8 = b'd';
    /// CopyDone from the server.
    pub const COPY_DONE: u8 = b'c';
    /// NotificationResponse: a LISTEN channel fired.
    pub const NOTIFICATION: u8 = b'A';
    /// NegotiateProtocolVersion: the server downgrades the minor version or options.
    pub const NEGOTIATE_PROTOCOL_VERSION: u8 = b'v';
    /// ParseComplete.
    pub const PARSE_COMPLETE: u8 = b'1';
    /// BindComplete.
    pub const BIND_COMPLETE: u8 = b'2';
    /// CloseComplete.
    pub const CLOSE_COMPLETE: u8 = b'3';
    /// EmptyQueryResponse: the query string was empty.
    pub const EMPTY_QUERY_RESPONSE: u8 = b'I';
    /// NoData: the statement returns no rows.
    pub const NO_DATA: u8 = b'n';
    /// ParameterDescription: the parameter types of a statement.
    pub const PARAMETER_DESCRIPTION: u8 = b't';
    /// PortalSuspended: Execute hit its row limit.
    pub const PORTAL_SUSPENDED: u8 = b's';
    /// FunctionCallResponse: the result of a fastpath FunctionCall.
    pub const FUNCTION_CALL_RESPONSE: u8 = b'V';
}

/// The Authentication ('R') request codes pgvigil distinguishes.
mod auth_code {
    pub(super) const OK: i32 = 0;
    pub(super) const CLEARTEXT_PASSWORD: i32 = 3;
    pub(super) const MD5_PASSWORD: i32 = 5;
    pub(super) const SASL: i32 = 10;
    pub(super) const SASL_CONTINUE: i32 = 11;
    pub(super) const SASL_FINAL: i32 = 12;
}

/// An Authentication ('R') message.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Authentication<'a> {
    /// AuthenticationOk: the client is in.
    Ok,
    /// AuthenticationCleartextPassword.
    CleartextPassword,
    /// AuthenticationMD5Password with its salt.
    Md5Password {
        /// The salt to hash the password with.
        salt: [u8; 4],
    },
    /// AuthenticationSASL with the offered mechanisms.
    Sasl {
        /// The mechanism names, each followed by a NUL (validated); read them with
        /// [`Authentication::sasl_mechanisms`].
        mechanisms: &'a [u8],
    },
    /// AuthenticationSASLContinue: a server challenge (for SCRAM, the server-first-message).
    SaslContinue {
        /// The mechanism-specific data.
        data: &'a [u8],
    },
    /// AuthenticationSASLFinal: the outcome data (for SCRAM, the server signature).
    SaslFinal {
        /// The mechanism-specific data.
        data: &'a [u8],
    },
    /// A method pgvigil does not handle (Kerberos, GSS, SSPI...); the body is not checked.
    Other {
        /// The request code.
        code: i32,
    },
}

impl<'a> Authentication<'a> {
    /// Reads an Authentication body.
    pub fn parse(body: &'a [u8]) -> Result<Self, ProtoError> {
        let mut c = Cursor::new(body);
        let auth = match c.i32("authentication code")? {
            auth_code::OK => Authentication::Ok,
            auth_code::CLEARTEXT_PASSWORD => Authentication::CleartextPassword,
            auth_code::MD5_PASSWORD => Authentication::Md5Password {
                salt: c.array("MD5 salt")?,
            },
            auth_code::SASL => {
                return sasl_mechanism_list(c.rest())
                    .map(|mechanisms| Authentication::Sasl { mechanisms })
            }
            auth_code::SASL_CONTINUE => return Ok(Authentication::SaslContinue { data: c.rest() }),
            auth_code::SASL_FINAL => return Ok(Authentication::SaslFinal { data: c.rest() }),
            code => return Ok(Authentication::Other { code }),
        };
        c.finish("Authentication")?;
        Ok(auth)
    }

    /// The mechanism names of an AuthenticationSASL; empty for every other variant.
    pub fn sasl_mechanisms(&self) -> impl Iterator<Item = &'a [u8]> + 'a {
        let list: &'a [u8] = match self {
            Authentication::Sasl { mechanisms } => mechanisms,
            _ => &[],
        };
        list.split(|&b| b == 0).take_while(|name| !name.is_empty())
    }
}

/// Checks a SASL mechanism list (C strings ended by an empty one) and returns it without the
/// final empty string.
fn sasl_mechanism_list(list: &[u8]) -> Result<&[u8], ProtoError> {
    let mut rest = list;
    loop {
        let (name, after) = split_cstr(rest).ok_or(ProtoError::MissingNul {
            what: "SASL mechanism name",
        })?;
        if name.is_empty() {
            return match after.len() {
                0 => Ok(list.get(..list.len() - 1).unwrap_or_default()),
                extra => Err(ProtoError::TrailingBytes {
                    what: "SASL mechanism list",
                    extra,
                }),
            };
        }
        rest = after;
    }
}

/// ReadyForQuery ('Z'): the server is idle and reports the transaction status.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct ReadyForQuery;

impl ReadyForQuery {
    /// The transaction status carried by a ReadyForQuery body.
    pub fn parse(body: &[u8]) -> Result<TxStatus, ProtoError> {
        let mut c = Cursor::new(body);
        let byte = c.u8("transaction status")?;
        c.finish("ReadyForQuery")?;
        TxStatus::from_byte(byte).ok_or(ProtoError::Invalid {
            what: "transaction status (expected 'I', 'T' or 'E')",
        })
    }
}

/// The fields of an ErrorResponse ('E') or NoticeResponse ('N'), validated once at parse time.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct ErrorFields<'a> {
    /// The `code value\0` runs without the final NUL.
    fields: &'a [u8],
}

impl<'a> ErrorFields<'a> {
    /// Reads an ErrorResponse or NoticeResponse body: `(Byte1 code, String value)*` then a NUL.
    pub fn parse(body: &'a [u8]) -> Result<Self, ProtoError> {
        let mut rest = body;
        loop {
            let (&code, after_code) = rest.split_first().ok_or(ProtoError::MissingNul {
                what: "error field list",
            })?;
            if code == 0 {
                return match after_code.len() {
                    0 => Ok(ErrorFields {
                        fields: body.get(..body.len() - 1).unwrap_or_default(),
                    }),
                    extra => Err(ProtoError::TrailingBytes {
                        what: "error field list",
                        extra,
                    }),
                };
            }
            let (_, after_value) = split_cstr(after_code).ok_or(ProtoError::MissingNul {
                what: "error field value",
            })?;
            rest = after_value;
        }
    }

    /// The `(field code, value)` pairs in the order the server sent them.
    pub fn iter(&self) -> impl Iterator<Item = (u8, &'a [u8])> + 'a {
        let mut rest = self.fields;
        std::iter::from_fn(move || {
            let (&code, after_code) = rest.split_first()?;
            let (value, after_value) = split_cstr(after_code)?;
            rest = after_value;
            Some((code, value))
        })
    }

    /// The value of field `code` (see PostgreSQL docs §55.8), if present.
    pub fn get(&self, code: u8) -> Option<&'a [u8]> {
        self.iter()
            .find(|&(c, _)| c == code)
            .map(|(_, value)| value)
    }

    /// The SQLSTATE ('C' field).
    pub fn sqlstate(&self) -> Option<&'a [u8]> {
        self.get(b'C')
    }

    /// The primary human-readable message ('M' field).
    pub fn message(&self) -> Option<&'a [u8]> {
        self.get(b'M')
    }

    /// The severity: the non-localised 'V' field (PostgreSQL 9.6+), else the possibly
    /// localised 'S' field.
    pub fn severity(&self) -> Option<&'a [u8]> {
        self.get(b'V').or_else(|| self.get(b'S'))
    }
}

/// ParameterStatus ('S'): a run-time parameter the client should track.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct ParameterStatus<'a> {
    /// The parameter name, e.g. `server_version`.
    pub name: &'a [u8],
    /// Its current value.
    pub value: &'a [u8],
}

impl<'a> ParameterStatus<'a> {
    /// Reads a ParameterStatus body.
    pub fn parse(body: &'a [u8]) -> Result<Self, ProtoError> {
        let mut c = Cursor::new(body);
        let name = c.cstr("parameter name")?;
        let value = c.cstr("parameter value")?;
        c.finish("ParameterStatus")?;
        Ok(ParameterStatus { name, value })
    }
}

/// BackendKeyData ('K'): what a client needs to cancel this session's queries.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct BackendKeyData<'a> {
    /// The backend process id.
    pub pid: u32,
    /// The secret key: 4 bytes in protocol 3.0, up to 256 in 3.2.
    pub key: &'a [u8],
}

impl<'a> BackendKeyData<'a> {
    /// Reads a BackendKeyData body; the key is the rest of the body, 1 to 256 bytes.
    pub fn parse(body: &'a [u8]) -> Result<Self, ProtoError> {
        let mut c = Cursor::new(body);
        let pid = c.u32("process id")?;
        let key = c.rest();
        if key.is_empty() || key.len() > MAX_CANCEL_KEY_LEN {
            return Err(ProtoError::Invalid {
                what: "cancel key length (expected 1 to 256 bytes)",
            });
        }
        Ok(BackendKeyData { pid, key })
    }
}

/// CommandComplete ('C'): a statement finished.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct CommandComplete<'a> {
    /// The command tag, e.g. `INSERT 0 1` or `SELECT 5`.
    pub tag: &'a [u8],
}

impl<'a> CommandComplete<'a> {
    /// Reads a CommandComplete body.
    pub fn parse(body: &'a [u8]) -> Result<Self, ProtoError> {
        let mut c = Cursor::new(body);
        let tag = c.cstr("command tag")?;
        c.finish("CommandComplete")?;
        Ok(CommandComplete { tag })
    }
}

/// NotificationResponse ('A'): a NOTIFY on a channel this session LISTENs to.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct NotificationResponse<'a> {
    /// The notifying backend's process id.
    pub pid: u32,
    /// The channel name.
    pub channel: &'a [u8],
    /// The payload string (empty if none).
    pub payload: &'a [u8],
}

impl<'a> NotificationResponse<'a> {
    /// Reads a NotificationResponse body.
    pub fn parse(body: &'a [u8]) -> Result<Self, ProtoError> {
        let mut c = Cursor::new(body);
        let pid = c.u32("process id")?;
        let channel = c.cstr("channel name")?;
        let payload = c.cstr("notification payload")?;
        c.finish("NotificationResponse")?;
        Ok(NotificationResponse {
            pid,
            channel,
            payload,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authentication_codes() {
        assert_eq!(Authentication::parse(b"\0\0\0\0"), Ok(Authentication::Ok));
        assert_eq!(
            Authentication::parse(b"\0\0\0\x07"),
            Ok(Authentication::Other { code: 7 })
        );
        assert!(matches!(
            Authentication::parse(b"\0\0\0\0x"),
            Err(ProtoError::TrailingBytes { .. })
        ));
        assert!(matches!(
            Authentication::parse(b"\0\0\0\x05abc"),
            Err(ProtoError::Truncated { .. })
        ));
        assert!(matches!(
            Authentication::parse(b"\0\0"),
            Err(ProtoError::Truncated { .. })
        ));
        assert_eq!(Authentication::Ok.sasl_mechanisms().count(), 0);
    }

    #[test]
    fn sasl_mechanism_lists() {
        let auth = Authentication::parse(b"\0\0\0\x0aSCRAM-SHA-256\0\0").unwrap();
        assert_eq!(
            auth.sasl_mechanisms().collect::<Vec<_>>(),
            [&b"SCRAM-SHA-256"[..]]
        );
        let empty = Authentication::parse(b"\0\0\0\x0a\0").unwrap();
        assert_eq!(empty.sasl_mechanisms().count(), 0);
        assert!(matches!(
            Authentication::parse(b"\0\0\0\x0aSCRAM\0"),
            Err(ProtoError::MissingNul { .. })
        ));
        assert!(matches!(
            Authentication::parse(b"\0\0\0\x0a\0x"),
            Err(ProtoError::TrailingBytes { .. })
        ));
    }

    #[test]
    fn ready_for_query_status() {
        assert_eq!(ReadyForQuery::parse(b"T"), Ok(TxStatus::InTransaction));
        assert!(matches!(
            ReadyForQuery::parse(b"Q"),
            Err(ProtoError::Invalid { .. })
        ));
        assert!(matches!(
            ReadyForQuery::parse(b""),
            Err(ProtoError::Truncated { .. })
        ));
        assert!(matches!(
            ReadyForQuery::parse(b"II"),
            Err(ProtoError::TrailingBytes { .. })
        ));
    }

    #[test]
    fn error_fields_from_a_real_server_layout() {
        let body = b"SERROR\0VERROR\0C42P01\0Mrelation \"t\" does not exist\0P15\0Fparse_relation.c\0L1449\0\0";
        let fields = ErrorFields::parse(body).unwrap();
        assert_eq!(fields.sqlstate(), Some(&b"42P01"[..]));
        assert_eq!(fields.get(b'P'), Some(&b"15"[..]));
        assert_eq!(fields.iter().count(), 7);
        let localised = ErrorFields::parse(b"SFEHLER\0C28P01\0\0").unwrap();
        assert_eq!(localised.severity(), Some(&b"FEHLER"[..]));
        assert_eq!(localised.message(), None);
        assert_eq!(ErrorFields::parse(b"\0").unwrap().iter().count(), 0);
    }

    #[test]
    fn malformed_error_fields() {
        assert_eq!(
            ErrorFields::parse(b""),
            Err(ProtoError::MissingNul {
                what: "error field list"
            })
        );
        assert_eq!(
            ErrorFields::parse(b"SERROR\0"),
            Err(ProtoError::MissingNul {
                what: "error field list"
            })
        );
        assert_eq!(
            ErrorFields::parse(b"SERROR"),
            Err(ProtoError::MissingNul {
                what: "error field value"
            })
        );
        assert!(matches!(
            ErrorFields::parse(b"\0\0"),
            Err(ProtoError::TrailingBytes { .. })
        ));
    }

    #[test]
    fn small_views() {
        assert_eq!(
            ParameterStatus::parse(b"TimeZone\0UTC\0"),
            Ok(ParameterStatus {
                name: b"TimeZone",
                value: b"UTC"
            })
        );
        assert!(ParameterStatus::parse(b"TimeZone\0UTC").is_err());
        assert_eq!(
            CommandComplete::parse(b"INSERT 0 1\0"),
            Ok(CommandComplete { tag: b"INSERT 0 1" })
        );
        assert_eq!(
            NotificationResponse::parse(b"\0\0\x01\0chan\0hi\0"),
            Ok(NotificationResponse {
                pid: 256,
                channel: b"chan",
                payload: b"hi"
            })
        );
        assert!(NotificationResponse::parse(b"\0\0\x01\0chan\0").is_err());
    }

    #[test]
    fn backend_key_data_key_lengths() {
        let mut body = 7u32.to_be_bytes().to_vec();
        assert!(matches!(
            BackendKeyData::parse(&body),
            Err(ProtoError::Invalid { .. })
        ));
        body.extend_from_slice(&[1; 32]);
        assert_eq!(
            BackendKeyData::parse(&body),
            Ok(BackendKeyData {
                pid: 7,
                key: &[1; 32]
            })
        );
        body.extend_from_slice(&[1; 225]);
        assert!(matches!(
            BackendKeyData::parse(&body),
            Err(ProtoError::Invalid { .. })
        ));
        assert!(matches!(
            BackendKeyData::parse(b"\0\0"),
            Err(ProtoError::Truncated { .. })
        ));
    }
}
