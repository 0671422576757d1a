//! Client authentication and the startup packet, as a client of pgvigil sees them: SCRAM, md5 and
//! trust users log in; wrong passwords and unknown users get the same 28P01; malformed or
//! unsupported startup packets get PostgreSQL's own SQLSTATEs; protocol 3.2 is negotiated down to
//! 3.0; and startup parameters reach the server session, and only that session.
//!
//! The raw-protocol client and the psql runner defined here are shared with `tls.rs` and `cli.rs`.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Buf, BufMut, BytesMut};
use pgvigil::config::AuthMethod;
use pgvigil_proto::backend::ErrorFields;
use pgvigil_proto::{encode, next_message};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256, SCRAM_SHA_256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_postgres::error::DbError;

use crate::support::{
    start_proxy, test_cluster, TestProxy, APP_DB, APP_PASSWORD, APP_USER, MD5_PASSWORD, MD5_USER,
};

/// Bound on every single network step of a test; generous for a loaded 2-core machine.
pub(crate) const STEP: Duration = Duration::from_secs(30);

/// AuthenticationMD5Password's request code.
const AUTH_MD5: i32 = 5;
/// AuthenticationSASL's request code (PostgreSQL docs §55.7, "AuthenticationSASL").
const AUTH_SASL: i32 = 10;
/// AuthenticationSASLContinue's request code.
const AUTH_SASL_CONTINUE: i32 = 11;
/// AuthenticationSASLFinal's request code.
const AUTH_SASL_FINAL: i32 = 12;
/// AuthenticationOk's request code.
const AUTH_OK: i32 = 0;

/// A client that writes hand-made bytes and reads tagged messages, for what libpq never sends.
pub(crate) struct RawClient {
    tcp: TcpStream,
    buf: BytesMut,
}

/// One tagged message received by a [`RawClient`].
pub(crate) struct Received {
    pub(crate) tag: u8,
    pub(crate) body: Vec<u8>,
}

impl Received {
    /// The request code of an Authentication ('R') message.
    pub(crate) fn auth_code(&self) -> i32 {
        assert_eq!(self.tag, b'R', "expected an Authentication message");
        i32::from_be_bytes(self.body[..4].try_into().unwrap())
    }

    /// SQLSTATE and message of an ErrorResponse.
    pub(crate) fn error(&self) -> (String, String) {
        assert_eq!(
            char::from(self.tag),
            'E',
            "expected an ErrorResponse, got {:?}",
            String::from_utf8_lossy(&self.body)
        );
        let fields = ErrorFields::parse(&self.body).expect("a well-formed ErrorResponse");
        let text = |v: Option<&[u8]>| String::from_utf8_lossy(v.unwrap_or_default()).into_owned();
        (text(fields.sqlstate()), text(fields.message()))
    }
}

impl RawClient {
    pub(crate) async fn connect(addr: SocketAddr) -> RawClient {
        let tcp = tokio::time::timeout(STEP, TcpStream::connect(addr))
            .await
            .expect("connect timed out")
            .expect("connect to pgvigil");
        RawClient {
            tcp,
            buf: BytesMut::new(),
        }
    }

    pub(crate) async fn send(&mut self, bytes: &[u8]) {
        self.tcp.write_all(bytes).await.expect("write to pgvigil");
    }

    /// The next tagged message; panics if the connection closes first or nothing comes in time.
    pub(crate) async fn recv(&mut self) -> Received {
        tokio::time::timeout(STEP, async {
            loop {
                if let Some(message) = next_message(&self.buf, 1 << 20).unwrap() {
                    let received = Received {
                        tag: message.tag,
                        body: message.body.to_vec(),
                    };
                    let len = message.len();
                    self.buf.advance(len);
                    return received;
                }
                let n = self.tcp.read_buf(&mut self.buf).await.expect("read");
                assert!(
                    n > 0,
                    "pgvigil closed the connection before a whole message"
                );
            }
        })
        .await
        .expect("no message from pgvigil in time")
    }

    /// One unframed byte: the 'S' or 'N' that answers an SSLRequest.
    pub(crate) async fn read_byte(&mut self) -> u8 {
        if self.buf.is_empty() {
            let n = tokio::time::timeout(STEP, self.tcp.read_buf(&mut self.buf))
                .await
                .expect("no answer from pgvigil in time")
                .expect("read");
            assert!(n > 0, "pgvigil closed the connection instead of answering");
        }
        self.buf.split_to(1)[0]
    }

    /// True once pgvigil has closed the connection, with nothing left unread.
    pub(crate) async fn is_closed(&mut self) -> bool {
        let mut rest = Vec::new();
        tokio::time::timeout(STEP, self.tcp.read_to_end(&mut rest))
            .await
            .is_ok_and(|read| read.is_ok_and(|_| rest.is_empty() && self.buf.is_empty()))
    }
}

/// A StartupMessage with any protocol version code (the encoder only writes 3.0).
fn startup_packet(major: u16, minor: u16, params: &[(&str, &str)]) -> BytesMut {
    let mut body = BytesMut::new();
    body.put_u16(major);
    body.put_u16(minor);
    for (name, value) in params {
        body.put_slice(name.as_bytes());
        body.put_u8(0);
        body.put_slice(value.as_bytes());
        body.put_u8(0);
    }
    body.put_u8(0);
    let mut packet = BytesMut::new();
    packet.put_u32(body.len() as u32 + 4);
    packet.put_slice(&body);
    packet
}

/// The server's error from a refused login through tokio-postgres.
async fn login_error(proxy: &TestProxy, user: &str, password: &str) -> DbError {
    let conninfo = proxy.conninfo(user, password, APP_DB);
    let error = match tokio::time::timeout(STEP, proxy.connect(&conninfo)).await {
        Ok(Ok(_)) => panic!("{user} logged in with password {password:?}"),
        Ok(Err(error)) => error,
        Err(_) => panic!("login of {user} did not finish in time"),
    };
    error
        .as_db_error()
        .unwrap_or_else(|| panic!("expected an ErrorResponse, got {error}"))
        .clone()
}

/// `current_user` of a session opened with `conninfo`.
async fn current_user(proxy: &TestProxy, conninfo: &str) -> String {
    let client = tokio::time::timeout(STEP, proxy.connect(conninfo))
        .await
        .expect("login timed out")
        .unwrap_or_else(|e| panic!("login with {conninfo:?} failed: {e}"));
    client
        .query_one("SELECT current_user::text", &[])
        .await
        .unwrap()
        .get(0)
}

/// Runs psql through pgvigil and returns its trimmed stdout; panics with stderr on failure.
pub(crate) async fn psql(conninfo: &str, args: &[&str]) -> String {
    let output = psql_output(conninfo, args).await;
    assert!(
        output.status.success(),
        "psql failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap().trim().to_owned()
}

/// Runs psql (no psqlrc, never prompts, unaligned tuples only) and returns whatever happened.
pub(crate) async fn psql_output(conninfo: &str, args: &[&str]) -> std::process::Output {
    let mut command = tokio::process::Command::new(psql_path());
    command
        .env_clear()
        .args(["-X", "-w", "-A", "-t", "-d", conninfo])
        .args(args)
        .kill_on_drop(true);
    tokio::time::timeout(STEP, command.output())
        .await
        .expect("psql did not finish in time")
        .expect("psql runs")
}

pub(crate) fn psql_path() -> std::path::PathBuf {
    let installed = std::path::Path::new("/usr/lib/postgresql/15/bin/psql");
    if installed.exists() {
        installed.to_path_buf()
    } else {
        "psql".into()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn scram_user_logs_in_with_tokio_postgres_and_psql() {
    let cluster = test_cluster(0);
    let proxy = start_proxy(&cluster, |_| {}).await;
    let conninfo = proxy.conninfo(APP_USER, APP_PASSWORD, APP_DB);

    assert_eq!(current_user(&proxy, &conninfo).await, APP_USER);
    let out = psql(
        &conninfo,
        &["-c", "SELECT current_user, current_database()"],
    )
    .await;
    assert_eq!(out, "app|app");
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_password_and_unknown_user_get_the_same_28p01() {
    let cluster = test_cluster(0);
    let proxy = start_proxy(&cluster, |_| {}).await;

    let wrong = login_error(&proxy, APP_USER, "not-the-password").await;
    assert_eq!(wrong.code().code(), "28P01");
    assert_eq!(wrong.severity(), "FATAL");
    assert_eq!(
        wrong.message(),
        "password authentication failed for user \"app\""
    );

    // The unknown user goes through the same SCRAM exchange and fails at the same step, with the
    // same wording: nothing tells a client whether the name exists.
    let unknown = login_error(&proxy, "nobody", "not-the-password").await;
    assert_eq!(unknown.code().code(), "28P01");
    assert_eq!(unknown.severity(), wrong.severity());
    assert_eq!(
        unknown.message(),
        wrong.message().replace("\"app\"", "\"nobody\"")
    );

    // On the wire, too, the exchange looks the same up to the proof: the same SASL offer, then a
    // server-first-message with a salt of the same size and the same iteration count.
    let mut shapes = Vec::new();
    for user in [APP_USER, "nobody"] {
        let mut raw = RawClient::connect(proxy.addr).await;
        let mut out = BytesMut::new();
        encode::startup_message(
            &mut out,
            &[(b"user", user.as_bytes()), (b"database", b"app")],
        );
        raw.send(&out).await;
        let offer = raw.recv().await;
        assert_eq!(offer.auth_code(), AUTH_SASL, "{user} is asked for SCRAM");

        let scram = ScramSha256::new(b"not-the-password", ChannelBinding::unsupported());
        out.clear();
        encode::sasl_initial_response(&mut out, SCRAM_SHA_256, scram.message());
        raw.send(&out).await;
        let server_first = raw.recv().await;
        assert_eq!(server_first.auth_code(), AUTH_SASL_CONTINUE, "{user}");
        let text = String::from_utf8(server_first.body[4..].to_vec()).unwrap();
        let attribute = |name: &str| {
            text.split(',')
                .find_map(|a| a.strip_prefix(name))
                .unwrap_or_else(|| panic!("no {name} in {text:?}"))
                .to_owned()
        };
        shapes.push((offer.body, attribute("s=").len(), attribute("i=")));
    }
    assert_eq!(shapes[0], shapes[1], "known and unknown users look alike");
}

#[tokio::test(flavor = "multi_thread")]
async fn where_users_use_md5_an_unknown_user_is_asked_for_md5_too() {
    let cluster = test_cluster(0);
    let proxy = start_proxy(&cluster, |config| {
        config.users.retain(|u| u.auth == AuthMethod::Md5);
    })
    .await;
    for user in [MD5_USER, "nobody"] {
        let mut raw = RawClient::connect(proxy.addr).await;
        let mut startup = BytesMut::new();
        encode::startup_message(
            &mut startup,
            &[(b"user", user.as_bytes()), (b"database", b"app")],
        );
        raw.send(&startup).await;
        let request = raw.recv().await;
        assert_eq!(request.auth_code(), 5, "{user} is asked for md5");
        let salt: [u8; 4] = request.body[4..8].try_into().unwrap();
        let hash = postgres_protocol::authentication::md5_hash(user.as_bytes(), b"wrong", salt);
        let mut answer = BytesMut::new();
        encode::password_message(&mut answer, hash.as_bytes());
        raw.send(&answer).await;
        let (code, message) = raw.recv().await.error();
        assert_eq!(code, "28P01");
        assert_eq!(
            message,
            format!("password authentication failed for user \"{user}\"")
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn md5_user_logs_in_with_md5_and_a_wrong_password_gets_28p01() {
    let cluster = test_cluster(0);
    let proxy = start_proxy(&cluster, |_| {}).await;

    // The first thing an md5 user is asked for is an MD5 hash.
    let mut raw = RawClient::connect(proxy.addr).await;
    let mut startup = BytesMut::new();
    encode::startup_message(&mut startup, &[(b"user", MD5_USER.as_bytes())]);
    raw.send(&startup).await;
    assert_eq!(raw.recv().await.auth_code(), AUTH_MD5);

    let conninfo = proxy.conninfo(MD5_USER, MD5_PASSWORD, APP_DB);
    assert_eq!(current_user(&proxy, &conninfo).await, MD5_USER);
    let out = psql(&conninfo, &["-c", "SELECT current_user"]).await;
    assert_eq!(out, MD5_USER);

    let wrong = login_error(&proxy, MD5_USER, "not-the-password").await;
    assert_eq!(wrong.code().code(), "28P01");
    assert_eq!(
        wrong.message(),
        "password authentication failed for user \"app_md5\""
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn trust_user_logs_in_without_a_password() {
    let cluster = test_cluster(0);
    let proxy = start_proxy(&cluster, |config| {
        let app = config
            .users
            .iter_mut()
            .find(|u| u.name == APP_USER)
            .unwrap();
        app.auth = AuthMethod::Trust;
    })
    .await;

    let no_password = format!(
        "host=127.0.0.1 port={} user={APP_USER} dbname={APP_DB}",
        proxy.addr.port()
    );
    assert_eq!(current_user(&proxy, &no_password).await, APP_USER);
    assert_eq!(
        psql(&no_password, &["-c", "SELECT current_user"]).await,
        APP_USER
    );

    // pgvigil still logs in to the node with the configured password: the session is real.
    let mut raw = RawClient::connect(proxy.addr).await;
    let mut startup = BytesMut::new();
    encode::startup_message(&mut startup, &[(b"user", APP_USER.as_bytes())]);
    raw.send(&startup).await;
    assert_eq!(raw.recv().await.auth_code(), AUTH_OK);

    // Users not marked trust still need their password on the same proxy.
    let md5 = login_error(&proxy, MD5_USER, "not-the-password").await;
    assert_eq!(md5.code().code(), "28P01");
}

#[tokio::test(flavor = "multi_thread")]
async fn startup_without_user_is_refused_with_28000() {
    let cluster = test_cluster(0);
    let proxy = start_proxy(&cluster, |_| {}).await;

    let mut raw = RawClient::connect(proxy.addr).await;
    let mut startup = BytesMut::new();
    encode::startup_message(&mut startup, &[(b"database", b"app")]);
    raw.send(&startup).await;

    let (code, message) = raw.recv().await.error();
    assert_eq!(code, "28000");
    assert_eq!(
        message,
        "no PostgreSQL user name specified in startup packet"
    );
    assert!(raw.is_closed().await, "the connection is closed after it");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_gss_encryption_request_is_declined_and_the_startup_goes_on() {
    let cluster = test_cluster(0);
    let proxy = start_proxy(&cluster, |_| {}).await;

    let mut raw = RawClient::connect(proxy.addr).await;
    // GSSENCRequest: length 8, code 80877104 (PostgreSQL protocol docs, "GSSENCRequest").
    let mut request = BytesMut::new();
    request.put_u32(8);
    request.put_u32(80_877_104);
    raw.send(&request).await;
    assert_eq!(raw.read_byte().await, b'N', "GSS encryption is declined");

    let mut startup = BytesMut::new();
    encode::startup_message(&mut startup, &[(b"user", b"app"), (b"database", b"app")]);
    raw.send(&startup).await;
    assert_eq!(
        raw.recv().await.auth_code(),
        10,
        "then SCRAM is asked for as usual"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn protocol_versions_other_than_3_are_refused_with_0a000() {
    let cluster = test_cluster(0);
    let proxy = start_proxy(&cluster, |_| {}).await;

    for (major, minor) in [(2, 0), (4, 0)] {
        let mut raw = RawClient::connect(proxy.addr).await;
        raw.send(&startup_packet(major, minor, &[("user", APP_USER)]))
            .await;
        let (code, message) = raw.recv().await.error();
        assert_eq!(code, "0A000", "protocol {major}.{minor}");
        assert!(
            message.contains(&format!("unsupported frontend protocol {major}.{minor}")),
            "{message}"
        );
        assert!(raw.is_closed().await, "protocol {major}.{minor}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn protocol_3_2_is_negotiated_down_to_3_0_and_the_session_works() {
    let cluster = test_cluster(0);
    let proxy = start_proxy(&cluster, |_| {}).await;

    let mut raw = RawClient::connect(proxy.addr).await;
    raw.send(&startup_packet(
        3,
        2,
        &[
            ("user", APP_USER),
            ("database", APP_DB),
            ("_pq_.made_up_option", "on"),
        ],
    ))
    .await;

    // NegotiateProtocolVersion: the newest version pgvigil speaks (3.0, as a whole version code,
    // like PostgreSQL sends it), then the `_pq_.` options it ignored.
    let negotiate = raw.recv().await;
    assert_eq!(char::from(negotiate.tag), 'v');
    let mut body = negotiate.body.as_slice();
    assert_eq!(body.get_u32(), 3 << 16, "newest version is 3.0");
    assert_eq!(body.get_u32(), 1, "one option unrecognized");
    assert_eq!(body, b"_pq_.made_up_option\0");

    // The session then continues as 3.0: a full SCRAM login, then a query.
    let request = raw.recv().await;
    assert_eq!(request.auth_code(), AUTH_SASL);
    let mut scram = ScramSha256::new(APP_PASSWORD.as_bytes(), ChannelBinding::unsupported());
    let mut out = BytesMut::new();
    encode::sasl_initial_response(&mut out, SCRAM_SHA_256, scram.message());
    raw.send(&out).await;
    let server_first = raw.recv().await;
    assert_eq!(server_first.auth_code(), AUTH_SASL_CONTINUE);
    scram.update(&server_first.body[4..]).unwrap();
    out.clear();
    encode::sasl_response(&mut out, scram.message());
    raw.send(&out).await;
    let server_final = raw.recv().await;
    assert_eq!(server_final.auth_code(), AUTH_SASL_FINAL);
    scram
        .finish(&server_final.body[4..])
        .expect("pgvigil proves it knows the password too");
    assert_eq!(raw.recv().await.auth_code(), AUTH_OK);
    loop {
        let message = raw.recv().await;
        if message.tag == b'Z' {
            break;
        }
        assert!(
            matches!(message.tag, b'S' | b'K'),
            "unexpected message {:?} in the greeting",
            char::from(message.tag)
        );
    }

    out.clear();
    encode::query(&mut out, b"SELECT 6 * 7");
    raw.send(&out).await;
    let mut values = Vec::new();
    loop {
        let message = raw.recv().await;
        match message.tag {
            b'Z' => break,
            b'D' => {
                let mut row = message.body.as_slice();
                assert_eq!(row.get_u16(), 1, "one column");
                let len = row.get_u32() as usize;
                values.push(String::from_utf8(row[..len].to_vec()).unwrap());
            }
            b'T' | b'C' => {}
            other => panic!("unexpected message {:?}", char::from(other)),
        }
    }
    assert_eq!(values, ["42"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn application_name_and_options_from_startup_apply_on_the_server() {
    let cluster = test_cluster(0);
    let proxy = start_proxy(&cluster, |_| {}).await;
    proxy
        .connect_app()
        .await
        .batch_execute("CREATE SCHEMA foo")
        .await
        .unwrap();

    let conninfo = format!(
        "{} application_name=myapp options='-c search_path=foo -c statement_timeout=1234'",
        proxy.conninfo(APP_USER, APP_PASSWORD, APP_DB)
    );
    let client = tokio::time::timeout(STEP, proxy.connect(&conninfo))
        .await
        .unwrap()
        .unwrap();
    let row = client
        .query_one(
            "SELECT current_setting('application_name'), current_setting('search_path'), \
             current_setting('statement_timeout')",
            &[],
        )
        .await
        .unwrap();
    let (name, path, timeout): (String, String, String) = (row.get(0), row.get(1), row.get(2));
    assert_eq!(name, "myapp");
    assert_eq!(path, "foo");
    assert_eq!(timeout, "1234ms");

    // The server really uses them: an unqualified table lands in schema foo, and the node's own
    // view of the session shows the application name.
    client
        .batch_execute("CREATE TABLE lands_here(id int)")
        .await
        .unwrap();
    let schema: String = client
        .query_one(
            "SELECT schemaname::text FROM pg_tables WHERE tablename = 'lands_here'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(schema, "foo");
    let seen_by_node = cluster
        .psql(
            0,
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'myapp'",
        )
        .unwrap();
    assert_eq!(seen_by_node, "1");

    let shown = psql(
        &format!(
            "{} application_name=psql_app options='-c search_path=foo'",
            proxy.conninfo(APP_USER, APP_PASSWORD, APP_DB)
        ),
        &["-c", "SHOW search_path", "-c", "SHOW application_name"],
    )
    .await;
    assert_eq!(shown, "foo\npsql_app");
}

#[tokio::test(flavor = "multi_thread")]
async fn startup_parameters_do_not_leak_into_the_next_session_on_the_same_server_connection() {
    let cluster = test_cluster(0);
    // One server connection: the second client must get the first one's connection back.
    let proxy = start_proxy(&cluster, |config| config.pool.max_size = 1).await;
    let base = proxy.conninfo(APP_USER, APP_PASSWORD, APP_DB);
    let settings = "SELECT pg_backend_pid(), current_setting('application_name'), \
                    current_setting('statement_timeout')";

    let first = tokio::time::timeout(
        STEP,
        proxy.connect(&format!(
            "{base} application_name=myapp options='-c statement_timeout=4321'"
        )),
    )
    .await
    .unwrap()
    .unwrap();
    let row = first.query_one(settings, &[]).await.unwrap();
    let (first_pid, name, timeout): (i32, String, String) = (row.get(0), row.get(1), row.get(2));
    assert_eq!((name.as_str(), timeout.as_str()), ("myapp", "4321ms"));
    drop(first);

    let second = proxy.connect_app().await;
    let row = second.query_one(settings, &[]).await.unwrap();
    let (second_pid, name, timeout): (i32, String, String) = (row.get(0), row.get(1), row.get(2));
    assert_eq!(second_pid, first_pid, "the server connection was reused");
    // A client that sets no name sees none, as it would connected directly.
    assert_eq!((name.as_str(), timeout.as_str()), ("", "0"));
    drop(second);

    // And the same settings asked again are applied again, not assumed from the last session.
    let third = tokio::time::timeout(
        STEP,
        proxy.connect(&format!("{base} application_name=myapp")),
    )
    .await
    .unwrap()
    .unwrap();
    let row = third.query_one(settings, &[]).await.unwrap();
    let (third_pid, name): (i32, String) = (row.get(0), row.get(1));
    assert_eq!(third_pid, first_pid);
    assert_eq!(name, "myapp");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_invalid_startup_setting_is_refused_with_the_servers_sqlstate() {
    let cluster = test_cluster(0);
    let proxy = start_proxy(&cluster, |_| {}).await;
    let base = proxy.conninfo(APP_USER, APP_PASSWORD, APP_DB);

    for (options, sqlstate) in [
        ("-c no_such_setting=1", "42704"),
        ("-c statement_timeout=soon", "22023"),
        ("-X", "0A000"),
    ] {
        let conninfo = format!("{base} options='{options}'");
        let error = match tokio::time::timeout(STEP, proxy.connect(&conninfo))
            .await
            .unwrap()
        {
            Ok(_) => panic!("options={options:?} gave a session"),
            Err(error) => error,
        };
        let db_error = error
            .as_db_error()
            .unwrap_or_else(|| panic!("options={options:?}: expected an ErrorResponse: {error}"));
        assert_eq!(db_error.code().code(), sqlstate, "options={options:?}");
        // The session is over, and the client is told so, as PostgreSQL itself does.
        assert_eq!(db_error.severity(), "FATAL", "options={options:?}");
    }

    // The refused sessions left the pool healthy.
    let client = proxy.connect_app().await;
    client.simple_query("SELECT 1").await.unwrap();
}
