//! The event log (`GET /events`): a failover's phases recorded in the order they happen, each
//! with a timestamp.

use std::time::{Duration, Instant};

use pgvigil::admin::api::{Event, EventKind};

use crate::failover::{Scene, OLD_PRIMARY, PATIENCE, STANDBYS};
use crate::metrics::http_get;
use crate::support::test_cluster;

/// `GET /events`, parsed.
async fn events(scene: &Scene) -> Vec<Event> {
    let (code, body) = http_get(scene.proxy.running.admin_addr, "/events", None).await;
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("not a list of events ({e}): {body}"))
}

/// The position of the first event of `kind` about `node`, if any.
fn position(events: &[Event], kind: EventKind, node: &str) -> Option<usize> {
    events
        .iter()
        .position(|e| e.kind == kind && e.node.as_deref() == Some(node))
}

#[tokio::test(flavor = "multi_thread")]
async fn the_event_log_holds_a_failovers_phases_in_order() {
    let mut scene = Scene::start(test_cluster(2), |_| {}).await;
    let kill = scene.kill(OLD_PRIMARY);
    scene.writes_resume(kill, "kill -9 with the event log watched");
    let new = scene.sole_primary(&STANDBYS);
    let third = STANDBYS.into_iter().find(|&s| s != new).unwrap();
    let name = |node: usize| scene.proxy.running.proxy.config().nodes[node].name.clone();
    let (old, new, third) = (name(OLD_PRIMARY), name(new), name(third));

    // The repoint of the third node and the writer's next write finish on their own time.
    let give_up = Instant::now() + PATIENCE;
    let log = loop {
        let log = events(&scene).await;
        if position(&log, EventKind::Repointed, &third).is_some()
            && position(&log, EventKind::FirstWrite, &new).is_some()
        {
            break log;
        }
        assert!(Instant::now() < give_up, "phases missing: {log:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let at = |kind, node: &str| {
        position(&log, kind, node).unwrap_or_else(|| panic!("no {kind:?} for {node}: {log:#?}"))
    };
    let detected = at(EventKind::Detected, &old);
    let decided = at(EventKind::Decided, &new);
    let promoted = at(EventKind::Promoted, &new);
    let repointed = at(EventKind::Repointed, &third);
    let first_write = at(EventKind::FirstWrite, &new);
    assert!(
        detected < decided && decided < promoted && promoted < repointed && promoted < first_write,
        "phases out of order: {log:#?}"
    );
    at(EventKind::Fence, &old);
    assert!(
        log.windows(2).all(|w| w[0].at_ms <= w[1].at_ms),
        "timestamps go back: {log:#?}"
    );
    assert!(
        log.iter()
            .any(|e| e.kind == EventKind::Topology && e.message.contains(&new)),
        "{log:#?}"
    );
}
