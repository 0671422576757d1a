//! Splitting a byte buffer into whole tagged messages without copying.
//!
//! After the startup phase every message is `Byte1 tag`, `Int32 length` (counting itself but not
//! the tag), then `length - 4` body bytes (PostgreSQL docs §55.7). This module reads only the
//! header; bodies are handed out as borrowed slices.

use std::iter::FusedIterator;

/// The largest frame accepted by default: 1 GiB, PostgreSQL's `PQ_LARGE_MESSAGE_LIMIT`.
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 1 << 30;

/// Bytes in a tagged message header: the tag and the Int32 length.
const HEADER_LEN: usize = 5;

/// One whole tagged message borrowed from a buffer.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Message<'a> {
    /// The type byte (see `frontend::tag` and `backend::tag`).
    pub tag: u8,
    /// The bytes after the length field.
    pub body: &'a [u8],
}

impl Message<'_> {
    /// The whole frame length on the wire: tag, length field and body.
    #[expect(
        clippy::len_without_is_empty,
        reason = "a frame always has its 5-byte header, so it is never empty"
    )]
    pub fn len(&self) -> usize {
        HEADER_LEN + self.body.len()
    }
}

/// A message header that no valid peer can send; the connection cannot be resynchronised.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The length field is below 4, the size of the length field itself.
    #[error("invalid message length {len} for message type {} (minimum is 4): the peer is not speaking the PostgreSQL protocol or lost sync", DisplayTag(*.tag))]
    LengthTooSmall {
        /// The message type byte.
        tag: u8,
        /// The declared length, read as the signed Int32 the protocol defines.
        len: i64,
    },
    /// The whole frame would exceed the configured maximum.
    #[error("message of type {} is {len} bytes, over the limit of {max} bytes", DisplayTag(*.tag))]
    TooLarge {
        /// The message type byte.
        tag: u8,
        /// The total frame length (1 + declared length).
        len: usize,
        /// The limit it broke.
        max: usize,
    },
}

/// Shows a tag as `'Q'` when printable and as `0x00` otherwise, for error messages.
struct DisplayTag(u8);

impl std::fmt::Display for DisplayTag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.is_ascii_graphic() {
            write!(f, "'{}'", char::from(self.0))
        } else {
            write!(f, "0x{:02x}", self.0)
        }
    }
}

/// The tag and TOTAL frame length (1 + declared length) of the message at the start of `buf`.
///
/// `Ok(None)` while fewer than 5 bytes are present. Errors if the declared length is below 4 or
/// the total exceeds `max`, so a caller can reject a huge message before buffering it.
pub fn header(buf: &[u8], max: usize) -> Result<Option<(u8, usize)>, FrameError> {
    let Some((&[tag, l0, l1, l2, l3], _)) = buf.split_first_chunk::<HEADER_LEN>() else {
        return Ok(None);
    };
    let declared = i32::from_be_bytes([l0, l1, l2, l3]);
    let Ok(declared) = usize::try_from(declared) else {
        return Err(FrameError::LengthTooSmall {
            tag,
            len: i64::from(declared),
        });
    };
    if declared < 4 {
        return Err(FrameError::LengthTooSmall {
            tag,
            len: declared as i64,
        });
    }
    // declared <= i32::MAX, so adding 1 cannot overflow a usize.
    let total = declared + 1;
    if total > max {
        return Err(FrameError::TooLarge {
            tag,
            len: total,
            max,
        });
    }
    Ok(Some((tag, total)))
}

/// The first whole message at the start of `buf`, or `Ok(None)` if it is not whole yet.
pub fn next_message(buf: &[u8], max: usize) -> Result<Option<Message<'_>>, FrameError> {
    let Some((tag, total)) = header(buf, max)? else {
        return Ok(None);
    };
    Ok(buf.get(HEADER_LEN..total).map(|body| Message { tag, body }))
}

/// Iterates over the consecutive whole messages at the start of a buffer.
///
/// Stops at the first incomplete message (it stays in the tail) or after yielding the first
/// framing error, since nothing after a bad header can be trusted.
#[derive(Clone, Debug)]
pub struct Messages<'a> {
    buf: &'a [u8],
    max: usize,
    consumed: usize,
    failed: bool,
}

/// An iterator over the whole messages at the start of `buf`, each at most `max` bytes.
pub fn messages(buf: &[u8], max: usize) -> Messages<'_> {
    Messages {
        buf,
        max,
        consumed: 0,
        failed: false,
    }
}

impl Messages<'_> {
    /// Bytes of the whole messages yielded so far; `&buf[..consumed()]` is a batch to forward.
    pub fn consumed(&self) -> usize {
        self.consumed
    }
}

impl<'a> Iterator for Messages<'a> {
    type Item = Result<Message<'a>, FrameError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        let rest = self.buf.get(self.consumed..).unwrap_or_default();
        match next_message(rest, self.max) {
            Ok(Some(message)) => {
                self.consumed += message.len();
                Some(Ok(message))
            }
            Ok(None) => None,
            Err(err) => {
                self.failed = true;
                Some(Err(err))
            }
        }
    }
}

impl FusedIterator for Messages<'_> {}

/// A message forwarded in pieces as its bytes arrive, rather than buffered whole: what is left
/// of it. A relay starts one with [`Passage::start`] on a message whose header it has read, then
/// hands every following byte to [`Passage::take`] until the message is through.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Passage {
    rest: usize,
}

impl Passage {
    /// Starts passing along the message at the start of `buf`, whose header says it is `total`
    /// bytes long; returns how many bytes of `buf` belong to it (to forward now).
    pub fn start(&mut self, total: usize, buf: &[u8]) -> usize {
        let here = total.min(buf.len());
        self.rest = total - here;
        here
    }

    /// How many of the `available` bytes at the front of the input belong to the message in
    /// passage (0 when none is); records them as passed.
    pub fn take(&mut self, available: usize) -> usize {
        let here = self.rest.min(available);
        self.rest -= here;
        here
    }

    /// Whether part of a message was forwarded and the rest has not been.
    pub fn is_open(&self) -> bool {
        self.rest > 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        out.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    #[test]
    fn header_needs_five_bytes() {
        let f = frame(b'Q', b"select 1\0");
        for cut in 0..5 {
            assert_eq!(header(&f[..cut], DEFAULT_MAX_MESSAGE_SIZE), Ok(None));
        }
        assert_eq!(
            header(&f[..5], DEFAULT_MAX_MESSAGE_SIZE),
            Ok(Some((b'Q', f.len())))
        );
    }

    #[test]
    fn undersized_lengths_are_rejected() {
        for len in [0i32, 1, 3, -1, i32::MIN] {
            let mut f = vec![b'S'];
            f.extend_from_slice(&len.to_be_bytes());
            assert_eq!(
                next_message(&f, DEFAULT_MAX_MESSAGE_SIZE),
                Err(FrameError::LengthTooSmall {
                    tag: b'S',
                    len: i64::from(len)
                })
            );
        }
    }

    #[test]
    fn empty_body_is_a_whole_message() {
        let f = frame(b'S', b"");
        let m = next_message(&f, DEFAULT_MAX_MESSAGE_SIZE).unwrap().unwrap();
        assert_eq!((m.tag, m.body, m.len()), (b'S', &b""[..], 5));
    }

    #[test]
    fn oversized_lengths_are_rejected_from_the_header_alone() {
        let f = frame(b'D', &[0; 100]);
        assert_eq!(
            header(&f[..5], 50),
            Err(FrameError::TooLarge {
                tag: b'D',
                len: 105,
                max: 50
            })
        );
        assert!(next_message(&f, 105).unwrap().is_some());
        let mut huge = vec![b'D'];
        huge.extend_from_slice(&i32::MAX.to_be_bytes());
        assert_eq!(
            header(&huge, DEFAULT_MAX_MESSAGE_SIZE),
            Err(FrameError::TooLarge {
                tag: b'D',
                len: i32::MAX as usize + 1,
                max: DEFAULT_MAX_MESSAGE_SIZE
            })
        );
    }

    #[test]
    fn a_message_split_at_every_byte_is_whole_only_at_the_end() {
        let f = frame(b'Q', b"select 1\0");
        for cut in 0..f.len() {
            assert_eq!(
                next_message(&f[..cut], DEFAULT_MAX_MESSAGE_SIZE),
                Ok(None),
                "cut {cut}"
            );
        }
        let m = next_message(&f, DEFAULT_MAX_MESSAGE_SIZE).unwrap().unwrap();
        assert_eq!(m.body, b"select 1\0");
    }

    #[test]
    fn messages_stops_at_the_partial_tail_on_every_split() {
        let mut stream = frame(b'1', b"");
        stream.extend(frame(b'D', b"\x00\x01\x00\x00\x00\x01x"));
        stream.extend(frame(b'Z', b"I"));
        let boundaries = [0, 5, 5 + 12, stream.len()];
        for cut in 0..=stream.len() {
            let mut it = messages(&stream[..cut], DEFAULT_MAX_MESSAGE_SIZE);
            let n = it.by_ref().inspect(|m| assert!(m.is_ok())).count();
            let expected = *boundaries.iter().rfind(|&&b| b <= cut).unwrap();
            assert_eq!(it.consumed(), expected, "cut {cut}");
            assert_eq!(n, boundaries.iter().filter(|&&b| b > 0 && b <= cut).count());
        }
    }

    #[test]
    fn messages_yields_one_error_then_stops() {
        let mut stream = frame(b'C', b"SELECT 1\0");
        stream.extend_from_slice(&[b'X', 0, 0, 0, 1, b'Z', 0, 0, 0, 5, b'I']);
        let mut it = messages(&stream, DEFAULT_MAX_MESSAGE_SIZE);
        assert!(it.next().unwrap().is_ok());
        assert_eq!(
            it.next(),
            Some(Err(FrameError::LengthTooSmall { tag: b'X', len: 1 }))
        );
        assert_eq!(it.next(), None);
        assert_eq!(it.consumed(), 14);
    }

    #[test]
    fn a_passage_takes_exactly_the_rest_of_its_message() {
        let mut passage = Passage::default();
        assert_eq!(passage.take(10), 0, "no passage: nothing belongs to one");
        let f = frame(b'D', &[7; 100]);
        assert_eq!(passage.start(f.len(), &f[..30]), 30);
        assert!(passage.is_open());
        assert_eq!(passage.take(50), 50);
        assert_eq!(passage.take(80), 25, "what follows is the next message");
        assert!(!passage.is_open());
        assert_eq!(passage.start(f.len(), &f), f.len(), "whole: closed at once");
        assert!(!passage.is_open());
    }

    #[test]
    fn errors_read_well() {
        let err = FrameError::LengthTooSmall { tag: 0, len: -1 };
        assert!(err.to_string().contains("type 0x00"));
        let err = FrameError::TooLarge {
            tag: b'D',
            len: 10,
            max: 5,
        };
        assert_eq!(
            err.to_string(),
            "message of type 'D' is 10 bytes, over the limit of 5 bytes"
        );
    }
}
