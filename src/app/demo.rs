//! The demo: a handful of cards set up through the admin API and tapped over
//! real mTLS, one of each outcome, with the decision and latency printed.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Instant;

use http::{Method, StatusCode};
use serde_json::json;

use onecard_core::model::mask_card_no;

use crate::net::certs;
use crate::net::client::{self, Protocol};

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
    let run_id = onecard_core::time::wall_ms();
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
        if s.scenario == "payment" {
            body["bill_ref"] = json!(format!("DEMO-BILL-{run_id}-{i}"));
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
    let run_id = onecard_core::time::wall_ms();
    // Each fare on its own line: a second tap at the same site within
    // `transit.passback_s` would be a double tap.
    let tap = |n: u32, scenario: &str, fen: i64| {
        json!({"event_id": format!("demo-settle-{run_id}-{n}"), "kind": "tap", "card_no": card,
               "scenario": scenario, "amount_fen": fen, "site": format!("demo-line-{n}")})
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

/// The dev issuer keys by kid, and the type of credential each signs
/// (config/dev.toml lists their public halves, `config/dev-qr/*.pem.pub`).
pub const DEV_QR_KEYS: [(&str, &str); 2] = [("dev-ed-1", "essc"), ("dev-sm2-1", "ykm")];

/// The dev issuer keys' private halves, found beside the public ones the
/// config names (`<name>.pem` beside `<name>.pem.pub`), with each kid's
/// credential type; `None` unless the config names both dev keys and both
/// private halves are there.
pub fn dev_qr_keys(keys: &[crate::config::QrKeyConfig]) -> Option<Vec<(PathBuf, &'static str)>> {
    DEV_QR_KEYS
        .iter()
        .map(|(kid, typ)| {
            let public = &keys.iter().find(|k| k.kid == *kid)?.public_key;
            let private = public.with_extension("");
            (private != *public && private.exists()).then(|| (private, *typ))
        })
        .collect()
}
/// The dev hotline agent's token (config/dev.toml).
pub const DEV_AGENT_TOKEN: &str = "dev-agent-token-0001";
/// The service hall counter's token of config/dev.toml.
pub const DEV_COUNTER_TOKEN: &str = "dev-counter-token-0001";

/// Credentials and card life, shown: a resident's two codes (Ed25519 and
/// SM2) scanned, a replayed and an expired code refused, a loss reported
/// through the hotline and the card stopped, an offline validator catching
/// up on the deny list and uploading its taps, and the replacement card
/// taking over the codes.
pub async fn credentials(
    admin: SocketAddr,
    terminal: SocketAddr,
    certs_dir: &Path,
    token: &str,
    keys: &[(PathBuf, &str)],
) -> anyhow::Result<()> {
    use onecard_core::qr;
    // Cards and credentials of this run: a second run of the demo on the
    // same data finds the first run's card replaced and its codes moved.
    let stamp = onecard_core::time::wall_ms() % 1_000_000_000;
    let card = &format!("500118F{stamp:09}");
    let new_card = format!("500118E{stamp:09}");
    let call =
        |method: Method, path: String, body: Option<serde_json::Value>, who: &'static str| {
            let token = if who == "agent" {
                DEV_AGENT_TOKEN
            } else {
                token
            };
            let token = token.to_owned();
            async move {
                let a = client::admin(admin, Some(&token), method, &path, body.as_ref()).await?;
                anyhow::ensure!(
                    a.status == StatusCode::OK,
                    "{path}: {} {}",
                    a.status,
                    String::from_utf8_lossy(&a.body)
                );
                Ok::<_, anyhow::Error>(a.json())
            }
        };
    call(
        Method::PUT,
        format!("/admin/v1/cards/{card}"),
        Some(json!({"status": "active", "functions": ["transit", "medical"]})),
        "operator",
    )
    .await?;
    call(
        Method::PUT,
        format!("/admin/v1/cards/{card}/holder"),
        Some(json!({"personal_id": "11010519491231002X"})),
        "operator",
    )
    .await?;
    let mut conn = client::connect_terminal(terminal, Some(certs_dir), 2, Protocol::Http1).await?;
    let run_id = onecard_core::time::wall_ms();
    let now = run_id / 1000;
    let mut codes = Vec::new();
    for ((kid, _), (path, typ)) in DEV_QR_KEYS.iter().zip(keys) {
        let kid = *kid;
        let key = qr::SigningKey::from_pkcs8_pem(&std::fs::read_to_string(path)?)
            .map_err(anyhow::Error::msg)?;
        let typ = qr::CredType::parse(typ).expect("a known type");
        let sub = format!("{}-demo-{stamp}", typ.as_str());
        call(
            Method::POST,
            format!("/admin/v1/cards/{card}/credentials"),
            Some(json!({"credential_id": sub, "typ": typ.as_str()})),
            "operator",
        )
        .await?;
        let code = qr::issue(
            &key,
            kid,
            &sub,
            typ,
            now,
            60,
            &qr::random_jti(&mut rand_core::OsRng),
        )
        .map_err(anyhow::Error::msg)?;
        let expired = qr::issue(
            &key,
            kid,
            &sub,
            typ,
            now - 600,
            60,
            &qr::random_jti(&mut rand_core::OsRng),
        )
        .map_err(anyhow::Error::msg)?;
        codes.push((key.alg().as_str(), sub, code, expired, kid, typ));
    }
    let mut n = 0;
    let mut next_id = || {
        n += 1;
        format!("demo-scan-{run_id}-{n}")
    };
    for (alg, _, code, expired, _, typ) in &codes {
        let typ = typ.as_str();
        for (qr, what) in [
            (code, format!("{typ} code ({alg})")),
            (code, format!("the same {typ} code again")),
            (expired, format!("{typ} code expired 9 minutes ago")),
        ] {
            scan(&mut conn, next_id(), qr, what).await?;
        }
    }
    let version = call(Method::GET, "/admin/v1/status".into(), None, "operator").await?["denylist"]
        ["version"]
        .as_u64()
        .unwrap_or(0);

    // The resident calls the hotline: found by ID number, card reported lost.
    let found = call(
        Method::POST,
        "/admin/v1/cards/find".into(),
        Some(json!({"personal_id": "11010519491231002X"})),
        "agent",
    )
    .await?;
    let lost = call(
        Method::POST,
        format!("/admin/v1/cards/{card}/loss"),
        Some(json!({"note": "demo: wallet lost on metro line 2"})),
        "agent",
    )
    .await?;
    println!(
        "demo: hotline agent finds card {} by ID number and reports it lost -> {} (deny-list version {})",
        mask_card_no(found["card_no"].as_str().unwrap_or("")),
        lost["status"].as_str().unwrap_or("-"),
        lost["denylist_version"]
    );
    let (alg, _, _, _, kid, typ) = &codes[0];
    let key = qr::SigningKey::from_pkcs8_pem(&std::fs::read_to_string(&keys[0].0)?)
        .map_err(anyhow::Error::msg)?;
    let sub = format!("{}-demo-{stamp}", typ.as_str());
    let fresh = qr::issue(
        &key,
        kid,
        &sub,
        *typ,
        now,
        60,
        &qr::random_jti(&mut rand_core::OsRng),
    )
    .map_err(anyhow::Error::msg)?;
    scan(
        &mut conn,
        next_id(),
        &fresh,
        format!("a fresh {alg} code of the lost card"),
    )
    .await?;

    // An offline validator catches up on the deny list, then uploads a
    // tap of the lost card it let through while offline.
    let d = conn.denylist(Some(version)).await?;
    let v = d.json();
    println!(
        "demo: validator syncs the deny list since version {version} -> {} added, {} removed, now version {}",
        v["add"].as_array().map_or(0, Vec::len),
        v["remove"].as_array().map_or(0, Vec::len),
        v["version"]
    );
    let at = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    let upload = json!({"events": [
        {"event_id": format!("demo-off-{run_id}-1"), "kind": "tap", "card_no": "500118D000000001", "scenario": "transit",
         "amount_fen": 200, "occurred_at": at, "decision": "approve"},
        {"event_id": format!("demo-off-{run_id}-2"), "kind": "tap", "card_no": card, "scenario": "transit",
         "amount_fen": 200, "occurred_at": at, "decision": "approve"},
    ]});
    let o = conn.offline_batch(&upload).await?.json();
    println!(
        "demo: validator uploads 2 offline taps -> {} accepted, {} offline risk (the lost card)",
        o["accepted"], o["risk"]
    );

    // A replacement card takes over the codes.
    call(
        Method::POST,
        format!("/admin/v1/cards/{card}/replace"),
        Some(json!({"new_card_no": new_card})),
        "operator",
    )
    .await?;
    let fresh = qr::issue(
        &key,
        kid,
        &sub,
        *typ,
        now,
        60,
        &qr::random_jti(&mut rand_core::OsRng),
    )
    .map_err(anyhow::Error::msg)?;
    scan(
        &mut conn,
        next_id(),
        &fresh,
        format!("the same credential, card replaced ({alg})"),
    )
    .await?;
    let look = call(
        Method::GET,
        format!("/admin/v1/cards/{new_card}/transactions?limit=50"),
        None,
        "agent",
    )
    .await?;
    println!(
        "demo: hotline look-up of the new card: {} decisions (the lost card's included, masked); audited",
        look["transactions"].as_array().map_or(0, Vec::len)
    );
    Ok(())
}

/// One scan, printed with its decision and latency.
async fn scan(
    conn: &mut client::Connection,
    event_id: String,
    qr: &str,
    what: String,
) -> anyhow::Result<()> {
    // Each scan at its own gate: the same card at the same gate within
    // `transit.passback_s` would be a double tap, not what this shows.
    static GATE: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);
    let gate = GATE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let body = json!({"event_id": event_id, "kind": "scan", "qr": qr,
                      "scenario": "transit", "amount_fen": 200, "site": format!("demo-metro-{gate}")});
    let t = Instant::now();
    let v = conn.authorize(&body).await?.json();
    println!(
        "demo: scan {what:<44} -> {:<7} {:<18} {:>6.2} ms",
        v["decision"].as_str().unwrap_or("-"),
        v["reason"]
            .as_str()
            .or(v["error"]["code"].as_str())
            .unwrap_or("-"),
        t.elapsed().as_secs_f64() * 1000.0
    );
    Ok(())
}

/// The scenarios of the one card under `config/dev.toml`'s pilot rules: a
/// student's bus day (route tariffs, a transfer, the daily cap, a double
/// tap), a museum with a quota, a community door by allow-list, an
/// identity check at a government counter, a health check, a Sichuan card
/// on the bus and a Beijing one refused, and a water bill paid. Cards are
/// new per run, so the demo can run again on the same data.
/// One line of the scenario demo: the decision, and the why the answer
/// carries (a fare, visits, what identity disclosed, health, a split).
fn show(what: &str, v: &serde_json::Value) {
    let mut why = String::new();
    for key in ["fare", "visits", "identity", "health", "split"] {
        if !v[key].is_null() {
            why = format!("{key} {}", v[key]);
        }
    }
    println!(
        "demo: {what:<46} -> {:<7} {:<19} {:>5} fen  {why}",
        v["decision"].as_str().unwrap_or("-"),
        v["reason"]
            .as_str()
            .or(v["error"]["code"].as_str())
            .unwrap_or("-"),
        v["amount_fen"],
    );
}

pub async fn scenarios(
    admin: SocketAddr,
    terminal: SocketAddr,
    certs_dir: &Path,
    token: &str,
) -> anyhow::Result<()> {
    let stamp = onecard_core::time::wall_ms() % 1_000_000_000;
    let student = format!("500118S{stamp:09}");
    let elder = format!("500118L{stamp:09}");
    let sichuan = format!("510104S{stamp:09}");
    let call = |method: Method, path: String, body: serde_json::Value| {
        let token = token.to_owned();
        async move {
            let a = client::admin(admin, Some(&token), method, &path, Some(&body)).await?;
            anyhow::ensure!(
                a.status == StatusCode::OK,
                "{path}: {} {}",
                a.status,
                String::from_utf8_lossy(&a.body)
            );
            Ok::<_, anyhow::Error>(a.json())
        }
    };
    for (card, concessions) in [(&student, json!(["student"])), (&elder, json!(["elderly"]))] {
        call(
            Method::PUT,
            format!("/admin/v1/cards/{card}"),
            json!({"status": "active", "functions": ["transit", "financial", "medical"],
                   "concessions": concessions}),
        )
        .await?;
    }
    call(
        Method::PUT,
        format!("/admin/v1/cards/{elder}/holder"),
        json!({"personal_id": "11010519491231002X", "name": "张三丰"}),
    )
    .await?;
    call(
        Method::PUT,
        format!("/admin/v1/cards/{elder}/health"),
        json!({"colour": "green", "vaccinated": true}),
    )
    .await?;
    call(
        Method::POST,
        "/admin/v1/access/community-12-east/allow".to_owned(),
        json!({"add": [{"card_no": elder, "windows": ["00:00-24:00"]}]}),
    )
    .await?;
    // Terminal 10 is a government hall's counter in dev.toml.
    let mut bus = client::connect_terminal(terminal, Some(certs_dir), 3, Protocol::Http1).await?;
    let mut hall = client::connect_terminal(terminal, Some(certs_dir), 10, Protocol::Http1).await?;
    let run_id = onecard_core::time::wall_ms();
    let steps: Vec<(&str, &str, serde_json::Value)> = vec![
        (
            "student, bus line 12 (flat 2 yuan, half fare)",
            "bus",
            json!({"card_no": student, "scenario": "transit", "site": "line-12"}),
        ),
        (
            "student, same bus again (double tap)",
            "bus",
            json!({"card_no": student, "scenario": "transit", "site": "line-12"}),
        ),
        (
            "student, metro 1, 14 stops (transfer)",
            "bus",
            json!({"card_no": student, "scenario": "transit", "site": "metro-1", "stops": 14}),
        ),
        (
            "student, ferry 2, 4 zones (daily cap)",
            "bus",
            json!({"card_no": student, "scenario": "transit", "site": "ferry-2", "zones": 4}),
        ),
        (
            "elderly, bus line 13 (free)",
            "bus",
            json!({"card_no": elder, "scenario": "transit", "site": "line-13"}),
        ),
        (
            "Sichuan card, bus line 12 (partner)",
            "bus",
            json!({"card_no": sichuan, "scenario": "transit", "site": "line-12"}),
        ),
        (
            "Beijing card, bus line 12 (no agreement)",
            "bus",
            json!({"card_no": "110101A00000001", "scenario": "transit", "site": "line-12"}),
        ),
        (
            "student, museum (30 yuan, half)",
            "bus",
            json!({"card_no": student, "scenario": "culture", "site": "museum-1"}),
        ),
        (
            "elderly, own community door",
            "bus",
            json!({"card_no": elder, "scenario": "access", "site": "community-12-east"}),
        ),
        (
            "student, someone else's community door",
            "bus",
            json!({"card_no": student, "scenario": "access", "site": "community-12-east"}),
        ),
        (
            "elderly, identity at a government counter",
            "hall",
            json!({"card_no": elder, "scenario": "identity", "site": "window-3"}),
        ),
        (
            "elderly, health check",
            "bus",
            json!({"card_no": elder, "scenario": "health"}),
        ),
        (
            "student, water bill",
            "hall",
            json!({"card_no": student, "scenario": "payment", "amount_fen": 8_850, "bill_ref": format!("WATER-{run_id}")}),
        ),
    ];
    for (i, (what, who, fields)) in steps.into_iter().enumerate() {
        let mut body = json!({"event_id": format!("demo-scn-{run_id}-{i}"), "kind": "tap"});
        if let (Some(b), serde_json::Value::Object(f)) = (body.as_object_mut(), fields) {
            b.extend(f);
        }
        let conn = if who == "hall" { &mut hall } else { &mut bus };
        let a = conn.authorize(&body).await?;
        show(what, &a.json());
    }

    // A hospital pharmacy counter: a hold, part of it captured, the bill
    // split between insurance and self-pay (pharmacy: insurance pays 60 %
    // in dev.toml), and a second capture that must not charge again.
    let mut counter =
        client::connect_terminal(terminal, Some(certs_dir), 1, Protocol::Http1).await?;
    let hold_id = format!("demo-med-{run_id}");
    let steps = [
        (
            "elderly, pharmacy hold 200 yuan",
            "hold",
            json!({"event_id": hold_id, "kind": "tap", "card_no": elder, "amount_fen": 20_000,
                   "category": "pharmacy", "site": "hospital-1-pharmacy"}),
        ),
        (
            "elderly, capture 150 yuan of it",
            "capture",
            json!({"event_id": format!("{hold_id}-c"), "hold_event_id": hold_id, "amount_fen": 15_000}),
        ),
        (
            "elderly, capture it again (new event id)",
            "capture",
            json!({"event_id": format!("{hold_id}-c2"), "hold_event_id": hold_id, "amount_fen": 15_000}),
        ),
    ];
    for (what, step, body) in steps {
        show(what, &counter.medical(step, &body).await?.json());
    }

    // A grant batch: one good record, one for a card not registered here.
    let batch = format!("demo-{run_id}");
    let lines = [
        json!({"record_id": "g1", "card_no": student, "amount_fen": 50_000, "programme": "student_grant"}),
        json!({"record_id": "g2", "card_no": format!("500118X{stamp:09}"), "amount_fen": 50_000, "programme": "student_grant"}),
    ];
    let body: Vec<u8> = lines
        .iter()
        .flat_map(|l| format!("{l}\n").into_bytes())
        .collect();
    let a = client::admin_raw(
        admin,
        Some(token),
        Method::POST,
        &format!("/admin/v1/disbursements/{batch}"),
        "application/x-ndjson",
        body,
    )
    .await?;
    anyhow::ensure!(
        a.status == StatusCode::OK,
        "disbursement: {} {}",
        a.status,
        String::from_utf8_lossy(&a.body)
    );
    let report = a.json();
    println!(
        "demo: grant batch {batch}: {} accepted ({} fen), {} rejected",
        report["accepted"], report["accepted_fen"], report["rejected"]
    );
    for o in report["outcomes"].as_array().into_iter().flatten() {
        println!(
            "demo:   {:<4} {:<9} {}",
            o["record_id"].as_str().unwrap_or("-"),
            o["outcome"].as_str().unwrap_or("-"),
            o["code"].as_str().unwrap_or(""),
        );
    }
    Ok(())
}

/// A personal ID number born on `born` (`YYYYMMDD`) in district 500118,
/// with sequence `seq` and its check character: a new resident per run.
fn demo_personal_id(born: &str, seq: u32) -> String {
    const WEIGHTS: [u32; 17] = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2];
    let body = format!("500118{born}{:03}", seq % 1000);
    let sum: u32 = body
        .bytes()
        .zip(WEIGHTS)
        .map(|(d, w)| u32::from(d - b'0') * w)
        .sum();
    let check = b"10X98765432"[(sum % 11) as usize] as char;
    format!("{body}{check}")
}

/// A card application, a complaint and the rollout report, shown: an
/// elderly resident's application, filed at a service hall by her son as
/// proxy together with another business, taken through production to
/// pickup by the counter, found by the hotline, the card riding the bus
/// free with the elderly concession; then a complaint on that ride, sent
/// to the transit bureau and closed with an explanation; then the day's
/// use per unit and scenario. New residents and cards per run.
pub async fn applications(
    admin: SocketAddr,
    terminal: SocketAddr,
    certs_dir: &Path,
) -> anyhow::Result<()> {
    let stamp = onecard_core::time::wall_ms();
    let elder = demo_personal_id("19510318", (stamp % 997) as u32);
    let son = demo_personal_id("19800101", (stamp % 991) as u32);
    let card = format!("500118G{:09}", stamp % 1_000_000_000);
    let call = |token: &'static str, method: Method, path: String, body: serde_json::Value| async move {
        let body = (!body.is_null()).then_some(body);
        let a = client::admin(admin, Some(token), method, &path, body.as_ref()).await?;
        anyhow::ensure!(
            a.status == StatusCode::OK,
            "{path}: {} {}",
            a.status,
            String::from_utf8_lossy(&a.body)
        );
        Ok::<_, anyhow::Error>(a.json())
    };
    let filed = call(
        DEV_COUNTER_TOKEN,
        Method::POST,
        "/admin/v1/applications".into(),
        json!({
            "request_id": format!("demo-hall/{stamp}"),
            "personal_id": elder, "name": "王秀英",
            "channel": "service_hall", "place": "Yuzhong service hall",
            "with_business": "pension certification",
            "functions": ["transit", "medical"],
            "proxy": {"personal_id": son, "relation": "child"},
        }),
    )
    .await?;
    let id = filed["id"].as_str().unwrap_or("").to_owned();
    println!(
        "demo: son files a card application for his mother ({}, {}) at a service hall -> {id} {}, priority {}, concessions {}",
        filed["id_masked"].as_str().unwrap_or("-"),
        filed["name_masked"].as_str().unwrap_or("-"),
        filed["state"].as_str().unwrap_or("-"),
        filed["priority"].as_str().unwrap_or("-"),
        filed["concessions"]
    );
    let steps = format!("/admin/v1/applications/{id}/steps");
    for body in [
        json!({"step": "approve"}),
        json!({"step": "produce", "card_no": card}),
        json!({"step": "ready_for_pickup", "branch": "Jiefangbei branch"}),
    ] {
        call(DEV_COUNTER_TOKEN, Method::POST, steps.clone(), body).await?;
    }
    let found = call(
        DEV_AGENT_TOKEN,
        Method::POST,
        "/admin/v1/applications/find".into(),
        json!({"personal_id": elder}),
    )
    .await?;
    println!(
        "demo: the hotline finds it by her ID number -> {} at {}",
        found["applications"][0]["state"].as_str().unwrap_or("-"),
        found["applications"][0]["pickup_branch"]
            .as_str()
            .unwrap_or("-"),
    );
    let issued = call(
        DEV_COUNTER_TOKEN,
        Method::POST,
        steps,
        json!({"step": "issue"}),
    )
    .await?;
    println!(
        "demo: picked up -> {}, card {} active; history: {}",
        issued["state"].as_str().unwrap_or("-"),
        mask_card_no(&card),
        issued["history"]
            .as_array()
            .map(|h| h
                .iter()
                .filter_map(|c| c["step"].as_str())
                .collect::<Vec<_>>()
                .join(" -> "))
            .unwrap_or_default()
    );
    let mut conn = client::connect_terminal(terminal, Some(certs_dir), 1, Protocol::Http1).await?;
    let at = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    let a = conn
        .authorize(&json!({
            "event_id": format!("demo-app-{stamp}"), "kind": "tap", "card_no": card,
            "scenario": "transit", "site": "line-12", "occurred_at": at,
        }))
        .await?;
    let ride = a.json();
    show("her new card on bus line-12 (elderly)", &ride);

    // Her son calls the hotline, sure she was charged: a complaint on
    // that ride goes to the transit bureau, and is closed with the
    // explanation the ride's record gives.
    let filed = call(
        DEV_AGENT_TOKEN,
        Method::POST,
        "/admin/v1/complaints".into(),
        json!({
            "request_id": format!("demo-12345/{stamp}"), "card_no": card,
            "auth_id": ride["auth_id"], "category": "wrong_charge",
            "says": "thinks the bus charged her",
        }),
    )
    .await?;
    let cid = filed["id"].as_str().unwrap_or("").to_owned();
    let closed = call(
        DEV_AGENT_TOKEN,
        Method::POST,
        format!("/admin/v1/complaints/{cid}/close"),
        json!({"outcome": "explanation", "note": "elderly ride free: the ride charged 0 fen"}),
    )
    .await?;
    println!(
        "demo: complaint {cid} on that ride -> unit {}, transaction charged {} fen, settlement {} -> closed: {}",
        filed["unit"].as_str().unwrap_or("-"),
        filed["transaction"]["charged_fen"],
        filed["transaction_now"]["settlement"].as_str().unwrap_or("-"),
        closed["closing"]["outcome"].as_str().unwrap_or("-"),
    );

    // The day so far, as each responsible unit reports it.
    let report = client::admin(
        admin,
        Some(DEV_AGENT_TOKEN),
        Method::GET,
        "/admin/v1/report/rollout",
        None,
    )
    .await?;
    anyhow::ensure!(
        report.status == StatusCode::OK,
        "rollout report: {} {}",
        report.status,
        String::from_utf8_lossy(&report.body)
    );
    let report = report.json();
    println!(
        "demo: rollout report for {} (GET /admin/v1/report/rollout; &format=csv for the units' spreadsheets):",
        report["day"].as_str().unwrap_or("-")
    );
    for unit in report["units"].as_array().into_iter().flatten() {
        for s in unit["scenarios"].as_array().into_iter().flatten() {
            let presented = s["taps"].as_u64().unwrap_or(0) + s["scans"].as_u64().unwrap_or(0);
            if presented == 0 {
                continue;
            }
            println!(
                "demo:   {} {}: {} terminals, {} taps, {} scans, {} approved, {} declined, offline share {}",
                unit["unit"].as_str().unwrap_or("-"),
                s["scenario"].as_str().unwrap_or("-"),
                s["terminals"],
                s["taps"],
                s["scans"],
                s["approvals"],
                s["declines"],
                s["offline_share"],
            );
        }
    }
    Ok(())
}
