//! One server connection: open it to a node, log in, and track what the proxy must know about it
//! (backend key for cancels, reported parameters, transaction status).

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use pgvigil_proto::backend::{self, Authentication, BackendKeyData, ErrorFields, ParameterStatus};
use pgvigil_proto::{encode, next_message, TxStatus};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::auth::scram_client::{verify_server_final, SaltedPasswords, ScramClient};
use crate::cancel::CancelTarget;
use crate::config::BackendTlsMode;
use crate::statements::ServerStatements;
use crate::stream::{tune_socket, Stream};
use crate::topology::NodeId;

mod exchange;

/// Largest message accepted from a node during login and internal queries.
const LOGIN_MESSAGE_LIMIT: usize = 1 << 20;

/// The SASL mechanism pgvigil logs in to the nodes with.
const SCRAM_SHA_256: &str = "SCRAM-SHA-256";

/// Where a SCRAM login to a node stands.
enum Sasl {
    /// No SASL exchange started.
    Idle,
    /// The client-first-message was sent.
    Started(ScramClient),
    /// The client-final-message was sent; the node must answer with this signature.
    Proven([u8; 32]),
}

/// Where and how to log in.
#[derive(Clone)]
pub struct LoginTarget {
    /// The node's id in the topology.
    pub node: NodeId,
    /// The node's name, for messages.
    pub node_name: String,
    /// Host to connect to.
    pub host: String,
    /// Port to connect to.
    pub port: u16,
    /// Role to log in as.
    pub user: String,
    /// Its password (used for SCRAM, md5 or cleartext as the node asks).
    pub password: String,
    /// Database to open.
    pub database: String,
    /// Bound on TCP connect plus the whole login.
    pub connect_timeout: Duration,
    /// Whether to ask for TLS.
    pub tls: BackendTlsMode,
    /// TLS client settings, when TLS may be used.
    pub tls_config: Option<Arc<rustls::ClientConfig>>,
    /// The salted passwords of earlier SCRAM logins, shared by the process.
    pub salted: Arc<SaltedPasswords>,
}

/// Why a server connection could not be made or used.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// TCP connect failed.
    #[error("could not connect to node {node} ({addr}): {source}")]
    Connect {
        /// Node name.
        node: String,
        /// host:port.
        addr: String,
        /// The OS error.
        source: io::Error,
    },
    /// Connect or login took longer than `backend.connect_timeout`.
    #[error("timed out connecting to node {node} after {after:?}")]
    Timeout {
        /// Node name.
        node: String,
        /// The bound that expired.
        after: Duration,
    },
    /// The node answered with an ErrorResponse; `frame` is the whole message, to forward as is.
    #[error("node {node} said: {message}")]
    Rejected {
        /// Node name.
        node: String,
        /// Its human-readable message.
        message: String,
        /// The ErrorResponse frame (tag, length, body).
        frame: Bytes,
    },
    /// The node asked for TLS settings we cannot satisfy, or the handshake failed.
    #[error("TLS to node {node} failed: {reason}")]
    Tls {
        /// Node name.
        node: String,
        /// What went wrong.
        reason: String,
    },
    /// The node sent something the protocol does not allow here.
    #[error("protocol error from node {node}: {reason}")]
    Protocol {
        /// Node name.
        node: String,
        /// What was wrong.
        reason: String,
    },
    /// The connection broke.
    #[error("connection to node {node} lost: {source}")]
    Io {
        /// Node name.
        node: String,
        /// The OS error.
        source: io::Error,
    },
}

/// The parameters a node reported with ParameterStatus, latest value of each.
#[derive(Debug, Default, Clone)]
pub struct ReportedParams(Vec<(Vec<u8>, Vec<u8>)>);

impl ReportedParams {
    /// The last reported value of `name`.
    pub fn get(&self, name: &[u8]) -> Option<&[u8]> {
        self.0
            .iter()
            .find(|(n, _)| n.as_slice() == name)
            .map(|(_, v)| v.as_slice())
    }

    /// Records a ParameterStatus body (allocates only for a parameter not seen before).
    pub fn note(&mut self, body: &[u8]) -> Result<(), pgvigil_proto::ProtoError> {
        let status = ParameterStatus::parse(body)?;
        match self.0.iter_mut().find(|(n, _)| n.as_slice() == status.name) {
            Some((_, value)) => {
                value.clear();
                value.extend_from_slice(status.value);
            }
            None => self.0.push((status.name.to_vec(), status.value.to_vec())),
        }
        Ok(())
    }

    /// Every (name, value), in the order first reported.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.0.iter().map(|(n, v)| (n.as_slice(), v.as_slice()))
    }
}

/// An open, logged-in connection to one node.
pub struct ServerConn {
    /// The socket.
    pub stream: Stream,
    /// Read buffer; bytes in it belong to this connection (nothing read from a server is lost).
    pub rbuf: BytesMut,
    /// The node it is open to.
    pub node: NodeId,
    /// Node name, for messages.
    pub node_name: String,
    /// host and port, for cancel requests.
    pub addr: (String, u16),
    /// Database it is logged in to.
    pub database: String,
    /// Role it is logged in as.
    pub user: String,
    /// The backend's process id (from BackendKeyData).
    pub backend_pid: u32,
    /// Where a CancelRequest for its backend goes (built once it logged in).
    cancel: Arc<CancelTarget>,
    /// Parameters the node reported with ParameterStatus, latest value each.
    pub params: ReportedParams,
    /// Transaction status from the last ReadyForQuery.
    pub tx: TxStatus,
    /// When it was opened.
    pub created: Instant,
    /// When it was last returned to the pool.
    pub idle_since: Instant,
    /// The session state it carries. Transaction pooling returns connections without a reset:
    /// a session that takes one carrying another's state resets it first, unless it is the
    /// state the session would give it anyway; one that takes back its own gives it only what
    /// it lacks.
    pub carries: Carried,
    /// Transaction pooling: the named statements prepared on it under pgvigil's names.
    pub statements: ServerStatements,
    /// Its entry in the pools' list of open connections (SHOW SERVERS), removed when it closes.
    pub listed: Option<crate::pool::Listed>,
    /// The runtime its socket is registered with (see [`ServerConn::move_here`]).
    pub home: crate::data_plane::Home,
    /// How many checkouts of its pool had waited when its session last ended a transaction on
    /// it (see `Pools::queued`): a connection parks only while that number stays the same.
    pub queued_seen: u64,
}

/// The session state a server connection carries beyond its login.
#[derive(Debug, Clone)]
pub enum Carried {
    /// Nothing: it is new, or was reset with `DISCARD ALL`.
    Nothing,
    /// What session `session` (`ClientStartup::session`) gave it: the startup parameters of its
    /// `context` (`ClientStartup::context`) and the first `settings` statements of its settings
    /// log. Exact once the session returned it to the pool; while the session holds it, the
    /// session's own account is the one that counts.
    Session {
        /// The session's number.
        session: u64,
        /// The session's context: a session with the same one and no settings of its own on
        /// the connection (`settings == 0`) can take it as it is.
        context: Arc<[u8]>,
        /// How many statements of the session's settings log the connection has run.
        settings: usize,
        /// Once the session returned it: the statements of the session's settings log (since
        /// the log last restarted) the connection has run, when it has run them all and there
        /// are some. A session with the same context whose log begins with them takes the
        /// connection without a reset and runs only the rest of its own.
        ran: Option<Arc<[Box<[u8]>]>>,
    },
}

impl ServerConn {
    /// Connects to the node and logs in, bounded by `target.connect_timeout`.
    pub async fn connect(target: &LoginTarget) -> Result<ServerConn, ServerError> {
        match tokio::time::timeout(target.connect_timeout, Self::connect_inner(target)).await {
            Ok(result) => result,
            Err(_) => Err(ServerError::Timeout {
                node: target.node_name.clone(),
                after: target.connect_timeout,
            }),
        }
    }

    async fn connect_inner(target: &LoginTarget) -> Result<ServerConn, ServerError> {
        let addr = format!("{}:{}", target.host, target.port);
        let tcp = TcpStream::connect((target.host.as_str(), target.port))
            .await
            .map_err(|source| ServerError::Connect {
                node: target.node_name.clone(),
                addr: addr.clone(),
                source,
            })?;
        let _ = tune_socket(&tcp);
        let stream = negotiate_tls(tcp, target).await?;
        let now = Instant::now();
        let mut conn = ServerConn {
            stream,
            rbuf: BytesMut::with_capacity(8192),
            node: target.node,
            node_name: target.node_name.clone(),
            addr: (target.host.clone(), target.port),
            database: target.database.clone(),
            user: target.user.clone(),
            backend_pid: 0,
            cancel: Arc::new(CancelTarget {
                host: String::new(),
                port: target.port,
                pid: 0,
                key: Vec::new(),
            }),
            params: ReportedParams::default(),
            tx: TxStatus::Idle,
            created: now,
            idle_since: now,
            carries: Carried::Nothing,
            statements: ServerStatements::default(),
            listed: None,
            home: crate::data_plane::here(),
            queued_seen: 0,
        };
        conn.login(target).await?;
        Ok(conn)
    }

    async fn login(&mut self, target: &LoginTarget) -> Result<(), ServerError> {
        let mut out = BytesMut::new();
        // No application_name: `DISCARD ALL` resets it to the login value, and a client that
        // sets none must see "" as it would connected directly, not pgvigil's name.
        encode::startup_message(
            &mut out,
            &[
                (b"user".as_slice(), target.user.as_bytes()),
                (b"database".as_slice(), target.database.as_bytes()),
            ],
        );
        self.send(&mut out).await?;
        let mut sasl = Sasl::Idle;
        loop {
            let (tag, frame) = self.read_frame().await?;
            let body = &frame[5..];
            match tag {
                backend::tag::AUTHENTICATION => {
                    let auth = Authentication::parse(body).map_err(|e| self.protocol(e))?;
                    self.answer_auth(auth, target, &mut sasl, &mut out).await?;
                    if !out.is_empty() {
                        self.send(&mut out).await?;
                    }
                }
                backend::tag::PARAMETER_STATUS => self.note_parameter(body)?,
                backend::tag::BACKEND_KEY_DATA => {
                    let key = BackendKeyData::parse(body).map_err(|e| self.protocol(e))?;
                    self.backend_pid = key.pid;
                    self.cancel = Arc::new(CancelTarget {
                        host: self.addr.0.clone(),
                        port: self.addr.1,
                        pid: key.pid,
                        key: key.key.to_vec(),
                    });
                }
                backend::tag::READY_FOR_QUERY => {
                    self.tx = backend::ReadyForQuery::parse(body).map_err(|e| self.protocol(e))?;
                    return Ok(());
                }
                backend::tag::ERROR_RESPONSE => return Err(self.rejected(frame)),
                backend::tag::NOTICE_RESPONSE | backend::tag::NEGOTIATE_PROTOCOL_VERSION => {}
                other => {
                    return Err(self.protocol(format!(
                        "unexpected message '{}' during login",
                        char::from(other)
                    )))
                }
            }
        }
    }

    /// Writes the answer to one authentication request into `out` (empty when none is due).
    async fn answer_auth(
        &self,
        auth: Authentication<'_>,
        target: &LoginTarget,
        sasl: &mut Sasl,
        out: &mut BytesMut,
    ) -> Result<(), ServerError> {
        let password = target.password.as_bytes();
        match auth {
            Authentication::Ok => {}
            Authentication::CleartextPassword => encode::password_message(out, password),
            Authentication::Md5Password { salt } => {
                let hash = postgres_protocol::authentication::md5_hash(
                    target.user.as_bytes(),
                    password,
                    salt,
                );
                encode::password_message(out, hash.as_bytes());
            }
            Authentication::Sasl { mechanisms } => {
                let offered = mechanisms
                    .split(|b| *b == 0)
                    .any(|m| m == SCRAM_SHA_256.as_bytes());
                if !offered {
                    return Err(self.protocol("the node offers no SASL mechanism pgvigil supports"));
                }
                let client = ScramClient::new(&target.password);
                encode::sasl_initial_response(out, SCRAM_SHA_256, client.client_first().as_bytes());
                *sasl = Sasl::Started(client);
            }
            Authentication::SaslContinue { data } => {
                let Sasl::Started(client) = std::mem::replace(sasl, Sasl::Idle) else {
                    return Err(self.protocol("SASL continue before SASL start"));
                };
                let scram = |e| self.protocol(format!("SCRAM: {e}"));
                let first = client.server_first(data).map_err(scram)?;
                let salted = target
                    .salted
                    .get(target.node, &target.user, &client, &first)
                    .await
                    .map_err(scram)?;
                let (message, signature) = client.client_final(&first, &salted);
                encode::sasl_response(out, &message);
                *sasl = Sasl::Proven(signature);
            }
            Authentication::SaslFinal { data } => {
                let Sasl::Proven(signature) = std::mem::replace(sasl, Sasl::Idle) else {
                    return Err(self.protocol("SASL final before SASL continue"));
                };
                verify_server_final(data, &signature)
                    .map_err(|e| self.protocol(format!("SCRAM server signature: {e}")))?;
            }
            Authentication::Other { code } => {
                return Err(self.protocol(format!(
                    "the node asks for authentication method {code}, which pgvigil does not support"
                )))
            }
        }
        Ok(())
    }

    /// Where a CancelRequest for this backend must go.
    pub fn cancel_target(&self) -> Arc<CancelTarget> {
        self.cancel.clone()
    }

    /// Records a ParameterStatus body.
    pub fn note_parameter(&mut self, body: &[u8]) -> Result<(), ServerError> {
        self.params.note(body).map_err(|e| self.protocol(e))
    }

    /// Moves the socket to the runtime this is called on when it is registered with another
    /// (a connection opened or last used on another data-plane thread, or by the control plane):
    /// its I/O is then driven by the thread that uses it, with no wake-up crossing threads.
    /// On an error the socket is closed with the connection.
    pub fn move_here(mut self: Box<Self>) -> std::io::Result<Box<Self>> {
        let here = crate::data_plane::here();
        if self.home != here {
            self.stream = self.stream.reregister()?;
            self.home = here;
        }
        Ok(self)
    }

    /// Whether the node closed the socket or sent something unsolicited while idle in the pool.
    pub fn looks_broken(&mut self) -> bool {
        !self.rbuf.is_empty() || idle_socket_broken(&self.stream)
    }

    async fn send(&mut self, out: &mut BytesMut) -> Result<(), ServerError> {
        let result = self.stream.write_all(out).await;
        out.clear();
        result.map_err(|source| self.io(source))
    }

    /// Reads one whole message (tag, whole frame) into its own `Bytes`.
    async fn read_frame(&mut self) -> Result<(u8, Bytes), ServerError> {
        loop {
            let whole = next_message(&self.rbuf, LOGIN_MESSAGE_LIMIT)
                .map_err(|e| self.protocol(e))?
                .map(|m| (m.tag, m.len()));
            if let Some((tag, len)) = whole {
                return Ok((tag, self.rbuf.split_to(len).freeze()));
            }
            self.rbuf.reserve(4096);
            let n = self
                .stream
                .read_buf(&mut self.rbuf)
                .await
                .map_err(|source| self.io(source))?;
            if n == 0 {
                return Err(self.io(io::ErrorKind::UnexpectedEof.into()));
            }
        }
    }

    fn rejected(&self, frame: Bytes) -> ServerError {
        let message = ErrorFields::parse(&frame[5..])
            .ok()
            .and_then(|f| f.message().map(|m| String::from_utf8_lossy(m).into_owned()))
            .unwrap_or_else(|| "unreadable error".into());
        ServerError::Rejected {
            node: self.node_name.clone(),
            message,
            frame,
        }
    }

    fn protocol(&self, reason: impl ToString) -> ServerError {
        ServerError::Protocol {
            node: self.node_name.clone(),
            reason: reason.to_string(),
        }
    }

    fn io(&self, source: io::Error) -> ServerError {
        ServerError::Io {
            node: self.node_name.clone(),
            source,
        }
    }
}

/// Asks the node for TLS when configured and wraps the socket.
async fn negotiate_tls(mut tcp: TcpStream, target: &LoginTarget) -> Result<Stream, ServerError> {
    let tls_error = |reason: String| ServerError::Tls {
        node: target.node_name.clone(),
        reason,
    };
    let config = match (target.tls, &target.tls_config) {
        (BackendTlsMode::Disable, _) => return Ok(Stream::Plain(tcp)),
        (_, None) => return Err(tls_error("no TLS client configuration".into())),
        (_, Some(config)) => config.clone(),
    };
    let mut request = BytesMut::new();
    encode::ssl_request(&mut request);
    let io_error = |source| ServerError::Io {
        node: target.node_name.clone(),
        source,
    };
    tcp.write_all(&request).await.map_err(io_error)?;
    let answer = tcp.read_u8().await.map_err(io_error)?;
    match (answer, target.tls) {
        (b'S', _) => {
            let name = rustls_pki_types::ServerName::try_from(target.host.clone())
                .map_err(|e| tls_error(format!("invalid server name {:?}: {e}", target.host)))?;
            let stream = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await
                .map_err(|e| tls_error(e.to_string()))?;
            Ok(Stream::ClientTls(Box::new(stream)))
        }
        (b'N', BackendTlsMode::Prefer) => Ok(Stream::Plain(tcp)),
        (b'N', _) => Err(tls_error(
            "the node does not accept TLS (backend.tls = \"require\")".into(),
        )),
        (other, _) => Err(tls_error(format!(
            "unexpected answer {other:#04x} to SSLRequest"
        ))),
    }
}

/// Whether the socket of an idle connection, whose read buffer is empty, was closed or has
/// bytes to read: a node sends an idle connection nothing unasked but a FATAL before it closes it
/// (or a ParameterStatus after a reload), and a probe that read a byte has broken the stream
/// anyway. A TLS stream is not probed (its records cannot be peeked at); the socket is read only
/// when tokio saw it readable.
pub fn idle_socket_broken(stream: &Stream) -> bool {
    if stream.is_tls() {
        return false;
    }
    let mut probe = [0u8; 1];
    match stream.tcp().try_read(&mut probe) {
        Ok(_) => true,
        Err(e) => e.kind() != io::ErrorKind::WouldBlock,
    }
}
