//! Borrowed views of the client messages the proxy has to read.
//!
//! Each view's `parse` takes a message body (after tag and length, see [`crate::frame`]) and
//! checks it as strictly as the PostgreSQL backend would, so that a message pgvigil routes is a
//! message the server will accept. Layouts follow PostgreSQL docs §55.7.

use crate::cursor::Cursor;
use crate::ProtoError;

/// Type bytes of frontend (client to server) messages.
pub mod tag {
    /// Query: one simple-protocol SQL string.
    pub const QUERY: u8 = b'Q';
    /// Parse: create a prepared statement.
    pub const PARSE: u8 = b'P';
    /// Bind: create a portal from a prepared statement.
    pub const BIND: u8 = b'B';
    /// Describe a statement or portal.
    pub const DESCRIBE: u8 = b'D';
    /// Execute a portal.
    pub const EXECUTE: u8 = b'E';
    /// Close a statement or portal.
    pub const CLOSE: u8 = b'C';
    /// Sync: end of an extended-protocol batch.
    pub const SYNC: u8 = b'S';
    /// Flush: ask the server to send what it has buffered.
    pub const FLUSH: u8 = b'H';
    /// Terminate: the client is closing the connection.
    pub const TERMINATE: u8 = b'X';
    /// FunctionCall: the fastpath interface (libpq large objects use it).
    pub const FUNCTION_CALL: u8 = b'F';
    /// CopyData from the client during COPY FROM STDIN.
    pub const COPY_DATA: u8 = b'd';
    /// CopyDone: the client finished COPY FROM STDIN.
    pub const COPY_DONE: u8 = b'c';
    /// CopyFail: the client aborts COPY FROM STDIN.
    pub const COPY_FAIL: u8 = b'f';
    /// PasswordMessage, and also GSSResponse, SASLInitialResponse and SASLResponse: the
    /// authentication exchange in progress tells them apart.
    pub const PASSWORD: u8 = b'p';
}

/// True for the tags a client may send after startup.
pub fn is_known_frontend_tag(tag: u8) -> bool {
    matches!(
        tag,
        tag::QUERY
            | tag::PARSE
            | tag::BIND
            | tag::DESCRIBE
            | tag::EXECUTE
            | tag::CLOSE
            | tag::SYNC
            | tag::FLUSH
            | tag::TERMINATE
            | tag::FUNCTION_CALL
            | tag::COPY_DATA
            | tag::COPY_DONE
            | tag::COPY_FAIL
            | tag::PASSWORD
    )
}

/// A simple-protocol Query ('Q').
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Query<'a> {
    /// The SQL text without its NUL; may hold several statements.
    pub sql: &'a [u8],
}

impl<'a> Query<'a> {
    /// Reads a Query body.
    pub fn parse(body: &'a [u8]) -> Result<Self, ProtoError> {
        let mut c = Cursor::new(body);
        let sql = c.cstr("query string")?;
        c.finish("Query")?;
        Ok(Query { sql })
    }
}

/// An extended-protocol Parse ('P').
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Parse<'a> {
    /// The prepared statement's name; empty for the unnamed statement.
    pub name: &'a [u8],
    /// The SQL text of the single statement.
    pub sql: &'a [u8],
    /// How many parameter type OIDs the client specified (the OIDs are checked, not exposed).
    pub param_type_count: u16,
}

impl<'a> Parse<'a> {
    /// Reads a Parse body, including the parameter type OID array's exact length.
    #[expect(
        clippy::self_named_constructors,
        reason = "every view is read with `parse`; this message happens to be named Parse"
    )]
    pub fn parse(body: &'a [u8]) -> Result<Self, ProtoError> {
        let mut c = Cursor::new(body);
        let name = c.cstr("statement name")?;
        let sql = c.cstr("query string")?;
        let param_type_count = c.u16("parameter type count")?;
        c.bytes(usize::from(param_type_count) * 4, "parameter type OIDs")?;
        c.finish("Parse")?;
        Ok(Parse {
            name,
            sql,
            param_type_count,
        })
    }
}

/// An extended-protocol Bind ('B'); only the names are exposed, parameter values pass through.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Bind<'a> {
    /// The destination portal; empty for the unnamed portal.
    pub portal: &'a [u8],
    /// The source prepared statement; empty for the unnamed statement.
    pub statement: &'a [u8],
}

impl<'a> Bind<'a> {
    /// Reads a Bind body and checks the structure of the format codes and parameter values.
    pub fn parse(body: &'a [u8]) -> Result<Self, ProtoError> {
        let mut c = Cursor::new(body);
        let portal = c.cstr("portal name")?;
        let statement = c.cstr("statement name")?;
        let format_count = c.u16("parameter format code count")?;
        c.bytes(usize::from(format_count) * 2, "parameter format codes")?;
        for _ in 0..c.u16("parameter value count")? {
            let len = c.i32("parameter value length")?;
            // -1 is NULL with no bytes; any other negative length is an error in PostgreSQL too.
            if len != -1 {
                let len = usize::try_from(len).map_err(|_| ProtoError::Invalid {
                    what: "parameter value length",
                })?;
                c.bytes(len, "parameter value")?;
            }
        }
        let result_format_count = c.u16("result format code count")?;
        c.bytes(usize::from(result_format_count) * 2, "result format codes")?;
        c.finish("Bind")?;
        Ok(Bind { portal, statement })
    }

    /// Reads only the names at the start of a Bind body that may be cut short after them (a
    /// large Bind whose parameter values have not all arrived).
    pub fn names(body: &'a [u8]) -> Result<Self, ProtoError> {
        let mut c = Cursor::new(body);
        let portal = c.cstr("portal name")?;
        let statement = c.cstr("statement name")?;
        Ok(Bind { portal, statement })
    }
}

/// What a Describe or Close refers to: `S` for a prepared statement, `P` for a portal.
fn statement_or_portal(c: &mut Cursor<'_>) -> Result<u8, ProtoError> {
    match c.u8("statement/portal kind")? {
        kind @ (b'S' | b'P') => Ok(kind),
        _ => Err(ProtoError::Invalid {
            what: "statement/portal kind (expected 'S' or 'P')",
        }),
    }
}

/// An extended-protocol Describe ('D').
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Describe<'a> {
    /// `b'S'` to describe a prepared statement, `b'P'` a portal.
    pub kind: u8,
    /// The statement or portal name; empty for the unnamed one.
    pub name: &'a [u8],
}

impl<'a> Describe<'a> {
    /// Reads a Describe body.
    pub fn parse(body: &'a [u8]) -> Result<Self, ProtoError> {
        let mut c = Cursor::new(body);
        let kind = statement_or_portal(&mut c)?;
        let name = c.cstr("statement/portal name")?;
        c.finish("Describe")?;
        Ok(Describe { kind, name })
    }
}

/// An extended-protocol Close ('C').
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Close<'a> {
    /// `b'S'` to close a prepared statement, `b'P'` a portal.
    pub kind: u8,
    /// The statement or portal name; empty for the unnamed one.
    pub name: &'a [u8],
}

impl<'a> Close<'a> {
    /// Reads a Close body.
    pub fn parse(body: &'a [u8]) -> Result<Self, ProtoError> {
        let mut c = Cursor::new(body);
        let kind = statement_or_portal(&mut c)?;
        let name = c.cstr("statement/portal name")?;
        c.finish("Close")?;
        Ok(Close { kind, name })
    }
}

/// An extended-protocol Execute ('E').
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Execute<'a> {
    /// The portal to run; empty for the unnamed portal.
    pub portal: &'a [u8],
    /// The row limit; 0 means no limit.
    pub max_rows: i32,
}

impl<'a> Execute<'a> {
    /// Reads an Execute body.
    pub fn parse(body: &'a [u8]) -> Result<Self, ProtoError> {
        let mut c = Cursor::new(body);
        let portal = c.cstr("portal name")?;
        let max_rows = c.i32("maximum row count")?;
        c.finish("Execute")?;
        Ok(Execute { portal, max_rows })
    }
}

/// A PasswordMessage ('p') answering a cleartext or MD5 password request.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct PasswordMessage<'a> {
    /// The password (or `md5`-prefixed hash) without its NUL.
    pub password: &'a [u8],
}

impl<'a> PasswordMessage<'a> {
    /// Reads a PasswordMessage body.
    pub fn parse(body: &'a [u8]) -> Result<Self, ProtoError> {
        let mut c = Cursor::new(body);
        let password = c.cstr("password")?;
        c.finish("PasswordMessage")?;
        Ok(PasswordMessage { password })
    }
}

/// A SASLInitialResponse ('p'): the mechanism chosen and the client-first-message.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct SaslInitialResponse<'a> {
    /// The SASL mechanism name, e.g. `SCRAM-SHA-256`.
    pub mechanism: &'a [u8],
    /// The initial response; `None` when the client sent length -1.
    pub data: Option<&'a [u8]>,
}

impl<'a> SaslInitialResponse<'a> {
    /// Reads a SASLInitialResponse body.
    pub fn parse(body: &'a [u8]) -> Result<Self, ProtoError> {
        let mut c = Cursor::new(body);
        let mechanism = c.cstr("SASL mechanism name")?;
        let data = match c.i32("SASL initial response length")? {
            -1 => None,
            len => {
                let len = usize::try_from(len).map_err(|_| ProtoError::Invalid {
                    what: "SASL initial response length",
                })?;
                Some(c.bytes(len, "SASL initial response")?)
            }
        };
        c.finish("SASLInitialResponse")?;
        Ok(SaslInitialResponse { mechanism, data })
    }
}

/// A SASLResponse ('p'): the rest of the SASL exchange, opaque to the protocol.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct SaslResponse<'a> {
    /// The mechanism-specific bytes (for SCRAM, the client-final-message).
    pub data: &'a [u8],
}

impl<'a> SaslResponse<'a> {
    /// Reads a SASLResponse body; every body is valid.
    pub fn parse(body: &'a [u8]) -> Result<Self, ProtoError> {
        Ok(SaslResponse { data: body })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_needs_exactly_one_terminated_string() {
        assert_eq!(Query::parse(b"select 1\0"), Ok(Query { sql: b"select 1" }));
        assert_eq!(Query::parse(b"\0"), Ok(Query { sql: b"" }));
        assert_eq!(
            Query::parse(b"select 1"),
            Err(ProtoError::MissingNul {
                what: "query string"
            })
        );
        assert_eq!(
            Query::parse(b"select 1\0x"),
            Err(ProtoError::TrailingBytes {
                what: "Query",
                extra: 1
            })
        );
    }

    #[test]
    fn parse_checks_the_oid_array_length() {
        let ok = b"s1\0select $1\0\0\x01\0\0\0\x17";
        assert_eq!(
            Parse::parse(ok),
            Ok(Parse {
                name: b"s1",
                sql: b"select $1",
                param_type_count: 1
            })
        );
        assert_eq!(
            Parse::parse(b"s1\0select $1\0\0\x02\0\0\0\x17"),
            Err(ProtoError::Truncated {
                what: "parameter type OIDs"
            })
        );
        assert_eq!(
            Parse::parse(b"\0select\0\0"),
            Err(ProtoError::Truncated {
                what: "parameter type count"
            })
        );
        let max = Parse::parse(b"\0x\0\xff\xff");
        assert_eq!(
            max,
            Err(ProtoError::Truncated {
                what: "parameter type OIDs"
            })
        );
    }

    #[test]
    fn bind_walks_formats_and_values() {
        // portal "p", statement "s", 1 format (binary), 2 values (NULL, "ab"), 0 result formats.
        let body = b"p\0s\0\0\x01\0\x01\0\x02\xff\xff\xff\xff\0\0\0\x02ab\0\0";
        assert_eq!(
            Bind::parse(body),
            Ok(Bind {
                portal: b"p",
                statement: b"s"
            })
        );
        let negative = b"\0\0\0\0\0\x01\xff\xff\xff\xfe\0\0";
        assert_eq!(
            Bind::parse(negative),
            Err(ProtoError::Invalid {
                what: "parameter value length"
            })
        );
        let short = b"\0\0\0\0\0\x01\0\0\0\x05ab\0\0";
        assert_eq!(
            Bind::parse(short),
            Err(ProtoError::Truncated {
                what: "parameter value"
            })
        );
        assert_eq!(
            Bind::parse(b"\0\0\0\0\0\0\0\0x"),
            Err(ProtoError::TrailingBytes {
                what: "Bind",
                extra: 1
            })
        );
    }

    #[test]
    fn describe_and_close_accept_only_s_or_p() {
        assert_eq!(
            Describe::parse(b"Sstmt\0"),
            Ok(Describe {
                kind: b'S',
                name: b"stmt"
            })
        );
        assert_eq!(
            Close::parse(b"P\0"),
            Ok(Close {
                kind: b'P',
                name: b""
            })
        );
        assert!(matches!(
            Describe::parse(b"Xstmt\0"),
            Err(ProtoError::Invalid { .. })
        ));
        assert!(matches!(
            Close::parse(b""),
            Err(ProtoError::Truncated { .. })
        ));
    }

    #[test]
    fn execute_reads_the_row_limit() {
        assert_eq!(
            Execute::parse(b"\0\0\0\0\x0a"),
            Ok(Execute {
                portal: b"",
                max_rows: 10
            })
        );
        assert_eq!(
            Execute::parse(b"c\0\0\0"),
            Err(ProtoError::Truncated {
                what: "maximum row count"
            })
        );
    }

    #[test]
    fn sasl_initial_response_length_forms() {
        assert_eq!(
            SaslInitialResponse::parse(b"SCRAM-SHA-256\0\xff\xff\xff\xff"),
            Ok(SaslInitialResponse {
                mechanism: b"SCRAM-SHA-256",
                data: None
            })
        );
        assert_eq!(
            SaslInitialResponse::parse(b"M\0\0\0\0\0"),
            Ok(SaslInitialResponse {
                mechanism: b"M",
                data: Some(b"")
            })
        );
        assert!(matches!(
            SaslInitialResponse::parse(b"M\0\xff\xff\xff\xfe"),
            Err(ProtoError::Invalid { .. })
        ));
        assert!(matches!(
            SaslInitialResponse::parse(b"M\0\0\0\0\x09abc"),
            Err(ProtoError::Truncated { .. })
        ));
        assert!(matches!(
            SaslInitialResponse::parse(b"M\0\0\0\0\x01abc"),
            Err(ProtoError::TrailingBytes { .. })
        ));
    }

    #[test]
    fn known_tags() {
        for t in b"QPBDECSHXFdcfp" {
            assert!(is_known_frontend_tag(*t), "{}", char::from(*t));
        }
        for t in b"RZTz\0" {
            assert!(!is_known_frontend_tag(*t));
        }
    }
}
