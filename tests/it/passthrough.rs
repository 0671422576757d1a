//! Everything a client does passes through pgvigil unchanged.

use crate::support::{start_proxy, test_cluster};

#[tokio::test(flavor = "multi_thread")]
async fn simple_and_extended_queries_reach_the_primary() {
    let cluster = test_cluster(1);
    let proxy = start_proxy(&cluster, |_| {}).await;
    let client = proxy.connect_app().await;

    let rows = client.simple_query("SELECT 1; SELECT 2").await.unwrap();
    let values: Vec<&str> = rows
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0),
            _ => None,
        })
        .collect();
    assert_eq!(values, ["1", "2"]);

    let port: i32 = client
        .query_one("SELECT inet_server_port()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        port as u16,
        cluster.node(0).port,
        "sessions go to the primary"
    );
    let sum: i32 = client
        .query_one("SELECT $1::int + $2::int", &[&40, &2])
        .await
        .unwrap()
        .get(0);
    assert_eq!(sum, 42);
}
