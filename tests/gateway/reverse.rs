//! Reversals over real sockets (`POST /v1/reverse`): a terminal that never
//! saw an answer cancels the event; the charge is given back, the answer is
//! idempotent, and a reversal of an event the gateway has not seen is kept
//! and applied when the event turns up late.

use http::StatusCode;
use onecard::net::client::Protocol;
use serde_json::json;

use crate::common::{decision, error_code, tap, TestGateway};

const CARD: &str = "500118R00000001";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reversal_gives_the_charge_back_once_and_is_idempotent() {
    let mut gw = TestGateway::start(|c| c.policy.card_daily_spend_max_fen = 1_000).await;
    gw.put_card(CARD, json!({"status": "active", "functions": ["transit"]}))
        .await;
    let mut t = gw.terminal(1, Protocol::Http1).await;

    // 5 fares of 200 reach the daily cap of 1,000; the sixth is declined.
    for i in 0..5 {
        let a = t
            .authorize(&tap(&format!("f-{i}"), CARD, "transit", 200))
            .await
            .unwrap();
        assert_eq!(decision(&a).0, "approve");
    }
    let over = t
        .authorize(&tap("f-5", CARD, "transit", 200))
        .await
        .unwrap();
    assert_eq!(decision(&over), ("decline".into(), "LIMIT_EXCEEDED".into()));
    let original = t
        .authorize(&tap("f-4", CARD, "transit", 200))
        .await
        .unwrap()
        .json();

    // The terminal reverses f-4: given back, and the cap has room again.
    let a = t.reverse(&json!({"event_id": "f-4"})).await.unwrap();
    assert_eq!(
        a.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&a.body)
    );
    let v = a.json();
    assert_eq!(v["status"], "reversed");
    assert_eq!(v["amount_fen"], 200);
    assert_eq!(v["auth_id"], original["auth_id"]);
    assert_ne!(v["reversal_id"], original["auth_id"]);
    let again = t
        .authorize(&tap("f-6", CARD, "transit", 200))
        .await
        .unwrap();
    assert_eq!(
        decision(&again).0,
        "approve",
        "the reversed fare no longer counts"
    );

    // The same reversal again: the same answer, byte for byte, and nothing
    // more given back (the cap is full again).
    let b = t.reverse(&json!({"event_id": "f-4"})).await.unwrap();
    assert_eq!(b.body, a.body);
    let full = t
        .authorize(&tap("f-7", CARD, "transit", 200))
        .await
        .unwrap();
    assert_eq!(decision(&full).1, "LIMIT_EXCEEDED");
    // A different body for the same reversal is a conflict.
    let c = t
        .reverse(&json!({"event_id": "f-4", "occurred_at": "2026-11-28T07:46:00Z"}))
        .await
        .unwrap();
    assert_eq!(
        (c.status, error_code(&c)),
        (StatusCode::CONFLICT, "IDEMPOTENCY_CONFLICT".into())
    );
    // The original event still answers as it did.
    let replay = t
        .authorize(&tap("f-4", CARD, "transit", 200))
        .await
        .unwrap();
    assert_eq!(replay.json(), original);

    // A decline has nothing to give back.
    let d = t.reverse(&json!({"event_id": "f-5"})).await.unwrap().json();
    assert_eq!(
        (d["status"].as_str(), d["amount_fen"].as_i64()),
        (Some("not_charged"), Some(0))
    );

    // Event ids are the terminal's own: another terminal's f-1 is unknown here.
    let mut t2 = gw.terminal(2, Protocol::Http2).await;
    let u = t2
        .reverse(&json!({"event_id": "f-1"}))
        .await
        .unwrap()
        .json();
    assert_eq!(u["status"], "unknown_event");

    // A site of 64 four-byte characters (256 bytes of UTF-8) is valid:
    // decided, and reversible.
    let long_site = "\u{20000}".repeat(64);
    let mut body = tap("f-long", CARD, "access", 0);
    body["site"] = json!(long_site);
    let long = t.authorize(&body).await.unwrap();
    assert_eq!(decision(&long).0, "approve");
    let r = t
        .reverse(&json!({"event_id": "f-long"}))
        .await
        .unwrap()
        .json();
    assert_eq!(r["status"], "not_charged");

    // After a restart every answer is the same.
    gw.restart().await;
    let mut t = gw.terminal(1, Protocol::Http1).await;
    let after = t.reverse(&json!({"event_id": "f-4"})).await.unwrap();
    assert_eq!(after.body, a.body);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reversal_that_arrives_before_its_event_declines_the_event() {
    let mut gw = TestGateway::start(|_| {}).await;
    gw.put_card(CARD, json!({"status": "active", "functions": ["transit"]}))
        .await;
    let mut t = gw.terminal(1, Protocol::Http1).await;
    let r = t
        .reverse(&json!({"event_id": "late-1", "occurred_at": "2026-11-28T07:45:20Z"}))
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::OK);
    let v = r.json();
    assert_eq!(
        (
            v["status"].as_str(),
            v["auth_id"].is_null(),
            v["amount_fen"].as_i64()
        ),
        (Some("unknown_event"), true, Some(0))
    );
    // The reversal is kept across a restart; the late request is declined
    // `REVERSED` and charges nothing, and its retry gets the same answer.
    gw.restart().await;
    let mut t = gw.terminal(1, Protocol::Http1).await;
    let late = t
        .authorize(&tap("late-1", CARD, "transit", 200))
        .await
        .unwrap();
    assert_eq!(decision(&late), ("decline".into(), "REVERSED".into()));
    assert_eq!(late.json()["amount_fen"], 0);
    let retry = t
        .authorize(&tap("late-1", CARD, "transit", 200))
        .await
        .unwrap();
    assert_eq!(retry.body, late.body);
    // The reversal itself still answers as before.
    let r2 = t
        .reverse(&json!({"event_id": "late-1", "occurred_at": "2026-11-28T07:45:20Z"}))
        .await
        .unwrap();
    assert_eq!(r2.body, r.body);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_reversals_get_clear_errors() {
    let gw = TestGateway::start(|_| {}).await;
    let mut t = gw.terminal(1, Protocol::Http1).await;
    let cases = [
        (json!({}), "missing field `event_id`"),
        (json!({"event_id": "a b"}), "`event_id` must be 1 to 64"),
        (
            json!({"event_id": "e1", "card_no": CARD}),
            "unknown field `card_no`",
        ),
        (
            json!({"event_id": "e1", "occurred_at": "yesterday"}),
            "`occurred_at` must be an RFC 3339",
        ),
        (json!([1]), "JSON object"),
    ];
    for (body, want) in cases {
        let a = t.reverse(&body).await.unwrap();
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{body}");
        let message = a.json()["error"]["message"].as_str().unwrap().to_owned();
        assert!(message.contains(want), "{body}: {message}");
        assert!(!message.contains(CARD), "the card number is not echoed");
    }
    gw.shutdown().await;
}
