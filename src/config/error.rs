//! Why a configuration could not be used: each problem tied to its key path.

use std::fmt;
use std::io;
use std::path::PathBuf;

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        /// The file that was asked for.
        path: PathBuf,
        /// What the OS said.
        source: io::Error,
    },
    /// The text is not TOML, or does not fit the structs (unknown key, wrong type); toml's message
    /// names the line and shows the key.
    #[error("{0}")]
    Syntax(String),
    /// The values parsed but make no sense together; every problem is listed.
    #[error("{}", display_problems(.0))]
    Invalid(Vec<Problem>),
}

/// One thing wrong with a configuration, tied to its key path (`nodes[1].name`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Key path, e.g. `pool.min_idle` or `nodes[1].name`.
    pub key: String,
    /// What is wrong and, where it helps, what would be right.
    pub reason: String,
}

impl Problem {
    pub(super) fn new(key: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            reason: reason.into(),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.reason)
    }
}

fn display_problems(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(Problem::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}
