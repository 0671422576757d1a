//! How standbys connect to a new primary after a failover (`[replication]`): the credentials and
//! libpq settings pgvigil writes into a repointed standby's `primary_conninfo` when the one it
//! has is empty or names no user.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use super::Problem;

/// Keys `[replication]` sets through its own fields, or that pgvigil sets itself (host, port):
/// `replication.conninfo` must not repeat them.
const OWN_KEYS: [&str; 7] = [
    "host",
    "hostaddr",
    "port",
    "user",
    "password",
    "sslmode",
    "application_name",
];

/// The replication connection of repointed standbys (`[replication]`). Unset (no `user`): a
/// standby without a usable `primary_conninfo` copies a sibling standby's.
#[derive(Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReplicationConfig {
    /// Role the standbys replicate as (default none: the section is not used).
    pub user: Option<String>,
    /// Password of `user` (default none: trust, a certificate or the standby's `.pgpass`).
    pub password: Option<String>,
    /// libpq `sslmode` of the replication connection (default none: libpq's own, `prefer`).
    pub sslmode: Option<SslMode>,
    /// `application_name` the standby shows in `pg_stat_replication` (default: the node's name,
    /// which is what `synchronous_standby_names` should list).
    pub application_name: Option<String>,
    /// Other libpq keywords to add, e.g. `keepalives_idle = "30"` (default none).
    pub conninfo: BTreeMap<String, String>,
}

impl fmt::Debug for ReplicationConfig {
    // Passwords must never reach logs, so Debug masks them.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplicationConfig")
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("sslmode", &self.sslmode)
            .field("application_name", &self.application_name)
            .field("conninfo", &self.conninfo)
            .finish()
    }
}

/// libpq's `sslmode` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SslMode {
    /// Plain connections only.
    Disable,
    /// Plain first, TLS if the server insists.
    Allow,
    /// TLS first, plain if the server does not offer it.
    Prefer,
    /// TLS, without checking the server's certificate.
    Require,
    /// TLS, the server's certificate signed by a trusted CA.
    VerifyCa,
    /// TLS, the certificate signed by a trusted CA and naming the host.
    VerifyFull,
}

impl SslMode {
    /// The libpq spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

impl ReplicationConfig {
    /// The libpq key/value pairs (without host and port) for the standby called `node`; None
    /// when the section is not used (no `user`).
    pub fn pairs(&self, node: &str) -> Option<Vec<(String, String)>> {
        let user = self.user.as_ref()?;
        let mut pairs = vec![("user".to_owned(), user.clone())];
        if let Some(password) = &self.password {
            pairs.push(("password".into(), password.clone()));
        }
        if let Some(mode) = self.sslmode {
            pairs.push(("sslmode".into(), mode.as_str().into()));
        }
        let application_name = self.application_name.as_deref().unwrap_or(node);
        pairs.push(("application_name".into(), application_name.into()));
        pairs.extend(self.conninfo.iter().map(|(k, v)| (k.clone(), v.clone())));
        Some(pairs)
    }
}

/// Problems with `[replication]`.
pub(super) fn check(replication: &ReplicationConfig, problems: &mut Vec<Problem>) {
    match &replication.user {
        Some(user) if user.is_empty() => {
            problems.push(Problem::new("replication.user", "must not be empty"))
        }
        Some(_) => {}
        None => {
            let others = replication.password.is_some()
                || replication.sslmode.is_some()
                || replication.application_name.is_some()
                || !replication.conninfo.is_empty();
            if others {
                problems.push(Problem::new(
                    "replication.user",
                    "missing: the other [replication] keys are used only with a user",
                ));
            }
        }
    }
    if replication.application_name.as_deref() == Some("") {
        problems.push(Problem::new(
            "replication.application_name",
            "must not be empty",
        ));
    }
    for key in replication.conninfo.keys() {
        let path = format!("replication.conninfo.{key}");
        if OWN_KEYS.contains(&key.as_str()) {
            problems.push(Problem::new(
                path,
                "set by pgvigil or by its own [replication] key, not here",
            ));
        } else if key.is_empty() || !key.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
            problems.push(Problem::new(
                path,
                "is not a libpq keyword (lowercase letters and '_')",
            ));
        }
    }
}
