//! The settlement receiver (`onecard sink-sim`) over real HTTPS: it books a
//! signed batch once, whatever is sent again, refuses what does not check,
//! keeps its ledger across a restart, and misbehaves when told to.

use std::net::SocketAddr;
use std::path::Path;

use http::{Method, StatusCode};
use onecard::client::{self, Answer, Connection, Protocol};
use onecard::journal::DecisionRecord;
use onecard::model::{EventKind, Reason, Scenario};
use onecard::settle::batch::{Batch, Batcher, Rules};
use onecard::settle::receiver::{self, Ack, Ledger};
use onecard::settle::sign::{Algorithm, Signer};
use serde_json::json;

fn signer() -> Signer {
    Signer::new(Algorithm::HmacSha256, b"transport key".to_vec())
}

fn batch(first_seq: u64, events: u64) -> Batch {
    let mut b = Batcher::new(Rules {
        sink: "transport".into(),
        scenarios: vec![Scenario::Transit],
        events_max: 10_000,
        bytes_max: 1 << 20,
        age_max_ms: 60_000,
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
                scenario: Scenario::Transit,
                amount_fen: Some(200),
                decision: "approve".into(),
                reason: Reason::Ok,
                charged_fen: 200,
                site: None,
                occurred_at: None,
            },
        );
    }
    b.seal().unwrap()
}

async fn connect(certs: &Path, addr: SocketAddr) -> Connection {
    let tls =
        client::tls_config(&certs.join(onecard::certs::CA_CERT), None, Protocol::Http1).unwrap();
    Connection::tls(addr, tls, Protocol::Http1).await.unwrap()
}

async fn post(
    certs: &Path,
    addr: SocketAddr,
    b: &Batch,
    signature: &str,
) -> Result<Answer, client::ClientError> {
    let mut c = connect(certs, addr).await;
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

async fn ledger(certs: &Path, addr: SocketAddr) -> Ledger {
    let mut c = connect(certs, addr).await;
    let a = c
        .send(Method::GET, "/v1/ledger", &[], Vec::new())
        .await
        .unwrap();
    serde_json::from_slice(&a.body).unwrap()
}

async fn misbehave(certs: &Path, addr: SocketAddr, how: serde_json::Value) {
    let mut c = connect(certs, addr).await;
    let a = c
        .send(
            Method::POST,
            "/v1/misbehave",
            &[("content-type", "application/json")],
            serde_json::to_vec(&how).unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(a.status, StatusCode::OK);
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
    let certs = dir.path().join("certs");
    onecard::certs::generate(&certs, 0).unwrap();
    let tls = receiver::server_tls(
        &certs.join(onecard::certs::SERVER_CERT),
        &certs.join(onecard::certs::SERVER_KEY),
    )
    .unwrap();
    let ledger_file = dir.path().join("ledger.jsonl");
    let r = receiver::start(
        "127.0.0.1:0".parse().unwrap(),
        tls.clone(),
        &ledger_file,
        signer(),
    )
    .await
    .unwrap();
    let addr = r.addr;

    let b = batch(1, 5);
    let sig = signer().sign(&b.body);
    let first = ack(&post(&certs, addr, &b, &sig).await.unwrap());
    assert_eq!(
        first,
        Ack {
            batch_id: b.id.clone(),
            count: 5,
            total_fen: 1_000
        }
    );
    // Sent again (a lost answer): the same acknowledgement, booked once.
    assert_eq!(ack(&post(&certs, addr, &b, &sig).await.unwrap()), first);
    assert_eq!(
        ledger(&certs, addr).await,
        Ledger {
            batches: 1,
            events: 5,
            total_fen: 1_000
        }
    );

    // A wrong signature, another key's signature, an altered body.
    let other = Signer::new(Algorithm::HmacSha256, b"not the key".to_vec());
    for bad in ["hmac-sha256=00".to_owned(), other.sign(&b.body)] {
        let a = post(&certs, addr, &batch(6, 1), &bad).await.unwrap();
        assert_eq!(a.status, StatusCode::UNAUTHORIZED);
        assert_eq!(a.json()["error"]["code"], "INVALID_SIGNATURE");
    }
    let mut lying = batch(10, 2);
    lying.body = String::from_utf8(lying.body)
        .unwrap()
        .replace("\"total_fen\":400", "\"total_fen\":500")
        .into_bytes();
    let a = post(&certs, addr, &lying, &signer().sign(&lying.body))
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
    let r = receiver::start(addr, tls, &ledger_file, signer())
        .await
        .unwrap();
    assert_eq!(ack(&post(&certs, addr, &b, &sig).await.unwrap()), first);
    assert_eq!(ledger(&certs, addr).await.batches, 1);
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn it_misbehaves_when_told_to() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    onecard::certs::generate(&certs, 0).unwrap();
    let tls = receiver::server_tls(
        &certs.join(onecard::certs::SERVER_CERT),
        &certs.join(onecard::certs::SERVER_KEY),
    )
    .unwrap();
    let r = receiver::start(
        "127.0.0.1:0".parse().unwrap(),
        tls,
        &dir.path().join("ledger.jsonl"),
        signer(),
    )
    .await
    .unwrap();
    let addr = r.addr;
    let b = batch(100, 3);
    let sig = signer().sign(&b.body);

    misbehave(&certs, addr, json!({"fail": 1})).await;
    let a = post(&certs, addr, &b, &sig).await.unwrap();
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        ledger(&certs, addr).await.batches,
        0,
        "a failed batch is not booked"
    );

    misbehave(&certs, addr, json!({"drop_after_booking": 1})).await;
    assert!(post(&certs, addr, &b, &sig).await.is_err(), "no answer");
    assert_eq!(ledger(&certs, addr).await.batches, 1, "but booked");
    assert_eq!(
        ack(&post(&certs, addr, &b, &sig).await.unwrap()).total_fen,
        600
    );

    misbehave(&certs, addr, json!({"wrong_total": 1})).await;
    assert_eq!(
        ack(&post(&certs, addr, &b, &sig).await.unwrap()).total_fen,
        601
    );
    assert_eq!(
        ack(&post(&certs, addr, &b, &sig).await.unwrap()).total_fen,
        600
    );

    misbehave(&certs, addr, json!({"away_ms": 60_000})).await;
    assert!(post(&certs, addr, &b, &sig).await.is_err(), "away");
    assert_eq!(ledger(&certs, addr).await.batches, 1);
    r.stop().await;
}
