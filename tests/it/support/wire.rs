//! A client that speaks the PostgreSQL protocol by hand, for tests that must see what a driver
//! hides: ReadyForQuery's status byte, the statement names, the messages of one unit.

use std::time::Duration;

use bytes::{Buf, BufMut, BytesMut};
use pgvigil_proto::backend::ErrorFields;
use pgvigil_proto::encode;
use pgvigil_proto::frame::next_message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{TestProxy, APP_DB, APP_USER};

/// How long pgvigil may take to answer.
const PATIENCE: Duration = Duration::from_secs(30);

/// A client that speaks the protocol by hand, to see ReadyForQuery's status byte.
pub(crate) struct Wire {
    tcp: TcpStream,
    buf: BytesMut,
}

/// What came back up to ReadyForQuery.
#[derive(Debug, Default)]
pub(crate) struct Answer {
    pub(crate) rows: Vec<Vec<String>>,
    /// SQLSTATE and message of each ErrorResponse.
    pub(crate) errors: Vec<(String, String)>,
    /// CommandComplete tags.
    pub(crate) tags: Vec<String>,
    /// ParameterStatus messages, name and value.
    pub(crate) params: Vec<(String, String)>,
    /// ReadyForQuery's status byte.
    pub(crate) status: u8,
    /// The type of every message, in order.
    pub(crate) kinds: Vec<u8>,
}

impl Answer {
    pub(crate) fn codes(&self) -> Vec<&str> {
        self.errors.iter().map(|(code, _)| code.as_str()).collect()
    }
}

impl Wire {
    /// Logs in as `app` (trust) and reads up to ReadyForQuery.
    pub(crate) async fn login(proxy: &TestProxy) -> Wire {
        Wire::login_at(proxy.addr).await
    }

    /// Logs in as `app` (trust) to a pgvigil listening at `addr`.
    pub(crate) async fn login_at(addr: std::net::SocketAddr) -> Wire {
        Wire::login_with(addr, APP_USER, &[]).await
    }

    /// Logs in as `user` (trust) to database `app` at `addr` (pgvigil or a node) with the
    /// startup parameters `params` besides user and database.
    pub(crate) async fn login_with(
        addr: std::net::SocketAddr,
        user: &str,
        params: &[(&[u8], &[u8])],
    ) -> Wire {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let mut wire = Wire {
            tcp,
            buf: BytesMut::new(),
        };
        let mut startup = BytesMut::new();
        let mut all: Vec<(&[u8], &[u8])> =
            vec![(b"user", user.as_bytes()), (b"database", APP_DB.as_bytes())];
        all.extend_from_slice(params);
        encode::startup_message(&mut startup, &all);
        wire.tcp.write_all(&startup).await.unwrap();
        let answer = wire.answer().await;
        assert!(answer.errors.is_empty(), "login: {:?}", answer.errors);
        wire
    }

    pub(crate) async fn query(&mut self, sql: &str) -> Answer {
        self.exchange(|out| encode::query(out, sql.as_bytes()))
            .await
    }

    /// Sends what `build` writes and reads the answer up to ReadyForQuery.
    pub(crate) async fn exchange(&mut self, build: impl FnOnce(&mut BytesMut)) -> Answer {
        self.send(build).await;
        self.answer().await
    }

    /// Sends what `build` writes.
    pub(crate) async fn send(&mut self, build: impl FnOnce(&mut BytesMut)) {
        let mut out = BytesMut::new();
        build(&mut out);
        self.tcp.write_all(&out).await.unwrap();
    }

    pub(crate) async fn answer(&mut self) -> Answer {
        let mut answer = Answer::default();
        loop {
            let (tag, body) = self.recv().await;
            answer.kinds.push(tag);
            match tag {
                b'D' => answer.rows.push(data_row(&body)),
                b'E' => {
                    let fields = ErrorFields::parse(&body).unwrap();
                    let text =
                        |v: Option<&[u8]>| String::from_utf8_lossy(v.unwrap_or_default()).into();
                    answer
                        .errors
                        .push((text(fields.sqlstate()), text(fields.message())));
                }
                b'C' => answer
                    .tags
                    .push(String::from_utf8_lossy(&body[..body.len() - 1]).into()),
                b'S' => {
                    let text = String::from_utf8_lossy(&body);
                    let mut parts = text.split('\0');
                    let (name, value) = (parts.next(), parts.next());
                    answer.params.push((
                        name.unwrap_or_default().into(),
                        value.unwrap_or_default().into(),
                    ));
                }
                b'Z' => {
                    answer.status = body[0];
                    return answer;
                }
                _ => {}
            }
        }
    }

    /// Reads until at least `n` bytes wait unparsed, for a test that stops reading mid-answer.
    pub(crate) async fn read_at_least(&mut self, n: usize) {
        tokio::time::timeout(PATIENCE, async {
            while self.buf.len() < n {
                let read = self.tcp.read_buf(&mut self.buf).await.unwrap();
                assert!(read > 0, "pgvigil closed the connection");
            }
        })
        .await
        .expect("no answer from pgvigil in time")
    }

    /// Reads until pgvigil closes the connection; returns every byte not taken as a message yet.
    pub(crate) async fn read_until_closed(&mut self) -> BytesMut {
        tokio::time::timeout(PATIENCE, async {
            while self.tcp.read_buf(&mut self.buf).await.is_ok_and(|n| n > 0) {}
        })
        .await
        .expect("pgvigil did not close the connection in time");
        std::mem::take(&mut self.buf)
    }

    /// Waits, sending nothing, until pgvigil closes the connection; returns each message it sent
    /// meanwhile: an ErrorResponse as its severity and SQLSTATE ("FATAL 08006"), any other as
    /// its type. None if the connection is still open after [`PATIENCE`].
    pub(crate) async fn last_words(&mut self) -> Option<Vec<String>> {
        let closed = tokio::time::timeout(PATIENCE, async {
            while self.tcp.read_buf(&mut self.buf).await.is_ok_and(|n| n > 0) {}
        });
        closed.await.ok()?;
        let mut words = Vec::new();
        while let Some(message) = next_message(&self.buf, 1 << 20).unwrap() {
            let len = message.len();
            words.push(match message.tag {
                b'E' => {
                    let fields = ErrorFields::parse(message.body).unwrap();
                    let text = |v: Option<&[u8]>| {
                        String::from_utf8_lossy(v.unwrap_or_default()).into_owned()
                    };
                    format!("{} {}", text(fields.severity()), text(fields.sqlstate()))
                }
                tag => char::from(tag).to_string(),
            });
            self.buf.advance(len);
        }
        assert!(self.buf.is_empty(), "a message cut short: {:?}", self.buf);
        Some(words)
    }

    pub(crate) async fn recv(&mut self) -> (u8, Vec<u8>) {
        tokio::time::timeout(PATIENCE, async {
            loop {
                if let Some(message) = next_message(&self.buf, 1 << 20).unwrap() {
                    let whole = (message.tag, message.body.to_vec());
                    let len = message.len();
                    self.buf.advance(len);
                    return whole;
                }
                let n = self.tcp.read_buf(&mut self.buf).await.unwrap();
                assert!(n > 0, "pgvigil closed the connection");
            }
        })
        .await
        .expect("no answer from pgvigil in time")
    }
}

/// The text columns of a DataRow body (NULL as an empty string).
fn data_row(mut body: &[u8]) -> Vec<String> {
    let count = body.get_i16();
    (0..count)
        .map(|_| match body.get_i32() {
            -1 => String::new(),
            len => {
                let (value, rest) = body.split_at(len as usize);
                body = rest;
                String::from_utf8(value.to_vec()).unwrap()
            }
        })
        .collect()
}

/// Parse of statement `name` (no parameter types given).
pub(crate) fn parse(out: &mut BytesMut, name: &str, sql: &str) {
    encode::message(out, b'P', |b| {
        b.put_slice(name.as_bytes());
        b.put_u8(0);
        b.put_slice(sql.as_bytes());
        b.put_u8(0);
        b.put_i16(0);
    });
}

/// Bind of statement `name` to the unnamed portal (no parameters, text results), and Execute.
pub(crate) fn bind_execute(out: &mut BytesMut, name: &str) {
    encode::message(out, b'B', |b| {
        b.put_u8(0);
        b.put_slice(name.as_bytes());
        b.put_u8(0);
        b.put_i16(0);
        b.put_i16(0);
        b.put_i16(0);
    });
    encode::message(out, b'E', |b| {
        b.put_u8(0);
        b.put_i32(0);
    });
}

/// Close of statement `name`.
pub(crate) fn close(out: &mut BytesMut, name: &str) {
    encode::message(out, b'C', |b| {
        b.put_u8(b'S');
        b.put_slice(name.as_bytes());
        b.put_u8(0);
    });
}
