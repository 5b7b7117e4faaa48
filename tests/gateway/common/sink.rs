//! A settlement receiver for the black-box tests: development certificates
//! in `dir/certs`, a ledger in `dir`, and its query and control calls over
//! real HTTPS.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use http::Method;
use onecard::app::sink_sim::{self, Ledger, Running};
use onecard::net::client::{self, Connection, Protocol};

use onecard_core::settle::sign::{Algorithm, Signer};

pub struct Sink {
    pub certs: PathBuf,
    pub tls: std::sync::Arc<tokio_rustls::rustls::ServerConfig>,
    pub ledger_file: PathBuf,
    /// Whether the receiver asks for a client certificate.
    pub mutual: bool,
}

impl Sink {
    /// Certificates (with `terminals` terminal certificates) and a ledger path in `dir`.
    pub fn new(dir: &Path, terminals: u32) -> Sink {
        Sink::with_client_ca(dir, terminals, false)
    }

    /// As [`Sink::new`]; with `require_client_cert`, senders must present a
    /// certificate signed by the development CA.
    pub fn with_client_ca(dir: &Path, terminals: u32, require_client_cert: bool) -> Sink {
        let certs = dir.join("certs");
        onecard::net::certs::generate(&certs, terminals).unwrap();
        let ca = certs.join(onecard::net::certs::CA_CERT);
        let tls = sink_sim::server_tls(
            &certs.join(onecard::net::certs::SERVER_CERT),
            &certs.join(onecard::net::certs::SERVER_KEY),
            require_client_cert.then_some(ca.as_path()),
        )
        .unwrap();
        Sink {
            certs,
            tls,
            ledger_file: dir.join("ledger.jsonl"),
            mutual: require_client_cert,
        }
    }

    pub async fn start(&self, addr: SocketAddr, signer: Signer) -> Running {
        sink_sim::start(addr, self.tls.clone(), &self.ledger_file, signer)
            .await
            .unwrap()
    }

    /// Starts the receiver on a free loopback port, checking batches
    /// signed with HMAC-SHA256 under `key`.
    pub async fn start_hmac(&self, key: &str) -> Running {
        let signer = Signer::new(Algorithm::HmacSha256, key.as_bytes().to_vec());
        self.start("127.0.0.1:0".parse().unwrap(), signer).await
    }

    /// A gateway config's `[[settlement.sinks]]` entry named `transport`
    /// for the transit scenario, sending to `receiver` and signing with
    /// `key`; the caller appends the sink's other keys.
    pub fn transport_entry(&self, receiver: SocketAddr, key: &str) -> String {
        format!(
            "[[settlement.sinks]]\nname = \"transport\"\nurl = \"https://127.0.0.1:{}/v1/batches\"\nca = {:?}\nscenarios = [\"transit\"]\nkey = \"{key}\"\n",
            receiver.port(),
            self.certs.join(onecard::net::certs::CA_CERT),
        )
    }

    /// Starts the receiver on a listener the test made.
    pub fn start_on(&self, listener: tokio::net::TcpListener, signer: Signer) -> Running {
        sink_sim::start_on(listener, self.tls.clone(), &self.ledger_file, signer).unwrap()
    }

    /// A development terminal's certificate and key, as a client identity.
    pub fn identity(&self) -> (PathBuf, PathBuf) {
        let id = onecard::net::certs::terminal_id(1);
        (
            onecard::net::certs::terminal_cert_path(&self.certs, &id),
            onecard::net::certs::terminal_key_path(&self.certs, &id),
        )
    }

    pub async fn connect(&self, addr: SocketAddr) -> Connection {
        let identity = self.identity();
        let tls = client::tls_config(
            &self.certs.join(onecard::net::certs::CA_CERT),
            self.mutual
                .then_some((identity.0.as_path(), identity.1.as_path())),
            Protocol::Http1,
        )
        .unwrap();
        Connection::tls(addr, tls, Protocol::Http1)
            .await
            .unwrap_or_else(|e| panic!("connecting to the receiver at {addr}: {e}"))
    }

    pub async fn ledger(&self, addr: SocketAddr) -> Ledger {
        let mut c = self.connect(addr).await;
        let a = c
            .send(Method::GET, "/v1/ledger", &[], Vec::new())
            .await
            .unwrap_or_else(|e| panic!("GET /v1/ledger at the receiver {addr}: {e}"));
        serde_json::from_slice(&a.body).unwrap()
    }

    pub async fn misbehave(&self, addr: SocketAddr, how: serde_json::Value) {
        let mut c = self.connect(addr).await;
        let a = c
            .send(
                Method::POST,
                "/v1/misbehave",
                &[("content-type", "application/json")],
                serde_json::to_vec(&how).unwrap(),
            )
            .await
            .unwrap_or_else(|e| panic!("POST /v1/misbehave {how} at the receiver {addr}: {e}"));
        assert_eq!(a.status, http::StatusCode::OK);
    }
}
