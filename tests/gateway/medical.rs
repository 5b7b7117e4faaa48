//! Medical payments at hospital counters over real sockets: holds,
//! partial captures with the insurance/self-pay split, retries that never
//! charge twice, voids, expiry, refusals, a restart, and the medical
//! sink booking exactly the captured amount once with its split.

use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use onecard::config::{Config, SinkConfig};
use onecard::net::client::{Answer, Connection, Protocol};
use serde_json::{json, Value};

use onecard_core::settle::sign::{Algorithm, Signer};

use crate::common::sink::Sink;
use crate::common::{decision, error_code, TestGateway};

const CARD: &str = "500118M00000001";
const NO_MEDICAL: &str = "500118M00000002";

/// Outpatient 70 % with a 3,000 fen annual deductible, pharmacy 60 %
/// without, and holds of `ttl_s`.
fn medical(c: &mut Config, ttl_s: u64) {
    c.medical = toml::from_str(&format!(
        r#"
        hold_ttl_s = {ttl_s}
        annual_deductible_fen = 3000
        [categories.outpatient]
        coverage_pct = 70
        deductible = true
        [categories.pharmacy]
        coverage_pct = 60
        amount_max_fen = 50000
        "#
    ))
    .unwrap();
}

async fn start(ttl_s: u64) -> TestGateway {
    let gw = TestGateway::start(|c| medical(c, ttl_s)).await;
    cards(&gw).await;
    gw
}

async fn cards(gw: &TestGateway) {
    gw.put_card(
        CARD,
        json!({"status": "active", "functions": ["medical", "financial"]}),
    )
    .await;
    gw.put_card(
        NO_MEDICAL,
        json!({"status": "active", "functions": ["transit"]}),
    )
    .await;
}

fn hold(event_id: &str, card: &str, fen: i64, category: &str) -> Value {
    json!({
        "event_id": event_id,
        "kind": "tap",
        "card_no": card,
        "amount_fen": fen,
        "category": category,
        "site": "hospital-1-counter-3",
        "occurred_at": "2026-11-28T07:45:12Z",
    })
}

fn capture(event_id: &str, hold_event_id: &str, fen: i64) -> Value {
    json!({"event_id": event_id, "hold_event_id": hold_event_id, "amount_fen": fen})
}

fn void(event_id: &str, hold_event_id: &str) -> Value {
    json!({"event_id": event_id, "hold_event_id": hold_event_id})
}

async fn step(t: &mut Connection, step: &str, body: &Value) -> Answer {
    t.medical(step, body).await.unwrap()
}

fn split(a: &Answer) -> (i64, i64, i64) {
    let s = &a.json()["split"];
    (
        s["insurance_fen"].as_i64().unwrap(),
        s["self_pay_fen"].as_i64().unwrap(),
        s["deductible_fen"].as_i64().unwrap(),
    )
}

async fn spent(gw: &TestGateway, card: &str) -> i64 {
    gw.admin_ok(Method::GET, &format!("/admin/v1/cards/{card}"), None)
        .await["spent_fen"]
        .as_i64()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hold_partial_capture_retries_and_a_second_capture() {
    let gw = start(1800).await;
    let mut t = gw.terminal(1, Protocol::Http1).await;

    // A hold of 100 yuan: the split as it would be (the 3,000 deductible
    // self-paid, 70 % of the rest insured), and the daily spend reserved.
    let h = step(&mut t, "hold", &hold("h-1", CARD, 10_000, "outpatient")).await;
    assert_eq!(decision(&h), ("approve".into(), "OK".into()));
    let hv = h.json();
    assert_eq!(hv["amount_fen"], 10_000);
    assert!(hv["hold_id"].as_str().is_some_and(|s| !s.is_empty()));
    assert!(hv["expires_at"].as_str().unwrap().starts_with("20"));
    assert_eq!(split(&h), (4_900, 5_100, 3_000));
    assert_eq!(spent(&gw, CARD).await, 10_000);

    // The hold retried: the same answer, nothing reserved twice.
    let again = step(&mut t, "hold", &hold("h-1", CARD, 10_000, "outpatient")).await;
    assert_eq!(again.body, h.body);
    assert_eq!(spent(&gw, CARD).await, 10_000);

    // A partial capture: 60 yuan booked, the rest released.
    let c = step(&mut t, "capture", &capture("c-1", "h-1", 6_000)).await;
    assert_eq!(decision(&c), ("approve".into(), "OK".into()));
    let cv = c.json();
    assert_eq!(cv["amount_fen"], 6_000);
    assert_eq!(cv["hold_id"], hv["hold_id"]);
    assert_eq!(split(&c), (2_100, 3_900, 3_000));
    assert_eq!(spent(&gw, CARD).await, 6_000);

    // The counter timed out and retries: the first answer, byte for byte.
    let retry = step(&mut t, "capture", &capture("c-1", "h-1", 6_000)).await;
    assert_eq!(retry.body, c.body);
    // The same event id with another amount: a conflict.
    let other = step(&mut t, "capture", &capture("c-1", "h-1", 5_000)).await;
    assert_eq!(other.status, StatusCode::CONFLICT);
    assert_eq!(error_code(&other), "IDEMPOTENCY_CONFLICT");
    // A new event id for the same hold: never a second charge.
    let second = step(&mut t, "capture", &capture("c-2", "h-1", 6_000)).await;
    assert_eq!(decision(&second), ("decline".into(), "HOLD_CLOSED".into()));
    assert_eq!(second.json()["amount_fen"], 0);
    assert_eq!(spent(&gw, CARD).await, 6_000);

    // The deductible is used up for the year: the next bill is split
    // by coverage alone.
    let card = gw
        .admin_ok(Method::GET, &format!("/admin/v1/cards/{CARD}"), None)
        .await;
    assert_eq!(card["medical"]["deductible_used_fen"], 3_000, "{card}");
    let h2 = step(&mut t, "hold", &hold("h-2", CARD, 2_000, "outpatient")).await;
    assert_eq!(split(&h2), (1_400, 600, 0));
    let c2 = step(&mut t, "capture", &capture("c-3", "h-2", 2_000)).await;
    assert_eq!(split(&c2), (1_400, 600, 0));
    assert_eq!(spent(&gw, CARD).await, 8_000);

    // Another terminal cannot capture this terminal's hold.
    let mut t2 = gw.terminal(2, Protocol::Http2).await;
    let stranger = step(&mut t2, "capture", &capture("x-1", "h-2", 1)).await;
    assert_eq!(
        decision(&stranger),
        ("decline".into(), "HOLD_NOT_FOUND".into())
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_void_gives_the_reservation_back_and_closes_the_hold() {
    let gw = start(1800).await;
    let mut t = gw.terminal(1, Protocol::Http1).await;
    let h = step(&mut t, "hold", &hold("h-1", CARD, 4_000, "pharmacy")).await;
    assert_eq!(decision(&h).1, "OK");
    // Pharmacy: 60 %, no deductible.
    assert_eq!(split(&h), (2_400, 1_600, 0));
    assert_eq!(spent(&gw, CARD).await, 4_000);

    let v = step(&mut t, "void", &void("v-1", "h-1")).await;
    assert_eq!(decision(&v), ("approve".into(), "OK".into()));
    assert_eq!(v.json()["amount_fen"], 4_000);
    assert_eq!(spent(&gw, CARD).await, 0);
    // Retried: the same answer, nothing given back twice.
    let again = step(&mut t, "void", &void("v-1", "h-1")).await;
    assert_eq!(again.body, v.body);

    let c = step(&mut t, "capture", &capture("c-1", "h-1", 4_000)).await;
    assert_eq!(decision(&c), ("decline".into(), "HOLD_CLOSED".into()));
    let v2 = step(&mut t, "void", &void("v-2", "h-1")).await;
    assert_eq!(decision(&v2), ("decline".into(), "HOLD_CLOSED".into()));
    assert_eq!(spent(&gw, CARD).await, 0);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_hold_is_not_captured_and_its_reservation_goes_back() {
    let gw = start(1).await;
    let mut t = gw.terminal(1, Protocol::Http1).await;
    let h = step(&mut t, "hold", &hold("h-1", CARD, 5_000, "outpatient")).await;
    assert_eq!(decision(&h).1, "OK");
    assert_eq!(spent(&gw, CARD).await, 5_000);
    // The expiry itself is what is under test: move the clock past it.
    gw.advance_ms(1_100);
    let c = step(&mut t, "capture", &capture("c-1", "h-1", 5_000)).await;
    assert_eq!(decision(&c), ("decline".into(), "HOLD_EXPIRED".into()));
    assert_eq!(spent(&gw, CARD).await, 0);
    // Retried, the same; under a new event id, still expired.
    let again = step(&mut t, "capture", &capture("c-1", "h-1", 5_000)).await;
    assert_eq!(again.body, c.body);
    let v = step(&mut t, "void", &void("v-1", "h-1")).await;
    assert_eq!(decision(&v), ("decline".into(), "HOLD_EXPIRED".into()));
    assert_eq!(spent(&gw, CARD).await, 0);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals() {
    let gw = start(1800).await;
    let mut t = gw.terminal(1, Protocol::Http1).await;
    // A card without the medical function (no insurance enrolment).
    let a = step(
        &mut t,
        "hold",
        &hold("h-1", NO_MEDICAL, 1_000, "outpatient"),
    )
    .await;
    assert_eq!(
        decision(&a),
        ("decline".into(), "FUNCTION_NOT_ENABLED".into())
    );
    assert!(a.json().get("hold_id").is_none());
    // …and nothing to capture.
    let c = step(&mut t, "capture", &capture("c-1", "h-1", 1_000)).await;
    assert_eq!(decision(&c), ("decline".into(), "HOLD_NOT_FOUND".into()));
    // An unknown card, the category's maximum, more than was held.
    let a = step(
        &mut t,
        "hold",
        &hold("h-2", "500118M99999999", 1_000, "pharmacy"),
    )
    .await;
    assert_eq!(decision(&a).1, "CARD_NOT_FOUND");
    let a = step(&mut t, "hold", &hold("h-3", CARD, 50_001, "pharmacy")).await;
    assert_eq!(decision(&a).1, "LIMIT_EXCEEDED");
    let a = step(&mut t, "hold", &hold("h-4", CARD, 1_000, "pharmacy")).await;
    assert_eq!(decision(&a).1, "OK");
    let c = step(&mut t, "capture", &capture("c-2", "h-4", 1_001)).await;
    assert_eq!(decision(&c), ("decline".into(), "LIMIT_EXCEEDED".into()));
    // The hold is still open for the right amount.
    let c = step(&mut t, "capture", &capture("c-3", "h-4", 1_000)).await;
    assert_eq!(decision(&c).1, "OK");
    // A denylisted card.
    gw.deny(CARD).await;
    let a = step(&mut t, "hold", &hold("h-5", CARD, 1_000, "pharmacy")).await;
    assert_eq!(decision(&a).1, "DENYLISTED");

    // Bad requests: an unknown category, a scenario field, a missing
    // amount, a step under the hold's own id.
    for (path, body) in [
        ("hold", hold("h-6", CARD, 1_000, "dental")),
        (
            "hold",
            json!({"event_id": "h-7", "kind": "tap", "card_no": CARD, "amount_fen": 1, "category": "pharmacy", "scenario": "medical"}),
        ),
        (
            "capture",
            json!({"event_id": "c-9", "hold_event_id": "h-4"}),
        ),
        ("void", void("h-4", "h-4")),
    ] {
        let a = step(&mut t, path, &body).await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(error_code(&a), "INVALID_REQUEST");
        assert!(!String::from_utf8_lossy(&a.body).contains(CARD));
    }
    // A hold's event id reused by an authorization: another request.
    let a = t
        .authorize(&json!({"event_id": "h-4", "kind": "tap", "card_no": CARD, "scenario": "medical", "amount_fen": 1000}))
        .await
        .unwrap();
    assert_eq!(a.status, StatusCode::CONFLICT);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_hold_survives_a_restart() {
    let mut gw = start(1800).await;
    let mut t = gw.terminal(1, Protocol::Http1).await;
    let h = step(&mut t, "hold", &hold("h-1", CARD, 3_000, "outpatient")).await;
    assert_eq!(decision(&h).1, "OK");
    drop(t);
    gw.restart().await;
    assert_eq!(spent(&gw, CARD).await, 3_000);
    let mut t = gw.terminal(1, Protocol::Http1).await;
    // The hold again after the restart: its first answer.
    let again = step(&mut t, "hold", &hold("h-1", CARD, 3_000, "outpatient")).await;
    assert_eq!(again.body, h.body);
    let c = step(&mut t, "capture", &capture("c-1", "h-1", 3_000)).await;
    assert_eq!(decision(&c).1, "OK");
    assert_eq!(split(&c), (0, 3_000, 3_000));
    assert_eq!(spent(&gw, CARD).await, 3_000);
    gw.shutdown().await;
}

const KEY: &str = "medical-signing-key-00001";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_medical_sink_books_the_captured_amount_once_with_its_split() {
    let dir = tempfile::tempdir().unwrap();
    let sink = Sink::new(dir.path(), 3);
    let r = sink
        .start(
            "127.0.0.1:0".parse().unwrap(),
            Signer::new(Algorithm::HmacSha256, KEY.as_bytes().to_vec()),
        )
        .await;
    let mut config = crate::common::test_config(dir.path());
    medical(&mut config, 1800);
    let sink_config: SinkConfig = toml::from_str(&format!(
        r#"
        name = "medical"
        url = "https://127.0.0.1:{}/v1/batches"
        ca = "{}"
        scenarios = ["medical"]
        key = "{KEY}"
        age_max_ms = 50
        backoff_base_ms = 10
        backoff_max_ms = 100
        "#,
        r.addr.port(),
        sink.certs.join(onecard::net::certs::CA_CERT).display()
    ))
    .unwrap();
    config.settlement.sinks = vec![sink_config];
    let gw = TestGateway::start_in(dir, config).await;
    cards(&gw).await;
    let mut t = gw.terminal(1, Protocol::Http1).await;

    // Held, captured in part (retried, then tried under a new id), and a
    // second hold voided: one charge of 6,000 fen.
    step(&mut t, "hold", &hold("h-1", CARD, 10_000, "outpatient")).await;
    let c = step(&mut t, "capture", &capture("c-1", "h-1", 6_000)).await;
    assert_eq!(decision(&c).1, "OK");
    step(&mut t, "capture", &capture("c-1", "h-1", 6_000)).await;
    let closed = step(&mut t, "capture", &capture("c-2", "h-1", 6_000)).await;
    assert_eq!(decision(&closed).1, "HOLD_CLOSED");
    step(&mut t, "hold", &hold("h-2", CARD, 2_000, "pharmacy")).await;
    step(&mut t, "void", &void("v-1", "h-2")).await;

    let deadline = Instant::now() + Duration::from_secs(60);
    let ledger = loop {
        let l = sink.ledger(r.addr).await;
        if l.events >= 1 || Instant::now() > deadline {
            break l;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!((ledger.events, ledger.total_fen), (1, 6_000), "{ledger:?}");
    // Nothing else follows: a later hold and its capture make the next
    // batch, and the ledger then holds exactly the two charges.
    step(&mut t, "hold", &hold("h-3", CARD, 500, "pharmacy")).await;
    step(&mut t, "capture", &capture("c-4", "h-3", 500)).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let ledger = loop {
        let l = sink.ledger(r.addr).await;
        if l.events >= 2 || Instant::now() > deadline {
            break l;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!((ledger.events, ledger.total_fen), (2, 6_500), "{ledger:?}");
    // The lines carry the split.
    let text = std::fs::read_to_string(&sink.ledger_file).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .flat_map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            v["events"].as_array().unwrap().clone()
        })
        .collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert_eq!(lines[0]["event_id"], "c-1");
    assert_eq!(lines[0]["amount_fen"], 6_000);
    assert_eq!(
        lines[0]["split"],
        json!({"insurance_fen": 2_100, "self_pay_fen": 3_900, "deductible_fen": 3_000})
    );
    assert_eq!(
        lines[1]["split"],
        json!({"insurance_fen": 300, "self_pay_fen": 200, "deductible_fen": 0})
    );
    gw.shutdown().await;
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reversals_and_the_hotline_see_holds_and_captures() {
    let gw = start(1800).await;
    let mut t = gw.terminal(1, Protocol::Http1).await;
    step(&mut t, "hold", &hold("h-1", CARD, 5_000, "pharmacy")).await;
    step(&mut t, "capture", &capture("c-1", "h-1", 4_000)).await;
    assert_eq!(spent(&gw, CARD).await, 4_000);
    // A reversal of the capture gives its charge back like any approval.
    let r = t.reverse(&json!({"event_id": "c-1"})).await.unwrap();
    assert_eq!(
        r.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    let rv = r.json();
    assert_eq!(
        (rv["status"].as_str(), rv["amount_fen"].as_i64()),
        (Some("reversed"), Some(4_000))
    );
    assert_eq!(spent(&gw, CARD).await, 0);
    // A reversal of a hold (its counter never saw the answer) charged
    // nothing, and releases it like a void: no later capture of it.
    step(&mut t, "hold", &hold("h-2", CARD, 1_000, "pharmacy")).await;
    assert_eq!(spent(&gw, CARD).await, 1_000);
    let r = t.reverse(&json!({"event_id": "h-2"})).await.unwrap();
    assert_eq!(r.json()["status"], "not_charged");
    assert_eq!(spent(&gw, CARD).await, 0);
    let c = step(&mut t, "capture", &capture("c-2", "h-2", 1_000)).await;
    assert_eq!(decision(&c), ("decline".into(), "HOLD_CLOSED".into()));
    let v = step(&mut t, "void", &void("v-1", "h-2")).await;
    assert_eq!(decision(&v), ("decline".into(), "HOLD_CLOSED".into()));
    assert_eq!(spent(&gw, CARD).await, 0);

    // A reversed capture of a category with the deductible gives the
    // deductible back too: the next bill pays it, not insurance.
    step(&mut t, "hold", &hold("h-3", CARD, 2_000, "outpatient")).await;
    let c = step(&mut t, "capture", &capture("c-3", "h-3", 2_000)).await;
    assert_eq!(split(&c), (0, 2_000, 2_000));
    assert_eq!(deductible_used(&gw, CARD).await, 2_000);
    let r = t.reverse(&json!({"event_id": "c-3"})).await.unwrap();
    assert_eq!(r.json()["status"], "reversed");
    assert_eq!(deductible_used(&gw, CARD).await, 0);
    step(&mut t, "hold", &hold("h-4", CARD, 2_000, "outpatient")).await;
    let c = step(&mut t, "capture", &capture("c-4", "h-4", 2_000)).await;
    assert_eq!(split(&c), (0, 2_000, 2_000));

    // The hotline lists the card's records, holds and voids among them.
    let look = gw
        .admin_ok(
            Method::GET,
            &format!("/admin/v1/cards/{CARD}/transactions?limit=50"),
            None,
        )
        .await;
    let decisions: Vec<&str> = look["transactions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["decision"].as_str().unwrap())
        .collect();
    for d in ["hold", "approve", "reverse"] {
        assert!(decisions.contains(&d), "{d} in {decisions:?}");
    }
    // The capture's reversal carries its split, for the medical sink.
    let reversal = look["transactions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["decision"] == "reverse" && t["event_id"] == "c-3")
        .expect("the reversal of c-3 is listed");
    assert_eq!(reversal["split"]["deductible_fen"], 2_000, "{reversal}");
    gw.shutdown().await;
}

async fn deductible_used(gw: &TestGateway, card: &str) -> i64 {
    gw.admin_ok(Method::GET, &format!("/admin/v1/cards/{card}"), None)
        .await["medical"]["deductible_used_fen"]
        .as_i64()
        .unwrap_or(0)
}

/// Polls `f` until it returns `Some`, for at most 30 s: the sweep runs on
/// its own schedule.
async fn eventually<T, F: std::future::Future<Output = Option<T>>>(
    what: &str,
    mut f: impl FnMut() -> F,
) -> T {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "gave up waiting: {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweep_releases_holds_nobody_touches_and_forgets_closed_ones() {
    let gw = TestGateway::start(|c| {
        medical(c, 1);
        c.medical.sweep_interval_s = 1;
        c.idempotency.retention_s = 1;
    })
    .await;
    cards(&gw).await;
    let mut t = gw.terminal(1, Protocol::Http1).await;
    let h = step(&mut t, "hold", &hold("h-1", CARD, 5_000, "outpatient")).await;
    assert_eq!(decision(&h).1, "OK");
    // Released by the sweep (on its own schedule), with nobody touching
    // the hold, once its expiry has passed on the gateway's clock.
    gw.advance_ms(1_100);
    eventually("the reservation goes back", || async {
        (spent(&gw, CARD).await == 0).then_some(())
    })
    .await;
    let look = gw
        .admin_ok(
            Method::GET,
            &format!("/admin/v1/cards/{CARD}/transactions?limit=50"),
            None,
        )
        .await;
    let expired = look["transactions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["decision"] == "expire")
        .cloned()
        .expect("an expire record");
    assert_eq!(
        (expired["event_id"].as_str(), expired["reason"].as_str()),
        (Some("h-1"), Some("HOLD_EXPIRED")),
        "{expired}"
    );
    // Kept for idempotency.retention_s, then deleted: the holds stay
    // bounded, and a capture after that finds nothing.
    gw.advance_ms(1_100);
    let deadline = Instant::now() + Duration::from_secs(30);
    for n in 0.. {
        let c = step(&mut t, "capture", &capture(&format!("c-{n}"), "h-1", 5_000)).await;
        match decision(&c).1.as_str() {
            "HOLD_NOT_FOUND" => break,
            "HOLD_EXPIRED" => {}
            other => panic!("unexpected {other}"),
        }
        assert!(Instant::now() < deadline, "the closed hold was not deleted");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(spent(&gw, CARD).await, 0);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_captures_at_once_charge_once() {
    let gw = start(1800).await;
    let mut a = gw.terminal(1, Protocol::Http1).await;
    let mut b = gw.terminal(1, Protocol::Http1).await;
    step(&mut a, "hold", &hold("h-1", CARD, 5_000, "pharmacy")).await;
    // The counter's retry under a new event id races the first capture.
    let (first, second) = (capture("c-a", "h-1", 4_000), capture("c-b", "h-1", 3_000));
    let (x, y) = tokio::join!(
        step(&mut a, "capture", &first),
        step(&mut b, "capture", &second),
    );
    let mut reasons = [decision(&x).1, decision(&y).1];
    reasons.sort();
    assert_eq!(reasons, ["HOLD_CLOSED".to_owned(), "OK".to_owned()]);
    let charged = if decision(&x).1 == "OK" { 4_000 } else { 3_000 };
    assert_eq!(spent(&gw, CARD).await, charged);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_follows_its_card_when_the_card_is_replaced() {
    const NEW: &str = "500118M00000009";
    let gw = start(1800).await;
    let mut t = gw.terminal(1, Protocol::Http1).await;
    step(&mut t, "hold", &hold("h-1", CARD, 5_000, "outpatient")).await;
    // The resident loses the card at the hospital; the new card takes over
    // its daily spend, and with it the hold's reservation.
    gw.admin_ok(
        Method::POST,
        &format!("/admin/v1/cards/{CARD}/replace"),
        Some(json!({"new_card_no": NEW})),
    )
    .await;
    assert_eq!(spent(&gw, NEW).await, 5_000);
    let c = step(&mut t, "capture", &capture("c-1", "h-1", 2_000)).await;
    assert_eq!(decision(&c).1, "OK");
    // Given back and booked on the card that carries the hold now.
    assert_eq!(spent(&gw, NEW).await, 2_000);
    assert_eq!(deductible_used(&gw, NEW).await, 2_000);
    // Its reversal gives both back there too, not to the cancelled card.
    let r = t.reverse(&json!({"event_id": "c-1"})).await.unwrap();
    assert_eq!(r.json()["status"], "reversed");
    assert_eq!(spent(&gw, NEW).await, 0);
    assert_eq!(deductible_used(&gw, NEW).await, 0);
    gw.shutdown().await;
}
