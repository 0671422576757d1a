//! `GET /status`: the topology, the coordinator's view of each node, the pools and the events.

use crate::admin::api::{ClusterStatus, InstanceStatus, NodeStatus, Status};
use crate::cluster::{views, Standing};
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
        // A node a reload removed and drained has left; its id is merely kept.
        .filter(|node| node.role != Role::Removed)
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
                promoted_by: last
                    .filter(|o| !o.in_recovery)
                    .and_then(|o| o.promoted_by.clone()),
                connections: proxy.pools.open_count(node.id),
                idle_connections: proxy.pools.idle_count(node.id),
                read_sessions: proxy.balancer.read_sessions(node.id),
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
        cluster: None,
    }
}

/// The instances' part of the status with `[cluster]` (None without): this one's standing, and
/// every live instance's view as published in etcd.
pub async fn cluster(proxy: &Proxy) -> Option<ClusterStatus> {
    let member = proxy.leadership.member()?;
    let (standing, leader, why) = match proxy.leadership.standing() {
        Standing::Alone => ("alone".to_owned(), None, None),
        Standing::Leader { .. } => {
            let standing = match proxy.leadership.may_act() {
                Ok(()) => "leader".to_owned(),
                Err(_) => "leader (lease not renewed)".to_owned(),
            };
            (standing, Some(member.name.clone()), None)
        }
        Standing::Follower { leader, why } => ("follower".to_owned(), leader, Some(why)),
    };
    let (instances, views_unavailable) = match views::read_all(member).await {
        Ok(views) => (
            views
                .into_iter()
                .map(|(name, view)| InstanceStatus {
                    cannot_reach: proxy
                        .config()
                        .nodes
                        .iter()
                        .filter(|node| !view.reaches.contains(&node.name))
                        .map(|node| node.name.clone())
                        .collect(),
                    name,
                    lost: view.lost,
                    admin: view.admin,
                })
                .collect(),
            None,
        ),
        Err(e) => (Vec::new(), Some(e.to_string())),
    };
    Some(ClusterStatus {
        instance: member.name.clone(),
        standing,
        leader,
        why,
        instances,
        views_unavailable,
    })
}
