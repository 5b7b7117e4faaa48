//! Development certificates (rcgen): a terminal CA, a server certificate for
//! localhost/127.0.0.1, and terminal certificates whose subject common name
//! is the terminal id. Production deployments bring their own PKI; these
//! exist so that the demo, the tests and the load generator use real mTLS.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};

pub use crate::config::cert_files::{CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY, TERMINALS_DIR};

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The terminal id of the `i`-th development terminal (1-based).
pub fn terminal_id(i: u32) -> String {
    format!("term-{i:05}")
}

pub fn terminal_cert_path(dir: &Path, id: &str) -> PathBuf {
    dir.join(TERMINALS_DIR).join(format!("{id}.pem"))
}

pub fn terminal_key_path(dir: &Path, id: &str) -> PathBuf {
    dir.join(TERMINALS_DIR).join(format!("{id}.key"))
}

/// What [`generate`] wrote.
#[derive(Debug)]
pub struct Written {
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub terminals: Vec<(String, PathBuf, PathBuf)>,
}

fn write(path: &Path, text: &str) -> Result<(), CertError> {
    let io = |source| CertError::Io {
        path: path.to_owned(),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io)?;
    }
    std::fs::write(path, text).map_err(io)
}

fn dn(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "OneCard Gateway (development)");
    dn.push(DnType::CommonName, common_name);
    dn
}

/// Writes a new CA, server certificate and `terminals` terminal
/// certificates into `dir`.
pub fn generate(dir: &Path, terminals: u32) -> Result<Written, CertError> {
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.distinguished_name = dn("OneCard terminal CA (development)");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;

    let mut server_params = CertificateParams::new(vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ])?;
    server_params.distinguished_name = dn("localhost");
    server_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server_key = KeyPair::generate()?;
    let server = server_params.signed_by(&server_key, &*ca)?;

    let written = Written {
        ca_cert: dir.join(CA_CERT),
        ca_key: dir.join(CA_KEY),
        server_cert: dir.join(SERVER_CERT),
        server_key: dir.join(SERVER_KEY),
        terminals: Vec::new(),
    };
    write(&written.ca_cert, &ca.pem())?;
    write(&written.ca_key, &ca.key().serialize_pem())?;
    write(&written.server_cert, &server.pem())?;
    write(&written.server_key, &server_key.serialize_pem())?;
    let mut written = written;
    written.terminals = add_terminals(dir, &*ca, 1..=terminals)?;
    Ok(written)
}

/// Issues terminal certificates for the ids in `range` from the CA in `dir`.
fn add_terminals(
    dir: &Path,
    ca: &Issuer<'_, impl rcgen::SigningKey>,
    range: std::ops::RangeInclusive<u32>,
) -> Result<Vec<(String, PathBuf, PathBuf)>, CertError> {
    let mut out = Vec::new();
    for i in range {
        let id = terminal_id(i);
        let mut params = CertificateParams::new(vec![id.clone()])?;
        params.distinguished_name = dn(&id);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, ca)?;
        let (cp, kp) = (terminal_cert_path(dir, &id), terminal_key_path(dir, &id));
        write(&cp, &cert.pem())?;
        write(&kp, &key.serialize_pem())?;
        out.push((id, cp, kp));
    }
    Ok(out)
}

/// Creates development certificates in `dir` unless a CA is already there.
/// Returns `true` when it created them.
pub fn ensure(dir: &Path, terminals: u32) -> Result<bool, CertError> {
    if dir.join(CA_CERT).exists() && dir.join(SERVER_CERT).exists() && dir.join(SERVER_KEY).exists()
    {
        return Ok(false);
    }
    generate(dir, terminals)?;
    Ok(true)
}
