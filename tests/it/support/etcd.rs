//! Real etcd members (Debian's `etcd-server`) on free loopback ports, each with its own data
//! directory, started and stopped by the test.

use std::path::PathBuf;
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

/// A running etcd cluster; its members are killed and its directory removed on drop.
pub struct TestEtcd {
    dir: PathBuf,
    members: Vec<Member>,
}

impl TestEtcd {
    /// Starts `count` members and waits until the cluster answers.
    pub async fn start(count: usize) -> TestEtcd {
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
        let mut etcd = TestEtcd { dir, members };
        etcd.resume().await;
        etcd
    }

    /// The members' client URLs, for `cluster.etcd.endpoints`.
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("http://127.0.0.1:{}", m.client))
            .collect()
    }

    /// A client of this cluster.
    pub fn client(&self) -> Etcd {
        Etcd::new(&EtcdConfig {
            endpoints: self.endpoints(),
            ..EtcdConfig::default()
        })
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
        for member in self.members.iter_mut().filter(|m| m.child.is_none()) {
            let data = self.dir.join(&member.name);
            std::fs::create_dir_all(&self.dir)
                .unwrap_or_else(|e| panic!("{}: {e}", self.dir.display()));
            let log = std::fs::File::create(self.dir.join(format!("{}.log", member.name)))
                .unwrap_or_else(|e| panic!("etcd log: {e}"));
            let client = format!("http://127.0.0.1:{}", member.client);
            let peer = format!("http://127.0.0.1:{}", member.peer);
            let child = Command::new("etcd")
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

impl Drop for TestEtcd {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
