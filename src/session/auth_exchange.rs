//! Drives client authentication over the wire: sends the request the user's method calls for and
//! feeds the client's answers to the sans-IO state machine in `crate::auth`.

use bytes::{Buf, BytesMut};
use pgvigil_proto::{encode, frontend, next_message, sqlstate};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::startup::ClientStartup;
use super::SessionError;
use crate::auth::{AuthStep, ClientAuth, FirstRequest};
use crate::proxy::Proxy;
use crate::stream::Stream;

/// Largest authentication message accepted from a client (SCRAM messages are a few hundred bytes).
const AUTH_MESSAGE_LIMIT: usize = 16 * 1024;

/// Authenticates the client; on success nothing has been sent yet for the final AuthenticationOk
/// (the caller sends it with the rest of the greeting).
pub async fn authenticate(
    stream: &mut Stream,
    buf: &mut BytesMut,
    startup: &ClientStartup,
    proxy: &Proxy,
) -> Result<(), SessionError> {
    let users = proxy.users.load_full();
    let user = users.get(startup.user());
    let (mut auth, first) = ClientAuth::start(
        user,
        startup.user(),
        proxy.unknown_user_method(),
        &proxy.auth_seed,
    );
    let mut out = BytesMut::with_capacity(128);
    match first {
        FirstRequest::Ok => return Ok(()),
        FirstRequest::Md5 { salt } => encode::auth_md5_password(&mut out, salt),
        FirstRequest::Sasl { mechanisms } => encode::auth_sasl(&mut out, mechanisms),
    }
    stream.write_all(&out).await?;
    loop {
        let body = read_password_message(stream, buf).await?;
        let step = auth
            .on_password_message(&body)
            .map_err(|e| SessionError::Refused {
                code: e.sqlstate(),
                message: e.to_string(),
            })?;
        out.clear();
        match step {
            AuthStep::Continue(data) => encode::auth_sasl_continue(&mut out, &data),
            AuthStep::Done { sasl_final } => {
                if let Some(data) = sasl_final {
                    encode::auth_sasl_final(&mut out, &data);
                    stream.write_all(&out).await?;
                }
                return Ok(());
            }
        }
        stream.write_all(&out).await?;
    }
}

/// Reads one PasswordMessage-family ('p') message and returns its body.
async fn read_password_message(
    stream: &mut Stream,
    buf: &mut BytesMut,
) -> Result<Vec<u8>, SessionError> {
    loop {
        let found = next_message(buf, AUTH_MESSAGE_LIMIT).map_err(|e| SessionError::Refused {
            code: sqlstate::PROTOCOL_VIOLATION,
            message: e.to_string(),
        })?;
        if let Some(message) = found {
            if message.tag != frontend::tag::PASSWORD {
                return Err(SessionError::Refused {
                    code: sqlstate::PROTOCOL_VIOLATION,
                    message: format!(
                        "expected password response, got message type {}",
                        char::from(message.tag).escape_default()
                    ),
                });
            }
            let body = message.body.to_vec();
            let len = message.len();
            buf.advance(len);
            return Ok(body);
        }
        buf.reserve(1024);
        if stream.read_buf(buf).await? == 0 {
            return Err(SessionError::Closed);
        }
    }
}
