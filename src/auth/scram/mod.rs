//! SCRAM-SHA-256 server side (RFC 5802, RFC 7677) as PostgreSQL speaks it.
//!
//! Our own implementation rather than a library's because a successful exchange must hand back
//! the ClientKey recovered from the proof: with it pgvigil can later log in to a backend as the
//! same user without knowing the password (auth pass-through, as PgBouncer does).
//!
//! PostgreSQL flavour (src/backend/libpq/auth-scram.c): the `n=` user name of the client-first
//! message is ignored (the startup packet names the user), and we do not offer
//! SCRAM-SHA-256-PLUS, so the gs2 channel-binding flag may be `n` or `y` but never `p`.

use std::fmt;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hmac::{Hmac, KeyInit, Mac};
use rand::Rng;
use sha2::{Digest, Sha256};

use super::constant_time_eq;

/// Iteration count PostgreSQL uses by default (`scram_iterations`).
pub const DEFAULT_ITERATIONS: u32 = 4096;
/// Salt length PostgreSQL uses (`SCRAM_DEFAULT_SALT_LEN`).
const SALT_LEN: usize = 16;
/// Raw server nonce length PostgreSQL uses (`SCRAM_RAW_NONCE_LEN`).
const SERVER_NONCE_LEN: usize = 18;
/// Output size of SHA-256, and so of every SCRAM key and proof.
pub(super) const KEY_LEN: usize = 32;
/// Prefix of a SCRAM verifier in `pg_authid.rolpassword`.
const VERIFIER_PREFIX: &str = "SCRAM-SHA-256$";

type HmacSha256 = Hmac<Sha256>;

/// What the server must know about one user's password to run SCRAM: never the password itself.
#[derive(Clone, PartialEq, Eq)]
pub struct ScramSecret {
    /// Salt given to the client for PBKDF2.
    pub salt: Vec<u8>,
    /// PBKDF2 iteration count given to the client.
    pub iterations: u32,
    /// `H(ClientKey)`: checks the client's proof.
    pub stored_key: [u8; KEY_LEN],
    /// `HMAC(SaltedPassword, "Server Key")`: signs the server-final message.
    pub server_key: [u8; KEY_LEN],
}

/// Keys are password equivalents for a server impersonator: keep them out of logs.
impl fmt::Debug for ScramSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScramSecret")
            .field("iterations", &self.iterations)
            .field("salt_len", &self.salt.len())
            .finish_non_exhaustive()
    }
}

impl ScramSecret {
    /// Derives the secret from a plaintext password (PBKDF2 with `iterations` rounds, at least 1).
    ///
    /// Costs a few milliseconds: call it once per user at config load, never per login.
    pub fn from_password(password: &str, salt: &[u8], iterations: u32) -> ScramSecret {
        let iterations = iterations.max(1);
        let salted = salted_password(&normalize(password), salt, iterations);
        let client_key = hmac(&salted, &[b"Client Key"]);
        ScramSecret {
            salt: salt.to_vec(),
            iterations,
            stored_key: Sha256::digest(client_key).into(),
            server_key: hmac(&salted, &[b"Server Key"]),
        }
    }

    /// Derives the secret with a fresh random salt and PostgreSQL's default iteration count.
    pub fn generate(password: &str) -> ScramSecret {
        let mut salt = [0u8; SALT_LEN];
        rand::rng().fill_bytes(&mut salt);
        ScramSecret::from_password(password, &salt, DEFAULT_ITERATIONS)
    }

    /// Parses a verifier in `pg_authid` format:
    /// `SCRAM-SHA-256$<iterations>:<base64 salt>$<base64 StoredKey>:<base64 ServerKey>`.
    pub fn parse(verifier: &str) -> Result<ScramSecret, ScramError> {
        let rest = verifier
            .strip_prefix(VERIFIER_PREFIX)
            .ok_or(ScramError::InvalidVerifier(
                "does not start with SCRAM-SHA-256$",
            ))?;
        let (params, keys) = rest
            .split_once('$')
            .ok_or(ScramError::InvalidVerifier("missing '$' before the keys"))?;
        let (iterations, salt) = params.split_once(':').ok_or(ScramError::InvalidVerifier(
            "missing ':' after the iteration count",
        ))?;
        let (stored_key, server_key) = keys
            .split_once(':')
            .ok_or(ScramError::InvalidVerifier("missing ':' between the keys"))?;
        let iterations = iterations.parse::<u32>().ok().filter(|&i| i > 0).ok_or(
            ScramError::InvalidVerifier("iteration count is not a positive integer"),
        )?;
        let salt = STANDARD
            .decode(salt)
            .ok()
            .filter(|s| !s.is_empty())
            .ok_or(ScramError::InvalidVerifier("salt is not non-empty base64"))?;
        Ok(ScramSecret {
            salt,
            iterations,
            stored_key: decode_key(stored_key).ok_or(ScramError::InvalidVerifier(
                "StoredKey is not 32 bytes of base64",
            ))?,
            server_key: decode_key(server_key).ok_or(ScramError::InvalidVerifier(
                "ServerKey is not 32 bytes of base64",
            ))?,
        })
    }

    /// A deterministic fake secret for a user that does not exist.
    ///
    /// The same user name always gets the same salt, as a real user would, so a client cannot
    /// tell unknown users from known ones; the exchange then fails at the proof.
    pub fn mock(user: &str, seed: &[u8; 32]) -> ScramSecret {
        let salt = hmac(seed, &[b"pgvigil mock salt:", user.as_bytes()]);
        ScramSecret {
            salt: salt.iter().copied().take(SALT_LEN).collect(),
            iterations: DEFAULT_ITERATIONS,
            stored_key: hmac(seed, &[b"pgvigil mock stored key:", user.as_bytes()]),
            server_key: hmac(seed, &[b"pgvigil mock server key:", user.as_bytes()]),
        }
    }
}

/// Why a SCRAM exchange or verifier was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScramError {
    /// The client's message does not follow the RFC 5802 grammar.
    #[error("malformed SCRAM message: {0}")]
    Malformed(&'static str),
    /// The client asked for channel binding (`p=`), which needs SCRAM-SHA-256-PLUS.
    #[error("client requested SCRAM channel binding, but SCRAM-SHA-256-PLUS is not offered")]
    ChannelBindingUnsupported,
    /// The channel binding echoed in the final message differs from the first message's.
    #[error("SCRAM channel binding check failed")]
    ChannelBindingMismatch,
    /// The final message's nonce is not the one the server sent.
    #[error("SCRAM nonce does not match")]
    NonceMismatch,
    /// The client's proof is wrong: wrong password (or unknown user).
    #[error("SCRAM proof does not verify")]
    BadProof,
    /// A message arrived in a state that does not expect it.
    #[error("SCRAM message received out of order")]
    OutOfOrder,
    /// A stored verifier string is not in `pg_authid` format.
    #[error("invalid SCRAM verifier: {0}")]
    InvalidVerifier(&'static str),
}

/// The outcome of a verified exchange.
#[derive(Clone, PartialEq, Eq)]
pub struct ScramSuccess {
    /// server-final-message (`v=<ServerSignature>`), sent in AuthenticationSASLFinal.
    pub server_final: Vec<u8>,
    /// ClientKey recovered from the proof, for logging in to backends as this user.
    pub client_key: [u8; KEY_LEN],
}

impl fmt::Debug for ScramSuccess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScramSuccess").finish_non_exhaustive()
    }
}

/// What the server remembers between the two client messages.
enum State {
    AwaitingClientFirst,
    AwaitingClientFinal(Sent),
    Done,
}

/// The parts of the first round trip that the proof signs.
struct Sent {
    /// gs2 header (`n,,` or `y,,`) that the client must echo base64-encoded in `c=`.
    gs2_header: String,
    client_first_bare: String,
    server_first: String,
    /// client nonce followed by server nonce.
    nonce: String,
}

/// One SCRAM-SHA-256 exchange, server side, without I/O.
pub struct ScramServer {
    secret: ScramSecret,
    state: State,
}

impl ScramServer {
    /// Starts an exchange that checks the client against `secret`.
    pub fn new(secret: ScramSecret) -> ScramServer {
        ScramServer {
            secret,
            state: State::AwaitingClientFirst,
        }
    }

    /// Takes the client-first-message and returns the server-first-message.
    ///
    /// Any error ends the exchange: later calls return [`ScramError::OutOfOrder`].
    pub fn client_first(&mut self, data: &[u8]) -> Result<Vec<u8>, ScramError> {
        if !matches!(self.state, State::AwaitingClientFirst) {
            self.state = State::Done;
            return Err(ScramError::OutOfOrder);
        }
        self.state = State::Done;
        let message = std::str::from_utf8(data).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let (gs2_header, bare) = split_gs2_header(message)?;
        let client_nonce = parse_client_first_bare(bare)?;

        let mut server_nonce = [0u8; SERVER_NONCE_LEN];
        rand::rng().fill_bytes(&mut server_nonce);
        let nonce = format!("{client_nonce}{}", STANDARD.encode(server_nonce));
        let server_first = format!(
            "r={nonce},s={},i={}",
            STANDARD.encode(&self.secret.salt),
            self.secret.iterations
        );
        let reply = server_first.clone().into_bytes();
        self.state = State::AwaitingClientFinal(Sent {
            gs2_header: gs2_header.to_owned(),
            client_first_bare: bare.to_owned(),
            server_first,
            nonce,
        });
        Ok(reply)
    }

    /// Takes the client-final-message, checks channel binding, nonce and proof.
    ///
    /// Any outcome ends the exchange.
    pub fn client_final(&mut self, data: &[u8]) -> Result<ScramSuccess, ScramError> {
        let sent = match std::mem::replace(&mut self.state, State::Done) {
            State::AwaitingClientFinal(sent) => sent,
            State::AwaitingClientFirst | State::Done => return Err(ScramError::OutOfOrder),
        };
        let message = std::str::from_utf8(data).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let last = parse_client_final(message)?;

        if STANDARD.decode(last.channel_binding).ok().as_deref() != Some(sent.gs2_header.as_bytes())
        {
            return Err(ScramError::ChannelBindingMismatch);
        }
        if last.nonce != sent.nonce {
            return Err(ScramError::NonceMismatch);
        }

        let auth_message = [
            sent.client_first_bare.as_bytes(),
            b",",
            sent.server_first.as_bytes(),
            b",",
            last.without_proof.as_bytes(),
        ];
        let client_signature = hmac(&self.secret.stored_key, &auth_message);
        let mut client_key = last.proof;
        for (k, s) in client_key.iter_mut().zip(client_signature) {
            *k ^= s;
        }
        if !constant_time_eq(&Sha256::digest(client_key), &self.secret.stored_key) {
            return Err(ScramError::BadProof);
        }
        let server_signature = hmac(&self.secret.server_key, &auth_message);
        Ok(ScramSuccess {
            server_final: format!("v={}", STANDARD.encode(server_signature)).into_bytes(),
            client_key,
        })
    }
}

/// The fields of a client-final-message that the server checks.
struct ClientFinal<'a> {
    /// base64 of the gs2 header (plus channel-binding data, which we never accept).
    channel_binding: &'a str,
    nonce: &'a str,
    /// The message up to, not including, `,p=`: the last part of AuthMessage.
    without_proof: &'a str,
    proof: [u8; KEY_LEN],
}

/// Splits `gs2-header client-first-message-bare` and checks the header is one we accept.
fn split_gs2_header(message: &str) -> Result<(&str, &str), ScramError> {
    let (flag, rest) = message
        .split_once(',')
        .ok_or(ScramError::Malformed("missing gs2 header"))?;
    match flag {
        "n" | "y" => {}
        _ if flag.starts_with("p=") => return Err(ScramError::ChannelBindingUnsupported),
        _ => return Err(ScramError::Malformed("unexpected channel binding flag")),
    }
    let (authzid, bare) = rest
        .split_once(',')
        .ok_or(ScramError::Malformed("missing gs2 header"))?;
    if !authzid.is_empty() {
        return Err(ScramError::Malformed(
            "authorization identity (a=) is not supported",
        ));
    }
    // The header is the flag, the empty authzid and their two commas.
    let header_len = flag.len() + 2;
    let header = message
        .get(..header_len)
        .ok_or(ScramError::Malformed("missing gs2 header"))?;
    Ok((header, bare))
}

/// Checks `[m=..,] n=user,r=nonce[,ext...]` and returns the client nonce.
fn parse_client_first_bare(bare: &str) -> Result<&str, ScramError> {
    let mut attrs = bare.split(',');
    let user = attrs.next().unwrap_or_default();
    if user.starts_with("m=") {
        return Err(ScramError::Malformed(
            "mandatory extensions are not supported",
        ));
    }
    // PostgreSQL ignores the SCRAM user name: the startup packet already named the user.
    if !user.starts_with("n=") {
        return Err(ScramError::Malformed("expected user name attribute n="));
    }
    let nonce = attrs
        .next()
        .and_then(|a| a.strip_prefix("r="))
        .ok_or(ScramError::Malformed("expected nonce attribute r="))?;
    if nonce.is_empty() || !nonce.bytes().all(is_nonce_char) {
        return Err(ScramError::Malformed("nonce is not printable ASCII"));
    }
    check_extensions(attrs)?;
    Ok(nonce)
}

/// Parses `c=cbind,r=nonce[,ext...],p=proof`: the proof must come last.
fn parse_client_final(message: &str) -> Result<ClientFinal<'_>, ScramError> {
    let (without_proof, proof) = message.rsplit_once(",p=").ok_or(ScramError::Malformed(
        "expected proof attribute p= at the end",
    ))?;
    let proof =
        decode_key(proof).ok_or(ScramError::Malformed("proof is not 32 bytes of base64"))?;
    let mut attrs = without_proof.split(',');
    let channel_binding =
        attrs
            .next()
            .and_then(|a| a.strip_prefix("c="))
            .ok_or(ScramError::Malformed(
                "expected channel binding attribute c=",
            ))?;
    let nonce = attrs
        .next()
        .and_then(|a| a.strip_prefix("r="))
        .ok_or(ScramError::Malformed("expected nonce attribute r="))?;
    check_extensions(attrs)?;
    Ok(ClientFinal {
        channel_binding,
        nonce,
        without_proof,
        proof,
    })
}

/// Optional extensions are ignored (RFC 5802 §7) but must still look like `x=value`.
fn check_extensions<'a>(attrs: impl Iterator<Item = &'a str>) -> Result<(), ScramError> {
    for attr in attrs {
        let mut bytes = attr.bytes();
        let well_formed =
            bytes.next().is_some_and(|b| b.is_ascii_alphabetic()) && bytes.next() == Some(b'=');
        if !well_formed {
            return Err(ScramError::Malformed("invalid attribute"));
        }
    }
    Ok(())
}

/// RFC 5802 `printable`: any printable ASCII character except ','.
fn is_nonce_char(b: u8) -> bool {
    (0x21..=0x7e).contains(&b) && b != b','
}

/// Decodes base64 that must hold exactly one 32-byte key.
fn decode_key(b64: &str) -> Option<[u8; KEY_LEN]> {
    STANDARD.decode(b64).ok()?.try_into().ok()
}

/// SASLprep the password when possible; like PostgreSQL, use the raw bytes when it fails.
pub(super) fn normalize(password: &str) -> Vec<u8> {
    match stringprep::saslprep(password) {
        Ok(prepared) => prepared.into_owned().into_bytes(),
        Err(_) => password.as_bytes().to_vec(),
    }
}

/// PBKDF2-HMAC-SHA-256 with a single output block: SCRAM's `Hi()` (RFC 5802 §2.2).
pub(super) fn salted_password(password: &[u8], salt: &[u8], iterations: u32) -> [u8; KEY_LEN] {
    // Keying HMAC costs two compressions; do it once and clone the keyed state per round.
    let prf = keyed(password);
    let mut mac = prf.clone();
    mac.update(salt);
    mac.update(&1u32.to_be_bytes());
    let mut u: [u8; KEY_LEN] = mac.finalize().into_bytes().into();
    let mut result = u;
    for _ in 1..iterations {
        let mut mac = prf.clone();
        mac.update(&u);
        u = mac.finalize().into_bytes().into();
        for (r, x) in result.iter_mut().zip(u) {
            *r ^= x;
        }
    }
    result
}

/// HMAC-SHA-256 of the concatenated `parts`.
pub(super) fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; KEY_LEN] {
    let mut mac = keyed(key);
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

/// An HMAC-SHA-256 keyed with `key` of any length, through the infallible constructor.
fn keyed(key: &[u8]) -> HmacSha256 {
    // RFC 2104 §2: a key longer than the 64-byte block is hashed first, and the key is then
    // zero-padded to the block. Doing that here lets us use `KeyInit::new`, which takes a
    // block-sized key and cannot fail, instead of `new_from_slice` and its `Result`.
    let mut block = [0u8; 64];
    if key.len() > block.len() {
        for (b, k) in block.iter_mut().zip(Sha256::digest(key)) {
            *b = k;
        }
    } else {
        for (b, k) in block.iter_mut().zip(key) {
            *b = *k;
        }
    }
    HmacSha256::new(&block.into())
}

#[cfg(test)]
mod tests;
