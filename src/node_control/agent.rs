//! The `agent` driver: asks the `pgvigil agent` beside the node's server (README, "Node
//! control") over HTTP with its bearer token; each call bounded by the node's `control.timeout`.

use std::path::PathBuf;
use std::time::Duration;

use hyper::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{ControlError, NodeControl, Output, OwnSettings, ServerState, Source};
use crate::agent::api::{ActionDone, AgentRefusal, ServerStatus, SourceRequest, StandbyRequest};
use crate::config::{NodeControlConfig, AGENT_TOKEN_ENV};
use crate::http_client::Endpoint;

/// A node whose server has a `pgvigil agent` beside it.
#[derive(Debug, Clone)]
pub struct Agent {
    url: String,
    token_file: Option<PathBuf>,
    timeout: Duration,
}

impl Agent {
    /// The driver for `config` (its `url`, `token_file` and `timeout`).
    pub fn new(config: &NodeControlConfig) -> Agent {
        Agent {
            url: config.url.clone().unwrap_or_default(),
            token_file: config.token_file.clone(),
            timeout: config.timeout,
        }
    }

    /// The token: the first line of `token_file`, else `PGVIGIL_AGENT_TOKEN`, else none.
    fn token(&self) -> Result<Option<String>, ControlError> {
        match &self.token_file {
            Some(path) => std::fs::read_to_string(path)
                .map(|text| Some(text.trim().to_owned()))
                .map_err(|source| ControlError::Io {
                    what: format!("reading the agent token_file {}", path.display()),
                    source,
                }),
            None => Ok(std::env::var(AGENT_TOKEN_ENV)
                .ok()
                .filter(|t| !t.is_empty())),
        }
    }

    /// `method path` with `body` as JSON; the answer as `T`, or the agent's error.
    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T, ControlError> {
        let unreachable = |reason: String| ControlError::Unreachable {
            url: self.url.clone(),
            reason,
        };
        let endpoint = Endpoint::parse(&self.url)
            .ok_or_else(|| unreachable("not an http://HOST:PORT address".into()))?;
        let token = self.token()?;
        let body = body
            .map(serde_json::to_vec)
            .transpose()
            .map_err(|e| unreachable(format!("cannot encode the request: {e}")))?;
        let request = endpoint.request(method, path, token.as_deref(), &[], body);
        let (code, answer) = tokio::time::timeout(self.timeout, request)
            .await
            .map_err(|_| ControlError::Timeout {
                program: format!("the agent's {path}"),
                limit: self.timeout,
            })?
            .map_err(unreachable)?;
        if code == StatusCode::OK {
            return serde_json::from_slice(&answer).map_err(|e| {
                unreachable(format!(
                    "unexpected answer to {path} ({e}): {}",
                    String::from_utf8_lossy(&answer)
                ))
            });
        }
        let error = match serde_json::from_slice::<AgentRefusal>(&answer) {
            Ok(refusal) => refusal.error,
            Err(_) => String::from_utf8_lossy(&answer).into_owned(),
        };
        Err(ControlError::Agent {
            url: self.url.clone(),
            code: code.as_u16(),
            error,
        })
    }

    async fn action(
        &self,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<Output, ControlError> {
        let done: ActionDone = self.call(Method::POST, path, body).await?;
        Ok(done.output)
    }
}

/// No request body.
const NO_BODY: Option<&()> = None;

impl NodeControl for Agent {
    async fn state(&self) -> Result<ServerState, ControlError> {
        let status: ServerStatus = self.call(Method::GET, "/status", NO_BODY).await?;
        Ok(status.state)
    }

    async fn stop(&self) -> Result<Output, ControlError> {
        self.action("/stop", NO_BODY).await
    }

    async fn start(&self) -> Result<Output, ControlError> {
        self.action("/start", NO_BODY).await
    }

    async fn rewind(&self, source: &Source) -> Result<Output, ControlError> {
        let body = SourceRequest {
            source: source.clone(),
        };
        self.action("/rewind", Some(&body)).await
    }

    async fn reclone(&self, source: &Source) -> Result<Output, ControlError> {
        let body = SourceRequest {
            source: source.clone(),
        };
        self.action("/reclone", Some(&body)).await
    }

    async fn make_standby(&self, settings: &OwnSettings) -> Result<(), ControlError> {
        let body = StandbyRequest {
            settings: settings.clone(),
        };
        self.action("/make-standby", Some(&body)).await.map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_agent_nobody_answers_for_is_a_clear_error_naming_its_url() {
        // A port that was just free: nothing listens there.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
        let port = listener.local_addr().expect("its address").port();
        drop(listener);
        let url = format!("http://127.0.0.1:{port}");
        let agent = Agent::new(&NodeControlConfig {
            url: Some(url.clone()),
            ..NodeControlConfig::default()
        });
        let state = agent.state().await;
        assert!(
            matches!(&state, Err(ControlError::Unreachable { url: u, .. }) if *u == url),
            "{state:?}"
        );
        let message = state.map(|_| ()).unwrap_err().to_string();
        assert!(
            message.starts_with(&format!("cannot reach the agent at {url}: ")),
            "{message}"
        );
    }

    #[tokio::test]
    async fn an_unreadable_token_file_is_named() {
        let agent = Agent::new(&NodeControlConfig {
            url: Some("http://127.0.0.1:9".into()),
            token_file: Some("/nonexistent/agent.token".into()),
            ..NodeControlConfig::default()
        });
        let stop = agent.stop().await;
        assert!(
            matches!(&stop, Err(ControlError::Io { what, .. }) if what.contains("/nonexistent/agent.token")),
            "{stop:?}"
        );
    }
}
