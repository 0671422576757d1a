//! A unit held by the operator's PAUSE (see `pause`): it waits before it is routed until
//! RESUME, unless the client cancels it or leaves.

use pgvigil_proto::sqlstate;
use tokio::io::AsyncReadExt;
use tracing::{debug, info};

use super::recover::{self, Failure};
use super::relay::{ClientConn, RelayEnd};
use crate::cancel::{CancelKey, ClientState};
use crate::pause::Traffic;
use crate::proxy::Proxy;

/// While a unit is held the client's socket is read (to see it close) until this much waits in
/// its buffer.
const HOLD_BUFFER: usize = 256 * 1024;

/// The unit at the front of the client's buffer waits until RESUME. The client's cancel request
/// refuses it with 57014, as PostgreSQL cancels a statement, and so does
/// `client.query_wait_timeout` running out (the session goes on either way); a client that
/// leaves ends the session (the socket is read meanwhile, so that its close is seen).
pub(super) async fn hold(
    client: &mut ClientConn,
    key: &CancelKey,
    proxy: &Proxy,
) -> Result<(), RelayEnd> {
    let mut traffic = proxy.pause.subscribe();
    let cancels = key.cancels();
    let _holding = proxy.pause.holding();
    let _waiting = Waiting::set(key);
    info!("unit held: pgvigil is paused");
    let max_message = proxy.config().max_message_size;
    let limit = proxy.config().client.query_wait_timeout;
    let expired = async {
        if limit.is_zero() {
            std::future::pending::<()>().await;
        }
        tokio::time::sleep(limit).await;
    };
    tokio::pin!(expired);
    loop {
        if *traffic.borrow_and_update() == Traffic::Flowing {
            debug!("held unit released");
            return Ok(());
        }
        let room = client.rbuf.len() < HOLD_BUFFER;
        tokio::select! {
            changed = traffic.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
            }
            () = &mut expired => {
                info!(?limit, "a unit held by PAUSE waited past client.query_wait_timeout");
                let failure = Failure {
                    code: sqlstate::QUERY_CANCELED,
                    message: "canceling statement: pgvigil is paused and held it longer than \
                              client.query_wait_timeout",
                };
                return recover::reject_unit(client, &failure, max_message).await;
            }
            () = cancels.changed() => {
                info!("a unit held by PAUSE was cancelled by the client");
                let failure = Failure {
                    code: sqlstate::QUERY_CANCELED,
                    message: "canceling statement due to user request",
                };
                return recover::reject_unit(client, &failure, max_message).await;
            }
            read = client.stream.read_buf(&mut client.rbuf), if room => {
                if matches!(read, Ok(0) | Err(_)) {
                    return Err(RelayEnd::ClientGone);
                }
            }
        }
    }
}

/// The client shows as waiting (SHOW CLIENTS, SHOW POOLS) until this is dropped.
pub(super) struct Waiting<'a>(&'a CancelKey);

impl Waiting<'_> {
    /// Marks the client of `key` waiting.
    pub(super) fn set(key: &CancelKey) -> Waiting<'_> {
        key.set_state(ClientState::Waiting);
        Waiting(key)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.set_state(ClientState::Active);
    }
}
