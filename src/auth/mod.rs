//! Client authentication: which challenge a client gets and whether its answers are right.
//!
//! Sans-IO: the session frames the bytes and hands us the bodies of the client's `p` messages;
//! [`ClientAuth`] says what to send back. Unknown users go through the same SCRAM exchange as
//! known ones, against a mock secret, and fail only at the proof, so a client cannot learn which
//! user names exist.

pub mod md5;
pub mod scram;
pub mod scram_client;

use std::fmt;

use rand::Rng;

use self::md5::verify_md5;
use self::scram::{ScramError, ScramSecret, ScramServer};

/// The only SASL mechanism we offer (no SCRAM-SHA-256-PLUS yet).
const SCRAM_SHA_256: &str = "SCRAM-SHA-256";

/// Mechanisms listed in AuthenticationSASL.
pub const SASL_MECHANISMS: &[&str] = &[SCRAM_SHA_256];

pub use crate::config::AuthMethod;

/// One configured user, with its SCRAM secret derived once at config load.
#[derive(Clone)]
pub struct UserSecret {
    /// User name as clients send it in the startup packet.
    pub name: String,
    /// Plaintext password (md5 needs it; SCRAM uses the derived secret).
    pub password: String,
    /// Challenge this user gets.
    pub method: AuthMethod,
    /// SCRAM secret derived from `password` with a random salt.
    pub scram: ScramSecret,
}

impl fmt::Debug for UserSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UserSecret")
            .field("name", &self.name)
            .field("method", &self.method)
            .finish_non_exhaustive()
    }
}

impl UserSecret {
    /// Builds the user's secrets; runs PBKDF2 (a few ms), so call it at config load only.
    pub fn new(name: &str, password: &str, method: AuthMethod) -> UserSecret {
        UserSecret {
            name: name.to_owned(),
            password: password.to_owned(),
            method,
            scram: ScramSecret::generate(password),
        }
    }

    /// Whether this secret was built from `password` for `method` (a reload keeps it then).
    pub fn matches(&self, password: &str, method: AuthMethod) -> bool {
        self.password == password && self.method == method
    }
}

/// The first authentication message the session sends after the startup packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FirstRequest {
    /// AuthenticationOk: the user is trusted, nothing more to ask.
    Ok,
    /// AuthenticationMD5Password with this salt.
    Md5 {
        /// Random salt the client must hash into its answer.
        salt: [u8; 4],
    },
    /// AuthenticationSASL listing these mechanisms.
    Sasl {
        /// Mechanism names, in order of preference.
        mechanisms: &'static [&'static str],
    },
}

/// What to send after a password message was accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthStep {
    /// Send AuthenticationSASLContinue with this data and wait for the next `p` message.
    Continue(Vec<u8>),
    /// Authenticated: send AuthenticationSASLFinal with `sasl_final` if any, then AuthenticationOk.
    Done {
        /// server-final-message of a SCRAM exchange.
        sasl_final: Option<Vec<u8>>,
    },
}

/// Why a login was refused; the session turns it into an ErrorResponse and closes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// Wrong password, or unknown user (deliberately indistinguishable).
    #[error("password authentication failed for user \"{user}\"")]
    Failed {
        /// User name from the startup packet.
        user: String,
    },
    /// The client broke the authentication protocol.
    #[error("protocol violation during authentication: {0}")]
    Protocol(&'static str),
}

impl AuthError {
    /// SQLSTATE for the ErrorResponse: 28P01 invalid_password or 08P01 protocol_violation.
    pub fn sqlstate(&self) -> &'static str {
        match self {
            AuthError::Failed { .. } => "28P01",
            AuthError::Protocol(_) => "08P01",
        }
    }
}

/// Whether a SCRAM exchange runs against a real user's secret or a mock one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Identity {
    Known,
    Unknown,
}

/// Where one login stands.
enum State {
    AwaitingMd5 {
        password: String,
        salt: [u8; 4],
    },
    AwaitingSaslInitial {
        scram: ScramServer,
        identity: Identity,
    },
    AwaitingSaslResponse {
        scram: ScramServer,
        identity: Identity,
    },
    Authenticated {
        client_key: Option<[u8; 32]>,
    },
    Failed,
}

/// One client's login, driven by the session with the bodies of its password messages.
pub struct ClientAuth {
    user: String,
    state: State,
}

impl ClientAuth {
    /// Starts a login for `user_name`; `user` is its configuration, `None` when unknown.
    ///
    /// An unknown user is asked exactly what a known one would be (`unknown_method`: pass the
    /// method most configured users have), and fails only at the password, so that the exchange
    /// does not reveal which users exist. `seed` keys the mock SCRAM secret of unknown users:
    /// keep it fixed for the process's life so that an unknown user always sees the same salt.
    pub fn start(
        user: Option<&UserSecret>,
        user_name: &str,
        unknown_method: AuthMethod,
        seed: &[u8; 32],
    ) -> (ClientAuth, FirstRequest) {
        let sasl = FirstRequest::Sasl {
            mechanisms: SASL_MECHANISMS,
        };
        let (state, first) = match user {
            Some(u) => match u.method {
                AuthMethod::Trust => (State::Authenticated { client_key: None }, FirstRequest::Ok),
                AuthMethod::Md5 => {
                    let mut salt = [0u8; 4];
                    rand::rng().fill_bytes(&mut salt);
                    let password = u.password.clone();
                    (
                        State::AwaitingMd5 { password, salt },
                        FirstRequest::Md5 { salt },
                    )
                }
                AuthMethod::ScramSha256 => {
                    let scram = ScramServer::new(u.scram.clone());
                    let identity = Identity::Known;
                    (State::AwaitingSaslInitial { scram, identity }, sasl)
                }
            },
            None if unknown_method == AuthMethod::Md5 => {
                let mut salt = [0u8; 4];
                rand::rng().fill_bytes(&mut salt);
                // A fresh random password per attempt: no md5 response can match it.
                let mut secret = [0u8; 32];
                rand::rng().fill_bytes(&mut secret);
                let password = secret.iter().map(|b| format!("{b:02x}")).collect();
                (
                    State::AwaitingMd5 { password, salt },
                    FirstRequest::Md5 { salt },
                )
            }
            // Trust cannot be mocked (it asks nothing); SCRAM then, failing at the proof.
            None => {
                let scram = ScramServer::new(ScramSecret::mock(user_name, seed));
                let identity = Identity::Unknown;
                (State::AwaitingSaslInitial { scram, identity }, sasl)
            }
        };
        let auth = ClientAuth {
            user: user_name.to_owned(),
            state,
        };
        (auth, first)
    }

    /// Handles the body of one `p` message: PasswordMessage, SASLInitialResponse or SASLResponse,
    /// depending on where the login stands. Any error ends the login.
    pub fn on_password_message(&mut self, body: &[u8]) -> Result<AuthStep, AuthError> {
        match std::mem::replace(&mut self.state, State::Failed) {
            State::AwaitingMd5 { password, salt } => {
                let response = parse_password(body)?;
                if !verify_md5(&self.user, &password, salt, response) {
                    return Err(self.failed());
                }
                self.state = State::Authenticated { client_key: None };
                Ok(AuthStep::Done { sasl_final: None })
            }
            State::AwaitingSaslInitial {
                mut scram,
                identity,
            } => {
                let data = parse_sasl_initial(body)?;
                let reply = scram.client_first(data).map_err(|e| self.scram_error(e))?;
                self.state = State::AwaitingSaslResponse { scram, identity };
                Ok(AuthStep::Continue(reply))
            }
            State::AwaitingSaslResponse {
                mut scram,
                identity,
            } => {
                let success = scram.client_final(body).map_err(|e| self.scram_error(e))?;
                // A mock secret cannot be matched in practice; refuse even if it were.
                if identity == Identity::Unknown {
                    return Err(self.failed());
                }
                self.state = State::Authenticated {
                    client_key: Some(success.client_key),
                };
                Ok(AuthStep::Done {
                    sasl_final: Some(success.server_final),
                })
            }
            finished @ State::Authenticated { .. } => {
                self.state = finished;
                Err(AuthError::Protocol("password message after authentication"))
            }
            State::Failed => Err(AuthError::Protocol(
                "password message after failed authentication",
            )),
        }
    }

    /// Whether the login has succeeded.
    pub fn is_authenticated(&self) -> bool {
        matches!(self.state, State::Authenticated { .. })
    }

    /// The ClientKey a successful SCRAM login recovered (for backend pass-through), if any.
    pub fn scram_client_key(&self) -> Option<[u8; 32]> {
        match self.state {
            State::Authenticated { client_key } => client_key,
            _ => None,
        }
    }

    fn failed(&self) -> AuthError {
        AuthError::Failed {
            user: self.user.clone(),
        }
    }

    /// A wrong proof is a wrong password; anything else is a protocol violation (as PostgreSQL).
    fn scram_error(&self, error: ScramError) -> AuthError {
        AuthError::Protocol(match error {
            ScramError::BadProof => return self.failed(),
            ScramError::Malformed(detail) | ScramError::InvalidVerifier(detail) => detail,
            ScramError::ChannelBindingUnsupported => {
                "client requested SCRAM channel binding, but SCRAM-SHA-256-PLUS is not offered"
            }
            ScramError::ChannelBindingMismatch => "SCRAM channel binding check failed",
            ScramError::NonceMismatch => "SCRAM nonce does not match",
            ScramError::OutOfOrder => "SCRAM message out of order",
        })
    }
}

/// PasswordMessage: one NUL-terminated string filling the whole body.
fn parse_password(body: &[u8]) -> Result<&[u8], AuthError> {
    match split_cstring(body) {
        Some((password, [])) => Ok(password),
        _ => Err(AuthError::Protocol("invalid password packet size")),
    }
}

/// SASLInitialResponse: mechanism cstring, then int32 length and that many bytes of data.
fn parse_sasl_initial(body: &[u8]) -> Result<&[u8], AuthError> {
    const MALFORMED: AuthError = AuthError::Protocol("malformed SASLInitialResponse message");
    let (mechanism, rest) = split_cstring(body).ok_or(MALFORMED)?;
    if mechanism != SCRAM_SHA_256.as_bytes() {
        return Err(AuthError::Protocol(
            "client selected an invalid SASL authentication mechanism",
        ));
    }
    let (len, data) = rest.split_first_chunk::<4>().ok_or(MALFORMED)?;
    // -1 would mean "no initial response"; every SCRAM client sends one, so it is refused.
    match usize::try_from(i32::from_be_bytes(*len)) {
        Ok(len) if len == data.len() => Ok(data),
        _ => Err(MALFORMED),
    }
}

/// Splits at the first NUL: the string before it and the bytes after it.
fn split_cstring(body: &[u8]) -> Option<(&[u8], &[u8])> {
    let nul = body.iter().position(|&b| b == 0)?;
    Some((body.get(..nul)?, body.get(nul + 1..)?))
}

/// Equality whose time does not depend on where the inputs differ (lengths are not secret).
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::authentication::md5_hash;
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
    use proptest::prelude::*;

    const SEED: [u8; 32] = [42; 32];

    /// A user whose SCRAM secret is cheap to derive (16 rounds) so tests stay fast.
    fn user(name: &str, password: &str, method: AuthMethod) -> UserSecret {
        UserSecret {
            name: name.to_owned(),
            password: password.to_owned(),
            method,
            scram: ScramSecret::from_password(password, b"salt-for-testing", 16),
        }
    }

    fn sasl_initial(mechanism: &str, data: &[u8]) -> Vec<u8> {
        let mut body = mechanism.as_bytes().to_vec();
        body.push(0);
        body.extend_from_slice(&i32::try_from(data.len()).unwrap().to_be_bytes());
        body.extend_from_slice(data);
        body
    }

    /// Drives a whole SCRAM login with the postgres-protocol client.
    fn scram_login(
        config: Option<&UserSecret>,
        name: &str,
        password: &str,
    ) -> (ClientAuth, Result<AuthStep, AuthError>) {
        let (mut auth, first) = ClientAuth::start(config, name, AuthMethod::ScramSha256, &SEED);
        assert_eq!(
            first,
            FirstRequest::Sasl {
                mechanisms: &["SCRAM-SHA-256"]
            }
        );
        let mut client = ScramSha256::new(password.as_bytes(), ChannelBinding::unsupported());
        let step = auth.on_password_message(&sasl_initial(SCRAM_SHA_256, client.message()));
        let Ok(AuthStep::Continue(server_first)) = step else {
            return (auth, step);
        };
        client.update(&server_first).unwrap();
        let step = auth.on_password_message(client.message());
        if let Ok(AuthStep::Done {
            sasl_final: Some(last),
        }) = &step
        {
            client.finish(last).unwrap();
        }
        (auth, step)
    }

    #[test]
    fn auth_method_reads_postgres_names_and_defaults_to_scram() {
        #[derive(serde::Deserialize)]
        struct Row {
            method: AuthMethod,
        }
        for (text, method) in [
            ("scram-sha-256", AuthMethod::ScramSha256),
            ("md5", AuthMethod::Md5),
            ("trust", AuthMethod::Trust),
        ] {
            let row: Row = toml::from_str(&format!("method = \"{text}\"")).unwrap();
            assert_eq!(row.method, method);
        }
        assert!(toml::from_str::<Row>("method = \"password\"").is_err());
        assert_eq!(AuthMethod::default(), AuthMethod::ScramSha256);
    }

    #[test]
    fn scram_user_with_right_password_logs_in_and_keeps_client_key() {
        let alice = user("alice", "wonderland", AuthMethod::ScramSha256);
        let (auth, step) = scram_login(Some(&alice), "alice", "wonderland");
        assert!(matches!(
            step,
            Ok(AuthStep::Done {
                sasl_final: Some(_)
            })
        ));
        assert!(auth.is_authenticated());
        assert!(auth.scram_client_key().is_some());
    }

    #[test]
    fn scram_user_with_wrong_password_fails_with_28p01() {
        let alice = user("alice", "wonderland", AuthMethod::ScramSha256);
        let (auth, step) = scram_login(Some(&alice), "alice", "looking-glass");
        let error = step.unwrap_err();
        assert_eq!(error.sqlstate(), "28P01");
        assert_eq!(
            error.to_string(),
            "password authentication failed for user \"alice\""
        );
        assert!(!auth.is_authenticated());
    }

    #[test]
    fn unknown_user_gets_the_same_flow_and_fails_at_the_end() {
        let (_, step) = scram_login(None, "mallory", "anything");
        assert_eq!(
            step.unwrap_err(),
            AuthError::Failed {
                user: "mallory".to_owned()
            }
        );
    }

    #[test]
    fn user_secret_new_derives_a_working_scram_secret() {
        let bob = UserSecret::new("bob", "builder", AuthMethod::default());
        assert!(!format!("{bob:?}").contains("builder"));
        let (_, step) = scram_login(Some(&bob), "bob", "builder");
        assert!(step.is_ok());
    }

    #[test]
    fn md5_user_logs_in_with_the_right_hash_only() {
        let carol = user("carol", "pw", AuthMethod::Md5);
        for (password, ok) in [("pw", true), ("wrong", false)] {
            let (mut auth, first) =
                ClientAuth::start(Some(&carol), "carol", AuthMethod::ScramSha256, &SEED);
            let FirstRequest::Md5 { salt } = first else {
                panic!("expected md5, got {first:?}")
            };
            let mut body = md5_hash(b"carol", password.as_bytes(), salt).into_bytes();
            body.push(0);
            let step = auth.on_password_message(&body);
            assert_eq!(step.is_ok(), ok);
            assert_eq!(auth.is_authenticated(), ok);
        }
    }

    #[test]
    fn where_users_use_md5_an_unknown_user_is_asked_for_md5_too_and_fails() {
        let (mut auth, first) = ClientAuth::start(None, "mallory", AuthMethod::Md5, &SEED);
        let FirstRequest::Md5 { salt } = first else {
            panic!("expected md5 like the configured users, got {first:?}")
        };
        for guess in ["", "pw", "mallory"] {
            let mut body = md5_hash(b"mallory", guess.as_bytes(), salt).into_bytes();
            body.push(0);
            let error = auth.on_password_message(&body).unwrap_err();
            assert_eq!(error.sqlstate(), "28P01");
            assert!(!auth.is_authenticated());
            (auth, _) = ClientAuth::start(None, "mallory", AuthMethod::Md5, &SEED);
        }
    }

    #[test]
    fn trust_user_is_let_in_at_once() {
        let dave = user("dave", "", AuthMethod::Trust);
        let (mut auth, first) =
            ClientAuth::start(Some(&dave), "dave", AuthMethod::ScramSha256, &SEED);
        assert_eq!(first, FirstRequest::Ok);
        assert!(auth.is_authenticated());
        let error = auth.on_password_message(b"x\0").unwrap_err();
        assert_eq!(error.sqlstate(), "08P01");
        assert!(auth.is_authenticated());
    }

    #[test]
    fn malformed_password_messages_are_protocol_violations() {
        let carol = user("carol", "pw", AuthMethod::Md5);
        for body in [&b""[..], b"md5abc", b"md5abc\0trailing"] {
            let (mut auth, _) =
                ClientAuth::start(Some(&carol), "carol", AuthMethod::ScramSha256, &SEED);
            assert_eq!(
                auth.on_password_message(body).unwrap_err().sqlstate(),
                "08P01"
            );
        }
        let alice = user("alice", "pw", AuthMethod::ScramSha256);
        let mut wrong_len = sasl_initial(SCRAM_SHA_256, b"n,,n=,r=abc");
        wrong_len.pop();
        let cases = [
            sasl_initial("SCRAM-SHA-256-PLUS", b"p=tls-server-end-point,,n=,r=abc"),
            sasl_initial("PLAIN", b"x"),
            b"SCRAM-SHA-256\0\xff\xff\xff\xff".to_vec(),
            b"SCRAM-SHA-256\0\0\0".to_vec(),
            b"SCRAM-SHA-256".to_vec(),
            wrong_len,
            sasl_initial(SCRAM_SHA_256, b"p=tls-server-end-point,,n=,r=abc"),
            sasl_initial(SCRAM_SHA_256, b"garbage"),
        ];
        for body in cases {
            let (mut auth, _) =
                ClientAuth::start(Some(&alice), "alice", AuthMethod::ScramSha256, &SEED);
            let error = auth.on_password_message(&body).unwrap_err();
            assert_eq!(error.sqlstate(), "08P01", "{body:?}");
            // The login is over: a retry is refused too.
            assert!(auth.on_password_message(&body).is_err());
        }
    }

    #[test]
    fn constant_time_eq_compares_whole_slices() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert!(constant_time_eq(b"", b""));
    }

    proptest! {
        #[test]
        fn random_password_messages_never_panic(
            method in prop_oneof![Just(AuthMethod::ScramSha256), Just(AuthMethod::Md5)],
            known in any::<bool>(),
            bodies in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 1..4),
        ) {
            let config = user("u", "pw", method);
            let (mut auth, _) = ClientAuth::start(known.then_some(&config), "u", method, &SEED);
            for body in bodies {
                let _ = auth.on_password_message(&body);
            }
            prop_assert!(!auth.is_authenticated());
        }
    }
}
