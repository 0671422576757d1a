//! Which node a client's work goes to, and why. Pure: no I/O, one topology snapshot per decision.

use crate::topology::{NodeId, Primary, Topology};

/// A routing decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    /// The chosen node.
    pub node: NodeId,
    /// Why it was chosen (logged at debug level).
    pub reason: RouteReason,
}

/// The reason behind a [`Route`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteReason {
    /// Session pooling in front of the primary: every statement may write.
    SessionOnPrimary,
}

/// Why no node can be chosen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// No primary is known; the text says why.
    #[error("no primary is available: {0}")]
    NoPrimary(String),
}

/// Chooses the node a new session's server connection is opened on.
pub fn route_session(topology: &Topology) -> Result<Route, RouteError> {
    match &topology.primary {
        Primary::Known(node) => Ok(Route {
            node: *node,
            reason: RouteReason::SessionOnPrimary,
        }),
        Primary::Unavailable(why) => Err(RouteError::NoPrimary(why.clone())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::{Node, Role};

    fn topology(roles: &[Role]) -> Topology {
        let base = Topology {
            generation: 0,
            nodes: roles
                .iter()
                .enumerate()
                .map(|(id, _)| Node {
                    id,
                    name: format!("pg{}", id + 1),
                    host: "127.0.0.1".into(),
                    port: 5432 + id as u16,
                    role: Role::Unknown,
                })
                .collect(),
            primary: Primary::Unavailable("unprobed".into()),
        };
        base.with_roles(roles)
    }

    #[test]
    fn sessions_go_to_the_observed_primary_not_the_first_node() {
        let t = topology(&[Role::Standby, Role::Primary, Role::Standby]);
        assert_eq!(route_session(&t).map(|r| r.node), Ok(1));
    }

    #[test]
    fn no_primary_is_an_error_with_a_reason() {
        let t = topology(&[Role::Standby, Role::Down]);
        let err = route_session(&t).unwrap_err();
        assert!(
            err.to_string().contains("no reachable node accepts writes"),
            "{err}"
        );
    }

    #[test]
    fn two_primaries_are_never_guessed_between() {
        let t = topology(&[Role::Primary, Role::Primary]);
        let err = route_session(&t).unwrap_err();
        assert!(
            err.to_string()
                .contains("2 nodes claim to be primary (pg1, pg2)"),
            "{err}"
        );
    }
}
