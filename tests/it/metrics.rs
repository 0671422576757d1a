//! `GET /metrics` as Prometheus scrapes it: parsed with a Prometheus text-format parser after
//! traffic and after a failover, every metric present with a plausible value; the token asked
//! only when `admin.metrics_auth` is set.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use prometheus_parse::{Sample, Scrape, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::auth::STEP;
use crate::failover::{Scene, OLD_PRIMARY, PATIENCE, STANDBYS};
use crate::support::{eventually, start_proxy, test_cluster, APP_DB, APP_USER};

/// The HTTP status code and body of `GET /metrics`, with `authorization` if given.
async fn get_metrics(admin: SocketAddr, authorization: Option<&str>) -> (u16, String) {
    http_get(admin, "/metrics", authorization).await
}

/// The HTTP status code and body of `GET path` on the admin API, with `authorization` if given.
pub(crate) async fn http_get(
    admin: SocketAddr,
    path: &str,
    authorization: Option<&str>,
) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(admin).await.unwrap();
    let auth = authorization.map_or(String::new(), |a| format!("Authorization: {a}\r\n"));
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(STEP, stream.read_to_string(&mut answer))
        .await
        .expect("the admin API answered in time")
        .unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").expect("an HTTP answer");
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {head:?}"));
    (code, body.to_owned())
}

/// `/metrics`, scraped and parsed.
pub(crate) async fn scrape(admin: SocketAddr) -> Scrape {
    let (code, body) = get_metrics(admin, None).await;
    assert_eq!(code, 200, "{body}");
    Scrape::parse(body.lines().map(|l| Ok(l.to_owned()))).expect("the exposition parses")
}

/// Scrapes until `done` holds for the scrape, which it returns; fails after [`PATIENCE`].
async fn scrape_until(admin: SocketAddr, what: &str, done: impl Fn(&Scrape) -> bool) -> Scrape {
    let give_up = Instant::now() + PATIENCE;
    loop {
        let scraped = scrape(admin).await;
        if done(&scraped) {
            return scraped;
        }
        assert!(Instant::now() < give_up, "not within {PATIENCE:?}: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The samples of `metric` whose labels include every pair in `labels`.
fn samples<'a>(
    scrape: &'a Scrape,
    metric: &'a str,
    labels: &'a [(&'a str, &'a str)],
) -> impl Iterator<Item = &'a Sample> + 'a {
    scrape.samples.iter().filter(move |s| {
        s.metric == metric && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v))
    })
}

/// The value of the one counter or gauge `metric` with `labels`; panics if it is absent.
pub(crate) fn value(scrape: &Scrape, metric: &str, labels: &[(&str, &str)]) -> f64 {
    let found: Vec<f64> = samples(scrape, metric, labels)
        .map(|s| match &s.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
            other => panic!("{metric} is not a counter or gauge: {other:?}"),
        })
        .collect();
    match found.as_slice() {
        [v] => *v,
        _ => panic!("{metric}{labels:?}: {} samples: {found:?}", found.len()),
    }
}

/// How many observations the histogram `metric` with `labels` holds (its `+Inf` bucket).
pub(crate) fn observations(scrape: &Scrape, metric: &str, labels: &[(&str, &str)]) -> f64 {
    let sample = samples(scrape, metric, labels)
        .next()
        .unwrap_or_else(|| panic!("no histogram {metric}{labels:?}"));
    match &sample.value {
        Value::Histogram(buckets) => {
            assert!(buckets.len() > 2, "{metric} has no real buckets");
            buckets
                .iter()
                .find(|b| b.less_than.is_infinite())
                .map_or(0.0, |b| b.count)
        }
        other => panic!("{metric} is not a histogram: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_after_traffic_and_after_a_failover_hold_every_metric_with_plausible_values() {
    let mut scene = Scene::start(test_cluster(2), |_| {}).await;
    let admin = scene.proxy.running.admin_addr;
    let names: Vec<String> = scene
        .proxy
        .running
        .proxy
        .config()
        .nodes
        .iter()
        .map(|n| n.name.clone())
        .collect();
    let node = |i: usize| ("node", names[i].as_str());
    let reader = scene.proxy.connect_app().await;
    for _ in 0..20 {
        reader.simple_query("SELECT 1").await.unwrap();
    }

    // Everything settles within a few probes; poll rather than guess how long that takes.
    let first = scrape_until(
        admin,
        "the standbys are probed up with their lag",
        |first| {
            STANDBYS.iter().all(|&s| {
                value(first, "pgvigil_node_up", &[node(s)]) == 1.0
                    && samples(first, "pgvigil_node_replication_lag_bytes", &[node(s)])
                        .next()
                        .is_some()
            })
        },
    )
    .await;
    assert_eq!(value(&first, "pgvigil_build_info", &[]), 1.0);
    assert!(value(&first, "pgvigil_topology_generation", &[]) >= 1.0);
    for counter in [
        "pgvigil_failovers_total",
        "pgvigil_switchovers_total",
        "pgvigil_failbacks_total",
    ] {
        assert_eq!(value(&first, counter, &[]), 0.0, "{counter}");
    }
    let sessions = ["idle", "active", "waiting"]
        .map(|state| value(&first, "pgvigil_client_connections", &[("state", state)]));
    assert!(sessions.iter().sum::<f64>() >= 2.0, "{sessions:?}");
    assert_eq!(
        value(&first, "pgvigil_node_is_primary", &[node(OLD_PRIMARY)]),
        1.0
    );
    for i in 0..names.len() {
        assert_eq!(value(&first, "pgvigil_node_timeline", &[node(i)]), 1.0);
        assert!(observations(&first, "pgvigil_probe_duration_seconds", &[node(i)]) >= 1.0);
        assert_eq!(
            value(&first, "pgvigil_probe_failures_total", &[node(i)]),
            0.0
        );
        let lag = value(&first, "pgvigil_node_replay_lag_seconds", &[node(i)]);
        assert!((0.0..60.0).contains(&lag), "replay lag {lag}");
        for state in ["idle", "active"] {
            value(
                &first,
                "pgvigil_server_connections",
                &[node(i), ("state", state)],
            );
        }
    }
    for &s in &STANDBYS {
        assert_eq!(value(&first, "pgvigil_node_is_primary", &[node(s)]), 0.0);
    }
    let writes = value(
        &first,
        "pgvigil_units_total",
        &[node(OLD_PRIMARY), ("kind", "write")],
    );
    assert!(writes >= 1.0, "the writer's units: {writes}");
    let reads: f64 = (0..names.len())
        .map(|i| value(&first, "pgvigil_units_total", &[node(i), ("kind", "read")]))
        .sum();
    assert!(reads >= 20.0, "20 reads counted as {reads}");
    let timed: f64 = (0..names.len())
        .map(|i| observations(&first, "pgvigil_unit_duration_seconds", &[node(i)]))
        .sum();
    assert!(timed >= writes + 20.0, "{timed} units timed");
    let open: f64 = (0..names.len())
        .flat_map(|i| {
            ["idle", "active"].map(|state| {
                value(
                    &first,
                    "pgvigil_server_connections",
                    &[node(i), ("state", state)],
                )
            })
        })
        .sum();
    assert!(open >= 1.0, "{open} server connections");

    let wrong = scene
        .proxy
        .connect(&scene.proxy.conninfo(APP_USER, "not-the-password", APP_DB))
        .await;
    assert!(wrong.is_err(), "a wrong password was let in");
    let refused = scrape(admin).await;
    assert_eq!(
        value(
            &refused,
            "pgvigil_rejected_clients_total",
            &[("reason", "authentication")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &refused,
            "pgvigil_rejected_clients_total",
            &[("reason", "too_many_clients")]
        ),
        0.0
    );

    let kill = scene.kill(OLD_PRIMARY);
    scene.writes_resume(kill, "kill -9 under a scraped pgvigil");
    let new = scene.sole_primary(&STANDBYS);
    let after = scrape_until(admin, "the failover shows in the metrics", |after| {
        value(after, "pgvigil_failovers_total", &[]) == 1.0
            && value(after, "pgvigil_node_is_primary", &[node(new)]) == 1.0
    })
    .await;
    assert_eq!(value(&after, "pgvigil_node_up", &[node(OLD_PRIMARY)]), 0.0);
    assert_eq!(
        value(&after, "pgvigil_node_is_primary", &[node(OLD_PRIMARY)]),
        0.0
    );
    assert!(value(&after, "pgvigil_probe_failures_total", &[node(OLD_PRIMARY)]) >= 1.0);
    for phase in ["decide", "promote"] {
        let took = value(
            &after,
            "pgvigil_last_failover_phase_seconds",
            &[("phase", phase)],
        );
        assert!((0.0..30.0).contains(&took), "{phase} took {took}");
    }
    let promote = value(
        &after,
        "pgvigil_last_failover_phase_seconds",
        &[("phase", "promote")],
    );
    assert!(promote > 0.0, "promotion took {promote}");
    assert_eq!(value(&after, "pgvigil_node_timeline", &[node(new)]), 2.0);
    assert!(
        value(&after, "pgvigil_topology_generation", &[])
            > value(&first, "pgvigil_topology_generation", &[])
    );
    // Every metric the Grafana dashboard queries is exported.
    let dashboard = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/grafana-dashboard.json"),
    )
    .unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&dashboard).unwrap();
    let queried: Vec<String> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap())
        .flat_map(|t| {
            let expr = t["expr"].as_str().unwrap();
            expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|w| w.starts_with("pgvigil_"))
                .map(|w| w.trim_end_matches("_bucket").to_owned())
                .collect::<Vec<_>>()
        })
        .collect();
    assert!(queried.len() >= 10, "{queried:?}");
    for name in &queried {
        assert!(
            after.samples.iter().any(|s| &s.metric == name),
            "the dashboard queries {name}, which is not exported"
        );
    }
    scrape_until(
        admin,
        "the writer's units are counted on the new primary",
        |now| value(now, "pgvigil_units_total", &[node(new), ("kind", "write")]) >= 1.0,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_ask_for_the_token_only_with_metrics_auth() {
    const TOKEN: &str = "metrics-test-token";
    let cluster = test_cluster(0);
    for (metrics_auth, without) in [(false, 200), (true, 401)] {
        let proxy = start_proxy(&cluster, |config| {
            config.admin.token = Some(TOKEN.into());
            config.admin.metrics_auth = metrics_auth;
        })
        .await;
        let admin = proxy.running.admin_addr;
        let (code, _) = get_metrics(admin, None).await;
        assert_eq!(code, without, "metrics_auth = {metrics_auth}");
        let (code, body) = get_metrics(admin, Some(&format!("Bearer {TOKEN}"))).await;
        assert_eq!(code, 200);
        assert!(
            Scrape::parse(body.lines().map(|l| Ok(l.to_owned())))
                .unwrap()
                .samples
                .iter()
                .any(|s| s.metric == "pgvigil_build_info"),
            "{body}"
        );
        proxy.running.shutdown().await;
    }
}

/// Client connections by state, pool waits, bytes per node and the paused gauge, from one
/// proxy whose pools hold one connection per node, lent per transaction.
#[tokio::test(flavor = "multi_thread")]
async fn client_states_pool_waits_and_bytes_are_exported() {
    let cluster = test_cluster(0);
    let proxy = start_proxy(&cluster, |c| {
        c.pool.max_size = 1;
        c.pool.mode = pgvigil::config::PoolMode::Transaction;
    })
    .await;
    let admin = proxy.running.admin_addr;
    let holder = proxy.connect_app().await;
    holder
        .batch_execute("CREATE TABLE IF NOT EXISTS metrics_wait (n int); BEGIN; INSERT INTO metrics_wait VALUES (1)")
        .await
        .unwrap();

    // A second client needs the one connection, held by the open transaction: it waits.
    let waiter = tokio::spawn({
        let conninfo = proxy.conninfo(APP_USER, crate::support::APP_PASSWORD, APP_DB);
        async move {
            let (client, connection) =
                tokio_postgres::connect(&conninfo, tokio_postgres::NoTls).await?;
            tokio::spawn(connection);
            client.simple_query("SELECT 1").await.map(|_| ())
        }
    });
    // The second one is logging in or, logged in, waits for the connection in its first
    // checkout (idle: no unit of its own has begun).
    let during = scrape_until(admin, "a client in a transaction, another one", |s| {
        let state = |state| value(s, "pgvigil_client_connections", &[("state", state)]);
        state("active") == 1.0 && state("login") + state("idle") + state("waiting") == 1.0
    })
    .await;
    assert_eq!(value(&during, "pgvigil_paused", &[]), 0.0);
    // Still logging in, it has not asked for the connection yet: committing then would leave
    // it nothing to wait for.
    eventually(
        PATIENCE,
        "the second client waits for the connection",
        || !proxy.running.proxy.pools.max_waits(0).is_empty(),
    );
    holder.batch_execute("COMMIT").await.unwrap();
    tokio::time::timeout(PATIENCE, waiter)
        .await
        .expect("the waiting client was served")
        .unwrap()
        .unwrap();

    let after = scrape_until(admin, "the wait is counted", |s| {
        value(s, "pgvigil_pool_waits_total", &[("node", "pg1")]) >= 1.0
    })
    .await;
    assert!(observations(&after, "pgvigil_pool_wait_seconds", &[("node", "pg1")]) >= 1.0);
    // SHOW STATS' total_wait_time has the wait too.
    assert!(proxy.running.proxy.pools.wait_us(0) > 0);
    assert!(
        value(
            &after,
            "pgvigil_client_received_bytes_total",
            &[("node", "pg1")]
        ) > 0.0
    );
    assert!(
        value(
            &after,
            "pgvigil_client_sent_bytes_total",
            &[("node", "pg1")]
        ) > 0.0
    );
    // The waiter's client closes as its task ends; pgvigil sees that a moment later.
    scrape_until(admin, "the holder alone, idle after its commit", |s| {
        value(s, "pgvigil_client_connections", &[("state", "idle")]) == 1.0
    })
    .await;

    // Paused, a new statement waits and shows as such.
    proxy.running.proxy.pause.pause();
    let held = tokio::spawn(async move { holder.simple_query("SELECT 1").await.map(|_| ()) });
    let paused = scrape_until(admin, "a waiting client", |s| {
        value(s, "pgvigil_client_connections", &[("state", "waiting")]) == 1.0
    })
    .await;
    assert_eq!(value(&paused, "pgvigil_paused", &[]), 1.0);
    proxy.running.proxy.pause.resume();
    tokio::time::timeout(PATIENCE, held)
        .await
        .expect("the held statement ran after resume")
        .unwrap()
        .unwrap();
}
