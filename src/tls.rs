//! TLS configurations: the server side clients reach after SSLRequest, and the client side
//! pgvigil uses towards backends (`sslmode=require` or `verify-full`, as libpq means them).
//!
//! rustls with the ring provider only (no aws-lc: it needs cmake and a C toolchain we avoid).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

/// Why a TLS configuration could not be built; every variant names the file at fault.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The file is missing or unreadable.
    #[error("cannot read TLS file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The file is not valid PEM.
    #[error("TLS file {path} is not valid PEM: {source}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What the PEM parser said.
        source: pem::Error,
    },
    /// The file holds no `CERTIFICATE` block.
    #[error("TLS file {path} contains no certificate")]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// The file holds no private key block (PKCS#8, PKCS#1 or SEC1).
    #[error("TLS file {path} contains no private key")]
    NoPrivateKey {
        /// The file.
        path: PathBuf,
    },
    /// rustls refused the contents (unsupported key type, key not matching the certificate...).
    #[error("TLS file {path} was rejected: {source}")]
    Rejected {
        /// The file.
        path: PathBuf,
        /// What rustls said.
        source: rustls::Error,
    },
}

/// Makes ring the process-wide rustls provider; harmless if one is already installed.
pub fn install_crypto_provider() {
    // Err only means a provider is already installed, which is all we need.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Server configuration from a PEM certificate chain and a PEM private key; no client certificates.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    install_crypto_provider();
    let chain = read_certificates(cert)?;
    let private_key = read_private_key(key)?;
    let config = ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(chain, private_key)
        .map_err(|source| TlsError::Rejected {
            path: key.to_owned(),
            source,
        })?;
    Ok(Arc::new(config))
}

/// Client configuration that encrypts but does not check the server's certificate, like
/// libpq's `sslmode=require`. Handshake signatures are still verified.
pub fn client_config_no_verify() -> Arc<ClientConfig> {
    install_crypto_provider();
    let verifier = AcceptAnyCertificate {
        provider: Arc::new(rustls::crypto::ring::default_provider()),
    };
    let config = ClientConfig::builder()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    Arc::new(config)
}

/// Client configuration that trusts the certificates in the PEM file `ca` and checks the host
/// name, like libpq's `sslmode=verify-full`.
pub fn client_config_with_ca(ca: &Path) -> Result<Arc<ClientConfig>, TlsError> {
    install_crypto_provider();
    let mut roots = RootCertStore::empty();
    for certificate in read_certificates(ca)? {
        roots
            .add(certificate)
            .map_err(|source| TlsError::Rejected {
                path: ca.to_owned(),
                source,
            })?;
    }
    let config = ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Client configuration for etcd (`[cluster.etcd]`): trusts `ca_file`, checks the host name,
/// and shows `cert_file`/`key_file` when both are set (etcd's `--client-cert-auth`).
pub fn etcd_client_config(
    etcd: &crate::config::EtcdConfig,
) -> Result<Option<Arc<ClientConfig>>, TlsError> {
    let Some(ca) = &etcd.ca_file else {
        return Ok(None);
    };
    install_crypto_provider();
    // A system bundle holds certificates webpki cannot use: those are skipped, not fatal.
    let mut roots = RootCertStore::empty();
    let (_, unusable) = roots.add_parsable_certificates(read_certificates(ca)?);
    if roots.is_empty() {
        return Err(TlsError::NoCertificate {
            path: ca.to_owned(),
        });
    }
    if unusable > 0 {
        tracing::debug!(path = %ca.display(), unusable, "certificates skipped in the etcd CA file");
    }
    let builder = ClientConfig::builder().with_root_certificates(roots);
    let config = match (&etcd.cert_file, &etcd.key_file) {
        (Some(cert), Some(key)) => builder
            .with_client_auth_cert(read_certificates(cert)?, read_private_key(key)?)
            .map_err(|source| TlsError::Rejected {
                path: cert.to_owned(),
                source,
            })?,
        _ => builder.with_no_client_auth(),
    };
    Ok(Some(Arc::new(config)))
}

/// Every `CERTIFICATE` block of a PEM file, in order; at least one.
fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let contents = read(path)?;
    let certificates = CertificateDer::pem_slice_iter(&contents)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| pem_error(path, source))?;
    if certificates.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certificates)
}

/// The first private key block of a PEM file.
fn read_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let contents = read(path)?;
    PrivateKeyDer::from_pem_slice(&contents).map_err(|source| match source {
        pem::Error::NoItemsFound => TlsError::NoPrivateKey {
            path: path.to_owned(),
        },
        other => pem_error(path, other),
    })
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

fn pem_error(path: &Path, source: pem::Error) -> TlsError {
    TlsError::Pem {
        path: path.to_owned(),
        source,
    }
}

/// Accepts any server certificate, but still checks that the server holds its private key.
#[derive(Debug)]
struct AcceptAnyCertificate {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/tls")
            .join(name)
    }

    /// Handshakes over an in-memory pipe and echoes one message back; returns what came back.
    async fn round_trip(client: Arc<ClientConfig>, host: &'static str) -> std::io::Result<Vec<u8>> {
        let server = server_config(&fixture("cert.pem"), &fixture("key.pem")).unwrap();
        let (client_io, server_io) = tokio::io::duplex(16 * 1024);
        let server_task = tokio::spawn(async move {
            let mut stream = TlsAcceptor::from(server).accept(server_io).await?;
            let mut buf = [0u8; 5];
            stream.read_exact(&mut buf).await?;
            stream.write_all(&buf).await?;
            stream.shutdown().await
        });
        let name = ServerName::try_from(host).unwrap();
        let mut stream = TlsConnector::from(client).connect(name, client_io).await?;
        stream.write_all(b"hello").await?;
        let mut echoed = Vec::new();
        stream.read_to_end(&mut echoed).await?;
        server_task.await.unwrap()?;
        Ok(echoed)
    }

    #[tokio::test]
    async fn verify_full_client_handshakes_with_fixture_server() {
        let client = client_config_with_ca(&fixture("cert.pem")).unwrap();
        assert_eq!(round_trip(client, "localhost").await.unwrap(), b"hello");
    }

    #[tokio::test]
    async fn verify_full_client_rejects_wrong_host_name() {
        let client = client_config_with_ca(&fixture("cert.pem")).unwrap();
        assert!(round_trip(client, "db.example.com").await.is_err());
    }

    #[tokio::test]
    async fn no_verify_client_handshakes_with_any_host_name() {
        let client = client_config_no_verify();
        assert_eq!(
            round_trip(client, "db.example.com").await.unwrap(),
            b"hello"
        );
    }

    #[test]
    fn missing_file_is_named_in_the_error() {
        let missing = fixture("nope.pem");
        let error = server_config(&missing, &fixture("key.pem")).unwrap_err();
        assert!(matches!(&error, TlsError::Read { path, .. } if *path == missing));
        assert!(error.to_string().contains("nope.pem"));
    }

    #[test]
    fn key_less_file_gives_no_private_key() {
        let cert = fixture("cert.pem");
        let error = server_config(&cert, &cert).unwrap_err();
        assert!(matches!(&error, TlsError::NoPrivateKey { path } if *path == cert));
    }

    #[test]
    fn certificate_less_file_gives_no_certificate() {
        let key = fixture("key.pem");
        let error = client_config_with_ca(&key).unwrap_err();
        assert!(matches!(&error, TlsError::NoCertificate { path } if *path == key));
    }

    #[test]
    fn installing_the_provider_twice_is_harmless() {
        install_crypto_provider();
        install_crypto_provider();
        assert!(CryptoProvider::get_default().is_some());
    }
}
