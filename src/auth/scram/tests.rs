//! The SCRAM-SHA-256 server exchange: verifiers, proofs, and every malformed message.

use super::*;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use proptest::prelude::*;

/// A cheap secret for tests that do not care about the iteration count.
fn quick_secret(password: &str) -> ScramSecret {
    ScramSecret::from_password(password, b"0123456789abcdef", 16)
}

/// Runs the real postgres-protocol client against our server; returns the client's verdict.
fn exchange(
    secret: ScramSecret,
    password: &str,
    binding: ChannelBinding,
) -> (Result<ScramSuccess, ScramError>, bool) {
    let mut client = ScramSha256::new(password.as_bytes(), binding);
    let mut server = ScramServer::new(secret);
    let server_first = match server.client_first(client.message()) {
        Ok(m) => m,
        Err(e) => return (Err(e), false),
    };
    assert!(client.update(&server_first).is_ok());
    let outcome = server.client_final(client.message());
    let client_ok = match &outcome {
        Ok(success) => client.finish(&success.server_final).is_ok(),
        Err(_) => false,
    };
    (outcome, client_ok)
}

#[test]
fn real_client_with_right_password_succeeds_and_yields_client_key() {
    let secret = quick_secret("s3cret");
    let (outcome, client_ok) = exchange(secret.clone(), "s3cret", ChannelBinding::unsupported());
    let success = outcome.unwrap();
    assert!(client_ok, "client rejected our server signature");
    assert_eq!(
        <[u8; 32]>::from(Sha256::digest(success.client_key)),
        secret.stored_key
    );
}

#[test]
fn real_client_with_y_flag_succeeds() {
    let (outcome, client_ok) = exchange(quick_secret("pw"), "pw", ChannelBinding::unrequested());
    assert!(outcome.is_ok() && client_ok);
}

#[test]
fn wrong_password_fails_at_the_proof() {
    let (outcome, _) = exchange(
        quick_secret("right"),
        "wrong",
        ChannelBinding::unsupported(),
    );
    assert_eq!(outcome.unwrap_err(), ScramError::BadProof);
}

#[test]
fn channel_binding_request_is_rejected_clearly() {
    let binding = ChannelBinding::tls_server_end_point(vec![1, 2, 3]);
    let (outcome, _) = exchange(quick_secret("pw"), "pw", binding);
    assert_eq!(outcome.unwrap_err(), ScramError::ChannelBindingUnsupported);
}

#[test]
fn verifier_computed_like_postgres_parses_and_authenticates() {
    let verifier = postgres_protocol::password::scram_sha_256(b"hunter2");
    let secret = ScramSecret::parse(&verifier).unwrap();
    assert_eq!(secret.iterations, 4096);
    assert_eq!(secret.salt.len(), 16);
    let (outcome, client_ok) = exchange(secret.clone(), "hunter2", ChannelBinding::unsupported());
    assert!(outcome.is_ok() && client_ok);
    let (outcome, _) = exchange(secret, "hunter3", ChannelBinding::unsupported());
    assert_eq!(outcome.unwrap_err(), ScramError::BadProof);
}

/// Verifiers read from `pg_authid.rolpassword` of a PostgreSQL 15 server (`CREATE ROLE ...
/// PASSWORD`); the second password needs SASLprep (soft hyphen dropped, no-break space mapped).
const REAL_VERIFIERS: [(&str, &str); 2] = [
    (
        "correct horse",
        "SCRAM-SHA-256$4096:UR2O8fl08wd3bIXwxUyz+g==$UQ2+kzDwnMgi1bRgIW700vxHyA2WKXrUVT6l1rNoyH4=:RiTYMAuasbuHTyqviyqshnIg6iF0olCsACydf+3QUrQ=",
    ),
    (
        "p\u{e4}\u{ad}ss\u{a0}word",
        "SCRAM-SHA-256$4096:UIUfh/cyufYI+qnvJM5wuA==$pCnOKpwTbQt9YbO8fiwMJJLcIsfMw6b2xGVe9De8a+w=:cZGsFy2+EHy20Iyseb8h/5QUXm+cJGFpiW3vqbXBXTk=",
    ),
];

#[test]
fn verifiers_from_a_real_postgres_match_ours_and_authenticate() {
    for (password, verifier) in REAL_VERIFIERS {
        let parsed = ScramSecret::parse(verifier).unwrap();
        let ours = ScramSecret::from_password(password, &parsed.salt, parsed.iterations);
        assert_eq!(ours, parsed, "{password:?}");
        let (outcome, client_ok) = exchange(parsed, password, ChannelBinding::unsupported());
        assert!(outcome.is_ok() && client_ok, "{password:?}");
    }
}

#[test]
fn from_password_matches_postgres_verifier() {
    let verifier = postgres_protocol::password::scram_sha_256(b"p\xc3\xa4ss word");
    let parsed = ScramSecret::parse(&verifier).unwrap();
    let ours = ScramSecret::from_password("päss word", &parsed.salt, parsed.iterations);
    assert_eq!(ours, parsed);
}

#[test]
fn generate_uses_postgres_defaults() {
    let secret = ScramSecret::generate("pw");
    assert_eq!((secret.iterations, secret.salt.len()), (4096, 16));
}

#[test]
fn malformed_verifiers_are_rejected() {
    let good = postgres_protocol::password::scram_sha_256(b"x");
    let bad = [
        String::new(),
        "md5abc".to_owned(),
        good.replace("SCRAM-SHA-256$4096", "SCRAM-SHA-256$0"),
        good.replace("SCRAM-SHA-256$4096", "SCRAM-SHA-256$x"),
        good.replacen(':', ";", 1),
        good.rsplit_once(':').unwrap().0.to_owned() + ":AAAA",
        good.replacen('$', "#", 2),
    ];
    for v in bad {
        assert!(
            matches!(ScramSecret::parse(&v), Err(ScramError::InvalidVerifier(_))),
            "{v}"
        );
    }
}

#[test]
fn mock_is_deterministic_per_user_and_never_authenticates() {
    let seed = [7u8; 32];
    assert_eq!(
        ScramSecret::mock("bob", &seed),
        ScramSecret::mock("bob", &seed)
    );
    assert_ne!(
        ScramSecret::mock("bob", &seed).salt,
        ScramSecret::mock("eve", &seed).salt
    );
    let (outcome, _) = exchange(
        ScramSecret::mock("bob", &seed),
        "",
        ChannelBinding::unsupported(),
    );
    assert_eq!(outcome.unwrap_err(), ScramError::BadProof);
}

#[test]
fn keyed_hmac_matches_new_from_slice_for_all_key_lengths() {
    for len in [0usize, 1, 32, 63, 64, 65, 200] {
        let key = vec![0xa5u8; len];
        let mut ours = keyed(&key);
        let mut theirs = <HmacSha256 as KeyInit>::new_from_slice(&key).unwrap();
        ours.update(b"msg");
        theirs.update(b"msg");
        assert_eq!(ours.finalize().into_bytes(), theirs.finalize().into_bytes());
    }
}

#[test]
fn malformed_client_first_messages_are_errors() {
    let cases: [(&[u8], ScramError); 8] = [
        (b"", ScramError::Malformed("missing gs2 header")),
        (
            b"x,,n=,r=abc",
            ScramError::Malformed("unexpected channel binding flag"),
        ),
        (
            b"p=tls-server-end-point,,n=,r=abc",
            ScramError::ChannelBindingUnsupported,
        ),
        (
            b"n,a=bob,n=,r=abc",
            ScramError::Malformed("authorization identity (a=) is not supported"),
        ),
        (
            b"n,,m=x,n=,r=abc",
            ScramError::Malformed("mandatory extensions are not supported"),
        ),
        (
            b"n,,n=,r=",
            ScramError::Malformed("nonce is not printable ASCII"),
        ),
        (
            b"n,,n=,r=a b",
            ScramError::Malformed("nonce is not printable ASCII"),
        ),
        (b"n,,n=\xff,r=abc", ScramError::Malformed("not UTF-8")),
    ];
    for (message, expected) in cases {
        let mut server = ScramServer::new(quick_secret("pw"));
        assert_eq!(server.client_first(message).unwrap_err(), expected);
    }
}

#[test]
fn tampered_client_final_messages_are_errors() {
    let mut server = ScramServer::new(quick_secret("pw"));
    let first = String::from_utf8(server.client_first(b"n,,n=,r=abc").unwrap()).unwrap();
    let nonce = first
        .split(',')
        .next()
        .unwrap()
        .strip_prefix("r=")
        .unwrap()
        .to_owned();
    let proof = STANDARD.encode([0u8; 32]);
    let cases = [
        (
            format!("c=eSws,r={nonce},p={proof}"),
            ScramError::ChannelBindingMismatch,
        ),
        (
            format!("c=biws,r={nonce}x,p={proof}"),
            ScramError::NonceMismatch,
        ),
        (format!("c=biws,r={nonce},p={proof}"), ScramError::BadProof),
        (
            format!("c=biws,r={nonce},p=AAAA"),
            ScramError::Malformed("proof is not 32 bytes of base64"),
        ),
        (
            format!("c=biws,r={nonce},9=x,p={proof}"),
            ScramError::Malformed("invalid attribute"),
        ),
    ];
    for (message, expected) in cases {
        let mut server = ScramServer::new(quick_secret("pw"));
        server.client_first(b"n,,n=,r=abc").unwrap();
        // Same nonce prefix, different server nonce: rebuild the message for this server.
        let State::AwaitingClientFinal(sent) = &server.state else {
            panic!("server did not advance");
        };
        let message = message.replace(&nonce, &sent.nonce);
        assert_eq!(
            server.client_final(message.as_bytes()).unwrap_err(),
            expected
        );
    }
}

#[test]
fn messages_out_of_order_are_rejected() {
    let mut server = ScramServer::new(quick_secret("pw"));
    assert_eq!(
        server.client_final(b"c=biws").unwrap_err(),
        ScramError::OutOfOrder
    );
    let mut server = ScramServer::new(quick_secret("pw"));
    server.client_first(b"n,,n=,r=abc").unwrap();
    assert_eq!(
        server.client_first(b"n,,n=,r=abc").unwrap_err(),
        ScramError::OutOfOrder
    );
}

proptest! {
    #[test]
    fn random_bytes_never_panic(first in proptest::collection::vec(any::<u8>(), 0..200),
                                last in proptest::collection::vec(any::<u8>(), 0..200)) {
        let mut server = ScramServer::new(quick_secret("pw"));
        let _ = server.client_first(&first);
        let _ = server.client_final(&last);
    }

    #[test]
    fn random_final_after_valid_first_never_panics(tail in "[a-z=,A-Z0-9+/]{0,120}") {
        let mut server = ScramServer::new(quick_secret("pw"));
        server.client_first(b"n,,n=,r=abc").unwrap();
        let _ = server.client_final(format!("c=biws,{tail}").as_bytes());
    }
}
