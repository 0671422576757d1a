//! The untagged startup phase: StartupMessage, SSLRequest, GSSENCRequest and CancelRequest.
//!
//! These packets have no tag byte: `Int32 length` (counting itself), `Int32 code`, then a body
//! whose meaning depends on the code (PostgreSQL docs §55.7).

use crate::cursor::split_cstr;
use crate::ProtoError;

/// The largest startup packet PostgreSQL accepts (`MAX_STARTUP_PACKET_LENGTH`).
pub const MAX_STARTUP_PACKET: usize = 10_000;

/// The longest cancel key protocol 3.2 allows (`MAX_CANCEL_KEY_LENGTH`); 3.0 keys are 4 bytes.
pub const MAX_CANCEL_KEY_LEN: usize = 256;

/// The request code of a CancelRequest.
pub const CANCEL_REQUEST_CODE: u32 = 80_877_102;
/// The request code of an SSLRequest.
pub const SSL_REQUEST_CODE: u32 = 80_877_103;
/// The request code of a GSSENCRequest.
pub const GSSENC_REQUEST_CODE: u32 = 80_877_104;

/// The first byte of a TLS ClientHello record (handshake content type 0x16).
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// The length of packets that carry only length and code (SSLRequest, GSSENCRequest).
const BARE_REQUEST_LEN: usize = 8;

/// A protocol version as sent in a StartupMessage: major in the high 16 bits, minor in the low.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct ProtocolVersion {
    /// The major version; 3 for every protocol PostgreSQL still speaks.
    pub major: u16,
    /// The minor version: 0 up to PostgreSQL 17, 2 from PostgreSQL 18.
    pub minor: u16,
}

impl ProtocolVersion {
    /// Protocol 3.0, the version every PostgreSQL since 7.4 accepts.
    pub const V3_0: ProtocolVersion = ProtocolVersion { major: 3, minor: 0 };

    /// The version for a startup code.
    pub fn from_code(code: u32) -> ProtocolVersion {
        // Truncation is the point: the code is two Int16 halves.
        ProtocolVersion {
            major: (code >> 16) as u16,
            minor: code as u16,
        }
    }

    /// The startup code for this version.
    pub fn code(self) -> u32 {
        (u32::from(self.major) << 16) | u32::from(self.minor)
    }
}

/// One startup-phase packet, borrowed from the buffer it was read from.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum StartupPacket<'a> {
    /// The client asks to switch to TLS before anything else.
    SslRequest,
    /// The client asks to switch to GSSAPI encryption.
    GssEncRequest,
    /// A request to cancel the query running on backend `pid`, authorised by `key`.
    Cancel {
        /// The backend process id from BackendKeyData.
        pid: u32,
        /// The secret key from BackendKeyData: 4 bytes in 3.0, up to 256 in 3.2.
        key: &'a [u8],
    },
    /// A StartupMessage opening a session.
    Startup {
        /// The requested protocol version; any major parses, the caller decides what it serves.
        version: ProtocolVersion,
        /// The `name=value` parameters (user, database, options, `_pq_.*`...).
        params: StartupParams<'a>,
    },
}

/// A startup packet that cannot be valid; PostgreSQL closes the connection on these.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StartupError {
    /// The length field is below 8 (length plus request code).
    #[error("invalid length of startup packet: {len} (minimum is 8)")]
    LengthTooSmall {
        /// The declared length, read as the signed Int32 the protocol defines.
        len: i64,
    },
    /// The length field is above [`MAX_STARTUP_PACKET`].
    #[error("invalid length of startup packet: {len} (maximum is {max})")]
    TooLarge {
        /// The declared length.
        len: usize,
        /// The limit it broke.
        max: usize,
    },
    /// An SSLRequest or GSSENCRequest carries bytes after its code.
    #[error("{what} must be exactly 8 bytes long, not {len}")]
    UnexpectedLength {
        /// Which request it was.
        what: &'static str,
        /// The declared length.
        len: usize,
    },
    /// A CancelRequest key is empty or longer than [`MAX_CANCEL_KEY_LEN`].
    #[error("invalid length of cancel key in cancel request packet: {len} (expected 1 to 256)")]
    CancelKeyLength {
        /// The key length found.
        len: usize,
    },
    /// A CancelRequest is too short to hold a process id.
    #[error("invalid length of cancel request packet: no process id")]
    CancelTooShort,
    /// The parameter list of a StartupMessage is malformed.
    #[error("invalid startup packet layout: {0}")]
    Params(#[from] ProtoError),
}

/// The `name\0value\0...\0` parameter list of a StartupMessage, validated once at parse time.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct StartupParams<'a> {
    /// The pairs without the final terminating NUL; every name is non-empty and NUL-terminated,
    /// every value NUL-terminated, so iteration cannot fail.
    pairs: &'a [u8],
}

impl<'a> StartupParams<'a> {
    /// Validates a protocol-3 parameter list: pairs of C strings, then one empty name.
    ///
    /// PostgreSQL requires the terminator to be the packet's last byte ("expected terminator as
    /// last byte"); so do we.
    pub fn parse(body: &'a [u8]) -> Result<Self, ProtoError> {
        let mut rest = body;
        loop {
            let (name, after_name) = split_cstr(rest).ok_or(ProtoError::MissingNul {
                what: "parameter name",
            })?;
            if name.is_empty() {
                return match after_name.len() {
                    0 => Ok(StartupParams {
                        pairs: body.get(..body.len() - 1).unwrap_or_default(),
                    }),
                    extra => Err(ProtoError::TrailingBytes {
                        what: "parameter list terminator",
                        extra,
                    }),
                };
            }
            let (_, after_value) = split_cstr(after_name).ok_or(ProtoError::MissingNul {
                what: "parameter value",
            })?;
            rest = after_value;
        }
    }

    /// The `(name, value)` pairs in the order the client sent them.
    pub fn iter(&self) -> impl Iterator<Item = (&'a [u8], &'a [u8])> + 'a {
        let mut fields = self.pairs.split(|&b| b == 0);
        // Validation guarantees an even number of strings before the trailing empty split.
        std::iter::from_fn(move || {
            let name = fields.next().filter(|name| !name.is_empty())?;
            let value = fields.next()?;
            Some((name, value))
        })
    }

    /// The value of the first parameter called `name`, if the client sent it.
    pub fn get(&self, name: &str) -> Option<&'a [u8]> {
        self.iter()
            .find(|(n, _)| *n == name.as_bytes())
            .map(|(_, value)| value)
    }

    /// The raw pairs as sent, without the list's final NUL; append one `\0` to re-send them.
    pub fn raw(&self) -> &'a [u8] {
        self.pairs
    }

    /// True when the client sent no parameters at all.
    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }
}

/// Parses the startup packet at the start of `buf`; the `usize` is the bytes it takes.
///
/// `Ok(None)` until the whole packet is buffered. The length is checked from the first 4 bytes,
/// so an oversized packet is refused before it is read.
pub fn parse_startup(buf: &[u8]) -> Result<Option<(StartupPacket<'_>, usize)>, StartupError> {
    let Some((len_bytes, _)) = buf.split_first_chunk::<4>() else {
        return Ok(None);
    };
    let declared = i32::from_be_bytes(*len_bytes);
    let len = match usize::try_from(declared) {
        Ok(len) if len >= BARE_REQUEST_LEN => len,
        _ => {
            return Err(StartupError::LengthTooSmall {
                len: i64::from(declared),
            })
        }
    };
    if len > MAX_STARTUP_PACKET {
        return Err(StartupError::TooLarge {
            len,
            max: MAX_STARTUP_PACKET,
        });
    }
    let Some(packet) = buf.get(4..len) else {
        return Ok(None);
    };
    let Some((code, body)) = packet.split_first_chunk::<4>() else {
        return Ok(None);
    };
    let packet = decode(u32::from_be_bytes(*code), body, len)?;
    Ok(Some((packet, len)))
}

/// Interprets a whole packet's body according to its request code.
fn decode(code: u32, body: &[u8], len: usize) -> Result<StartupPacket<'_>, StartupError> {
    match code {
        SSL_REQUEST_CODE => bare(StartupPacket::SslRequest, "SSLRequest", len),
        GSSENC_REQUEST_CODE => bare(StartupPacket::GssEncRequest, "GSSENCRequest", len),
        CANCEL_REQUEST_CODE => cancel(body),
        _ => {
            let version = ProtocolVersion::from_code(code);
            // Only protocol 3 has a name/value list; older layouts get empty params so the
            // caller can still read the version and refuse it as PostgreSQL does.
            let params = match version.major {
                3 => StartupParams::parse(body)?,
                _ => StartupParams::parse(body).unwrap_or_default(),
            };
            Ok(StartupPacket::Startup { version, params })
        }
    }
}

/// An SSLRequest or GSSENCRequest, which must carry nothing after the code.
fn bare(
    packet: StartupPacket<'static>,
    what: &'static str,
    len: usize,
) -> Result<StartupPacket<'static>, StartupError> {
    match len {
        BARE_REQUEST_LEN => Ok(packet),
        _ => Err(StartupError::UnexpectedLength { what, len }),
    }
}

/// A CancelRequest: the process id, then the key taking the rest of the packet.
fn cancel(body: &[u8]) -> Result<StartupPacket<'_>, StartupError> {
    let (pid, key) = body
        .split_first_chunk::<4>()
        .ok_or(StartupError::CancelTooShort)?;
    if key.is_empty() || key.len() > MAX_CANCEL_KEY_LEN {
        return Err(StartupError::CancelKeyLength { len: key.len() });
    }
    Ok(StartupPacket::Cancel {
        pid: u32::from_be_bytes(*pid),
        key,
    })
}

/// True if a connection's first byte starts a TLS handshake (PostgreSQL 17 direct SSL).
pub fn is_direct_tls(first_byte: u8) -> bool {
    first_byte == TLS_HANDSHAKE_RECORD
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(code: u32, body: &[u8]) -> Vec<u8> {
        let mut out = ((body.len() + 8) as u32).to_be_bytes().to_vec();
        out.extend_from_slice(&code.to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    #[test]
    fn startup_message_with_params() {
        let buf = packet(196_608, b"user\0alice\0database\0db\0options\0\0\0");
        let (p, used) = parse_startup(&buf).unwrap().unwrap();
        assert_eq!(used, buf.len());
        let StartupPacket::Startup { version, params } = p else {
            panic!("{p:?}")
        };
        assert_eq!(version, ProtocolVersion::V3_0);
        assert_eq!(params.get("user"), Some(&b"alice"[..]));
        assert_eq!(params.get("database"), Some(&b"db"[..]));
        assert_eq!(params.get("options"), Some(&b""[..]));
        assert_eq!(params.get("missing"), None);
        assert_eq!(params.iter().count(), 3);
        assert_eq!(params.raw(), b"user\0alice\0database\0db\0options\0\0");
    }

    #[test]
    fn protocol_3_2_and_unknown_majors_parse() {
        let buf = packet(0x0003_0002, b"user\0u\0\0");
        let (p, _) = parse_startup(&buf).unwrap().unwrap();
        assert!(matches!(
            p,
            StartupPacket::Startup {
                version: ProtocolVersion { major: 3, minor: 2 },
                ..
            }
        ));
        let buf = packet(0x0002_0000, &[b'x'; 40]);
        let (p, _) = parse_startup(&buf).unwrap().unwrap();
        let StartupPacket::Startup { version, params } = p else {
            panic!("{p:?}")
        };
        assert_eq!((version.major, params.is_empty()), (2, true));
    }

    #[test]
    fn empty_parameter_list_is_just_the_terminator() {
        let buf = packet(196_608, b"\0");
        let (p, _) = parse_startup(&buf).unwrap().unwrap();
        let StartupPacket::Startup { params, .. } = p else {
            panic!("{p:?}")
        };
        assert!(params.is_empty());
        assert_eq!(params.iter().count(), 0);
    }

    #[test]
    fn malformed_parameter_lists_are_rejected() {
        let cases: [(&[u8], ProtoError); 4] = [
            (
                b"",
                ProtoError::MissingNul {
                    what: "parameter name",
                },
            ),
            (
                b"user\0alice\0",
                ProtoError::MissingNul {
                    what: "parameter name",
                },
            ),
            (
                b"user\0alice",
                ProtoError::MissingNul {
                    what: "parameter value",
                },
            ),
            (
                b"user\0a\0\0junk",
                ProtoError::TrailingBytes {
                    what: "parameter list terminator",
                    extra: 4,
                },
            ),
        ];
        for (body, err) in cases {
            assert_eq!(
                parse_startup(&packet(196_608, body)),
                Err(StartupError::Params(err))
            );
        }
    }

    #[test]
    fn ssl_gss_and_cancel_requests() {
        assert_eq!(
            parse_startup(&packet(SSL_REQUEST_CODE, b"")),
            Ok(Some((StartupPacket::SslRequest, 8)))
        );
        assert_eq!(
            parse_startup(&packet(GSSENC_REQUEST_CODE, b"")),
            Ok(Some((StartupPacket::GssEncRequest, 8)))
        );
        assert_eq!(
            parse_startup(&packet(SSL_REQUEST_CODE, b"x")),
            Err(StartupError::UnexpectedLength {
                what: "SSLRequest",
                len: 9
            })
        );
        let buf = packet(CANCEL_REQUEST_CODE, b"\0\0\x30\x39abcd");
        assert_eq!(
            parse_startup(&buf),
            Ok(Some((
                StartupPacket::Cancel {
                    pid: 12345,
                    key: b"abcd"
                },
                16
            )))
        );
        let long_key = [7u8; 256];
        let mut body = 1u32.to_be_bytes().to_vec();
        body.extend_from_slice(&long_key);
        let buf = packet(CANCEL_REQUEST_CODE, &body);
        assert_eq!(
            parse_startup(&buf),
            Ok(Some((
                StartupPacket::Cancel {
                    pid: 1,
                    key: &long_key
                },
                268
            )))
        );
        body.push(0);
        assert_eq!(
            parse_startup(&packet(CANCEL_REQUEST_CODE, &body)),
            Err(StartupError::CancelKeyLength { len: 257 })
        );
        assert_eq!(
            parse_startup(&packet(CANCEL_REQUEST_CODE, b"\0\0\0\x01")),
            Err(StartupError::CancelKeyLength { len: 0 })
        );
        assert_eq!(
            parse_startup(&packet(CANCEL_REQUEST_CODE, b"\0\0")),
            Err(StartupError::CancelTooShort)
        );
    }

    #[test]
    fn length_limits() {
        for len in [0i32, 4, 7, -1, i32::MIN] {
            let mut buf = len.to_be_bytes().to_vec();
            buf.extend_from_slice(&[0; 8]);
            assert_eq!(
                parse_startup(&buf),
                Err(StartupError::LengthTooSmall {
                    len: i64::from(len)
                })
            );
        }
        let buf = 10_001u32.to_be_bytes();
        assert_eq!(
            parse_startup(&buf),
            Err(StartupError::TooLarge {
                len: 10_001,
                max: MAX_STARTUP_PACKET
            })
        );
        let mut body = vec![b'a'; MAX_STARTUP_PACKET - 8 - 4];
        body.extend_from_slice(b"\0b\0\0");
        let buf = packet(196_608, &body);
        assert_eq!(buf.len(), MAX_STARTUP_PACKET);
        assert!(parse_startup(&buf).unwrap().is_some());
    }

    #[test]
    fn split_at_every_byte_is_incomplete_until_the_end() {
        let mut buf = packet(196_608, b"user\0u\0\0");
        buf.extend_from_slice(b"Q\0\0\0\x05");
        let whole = buf.len() - 5;
        for cut in 0..whole {
            assert_eq!(parse_startup(&buf[..cut]), Ok(None), "cut {cut}");
        }
        for cut in whole..=buf.len() {
            assert_eq!(parse_startup(&buf[..cut]).unwrap().unwrap().1, whole);
        }
    }

    #[test]
    fn direct_tls_is_the_handshake_record_byte() {
        assert!(is_direct_tls(0x16));
        assert!(!is_direct_tls(0));
    }
}
