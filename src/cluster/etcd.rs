//! A small client for etcd's v3 JSON gateway (`POST /v3/...`, keys and values in base64, 64-bit
//! integers as strings): plain HTTP/1.1 over a fresh TCP (or TLS) connection per request, so the
//! build needs neither `protoc` nor an HTTP stack. Requests go to the endpoint that answered last,
//! then to the others in turn.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use rustls_pki_types::ServerName;
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tracing::debug;

use crate::config::{endpoint_address, EtcdConfig};

/// Largest response accepted from etcd (our keys hold a few hundred bytes).
const MAX_RESPONSE: usize = 4 << 20;

/// Why a request to etcd failed.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// No endpoint could be reached or answered in time; the last reason is kept.
    #[error("no etcd endpoint answered: {0}")]
    Unreachable(String),
    /// etcd answered with an error status.
    #[error("etcd refused {path}: HTTP {status}: {message}")]
    Refused {
        /// The gateway path.
        path: &'static str,
        /// The HTTP status.
        status: u16,
        /// etcd's message.
        message: String,
    },
    /// The answer was not the HTTP or JSON etcd's gateway sends.
    #[error("unexpected answer from etcd to {path}: {reason}")]
    Malformed {
        /// The gateway path.
        path: &'static str,
        /// What was wrong.
        reason: String,
    },
}

/// One key as etcd returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    /// The value (decoded from base64).
    pub value: Vec<u8>,
    /// Revision at which the key was created.
    pub create_revision: i64,
    /// Revision of its last change.
    pub mod_revision: i64,
    /// The lease it is attached to (0: none).
    pub lease: i64,
}

/// A condition of a transaction (etcd's `Compare`).
#[derive(Debug, Clone)]
pub enum Compare {
    /// The key does not exist (its create revision is 0).
    Absent(String),
    /// The key is attached to this lease.
    Lease(String, i64),
}

/// A write of a transaction (etcd's `RequestOp`).
#[derive(Debug, Clone)]
pub enum Operation {
    /// Sets a key, attached to a lease when not 0.
    Put {
        /// The key.
        key: String,
        /// Its value.
        value: Vec<u8>,
        /// The lease (0: none).
        lease: i64,
    },
    /// Deletes a key.
    Delete(String),
    /// Reads a key (its value shows in [`TxnResult::read`]).
    Get(String),
}

/// What a transaction did.
#[derive(Debug, Clone)]
pub struct TxnResult {
    /// Whether every comparison held (the success branch ran).
    pub succeeded: bool,
    /// The store's revision after the transaction.
    pub revision: i64,
    /// The keys the branch that ran read with [`Operation::Get`], in order.
    pub read: Vec<Option<KeyValue>>,
}

/// A lease etcd granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    /// The lease id.
    pub id: i64,
    /// Its time to live, in seconds.
    pub ttl: i64,
}

/// How the client's connections are made.
enum Transport {
    /// Plain TCP (`http://` endpoints).
    Plain,
    /// TLS (`https://` endpoints) with this client configuration.
    Tls(TlsConnector),
    /// TLS was asked for but its files could not be used (checked at start; a file that went
    /// away since): every request fails with this reason.
    Broken(String),
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Transport::Plain => f.write_str("Plain"),
            Transport::Tls(_) => f.write_str("Tls"),
            Transport::Broken(why) => write!(f, "Broken({why:?})"),
        }
    }
}

/// The client: endpoints, transport, timeout and the credentials of `[cluster.etcd]`.
#[derive(Debug)]
pub struct Etcd {
    endpoints: Vec<String>,
    transport: Transport,
    timeout: Duration,
    credentials: Option<(String, String)>,
    /// The auth token from `/v3/auth/authenticate`, when etcd has authentication on.
    token: Mutex<Option<String>>,
    /// The endpoint that answered last.
    current: AtomicUsize,
}

impl Etcd {
    /// A client for the validated `config` (endpoints that are not `host:port` are skipped).
    pub fn new(config: &EtcdConfig) -> Etcd {
        Etcd {
            endpoints: config
                .endpoints
                .iter()
                .filter_map(|e| endpoint_address(e).map(str::to_owned))
                .collect(),
            transport: match crate::tls::etcd_client_config(config) {
                Ok(None) => Transport::Plain,
                Ok(Some(tls)) => Transport::Tls(TlsConnector::from(tls)),
                Err(e) => Transport::Broken(e.to_string()),
            },
            timeout: config.timeout,
            credentials: config.user.clone().zip(config.password.clone()),
            token: Mutex::new(None),
            current: AtomicUsize::new(0),
        }
    }

    /// Grants a lease of `ttl` seconds.
    pub async fn lease_grant(&self, ttl: i64) -> Result<Grant, EtcdError> {
        const PATH: &str = "/v3/lease/grant";
        let answer = self.call(PATH, &json!({ "TTL": ttl })).await?;
        Ok(Grant {
            id: int(&answer, "ID"),
            ttl: int(&answer, "TTL"),
        })
    }

    /// Renews lease `id`; the TTL it has again, or None when the lease is gone (expired or
    /// revoked).
    pub async fn lease_keepalive(&self, id: i64) -> Result<Option<i64>, EtcdError> {
        const PATH: &str = "/v3/lease/keepalive";
        let answer = self.call(PATH, &json!({ "ID": id.to_string() })).await?;
        // A streaming call: the gateway wraps each message in "result".
        let result = answer.get("result").unwrap_or(&answer);
        let ttl = int(result, "TTL");
        Ok((ttl > 0).then_some(ttl))
    }

    /// Revokes lease `id`, deleting every key attached to it.
    pub async fn lease_revoke(&self, id: i64) -> Result<(), EtcdError> {
        const PATH: &str = "/v3/lease/revoke";
        self.call(PATH, &json!({ "ID": id.to_string() })).await?;
        Ok(())
    }

    /// Reads `key`.
    pub async fn get(&self, key: &str) -> Result<Option<KeyValue>, EtcdError> {
        const PATH: &str = "/v3/kv/range";
        let answer = self
            .call(PATH, &json!({ "key": BASE64.encode(key) }))
            .await?;
        first_kv(PATH, &answer)
    }

    /// Every key under `prefix`, with its value.
    pub async fn get_prefix(&self, prefix: &str) -> Result<Vec<(String, KeyValue)>, EtcdError> {
        const PATH: &str = "/v3/kv/range";
        let request = json!({
            "key": BASE64.encode(prefix),
            "range_end": BASE64.encode(prefix_end(prefix)),
        });
        let answer = self.call(PATH, &request).await?;
        let mut found = Vec::new();
        for kv in answer
            .get("kvs")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let key = decode(PATH, kv.get("key"))?;
            let single = json!({ "kvs": [kv] });
            if let Some(value) = first_kv(PATH, &single)? {
                found.push((String::from_utf8_lossy(&key).into_owned(), value));
            }
        }
        Ok(found)
    }

    /// Sets `key`, attached to `lease` when not 0.
    pub async fn put(&self, key: &str, value: &[u8], lease: i64) -> Result<(), EtcdError> {
        const PATH: &str = "/v3/kv/put";
        let request = json!({
            "key": BASE64.encode(key), "value": BASE64.encode(value), "lease": lease.to_string(),
        });
        self.call(PATH, &request).await?;
        Ok(())
    }

    /// Runs `success` if every comparison in `compare` holds, `failure` otherwise, atomically.
    pub async fn txn(
        &self,
        compare: &[Compare],
        success: &[Operation],
        failure: &[Operation],
    ) -> Result<TxnResult, EtcdError> {
        const PATH: &str = "/v3/kv/txn";
        let compare: Vec<Value> = compare.iter().map(compare_json).collect();
        let request = json!({
            "compare": compare,
            "success": success.iter().map(operation_json).collect::<Vec<_>>(),
            "failure": failure.iter().map(operation_json).collect::<Vec<_>>(),
        });
        let answer = self.call(PATH, &request).await?;
        let succeeded = answer
            .get("succeeded")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let mut read = Vec::new();
        for response in answer
            .get("responses")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if let Some(range) = response.get("response_range") {
                read.push(first_kv(PATH, range)?);
            }
        }
        Ok(TxnResult {
            succeeded,
            revision: answer.get("header").map_or(0, |h| int(h, "revision")),
            read,
        })
    }

    /// Posts `body` to the gateway's `path` (e.g. `/v3/auth/enable`) and returns etcd's answer,
    /// authenticating first when credentials are configured (and once more when etcd says the
    /// token is no longer valid).
    pub async fn call(&self, path: &'static str, body: &Value) -> Result<Value, EtcdError> {
        if self.credentials.is_none() {
            return self.post(path, body, None).await;
        }
        let token = match self.token() {
            Some(token) => token,
            None => self.authenticate().await?,
        };
        match self.post(path, body, Some(&token)).await {
            Err(EtcdError::Refused { message, .. }) if message.contains("token") => {
                let token = self.authenticate().await?;
                self.post(path, body, Some(&token)).await
            }
            other => other,
        }
    }

    fn token(&self) -> Option<String> {
        self.token
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Logs in with `cluster.etcd.user` and keeps the token.
    async fn authenticate(&self) -> Result<String, EtcdError> {
        const PATH: &str = "/v3/auth/authenticate";
        let Some((user, password)) = &self.credentials else {
            return Err(EtcdError::Malformed {
                path: PATH,
                reason: "no credentials configured".into(),
            });
        };
        let answer = self
            .post(PATH, &json!({ "name": user, "password": password }), None)
            .await?;
        let token = answer
            .get("token")
            .and_then(Value::as_str)
            .ok_or_else(|| EtcdError::Malformed {
                path: PATH,
                reason: "no token in the answer".into(),
            })?
            .to_owned();
        *self
            .token
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(token.clone());
        Ok(token)
    }

    /// Posts to each endpoint in turn, starting with the one that answered last, until one
    /// answers; an HTTP error status is etcd's answer and is not retried elsewhere.
    async fn post(
        &self,
        path: &'static str,
        body: &Value,
        token: Option<&str>,
    ) -> Result<Value, EtcdError> {
        let body = body.to_string();
        let first = self.current.load(Ordering::Relaxed);
        let mut last = String::from("no endpoint configured");
        for i in 0..self.endpoints.len() {
            let index = (first + i) % self.endpoints.len();
            let endpoint = &self.endpoints[index];
            let exchange = exchange(&self.transport, endpoint, path, &body, token);
            let raw = match tokio::time::timeout(self.timeout, exchange).await {
                Ok(Ok(raw)) => raw,
                Ok(Err(e)) => {
                    debug!(%endpoint, error = %e, "etcd endpoint failed");
                    last = format!("{endpoint}: {e}");
                    continue;
                }
                Err(_) => {
                    debug!(%endpoint, "etcd endpoint timed out");
                    last = format!("{endpoint}: no answer within {:?}", self.timeout);
                    continue;
                }
            };
            self.current.store(index, Ordering::Relaxed);
            return parse_response(path, &raw);
        }
        Err(EtcdError::Unreachable(last))
    }
}

/// One HTTP/1.1 request on a fresh connection (`Connection: close`, TLS with `https://`
/// endpoints); the raw response.
async fn exchange(
    transport: &Transport,
    endpoint: &str,
    path: &str,
    body: &str,
    token: Option<&str>,
) -> std::io::Result<Vec<u8>> {
    let connector = match transport {
        Transport::Plain => None,
        Transport::Tls(connector) => Some(connector),
        Transport::Broken(why) => return Err(std::io::Error::other(why.clone())),
    };
    let stream = TcpStream::connect(endpoint).await?;
    let Some(connector) = connector else {
        return request(stream, endpoint, path, body, token).await;
    };
    let host = endpoint
        .rsplit_once(':')
        .map_or(endpoint, |(host, _)| host)
        .trim_start_matches('[')
        .trim_end_matches(']');
    let name = ServerName::try_from(host.to_owned())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let stream = connector.connect(name, stream).await?;
    request(stream, endpoint, path, body, token).await
}

/// Sends the request on `stream` and reads the whole response.
async fn request<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    endpoint: &str,
    path: &str,
    body: &str,
    token: Option<&str>,
) -> std::io::Result<Vec<u8>> {
    let authorization = token.map_or(String::new(), |t| format!("Authorization: {t}\r\n"));
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: {endpoint}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n{authorization}\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await?;
    let mut raw = Vec::new();
    (&mut stream)
        .take(MAX_RESPONSE as u64)
        .read_to_end(&mut raw)
        .await?;
    Ok(raw)
}

/// The JSON body of an HTTP response, or etcd's error.
fn parse_response(path: &'static str, raw: &[u8]) -> Result<Value, EtcdError> {
    let malformed = |reason: &str| EtcdError::Malformed {
        path,
        reason: reason.to_owned(),
    };
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| malformed("no end of headers"))?;
    let head = std::str::from_utf8(&raw[..split]).map_err(|_| malformed("headers not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| malformed("no HTTP status line"))?;
    let chunked = lines.any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = &raw[split + 4..];
    let body = if chunked {
        dechunk(body).ok_or_else(|| malformed("bad chunked encoding"))?
    } else {
        body.to_vec()
    };
    let value: Value = serde_json::from_slice(&body)
        .map_err(|e| malformed(&format!("not JSON ({e}) with HTTP {status}")))?;
    if status != 200 {
        let message = value
            .get("message")
            .or_else(|| value.get("error"))
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned();
        return Err(EtcdError::Refused {
            path,
            status,
            message,
        });
    }
    // A streaming call reports its error inside the message.
    if let Some(error) = value.get("error") {
        return Err(EtcdError::Refused {
            path,
            status,
            message: error
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned(),
        });
    }
    Ok(value)
}

/// The body of a chunked transfer (RFC 9112 section 7.1), trailers ignored.
fn dechunk(mut body: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = body.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&body[..line_end]).ok()?;
        let size_text = size_text.split(';').next()?.trim();
        let size = usize::from_str_radix(size_text, 16).ok()?;
        body = &body[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(body.get(..size)?);
        body = body.get(size + 2..)?;
    }
}

/// A 64-bit integer field, which the gateway writes as a string (absent: 0, protobuf's default).
fn int(value: &Value, field: &str) -> i64 {
    match value.get(field) {
        Some(Value::String(s)) => s.parse().unwrap_or(0),
        Some(Value::Number(n)) => n.as_i64().unwrap_or(0),
        _ => 0,
    }
}

/// The end of the range of keys starting with `prefix`: the prefix with its last byte raised
/// by one (etcd's convention; trailing 0xff bytes are dropped first).
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Every byte was 0xff: "\0" means every key from the start.
    vec![0]
}

/// A base64 field, decoded (absent: empty, protobuf's default).
fn decode(path: &'static str, field: Option<&Value>) -> Result<Vec<u8>, EtcdError> {
    match field.and_then(Value::as_str) {
        Some(text) => BASE64.decode(text).map_err(|e| EtcdError::Malformed {
            path,
            reason: format!("not base64: {e}"),
        }),
        None => Ok(Vec::new()),
    }
}

/// The first key of a range answer.
fn first_kv(path: &'static str, range: &Value) -> Result<Option<KeyValue>, EtcdError> {
    let Some(kv) = range
        .get("kvs")
        .and_then(Value::as_array)
        .and_then(|kvs| kvs.first())
    else {
        return Ok(None);
    };
    let value = decode(path, kv.get("value"))?;
    Ok(Some(KeyValue {
        value,
        create_revision: int(kv, "create_revision"),
        mod_revision: int(kv, "mod_revision"),
        lease: int(kv, "lease"),
    }))
}

fn compare_json(compare: &Compare) -> Value {
    match compare {
        Compare::Absent(key) => json!({
            "key": BASE64.encode(key), "target": "CREATE", "result": "EQUAL",
            "create_revision": "0",
        }),
        Compare::Lease(key, lease) => json!({
            "key": BASE64.encode(key), "target": "LEASE", "result": "EQUAL",
            "lease": lease.to_string(),
        }),
    }
}

fn operation_json(operation: &Operation) -> Value {
    match operation {
        Operation::Put { key, value, lease } => json!({ "request_put": {
            "key": BASE64.encode(key), "value": BASE64.encode(value), "lease": lease.to_string(),
        }}),
        Operation::Delete(key) => json!({ "request_delete_range": { "key": BASE64.encode(key) }}),
        Operation::Get(key) => json!({ "request_range": { "key": BASE64.encode(key) }}),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_range_ends_after_the_last_key_with_that_prefix() {
        assert_eq!(prefix_end("/p/members/"), b"/p/members0".to_vec());
        assert_eq!(prefix_end(""), vec![0]);
    }

    #[test]
    fn responses_parse_plain_and_chunked_and_errors_carry_etcds_message() {
        let plain = b"HTTP/1.1 200 OK\r\nContent-Length: 14\r\n\r\n{\"TTL\":\"10\"}\n";
        let value = parse_response("/p", plain).unwrap_or_default();
        assert_eq!(int(&value, "TTL"), 10);
        let chunked =
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{\"ID\"\r\n6\r\n:\"42\"}\r\n0\r\n\r\n";
        let value = parse_response("/p", chunked).unwrap_or_default();
        assert_eq!(int(&value, "ID"), 42);
        let refused = b"HTTP/1.1 400 Bad Request\r\n\r\n{\"error\":\"x\",\"message\":\"etcdserver: requested lease not found\",\"code\":5}";
        match parse_response("/p", refused) {
            Err(EtcdError::Refused {
                status, message, ..
            }) => assert_eq!(
                (status, message.as_str()),
                (400, "etcdserver: requested lease not found")
            ),
            other => panic!("{other:?}"),
        }
    }
}
