//! Black-box tests of the terminal and admin APIs: a real gateway on
//! loopback, real mTLS, HTTP/1.1 and HTTP/2, as terminals and operators use it.

use std::future::Future;
use std::sync::Arc;

use http::{Method, StatusCode};
use onecard::net::client::{self, Connection, Protocol};
use serde_json::json;

use crate::common::{decision, error_code, tap, TestGateway, TOKEN};

const ACTIVE: &str = "500118A00000001";
const LOST: &str = "500118A00000002";
const FROZEN: &str = "500118A00000003";
const CANCELLED: &str = "500118A00000004";
const NO_MEDICAL: &str = "500118A00000005";
const DENIED: &str = "500118A00000006";
const UNKNOWN: &str = "500118A00000099";

async fn seed(gw: &TestGateway) {
    let all = json!(["transit", "medical", "financial"]);
    gw.put_card(ACTIVE, json!({"status": "active", "functions": all}))
        .await;
    gw.put_card(LOST, json!({"status": "lost", "functions": all}))
        .await;
    gw.put_card(FROZEN, json!({"status": "frozen", "functions": all}))
        .await;
    gw.put_card(CANCELLED, json!({"status": "cancelled", "functions": all}))
        .await;
    gw.put_card(
        NO_MEDICAL,
        json!({"status": "active", "functions": ["transit"]}),
    )
    .await;
    gw.put_card(DENIED, json!({"status": "active", "functions": all}))
        .await;
    gw.deny(DENIED).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approve_and_every_decline() {
    let gw = TestGateway::start(|c| c.policy.card_daily_spend_max_fen = 10_000).await;
    seed(&gw).await;
    let mut t = gw.terminal(1, Protocol::Http1).await;
    let cases: &[(&str, &str, i64, &str, &str)] = &[
        (ACTIVE, "transit", 200, "approve", "OK"),
        (ACTIVE, "access", 0, "approve", "OK"),
        (UNKNOWN, "transit", 200, "decline", "CARD_NOT_FOUND"),
        (DENIED, "transit", 200, "decline", "DENYLISTED"),
        (LOST, "transit", 200, "decline", "CARD_LOST"),
        (FROZEN, "transit", 200, "decline", "CARD_FROZEN"),
        (CANCELLED, "transit", 200, "decline", "CARD_CANCELLED"),
        (
            NO_MEDICAL,
            "medical",
            5_000,
            "decline",
            "FUNCTION_NOT_ENABLED",
        ),
        (
            NO_MEDICAL,
            "payment",
            100,
            "decline",
            "FUNCTION_NOT_ENABLED",
        ),
        (ACTIVE, "transit", 2_001, "decline", "LIMIT_EXCEEDED"),
        (ACTIVE, "medical", 9_800, "approve", "OK"),
        (ACTIVE, "transit", 200, "decline", "LIMIT_EXCEEDED"),
    ];
    for (i, (card, scenario, amount, want_decision, want_reason)) in cases.iter().enumerate() {
        let mut body = tap(&format!("ev-{i}"), card, scenario, *amount);
        if *amount == 0 {
            body.as_object_mut().unwrap().remove("amount_fen");
        }
        let a = t.authorize(&body).await.unwrap();
        let (d, r) = decision(&a);
        assert_eq!(
            (d.as_str(), r.as_str()),
            (*want_decision, *want_reason),
            "case {i}: {card} {scenario} {amount}"
        );
        let v = a.json();
        assert_eq!(v["event_id"], format!("ev-{i}"));
        assert!(v["auth_id"].as_str().is_some_and(|s| !s.is_empty()));
        let charged = if d == "approve" { *amount } else { 0 };
        assert_eq!(v["amount_fen"], charged);
        assert_eq!(a.headers["content-type"], "application/json");
    }
    // The daily counter is visible to operators.
    let card = gw
        .admin(Method::GET, &format!("/admin/v1/cards/{ACTIVE}"), None)
        .await
        .json();
    assert_eq!(card["spent_fen"], 10_000);
    assert_eq!(card["status"], "active");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denylist_and_card_changes_take_effect_on_the_next_tap() {
    let gw = TestGateway::start(|_| {}).await;
    seed(&gw).await;
    let mut t = gw.terminal(1, Protocol::Http2).await;
    let (d, _) = decision(
        &t.authorize(&tap("a1", ACTIVE, "transit", 200))
            .await
            .unwrap(),
    );
    assert_eq!(d, "approve");

    let v1 = gw
        .admin(
            Method::PUT,
            &format!("/admin/v1/denylist/{ACTIVE}"),
            Some(json!({"reason": "fraud"})),
        )
        .await
        .json();
    assert_eq!(
        decision(
            &t.authorize(&tap("a2", ACTIVE, "transit", 200))
                .await
                .unwrap()
        )
        .1,
        "DENYLISTED"
    );

    let lifted = gw
        .admin(
            Method::DELETE,
            &format!("/admin/v1/denylist/{ACTIVE}"),
            None,
        )
        .await;
    assert_eq!(lifted.status, StatusCode::OK);
    assert!(lifted.json()["version"].as_u64() > v1["version"].as_u64());
    assert_eq!(
        decision(
            &t.authorize(&tap("a3", ACTIVE, "transit", 200))
                .await
                .unwrap()
        )
        .0,
        "approve"
    );

    let again = gw
        .admin(
            Method::DELETE,
            &format!("/admin/v1/denylist/{ACTIVE}"),
            None,
        )
        .await;
    assert_eq!(again.status, StatusCode::NOT_FOUND);

    gw.put_card(
        ACTIVE,
        json!({"status": "frozen", "functions": ["transit"]}),
    )
    .await;
    assert_eq!(
        decision(
            &t.authorize(&tap("a4", ACTIVE, "transit", 200))
                .await
                .unwrap()
        )
        .1,
        "CARD_FROZEN"
    );
    gw.put_card(
        ACTIVE,
        json!({"status": "active", "functions": ["transit"]}),
    )
    .await;
    assert_eq!(
        decision(
            &t.authorize(&tap("a5", ACTIVE, "transit", 200))
                .await
                .unwrap()
        )
        .0,
        "approve"
    );
    // Re-registering kept the counters.
    assert_eq!(
        gw.admin(Method::GET, &format!("/admin/v1/cards/{ACTIVE}"), None)
            .await
            .json()["spent_fen"],
        600
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_replay_is_byte_identical_and_conflicts_are_refused() {
    let gw = TestGateway::start(|_| {}).await;
    seed(&gw).await;
    let mut t1 = gw.terminal(1, Protocol::Http1).await;
    let first = t1
        .authorize(&tap("same-1", ACTIVE, "transit", 200))
        .await
        .unwrap();
    assert_eq!(decision(&first).0, "approve");

    // Same body, other key order and spacing: the same answer, byte for byte.
    let reordered = r#"{ "scenario":"transit", "amount_fen":200, "card_no":"500118A00000001", "kind":"tap",
        "event_id":"same-1", "site":"line-12", "occurred_at":"2026-11-28T07:45:12Z" }"#;
    let again = t1
        .send(
            Method::POST,
            "/v1/authorize",
            &[("content-type", "application/json")],
            reordered.as_bytes().to_vec(),
        )
        .await
        .unwrap();
    assert_eq!(again.status, StatusCode::OK);
    assert_eq!(again.body, first.body);

    // The replay changed nothing: only one charge on the card.
    assert_eq!(
        gw.admin(Method::GET, &format!("/admin/v1/cards/{ACTIVE}"), None)
            .await
            .json()["spent_fen"],
        200
    );

    let conflict = t1
        .authorize(&tap("same-1", ACTIVE, "transit", 300))
        .await
        .unwrap();
    assert_eq!(conflict.status, StatusCode::CONFLICT);
    assert_eq!(error_code(&conflict), "IDEMPOTENCY_CONFLICT");

    // The key is per terminal: another terminal may use the same event id.
    let mut t2 = gw.terminal(2, Protocol::Http1).await;
    let other = t2
        .authorize(&tap("same-1", ACTIVE, "transit", 200))
        .await
        .unwrap();
    assert_eq!(decision(&other).0, "approve");
    assert_ne!(other.json()["auth_id"], first.json()["auth_id"]);

    // Declines replay too.
    let d1 = t1
        .authorize(&tap("dec-1", UNKNOWN, "transit", 200))
        .await
        .unwrap();
    let d2 = t1
        .authorize(&tap("dec-1", UNKNOWN, "transit", 200))
        .await
        .unwrap();
    assert_eq!(d1.body, d2.body);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_copies_of_one_request_are_decided_once() {
    let gw = TestGateway::start(|_| {}).await;
    seed(&gw).await;
    let t = gw.terminal(1, Protocol::Http2).await;
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let mut c = t.try_clone().unwrap();
        tasks.push(tokio::spawn(async move {
            c.authorize(&tap("dup-1", ACTIVE, "transit", 200))
                .await
                .unwrap()
                .body
        }));
    }
    let mut bodies = Vec::new();
    for task in tasks {
        bodies.push(task.await.unwrap());
    }
    assert!(
        bodies.windows(2).all(|w| w[0] == w[1]),
        "every copy gets the same answer"
    );
    assert_eq!(
        gw.admin(Method::GET, &format!("/admin/v1/cards/{ACTIVE}"), None)
            .await
            .json()["spent_fen"],
        200
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_concurrent_taps_at_the_daily_cap_approve_exactly_one() {
    let gw = TestGateway::start(|c| c.policy.card_daily_spend_max_fen = 300).await;
    let cards: Vec<String> = (0..20).map(|i| format!("500118C{i:08}")).collect();
    for c in &cards {
        gw.put_card(c, json!({"status": "active", "functions": ["transit"]}))
            .await;
    }
    let t1 = gw.terminal(1, Protocol::Http2).await;
    let t2 = gw.terminal(2, Protocol::Http2).await;
    let mut tasks = Vec::new();
    for (i, card) in cards.iter().enumerate() {
        for t in [&t1, &t2] {
            let mut c = t.try_clone().unwrap();
            let body = tap(&format!("cap-{i}"), card, "transit", 200);
            tasks.push((
                i,
                tokio::spawn(async move { decision(&c.authorize(&body).await.unwrap()) }),
            ));
        }
    }
    let mut approved = vec![0; cards.len()];
    for (i, task) in tasks {
        let (d, r) = task.await.unwrap();
        if d == "approve" {
            approved[i] += 1;
        } else {
            assert_eq!(r, "LIMIT_EXCEEDED");
        }
    }
    assert!(
        approved.iter().all(|n| *n == 1),
        "exactly one approval per card: {approved:?}"
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_stable_code_and_names_the_problem() {
    let gw = TestGateway::start(|c| c.limits.body_bytes_max = 1024).await;
    seed(&gw).await;
    let mut t = gw.terminal(1, Protocol::Http1).await;
    let good = tap("bad-0", ACTIVE, "transit", 200);
    let with = |k: &str, v: serde_json::Value| {
        let mut b = good.clone();
        b[k] = v;
        serde_json::to_vec(&b).unwrap()
    };
    let without = |k: &str| {
        let mut b = good.clone();
        b.as_object_mut().unwrap().remove(k);
        serde_json::to_vec(&b).unwrap()
    };
    let json_ct: &[(&str, &str)] = &[("content-type", "application/json")];
    let cases: Vec<(
        Method,
        &str,
        &[(&str, &str)],
        Vec<u8>,
        StatusCode,
        &str,
        &str,
    )> = vec![
        (
            Method::POST,
            "/v1/authorize",
            json_ct,
            b"{\"event_id\":".to_vec(),
            StatusCode::BAD_REQUEST,
            "INVALID_REQUEST",
            "not valid JSON",
        ),
        (
            Method::POST,
            "/v1/authorize",
            json_ct,
            with("colour", json!("red")),
            StatusCode::BAD_REQUEST,
            "INVALID_REQUEST",
            "unknown field `colour`",
        ),
        (
            Method::POST,
            "/v1/authorize",
            json_ct,
            without("event_id"),
            StatusCode::BAD_REQUEST,
            "INVALID_REQUEST",
            "missing field `event_id`",
        ),
        (
            Method::POST,
            "/v1/authorize",
            json_ct,
            without("amount_fen"),
            StatusCode::BAD_REQUEST,
            "INVALID_REQUEST",
            "`amount_fen` (required for scenario transit)",
        ),
        (
            Method::POST,
            "/v1/authorize",
            json_ct,
            with("amount_fen", json!("200")),
            StatusCode::BAD_REQUEST,
            "INVALID_REQUEST",
            "`amount_fen` must be an integer",
        ),
        (
            Method::POST,
            "/v1/authorize",
            json_ct,
            with("amount_fen", json!(-5)),
            StatusCode::BAD_REQUEST,
            "INVALID_REQUEST",
            "must not be negative",
        ),
        (
            Method::POST,
            "/v1/authorize",
            json_ct,
            with("card_no", json!("500118a0000001")),
            StatusCode::BAD_REQUEST,
            "INVALID_REQUEST",
            "`card_no` must contain only",
        ),
        (
            Method::POST,
            "/v1/authorize",
            json_ct,
            with("card_no", json!(500118000001_i64)),
            StatusCode::BAD_REQUEST,
            "INVALID_REQUEST",
            "`card_no` must be a string",
        ),
        (
            Method::POST,
            "/v1/authorize",
            json_ct,
            with("event_id", json!("e".repeat(65))),
            StatusCode::BAD_REQUEST,
            "INVALID_REQUEST",
            "`event_id` must be 1 to 64",
        ),
        (
            Method::POST,
            "/v1/authorize",
            json_ct,
            with("scenario", json!("ferry")),
            StatusCode::BAD_REQUEST,
            "INVALID_REQUEST",
            "`scenario` must be one of",
        ),
        (
            Method::POST,
            "/v1/authorize",
            json_ct,
            with("kind", json!("scan")),
            StatusCode::BAD_REQUEST,
            "INVALID_REQUEST",
            "`card_no` is not allowed with kind scan",
        ),
        (
            Method::POST,
            "/v1/authorize",
            &[("content-type", "text/plain")],
            serde_json::to_vec(&good).unwrap(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "UNSUPPORTED_MEDIA_TYPE",
            "application/json",
        ),
        (
            Method::POST,
            "/v1/authorize",
            &[],
            serde_json::to_vec(&good).unwrap(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "UNSUPPORTED_MEDIA_TYPE",
            "application/json",
        ),
        (
            Method::POST,
            "/v1/authorize",
            json_ct,
            with("site", json!("x".repeat(2000))),
            StatusCode::PAYLOAD_TOO_LARGE,
            "PAYLOAD_TOO_LARGE",
            "1024 bytes",
        ),
        (
            Method::GET,
            "/v1/authorize",
            &[],
            Vec::new(),
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            "only POST",
        ),
        (
            Method::POST,
            "/v1/nothing",
            json_ct,
            b"{}".to_vec(),
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            "no such route",
        ),
    ];
    for (i, (method, path, headers, body, status, code, words)) in cases.into_iter().enumerate() {
        let a = t.send(method, path, headers, body).await.unwrap();
        assert_eq!(
            a.status,
            status,
            "case {i}: {}",
            String::from_utf8_lossy(&a.body)
        );
        assert_eq!(error_code(&a), code, "case {i}");
        let msg = a.json()["error"]["message"].as_str().unwrap().to_owned();
        assert!(
            msg.contains(words),
            "case {i}: message {msg:?} lacks {words:?}"
        );
        assert!(
            !msg.contains("0000001"),
            "case {i}: message echoes a card number: {msg}"
        );
    }
    // A scan, until QR keys exist, says so.
    let scan = json!({"event_id": "scan-1", "kind": "scan", "qr": "OC1.k1.e30.sig", "scenario": "medical", "amount_fen": 100});
    let a = t.authorize(&scan).await.unwrap();
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    assert!(a.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("scanning is not configured"));
    // Nothing bad was half-applied: the card was never charged.
    assert_eq!(
        gw.admin(Method::GET, &format!("/admin/v1/cards/{ACTIVE}"), None)
            .await
            .json()["spent_fen"],
        0
    );
    // And the connection still works.
    assert_eq!(decision(&t.authorize(&good).await.unwrap()).0, "approve");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminals_without_a_certificate_from_the_terminal_ca_are_refused() {
    let gw = TestGateway::start(|_| {}).await;
    let ca = gw.certs_dir().join(onecard::net::certs::CA_CERT);

    // No client certificate.
    let tls = client::tls_config(&ca, None, Protocol::Http1).unwrap();
    let refused = match Connection::tls(gw.terminal_addr(), tls, Protocol::Http1).await {
        Err(_) => true,
        Ok(mut c) => c.authorize(&tap("x", ACTIVE, "transit", 1)).await.is_err(),
    };
    assert!(
        refused,
        "a terminal without a certificate must not be served"
    );

    // A certificate from another CA.
    let other = tempfile::tempdir().unwrap();
    onecard::net::certs::generate(other.path(), 1).unwrap();
    let id = onecard::net::certs::terminal_id(1);
    let tls = client::tls_config(
        &ca,
        Some((
            &onecard::net::certs::terminal_cert_path(other.path(), &id),
            &onecard::net::certs::terminal_key_path(other.path(), &id),
        )),
        Protocol::Http1,
    )
    .unwrap();
    let refused = match Connection::tls(gw.terminal_addr(), tls, Protocol::Http1).await {
        Err(_) => true,
        Ok(mut c) => c.authorize(&tap("x", ACTIVE, "transit", 1)).await.is_err(),
    };
    assert!(
        refused,
        "a terminal with a foreign certificate must not be served"
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_needs_the_token_and_sre_endpoints_do_not() {
    let gw = TestGateway::start(|_| {}).await;
    let addr = gw.admin_addr();
    let body = json!({"status": "active"});
    let none = client::admin(
        addr,
        None,
        Method::PUT,
        &format!("/admin/v1/cards/{ACTIVE}"),
        Some(&body),
    )
    .await
    .unwrap();
    assert_eq!(none.status, StatusCode::UNAUTHORIZED);
    assert_eq!(error_code(&none), "UNAUTHENTICATED");
    let wrong = client::admin(
        addr,
        Some("nope"),
        Method::GET,
        &format!("/admin/v1/cards/{ACTIVE}"),
        None,
    )
    .await
    .unwrap();
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
    let missing = client::admin(
        addr,
        Some(TOKEN),
        Method::GET,
        &format!("/admin/v1/cards/{UNKNOWN}"),
        None,
    )
    .await
    .unwrap();
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    assert!(
        !String::from_utf8_lossy(&missing.body).contains(UNKNOWN),
        "card number echoed in clear"
    );
    let bad = client::admin(
        addr,
        Some(TOKEN),
        Method::PUT,
        &format!("/admin/v1/cards/{ACTIVE}"),
        Some(&json!({"status": "gone"})),
    )
    .await
    .unwrap();
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    let bad = client::admin(
        addr,
        Some(TOKEN),
        Method::PUT,
        "/admin/v1/cards/123",
        Some(&body),
    )
    .await
    .unwrap();
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);

    for path in ["/healthz", "/readyz"] {
        assert_eq!(
            client::admin(addr, None, Method::GET, path, None)
                .await
                .unwrap()
                .status,
            StatusCode::OK,
            "{path}"
        );
    }
    // Traffic, then the metrics an SRE looks for.
    seed(&gw).await;
    let mut t = gw.terminal(1, Protocol::Http2).await;
    decision(
        &t.authorize(&tap("m1", ACTIVE, "transit", 200))
            .await
            .unwrap(),
    );
    decision(
        &t.authorize(&tap("m2", UNKNOWN, "transit", 200))
            .await
            .unwrap(),
    );
    let m = client::admin(addr, None, Method::GET, "/metrics", None)
        .await
        .unwrap();
    assert_eq!(m.status, StatusCode::OK);
    let text = String::from_utf8_lossy(&m.body);
    for needle in [
        "onecard_http_requests_total{listener=\"terminal\",route=\"/v1/authorize\",status=\"200\"}",
        "onecard_decisions_total{scenario=\"transit\",decision=\"approve\",reason=\"OK\"}",
        "onecard_decisions_total{scenario=\"transit\",decision=\"decline\",reason=\"CARD_NOT_FOUND\"}",
        "onecard_authorize_latency_seconds_bucket",
        "onecard_journal_batch_events_bucket",
        "onecard_journal_commit_seconds_bucket",
        "onecard_requests_in_flight",
        "onecard_connections_open{listener=\"terminal\"}",
    ] {
        assert!(text.contains(needle), "metrics lack {needle}");
    }
    assert!(
        !text.contains("500118A0"),
        "a card number reached the metrics"
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminal_over_its_rate_gets_429_with_retry_after() {
    let gw = TestGateway::start(|c| {
        c.limits.terminal_rate_per_s = 1;
        c.limits.terminal_burst = 3;
    })
    .await;
    seed(&gw).await;
    let mut t = gw.terminal(1, Protocol::Http1).await;
    let mut statuses = Vec::new();
    for i in 0..20 {
        statuses.push(
            t.authorize(&tap(&format!("r{i}"), ACTIVE, "transit", 1))
                .await
                .unwrap(),
        );
    }
    let limited: Vec<_> = statuses
        .iter()
        .filter(|a| a.status == StatusCode::TOO_MANY_REQUESTS)
        .collect();
    // Three tokens at the start and one more per second: twenty requests
    // leave at least two refused unless the loop took over fifteen seconds.
    assert!(
        limited.len() >= 2,
        "expected 429s, got {:?}",
        statuses.iter().map(|a| a.status).collect::<Vec<_>>()
    );
    assert_eq!(error_code(limited[0]), "RATE_LIMITED");
    assert!(limited[0].headers.contains_key("retry-after"));
    // Another terminal is unaffected.
    let mut t2 = gw.terminal(2, Protocol::Http1).await;
    assert_eq!(
        t2.authorize(&tap("other", ACTIVE, "transit", 1))
            .await
            .unwrap()
            .status,
        StatusCode::OK
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_listener_takes_the_terminal_id_from_the_header() {
    let gw =
        TestGateway::start(|c| c.terminal.plaintext_addr = Some("127.0.0.1:0".parse().unwrap()))
            .await;
    seed(&gw).await;
    let addr = gw.running().addrs.plaintext.unwrap();
    let mut c = Connection::plain(addr, Protocol::Http1).await.unwrap();
    let body = serde_json::to_vec(&tap("p1", ACTIVE, "transit", 200)).unwrap();
    let a = c
        .send(
            Method::POST,
            "/v1/authorize",
            &[("content-type", "application/json")],
            body.clone(),
        )
        .await
        .unwrap();
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    let ok = c
        .send(
            Method::POST,
            "/v1/authorize",
            &[
                ("content-type", "application/json"),
                ("x-terminal-id", "bench-1"),
            ],
            body,
        )
        .await
        .unwrap();
    assert_eq!(decision(&ok).0, "approve");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cards_denylist_and_answers_survive_a_restart() {
    let mut gw = TestGateway::start(|_| {}).await;
    seed(&gw).await;
    let mut t = gw.terminal(1, Protocol::Http1).await;
    let first = t
        .authorize(&tap("keep-1", ACTIVE, "transit", 200))
        .await
        .unwrap();
    let version = gw.running().gateway().deny.version();
    drop(t);
    gw.restart().await;

    assert_eq!(gw.running().gateway().deny.version(), version);
    let card = gw
        .admin(Method::GET, &format!("/admin/v1/cards/{ACTIVE}"), None)
        .await
        .json();
    assert_eq!(card["spent_fen"], 200);
    assert_eq!(
        card["functions"],
        json!(["transit", "medical", "financial"])
    );
    let entry = gw
        .admin(Method::GET, &format!("/admin/v1/denylist/{DENIED}"), None)
        .await;
    assert_eq!(entry.status, StatusCode::OK);
    let mut t = gw.terminal(1, Protocol::Http2).await;
    assert_eq!(
        decision(
            &t.authorize(&tap("keep-2", DENIED, "transit", 200))
                .await
                .unwrap()
        )
        .1,
        "DENYLISTED"
    );
    assert_eq!(
        decision(
            &t.authorize(&tap("keep-3", LOST, "transit", 200))
                .await
                .unwrap()
        )
        .1,
        "CARD_LOST"
    );
    let replay = t
        .authorize(&tap("keep-1", ACTIVE, "transit", 200))
        .await
        .unwrap();
    assert_eq!(
        replay.body, first.body,
        "the answer is replayed byte for byte after a restart"
    );
    // New answers do not reuse an auth_id of the previous run.
    let next = t
        .authorize(&tap("keep-4", ACTIVE, "transit", 200))
        .await
        .unwrap();
    assert_ne!(next.json()["auth_id"], first.json()["auth_id"]);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_and_http2_terminals_share_one_listener() {
    let gw = TestGateway::start(|_| {}).await;
    seed(&gw).await;
    let gw = Arc::new(gw);
    let mut h1 = gw.terminal(1, Protocol::Http1).await;
    let mut h2 = gw.terminal(2, Protocol::Http2).await;
    assert_eq!(
        decision(
            &h1.authorize(&tap("h1", ACTIVE, "transit", 100))
                .await
                .unwrap()
        )
        .0,
        "approve"
    );
    assert_eq!(
        decision(
            &h2.authorize(&tap("h2", ACTIVE, "transit", 100))
                .await
                .unwrap()
        )
        .0,
        "approve"
    );
    drop((h1, h2));
    Arc::try_unwrap(gw).ok().unwrap().shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_abandoned_while_its_record_is_written_is_still_decided_once() {
    let gw = TestGateway::start(|_| {}).await;
    seed(&gw).await;
    let g = gw.running().gateway().clone();
    let body = serde_json::to_vec(&tap("gone-1", ACTIVE, "transit", 300)).unwrap();
    let body = onecard_core::wire::parse_authorize(&body).unwrap();
    // The terminal hangs up right after sending: the future is polled once
    // (it decides and queues its record) and dropped while it waits for disk.
    let mut first = Box::pin(g.authorize("term-x", &body, g.now_ms()));
    let polled =
        std::future::poll_fn(|cx| std::task::Poll::Ready(first.as_mut().poll(cx).is_pending()))
            .await;
    assert!(
        polled,
        "the first attempt should still be waiting for its record after one poll"
    );
    drop(first);
    // Its retry gets the decision that was made, not a second one.
    let retry = g.authorize("term-x", &body, g.now_ms()).await.unwrap();
    let again = g.authorize("term-x", &body, g.now_ms()).await.unwrap();
    assert_eq!(retry, again);
    assert_eq!(
        gw.admin(Method::GET, &format!("/admin/v1/cards/{ACTIVE}"), None)
            .await
            .json()["spent_fen"],
        300
    );
    gw.shutdown().await;
}
