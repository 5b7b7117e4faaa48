//! Durability, black-box: the real `onecard` binary is killed with SIGKILL
//! while terminals send authorizations; after a restart every approval a
//! terminal received is replayed with the same `auth_id`, and the journal
//! holds each sequence number once, without gaps.
//!
//! A second test kills the gateway while it delivers settlement batches to
//! a real receiver: after the restart every approved fare is booked once.
//! A third kills it after a reversal took its charge out of an open batch
//! (issue 15): the receiver books no refund of a charge it never got.
//!
//! Scope: SIGKILL keeps the OS page cache, so this proves "answered only
//! after the record was written" (it would catch an answer sent before the
//! write), not "after fdatasync"; the sync itself is RocksDB's
//! `WriteOptions::set_sync(true)`, set by the journal in `sync` mode.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use onecard::net::client::{self, Protocol};
use onecard::store::{Cf, Store};
use serde_json::json;
use tokio::sync::Mutex;

use onecard_core::settle::sign::{Algorithm, Signer};

use crate::common::process::{self, wait_ready};
use crate::common::sink::Sink;
use crate::common::{connect_terminal, tap, TOKEN};

const CARDS: usize = 16;
const KILL_AFTER_APPROVALS: usize = 150;
const CLIENTS: u32 = 3;

fn spawn_gateway(dir: &Path) -> Child {
    process::spawn_gateway(dir, CLIENTS, "")
}

fn spawn_gateway_with(dir: &Path, extra: &str) -> Child {
    process::spawn_gateway(dir, CLIENTS, extra)
}

fn card(i: usize) -> String {
    format!("500118K{i:08}")
}

/// A receiver (`sink-sim`, on `sink`'s certificates) and the config of a
/// sink `name` taking `scenario` to it, signed with `key`, with `keys`
/// (TOML lines) added.
async fn receiver_for(
    sink: &Sink,
    key: &str,
    name: &str,
    scenario: &str,
    keys: &str,
) -> (onecard::app::sink_sim::Running, String) {
    let r = sink
        .start(
            "127.0.0.1:0".parse().unwrap(),
            Signer::new(Algorithm::HmacSha256, key.as_bytes().to_vec()),
        )
        .await;
    let extra = format!(
        "[[settlement.sinks]]\nname = \"{name}\"\nurl = \"https://127.0.0.1:{}/v1/batches\"\nca = {:?}\nscenarios = [\"{scenario}\"]\nkey = \"{key}\"\n{keys}",
        r.addr.port(),
        sink.certs.join(onecard::net::certs::CA_CERT)
    );
    (r, extra)
}

/// Puts an active card with one function through the admin API.
async fn put_card(addrs: &onecard::app::server::Addrs, card_no: &str, function: &str) {
    let a = client::admin(
        addrs.admin,
        Some(TOKEN),
        Method::PUT,
        &format!("/admin/v1/cards/{card_no}"),
        Some(&json!({"status": "active", "functions": [function]})),
    )
    .await
    .unwrap();
    assert_eq!(a.status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_no_acknowledged_approval() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = spawn_gateway(dir.path());
    let addrs = wait_ready(&mut child, dir.path());
    let certs = dir.path().join("data").join("certs");
    for i in 0..CARDS {
        let a = client::admin(
            addrs.admin,
            Some(TOKEN),
            Method::PUT,
            &format!("/admin/v1/cards/{}", card(i)),
            Some(&json!({"status": "active", "functions": ["transit"]})),
        )
        .await
        .unwrap();
        assert_eq!(a.status, StatusCode::OK);
    }

    // Terminals send until the connection breaks; each keeps the answers it got.
    let approvals = Arc::new(AtomicUsize::new(0));
    let received: Arc<Mutex<BTreeMap<(u32, String), (String, Vec<u8>)>>> = Arc::default();
    let mut tasks = Vec::new();
    for n in 1..=CLIENTS {
        let mut conn = connect_terminal(&certs, addrs.terminal, n, Protocol::Http1).await;
        let approvals = approvals.clone();
        let received = received.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0.. {
                let event = format!("k9-{n}-{i}");
                let Ok(a) = conn
                    .authorize(&tap(&event, &card(i % CARDS), "transit", 1))
                    .await
                else {
                    break;
                };
                if a.status != StatusCode::OK {
                    continue;
                }
                let v = a.json();
                if v["decision"] == "approve" {
                    approvals.fetch_add(1, Ordering::AcqRel);
                }
                received.lock().await.insert(
                    (n, event),
                    (v["auth_id"].as_str().unwrap().to_owned(), a.body.to_vec()),
                );
            }
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while approvals.load(Ordering::Acquire) < KILL_AFTER_APPROVALS {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!(
                "only {} approvals in 120 s",
                approvals.load(Ordering::Acquire)
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    for t in tasks {
        t.await.unwrap();
    }
    let received = Arc::try_unwrap(received).unwrap().into_inner();
    assert!(received.len() >= KILL_AFTER_APPROVALS);

    // Restart on the same data and replay everything the terminals saw.
    let mut child = spawn_gateway(dir.path());
    let addrs = wait_ready(&mut child, dir.path());
    let mut conns = Vec::new();
    for n in 1..=CLIENTS {
        conns.push(connect_terminal(&certs, addrs.terminal, n, Protocol::Http2).await);
    }
    for ((n, event), (auth_id, body)) in &received {
        let i: usize = event.rsplit('-').next().unwrap().parse().unwrap();
        let a = conns[(*n - 1) as usize]
            .authorize(&tap(event, &card(i % CARDS), "transit", 1))
            .await
            .unwrap();
        assert_eq!(a.status, StatusCode::OK);
        assert_eq!(
            a.json()["auth_id"].as_str().unwrap(),
            auth_id,
            "{event}: a different answer after the crash"
        );
        assert_eq!(
            &a.body.to_vec(),
            body,
            "{event}: the replay is not byte-identical"
        );
    }

    // A clean stop (SIGTERM) exits 0.
    drop(conns);
    let pid = child.id().to_string();
    let status = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(status.success());
    let exit = child.wait().unwrap();
    assert!(
        exit.success(),
        "SIGTERM should stop the gateway cleanly: {exit}"
    );

    // The journal: sequence numbers 1..=n, each once, each event once.
    let store = Store::open(&dir.path().join("data").join("db"), &Default::default()).unwrap();
    let mut seqs = Vec::new();
    let mut events = BTreeMap::new();
    store
        .scan(Cf::Journal, &[], |k, v| {
            seqs.push(u64::from_be_bytes(k.try_into().unwrap()));
            let r: onecard_core::record::DecisionRecord = serde_json::from_slice(v).unwrap();
            *events.entry((r.terminal, r.event_id)).or_insert(0) += 1;
            true
        })
        .unwrap();
    assert_eq!(
        seqs,
        (1..=seqs.len() as u64).collect::<Vec<_>>(),
        "sequence numbers are contiguous from 1"
    );
    assert!(
        events.values().all(|n| *n == 1),
        "an event was journaled twice"
    );
    for (n, event) in received.keys() {
        assert!(
            events.contains_key(&(onecard::net::certs::terminal_id(*n), event.clone())),
            "{event} acknowledged but not journaled"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_delivery_books_every_event_once() {
    const KEY: &str = "transport-signing-key-0001";
    const FARES: usize = 60;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // The receiver uses the certificates the gateway will find in its data
    // directory, and drops its first answers after booking: batches stay
    // stored and unacknowledged at the gateway when it is killed.
    let sink = Sink::new(&data, CLIENTS);
    let (r, extra) = receiver_for(
        &sink,
        KEY,
        "transport",
        "transit",
        "events_max = 5\nage_max_ms = 50\nbackoff_base_ms = 10\nbackoff_max_ms = 50\n",
    )
    .await;
    sink.misbehave(r.addr, json!({"drop_after_booking": 3, "delay_ms": 20}))
        .await;
    let mut child = spawn_gateway_with(dir.path(), &extra);
    let addrs = wait_ready(&mut child, dir.path());
    put_card(&addrs, &card(0), "transit").await;
    let mut conn = connect_terminal(&sink.certs, addrs.terminal, 1, Protocol::Http1).await;
    for i in 0..FARES {
        let a = conn
            .authorize(&tap(&format!("fare-{i}"), &card(0), "transit", 200))
            .await
            .unwrap();
        assert_eq!(a.json()["decision"], "approve");
    }
    // Killed once delivery is under way, whatever it has reached.
    let deadline = Instant::now() + Duration::from_secs(60);
    while sink.ledger(r.addr).await.events < 10 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();

    let mut child = spawn_gateway_with(dir.path(), &extra);
    wait_ready(&mut child, dir.path());
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut l = sink.ledger(r.addr).await;
    while l.events < FARES as u64 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        l = sink.ledger(r.addr).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    r.stop().await;
    // Exactly the fares: a batch sent again after the restart carried the
    // same id; re-batched events would have been booked twice.
    assert_eq!(
        (l.events, l.total_fen),
        (FARES as u64, FARES as i64 * 200),
        "{l:?}"
    );
}

/// A loss report, a replacement and a spent code survive `kill -9`: after
/// the restart the lost card is still stopped (online and in the deny list
/// validators sync), the new card has the credential, and the code already
/// used is still refused as a replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_keeps_loss_reports_replacements_and_spent_codes() {
    use crate::common::qr::{now_s, scan, TestKey};
    let dir = tempfile::tempdir().unwrap();
    let issuer = TestKey::ed25519(31);
    let public = issuer.write_public(dir.path(), "ed-1");
    let extra =
        format!("[[qr.keys]]\nkid = \"ed-1\"\nalg = \"ed25519\"\npublic_key = {public:?}\n");
    let mut child = spawn_gateway_with(dir.path(), &extra);
    let addrs = wait_ready(&mut child, dir.path());
    let certs = dir.path().join("data").join("certs");
    let admin = |method: Method, path: String, body: Option<serde_json::Value>| async move {
        let a = client::admin(addrs.admin, Some(TOKEN), method, &path, body.as_ref())
            .await
            .unwrap();
        assert_eq!(
            a.status,
            StatusCode::OK,
            "{path}: {}",
            String::from_utf8_lossy(&a.body)
        );
        a.json()
    };
    let (lost, old, new) = (card(90), card(91), card(92));
    for c in [&lost, &old] {
        admin(
            Method::PUT,
            format!("/admin/v1/cards/{c}"),
            Some(json!({"status": "active", "functions": ["transit"]})),
        )
        .await;
    }
    admin(
        Method::POST,
        format!("/admin/v1/cards/{old}/credentials"),
        Some(json!({"credential_id": "essc-k9", "typ": "essc"})),
    )
    .await;
    let mut t = connect_terminal(&certs, addrs.terminal, 1, Protocol::Http1).await;
    let code = issuer.code("ed-1", "essc-k9", "essc", now_s(), 60, "jti-k9-000001");
    let a = t
        .authorize(&scan("k9-s1", &code, "transit", 1))
        .await
        .unwrap();
    assert_eq!(a.json()["decision"], "approve");
    admin(Method::POST, format!("/admin/v1/cards/{lost}/loss"), None).await;
    admin(
        Method::POST,
        format!("/admin/v1/cards/{old}/replace"),
        Some(json!({"new_card_no": new})),
    )
    .await;
    let version = admin(Method::GET, "/admin/v1/status".into(), None).await["denylist"]["version"]
        .as_u64()
        .unwrap();

    child.kill().unwrap();
    child.wait().unwrap();
    let mut child = spawn_gateway_with(dir.path(), &extra);
    let addrs = wait_ready(&mut child, dir.path());
    let mut t = connect_terminal(&certs, addrs.terminal, 2, Protocol::Http1).await;
    let a = t
        .authorize(&tap("k9-t1", &lost, "transit", 1))
        .await
        .unwrap();
    assert_eq!(a.json()["reason"], "CARD_LOST");
    let a = t
        .authorize(&tap("k9-t2", &old, "transit", 1))
        .await
        .unwrap();
    assert_eq!(a.json()["reason"], "CARD_CANCELLED");
    let a = t
        .authorize(&scan("k9-s2", &code, "transit", 1))
        .await
        .unwrap();
    assert_eq!(
        a.json()["reason"],
        "QR_REPLAYED",
        "a spent code stays spent"
    );
    let fresh = issuer.code("ed-1", "essc-k9", "essc", now_s(), 60, "jti-k9-000002");
    let a = t
        .authorize(&scan("k9-s3", &fresh, "transit", 1))
        .await
        .unwrap();
    assert_eq!(
        a.json()["decision"],
        "approve",
        "the credential leads to the new card"
    );
    let full = t
        .send(Method::GET, "/v1/denylist", &[], Vec::new())
        .await
        .unwrap()
        .json();
    assert_eq!(full["version"].as_u64(), Some(version));
    let listed: Vec<&str> = full["add"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert_eq!(listed, [lost.as_str(), old.as_str()]);
    child.kill().unwrap();
    child.wait().unwrap();
}

/// Issue 15, as found: a payment charge reversed while its batch is open
/// leaves the batch; the next event seals the rest by size, so the sealed
/// batch ends before the reversal; `kill -9` before the next batch seals.
/// After the restart the receiver must book the batch without the charge
/// and no reversal line for it: it never received the charge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_after_a_reversal_left_its_open_batch_books_no_refund_of_it() {
    const KEY: &str = "payment-signing-key-0001";
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let sink = Sink::new(&data, CLIENTS);
    // 1,024 bytes hold three short lines (about 230 bytes each, beside the
    // 256 bytes counted for the envelope) but not two and a long one
    // (about 350): the long event seals the two before it and opens the
    // next batch. Age 5 s: the kill comes long before that batch seals.
    let (r, extra) = receiver_for(
        &sink,
        KEY,
        "payment",
        "payment",
        "events_max = 100\nbytes_max = 1024\nage_max_ms = 5000\n",
    )
    .await;
    let mut child = spawn_gateway_with(dir.path(), &extra);
    let addrs = wait_ready(&mut child, dir.path());
    put_card(&addrs, &card(0), "financial").await;
    let mut conn = connect_terminal(&sink.certs, addrs.terminal, 1, Protocol::Http1).await;
    let pay = |id: &str, bill: &str| {
        json!({"event_id": id, "kind": "tap", "card_no": card(0), "scenario": "payment",
               "amount_fen": 1000, "site": "counter-1", "bill_ref": bill})
    };
    for id in ["pay-a", "pay-b", "pay-c"] {
        let a = conn.authorize(&pay(id, &id.to_uppercase())).await.unwrap();
        assert_eq!(a.json()["decision"], "approve", "{id}");
    }
    let rev = conn.reverse(&json!({"event_id": "pay-a"})).await.unwrap();
    assert_eq!(rev.json()["status"], "reversed");
    let long_id = format!("pay-d{}", "d".repeat(59));
    let long_bill = format!("BILL-D{}", "D".repeat(58));
    let d = conn.authorize(&pay(&long_id, &long_bill)).await.unwrap();
    assert_eq!(d.json()["decision"], "approve");
    // The batch of B and C is sealed (and booked) by D; D's is open.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut l = sink.ledger(r.addr).await;
    while l.batches < 1 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
        l = sink.ledger(r.addr).await;
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert_eq!(
        (l.batches, l.events, l.total_fen),
        (1, 2, 2_000),
        "B and C in the first batch, A taken out: {l:?}"
    );

    let mut child = spawn_gateway_with(dir.path(), &extra);
    wait_ready(&mut child, dir.path());
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut l = sink.ledger(r.addr).await;
    while l.batches < 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        l = sink.ledger(r.addr).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    r.stop().await;
    // B, C and D charged once each; A neither charged nor refunded.
    assert_eq!(
        (l.batches, l.events, l.total_fen, l.reversals),
        (2, 3, 3_000, 0),
        "the receiver's net must be what the terminals were told: {l:?}"
    );
}
