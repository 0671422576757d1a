//! Clients that send bytes no PostgreSQL client would (garbage, absurd lengths, unknown messages,
//! half a packet, thousands at once, or leave mid-query) get a 08P01 error or a clean close at
//! once, never a hang, a huge allocation, a held pool slot or a busy backend; and after each, a
//! normal client is still served.

use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, BytesMut};
use pgvigil_proto::backend::{Authentication, ErrorFields};
use pgvigil_proto::{encode, next_message};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

use crate::support::{
    eventually, start_proxy, test_cluster, LocalCluster, TestProxy, APP_DB, APP_PASSWORD, APP_USER,
    MD5_PASSWORD, MD5_USER,
};

/// The primary's index in every test cluster.
const PRIMARY: usize = 0;

/// Bound on the proxy's answer to a bad client; far below any timeout that could close the
/// connection instead, so meeting it shows the proxy reacted to the input itself.
const ANSWER: Duration = Duration::from_secs(5);

/// Bound on background effects (cancels, releases, backends exiting) on a loaded machine.
const SETTLE: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread")]
async fn garbage_instead_of_a_startup_packet_gets_08p01_or_a_close_never_a_hang() {
    let cluster = test_cluster(0);
    let proxy = start_proxy(&cluster, |config| {
        // Long enough that only a reaction to the garbage itself can end the connection in time.
        config.client.startup_timeout = Duration::from_secs(60);
    })
    .await;
    // (what, bytes, SQLSTATE expected, or None when a silent close is the right answer)
    let cases: &[(&str, Vec<u8>, Option<&str>)] = &[
        (
            "an HTTP request",
            b"GET / HTTP/1.1\r\nHost: pgvigil\r\n\r\n".to_vec(),
            Some("08P01"),
        ),
        ("64 bytes of 0xff", vec![0xff; 64], Some("08P01")),
        ("a zero length", vec![0; 16], Some("08P01")),
        (
            "protocol 3.0 with an unterminated parameter",
            [&[0, 0, 0, 12, 0, 3, 0, 0][..], b"user"].concat(),
            Some("08P01"),
        ),
        (
            // PostgreSQL answers a well-framed packet of an unknown protocol with 0A000.
            "a well-framed packet of protocol 9.9",
            vec![0, 0, 0, 9, 0, 9, 0, 9, 0],
            Some("0A000"),
        ),
        (
            // 0x16 opens a direct TLS handshake; no TLS is configured, so there is nothing to say.
            "a TLS record to a proxy without TLS",
            vec![0x16, 0x03, 0x01, 0x00, 0x05, 1, 2, 3, 4, 5],
            None,
        ),
    ];
    for (what, bytes, expected) in cases {
        let mut client = RawClient::connect(&proxy).await;
        client.send(bytes).await;
        let ending = client.ending().await;
        match (expected, &ending) {
            (Some(code), Ending::Error { code: got, .. }) => assert_eq!(got, code, "{what}"),
            (None, Ending::Closed) => {}
            _ => panic!("{what}: expected {expected:?}, got {ending:?}"),
        }
        assert_served(&proxy).await;
    }

    // Three bytes and a half-close: the proxy sees the end of the stream and simply closes.
    let mut client = RawClient::connect(&proxy).await;
    client.send(&[0, 0, 0]).await;
    client.tcp.shutdown().await.unwrap();
    assert!(matches!(client.ending().await, Ending::Closed));
    assert_served(&proxy).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_startup_length_of_two_gib_is_refused_at_once_without_allocating_it() {
    let cluster = test_cluster(0);
    let proxy = start_proxy(&cluster, |config| {
        config.client.startup_timeout = Duration::from_secs(60);
    })
    .await;
    let peak_before = vm_peak_kib();

    let mut client = RawClient::connect(&proxy).await;
    let mut packet = BytesMut::new();
    packet.put_u32(i32::MAX as u32);
    packet.put_u32(0x0003_0000);
    packet.put_slice(b"user\0app\0");
    client.send(&packet).await;
    // The socket stays open: only the proxy can end this, and it must not wait for 2 GiB.
    match client.ending().await {
        Ending::Error { code, message } => {
            assert_eq!(code, "08P01");
            assert!(message.contains("length"), "{message}");
        }
        other => panic!("expected 08P01, got {other:?}"),
    }
    let grown_mib = vm_peak_kib().saturating_sub(peak_before) / 1024;
    assert!(
        grown_mib < 1024,
        "the process's peak address space grew by {grown_mib} MiB"
    );
    assert_served(&proxy).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_message_over_max_message_size_gets_08p01_and_the_connection_closes() {
    let cluster = test_cluster(0);
    let proxy = start_proxy(&cluster, |config| config.max_message_size = 64 * 1024).await;
    let mut client = RawClient::login_md5(&proxy).await;

    // A Query announcing 1 MiB; only its first bytes are sent, the header alone must be enough.
    let mut message = BytesMut::new();
    message.put_u8(b'Q');
    message.put_u32(1 << 20);
    message.put_slice(&[b'x'; 1000]);
    client.send(&message).await;
    match client.ending().await {
        Ending::Error { code, message } => {
            assert_eq!(code, "08P01");
            assert!(message.contains("over the limit"), "{message}");
        }
        other => panic!("expected 08P01, got {other:?}"),
    }
    assert_served(&proxy).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unknown_message_type_after_login_gets_08p01() {
    let cluster = test_cluster(0);
    let proxy = start_proxy(&cluster, |_| {}).await;
    let mut client = RawClient::login_md5(&proxy).await;

    client.send(b"!\0\0\0\x08abcd").await;
    match client.ending().await {
        Ending::Error { code, message } => {
            assert_eq!(code, "08P01");
            assert!(
                message.contains("invalid frontend message type"),
                "{message}"
            );
        }
        other => panic!("expected 08P01, got {other:?}"),
    }
    assert_served(&proxy).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_stalling_in_startup_is_closed_after_startup_timeout_and_holds_no_pool_slot() {
    let cluster = test_cluster(0);
    let proxy = start_proxy(&cluster, |config| {
        config.client.startup_timeout = Duration::from_secs(1);
        config.pool.max_size = 1;
    })
    .await;
    let startup = startup_packet(APP_USER);
    let stalled_at = Instant::now();
    let mut stalled = RawClient::connect(&proxy).await;
    stalled.send(&startup[..6]).await;

    // md5 keeps this login well inside the stalled client's second.
    let client = RawClient::login_md5(&proxy).await;
    drop(client);
    assert!(
        stalled.is_open(),
        "the stalled client was still waiting while another was served through the one slot"
    );

    assert!(matches!(stalled.ending().await, Ending::Closed));
    let waited = stalled_at.elapsed();
    assert!(
        waited >= Duration::from_millis(900),
        "closed after {waited:?}, before client.startup_timeout"
    );
    // A SCRAM login computes 4096 HMACs in a debug build: on a loaded machine that alone can
    // outlast this test's 1 s startup_timeout, so the normal client here uses md5.
    assert_served_as(&proxy, MD5_USER, MD5_PASSWORD).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_stalling_during_authentication_is_told_why_after_startup_timeout() {
    let cluster = test_cluster(0);
    let proxy = start_proxy(&cluster, |config| {
        config.client.startup_timeout = Duration::from_secs(1);
    })
    .await;
    let startup = startup_packet(APP_USER);
    let mut stalled = RawClient::connect(&proxy).await;
    stalled.send(&startup).await;
    let (tag, _) = stalled.recv().await.expect("an authentication request");
    assert_eq!(tag, b'R', "pgvigil asks for the password");

    // The client never answers: PostgreSQL's words and SQLSTATE, then a close.
    match stalled.ending_within(Duration::from_secs(30)).await {
        Ending::Error { code, message } => {
            assert_eq!(code, "57014");
            assert_eq!(message, "canceling authentication due to timeout");
        }
        Ending::Closed => panic!("closed without saying why"),
    }
    assert_served_as(&proxy, MD5_USER, MD5_PASSWORD).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn two_thousand_bad_or_abandoned_connections_at_once_leave_the_proxy_serving() {
    const CLIENTS: usize = 2000;
    // Per client: 2,000 connects overflow the listen backlog, and SYN retries take seconds.
    const CROWDED: Duration = Duration::from_secs(60);
    raise_open_file_limit(4 * CLIENTS as u64);
    let cluster = test_cluster(0);
    let proxy = start_proxy(&cluster, |config| config.max_client_conn = 5000).await;

    let mut connecting = JoinSet::new();
    for _ in 0..CLIENTS {
        let addr = proxy.addr;
        connecting.spawn(async move { TcpStream::connect(addr).await });
    }
    let mut sockets = Vec::with_capacity(CLIENTS);
    while let Some(connected) = connecting.join_next().await {
        sockets.push(connected.unwrap().expect("connect to pgvigil"));
    }

    let startup = startup_packet(APP_USER).freeze();
    let mut clients = JoinSet::new();
    for (i, tcp) in sockets.into_iter().enumerate() {
        let startup = startup.clone();
        clients.spawn(async move {
            let mut client = RawClient::from(tcp);
            if i % 2 == 0 {
                // The first four bytes read as a length of 3.7 GB.
                client.send(b"\xde\xad\xbe\xef garbage").await;
                match client.ending_within(CROWDED).await {
                    Ending::Error { code, .. } if code == "08P01" => Ok(()),
                    other => Err(format!("expected 08P01, got {other:?}")),
                }
            } else {
                // A valid startup, then leave as soon as the proxy asks for a password.
                client.send(&startup).await;
                match tokio::time::timeout(CROWDED, client.recv()).await {
                    Ok(Some((b'R', _))) => Ok(()),
                    other => Err(format!("expected an authentication request, got {other:?}")),
                }
            }
        });
    }
    let all_answered = tokio::time::timeout(Duration::from_secs(120), async {
        let mut failures = Vec::new();
        while let Some(done) = clients.join_next().await {
            if let Err(failure) = done.unwrap() {
                failures.push(failure);
            }
        }
        failures
    })
    .await
    .expect("every client is answered");
    assert!(all_answered.is_empty(), "{all_answered:?}");

    let state = proxy.running.proxy.clone();
    eventually(SETTLE, "no session is left registered", || {
        state.cancels.is_empty()
    });
    assert!(state.pools.open_count(PRIMARY) <= state.config().pool.max_size);
    assert_served(&proxy).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_leaving_during_a_long_query_leaves_no_busy_backend() {
    let cluster = test_cluster(0);
    let proxy = start_proxy(&cluster, |_| {}).await;
    // Inside a transaction block too: the last ReadyForQuery then said 'T', not 'I'.
    for opening in [None, Some("BEGIN")] {
        let mut client = RawClient::login_md5(&proxy).await;
        if let Some(sql) = opening {
            client.query(sql).await;
        }
        let mut query = BytesMut::new();
        encode::query(&mut query, b"SELECT pg_sleep(30)");
        client.send(&query).await;
        eventually(SETTLE, "the query is running", || {
            sleeping_backends(&cluster) == 1
        });

        drop(client);
        eventually(
            SETTLE,
            &format!("no backend still sleeping (after {opening:?}; the query would end at 30 s)"),
            || sleeping_backends(&cluster) == 0,
        );
        assert_served(&proxy).await;
    }
}

/// A client that speaks raw bytes to pgvigil.
struct RawClient {
    tcp: TcpStream,
    buf: BytesMut,
}

/// A protocol 3.0 StartupMessage for `user` on database `app`.
fn startup_packet(user: &str) -> BytesMut {
    let mut startup = BytesMut::new();
    encode::startup_message(
        &mut startup,
        &[(b"user", user.as_bytes()), (b"database", APP_DB.as_bytes())],
    );
    startup
}

/// How the proxy ended a raw client's connection.
#[derive(Debug)]
enum Ending {
    /// It closed without a word.
    Closed,
    /// It sent one ErrorResponse, then closed.
    Error { code: String, message: String },
}

impl From<TcpStream> for RawClient {
    fn from(tcp: TcpStream) -> Self {
        RawClient {
            tcp,
            buf: BytesMut::with_capacity(1024),
        }
    }
}

impl RawClient {
    async fn connect(proxy: &TestProxy) -> RawClient {
        RawClient::from(TcpStream::connect(proxy.addr).await.unwrap())
    }

    /// Logs in as the md5 user (a SCRAM exchange by hand would add nothing here) and reads up to
    /// the first ReadyForQuery.
    async fn login_md5(proxy: &TestProxy) -> RawClient {
        let mut client = RawClient::connect(proxy).await;
        client.send(&startup_packet(MD5_USER)).await;
        loop {
            match client.recv().await {
                Some((b'R', body)) => match Authentication::parse(&body).unwrap() {
                    Authentication::Md5Password { salt } => {
                        let hash = postgres_protocol::authentication::md5_hash(
                            MD5_USER.as_bytes(),
                            MD5_PASSWORD.as_bytes(),
                            salt,
                        );
                        let mut out = BytesMut::new();
                        encode::password_message(&mut out, hash.as_bytes());
                        client.send(&out).await;
                    }
                    Authentication::Ok => {}
                    other => panic!("unexpected authentication request {other:?}"),
                },
                Some((b'Z', _)) => return client,
                Some((b'E', body)) => panic!("login refused: {:?}", error_of(&body)),
                Some(_) => {}
                None => panic!("the proxy closed the connection during login"),
            }
        }
    }

    /// Writes `bytes`; a proxy that already closed the connection is not an error here, what it
    /// said before closing is what the tests look at.
    async fn send(&mut self, bytes: &[u8]) {
        let _ = self.tcp.write_all(bytes).await;
    }

    /// The next whole message, or `None` once the proxy closed (or reset) the connection.
    async fn recv(&mut self) -> Option<(u8, Vec<u8>)> {
        loop {
            if let Some(message) = next_message(&self.buf, 1 << 20).expect("a valid frame") {
                let whole = (message.tag, message.body.to_vec());
                let len = message.len();
                self.buf.advance(len);
                return Some(whole);
            }
            match self.tcp.read_buf(&mut self.buf).await {
                Ok(0) | Err(_) => {
                    assert!(self.buf.is_empty(), "a message cut short: {:?}", self.buf);
                    return None;
                }
                Ok(_) => {}
            }
        }
    }

    /// Reads until the proxy closes the connection, within [`ANSWER`]: either nothing or exactly
    /// one ErrorResponse may come.
    async fn ending(&mut self) -> Ending {
        self.ending_within(ANSWER).await
    }

    /// [`RawClient::ending`] with its own bound.
    async fn ending_within(&mut self, bound: Duration) -> Ending {
        let first = tokio::time::timeout(bound, self.recv())
            .await
            .expect("the proxy answers or closes at once");
        let ending = match first {
            None => return Ending::Closed,
            Some((b'E', body)) => {
                let (code, message) = error_of(&body);
                Ending::Error { code, message }
            }
            Some((tag, body)) => panic!("unexpected message {} {body:?}", char::from(tag)),
        };
        let next = tokio::time::timeout(bound, self.recv())
            .await
            .expect("the proxy closes after its error");
        assert!(next.is_none(), "a message after the error: {next:?}");
        ending
    }

    /// Whether the proxy has neither closed the connection nor sent anything, asked of the kernel
    /// directly (tokio's `try_read` trusts readiness the reactor may not have seen yet).
    fn is_open(&self) -> bool {
        let mut probe = [std::mem::MaybeUninit::new(0u8)];
        let peeked = socket2::SockRef::from(&self.tcp).peek(&mut probe);
        matches!(peeked, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
    }

    /// Runs `sql` with the simple protocol and reads up to its ReadyForQuery.
    async fn query(&mut self, sql: &str) {
        let mut out = BytesMut::new();
        encode::query(&mut out, sql.as_bytes());
        self.send(&out).await;
        loop {
            match self.recv().await {
                Some((b'Z', _)) => return,
                Some((b'E', body)) => panic!("{sql}: {:?}", error_of(&body)),
                Some(_) => {}
                None => panic!("{sql}: the connection closed"),
            }
        }
    }
}

/// SQLSTATE and message of an ErrorResponse body.
fn error_of(body: &[u8]) -> (String, String) {
    let fields = ErrorFields::parse(body).expect("a valid ErrorResponse");
    let text = |v: Option<&[u8]>| String::from_utf8_lossy(v.unwrap_or_default()).into_owned();
    (text(fields.sqlstate()), text(fields.message()))
}

/// A normal client connects through pgvigil as `app` and runs a query.
async fn assert_served(proxy: &TestProxy) {
    assert_served_as(proxy, APP_USER, APP_PASSWORD).await;
}

/// A normal client connects through pgvigil as `user` and runs a query.
async fn assert_served_as(proxy: &TestProxy, user: &str, password: &str) {
    let conninfo = proxy.conninfo(user, password, APP_DB);
    let client = tokio::time::timeout(SETTLE, proxy.connect(&conninfo))
        .await
        .expect("a normal client is served in time")
        .unwrap_or_else(|e| panic!("{user} could not connect through pgvigil: {e}"));
    let row = client.query_one("SELECT 41 + 1", &[]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 42);
}

/// Backends on the primary running `pg_sleep`, in any state.
fn sleeping_backends(cluster: &LocalCluster) -> usize {
    let sql = "SELECT count(*) FROM pg_stat_activity \
               WHERE pid <> pg_backend_pid() AND query LIKE '%SELECT pg_sleep(30)'";
    let out = cluster.psql(PRIMARY, sql).unwrap();
    out.parse().unwrap_or_else(|_| panic!("{sql}: {out}"))
}

/// The process's peak virtual memory size (`VmPeak`), in KiB.
fn vm_peak_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmPeak:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmPeak in /proc/self/status")
}

/// Raises this process's soft RLIMIT_NOFILE to at least `wanted` (both ends of every connection
/// live in the test process), up to the hard limit.
fn raise_open_file_limit(wanted: u64) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed by pointer.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        if limit.rlim_cur < wanted {
            assert!(
                limit.rlim_max >= wanted,
                "the hard limit on open files ({}) is below the {wanted} this test needs",
                limit.rlim_max
            );
            limit.rlim_cur = wanted;
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
        }
    }
}
