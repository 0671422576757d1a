//! `pgvigil failback NODE [--reclone]`: a fenced or down former primary comes back as a standby
//! of the current primary, through its node control (README, "Failback").

use std::time::Instant;

use tracing::{info, warn};

use super::actions;
use super::control::Reply;
use super::Coordinator;
use crate::admin::api::{Done, EventKind, Refusal};
use crate::health::NodeHealth;
use crate::node_control::{ControlError, Driver, NodeControl, OwnSettings, ServerState, Source};
use crate::topology::{NodeId, Primary, Role};

/// Characters of an action's output kept in its event.
const OUTPUT_KEPT: usize = 400;

impl Coordinator {
    /// Stops `node` if it runs, rewinds it onto the primary (or re-clones it from there), makes
    /// it a standby with its own settings and a slot on the primary, starts it, waits until it
    /// streams on the primary's timeline, and clears its fence; reads reach it once the probes
    /// see it caught up. On any failure the node stays fenced and the refusal says why.
    pub(super) async fn failback(&mut self, node: NodeId, reclone: bool) -> Reply {
        let began = Instant::now();
        let name = self.name(node).to_owned();
        let topology = self.publisher.snapshot();
        let Primary::Known(primary) = topology.primary else {
            return Err(Refusal::new(
                "there is no primary to fail back onto",
                "wait until `pgvigil status` shows a primary, then retry",
            ));
        };
        let role = topology.nodes[node].role;
        if node == primary {
            return Err(Refusal::new(
                format!("{name} is the primary"),
                "failback brings a former primary back as a standby; nothing to do",
            ));
        }
        if !self.memory.fenced[node] && role != Role::Down {
            return Err(Refusal::new(
                format!(
                    "{name} is {}, not a fenced or down former primary",
                    role.as_str()
                ),
                "nothing to do; see `pgvigil status`",
            ));
        }
        let Some(control) = self.config().nodes[node].control.clone() else {
            return Err(Refusal::new(
                format!("{name} has no node control configured"),
                format!(
                    "add a [nodes.control] section (driver local, agent or command) for {name} and \
                     restart pgvigil, or rewind it by hand then `pgvigil unfence {name}`"
                ),
            ));
        };
        // Fenced from here on: whatever happens, it gets no query until it is back.
        self.fence(node, "failback in progress".into());
        let mode = if reclone { "re-clone" } else { "rewind" };
        self.events.push(
            EventKind::Command,
            Some(&name),
            format!("failback started ({mode} from {})", self.name(primary)),
        );
        let driver = Driver::new(&self.config().nodes[node], &control);
        match self
            .failback_steps(node, primary, &driver, reclone, control.timeout)
            .await
        {
            Ok(timeline) => {
                self.rejoined(node).await;
                let took = began.elapsed();
                info!(node = %name, ?took, "failback done");
                Ok(Done {
                    message: format!(
                        "{name} failed back in {:.1} s: it streams from {} on timeline \
                         {timeline} and takes reads once caught up",
                        took.as_secs_f64(),
                        self.name(primary)
                    ),
                    dry_run: None,
                    write_pause_ms: None,
                })
            }
            Err(refusal) => {
                self.fence_reasons[node] = Some(format!("failback failed: {}", refusal.refused));
                Err(refusal)
            }
        }
    }

    /// The node-side steps of `failback`; the primary's timeline on success.
    pub(super) async fn failback_steps(
        &self,
        node: NodeId,
        primary: NodeId,
        driver: &Driver,
        reclone: bool,
        limit: std::time::Duration,
    ) -> Result<u32, Refusal> {
        let name = self.name(node).to_owned();
        let retry = format!("fix what it says, then `pgvigil failback {name}` again");
        // The source's control file must name its new timeline, or pg_rewind sees nothing to do.
        let timeline = actions::checkpoint_on_timeline(&self.config(), primary, limit)
            .await
            .map_err(|e| {
                Refusal::new(
                    format!("cannot checkpoint the primary {}: {e}", self.name(primary)),
                    retry.clone(),
                )
            })?;
        let slot = slot_name(&name);
        actions::create_slot(&self.config(), primary, &slot)
            .await
            .map_err(|e| {
                Refusal::new(
                    format!("cannot create slot {slot} on the primary: {e}"),
                    retry.clone(),
                )
            })?;
        let state = driver
            .state()
            .await
            .map_err(|e| self.control_refusal(&name, "status", &e))?;
        if state == ServerState::Running {
            let output = driver
                .stop()
                .await
                .map_err(|e| self.control_refusal(&name, "stop", &e))?;
            self.action_event(&name, "stopped", &output);
        }
        let source = {
            let config = self.config();
            let (user, password) = config.health_credentials();
            let target = &config.nodes[primary];
            Source {
                host: target.host.clone(),
                port: target.port,
                user: user.to_owned(),
                password: (!password.is_empty()).then(|| password.to_owned()),
            }
        };
        if reclone {
            let output = driver
                .reclone(&source)
                .await
                .map_err(|e| self.control_refusal(&name, "pg_basebackup", &e))?;
            self.action_event(&name, "re-cloned", &output);
        } else {
            let output = driver.rewind(&source).await.map_err(|e| {
                self.events.push(
                    EventKind::Command,
                    Some(&name),
                    format!("pg_rewind failed: {}", tail(&e.to_string())),
                );
                Refusal::new(
                    format!(
                        "pg_rewind cannot bring {name} onto {}: {e}",
                        self.name(primary)
                    ),
                    format!(
                        "`pgvigil failback {name} --reclone` takes a fresh copy with \
                         pg_basebackup (the old data directory is kept aside)"
                    ),
                )
            })?;
            self.action_event(&name, "rewound", &output);
        }
        let siblings: Vec<NodeId> = (0..self.config().nodes.len())
            .filter(|&n| n != node)
            .collect();
        let conninfo = actions::complete_conninfo(
            &self.config(),
            node,
            primary,
            &siblings,
            &self.memory.paused,
        )
        .await
        .ok_or_else(|| {
            Refusal::new(
                format!("no complete primary_conninfo for {name}"),
                "set [replication] user (and password), then retry the failback",
            )
        })?;
        let settings = OwnSettings {
            port: self.config().nodes[node].port,
            primary_conninfo: conninfo,
            primary_slot_name: slot,
        };
        driver
            .make_standby(&settings)
            .await
            .map_err(|e| self.control_refusal(&name, "writing its settings", &e))?;
        let output = driver
            .start()
            .await
            .map_err(|e| self.control_refusal(&name, "start", &e))?;
        self.action_event(&name, "started", &output);
        actions::await_stream(&self.config(), node, primary, timeline, limit)
            .await
            .map_err(|e| {
                Refusal::new(
                    format!("{name} started but does not stream from the primary: {e}"),
                    format!(
                        "look at its log; `pgvigil failback {name} --reclone` if its WAL \
                         diverged beyond repair"
                    ),
                )
            })?;
        self.proxy.metrics.failback_done();
        self.events.push(
            EventKind::Command,
            Some(&name),
            format!("streams from {} on timeline {timeline}", self.name(primary)),
        );
        Ok(timeline)
    }

    /// `node` streams as a standby again: its fence is cleared and its observations from its
    /// primary days are forgotten (probes that began before now are ignored).
    pub(super) async fn rejoined(&mut self, node: NodeId) {
        self.memory.fenced[node] = false;
        self.fence_reasons[node] = None;
        self.fence_attempts[node] = None;
        self.board[node] = NodeHealth::default();
        self.stale_before[node] = Some(std::time::Instant::now());
        self.proxy.nudges.nudge(node);
        self.evaluate().await;
    }

    fn control_refusal(&self, name: &str, action: &str, e: &ControlError) -> Refusal {
        warn!(node = %name, action, error = %e, "node control failed");
        self.events.push(
            EventKind::Command,
            Some(name),
            format!("{action} failed: {}", tail(&e.to_string())),
        );
        Refusal::new(
            format!("{action} of {name} failed: {e}"),
            format!("fix it on the node, then `pgvigil failback {name}` again"),
        )
    }

    fn action_event(&self, name: &str, what: &str, output: &str) {
        self.events.push(
            EventKind::Command,
            Some(name),
            format!("{what}: {}", tail(output)),
        );
    }
}

/// A replication slot name for node `name` (slot names take lowercase letters, digits and `_`).
pub fn slot_name(name: &str) -> String {
    name.chars()
        .map(|c| match c {
            'a'..='z' | '0'..='9' | '_' => c,
            'A'..='Z' => c.to_ascii_lowercase(),
            _ => '_',
        })
        .collect()
}

/// The end of `text`, at most `OUTPUT_KEPT` characters.
fn tail(text: &str) -> &str {
    let start = text
        .char_indices()
        .rev()
        .nth(OUTPUT_KEPT)
        .map_or(0, |(i, _)| i);
    &text[start..]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_names_are_what_postgres_accepts() {
        assert_eq!(slot_name("pg1"), "pg1");
        assert_eq!(slot_name("DB-east.2"), "db_east_2");
    }

    #[test]
    fn tails_keep_the_end() {
        assert_eq!(tail("short"), "short");
        let long = "x".repeat(OUTPUT_KEPT * 2) + "end";
        assert!(tail(&long).ends_with("end") && tail(&long).len() <= OUTPUT_KEPT + 1);
    }
}
