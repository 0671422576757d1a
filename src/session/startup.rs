//! The untagged startup phase of a client connection: SSL/GSS negotiation, cancel requests, and the
//! StartupMessage with its protocol version and parameters.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::{Buf, BytesMut};
use pgvigil_proto::startup::{parse_startup, ProtocolVersion, StartupPacket, MAX_STARTUP_PACKET};
use pgvigil_proto::{encode, sqlstate};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::SessionError;
use crate::config::{Config, TlsMode};
use crate::proxy::Proxy;
use crate::stream::Stream;

/// What a client asked for in its startup packet.
///
/// Its user, database and parameters are kept once, in its context (see
/// [`ClientStartup::context`]), and read from there: an idle session keeps one allocation for
/// them instead of one per string.
pub struct ClientStartup {
    /// A number no other session of this process has: a server connection remembers the last
    /// session it served (see `ServerConn::carries`).
    pub session: u64,
    /// The configuration when the client logged in: should a reload remove the user, the
    /// session logs in to the nodes with the password it had then (see
    /// [`ClientStartup::password`]). Shared, where a copy of the password would be one more
    /// allocation per session.
    pub login_config: Option<Arc<Config>>,
    /// See [`ClientStartup::context`].
    context: Arc<[u8]>,
}

impl ClientStartup {
    /// What a server connection's context is made of for this session: database, user and
    /// startup parameters, each NUL-terminated (transaction pooling shares a named statement
    /// only between sessions with the same context, see `Replayable::statement_key`, and takes
    /// a pooled connection as it is from a session with the same context, see `Carried`).
    pub fn context(&self) -> &Arc<[u8]> {
        &self.context
    }

    /// The role name.
    pub fn user(&self) -> &str {
        Context(&self.context).user()
    }

    /// The database (defaults to the user name, like PostgreSQL).
    pub fn database(&self) -> &str {
        Context(&self.context).database()
    }

    /// The user's configured password when it logged in (empty when it had none): a user still
    /// configured logs in to the nodes with its current one.
    pub fn password(&self) -> &str {
        let user = self
            .login_config
            .as_deref()
            .and_then(|c| c.user(self.user()));
        user.and_then(|u| u.password.as_deref()).unwrap_or_default()
    }

    /// Every other parameter, to be applied on the server connection, as `(name, value)`.
    pub fn params(&self) -> Params<'_> {
        Context(&self.context).params()
    }
}

/// A view of the bytes of a [`ClientStartup::context`]: `database NUL user NUL (name NUL value
/// NUL)* NUL`. No name is empty (an empty name ends a startup packet's list), so the pairs read
/// back unambiguously even when a value is empty.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a>(pub &'a [u8]);

impl<'a> Context<'a> {
    /// The database.
    pub fn database(self) -> &'a str {
        as_str(self.names().0)
    }

    /// The role name.
    pub fn user(self) -> &'a str {
        as_str(self.names().1)
    }

    /// The database and the role name as bytes, as a pool compares them: no UTF-8 check.
    pub fn names(self) -> (&'a [u8], &'a [u8]) {
        let mut parts = self.0.splitn(3, |b| *b == 0);
        let database = parts.next().unwrap_or_default();
        (database, parts.next().unwrap_or_default())
    }

    /// The startup parameters other than user and database.
    pub fn params(self) -> Params<'a> {
        let mut parts = self.0.splitn(3, |b| *b == 0);
        let rest = parts.nth(2).unwrap_or_default();
        Params(rest)
    }

    /// The `application_name` parameter (empty when the client sent none).
    pub fn application_name(self) -> std::borrow::Cow<'a, str> {
        let value = self
            .params()
            .find(|(name, _)| *name == b"application_name")
            .map_or(&[][..], |(_, value)| value);
        String::from_utf8_lossy(value)
    }
}

/// The database and user were made from `String`s: they are UTF-8.
fn as_str(part: &[u8]) -> &str {
    std::str::from_utf8(part).unwrap_or_default()
}

/// The `(name, value)` startup parameters of a [`Context`].
#[derive(Debug, Clone)]
pub struct Params<'a>(&'a [u8]);

impl<'a> Iterator for Params<'a> {
    type Item = (&'a [u8], &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        let mut parts = self.0.splitn(3, |b| *b == 0);
        let name = parts.next().filter(|n| !n.is_empty())?;
        let value = parts.next()?;
        self.0 = parts.next().unwrap_or_default();
        Some((name, value))
    }
}

/// The bytes of [`ClientStartup::context`].
fn context_of(database: &str, user: &str, params: &[(Vec<u8>, Vec<u8>)]) -> Arc<[u8]> {
    let mut context = Vec::new();
    for part in [database.as_bytes(), user.as_bytes()] {
        context.extend_from_slice(part);
        context.push(0);
    }
    for (name, value) in params {
        for part in [name, value] {
            context.extend_from_slice(part);
            context.push(0);
        }
    }
    context.push(0);
    // Clients of one application log in with the same context: they share its allocation
    // (48 bytes of every idle session's memory) when they arrive on the same thread one after
    // another.
    LAST_CONTEXT.with(|last| {
        let mut last = last.borrow_mut();
        match last.as_ref() {
            Some(shared) if **shared == *context => Arc::clone(shared),
            _ => Arc::clone(last.insert(context.into())),
        }
    })
}

thread_local! {
    /// The context of the last client that logged in on this thread.
    static LAST_CONTEXT: std::cell::RefCell<Option<Arc<[u8]>>> =
        const { std::cell::RefCell::new(None) };
}

/// How the startup phase ended.
pub enum Opening {
    /// A session is starting; the buffer holds any bytes the client sent after its startup packet.
    Session(Stream, ClientStartup, BytesMut),
    /// The connection only carried a CancelRequest, now handled.
    Cancelled,
}

/// Sessions started so far; the next one's number (0 is no session).
static SESSIONS: AtomicU64 = AtomicU64::new(1);

/// Newest protocol minor version pgvigil speaks (3.0).
const NEWEST_MINOR: u16 = 0;

/// A startup-phase failure, with the stream when the client can still be told why.
pub type Refusal = (Option<Stream>, SessionError);

/// What one startup packet asked for.
enum Step {
    /// SSLRequest: answer it, maybe switch to TLS, and read the next packet.
    SslRequest,
    /// GSSENCRequest, declined with 'N'; read the next packet.
    GssDeclined,
    /// A CancelRequest, now handled.
    Cancelled,
    /// A valid StartupMessage.
    Startup(ClientStartup),
}

/// Runs the startup phase up to a valid StartupMessage (or a handled CancelRequest).
pub async fn open(tcp: TcpStream, proxy: &Proxy) -> Result<Opening, Refusal> {
    let mut stream = match direct_tls(tcp, proxy).await {
        Ok(Some(stream)) => stream,
        Ok(None) => return Err((None, SessionError::Closed)),
        Err(error) => return Err((None, error)),
    };
    let mut buf = BytesMut::with_capacity(512);
    loop {
        match next_step(&mut stream, &mut buf, proxy).await {
            Ok(Step::SslRequest) => {
                stream = answer_ssl_request(stream, proxy)
                    .await
                    .map_err(|error| (None, error))?;
            }
            Ok(Step::GssDeclined) => {}
            Ok(Step::Cancelled) => return Ok(Opening::Cancelled),
            Ok(Step::Startup(startup)) => return Ok(Opening::Session(stream, startup, buf)),
            Err(error) => return Err((Some(stream), error)),
        }
    }
}

/// Reads and handles one startup packet.
async fn next_step(
    stream: &mut Stream,
    buf: &mut BytesMut,
    proxy: &Proxy,
) -> Result<Step, SessionError> {
    let consumed = read_packet(stream, buf).await?;
    let packet = match parse_startup(buf) {
        Ok(Some((packet, _))) => packet,
        Ok(None) => return Err(violation("incomplete startup packet")),
        Err(e) => return Err(violation(&e.to_string())),
    };
    let step = match packet {
        StartupPacket::SslRequest => {
            // Bytes after an SSLRequest would be read as if they had come encrypted
            // (CVE-2021-23214): refuse them.
            if buf.len() != consumed {
                return Err(violation("unencrypted data after SSLRequest"));
            }
            Step::SslRequest
        }
        StartupPacket::GssEncRequest => {
            stream.write_all(b"N").await?;
            Step::GssDeclined
        }
        StartupPacket::Cancel { pid, key } => {
            proxy.forward_cancel(pid, key).await;
            Step::Cancelled
        }
        StartupPacket::Startup { version, params } => {
            let negotiate = check_version(version)?;
            let mut unrecognized = Vec::new();
            let startup = read_params(params.iter(), &mut unrecognized)?;
            if negotiate.is_some() {
                let names: Vec<&[u8]> = unrecognized.iter().map(Vec::as_slice).collect();
                let mut out = BytesMut::new();
                encode::negotiate_protocol_version(&mut out, u32::from(NEWEST_MINOR), &names);
                stream.write_all(&out).await?;
            }
            if proxy.config().tls.mode == TlsMode::Require && !stream.is_tls() {
                return Err(SessionError::Refused {
                    code: sqlstate::INVALID_AUTHORIZATION_SPECIFICATION,
                    message: "pgvigil requires TLS (tls.mode = \"require\"): connect with sslmode=require".into(),
                });
            }
            Step::Startup(startup)
        }
    };
    buf.advance(consumed);
    Ok(step)
}

/// Reads until `buf` holds one whole startup packet; returns its length.
async fn read_packet(stream: &mut Stream, buf: &mut BytesMut) -> Result<usize, SessionError> {
    loop {
        if buf.len() >= 4 {
            let declared = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
            if !(8..=MAX_STARTUP_PACKET).contains(&declared) {
                return Err(violation("invalid length of startup packet"));
            }
            if buf.len() >= declared {
                return Ok(declared);
            }
        }
        buf.reserve(512);
        if stream.read_buf(buf).await? == 0 {
            // A client that connects and leaves (a port check) is not an error worth a message.
            return Err(SessionError::Closed);
        }
    }
}

/// Checks the protocol version; `Some` for 3.x with x > 0, which is answered with
/// NegotiateProtocolVersion (PostgreSQL then continues as 3.0).
fn check_version(version: ProtocolVersion) -> Result<Option<()>, SessionError> {
    if version.major != 3 {
        return Err(SessionError::Refused {
            code: sqlstate::FEATURE_NOT_SUPPORTED,
            message: format!(
                "unsupported frontend protocol {}.{}: server supports 3.0 to 3.{NEWEST_MINOR}",
                version.major, version.minor
            ),
        });
    }
    Ok((version.minor > NEWEST_MINOR).then_some(()))
}

/// Collects the user, database and other parameters; `_pq_.` options go to `unrecognized`.
fn read_params<'a>(
    params: impl Iterator<Item = (&'a [u8], &'a [u8])>,
    unrecognized: &mut Vec<Vec<u8>>,
) -> Result<ClientStartup, SessionError> {
    let mut user = None;
    let mut database = None;
    let mut rest = Vec::new();
    for (name, value) in params {
        match name {
            b"user" => user = Some(String::from_utf8_lossy(value).into_owned()),
            b"database" => database = Some(String::from_utf8_lossy(value).into_owned()),
            b"replication" if is_replication(value) => {
                return Err(SessionError::Refused {
                    code: sqlstate::FEATURE_NOT_SUPPORTED,
                    message: "replication connections are not supported through pgvigil: connect to a node directly".into(),
                })
            }
            b"replication" => {}
            _ if name.starts_with(b"_pq_.") => unrecognized.push(name.to_vec()),
            _ => rest.push((name.to_vec(), value.to_vec())),
        }
    }
    let user = user
        .filter(|u| !u.is_empty())
        .ok_or_else(|| SessionError::Refused {
            code: sqlstate::INVALID_AUTHORIZATION_SPECIFICATION,
            message: "no PostgreSQL user name specified in startup packet".into(),
        })?;
    let database = database
        .filter(|d| !d.is_empty())
        .unwrap_or_else(|| user.clone());
    Ok(ClientStartup {
        session: SESSIONS.fetch_add(1, Ordering::Relaxed),
        context: context_of(&database, &user, &rest),
        login_config: None,
    })
}

fn is_replication(value: &[u8]) -> bool {
    !matches!(value, b"false" | b"off" | b"no" | b"0")
}

/// PostgreSQL 17 clients may start TLS directly (first byte 0x16) instead of with SSLRequest.
/// Returns `None` when such a client arrives and TLS is not configured.
async fn direct_tls(tcp: TcpStream, proxy: &Proxy) -> Result<Option<Stream>, SessionError> {
    let mut first = [0u8; 1];
    let n = tcp.peek(&mut first).await?;
    if n == 0 || !pgvigil_proto::startup::is_direct_tls(first[0]) {
        return Ok(Some(Stream::Plain(tcp)));
    }
    match &proxy.tls_acceptor {
        Some(acceptor) => {
            let tls = acceptor.accept(tcp).await?;
            Ok(Some(Stream::ServerTls(Box::new(tls))))
        }
        None => Ok(None),
    }
}

/// Answers an SSLRequest with 'S' and a TLS handshake when TLS is configured, 'N' otherwise.
async fn answer_ssl_request(mut stream: Stream, proxy: &Proxy) -> Result<Stream, SessionError> {
    match (&proxy.tls_acceptor, stream) {
        (Some(acceptor), Stream::Plain(mut tcp)) => {
            tcp.write_all(b"S").await?;
            let tls = acceptor.accept(tcp).await?;
            Ok(Stream::ServerTls(Box::new(tls)))
        }
        (_, plain_or_tls) => {
            stream = plain_or_tls;
            stream.write_all(b"N").await?;
            Ok(stream)
        }
    }
}

fn violation(message: &str) -> SessionError {
    SessionError::Refused {
        code: sqlstate::PROTOCOL_VIOLATION,
        message: message.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_defaults_to_user_and_pq_options_are_collected() {
        let params: Vec<(&[u8], &[u8])> = vec![
            (b"user", b"app"),
            (b"application_name", b"psql"),
            (b"_pq_.compression", b"on"),
        ];
        let mut unrecognized = Vec::new();
        let startup = read_params(params.into_iter(), &mut unrecognized).unwrap();
        assert_eq!(startup.database(), "app");
        assert_eq!(startup.user(), "app");
        let params: Vec<_> = startup.params().collect();
        assert_eq!(params, vec![(&b"application_name"[..], &b"psql"[..])]);
        assert_eq!(Context(startup.context()).application_name(), "psql");
        assert_eq!(unrecognized, vec![b"_pq_.compression".to_vec()]);
    }

    #[test]
    fn a_context_reads_back_empty_values_and_no_parameters() {
        let params: Vec<(&[u8], &[u8])> = vec![
            (b"user", b"u"),
            (b"database", b"d"),
            (b"application_name", b""),
            (b"search_path", b"a,b"),
        ];
        let startup = read_params(params.into_iter(), &mut Vec::new()).unwrap();
        let read: Vec<_> = startup.params().collect();
        let expected: Vec<(&[u8], &[u8])> =
            vec![(b"application_name", b""), (b"search_path", b"a,b")];
        assert_eq!((startup.database(), startup.user()), ("d", "u"));
        assert_eq!(read, expected);
        let bare: Vec<(&[u8], &[u8])> = vec![(b"user", b"u")];
        let startup = read_params(bare.into_iter(), &mut Vec::new()).unwrap();
        assert_eq!(startup.params().count(), 0);
        assert_eq!(Context(startup.context()).application_name(), "");
    }

    #[test]
    fn clients_with_the_same_context_share_it_and_others_do_not() {
        let context = |app: &[u8]| {
            let params: Vec<(&[u8], &[u8])> = vec![(b"user", b"u"), (b"application_name", app)];
            let startup = read_params(params.into_iter(), &mut Vec::new()).unwrap();
            Arc::clone(startup.context())
        };
        let (first, again, other) = (context(b"a"), context(b"a"), context(b"b"));
        assert!(
            Arc::ptr_eq(&first, &again),
            "the same context was not shared"
        );
        assert_eq!(*first, *again);
        assert!(!Arc::ptr_eq(&first, &other));
        assert_eq!(Context(&other).application_name(), "b");
    }

    #[test]
    fn missing_user_and_replication_are_refused() {
        let none: Vec<(&[u8], &[u8])> = vec![(b"database", b"x")];
        assert!(matches!(
            read_params(none.into_iter(), &mut Vec::new()),
            Err(SessionError::Refused { code: "28000", .. })
        ));
        let repl: Vec<(&[u8], &[u8])> = vec![(b"user", b"a"), (b"replication", b"database")];
        assert!(matches!(
            read_params(repl.into_iter(), &mut Vec::new()),
            Err(SessionError::Refused { code: "0A000", .. })
        ));
    }

    #[test]
    fn only_protocol_3_is_accepted_and_newer_minors_negotiate_down() {
        assert!(check_version(ProtocolVersion { major: 3, minor: 0 })
            .unwrap()
            .is_none());
        assert!(check_version(ProtocolVersion { major: 3, minor: 2 })
            .unwrap()
            .is_some());
        assert!(matches!(
            check_version(ProtocolVersion { major: 2, minor: 0 }),
            Err(SessionError::Refused { code: "0A000", .. })
        ));
    }
}
