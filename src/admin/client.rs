//! The CLI's side of the admin API: one HTTP/1.1 request per command.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::header::{AUTHORIZATION, HOST};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use tokio::net::TcpStream;

use super::api::{Command, Done, Refusal, Status};

/// How long the CLI waits for pgvigil to connect; a command itself may take as long as a
/// failover it waits for, so answers are not bounded here.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

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

/// Where the admin API is and the token to show it.
pub struct Admin {
    url: String,
    host: String,
    port: u16,
    token: Option<String>,
    /// The instance forwarding the requests, if one is (see `forward`).
    forwarded_by: Option<String>,
}

impl Admin {
    /// The API at `url` (`http://HOST:PORT`), with `token` if given.
    pub fn new(url: &str, token: Option<String>) -> Result<Admin, ClientError> {
        let bad = || ClientError::BadUrl(url.to_owned());
        let rest = url.strip_prefix("http://").ok_or_else(bad)?;
        let authority = rest.trim_end_matches('/');
        let (host, port) = authority.rsplit_once(':').ok_or_else(bad)?;
        let port = port.parse().map_err(|_| bad())?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() || host.contains('/') {
            return Err(bad());
        }
        Ok(Admin {
            url: url.trim_end_matches('/').to_owned(),
            host: host.to_owned(),
            port,
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
        let unreachable = |reason: String| ClientError::Unreachable {
            url: self.url.clone(),
            reason,
        };
        let connect = TcpStream::connect((self.host.as_str(), self.port));
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, connect)
            .await
            .map_err(|_| unreachable(format!("no connection within {CONNECT_TIMEOUT:?}")))?
            .map_err(|e| unreachable(e.to_string()))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        tokio::spawn(connection);
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header(HOST, format!("{}:{}", self.host, self.port));
        if let Some(token) = &self.token {
            request = request.header(AUTHORIZATION, format!("Bearer {token}"));
        }
        if let Some(name) = &self.forwarded_by {
            request = request.header(super::forward::FORWARDED_BY, name);
        }
        let request = request
            .body(Empty::<Bytes>::new())
            .map_err(|e| unreachable(e.to_string()))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let code = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| unreachable(e.to_string()))?
            .to_bytes();
        let unexpected = || ClientError::Unexpected {
            url: self.url.clone(),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_urls_are_http_host_and_port() {
        let admin = Admin::new("http://127.0.0.1:9998/", None).map_err(|e| e.to_string());
        assert!(matches!(&admin, Ok(a) if a.host == "127.0.0.1" && a.port == 9998));
        let v6 = Admin::new("http://[::1]:9998", None).map_err(|e| e.to_string());
        assert!(matches!(&v6, Ok(a) if a.host == "::1"));
        for bad in [
            "127.0.0.1:9998",
            "https://h:1",
            "http://h",
            "http://:1",
            "http://h:x",
        ] {
            assert!(Admin::new(bad, None).is_err(), "{bad}");
        }
    }
}
