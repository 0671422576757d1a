//! `pgvigil pause` and `resume` as an operator uses them (the real CLI against pgvigil in front
//! of a real cluster): a new transaction waits while paused and runs after resume, one already
//! open finishes, `pause --wait` returns once none is in flight, and a held client's cancel
//! request, or `client.query_wait_timeout` running out, gets 57014 with the session going on.

use std::time::Duration;

use pgvigil::admin::api::{Done, Status};
use pgvigil::pause::Traffic;
use tokio_postgres::error::SqlState;
use tokio_postgres::NoTls;

use crate::admin::cli;
use crate::support::{eventually, start_proxy, test_cluster, value, TestProxy};

/// How long anything that should be quick may take on a loaded machine.
const PATIENCE: Duration = Duration::from_secs(30);

/// Waits until `n` units are held by the pause.
fn until_held(proxy: &TestProxy, n: usize) {
    eventually(PATIENCE, &format!("{n} units held"), || {
        proxy.running.proxy.pause.held() == n
    });
}

#[tokio::test(flavor = "multi_thread")]
async fn a_statement_sent_while_paused_runs_only_after_resume() {
    let cluster = test_cluster(0);
    let proxy = start_proxy(&cluster, |_| {}).await;
    let admin = proxy.running.admin_addr;
    let client = proxy.connect_app().await;

    let done: Done = cli(admin, None, &["pause", "--json"]).await.exits(0).json();
    assert!(done.message.starts_with("paused"), "{}", done.message);
    let status: Status = cli(admin, None, &["status", "--json"])
        .await
        .exits(0)
        .json();
    assert_eq!(status.traffic, Traffic::Paused);
    let metrics = crate::metrics::scrape(admin).await;
    assert_eq!(crate::metrics::value(&metrics, "pgvigil_paused", &[]), 1.0);

    let held = tokio::spawn(async move { value(&client, "SELECT 'ran'").await });
    until_held(&proxy, 1);
    assert!(!held.is_finished(), "a held statement ran while paused");

    cli(admin, None, &["resume"]).await.exits(0);
    let ran = tokio::time::timeout(PATIENCE, held)
        .await
        .expect("the held statement did not run after resume")
        .unwrap();
    assert_eq!(ran.as_deref(), Some("ran"));
    // The session's data-plane thread lets go of its hold just after answering.
    until_held(&proxy, 0);
    let metrics = crate::metrics::scrape(admin).await;
    assert_eq!(crate::metrics::value(&metrics, "pgvigil_paused", &[]), 0.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn pause_wait_returns_once_the_open_transaction_ends() {
    let cluster = test_cluster(0);
    let proxy = start_proxy(&cluster, |_| {}).await;
    let admin = proxy.running.admin_addr;
    let client = proxy.connect_app().await;
    client
        .batch_execute("CREATE TABLE IF NOT EXISTS paused_tx (id int)")
        .await
        .unwrap();
    client
        .batch_execute("BEGIN; INSERT INTO paused_tx VALUES (1)")
        .await
        .unwrap();

    let url = format!("http://{admin}");
    let mut waiting = crate::cli::pgvigil(&["pause", "--wait", "--json", "--admin", &url])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    eventually(PATIENCE, "pgvigil paused", || {
        proxy.running.proxy.pause.traffic() == Traffic::Paused
    });
    assert_eq!(proxy.running.proxy.pause.in_flight(), 1);
    assert!(
        waiting.try_wait().unwrap().is_none(),
        "pause --wait returned while a transaction was open"
    );

    // Inside its transaction the session is not held: it finishes.
    client
        .batch_execute("INSERT INTO paused_tx VALUES (2); COMMIT")
        .await
        .unwrap();
    let exit = tokio::time::timeout(PATIENCE, waiting.wait())
        .await
        .expect("pause --wait did not return after the transaction ended")
        .unwrap();
    assert!(exit.success(), "pause --wait: {exit:?}");
    assert_eq!(proxy.running.proxy.pause.in_flight(), 0);
    cli(admin, None, &["resume"]).await.exits(0);
    let rows = value(&client, "SELECT count(*)::text FROM paused_tx").await;
    assert_eq!(rows.as_deref(), Some("2"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_held_statement_is_cancelled_with_57014_and_the_session_goes_on() {
    let cluster = test_cluster(0);
    let proxy = start_proxy(&cluster, |_| {}).await;
    let admin = proxy.running.admin_addr;
    let client = proxy.connect_app().await;
    let token = client.cancel_token();
    cli(admin, None, &["pause"]).await.exits(0);

    let held = tokio::spawn(async move {
        let result = client.simple_query("SELECT 1").await.map(|_| ());
        (client, result)
    });
    until_held(&proxy, 1);
    token.cancel_query(NoTls).await.unwrap();
    let (client, result) = tokio::time::timeout(PATIENCE, held)
        .await
        .expect("the cancelled statement was not answered")
        .unwrap();
    let error = result.expect_err("the held statement was cancelled");
    assert_eq!(error.code(), Some(&SqlState::QUERY_CANCELED));
    // The session's data-plane thread lets go of its hold just after answering.
    until_held(&proxy, 0);

    cli(admin, None, &["resume"]).await.exits(0);
    assert_eq!(
        value(&client, "SELECT 'after'").await.as_deref(),
        Some("after")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_statement_held_past_query_wait_timeout_gets_57014_and_the_session_goes_on() {
    let cluster = test_cluster(0);
    let proxy = start_proxy(&cluster, |config| {
        config.client.query_wait_timeout = Duration::from_secs(1);
    })
    .await;
    let admin = proxy.running.admin_addr;
    let client = proxy.connect_app().await;
    cli(admin, None, &["pause"]).await.exits(0);

    let held = tokio::spawn(async move {
        let result = client.simple_query("SELECT 1").await.map(|_| ());
        (client, result)
    });
    until_held(&proxy, 1);
    let (client, result) = tokio::time::timeout(PATIENCE, held)
        .await
        .expect("the held statement was not answered after query_wait_timeout")
        .unwrap();
    let error = result.expect_err("the held statement timed out");
    assert_eq!(error.code(), Some(&SqlState::QUERY_CANCELED));
    let message = error.as_db_error().map(|e| e.message().to_owned());
    assert!(
        message
            .as_deref()
            .is_some_and(|m| m.contains("client.query_wait_timeout")),
        "{message:?}"
    );
    // The session's data-plane thread lets go of its hold just after answering.
    until_held(&proxy, 0);
    // Still paused: pgvigil stays paused; the session goes on after resume.
    assert_eq!(proxy.running.proxy.pause.traffic(), Traffic::Paused);
    cli(admin, None, &["resume"]).await.exits(0);
    assert_eq!(
        value(&client, "SELECT 'after'").await.as_deref(),
        Some("after")
    );
}
