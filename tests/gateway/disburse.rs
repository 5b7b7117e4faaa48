//! Disbursements end to end over real sockets: batches of subsidies and
//! wages with good and bad records, uploaded as CSV and NDJSON to a real
//! gateway, each record's outcome reported, the accepted ones credited
//! through settlement to a real receiver exactly once (re-uploads, a
//! restart), and the unpaid-wages view before and after a wage batch.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use onecard::app::sink_sim::{self, Ledger};
use onecard::config::SinkConfig;
use onecard::net::client::{self, Answer};
use serde_json::{json, Value};

use onecard_core::disburse::{Programme, ProgrammeKind};
use onecard_core::settle::sign::{Algorithm, Signer};

use crate::common::sink::Sink;
use crate::common::{error_code, TestGateway, TOKEN};

const KEY: &str = "payment-signing-key-0001";
const ID_KEY: &str = "test-id-hash-key-0123456789";
const PERSONAL_ID: &str = "11010519491231002X";

const GOOD: &str = "500118D00000001";
const HELD: &str = "500118D00000002";
const LOST: &str = "500118D00000003";
const NO_FIN: &str = "500118D00000004";
const UNKNOWN: &str = "500118D00000009";
const W1: &str = "500118W00000001";
const W2: &str = "500118W00000002";
const W3: &str = "500118W00000003";

/// `[regions]` of the regional test: home `50`; Sichuan (`51`) covers
/// payments and has a payment sink of its own; Guizhou (`52`) covers
/// payments but no sink settles its cards; no other region has an
/// agreement.
const REGIONS: &str = r#"
home = ["50"]
[[partners]]
name = "sichuan"
prefixes = ["51"]
scenarios = ["transit", "payment"]
[[partners]]
name = "guizhou"
prefixes = ["52"]
scenarios = ["payment"]
"#;

/// A receiver, and a gateway whose payment sink points at it, with two
/// programmes and personal IDs enabled.
async fn setup() -> (Sink, sink_sim::Running, TestGateway) {
    setup_regions(false).await
}

/// As [`setup`]; `regional`: with [`REGIONS`] and Sichuan's payment sink
/// (at the same receiver).
async fn setup_regions(regional: bool) -> (Sink, sink_sim::Running, TestGateway) {
    let dir = tempfile::tempdir().unwrap();
    let sink = Sink::new(dir.path(), 3);
    let r = sink
        .start(
            "127.0.0.1:0".parse().unwrap(),
            Signer::new(Algorithm::HmacSha256, KEY.as_bytes().to_vec()),
        )
        .await;
    let mut config = crate::common::test_config(dir.path());
    let sink_config = |name: &str, partners: &str| -> SinkConfig {
        toml::from_str(&format!(
            r#"
            name = "{name}"
            url = "https://127.0.0.1:{}/v1/batches"
            ca = "{}"
            scenarios = ["payment"]
            partners = {partners}
            key = "{KEY}"
            age_max_ms = 100
            backoff_base_ms = 10
            backoff_max_ms = 100
            "#,
            r.addr.port(),
            sink.certs.join(onecard::net::certs::CA_CERT).display()
        ))
        .unwrap()
    };
    config.settlement.sinks = vec![sink_config("payment", "[]")];
    if regional {
        config.regions = toml::from_str(REGIONS).unwrap();
        config
            .settlement
            .sinks
            .push(sink_config("sichuan", "[\"sichuan\"]"));
    }
    config.privacy.id_hash_key = Some(ID_KEY.into());
    config.disbursement.records_max = 50;
    let programmes = &mut config.disbursement.programmes;
    programmes.insert(
        "student_grant".into(),
        Programme {
            kind: ProgrammeKind::Subsidy,
            amount_max_fen: 100_000,
        },
    );
    programmes.insert(
        "project_wages".into(),
        Programme {
            kind: ProgrammeKind::Wages,
            amount_max_fen: 1_000_000,
        },
    );
    let gw = TestGateway::start_in(dir, config).await;
    let fin = json!({"status": "active", "functions": ["transit", "financial"]});
    for card in [GOOD, HELD, LOST, W1, W2, W3] {
        gw.put_card(card, fin.clone()).await;
    }
    gw.put_card(
        NO_FIN,
        json!({"status": "active", "functions": ["transit"]}),
    )
    .await;
    gw.admin_ok(Method::POST, &format!("/admin/v1/cards/{LOST}/loss"), None)
        .await;
    gw.admin_ok(
        Method::PUT,
        &format!("/admin/v1/cards/{HELD}/holder"),
        Some(json!({"personal_id": PERSONAL_ID})),
    )
    .await;
    (sink, r, gw)
}

async fn upload(gw: &TestGateway, batch: &str, content_type: &str, body: &str) -> Answer {
    client::admin_raw(
        gw.admin_addr(),
        Some(TOKEN),
        Method::POST,
        &format!("/admin/v1/disbursements/{batch}"),
        content_type,
        body.as_bytes().to_vec(),
    )
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

/// Waits (up to 60 s, far beyond what a loaded machine needs) until the
/// receiver has booked `credits` credit lines.
async fn credited(sink: &Sink, addr: std::net::SocketAddr, credits: u64) -> Ledger {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let l = sink.ledger(addr).await;
        if l.credits >= credits || Instant::now() > deadline {
            return l;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every credit line in the receiver's ledger file, by event id: how many
/// times it was booked, its amount and programme. Only whole lines are
/// read (one may be being appended).
fn ledger_credits(sink: &Sink) -> BTreeMap<String, (u32, i64, String)> {
    let bytes = std::fs::read(&sink.ledger_file).unwrap_or_default();
    let whole = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let mut out: BTreeMap<String, (u32, i64, String)> = BTreeMap::new();
    for line in bytes[..whole]
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
    {
        let v: Value = serde_json::from_slice(line).unwrap();
        for e in v["events"].as_array().unwrap() {
            assert_eq!(e["type"], "credit", "{e}");
            assert_eq!(e["terminal"], "@disburse");
            assert_eq!(e["scenario"], "payment");
            let entry = out
                .entry(e["event_id"].as_str().unwrap().to_owned())
                .or_insert((0, 0, e["programme"].as_str().unwrap().to_owned()));
            entry.0 += 1;
            entry.1 = e["amount_fen"].as_i64().unwrap();
        }
    }
    out
}

async fn unpaid(gw: &TestGateway, month: &str) -> Value {
    let path = format!("/admin/v1/projects/bridge-7/unpaid?month={month}");
    gw.admin_ok(Method::GET, &path, None).await
}

fn outcome_codes(report: &Value) -> Vec<(String, u64, String)> {
    report["outcomes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| {
            (
                o["record_id"].as_str().unwrap_or("-").to_owned(),
                o["line"].as_u64().unwrap(),
                o["code"]
                    .as_str()
                    .unwrap_or(o["outcome"].as_str().unwrap())
                    .to_owned(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_good_and_bad_records_is_credited_once() {
    let (sink, r, mut gw) = setup().await;
    let hash = onecard_core::privacy::id_hash(ID_KEY.as_bytes(), PERSONAL_ID);

    // A grant batch as a spreadsheet exports it: every kind of refusal.
    let csv = format!(
        "record_id,card_no,id_hash,amount_fen,programme,project,month\r\n\
         r1,{GOOD},,50000,student_grant,,\r\n\
         r2,{UNKNOWN},,50000,student_grant,,\r\n\
         r3,{LOST},,50000,student_grant,,\r\n\
         r4,{NO_FIN},,50000,student_grant,,\r\n\
         r5,{GOOD},,100001,student_grant,,\r\n\
         r6,{GOOD},,100,moon_grant,,\r\n\
         r1,{GOOD},,50000,student_grant,,\r\n\
         r7,,{hash},30000,student_grant,,\r\n\
         r8,{GOOD},,12.50,student_grant,,\r\n"
    );
    let first = upload(&gw, "G-2026-11", "text/csv", &csv).await;
    let report = ok(&first);
    assert_eq!(
        outcome_codes(&report),
        [
            ("r1", 2, "accepted"),
            ("r2", 3, "CARD_NOT_FOUND"),
            ("r3", 4, "CARD_LOST"),
            ("r4", 5, "FUNCTION_NOT_ENABLED"),
            ("r5", 6, "LIMIT_EXCEEDED"),
            ("r6", 7, "UNKNOWN_PROGRAMME"),
            ("r1", 8, "DUPLICATE_RECORD"),
            ("r7", 9, "accepted"),
            ("r8", 10, "BAD_LINE"),
        ]
        .map(|(a, b, c)| (a.to_owned(), b, c.to_owned()))
    );
    assert_eq!(
        (
            &report["batch_id"],
            &report["records"],
            &report["accepted"],
            &report["rejected"],
            &report["accepted_fen"]
        ),
        (
            &json!("G-2026-11"),
            &json!(9),
            &json!(2),
            &json!(7),
            &json!(80_000)
        )
    );
    // Cards masked, the ID hash nowhere; r7 is paid to the holder's card.
    let text = String::from_utf8_lossy(&first.body).into_owned();
    for secret in [GOOD, HELD, LOST, NO_FIN, UNKNOWN, hash.as_str()] {
        assert!(!text.contains(secret), "{text}");
    }
    assert_eq!(report["outcomes"][0]["card"], "500118*****0001");
    assert_eq!(report["outcomes"][7]["card"], "500118*****0002");
    assert!(report["outcomes"][8]["message"]
        .as_str()
        .unwrap()
        .contains("`amount_fen` must be an integer"));

    // The same upload again (a lost answer): the same bytes, nothing new.
    let again = upload(&gw, "G-2026-11", "text/csv", &csv).await;
    assert_eq!((again.status, &again.body), (StatusCode::OK, &first.body));
    let stored = gw
        .admin(Method::GET, "/admin/v1/disbursements/G-2026-11", None)
        .await;
    assert_eq!(stored.body, first.body);
    // Another body under the same id is a conflict, as is the same bytes
    // sent as another format.
    let other = upload(&gw, "G-2026-11", "text/csv", &csv.replace("30000", "30001")).await;
    assert_eq!(
        (other.status, error_code(&other)),
        (StatusCode::CONFLICT, "CONFLICT".to_owned())
    );
    // The answer tells the operator what to do: the first batch's
    // accepted records are paid, so only the rejected ones go again.
    let why = other.json()["error"]["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        why.contains("send only those under a new batch id"),
        "{why}"
    );
    let other = upload(&gw, "G-2026-11", "application/x-ndjson", &csv).await;
    assert_eq!(other.status, StatusCode::CONFLICT);

    // The receiver books the two credits once, as negative amounts.
    let l = credited(&sink, r.addr, 2).await;
    assert_eq!(
        (l.credits, l.credited_fen, l.events, l.total_fen),
        (2, 80_000, 2, -80_000),
        "{l:?}"
    );

    // Wages: a roster of three; none paid for November yet.
    let roster = gw
        .admin_ok(
            Method::PUT,
            "/admin/v1/projects/bridge-7/workers",
            Some(json!({"workers": [W1, W2, W3, W1]})),
        )
        .await;
    assert_eq!(roster["workers"], 3);
    let before = unpaid(&gw, "2026-11").await;
    assert_eq!(
        (&before["workers"], &before["paid"]),
        (&json!(3), &json!(0))
    );
    assert_eq!(before["unpaid"].as_array().unwrap().len(), 3);

    // W3's wage is booked to October by mistake; one record lacks its project.
    let nd = [
        json!({"record_id": "w1", "card_no": W1, "amount_fen": 800_000, "programme": "project_wages", "project": "bridge-7", "month": "2026-11"}),
        json!({"record_id": "w2", "card_no": W2, "amount_fen": 800_000, "programme": "project_wages", "project": "bridge-7", "month": "2026-11"}),
        json!({"record_id": "w3", "card_no": W3, "amount_fen": 800_000, "programme": "project_wages", "project": "bridge-7", "month": "2026-10"}),
        json!({"record_id": "w4", "card_no": W3, "amount_fen": 800_000, "programme": "project_wages", "month": "2026-11"}),
    ]
    .iter()
    .map(Value::to_string)
    .collect::<Vec<_>>()
    .join("\n");
    let wages = ok(&upload(&gw, "W-bridge-7-2026-11", "application/x-ndjson", &nd).await);
    assert_eq!(
        outcome_codes(&wages)
            .into_iter()
            .map(|(_, _, c)| c)
            .collect::<Vec<_>>(),
        ["accepted", "accepted", "accepted", "PROJECT_REQUIRED"]
    );
    let after = unpaid(&gw, "2026-11").await;
    assert_eq!(
        (&after["workers"], &after["paid"], &after["credited_fen"]),
        (&json!(3), &json!(2), &json!(1_600_000))
    );
    assert_eq!(
        after["unpaid"],
        json!([{"card_no": W3, "status": "active"}])
    );
    let october = unpaid(&gw, "2026-10").await;
    assert_eq!(october["paid"], 1);

    let l = credited(&sink, r.addr, 5).await;
    assert_eq!((l.credits, l.credited_fen), (5, 2_480_000), "{l:?}");

    // A restart keeps the reports and the wage index; the batch sent again
    // after it is answered from the store and credits nothing more.
    gw.restart().await;
    let stored = gw
        .admin(Method::GET, "/admin/v1/disbursements/G-2026-11", None)
        .await;
    assert_eq!(stored.body, first.body);
    let again = upload(&gw, "G-2026-11", "text/csv", &csv).await;
    assert_eq!(again.body, first.body);
    assert_eq!(unpaid(&gw, "2026-11").await["paid"], 2);
    // One more credit after the restart: settlement goes on from its cursor.
    let last = format!(
        "{{\"record_id\":\"late\",\"card_no\":\"{GOOD}\",\"amount_fen\":1,\"programme\":\"student_grant\"}}\n"
    );
    ok(&upload(&gw, "G-late", "application/json", &last).await);
    let l = credited(&sink, r.addr, 6).await;
    assert_eq!((l.credits, l.credited_fen), (6, 2_480_001), "{l:?}");

    // Each accepted record exactly once in the ledger, with its amount.
    let booked = ledger_credits(&sink);
    let want: BTreeMap<String, (u32, i64, String)> = [
        ("G-2026-11:r1", -50_000, "student_grant"),
        ("G-2026-11:r7", -30_000, "student_grant"),
        ("W-bridge-7-2026-11:w1", -800_000, "project_wages"),
        ("W-bridge-7-2026-11:w2", -800_000, "project_wages"),
        ("W-bridge-7-2026-11:w3", -800_000, "project_wages"),
        ("G-late:late", -1, "student_grant"),
    ]
    .into_iter()
    .map(|(id, fen, p)| (id.to_owned(), (1, fen, p.to_owned())))
    .collect();
    assert_eq!(booked, want);

    // Audited with the operator's name; counted by outcome.
    let audit = gw
        .admin_ok(Method::GET, "/admin/v1/audit?limit=1000", None)
        .await;
    let batches: Vec<&Value> = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "disburse")
        .collect();
    assert_eq!(batches.len(), 3, "{audit}");
    assert!(batches.iter().all(|e| e["who"] == "admin"));
    let metrics = gw.admin(Method::GET, "/metrics", None).await;
    let metrics = String::from_utf8_lossy(&metrics.body).into_owned();
    assert!(
        metrics.contains("onecard_disbursement_records_total{outcome=\"accepted\"}"),
        "{metrics}"
    );
    gw.shutdown().await;
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_that_cannot_be_taken_are_refused_whole() {
    let (_sink, r, gw) = setup().await;
    let line = format!(
        "{{\"record_id\":\"x\",\"card_no\":\"{GOOD}\",\"amount_fen\":1,\"programme\":\"student_grant\"}}"
    );
    let long = "B".repeat(25);
    // Bodies with no record that can be taken: a bad amount, the whole
    // record inside a JSON array.
    let bad_amount = line.replace("\"amount_fen\":1", "\"amount_fen\":1.5");
    let array = format!("[{line}]");
    let cases: Vec<(&str, &str, String, StatusCode, &str)> = vec![
        (
            "B1",
            "text/plain",
            line.clone(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "UNSUPPORTED_MEDIA_TYPE",
        ),
        (
            "B1",
            "text/csv",
            String::new(),
            StatusCode::BAD_REQUEST,
            "INVALID_REQUEST",
        ),
        (
            "B1",
            "text/csv",
            "record_id,card,amount_fen,programme\n".into(),
            StatusCode::BAD_REQUEST,
            "INVALID_REQUEST",
        ),
        (
            "B1",
            "application/x-ndjson",
            vec![line.as_str(); 51].join("\n"),
            StatusCode::PAYLOAD_TOO_LARGE,
            "PAYLOAD_TOO_LARGE",
        ),
        (
            "B/1",
            "application/x-ndjson",
            line.clone(),
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
        ),
        (
            &long,
            "application/x-ndjson",
            line.clone(),
            StatusCode::BAD_REQUEST,
            "INVALID_REQUEST",
        ),
        // `:` would make `a:b` + `c` and `a` + `b:c` the same event id.
        (
            "B:1",
            "application/x-ndjson",
            line.clone(),
            StatusCode::BAD_REQUEST,
            "INVALID_REQUEST",
        ),
        // Bodies without one well-formed record burn no batch id.
        (
            "B1",
            "application/x-ndjson",
            String::new(),
            StatusCode::BAD_REQUEST,
            "INVALID_REQUEST",
        ),
        (
            "B1",
            "application/x-ndjson",
            array.clone(),
            StatusCode::BAD_REQUEST,
            "INVALID_REQUEST",
        ),
        (
            "B1",
            "application/x-ndjson",
            format!("{bad_amount}\n{bad_amount}\n"),
            StatusCode::BAD_REQUEST,
            "INVALID_REQUEST",
        ),
        (
            "B1",
            "text/csv",
            "record_id,card_no,amount_fen,programme\n".into(),
            StatusCode::BAD_REQUEST,
            "INVALID_REQUEST",
        ),
    ];
    for (batch, ct, body, status, code) in cases {
        let a = upload(&gw, batch, ct, &body).await;
        assert_eq!(
            (a.status, error_code(&a)),
            (status, code.to_owned()),
            "{batch} {ct}"
        );
    }
    // The refusals that read the body's lines, and so the card in them
    // (too many records, none well-formed), do not echo it.
    let lower = GOOD.to_lowercase();
    for (body, secret) in [
        (vec![line.as_str(); 51].join("\n"), GOOD),
        (array.clone(), GOOD),
        (format!("{bad_amount}\n"), GOOD),
        (line.replace(GOOD, &lower), lower.as_str()),
    ] {
        let a = upload(&gw, "B1", "application/x-ndjson", &body).await;
        assert!(a.status.is_client_error(), "{}", a.status);
        let text = String::from_utf8_lossy(&a.body).into_owned();
        assert!(!text.contains(secret), "{text}");
    }
    let a = upload(&gw, "B1", "application/x-ndjson", &array).await;
    let why = a.json()["error"]["message"].as_str().unwrap().to_owned();
    assert!(why.contains("this body is a JSON array"), "{why}");
    let a = upload(&gw, "B:1", "application/x-ndjson", &line).await;
    let why = a.json()["error"]["message"].as_str().unwrap().to_owned();
    assert!(why.contains("no `:`"), "{why}");
    // None of those was recorded: B1 is still free.
    let missing = gw
        .admin(Method::GET, "/admin/v1/disbursements/B1", None)
        .await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    ok(&upload(&gw, "B1", "application/x-ndjson", &line).await);
    // The unpaid view needs a roster and a month.
    let none = gw
        .admin(
            Method::GET,
            "/admin/v1/projects/p1/unpaid?month=2026-11",
            None,
        )
        .await;
    assert_eq!(none.status, StatusCode::NOT_FOUND);
    let bad = gw
        .admin(Method::GET, "/admin/v1/projects/p1/unpaid", None)
        .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    let bad = gw
        .admin(
            Method::PUT,
            "/admin/v1/projects/p1/workers",
            Some(json!({"workers": ["not-a-card"]})),
        )
        .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert!(!String::from_utf8_lossy(&bad.body).contains("not-a-card"));
    gw.shutdown().await;
    r.stop().await;
}

fn ndjson(lines: &[Value]) -> String {
    lines
        .iter()
        .map(Value::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

fn grant(id: &str, card: &str) -> Value {
    json!({"record_id": id, "card_no": card, "amount_fen": 100, "programme": "student_grant"})
}

fn wage(id: &str, card: &str, month: &str) -> Value {
    json!({"record_id": id, "card_no": card, "amount_fen": 800_000, "programme": "project_wages", "project": "bridge-7", "month": month})
}

fn message(report: &Value, i: usize) -> String {
    report["outcomes"][i]["message"]
        .as_str()
        .unwrap_or("")
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_card_and_each_workers_month_is_paid_once() {
    const W3_NEW: &str = "500118W00000013";
    let (sink, r, gw) = setup().await;
    let hash = onecard_core::privacy::id_hash(ID_KEY.as_bytes(), PERSONAL_ID);

    // Within one batch: the same card twice under one programme (HELD
    // once by number, once by its holder's hash), a worker twice for one
    // project and month. Another month is another payment.
    let mut g3 = grant("g3", GOOD);
    g3["month"] = "2026-10".into();
    let mut g5 = grant("g5", HELD);
    g5.as_object_mut().unwrap().remove("card_no");
    g5["id_hash"] = hash.clone().into();
    let first = ndjson(&[
        grant("g1", GOOD),
        grant("g2", GOOD),
        g3,
        grant("g4", HELD),
        g5,
        wage("w1", W1, "2026-11"),
        wage("w2", W1, "2026-11"),
        wage("w3", W1, "2026-12"),
        wage("w4", W3, "2026-11"),
    ]);
    let report = ok(&upload(&gw, "P-1", "application/x-ndjson", &first).await);
    assert_eq!(
        outcome_codes(&report)
            .into_iter()
            .map(|(id, _, c)| format!("{id} {c}"))
            .collect::<Vec<_>>(),
        [
            "g1 accepted",
            "g2 DUPLICATE_CARD",
            "g3 accepted",
            "g4 accepted",
            "g5 DUPLICATE_CARD",
            "w1 accepted",
            "w2 DUPLICATE_CARD",
            "w3 accepted",
            "w4 accepted",
        ]
    );
    assert!(message(&report, 1).contains("record `g1`"), "{report}");
    assert_eq!(report["outcomes"][4]["card"], "500118*****0002");
    assert!(message(&report, 4).contains("record `g4`"), "{report}");
    assert!(message(&report, 6).contains("record `w1`"), "{report}");
    let text = report.to_string();
    assert!(!text.contains(HELD) && !text.contains(&hash), "{text}");

    // W3's card is replaced; the roster names the new card. The wage paid
    // to the old card counts: the chain is walked back as well as forward.
    gw.admin_ok(
        Method::POST,
        &format!("/admin/v1/cards/{W3}/replace"),
        Some(json!({"new_card_no": W3_NEW})),
    )
    .await;
    gw.admin_ok(
        Method::PUT,
        "/admin/v1/projects/bridge-7/workers",
        Some(json!({"workers": [W1, W2, W3_NEW]})),
    )
    .await;
    let view = unpaid(&gw, "2026-11").await;
    assert_eq!(
        (&view["workers"], &view["paid"], &view["unpaid"]),
        (
            &json!(3),
            &json!(2),
            &json!([{"card_no": W2, "status": "active"}])
        ),
        "{view}"
    );

    // November again in another batch: W1 and W3 (now on the new card)
    // were paid by P-1; W2 was not.
    let second = ndjson(&[
        wage("n1", W1, "2026-11"),
        wage("n2", W3_NEW, "2026-11"),
        wage("n3", W2, "2026-11"),
    ]);
    let report = ok(&upload(&gw, "P-2", "application/x-ndjson", &second).await);
    assert_eq!(
        outcome_codes(&report)
            .into_iter()
            .map(|(id, _, c)| format!("{id} {c}"))
            .collect::<Vec<_>>(),
        ["n1 ALREADY_PAID", "n2 ALREADY_PAID", "n3 accepted"]
    );
    assert!(message(&report, 0).contains("`P-1:w1`"), "{report}");
    assert!(message(&report, 1).contains("`P-1:w4`"), "{report}");
    let view = unpaid(&gw, "2026-11").await;
    assert_eq!((&view["paid"], &view["unpaid"]), (&json!(3), &json!([])));

    // The receiver books each accepted record once: six of P-1, one of P-2.
    let l = credited(&sink, r.addr, 7).await;
    assert_eq!(
        (l.credits, l.credited_fen),
        (7, 3 * 100 + 4 * 800_000),
        "{l:?}"
    );
    let booked: Vec<String> = ledger_credits(&sink).into_keys().collect();
    assert_eq!(
        booked,
        ["P-1:g1", "P-1:g3", "P-1:g4", "P-1:w1", "P-1:w3", "P-1:w4", "P-2:n3"]
    );
    gw.shutdown().await;
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credits_go_only_to_cards_a_sink_pays() {
    const SICHUAN: &str = "510104D00000001";
    const SICHUAN_UNSEEN: &str = "510104D00000002";
    const SICHUAN_LISTED: &str = "510104D00000003";
    const GUIZHOU: &str = "520102D00000001";
    const BEIJING: &str = "110101D00000001";
    let (sink, r, gw) = setup_regions(true).await;
    let fin = json!({"status": "active", "functions": ["transit", "financial"]});
    for card in [SICHUAN, SICHUAN_LISTED, GUIZHOU, BEIJING] {
        gw.put_card(card, fin.clone()).await;
    }
    let import = client::admin_raw(
        gw.admin_addr(),
        Some(TOKEN),
        Method::PUT,
        "/admin/v1/partners/sichuan/denylist?version=1",
        "application/x-ndjson",
        format!("{{\"card_no\": \"{SICHUAN_LISTED}\"}}\n").into_bytes(),
    )
    .await
    .unwrap();
    ok(&import);

    let body = ndjson(&[
        grant("home", GOOD),
        grant("sichuan", SICHUAN),
        grant("unseen", SICHUAN_UNSEEN),
        grant("listed", SICHUAN_LISTED),
        grant("guizhou", GUIZHOU),
        grant("beijing", BEIJING),
    ]);
    let report = ok(&upload(&gw, "R-1", "application/x-ndjson", &body).await);
    assert_eq!(
        outcome_codes(&report)
            .into_iter()
            .map(|(id, _, c)| format!("{id} {c}"))
            .collect::<Vec<_>>(),
        [
            "home accepted",
            "sichuan accepted",
            "unseen CARD_NOT_FOUND",
            "listed DENYLISTED",
            // The agreement covers payments, but no sink would pay it.
            "guizhou REGION_NOT_ACCEPTED",
            "beijing REGION_NOT_ACCEPTED",
        ]
    );
    assert!(
        message(&report, 3).contains("issuing region's deny list"),
        "{report}"
    );
    assert!(
        message(&report, 4).contains("no settlement sink"),
        "{report}"
    );
    assert!(message(&report, 5).contains("no agreement"), "{report}");

    // Both accepted credits are booked, each by the sink that takes it.
    let l = credited(&sink, r.addr, 2).await;
    assert_eq!((l.credits, l.credited_fen), (2, 200), "{l:?}");
    let bytes = std::fs::read(&sink.ledger_file).unwrap();
    let mut by_sink = BTreeMap::new();
    for line in bytes.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        let v: Value = serde_json::from_slice(line).unwrap();
        let batch = v["ack"]["batch_id"].as_str().unwrap();
        let sink_name = batch.split('-').next().unwrap().to_owned();
        for e in v["events"].as_array().unwrap() {
            by_sink.insert(
                e["event_id"].as_str().unwrap().to_owned(),
                sink_name.clone(),
            );
        }
    }
    assert_eq!(
        by_sink,
        BTreeMap::from([
            ("R-1:home".to_owned(), "payment".to_owned()),
            ("R-1:sichuan".to_owned(), "sichuan".to_owned()),
        ])
    );
    gw.shutdown().await;
    r.stop().await;
}
