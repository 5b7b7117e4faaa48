//! Complaints over real sockets: a hotline agent files one on a wrong
//! charge, the complaint goes to the transit bureau and shows where the
//! charge stands in settlement; an operator closes it with a refund, whose
//! reversal line a real receiver books; the agent's own limits, the
//! list per unit and its gauges, and the audit.

use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use onecard::config::{Role, SinkConfig, TokenConfig};
use onecard::net::client::{self, Answer, Protocol};
use serde_json::{json, Value};

use onecard_core::settle::sign::{Algorithm, Signer};

use crate::common::sink::Sink;
use crate::common::{decision, error_code, tap, TestGateway};

const KEY: &str = "transport-signing-key-0001";
const AGENT: &str = "agent-token-12345-0002";
const CARD: &str = "500118C00000001";

async fn as_agent(gw: &TestGateway, method: Method, path: &str, body: Option<Value>) -> Answer {
    client::admin(gw.admin_addr(), Some(AGENT), method, path, body.as_ref())
        .await
        .unwrap()
}

fn ok(a: &Answer) -> Value {
    assert_eq!(
        a.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&a.body)
    );
    a.json()
}

/// The receiver's booked lines, in order.
fn ledger_lines(sink: &Sink) -> Vec<Value> {
    std::fs::read_to_string(&sink.ledger_file)
        .unwrap_or_default()
        .lines()
        .flat_map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            v["events"].as_array().unwrap().clone()
        })
        .collect()
}

/// Waits (up to 60 s: far beyond what a loaded machine needs) until the
/// receiver has booked `n` lines.
async fn booked(sink: &Sink, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let lines = ledger_lines(sink);
        if lines.len() >= n || Instant::now() > deadline {
            return lines;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_charge_is_refunded_through_a_reversal_the_receiver_books() {
    let dir = tempfile::tempdir().unwrap();
    let sink = Sink::new(dir.path(), 3);
    let r = sink
        .start(
            "127.0.0.1:0".parse().unwrap(),
            Signer::new(Algorithm::HmacSha256, KEY.as_bytes().to_vec()),
        )
        .await;
    let mut config = crate::common::test_config(dir.path());
    config.settlement.sinks = vec![toml::from_str::<SinkConfig>(&format!(
        r#"
        name = "transport"
        url = "https://127.0.0.1:{}/v1/batches"
        ca = "{}"
        scenarios = ["transit"]
        key = "{KEY}"
        events_max = 2
        age_max_ms = 200
        backoff_base_ms = 10
        backoff_max_ms = 100
        "#,
        r.addr.port(),
        sink.certs.join(onecard::net::certs::CA_CERT).display()
    ))
    .unwrap()];
    config.admin.tokens.push(TokenConfig {
        name: "hotline-12345".into(),
        role: Role::Agent,
        token: Some(AGENT.into()),
        token_env: None,
    });
    let gw = TestGateway::start_in(dir, config).await;
    gw.put_card(CARD, json!({"status": "active", "functions": ["transit"]}))
        .await;
    let mut t = gw.terminal(1, Protocol::Http1).await;
    let mut auth = Vec::new();
    for (id, fen) in [("ride-1", 200), ("ride-2", 300)] {
        let a = t.authorize(&tap(id, CARD, "transit", fen)).await.unwrap();
        assert_eq!(decision(&a), ("approve".into(), "OK".into()));
        auth.push(a.json()["auth_id"].as_str().unwrap().to_owned());
    }
    assert_eq!(booked(&sink, 2).await.len(), 2);

    // The resident calls: the second ride was charged wrongly.
    let filing = json!({
        "request_id": "12345/2026-12-07/0042",
        "card_no": CARD,
        "auth_id": auth[1],
        "category": "wrong_charge",
        "says": "charged 3 yuan on a 2 yuan line",
    });
    let v = ok(&as_agent(
        &gw,
        Method::POST,
        "/admin/v1/complaints",
        Some(filing.clone()),
    )
    .await);
    let id = v["id"].as_str().unwrap().to_owned();
    assert_eq!(
        v["unit"], "区交通局",
        "the transit bureau answers for a fare"
    );
    assert_eq!(v["state"], "open");
    assert_eq!(v["transaction"]["charged_fen"], 300);
    assert_eq!(v["transaction"]["event_id"], "ride-2");
    let settled = v["transaction_now"]["settlement"].as_str().unwrap();
    assert!(matches!(settled, "sent" | "acknowledged"), "{settled}");
    assert_eq!(v["transaction_now"]["reversal"], Value::Null);
    // The same filing again is the same complaint; another body is not.
    let again = ok(&as_agent(
        &gw,
        Method::POST,
        "/admin/v1/complaints",
        Some(filing.clone()),
    )
    .await);
    assert_eq!(
        (again["id"].as_str(), again["changed"].as_bool()),
        (Some(id.as_str()), Some(false))
    );
    let mut other = filing.clone();
    other["says"] = json!("something else");
    let a = as_agent(&gw, Method::POST, "/admin/v1/complaints", Some(other)).await;
    assert_eq!(error_code(&a), "IDEMPOTENCY_CONFLICT");
    // A transaction the card does not have is not found.
    let mut stray = filing.clone();
    stray["request_id"] = json!("12345/2026-12-07/0043");
    stray["auth_id"] = json!("0000000000000000ffff");
    let a = as_agent(&gw, Method::POST, "/admin/v1/complaints", Some(stray)).await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);

    // The agent notes what was found, but cannot refund: money moves on
    // an operator's word.
    let path = |what: &str| format!("/admin/v1/complaints/{id}{what}");
    ok(&as_agent(
        &gw,
        Method::POST,
        &path("/notes"),
        Some(json!({"note": "line 12 is a 2 yuan flat fare"})),
    )
    .await);
    let refund = json!({"outcome": "refund", "note": "the 3 yuan charge is given back"});
    let a = as_agent(&gw, Method::POST, &path("/close"), Some(refund.clone())).await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);

    let v = gw
        .admin_ok(Method::POST, &path("/close"), Some(refund.clone()))
        .await;
    assert_eq!(v["state"], "closed");
    assert_eq!(v["closing"]["outcome"], "refund");
    assert_eq!(v["closing"]["reversal"]["status"], "reversed");
    assert_eq!(
        v["transaction_now"]["reversal"]["charged_fen"]
            .as_i64()
            .map(i64::abs),
        Some(300)
    );
    assert!(
        v["transaction_now"]["reversal"]["auth_id"].is_string(),
        "{v}"
    );
    let steps: Vec<&str> = v["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["step"].as_str().unwrap())
        .collect();
    assert_eq!(steps, ["file", "note", "close"]);
    // The receiver books the reversal line against the ride.
    let lines = booked(&sink, 3).await;
    let rev = lines
        .iter()
        .find(|l| l["type"] == "reversal")
        .unwrap_or_else(|| panic!("no reversal booked: {lines:?}"));
    assert_eq!(rev["amount_fen"], -300);
    assert_eq!(rev["reverses"], auth[1].as_str());
    // Closed stays closed: the same close changes nothing, another is
    // refused, and a second complaint cannot refund the ride again.
    let v = gw
        .admin_ok(Method::POST, &path("/close"), Some(refund))
        .await;
    assert_eq!(v["changed"], false);
    let a = gw
        .admin(
            Method::POST,
            &path("/close"),
            Some(json!({"outcome": "explanation", "note": "x"})),
        )
        .await;
    assert_eq!(a.status, StatusCode::CONFLICT);
    let mut twice = filing.clone();
    twice["request_id"] = json!("12345/2026-12-07/0044");
    let second = ok(&as_agent(&gw, Method::POST, "/admin/v1/complaints", Some(twice)).await);
    let a = gw
        .admin(
            Method::POST,
            &format!(
                "/admin/v1/complaints/{}/close",
                second["id"].as_str().unwrap()
            ),
            Some(json!({"outcome": "refund", "note": "again"})),
        )
        .await;
    assert_eq!(a.status, StatusCode::CONFLICT);
    assert!(a.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("reversed already"));

    // A lost card is the issuer's; a referral names who takes it over.
    let lost = ok(&as_agent(
        &gw,
        Method::POST,
        "/admin/v1/complaints",
        Some(json!({"request_id": "12345/2026-12-07/0045", "card_no": CARD, "category": "service", "says": "waited an hour at the hall"})),
    )
    .await);
    assert_eq!(lost["unit"], "区人力社保局");
    let lost_id = lost["id"].as_str().unwrap();
    let a = as_agent(
        &gw,
        Method::POST,
        &format!("/admin/v1/complaints/{lost_id}/close"),
        Some(json!({"outcome": "referral", "note": "to the hall"})),
    )
    .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);

    // Open per unit, with their age, in the list and the gauges.
    let open = ok(&as_agent(&gw, Method::GET, "/admin/v1/complaints?state=open", None).await);
    assert_eq!(open["complaints"].as_array().unwrap().len(), 2, "{open}");
    let unit = |u: &str| {
        open["by_unit"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["unit"] == u)
            .map(|e| e["open"].as_u64().unwrap())
    };
    assert_eq!(
        (unit("区交通局"), unit("区人力社保局"), unit("区医保局")),
        (Some(1), Some(1), Some(0))
    );
    let transit = ok(&as_agent(
        &gw,
        Method::GET,
        "/admin/v1/complaints?unit=%E5%8C%BA%E4%BA%A4%E9%80%9A%E5%B1%80",
        None,
    )
    .await);
    assert_eq!(
        transit["complaints"].as_array().unwrap().len(),
        2,
        "one closed, one open: {transit}"
    );
    let metrics =
        String::from_utf8_lossy(&gw.admin(Method::GET, "/metrics", None).await.body).into_owned();
    assert!(
        metrics.contains("onecard_complaints_open{unit=\"区交通局\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("onecard_complaints_closed_total{outcome=\"refund\"} 1"),
        "{metrics}"
    );

    let audit = gw
        .admin_ok(Method::GET, "/admin/v1/audit?limit=100", None)
        .await;
    let who: Vec<&str> = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "complaint")
        .map(|e| e["who"].as_str().unwrap())
        .collect();
    // Filed three times, a note, a close: what changed, never a refusal.
    assert_eq!(who.len(), 5, "{audit}");
    assert!(who.contains(&"admin") && who.contains(&"hotline-12345"));
    drop(t);
    gw.shutdown().await;
    r.stop().await;
}
