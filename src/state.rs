//! What pgvigil must remember across its own restarts: which node is primary and which are fenced.
//! Kept in `failover.state_dir/pgvigil.state` (TOML), replaced atomically: written to a temporary
//! file, fsynced, renamed over the old one, and the directory fsynced.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// File name inside `failover.state_dir`.
const FILE_NAME: &str = "pgvigil.state";

/// The remembered state. Nodes are named, not numbered, so that reordering `[[nodes]]` in the
/// configuration cannot move a fence to another node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct State {
    /// The topology generation this state was published with.
    pub generation: u64,
    /// The node that was primary.
    pub primary: Option<String>,
    /// Nodes that must never get a query until an operator clears them.
    pub fenced: Vec<String>,
    /// Nodes an operator detached (`pgvigil detach`) (absent in files of older versions).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub detached: Vec<String>,
    /// A promotion asked for and not yet seen to finish: after a restart, that node is still
    /// the only candidate (absent in files of older versions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub promoting: Option<PromotionRecord>,
    /// The latest promotion that finished, for the record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_promotion: Option<PromotionRecord>,
    /// Standbys a failover stopped streaming from the lost primary, with the `primary_conninfo`
    /// each had, until they are pointed at a primary again: a pgvigil restarted mid-failover
    /// still knows how they replicate (absent in files of older versions). The file may then
    /// hold a replication password, as the standbys' own configuration does.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub paused: BTreeMap<String, String>,
}

/// A promotion as the state file keeps it. LSNs are in PostgreSQL's text form ("0/3000060"),
/// which TOML's signed integers need not hold.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromotionRecord {
    /// The standby promoted.
    pub node: String,
    /// The primary it replaced.
    pub old_primary: String,
    /// The old primary's last known WAL position.
    pub old_lsn: String,
    /// The promoted standby's position when it was chosen.
    pub new_lsn: String,
    /// The standby's `pg_postmaster_start_time()` when it was asked.
    pub postmaster_start: String,
}

/// Why the state could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The file or directory could not be read, written or synced.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is not a valid state file.
    #[error("{path} is not a valid pgvigil state file: {source}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        source: toml::de::Error,
    },
    /// The state could not be serialized (should not happen).
    #[error("cannot serialize the state: {0}")]
    Serialize(#[from] toml::ser::Error),
}

/// The state file in one directory.
#[derive(Debug, Clone)]
pub struct StateFile {
    dir: PathBuf,
}

impl StateFile {
    /// The state file of `dir` (created on the first save).
    pub fn new(dir: &Path) -> StateFile {
        StateFile {
            dir: dir.to_path_buf(),
        }
    }

    /// The file's path.
    pub fn path(&self) -> PathBuf {
        self.dir.join(FILE_NAME)
    }

    /// The saved state; None when there is none yet.
    pub fn load(&self) -> Result<Option<State>, StateError> {
        let path = self.path();
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(StateError::Io {
                    action: "reading",
                    path,
                    source,
                })
            }
        };
        toml::from_str(&text)
            .map(Some)
            .map_err(|source| StateError::Malformed { path, source })
    }

    /// Replaces the saved state atomically and durably.
    pub fn save(&self, state: &State) -> Result<(), StateError> {
        let text = toml::to_string(state)?;
        let io = |action, path: &Path| {
            let path = path.to_path_buf();
            move |source| StateError::Io {
                action,
                path,
                source,
            }
        };
        std::fs::create_dir_all(&self.dir).map_err(io("creating", &self.dir))?;
        let temporary = self.dir.join(format!("{FILE_NAME}.tmp"));
        let mut file = std::fs::File::create(&temporary).map_err(io("creating", &temporary))?;
        file.write_all(text.as_bytes())
            .map_err(io("writing", &temporary))?;
        file.sync_all().map_err(io("syncing", &temporary))?;
        drop(file);
        let path = self.path();
        std::fs::rename(&temporary, &path).map_err(io("renaming to", &path))?;
        std::fs::File::open(&self.dir)
            .and_then(|dir| dir.sync_all())
            .map_err(io("syncing", &self.dir))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("pgvigil-state-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn saved_state_loads_back_and_replaces_the_old_one() {
        let dir = temp_dir("roundtrip");
        let file = StateFile::new(&dir.join("nested"));
        assert_eq!(file.load().unwrap(), None);
        let first = State {
            generation: 3,
            primary: Some("pg2".into()),
            fenced: vec!["pg1".into()],
            detached: vec!["pg3".into()],
            promoting: Some(PromotionRecord {
                node: "pg2".into(),
                old_primary: "pg1".into(),
                old_lsn: "0/3000060".into(),
                new_lsn: "0/3000000".into(),
                postmaster_start: "2026-12-04 16:00:00+00".into(),
            }),
            last_promotion: None,
            paused: BTreeMap::from([("pg3".into(), "host=h port=1 user='r'".into())]),
        };
        file.save(&first).unwrap();
        assert_eq!(file.load().unwrap(), Some(first));
        let second = State {
            generation: 9,
            primary: Some("pg3".into()),
            fenced: vec!["pg1".into(), "pg2".into()],
            ..State::default()
        };
        file.save(&second).unwrap();
        assert_eq!(file.load().unwrap(), Some(second));
        let leftovers: Vec<_> = std::fs::read_dir(dir.join("nested"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(leftovers, vec![std::ffi::OsString::from(FILE_NAME)]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_file_without_promotions_still_loads() {
        let dir = temp_dir("older");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join(FILE_NAME),
            "generation = 2\nprimary = \"pg1\"\nfenced = []\n",
        )
        .unwrap();
        let state = StateFile::new(&dir).load().unwrap().unwrap();
        assert_eq!((state.promoting, state.last_promotion), (None, None));
        assert!(state.paused.is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_damaged_file_is_an_error_not_an_empty_state() {
        let dir = temp_dir("damaged");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(FILE_NAME), "primary = [").unwrap();
        let error = StateFile::new(&dir).load().unwrap_err();
        assert!(
            error.to_string().contains("not a valid pgvigil state file"),
            "{error}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
