//! The demo: a handful of cards set up through the admin API and tapped over
//! real mTLS, one of each outcome, with the decision and latency printed.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Instant;

use http::{Method, StatusCode};
use serde_json::json;

use crate::certs;
use crate::client::{self, Protocol};
use crate::model::mask_card_no;

struct Step {
    what: &'static str,
    card_no: &'static str,
    scenario: &'static str,
    amount_fen: i64,
}

const STEPS: &[Step] = &[
    Step {
        what: "bus fare, active card",
        card_no: "500118D000000001",
        scenario: "transit",
        amount_fen: 200,
    },
    Step {
        what: "reported lost, deny-listed",
        card_no: "500118D000000002",
        scenario: "transit",
        amount_fen: 200,
    },
    Step {
        what: "card status lost",
        card_no: "500118D000000003",
        scenario: "transit",
        amount_fen: 200,
    },
    Step {
        what: "unknown card",
        card_no: "500118D000000099",
        scenario: "transit",
        amount_fen: 200,
    },
    Step {
        what: "hospital bill, medical not enabled",
        card_no: "500118D000000004",
        scenario: "medical",
        amount_fen: 5_000,
    },
    Step {
        what: "bill over the per-payment limit",
        card_no: "500118D000000001",
        scenario: "payment",
        amount_fen: 900_000,
    },
    Step {
        what: "community door, no charge",
        card_no: "500118D000000001",
        scenario: "access",
        amount_fen: 0,
    },
];

/// Sets up the demo cards and taps them; prints one line per tap. Returns
/// the decisions in order as `decision/reason`.
pub async fn run(
    admin: SocketAddr,
    terminal: SocketAddr,
    certs_dir: &Path,
    token: &str,
) -> anyhow::Result<Vec<String>> {
    let cards = [
        (
            "500118D000000001",
            json!({"status": "active", "functions": ["transit", "medical", "financial"], "concessions": []}),
        ),
        (
            "500118D000000002",
            json!({"status": "active", "functions": ["transit"]}),
        ),
        (
            "500118D000000003",
            json!({"status": "lost", "functions": ["transit"]}),
        ),
        (
            "500118D000000004",
            json!({"status": "active", "functions": ["transit"], "concessions": ["elderly"]}),
        ),
    ];
    for (card, body) in &cards {
        let a = client::admin(
            admin,
            Some(token),
            Method::PUT,
            &format!("/admin/v1/cards/{card}"),
            Some(body),
        )
        .await?;
        anyhow::ensure!(
            a.status == StatusCode::OK,
            "creating a demo card: {} {}",
            a.status,
            String::from_utf8_lossy(&a.body)
        );
    }
    let a = client::admin(
        admin,
        Some(token),
        Method::PUT,
        "/admin/v1/denylist/500118D000000002",
        Some(&json!({"reason": "lost"})),
    )
    .await?;
    anyhow::ensure!(
        a.status == StatusCode::OK,
        "deny-listing a demo card: {}",
        a.status
    );

    let id = certs::terminal_id(1);
    let mut conn = client::connect_terminal(terminal, Some(certs_dir), 1, Protocol::Http2).await?;
    println!("demo: terminal {id} connected over mTLS (HTTP/2) to {terminal}");
    let run_id = crate::clock::now_ms();
    let mut out = Vec::new();
    for (i, s) in STEPS.iter().enumerate() {
        let mut body = json!({
            "event_id": format!("demo-{run_id}-{i}"),
            "kind": "tap",
            "card_no": s.card_no,
            "scenario": s.scenario,
            "site": "demo-gate-1",
        });
        if s.amount_fen > 0 {
            body["amount_fen"] = json!(s.amount_fen);
        }
        let t = Instant::now();
        let a = conn.authorize(&body).await?;
        let us = t.elapsed().as_micros();
        let v = a.json();
        let line = format!(
            "{}/{}",
            v["decision"].as_str().unwrap_or("?"),
            v["reason"].as_str().unwrap_or("?")
        );
        println!(
            "demo: {:<36} card {}  {:<9} {:<8} {:>7} fen  -> {:<7} {:<21} {:>6.2} ms",
            s.what,
            mask_card_no(s.card_no),
            s.scenario,
            a.status.as_str(),
            s.amount_fen,
            v["decision"].as_str().unwrap_or("-"),
            v["reason"]
                .as_str()
                .or(v["error"]["code"].as_str())
                .unwrap_or("-"),
            us as f64 / 1000.0
        );
        out.push(line);
    }
    Ok(out)
}

/// Settlement, shown: a bus fare and a hospital bill settle to their
/// receivers, a second fare is reversed before its batch seals and never
/// reaches the receiver; then each sink's status and today's report.
pub async fn settlement(
    admin: SocketAddr,
    terminal: SocketAddr,
    certs_dir: &Path,
    token: &str,
) -> anyhow::Result<()> {
    let card = "500118D000000001";
    let mut conn = client::connect_terminal(terminal, Some(certs_dir), 1, Protocol::Http1).await?;
    let run_id = crate::clock::now_ms();
    let tap = |n: u32, scenario: &str, fen: i64| {
        json!({"event_id": format!("demo-settle-{run_id}-{n}"), "kind": "tap", "card_no": card,
               "scenario": scenario, "amount_fen": fen, "site": "demo-line-1"})
    };
    for (n, scenario, fen) in [
        (1, "transit", 200),
        (2, "medical", 3_500),
        (3, "transit", 200),
    ] {
        let v = conn.authorize(&tap(n, scenario, fen)).await?.json();
        println!(
            "demo: settle {scenario:<8} {fen:>6} fen -> {}",
            v["decision"].as_str().unwrap_or("-")
        );
    }
    let event_id = format!("demo-settle-{run_id}-3");
    let v = conn.reverse(&json!({"event_id": event_id})).await?.json();
    println!(
        "demo: the terminal reverses its second fare (it never saw the answer) -> {} {} fen",
        v["status"].as_str().unwrap_or("-"),
        v["amount_fen"]
    );
    // Batches seal by age (1 s by default): wait until the report shows the
    // fare and the bill acknowledged, at most 10 s.
    let today = time::OffsetDateTime::now_utc()
        .to_offset(time::UtcOffset::from_hms(8, 0, 0).expect("a valid offset"))
        .date();
    let day = format!(
        "{:04}-{:02}-{:02}",
        today.year(),
        u8::from(today.month()),
        today.day()
    );
    let deadline = Instant::now() + std::time::Duration::from_secs(10);
    let report = loop {
        let r = client::admin(
            admin,
            Some(token),
            Method::GET,
            &format!("/admin/v1/settlement/report/{day}"),
            None,
        )
        .await?
        .json();
        let acked = |sink: &str| {
            r["sinks"].as_array().is_some_and(|a| {
                a.iter().any(|x| {
                    x["sink"] == sink && x["acknowledged"]["charges"].as_u64().unwrap_or(0) > 0
                })
            })
        };
        if (acked("transport") && acked("medical")) || Instant::now() > deadline {
            break r;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    let status = client::admin(
        admin,
        Some(token),
        Method::GET,
        "/admin/v1/settlement",
        None,
    )
    .await?
    .json();
    for x in status["sinks"].as_array().into_iter().flatten() {
        println!(
            "demo: sink {:<9} circuit {:<6} backlog {} events, last acknowledgement {}",
            x["sink"].as_str().unwrap_or("-"),
            x["circuit"].as_str().unwrap_or("-"),
            x["backlog_events"],
            x["last_ack_ms"]
        );
    }
    for x in report["sinks"].as_array().into_iter().flatten() {
        println!(
            "demo: report {day} {:<9} acknowledged {} charges, {} reversals, net {} fen",
            x["sink"].as_str().unwrap_or("-"),
            x["acknowledged"]["charges"],
            x["acknowledged"]["reversals"],
            x["acknowledged"]["net_fen"]
        );
    }
    Ok(())
}
