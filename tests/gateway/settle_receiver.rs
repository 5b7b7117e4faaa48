//! The settlement receiver (`onecard sink-sim`) over real HTTPS: it books a
//! signed batch once, whatever is sent again, refuses what does not check,
//! keeps its ledger across a restart, and misbehaves when told to.

use std::net::SocketAddr;

use http::{Method, StatusCode};
use onecard::app::sink_sim::{Ack, Ledger};
use onecard::net::client::{self, Answer};
use serde_json::json;

use onecard_core::model::{EventKind, Reason, Scenario};
use onecard_core::record::DecisionRecord;
use onecard_core::settle::batch::{Batch, Batcher, Rules};
use onecard_core::settle::sign::{Algorithm, Signer};

use crate::common::sink::Sink;

fn signer() -> Signer {
    Signer::new(Algorithm::HmacSha256, b"transport key".to_vec())
}

fn batch(first_seq: u64, events: u64) -> Batch {
    let mut b = Batcher::new(Rules {
        sink: "transport".into(),
        scenarios: vec![Scenario::Transit],
        cards: Default::default(),
        events_max: 10_000,
        bytes_max: 1 << 20,
        age_max_ms: 60_000,
        day_offset_minutes: 480,
    });
    for seq in first_seq..first_seq + events {
        b.offer(
            seq,
            &DecisionRecord {
                at_ms: seq as i64,
                terminal: "term-00001".into(),
                event_id: format!("bus-{seq}"),
                auth_id: format!("a{seq}"),
                kind: EventKind::Tap,
                card_no: "500118A00000001".into(),
                scenario: Some(Scenario::Transit),
                amount_fen: Some(200),
                decision: "approve".into(),
                reason: Reason::Ok,
                charged_fen: 200,
                site: None,
                occurred_at: None,
                reverses: None,
                scan: None,
                offline: false,
                fare: None,
                bill_ref: None,
                credit: None,
                split: None,
                hold_event_id: None,
            },
        );
    }
    b.seal().unwrap()
}

async fn post(
    sink: &Sink,
    addr: SocketAddr,
    b: &Batch,
    signature: &str,
) -> Result<Answer, client::ClientError> {
    let mut c = sink.connect(addr).await;
    c.send(
        Method::POST,
        "/v1/batches",
        &[
            ("content-type", "application/json"),
            ("idempotency-key", &b.id),
            ("x-onecard-signature", signature),
        ],
        b.body.clone(),
    )
    .await
}

fn ack(a: &Answer) -> Ack {
    assert_eq!(
        a.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&a.body)
    );
    serde_json::from_slice(&a.body).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_is_booked_once_and_checked() {
    let dir = tempfile::tempdir().unwrap();
    let sink = Sink::new(dir.path(), 0);
    let r = sink.start("127.0.0.1:0".parse().unwrap(), signer()).await;
    let addr = r.addr;

    let b = batch(1, 5);
    let sig = signer().sign(&b.body);
    let first = ack(&post(&sink, addr, &b, &sig).await.unwrap());
    assert_eq!(
        first,
        Ack {
            batch_id: b.id.clone(),
            count: 5,
            total_fen: 1_000,
        }
    );
    // Sent again (a lost answer): the same acknowledgement, booked once.
    assert_eq!(ack(&post(&sink, addr, &b, &sig).await.unwrap()), first);
    assert_eq!(
        sink.ledger(addr).await,
        Ledger {
            batches: 1,
            events: 5,
            total_fen: 1_000,
            reversals: 0,
            ..Ledger::default()
        }
    );

    // A wrong signature, another key's signature, an altered body.
    let other = Signer::new(Algorithm::HmacSha256, b"not the key".to_vec());
    for bad in ["hmac-sha256=00".to_owned(), other.sign(&b.body)] {
        let a = post(&sink, addr, &batch(6, 1), &bad).await.unwrap();
        assert_eq!(a.status, StatusCode::UNAUTHORIZED);
        assert_eq!(a.json()["error"]["code"], "INVALID_SIGNATURE");
    }
    let mut lying = batch(10, 2);
    lying.body = String::from_utf8(lying.body)
        .unwrap()
        .replace("\"total_fen\":400", "\"total_fen\":500")
        .into_bytes();
    let a = post(&sink, addr, &lying, &signer().sign(&lying.body))
        .await
        .unwrap();
    assert_eq!(
        a.status,
        StatusCode::BAD_REQUEST,
        "{}",
        String::from_utf8_lossy(&a.body)
    );

    // The ledger survives a restart, and so does de-duplication.
    r.stop().await;
    let r = sink.start(addr, signer()).await;
    assert_eq!(ack(&post(&sink, addr, &b, &sig).await.unwrap()), first);
    assert_eq!(sink.ledger(addr).await.batches, 1);
    r.stop().await;

    // A booking cut short by a crash (never acknowledged) is dropped at the
    // next start, and the bookings after it stay readable.
    use std::io::Write as _;
    std::fs::OpenOptions::new()
        .append(true)
        .open(&sink.ledger_file)
        .unwrap()
        .write_all(b"{\"ack\":{\"batch_id\":\"transport-cut")
        .unwrap();
    let r = sink.start(addr, signer()).await;
    let second = batch(20, 2);
    let a = post(&sink, addr, &second, &signer().sign(&second.body))
        .await
        .unwrap();
    assert_eq!(ack(&a).count, 2);
    r.stop().await;
    let r = sink.start(addr, signer()).await;
    assert_eq!(
        sink.ledger(addr).await,
        Ledger {
            batches: 2,
            events: 7,
            total_fen: 1_400,
            reversals: 0,
            ..Ledger::default()
        }
    );
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn it_misbehaves_when_told_to() {
    let dir = tempfile::tempdir().unwrap();
    let sink = Sink::new(dir.path(), 0);
    let r = sink.start("127.0.0.1:0".parse().unwrap(), signer()).await;
    let addr = r.addr;
    let b = batch(100, 3);
    let sig = signer().sign(&b.body);

    sink.misbehave(addr, json!({"fail": 1})).await;
    let a = post(&sink, addr, &b, &sig).await.unwrap();
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        sink.ledger(addr).await.batches,
        0,
        "a failed batch is not booked"
    );

    sink.misbehave(addr, json!({"drop_after_booking": 1})).await;
    assert!(post(&sink, addr, &b, &sig).await.is_err(), "no answer");
    assert_eq!(sink.ledger(addr).await.batches, 1, "but booked");
    assert_eq!(
        ack(&post(&sink, addr, &b, &sig).await.unwrap()).total_fen,
        600
    );

    sink.misbehave(addr, json!({"wrong_total": 1})).await;
    assert_eq!(
        ack(&post(&sink, addr, &b, &sig).await.unwrap()).total_fen,
        601
    );
    assert_eq!(
        ack(&post(&sink, addr, &b, &sig).await.unwrap()).total_fen,
        600
    );

    sink.misbehave(addr, json!({"away_ms": 60_000})).await;
    assert!(post(&sink, addr, &b, &sig).await.is_err(), "away");
    assert_eq!(sink.ledger(addr).await.batches, 1);
    r.stop().await;
}
