//! Settlement to a receiver this project did not write (issue 15):
//! `tests/receivers/strict_receiver.py`, Python's standard library only,
//! routes on the request target as `http.server` gives it (an
//! absolute-form target is `404`, as at the receiver that found the
//! defect), wants `Host`, checks signatures and sums, and refuses a charge
//! booked twice or a reversal of a charge it has not booked.
//!
//! Fares, hospital bills and reversals (some while their batch is open,
//! some after it sealed) go through the real binary, which is killed with
//! SIGKILL in the middle and started again; at the end the receiver must
//! have booked every approval exactly once, net of reversals, and the
//! gateway must have parked nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use onecard::app::server::Addrs;
use onecard::net::client::{self, Connection, Protocol};
use serde_json::{json, Value};

use crate::common::process::{spawn_gateway, wait_ready};
use crate::common::{connect_terminal, tap, TOKEN};

const KEY: &str = "strict-receiver-key-0001";
const TERMINALS: u32 = 2;

/// The Python receiver; killed on drop.
struct Receiver {
    child: Child,
    port: u16,
    ledger: PathBuf,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_receiver(dir: &Path, certs: &Path) -> Receiver {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/receivers/strict_receiver.py");
    let port_file = dir.join("strict-receiver.port");
    let ledger = dir.join("strict-ledger.jsonl");
    let mut child = Command::new("python3")
        .arg(script)
        .arg("--cert")
        .arg(certs.join(onecard::net::certs::SERVER_CERT))
        .arg("--key")
        .arg(certs.join(onecard::net::certs::SERVER_KEY))
        .args(["--hmac-key", KEY, "--lifetime-s", "300"])
        .arg("--ledger")
        .arg(&ledger)
        .arg("--port-file")
        .arg(&port_file)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("python3 runs (scripts/setup-system installs it)");
    let deadline = Instant::now() + Duration::from_secs(30);
    let port = loop {
        if let Some(p) = std::fs::read_to_string(&port_file)
            .ok()
            .and_then(|s| s.trim().parse().ok())
        {
            break p;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the strict receiver exited: {status}");
        }
        assert!(
            Instant::now() < deadline,
            "the strict receiver did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    Receiver {
        child,
        port,
        ledger,
    }
}

/// What the receiver booked net of reversals, auth_id → fen (its ledger
/// file: one line per batch, written only after the checks passed).
fn booked(ledger: &Path) -> BTreeMap<String, i64> {
    let text = std::fs::read_to_string(ledger).unwrap_or_default();
    let mut net = BTreeMap::new();
    for line in text.split_inclusive('\n').filter(|l| l.ends_with('\n')) {
        let b: Value = serde_json::from_str(line.trim_end()).unwrap();
        for e in b["events"].as_array().unwrap() {
            match e["type"].as_str().unwrap() {
                "charge" => {
                    let prior = net.insert(
                        e["auth_id"].as_str().unwrap().to_owned(),
                        e["amount_fen"].as_i64().unwrap(),
                    );
                    assert!(prior.is_none(), "a charge booked twice: {e}");
                }
                _ => {
                    let of = e["reverses"].as_str().unwrap();
                    assert!(
                        net.remove(of).is_some(),
                        "the receiver let through a reversal of {of}"
                    );
                }
            }
        }
    }
    net
}

async fn terminals(addrs: &Addrs, certs: &Path) -> Vec<Connection> {
    let mut out = Vec::new();
    for n in 1..=TERMINALS {
        out.push(connect_terminal(certs, addrs.terminal, n, Protocol::Http1).await);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_strict_independent_receiver_books_every_approval_once_through_a_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let certs = data.join("certs");
    onecard::net::certs::generate(&certs, TERMINALS).unwrap();
    let receiver = start_receiver(dir.path(), &certs);
    let mut extra = String::new();
    for (name, scenario) in [("transport", "transit"), ("medical", "medical")] {
        // Small batches sealed by count and by age, four sends at a time:
        // reversals land both in open batches and after their batch.
        extra.push_str(&format!(
            "[[settlement.sinks]]\nname = \"{name}\"\nurl = \"https://127.0.0.1:{}/v1/batches\"\nca = {:?}\nscenarios = [\"{scenario}\"]\nkey = \"{KEY}\"\nevents_max = 3\nage_max_ms = 150\nconcurrency = 4\nattempts_max = 3\nbackoff_base_ms = 10\nbackoff_max_ms = 50\n",
            receiver.port,
            certs.join(onecard::net::certs::CA_CERT)
        ));
    }
    let mut child = spawn_gateway(dir.path(), TERMINALS, &extra);
    let mut addrs = wait_ready(&mut child, dir.path());
    for i in 0..4 {
        let a = client::admin(
            addrs.admin,
            Some(TOKEN),
            Method::PUT,
            &format!("/admin/v1/cards/500118S{i:08}"),
            Some(&json!({"status": "active", "functions": ["transit", "medical"]})),
        )
        .await
        .unwrap();
        assert_eq!(a.status, StatusCode::OK);
    }
    let mut conns = terminals(&addrs, &certs).await;
    let mut expected: BTreeMap<String, i64> = BTreeMap::new();
    let mut reversed = BTreeSet::new();
    let mut sent: Vec<(usize, String, String)> = Vec::new();
    for i in 0..60usize {
        if i == 30 {
            // Killed once delivery is under way, whatever it has reached.
            let deadline = Instant::now() + Duration::from_secs(30);
            while booked(&receiver.ledger).is_empty() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            child.kill().unwrap(); // SIGKILL
            child.wait().unwrap();
            child = spawn_gateway(dir.path(), TERMINALS, &extra);
            addrs = wait_ready(&mut child, dir.path());
            conns = terminals(&addrs, &certs).await;
        }
        let t = i % TERMINALS as usize;
        let (scenario, fen) = if i % 3 == 0 {
            ("medical", 1_000 + 100 * i as i64)
        } else {
            ("transit", 200 + i as i64)
        };
        let id = format!("strict-{i}");
        let card = format!("500118S{:08}", i % 4);
        let mut body = tap(&id, &card, scenario, fen);
        body["site"] = format!("site-{i}").into();
        let a = conns[t].authorize(&body).await.unwrap();
        let v = a.json();
        assert_eq!(v["decision"], "approve", "{v}");
        let auth = v["auth_id"].as_str().unwrap().to_owned();
        expected.insert(auth.clone(), fen);
        sent.push((t, id, auth));
        // Every fifth event is reversed at once (its batch still open);
        // every seventh, one sent a while ago (its batch sealed, maybe
        // booked).
        let target = match i {
            _ if i % 5 == 4 => Some(sent.len() - 1),
            _ if i % 7 == 6 && sent.len() > 6 => Some(sent.len() - 6),
            _ => None,
        };
        if let Some(k) = target.filter(|k| !reversed.contains(&sent[*k].2)) {
            let (t, id, auth) = sent[k].clone();
            let r = conns[t].reverse(&json!({"event_id": id})).await.unwrap();
            assert_eq!(r.json()["status"], "reversed", "{}", r.json());
            reversed.insert(auth.clone());
            expected.remove(&auth);
        }
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut got = booked(&receiver.ledger);
    while got != expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        got = booked(&receiver.ledger);
    }
    let status = client::admin(
        addrs.admin,
        Some(TOKEN),
        Method::GET,
        "/admin/v1/settlement",
        None,
    )
    .await
    .unwrap()
    .json();
    let _ = child.kill();
    let _ = child.wait();
    for s in status["sinks"].as_array().unwrap() {
        assert_eq!(s["parked"], 0, "nothing parked: {status}");
    }
    assert_eq!(
        (got.len(), got.values().sum::<i64>()),
        (expected.len(), expected.values().sum::<i64>()),
        "booked vs approved and not reversed; settlement {status}"
    );
    assert_eq!(got, expected);
    assert!(!reversed.is_empty());
}
