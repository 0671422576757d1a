//! TLS between clients and pgvigil: with a certificate configured, libpq clients get encrypted
//! sessions (and can verify the certificate); `tls.mode = "allow"` still serves plain clients,
//! `"require"` refuses them with 28000; and bytes smuggled after an SSLRequest are refused
//! (CVE-2021-23214). The nodes themselves are reached without TLS.

use std::path::PathBuf;

use bytes::BytesMut;
use pgvigil::config::TlsMode;
use pgvigil_proto::encode;

use crate::auth::{psql, psql_output, RawClient, STEP};
use crate::support::{start_proxy, test_cluster, TestProxy, APP_DB, APP_PASSWORD, APP_USER};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tls")
        .join(name)
}

/// Starts pgvigil with the fixture certificate and `mode`.
async fn proxy_with_tls(
    cluster: &pgvigil::local_cluster::LocalCluster,
    mode: TlsMode,
) -> TestProxy {
    let proxy = start_proxy(cluster, |config| {
        config.tls.cert = Some(fixture("cert.pem"));
        config.tls.key = Some(fixture("key.pem"));
        config.tls.mode = mode;
    })
    .await;
    assert!(proxy.running.proxy.tls_acceptor.is_some(), "TLS on offer");
    proxy
}

fn app_conninfo(proxy: &TestProxy, sslmode: &str) -> String {
    format!(
        "{} sslmode={sslmode}",
        proxy.conninfo(APP_USER, APP_PASSWORD, APP_DB)
    )
}

/// psql's `\conninfo` line about encryption, or `None` for a plain connection.
async fn ssl_line(conninfo: &str) -> Option<String> {
    let out = psql(conninfo, &["-c", "\\conninfo"]).await;
    out.lines()
        .find(|line| line.starts_with("SSL connection"))
        .map(str::to_owned)
}

#[tokio::test(flavor = "multi_thread")]
async fn psql_gets_an_encrypted_session_and_can_verify_the_certificate() {
    let cluster = test_cluster(0);
    let proxy = proxy_with_tls(&cluster, TlsMode::Allow).await;

    let required = app_conninfo(&proxy, "require");
    let line = ssl_line(&required)
        .await
        .expect("sslmode=require is encrypted");
    assert!(line.contains("protocol: TLSv1."), "{line}");
    assert_eq!(
        psql(&required, &["-c", "SELECT current_user"]).await,
        APP_USER
    );

    // verify-full checks the chain against the fixture and the name against "localhost".
    let verified = format!(
        "host=localhost hostaddr=127.0.0.1 port={} user={APP_USER} password={APP_PASSWORD} \
         dbname={APP_DB} sslmode=verify-full sslrootcert={}",
        proxy.addr.port(),
        fixture("cert.pem").display()
    );
    assert!(ssl_line(&verified).await.is_some());
    assert_eq!(psql(&verified, &["-c", "SELECT 6 * 7"]).await, "42");

    // The certificate is not valid for another name: libpq refuses to go on.
    let wrong_name = verified.replace("host=localhost", "host=db.example.com");
    let output = psql_output(&wrong_name, &["-c", "SELECT 1"]).await;
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("db.example.com"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn plain_clients_still_work_when_tls_is_allowed() {
    let cluster = test_cluster(0);
    let proxy = proxy_with_tls(&cluster, TlsMode::Allow).await;

    let plain = app_conninfo(&proxy, "disable");
    assert_eq!(ssl_line(&plain).await, None);
    assert_eq!(psql(&plain, &["-c", "SELECT current_user"]).await, APP_USER);

    // tokio-postgres without TLS support never sends an SSLRequest.
    let client = proxy.connect_app().await;
    let one: i32 = client.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);

    // libpq's default, prefer, takes the encryption on offer.
    assert!(ssl_line(&app_conninfo(&proxy, "prefer")).await.is_some());
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_required_refuses_plain_clients_with_28000_and_serves_tls_clients() {
    let cluster = test_cluster(0);
    let proxy = proxy_with_tls(&cluster, TlsMode::Require).await;

    let error = match tokio::time::timeout(STEP, proxy.connect(&app_conninfo(&proxy, "disable")))
        .await
        .expect("refusal in time")
    {
        Ok(_) => panic!("a plain client got a session although TLS is required"),
        Err(error) => error,
    };
    let db_error = error.as_db_error().expect("an ErrorResponse");
    assert_eq!(db_error.code().code(), "28000");
    assert!(db_error.message().contains("requires TLS"), "{db_error}");

    let output = psql_output(&app_conninfo(&proxy, "disable"), &["-c", "SELECT 1"]).await;
    assert!(!output.status.success(), "psql without TLS is refused");

    let line = ssl_line(&app_conninfo(&proxy, "require"))
        .await
        .expect("encrypted");
    assert!(line.contains("TLSv1."), "{line}");
}

#[tokio::test(flavor = "multi_thread")]
async fn bytes_sent_after_an_ssl_request_in_the_same_packet_are_refused() {
    let cluster = test_cluster(0);
    let proxy = proxy_with_tls(&cluster, TlsMode::Allow).await;

    // An attacker in the middle appends a plaintext StartupMessage to the client's SSLRequest,
    // hoping it is read as if it had come over TLS.
    let mut packet = BytesMut::new();
    encode::ssl_request(&mut packet);
    encode::startup_message(
        &mut packet,
        &[(b"user", APP_USER.as_bytes()), (b"database", b"app")],
    );
    let mut raw = RawClient::connect(proxy.addr).await;
    raw.send(&packet).await;

    // No 'S': the answer is a plaintext ErrorResponse, then the connection is closed.
    let (code, message) = raw.recv().await.error();
    assert_eq!(code, "08P01");
    assert_eq!(message, "unencrypted data after SSLRequest");
    assert!(raw.is_closed().await);

    // The same SSLRequest alone is answered with 'S' (TLS on offer).
    let mut alone = BytesMut::new();
    encode::ssl_request(&mut alone);
    let mut raw = RawClient::connect(proxy.addr).await;
    raw.send(&alone).await;
    assert_eq!(raw.read_byte().await, b'S');
}

#[tokio::test(flavor = "multi_thread")]
async fn without_a_certificate_ssl_requests_are_declined_and_plain_sessions_work() {
    let cluster = test_cluster(0);
    let proxy = start_proxy(&cluster, |_| {}).await;
    assert!(
        proxy.running.proxy.tls_acceptor.is_none(),
        "no TLS on offer"
    );

    let mut request = BytesMut::new();
    encode::ssl_request(&mut request);
    let mut raw = RawClient::connect(proxy.addr).await;
    raw.send(&request).await;
    assert_eq!(raw.read_byte().await, b'N');

    let output = psql_output(&app_conninfo(&proxy, "require"), &["-c", "SELECT 1"]).await;
    assert!(!output.status.success(), "sslmode=require cannot be met");
    assert_eq!(ssl_line(&app_conninfo(&proxy, "prefer")).await, None);
}
