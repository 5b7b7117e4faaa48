//! The scenarios of the one card over real sockets: each one's main flow
//! and its main refusal, under the pilot's rules (a config like
//! `config/dev.toml`), and the settlement of what they charge to the right
//! sink (a real receiver).

use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use onecard::config::Config;
use onecard::net::client::Protocol;
use serde_json::{json, Value};

use onecard_core::settle::sign::{Algorithm, Signer};

use crate::common::sink::Sink;
use crate::common::{decision, error_code, TestGateway};

const RULES: &str = r#"
[policy]
card_daily_spend_max_fen = 100000
[transit]
passback_s = 30
transfer_window_s = 3600
transfer_off_fen = 100
transfers_max = 1
cap_daily_fen = 500
concessions = { elderly = 0, disabled = 0, student = 50 }
[[transit.routes]]
site = "line-12"
fare = "flat"
base_fen = 200
[[transit.routes]]
site = "line-13"
fare = "flat"
base_fen = 200
[[transit.routes]]
site = "metro-1"
fare = "stops"
base_fen = 300
base_units = 6
step_fen = 100
step_units = 4
[culture]
concessions = { elderly = 0, student = 50 }
[[culture.venues]]
site = "museum-1"
quota_daily = 2
fee_fen = 3000
[access]
controlled_site_prefixes = ["community-"]
[identity.purposes.government]
disclose = ["name", "region"]
[[identity.counters]]
terminal_prefix = "term-00002"
purpose = "government"
[payment]
bill_ref_required = true
[regions]
home = ["50"]
[[regions.partners]]
name = "sichuan"
prefixes = ["51"]
scenarios = ["transit", "culture"]
"#;

/// Copies the scenario sections of [`RULES`] into a test config.
fn pilot(c: &mut Config) {
    let r = Config::parse(RULES).unwrap();
    c.policy = r.policy;
    c.transit = r.transit;
    c.culture = r.culture;
    c.access = r.access;
    c.identity = r.identity;
    c.payment = r.payment;
    c.regions = r.regions;
}

const ADULT: &str = "500118T00000001";
const STUDENT: &str = "500118T00000002";
const ELDERLY: &str = "500118T00000003";
const SICHUAN: &str = "510104T00000009";
const BEIJING: &str = "110101T00000001";

async fn cards(gw: &TestGateway) {
    for (card, concessions) in [
        (ADULT, json!([])),
        (STUDENT, json!(["student"])),
        (ELDERLY, json!(["elderly"])),
    ] {
        gw.put_card(
            card,
            json!({"status": "active", "functions": ["transit", "financial", "medical"], "concessions": concessions}),
        )
        .await;
    }
}

fn event(id: &str, card: &str, scenario: &str, site: Option<&str>) -> Value {
    let mut v = json!({"event_id": id, "kind": "tap", "card_no": card, "scenario": scenario});
    if let Some(s) = site {
        v["site"] = s.into();
    }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transit_fares_concessions_transfers_caps_and_double_taps() {
    let gw = TestGateway::start(pilot).await;
    cards(&gw).await;
    let mut t = gw.terminal(1, Protocol::Http1).await;
    let ride = |id: &str, card: &str, site: &str, extra: Value| {
        let mut e = event(id, card, "transit", Some(site));
        if let Value::Object(m) = extra {
            e.as_object_mut().unwrap().extend(m);
        }
        e
    };
    // The adult's day: a flat fare, a transfer, a ride by stops that
    // reaches the daily cap, then a free ride; the fare says why each time.
    let day = [
        ride("t-1", ADULT, "line-12", json!({})),
        ride("t-2", ADULT, "line-13", json!({})),
        ride("t-3", ADULT, "metro-1", json!({"stops": 10})),
        ride("t-4", ADULT, "line-12", json!({})),
    ];
    let mut charged = Vec::new();
    let mut fares = Vec::new();
    for e in &day {
        let a = t.authorize(e).await.unwrap();
        assert_eq!(decision(&a), ("approve".into(), "OK".into()));
        let v = a.json();
        assert_eq!(v["amount_fen"], v["fare"]["charged_fen"]);
        charged.push(v["amount_fen"].as_i64().unwrap());
        fares.push(v["fare"].clone());
    }
    assert_eq!(charged, [200, 100, 200, 0]);
    assert_eq!(fares[0], json!({"base_fen": 200, "charged_fen": 200}));
    assert_eq!(
        fares[1],
        json!({"base_fen": 200, "transfer_off_fen": 100, "charged_fen": 100})
    );
    assert_eq!(
        fares[2],
        json!({"base_fen": 400, "cap": "daily", "cap_off_fen": 200, "charged_fen": 200})
    );
    assert_eq!(fares[3]["cap"], "daily");

    // A double tap at the same site is declined and charges nothing.
    let again = t
        .authorize(&ride("t-5", ADULT, "line-12", json!({})))
        .await
        .unwrap();
    assert_eq!(decision(&again), ("decline".into(), "DUPLICATE_TAP".into()));
    assert_eq!(again.json()["amount_fen"], 0);
    // Retrying an event replays it; it is not a double tap.
    let retry = t.authorize(&day[0]).await.unwrap();
    assert_eq!(retry.json()["amount_fen"], 200);

    // Concessions: students pay half, the elderly ride free.
    let s = t
        .authorize(&ride("t-6", STUDENT, "line-12", json!({})))
        .await
        .unwrap();
    assert_eq!(s.json()["amount_fen"], 100);
    assert_eq!(s.json()["fare"]["concession"], "student");
    let e = t
        .authorize(&ride("t-7", ELDERLY, "line-12", json!({})))
        .await
        .unwrap();
    assert_eq!(decision(&e), ("approve".into(), "OK".into()));
    assert_eq!(e.json()["amount_fen"], 0);

    // The route's tariff needs the distance; a flat route refuses one.
    let no_stops = t
        .authorize(&ride("t-8", STUDENT, "metro-1", json!({})))
        .await
        .unwrap();
    assert_eq!(no_stops.status, StatusCode::BAD_REQUEST);
    assert!(no_stops.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("`stops`"));
    let flat = t
        .authorize(&ride("t-9", STUDENT, "line-13", json!({"zones": 2})))
        .await
        .unwrap();
    assert_eq!(error_code(&flat), "INVALID_REQUEST");

    // The journal and the card remember: a restart keeps anti-passback
    // and the cap.
    let mut gw = gw;
    gw.restart().await;
    let mut t = gw.terminal(1, Protocol::Http1).await;
    let after = t
        .authorize(&ride("t-10", ADULT, "line-12", json!({})))
        .await
        .unwrap();
    assert_eq!(decision(&after), ("decline".into(), "DUPLICATE_TAP".into()));
    let capped = t
        .authorize(&ride("t-11", ADULT, "line-13", json!({})))
        .await
        .unwrap();
    assert_eq!(capped.json()["amount_fen"], 0);
    assert_eq!(capped.json()["fare"]["cap"], "daily");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn culture_quotas_concessions_and_visits() {
    let gw = TestGateway::start(pilot).await;
    cards(&gw).await;
    let mut t = gw.terminal(1, Protocol::Http1).await;
    let a = t
        .authorize(&event("c-1", STUDENT, "culture", Some("museum-1")))
        .await
        .unwrap();
    assert_eq!(decision(&a), ("approve".into(), "OK".into()));
    let v = a.json();
    assert_eq!(v["amount_fen"], 1500);
    assert_eq!(v["fare"]["concession"], "student");
    assert_eq!(v["visits"], 1);
    let b = t
        .authorize(&event("c-2", ELDERLY, "culture", Some("museum-1")))
        .await
        .unwrap();
    assert_eq!(b.json()["amount_fen"], 0);
    // The day's quota of two is used up.
    let full = t
        .authorize(&event("c-3", ADULT, "culture", Some("museum-1")))
        .await
        .unwrap();
    assert_eq!(
        decision(&full),
        ("decline".into(), "QUOTA_EXHAUSTED".into())
    );
    // A venue without a quota still takes the card, and its visits count.
    let mut lib = event("c-4", STUDENT, "culture", Some("library-7"));
    lib["amount_fen"] = 0.into();
    let l = t.authorize(&lib).await.unwrap();
    assert_eq!(l.json()["visits"], 2);
    let venues = gw.admin_ok(Method::GET, "/admin/v1/venues", None).await;
    assert_eq!(
        venues["venues"],
        json!([{"site": "museum-1", "quota_daily": 2, "entries_today": 2, "left_today": 0}])
    );
    // The count survives a restart: the quota stays used up.
    let mut gw = gw;
    gw.restart().await;
    let mut t = gw.terminal(1, Protocol::Http1).await;
    let still = t
        .authorize(&event("c-5", ADULT, "culture", Some("museum-1")))
        .await
        .unwrap();
    assert_eq!(
        decision(&still),
        ("decline".into(), "QUOTA_EXHAUSTED".into())
    );
    gw.shutdown().await;
}

/// `HH:MM-HH:MM` from `from_h` to `to_h` hours after now, local (+08:00).
fn window(from_h: i64, to_h: i64) -> String {
    let now =
        time::OffsetDateTime::now_utc().to_offset(time::UtcOffset::from_hms(8, 0, 0).unwrap());
    let at = |h: i64| {
        let t = now + time::Duration::hours(h);
        format!("{:02}:{:02}", t.hour(), t.minute())
    };
    format!("{}-{}", at(from_h), at(to_h))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doors_open_for_their_allow_list_within_its_hours() {
    let gw = TestGateway::start(pilot).await;
    cards(&gw).await;
    let door = "community-12-east";
    let set = gw
        .admin_ok(
            Method::POST,
            &format!("/admin/v1/access/{door}/allow"),
            Some(json!({"add": [
                {"card_no": ADULT},
                {"card_no": STUDENT, "windows": [window(2, 3)]},
                {"card_no": ELDERLY, "windows": [window(-1, 1)]},
            ]})),
        )
        .await;
    assert_eq!(set["set"], 3);
    let mut t = gw.terminal(1, Protocol::Http1).await;
    let tap = |id: &str, card: &str, site: &str| event(id, card, "access", Some(site));
    let cases = [
        ("a-1", ADULT, door, "approve", "OK"),
        ("a-2", ELDERLY, door, "approve", "OK"),
        ("a-3", STUDENT, door, "decline", "OUTSIDE_HOURS"),
        // A resident of one community does not open another's doors.
        ("a-4", ADULT, "community-7-north", "decline", "NOT_ALLOWED"),
        // An uncontrolled gate (a bus station) takes any active card.
        ("a-5", STUDENT, "bus-station-3", "approve", "OK"),
    ];
    for (id, card, site, want, reason) in cases {
        let a = t.authorize(&tap(id, card, site)).await.unwrap();
        assert_eq!(decision(&a), (want.into(), reason.into()), "{id}");
    }
    // Removing a card closes the door to it; the list says who is on it.
    gw.admin_ok(
        Method::POST,
        &format!("/admin/v1/access/{door}/allow"),
        Some(json!({"remove": [ADULT]})),
    )
    .await;
    let a = t.authorize(&tap("a-6", ADULT, door)).await.unwrap();
    assert_eq!(decision(&a), ("decline".into(), "NOT_ALLOWED".into()));
    let list = gw
        .admin_ok(Method::GET, &format!("/admin/v1/access/{door}/allow"), None)
        .await;
    assert_eq!(list["entries"].as_array().unwrap().len(), 2);
    // Bad input is named; an uncontrolled site's list is refused.
    let bad = gw
        .admin(
            Method::POST,
            &format!("/admin/v1/access/{door}/allow"),
            Some(json!({"add": [{"card_no": ADULT, "windows": ["25:00-26:00"]}]})),
        )
        .await;
    assert_eq!(error_code(&bad), "INVALID_REQUEST");
    let open = gw
        .admin(
            Method::POST,
            "/admin/v1/access/bus-station-3/allow",
            Some(json!({"add": [{"card_no": ADULT}]})),
        )
        .await;
    assert_eq!(error_code(&open), "INVALID_REQUEST");
    // A door must say which site it is.
    let no_site = t
        .authorize(&event("a-7", ADULT, "access", None))
        .await
        .unwrap();
    assert_eq!(error_code(&no_site), "INVALID_REQUEST");
    // The lists survive a restart.
    let mut gw = gw;
    gw.restart().await;
    let mut t = gw.terminal(1, Protocol::Http1).await;
    let a = t
        .authorize(&event("a-8", ELDERLY, "access", Some(door)))
        .await
        .unwrap();
    assert_eq!(decision(&a), ("approve".into(), "OK".into()));
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_and_health_disclose_only_what_the_counter_needs() {
    let gw = TestGateway::start(|c| {
        pilot(c);
        c.privacy.id_hash_key = Some("test-id-hash-key-0001".into());
    })
    .await;
    cards(&gw).await;
    let holder = gw
        .admin_ok(
            Method::PUT,
            &format!("/admin/v1/cards/{ADULT}/holder"),
            Some(json!({"personal_id": "11010519491231002X", "name": "张三丰"})),
        )
        .await;
    assert_eq!(holder["name"], "张**");
    // A government hall's counter (terminal 2) sees the masked name and
    // the region; any other terminal only that the card is genuine.
    let mut hall = gw.terminal(2, Protocol::Http1).await;
    let a = hall
        .authorize(&event("i-1", ADULT, "identity", Some("window-3")))
        .await
        .unwrap();
    assert_eq!(decision(&a), ("approve".into(), "OK".into()));
    assert_eq!(
        a.json()["identity"],
        json!({"purpose": "government", "verified": true, "name": "张**", "region": "500118"})
    );
    let mut gate = gw.terminal(1, Protocol::Http1).await;
    let b = gate
        .authorize(&event("i-2", ADULT, "identity", None))
        .await
        .unwrap();
    assert_eq!(
        b.json()["identity"],
        json!({"purpose": "verify", "verified": true})
    );
    let body = String::from_utf8_lossy(&a.body).to_string() + &String::from_utf8_lossy(&b.body);
    assert!(
        !body.contains("110105") && !body.contains("张三丰"),
        "{body}"
    );
    // A lost card proves nothing.
    gw.admin_ok(
        Method::POST,
        &format!("/admin/v1/cards/{STUDENT}/loss"),
        None,
    )
    .await;
    let lost = hall
        .authorize(&event("i-3", STUDENT, "identity", None))
        .await
        .unwrap();
    assert_eq!(decision(&lost), ("decline".into(), "CARD_LOST".into()));
    assert!(lost.json().get("identity").is_none());

    // Health: unknown until reported; then the colour, the flag and when.
    let h = gate
        .authorize(&event("h-1", ADULT, "health", None))
        .await
        .unwrap();
    assert_eq!(
        h.json()["health"],
        json!({"colour": "unknown", "vaccinated": false})
    );
    let set = gw
        .admin_ok(
            Method::PUT,
            &format!("/admin/v1/cards/{ADULT}/health"),
            Some(json!({"colour": "green", "vaccinated": true})),
        )
        .await;
    assert_eq!(set["health"]["colour"], "green");
    let h = gate
        .authorize(&event("h-2", ADULT, "health", None))
        .await
        .unwrap();
    let health = h.json()["health"].clone();
    assert_eq!(health["colour"], "green");
    assert_eq!(health["vaccinated"], true);
    assert!(health["updated_at"].as_str().unwrap().ends_with('Z'));
    assert_eq!(
        health.as_object().unwrap().len(),
        3,
        "nothing more: {health}"
    );
    let bad = gw
        .admin(
            Method::PUT,
            &format!("/admin/v1/cards/{ADULT}/health"),
            Some(json!({"colour": "purple", "vaccinated": true})),
        )
        .await;
    assert_eq!(error_code(&bad), "INVALID_REQUEST");
    // The audit names who changed it.
    let audit = gw.admin_ok(Method::GET, "/admin/v1/audit", None).await;
    assert!(audit.to_string().contains("\"health\""));
    gw.shutdown().await;
}

/// Waits (up to 60 s) until the receiver's ledger file holds `n` lines.
async fn ledger_events(sink: &Sink, n: usize) -> Vec<(String, Value)> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let lines: Vec<(String, Value)> = std::fs::read_to_string(&sink.ledger_file)
            .unwrap_or_default()
            .split_inclusive('\n')
            .filter(|l| l.ends_with('\n'))
            .flat_map(|l| {
                let v: Value = serde_json::from_str(l).unwrap();
                // Batch ids are `<sink>-<first seq>-<last seq>`.
                let id = v["ack"]["batch_id"].as_str().unwrap_or_default();
                let name = id.split('-').next().unwrap_or_default().to_owned();
                v["events"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|e| (name.clone(), e.clone()))
                    .collect::<Vec<_>>()
            })
            .collect();
        if lines.len() >= n || Instant::now() > deadline {
            return lines;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partner_cards_ride_under_their_own_list_and_settle_apart_and_bills_carry_their_reference()
{
    let dir = tempfile::tempdir().unwrap();
    let sink = Sink::new(dir.path(), 3);
    let key = "scenario-settlement-key-01";
    let r = sink
        .start(
            "127.0.0.1:0".parse().unwrap(),
            Signer::new(Algorithm::HmacSha256, key.as_bytes().to_vec()),
        )
        .await;
    let sinks = |name: &str, scenarios: &str, partners: &str| {
        toml::from_str::<onecard::config::SinkConfig>(&format!(
            "name = \"{name}\"\nurl = \"https://127.0.0.1:{}/v1/batches\"\nca = \"{}\"\nscenarios = {scenarios}\npartners = {partners}\nkey = \"{key}\"\nage_max_ms = 100\n",
            r.addr.port(),
            sink.certs.join(onecard::net::certs::CA_CERT).display()
        ))
        .unwrap()
    };
    let gw = TestGateway::start(|c| {
        pilot(c);
        c.settlement.sinks = vec![
            sinks("transport", "[\"transit\", \"culture\"]", "[]"),
            sinks("payment", "[\"payment\"]", "[]"),
            sinks("sichuan", "[\"transit\", \"culture\"]", "[\"sichuan\"]"),
        ];
    })
    .await;
    cards(&gw).await;
    let mut t = gw.terminal(1, Protocol::Http1).await;
    // A Sichuan card rides without being registered here; a Beijing card,
    // with no agreement, does not; nor does a Sichuan card at a hospital.
    let p = t
        .authorize(&event("p-1", SICHUAN, "transit", Some("line-12")))
        .await
        .unwrap();
    assert_eq!(decision(&p), ("approve".into(), "OK".into()));
    assert_eq!(p.json()["amount_fen"], 200);
    let b = t
        .authorize(&event("p-2", BEIJING, "transit", Some("line-12")))
        .await
        .unwrap();
    assert_eq!(
        decision(&b),
        ("decline".into(), "REGION_NOT_ACCEPTED".into())
    );
    let mut med = event("p-3", SICHUAN, "medical", None);
    med["amount_fen"] = 1000.into();
    let m = t.authorize(&med).await.unwrap();
    assert_eq!(
        decision(&m),
        ("decline".into(), "REGION_NOT_ACCEPTED".into())
    );
    // Anti-passback holds for partner cards too.
    let twice = t
        .authorize(&event("p-4", SICHUAN, "transit", Some("line-12")))
        .await
        .unwrap();
    assert_eq!(decision(&twice), ("decline".into(), "DUPLICATE_TAP".into()));

    // The partner's deny list, imported whole with its own version.
    let import = |version: u64, body: String| {
        let addr = gw.admin_addr();
        async move {
            onecard::net::client::admin_raw(
                addr,
                Some(crate::common::TOKEN),
                Method::PUT,
                &format!("/admin/v1/partners/sichuan/denylist?version={version}"),
                "application/x-ndjson",
                body.into_bytes(),
            )
            .await
            .unwrap()
        }
    };
    let listed = format!("{{\"card_no\": \"{SICHUAN}\"}}\n{{\"card_no\": \"510104T00000010\"}}\n");
    let a = import(3, listed.clone()).await;
    assert_eq!(
        a.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&a.body)
    );
    assert_eq!(a.json()["entries"], 2);
    assert_eq!(import(3, listed).await.json()["unchanged"], true);
    let older = import(2, String::new()).await;
    assert_eq!(error_code(&older), "CONFLICT");
    let not_theirs = import(4, format!("{{\"card_no\": \"{ADULT}\"}}\n")).await;
    assert_eq!(error_code(&not_theirs), "INVALID_REQUEST");
    assert!(!String::from_utf8_lossy(&not_theirs.body).contains(ADULT));
    let d = t
        .authorize(&event("p-5", SICHUAN, "transit", Some("line-13")))
        .await
        .unwrap();
    assert_eq!(decision(&d), ("decline".into(), "DENYLISTED".into()));
    let state = gw
        .admin_ok(Method::GET, "/admin/v1/partners/sichuan/denylist", None)
        .await;
    assert_eq!(
        (state["version"].as_u64(), state["entries"].as_u64()),
        (Some(3), Some(2))
    );

    // A bill payment needs its reference and carries it to the payment sink.
    let mut bill = event("b-1", ADULT, "payment", None);
    bill["amount_fen"] = 8_850.into();
    let no_ref = t.authorize(&bill).await.unwrap();
    assert_eq!(error_code(&no_ref), "INVALID_REQUEST");
    bill["bill_ref"] = "WATER-2026-11-000123".into();
    let paid = t.authorize(&bill).await.unwrap();
    assert_eq!(decision(&paid), ("approve".into(), "OK".into()));
    let home = t
        .authorize(&event("h-1", ADULT, "transit", Some("line-12")))
        .await
        .unwrap();
    assert_eq!(home.json()["amount_fen"], 200);

    let events = ledger_events(&sink, 3).await;
    let find = |id: &str| events.iter().find(|(_, e)| e["event_id"] == id).cloned();
    let (s, e) = find("p-1").expect("the partner's ride is settled");
    assert_eq!(
        (s.as_str(), e["amount_fen"].as_i64()),
        ("sichuan", Some(200))
    );
    assert_eq!(find("b-1").unwrap().0, "payment");
    assert_eq!(find("b-1").unwrap().1["bill_ref"], "WATER-2026-11-000123");
    assert_eq!(find("h-1").unwrap().0, "transport");
    assert_eq!(
        events.len(),
        3,
        "each charge once, declines never: {events:?}"
    );
    // The partner's list survives a restart.
    let mut gw = gw;
    gw.restart().await;
    let mut t = gw.terminal(1, Protocol::Http1).await;
    let mut entry = event("p-6", SICHUAN, "culture", Some("library-7"));
    entry["amount_fen"] = 0.into();
    let d = t.authorize(&entry).await.unwrap();
    assert_eq!(decision(&d), ("decline".into(), "DENYLISTED".into()));
    gw.shutdown().await;
    r.stop().await;
}
