//! A transaction block whose server connection was lost. PostgreSQL itself would have closed
//! the client's connection; pgvigil keeps the session, so it must never let the second half of
//! that transaction run anywhere. Until the client ends the block, every unit is answered here,
//! without a server, the way PostgreSQL answers in a failed transaction block (docs, "Extended
//! Query" and "Simple Query"): 25P02 for anything but ROLLBACK or COMMIT, and COMMIT answered with
//! the ROLLBACK command tag and ReadyForQuery 'I'.
//!
//! Unlike PostgreSQL, `ROLLBACK TO SAVEPOINT` is refused too: the savepoint died with the
//! connection.

use bytes::{Buf, BufMut, BytesMut};
use pgvigil_proto::classify::TxControl;
use pgvigil_proto::encode;
use pgvigil_proto::frontend::{self, Bind, Describe, Parse, Query};
use pgvigil_proto::sqlstate;
use pgvigil_proto::TxStatus;

use super::recover::{first_message, flush, skip_to_sync, Failure, IN_FAILED};
use super::relay::{ClientConn, RelayEnd};
use super::steering::Steering;
use crate::proxy::Proxy;

/// Where the client's transaction block stands after its server connection was lost inside it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LostTransaction {
    /// The client has not heard of the loss yet (it came while the client was between
    /// statements): its next unit gets this message as a 08006 error and ReadyForQuery 'E' (a
    /// ROLLBACK is simply done; a COMMIT fails and ends the block, as a COMMIT that fails does).
    Unannounced(String),
    /// The client was told: the block is failed until ROLLBACK or COMMIT.
    Aborted,
}

/// Answers the unit at the front of the client's buffer (reading it first if needed) without a
/// server; returns the state after it (`None`: the transaction block is over).
pub async fn answer_unit(
    client: &mut ClientConn,
    lost: LostTransaction,
    steering: &mut Steering,
    proxy: &Proxy,
) -> Result<Option<LostTransaction>, RelayEnd> {
    let max_message = proxy.config().max_message_size;
    let (tag, len) = first_message(client, max_message).await?;
    let failure = match &lost {
        LostTransaction::Unannounced(message) => Failure {
            code: sqlstate::CONNECTION_FAILURE,
            message,
        },
        LostTransaction::Aborted => IN_FAILED,
    };
    let after = match tag {
        frontend::tag::TERMINATE => return Err(RelayEnd::Terminated),
        frontend::tag::QUERY => {
            let frame = client.rbuf.split_to(len);
            let sql = Query::parse(&frame[5..]).map(|q| q.sql).unwrap_or_default();
            let c = proxy.classifier.query(sql);
            let single = (c.statements == 1).then_some(c.tx).flatten();
            let ends = single.is_some_and(ends_block);
            let unannounced = matches!(lost, LostTransaction::Unannounced(_));
            let out = &mut client.pending;
            if c.statements == 0 && !unannounced {
                encode::message(out, b'I', |_| {});
                Some(lost)
            } else if ends && (!unannounced || single == Some(TxControl::Rollback)) {
                command_complete(out, b"ROLLBACK");
                None
            } else if ends {
                // A COMMIT that fails ends the block, as it does in PostgreSQL.
                failure.encode(out);
                None
            } else {
                failure.encode(out);
                Some(LostTransaction::Aborted)
            }
        }
        frontend::tag::SYNC if lost == LostTransaction::Aborted => {
            // A lone Sync in a failed block gets its ReadyForQuery 'E' and nothing else.
            client.rbuf.advance(len);
            Some(lost)
        }
        frontend::tag::FUNCTION_CALL | frontend::tag::SYNC => {
            client.rbuf.advance(len);
            failure.encode(&mut client.pending);
            Some(LostTransaction::Aborted)
        }
        _ => return extended(client, &lost, &failure, steering, proxy).await,
    };
    let status = if after.is_some() {
        TxStatus::Failed
    } else {
        TxStatus::Idle
    };
    encode::ready_for_query(&mut client.pending, status);
    flush(client).await?;
    Ok(after)
}

/// How far an extended-protocol ROLLBACK or COMMIT (on the unnamed statement and portal, the
/// way drivers send them) has come in the unit.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Exit {
    None,
    Parsed,
    Bound,
    Done,
}

/// Answers an extended-protocol unit message by message up to its Sync: Close and Flush as
/// PostgreSQL does in a failed block, an unnamed ROLLBACK or COMMIT through Parse, Bind,
/// Describe and Execute; the first other message gets `failure`, and the rest of the unit is
/// skipped.
async fn extended(
    client: &mut ClientConn,
    lost: &LostTransaction,
    failure: &Failure<'_>,
    steering: &mut Steering,
    proxy: &Proxy,
) -> Result<Option<LostTransaction>, RelayEnd> {
    let max_message = proxy.config().max_message_size;
    let mut exit = Exit::None;
    loop {
        let (tag, len) = first_message(client, max_message).await?;
        let frame = client.rbuf.split_to(len);
        let body = &frame[5..];
        let out = &mut client.pending;
        let ok = match (tag, exit) {
            (frontend::tag::SYNC, _) => {
                if exit != Exit::Done && matches!(lost, LostTransaction::Unannounced(_)) {
                    // The client must hear of the loss before it sees the failed block.
                    failure.encode(out);
                }
                break;
            }
            (frontend::tag::TERMINATE, _) => return Err(RelayEnd::Terminated),
            (frontend::tag::FLUSH, _) => {
                flush(client).await?;
                true
            }
            (frontend::tag::CLOSE, _) => {
                // The statement is gone for the session too: no node must prepare it again.
                steering.forwarded(tag, &frame, proxy);
                encode::message(out, b'3', |_| {});
                true
            }
            (frontend::tag::PARSE, Exit::None) if *lost == LostTransaction::Aborted => {
                let ends = Parse::parse(body)
                    .ok()
                    .filter(|p| p.name.is_empty())
                    .map(|p| {
                        let c = proxy.classifier.parse(p.sql);
                        c.statements == 1 && c.tx.is_some_and(ends_block)
                    });
                if ends == Some(true) {
                    exit = Exit::Parsed;
                    encode::message(out, b'1', |_| {});
                }
                ends == Some(true)
            }
            (frontend::tag::BIND, Exit::Parsed) => {
                let unnamed = Bind::parse(body).is_ok_and(|b| b.statement.is_empty());
                if unnamed {
                    exit = Exit::Bound;
                    encode::message(out, b'2', |_| {});
                }
                unnamed
            }
            (frontend::tag::DESCRIBE, Exit::Parsed | Exit::Bound) => {
                if Describe::parse(body).is_ok_and(|d| d.kind == b'S') {
                    encode::message(out, b't', |b| b.put_i16(0));
                }
                encode::message(out, b'n', |_| {});
                true
            }
            (frontend::tag::EXECUTE, Exit::Bound) => {
                exit = Exit::Done;
                command_complete(out, b"ROLLBACK");
                true
            }
            _ => false,
        };
        if !ok {
            failure.encode(&mut client.pending);
            flush(client).await?;
            skip_to_sync(client, max_message).await?;
            break;
        }
    }
    let (status, after) = match exit {
        Exit::Done => (TxStatus::Idle, None),
        _ => (TxStatus::Failed, Some(LostTransaction::Aborted)),
    };
    encode::ready_for_query(&mut client.pending, status);
    flush(client).await?;
    Ok(after)
}

/// Whether a transaction-control statement ends a failed transaction block (with a rollback).
fn ends_block(tx: TxControl) -> bool {
    matches!(
        tx,
        TxControl::Commit | TxControl::Rollback | TxControl::PrepareTransaction
    )
}

/// A CommandComplete with `tag`.
fn command_complete(out: &mut BytesMut, tag: &[u8]) {
    encode::message(out, b'C', |b| {
        b.put_slice(tag);
        b.put_u8(0);
    });
}
