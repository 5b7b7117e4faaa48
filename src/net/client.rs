//! A terminal's side of the wire: mTLS (or plaintext) connections over
//! HTTP/1.1 or HTTP/2, and a small admin client. Used by the demo, the
//! black-box tests and the load generator, so that all three speak to the
//! gateway exactly as real terminals and operators do.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tokio_rustls::{rustls, TlsConnector};

use crate::net::tls::{crypto_provider, load_certs, load_key, TlsSetupError};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connect: {0}")]
    Io(#[from] std::io::Error),
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
    #[error("request: {0}")]
    Request(#[from] http::Error),
    #[error("TLS setup: {0}")]
    Tls(#[from] TlsSetupError),
    #[error("TLS: {0}")]
    Rustls(#[from] rustls::Error),
}

/// A client TLS config: trusts `ca` for the server, presents `cert`/`key`
/// (when given), and offers the protocol by ALPN.
pub fn tls_config(
    ca: &Path,
    identity: Option<(&Path, &Path)>,
    protocol: Protocol,
) -> Result<Arc<rustls::ClientConfig>, ClientError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in load_certs(ca)? {
        roots.add(c)?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    let mut config = match identity {
        Some((cert, key)) => builder.with_client_auth_cert(load_certs(cert)?, load_key(key)?)?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = match protocol {
        Protocol::Http1 => vec![b"http/1.1".to_vec()],
        Protocol::Http2 => vec![b"h2".to_vec()],
    };
    Ok(Arc::new(config))
}

enum Sender {
    H1(http1::SendRequest<Full<Bytes>>),
    H2(http2::SendRequest<Full<Bytes>>),
}

/// One connection to the gateway, as a terminal holds it.
pub struct Connection {
    sender: Sender,
    /// `https` over TLS, `http` in plaintext: what HTTP/2's `:scheme` says.
    scheme: &'static str,
    /// What `Host` (HTTP/1.1) or `:authority` (HTTP/2) says: the server's
    /// name as the caller knows it, with the port.
    authority: String,
}

/// An answer: status, headers, body.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

impl Connection {
    /// Connects over TLS; `server_name` must match the server certificate.
    pub async fn tls(
        addr: SocketAddr,
        config: Arc<rustls::ClientConfig>,
        protocol: Protocol,
    ) -> Result<Connection, ClientError> {
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
        let tls = TlsConnector::from(config).connect(name, tcp).await?;
        Connection::handshake(TokioIo::new(tls), protocol, "https", addr.to_string()).await
    }

    /// Connects over TLS to `addr`, checking the certificate against `name`
    /// (a DNS name or an IP address); `authority` (`host[:port]`, as in
    /// the URL the caller was given) goes in `Host`.
    pub async fn tls_named(
        addr: SocketAddr,
        name: rustls::pki_types::ServerName<'static>,
        authority: &str,
        config: Arc<rustls::ClientConfig>,
        protocol: Protocol,
    ) -> Result<Connection, ClientError> {
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let tls = TlsConnector::from(config).connect(name, tcp).await?;
        Connection::handshake(TokioIo::new(tls), protocol, "https", authority.to_owned()).await
    }

    /// Connects without TLS (the plaintext benchmark listener, the admin listener).
    pub async fn plain(addr: SocketAddr, protocol: Protocol) -> Result<Connection, ClientError> {
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        Connection::handshake(TokioIo::new(tcp), protocol, "http", addr.to_string()).await
    }

    async fn handshake<I>(
        io: I,
        protocol: Protocol,
        scheme: &'static str,
        authority: String,
    ) -> Result<Connection, ClientError>
    where
        I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let sender = match protocol {
            Protocol::Http1 => {
                let (s, conn) = http1::handshake(io).await?;
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                Sender::H1(s)
            }
            Protocol::Http2 => {
                let (s, conn) = http2::handshake(TokioExecutor::new(), io).await?;
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                Sender::H2(s)
            }
        };
        Ok(Connection {
            sender,
            scheme,
            authority,
        })
    }

    /// The request line's target and the `Host` header, as RFC 9112 §3.2
    /// and RFC 9113 §8.3.1 want them from a client talking to the origin
    /// server itself: HTTP/1.1 sends the origin form (`/v1/batches`) with
    /// `Host`; HTTP/2 carries scheme and authority as pseudo-headers, which
    /// hyper fills from an absolute URI (with the scheme of the connection:
    /// `https` over TLS). The absolute form on HTTP/1.1 is for proxies,
    /// and a strict origin server refuses it.
    fn target(&self, path: &str) -> (String, Option<&str>) {
        match self.sender {
            Sender::H1(_) => (path.to_owned(), Some(self.authority.as_str())),
            Sender::H2(_) => (format!("{}://{}{path}", self.scheme, self.authority), None),
        }
    }

    /// Whether the server has closed this connection (an idle timeout, a
    /// restart): a terminal reconnects before its next request.
    pub fn is_closed(&self) -> bool {
        match &self.sender {
            Sender::H1(s) => s.is_closed(),
            Sender::H2(s) => s.is_closed(),
        }
    }

    /// Sends one request and reads the whole answer.
    pub async fn send(
        &mut self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> Result<Answer, ClientError> {
        debug_assert!(path.starts_with('/'), "a path, not a URL: {path}");
        let (uri, host) = self.target(path);
        let mut b = Request::builder().method(method).uri(uri);
        if let Some(host) = host {
            if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
                b = b.header(http::header::HOST, host);
            }
        }
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let req = b.body(Full::new(Bytes::from(body)))?;
        let resp = match &mut self.sender {
            Sender::H1(s) => {
                s.ready().await?;
                s.send_request(req).await?
            }
            Sender::H2(s) => {
                s.ready().await?;
                s.send_request(req).await?
            }
        };
        let (parts, body) = resp.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok(Answer {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }

    /// `POST /v1/authorize` with a JSON body.
    pub async fn authorize(&mut self, body: &serde_json::Value) -> Result<Answer, ClientError> {
        self.post_json("/v1/authorize", body).await
    }

    /// `POST /v1/reverse` with `body`.
    pub async fn reverse(&mut self, body: &serde_json::Value) -> Result<Answer, ClientError> {
        self.post_json("/v1/reverse", body).await
    }

    /// `POST /v1/hold`, `/v1/capture` or `/v1/void` (`step`: `hold`,
    /// `capture`, `void`) with `body`: a medical counter.
    pub async fn medical(
        &mut self,
        step: &str,
        body: &serde_json::Value,
    ) -> Result<Answer, ClientError> {
        self.post_json(&format!("/v1/{step}"), body).await
    }

    /// `POST /v1/offline-batch` with `body` (`{"events": [...]}`).
    pub async fn offline_batch(&mut self, body: &serde_json::Value) -> Result<Answer, ClientError> {
        self.post_json("/v1/offline-batch", body).await
    }

    /// `GET /v1/denylist`, from version `since` (the whole list without).
    pub async fn denylist(&mut self, since: Option<u64>) -> Result<Answer, ClientError> {
        let path = match since {
            Some(v) => format!("/v1/denylist?since={v}"),
            None => "/v1/denylist".to_owned(),
        };
        self.send(Method::GET, &path, &[], Vec::new()).await
    }

    async fn post_json(
        &mut self,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<Answer, ClientError> {
        let bytes = serde_json::to_vec(body).expect("a JSON value serializes");
        self.send(
            Method::POST,
            path,
            &[("content-type", "application/json")],
            bytes,
        )
        .await
    }

    /// An HTTP/2 connection can be shared by concurrent requests.
    pub fn try_clone(&self) -> Option<Connection> {
        match &self.sender {
            Sender::H2(s) => Some(Connection {
                sender: Sender::H2(s.clone()),
                scheme: self.scheme,
                authority: self.authority.clone(),
            }),
            Sender::H1(_) => None,
        }
    }
}

/// One admin call on a fresh HTTP/1.1 connection.
pub async fn admin(
    addr: SocketAddr,
    token: Option<&str>,
    method: Method,
    path: &str,
    body: Option<&serde_json::Value>,
) -> Result<Answer, ClientError> {
    let bytes = body
        .map(|b| serde_json::to_vec(b).expect("a JSON value serializes"))
        .unwrap_or_default();
    admin_raw(addr, token, method, path, "application/json", bytes).await
}

/// An admin call with a body of any media type (the NDJSON imports).
pub async fn admin_raw(
    addr: SocketAddr,
    token: Option<&str>,
    method: Method,
    path: &str,
    content_type: &str,
    body: Vec<u8>,
) -> Result<Answer, ClientError> {
    let mut conn = Connection::plain(addr, Protocol::Http1).await?;
    let auth = token.map(|t| format!("Bearer {t}"));
    let mut headers = vec![("content-type", content_type)];
    if let Some(a) = &auth {
        headers.push(("authorization", a.as_str()));
    }
    conn.send(method, path, &headers, body).await
}

/// Connects as development terminal `n` (1-based): over mTLS with its
/// certificate from `certs_dir` (as written by `onecard certs`), or, without
/// a directory, in plaintext to a benchmark listener.
pub async fn connect_terminal(
    addr: SocketAddr,
    certs_dir: Option<&Path>,
    n: u32,
    protocol: Protocol,
) -> Result<Connection, ClientError> {
    let Some(dir) = certs_dir else {
        return Connection::plain(addr, protocol).await;
    };
    let id = crate::net::certs::terminal_id(n);
    let tls = tls_config(
        &dir.join(crate::net::certs::CA_CERT),
        Some((
            &crate::net::certs::terminal_cert_path(dir, &id),
            &crate::net::certs::terminal_key_path(dir, &id),
        )),
        protocol,
    )?;
    Connection::tls(addr, tls, protocol).await
}

/// How long [`FailoverTerminal`] waits for a node's answer before trying
/// the next one.
pub const FAILOVER_AFTER: std::time::Duration = std::time::Duration::from_secs(5);

/// A terminal that knows every gateway node of a cluster (or one node):
/// it keeps one connection, and after a connection error or a `503` from
/// a node it moves to the next and sends the same request again. That is
/// safe because a terminal's request carries its event id: a node that
/// already decided it answers with the first answer.
pub struct FailoverTerminal {
    addrs: Vec<SocketAddr>,
    certs: Option<std::path::PathBuf>,
    n: u32,
    protocol: Protocol,
    current: usize,
    conn: Option<Connection>,
    /// How many times it moved to another node.
    pub failovers: u64,
}

impl FailoverTerminal {
    /// Development terminal `n` (its certificate under `certs`, or
    /// plaintext without), starting at `addrs[first % len]`.
    pub fn new(
        addrs: Vec<SocketAddr>,
        certs: Option<&Path>,
        n: u32,
        protocol: Protocol,
        first: usize,
    ) -> FailoverTerminal {
        assert!(!addrs.is_empty(), "a terminal needs a gateway address");
        let current = first % addrs.len();
        FailoverTerminal {
            addrs,
            certs: certs.map(Path::to_path_buf),
            n,
            protocol,
            current,
            conn: None,
            failovers: 0,
        }
    }

    /// The node it sends to now.
    pub fn node(&self) -> SocketAddr {
        self.addrs[self.current]
    }

    fn next_node(&mut self) {
        self.conn = None;
        self.current = (self.current + 1) % self.addrs.len();
        self.failovers += 1;
    }

    /// Sends one request, moving through the nodes (each at most twice)
    /// until one answers other than `503`; the last `503` or error if none
    /// does.
    pub async fn send(
        &mut self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> Result<Answer, ClientError> {
        let mut last = None;
        for _ in 0..2 * self.addrs.len() {
            if self.conn.as_ref().is_none_or(|c| c.is_closed()) {
                match connect_terminal(self.node(), self.certs.as_deref(), self.n, self.protocol)
                    .await
                {
                    Ok(c) => self.conn = Some(c),
                    Err(e) => {
                        last = Some(Err(e));
                        self.next_node();
                        continue;
                    }
                }
            }
            let conn = self.conn.as_mut().expect("connected above");
            // A node that stopped answering (not closed, just silent) is
            // left after this long, like one that refused.
            let sent = tokio::time::timeout(
                FAILOVER_AFTER,
                conn.send(method.clone(), path, headers, body.clone()),
            )
            .await
            .unwrap_or_else(|_| {
                Err(ClientError::Io(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the node did not answer in time",
                )))
            });
            match sent {
                Ok(a) if a.status == StatusCode::SERVICE_UNAVAILABLE => {
                    last = Some(Ok(a));
                    self.next_node();
                }
                Ok(a) => return Ok(a),
                Err(e) => {
                    last = Some(Err(e));
                    self.next_node();
                }
            }
        }
        last.expect("at least one node was tried")
    }

    /// `POST /v1/authorize` with a JSON body.
    pub async fn authorize(&mut self, body: &serde_json::Value) -> Result<Answer, ClientError> {
        let bytes = serde_json::to_vec(body).expect("a JSON value serializes");
        self.send(
            Method::POST,
            "/v1/authorize",
            &[("content-type", "application/json")],
            bytes,
        )
        .await
    }
}
