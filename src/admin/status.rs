//! `GET /status`: the topology, the coordinator's view of each node, the pools and the events.

use crate::admin::api::{NodeStatus, Status};
use crate::failover::Handle;
use crate::proxy::Proxy;
use crate::replication::format_lsn;
use crate::topology::{Primary, Role};

/// The status document as of now.
pub fn status(proxy: &Proxy, control: &Handle) -> Status {
    let topology = proxy.topology.snapshot();
    let view = control.view();
    let replication = proxy.replication.load();
    let failures_allowed = proxy.config().health.failures;
    let primary = match &topology.primary {
        Primary::Known(node) => Some(*node),
        Primary::Unavailable(_) => None,
    };
    let nodes = topology
        .nodes
        .iter()
        .map(|node| {
            let seen = view.get(node.id);
            let health = seen.map(|v| &v.health);
            let last = health.and_then(|h| h.last.as_ref());
            let state = match health {
                None => "not probed",
                Some(h) if !h.probed => "not probed",
                Some(h) if h.is_down(failures_allowed) => "down",
                Some(h) if h.failures > 0 => "failing",
                Some(_) => "up",
            };
            let standby = last.is_some_and(|o| o.in_recovery);
            NodeStatus {
                name: node.name.clone(),
                address: format!("{}:{}", node.host, node.port),
                role: node.role.as_str().to_owned(),
                health: state.to_owned(),
                failures: health.map_or(0, |h| h.failures),
                timeline: last.map(|o| o.timeline),
                lsn: last.map(|o| format_lsn(o.position.lsn)),
                received: last.and_then(|o| o.position.received).map(format_lsn),
                lag_bytes: primary
                    .filter(|&p| p != node.id && standby)
                    .and_then(|p| replication.lag_bytes(node.id, p)),
                replay_delay_ms: last.filter(|_| standby).map(|o| {
                    u64::try_from(o.position.replay_delay.as_millis()).unwrap_or(u64::MAX)
                }),
                fenced: seen.and_then(|v| v.fenced.clone()),
                detached: seen.is_some_and(|v| v.detached) || node.role == Role::Detached,
                connections: proxy.pools.open_count(node.id),
                idle_connections: proxy.pools.idle_count(node.id),
            }
        })
        .collect();
    Status {
        generation: topology.generation,
        primary: primary.map(|p| topology.name(p)),
        primary_unavailable: match &topology.primary {
            Primary::Known(_) => None,
            Primary::Unavailable(reason) => Some(reason.clone()),
        },
        traffic: proxy.pause.traffic(),
        in_flight: proxy.pause.in_flight(),
        held: proxy.pause.held(),
        nodes,
        events: control.events.list(),
    }
}
