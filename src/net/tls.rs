//! TLS material: certificates and keys read from PEM files, the rustls
//! crypto provider (ring), and the terminal listener's server config
//! (client certificates required, verified against the terminal CA;
//! ALPN h2 and http/1.1). Shared by the listeners, the outbound client
//! and the settlement receiver of `onecard sink-sim`.
//!
//! The terminal listener's trust is [`TerminalTls`]: the server
//! certificate, the terminal CA and its CRLs, reloaded from their files
//! without a restart (new handshakes use the new ones; connections open
//! keep theirs), and a verifier that also asks a block list (the
//! [`Refusals`] the store keeps) about each terminal certificate.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::RwLock;
use serde::Serialize;
use sha2::Digest;
use tokio_rustls::rustls;
use tokio_rustls::rustls::client::danger::HandshakeSignatureValid;
use tokio_rustls::rustls::pki_types::{CertificateDer, CertificateRevocationListDer, UnixTime};
use tokio_rustls::rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use tokio_rustls::rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

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
    #[error("{path}: {detail}")]
    Crl { path: String, detail: String },
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

/// When the soonest-expiring of `certs` expires (Unix seconds): the
/// gateway's own chain, or the CAs that sign terminals'. `None` when none
/// parses (rustls accepted them; the date costs a gauge, not the start).
fn soonest_not_after_s(certs: &[CertificateDer<'_>]) -> Option<i64> {
    certs
        .iter()
        .filter_map(|c| x509_parser::parse_x509_certificate(c).ok())
        .map(|(_, c)| c.validity().not_after.timestamp())
        .min()
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

/// What the block list knows a certificate by: its serial number (lower-case
/// hex, without leading zero bytes) and the SHA-256 of its DER encoding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CertKeys {
    pub serial: String,
    pub sha256: String,
}

impl CertKeys {
    pub fn of(der: &[u8]) -> CertKeys {
        let serial = x509_parser::parse_x509_certificate(der)
            .map(|(_, c)| serial_hex(c.raw_serial()))
            .unwrap_or_default();
        CertKeys {
            serial,
            sha256: onecard_core::hex::encode(&sha2::Sha256::digest(der)),
        }
    }

    /// The block list's keys for this certificate: `serial:<hex>` and
    /// `sha256:<hex>`.
    pub fn keys(&self) -> [String; 2] {
        [
            format!("serial:{}", self.serial),
            format!("sha256:{}", self.sha256),
        ]
    }
}

/// A serial number's bytes as the block list writes them.
pub fn serial_hex(raw: &[u8]) -> String {
    let start = raw.iter().position(|b| *b != 0).unwrap_or(raw.len());
    let s = onecard_core::hex::encode(&raw[start..]);
    if s.is_empty() {
        "00".into()
    } else {
        s
    }
}

/// Terminal certificates refused although their chain is valid (the
/// security team's block list).
pub trait Refusals: Send + Sync + std::fmt::Debug {
    /// Whether any certificate is refused at all: when none is, a
    /// handshake need not work out its certificate's keys.
    fn any(&self) -> bool;
    fn refuses(&self, cert: &CertKeys) -> bool;
}

/// The terminal CA's verifier (chain and CRLs), then the block list.
#[derive(Debug)]
struct Blocking {
    inner: Arc<dyn ClientCertVerifier>,
    refusals: Arc<dyn Refusals>,
}

impl ClientCertVerifier for Blocking {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }
    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let refused = |reason: &'static str| {
            metrics::counter!("onecard_tls_terminals_refused_total", "reason" => reason)
                .increment(1);
            let keys = CertKeys::of(end_entity);
            // A stolen validator trying again is what the security team
            // wants to see; the serial finds the certificate.
            tracing::warn!(
                terminal = common_name(end_entity).as_deref().unwrap_or(""),
                serial = %keys.serial,
                reason,
                "terminal certificate refused at the handshake"
            );
        };
        match self
            .inner
            .verify_client_cert(end_entity, intermediates, now)
        {
            Ok(v) => {
                if self.refusals.any() && self.refusals.refuses(&CertKeys::of(end_entity)) {
                    refused("blocked");
                    return Err(rustls::Error::InvalidCertificate(
                        rustls::CertificateError::Revoked,
                    ));
                }
                Ok(v)
            }
            Err(e) => {
                match &e {
                    rustls::Error::InvalidCertificate(rustls::CertificateError::Revoked) => {
                        refused("revoked")
                    }
                    rustls::Error::InvalidCertificate(
                        rustls::CertificateError::UnknownRevocationStatus,
                    ) => refused("revocation_unknown"),
                    _ => {}
                }
                Err(e)
            }
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?.as_str().ok()?;
    Some(cn.to_owned())
}

/// The files the terminal listener's trust is read from.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
    pub crls: Vec<PathBuf>,
}

/// One CRL as loaded: whose it is, until when, how many it revokes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CrlInfo {
    pub path: String,
    pub issuer: String,
    pub this_update_s: i64,
    /// When the CA promises the next one; past it, the list may miss
    /// recent revocations (the gateway still applies it: a stale list
    /// refusing a stolen terminal is better than none).
    pub next_update_s: Option<i64>,
    pub revoked: usize,
}

/// What the terminal listener trusts now.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TlsInfo {
    pub server_cert_not_after_s: Option<i64>,
    pub client_ca_not_after_s: Option<i64>,
    pub crls: Vec<CrlInfo>,
}

/// Reads the CRLs in a file: PEM (`X509 CRL` blocks) or one DER CRL.
pub fn load_crls(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsSetupError> {
    let p = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| TlsSetupError::Io {
        path: p.clone(),
        source,
    })?;
    let pem: Vec<_> = rustls_pemfile::crls(&mut &bytes[..])
        .collect::<Result<_, _>>()
        .map_err(|source| TlsSetupError::Io {
            path: p.clone(),
            source,
        })?;
    if !pem.is_empty() {
        return Ok(pem);
    }
    if bytes.first() == Some(&0x30) {
        return Ok(vec![CertificateRevocationListDer::from(bytes)]);
    }
    Err(TlsSetupError::Empty {
        path: p,
        what: "certificate revocation list (X509 CRL)",
    })
}

/// A CRL's facts, checked against the CA bundle: a CRL no CA of the
/// bundle signed would refuse every terminal at the handshake, so it is
/// refused at load instead, with the reason.
fn crl_info(
    path: &Path,
    der: &[u8],
    cas: &[CertificateDer<'static>],
) -> Result<CrlInfo, TlsSetupError> {
    let bad = |detail: String| TlsSetupError::Crl {
        path: path.display().to_string(),
        detail,
    };
    let (_, crl) = x509_parser::parse_x509_crl(der).map_err(|e| bad(format!("not a CRL: {e}")))?;
    // By name and by signature: two CAs may carry the same name (every
    // development CA does), and a list the handshake cannot verify would
    // refuse every terminal.
    let issuer = crl.issuer().as_raw();
    let signed = cas.iter().any(|ca| {
        x509_parser::parse_x509_certificate(ca).is_ok_and(|(_, c)| {
            c.subject().as_raw() == issuer && crl.verify_signature(c.public_key()).is_ok()
        })
    });
    if !signed {
        return Err(bad(format!(
            "not signed by a CA of terminal.client_ca (its issuer: {})",
            crl.issuer()
        )));
    }
    Ok(CrlInfo {
        path: path.display().to_string(),
        issuer: crl.issuer().to_string(),
        this_update_s: crl.last_update().timestamp(),
        next_update_s: crl.next_update().map(|t| t.timestamp()),
        revoked: crl.iter_revoked_certificates().count(),
    })
}

/// Builds the terminal listener's config from the files, and what it
/// trusts.
fn terminal_config(
    files: &TlsFiles,
    refusals: &Arc<dyn Refusals>,
) -> Result<(rustls::ServerConfig, TlsInfo), TlsSetupError> {
    let cas = load_certs(&files.client_ca)?;
    let mut roots = rustls::RootCertStore::empty();
    for ca in &cas {
        roots.add(ca.clone())?;
    }
    let mut crls = Vec::new();
    let mut infos = Vec::new();
    for path in &files.crls {
        for der in load_crls(path)? {
            infos.push(crl_info(path, &der, &cas)?);
            crls.push(der);
        }
    }
    let provider = crypto_provider();
    let mut builder = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    );
    if !crls.is_empty() {
        // Terminal certificates come straight from the terminal CA; its
        // CRLs speak about them. An expired CRL still applies (see
        // `CrlInfo::next_update_s`); the expiry is a metric and an alert.
        builder = builder.with_crls(crls).only_check_end_entity_revocation();
    }
    let verifier = Arc::new(Blocking {
        inner: builder.build()?,
        refusals: refusals.clone(),
    });
    let chain = load_certs(&files.cert)?;
    let info = TlsInfo {
        server_cert_not_after_s: soonest_not_after_s(&chain),
        client_ca_not_after_s: soonest_not_after_s(&cas),
        crls: infos,
    };
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, load_key(&files.key)?)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok((config, info))
}

/// The terminal listener's trust, swapped whole on a reload.
pub struct TerminalTls {
    files: TlsFiles,
    refusals: Arc<dyn Refusals>,
    current: RwLock<(Arc<rustls::ServerConfig>, TlsInfo)>,
}

impl TerminalTls {
    pub fn load(
        files: TlsFiles,
        refusals: Arc<dyn Refusals>,
    ) -> Result<TerminalTls, TlsSetupError> {
        let (config, info) = terminal_config(&files, &refusals)?;
        publish(&info);
        Ok(TerminalTls {
            files,
            refusals,
            current: RwLock::new((Arc::new(config), info)),
        })
    }

    /// Reads the files again. On success new handshakes use them at once;
    /// on failure nothing changes and the error says which file and why.
    pub fn reload(&self) -> Result<TlsInfo, TlsSetupError> {
        match terminal_config(&self.files, &self.refusals) {
            Ok((config, info)) => {
                publish(&info);
                metrics::counter!("onecard_tls_reloads_total", "result" => "ok").increment(1);
                *self.current.write() = (Arc::new(config), info.clone());
                Ok(info)
            }
            Err(e) => {
                metrics::counter!("onecard_tls_reloads_total", "result" => "failed").increment(1);
                Err(e)
            }
        }
    }

    /// The config a new handshake uses.
    pub fn config(&self) -> Arc<rustls::ServerConfig> {
        self.current.read().0.clone()
    }

    pub fn info(&self) -> TlsInfo {
        self.current.read().1.clone()
    }
}

/// Expiry gauges (paged 30 days ahead: ops/prometheus/rules/alerts.yml).
fn publish(info: &TlsInfo) {
    for (cert, at) in [
        ("server", info.server_cert_not_after_s),
        ("client_ca", info.client_ca_not_after_s),
    ] {
        if let Some(at) = at {
            metrics::gauge!("onecard_tls_cert_expiry_timestamp_seconds", "cert" => cert)
                .set(at as f64);
        }
    }
    for crl in &info.crls {
        if let Some(at) = crl.next_update_s {
            metrics::gauge!("onecard_tls_crl_next_update_timestamp_seconds", "crl" => crl.path.clone())
                .set(at as f64);
        }
        metrics::gauge!("onecard_tls_crl_revoked_certificates", "crl" => crl.path.clone())
            .set(crl.revoked as f64);
    }
    metrics::gauge!("onecard_tls_loaded_timestamp_seconds").set(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0),
    );
}
