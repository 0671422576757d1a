//! The admin API and CLI as an operator uses them: the real `pgvigil` binary (`status`, `promote`,
//! `attach`, `detach`, `unfence`, with `--json`) against pgvigil in front of a real cluster. Exit
//! codes: 0 done, 1 refused (with the reason and what to do next), 2 usage, 3 unreachable.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::process::Stdio;
use std::time::{Duration, Instant};

use pgvigil::admin::api::{Done, Refusal, Status};
use pgvigil::config::{Config, TOKEN_ENV};
use pgvigil::topology::{NodeId, Primary, Role};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::auth::STEP;
use crate::cli::{listening_port, pgvigil, TempConfig};
use crate::failover::{fast_health, other_standby, Scene, OLD_PRIMARY, PATIENCE, STANDBYS};
use crate::failover_safety::{promote_signal_file, signal, startup_process};
use crate::routing::until;
use crate::support::{
    eventually, in_recovery, node_psql, start_proxy, test_cluster, LocalCluster, TestProxy,
};

/// The token the tests that need one set.
const TOKEN: &str = "admin-test-token";

/// What one CLI run printed and its exit code.
pub(crate) struct Run {
    pub(crate) code: Option<i32>,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
}

impl Run {
    /// The JSON on stdout as `T`; panics with the whole output otherwise.
    pub(crate) fn json<T: serde::de::DeserializeOwned>(&self) -> T {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "not the expected JSON ({e}): exit {:?}\nstdout: {}\nstderr: {}",
                self.code, self.stdout, self.stderr
            )
        })
    }

    /// Checks the exit code, showing the output when it differs.
    pub(crate) fn exits(&self, code: i32) -> &Run {
        assert_eq!(
            self.code,
            Some(code),
            "stdout: {}\nstderr: {}",
            self.stdout,
            self.stderr
        );
        self
    }

    /// Checks that this is a refusal (exit 1) with a reason and a next step; returns it.
    pub(crate) fn refusal(&self) -> Refusal {
        self.exits(1);
        let refusal: Refusal = self.json();
        assert!(!refusal.refused.is_empty() && !refusal.next.is_empty());
        refusal
    }
}

/// Runs the real binary with `args` against the admin API at `admin`, with `token` in the
/// environment if given.
pub(crate) async fn cli(admin: SocketAddr, token: Option<&str>, args: &[&str]) -> Run {
    let url = format!("http://{admin}");
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["--admin", &url]);
    let mut command = pgvigil(&all);
    command.env_remove(TOKEN_ENV).env_remove("PGVIGIL_ADMIN");
    if let Some(token) = token {
        command.env(TOKEN_ENV, token);
    }
    let output = tokio::time::timeout(STEP, command.output())
        .await
        .expect("the CLI did not exit in time")
        .expect("the CLI runs");
    Run {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// The HTTP status line's code for a bare request (`authorization` header line included if
/// given), read from the socket.
async fn http_code(admin: SocketAddr, request_line: &str, authorization: Option<&str>) -> u16 {
    let mut stream = tokio::net::TcpStream::connect(admin).await.unwrap();
    let auth = authorization.map_or(String::new(), |a| format!("Authorization: {a}\r\n"));
    let request = format!("{request_line}\r\nHost: x\r\n{auth}Connection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(STEP, stream.read_to_string(&mut answer))
        .await
        .expect("the admin API answered in time")
        .unwrap();
    answer
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {answer:?}"))
}

fn role(proxy: &TestProxy, node: NodeId) -> Role {
    proxy.running.proxy.topology.load().nodes[node].role
}

/// The ports that serve `SELECT inet_server_port()` over `reads` reads through pgvigil.
pub(crate) async fn read_ports(proxy: &TestProxy, reads: usize) -> HashSet<u16> {
    let client = proxy.connect_app().await;
    let mut ports = HashSet::new();
    for _ in 0..reads {
        let row = client
            .query_one("SELECT inet_server_port()", &[])
            .await
            .unwrap();
        ports.insert(u16::try_from(row.get::<_, i32>(0)).unwrap());
    }
    ports
}

/// Waits until pgvigil has a primary and every node is probed as a primary or standby.
async fn settled(proxy: &TestProxy) {
    until("pgvigil sees the primary and both standbys", || async {
        let topology = proxy.running.proxy.topology.load();
        matches!(topology.primary, Primary::Known(_))
            && topology
                .nodes
                .iter()
                .all(|n| matches!(n.role, Role::Primary | Role::Standby))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn without_the_token_or_with_a_wrong_one_the_api_answers_401_and_nothing_changes() {
    let cluster = test_cluster(1);
    let proxy = start_proxy(&cluster, |config| {
        config.admin.token = Some(TOKEN.into());
    })
    .await;
    settled(&proxy).await;
    let admin = proxy.running.admin_addr;

    for authorization in [None, Some("Bearer wrong"), Some(TOKEN)] {
        for request in ["GET /status HTTP/1.1", "POST /nodes/pg2/detach HTTP/1.1"] {
            assert_eq!(http_code(admin, request, authorization).await, 401);
        }
    }
    for token in [None, Some("wrong")] {
        let refusal = cli(admin, token, &["detach", "pg2", "--json"])
            .await
            .refusal();
        assert!(refusal.refused.contains("token"), "{refusal:?}");
        cli(admin, token, &["status", "--json"]).await.refusal();
    }
    assert_eq!(
        role(&proxy, 1),
        Role::Standby,
        "a refused detach changed the node"
    );

    assert_eq!(
        http_code(
            admin,
            "GET /status HTTP/1.1",
            Some(&format!("Bearer {TOKEN}"))
        )
        .await,
        200
    );
    let file = TempConfig::new(&format!("{TOKEN}\n"));
    let path = file.path().to_str().unwrap();
    let done: Done = cli(
        admin,
        None,
        &["detach", "pg2", "--json", "--token-file", path],
    )
    .await
    .exits(0)
    .json();
    assert!(done.message.contains("detached"), "{done:?}");
    assert_eq!(role(&proxy, 1), Role::Detached);
}

/// A configuration whose admin API listens on every address, the node being unreachable (the
/// start is refused before any node matters).
fn open_admin_config() -> String {
    let config = Config {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        admin: pgvigil::config::AdminConfig {
            listen: SocketAddr::from(([0, 0, 0, 0], 0)),
            ..Default::default()
        },
        nodes: vec![pgvigil::config::NodeConfig {
            name: "pg1".into(),
            host: "127.0.0.1".into(),
            port: 1,
            ..Default::default()
        }],
        users: vec![pgvigil::config::UserConfig {
            name: "app".into(),
            password: Some("app-secret".into()),
            auth: pgvigil::config::AuthMethod::ScramSha256,
            admin: false,
        }],
        ..Config::default()
    };
    toml::to_string(&config).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_admin_api_beyond_loopback_without_a_token_is_refused_at_start() {
    let file = TempConfig::new(&open_admin_config());
    let path = file.path().to_str().unwrap();
    let mut serve = pgvigil(&["serve", "--config", path]);
    serve.env_remove(TOKEN_ENV);
    let output = tokio::time::timeout(STEP, serve.output())
        .await
        .expect("pgvigil exits at once")
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("admin.listen") && stderr.contains("PGVIGIL_ADMIN_TOKEN"),
        "{stderr}"
    );

    // The same file with the token in the environment starts.
    let mut child = pgvigil(&["serve", "--config", path])
        .env(TOKEN_ENV, TOKEN)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    listening_port(&mut child).await;
    child.kill().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn every_verb_answers_json_with_its_exit_code_and_detach_takes_a_node_out_of_reads_and_candidacy(
) {
    let cluster = test_cluster(2);
    let proxy = start_proxy(&cluster, fast_health).await;
    settled(&proxy).await;
    let admin = proxy.running.admin_addr;
    let port = |node: NodeId| cluster.node(node).port;

    let status: Status = cli(admin, None, &["status", "--json"])
        .await
        .exits(0)
        .json();
    assert_eq!(status.primary.as_deref(), Some("pg1"));
    let names: Vec<&str> = status.nodes.iter().map(|n| n.name.as_str()).collect();
    assert_eq!(names, ["pg1", "pg2", "pg3"]);
    assert_eq!(
        status.generation,
        proxy.running.proxy.topology.load().generation
    );
    for node in &status.nodes {
        assert_eq!(node.health, "up", "{node:?}");
        assert!(node.timeline.is_some() && node.lsn.is_some(), "{node:?}");
        assert!(node.fenced.is_none() && !node.detached, "{node:?}");
    }
    assert!(status.nodes[1].received.is_some() && status.nodes[1].lag_bytes.is_some());
    let table = cli(admin, None, &["status"]).await;
    table.exits(0);
    assert!(
        table.stdout.contains("NODE") && table.stdout.contains("pg3"),
        "{}",
        table.stdout
    );

    // Five detaches at once: the coordinator takes them one by one, so exactly one does it.
    let runs = futures_util::future::join_all(
        (0..5).map(|_| cli(admin, None, &["detach", "pg2", "--json"])),
    )
    .await;
    let codes: Vec<Option<i32>> = runs.iter().map(|r| r.code).collect();
    assert_eq!(
        codes.iter().filter(|&&c| c == Some(0)).count(),
        1,
        "{codes:?}"
    );
    for run in runs.iter().filter(|r| r.code != Some(0)) {
        assert!(run.refusal().refused.contains("already detached"));
    }
    assert_eq!(role(&proxy, 1), Role::Detached);
    let ports = read_ports(&proxy, 30).await;
    assert!(
        !ports.contains(&port(1)),
        "a detached node served reads: {ports:?}"
    );
    let dry: Done = cli(admin, None, &["promote", "pg2", "--dry-run", "--json"])
        .await
        .exits(0)
        .json();
    let dry_run = dry.dry_run.expect("a dry run says what it weighed");
    assert_eq!(dry_run.candidate.as_deref(), Some("pg3"), "{dry_run:?}");
    assert_eq!(dry_run.standbys[0].excluded.as_deref(), Some("detached"));
    let human = cli(admin, None, &["promote", "pg3", "--dry-run"]).await;
    assert!(human.exits(0).stdout.contains("failover would promote pg3"));

    let done: Done = cli(admin, None, &["attach", "pg2", "--json"])
        .await
        .exits(0)
        .json();
    assert!(done.message.contains("attached"));
    until("reads reach the attached node again", || async {
        read_ports(&proxy, 10).await.contains(&port(1))
    })
    .await;
    cli(admin, None, &["attach", "pg2", "--json"])
        .await
        .refusal();

    // Refusals, each with a reason and a next step.
    let not_fenced = cli(admin, None, &["unfence", "pg3", "--json"])
        .await
        .refusal();
    assert!(not_fenced.refused.contains("not fenced"));
    let healthy = cli(admin, None, &["promote", "pg2", "--json"])
        .await
        .refusal();
    assert!(healthy.refused.contains("no node control"), "{healthy:?}");
    let primary = cli(admin, None, &["detach", "pg1", "--json"])
        .await
        .refusal();
    assert!(primary.refused.contains("primary"), "{primary:?}");
    let unknown = cli(admin, None, &["attach", "pg9", "--json"])
        .await
        .refusal();
    assert!(unknown.next.contains("pg1, pg2, pg3"), "{unknown:?}");
    assert!(in_recovery(&cluster, 1) && in_recovery(&cluster, 2));

    // Usage errors exit 2; no pgvigil at the address exits 3.
    cli(admin, None, &["promote"]).await.exits(2);
    cli(admin, None, &["detach", "pg2", "--bogus"])
        .await
        .exits(2);
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let gone = cli(closed, None, &["status", "--json"]).await;
    gone.exits(3);
    assert!(gone.stderr.contains("cannot reach"), "{}", gone.stderr);
}

/// Waits until both standbys have received and replayed all the WAL the primary has written.
fn standbys_caught_up(cluster: &LocalCluster) {
    eventually(PATIENCE, "both standbys hold all the primary's WAL", || {
        let primary = node_psql(cluster, 0, "SELECT pg_current_wal_lsn()");
        (1..=2).all(|n| {
            node_psql(
                cluster,
                n,
                "SELECT pg_last_wal_receive_lsn() || ' ' || pg_last_wal_replay_lsn()",
            ) == format!("{primary} {primary}")
        })
    });
}

#[tokio::test(flavor = "multi_thread")]
async fn promote_dry_run_names_the_standby_the_next_failover_promotes_and_unfence_clears_its_fence()
{
    let mut cluster = test_cluster(2);
    // Without writes both standbys hold the same WAL: the priority decides, against the
    // configuration order, so a dry run that ignored it would name the wrong node.
    let proxy = start_proxy(&cluster, |config| {
        fast_health(config);
        config.nodes[2].priority = 10;
    })
    .await;
    settled(&proxy).await;
    let admin = proxy.running.admin_addr;
    // On a loaded machine one standby may not have received the primary's last background WAL
    // yet (it would then rightly lose against the other, whatever the priority).
    standbys_caught_up(&cluster);
    let dry: Done = cli(admin, None, &["promote", "pg2", "--dry-run", "--json"])
        .await
        .exits(0)
        .json();
    let dry_run = dry.dry_run.unwrap();
    println!("dry run: {dry_run:?}");
    assert_eq!(dry_run.primary, "pg1");
    let candidate = dry_run.candidate.expect("a candidate");
    assert_eq!(candidate, "pg3");
    assert_eq!(dry_run.standbys[1].priority, 10);
    assert!(dry.message.contains("not pg2"), "{}", dry.message);
    assert!(
        in_recovery(&cluster, 1) && in_recovery(&cluster, 2),
        "a dry run promoted"
    );

    standbys_caught_up(&cluster);
    cluster.node_mut(OLD_PRIMARY).kill9();
    eventually(
        PATIENCE,
        "the failover promotes a standby",
        || matches!(proxy.running.proxy.topology.load().primary, Primary::Known(n) if n != OLD_PRIMARY),
    );
    assert_eq!(
        proxy.running.proxy.topology.load().primary,
        Primary::Known(2),
        "failover promoted another node than the dry run named"
    );
    assert!(!in_recovery(&cluster, 2) && in_recovery(&cluster, 1));

    let status: Status = cli(admin, None, &["status", "--json"])
        .await
        .exits(0)
        .json();
    let fence = status.nodes[0]
        .fenced
        .clone()
        .expect("the old primary is fenced");
    assert!(fence.contains("pg3 was promoted"), "{fence}");
    assert!(status.events.iter().any(|e| e.message.contains("promoted")));
    let done: Done = cli(admin, None, &["unfence", "pg1", "--json"])
        .await
        .exits(0)
        .json();
    assert!(done.message.contains("unfenced"), "{done:?}");
    let status: Status = cli(admin, None, &["status", "--json"])
        .await
        .exits(0)
        .json();
    assert_eq!(status.nodes[0].fenced, None);
    assert_eq!(status.nodes[0].role, "down");

    // Back as it was (primary on the old timeline), it is fenced again; unfence then refuses.
    cluster.node_mut(OLD_PRIMARY).start().unwrap();
    eventually(
        PATIENCE,
        "the restarted old primary is fenced again",
        || role(&proxy, OLD_PRIMARY) == Role::Fenced,
    );
    // Once the fence is applied, probes see the node read-only, no longer a writable primary;
    // unfence must judge by its timeline all the same.
    eventually(PATIENCE, "the fence is applied", || {
        node_psql(&cluster, OLD_PRIMARY, "SHOW default_transaction_read_only") == "on"
    });
    let probes = probes_of(admin, "pg1").await;
    until("two more probes of pg1", || async {
        probes_of(admin, "pg1").await >= probes + 2.0
    })
    .await;
    let again = cli(admin, None, &["unfence", "pg1", "--json"])
        .await
        .refusal();
    assert!(again.refused.contains("fenced again"), "{again:?}");
    assert_eq!(role(&proxy, OLD_PRIMARY), Role::Fenced);
}

/// How many probes of `node` pgvigil has timed so far (`pgvigil_probe_duration_seconds`).
async fn probes_of(admin: SocketAddr, node: &str) -> f64 {
    let scraped = crate::metrics::scrape(admin).await;
    crate::metrics::observations(
        &scraped,
        "pgvigil_probe_duration_seconds",
        &[("node", node)],
    )
}

/// Whether some TCP connection to loopback port `port` is established (the CLI's, in the
/// test below: nothing else talks to that admin API).
fn connected_to(port: u16) -> bool {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    let remote = format!(":{port:04X}");
    table.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.len() > 3 && fields[2].ends_with(&remote) && fields[3] == "01"
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn a_command_sent_during_a_promotion_waits_for_the_step_and_is_refused_while_it_is_pending() {
    let promote_timeout = Duration::from_secs(8);
    let mut scene = Scene::start(test_cluster(2), |config| {
        config.failover.promote_timeout = promote_timeout;
    })
    .await;
    let admin = scene.proxy.running.admin_addr;
    let startups: Vec<u32> = STANDBYS
        .iter()
        .map(|&n| startup_process(&scene.cluster, n))
        .collect();
    for &pid in &startups {
        signal("-STOP", pid);
    }
    scene.kill(OLD_PRIMARY);
    let mut asked = None;
    eventually(PATIENCE, "pgvigil asks a standby to promote", || {
        asked = STANDBYS
            .into_iter()
            .find(|&n| promote_signal_file(&scene.cluster.node(n).data_dir));
        asked.is_some()
    });
    let asked_at = Instant::now();
    let asked = asked.unwrap();
    let other = other_standby(asked);
    let other_name = format!("pg{}", other + 1);

    // The coordinator is inside the promotion step (the standby cannot act on the request):
    // the command waits for the step, then is refused since the promotion is still pending.
    let url = format!("http://{admin}");
    let waiting = pgvigil(&["detach", &other_name, "--json", "--admin", &url])
        .env_remove(TOKEN_ENV)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    eventually(PATIENCE, "the CLI connects to the admin API", || {
        connected_to(admin.port())
    });
    let output = tokio::time::timeout(STEP, waiting.wait_with_output())
        .await
        .expect("the command is answered once the promotion step ends")
        .unwrap();
    let answered = asked_at.elapsed();
    println!("command answered {answered:?} after the promote request");
    assert!(
        answered >= promote_timeout - Duration::from_secs(1),
        "answered after {answered:?}, while the promotion step ran"
    );
    assert_eq!(output.status.code(), Some(1));
    let refusal: Refusal = serde_json::from_slice(&output.stdout).unwrap();
    assert!(
        refusal.refused.contains("failover is in progress"),
        "{refusal:?}"
    );
    assert!(refusal.next.contains("wait"), "{refusal:?}");
    assert_eq!(role(&scene.proxy, other), Role::Standby);

    for &pid in &startups {
        signal("-CONT", pid);
    }
    eventually(PATIENCE, "the pending promotion finishes", || {
        scene.proxy.running.proxy.topology.load().primary == Primary::Known(asked)
    });
    cli(admin, None, &["detach", &other_name, "--json"])
        .await
        .exits(0);
    assert_eq!(role(&scene.proxy, other), Role::Detached);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_detached_node_stays_detached_when_pgvigil_restarts() {
    let cluster = test_cluster(1);
    let proxy = start_proxy(&cluster, fast_health).await;
    settled(&proxy).await;
    cli(proxy.running.admin_addr, None, &["detach", "pg2", "--json"])
        .await
        .exits(0);
    proxy.running.shutdown().await;

    let proxy = start_proxy(&cluster, fast_health).await;
    until("the restarted pgvigil sees the primary", || async {
        matches!(
            proxy.running.proxy.topology.load().primary,
            Primary::Known(0)
        )
    })
    .await;
    until("pg2 is shown detached", || async {
        role(&proxy, 1) == Role::Detached
    })
    .await;
    let ports = read_ports(&proxy, 10).await;
    assert!(!ports.contains(&cluster.node(1).port), "{ports:?}");
    cli(proxy.running.admin_addr, None, &["attach", "pg2", "--json"])
        .await
        .exits(0);
}
