//! Development certificates (rcgen): a terminal CA, a server certificate for
//! localhost/127.0.0.1, and terminal certificates whose subject common name
//! is the terminal id. Production deployments bring their own PKI; these
//! exist so that the demo, the tests and the load generator use real mTLS.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, CertifiedIssuer,
    DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair,
    KeyUsagePurpose, RevocationReason, RevokedCertParams, SerialNumber,
};
use time::{Duration, OffsetDateTime};

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
    #[error("{path}: {detail}")]
    Bad { path: PathBuf, detail: String },
}

/// How long development certificates are valid: the CA ten years, the
/// server's and terminals' two (a real fleet renews; the expiry alerts
/// of ops/ then have something to say).
const CA_DAYS: i64 = 3_650;
const LEAF_DAYS: i64 = 730;

/// Valid from a day ago (a terminal's clock may run behind) for `days`.
fn validity(params: &mut CertificateParams, days: i64) {
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::days(1);
    params.not_after = now + Duration::days(days);
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

/// Writes a file durably (a power cut just after the gateway created its
/// development certificates must not leave them empty): a temporary file,
/// synced, renamed over `path`, and the directory synced.
fn write(path: &Path, text: &str) -> Result<(), CertError> {
    use std::io::Write as _;
    let io = |source| CertError::Io {
        path: path.to_owned(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io)?;
    let mut name = path.file_name().unwrap_or_default().to_owned();
    name.push(".new");
    let tmp = dir.join(name);
    let mut f = std::fs::File::create(&tmp).map_err(io)?;
    f.write_all(text.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io)
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
    validity(&mut ca_params, CA_DAYS);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;

    let (server, server_key) = server_cert(&*ca)?;

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

fn server_cert(
    ca: &Issuer<'_, impl rcgen::SigningKey>,
) -> Result<(rcgen::Certificate, KeyPair), CertError> {
    let mut params = CertificateParams::new(vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ])?;
    params.distinguished_name = dn("localhost");
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    validity(&mut params, LEAF_DAYS);
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, ca)?;
    Ok((cert, key))
}

/// Issues a new server certificate and key from the development CA in
/// `dir`, in place of the old ones (a renewal: `kill -HUP` or
/// `POST /admin/v1/tls/reload` puts it in use).
pub fn reissue_server(dir: &Path) -> Result<(), CertError> {
    let key = KeyPair::from_pem(&read(&dir.join(CA_KEY))?)?;
    let ca = Issuer::from_ca_cert_pem(&read(&dir.join(CA_CERT))?, key)?;
    let (cert, key) = server_cert(&ca)?;
    // The key first, then the certificate, each replaced whole (rename): a
    // reload in between fails on a mismatched pair and keeps the old ones.
    write(&dir.join(SERVER_KEY), &key.serialize_pem())?;
    write(&dir.join(SERVER_CERT), &cert.pem())
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
        validity(&mut params, LEAF_DAYS);
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

fn read(path: &Path) -> Result<String, CertError> {
    std::fs::read_to_string(path).map_err(|source| CertError::Io {
        path: path.to_owned(),
        source,
    })
}

/// A certificate's serial number as its PEM file holds it (raw bytes).
pub fn serial_of(cert_pem: &Path) -> Result<Vec<u8>, CertError> {
    let bad = |detail: &str| CertError::Bad {
        path: cert_pem.to_owned(),
        detail: detail.to_owned(),
    };
    let text = read(cert_pem)?;
    let der = rustls_pemfile::certs(&mut text.as_bytes())
        .next()
        .ok_or_else(|| bad("no certificate in the file"))?
        .map_err(|_| bad("not a PEM certificate"))?;
    let (_, cert) =
        x509_parser::parse_x509_certificate(&der).map_err(|_| bad("not an X.509 certificate"))?;
    Ok(cert.raw_serial().to_vec())
}

/// Writes a CRL signed by the development CA in `dir` to `out`, revoking
/// the development terminals `revoked` (their certificates under
/// `dir/terminals`), valid for `days`. `number` is the CRL's number: each
/// new list of one CA takes a higher one.
pub fn write_crl(
    dir: &Path,
    revoked: &[String],
    out: &Path,
    number: u64,
    days: i64,
) -> Result<(), CertError> {
    let key = KeyPair::from_pem(&read(&dir.join(CA_KEY))?)?;
    let ca = Issuer::from_ca_cert_pem(&read(&dir.join(CA_CERT))?, key)?;
    let now = OffsetDateTime::now_utc();
    let mut revoked_certs = Vec::new();
    for id in revoked {
        revoked_certs.push(RevokedCertParams {
            serial_number: SerialNumber::from_slice(&serial_of(&terminal_cert_path(dir, id))?),
            revocation_time: now - Duration::minutes(1),
            reason_code: Some(RevocationReason::KeyCompromise),
            invalidity_date: None,
        });
    }
    let params = CertificateRevocationListParams {
        this_update: now - Duration::minutes(1),
        next_update: now + Duration::days(days),
        crl_number: SerialNumber::from(number),
        issuing_distribution_point: None,
        revoked_certs,
        key_identifier_method: KeyIdMethod::Sha256,
    };
    let crl = params.signed_by(&ca)?;
    write(out, &crl.pem()?)
}
