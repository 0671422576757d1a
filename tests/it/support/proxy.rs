//! pgvigil started in-process in front of a test cluster, and clients that connect through it.

use std::net::SocketAddr;

use pgvigil::config::{AuthMethod, Config, UserConfig};
use pgvigil::proxy::Running;
use tokio_postgres::{Client, NoTls};

use super::{LocalCluster, APP_DB, APP_PASSWORD, APP_USER, MD5_PASSWORD, MD5_USER};

/// A running pgvigil on a free loopback port.
pub struct TestProxy {
    /// The running proxy (its shared state is `running.proxy`).
    pub running: Running,
    /// Where it listens.
    pub addr: SocketAddr,
}

/// The configuration tests start from: every node of `cluster`, the SCRAM user `app` and the md5
/// user `app_md5`, listening (and serving the admin API) on free loopback ports.
pub fn test_config(cluster: &LocalCluster) -> Config {
    let mut config = pgvigil::demo::demo_config(cluster, 0);
    config.admin.listen = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    config.users.push(UserConfig {
        name: MD5_USER.into(),
        password: Some(MD5_PASSWORD.into()),
        auth: AuthMethod::Md5,
        admin: false,
    });
    config
}

/// Starts pgvigil with `test_config(cluster)` changed by `adjust`.
pub async fn start_proxy(cluster: &LocalCluster, adjust: impl FnOnce(&mut Config)) -> TestProxy {
    log_if_asked();
    let mut config = test_config(cluster);
    adjust(&mut config);
    if let Err(e) = config.validate() {
        panic!("test config is invalid: {e}");
    }
    let running = pgvigil::proxy::start(config)
        .await
        .unwrap_or_else(|e| panic!("pgvigil did not start: {e}"));
    let addr = running.local_addr;
    TestProxy { running, addr }
}

/// With `PGVIGIL_TEST_LOG` set (a `tracing` filter such as `pgvigil=debug`), the in-process
/// pgvigil's logs go to the test's output, shown for failing tests.
fn log_if_asked() {
    if let Ok(filter) = std::env::var("PGVIGIL_TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_test_writer()
            .try_init();
    }
}

impl TestProxy {
    /// A libpq connection string to pgvigil.
    pub fn conninfo(&self, user: &str, password: &str, db: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user={user} password={password} dbname={db}",
            self.addr.port()
        )
    }

    /// Connects `app` to database `app` through pgvigil with tokio-postgres.
    pub async fn connect_app(&self) -> Client {
        self.connect(&self.conninfo(APP_USER, APP_PASSWORD, APP_DB))
            .await
            .unwrap_or_else(|e| panic!("could not connect through pgvigil: {e}"))
    }

    /// Connects with a libpq-style connection string; the connection task is spawned.
    pub async fn connect(&self, conninfo: &str) -> Result<Client, tokio_postgres::Error> {
        let (client, connection) = tokio_postgres::connect(conninfo, NoTls).await?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(client)
    }
}
