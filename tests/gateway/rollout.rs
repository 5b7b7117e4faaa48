//! The rollout report over real sockets, after a scripted day: taps and
//! scans on a bus line and on a metro line another unit runs, a medical
//! hold and its capture, an offline validator's upload with taps of that
//! day and of the day before, and a tap the next day. The report of each
//! day, as JSON and as CSV, must match what the terminals were answered
//! (the journal's records), unit by unit and scenario by scenario.

use std::collections::{BTreeMap, BTreeSet};

use http::{Method, StatusCode};
use onecard::config::{Config, QrKeyConfig, Role, TokenConfig};
use onecard::net::client::{self, Answer, Protocol};
use onecard_core::catalogue::SiteUnit;
use onecard_core::time::day_name;
use serde_json::{json, Value};

use crate::common::qr::TestKey;
use crate::common::{error_code, TestGateway};

const AGENT: &str = "agent-token-12345-0003";
const BUS: &str = "区交通局";
const METRO: &str = "轨道集团";
const HOSPITAL: &str = "区医保局";

const RULES: &str = r#"
[transit]
passback_s = 30
[[transit.routes]]
site = "line-12"
fare = "flat"
base_fen = 200
[[transit.routes]]
site = "metro-2"
fare = "flat"
base_fen = 300
[medical]
hold_ttl_s = 600
[medical.categories.outpatient]
coverage_pct = 70
"#;

/// What one answer says the journal recorded, as the report counts it.
#[derive(Debug, Clone)]
struct Seen {
    day: i32,
    unit: &'static str,
    scenario: &'static str,
    terminal: String,
    scan: bool,
    approved: bool,
    reason: String,
    offline: bool,
}

/// The report's figures for one unit and scenario, from what was seen.
#[derive(Debug, Default, PartialEq)]
struct Want {
    terminals: BTreeSet<String>,
    taps: u64,
    scans: u64,
    approvals: u64,
    declines: u64,
    declines_by_reason: BTreeMap<String, u64>,
    offline: u64,
}

fn want(seen: &[Seen], day: i32) -> BTreeMap<(String, String), Want> {
    let mut out: BTreeMap<(String, String), Want> = BTreeMap::new();
    for s in seen.iter().filter(|s| s.day == day) {
        let w = out
            .entry((s.unit.to_owned(), s.scenario.to_owned()))
            .or_default();
        w.terminals.insert(s.terminal.clone());
        if s.scan {
            w.scans += 1;
        } else {
            w.taps += 1;
        }
        if s.approved {
            w.approvals += 1;
        } else {
            w.declines += 1;
            *w.declines_by_reason.entry(s.reason.clone()).or_default() += 1;
        }
        if s.offline {
            w.offline += 1;
        }
    }
    out
}

/// The rows of a JSON report that had any use that day.
fn used(report: &Value) -> BTreeMap<(String, String), Value> {
    let mut out = BTreeMap::new();
    for u in report["units"].as_array().unwrap() {
        for s in u["scenarios"].as_array().unwrap() {
            let n = s["taps"].as_u64().unwrap() + s["scans"].as_u64().unwrap();
            if n > 0 {
                out.insert(
                    (
                        u["unit"].as_str().unwrap().to_owned(),
                        s["scenario"].as_str().unwrap().to_owned(),
                    ),
                    s.clone(),
                );
            }
        }
    }
    out
}

fn check(report: &Value, seen: &[Seen], day: i32) {
    let want = want(seen, day);
    let got = used(report);
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>(),
        "units and scenarios used on {}",
        day_name(day)
    );
    for (pair, w) in &want {
        let g = &got[pair];
        let reasons: BTreeMap<String, u64> =
            serde_json::from_value(g["declines_by_reason"].clone()).unwrap();
        assert_eq!(
            (
                g["terminals"].as_u64().unwrap(),
                g["taps"].as_u64().unwrap(),
                g["scans"].as_u64().unwrap(),
                g["approvals"].as_u64().unwrap(),
                g["declines"].as_u64().unwrap(),
                g["offline"].as_u64().unwrap(),
                &reasons,
            ),
            (
                w.terminals.len() as u64,
                w.taps,
                w.scans,
                w.approvals,
                w.declines,
                w.offline,
                &w.declines_by_reason,
            ),
            "{pair:?} on {}",
            day_name(day)
        );
        let share = w.offline as f64 / (w.taps + w.scans) as f64;
        assert!((g["offline_share"].as_f64().unwrap() - share).abs() < 1e-4);
    }
}

fn setup(c: &mut Config, key_file: std::path::PathBuf) {
    let r = Config::parse(RULES).unwrap();
    c.transit = r.transit;
    c.medical = r.medical;
    c.offline.terminal_prefixes = vec!["term-00003".into()];
    c.catalogue.sites = vec![SiteUnit {
        prefix: "metro-".into(),
        unit: METRO.into(),
    }];
    c.qr.keys.push(QrKeyConfig {
        kid: "ed-1".into(),
        alg: "ed25519".into(),
        public_key: key_file,
        valid_from: None,
        valid_until: None,
    });
    c.admin.tokens.push(TokenConfig {
        name: "hotline-12345".into(),
        role: Role::Agent,
        token: Some(AGENT.into()),
        token_env: None,
    });
}

async fn report(gw: &TestGateway, query: &str) -> Answer {
    client::admin(
        gw.admin_addr(),
        Some(AGENT),
        Method::GET,
        &format!("/admin/v1/report/rollout{query}"),
        None,
    )
    .await
    .unwrap()
}

async fn report_json(gw: &TestGateway, day: i32) -> Value {
    let a = report(gw, &format!("?day={}", day_name(day))).await;
    assert_eq!(
        a.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&a.body)
    );
    a.json()
}

fn terminal(n: u32) -> String {
    format!("term-{n:05}")
}

/// What a terminal's answer says was recorded.
fn online(
    a: &Answer,
    n: u32,
    unit: &'static str,
    scenario: &'static str,
    scan: bool,
    day: i32,
) -> Seen {
    assert_eq!(
        a.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&a.body)
    );
    let v = a.json();
    Seen {
        day,
        unit,
        scenario,
        terminal: terminal(n),
        scan,
        approved: v["decision"] == "approve",
        reason: v["reason"].as_str().unwrap().to_owned(),
        offline: false,
    }
}

fn rfc3339(ms: i64) -> String {
    onecard_core::time::rfc3339_ms(ms)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rollout_report_after_a_scripted_day_matches_the_journal() {
    let keys = tempfile::tempdir().unwrap();
    let issuer = TestKey::ed25519(33);
    let key_file = issuer.write_public(keys.path(), "ed-1");
    let gw = TestGateway::start(|c| setup(c, key_file)).await;
    // The day runs at local noon, so that no step crosses a midnight.
    let day = gw.to_next_noon();

    let (a, b, denied, sick) = (
        "500118R00000001",
        "500118R00000002",
        "500118R00000003",
        "500118R00000004",
    );
    for c in [a, b, denied] {
        gw.put_card(c, json!({"status": "active", "functions": ["transit"]}))
            .await;
    }
    gw.put_card(
        sick,
        json!({"status": "active", "functions": ["medical", "financial"]}),
    )
    .await;
    gw.bind(b, "essc-R2", "essc").await;
    gw.deny(denied).await;

    let mut seen: Vec<Seen> = Vec::new();
    let tap = |id: &str, card: &str, site: &str| json!({"event_id": id, "kind": "tap", "card_no": card, "scenario": "transit", "site": site});

    // Terminal 1 on the bus line: an approval, a deny-listed card, a card
    // the gateway does not know, the same card again within the passback.
    let mut t1 = gw.terminal(1, Protocol::Http1).await;
    for (id, card) in [
        ("b-1", a),
        ("b-2", denied),
        ("b-3", "500118R00000999"),
        ("b-4", a),
    ] {
        let ans = t1.authorize(&tap(id, card, "line-12")).await.unwrap();
        seen.push(online(&ans, 1, BUS, "transit", false, day));
    }
    // Terminal 2 on the metro (its own unit): a tap and a scan, and the
    // same scan's code again (a replay, declined).
    let mut t2 = gw.terminal(2, Protocol::Http2).await;
    let ans = t2.authorize(&tap("m-1", a, "metro-2")).await.unwrap();
    seen.push(online(&ans, 2, METRO, "transit", false, day));
    let iat = gw.clock_ms() / 1000;
    let code = issuer.code("ed-1", "essc-R2", "essc", iat, 60, "jti-R-000001");
    for id in ["m-2", "m-3"] {
        let scan = json!({"event_id": id, "kind": "scan", "qr": code, "scenario": "transit", "site": "metro-2"});
        let ans = t2.authorize(&scan).await.unwrap();
        seen.push(online(&ans, 2, METRO, "transit", true, day));
    }
    // Terminal 2 at a hospital counter too: a hold, then its capture (a
    // step at the counter, not a card presented: not counted).
    let hold = json!({"event_id": "h-1", "kind": "tap", "card_no": sick, "amount_fen": 5_000,
                      "category": "outpatient", "site": "hospital-1-counter-3"});
    let ans = t2.medical("hold", &hold).await.unwrap();
    seen.push(online(&ans, 2, HOSPITAL, "medical", false, day));
    let capture = json!({"event_id": "c-1", "hold_event_id": "h-1", "amount_fen": 4_000});
    let ans = t2.medical("capture", &capture).await.unwrap();
    assert_eq!(ans.json()["decision"], "approve");

    // Terminal 3, an offline validator on the bus line, uploads two taps
    // of today and one of yesterday evening.
    let mut t3 = gw.terminal(3, Protocol::Http1).await;
    let today = rfc3339(gw.clock_ms() - 3_600_000);
    let yesterday = rfc3339(gw.clock_ms() - 20 * 3_600_000);
    let offline = |id: &str, card: &str, at: &str, decision: &str| {
        let mut v = json!({"event_id": id, "kind": "tap", "card_no": card, "scenario": "transit",
                           "amount_fen": 200, "site": "line-12", "occurred_at": at, "decision": decision});
        if decision == "decline" {
            v["reason"] = json!("DENYLISTED");
        }
        v
    };
    let upload = json!({"events": [
        offline("o-1", b, &today, "approve"),
        offline("o-2", denied, &today, "decline"),
        offline("o-3", b, &yesterday, "approve"),
    ]});
    let ans = t3.offline_batch(&upload).await.unwrap();
    assert_eq!(ans.status, StatusCode::OK);
    let v = ans.json();
    // The gateway records what the validator decided.
    for (i, d, approved) in [(0, day, true), (1, day, false), (2, day - 1, true)] {
        let e = &v["events"][i];
        assert_eq!(e["status"], "accepted", "{e}");
        seen.push(Seen {
            day: d,
            unit: BUS,
            scenario: "transit",
            terminal: terminal(3),
            scan: false,
            approved,
            reason: if approved { "OK" } else { "DENYLISTED" }.into(),
            offline: true,
        });
    }

    // The day's report, as JSON, matches, and it is not trivially so.
    let r = report_json(&gw, day).await;
    assert_eq!(r["day"], day_name(day));
    assert_eq!(r["counted_through_seq"], r["journal_last_seq"]);
    check(&r, &seen, day);
    let bus = &used(&r)[&(BUS.to_owned(), "transit".to_owned())];
    assert_eq!(bus["terminals"], 2);
    assert_eq!(bus["offline"], 2);
    assert!(bus["declines_by_reason"]["DENYLISTED"].as_u64().unwrap() >= 2);
    let metro = &used(&r)[&(METRO.to_owned(), "transit".to_owned())];
    assert_eq!(
        (metro["taps"].as_u64(), metro["scans"].as_u64()),
        (Some(1), Some(2))
    );
    let medical = &used(&r)[&(HOSPITAL.to_owned(), "medical".to_owned())];
    assert_eq!(
        medical["taps"], 1,
        "the capture is not a second card presented"
    );
    // Terminal 2 served two units; within the metro's unit it counts once.
    let unit = |name: &str| {
        r["units"]
            .as_array()
            .unwrap()
            .iter()
            .find(|u| u["unit"] == name)
            .unwrap()
            .clone()
    };
    assert_eq!(unit(METRO)["total"]["terminals"], 1);
    assert_eq!(unit(BUS)["total"]["taps"], 6);
    // A scenario the catalogue names and nobody used yet has its row.
    let culture = unit("区文化旅游委");
    assert_eq!(culture["scenarios"][0]["taps"], 0);
    assert_eq!(culture["scenarios"][0]["first_day"], Value::Null);

    // Yesterday holds only the offline tap taken then.
    let y = report_json(&gw, day - 1).await;
    check(&y, &seen, day - 1);
    assert_eq!(
        used(&y)[&(BUS.to_owned(), "transit".to_owned())]["offline_share"],
        1.0
    );

    // The next day: one tap. The bus line's span runs from yesterday to
    // tomorrow; the metro's is today only.
    gw.advance_ms(86_400_000);
    let ans = t1.authorize(&tap("b-5", a, "line-12")).await.unwrap();
    seen.push(online(&ans, 1, BUS, "transit", false, day + 1));
    let n = report_json(&gw, day + 1).await;
    check(&n, &seen, day + 1);
    let span = |r: &Value, unit: &str| {
        let s = &r["units"]
            .as_array()
            .unwrap()
            .iter()
            .find(|u| u["unit"] == unit)
            .unwrap()["scenarios"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["scenario"] == "transit")
            .unwrap()
            .clone();
        (s["first_day"].clone(), s["last_day"].clone())
    };
    assert_eq!(
        span(&n, BUS),
        (json!(day_name(day - 1)), json!(day_name(day + 1)))
    );
    assert_eq!(
        span(&n, METRO),
        (json!(day_name(day)), json!(day_name(day)))
    );
    // Asking again changes nothing: each record is counted once.
    check(&report_json(&gw, day).await, &seen, day);

    // The CSV says what the JSON says, one line per unit and scenario.
    let a = report(&gw, &format!("?day={}&format=csv", day_name(day))).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(
        a.headers.get("content-type").unwrap(),
        "text/csv; charset=utf-8"
    );
    let text = String::from_utf8(a.body.to_vec()).unwrap();
    let text = text.strip_prefix('\u{feff}').unwrap();
    let mut lines = text.split("\r\n").filter(|l| !l.is_empty());
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let col = |name: &str| header.iter().position(|h| *h == name).unwrap();
    let rows: Vec<Vec<String>> = lines
        .map(|l| l.split(',').map(str::to_owned).collect())
        .collect();
    let json_rows: usize = r["units"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["scenarios"].as_array().unwrap().len())
        .sum();
    assert_eq!(rows.len(), json_rows);
    for ((unit, scenario), g) in used(&r) {
        let row = rows
            .iter()
            .find(|c| c[col("unit")] == unit && c[col("scenario")] == scenario)
            .unwrap();
        assert_eq!(row[col("day")], day_name(day));
        for k in [
            "terminals",
            "taps",
            "scans",
            "approvals",
            "declines",
            "offline",
        ] {
            assert_eq!(row[col(k)], g[k].to_string(), "{unit} {scenario} {k}");
        }
        assert_eq!(row[col("first_day")], g["first_day"].as_str().unwrap());
    }

    // Bad questions get a clear answer; the report takes a token.
    for q in ["?day=2026-13-01", "?format=xlsx", "?unit=x"] {
        let a = report(&gw, q).await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{q}");
        assert_eq!(error_code(&a), "INVALID_REQUEST");
    }
    let a = client::admin(
        gw.admin_addr(),
        None,
        Method::GET,
        "/admin/v1/report/rollout",
        None,
    )
    .await
    .unwrap();
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    // Today by default.
    assert_eq!(report(&gw, "").await.json()["day"], day_name(day + 1));
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_record_is_counted_once_across_a_restart() {
    let mut gw = TestGateway::start(|_| {}).await;
    let day = gw.to_next_noon();
    gw.put_card(
        "500118R00000010",
        json!({"status": "active", "functions": ["transit"]}),
    )
    .await;
    let mut t = gw.terminal(1, Protocol::Http1).await;
    for i in 0..5 {
        let body = crate::common::tap(&format!("r-{i}"), "500118R00000010", "transit", 200);
        let a = t.authorize(&body).await.unwrap();
        assert_eq!(a.status, StatusCode::OK);
    }
    drop(t);
    let path = format!("/admin/v1/report/rollout?day={}", day_name(day));
    let before = gw.admin_ok(Method::GET, &path, None).await;
    let taps = |r: &Value| -> u64 {
        r["units"]
            .as_array()
            .unwrap()
            .iter()
            .map(|u| u["total"]["taps"].as_u64().unwrap())
            .sum()
    };
    assert_eq!(taps(&before), 5);
    gw.restart().await;
    let after = gw.admin_ok(Method::GET, &path, None).await;
    assert_eq!(taps(&after), 5, "counted once across a restart");
    assert_eq!(after["units"], before["units"]);
    gw.shutdown().await;
}
