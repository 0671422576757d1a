//! Real etcd members (Debian's `etcd-server`) on free loopback ports, each with its own data
//! directory, started and stopped by the test.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use pgvigil::cluster::etcd::Etcd;
use pgvigil::config::EtcdConfig;

use super::fresh_base_dir;

/// How long etcd gets to elect its own leader and answer.
const READY: Duration = Duration::from_secs(30);

/// One etcd member.
struct Member {
    name: String,
    client: u16,
    peer: u16,
    child: Option<Child>,
}

/// How clients reach the members.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Clients {
    /// Plain HTTP.
    Plain,
    /// HTTPS with the test certificate (tests/fixtures/tls).
    Tls,
    /// HTTPS, and clients must show a certificate the test CA signed (`--client-cert-auth`).
    MutualTls,
}

/// A running etcd cluster; its members are killed and its directory removed on drop.
pub struct TestEtcd {
    dir: PathBuf,
    members: Vec<Member>,
    clients: Clients,
}

impl TestEtcd {
    /// Starts `count` members and waits until the cluster answers.
    pub async fn start(count: usize) -> TestEtcd {
        TestEtcd::start_with(count, Clients::Plain).await
    }

    /// Starts `count` members whose clients connect as `clients` says, and waits until the
    /// cluster answers.
    pub async fn start_with(count: usize, clients: Clients) -> TestEtcd {
        let dir = fresh_base_dir().with_extension("etcd");
        let port =
            || pgvigil::local_cluster::free_port().unwrap_or_else(|e| panic!("no free port: {e}"));
        let members = (0..count)
            .map(|i| Member {
                name: format!("e{i}"),
                client: port(),
                peer: port(),
                child: None,
            })
            .collect();
        let mut etcd = TestEtcd {
            dir,
            members,
            clients,
        };
        etcd.resume().await;
        etcd
    }

    /// The members' client URLs, for `cluster.etcd.endpoints`.
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("{}://127.0.0.1:{}", self.scheme(), m.client))
            .collect()
    }

    /// `[cluster.etcd]` for a client of this cluster (TLS files included).
    pub fn config(&self) -> EtcdConfig {
        let tls = self.clients != Clients::Plain;
        let mutual = self.clients == Clients::MutualTls;
        EtcdConfig {
            endpoints: self.endpoints(),
            ca_file: tls.then(|| fixture("cert.pem")),
            cert_file: mutual.then(|| fixture("cert.pem")),
            key_file: mutual.then(|| fixture("key.pem")),
            ..EtcdConfig::default()
        }
    }

    /// A client of this cluster.
    pub fn client(&self) -> Etcd {
        Etcd::new(&self.config())
    }

    /// Kills every member (their data stays for [`TestEtcd::resume`]).
    pub fn stop(&mut self) {
        for member in &mut self.members {
            if let Some(mut child) = member.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }

    /// Starts every stopped member on its data directory and waits until the cluster answers.
    pub async fn resume(&mut self) {
        let cluster = self
            .members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer))
            .collect::<Vec<_>>()
            .join(",");
        let (scheme, clients) = (self.scheme(), self.clients);
        for member in self.members.iter_mut().filter(|m| m.child.is_none()) {
            let data = self.dir.join(&member.name);
            std::fs::create_dir_all(&self.dir)
                .unwrap_or_else(|e| panic!("{}: {e}", self.dir.display()));
            let log = std::fs::File::create(self.dir.join(format!("{}.log", member.name)))
                .unwrap_or_else(|e| panic!("etcd log: {e}"));
            let client = format!("{scheme}://127.0.0.1:{}", member.client);
            let peer = format!("http://127.0.0.1:{}", member.peer);
            let mut etcd = Command::new("etcd");
            if clients != Clients::Plain {
                etcd.arg("--cert-file")
                    .arg(fixture("cert.pem"))
                    .arg("--key-file")
                    .arg(fixture("key.pem"));
            }
            if clients == Clients::MutualTls {
                etcd.arg("--client-cert-auth")
                    .arg("--trusted-ca-file")
                    .arg(fixture("cert.pem"));
            }
            let child = etcd
                .arg("--name")
                .arg(&member.name)
                .arg("--data-dir")
                .arg(&data)
                .args(["--listen-client-urls", &client])
                .args(["--advertise-client-urls", &client])
                .args(["--listen-peer-urls", &peer])
                .args(["--initial-advertise-peer-urls", &peer])
                .args(["--initial-cluster", &cluster])
                .args(["--initial-cluster-token", &self.dir.to_string_lossy()])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| {
                    panic!("could not start etcd (apt-get install etcd-server): {e}")
                });
            member.child = Some(child);
        }
        let client = self.client();
        let give_up = tokio::time::Instant::now() + READY;
        while let Err(e) = client.get("/ready").await {
            assert!(
                tokio::time::Instant::now() < give_up,
                "etcd did not answer within {READY:?}: {e} (logs in {})",
                self.dir.display()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl TestEtcd {
    fn scheme(&self) -> &'static str {
        match self.clients {
            Clients::Plain => "http",
            Clients::Tls | Clients::MutualTls => "https",
        }
    }
}

/// A file of the test certificate (for `localhost` and 127.0.0.1, self-signed).
fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tls")
        .join(name)
}

impl Drop for TestEtcd {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
