//! The routing rules of issue 3 (section 2) and their debug log, as a client observes them through
//! pgvigil in front of a primary and two streaming replicas: every statement reports the node that
//! ran it with `inet_server_port()`. Outside a transaction reads spread and everything else runs on
//! the primary; a transaction runs on one node, a replica only when it is read-only; prepared
//! statements follow the session from node to node; session settings reach every node; pins and
//! hints override the classifier; and each decision is logged with its reason.

use std::future::Future;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use pgvigil::config::{AuthMethod, Balance, Config, PoolMode, PrimaryReads, ReadAffinity};
use pgvigil::topology::{NodeId, Primary, Role};
use pgvigil_proto::encode;
use tokio::io::AsyncBufReadExt;
use tokio_postgres::error::SqlState;
use tokio_postgres::{
    Client, GenericClient, IsolationLevel, NoTls, Row, SimpleQueryMessage, SimpleQueryRow,
    Statement,
};

use crate::auth::psql;
use crate::cli::{listening_port, pgvigil, TempConfig};
use crate::support::wire::{bind_execute, close, parse, Wire};
use crate::support::{
    eventually, start_proxy, test_cluster, test_config, LocalCluster, TestProxy, APP_DB,
    APP_PASSWORD, APP_USER,
};

const PRIMARY: NodeId = 0;
const REPLICAS: [NodeId; 2] = [1, 2];
const NODES: usize = 3;

/// Bound on anything the proxy or the nodes must get to, on a loaded 2-core machine.
const PATIENCE: Duration = Duration::from_secs(30);

/// Health probe interval: lag positions, and so read-your-writes, follow within a few rounds.
const PROBE: Duration = Duration::from_millis(200);

/// How often the async waits below look again.
const POLL: Duration = Duration::from_millis(20);

/// The node marker, as a column.
const PORT: &str = "inet_server_port() AS port";

/// The node marker, as a statement.
const WHERE: &str = "SELECT inet_server_port() AS port";

/// The node marker, as what a write returns.
const RETURNING_PORT: &str = "RETURNING inet_server_port() AS port";

/// How many statements of each kind a test sends: a statement wrongly balanced (at random, over
/// three nodes) would stay on the primary all 12 times about once in 500,000 runs.
const TRIES: usize = 12;

/// Reads counted per node.
type PerNode = [usize; NODES];

/// pgvigil (probing every 200 ms) in front of a primary (node 0) and two streaming replicas.
struct Split {
    // Declared first: the proxy stops before the nodes it talks to.
    proxy: TestProxy,
    cluster: LocalCluster,
}

impl Split {
    /// Starts the cluster and the proxy (with random balancing of every read unit, then
    /// `adjust` applied to its config), and returns once a fresh session's reads have reached
    /// both replicas: every test below starts from a proxy that does spread reads, so that "all
    /// on the primary" never holds vacuously.
    async fn start(adjust: impl FnOnce(&mut Config)) -> Split {
        let cluster = test_cluster(2);
        let proxy = start_proxy(&cluster, |config| {
            config.health.interval = PROBE;
            // Random picks: a test's fixed pattern of units cannot fall in step with the turns
            // of a round robin (three units per loop over three nodes would always put the third
            // on the same node).
            config.routing.balance = Balance::Random;
            // Every read unit balanced anew (by default a session's reads stay on one node):
            // the tests below follow one session over every node.
            config.routing.read_affinity = ReadAffinity::Unit;
            adjust(config);
        })
        .await;
        let split = Split { proxy, cluster };
        split.wait_for_positions();
        let client = split.client().await;
        let mut spread = Spread::new("a fresh session");
        while spread.more() {
            spread.add(split.simple_node(&client, WHERE).await);
        }
        split
    }

    /// Waits until the proxy sees node 0 as primary, the others as standbys, and where each is.
    fn wait_for_positions(&self) {
        let proxy = &self.proxy.running.proxy;
        eventually(PATIENCE, "roles and WAL positions of all nodes", || {
            let topology = proxy.topology.load();
            topology.primary == Primary::Known(PRIMARY)
                && REPLICAS
                    .iter()
                    .all(|&r| topology.nodes[r].role == Role::Standby)
                && proxy.replication.load().nodes.iter().all(Option::is_some)
        });
    }

    /// A new session of `app` through pgvigil.
    async fn client(&self) -> Client {
        self.proxy.connect_app().await
    }

    /// A superuser session straight to `node`, on the app database.
    async fn direct(&self, node: NodeId) -> Client {
        let conninfo = format!(
            "host=127.0.0.1 port={} user=postgres dbname={APP_DB}",
            self.cluster.node(node).port
        );
        let (client, connection) = tokio_postgres::connect(&conninfo, NoTls)
            .await
            .unwrap_or_else(|e| panic!("direct connection to node {node}: {e:?}"));
        tokio::spawn(connection);
        client
    }

    /// Runs `sql` through pgvigil in a session of its own, then waits until both replicas have
    /// replayed it.
    async fn setup(&self, sql: &str) {
        self.client()
            .await
            .batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("setup {sql:?}: {e:?}"));
        self.replicated().await;
    }

    /// Waits until every replica has replayed all the primary has written so far.
    async fn replicated(&self) {
        let primary = self.direct(PRIMARY).await;
        let lsn: String = primary
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await
            .unwrap()
            .get(0);
        for node in REPLICAS {
            let replica = &self.direct(node).await;
            let lsn = &lsn;
            until(&format!("node {node} replays up to {lsn}"), || async move {
                replica
                    .query_one(
                        "SELECT pg_last_wal_replay_lsn() >= $1::text::pg_lsn",
                        &[lsn],
                    )
                    .await
                    .unwrap()
                    .get(0)
            })
            .await;
        }
    }

    /// The node listening on `port`.
    fn node_at(&self, port: &str) -> NodeId {
        let port: u16 = port
            .parse()
            .unwrap_or_else(|_| panic!("not a port: {port:?}"));
        self.cluster
            .nodes()
            .iter()
            .position(|n| n.port == port)
            .unwrap_or_else(|| panic!("no node listens on port {port}"))
    }

    /// Runs `sql` with the simple protocol; returns its first row and the node (its `port`
    /// column) that ran it.
    async fn simple(&self, client: &impl GenericClient, sql: &str) -> (SimpleQueryRow, NodeId) {
        let messages = client
            .simple_query(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
        let row = first_row(messages).unwrap_or_else(|| panic!("{sql}: no row"));
        let node = self.node_at(row.get("port").expect("a port column"));
        (row, node)
    }

    /// The node that ran `sql` (simple protocol).
    async fn simple_node(&self, client: &impl GenericClient, sql: &str) -> NodeId {
        self.simple(client, sql).await.1
    }

    /// Runs `sql` with the extended protocol; returns its row and the node that ran it.
    async fn extended(&self, client: &impl GenericClient, sql: &str) -> (Row, NodeId) {
        let row = client
            .query_one(sql, &[])
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
        let node = self.row_node(&row);
        (row, node)
    }

    /// The node named by the `port` column of `row`.
    fn row_node(&self, row: &Row) -> NodeId {
        self.node_at(&row.get::<_, i32>("port").to_string())
    }

    /// The node that ran `sql` (extended protocol).
    async fn extended_node(&self, client: &impl GenericClient, sql: &str) -> NodeId {
        self.extended(client, sql).await.1
    }
}

/// The first data row of a simple-protocol answer.
fn first_row(messages: Vec<SimpleQueryMessage>) -> Option<SimpleQueryRow> {
    messages.into_iter().find_map(|m| match m {
        SimpleQueryMessage::Row(row) => Some(row),
        _ => None,
    })
}

/// Polls `check` until it holds; panics naming `what` after [`PATIENCE`].
pub(crate) async fn until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let give_up = Instant::now() + PATIENCE;
    while !check().await {
        assert!(Instant::now() < give_up, "not within {PATIENCE:?}: {what}");
        tokio::time::sleep(POLL).await;
    }
}

/// A bound on a loop that must reach its goal in [`PATIENCE`].
struct Deadline {
    give_up: Instant,
}

impl Deadline {
    fn start() -> Deadline {
        Deadline {
            give_up: Instant::now() + PATIENCE,
        }
    }

    /// Panics naming `what` once the time is up.
    fn check(&self, what: &str) {
        assert!(
            Instant::now() < self.give_up,
            "not within {PATIENCE:?}: {what}"
        );
    }
}

/// Nodes seen serving reads, until both replicas have been.
struct Spread {
    seen: PerNode,
    deadline: Deadline,
    what: String,
}

impl Spread {
    fn new(what: &str) -> Spread {
        Spread {
            seen: [0; NODES],
            deadline: Deadline::start(),
            what: what.to_owned(),
        }
    }

    /// Whether a replica has yet to be seen; panics once the time is up.
    fn more(&self) -> bool {
        let reached = REPLICAS.iter().all(|&r| self.seen[r] > 0);
        if !reached {
            let what = format!("{}: reads reach both replicas, {:?}", self.what, self.seen);
            self.deadline.check(&what);
        }
        !reached
    }

    fn add(&mut self, node: NodeId) {
        self.seen[node] += 1;
    }
}

/// Panics unless every replica is counted in `seen`.
fn assert_replicas_used(seen: PerNode, what: &str) {
    assert!(
        REPLICAS.iter().all(|&r| seen[r] > 0),
        "{what}: reads per node {seen:?}, expected some on each replica"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn reads_outside_a_transaction_spread_over_the_nodes_by_every_protocol() {
    // The default balance: with one kind of unit per loop, its turns go round all the nodes.
    let split = Split::start(|config| config.routing.balance = Balance::default()).await;
    let client = split.client().await;

    let mut simple = Spread::new("simple protocol");
    while simple.more() {
        simple.add(split.simple_node(&client, WHERE).await);
    }
    // Parse/Describe/Sync of s0, s1, ..., then Bind/Execute/Sync: two units a read.
    let mut extended = Spread::new("extended protocol");
    while extended.more() {
        extended.add(split.extended_node(&client, WHERE).await);
    }
    // psql: a new session per command, each starting on the primary.
    let conninfo = split.proxy.conninfo(APP_USER, APP_PASSWORD, APP_DB);
    let mut by_psql = Spread::new("psql -c");
    while by_psql.more() {
        let port = psql(&conninfo, &["-c", "SELECT inet_server_port()"]).await;
        by_psql.add(split.node_at(&port));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn statements_that_may_write_run_on_the_primary() {
    // Without read-your-writes, a write mistaken for a read would be balanced at once instead of
    // being kept on the primary by the session's previous write.
    let split = Split::start(|config| config.routing.read_your_writes = false).await;
    split
        .setup(
            "CREATE TABLE items (id int PRIMARY KEY, note text);
             INSERT INTO items SELECT g, 'seed' FROM generate_series(1, 1000) AS g;
             CREATE SEQUENCE ticket;
             -- Unknown to the classifier, and it writes.
             CREATE FUNCTION add_item(n int) RETURNS int LANGUAGE sql
                 AS 'INSERT INTO items VALUES (n, ''by function'') RETURNING id';",
        )
        .await;
    let client = split.client().await;

    let mut tickets = Vec::new();
    for i in 0..TRIES {
        // Ids above the seed rows, unique per statement and try.
        let id = 10_000 + i * 10;
        let (row, locked, deleted) = (i + 1, i + 1, i + 501);
        let statements = [
            format!("INSERT INTO items VALUES ({id}, 'insert') {RETURNING_PORT}"),
            format!("UPDATE items SET note = 'update' WHERE id = {row} {RETURNING_PORT}"),
            format!("DELETE FROM items WHERE id = {deleted} {RETURNING_PORT}"),
            "SELECT nextval('ticket') AS n, inet_server_port() AS port".to_owned(),
            format!("SELECT id, {PORT} FROM items WHERE id = {locked} FOR UPDATE"),
            format!("SELECT id, {PORT} FROM items WHERE id = {locked} FOR SHARE"),
            format!(
                "WITH added AS (INSERT INTO items VALUES ({}, 'cte') RETURNING id) \
                 SELECT id, {PORT} FROM added",
                id + 1
            ),
            format!("SELECT add_item({}) AS id, {PORT}", id + 2),
        ];
        for (k, sql) in statements.iter().enumerate() {
            // Alternate the protocols between tries.
            let node = if i % 2 == 0 {
                let (row, node) = split.simple(&client, sql).await;
                if k == 3 {
                    tickets.push(row.get("n").unwrap().parse::<i64>().unwrap());
                }
                node
            } else {
                let (row, node) = split.extended(&client, sql).await;
                if k == 3 {
                    tickets.push(row.get::<_, i64>("n"));
                }
                node
            };
            assert_eq!(node, PRIMARY, "try {i}: {sql}");
        }
    }

    // Where the writes landed: the primary has every row and the sequence's every value.
    let expected: Vec<i64> = (1..=TRIES as i64).collect();
    assert_eq!(tickets, expected);
    let primary = split.direct(PRIMARY).await;
    let count = |note: &'static str| {
        let primary = &primary;
        async move {
            let n: i64 = primary
                .query_one("SELECT count(*) FROM items WHERE note = $1", &[&note])
                .await
                .unwrap()
                .get(0);
            n as usize
        }
    };
    for note in ["insert", "update", "cte", "by function"] {
        assert_eq!(count(note).await, TRIES, "rows noted {note:?}");
    }
    assert_eq!(count("seed").await, 1000 - 2 * TRIES, "seed rows left");
    let last: i64 = primary
        .query_one("SELECT last_value FROM ticket", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(last, TRIES as i64);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_read_write_transaction_runs_wholly_on_the_primary() {
    let split = Split::start(|_| {}).await;
    let mut client = split.client().await;
    for i in 0..TRIES / 2 {
        client.batch_execute("BEGIN").await.unwrap();
        for _ in 0..5 {
            let node = split.simple_node(&client, WHERE).await;
            assert_eq!(node, PRIMARY, "BEGIN #{i}, simple protocol");
        }
        client.batch_execute("COMMIT").await.unwrap();

        let tx = client.transaction().await.unwrap();
        for _ in 0..5 {
            let node = split.extended_node(&tx, WHERE).await;
            assert_eq!(node, PRIMARY, "transaction #{i}, extended protocol");
        }
        tx.commit().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_read_only_transaction_runs_on_one_node_and_may_use_a_replica() {
    let split = Split::start(|_| {}).await;
    let mut client = split.client().await;
    let begins = [
        "BEGIN READ ONLY",
        "START TRANSACTION READ ONLY",
        "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY",
    ];
    for begin in begins {
        let mut used = Spread::new(begin);
        let mut i = 0;
        while used.more() {
            i += 1;
            client.batch_execute(begin).await.unwrap();
            let mut nodes = Vec::new();
            for _ in 0..3 {
                nodes.push(split.simple_node(&client, WHERE).await);
                nodes.push(split.extended_node(&client, WHERE).await);
            }
            client.batch_execute("COMMIT").await.unwrap();
            assert!(
                nodes.iter().all(|&n| n == nodes[0]),
                "{begin} #{i}: statements ran on nodes {nodes:?}"
            );
            used.add(nodes[0]);
        }
    }

    // tokio-postgres's own read-only transactions (START TRANSACTION ISOLATION LEVEL ..., READ
    // ONLY), with every statement through the extended protocol.
    let mut used = Spread::new("build_transaction().read_only(true)");
    let mut i = 0;
    while used.more() {
        i += 1;
        let tx = client
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .unwrap();
        let mut nodes = Vec::new();
        for _ in 0..4 {
            nodes.push(split.extended_node(&tx, WHERE).await);
        }
        tx.commit().await.unwrap();
        assert!(
            nodes.iter().all(|&n| n == nodes[0]),
            "read-only transaction #{i}: statements ran on nodes {nodes:?}"
        );
        used.add(nodes[0]);
    }

    // A standby refuses serializable transactions: those stay on the primary, and succeed.
    for i in 0..TRIES / 2 {
        client
            .batch_execute("BEGIN ISOLATION LEVEL SERIALIZABLE READ ONLY")
            .await
            .unwrap();
        let node = split.simple_node(&client, WHERE).await;
        client.batch_execute("COMMIT").await.unwrap();
        assert_eq!(node, PRIMARY, "serializable read-only transaction #{i}");
    }
}

/// Runs read-only-by-default transactions (plain BEGIN) on `client` until both replicas have
/// served one; checks that each ran wholly on one node, read-only.
async fn plain_begins_reach_replicas(split: &Split, client: &Client, what: &str) {
    let mut used = Spread::new(&format!("{what}, then plain BEGIN"));
    let sql = "SELECT current_setting('transaction_read_only') AS ro, inet_server_port() AS port";
    while used.more() {
        client.batch_execute("BEGIN").await.unwrap();
        let (row, first) = split.simple(client, sql).await;
        assert_eq!(row.get("ro"), Some("on"), "{what}: on node {first}");
        let (row, second) = split.extended(client, sql).await;
        assert_eq!(row.get::<_, &str>("ro"), "on", "{what}: on node {second}");
        client.batch_execute("COMMIT").await.unwrap();
        assert_eq!(first, second, "{what}: one transaction, two nodes");
        used.add(first);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_session_default_of_read_only_lets_a_plain_begin_use_a_replica() {
    let split = Split::start(|_| {}).await;
    split.setup("CREATE TABLE log (n int)").await;

    let client = split.client().await;
    client
        .batch_execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
        .await
        .unwrap();
    plain_begins_reach_replicas(&split, &client, "SET SESSION CHARACTERISTICS").await;

    // Back to read-write: a plain BEGIN is on the primary again, and may write.
    client
        .batch_execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE")
        .await
        .unwrap();
    for i in 0..TRIES / 2 {
        client.batch_execute("BEGIN").await.unwrap();
        let node = split.simple_node(&client, WHERE).await;
        client
            .batch_execute(&format!("INSERT INTO log VALUES ({i})"))
            .await
            .unwrap();
        client.batch_execute("COMMIT").await.unwrap();
        assert_eq!(node, PRIMARY, "read-write BEGIN #{i}");
    }

    // The same default set through the variable.
    let other = split.client().await;
    other
        .batch_execute("SET default_transaction_read_only = on")
        .await
        .unwrap();
    plain_begins_reach_replicas(&split, &other, "SET default_transaction_read_only").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_write_in_a_transaction_runs_on_the_primary_and_is_read_back_at_once() {
    const PAUSED: NodeId = 2;
    let split = Split::start(|_| {}).await;
    split
        .setup("CREATE TABLE notes (id int PRIMARY KEY, body text)")
        .await;
    split
        .cluster
        .psql(PAUSED, "SELECT pg_wal_replay_pause()")
        .unwrap();

    let mut client = split.client().await;
    let read = "SELECT body, inet_server_port() AS port FROM notes WHERE id = $1";
    let mut served = [0; NODES];
    for id in 1..=40 {
        let written = if id % 2 == 0 {
            let tx = client.transaction().await.unwrap();
            let row = tx
                .query_one(
                    "INSERT INTO notes VALUES ($1, 'extended') RETURNING inet_server_port() AS port",
                    &[&id],
                )
                .await
                .unwrap();
            tx.commit().await.unwrap();
            split.row_node(&row)
        } else {
            let sql = format!(
                "BEGIN; INSERT INTO notes VALUES ({id}, 'simple') \
                 RETURNING inet_server_port() AS port; COMMIT"
            );
            split.simple_node(&client, &sql).await
        };
        assert_eq!(written, PRIMARY, "write #{id}");
        let rows = client.query(read, &[&id]).await.unwrap();
        assert_eq!(rows.len(), 1, "read #{id} right after its write");
        served[split.row_node(&rows[0])] += 1;
    }
    assert_eq!(served[PAUSED], 0, "reads per node {served:?}");

    // Once the running replica has replayed them, the session's reads may go there, but never
    // to the paused one.
    let last = "SELECT body, inet_server_port() AS port FROM notes WHERE id = 40";
    until(
        "the session reads its rows from the running replica",
        || {
            let (split, client) = (&split, &client);
            async move {
                let (row, node) = split.simple(client, last).await;
                assert_eq!(row.get("body"), Some("extended"));
                assert_ne!(node, PAUSED, "a read reached the paused replica");
                node == 1
            }
        },
    )
    .await;
    split
        .cluster
        .psql(PAUSED, "SELECT pg_wal_replay_resume()")
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_prepared_statement_runs_on_every_node_the_session_moves_to() {
    let split = Split::start(|_| {}).await;
    let client = split.client().await;

    let doubled = "SELECT $1::int * 2 AS n, inet_server_port() AS port";
    let statement = client.prepare(doubled).await.unwrap();
    let mut served = [0; NODES];
    for n in 0..60 {
        let row = client
            .query_one(&statement, &[&n])
            .await
            .unwrap_or_else(|e| panic!("execution #{n}: {e:?}"));
        assert_eq!(row.get::<_, i32>("n"), 2 * n);
        served[split.row_node(&row)] += 1;
    }
    assert_replicas_used(served, "one statement executed 60 times");

    // Dropping it closes it (Close + Sync); a new one is prepared and moves as well.
    drop(statement);
    let tripled = client
        .prepare("SELECT $1::int * 3 AS n, inet_server_port() AS port")
        .await
        .unwrap();
    let mut served = [0; NODES];
    for n in 0..60 {
        let row = client
            .query_one(&tripled, &[&n])
            .await
            .unwrap_or_else(|e| panic!("execution #{n} of the second statement: {e:?}"));
        assert_eq!(row.get::<_, i32>("n"), 3 * n);
        served[split.row_node(&row)] += 1;
    }
    assert_replicas_used(served, "the second statement");
    let open: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_prepared_statements WHERE statement = $1",
            &[&doubled],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        open, 0,
        "the dropped statement is closed where this read ran"
    );

    // Statements prepared just now, each on the node its Parse was balanced to, run inside
    // transactions on whichever node those run. Each case in a fresh session: after a write
    // (a read-write transaction is one), read your writes would keep every Parse on the primary.
    let mut client = split.client().await;
    let fresh = prepare_each(&client, "SELECT $1::int + {k} AS n").await;
    let tx = client.transaction().await.unwrap();
    for (k, statement) in (0..).zip(&fresh) {
        let row = tx
            .query_one(statement, &[&100])
            .await
            .unwrap_or_else(|e| panic!("statement {k} in a read-write transaction: {e:?}"));
        assert_eq!(row.get::<_, i32>("n"), 100 + k);
    }
    tx.commit().await.unwrap();

    let mut client = split.client().await;
    let fresh = prepare_each(&client, "SELECT $1::int - {k} AS n").await;
    let tx = client.build_transaction().read_only(true).start().await;
    let tx = tx.unwrap();
    for (k, statement) in (0..).zip(&fresh) {
        let row = tx
            .query_one(statement, &[&100])
            .await
            .unwrap_or_else(|e| panic!("statement {k} in a read-only transaction: {e:?}"));
        assert_eq!(row.get::<_, i32>("n"), 100 - k);
    }
    tx.commit().await.unwrap();

    // In a failed transaction they cannot be prepared on its node: the node refuses everything
    // until the end of the block, and one that never got the statement would answer its Bind
    // with 26000. PostgreSQL, which has every statement the session prepared, answers 25P02,
    // and so must pgvigil. After the block they run everywhere.
    let mut client = split.client().await;
    let fresh = prepare_each(&client, "SELECT $1::int * {k} AS n").await;
    let tx = client.transaction().await.unwrap();
    tx.batch_execute("SELECT 1 / 0").await.unwrap_err();
    for (k, statement) in (0..).zip(&fresh) {
        let error = tx.query_one(statement, &[&100]).await.unwrap_err();
        let refused = error.as_db_error().map(|e| (e.code(), e.message()));
        assert_eq!(
            refused,
            Some((
                &SqlState::IN_FAILED_SQL_TRANSACTION,
                "current transaction is aborted, commands ignored until end of transaction block"
            )),
            "statement {k} in a failed transaction: {error:?}"
        );
    }
    tx.rollback().await.unwrap();
    for _ in 0..3 {
        for (k, statement) in (0..).zip(&fresh) {
            let row = client
                .query_one(statement, &[&100])
                .await
                .unwrap_or_else(|e| panic!("statement {k} after a failed transaction: {e:?}"));
            assert_eq!(row.get::<_, i32>("n"), 100 * k);
        }
    }
}

/// Prepares [`TRIES`] statements, `template` with `{k}` replaced by 0, 1, ...; each also
/// returns the node marker.
async fn prepare_each(client: &Client, template: &str) -> Vec<Statement> {
    let mut statements = Vec::new();
    for k in 0..TRIES {
        let sql = format!("{}, {PORT}", template.replace("{k}", &k.to_string()));
        statements.push(client.prepare(&sql).await.unwrap());
    }
    statements
}

/// Executes statement `name` 30 times (Bind, Execute, Sync each); every answer must be one row
/// whose first column is `value`. Returns the nodes that ran them (second column: the port).
async fn execute_named(split: &Split, wire: &mut Wire, name: &str, value: &str) -> PerNode {
    let mut served = [0; NODES];
    for i in 0..30 {
        let answer = wire
            .exchange(|out| {
                bind_execute(out, name);
                encode::sync(out);
            })
            .await;
        assert!(
            answer.errors.is_empty(),
            "execution #{i} of {name:?}: {:?}",
            answer.errors
        );
        assert_eq!(answer.rows.len(), 1, "execution #{i} of {name:?}");
        assert_eq!(answer.rows[0][0], value, "execution #{i} of {name:?}");
        served[split.node_at(&answer.rows[0][1])] += 1;
    }
    served
}

#[tokio::test(flavor = "multi_thread")]
async fn a_statement_name_closed_and_prepared_again_runs_its_new_text_on_every_node() {
    let split = Split::start(|config| {
        let app = config.users.iter_mut().find(|u| u.name == APP_USER);
        app.unwrap().auth = AuthMethod::Trust;
    })
    .await;
    let mut wire = Wire::login(&split.proxy).await;

    let answer = wire
        .exchange(|out| {
            parse(out, "q", "SELECT 'first', inet_server_port()");
            encode::sync(out);
        })
        .await;
    assert!(answer.errors.is_empty(), "{:?}", answer.errors);
    let served = execute_named(&split, &mut wire, "q", "first").await;
    assert_replicas_used(served, "q, first text");

    // Close and Parse in units of their own: the nodes that still have the old q must not run it.
    let answer = wire
        .exchange(|out| {
            close(out, "q");
            encode::sync(out);
        })
        .await;
    assert!(answer.errors.is_empty(), "{:?}", answer.errors);
    let answer = wire
        .exchange(|out| {
            parse(out, "q", "SELECT 'second', inet_server_port()");
            encode::sync(out);
        })
        .await;
    assert!(answer.errors.is_empty(), "{:?}", answer.errors);
    let served = execute_named(&split, &mut wire, "q", "second").await;
    assert_replicas_used(served, "q, second text");

    // Close, Parse, Bind and Execute in one unit, as drivers with statement caches send them.
    let answer = wire
        .exchange(|out| {
            close(out, "q");
            parse(out, "q", "SELECT 'third', inet_server_port()");
            bind_execute(out, "q");
            encode::sync(out);
        })
        .await;
    assert!(answer.errors.is_empty(), "{:?}", answer.errors);
    assert_eq!(answer.rows[0][0], "third");
    let served = execute_named(&split, &mut wire, "q", "third").await;
    assert_replicas_used(served, "q, third text");

    // The unnamed statement, parsed anew in every unit.
    for i in 0..TRIES {
        let answer = wire
            .exchange(|out| {
                parse(out, "", &format!("SELECT '{i}', inet_server_port()"));
                bind_execute(out, "");
                encode::sync(out);
            })
            .await;
        assert!(
            answer.errors.is_empty(),
            "unnamed #{i}: {:?}",
            answer.errors
        );
        assert_eq!(answer.rows[0][0], i.to_string());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pipelined_burst_of_reads_and_writes_all_succeed() {
    let split = Split::start(|_| {}).await;
    split.setup("CREATE TABLE burst (id int PRIMARY KEY)").await;
    let client = split.client().await;

    // tokio-postgres pipelines requests made concurrently on one client: pgvigil receives the
    // messages of many units back to back and must route each one without mixing their answers.
    let requests = (0..150).map(|i: i32| {
        let (split, client) = (&split, &client);
        async move {
            match i % 3 {
                0 => {
                    let sql =
                        "INSERT INTO burst VALUES ($1) RETURNING id, inet_server_port() AS port";
                    let row = client.query_one(sql, &[&i]).await;
                    let row = row.unwrap_or_else(|e| panic!("insert {i}: {e:?}"));
                    assert_eq!(split.row_node(&row), PRIMARY, "insert {i}");
                    assert_eq!(row.get::<_, i32>("id"), i);
                }
                1 => {
                    let sql = "SELECT $1::int AS id, inet_server_port() AS port";
                    let row = client.query_one(sql, &[&i]).await;
                    let row = row.unwrap_or_else(|e| panic!("read {i}: {e:?}"));
                    assert_eq!(row.get::<_, i32>("id"), i);
                }
                _ => {
                    let sql = format!("SELECT {i} AS id, inet_server_port() AS port");
                    let messages = client.simple_query(&sql).await;
                    let messages = messages.unwrap_or_else(|e| panic!("simple read {i}: {e:?}"));
                    let row = first_row(messages).unwrap();
                    assert_eq!(row.get("id"), Some(i.to_string().as_str()));
                }
            }
        }
    });
    tokio::time::timeout(PATIENCE, join_all(requests))
        .await
        .expect("the burst did not finish in time");

    let count: i64 = split
        .direct(PRIMARY)
        .await
        .query_one("SELECT count(*) FROM burst", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, 50);
    // The session is still in order afterwards.
    assert_eq!(
        split
            .simple(&client, "SELECT 7 AS n, inet_server_port() AS port")
            .await
            .0
            .get("n"),
        Some("7")
    );
}

/// The settings a session sees, and the node it sees them on.
const SETTINGS: &str = "SELECT current_setting('application_name') AS app, \
    current_setting('search_path') AS path, current_setting('statement_timeout') AS timeout, \
    (SELECT v FROM whereami) AS schema, inet_server_port() AS port";

/// Reads [`SETTINGS`] until every node has answered at least three times (and 30 reads at least);
/// every answer must be `expected` (application_name, search_path, statement_timeout, and the
/// schema `whereami` resolves to).
async fn settings_everywhere(split: &Split, client: &Client, expected: [&str; 4], what: &str) {
    let mut seen = [0; NODES];
    let mut reads = 0;
    let deadline = Deadline::start();
    while reads < 30 || seen.iter().any(|&n| n < 3) {
        deadline.check(&format!(
            "{what}: every node answers, reads per node {seen:?}"
        ));
        {
            let (row, node) = if reads % 2 == 0 {
                let (row, node) = split.simple(client, SETTINGS).await;
                let got =
                    ["app", "path", "timeout", "schema"].map(|c| row.get(c).unwrap().to_owned());
                (got, node)
            } else {
                let (row, node) = split.extended(client, SETTINGS).await;
                let got = ["app", "path", "timeout", "schema"].map(|c| row.get::<_, String>(c));
                (got, node)
            };
            assert_eq!(row, expected, "{what}: read #{reads} on node {node}");
            seen[node] += 1;
            reads += 1;
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn session_settings_reach_every_node_the_session_reads_from() {
    // The primary shares reads too, so that every node serves some.
    let split = Split::start(|config| config.routing.primary_reads = PrimaryReads::Share).await;
    split
        .setup(
            "CREATE SCHEMA elsewhere;
             CREATE TABLE public.whereami AS SELECT 'public'::text AS v;
             CREATE TABLE elsewhere.whereami AS SELECT 'elsewhere'::text AS v;",
        )
        .await;
    let conninfo = format!(
        "{} application_name=from-startup",
        split.proxy.conninfo(APP_USER, APP_PASSWORD, APP_DB)
    );
    let client = split.proxy.connect(&conninfo).await.unwrap();
    let defaults = ["from-startup", "\"$user\", public", "0", "public"];
    settings_everywhere(&split, &client, defaults, "startup parameter").await;

    // SET by both protocols, one statement each.
    client
        .batch_execute("SET search_path TO elsewhere, public")
        .await
        .unwrap();
    client
        .batch_execute("SET application_name = 'from-set'")
        .await
        .unwrap();
    client
        .execute("SET statement_timeout = '7s'", &[])
        .await
        .unwrap();
    let set = ["from-set", "elsewhere, public", "7s", "elsewhere"];
    settings_everywhere(&split, &client, set, "after SET").await;

    client.batch_execute("RESET search_path").await.unwrap();
    client
        .execute("RESET statement_timeout", &[])
        .await
        .unwrap();
    let reset = ["from-set", "\"$user\", public", "0", "public"];
    settings_everywhere(&split, &client, reset, "after RESET").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn reset_returns_a_startup_parameter_to_its_startup_value_on_every_node() {
    resets_return_startup_values_on_every_node(PoolMode::Session).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn reset_returns_a_startup_parameter_to_its_startup_value_on_every_node_in_transaction_pooling(
) {
    resets_return_startup_values_on_every_node(PoolMode::Transaction).await;
}

/// RESET, SET TO DEFAULT, RESET ALL and DISCARD ALL, each after settings changed, leave the
/// startup value on every node the session reads from, as PostgreSQL leaves it.
async fn resets_return_startup_values_on_every_node(mode: PoolMode) {
    let split = Split::start(|config| {
        config.routing.primary_reads = PrimaryReads::Share;
        config.pool.mode = mode;
    })
    .await;
    split
        .setup("CREATE TABLE whereami AS SELECT 'public'::text AS v")
        .await;
    let conninfo = |base: String| format!("{base} application_name=from-startup");

    // What PostgreSQL itself does, straight to the primary.
    let primary = &split.cluster.node(PRIMARY);
    let (direct, connection) = tokio_postgres::connect(
        &conninfo(format!(
            "host=127.0.0.1 port={} user=postgres dbname={APP_DB}",
            primary.port
        )),
        NoTls,
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    direct
        .batch_execute("SET application_name = 'from-set'; RESET application_name")
        .await
        .unwrap();
    let row = direct
        .query_one("SELECT current_setting('application_name')", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, &str>(0), "from-startup");

    let through = split
        .proxy
        .connect(&conninfo(split.proxy.conninfo(
            APP_USER,
            APP_PASSWORD,
            APP_DB,
        )))
        .await
        .unwrap();
    through
        .batch_execute("SET application_name = 'from-set'")
        .await
        .unwrap();
    through
        .batch_execute("RESET application_name")
        .await
        .unwrap();
    let defaults = ["from-startup", "\"$user\", public", "0", "public"];
    settings_everywhere(&split, &through, defaults, "after RESET application_name").await;

    for reset in [
        "SET application_name TO DEFAULT",
        "RESET ALL",
        "DISCARD ALL",
    ] {
        for set in [
            "SET application_name = 'from-set'",
            "SET statement_timeout = '7s'",
        ] {
            through.batch_execute(set).await.unwrap();
        }
        if reset.starts_with("SET") {
            through
                .batch_execute("RESET statement_timeout")
                .await
                .unwrap();
        }
        through.batch_execute(reset).await.unwrap();
        settings_everywhere(&split, &through, defaults, &format!("after {reset}")).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_setting_rolled_back_or_local_is_replayed_on_no_node_the_session_reads_from() {
    let split = Split::start(|_| {}).await;
    let client = split.client().await;
    client
        .batch_execute("SET statement_timeout = '7s'")
        .await
        .unwrap();
    // A SET rolled back with its transaction, and a SET LOCAL, leave the setting as it was.
    client.batch_execute("BEGIN").await.unwrap();
    client
        .batch_execute("SET statement_timeout = '8s'")
        .await
        .unwrap();
    client.batch_execute("ROLLBACK").await.unwrap();
    client.batch_execute("BEGIN").await.unwrap();
    client
        .batch_execute("SET LOCAL statement_timeout = '6s'")
        .await
        .unwrap();
    client.batch_execute("COMMIT").await.unwrap();
    // pgvigil logs a setting only once it took effect, so the session may read anywhere again:
    // every node it reads from, the replicas included, shows the setting as it was before.
    let read = "SELECT current_setting('statement_timeout') AS v, inet_server_port() AS port";
    until("a read reaches a replica", || {
        let (client, split) = (&client, &split);
        async move {
            let (row, node) = split.extended(client, read).await;
            assert_eq!(row.get::<_, String>("v"), "7s", "read on node {node}");
            node != PRIMARY
        }
    })
    .await;
}

/// A read that reports its node, to run on a pinned session.
const PINNED_READ: &str = "SELECT 1 AS one, inet_server_port() AS port";

#[tokio::test(flavor = "multi_thread")]
async fn temporary_tables_prepare_advisory_locks_and_listen_pin_the_session_to_the_primary() {
    let split = Split::start(|_| {}).await;

    // Each pin in a session of its own, by either protocol.
    let temp = split.client().await;
    temp.batch_execute("CREATE TEMP TABLE scratch AS SELECT 1 AS x")
        .await
        .unwrap();
    let prepared = split.client().await;
    prepared
        .execute(
            "PREPARE one AS SELECT 1 AS x, inet_server_port() AS port",
            &[],
        )
        .await
        .unwrap();
    let locked = split.client().await;
    locked
        .query_one("SELECT pg_advisory_lock(1)", &[])
        .await
        .unwrap();
    let listening = split.client().await;
    listening
        .batch_execute("LISTEN routing_news")
        .await
        .unwrap();

    // A session that wrote without pinning reads from a replica again once the replicas have
    // replayed its write; it writes after the pinned sessions, so by then read-your-writes keeps
    // none of them on the primary either.
    let control = split.client().await;
    control
        .batch_execute("CREATE TABLE control ()")
        .await
        .unwrap();
    until("the unpinned writer reads from a replica again", || {
        let (split, control) = (&split, &control);
        async move { split.simple_node(control, WHERE).await != PRIMARY }
    })
    .await;

    let pinned = [
        (&temp, "temporary table"),
        (&prepared, "PREPARE"),
        (&locked, "advisory lock"),
        (&listening, "LISTEN"),
    ];
    for (client, pin) in pinned {
        for i in 0..TRIES {
            let simple = split.simple_node(client, PINNED_READ).await;
            assert_eq!(simple, PRIMARY, "{pin}: simple read #{i}");
            let extended = split.extended_node(client, PINNED_READ).await;
            assert_eq!(extended, PRIMARY, "{pin}: extended read #{i}");
        }
    }
    // What the pins are for still works.
    for _ in 0..TRIES {
        let (row, node) = split
            .simple(&temp, "SELECT x, inet_server_port() AS port FROM scratch")
            .await;
        assert_eq!((row.get("x"), node), (Some("1"), PRIMARY));
        let (row, node) = split.simple(&prepared, "EXECUTE one").await;
        assert_eq!((row.get("x"), node), (Some("1"), PRIMARY));
    }

    // A fresh session is not pinned.
    let fresh = split.client().await;
    let mut spread = Spread::new("a fresh session");
    while spread.more() {
        spread.add(split.simple_node(&fresh, WHERE).await);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn hints_send_a_statement_to_the_primary_or_a_replica_outside_transactions() {
    let split = Split::start(|_| {}).await;
    // Read-only, but the classifier cannot know that.
    split
        .setup("CREATE FUNCTION my_read_fn() RETURNS int LANGUAGE sql STABLE AS 'SELECT 42'")
        .await;
    let read_fn = "SELECT my_read_fn() AS v, inet_server_port() AS port";
    let hinted_read_fn = format!("/* pgvigil:replica */ {read_fn}");
    let hinted_primary = format!("/* pgvigil:primary */ {WHERE}");

    // Each case in a fresh session: a statement sent to the primary as a possible write would
    // keep the session's next reads there (read your writes).
    let client = split.client().await;
    let mut simple = Spread::new("simple, hinted pgvigil:replica");
    while simple.more() {
        let (row, node) = split.simple(&client, &hinted_read_fn).await;
        assert_eq!(row.get("v"), Some("42"));
        simple.add(node);
    }
    let mut extended = Spread::new("extended, hinted pgvigil:replica");
    while extended.more() {
        let (row, node) = split.extended(&client, &hinted_read_fn).await;
        assert_eq!(row.get::<_, i32>("v"), 42);
        extended.add(node);
    }

    let client = split.client().await;
    for i in 0..TRIES {
        let node = split.simple_node(&client, &hinted_primary).await;
        assert_eq!(node, PRIMARY, "pgvigil:primary, simple #{i}");
        let node = split.extended_node(&client, &hinted_primary).await;
        assert_eq!(node, PRIMARY, "pgvigil:primary, extended #{i}");
    }

    let client = split.client().await;
    for i in 0..TRIES {
        let node = split.simple_node(&client, read_fn).await;
        assert_eq!(node, PRIMARY, "unknown function without hint, simple #{i}");
        let node = split.extended_node(&client, read_fn).await;
        assert_eq!(
            node, PRIMARY,
            "unknown function without hint, extended #{i}"
        );
    }

    // Inside a read-write transaction (on the primary) the replica hint does not move it.
    let client = split.client().await;
    for i in 0..TRIES / 2 {
        client.batch_execute("BEGIN").await.unwrap();
        let simple = split.simple_node(&client, &hinted_read_fn).await;
        let extended = split.extended_node(&client, &hinted_read_fn).await;
        client.batch_execute("COMMIT").await.unwrap();
        assert_eq!((simple, extended), (PRIMARY, PRIMARY), "in BEGIN #{i}");
    }

    // Nor does the primary hint move a read-only transaction off its replica.
    let client = split.client().await;
    let mut on_replica = 0;
    for i in 0..9 {
        client.batch_execute("BEGIN READ ONLY").await.unwrap();
        let first = split.simple_node(&client, WHERE).await;
        let hinted = split.simple_node(&client, &hinted_primary).await;
        let extended = split.extended_node(&client, &hinted_primary).await;
        client.batch_execute("COMMIT").await.unwrap();
        assert_eq!(
            (hinted, extended),
            (first, first),
            "in BEGIN READ ONLY #{i}"
        );
        on_replica += usize::from(first != PRIMARY);
    }
    assert!(on_replica > 0, "no read-only transaction ran on a replica");
}

/// Lines pgvigil wrote to stderr so far, collected by a background task.
type Log = Arc<Mutex<Vec<String>>>;

/// Waits until some line of `log` contains every one of `parts`.
async fn logged(log: &Log, parts: &[&str]) {
    until(&format!("a log line with {parts:?}"), || async move {
        let lines = log.lock().unwrap();
        lines.iter().any(|l| parts.iter().all(|p| l.contains(p)))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn routing_decisions_are_logged_at_debug_level_with_their_reasons() {
    let cluster = test_cluster(2);
    let mut config = test_config(&cluster);
    config.health.interval = PROBE;
    let file = TempConfig::new(&toml::to_string(&config).unwrap());
    let mut child = pgvigil(&["serve", "--config", file.path().to_str().unwrap()])
        .env("PGVIGIL_LOG", "pgvigil=debug")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (port, mut stderr) = listening_port(&mut child).await;
    let log: Log = Arc::default();
    let lines = Arc::clone(&log);
    tokio::spawn(async move {
        let mut line = String::new();
        while stderr.read_line(&mut line).await.is_ok_and(|n| n > 0) {
            lines.lock().unwrap().push(std::mem::take(&mut line));
        }
    });

    let conninfo = format!(
        "host=127.0.0.1 port={port} user={APP_USER} password={APP_PASSWORD} dbname={APP_DB}"
    );
    let (client, connection) = tokio_postgres::connect(&conninfo, NoTls).await.unwrap();
    tokio::spawn(connection);
    let replica_ports: Vec<String> = REPLICAS
        .iter()
        .map(|&r| cluster.node(r).port.to_string())
        .collect();
    until("a read reaches a replica", || {
        let (client, replica_ports) = (&client, &replica_ports);
        async move {
            let row = first_row(client.simple_query(WHERE).await.unwrap()).unwrap();
            replica_ports.iter().any(|p| row.get("port") == Some(p))
        }
    })
    .await;
    logged(&log, &["routing decision", "read, balanced"]).await;

    client
        .batch_execute("CREATE TABLE logged_rows (id int)")
        .await
        .unwrap();
    logged(
        &log,
        &["routing decision", "may write", "statement is not a read"],
    )
    .await;
    client
        .batch_execute("SELECT pg_current_xact_id()")
        .await
        .unwrap();
    logged(
        &log,
        &[
            "routing decision",
            "may write",
            "call of a writing function",
        ],
    )
    .await;
    client
        .batch_execute("SELECT * FROM logged_rows FOR UPDATE")
        .await
        .unwrap();
    logged(&log, &["routing decision", "row-locking clause"]).await;

    client.batch_execute("LISTEN logged").await.unwrap();
    logged(&log, &["session pinned to the primary", "LISTEN"]).await;
    client.batch_execute("SELECT 1").await.unwrap();
    logged(&log, &["routing decision", "pinned", "LISTEN"]).await;

    // Hints are reasons of their own.
    let fresh = {
        let (client, connection) = tokio_postgres::connect(&conninfo, NoTls).await.unwrap();
        tokio::spawn(connection);
        client
    };
    fresh
        .batch_execute("/* pgvigil:primary */ SELECT 1")
        .await
        .unwrap();
    logged(&log, &["routing decision", "hint", "pgvigil:primary"]).await;
}
