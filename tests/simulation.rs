//! A seeded simulation of settlement: approvals, declines, retries,
//! reversals (of sealed and unsealed events, and of events not seen yet),
//! gateway restarts (clean and `kill -9` of the real binary) and receiver
//! misbehaviour (failures, slowness, answers lost after booking, wrong
//! totals, absences, restarts), interleaved as a seed says. At the end, for
//! every sink, the events the receiver booked net of reversals must be
//! exactly the approved, charged, not reversed events of that sink, each
//! booked once, with the same totals.
//!
//! The plan (which operation, on which terminal, card, amount, when) is a
//! function of the seed alone; the timing of delivery is not, and the
//! invariant must hold whatever it is. Seeds: `ONECARD_SIM_SEEDS` (how
//! many, from 1; default 40) or `ONECARD_SIM_SEED` (one, to replay a
//! failure). Each seed is printed before it runs, so a failing one is
//! named in the test's output.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::process::{spawn_gateway, wait_ready};
use common::sink::Sink;
use common::{connect_terminal, TOKEN};
use http::{Method, StatusCode};
use onecard::client::{self, Answer, Connection, Protocol};
use onecard::rng::Rng;
use onecard::server::Addrs;
use onecard::settle::receiver::Running;
use onecard::settle::sign::{Algorithm, Signer};
use serde_json::{json, Value};

const KEY: &str = "simulation-signing-key-0001";
const TERMINALS: u32 = 2;
const CARDS: u64 = 5;
const STEPS: u64 = 80;

fn card(i: u64) -> String {
    format!("500118M{i:08}")
}

/// The sink that settles a scenario, if any.
fn sink_of(scenario: &str) -> Option<&'static str> {
    match scenario {
        "transit" => Some("transport"),
        "medical" => Some("medical"),
        _ => None,
    }
}

/// One event a terminal sent, as the test remembers it.
struct Sent {
    terminal: u32,
    event_id: String,
    body: Value,
    answer: Vec<u8>,
}

/// What the gateway's answers say the receiver must end up with.
#[derive(Default)]
struct Model {
    events: Vec<Sent>,
    /// (terminal, event_id) reversed before the gateway saw the event.
    tombstoned: BTreeSet<(u32, String)>,
    /// auth_id → (sink, fen) of approved, charged events.
    charged: BTreeMap<String, (&'static str, i64)>,
    reversed: BTreeSet<String>,
    /// The first answer to each reversal: a reversal sent again replays it.
    reversal_answers: BTreeMap<(u32, String), Vec<u8>>,
    next_event: u64,
    /// What happened, for the seed's summary line.
    restarts: u32,
    kills: u32,
    faults: u32,
}

impl Model {
    fn expected(&self) -> BTreeMap<&'static str, BTreeMap<String, i64>> {
        let mut out: BTreeMap<&'static str, BTreeMap<String, i64>> = BTreeMap::new();
        for (auth, (sink, fen)) in &self.charged {
            if !self.reversed.contains(auth) {
                out.entry(sink).or_default().insert(auth.clone(), *fen);
            }
        }
        out
    }
}

struct Gateway {
    /// Killed on drop, so a failing seed leaves no gateway running.
    child: Child,
    addrs: Addrs,
    conns: Vec<Connection>,
}

async fn start_gateway(dir: &Path, extra: &str) -> Gateway {
    let mut child = spawn_gateway(dir, TERMINALS, extra);
    let addrs = wait_ready(&mut child, dir);
    let certs = dir.join("data").join("certs");
    let mut conns = Vec::new();
    for n in 1..=TERMINALS {
        conns.push(connect_terminal(&certs, addrs.terminal, n, Protocol::Http1).await);
    }
    Gateway {
        child,
        addrs,
        conns,
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Gateway {
    fn stop(mut self, kill: bool) {
        if kill {
            self.child.kill().unwrap(); // SIGKILL
        } else {
            let pid = self.child.id().to_string();
            Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        }
        self.child.wait().unwrap();
    }

    async fn admin(&self, method: Method, path: &str, body: Option<Value>) -> Answer {
        client::admin(self.addrs.admin, Some(TOKEN), method, path, body.as_ref())
            .await
            .unwrap()
    }

    async fn send(&mut self, terminal: u32, path: &str, body: &Value) -> Answer {
        let conn = &mut self.conns[terminal as usize - 1];
        let a = match path {
            "/v1/reverse" => conn.reverse(body).await,
            _ => conn.authorize(body).await,
        }
        .unwrap();
        assert_eq!(
            a.status,
            StatusCode::OK,
            "{path} {body}: {}",
            String::from_utf8_lossy(&a.body)
        );
        a
    }
}

fn tap(event_id: &str, card_no: &str, scenario: &str, fen: i64) -> Value {
    json!({"event_id": event_id, "kind": "tap", "card_no": card_no, "scenario": scenario,
           "amount_fen": fen, "site": format!("site-{}", fen % 3)})
}

/// What the receiver booked, per sink, net of reversals (auth_id → fen),
/// and the reversals whose charge it has not booked (yet: with several
/// batches in flight, or one parked until an operator replays it, a
/// reversal line may be booked before its charge); panics if anything was
/// booked twice.
fn booked(ledger: &Path) -> (BTreeMap<String, BTreeMap<String, i64>>, Vec<String>) {
    let text = std::fs::read_to_string(ledger).unwrap_or_default();
    let mut charges: BTreeMap<String, BTreeMap<String, i64>> = BTreeMap::new();
    let mut reversals: Vec<(String, String, i64)> = Vec::new();
    // The receiver may be appending a line as this reads: a last line
    // without its newline is not booked yet (it is read next time).
    for line in text.split_inclusive('\n').filter(|l| l.ends_with('\n')) {
        let b: Value = serde_json::from_str(line.trim_end()).unwrap();
        let batch = b["ack"]["batch_id"].as_str().unwrap();
        let sink = batch.split('-').next().unwrap().to_owned();
        for e in b["events"].as_array().unwrap() {
            let fen = e["amount_fen"].as_i64().unwrap();
            let auth = e["auth_id"].as_str().unwrap().to_owned();
            match e["type"].as_str().unwrap() {
                "charge" => {
                    let prior = charges.entry(sink.clone()).or_default().insert(auth, fen);
                    assert!(prior.is_none(), "a charge booked twice in {batch}");
                }
                "reversal" => {
                    let target = e["reverses"].as_str().unwrap().to_owned();
                    assert!(
                        !reversals.iter().any(|r| r.1 == target),
                        "a reversal booked twice in {batch}"
                    );
                    reversals.push((sink.clone(), target, -fen));
                }
                other => panic!("unknown line type {other}"),
            }
        }
    }
    let mut unmatched = Vec::new();
    for (sink, target, fen) in reversals {
        match charges.get_mut(&sink).and_then(|c| c.remove(&target)) {
            Some(charged) => assert_eq!(charged, fen, "a reversal of another amount in {sink}"),
            None => unmatched.push(format!("{sink}: reversal of {target}")),
        }
    }
    charges.retain(|_, c| !c.is_empty());
    (charges, unmatched)
}

async fn run(seed: u64) {
    let mut rng = Rng::new(seed);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let sink = Sink::new(&data, TERMINALS);
    let signer = || Signer::new(Algorithm::HmacSha256, KEY.as_bytes().to_vec());
    let mut receiver: Option<Running> =
        Some(sink.start("127.0.0.1:0".parse().unwrap(), signer()).await);
    let raddr: SocketAddr = receiver.as_ref().unwrap().addr;
    let mut extra = String::from("[policy]\ncard_daily_spend_max_fen = 3000\n");
    for (name, scenario) in [("transport", "transit"), ("medical", "medical")] {
        extra.push_str(&format!(
            "[[settlement.sinks]]\nname = \"{name}\"\nurl = \"https://127.0.0.1:{}/v1/batches\"\nca = {:?}\nscenarios = [\"{scenario}\"]\nkey = \"{KEY}\"\nevents_max = {}\nage_max_ms = {}\ntimeout_ms = 500\nattempts_max = 4\nbackoff_base_ms = 10\nbackoff_max_ms = 100\ncircuit_failures = 3\ncircuit_pause_ms = 100\n",
            raddr.port(),
            sink.certs.join(onecard::certs::CA_CERT),
            2 + rng.below(5),
            20 + rng.below(200),
        ));
    }
    let mut gw = start_gateway(dir.path(), &extra).await;
    for i in 0..CARDS {
        let status = if i == CARDS - 1 { "frozen" } else { "active" };
        let a = gw
            .admin(
                Method::PUT,
                &format!("/admin/v1/cards/{}", card(i)),
                Some(json!({"status": status, "functions": ["transit", "medical"]})),
            )
            .await;
        assert_eq!(a.status, StatusCode::OK);
    }

    let mut m = Model::default();
    for step in 0..STEPS {
        let roll = rng.below(100);
        match roll {
            // A new tap: a fare, a hospital bill or a door; now and then
            // one whose reversal came first.
            0..=54 => {
                let terminal = 1 + rng.below(u64::from(TERMINALS)) as u32;
                let scenario = ["transit", "transit", "medical", "access"][rng.below(4) as usize];
                let fen = if scenario == "access" {
                    0
                } else {
                    100 * (1 + rng.below(6) as i64)
                };
                let card_no = card(rng.below(CARDS));
                let late = m
                    .tombstoned
                    .iter()
                    .find(|(t, _)| *t == terminal)
                    .cloned()
                    .filter(|_| rng.below(2) == 0);
                let event_id = match &late {
                    Some((_, id)) => id.clone(),
                    None => {
                        m.next_event += 1;
                        format!("ev-{}", m.next_event)
                    }
                };
                let body = tap(&event_id, &card_no, scenario, fen);
                let a = gw.send(terminal, "/v1/authorize", &body).await;
                let v = a.json();
                if let Some(key) = late {
                    m.tombstoned.remove(&key);
                    assert_eq!(
                        (v["decision"].as_str(), v["reason"].as_str()),
                        (Some("decline"), Some("REVERSED")),
                        "step {step}: an event reversed before it arrived"
                    );
                }
                let charged = v["amount_fen"].as_i64().unwrap();
                if v["decision"] == "approve" && charged > 0 {
                    let s = sink_of(scenario).expect("only settled scenarios charge");
                    m.charged
                        .insert(v["auth_id"].as_str().unwrap().to_owned(), (s, charged));
                }
                m.events.push(Sent {
                    terminal,
                    event_id,
                    body,
                    answer: a.body.to_vec(),
                });
            }
            // A retry of an earlier event: the first answer again.
            55..=62 if !m.events.is_empty() => {
                let e = &m.events[rng.below(m.events.len() as u64) as usize];
                let (terminal, body, first) = (e.terminal, e.body.clone(), e.answer.clone());
                let a = gw.send(terminal, "/v1/authorize", &body).await;
                assert_eq!(
                    a.body.to_vec(),
                    first,
                    "step {step}: a retry changed the answer"
                );
            }
            // A reversal of an earlier event (sealed or not, approved or not).
            63..=74 if !m.events.is_empty() => {
                let e = &m.events[rng.below(m.events.len() as u64) as usize];
                let original: Value = serde_json::from_slice(&e.answer).unwrap();
                let terminal = e.terminal;
                let key = (terminal, e.event_id.clone());
                let body = json!({"event_id": e.event_id});
                let a = gw.send(terminal, "/v1/reverse", &body).await;
                if let Some(first) = m.reversal_answers.get(&key) {
                    assert_eq!(
                        &a.body.to_vec(),
                        first,
                        "step {step}: a reversal sent again"
                    );
                    continue;
                }
                m.reversal_answers.insert(key, a.body.to_vec());
                let v = a.json();
                let auth = original["auth_id"].as_str().unwrap().to_owned();
                let charged = original["decision"] == "approve"
                    && original["amount_fen"].as_i64().unwrap() > 0;
                let want = if charged { "reversed" } else { "not_charged" };
                assert_eq!(v["status"], want, "step {step}: reversal of {original}");
                assert_eq!(v["auth_id"], original["auth_id"]);
                if charged {
                    m.reversed.insert(auth);
                }
            }
            // A reversal of an event the gateway has not seen (yet).
            75..=78 => {
                let terminal = 1 + rng.below(u64::from(TERMINALS)) as u32;
                m.next_event += 1;
                let event_id = format!("ev-{}", m.next_event);
                let a = gw
                    .send(terminal, "/v1/reverse", &json!({"event_id": event_id}))
                    .await;
                assert_eq!(a.json()["status"], "unknown_event", "step {step}");
                m.reversal_answers
                    .insert((terminal, event_id.clone()), a.body.to_vec());
                m.tombstoned.insert((terminal, event_id));
            }
            // The gateway stops, cleanly or by SIGKILL, and starts again.
            79..=85 => {
                let kill = roll >= 82;
                if kill {
                    m.kills += 1;
                } else {
                    m.restarts += 1;
                }
                gw.stop(kill);
                gw = start_gateway(dir.path(), &extra).await;
            }
            // The receiver misbehaves.
            86..=95 => {
                let how = match rng.below(5) {
                    0 => json!({"fail": 1 + rng.below(4)}),
                    1 => json!({"drop_after_booking": 1 + rng.below(3)}),
                    2 => json!({"delay_ms": 50 + rng.below(150)}),
                    3 => json!({"away_ms": 200 + rng.below(400)}),
                    _ => json!({"wrong_total": 1}),
                };
                if receiver.is_some() {
                    m.faults += 1;
                    sink.misbehave(raddr, how).await;
                }
            }
            // The receiver goes down, or comes back on the same address
            // with its ledger.
            _ => match receiver.take() {
                Some(r) => r.stop().await,
                None => receiver = Some(sink.start(raddr, signer()).await),
            },
        }
    }

    // The receiver is back and behaves; operators replay what was parked
    // (wrong totals); everything drains.
    if receiver.is_none() {
        receiver = Some(sink.start(raddr, signer()).await);
    }
    sink.misbehave(raddr, json!({})).await;
    let expected: BTreeMap<String, BTreeMap<String, i64>> = m
        .expected()
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(90);
    let (mut got, mut unmatched) = booked(&sink.ledger_file);
    while (got != expected || !unmatched.is_empty()) && Instant::now() < deadline {
        for s in ["transport", "medical"] {
            gw.admin(
                Method::POST,
                &format!("/admin/v1/settlement/replay/{s}"),
                None,
            )
            .await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        (got, unmatched) = booked(&sink.ledger_file);
    }
    let status = gw
        .admin(Method::GET, "/admin/v1/settlement", None)
        .await
        .json();
    gw.stop(false);
    receiver.unwrap().stop().await;
    let total = |x: &BTreeMap<String, BTreeMap<String, i64>>| -> Vec<(String, usize, i64)> {
        x.iter()
            .map(|(s, e)| (s.clone(), e.len(), e.values().sum()))
            .collect()
    };
    assert_eq!(
        total(&got),
        total(&expected),
        "seed {seed}: (sink, events, fen) booked vs approved and not reversed; settlement status {status}"
    );
    assert_eq!(got, expected, "seed {seed}: the booked events differ");
    assert!(
        unmatched.is_empty(),
        "seed {seed}: reversals booked without their charge: {unmatched:?}"
    );
    eprintln!(
        "simulation seed {seed}: {} events, {} charged, {} reversed, {} clean restarts, {} kills, {} receiver faults; booked {:?}",
        m.events.len(),
        m.charged.len(),
        m.reversed.len(),
        m.restarts,
        m.kills,
        m.faults,
        total(&got)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settlement_books_exactly_the_approved_and_not_reversed_events() {
    let seeds: Vec<u64> = match std::env::var("ONECARD_SIM_SEED") {
        Ok(s) => vec![s.parse().expect("ONECARD_SIM_SEED is a number")],
        Err(_) => {
            let n = std::env::var("ONECARD_SIM_SEEDS")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(40);
            (1..=n).collect()
        }
    };
    for seed in seeds {
        eprintln!("simulation seed {seed} (replay with ONECARD_SIM_SEED={seed})");
        let started = Instant::now();
        run(seed).await;
        eprintln!(
            "simulation seed {seed}: passed in {:.1} s",
            started.elapsed().as_secs_f64()
        );
    }
}
