//! `onecard sink-sim`: a downstream settlement receiver, real enough to
//! test delivery against. It serves HTTPS, checks each batch's signature
//! and that its count and total add up, books it once (a batch id seen
//! before gets the same acknowledgement again), appends it to a ledger
//! file that is synced before the answer, and acknowledges with the batch
//! id, count and total. It can be told to misbehave, as real receivers do:
//! fail the next N batches, answer slowly, drop the connection after
//! booking, answer a wrong total, or be away for a while.
//!
//! - `POST /v1/batches`: a batch (headers `Idempotency-Key`: the batch id,
//!   `X-Onecard-Signature`).
//! - `GET /v1/ledger`: what has been booked (batches, events, total).
//! - `POST /v1/misbehave`: `{"fail": N, "delay_ms": M, "drop_after_booking": N,
//!   "wrong_total": N, "away_ms": M}` (loopback only, like the whole server;
//!   "away" drops batches unanswered while the ledger and controls answer).
//!
//! It is as strict about the request target as a receiver written with
//! Python's `http.server`: an absolute-form target (`POST https://host/...`
//! over HTTP/1.1) is `404`, so the gateway's tests keep it sending the
//! origin form.

use std::collections::HashMap;
use std::convert::Infallible;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};
use tokio_rustls::TlsAcceptor;

use onecard_core::settle::sign::Signer;

/// A batch body, at most (the gateway's batches are far smaller).
pub const BATCH_BYTES_MAX: usize = 16 * 1024 * 1024;

pub use onecard_core::settle::batch::Ack;

#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Ledger {
    pub batches: u64,
    /// Lines booked: charges and reversals.
    pub events: u64,
    /// Net: charges less what reversals gave back.
    pub total_fen: i64,
    /// Reversal lines among `events`.
    #[serde(default)]
    pub reversals: u64,
    /// Credit lines (disbursements paid to card holders) among `events`,
    /// and what they paid (a positive sum; `total_fen` has them negative).
    #[serde(default)]
    pub credits: u64,
    #[serde(default)]
    pub credited_fen: i64,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Misbehave {
    #[serde(default)]
    pub fail: u32,
    #[serde(default)]
    pub delay_ms: u64,
    #[serde(default)]
    pub drop_after_booking: u32,
    #[serde(default)]
    pub wrong_total: u32,
    #[serde(default)]
    pub away_ms: u64,
}

#[derive(Default)]
struct Faults {
    fail: AtomicU32,
    delay_ms: AtomicU64,
    drop_after_booking: AtomicU32,
    wrong_total: AtomicU32,
    away_until_ms: AtomicI64,
}

/// Takes one from a counter if it is above zero.
fn take(c: &AtomicU32) -> bool {
    c.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
        .is_ok()
}

/// A batch as checked: its events are kept as sent (for the ledger) and
/// read only for their amounts, so booking costs little per event.
#[derive(Deserialize)]
struct BatchDoc<'a> {
    batch_id: String,
    count: u64,
    total_fen: i64,
    #[serde(borrow)]
    events: &'a serde_json::value::RawValue,
}

#[derive(Deserialize)]
struct Amount {
    amount_fen: i64,
    /// `charge`, `reversal` or `credit` (absent: as the amount's sign says).
    #[serde(rename = "type", default)]
    kind: Option<String>,
}

/// Reversal and credit lines among a batch's, and what the credits paid.
fn tally<'a>(lines: impl Iterator<Item = (i64, Option<&'a str>)>) -> (u64, u64, i64) {
    let (mut reversals, mut credits, mut credited_fen) = (0, 0, 0);
    for (fen, kind) in lines {
        match kind {
            Some("credit") => {
                credits += 1;
                credited_fen -= fen;
            }
            _ if fen < 0 => reversals += 1,
            _ => {}
        }
    }
    (reversals, credits, credited_fen)
}

#[derive(Deserialize, Serialize)]
struct EventDoc {
    seq: u64,
    amount_fen: i64,
    #[serde(flatten)]
    rest: serde_json::Map<String, serde_json::Value>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReceiverError {
    #[error("ledger {path}: {source}")]
    Ledger {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

struct State {
    signer: Signer,
    ledger_path: PathBuf,
    ledger: Mutex<(std::fs::File, HashMap<String, Ack>, Ledger)>,
    faults: Faults,
}

/// One ledger line: a booked batch.
#[derive(Serialize, Deserialize)]
struct Booked {
    ack: Ack,
    events: Vec<EventDoc>,
}

fn load_ledger(
    path: &Path,
) -> Result<(std::fs::File, HashMap<String, Ack>, Ledger), ReceiverError> {
    let err = |source| ReceiverError::Ledger {
        path: path.to_path_buf(),
        source,
    };
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(err(e)),
    };
    // A last line cut short by a crash was never acknowledged (the answer
    // follows the sync): drop it, so the next booking starts a clean line;
    // the sender sends that batch again.
    let whole = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let mut seen = HashMap::new();
    let mut totals = Ledger::default();
    for line in bytes[..whole]
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
    {
        let b: Booked = serde_json::from_slice(line).map_err(|e| {
            err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("a complete ledger line does not decode: {e}"),
            ))
        })?;
        totals.batches += 1;
        totals.events += b.ack.count;
        totals.total_fen += b.ack.total_fen;
        let (reversals, credits, credited_fen) = tally(
            b.events
                .iter()
                .map(|e| (e.amount_fen, e.rest.get("type").and_then(|t| t.as_str()))),
        );
        totals.reversals += reversals;
        totals.credits += credits;
        totals.credited_fen += credited_fen;
        seen.insert(b.ack.batch_id.clone(), b.ack);
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(err)?;
    if whole < bytes.len() {
        file.set_len(whole as u64).map_err(err)?;
        file.sync_all().map_err(err)?;
    }
    Ok((file, seen, totals))
}

fn json(status: StatusCode, v: &impl Serialize) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(
        serde_json::to_vec(v).expect("answers serialize"),
    )));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

fn error(status: StatusCode, code: &str, message: &str) -> Response<Full<Bytes>> {
    json(
        status,
        &serde_json::json!({"error": {"code": code, "message": message}}),
    )
}

enum Outcome {
    Answer(Response<Full<Bytes>>),
    /// Booked, but close the connection without answering.
    Drop,
}

/// Refuses a request target the way a strict origin server does (one
/// written with Python's `http.server`, say, answers `404`): over
/// HTTP/1.x only the origin form (`/v1/batches`) names a resource here;
/// the absolute form is what a client sends to a proxy. Over HTTP/2 the
/// scheme must be the connection's, `https`. The gateway once sent
/// `POST http://host:port/v1/batches` over TLS, every batch was parked at
/// such a receiver, and this one (which took it) let no test see it.
fn strict_target(req: &Request<Incoming>) -> Option<Response<Full<Bytes>>> {
    let uri = req.uri();
    let refusal = if req.version() < http::Version::HTTP_2 {
        uri.scheme().is_some() || uri.authority().is_some()
    } else {
        uri.scheme_str() != Some("https")
    };
    refusal.then(|| {
        error(
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            "the request target must be origin-form (POST /v1/batches with a Host header) over HTTP/1.1, and :scheme https over HTTP/2",
        )
    })
}

impl State {
    fn book(&self, body: &[u8], signature: Option<&str>) -> Outcome {
        if !signature.is_some_and(|s| self.signer.verify(body, s)) {
            return Outcome::Answer(error(
                StatusCode::UNAUTHORIZED,
                "INVALID_SIGNATURE",
                "X-Onecard-Signature does not match the batch",
            ));
        }
        let parsed = serde_json::from_slice::<BatchDoc>(body).and_then(|doc| {
            serde_json::from_str::<Vec<Amount>>(doc.events.get()).map(|a| (doc, a))
        });
        let Ok((doc, amounts)) = parsed else {
            return Outcome::Answer(error(
                StatusCode::BAD_REQUEST,
                "INVALID_REQUEST",
                "the body is not a batch document",
            ));
        };
        let count = amounts.len() as u64;
        let total: i64 = amounts.iter().map(|e| e.amount_fen).sum();
        if count != doc.count || total != doc.total_fen {
            return Outcome::Answer(error(
                StatusCode::BAD_REQUEST,
                "INVALID_REQUEST",
                "count or total_fen does not add up over the events",
            ));
        }
        let ack = {
            let mut guard = self.ledger.lock();
            let (file, seen, totals) = &mut *guard;
            match seen.get(&doc.batch_id) {
                Some(ack) => ack.clone(),
                None => {
                    let (reversals, credits, credited_fen) =
                        tally(amounts.iter().map(|e| (e.amount_fen, e.kind.as_deref())));
                    let ack = Ack {
                        batch_id: doc.batch_id.clone(),
                        count,
                        total_fen: total,
                    };
                    // A ledger line: the acknowledgement and the events as
                    // sent (one line: a body that spans lines is compacted).
                    let events = doc.events.get();
                    let events = if events.contains('\n') {
                        serde_json::from_str::<serde_json::Value>(events)
                            .map(|v| v.to_string())
                            .unwrap_or_default()
                    } else {
                        events.to_owned()
                    };
                    let line = format!(
                        "{{\"ack\":{},\"events\":{events}}}\n",
                        serde_json::to_string(&ack).expect("an ack serializes")
                    )
                    .into_bytes();
                    // Booked means on disk: the acknowledgement lets the
                    // sender forget the batch.
                    if file
                        .write_all(&line)
                        .and_then(|()| file.sync_data())
                        .is_err()
                    {
                        return Outcome::Answer(error(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "UNAVAILABLE",
                            "the ledger cannot be written",
                        ));
                    }
                    tracing::debug!(ledger = %self.ledger_path.display(), batch = %ack.batch_id, "booked");
                    seen.insert(ack.batch_id.clone(), ack.clone());
                    totals.reversals += reversals;
                    totals.credits += credits;
                    totals.credited_fen += credited_fen;
                    totals.batches += 1;
                    totals.events += ack.count;
                    totals.total_fen += ack.total_fen;
                    ack
                }
            }
        };
        if take(&self.faults.drop_after_booking) {
            return Outcome::Drop;
        }
        let ack = if take(&self.faults.wrong_total) {
            Ack {
                total_fen: ack.total_fen + 1,
                ..ack
            }
        } else {
            ack
        };
        Outcome::Answer(json(StatusCode::OK, &ack))
    }

    async fn handle(&self, req: Request<Incoming>) -> Outcome {
        if let Some(refusal) = strict_target(&req) {
            return Outcome::Answer(refusal);
        }
        match (req.method().clone(), req.uri().path()) {
            (Method::GET, "/v1/ledger") => {
                Outcome::Answer(json(StatusCode::OK, &self.ledger.lock().2))
            }
            (Method::POST, "/v1/misbehave") => {
                let Ok(body) = Limited::new(req.into_body(), 4096).collect().await else {
                    return Outcome::Answer(error(
                        StatusCode::BAD_REQUEST,
                        "INVALID_REQUEST",
                        "unreadable body",
                    ));
                };
                let Ok(m) = serde_json::from_slice::<Misbehave>(&body.to_bytes()) else {
                    return Outcome::Answer(error(
                        StatusCode::BAD_REQUEST,
                        "INVALID_REQUEST",
                        "expected {fail, delay_ms, drop_after_booking, wrong_total, away_ms}",
                    ));
                };
                let f = &self.faults;
                f.fail.store(m.fail, Ordering::Release);
                f.delay_ms.store(m.delay_ms, Ordering::Release);
                f.drop_after_booking
                    .store(m.drop_after_booking, Ordering::Release);
                f.wrong_total.store(m.wrong_total, Ordering::Release);
                f.away_until_ms.store(
                    onecard_core::time::wall_ms() + m.away_ms as i64,
                    Ordering::Release,
                );
                Outcome::Answer(json(StatusCode::OK, &serde_json::json!({"ok": true})))
            }
            (Method::POST, "/v1/batches") => {
                // Away: batches go unanswered (the ledger and the controls
                // still answer, for tests and operators).
                if self.faults.away_until_ms.load(Ordering::Acquire) > onecard_core::time::wall_ms()
                {
                    return Outcome::Drop;
                }
                let delay = self.faults.delay_ms.load(Ordering::Acquire);
                if delay > 0 {
                    tokio::time::sleep(Duration::from_millis(delay)).await;
                }
                if take(&self.faults.fail) {
                    return Outcome::Answer(error(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "UNAVAILABLE",
                        "told to fail",
                    ));
                }
                let signature = req
                    .headers()
                    .get("x-onecard-signature")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                let Ok(body) = Limited::new(req.into_body(), BATCH_BYTES_MAX)
                    .collect()
                    .await
                else {
                    return Outcome::Answer(error(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "PAYLOAD_TOO_LARGE",
                        "the batch is too large or unreadable",
                    ));
                };
                self.book(&body.to_bytes(), signature.as_deref())
            }
            _ => Outcome::Answer(error(
                StatusCode::NOT_FOUND,
                "NOT_FOUND",
                "POST /v1/batches, GET /v1/ledger, POST /v1/misbehave",
            )),
        }
    }
}

/// The receiver's TLS config, HTTP/1.1 and h2: with `client_ca`, senders
/// must present a certificate it signed (as a bank's or insurer's
/// receiver would ask); without, any sender that has the signing key may
/// book.
pub fn server_tls(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<Arc<tokio_rustls::rustls::ServerConfig>, crate::net::tls::TlsSetupError> {
    let config = match client_ca {
        Some(ca) => crate::net::tls::server_tls(cert, key, ca)?,
        None => {
            let mut config = tokio_rustls::rustls::ServerConfig::builder_with_provider(
                crate::net::tls::crypto_provider(),
            )
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(
                crate::net::tls::load_certs(cert)?,
                crate::net::tls::load_key(key)?,
            )?;
            config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
            config
        }
    };
    Ok(Arc::new(config))
}

pub struct Running {
    pub addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// Starts a receiver on `addr` (loopback), TLS with `tls`, booking into the
/// ledger file at `ledger` (created if missing, read back if present).
pub async fn start(
    addr: SocketAddr,
    tls: Arc<tokio_rustls::rustls::ServerConfig>,
    ledger: &Path,
    signer: Signer,
) -> Result<Running, ReceiverError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| ReceiverError::Bind { addr, source })?;
    start_on(listener, tls, ledger, signer)
}

/// Starts a receiver on a listener the caller made (a test that stops and
/// restarts its receiver keeps the port bound in between this way).
pub fn start_on(
    listener: TcpListener,
    tls: Arc<tokio_rustls::rustls::ServerConfig>,
    ledger: &Path,
    signer: Signer,
) -> Result<Running, ReceiverError> {
    let state = Arc::new(State {
        signer,
        ledger_path: ledger.to_path_buf(),
        ledger: Mutex::new(load_ledger(ledger)?),
        faults: Faults::default(),
    });
    let addr = listener.local_addr().expect("bound");
    let (stop, mut stop_rx) = watch::channel(false);
    let acceptor = TlsAcceptor::from(tls);
    let task = tokio::spawn(async move {
        loop {
            let stream = tokio::select! {
                a = listener.accept() => match a { Ok((s, _)) => s, Err(_) => continue },
                _ = stop_rx.changed() => return,
            };
            let (state, acceptor, mut stop) = (state.clone(), acceptor.clone(), stop_rx.clone());
            tokio::spawn(async move {
                let Ok(Ok(tls)) =
                    tokio::time::timeout(Duration::from_secs(5), acceptor.accept(stream)).await
                else {
                    return;
                };
                let cut = Arc::new(Notify::new());
                let cut_in = cut.clone();
                let svc = service_fn(move |req| {
                    let (state, cut) = (state.clone(), cut_in.clone());
                    async move {
                        match state.handle(req).await {
                            Outcome::Answer(r) => Ok::<_, Infallible>(r),
                            Outcome::Drop => {
                                cut.notify_one();
                                // Never answered: the connection is dropped.
                                std::future::pending().await
                            }
                        }
                    }
                });
                let builder = auto::Builder::new(TokioExecutor::new());
                let conn = builder.serve_connection(TokioIo::new(tls), svc);
                tokio::select! {
                    _ = conn => {}
                    _ = cut.notified() => {}
                    _ = stop.changed() => {}
                }
            });
        }
    });
    Ok(Running { addr, stop, task })
}
