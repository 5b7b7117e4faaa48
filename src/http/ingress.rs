//! Ingress: sockets, TLS, HTTP, and the terminal routes.
//!
//! Owns the accept loops and the life of each connection: TLS handshake
//! (bounded by the header-read timeout), HTTP/1.1 or HTTP/2, an idle
//! timeout, and graceful shutdown. It turns HTTP into calls on
//! [`Gateway`] and answers back; it never decides anything itself.
//!
//! The terminal id comes from the client certificate's subject common name
//! on the TLS listener, and from `X-Terminal-Id` on the loopback-only
//! plaintext listener that exists for benchmarks.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::service::stats::Kind;
use crate::service::timing::{self, Phase, PhaseClock};

use bytes::Bytes;
use http::header::{HeaderName, CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use onecard_core::wire::ErrorCode;

use crate::http::admission::Admission;
use crate::http::error::ApiError;
use crate::http::routes::{self, Listener, Match, RouteId};
use crate::http::Front;
use crate::net::tls::{CertKeys, Refusals, TerminalTls};
use crate::store::terminal_blocks::TerminalBlocks;
use onecard_core::wire::{self, HoldOp};

pub type Body = Full<Bytes>;

/// A request as the handlers of both listeners take it: its body drains
/// itself when dropped unread (see [`RequestBody`]).
pub type Req = Request<RequestBody>;

/// After a refusal, bytes of an unread body read and thrown away at most,
/// and for how long, before the connection (HTTP/1.1) or the stream
/// (HTTP/2) is given up: enough for a client that writes its whole body
/// before it reads (a 200 KB body against a 16 KiB limit) to read its
/// `413`, not a reset.
pub const DRAIN_BYTES_MAX: usize = 4 * 1024 * 1024;
pub const DRAIN_TIME_MAX: Duration = Duration::from_secs(3);
/// An unread rest known to be at most this long is left to hyper, which
/// reads what it has buffered when a body is dropped: a tap's body of a
/// few hundred bytes has arrived with its head (and fits the first HTTP/2
/// window), and a task per refused request would cost more than it saves.
pub const DRAIN_INLINE_MAX: u64 = 8 * 1024;

/// hyper's request body, which drains itself if a handler drops it before
/// its end.
///
/// Why: a refusal (`413` from the declared `Content-Length`, `415`, `401`,
/// `429`) is answered before the body is read. Dropping hyper's body then
/// makes HTTP/2 reset the stream (`CANCEL`) before the answer is out, and
/// HTTP/1.1 close the socket with bytes unread, which the kernel turns into
/// a reset while the client is still sending: either way the client never
/// reads its answer (curl: "Stream error in the HTTP/2 framing layer";
/// Python's `http.client`: connection reset). So the rest of the body is
/// read and discarded on a task of its own, at most [`DRAIN_BYTES_MAX`]
/// for at most [`DRAIN_TIME_MAX`] (like nginx's lingering close), while
/// the answer goes out; a body that ends in time leaves the connection
/// usable. A body the client has not started (`Expect: 100-continue`, no
/// `100` sent yet) is not asked for, and a rest known to be small
/// ([`DRAIN_INLINE_MAX`]) is left to hyper.
pub struct RequestBody {
    inner: Option<Incoming>,
    ended: bool,
    polled: bool,
    expect_continue: bool,
    activity: Option<Arc<ConnActivity>>,
}

impl RequestBody {
    fn new(inner: Incoming, expect_continue: bool, activity: Arc<ConnActivity>) -> RequestBody {
        RequestBody {
            inner: Some(inner),
            ended: false,
            polled: false,
            expect_continue,
            activity: Some(activity),
        }
    }
}

impl hyper::body::Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        this.polled = true;
        let Some(inner) = this.inner.as_mut() else {
            return std::task::Poll::Ready(None);
        };
        let r = std::pin::Pin::new(inner).poll_frame(cx);
        if matches!(r, std::task::Poll::Ready(None)) {
            this.ended = true;
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| hyper::body::SizeHint::with_exact(0), |b| b.size_hint())
    }
}

impl Drop for RequestBody {
    fn drop(&mut self) {
        use hyper::body::Body as _;
        let Some(inner) = self.inner.take() else {
            return;
        };
        let small = inner
            .size_hint()
            .upper()
            .is_some_and(|n| n <= DRAIN_INLINE_MAX);
        if self.ended || inner.is_end_stream() || small || (self.expect_continue && !self.polled) {
            return;
        }
        // The drain counts as a request in flight: its bytes are not the
        // head of a next request (the slow-head check), and the connection
        // is not idle while it runs.
        let busy = self.activity.take().map(ConnActivity::busy);
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                drain(inner).await;
                drop(busy);
            });
        }
    }
}

/// Reads and discards what is left of a body, within the drain bounds.
async fn drain(mut body: Incoming) {
    let read = async {
        let mut left = DRAIN_BYTES_MAX;
        while let Some(Ok(frame)) = body.frame().await {
            let n = frame.data_ref().map_or(0, Bytes::len);
            if n > left {
                return;
            }
            left -= n;
        }
    };
    let _ = tokio::time::timeout(DRAIN_TIME_MAX, read).await;
}

/// HTTP/2 streams one terminal connection may have open at once.
pub const H2_STREAMS_MAX: u32 = 64;
/// Terminal ids: at most this many characters.
pub const TERMINAL_ID_LEN_MAX: usize = 64;

/// A terminal id is 1–64 of `A-Za-z0-9._:-`: it becomes part of storage
/// keys, so it must never contain a separator byte.
pub fn valid_terminal_id(s: &str) -> bool {
    (1..=TERMINAL_ID_LEN_MAX).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// The terminal id in a verified client certificate (its subject CN),
/// and when the certificate expires (Unix seconds).
pub fn terminal_id_from_cert(der: &[u8]) -> Option<(String, i64)> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?.as_str().ok()?;
    let not_after = cert.validity().not_after.timestamp();
    valid_terminal_id(cn).then(|| (cn.to_owned(), not_after))
}

pub fn json_response(status: StatusCode, body: Vec<u8>) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

pub fn error_response(e: &ApiError) -> Response<Body> {
    let mut r = json_response(e.status(), e.body());
    if let Some(s) = e.retry_after_header() {
        r.headers_mut().insert(RETRY_AFTER, HeaderValue::from(s));
    }
    r
}

/// `onecard_http_requests_total` of `POST /v1/authorize`, the busiest
/// route, one handle per status it answers with, and
/// `onecard_http_request_duration_seconds` of every terminal route,
/// registered once (these pay an atomic add, not a registry look-up; the
/// other routes' counters are looked up by name).
pub struct RouteCounters {
    authorize: Vec<(u16, metrics::Counter)>,
    authorize_other: metrics::Counter,
    durations: Vec<(&'static str, metrics::Histogram)>,
}

/// Status codes the authorize route answers with, pre-registered.
const AUTHORIZE_STATUSES: &[u16] = &[200, 400, 401, 404, 409, 413, 415, 429, 503];

impl RouteCounters {
    pub fn new() -> RouteCounters {
        let route = routes::ROUTES[0].path;
        let counter = |code: &'static str| metrics::counter!("onecard_http_requests_total", "listener" => "terminal", "route" => route, "status" => code);
        RouteCounters {
            authorize: AUTHORIZE_STATUSES
                .iter()
                .map(|&c| {
                    let status = StatusCode::from_u16(c).expect("a valid status");
                    (c, counter(status_label(status)))
                })
                .collect(),
            authorize_other: counter("other"),
            durations: routes::ROUTES
                .iter()
                .filter(|r| r.listener == Listener::Terminal)
                .map(|r| r.path)
                .chain(["other"])
                .map(|path| {
                    (path, metrics::histogram!("onecard_http_request_duration_seconds", "listener" => "terminal", "route" => path))
                })
                .collect(),
        }
    }

    /// Counts one answer of the terminal route `label` and its time, in
    /// the metrics and in the SRE's windows.
    fn finish(
        &self,
        gw: &crate::service::gateway::Gateway,
        label: &'static str,
        status: StatusCode,
        took: Duration,
    ) {
        if label == routes::ROUTES[0].path {
            self.authorize(status).increment(1);
        } else {
            metrics::counter!("onecard_http_requests_total", "listener" => "terminal", "route" => label, "status" => status_label(status)).increment(1);
        }
        if let Some((_, h)) = self.durations.iter().find(|(p, _)| *p == label) {
            h.record(took.as_secs_f64());
        }
        gw.stats.record(Kind::Route, label, took);
    }

    /// The counter of `POST /v1/authorize` answered with `status`.
    pub fn authorize(&self, status: StatusCode) -> &metrics::Counter {
        let code = status.as_u16();
        self.authorize
            .iter()
            .find(|(c, _)| *c == code)
            .map_or(&self.authorize_other, |(_, m)| m)
    }
}

impl Default for RouteCounters {
    fn default() -> Self {
        RouteCounters::new()
    }
}

/// A closed set of status labels for metrics.
pub fn status_label(s: StatusCode) -> &'static str {
    match s.as_u16() {
        200 => "200",
        304 => "304",
        400 => "400",
        401 => "401",
        403 => "403",
        404 => "404",
        409 => "409",
        413 => "413",
        415 => "415",
        429 => "429",
        500 => "500",
        503 => "503",
        _ => "other",
    }
}

/// Checks the content type and reads the body within the size limit and
/// the header-read timeout (a body that trickles in is a slow-loris too).
pub async fn read_json_body(req: Req, limit: usize, timeout: Duration) -> Result<Bytes, ApiError> {
    read_body(req, "application/json", limit, timeout).await
}

/// Reads a body of media type `media` within `limit` bytes and `timeout`.
pub async fn read_body(
    req: Req,
    media: &'static str,
    limit: usize,
    timeout: Duration,
) -> Result<Bytes, ApiError> {
    let ct = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let essence = ct.split(';').next().unwrap_or("").trim();
    if !essence.eq_ignore_ascii_case(media) {
        return Err(ApiError::new(
            ErrorCode::UnsupportedMediaType,
            format!("Content-Type must be {media}"),
        ));
    }
    let too_large = || {
        ApiError::new(
            ErrorCode::PayloadTooLarge,
            format!("the body is larger than the limit of {limit} bytes"),
        )
    };
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    let collect = Limited::new(req.into_body(), limit).collect();
    match tokio::time::timeout(timeout, collect).await {
        Err(_) => Err(ApiError::invalid(format!(
            "the body was not received within {} ms",
            timeout.as_millis()
        ))),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Ok(Err(_)) => Err(ApiError::invalid("the body could not be read")),
        Ok(Ok(c)) => Ok(c.to_bytes()),
    }
}

/// Where a terminal's identity comes from on a listener.
#[derive(Clone)]
pub enum TerminalIdentity {
    /// Verified client certificate (TLS listener).
    Certificate(Arc<str>),
    /// `X-Terminal-Id` header (plaintext loopback listener).
    Header,
}

/// `404` for a path that exists with other methods, naming them.
pub fn wrong_method(path: &str, allowed: &[&str]) -> Response<Body> {
    let list = allowed.join(", ");
    let mut r = error_response(&ApiError::new(
        ErrorCode::NotFound,
        format!("{path} takes only {list}"),
    ));
    if let Ok(v) = HeaderValue::from_str(&list) {
        r.headers_mut().insert(http::header::ALLOW, v);
    }
    r
}

/// Serves one request on the terminal listener.
pub async fn terminal_request(
    front: Arc<Front>,
    identity: TerminalIdentity,
    req: Req,
) -> Response<Body> {
    let front = &*front;
    let started = Instant::now();
    let found = routes::find(Listener::Terminal, req.method(), req.uri().path());
    let (label, response) = match found {
        Match::Found { route, .. } => {
            let as_json = |answer: Result<Vec<u8>, ApiError>| match answer {
                Ok(body) => json_response(StatusCode::OK, body),
                Err(e) => error_response(&e),
            };
            let r = match route.id {
                RouteId::Authorize
                | RouteId::Reverse
                | RouteId::Hold
                | RouteId::Capture
                | RouteId::Void => {
                    let clock = PhaseClock::new(started);
                    let answer = timing::timed(
                        clock.clone(),
                        authorize(front, identity, req, route.id, &clock),
                    )
                    .await;
                    let mut r = as_json(answer);
                    // Its own buffer, not a copy: ASCII digits, names and
                    // separators only, so always a valid value.
                    if let Ok(v) = HeaderValue::from_maybe_shared(Bytes::from(clock.header())) {
                        r.headers_mut().insert(SERVER_TIMING, v);
                    }
                    r
                }
                RouteId::Ping => as_json(ping(front, identity, &req).await),
                RouteId::OfflineBatch => as_json(offline_batch(front, identity, req).await),
                RouteId::DenylistSync => match denylist_sync(front, identity, &req).await {
                    Ok(r) => r,
                    Err(e) => error_response(&e),
                },
                _ => {
                    unreachable!("the route table gives the terminal listener only terminal routes")
                }
            };
            (route.path, r)
        }
        Match::WrongMethod { path, allowed } => (path, wrong_method(path, &allowed)),
        Match::NotFound => {
            let e = ApiError::new(
                ErrorCode::NotFound,
                "no such route on the terminal listener; see docs/openapi.json",
            );
            ("other", error_response(&e))
        }
    };
    front
        .counters
        .finish(&front.gw, label, response.status(), started.elapsed());
    response
}

/// Admits one request of `terminal`; a refusal is counted for the SRE's
/// page under its status (`429` for the terminal's rate, `503` for the
/// gateway's limits).
async fn admit(
    front: &Front,
    terminal: &str,
) -> Result<crate::http::admission::RequestPermit, ApiError> {
    front
        .admission
        .request(terminal, Instant::now())
        .await
        .inspect_err(|e| {
            let status = if e.code == ErrorCode::RateLimited {
                "429"
            } else {
                "503"
            };
            front.gw.stats.record(Kind::Refusal, status, Duration::ZERO);
        })
}

/// The terminal a request comes from: its certificate's, or on the
/// plaintext listener its `X-Terminal-Id` header.
fn terminal_of(identity: TerminalIdentity, req: &Req) -> Result<Arc<str>, ApiError> {
    match identity {
        TerminalIdentity::Certificate(id) => Ok(id),
        TerminalIdentity::Header => {
            let id = req
                .headers()
                .get("x-terminal-id")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            if !valid_terminal_id(id) {
                return Err(ApiError::new(
                    ErrorCode::Unauthenticated,
                    "the plaintext listener needs an X-Terminal-Id header of 1 to 64 characters of A-Za-z0-9._:-",
                ));
            }
            Ok(id.into())
        }
    }
}

/// `GET /v1/ping`: a terminal checks that the gateway knows it (its
/// certificate was accepted), reads the gateway's clock and the deny-list
/// version, and warms its connection, without deciding anything.
async fn ping(front: &Front, identity: TerminalIdentity, req: &Req) -> Result<Vec<u8>, ApiError> {
    let terminal = terminal_of(identity, req)?;
    let _permit = admit(front, &terminal).await?;
    let gw = &front.gw;
    let body = serde_json::json!({
        "terminal_id": &*terminal,
        "time_ms": gw.now_ms(),
        "denylist_version": gw.deny.version(),
    });
    Ok(serde_json::to_vec(&body).expect("a ping answer serializes"))
}

/// `GET /v1/denylist?since=V`: deny-list changes for an offline
/// validator, `304` when it is current. The ETag is the version.
async fn denylist_sync(
    front: &Front,
    identity: TerminalIdentity,
    req: &Req,
) -> Result<Response<Body>, ApiError> {
    let terminal = terminal_of(identity, req)?;
    let _permit = admit(front, &terminal).await?;
    let gw = &front.gw;
    let since = crate::service::offline::since_param(req.uri().query())?;
    let inm = req
        .headers()
        .get(http::header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok());
    let (version, mut r) = match gw.denylist_sync(since, inm).await? {
        crate::service::offline::Sync::NotModified(v) => {
            let mut r = Response::new(Full::new(Bytes::new()));
            *r.status_mut() = StatusCode::NOT_MODIFIED;
            (v, r)
        }
        crate::service::offline::Sync::Changes { version, body } => {
            let mut r = Response::new(Full::new(body));
            r.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            (version, r)
        }
    };
    if let Ok(v) = HeaderValue::from_str(&crate::service::offline::etag(version)) {
        r.headers_mut().insert(http::header::ETAG, v);
    }
    Ok(r)
}

/// `POST /v1/offline-batch`: taps a validator decided while offline.
async fn offline_batch(
    front: &Front,
    identity: TerminalIdentity,
    req: Req,
) -> Result<Vec<u8>, ApiError> {
    let terminal = terminal_of(identity, &req)?;
    let _permit = admit(front, &terminal).await?;
    let gw = &front.gw;
    let body = read_json_body(
        req,
        OFFLINE_BODY_BYTES_MAX,
        Duration::from_millis(gw.config.limits.header_read_timeout_ms),
    )
    .await?;
    let answer = gw.offline_batch(&terminal, &body, gw.now_ms()).await?;
    Ok(serde_json::to_vec(&answer).expect("an offline answer serializes"))
}

/// An offline upload's body at most: 10,000 events of about 300 bytes.
pub const OFFLINE_BODY_BYTES_MAX: usize = 4 * 1024 * 1024;

/// Reads a terminal's JSON request within the limits and authorizes or
/// reverses it, or holds, captures or voids a medical payment (the same
/// admission and body limits).
async fn authorize(
    front: &Front,
    identity: TerminalIdentity,
    req: Req,
    id: RouteId,
    clock: &PhaseClock,
) -> Result<Vec<u8>, ApiError> {
    let terminal = terminal_of(identity, &req)?;
    let gw = &front.gw;
    let limits = &gw.config.limits;
    let _permit = admit(front, &terminal).await?;
    let body = read_json_body(
        req,
        limits.body_bytes_max,
        Duration::from_millis(limits.header_read_timeout_ms),
    )
    .await?;
    let now_ms = gw.now_ms();
    // Decoded here, so a service takes a request that is already well
    // formed; what its rules refuse, it refuses itself.
    // A slow request logs one line, naming its card (masked) and scenario.
    let slow = || clock.total() >= Duration::from_millis(gw.config.log.slow_request_ms);
    let answer = match id {
        RouteId::Reverse => {
            let r = decoded(wire::parse_reverse(&body)?);
            let a = gw.reverse(&terminal, &r, now_ms).await;
            if slow() {
                log_slow(clock, id, &terminal, None, None, a.as_ref().ok());
            }
            a
        }
        RouteId::Hold => {
            let r = decoded(wire::parse_hold(&body)?);
            let a = gw.hold(&terminal, &r, now_ms).await;
            if slow() {
                let card = tapped(&r.auth.credential);
                log_slow(
                    clock,
                    id,
                    &terminal,
                    card,
                    Some(r.auth.scenario),
                    a.as_ref().ok(),
                );
            }
            a
        }
        RouteId::Capture | RouteId::Void => {
            let op = if id == RouteId::Capture {
                HoldOp::Capture
            } else {
                HoldOp::Void
            };
            let r = decoded(wire::parse_hold_step(op, &body)?);
            let a = gw.hold_step(&terminal, &r, now_ms).await;
            if slow() {
                log_slow(clock, id, &terminal, None, None, a.as_ref().ok());
            }
            a
        }
        _ => {
            let r = decoded(wire::parse_authorize(&body)?);
            let a = gw.authorize(&terminal, &r, now_ms).await;
            if slow() {
                let card = tapped(&r.credential);
                log_slow(
                    clock,
                    id,
                    &terminal,
                    card,
                    Some(r.scenario),
                    a.as_ref().ok(),
                );
            }
            a
        }
    };
    Ok(answer?)
}

/// A request decoded: the end of its decode phase.
fn decoded<T>(request: T) -> T {
    timing::mark(Phase::Decode);
    request
}

/// The W3C header with a request's phases (`http` has no constant for it).
const SERVER_TIMING: HeaderName = HeaderName::from_static("server-timing");

/// The card a tap names (a scan's card is known only after its code is
/// verified, and is not logged).
fn tapped(c: &wire::Credential) -> Option<&onecard_core::model::CardNo> {
    match c {
        wire::Credential::Tap(card) => Some(card),
        wire::Credential::Scan(_) => None,
    }
}

/// One line for a request slower than `log.slow_request_ms`: where its
/// time went, and whose it was (the card masked).
fn log_slow(
    clock: &PhaseClock,
    id: RouteId,
    terminal: &str,
    card: Option<&onecard_core::model::CardNo>,
    scenario: Option<onecard_core::model::Scenario>,
    answer: Option<&Vec<u8>>,
) {
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let [decode, idempotency, credential, decide, commit] = clock.spent();
    let auth_id = answer
        .and_then(|a| serde_json::from_slice::<serde_json::Value>(a).ok())
        .and_then(|v| v.get("auth_id").and_then(|x| x.as_str()).map(str::to_owned));
    let route = routes::ROUTES
        .iter()
        .find(|r| r.id == id)
        .map_or("?", |r| r.path);
    tracing::warn!(
        target: "onecard::slow",
        route,
        terminal,
        card = card.map(|c| c.masked()),
        scenario = scenario.map(|s| s.as_str()),
        auth_id,
        total_ms = ms(clock.total()),
        decode_ms = ms(decode),
        idempotency_ms = ms(idempotency),
        credential_ms = ms(credential),
        decide_ms = ms(decide),
        commit_ms = ms(commit),
        "slow request"
    );
}

/// Serves one plaintext connection (the loopback terminal listener, the
/// admin listener) within the configured header-read and idle timeouts,
/// then frees its slot.
pub async fn serve_plain<F, Fut>(
    stream: TcpStream,
    handler: F,
    limits: &crate::config::LimitsConfig,
    stop: watch::Receiver<bool>,
    permit: crate::http::admission::ConnectionPermit,
) where
    F: Fn(Req) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    serve_connection(
        stream,
        handler,
        Duration::from_millis(limits.header_read_timeout_ms),
        Duration::from_millis(limits.idle_timeout_ms),
        true,
        stop,
    )
    .await;
    drop(permit);
}

/// `ConnActivity::head_started_ms` when no request is being received.
const NO_HEAD: u64 = u64::MAX;

/// Activity of one connection, for the idle and header-read timeouts.
pub struct ConnActivity {
    started: Instant,
    in_flight: AtomicUsize,
    last_ms: AtomicU64,
    /// When bytes of a request arrived while no request was being served:
    /// its head has started and must be complete within the header-read
    /// timeout. [`NO_HEAD`] otherwise.
    head_started_ms: AtomicU64,
    /// Whether a request has ever started on this connection.
    any_request: AtomicBool,
}

impl ConnActivity {
    pub fn new() -> Arc<ConnActivity> {
        Arc::new(ConnActivity {
            started: Instant::now(),
            in_flight: AtomicUsize::new(0),
            last_ms: AtomicU64::new(0),
            head_started_ms: AtomicU64::new(NO_HEAD),
            any_request: AtomicBool::new(false),
        })
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Bytes arrived: if no request is being served, a request head has
    /// begun (the first such read starts its clock).
    fn bytes_read(&self) {
        if self.in_flight.load(Ordering::Acquire) == 0 {
            let _ = self.head_started_ms.compare_exchange(
                NO_HEAD,
                self.now_ms(),
                Ordering::AcqRel,
                Ordering::Acquire,
            );
        }
    }

    /// How long a request head has been arriving without completing.
    fn head_pending_for(&self) -> Option<Duration> {
        let t = self.head_started_ms.load(Ordering::Acquire);
        (t != NO_HEAD).then(|| Duration::from_millis(self.now_ms().saturating_sub(t)))
    }

    fn touch(&self) {
        self.last_ms
            .store(self.started.elapsed().as_millis() as u64, Ordering::Release);
    }

    /// Wraps a request future so the connection counts as busy while it runs.
    pub async fn track<F: Future>(self: &Arc<Self>, f: F) -> F::Output {
        let _busy = self.clone().busy();
        f.await
    }

    /// Counts the connection busy until the guard is dropped; it ends the
    /// count even when hyper drops the request's future (an HTTP/2 stream
    /// reset), so the idle timeout keeps working.
    fn busy(self: Arc<Self>) -> Busy {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.head_started_ms.store(NO_HEAD, Ordering::Release);
        self.any_request.store(true, Ordering::Release);
        self.touch();
        Busy(self)
    }

    /// How long until the header-read timeout closes the connection
    /// (zero: now), if a request head is due. Over HTTP/1.1 a head is due
    /// from its first byte; over HTTP/2, whose frames hyper reads itself,
    /// the first request is due from the connection's start (a client that
    /// only sends the preface and settings is cut off like a slow head).
    fn head_left(&self, timeout: Duration, http1: bool) -> Option<Duration> {
        if http1 {
            self.head_pending_for().map(|d| timeout.saturating_sub(d))
        } else if !self.any_request.load(Ordering::Acquire) {
            Some(timeout.saturating_sub(self.started.elapsed()))
        } else {
            None
        }
    }

    fn idle_for(&self) -> Option<Duration> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let last = Duration::from_millis(self.last_ms.load(Ordering::Acquire));
        Some(self.started.elapsed().saturating_sub(last))
    }
}

/// A request (or a drain) in flight on a connection.
struct Busy(Arc<ConnActivity>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The connection's bytes, with each read noted in its [`ConnActivity`].
struct Watched<I> {
    io: I,
    activity: Arc<ConnActivity>,
}

impl<I: AsyncRead + Unpin> AsyncRead for Watched<I> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.bytes_read();
        }
        r
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Watched<I> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// Serves HTTP/1.1 or HTTP/2 on `io` until the peer closes, the connection
/// has been idle for `idle_timeout`, a request head has taken longer than
/// `header_read_timeout` to arrive (HTTP/1.1: a slow-loris), or `stop` fires
/// (then it finishes the requests in flight and closes).
///
/// The header-read timeout is kept here, not in hyper: hyper's starts when
/// it begins waiting for the next request, so it closed every keep-alive
/// connection idle for longer than it (5 s), whatever the idle timeout said,
/// and a gate tapping once a minute paid a TLS handshake every time (found
/// by the 10,000-terminal run). `slow_head_check` is off for HTTP/2, whose
/// idle connections carry PINGs and settings that are no request.
pub async fn serve_connection<I, F, Fut>(
    io: I,
    handler: F,
    header_read_timeout: Duration,
    idle_timeout: Duration,
    slow_head_check: bool,
    stop: watch::Receiver<bool>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: Fn(Req) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    serve_connection_until(
        io,
        handler,
        header_read_timeout,
        idle_timeout,
        slow_head_check,
        stop,
        std::future::pending(),
    )
    .await
}

/// How long a connection told to close (its terminal blocked) may take to
/// finish the request it is answering before it is dropped.
pub const CLOSE_GRACE: Duration = Duration::from_millis(250);

/// [`serve_connection`] that also closes when `close` completes: the
/// request being answered may finish (within [`CLOSE_GRACE`]), no other
/// is read.
pub async fn serve_connection_until<I, F, Fut>(
    io: I,
    handler: F,
    header_read_timeout: Duration,
    idle_timeout: Duration,
    slow_head_check: bool,
    mut stop: watch::Receiver<bool>,
    close: impl Future<Output = ()>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: Fn(Req) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    let activity = ConnActivity::new();
    let handler = Arc::new(handler);
    let a = activity.clone();
    let svc = service_fn(move |req: Request<Incoming>| {
        let handler = handler.clone();
        let a = a.clone();
        let expect_continue = req
            .headers()
            .get(http::header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
        let req = req.map(|b| RequestBody::new(b, expect_continue, a.clone()));
        // The route's future (the whole pipeline, inlined) is large; hyper
        // moves the service's future into its dispatcher, and each move
        // copies it whole (memcpy was 1.2 % of the gateway's CPU there,
        // docs/performance.md). Boxed, a move is a pointer.
        let route = Box::pin(handler(req));
        async move { Ok::<_, Infallible>(a.track(route).await) }
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(None)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(H2_STREAMS_MAX)
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(10));
    let io = Watched {
        io,
        activity: activity.clone(),
    };
    let conn = builder.serve_connection(TokioIo::new(io), svc);
    tokio::pin!(conn);
    // One timer for both checks, reset when it fires: creating a new one
    // on every wake of the connection would cost a timer-wheel insert and
    // removal per request. It looks at least every quarter of the shorter
    // timeout (to notice a head that started since), and is set to the
    // nearest deadline itself, so a connection is closed at its timeout,
    // not up to a quarter later.
    let check = (idle_timeout.min(header_read_timeout) / 4).max(Duration::from_millis(50));
    let tick = tokio::time::sleep(check);
    tokio::pin!(tick);
    tokio::pin!(close);
    let mut closing = false;
    let mut closed = false;
    loop {
        tokio::select! {
            _ = conn.as_mut() => break,
            _ = close.as_mut(), if !closed => {
                closed = true;
                conn.as_mut().graceful_shutdown();
                closing = true;
                tick.as_mut().reset(tokio::time::Instant::now() + CLOSE_GRACE);
            }
            _ = &mut tick => {
                if closing {
                    // The peer did not let the connection finish (it stopped
                    // reading, or holds a stream open): drop it.
                    break;
                }
                let head_left = activity.head_left(header_read_timeout, slow_head_check);
                if head_left == Some(Duration::ZERO) {
                    // A request head trickling in (or an HTTP/2 connection
                    // that never sends a request): nothing to finish.
                    break;
                }
                let idle_left = activity.idle_for().map(|d| idle_timeout.saturating_sub(d));
                if idle_left == Some(Duration::ZERO) {
                    conn.as_mut().graceful_shutdown();
                    closing = true;
                    tick.as_mut().reset(tokio::time::Instant::now() + header_read_timeout);
                } else {
                    let next = [Some(check), head_left, idle_left].into_iter().flatten().min();
                    tick.as_mut().reset(tokio::time::Instant::now() + next.unwrap_or(check));
                }
            }
            _ = stop.changed(), if !closing => {
                conn.as_mut().graceful_shutdown();
                closing = true;
                tick.as_mut().reset(tokio::time::Instant::now() + header_read_timeout);
            }
        }
    }
}

/// Accepts TLS terminal connections until `stop` fires. Each handshake
/// uses the trust loaded at that moment (`tls` reloads without a restart);
/// a connection whose certificate the block list comes to name closes
/// itself.
pub async fn run_tls_listener(
    front: Arc<Front>,
    listener: TcpListener,
    tls: Arc<TerminalTls>,
    stop: watch::Receiver<bool>,
) {
    accept_loop(
        listener,
        stop.clone(),
        TLS_LISTENER,
        front.clone(),
        front.admission.clone(),
        move |stream, front: Arc<Front>, permit| {
            let acceptor = TlsAcceptor::from(tls.config());
            let stop = stop.clone();
            async move {
                let limits = front.gw.config.limits.clone();
                let handshake_timeout = Duration::from_millis(limits.header_read_timeout_ms);
                let tls =
                    match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => tls,
                        Ok(Err(e)) => {
                            metrics::counter!("onecard_tls_handshake_failures_total").increment(1);
                            tracing::debug!(error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            metrics::counter!("onecard_tls_handshake_failures_total").increment(1);
                            return;
                        }
                    };
                let Some(cert) = tls.get_ref().1.peer_certificates().and_then(|c| c.first()) else {
                    return;
                };
                let Some((id, not_after)) = terminal_id_from_cert(cert) else {
                    metrics::counter!("onecard_tls_handshake_failures_total").increment(1);
                    tracing::warn!(
                        "client certificate has no usable terminal id (subject CN); closing"
                    );
                    return;
                };
                let keys = Arc::new(CertKeys::of(cert));
                let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
                let id: Arc<str> = id.into();
                let _connected = front.gw.terminals.connected(
                    id.clone(),
                    not_after,
                    Some(keys.clone()),
                    front.gw.now_ms(),
                );
                let blocked = blocked(front.gw.terminal_blocks.clone(), keys, id.clone());
                let identity = TerminalIdentity::Certificate(id);
                let handler = move |req| terminal_request(front.clone(), identity.clone(), req);
                serve_connection_until(
                    tls,
                    handler,
                    handshake_timeout,
                    Duration::from_millis(limits.idle_timeout_ms),
                    !h2,
                    stop,
                    blocked,
                )
                .await;
                drop(permit);
            }
        },
    )
    .await;
}

/// Completes when the block list names this connection's certificate:
/// at once if it did between the handshake and now, else when a change
/// (here or, in a cluster, at another node) comes to.
async fn blocked(blocks: Arc<TerminalBlocks>, cert: Arc<CertKeys>, id: Arc<str>) {
    let mut changes = blocks.subscribe();
    loop {
        if blocks.refuses(&cert) {
            metrics::counter!("onecard_tls_terminal_connections_closed_total").increment(1);
            tracing::warn!(terminal = %id, serial = %cert.serial, "terminal certificate blocked: closing its connection");
            return;
        }
        if changes.changed().await.is_err() {
            // The list is gone (shutting down): never close for it.
            std::future::pending::<()>().await;
        }
    }
}

/// Accepts plaintext terminal connections (loopback only) until `stop` fires.
pub async fn run_plain_listener(
    front: Arc<Front>,
    listener: TcpListener,
    stop: watch::Receiver<bool>,
) {
    accept_loop(
        listener,
        stop.clone(),
        "plaintext",
        front.clone(),
        front.admission.clone(),
        move |stream, front: Arc<Front>, permit| {
            let stop = stop.clone();
            async move {
                let limits = front.gw.config.limits.clone();
                let handler =
                    move |req| terminal_request(front.clone(), TerminalIdentity::Header, req);
                serve_plain(stream, handler, &limits, stop, permit).await;
            }
        },
    )
    .await;
}

const TLS_LISTENER: &str = "terminal";
const OVER_CAPACITY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Type: application/json\r\nContent-Length: 98\r\nConnection: close\r\n\r\n{\"error\":{\"code\":\"UNAVAILABLE\",\"message\":\"the gateway is at its connection limit; retry shortly\"}}";

/// The accept loop shared by every listener: connection cap, `TCP_NODELAY`,
/// one task per connection.
pub async fn accept_loop<C, F, Fut>(
    listener: TcpListener,
    mut stop: watch::Receiver<bool>,
    name: &'static str,
    ctx: C,
    admission: Arc<Admission>,
    on_conn: F,
) where
    C: Clone,
    F: Fn(TcpStream, C, crate::http::admission::ConnectionPermit) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.changed() => return,
        };
        let (stream, _peer): (TcpStream, SocketAddr) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: back off briefly
                // rather than spin.
                tracing::warn!(error = %e, listener = name, "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let Some(permit) = admission.connection(name) else {
            // On a plaintext listener the refusal can be said in HTTP; on
            // the TLS listener nothing can be said before a handshake, which
            // is exactly the work being refused.
            if name != TLS_LISTENER {
                let _ = stream.try_write(OVER_CAPACITY);
            }
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(on_conn(stream, ctx.clone(), permit));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_ids() {
        assert!(valid_terminal_id("term-00001"));
        assert!(valid_terminal_id("bus.0042:a_b"));
        assert!(!valid_terminal_id(""));
        assert!(!valid_terminal_id("a b"));
        assert!(!valid_terminal_id("a\0b"));
        assert!(!valid_terminal_id(&"x".repeat(65)));
    }
}
