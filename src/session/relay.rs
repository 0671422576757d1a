//! The steady state of a session: bytes flow between the client and its server connection as
//! messages, copied in batches, inspected only where state changes (ReadyForQuery,
//! ParameterStatus, ErrorResponse, Terminate). Rows are never decoded.
//!
//! A message larger than [`PIECES_OVER`] that the relay does not read (a DataRow, a CopyData)
//! is forwarded in pieces as its bytes arrive, so a 1 GiB row costs no more memory than a small
//! one; every message the relay reads is still read whole (see [`Passage`]).
//!
//! Both directions progress independently (one read and one write per direction, polled by one
//! hand-written loop over both sockets), so a server busy sending results never deadlocks
//! against a client still sending.
//!
//! Under transaction pooling with `pool.park` the relay outlives the unit while no other
//! session needs the connection: it parks the connection with the pool (see `Pools::park`) and
//! waits for the client's next unit, taking the connection back first, or gives it back when
//! the pool claims it.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, BufMut, BytesMut};
use pgvigil_proto::frame::Passage;
use pgvigil_proto::frontend;
use pgvigil_proto::{header, TxStatus};
use tokio::io::AsyncWrite;

use super::client_scan::ClientScan;
use super::server_side::ServerSide;
use super::spare;
use super::steering::{Decision, Steering};
use super::topology_watch::Registration;
use super::views::Views;
use super::wakes::{self, Wakes};
use crate::config::PoolMode;
use crate::pool::{ParkTicket, Parkable, Pools, Unparked};
use crate::proxy::Proxy;
use crate::server::{idle_socket_broken, ServerConn};
use crate::stream::Stream;
use crate::topology::{NodeId, Role};

/// Stop reading from a side while this many bytes wait to be written to the other side.
const HIGH_WATER: usize = 256 * 1024;
/// Read granularity.
pub(super) const READ_CHUNK: usize = 16 * 1024;
/// A message the relay does not read that is larger than this passes in pieces, as its bytes
/// arrive, rather than whole.
pub const PIECES_OVER: usize = 64 * 1024;

/// Why the relay stopped.
#[derive(Debug)]
pub enum RelayEnd {
    /// The client sent Terminate.
    Terminated,
    /// The client closed its socket (or it broke).
    ClientGone,
    /// The client broke the protocol; the text is sent to it as a 08P01 error.
    Violation(String),
}

/// The server connection was given up; the session may go on without it.
#[derive(Debug)]
pub struct Loss {
    /// Why.
    pub cause: LossCause,
    /// The FATAL (or PANIC) error the node sent before it closed, if it sent one.
    pub fatal: Option<NodeFatal>,
}

/// Why a server connection was given up.
#[derive(Debug, thiserror::Error)]
pub enum LossCause {
    /// The node closed it.
    #[error("the node closed the connection")]
    Closed,
    /// Reading or writing failed.
    #[error("I/O error: {0}")]
    Io(io::Error),
    /// The node sent bytes that are not a valid message.
    #[error("the node sent an invalid message")]
    Garbled,
    /// The topology no longer lets sessions use the node (down, fenced).
    #[error("the node is {} in the topology", .0.as_str())]
    Unusable(Role),
}

/// A FATAL or PANIC ErrorResponse a node sent (its last message before closing). It is held back
/// from the client: what the client is told depends on why the node sent it (see
/// `Session::recover`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeFatal {
    /// Its SQLSTATE (`08006` when it had none).
    pub code: [u8; 5],
    /// It answered one of the client's requests (an unsolicited one came while nothing was
    /// outstanding).
    pub answering: bool,
    /// The whole ErrorResponse frame, as the node sent it.
    pub frame: bytes::Bytes,
}

/// What the relay knows about the server connection's position in the protocol.
#[derive(Debug, Default)]
pub struct Progress {
    /// Requests that will be answered by a ReadyForQuery not yet seen (Query, Sync, FunctionCall).
    pub awaiting_ready: u32,
    /// Extended-protocol messages sent since the last Sync.
    pub unsynced: bool,
    /// Syncs the client sent since its last Execute or Query.
    pub syncs_since_execute: u32,
    /// The server answered with CopyInResponse and the client has not yet sent CopyDone or
    /// CopyFail.
    pub copy_in: bool,
    /// A large client message forwarded in part: the rest is still to come from the client.
    pub from_client: Passage,
    /// A large server message forwarded in part: the client has seen only its beginning.
    pub from_server: Passage,
}

impl Progress {
    /// Whether the server has answered everything and can be reset and reused.
    pub fn is_quiet(&self) -> bool {
        self.awaiting_ready == 0
            && !self.unsynced
            && !self.from_client.is_open()
            && !self.from_server.is_open()
    }
}

/// A client connection in its steady state.
pub struct ClientConn {
    /// The socket.
    pub stream: Stream,
    /// Bytes read from the client and not yet passed on.
    pub rbuf: BytesMut,
    /// Bytes waiting to be written to the client (kept across server switches).
    pub pending: BytesMut,
}

impl ClientConn {
    /// Drops the buffers that hold nothing, so that an idle client costs little: the relay's
    /// read chunk is 16 KiB, and the server's read buffer, swapped in whole when a batch of
    /// its messages goes to the client, as large. They grow again with the next unit.
    pub fn release_buffers(&mut self) {
        for buf in [&mut self.rbuf, &mut self.pending] {
            if buf.is_empty() && buf.capacity() > 0 {
                spare::give(std::mem::take(buf));
            }
        }
    }
}

/// Why the relay handed control back to the session.
#[derive(Debug)]
pub enum Stop {
    /// The session is over.
    End(RelayEnd),
    /// The server connection is lost (what the client is owed is in the `Progress`).
    Lost(Loss),
    /// The next unit (left at the front of the client's buffer) goes to another node, or needs
    /// something run on its node first; the current server has answered everything.
    Decided(Decision),
    /// Transaction pooling: the server answered everything and is outside a transaction block,
    /// and the session keeps nothing on it that cannot be replayed; it goes back to the pool
    /// (a checkout waits for a connection, or claimed it while it was parked).
    Release,
    /// Transaction pooling: the connection parked between units (see `Pools::park`) is to be
    /// closed: the node closed it or sent something unasked, or it was parked past
    /// `pool.idle_timeout` (or is past `pool.max_lifetime`). The next unit is routed afresh, as
    /// it would be past such a connection in the pool.
    Discard,
    /// The session holds no server connection, owes the client nothing and has none of its
    /// bytes: it waits for the client's next unit (see `serve::serve`).
    Idle,
}

/// Pumps messages both ways until the session ends, the next unit must go elsewhere, or the
/// server connection is lost (it broke, or a topology was announced in which its node is no
/// longer usable: that is what unblocks a statement hung on a frozen node after a failover).
/// `views`: the session's views of the shared state.
pub async fn relay(
    client: &mut ClientConn,
    server: &mut ServerConn,
    steering: &mut Steering,
    progress: &mut Progress,
    (views, proxy): (&mut Views<'_>, &Proxy),
) -> Stop {
    let mut to_server = BytesMut::new();
    let mut wakes = Wakes::take();
    let stop = pump(
        client,
        server,
        steering,
        progress,
        (views, proxy),
        (&mut to_server, &mut wakes),
    )
    .await;
    wakes.give();
    // Bytes not written are the lost connection's, whose loss the session now handles; the
    // buffer, which often is the client's read buffer swapped in, serves another unit.
    to_server.clear();
    spare::give(to_server);
    stop
}

/// [`relay`]'s loop; `to_server` holds what is on its way to the server, `wakes` are the
/// branches' wakers.
async fn pump(
    client: &mut ClientConn,
    server: &mut ServerConn,
    steering: &mut Steering,
    progress: &mut Progress,
    (views, proxy): (&mut Views<'_>, &Proxy),
    (to_server, wakes): (&mut BytesMut, &mut Wakes),
) -> Stop {
    let (max_message, shared, bound, park) = {
        let config = views.config();
        let shared = config.pool.mode == PoolMode::Transaction;
        let bound = config.pool.max_prepared_statements;
        (config.max_message_size, shared, bound, config.pool.park)
    };
    let node = server.node;
    // Before the look at the topology: a generation announced after it wakes the relay.
    let mut topology = Registration::new();
    if let Some(role) = unusable(views, node) {
        return lost(LossCause::Unusable(role), None);
    }
    let parkable = Parkable {
        node,
        database: &server.database,
        user: &server.user,
        pid: server.backend_pid,
        created: server.created,
    };
    let mut parking = Parking {
        pools: &proxy.pools,
        node,
        ticket: None,
    };
    let queued_seen = &mut server.queued_seen;
    let client_stream = &mut client.stream;
    let server_stream = &mut server.stream;
    let client_in = &mut client.rbuf;
    let server_in = &mut server.rbuf;
    let statements = &mut server.statements;
    let to_client = &mut client.pending;
    let mut server_state = ServerSide {
        tx: &mut server.tx,
        params: &mut server.params,
        fatal: None,
        encoding_safe: steering.encoding_safe,
        node,
    };
    let mut terminated = false;
    // A unit waiting for the current server to finish before it can be routed.
    let mut held = false;

    // The server may have sent bytes before the relay started (kept in its buffer).
    if server_state
        .scan(
            server_in,
            to_client,
            max_message,
            progress,
            &mut steering.replay,
            statements,
        )
        .is_err()
    {
        return server_lost(LossCause::Garbled, &mut server_state);
    }
    let mut client_scan = ClientScan {
        max_message,
        shared,
        proxy,
        views,
        terminated: &mut terminated,
        statements,
        to_client,
    };
    match client_scan.scan(client_in, to_server, progress, steering, *server_state.tx) {
        Err(end) => return Stop::End(end),
        Ok(Some(decision)) if progress.is_quiet() && to_server.is_empty() => {
            return Stop::Decided(decision)
        }
        Ok(Some(_)) => held = true,
        Ok(None) => {}
    }

    // A write whose flush is still under way (TLS: records the stream buffered).
    let mut flushing = Flushing::default();
    // A side whose last read found its socket drained (see `poll_read_once`).
    let mut drained = Drained::default();
    // The branch tried first next time round, turning like `select!`'s random start: no ready
    // side can keep the other waiting.
    let mut first = 0;
    // The branches found not ready (bit per branch). Each registered its wake-up, so polling it
    // again before that wake-up would only find it not ready again: the writes until the task
    // is woken, the branches with wakers of their own (`OWN_WAKERS`) until theirs is.
    let mut waiting = 0u8;
    // Whether `Steering::unit_done` ran since the last scan: what it looks at changes only when
    // a scan reads something, so a quiet spell calls it once.
    let mut unit_done = false;
    std::future::poll_fn(|cx| {
        // A read found not ready, or the topology watch, stays so until its own waker is woken
        // (see `wakes`).
        let woken = wakes.enter(cx.waker());
        waiting &= OWN_WAKERS
            & !(u8::from(woken & wakes::CLIENT != 0) << FROM_CLIENT
                | u8::from(woken & wakes::SERVER != 0) << FROM_SERVER
                | u8::from(woken & wakes::TOPOLOGY != 0) << TOPOLOGY);
        loop {
            if let Some(ticket) = parking.ticket.take() {
                match proxy.pools.unpark(node, ticket) {
                    Unparked::Kept if !idle_socket_broken(server_stream) => {}
                    Unparked::Claimed => return Poll::Ready(Stop::Release),
                    Unparked::Kept | Unparked::Expired => return Poll::Ready(Stop::Discard),
                }
            }
            steering.encoding_safe = server_state.encoding_safe;
            // Whether the connection may be parked if nothing moves this turn.
            let mut may_park = false;
            if progress.is_quiet() {
                if !unit_done {
                    steering.unit_done(proxy, *server_state.tx != TxStatus::Idle);
                    unit_done = true;
                }
                let idle = *server_state.tx == TxStatus::Idle && server_in.is_empty();
                if idle && !terminated && to_server.is_empty() && releasable(shared, steering) {
                    // A unit that waits is routed afresh once the session has no connection; a
                    // connection past `pool.max_prepared_statements` is trimmed by the next
                    // checkout's sync; a checkout that had to wait since the connection's last
                    // transaction shows a busy pool, where it goes back at once (`Pools::park`).
                    let parks = park && !held && !flushing.server && statements.within(bound) && {
                        let queued = proxy.pools.queued(node);
                        std::mem::replace(queued_seen, queued) == queued
                    };
                    if !parks {
                        return Poll::Ready(Stop::Release);
                    }
                    may_park = true;
                }
                if held && to_server.is_empty() {
                    // The unit that waited can be routed now that the node answered everything.
                    held = false;
                    unit_done = false;
                    let mut scan = ClientScan {
                        max_message,
                        shared,
                        proxy,
                        views,
                        terminated: &mut terminated,
                        statements,
                        to_client,
                    };
                    match scan.scan(client_in, to_server, progress, steering, *server_state.tx) {
                        Err(end) => return Poll::Ready(Stop::End(end)),
                        Ok(Some(decision)) if to_server.is_empty() => {
                            return Poll::Ready(Stop::Decided(decision))
                        }
                        Ok(Some(_)) => held = true,
                        Ok(None) => {}
                    }
                }
            }
            if terminated && to_server.is_empty() {
                return Poll::Ready(Stop::End(RelayEnd::Terminated));
            }

            // Each turn carries out the first branch that is ready, as one `select!` would; every
            // branch that is not ready has registered its wake-up.
            let mut moved = false;
            // The branches enabled now and not already found waiting, taken in turn from `first`.
            let enabled = u8::from(flushing.client || !to_client.is_empty())
                | u8::from(flushing.server || !to_server.is_empty()) << 1
                | 1 << TOPOLOGY
                | u8::from(!held && !terminated && to_server.len() < HIGH_WATER) << FROM_CLIENT
                | u8::from(to_client.len() < HIGH_WATER) << FROM_SERVER;
            let candidates = enabled & !waiting;
            let mut turns = (candidates >> first | candidates << (BRANCHES - first)) & ALL_BRANCHES;
            while turns != 0 {
                let turn = turns.trailing_zeros() as usize;
                turns &= turns - 1;
                let branch = if first + turn >= BRANCHES {
                    first + turn - BRANCHES
                } else {
                    first + turn
                };
                let bit = 1 << branch;
                let outcome = match branch {
                    // To the client.
                    0 => match poll_send(client_stream, cx, to_client, &mut flushing.client) {
                        Poll::Pending => {
                            waiting |= bit;
                            continue;
                        }
                        Poll::Ready(Ok(())) => Poll::Pending,
                        Poll::Ready(Err(_)) => Poll::Ready(Stop::End(RelayEnd::ClientGone)),
                    },
                    // To the server.
                    1 => match poll_send(server_stream, cx, to_server, &mut flushing.server) {
                        Poll::Pending => {
                            waiting |= bit;
                            continue;
                        }
                        Poll::Ready(Ok(())) => Poll::Pending,
                        Poll::Ready(Err(cause)) => {
                            Poll::Ready(server_lost(cause, &mut server_state))
                        }
                    },
                    // The topology gave up on the node (the watch is registered for the next
                    // generation whatever this one says).
                    TOPOLOGY => {
                        waiting |= bit;
                        match topology
                            .changed(&Context::from_waker(wakes.topology()))
                            .then(|| unusable(views, node))
                            .flatten()
                        {
                            None => continue,
                            Some(role) => Poll::Ready(server_lost(
                                LossCause::Unusable(role),
                                &mut server_state,
                            )),
                        }
                    }
                    // From the client.
                    FROM_CLIENT => {
                        let cx = &mut Context::from_waker(wakes.client());
                        let room = |buf: &mut BytesMut| {
                            reserve(buf, max_message, &progress.from_client, |tag| {
                                !matches!(tag, frontend::tag::COPY_DATA | frontend::tag::BIND)
                            })
                        };
                        match poll_read_once(
                            client_stream,
                            cx,
                            client_in,
                            &mut drained.client,
                            room,
                        ) {
                            Poll::Pending => {
                                waiting |= bit;
                                continue;
                            }
                            Poll::Ready(Ok(0) | Err(_)) => {
                                Poll::Ready(Stop::End(RelayEnd::ClientGone))
                            }
                            Poll::Ready(Ok(n)) => {
                                unit_done = false;
                                steering.received(n);
                                let mut scan = ClientScan {
                                    max_message,
                                    shared,
                                    proxy,
                                    views,
                                    terminated: &mut terminated,
                                    statements,
                                    to_client,
                                };
                                match scan.scan(
                                    client_in,
                                    to_server,
                                    progress,
                                    steering,
                                    *server_state.tx,
                                ) {
                                    Err(end) => Poll::Ready(Stop::End(end)),
                                    Ok(Some(decision))
                                        if progress.is_quiet() && to_server.is_empty() =>
                                    {
                                        Poll::Ready(Stop::Decided(decision))
                                    }
                                    Ok(Some(_)) => {
                                        held = true;
                                        Poll::Pending
                                    }
                                    Ok(None) => Poll::Pending,
                                }
                            }
                        }
                    }
                    // From the server.
                    FROM_SERVER => {
                        let cx = &mut Context::from_waker(wakes.server());
                        let room = |buf: &mut BytesMut| {
                            reserve(buf, max_message, &progress.from_server, |tag| {
                                !ServerSide::passes_in_pieces(tag)
                            })
                        };
                        match poll_read_once(
                            server_stream,
                            cx,
                            server_in,
                            &mut drained.server,
                            room,
                        ) {
                            Poll::Pending => {
                                waiting |= bit;
                                continue;
                            }
                            Poll::Ready(Ok(0)) => {
                                Poll::Ready(server_lost(LossCause::Closed, &mut server_state))
                            }
                            Poll::Ready(Err(e)) => {
                                Poll::Ready(server_lost(LossCause::Io(e), &mut server_state))
                            }
                            Poll::Ready(Ok(n)) => {
                                unit_done = false;
                                steering.sent(n);
                                let scanned = server_state.scan(
                                    server_in,
                                    to_client,
                                    max_message,
                                    progress,
                                    &mut steering.replay,
                                    statements,
                                );
                                match scanned {
                                    Err(_) => Poll::Ready(server_lost(
                                        LossCause::Garbled,
                                        &mut server_state,
                                    )),
                                    Ok(_) => Poll::Pending,
                                }
                            }
                        }
                    }
                    // There are no other branches.
                    _ => continue,
                };
                if outcome.is_ready() {
                    return outcome;
                }
                moved = true;
                break;
            }
            first = following(first);
            if !moved {
                waiting &= OWN_WAKERS;
                if may_park {
                    // Every branch has registered its wake-up, the client's read among them.
                    match proxy.pools.park(&parkable, cx.waker()) {
                        Some(ticket) => parking.ticket = Some(ticket),
                        None => return Poll::Ready(Stop::Release),
                    }
                }
                return Poll::Pending;
            }
        }
    })
    .await
}

/// The relay's branches: writes to the client and to the server, the topology watcher, reads
/// from the client and from the server.
const BRANCHES: usize = 5;
/// A bit for each of them.
const ALL_BRANCHES: u8 = (1 << BRANCHES) - 1;
/// The branch reading from the client.
const FROM_CLIENT: usize = 3;
/// The branch reading from the server.
const FROM_SERVER: usize = 4;
/// The branch watching the topology.
const TOPOLOGY: usize = 2;
/// The bits of the branches with a waker of their own (see [`Wakes`]).
const OWN_WAKERS: u8 = 1 << TOPOLOGY | 1 << FROM_CLIENT | 1 << FROM_SERVER;

/// The branch after `branch`, round the circle (no division: the loop turns several times per
/// round trip).
fn following(branch: usize) -> usize {
    if branch + 1 == BRANCHES {
        0
    } else {
        branch + 1
    }
}

/// The connection the relay parked with its pool between two units, if it did: taken back when
/// the relay ends, whatever ends it.
struct Parking<'a> {
    pools: &'a Pools,
    node: NodeId,
    ticket: Option<ParkTicket>,
}

impl Drop for Parking<'_> {
    fn drop(&mut self) {
        if let Some(ticket) = self.ticket.take() {
            self.pools.unpark(self.node, ticket);
        }
    }
}

/// Which side's last write emptied its buffer and still has its flush to finish.
#[derive(Debug, Default)]
struct Flushing {
    client: bool,
    server: bool,
}

/// Which side's last read found its socket drained (see [`poll_read_once`]).
#[derive(Debug, Default)]
struct Drained {
    client: bool,
    server: bool,
}

/// Whether transaction pooling may take back a connection that answered everything, outside a
/// transaction block, with nothing more from the server (a notice, a notification): yes unless
/// the session is pinned to it, or keeps it for an unnamed statement too long to prepare again
/// elsewhere. `shared`: the session is under transaction pooling.
pub fn releasable(shared: bool, steering: &Steering) -> bool {
    shared && steering.replay.pinned().is_none() && !steering.replay.holds_connection()
}

/// The role of `node` when sessions may no longer use it.
fn unusable(views: &mut Views<'_>, node: NodeId) -> Option<Role> {
    let role = views.topology().nodes.get(node).map(|n| n.role)?;
    (!role.is_usable()).then_some(role)
}

/// Gives `out`, when it has no room, a spare buffer before bytes are written into it rather than
/// swapped in (see [`move_prefix`]): grown from nothing it would be reallocated several times,
/// at every unit that renames a statement under transaction pooling.
pub(super) fn make_room(out: &mut BytesMut, wanted: usize) {
    if out.capacity() == 0 {
        *out = spare::take(wanted);
    }
}

/// Moves the first `n` bytes of `input` to the end of `out`; swaps buffers when that is free.
pub(super) fn move_prefix(input: &mut BytesMut, out: &mut BytesMut, n: usize) {
    if n == 0 {
        return;
    }
    if out.is_empty() && n == input.len() {
        std::mem::swap(input, out);
    } else {
        out.extend_from_slice(&input[..n]);
        input.advance(n);
    }
}

/// Writes what `out` holds to `stream` as far as the socket takes it, flushing a TLS stream once
/// it is all written (a plain socket has nothing to flush); `flushing` marks a flush still under
/// way (records the TLS stream buffered), which is finished first. Ready once something moved;
/// an error is the cause of the loss.
// Inlined into the relay's loop: called apart, it cost about 250 instructions per transaction
// (callgrind, transaction pooling).
#[inline]
fn poll_send(
    stream: &mut Stream,
    cx: &mut Context<'_>,
    out: &mut BytesMut,
    flushing: &mut bool,
) -> Poll<Result<(), LossCause>> {
    if !*flushing {
        match stream.poll_write_some(cx, out) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Ok(0)) => return Poll::Ready(Err(LossCause::Closed)),
            Poll::Ready(Err(e)) => return Poll::Ready(Err(LossCause::Io(e))),
            Poll::Ready(Ok(n)) => out.advance(n),
        }
        if !out.is_empty() || !stream.is_tls() {
            return Poll::Ready(Ok(()));
        }
    }
    match Pin::new(stream).poll_flush(cx) {
        Poll::Ready(Ok(())) => {
            *flushing = false;
            Poll::Ready(Ok(()))
        }
        Poll::Ready(Err(e)) => Poll::Ready(Err(LossCause::Io(e))),
        // The write moved bytes: ready, the flush finished on a later turn.
        Poll::Pending if !*flushing => {
            *flushing = true;
            Poll::Ready(Ok(()))
        }
        Poll::Pending => Poll::Pending,
    }
}

/// Reads into `buf`, once `room` has made room in it, at most [`HIGH_WATER`] bytes: a read as
/// large as the buffer's spare room would let the buffers' capacities ratchet up as they are
/// swapped (see [`move_prefix`]) while a large message streams through.
///
/// `drained`: the last read, from a plain socket, filled less than it was offered, which tells
/// tokio (with epoll or kqueue) that the socket has nothing more, and it clears its readiness:
/// this read waits for readiness first (see [`Stream::poll_read_ready`]). Set again by this
/// read; never for a TLS stream, which may hold bytes it decrypted while its socket has none.
fn poll_read_once(
    stream: &mut Stream,
    cx: &mut Context<'_>,
    buf: &mut BytesMut,
    drained: &mut bool,
    room: impl FnOnce(&mut BytesMut),
) -> Poll<io::Result<usize>> {
    if std::mem::take(drained) {
        if let Err(e) = ready!(stream.poll_read_ready(cx)) {
            return Poll::Ready(Err(e));
        }
    }
    room(buf);
    let mut limited = buf.limit(HIGH_WATER);
    let offered = limited.chunk_mut().len();
    let read = ready!(stream.poll_read_buf(cx, &mut limited));
    *drained = matches!(read, Ok(n) if n < offered) && !stream.is_tls();
    Poll::Ready(read)
}

/// Makes room for the next read: at least a chunk, or the whole of a message that must be read
/// `whole` (by its tag) and whose header says it is larger. A message in `passage`, or one that
/// may pass in pieces, needs no more than a chunk at a time. (An invalid header never waits
/// here: the scan that saw it ended the relay.)
fn reserve(buf: &mut BytesMut, max_message: usize, passage: &Passage, whole: impl Fn(u8) -> bool) {
    let wanted = match header(buf, max_message) {
        _ if passage.is_open() => READ_CHUNK,
        Ok(Some((tag, total))) if total > buf.len() && (total <= PIECES_OVER || whole(tag)) => {
            (total - buf.len()).max(READ_CHUNK)
        }
        _ => READ_CHUNK,
    };
    if buf.capacity() == 0 {
        *buf = spare::take(wanted);
    } else if buf.capacity() - buf.len() < wanted / 2 {
        buf.reserve(wanted);
    }
}

fn server_lost(cause: LossCause, state: &mut ServerSide<'_>) -> Stop {
    lost(cause, state.fatal.take())
}

fn lost(cause: LossCause, fatal: Option<NodeFatal>) -> Stop {
    Stop::Lost(Loss { cause, fatal })
}
