//! The SCRAM-SHA-256 client pgvigil logs in to the nodes with (RFC 5802, RFC 7677), without
//! I/O, and the cache of salted passwords that spares most logins PBKDF2.
//!
//! PBKDF2 (4096 rounds of HMAC-SHA-256 by default) is most of the CPU a login costs. A node
//! keeps a role's salt and iteration count until its password changes (and its standbys
//! replicate them), so the salted password is computed once per node, user, password, salt
//! and iteration count, on tokio's blocking pool rather than on the workers that relay data
//! and run the probes; logins that need the same one at the same time wait for that one
//! computation. After a failover a thousand sessions logging in to the new primary cost one
//! PBKDF2, not a thousand.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use rand::Rng;
use sha2::{Digest, Sha256};
use tokio::sync::OnceCell;

use super::constant_time_eq;
use super::scram::{hmac, normalize, salted_password, KEY_LEN};
use crate::topology::NodeId;

/// The GS2 header: no channel binding, none supported (RFC 5802 §7, `gs2-cbind-flag` "n").
const GS2_HEADER: &str = "n,,";

/// Random bytes in the client nonce (base64-encoded, 24 characters).
const NONCE_LEN: usize = 18;

/// The largest iteration count a node may ask for (postgres-protocol's bound, which pgvigil
/// used before): a node asking more is refused rather than let it cost seconds per login.
const MAX_ITERATIONS: u32 = 100_000;

/// Salted passwords kept; past it an arbitrary one is dropped (it is computed again if needed).
const CAPACITY: usize = 1024;

/// Why a SCRAM exchange with a node failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScramClientError {
    /// The node's message does not follow the RFC 5802 grammar.
    #[error("malformed SCRAM message from the node: {0}")]
    Malformed(&'static str),
    /// The node's nonce does not extend ours.
    #[error("the node's SCRAM nonce does not extend the client's")]
    NonceMismatch,
    /// The node asks for more PBKDF2 iterations than pgvigil accepts.
    #[error("the node asks for {0} SCRAM iterations, over the limit of {MAX_ITERATIONS}")]
    TooManyIterations(u32),
    /// The node reported an error in its final message (`e=`).
    #[error("the node refused the SCRAM exchange: {0}")]
    Refused(String),
    /// The node's signature is wrong: it does not know the password (or is not the node).
    #[error("the node's SCRAM signature does not verify")]
    BadSignature,
    /// The blocking task computing the salted password did not finish.
    #[error("the salted password could not be computed")]
    Interrupted,
}

/// One SCRAM-SHA-256 login to a node, client side: [`client_first`](Self::client_first), then
/// [`client_final`](Self::client_final) with the server-first-message and the salted password,
/// then [`verify_server_final`] with what it returned.
pub struct ScramClient {
    /// The client nonce.
    nonce: String,
    /// The password after SASLprep (what PBKDF2 takes).
    password: Vec<u8>,
}

/// What the server-first-message says.
#[derive(Debug, PartialEq, Eq)]
pub struct ServerFirst<'a> {
    /// The whole message (part of the AuthMessage).
    message: &'a str,
    /// The combined nonce (the client's, then the server's).
    nonce: &'a str,
    /// The role's salt.
    pub salt: Vec<u8>,
    /// The role's PBKDF2 iteration count.
    pub iterations: u32,
}

impl ScramClient {
    /// Starts a login with `password`.
    pub fn new(password: &str) -> ScramClient {
        let mut nonce = [0u8; NONCE_LEN];
        rand::rng().fill_bytes(&mut nonce);
        ScramClient {
            nonce: STANDARD.encode(nonce),
            password: normalize(password),
        }
    }

    /// The client-first-message (the user name is left empty: PostgreSQL takes the startup
    /// packet's).
    pub fn client_first(&self) -> String {
        format!("{GS2_HEADER}{}", self.first_bare())
    }

    fn first_bare(&self) -> String {
        format!("n=,r={}", self.nonce)
    }

    /// The password PBKDF2 salts (after SASLprep).
    pub fn password(&self) -> &[u8] {
        &self.password
    }

    /// Reads the server-first-message (`r=nonce,s=salt,i=iterations`).
    pub fn server_first<'a>(&self, data: &'a [u8]) -> Result<ServerFirst<'a>, ScramClientError> {
        let message =
            std::str::from_utf8(data).map_err(|_| ScramClientError::Malformed("not UTF-8"))?;
        let mut parts = message.split(',');
        let mut field = |name: &'static str| {
            parts
                .next()
                .and_then(|p| p.strip_prefix(name))
                .ok_or(ScramClientError::Malformed(name))
        };
        let nonce = field("r=")?;
        let salt = STANDARD
            .decode(field("s=")?)
            .map_err(|_| ScramClientError::Malformed("salt is not base64"))?;
        let iterations: u32 = field("i=")?
            .parse()
            .map_err(|_| ScramClientError::Malformed("iteration count"))?;
        if nonce.len() <= self.nonce.len() || !nonce.starts_with(&self.nonce) {
            return Err(ScramClientError::NonceMismatch);
        }
        if iterations == 0 {
            return Err(ScramClientError::Malformed("iteration count of 0"));
        }
        if iterations > MAX_ITERATIONS {
            return Err(ScramClientError::TooManyIterations(iterations));
        }
        Ok(ServerFirst {
            message,
            nonce,
            salt,
            iterations,
        })
    }

    /// The client-final-message for `first`, proven with `salted` (the salted password), and
    /// the server signature the node must answer with.
    pub fn client_final(
        &self,
        first: &ServerFirst<'_>,
        salted: &[u8; KEY_LEN],
    ) -> (Vec<u8>, [u8; KEY_LEN]) {
        let without_proof = format!("c={},r={}", STANDARD.encode(GS2_HEADER), first.nonce);
        let first_bare = self.first_bare();
        let auth_message = [
            first_bare.as_bytes(),
            b",",
            first.message.as_bytes(),
            b",",
            without_proof.as_bytes(),
        ];
        let client_key = hmac(salted, &[b"Client Key".as_slice()]);
        let stored_key: [u8; KEY_LEN] = Sha256::digest(client_key).into();
        let mut proof = hmac(&stored_key, &auth_message);
        for (p, k) in proof.iter_mut().zip(client_key) {
            *p ^= k;
        }
        let server_key = hmac(salted, &[b"Server Key".as_slice()]);
        let signature = hmac(&server_key, &auth_message);
        let message = format!("{without_proof},p={}", STANDARD.encode(proof));
        (message.into_bytes(), signature)
    }
}

/// Checks the server-final-message (`v=signature`, or `e=error`) against the signature
/// [`ScramClient::client_final`] expects.
pub fn verify_server_final(data: &[u8], expected: &[u8; KEY_LEN]) -> Result<(), ScramClientError> {
    let message =
        std::str::from_utf8(data).map_err(|_| ScramClientError::Malformed("not UTF-8"))?;
    if let Some(error) = message.strip_prefix("e=") {
        return Err(ScramClientError::Refused(error.to_owned()));
    }
    let verifier = message
        .split(',')
        .next()
        .and_then(|v| v.strip_prefix("v="))
        .ok_or(ScramClientError::Malformed("v="))?;
    let verifier = STANDARD
        .decode(verifier)
        .map_err(|_| ScramClientError::Malformed("verifier is not base64"))?;
    if !constant_time_eq(&verifier, expected) {
        return Err(ScramClientError::BadSignature);
    }
    Ok(())
}

/// Which salted password: a new password (a reload), salt or iteration count (a password
/// changed on the node) is another entry, so an old one is never used for them.
#[derive(Clone, PartialEq, Eq, Hash)]
struct SaltedKey {
    node: NodeId,
    user: String,
    /// SHA-256 of the password after SASLprep: the password is not kept a second time.
    password: [u8; 32],
    salt: Vec<u8>,
    iterations: u32,
}

/// The salted passwords of recent logins to the nodes, shared by every login of the process.
#[derive(Default)]
pub struct SaltedPasswords {
    entries: Mutex<HashMap<SaltedKey, Arc<OnceCell<[u8; KEY_LEN]>>>>,
}

impl SaltedPasswords {
    /// The salted password of `user` on `node` for `first`: from the cache, or computed once on
    /// the blocking pool (concurrent callers for the same one wait for that computation).
    pub async fn get(
        &self,
        node: NodeId,
        user: &str,
        client: &ScramClient,
        first: &ServerFirst<'_>,
    ) -> Result<[u8; KEY_LEN], ScramClientError> {
        let key = SaltedKey {
            node,
            user: user.to_owned(),
            password: Sha256::digest(client.password()).into(),
            salt: first.salt.clone(),
            iterations: first.iterations,
        };
        let cell = {
            let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
            if entries.len() >= CAPACITY && !entries.contains_key(&key) {
                let evicted = entries.keys().next().cloned();
                if let Some(evicted) = evicted {
                    entries.remove(&evicted);
                }
            }
            entries.entry(key).or_default().clone()
        };
        let compute = || {
            let (password, salt) = (client.password().to_vec(), first.salt.clone());
            let iterations = first.iterations;
            async move {
                tokio::task::spawn_blocking(move || salted_password(&password, &salt, iterations))
                    .await
                    .map_err(|_| ScramClientError::Interrupted)
            }
        };
        cell.get_or_try_init(compute).await.copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::scram::{ScramSecret, ScramServer};

    impl SaltedPasswords {
        /// How many salted passwords are kept.
        fn len(&self) -> usize {
            self.entries.lock().unwrap().len()
        }
    }

    /// Runs our client against our server (itself checked against PostgreSQL's verifiers and
    /// postgres-protocol's client in `scram.rs`).
    async fn login(
        cache: &SaltedPasswords,
        secret: &ScramSecret,
        password: &str,
    ) -> Result<(), String> {
        let client = ScramClient::new(password);
        let mut server = ScramServer::new(secret.clone());
        let first = server
            .client_first(client.client_first().as_bytes())
            .map_err(|e| e.to_string())?;
        let first = client.server_first(&first).map_err(|e| e.to_string())?;
        let salted = cache.get(0, "app", &client, &first).await.unwrap();
        let (message, expected) = client.client_final(&first, &salted);
        let success = server.client_final(&message).map_err(|e| e.to_string())?;
        verify_server_final(&success.server_final, &expected).map_err(|e| e.to_string())
    }

    #[tokio::test]
    async fn logs_in_and_salts_once_per_password_salt_and_count() {
        let cache = SaltedPasswords::default();
        let secret = ScramSecret::from_password("pässword", b"0123456789abcdef", 64);
        login(&cache, &secret, "pässword").await.unwrap();
        login(&cache, &secret, "pässword").await.unwrap();
        assert_eq!(
            cache.len(),
            1,
            "the second login reused the salted password"
        );
        assert!(login(&cache, &secret, "other").await.is_err());
        assert_eq!(cache.len(), 2, "another password is another entry");
        let changed = ScramSecret::from_password("pässword", b"fedcba9876543210", 64);
        login(&cache, &changed, "pässword").await.unwrap();
        assert_eq!(cache.len(), 3, "a new salt is another entry");
    }

    #[test]
    fn the_nodes_bad_messages_are_errors() {
        let client = ScramClient::new("pw");
        let nonce = client.nonce.clone();
        let ok = format!("r={nonce}xyz,s=c2FsdA==,i=4096");
        assert!(client.server_first(ok.as_bytes()).is_ok());
        let cases = [
            ("r=other,s=c2FsdA==,i=4096".to_owned(), "nonce"),
            (
                format!("r={nonce},s=c2FsdA==,i=4096"),
                "nonce without the server's part",
            ),
            (format!("r={nonce}x,s=!!,i=4096"), "salt"),
            (format!("r={nonce}x,s=c2FsdA==,i=0"), "no iterations"),
            (format!("r={nonce}x,s=c2FsdA==,i=100001"), "too many"),
            (
                format!("m=ext,r={nonce}x,s=c2FsdA==,i=1"),
                "mandatory extension",
            ),
            ("\u{0}".to_owned(), "garbage"),
        ];
        for (message, what) in cases {
            assert!(client.server_first(message.as_bytes()).is_err(), "{what}");
        }
        let expected = [7; KEY_LEN];
        assert_eq!(
            verify_server_final(b"e=invalid-proof", &expected),
            Err(ScramClientError::Refused("invalid-proof".into()))
        );
        assert_eq!(
            verify_server_final(b"v=AAAA", &expected),
            Err(ScramClientError::BadSignature)
        );
        assert!(verify_server_final(b"x", &expected).is_err());
    }
}
