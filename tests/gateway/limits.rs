//! Limits a client runs into: idempotency retention and clean-up, the
//! header-read and idle timeouts, the connection cap, and bodies over the
//! limit (answered `413` over both protocols, to clients that write first).

use std::time::Duration;

use http::Method;
use onecard::net::certs::terminal_id;
use onecard::net::client::Protocol;
use onecard::service::idempotency;
use onecard::store::Cf;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::{decision, tap, TestGateway};

const CARD: &str = "500118L00000001";

/// Terminal 1's client TLS config (its certificate, the gateway's CA),
/// for tests that write raw bytes over mTLS.
fn terminal_tls(
    gw: &TestGateway,
    protocol: Protocol,
) -> std::sync::Arc<tokio_rustls::rustls::ClientConfig> {
    let certs = gw.certs_dir();
    let id = terminal_id(1);
    onecard::net::client::tls_config(
        &certs.join(onecard::net::certs::CA_CERT),
        Some((
            &onecard::net::certs::terminal_cert_path(&certs, &id),
            &onecard::net::certs::terminal_key_path(&certs, &id),
        )),
        protocol,
    )
    .unwrap()
}

/// Reads until the server closes the connection; fails if it has not within
/// 30 s (far above the configured timeouts, so a loaded machine is fine).
async fn closed_by_server(mut s: TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let read = async {
        let mut buf = [0u8; 1024];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), read)
        .await
        .expect("the server closes the connection");
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_idempotency_records_are_cleaned_up_and_the_key_can_be_reused() {
    let gw = TestGateway::start(|c| c.idempotency.retention_s = 60).await;
    gw.put_card(CARD, json!({"status": "active", "functions": ["transit"]}))
        .await;
    let mut t = gw.terminal(1, Protocol::Http1).await;
    let first = t
        .authorize(&tap("old-1", CARD, "transit", 100))
        .await
        .unwrap();
    assert_eq!(decision(&first).0, "approve");
    let g = gw.running().gateway().clone();

    // Within the retention nothing is removed.
    let now = g.now_ms();
    assert_eq!(
        idempotency::cleanup_step(&g.store, &*g.journal, 60, now)
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        t.authorize(&tap("old-1", CARD, "transit", 100))
            .await
            .unwrap()
            .body,
        first.body
    );

    // Past it, the record goes, and the key is decided anew.
    let later = now + 61_000;
    assert_eq!(
        idempotency::cleanup_step(&g.store, &*g.journal, 60, later)
            .await
            .unwrap(),
        1
    );
    let again = t
        .authorize(&tap("old-1", CARD, "transit", 100))
        .await
        .unwrap();
    assert_eq!(decision(&again).0, "approve");
    assert_ne!(again.json()["auth_id"], first.json()["auth_id"]);
    // The cursor moved past the old record, and the new answer is kept.
    let now = g.now_ms();
    assert_eq!(
        idempotency::cleanup_step(&g.store, &*g.journal, 60, now)
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        t.authorize(&tap("old-1", CARD, "transit", 100))
            .await
            .unwrap()
            .body,
        again.body
    );
    drop(t);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_clean_up_does_not_remove_the_answer_of_a_reused_key() {
    let gw = TestGateway::start(|c| c.idempotency.retention_s = 1).await;
    gw.put_card(CARD, json!({"status": "active", "functions": ["transit"]}))
        .await;
    let mut t = gw.terminal(1, Protocol::Http1).await;
    let first = t
        .authorize(&tap("reuse-1", CARD, "transit", 100))
        .await
        .unwrap();
    // Let the first answer's retention pass on the gateway's clock.
    gw.advance_ms(1_100);
    let reused_at = gw.running().gateway().now_ms();
    let again = t
        .authorize(&tap("reuse-1", CARD, "transit", 100))
        .await
        .unwrap();
    assert_ne!(
        again.json()["auth_id"],
        first.json()["auth_id"],
        "an expired key is decided anew"
    );
    // The clean-up now reaches the first record, whose key holds the new answer.
    let g = gw.running().gateway().clone();
    assert_eq!(
        idempotency::cleanup_step(&g.store, &*g.journal, 1, reused_at)
            .await
            .unwrap(),
        1
    );
    // Read the record itself: a replay over HTTP would race the (1 s)
    // retention of the new answer on a slow machine.
    let key = onecard::store::idem::key(&terminal_id(1), "reuse-1");
    let stored = g
        .store
        .get(Cf::Idem, &key)
        .unwrap()
        .expect("the new answer is kept");
    assert_eq!(
        onecard::store::idem::stored_auth_id(&stored),
        again.json()["auth_id"].as_str()
    );
    drop(t);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_headers_and_handshakes_are_cut_off_by_the_header_read_timeout() {
    // The idle timeout is far above the 30 s the test waits, so only the
    // header-read (and handshake) timeout can close these.
    let gw = TestGateway::start(|c| {
        c.terminal.plaintext_addr = Some("127.0.0.1:0".parse().unwrap());
        c.limits.header_read_timeout_ms = 300;
        c.limits.idle_timeout_ms = 600_000;
    })
    .await;
    let addr = gw.running().addrs.plaintext.unwrap();

    // Headers that never finish.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"POST /v1/authorize HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    closed_by_server(s).await;

    // A TLS connection that never shakes hands.
    let s = TcpStream::connect(gw.terminal_addr()).await.unwrap();
    closed_by_server(s).await;
    gw.shutdown().await;
}

/// Issue 19: the header-read timeout closes within 10 % of its value, over
/// HTTP/1.1 (a head that never finishes) and HTTP/2 (a connection that
/// sends its preface and settings and never a request) alike. The bound
/// allows 10 % and 250 ms of scheduling on a loaded machine; before, the
/// close came up to 25 % late, and an HTTP/2 connection lived until the
/// idle timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_header_read_timeout_closes_on_time_over_both_protocols() {
    const TIMEOUT: Duration = Duration::from_millis(2_000);
    let gw = TestGateway::start(|c| {
        c.terminal.plaintext_addr = Some("127.0.0.1:0".parse().unwrap());
        c.limits.header_read_timeout_ms = TIMEOUT.as_millis() as u64;
        c.limits.idle_timeout_ms = 600_000;
    })
    .await;
    let on_time = |took: Duration, what: &str| {
        assert!(
            took >= TIMEOUT.mul_f64(0.95)
                && took <= TIMEOUT.mul_f64(1.1) + Duration::from_millis(250),
            "{what}: closed after {took:?}, the timeout is {TIMEOUT:?}"
        );
    };

    // HTTP/1.1: a head that never finishes.
    let mut s = TcpStream::connect(gw.running().addrs.plaintext.unwrap())
        .await
        .unwrap();
    let started = std::time::Instant::now();
    s.write_all(b"POST /v1/authorize HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    closed_by_server(s).await;
    on_time(started.elapsed(), "HTTP/1.1 head");

    // HTTP/2 over mTLS: the preface and an empty SETTINGS frame, then
    // nothing.
    let tls = terminal_tls(&gw, Protocol::Http2);
    let tcp = TcpStream::connect(gw.terminal_addr()).await.unwrap();
    let mut s = tokio_rustls::TlsConnector::from(tls)
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap();
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let started = std::time::Instant::now();
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    let read = async {
        let mut buf = [0u8; 1024];
        while let Ok(n) = s.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), read)
        .await
        .expect("the server closes the HTTP/2 connection");
    on_time(started.elapsed(), "HTTP/2 without a request");
    gw.shutdown().await;
}

/// Issue 19: requests too malformed for HTTP/1.1 to parse never reach the
/// gateway: hyper answers them itself, with a status and no body, and
/// closes. Exactly these, as README ("Refusals without a body") and
/// openapi.json (`x-transport-refusals`) list them; a change in hyper
/// shows here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_http_cannot_parse_get_the_documented_bodiless_refusals() {
    let gw = TestGateway::start(|c| {
        c.terminal.plaintext_addr = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    let addr = gw.running().addrs.plaintext.unwrap();
    let many: String = (0..101).map(|i| format!("X-H{i}: v\r\n")).collect();
    let head =
        |extra: &str| format!("GET /v1/ping HTTP/1.1\r\nHost: x\r\n{extra}\r\n").into_bytes();
    let post = |lengths: &str| {
        format!("POST /v1/authorize HTTP/1.1\r\nHost: x\r\nX-Terminal-Id: t1\r\n{lengths}\r\n{{}}")
            .into_bytes()
    };
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "bytes that are not HTTP",
            b"\x16\x03\x01 not http\r\n\r\n".to_vec(),
            "400 Bad Request",
        ),
        (
            "an HTTP/0.9 request line",
            b"GET /v1/ping\r\n\r\n".to_vec(),
            "400 Bad Request",
        ),
        (
            "an unknown HTTP version",
            b"GET /v1/ping HTTP/9.9\r\nHost: x\r\n\r\n".to_vec(),
            "400 Bad Request",
        ),
        (
            "two Content-Length values",
            post("Content-Length: 2\r\nContent-Length: 3\r\n"),
            "400 Bad Request",
        ),
        (
            "a negative Content-Length",
            post("Content-Length: -1\r\n"),
            "400 Bad Request",
        ),
        (
            "more than 100 headers",
            head(&many),
            "431 Request Header Fields Too Large",
        ),
    ];
    // (A head over ~400 KiB is refused with 431 too, but a client still
    // writing it may see the connection reset before it reads the answer:
    // not something to assert.)
    for (what, bytes, status) in cases {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(&bytes).await.unwrap();
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut got))
            .await
            .unwrap_or_else(|_| panic!("{what}: the server closes the connection"))
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        let got = String::from_utf8_lossy(&got).to_lowercase();
        assert!(
            got.starts_with(&format!("http/1.1 {}\r\n", status.to_lowercase())),
            "{what}: {got}"
        );
        assert!(got.contains("content-length: 0\r\n"), "{what}: {got}");
        assert!(got.contains("connection: close\r\n"), "{what}: {got}");
    }
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keep_alive_connection_outlives_the_header_read_timeout() {
    // A gate that taps less often than the header-read timeout keeps its
    // connection (and its TLS session) until the idle timeout.
    let gw = TestGateway::start(|c| {
        c.limits.header_read_timeout_ms = 200;
        c.limits.idle_timeout_ms = 600_000;
    })
    .await;
    for protocol in [Protocol::Http1, Protocol::Http2] {
        let mut t = gw.terminal(1, protocol).await;
        for i in 0..2 {
            let a = t.send(Method::GET, "/v1/ping", &[], Vec::new()).await;
            assert!(
                a.is_ok_and(|a| a.status == http::StatusCode::OK),
                "{protocol:?}: request {i} on the same connection"
            );
            // Idle for longer than the header-read timeout (a transport
            // timer, which runs in real time).
            tokio::time::sleep(Duration::from_millis(500)).await;
            assert!(!t.is_closed(), "{protocol:?}: closed after request {i}");
        }
    }
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed() {
    let gw = TestGateway::start(|c| {
        c.terminal.plaintext_addr = Some("127.0.0.1:0".parse().unwrap());
        c.limits.header_read_timeout_ms = 600_000;
        c.limits.idle_timeout_ms = 300;
    })
    .await;
    let addr = gw.running().addrs.plaintext.unwrap();

    // A connection that never sends anything.
    let s = TcpStream::connect(addr).await.unwrap();
    closed_by_server(s).await;

    // A keep-alive connection that goes quiet after a request.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /nothing HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let got = closed_by_server(s).await;
    assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 404"));
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_cap_are_refused_and_the_slot_comes_back() {
    let gw = TestGateway::start(|c| {
        c.terminal.plaintext_addr = Some("127.0.0.1:0".parse().unwrap());
        c.limits.connections_max = 1;
    })
    .await;
    let addr = gw.running().addrs.plaintext.unwrap();
    let mut first = onecard::net::client::Connection::plain(addr, Protocol::Http1)
        .await
        .unwrap();
    let a = first
        .send(Method::GET, "/healthz", &[], Vec::new())
        .await
        .unwrap();
    assert_eq!(
        a.status,
        http::StatusCode::NOT_FOUND,
        "the first connection is served"
    );
    // The second is told so at once, and closed.
    let second = TcpStream::connect(addr).await.unwrap();
    let refused = String::from_utf8(closed_by_server(second).await).unwrap();
    assert!(refused.starts_with("HTTP/1.1 503 "), "{refused}");
    assert!(
        refused.contains("Retry-After: 1") && refused.contains("\"UNAVAILABLE\""),
        "{refused}"
    );
    let body = &refused[refused.find("\r\n\r\n").unwrap() + 4..];
    assert!(
        refused.contains(&format!("Content-Length: {}", body.len())),
        "{refused}"
    );
    drop(first);
    // Once the first is gone its slot is free again (the server notices the
    // close asynchronously, so try a few times).
    let mut served = false;
    for _ in 0..100 {
        if let Ok(mut c) = onecard::net::client::Connection::plain(addr, Protocol::Http1).await {
            if c.send(Method::GET, "/healthz", &[], Vec::new())
                .await
                .is_ok()
            {
                served = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(served, "the connection slot was not released");
    gw.shutdown().await;
}

/// A body this many times the terminal limit (16 KiB): more than the
/// socket buffers hold, so a client that writes it all before reading
/// is still sending when the server answers.
const TOO_LARGE: usize = 1024 * 1024;

/// The status and the error code of a raw HTTP/1.1 answer.
fn status_and_code(raw: &[u8]) -> (u16, String) {
    let text = String::from_utf8_lossy(raw);
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
    let v: serde_json::Value = serde_json::from_str(body.trim()).unwrap_or_default();
    (status, v["error"]["code"].as_str().unwrap_or("").to_owned())
}

/// Writes a whole request (head and body) before reading anything, as
/// Python's `http.client` does, then reads the answer to its end.
async fn write_all_then_read<S>(mut s: S, head: &str, body: &[u8]) -> std::io::Result<Vec<u8>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    s.write_all(head.as_bytes()).await?;
    s.write_all(body).await?;
    s.flush().await?;
    let mut got = Vec::new();
    let read = async {
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf).await {
                Ok(0) => return Ok(()),
                Ok(n) => {
                    got.extend_from_slice(&buf[..n]);
                    // One answer is all this waits for.
                    if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
                        let len: usize = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse().ok())
                            .unwrap_or(0);
                        if got.len() >= end + 4 + len {
                            return Ok(());
                        }
                    }
                }
                // A reset after the whole answer arrived loses nothing.
                Err(e) => return if got.is_empty() { Err(e) } else { Ok(()) },
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), read)
        .await
        .expect("an answer within 30 s")?;
    Ok(got)
}

/// Issue 15: a client that sends too much is told so. Over HTTP/1.1 a
/// client that writes its whole body before it reads (declared by
/// `Content-Length`, or chunked with no length at all), over mTLS and on
/// the admin listener, gets `413 PAYLOAD_TOO_LARGE` with the JSON body,
/// not a reset while it is still sending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_writes_its_whole_body_first_reads_its_413() {
    let gw = TestGateway::start(|_| {}).await;
    let tls = terminal_tls(&gw, Protocol::Http1);
    let body = vec![b' '; TOO_LARGE];
    let mut chunked = format!("{:x}\r\n", body.len()).into_bytes();
    chunked.extend_from_slice(&body);
    chunked.extend_from_slice(b"\r\n0\r\n\r\n");
    let declared = format!(
        "POST /v1/authorize HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let streamed = "POST /v1/authorize HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n";
    for (head, bytes) in [(declared.as_str(), &body), (streamed, &chunked)] {
        let tcp = TcpStream::connect(gw.terminal_addr()).await.unwrap();
        let name =
            tokio_rustls::rustls::pki_types::ServerName::IpAddress(gw.terminal_addr().ip().into());
        let s = tokio_rustls::TlsConnector::from(tls.clone())
            .connect(name, tcp)
            .await
            .unwrap();
        let got = write_all_then_read(s, head, bytes)
            .await
            .unwrap_or_else(|e| panic!("{head:?}: no answer, {e}"));
        assert_eq!(
            status_and_code(&got),
            (413, "PAYLOAD_TOO_LARGE".to_owned()),
            "{head:?}"
        );
    }
    // The admin listener (plaintext) refuses an oversized card the same way.
    let s = TcpStream::connect(gw.admin_addr()).await.unwrap();
    let head = format!(
        "PUT /admin/v1/cards/{CARD} HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        crate::common::TOKEN,
        body.len()
    );
    let got = write_all_then_read(s, &head, &body).await.unwrap();
    assert_eq!(status_and_code(&got), (413, "PAYLOAD_TOO_LARGE".to_owned()));
    gw.shutdown().await;
}

/// Issue 15: over HTTP/2 the `413` arrives before the stream ends (it was
/// reset before the answer went out: curl said "Stream error in the HTTP/2
/// framing layer"), and the connection goes on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_over_the_limit_gets_its_413_over_http2_and_the_connection_lives_on() {
    let gw = TestGateway::start(|_| {}).await;
    gw.put_card(CARD, json!({"status": "active", "functions": ["transit"]}))
        .await;
    let mut t = gw.terminal(1, Protocol::Http2).await;
    for size in [20 * 1024, 200 * 1024, TOO_LARGE] {
        let a = t
            .send(
                Method::POST,
                "/v1/authorize",
                &[("content-type", "application/json")],
                vec![b' '; size],
            )
            .await
            .unwrap_or_else(|e| panic!("{size} bytes: no answer: {e}"));
        assert_eq!(
            (a.status, crate::common::error_code(&a).as_str()),
            (http::StatusCode::PAYLOAD_TOO_LARGE, "PAYLOAD_TOO_LARGE"),
            "{size} bytes"
        );
    }
    let a = t
        .authorize(&tap("after-413", CARD, "transit", 200))
        .await
        .unwrap();
    assert_eq!(decision(&a), ("approve".into(), "OK".into()));
    gw.shutdown().await;
}

/// Issue 15, with the client that found it: curl over HTTP/2 with a 200 KB
/// body reads the `413` and its JSON body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_over_http2_reads_the_413_of_a_200_kb_body() {
    let gw = TestGateway::start(|_| {}).await;
    let certs = gw.certs_dir();
    let id = terminal_id(1);
    let body = gw.dir.path().join("big.json");
    std::fs::write(&body, vec![b' '; 200 * 1024]).unwrap();
    let out = std::process::Command::new("curl")
        .args([
            "-sS",
            "--http2",
            "--max-time",
            "30",
            "-w",
            "\n%{http_code} %{http_version}",
        ])
        .arg("--cacert")
        .arg(certs.join(onecard::net::certs::CA_CERT))
        .arg("--cert")
        .arg(onecard::net::certs::terminal_cert_path(&certs, &id))
        .arg("--key")
        .arg(onecard::net::certs::terminal_key_path(&certs, &id))
        .args(["-H", "content-type: application/json", "--data-binary"])
        .arg(format!("@{}", body.display()))
        .arg(format!("https://{}/v1/authorize", gw.terminal_addr()))
        .output()
        .expect("curl runs (scripts/setup-system installs it)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "curl failed: {}{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (answer, last) = stdout.rsplit_once('\n').unwrap();
    assert_eq!(last, "413 2", "{stdout}");
    let v: serde_json::Value = serde_json::from_str(answer).unwrap();
    assert_eq!(v["error"]["code"], "PAYLOAD_TOO_LARGE");
    gw.shutdown().await;
}

/// Overload: the gateway's CPUs are busier than it can serve (here its two
/// workers are each blocked 250 ms at a time, as by more requests than
/// they can take), so its runtime lags; past `limits.overload_lag_ms` a
/// terminal's request is refused at once with `503 UNAVAILABLE` and
/// `Retry-After` (it works offline meanwhile), and is served again within
/// seconds of the lag ending. A tap refused was not decided: its retry is
/// decided once and then replayed, and what was approved before stands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_gateway_sheds_taps_with_503_and_decides_them_after() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    let gw = TestGateway::start(|c| c.limits.overload_lag_ms = 40).await;
    gw.put_card(CARD, json!({"status": "active", "functions": ["transit"]}))
        .await;
    let mut t = gw.terminal(1, Protocol::Http1).await;
    let before = t
        .authorize(&tap("ov-0", CARD, "transit", 100))
        .await
        .unwrap();
    assert_eq!(decision(&before).0, "approve");

    let busy = Arc::new(AtomicBool::new(true));
    let hogs: Vec<_> = (0..2)
        .map(|_| {
            let busy = busy.clone();
            tokio::spawn(async move {
                let t0 = std::time::Instant::now();
                while busy.load(Ordering::Relaxed) && t0.elapsed() < Duration::from_secs(60) {
                    std::thread::sleep(Duration::from_millis(250));
                    tokio::task::yield_now().await;
                }
            })
        })
        .collect();
    // The terminal runs on its own thread and runtime: the gateway's are
    // the ones kept busy.
    let (certs, addr) = (gw.certs_dir(), gw.terminal_addr());
    let refused = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let mut t = crate::common::connect_terminal(&certs, addr, 1, Protocol::Http1).await;
            for i in 0..100 {
                let id = format!("ov-{}", i + 1);
                let a = t.authorize(&tap(&id, CARD, "transit", 100)).await.unwrap();
                if a.status == http::StatusCode::SERVICE_UNAVAILABLE {
                    return Some((id, a));
                }
            }
            None
        })
    })
    .join()
    .unwrap();
    busy.store(false, Ordering::Relaxed);
    for h in hogs {
        h.await.unwrap();
    }
    let (id, a) = refused.expect("a tap is shed while the gateway lags");
    assert_eq!(crate::common::error_code(&a), "UNAVAILABLE");
    // `limits.overload_retry_after_s`: a shed terminal stays away 2 s on
    // average, each refusal's spread from 1 to 3 s.
    let after: u32 = a.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=3).contains(&after), "Retry-After {after}");
    assert!(
        a.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("overloaded"),
        "{}",
        String::from_utf8_lossy(&a.body)
    );

    // The lag gone, the refused tap is decided within seconds, once.
    let mut t = gw.terminal(1, Protocol::Http1).await;
    let t0 = std::time::Instant::now();
    let decided = loop {
        let a = t.authorize(&tap(&id, CARD, "transit", 100)).await.unwrap();
        if a.status == http::StatusCode::OK {
            break a;
        }
        assert_eq!(crate::common::error_code(&a), "UNAVAILABLE");
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "still shed 10 s after the lag ended"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(decision(&decided).0, "approve");
    let again = t.authorize(&tap(&id, CARD, "transit", 100)).await.unwrap();
    assert_eq!(again.body, decided.body, "a retry is the same decision");
    let replay = t
        .authorize(&tap("ov-0", CARD, "transit", 100))
        .await
        .unwrap();
    assert_eq!(replay.body, before.body);

    let m = gw.admin(Method::GET, "/metrics", None).await;
    let text = String::from_utf8_lossy(&m.body);
    assert!(
        text.lines()
            .any(|l| l.starts_with("onecard_admission_rejected_total{limit=\"overload\"}")),
        "{text}"
    );
    assert!(text.contains("onecard_runtime_lag_seconds "), "{text}");
    drop(t);
    gw.shutdown().await;
}
