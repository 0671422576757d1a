//! pgvigil logs in to the nodes the way each node asks (SCRAM, md5, trust) and, when
//! `backend.tls` says so, over TLS: encrypted, verified against `backend.ca`, or refused.

use std::path::PathBuf;

use pgvigil::config::{AuthMethod, BackendTlsMode, UserConfig};

use crate::support::{fresh_base_dir, start, start_proxy, test_cluster, ClusterSpec, LocalCluster};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tls")
        .join(name)
}

fn tls_cluster() -> LocalCluster {
    start(
        ClusterSpec::new(fresh_base_dir())
            .replicas(0)
            .tls(fixture("cert.pem"), fixture("key.pem")),
    )
}

/// Whether the server connection serving this client is encrypted, as the node sees it.
async fn server_side_ssl(client: &tokio_postgres::Client) -> bool {
    client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .expect("pg_stat_ssl is readable")
        .get(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn pgvigil_logs_in_to_a_node_that_trusts_the_user() {
    // The test cluster trusts `postgres` over TCP: the node sends AuthenticationOk at once.
    let cluster = test_cluster(0);
    let proxy = start_proxy(&cluster, |config| {
        config.users.push(UserConfig {
            name: "postgres".into(),
            password: Some("client-side-secret".into()),
            auth: AuthMethod::Md5,
            admin: false,
        })
    })
    .await;
    let client = proxy
        .connect(&proxy.conninfo("postgres", "client-side-secret", "postgres"))
        .await
        .expect("postgres logs in through pgvigil");
    let user: String = client
        .query_one("SELECT current_user::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(user, "postgres");
}

#[tokio::test(flavor = "multi_thread")]
async fn with_backend_tls_required_the_server_connection_is_encrypted() {
    let cluster = tls_cluster();
    let proxy = start_proxy(&cluster, |config| {
        config.backend.tls = BackendTlsMode::Require
    })
    .await;
    let client = proxy.connect_app().await;
    assert!(
        server_side_ssl(&client).await,
        "the node sees a TLS connection"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn with_a_ca_the_node_certificate_is_verified() {
    let cluster = tls_cluster();
    // The fixture certificate names 127.0.0.1, the address the nodes are configured with.
    let proxy = start_proxy(&cluster, |config| {
        config.backend.tls = BackendTlsMode::Require;
        config.backend.ca = Some(fixture("cert.pem"));
    })
    .await;
    let client = proxy.connect_app().await;
    assert!(server_side_ssl(&client).await);
}

#[tokio::test(flavor = "multi_thread")]
async fn backend_tls_prefer_uses_tls_when_offered_and_plain_otherwise() {
    let with_tls = tls_cluster();
    let proxy = start_proxy(&with_tls, |config| {
        config.backend.tls = BackendTlsMode::Prefer
    })
    .await;
    assert!(server_side_ssl(&proxy.connect_app().await).await);

    let plain = test_cluster(0);
    let proxy = start_proxy(&plain, |config| config.backend.tls = BackendTlsMode::Prefer).await;
    assert!(!server_side_ssl(&proxy.connect_app().await).await);
}

#[tokio::test(flavor = "multi_thread")]
async fn backend_tls_required_refuses_a_node_without_tls_with_08006() {
    let cluster = test_cluster(0);
    let proxy = start_proxy(&cluster, |config| {
        config.backend.tls = BackendTlsMode::Require
    })
    .await;
    let error = proxy
        .connect(&proxy.conninfo(
            crate::support::APP_USER,
            crate::support::APP_PASSWORD,
            "app",
        ))
        .await
        .expect_err("no session without TLS to the node");
    let db = error.as_db_error().expect("an ErrorResponse from pgvigil");
    assert_eq!(db.code().code(), "08006");
    assert!(
        db.message().contains("does not accept TLS"),
        "{}",
        db.message()
    );
}
