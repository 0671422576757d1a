//! The admin API's keys (`[admin]`): where it listens and the token it asks for.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use super::{deserialize_listen, Problem};

/// The environment variable that gives the admin token when `admin.token` is not set.
pub const TOKEN_ENV: &str = "PGVIGIL_ADMIN_TOKEN";

/// The admin HTTP API (`[admin]`): status and the operator's commands.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Address of the admin API (default `127.0.0.1:9998`: this host only). A non-loopback
    /// address needs a token, or pgvigil refuses to start.
    #[serde(deserialize_with = "deserialize_listen")]
    pub listen: SocketAddr,
    /// Bearer token every request must carry (default none: then `PGVIGIL_ADMIN_TOKEN` is used,
    /// and with neither the API answers anyone who can reach a loopback address).
    pub token: Option<String>,
    /// Whether `GET /metrics` asks for the token too (default false: Prometheus scrapes it
    /// without one, as it scrapes most exporters; every other endpoint always asks).
    pub metrics_auth: bool,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 9998)),
            token: None,
            metrics_auth: false,
        }
    }
}

impl AdminConfig {
    /// The token in force: `admin.token`, else a non-empty `PGVIGIL_ADMIN_TOKEN`.
    pub fn effective_token(&self) -> Option<String> {
        self.token
            .clone()
            .or_else(|| std::env::var(TOKEN_ENV).ok().filter(|t| !t.is_empty()))
    }
}

/// Problems with `[admin]` that the file alone shows (the environment is checked at start).
pub(super) fn check(admin: &AdminConfig, problems: &mut Vec<Problem>) {
    if admin.token.as_deref().is_some_and(str::is_empty) {
        problems.push(Problem::new(
            "admin.token",
            "must not be empty (leave it out to use PGVIGIL_ADMIN_TOKEN)",
        ));
    }
}
