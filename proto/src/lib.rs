//! PostgreSQL v3 wire-protocol framing for pgvigil: bytes in, borrowed views and bytes out.
//!
//! Nothing here does I/O or allocates on the read path: [`frame`] finds message boundaries,
//! [`startup`], [`frontend`] and [`backend`] borrow fields out of message bodies, and [`encode`]
//! appends the messages pgvigil itself sends to a [`bytes::BytesMut`]. No input, however
//! malformed, makes any function here panic.

#![deny(missing_docs)]

pub mod backend;
pub mod classify;
mod cursor;
pub mod encode;
pub mod frame;
pub mod frontend;
pub mod sqlstate;
pub mod startup;

pub use frame::{
    header, messages, next_message, FrameError, Message, Messages, DEFAULT_MAX_MESSAGE_SIZE,
};

/// A session's transaction status, as reported by the ReadyForQuery status byte.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub enum TxStatus {
    /// `I`: not in a transaction block.
    Idle,
    /// `T`: inside a transaction block.
    InTransaction,
    /// `E`: inside a failed transaction block; statements are rejected until it ends.
    Failed,
}

impl TxStatus {
    /// The status for a ReadyForQuery byte, or `None` if the byte is not `I`, `T` or `E`.
    pub fn from_byte(byte: u8) -> Option<TxStatus> {
        match byte {
            b'I' => Some(TxStatus::Idle),
            b'T' => Some(TxStatus::InTransaction),
            b'E' => Some(TxStatus::Failed),
            _ => None,
        }
    }

    /// The ReadyForQuery byte for this status.
    pub fn as_byte(self) -> u8 {
        match self {
            TxStatus::Idle => b'I',
            TxStatus::InTransaction => b'T',
            TxStatus::Failed => b'E',
        }
    }
}

/// A message body that does not have the layout its tag promises.
///
/// `what` names the field in the words of the PostgreSQL protocol docs (§55.7), so that a log
/// line points straight at the part of the message that was wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    /// The body ended before a fixed-size field or a counted run of bytes was complete.
    #[error("malformed message: {what} is cut short (body too short)")]
    Truncated {
        /// The field that was cut short.
        what: &'static str,
    },
    /// A string field has no terminating NUL before the end of the body.
    #[error("malformed message: {what} is not NUL-terminated")]
    MissingNul {
        /// The string field without terminator.
        what: &'static str,
    },
    /// A field holds a value the protocol does not allow.
    #[error("malformed message: invalid {what}")]
    Invalid {
        /// The field with the bad value.
        what: &'static str,
    },
    /// Bytes follow the last field of the message.
    #[error("malformed message: {extra} unexpected bytes after {what}")]
    TrailingBytes {
        /// The message whose body is too long.
        what: &'static str,
        /// How many bytes were left over.
        extra: usize,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tx_status_round_trips_through_its_byte() {
        for status in [TxStatus::Idle, TxStatus::InTransaction, TxStatus::Failed] {
            assert_eq!(TxStatus::from_byte(status.as_byte()), Some(status));
        }
        assert_eq!(TxStatus::from_byte(b'X'), None);
        assert_eq!(TxStatus::from_byte(0), None);
    }

    #[test]
    fn proto_error_names_the_field() {
        let err = ProtoError::MissingNul {
            what: "query string",
        };
        assert_eq!(
            err.to_string(),
            "malformed message: query string is not NUL-terminated"
        );
    }
}
