//! The CLI's side of the admin API: one HTTP/1.1 request per command.

use hyper::{Method, StatusCode};
use serde::de::DeserializeOwned;

use super::api::{Command, Done, Refusal, Status};
use crate::http_client::Endpoint;

/// Why the CLI got no usable answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// `--admin` is not `http://HOST:PORT`.
    #[error("--admin {0:?} is not an http://HOST:PORT address")]
    BadUrl(String),
    /// Nothing answered at the address.
    #[error("cannot reach pgvigil's admin API at {url}: {reason}")]
    Unreachable {
        /// The admin address.
        url: String,
        /// What failed.
        reason: String,
    },
    /// Something answered, but not the admin API.
    #[error("unexpected answer from {url} (HTTP {code}): {body}")]
    Unexpected {
        /// The admin address.
        url: String,
        /// HTTP status.
        code: u16,
        /// The body, as text.
        body: String,
    },
}

/// Where the admin API is and the token to show it. A command may take as long as a failover
/// it waits for, so answers are not bounded in time.
pub struct Admin {
    endpoint: Endpoint,
    token: Option<String>,
    /// The instance forwarding the requests, if one is (see `forward`).
    forwarded_by: Option<String>,
}

impl Admin {
    /// The API at `url` (`http://HOST:PORT`), with `token` if given.
    pub fn new(url: &str, token: Option<String>) -> Result<Admin, ClientError> {
        let endpoint = Endpoint::parse(url).ok_or_else(|| ClientError::BadUrl(url.to_owned()))?;
        Ok(Admin {
            endpoint,
            token,
            forwarded_by: None,
        })
    }

    /// The same API, each request marked as forwarded by instance `name`.
    pub fn forwarded_by(mut self, name: &str) -> Admin {
        self.forwarded_by = Some(name.to_owned());
        self
    }

    /// `GET /status`; a refusal (wrong token) comes back as `Err` inside.
    pub async fn status(&self) -> Result<Result<Status, Refusal>, ClientError> {
        self.request(Method::GET, "/status").await
    }

    /// Sends `command`; `Ok(Err(refusal))` when pgvigil refused it.
    pub async fn send(&self, command: &Command) -> Result<Result<Done, Refusal>, ClientError> {
        self.post(&command_path(command)).await
    }

    /// `POST path` (a command's endpoint, with its query); `Ok(Err(refusal))` when refused.
    pub async fn post(&self, path: &str) -> Result<Result<Done, Refusal>, ClientError> {
        self.request(Method::POST, path).await
    }

    async fn request<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
    ) -> Result<Result<T, Refusal>, ClientError> {
        let url = self.endpoint.url();
        let headers: Vec<(&str, &str)> = self
            .forwarded_by
            .as_deref()
            .map(|name| (super::forward::FORWARDED_BY, name))
            .into_iter()
            .collect();
        let (code, body) = self
            .endpoint
            .request(method, path, self.token.as_deref(), &headers, None)
            .await
            .map_err(|reason| ClientError::Unreachable {
                url: url.to_owned(),
                reason,
            })?;
        let unexpected = || ClientError::Unexpected {
            url: url.to_owned(),
            code: code.as_u16(),
            body: String::from_utf8_lossy(&body).into_owned(),
        };
        if code == StatusCode::OK {
            serde_json::from_slice(&body)
                .map(Ok)
                .map_err(|_| unexpected())
        } else {
            serde_json::from_slice(&body)
                .map(Err)
                .map_err(|_| unexpected())
        }
    }
}

/// The endpoint of a coordinator command, with its query.
pub fn command_path(command: &Command) -> String {
    match command {
        Command::Switchover { to, drain_timeout } => {
            let mut path = format!(
                "/switchover?drain_timeout={}",
                humantime::format_duration(*drain_timeout)
            )
            .replace(' ', "");
            if let Some(to) = to {
                path.push_str(&format!("&to={to}"));
            }
            path
        }
        Command::Attach(node) | Command::Detach(node) | Command::Unfence(node) => {
            format!("/nodes/{node}/{}", command.verb())
        }
        Command::Promote { node, dry_run } => {
            let query = if *dry_run { "?dry_run=true" } else { "" };
            format!("/nodes/{node}/promote{query}")
        }
        Command::Failback { node, reclone } => {
            let query = if *reclone { "?reclone=true" } else { "" };
            format!("/nodes/{node}/failback{query}")
        }
    }
}
