//! A small HTTP/1.1 JSON client: one request per connection, as the CLI (admin API) and the
//! `agent` node control driver (`pgvigil agent`) need.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// How long a connection may take to open.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Where an HTTP service listens: `http://HOST:PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    url: String,
    host: String,
    port: u16,
}

impl Endpoint {
    /// `url` as `http://HOST:PORT` (a trailing `/` allowed, IPv6 in brackets); `None` otherwise.
    pub fn parse(url: &str) -> Option<Endpoint> {
        let rest = url.strip_prefix("http://")?;
        let (host, port) = rest.trim_end_matches('/').rsplit_once(':')?;
        let port = port.parse().ok()?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() || host.contains('/') {
            return None;
        }
        Some(Endpoint {
            url: url.trim_end_matches('/').to_owned(),
            host: host.to_owned(),
            port,
        })
    }

    /// The address as given, without a trailing `/`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Sends `method path` with the bearer `token`, the extra `headers` and a JSON `body`, if
    /// given; the status and the whole answer, or why there is none. The answer itself is not
    /// bounded in time here.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        headers: &[(&str, &str)],
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Bytes), String> {
        let connect = TcpStream::connect((self.host.as_str(), self.port));
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, connect)
            .await
            .map_err(|_| format!("no connection within {CONNECT_TIMEOUT:?}"))?
            .map_err(|e| e.to_string())?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(connection);
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header(HOST, format!("{}:{}", self.host, self.port));
        if let Some(token) = token {
            request = request.header(AUTHORIZATION, format!("Bearer {token}"));
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        if body.is_some() {
            request = request.header(CONTENT_TYPE, "application/json");
        }
        let request = request
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| e.to_string())?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| e.to_string())?;
        let code = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok((code, body))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_http_host_and_port() {
        let endpoint = Endpoint::parse("http://127.0.0.1:9998/");
        assert!(matches!(&endpoint, Some(e) if e.host == "127.0.0.1" && e.port == 9998));
        assert_eq!(
            endpoint.map(|e| e.url),
            Some("http://127.0.0.1:9998".into())
        );
        let v6 = Endpoint::parse("http://[::1]:9998");
        assert!(matches!(&v6, Some(e) if e.host == "::1"));
        for bad in [
            "127.0.0.1:9998",
            "https://h:1",
            "http://h",
            "http://:1",
            "http://h:x",
        ] {
            assert!(Endpoint::parse(bad).is_none(), "{bad}");
        }
    }
}
