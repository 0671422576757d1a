//! The client's side of a session that has no server connection for a moment: answering the
//! requests a lost connection left unanswered, refusing a unit that cannot be served, and reading
//! the next unit before it is routed.
//!
//! The answers follow what PostgreSQL itself does after an error in the extended protocol
//! (docs, "Extended Query"): an ErrorResponse at once, then every message up to the next Sync is
//! discarded, and the Sync is answered with ReadyForQuery.

use std::future::Future;
use std::task::Poll;

use bytes::{Buf, BufMut, BytesMut};
use pgvigil_proto::backend;
use pgvigil_proto::encode::{self, PgError, Severity};
use pgvigil_proto::frame::{header, next_message};
use pgvigil_proto::frontend::{self, Query};
use pgvigil_proto::sqlstate;
use pgvigil_proto::TxStatus;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadBuf};

use super::naming::{self, SqlDrop};
use super::relay::{ClientConn, Progress, RelayEnd, Stop, READ_CHUNK};
use super::spare;
use super::steering::{Decision, Steering};
use super::views::Views;
use crate::proxy::Proxy;

/// Room made for the rest of a message the client has begun to send.
const REST_CHUNK: usize = 4096;

/// The most an idle session reads at once when its client sends again: enough for a usual
/// Query or extended-protocol unit; the rest is read into the session's buffer.
const FIRST_READ: usize = 2048;

/// An error the client is told about as ERROR (its session goes on).
pub struct Failure<'a> {
    /// SQLSTATE.
    pub code: &'a str,
    /// Text for the client.
    pub message: &'a str,
}

impl Failure<'_> {
    /// Writes it as an ErrorResponse.
    pub fn encode(&self, out: &mut BytesMut) {
        encode::error_response_with(
            out,
            &PgError {
                severity: Severity::Error,
                code: self.code,
                message: self.message,
                detail: None,
                hint: None,
            },
        );
    }
}

/// Answers what a lost server connection left unanswered, each request with an error and a
/// ReadyForQuery carrying `status` (where the loss leaves the client's transaction). The first
/// request gets `first` (the node's own error, whole) when there is one, else `failure`; in a
/// failed transaction block the later ones get 25P02, as PostgreSQL answers them. An
/// extended-protocol unit sent in part is answered once the client has sent the rest of it up to
/// its Sync. `progress` is reset.
pub async fn answer_lost(
    client: &mut ClientConn,
    progress: &mut Progress,
    first: Option<&[u8]>,
    failure: &Failure<'_>,
    status: TxStatus,
    max_message: usize,
) -> Result<(), RelayEnd> {
    let mut first = Some(first);
    let mut answer = |out: &mut BytesMut| match first.take() {
        Some(Some(frame)) => out.extend_from_slice(frame),
        Some(None) => failure.encode(out),
        None if status == TxStatus::Failed => IN_FAILED.encode(out),
        None => failure.encode(out),
    };
    for _ in 0..progress.awaiting_ready {
        answer(&mut client.pending);
        encode::ready_for_query(&mut client.pending, status);
    }
    let unsynced = progress.unsynced;
    *progress = Progress::default();
    if unsynced {
        answer(&mut client.pending);
        flush(client).await?;
        skip_to_sync(client, max_message).await?;
        encode::ready_for_query(&mut client.pending, status);
    }
    flush(client).await
}

/// What PostgreSQL answers a statement in a failed transaction block.
pub const IN_FAILED: Failure<'static> = Failure {
    code: sqlstate::IN_FAILED_SQL_TRANSACTION,
    message: "current transaction is aborted, commands ignored until end of transaction block",
};

/// Refuses the unit at the front of the client's buffer (reading it first if needed): `failure`,
/// its messages consumed (a Query or FunctionCall; extended messages through their Sync), and
/// ReadyForQuery('I').
pub async fn reject_unit(
    client: &mut ClientConn,
    failure: &Failure<'_>,
    max_message: usize,
) -> Result<(), RelayEnd> {
    let (tag, len) = first_message(client, max_message).await?;
    if tag == frontend::tag::TERMINATE {
        return Err(RelayEnd::Terminated);
    }
    failure.encode(&mut client.pending);
    match tag {
        frontend::tag::QUERY | frontend::tag::FUNCTION_CALL | frontend::tag::SYNC => {
            client.rbuf.advance(len)
        }
        _ => {
            flush(client).await?;
            skip_to_sync(client, max_message).await?;
        }
    }
    encode::ready_for_query(&mut client.pending, TxStatus::Idle);
    flush(client).await
}

/// Transaction pooling: answers the client's SQL `DEALLOCATE` at the front of its buffer (see
/// `Decision::Deallocate`) from the session's own record, as PostgreSQL would on a connection
/// in transaction status `status`: in a failed block it is refused like every statement.
pub async fn answer_deallocate(
    client: &mut ClientConn,
    steering: &mut Steering,
    status: TxStatus,
    max_message: usize,
) -> Result<(), RelayEnd> {
    let (_, len) = first_message(client, max_message).await?;
    let frame = client.rbuf.split_to(len);
    let drop = Query::parse(&frame[5..])
        .ok()
        .and_then(|q| naming::sql_drop(q.sql));
    if status == TxStatus::Failed {
        IN_FAILED.encode(&mut client.pending);
    } else {
        let tag: &[u8] = match drop {
            Some(SqlDrop::Deallocate(name)) => {
                steering.replay.deallocated(&name);
                b"DEALLOCATE"
            }
            _ => {
                steering.replay.drop_statements();
                b"DEALLOCATE ALL"
            }
        };
        encode::message(&mut client.pending, backend::tag::COMMAND_COMPLETE, |b| {
            b.put_slice(tag);
            b.put_u8(0);
        });
    }
    encode::ready_for_query(&mut client.pending, status);
    flush(client).await
}

/// Reads the client's next unit while the session has no connection to its current node, and
/// returns where it goes (never `Forward`: the steering routes a detached session afresh), or
/// `Idle` when the client has sent nothing yet: the session then waits without this future.
/// `views`: the session's views of the shared state.
pub async fn next_unit(
    client: &mut ClientConn,
    steering: &mut Steering,
    (views, proxy): (&mut Views<'_>, &Proxy),
) -> Stop {
    if let Err(end) = flush(client).await {
        return Stop::End(end);
    }
    // The session holds no server connection: it may stay idle a long time.
    client.release_buffers();
    if client.rbuf.is_empty() {
        return Stop::Idle;
    }
    // Read once the client has sent something: under transaction pooling a session comes here
    // with nothing to read after each transaction.
    let max_message = views.config().max_message_size;
    loop {
        // Only the first header: a large Bind is routed on its names, before it is whole.
        match first_tag(client, max_message).await {
            Err(end) => return Stop::End(end),
            Ok(frontend::tag::TERMINATE) => return Stop::End(RelayEnd::Terminated),
            Ok(_) => {}
        }
        match steering.decide(&client.rbuf, false, views, proxy) {
            Decision::Wait => {
                if let Err(end) = read_more(client).await {
                    return Stop::End(end);
                }
            }
            decision => return Stop::Decided(decision),
        }
    }
}

/// Waits until the client sends something (or leaves), and keeps the first bytes, read into a
/// small buffer on the stack: an idle session waits here and holds no buffer of its own (a read
/// into its empty `BytesMut` would allocate before the client has sent anything). Not an async
/// function: its future is only the reference to `client`, part of every idle client's task.
pub fn first_bytes(client: &mut ClientConn) -> impl Future<Output = Result<(), RelayEnd>> + '_ {
    std::future::poll_fn(|cx| {
        // Not zeroed first: it would cost a memset per idle-to-busy turn, and `ReadBuf` tracks
        // which bytes the read filled.
        let mut first = [std::mem::MaybeUninit::<u8>::uninit(); FIRST_READ];
        let mut read = ReadBuf::uninit(&mut first);
        match std::pin::Pin::new(&mut client.stream).poll_read(cx, &mut read) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Err(_)) => Poll::Ready(Err(RelayEnd::ClientGone)),
            Poll::Ready(Ok(())) if read.filled().is_empty() => {
                Poll::Ready(Err(RelayEnd::ClientGone))
            }
            Poll::Ready(Ok(())) => {
                if client.rbuf.capacity() == 0 {
                    // The relay's read chunk at once, a spare one when the thread has one: an
                    // exact fit would be grown (allocated and copied again) by the relay's
                    // first read.
                    client.rbuf = spare::take(READ_CHUNK);
                }
                client.rbuf.extend_from_slice(read.filled());
                Poll::Ready(Ok(()))
            }
        }
    })
}

/// Discards client messages up to and including the next Sync.
pub(super) async fn skip_to_sync(
    client: &mut ClientConn,
    max_message: usize,
) -> Result<(), RelayEnd> {
    loop {
        let (tag, len) = first_message(client, max_message).await?;
        client.rbuf.advance(len);
        match tag {
            frontend::tag::SYNC => return Ok(()),
            frontend::tag::TERMINATE => return Err(RelayEnd::Terminated),
            _ => {}
        }
    }
}

/// The tag and length of the first message in the client's buffer, reading until it is whole.
pub(super) async fn first_message(
    client: &mut ClientConn,
    max_message: usize,
) -> Result<(u8, usize), RelayEnd> {
    loop {
        match next_message(&client.rbuf, max_message) {
            Ok(Some(message)) => return Ok((message.tag, message.len())),
            Ok(None) => read_more(client).await?,
            Err(e) => return Err(RelayEnd::Violation(e.to_string())),
        }
    }
}

/// The type of the first message in the client's buffer, reading until its header is there.
async fn first_tag(client: &mut ClientConn, max_message: usize) -> Result<u8, RelayEnd> {
    loop {
        match header(&client.rbuf, max_message) {
            Ok(Some((tag, _))) => return Ok(tag),
            Ok(None) => read_more(client).await?,
            Err(e) => return Err(RelayEnd::Violation(e.to_string())),
        }
    }
}

/// Reads what the client sends next. An empty buffer reads a first few bytes (BytesMut grows by
/// 64 bytes when full), so that a client idle in this read holds no large buffer; once a message
/// has begun, room for the rest is made first.
async fn read_more(client: &mut ClientConn) -> Result<(), RelayEnd> {
    if !client.rbuf.is_empty() {
        client.rbuf.reserve(REST_CHUNK);
    }
    match client.stream.read_buf(&mut client.rbuf).await {
        Ok(0) | Err(_) => Err(RelayEnd::ClientGone),
        Ok(_) => Ok(()),
    }
}

/// Writes what the client is owed.
pub(super) async fn flush(client: &mut ClientConn) -> Result<(), RelayEnd> {
    if client.pending.is_empty() {
        return Ok(());
    }
    let written = async {
        client.stream.write_all(&client.pending).await?;
        client.stream.flush().await
    };
    written.await.map_err(|_| RelayEnd::ClientGone)?;
    client.pending.clear();
    Ok(())
}
