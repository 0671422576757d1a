//! The client side of the relay: moves client messages to the server side in whole or in
//! pieces, tracking the sync points of each and routing every new unit of work.

use bytes::{Buf, BytesMut};
use pgvigil_proto::frame::next_message;
use pgvigil_proto::frontend::{self, is_known_frontend_tag};
use pgvigil_proto::{header, TxStatus};

use super::naming::{self, OnServer, Outgoing};
use super::relay::{make_room, move_prefix, Progress, RelayEnd, PIECES_OVER};
use super::steering::{Decision, Steering};
use super::unit;
use super::views::Views;
use crate::proxy::Proxy;
use crate::statements::ServerStatements;

/// Moves client messages to the server side, routing each new unit.
pub(super) struct ClientScan<'a, 'p> {
    pub(super) max_message: usize,
    /// Transaction pooling: statements are shared under pgvigil's names.
    pub(super) shared: bool,
    pub(super) proxy: &'a Proxy,
    /// The session's views of the shared state, which routing reads.
    pub(super) views: &'a mut Views<'p>,
    pub(super) terminated: &'a mut bool,
    /// The statements the server connection has under pgvigil's names.
    pub(super) statements: &'a mut ServerStatements,
    /// What goes to the client (where pgvigil's own answers join the server's).
    pub(super) to_client: &'a mut BytesMut,
}

impl ClientScan<'_, '_> {
    /// Forwards whole client messages to `out` while they belong to the current node. Returns the
    /// decision that stopped it when the next unit goes elsewhere (it stays in `input`).
    pub(super) fn scan(
        &mut self,
        input: &mut BytesMut,
        out: &mut BytesMut,
        progress: &mut Progress,
        steering: &mut Steering,
        server_tx: TxStatus,
    ) -> Result<Option<Decision>, RelayEnd> {
        let through = progress.from_client.take(input.len());
        move_prefix(input, out, through);
        if progress.from_client.is_open() {
            return Ok(None);
        }
        let mut forward = 0;
        let mut stop = None;
        loop {
            let Some(message) = next_message(&input[forward..], self.max_message)
                .map_err(|e| RelayEnd::Violation(e.to_string()))?
            else {
                move_prefix(input, out, forward);
                forward = 0;
                stop = self.pass_large(input, out, progress, steering, server_tx)?;
                break;
            };
            let (tag, len) = (message.tag, message.len());
            if tag == frontend::tag::TERMINATE {
                *self.terminated = true;
                break;
            }
            match self.route_unit_start(tag, &input[forward..], progress, steering, server_tx) {
                UnitStart::Forward => {}
                UnitStart::Wait => break,
                UnitStart::Stop(decision) => {
                    stop = Some(decision);
                    break;
                }
            }
            // Nothing is owed by the server nor waits to be sent: pgvigil may answer now.
            let fresh = progress.is_quiet() && out.is_empty() && forward == 0;
            note_client(tag, progress)?;
            let frame = &input[forward..forward + len];
            let names_statement = matches!(
                tag,
                frontend::tag::PARSE
                    | frontend::tag::BIND
                    | frontend::tag::DESCRIBE
                    | frontend::tag::CLOSE
            );
            if self.shared
                && tag == frontend::tag::PARSE
                && naming::statement_name(tag, frame).is_none()
            {
                // Unnamed (or malformed): the connection may have it from now on. (A Query
                // drops it, if well-formed: telling would cost a scan of every Query, and the
                // reset a foreign unnamed statement calls for drops it anyway.)
                self.statements.set_unnamed(true);
            }
            let server = (names_statement && self.shared).then_some(OnServer {
                statements: &mut *self.statements,
                fresh,
                tx: server_tx,
            });
            let outgoing = steering.forwarded_to(tag, frame, server, self.proxy);
            if outgoing == Outgoing::AsIs {
                forward += len;
                continue;
            }
            // What came before goes as it is; this message is replaced.
            make_room(out, input.len());
            move_prefix(input, out, forward);
            forward = 0;
            let naming = &mut steering.replay.naming;
            naming::replace(outgoing, &input[..len], naming, out, self.to_client);
            input.advance(len);
        }
        move_prefix(input, out, forward);
        if *self.terminated {
            input.clear();
        }
        Ok(stop)
    }

    /// Routes the unit that a client message of type `tag` at the front of `input` begins, if it
    /// begins one.
    fn route_unit_start(
        &mut self,
        tag: u8,
        input: &[u8],
        progress: &Progress,
        steering: &mut Steering,
        server_tx: TxStatus,
    ) -> UnitStart {
        if !starts_unit(tag, progress) {
            return UnitStart::Forward;
        }
        let in_transaction = server_tx != TxStatus::Idle;
        match steering.decide(input, in_transaction, self.views, self.proxy) {
            Decision::Forward => UnitStart::Forward,
            Decision::Wait => UnitStart::Wait,
            other => UnitStart::Stop(other),
        }
    }

    /// Starts passing along, in pieces, the large message begun at the front of `input` when
    /// nothing needs it whole: a CopyData, or a Bind over [`unit::LOOKAHEAD_LIMIT`] once its
    /// unit is routed on its names (the statement name renamed under transaction pooling).
    /// Returns the decision that keeps it for another node, as [`Self::scan`] does.
    fn pass_large(
        &mut self,
        input: &mut BytesMut,
        out: &mut BytesMut,
        progress: &mut Progress,
        steering: &mut Steering,
        server_tx: TxStatus,
    ) -> Result<Option<Decision>, RelayEnd> {
        let Ok(Some((tag, total))) = header(input, self.max_message) else {
            return Ok(None);
        };
        let in_pieces = match tag {
            frontend::tag::COPY_DATA => total > PIECES_OVER,
            frontend::tag::BIND => unit::large_bind_at(input, 0, self.max_message).is_some(),
            _ => false,
        };
        if !in_pieces {
            return Ok(None);
        }
        match self.route_unit_start(tag, input, progress, steering, server_tx) {
            UnitStart::Forward => {}
            UnitStart::Wait => return Ok(None),
            UnitStart::Stop(decision) => return Ok(Some(decision)),
        }
        let fresh = progress.is_quiet() && out.is_empty();
        note_client(tag, progress)?;
        let here = progress.from_client.start(total, input);
        let start = &input[..here];
        let server = (tag == frontend::tag::BIND && self.shared).then_some(OnServer {
            statements: &mut *self.statements,
            fresh,
            tx: server_tx,
        });
        let outgoing = steering.forwarded_to(tag, start, server, self.proxy);
        match outgoing {
            Outgoing::Renamed { at, len, id } => {
                make_room(out, here);
                naming::rename_start(start, total, at, len, id, out);
                input.advance(here);
            }
            // A Bind is renamed or goes as it is (only a Parse is answered or replaced).
            _ => move_prefix(input, out, here),
        }
        Ok(None)
    }
}

/// What to do with a client message of type `tag` at the front of `input` as far as routing goes.
enum UnitStart {
    /// It continues the unit being forwarded, or begins one that goes to the current node.
    Forward,
    /// It begins a unit whose end has not arrived yet.
    Wait,
    /// It begins a unit that goes elsewhere or needs something done first.
    Stop(Decision),
}

/// Whether the client message at the start of `input` drops any unnamed statement the server
/// connection had before anything can use it: a well-formed simple Query, or Parse of the
/// unnamed statement (PostgreSQL drops the old one before it reads the new one's text).
pub(super) fn drops_unnamed(input: &[u8], max_message: usize) -> bool {
    let Ok(Some(message)) = next_message(input, max_message) else {
        return false;
    };
    match message.tag {
        frontend::tag::QUERY => frontend::Query::parse(message.body).is_ok(),
        frontend::tag::PARSE => {
            frontend::Parse::parse(message.body).is_ok_and(|parse| parse.name.is_empty())
        }
        _ => false,
    }
}

/// Whether a client message of type `tag` begins a new unit of work (which may be routed).
pub(super) fn starts_unit(tag: u8, progress: &Progress) -> bool {
    !progress.unsynced
        && !progress.copy_in
        && matches!(
            tag,
            frontend::tag::QUERY
                | frontend::tag::FUNCTION_CALL
                | frontend::tag::PARSE
                | frontend::tag::BIND
                | frontend::tag::DESCRIBE
                | frontend::tag::CLOSE
                | frontend::tag::EXECUTE
                | frontend::tag::FLUSH
                | frontend::tag::SYNC
        )
}

/// Tracks the sync points of one client message; an unknown type is a protocol violation.
pub(super) fn note_client(tag: u8, progress: &mut Progress) -> Result<(), RelayEnd> {
    match tag {
        frontend::tag::QUERY => {
            progress.awaiting_ready += 1;
            progress.syncs_since_execute = 0;
        }
        frontend::tag::FUNCTION_CALL => progress.awaiting_ready += 1,
        frontend::tag::SYNC => {
            progress.awaiting_ready += 1;
            progress.syncs_since_execute += 1;
            progress.unsynced = false;
        }
        frontend::tag::EXECUTE => {
            progress.unsynced = true;
            progress.syncs_since_execute = 0;
        }
        frontend::tag::COPY_DONE | frontend::tag::COPY_FAIL => {
            // The server ignores Syncs received in copy-in mode (PostgreSQL docs, "COPY
            // Operations"), and clients such as tokio-postgres send one right after the
            // Execute of a COPY FROM STDIN: no ReadyForQuery will answer them. Clients send
            // CopyDone/CopyFail only after seeing CopyInResponse, so `copy_in` is known here;
            // without it (the COPY failed before copy-in mode) every Sync is answered.
            if progress.copy_in {
                progress.awaiting_ready = progress
                    .awaiting_ready
                    .saturating_sub(progress.syncs_since_execute);
                progress.copy_in = false;
            }
            progress.syncs_since_execute = 0;
        }
        frontend::tag::PARSE
        | frontend::tag::BIND
        | frontend::tag::DESCRIBE
        | frontend::tag::CLOSE => progress.unsynced = true,
        // A Flush only asks for the output so far: after a Sync it opens no sequence (psycopg
        // sends Sync then Flush as it leaves a pipeline), and what follows is a new unit.
        frontend::tag::FLUSH => {}
        tag if is_known_frontend_tag(tag) => {}
        tag => {
            return Err(RelayEnd::Violation(format!(
                "invalid frontend message type {tag} ('{}')",
                char::from(tag).escape_default()
            )))
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::server_side::ServerSide;
    use super::*;
    use bytes::BufMut;

    fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.put_u32(body.len() as u32 + 4);
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn sync_points_are_tracked_and_unknown_tags_are_violations() {
        let mut progress = Progress::default();
        client_sends(&mut progress, &[(b'P', b""), (b'B', b"")]);
        assert!(progress.unsynced && !progress.is_quiet());
        client_sends(&mut progress, &[(b'S', b""), (b'Q', b"select 1\0")]);
        assert!(!progress.unsynced);
        assert_eq!(progress.awaiting_ready, 2);
        assert!(matches!(
            note_client(b'!', &mut progress),
            Err(RelayEnd::Violation(_))
        ));
    }

    #[test]
    fn only_messages_between_units_start_one() {
        let mut progress = Progress::default();
        assert!(starts_unit(b'Q', &progress) && starts_unit(b'P', &progress));
        assert!(
            !starts_unit(b'd', &progress),
            "CopyData never starts a unit"
        );
        progress.unsynced = true;
        assert!(!starts_unit(b'B', &progress), "a unit runs to its Sync");
        progress.unsynced = false;
        progress.copy_in = true;
        assert!(!starts_unit(b'Q', &progress));
    }

    #[test]
    fn a_flush_after_a_sync_leaves_the_next_message_to_start_a_unit() {
        // psycopg leaves a pipeline with Sync then Flush.
        let mut progress = Progress::default();
        client_sends(&mut progress, &[(b'P', b""), (b'E', b""), (b'H', b"")]);
        assert!(progress.unsynced, "a Flush does not end a sequence");
        client_sends(&mut progress, &[(b'S', b""), (b'H', b"")]);
        assert!(!progress.unsynced && starts_unit(b'Q', &progress));
        server_sends(&mut progress, &[(b'Z', b"I")]);
        assert!(progress.is_quiet());
    }

    /// Notes the client messages `messages` (tag, body).
    fn client_sends(progress: &mut Progress, messages: &[(u8, &[u8])]) {
        for (tag, _) in messages {
            note_client(*tag, progress).unwrap();
        }
    }

    /// Runs the server scan over `messages` (tag, body).
    fn server_sends(progress: &mut Progress, messages: &[(u8, &[u8])]) {
        let mut input = BytesMut::new();
        for (tag, body) in messages {
            input.extend_from_slice(&frame(*tag, body));
        }
        let (mut tx, mut params) = (TxStatus::Idle, crate::server::ReportedParams::default());
        let mut side = ServerSide {
            tx: &mut tx,
            params: &mut params,
            fatal: None,
            encoding_safe: true,
            node: 0,
        };
        let mut replay = super::super::replay::Replayable::new();
        side.scan(
            &mut input,
            &mut BytesMut::new(),
            1 << 20,
            progress,
            &mut replay,
            &mut ServerStatements::default(),
        )
        .unwrap();
    }

    #[test]
    fn syncs_the_server_ignores_in_copy_in_mode_are_not_awaited() {
        // tokio-postgres: Bind, Execute, Sync, then (after CopyInResponse) data, CopyDone, Sync.
        let mut progress = Progress::default();
        client_sends(&mut progress, &[(b'B', b""), (b'E', b""), (b'S', b"")]);
        server_sends(&mut progress, &[(b'2', b""), (b'G', b"")]);
        client_sends(&mut progress, &[(b'd', b"1\n"), (b'c', b""), (b'S', b"")]);
        assert_eq!(progress.awaiting_ready, 1);
        server_sends(&mut progress, &[(b'C', b"COPY 1\0"), (b'Z', b"I")]);
        assert!(progress.is_quiet());

        // The COPY fails before copy-in mode: both Syncs are answered.
        let mut progress = Progress::default();
        client_sends(&mut progress, &[(b'B', b""), (b'E', b""), (b'S', b"")]);
        server_sends(&mut progress, &[(b'E', b"SERROR\0\0"), (b'Z', b"I")]);
        client_sends(&mut progress, &[(b'f', b"no\0"), (b'S', b"")]);
        assert_eq!(progress.awaiting_ready, 1);
        server_sends(&mut progress, &[(b'Z', b"I")]);
        assert!(progress.is_quiet());
    }
}
