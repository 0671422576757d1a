//! A bounds-checked reader over a message body, shared by the message views.
//!
//! Every read returns a [`ProtoError`] instead of panicking, so the views can be written as a
//! straight sequence of `?` reads that mirror the field lists of the protocol docs.

use crate::ProtoError;

/// Reads fields front to back from a borrowed body.
pub(crate) struct Cursor<'a> {
    rest: &'a [u8],
}

impl<'a> Cursor<'a> {
    /// A cursor at the start of `body`.
    pub(crate) fn new(body: &'a [u8]) -> Self {
        Cursor { rest: body }
    }

    /// A NUL-terminated string, without its NUL.
    pub(crate) fn cstr(&mut self, what: &'static str) -> Result<&'a [u8], ProtoError> {
        let (value, after) = split_cstr(self.rest).ok_or(ProtoError::MissingNul { what })?;
        self.rest = after;
        Ok(value)
    }

    /// The next `n` bytes.
    pub(crate) fn bytes(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], ProtoError> {
        if n > self.rest.len() {
            return Err(ProtoError::Truncated { what });
        }
        let (value, after) = self.rest.split_at(n);
        self.rest = after;
        Ok(value)
    }

    /// The next `N` bytes as an array.
    pub(crate) fn array<const N: usize>(
        &mut self,
        what: &'static str,
    ) -> Result<[u8; N], ProtoError> {
        let (value, after) = self
            .rest
            .split_first_chunk::<N>()
            .ok_or(ProtoError::Truncated { what })?;
        self.rest = after;
        Ok(*value)
    }

    /// One byte.
    pub(crate) fn u8(&mut self, what: &'static str) -> Result<u8, ProtoError> {
        self.array::<1>(what).map(|[b]| b)
    }

    /// A big-endian Int16 read as unsigned, as the backend's `pq_getmsgint(msg, 2)` does.
    pub(crate) fn u16(&mut self, what: &'static str) -> Result<u16, ProtoError> {
        self.array(what).map(u16::from_be_bytes)
    }

    /// A big-endian Int32.
    pub(crate) fn i32(&mut self, what: &'static str) -> Result<i32, ProtoError> {
        self.array(what).map(i32::from_be_bytes)
    }

    /// A big-endian Int32 read as unsigned (process ids, protocol codes).
    pub(crate) fn u32(&mut self, what: &'static str) -> Result<u32, ProtoError> {
        self.array(what).map(u32::from_be_bytes)
    }

    /// Everything not read yet.
    pub(crate) fn rest(self) -> &'a [u8] {
        self.rest
    }

    /// Succeeds only if the whole body has been read, like the backend's `pq_getmsgend`.
    pub(crate) fn finish(self, what: &'static str) -> Result<(), ProtoError> {
        match self.rest.len() {
            0 => Ok(()),
            extra => Err(ProtoError::TrailingBytes { what, extra }),
        }
    }
}

/// Splits `buf` at its first NUL: the string before it and the bytes after it.
pub(crate) fn split_cstr(buf: &[u8]) -> Option<(&[u8], &[u8])> {
    // Empty strings (the unnamed statement and portal) are the commonest: no search for them.
    if let [0, after @ ..] = buf {
        return Some((&[], after));
    }
    let nul = memchr::memchr(0, buf)?;
    let (value, after) = buf.split_at(nul);
    Some((value, after.get(1..).unwrap_or_default()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_fields_in_order_and_checks_the_end() {
        let mut c = Cursor::new(b"ab\0\x00\x01\x00\x00\x00\x02z");
        assert_eq!(c.cstr("s"), Ok(&b"ab"[..]));
        assert_eq!(c.u16("n"), Ok(1));
        assert_eq!(c.i32("i"), Ok(2));
        assert_eq!(c.u8("b"), Ok(b'z'));
        assert_eq!(c.finish("m"), Ok(()));
    }

    #[test]
    fn short_reads_are_errors_not_panics() {
        let mut c = Cursor::new(b"\x00\x01");
        assert_eq!(c.i32("len"), Err(ProtoError::Truncated { what: "len" }));
        assert_eq!(
            c.bytes(3, "data"),
            Err(ProtoError::Truncated { what: "data" })
        );
        assert_eq!(c.cstr("name"), Ok(&b""[..]));
        assert_eq!(c.cstr("name"), Err(ProtoError::MissingNul { what: "name" }));
        let c = Cursor::new(b"xy");
        assert_eq!(
            c.finish("Sync"),
            Err(ProtoError::TrailingBytes {
                what: "Sync",
                extra: 2
            })
        );
    }
}
