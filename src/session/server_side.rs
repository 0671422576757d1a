//! The server's side of the relay: messages moved towards the client, with the few that change
//! the session's state noted on the way (ReadyForQuery, ParameterStatus, CopyInResponse) and a
//! node's FATAL error held back for the session to judge. Those are read whole; a large message
//! nobody reads (a DataRow, a CopyData) passes in pieces as its bytes arrive.

use bytes::{Buf, Bytes, BytesMut};
use pgvigil_proto::backend::{self, ErrorFields};
use pgvigil_proto::classify::encoding_is_safe;
use pgvigil_proto::frame::messages;
use pgvigil_proto::{header, FrameError, TxStatus};
use tracing::debug;

use super::relay::{move_prefix, NodeFatal, Progress, PIECES_OVER};
use super::replay::Replayable;
use crate::server::ReportedParams;
use crate::statements::ServerStatements;
use crate::topology::NodeId;

/// The server-side state the relay updates.
pub(super) struct ServerSide<'a> {
    /// The connection's transaction status, from its latest ReadyForQuery.
    pub(super) tx: &'a mut TxStatus,
    /// What the node reported with ParameterStatus.
    pub(super) params: &'a mut ReportedParams,
    /// The FATAL error the node sent, if it did.
    pub(super) fatal: Option<NodeFatal>,
    /// Whether the client encoding is ASCII-safe; updated when the node reports a new one.
    pub(super) encoding_safe: bool,
    /// The node the connection is to.
    pub(super) node: NodeId,
}

impl ServerSide<'_> {
    /// Whether a server message of type `tag` may reach the client in pieces: the relay never
    /// reads it (rows, copy data, notices, notifications, function results, row descriptions).
    pub(super) fn passes_in_pieces(tag: u8) -> bool {
        matches!(
            tag,
            backend::tag::DATA_ROW
                | backend::tag::COPY_DATA
                | backend::tag::NOTICE_RESPONSE
                | backend::tag::NOTIFICATION
                | backend::tag::ROW_DESCRIPTION
                | backend::tag::FUNCTION_CALL_RESPONSE
        )
    }

    /// Moves server messages to `out`, noting ReadyForQuery, ParameterStatus and errors; a
    /// large one that [passes in pieces](Self::passes_in_pieces) goes as far as it has arrived.
    ///
    /// A FATAL error is the node's last word: it is kept in `fatal`, not relayed, because what
    /// the client must hear depends on why the node sent it (an administrator ending the
    /// session, or a node going down that the session survives).
    pub(super) fn scan(
        &mut self,
        input: &mut BytesMut,
        out: &mut BytesMut,
        max_message: usize,
        progress: &mut Progress,
        replay: &mut Replayable,
        statements: &mut ServerStatements,
    ) -> Result<(), FrameError> {
        let through = progress.from_server.take(input.len());
        move_prefix(input, out, through);
        if progress.from_server.is_open() {
            return Ok(());
        }
        loop {
            let mut iter = messages(input, max_message);
            let mut offset = 0;
            let mut fatal_at = None;
            // A message replaced by pgvigil's own: where it is, and what goes instead.
            let mut replaced: Option<(usize, usize, BytesMut)> = None;
            for message in iter.by_ref() {
                let message = message?;
                let start = offset;
                offset += message.len();
                match message.tag {
                    backend::tag::READY_FOR_QUERY => {
                        if let Ok(status) = backend::ReadyForQuery::parse(message.body) {
                            *self.tx = status;
                            replay.settings.ready(status, self.node);
                        }
                        progress.awaiting_ready = progress.awaiting_ready.saturating_sub(1);
                        // Copy-in mode has ended by now (a ReadyForQuery never comes during it).
                        progress.copy_in = false;
                        for id in replay.naming.ready(progress.is_quiet()) {
                            statements.doubt(id);
                            replay.gone(id, self.node);
                        }
                    }
                    backend::tag::PARAMETER_STATUS => {
                        // A malformed one is still relayed; the client will judge it.
                        if let Ok(status) = backend::ParameterStatus::parse(message.body) {
                            if status.name == b"client_encoding" {
                                self.encoding_safe = encoding_is_safe(status.value);
                            }
                        }
                        let _ = self.params.note(message.body);
                    }
                    backend::tag::ERROR_RESPONSE => {
                        if let Some(code) = fatal_code(message.body) {
                            fatal_at = Some(start);
                            self.fatal = Some(NodeFatal {
                                code,
                                answering: !progress.is_quiet(),
                                frame: Bytes::copy_from_slice(&input[start..offset]),
                            });
                            break;
                        }
                        replay.settings.error();
                        replay.parse_failed();
                        let mut instead = BytesMut::new();
                        let fields = ErrorFields::parse(message.body).ok();
                        let code = fields.as_ref().and_then(|f| f.sqlstate());
                        if replay.naming.expects_duplicate()
                            && fields
                                .as_ref()
                                .and_then(|f| f.message())
                                .is_some_and(|m| replay.naming.duplicate_error(m, &mut instead))
                            || replay.naming.failed_block_error(code, &mut instead)
                        {
                            replaced = Some((start, offset, instead));
                            break;
                        }
                    }
                    backend::tag::PARSE_COMPLETE => replay.parse_complete(self.node, statements),
                    backend::tag::COMMAND_COMPLETE => {
                        replay.settings.command_complete(message.body);
                        if matches!(message.body, b"DISCARD ALL\0" | b"DEALLOCATE ALL\0")
                            && !statements.is_empty()
                        {
                            // Every statement on the connection is gone, other sessions' too
                            // (transaction pooling: in session pooling it has none of pgvigil's).
                            statements.clear();
                            replay.adopt(self.node, statements);
                        }
                    }
                    backend::tag::COPY_IN_RESPONSE => progress.copy_in = true,
                    _ => {}
                }
            }
            let consumed = iter.consumed();
            if let Some(start) = fatal_at {
                debug!(code = ?self.fatal.as_ref().map(|f| String::from_utf8_lossy(&f.code)), "FATAL from the node, held back");
                move_prefix(input, out, start);
                // Nothing the node sends after a FATAL means anything.
                input.clear();
                return Ok(());
            }
            let Some((start, end, instead)) = replaced else {
                move_prefix(input, out, consumed);
                if let Some((tag, total)) = header(input, max_message)? {
                    if total > PIECES_OVER && Self::passes_in_pieces(tag) {
                        let here = progress.from_server.start(total, input);
                        move_prefix(input, out, here);
                    }
                }
                return Ok(());
            };
            move_prefix(input, out, start);
            out.extend_from_slice(&instead);
            input.advance(end - start);
        }
    }
}

/// The SQLSTATE of a FATAL or PANIC ErrorResponse body; None for any other error.
fn fatal_code(body: &[u8]) -> Option<[u8; 5]> {
    let fields = ErrorFields::parse(body).ok()?;
    let severity = fields.get(b'V').or_else(|| fields.get(b'S'))?;
    if severity != b"FATAL" && severity != b"PANIC" {
        return None;
    }
    let mut code = *b"08006";
    if let Some(sqlstate) = fields.sqlstate().filter(|c| c.len() == 5) {
        code.copy_from_slice(sqlstate);
    }
    Some(code)
}

/// Rewrites, in place, the severity fields (S and V) of an ErrorResponse frame from FATAL or
/// PANIC to ERROR (all three words have five letters, so the frame keeps its length).
pub(super) fn downgrade_fatal(frame: &mut [u8]) {
    let mut pos = 5;
    while let Some(&code) = frame.get(pos) {
        if code == 0 {
            return;
        }
        let value = pos + 1;
        let Some(len) = frame[value..].iter().position(|b| *b == 0) else {
            return;
        };
        let word = &mut frame[value..value + len];
        if matches!(code, b'S' | b'V') && (word == b"FATAL" || word == b"PANIC") {
            word.copy_from_slice(b"ERROR");
        }
        pos = value + len + 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BufMut;
    use pgvigil_proto::encode;

    /// One whole message, framed by the project's own encoder.
    fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut out = BytesMut::new();
        encode::message(&mut out, tag, |b| b.put_slice(body));
        out.to_vec()
    }

    /// An ErrorResponse body with these severity fields and SQLSTATE.
    fn error_body(severity: &str, code: &str) -> Vec<u8> {
        format!("S{severity}\0V{severity}\0C{code}\0Mbye\0\0").into_bytes()
    }

    /// What a server scan relays of `messages`, with `progress` as it stands.
    fn relayed(progress: &mut Progress, messages: &[(u8, &[u8])]) -> (Vec<u8>, Option<NodeFatal>) {
        let mut input = BytesMut::new();
        for (tag, body) in messages {
            input.extend_from_slice(&frame(*tag, body));
        }
        let (mut tx, mut params) = (TxStatus::Idle, ReportedParams::default());
        let mut side = ServerSide {
            tx: &mut tx,
            params: &mut params,
            fatal: None,
            encoding_safe: true,
            node: 0,
        };
        let mut out = BytesMut::new();
        let mut replay = Replayable::new();
        let mut statements = ServerStatements::default();
        side.scan(
            &mut input,
            &mut out,
            1 << 20,
            progress,
            &mut replay,
            &mut statements,
        )
        .unwrap();
        assert!(input.is_empty(), "nothing is left behind");
        (out.to_vec(), side.fatal)
    }

    #[test]
    fn a_fatal_is_held_back_with_whether_it_answered_a_request() {
        let fatal = error_body("FATAL", "57P01");
        let mut busy = Progress {
            awaiting_ready: 1,
            ..Progress::default()
        };
        let (out, noted) = relayed(&mut busy, &[(b'D', b"row"), (b'E', &fatal), (b'Z', b"I")]);
        assert_eq!(
            out,
            frame(b'D', b"row"),
            "what came before it; nothing after"
        );
        assert_eq!(
            noted,
            Some(NodeFatal {
                code: *b"57P01",
                answering: true,
                frame: Bytes::from(frame(b'E', &fatal)),
            })
        );

        let (out, noted) = relayed(&mut Progress::default(), &[(b'E', &fatal)]);
        assert!(out.is_empty());
        assert!(noted.is_some_and(|f| !f.answering));

        let error = error_body("ERROR", "42P01");
        let (out, noted) = relayed(&mut busy, &[(b'E', &error)]);
        assert_eq!(out, frame(b'E', &error), "an ERROR passes unchanged");
        assert_eq!(noted, None);

        let mut downgraded = frame(b'E', &fatal);
        downgrade_fatal(&mut downgraded);
        assert_eq!(downgraded, frame(b'E', &error_body("ERROR", "57P01")));
    }

    #[test]
    fn a_fatal_without_a_sqlstate_is_a_connection_failure() {
        assert_eq!(fatal_code(b"VPANIC\0Mx\0\0"), Some(*b"08006"));
        assert_eq!(fatal_code(b"SFATAL\0C57P01\0\0"), Some(*b"57P01"));
        assert_eq!(fatal_code(b"SWARNING\0\0"), None);
        let mut garbled = frame(b'E', b"SFATAL");
        downgrade_fatal(&mut garbled);
        assert_eq!(garbled, frame(b'E', b"SFATAL"), "unterminated: left alone");
    }
}
