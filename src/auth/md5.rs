//! PostgreSQL's md5 password challenge (AuthenticationMD5Password).
//!
//! The client answers `"md5" + hex(md5(hex(md5(password + user)) + salt))`; kept for old clients,
//! SCRAM is the default.

use std::fmt::Write as _;

use md5::{Digest, Md5};

use super::constant_time_eq;

/// The response a client with this password gives to the 4-byte `salt`.
pub fn md5_response(user: &str, password: &str, salt: [u8; 4]) -> String {
    let inner = hex(&Md5::new()
        .chain_update(password)
        .chain_update(user)
        .finalize());
    let outer = Md5::new().chain_update(inner).chain_update(salt).finalize();
    format!("md5{}", hex(&outer))
}

/// Whether `client_response` (the password message without its NUL) is right, in constant time.
pub fn verify_md5(user: &str, password: &str, salt: [u8; 4], client_response: &[u8]) -> bool {
    constant_time_eq(
        md5_response(user, password, salt).as_bytes(),
        client_response,
    )
}

/// Lower-case hex, as PostgreSQL writes md5 digests.
fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            // Writing to a String cannot fail.
            let _ = write!(s, "{b:02x}");
            s
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::authentication::md5_hash;

    #[test]
    fn response_matches_postgres_protocol_client() {
        for (user, password, salt) in [
            ("md5_user", "password", [0x2a, 0x3d, 0x8f, 0xe0]),
            ("alice", "", [0, 0, 0, 0]),
            ("bøb", "pä ss", [0xff, 1, 2, 3]),
        ] {
            assert_eq!(
                md5_response(user, password, salt),
                md5_hash(user.as_bytes(), password.as_bytes(), salt)
            );
        }
    }

    #[test]
    fn known_vector_from_postgres_protocol() {
        assert_eq!(
            md5_response("md5_user", "password", [0x2a, 0x3d, 0x8f, 0xe0]),
            "md562af4dd09bbb41884907a838a3233294"
        );
    }

    #[test]
    fn verify_accepts_right_and_rejects_wrong_responses() {
        let salt = [9, 8, 7, 6];
        let right = md5_hash(b"u", b"pw", salt);
        assert!(verify_md5("u", "pw", salt, right.as_bytes()));
        assert!(!verify_md5("u", "pw", [9, 8, 7, 5], right.as_bytes()));
        assert!(!verify_md5("u", "other", salt, right.as_bytes()));
        assert!(!verify_md5("u", "pw", salt, b""));
        assert!(!verify_md5("u", "pw", salt, &right.as_bytes()[..10]));
    }
}
