//! TLS for the TCP listener (rustls): the certificate from PEM files, or a self-signed one made
//! at start for local use, and ALPN choosing between HTTP/2 and HTTP/1.1.

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::TlsSource;

/// ALPN identifiers offered on the TCP listener, preferred first.
pub const ALPN_H2: &[u8] = b"h2";
pub const ALPN_HTTP11: &[u8] = b"http/1.1";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read certificate {path}: {source}")]
    Cert {
        path: String,
        source: rustls::pki_types::pem::Error,
    },
    #[error("{path} holds no certificate")]
    NoCert { path: String },
    #[error("cannot read private key {path}: {source}")]
    Key {
        path: String,
        source: rustls::pki_types::pem::Error,
    },
    #[error("cannot generate a self-signed certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("certificate and key rejected: {0}")]
    Rustls(#[from] rustls::Error),
}

/// A certificate chain and its key.
#[derive(Debug)]
pub struct Identity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    /// True when generated at start (the caller warns that it is for local use).
    pub self_signed: bool,
}

impl Identity {
    /// Loads or generates the identity the configuration asks for.
    pub fn load(source: &TlsSource) -> Result<Self, TlsError> {
        match source {
            TlsSource::Files { cert, key } => {
                let path = cert.display().to_string();
                let chain = CertificateDer::pem_file_iter(cert)
                    .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                    .map_err(|source| TlsError::Cert {
                        path: path.clone(),
                        source,
                    })?;
                if chain.is_empty() {
                    return Err(TlsError::NoCert { path });
                }
                let key = PrivateKeyDer::from_pem_file(key).map_err(|source| TlsError::Key {
                    path: key.display().to_string(),
                    source,
                })?;
                Ok(Self {
                    chain,
                    key,
                    self_signed: false,
                })
            }
            TlsSource::SelfSigned => Self::self_signed(),
        }
    }

    /// A fresh self-signed certificate for `localhost`, 127.0.0.1 and ::1.
    pub fn self_signed() -> Result<Self, TlsError> {
        let names = vec![
            "localhost".to_owned(),
            "127.0.0.1".to_owned(),
            "::1".to_owned(),
        ];
        let ck = rcgen::generate_simple_self_signed(names)?;
        Ok(Self {
            chain: vec![ck.cert.der().clone()],
            key: PrivateKeyDer::Pkcs8(ck.signing_key.serialize_der().into()),
            self_signed: true,
        })
    }
}

/// The provider every TLS config of the relay uses (aws-lc-rs).
pub fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// A verifier that requires client certificates issued by the CAs in `path` (mTLS).
pub fn client_verifier(
    path: &std::path::Path,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, TlsError> {
    let shown = path.display().to_string();
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|source| TlsError::Cert {
            path: shown.clone(),
            source,
        })?;
    let mut roots = rustls::RootCertStore::empty();
    for c in certs {
        roots.add(c)?;
    }
    if roots.is_empty() {
        return Err(TlsError::NoCert { path: shown });
    }
    rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), crypto_provider())
        .build()
        .map_err(|e| TlsError::Rustls(rustls::Error::General(e.to_string())))
}

/// Builds a server config with the relay's certificate and, if `client_ca` is given, mTLS.
pub fn server_config_builder(
    id: &Identity,
    client_ca: Option<&std::path::Path>,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Result<rustls::ServerConfig, TlsError> {
    let b = rustls::ServerConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(versions)?;
    let b = match client_ca {
        Some(p) => b.with_client_cert_verifier(client_verifier(p)?),
        None => b.with_no_client_auth(),
    };
    Ok(b.with_single_cert(id.chain.clone(), id.key.clone_key())?)
}

/// A short, stable name for a client certificate: `cert:` and the first 16 hex digits of its
/// SHA-256.
pub fn cert_identity(der: &[u8]) -> String {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der);
    let hex: String = d.as_ref()[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("cert:{hex}")
}

/// The rustls server configuration for the TCP listener.
pub fn tcp_server_config(
    id: &Identity,
    client_ca: Option<&std::path::Path>,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let mut cfg = server_config_builder(id, client_ca, rustls::DEFAULT_VERSIONS)?;
    cfg.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP11.to_vec()];
    // Session tickets make reconnecting clients cheap; rustls rotates the keys itself.
    cfg.send_tls13_tickets = 2;
    Ok(Arc::new(cfg))
}
