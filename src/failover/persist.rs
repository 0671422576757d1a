//! What the coordinator remembers across pgvigil's restarts: the state file (fences, detached and
//! paused nodes, the primary, a pending promotion) read at start and written after every change.

use tracing::{error, info, warn};

use super::{Coordinator, Memory, Promotion};
use crate::config::Config;
use crate::replication::{format_lsn, parse_lsn};
use crate::state::{PromotionRecord, State, StateError, StateFile};

/// What pgvigil remembered from its state file, and the generation to continue from.
pub fn restore(config: &Config) -> Result<(Memory, u64), StateError> {
    let mut memory = Memory::empty(config.nodes.len());
    let Some(dir) = &config.failover.state_dir else {
        warn!("failover.state_dir is not set: fences and the primary are forgotten when pgvigil restarts");
        return Ok((memory, 0));
    };
    let file = StateFile::new(dir);
    let Some(state) = file.load()? else {
        info!(path = %file.path().display(), "no state file yet: discovering the primary");
        return Ok((memory, 0));
    };
    let id = |name: &str| config.nodes.iter().position(|n| n.name == name);
    memory.primary = state.primary.as_deref().and_then(id);
    for name in &state.detached {
        match id(name) {
            Some(node) => memory.detached[node] = true,
            None => {
                warn!(node = %name, "the state file detaches a node the configuration no longer has")
            }
        }
    }
    for (name, conninfo) in &state.paused {
        match id(name) {
            Some(node) => memory.paused[node] = Some(conninfo.clone()),
            None => {
                warn!(node = %name, "the state file names a paused standby the configuration no longer has")
            }
        }
    }
    for name in &state.fenced {
        match id(name) {
            Some(node) => memory.fenced[node] = true,
            None => {
                warn!(node = %name, "the state file fences a node the configuration no longer has")
            }
        }
    }
    let promotion = |record: &PromotionRecord| promotion_from(config, record);
    memory.promoting = state.promoting.as_ref().and_then(promotion);
    memory.last_promotion = state.last_promotion.as_ref().and_then(promotion);
    info!(
        path = %file.path().display(),
        primary = ?state.primary,
        fenced = ?state.fenced,
        promoting = ?state.promoting.as_ref().map(|p| &p.node),
        generation = state.generation,
        "state restored; checking it against the nodes"
    );
    Ok((memory, state.generation))
}

/// `record` as a promotion of `config`'s nodes; None (and a warning) when a node it names is no
/// longer configured.
pub(super) fn promotion_from(config: &Config, record: &PromotionRecord) -> Option<Promotion> {
    let id = |name: &str| config.nodes.iter().position(|n| n.name == name);
    let place = || {
        Some(Promotion {
            node: id(&record.node)?,
            old_primary: id(&record.old_primary)?,
            old_lsn: parse_lsn(&record.old_lsn)?,
            new_lsn: parse_lsn(&record.new_lsn)?,
            postmaster_start: record.postmaster_start.clone(),
        })
    };
    let promotion = place();
    if promotion.is_none() {
        warn!(
            ?record,
            "the recorded promotion names nodes this configuration cannot place"
        );
    }
    promotion
}

impl Coordinator {
    /// Writes the state file (when configured) and shares the state in etcd (with `[cluster]`);
    /// a failure is logged, not fatal: the nodes' timelines still tell a stale primary after a
    /// restart.
    pub(super) fn save(&self, generation: u64) {
        let state = self.state(generation);
        self.share(&state);
        let Some(file) = &self.state_file else {
            return;
        };
        if let Err(e) = file.save(&state) {
            error!(error = %e, "could not save the state file");
        }
    }

    /// What the coordinator remembers, as the state file keeps it.
    pub(super) fn state(&self, generation: u64) -> State {
        State {
            generation,
            primary: self.memory.primary.map(|n| self.name(n).to_owned()),
            // A node a reload removed is no longer in the file: the state file does not name it.
            fenced: (0..self.memory.fenced.len())
                .filter(|&n| self.memory.fenced[n] && self.is_member(n))
                .map(|n| self.name(n).to_owned())
                .collect(),
            detached: (0..self.memory.detached.len())
                .filter(|&n| self.memory.detached[n] && self.is_member(n))
                .map(|n| self.name(n).to_owned())
                .collect(),
            promoting: self
                .memory
                .promoting
                .as_ref()
                .map(|p| self.promotion_record(p)),
            last_promotion: self
                .memory
                .last_promotion
                .as_ref()
                .map(|p| self.promotion_record(p)),
            paused: (0..self.memory.paused.len())
                .filter_map(|n| Some((self.name(n).to_owned(), self.memory.paused[n].clone()?)))
                .collect(),
        }
    }

    /// `promotion` as the state file keeps it.
    pub(super) fn promotion_record(&self, promotion: &Promotion) -> PromotionRecord {
        PromotionRecord {
            node: self.name(promotion.node).to_owned(),
            old_primary: self.name(promotion.old_primary).to_owned(),
            old_lsn: format_lsn(promotion.old_lsn),
            new_lsn: format_lsn(promotion.new_lsn),
            postmaster_start: promotion.postmaster_start.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::NodeConfig;

    #[test]
    fn a_pending_promotion_in_the_state_file_is_remembered_after_a_restart() {
        let dir = std::env::temp_dir().join(format!("pgvigil-restore-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let record = PromotionRecord {
            node: "pg2".into(),
            old_primary: "pg1".into(),
            old_lsn: "0/3000100".into(),
            new_lsn: "0/3000000".into(),
            postmaster_start: "2026-12-04 16:00:00+00".into(),
        };
        let state = State {
            generation: 7,
            primary: Some("pg1".into()),
            fenced: vec!["pg1".into()],
            detached: vec!["pg3".into()],
            promoting: Some(record),
            last_promotion: None,
            paused: [("pg3".to_owned(), "host=a port=1 user=r".to_owned())].into(),
        };
        StateFile::new(&dir).save(&state).unwrap();
        let config = Config {
            nodes: ["pg1", "pg2", "pg3"]
                .iter()
                .map(|name| NodeConfig {
                    name: (*name).into(),
                    ..NodeConfig::default()
                })
                .collect(),
            failover: crate::config::FailoverConfig {
                state_dir: Some(dir.clone()),
                ..Default::default()
            },
            ..Config::default()
        };
        let (memory, generation) = restore(&config).unwrap();
        assert_eq!(generation, 7);
        let promoting = memory
            .promoting
            .expect("the pending promotion is remembered");
        assert_eq!((promoting.node, promoting.old_primary), (1, 0));
        assert_eq!(promoting.loss(), 0x100);
        assert_eq!(memory.fenced, [true, false, false]);
        assert_eq!(memory.detached, [false, false, true]);
        assert_eq!(
            memory.paused,
            [None, None, Some("host=a port=1 user=r".to_owned())]
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
