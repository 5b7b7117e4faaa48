//! Limits a client runs into: idempotency retention and clean-up, the
//! header-read and idle timeouts, and the connection cap.

mod common;

use std::time::Duration;

use common::{decision, tap, TestGateway};
use http::Method;
use onecard::certs::terminal_id;
use onecard::client::Protocol;
use onecard::idempotency;
use onecard::state::Cf;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const CARD: &str = "500118L00000001";

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
    let now = onecard::clock::now_ms();
    assert_eq!(
        idempotency::cleanup_step(&g.store, &g.journal, 60, now)
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
        idempotency::cleanup_step(&g.store, &g.journal, 60, later)
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
    let now = onecard::clock::now_ms();
    assert_eq!(
        idempotency::cleanup_step(&g.store, &g.journal, 60, now)
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
    // Let the first answer's retention pass (the behaviour under test is
    // the passing of time, not a synchronisation).
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let reused_at = onecard::clock::now_ms();
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
        idempotency::cleanup_step(&g.store, &g.journal, 1, reused_at)
            .await
            .unwrap(),
        1
    );
    // Read the record itself: a replay over HTTP would race the (1 s)
    // retention of the new answer on a slow machine.
    let key = idempotency::key(&terminal_id(1), "reuse-1");
    let stored = g
        .store
        .get(Cf::Idem, &key)
        .unwrap()
        .expect("the new answer is kept");
    assert_eq!(
        idempotency::stored_auth_id(&stored),
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
            tokio::time::sleep(Duration::from_millis(1_000)).await;
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
    let mut first = onecard::client::Connection::plain(addr, Protocol::Http1)
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
        if let Ok(mut c) = onecard::client::Connection::plain(addr, Protocol::Http1).await {
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
