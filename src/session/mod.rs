//! One client's life: startup, authentication, attaching a server connection, the relay, and
//! handing the server connection back (reset) or dropping it (broken).

mod aborted;
mod auth_exchange;
mod client_scan;
mod finish;
mod hold;
mod loss;
mod naming;
mod open;
mod recover;
mod relay;
mod replay;
mod reset;
mod route;
mod serve;
mod server_side;
mod settings;
mod spare;
mod sql_words;
pub mod startup;
mod startup_sql;
mod steering;
mod sync;
mod topology_watch;
mod unit;
mod unnamed;
mod views;
mod wakes;

pub use topology_watch::watch_topology;

use std::future::Future;
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use pgvigil_proto::backend::{self, ErrorFields};
use pgvigil_proto::encode::{self, PgError, Severity};
use pgvigil_proto::sqlstate;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tracing::{debug, info};

use crate::cancel::CancelKey;
use crate::metrics::Rejection;
use crate::pool::{Lease, PoolError};
use crate::proxy::Proxy;
use crate::router;
use crate::server::ServerError;
use crate::stream::Stream;
use open::{open_for_start, OpenError};
use relay::ClientConn;
use startup::{ClientStartup, Opening};

/// Why a session ended before or outside the relay.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The client must be told why (FATAL ErrorResponse with this SQLSTATE), then closed.
    #[error("{message} (SQLSTATE {code})")]
    Refused {
        /// SQLSTATE.
        code: &'static str,
        /// Text for the client.
        message: String,
    },
    /// The node refused; its own ErrorResponse frame is forwarded to the client.
    #[error("node refused the session: {0}")]
    NodeRefused(String, bytes::Bytes),
    /// The connection is simply closed (client left, nothing to say).
    #[error("connection closed")]
    Closed,
    /// Socket error.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Serves one accepted client connection to the end, counted in the metrics while it lasts;
/// `permit`, its place under `max_client_conn`, is let go when it ends. The future is the
/// client's whole task.
pub fn run(
    tcp: TcpStream,
    proxy: Arc<Proxy>,
    permit: OwnedSemaphorePermit,
) -> impl Future<Output = ()> {
    proxy.metrics.client_opened();
    // Boxed until startup takes it: an async function keeps room for its arguments for its
    // whole life, and inline the socket would be 40 bytes of every idle client's task.
    serve_client(
        Box::new(tcp),
        Admitted {
            proxy,
            _permit: permit,
        },
    )
}

/// A client counted in the metrics and holding its place under `max_client_conn` until it is
/// dropped.
struct Admitted {
    proxy: Arc<Proxy>,
    /// Given back when dropped.
    _permit: OwnedSemaphorePermit,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.proxy.metrics.client_closed();
    }
}

/// The client's session, from its startup on.
async fn serve_client(tcp: Box<TcpStream>, admitted: Admitted) {
    let proxy = &admitted.proxy;
    // Everything up to the first server connection is boxed: its state is large and would
    // otherwise stay allocated in the task for the whole session. The session itself is boxed
    // too, so that the task holds little more than the box (and, while the session is idle,
    // one small read).
    // The socket is moved out of its box inside a block, which frees the box there: moved out
    // with `*tcp` in this scope, the box's allocation (32 bytes) would be freed only when this
    // function returns, at the end of the session.
    let started = Box::pin(start(
        {
            let boxed = tcp;
            *boxed
        },
        proxy,
    ));
    let Some((span, session)) = started.await else {
        return;
    };
    let _entered = span.as_deref().map(tracing::Span::enter);
    serve::serve(session).await
}

/// Startup, authentication and the first server connection: the session, with the span of its
/// logs when they are on; `None` when the client was refused (and told why), or served by the console.
async fn start(
    tcp: TcpStream,
    proxy: &Arc<Proxy>,
) -> Option<(Option<Box<tracing::Span>>, Box<serve::Session<'_>>)> {
    let peer = tcp.peer_addr().ok();
    let Authenticated {
        mut stream,
        mut startup,
        buf: client_buf,
    } = match open_and_authenticate(tcp, proxy).await {
        Ok(Some(opened)) => opened,
        Ok(None) => return None,
        Err((stream, error)) => {
            debug!(?peer, %error, "client refused before its session started");
            let reason = match &error {
                SessionError::Refused { code, .. } if code.starts_with("28") => {
                    Rejection::Authentication
                }
                _ => Rejection::Startup,
            };
            proxy.metrics.client_rejected(reason);
            if let Some(mut stream) = stream {
                refuse(&mut stream, &error).await;
            }
            return None;
        }
    };
    let span = tracing::debug_span!("session", user = %startup.user(), db = %startup.database());
    let entered = span.enter();
    startup.login_config = Some(Arc::clone(&proxy.config()));
    let key = proxy.cancels.register();
    key.describe(crate::cancel::ClientInfo::new(
        startup.context().clone(),
        peer,
    ));
    if startup.database() == crate::console::DATABASE {
        let admin = proxy.config().user(startup.user()).is_some_and(|u| u.admin);
        if admin {
            info!(user = %startup.user(), "console session");
            Box::pin(crate::console::serve(stream, client_buf, proxy, &key)).await;
        } else {
            info!(user = %startup.user(), "console refused: not an admin user");
            proxy.metrics.client_rejected(Rejection::Startup);
            // What PostgreSQL says to a role without CONNECT on the database.
            let error = SessionError::Refused {
                code: sqlstate::INSUFFICIENT_PRIVILEGE,
                message: format!(
                    "permission denied for database \"{}\": the console needs admin = true in [[users]]",
                    crate::console::DATABASE
                ),
            };
            refuse(&mut stream, &error).await;
        }
        return None;
    }
    let attached = attach(&mut stream, &startup, proxy, &key).await;
    drop(entered);
    match attached {
        Ok(lease) => {
            let client = ClientConn {
                stream,
                rbuf: client_buf,
                pending: BytesMut::new(),
            };
            let session = serve::Session::new(client, lease, proxy, key, startup);
            // The span boxed, and only when it logs (debug): inline it would be 40 bytes of
            // every idle client's task.
            let span = (!span.is_disabled()).then(|| Box::new(span));
            Some((span, Box::new(session)))
        }
        Err(error) => {
            info!(?peer, user = %startup.user(), %error, "session could not start");
            proxy.metrics.client_rejected(Rejection::NoServer);
            refuse(&mut stream, &error).await;
            None
        }
    }
}

/// A client that passed startup and authentication.
struct Authenticated {
    stream: Stream,
    startup: ClientStartup,
    /// Bytes the client already sent beyond its authentication.
    buf: BytesMut,
}

/// Startup and authentication, together bounded by `client.startup_timeout`. Errors carry the
/// stream when the client should be told why.
///
/// Like PostgreSQL, a client that does not finish its startup packet in time is closed silently,
/// and one that stalls during authentication is told "canceling authentication due to timeout".
async fn open_and_authenticate(
    tcp: TcpStream,
    proxy: &Proxy,
) -> Result<Option<Authenticated>, startup::Refusal> {
    let deadline = tokio::time::Instant::now() + proxy.config().client.startup_timeout;
    let opening = match tokio::time::timeout_at(deadline, startup::open(tcp, proxy)).await {
        Ok(opening) => opening?,
        Err(_) => return Err((None, SessionError::Closed)),
    };
    let (mut stream, startup, mut buf) = match opening {
        Opening::Cancelled => return Ok(None),
        Opening::Session(stream, startup, buf) => (stream, startup, buf),
    };
    let authenticated = tokio::time::timeout_at(
        deadline,
        auth_exchange::authenticate(&mut stream, &mut buf, &startup, proxy),
    )
    .await;
    match authenticated {
        Ok(Ok(())) => Ok(Some(Authenticated {
            stream,
            startup,
            buf,
        })),
        Ok(Err(error)) => Err((Some(stream), error)),
        Err(_) => Err((
            Some(stream),
            SessionError::Refused {
                code: sqlstate::QUERY_CANCELED,
                message: "canceling authentication due to timeout".into(),
            },
        )),
    }
}

/// Routes, opens a server connection (trying the next usable node when one cannot be reached),
/// and greets the client (AuthenticationOk, ParameterStatus, BackendKeyData, ReadyForQuery).
async fn attach(
    stream: &mut Stream,
    startup: &ClientStartup,
    proxy: &Proxy,
    key: &CancelKey,
) -> Result<Lease, SessionError> {
    let mut tried = 0u64;
    let mut last_failure: Option<OpenError> = None;
    let lease = loop {
        let route = if tried == 0 {
            proxy.wait_for_route(|t| router::route_session(t, 0)).await
        } else {
            // Every node was tried once already: no waiting for another.
            router::route_session(&proxy.topology.load(), tried)
        };
        let route = match (route, last_failure) {
            (Ok(route), _) => route,
            (Err(_), Some(failure)) => return Err(failure.into_session_error()),
            (Err(e), None) => {
                return Err(SessionError::Refused {
                    code: sqlstate::CANNOT_CONNECT_NOW,
                    message: e.to_string(),
                })
            }
        };
        debug!(node = route.node, reason = ?route.reason, "routed");
        match open_for_start(proxy, route.node, startup, tried).await {
            Ok(lease) => break lease,
            Err(error) if error.unreachable() => {
                info!(node = route.node, %error, "cannot start the session there; trying another node");
                proxy.report_server_failure(route.node);
                tried |= 1 << route.node;
                last_failure = Some(error);
            }
            Err(error) => return Err(error.into_session_error()),
        }
    };
    key.set_target(Some(lease.conn.cancel_target()));
    let mut out = BytesMut::with_capacity(512);
    encode::auth_ok(&mut out);
    for (name, value) in lease.conn.params.iter() {
        encode::parameter_status(&mut out, name, value);
    }
    encode::backend_key_data(&mut out, key.pid, &key.secret.to_be_bytes());
    encode::ready_for_query(&mut out, lease.conn.tx);
    stream.write_all(&out).await?;
    Ok(lease)
}

/// What the client is told when its server connection cannot be made or set up: the node's own
/// error as FATAL (the session ends), or 08006 with pgvigil's reason.
fn server_refusal(error: ServerError) -> SessionError {
    match error {
        ServerError::Rejected { message, frame, .. } => {
            let frame = as_fatal(&frame).unwrap_or(frame);
            SessionError::NodeRefused(message, frame)
        }
        other => SessionError::Refused {
            code: sqlstate::CONNECTION_FAILURE,
            message: other.to_string(),
        },
    }
}

/// The node's ErrorResponse frame with its severity raised to FATAL; `None` if it is malformed.
///
/// A SET that fails at startup was an ERROR to the node, but it ends the client's session, and
/// PostgreSQL itself reports a bad startup setting as FATAL: clients must not read it as "the
/// statement failed, go on". (Login errors are FATAL already and pass unchanged.)
fn as_fatal(frame: &[u8]) -> Option<Bytes> {
    let fields = ErrorFields::parse(frame.get(5..)?).ok()?;
    let mut out = BytesMut::with_capacity(frame.len() + 8);
    encode::message(&mut out, backend::tag::ERROR_RESPONSE, |b| {
        for (code, value) in fields.iter() {
            b.put_u8(code);
            match code {
                b'S' | b'V' => b.put_slice(Severity::Fatal.as_str().as_bytes()),
                _ => b.put_slice(value),
            }
            b.put_u8(0);
        }
        b.put_u8(0);
    });
    Some(out.freeze())
}

fn pool_refusal(error: PoolError) -> SessionError {
    match error {
        PoolError::Exhausted { .. } => SessionError::Refused {
            code: sqlstate::TOO_MANY_CONNECTIONS,
            message: error.to_string(),
        },
        PoolError::Connect(error) => server_refusal(error),
        PoolError::Abandoned { .. } => SessionError::Refused {
            code: sqlstate::CONNECTION_FAILURE,
            message: error.to_string(),
        },
    }
}

/// Tells the client why it is being disconnected (best effort) and closes.
async fn refuse(stream: &mut Stream, error: &SessionError) {
    let mut out = BytesMut::new();
    match error {
        SessionError::Refused { code, message } => encode::error_response_with(
            &mut out,
            &PgError {
                severity: Severity::Fatal,
                code,
                message,
                detail: None,
                hint: None,
            },
        ),
        SessionError::NodeRefused(_, frame) => out.extend_from_slice(frame),
        SessionError::Closed | SessionError::Io(_) => return,
    }
    let _ = stream.write_all(&out).await;
    let _ = stream.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_startup_setting_is_reported_as_fatal_with_the_nodes_fields() {
        let mut frame = BytesMut::new();
        encode::error_response(&mut frame, "ERROR", "42704", "unrecognized parameter");
        let fatal = as_fatal(&frame).unwrap();
        let fields = ErrorFields::parse(&fatal[5..]).unwrap();
        assert_eq!(fields.get(b'S'), Some(b"FATAL".as_slice()));
        assert_eq!(fields.severity(), Some(b"FATAL".as_slice()));
        assert_eq!(fields.sqlstate(), Some(b"42704".as_slice()));
        assert_eq!(fields.message(), Some(b"unrecognized parameter".as_slice()));
        assert!(as_fatal(b"E\0\0\0\x05").is_none());
    }
}
