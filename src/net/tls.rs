//! TLS material: certificates and keys read from PEM files, the rustls
//! crypto provider (ring), and the terminal listener's server config
//! (client certificates required, verified against the terminal CA;
//! ALPN h2 and http/1.1). Shared by the listeners, the outbound client
//! and the settlement receiver of `onecard sink-sim`.

use std::path::Path;
use std::sync::Arc;

use tokio_rustls::rustls;

#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: no {what} found in the PEM file")]
    Empty { path: String, what: &'static str },
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

pub fn load_certs(
    path: &Path,
) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, TlsSetupError> {
    let p = path.display().to_string();
    let file = std::fs::File::open(path).map_err(|source| TlsSetupError::Io {
        path: p.clone(),
        source,
    })?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut std::io::BufReader::new(file))
        .collect::<Result<_, _>>()
        .map_err(|source| TlsSetupError::Io {
            path: p.clone(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsSetupError::Empty {
            path: p,
            what: "certificate",
        });
    }
    Ok(certs)
}

/// When the soonest-expiring certificate in a PEM file expires (Unix
/// seconds): the gateway's own, or the CA that signs terminals'.
pub fn not_after_s(path: &Path) -> Result<i64, TlsSetupError> {
    let certs = load_certs(path)?;
    certs
        .iter()
        .filter_map(|c| x509_parser::parse_x509_certificate(c).ok())
        .map(|(_, c)| c.validity().not_after.timestamp())
        .min()
        .ok_or(TlsSetupError::Empty {
            path: path.display().to_string(),
            what: "X.509 certificate",
        })
}

pub fn load_key(path: &Path) -> Result<rustls::pki_types::PrivateKeyDer<'static>, TlsSetupError> {
    let p = path.display().to_string();
    let file = std::fs::File::open(path).map_err(|source| TlsSetupError::Io {
        path: p.clone(),
        source,
    })?;
    rustls_pemfile::private_key(&mut std::io::BufReader::new(file))
        .map_err(|source| TlsSetupError::Io {
            path: p.clone(),
            source,
        })?
        .ok_or(TlsSetupError::Empty {
            path: p,
            what: "private key",
        })
}

pub fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The terminal listener's TLS config: client certificates required and
/// verified against the terminal CA; ALPN offers h2 and http/1.1.
pub fn server_tls(
    cert: &Path,
    key: &Path,
    client_ca: &Path,
) -> Result<rustls::ServerConfig, TlsSetupError> {
    let mut roots = rustls::RootCertStore::empty();
    for ca in load_certs(client_ca)? {
        roots.add(ca)?;
    }
    let provider = crypto_provider();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certs(cert)?, load_key(key)?)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}
