//! Card applications over real sockets, with each role's own token: an
//! elderly resident's application by a proxy taken through to pickup; an
//! instant replacement at a counter whose card rides the bus at once with
//! the elderly fare while the old card is declined; a cross-province
//! online application through the resident's channel, its status by the
//! last four ID digits (rate limited), and the overdue list.

use http::{Method, StatusCode};
use onecard::config::{Config, Role, TokenConfig};
use onecard::net::client::{self, Answer, Protocol};
use serde_json::{json, Value};

use crate::common::{decision, error_code, TestGateway};

const COUNTER: &str = "counter-token-hall-0001";
const AGENT: &str = "agent-token-12345-0001";
const CHANNEL: &str = "channel-token-app-0001";
/// Born 31 Dec 1949: elderly.
const ELDER: &str = "11010519491231002X";
/// Born 1 Jan 1980: the elder's son, their proxy.
const SON: &str = "110105198001010016";
/// Born 7 Mar 1990 in Sichuan, a partner province.
const YOUNG: &str = "510104199003070015";

const RULES: &str = r#"
[transit]
passback_s = 30
concessions = { elderly = 0, disabled = 0, student = 50 }
[[transit.routes]]
site = "line-12"
fare = "flat"
base_fen = 200
[[transit.routes]]
site = "line-13"
fare = "flat"
base_fen = 200
"#;

fn setup(c: &mut Config) {
    let r = Config::parse(RULES).unwrap();
    c.transit = r.transit;
    c.privacy.id_hash_key = Some("test-id-hash-key-0123456789".into());
    for (name, role, token) in [
        ("hall-yuzhong-3", Role::Counter, COUNTER),
        ("hotline-12345", Role::Agent, AGENT),
        ("city-app", Role::Channel, CHANNEL),
    ] {
        c.admin.tokens.push(TokenConfig {
            name: name.into(),
            role,
            token: Some(token.into()),
            token_env: None,
        });
    }
}

async fn call(
    gw: &TestGateway,
    token: &str,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> Answer {
    client::admin(gw.admin_addr(), Some(token), method, path, body.as_ref())
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

fn step(s: &str, extra: Value) -> Value {
    let mut v = json!({"step": s});
    v.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    v
}

/// No personal ID in the clear, and no hash of one, in what was answered.
fn no_ids(a: &Answer) {
    let body = String::from_utf8_lossy(&a.body);
    for id in [ELDER, SON, YOUNG] {
        assert!(!body.contains(id), "an ID in the clear: {body}");
    }
    assert!(
        !body.contains("id_hash") && !body.contains("applicant\""),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_elderly_residents_proxy_application_goes_through_to_pickup() {
    let gw = TestGateway::start(setup).await;
    let filing = json!({
        "request_id": "hall-yuzhong-3/0001",
        "personal_id": ELDER,
        "name": "王秀英",
        "channel": "service_hall",
        "place": "Yuzhong service hall",
        "with_business": "pension certification",
        "functions": ["transit", "medical"],
        "proxy": {"personal_id": SON, "name": "王小明", "relation": "child"},
    });
    let a = call(
        &gw,
        COUNTER,
        Method::POST,
        "/admin/v1/applications",
        Some(filing.clone()),
    )
    .await;
    no_ids(&a);
    let v = ok(&a);
    let id = v["id"].as_str().unwrap().to_owned();
    assert_eq!(v["state"], "submitted");
    assert_eq!(v["changed"], true);
    assert_eq!(
        v["priority"], "elderly",
        "served first from the holder's age"
    );
    assert_eq!(v["concessions"], json!(["elderly"]));
    assert_eq!(v["id_masked"], "110105********002X");
    assert_eq!(v["name_masked"], "王**");
    assert_eq!(v["proxy"]["relation"], "child");
    assert_eq!(v["proxy"]["id_masked"], "110105********0016");
    assert_eq!(v["history"][0]["by"], "hall-yuzhong-3");

    // The counter's retry answers the same application; the same request
    // id with another body is refused.
    let again = ok(&call(
        &gw,
        COUNTER,
        Method::POST,
        "/admin/v1/applications",
        Some(filing.clone()),
    )
    .await);
    assert_eq!(
        (again["id"].as_str(), again["changed"].as_bool()),
        (Some(id.as_str()), Some(false))
    );
    let mut other = filing.clone();
    other["place"] = json!("another hall");
    let a = call(
        &gw,
        COUNTER,
        Method::POST,
        "/admin/v1/applications",
        Some(other),
    )
    .await;
    assert_eq!(a.status, StatusCode::CONFLICT);
    assert_eq!(error_code(&a), "IDEMPOTENCY_CONFLICT");

    // The hotline may not approve or issue.
    let steps = format!("/admin/v1/applications/{id}/steps");
    let a = call(
        &gw,
        AGENT,
        Method::POST,
        &steps,
        Some(step("approve", json!({}))),
    )
    .await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    // Out of order: a step that is not next says why.
    let a = call(
        &gw,
        COUNTER,
        Method::POST,
        &steps,
        Some(step("issue", json!({}))),
    )
    .await;
    assert_eq!(a.status, StatusCode::CONFLICT);
    assert!(a.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("ready for pickup"));

    const CARD: &str = "500118P00000001";
    for (s, extra, state) in [
        ("approve", json!({}), "approved"),
        ("produce", json!({"card_no": CARD}), "produced"),
        (
            "ready_for_pickup",
            json!({"branch": "Jiefangbei branch"}),
            "ready_for_pickup",
        ),
    ] {
        let v = ok(&call(&gw, COUNTER, Method::POST, &steps, Some(step(s, extra))).await);
        assert_eq!(v["state"], state, "{s}");
    }
    // Not a card yet: it is handed over at pickup.
    let a = gw
        .admin(Method::GET, &format!("/admin/v1/cards/{CARD}"), None)
        .await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);

    // The son calls the hotline: where is it?
    let found = call(
        &gw,
        AGENT,
        Method::POST,
        "/admin/v1/applications/find",
        Some(json!({"personal_id": ELDER})),
    )
    .await;
    no_ids(&found);
    let found = ok(&found);
    assert_eq!(found["applications"][0]["id"], id.as_str());
    assert_eq!(found["applications"][0]["state"], "ready_for_pickup");
    assert_eq!(
        found["applications"][0]["pickup_branch"],
        "Jiefangbei branch"
    );

    // Picked up: the card is active with its holder and concessions.
    let v = ok(&call(
        &gw,
        COUNTER,
        Method::POST,
        &steps,
        Some(step("issue", json!({}))),
    )
    .await);
    assert_eq!(v["state"], "issued");
    let card = gw
        .admin_ok(Method::GET, &format!("/admin/v1/cards/{CARD}"), None)
        .await;
    assert_eq!(card["status"], "active");
    assert_eq!(card["concessions"], json!(["elderly"]));
    let holder = ok(&call(
        &gw,
        AGENT,
        Method::POST,
        "/admin/v1/cards/find",
        Some(json!({"personal_id": ELDER})),
    )
    .await);
    assert_eq!(holder["card_no"], CARD);
    // Issued twice is the same issuance; closed, it takes no other step.
    let v = ok(&call(
        &gw,
        COUNTER,
        Method::POST,
        &steps,
        Some(step("issue", json!({}))),
    )
    .await);
    assert_eq!(v["changed"], false);
    let a = call(
        &gw,
        COUNTER,
        Method::POST,
        &steps,
        Some(step("withdraw", json!({}))),
    )
    .await;
    assert_eq!(a.status, StatusCode::CONFLICT);

    // Every change is in the application's history and the audit trail.
    let v = ok(&call(
        &gw,
        AGENT,
        Method::GET,
        &format!("/admin/v1/applications/{id}"),
        None,
    )
    .await);
    let trail: Vec<&str> = v["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["step"].as_str().unwrap())
        .collect();
    assert_eq!(
        trail,
        ["submit", "approve", "produce", "ready_for_pickup", "issue"]
    );
    let audit = gw
        .admin_ok(Method::GET, "/admin/v1/audit?limit=50", None)
        .await;
    let body = audit.to_string();
    assert!(!body.contains(ELDER) && !body.contains(SON), "{body}");
    let applications = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "application")
        .count();
    assert_eq!(applications, 5, "{body}");

    // On disk: the journal's write-ahead log holds every write as it was
    // made (uncompressed), the masked ID among them, the clear ones never.
    let files = files_under(gw.dir.path());
    let holds = |needle: &str| {
        files
            .iter()
            .filter(|f| f.windows(needle.len()).any(|w| w == needle.as_bytes()))
            .count()
    };
    assert!(
        holds("110105********002X") > 0,
        "the search sees the records"
    );
    for secret in [ELDER, SON, "19491231", "19800101", "秀英"] {
        assert_eq!(holds(secret), 0, "{secret} is stored in the clear");
    }
    gw.shutdown().await;
}

/// The bytes of every file under `dir`.
fn files_under(dir: &std::path::Path) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                todo.push(p);
            } else if let Ok(bytes) = std::fs::read(&p) {
                out.push(bytes);
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instant_replacement_rides_at_once_with_the_elderly_fare_and_the_old_card_is_declined() {
    let gw = TestGateway::start(setup).await;
    const OLD: &str = "500118P00000010";
    const NEW: &str = "500118P00000011";
    gw.put_card(OLD, json!({"status": "active", "functions": ["transit"]}))
        .await;
    gw.admin_ok(
        Method::PUT,
        &format!("/admin/v1/cards/{OLD}/holder"),
        Some(json!({"personal_id": ELDER})),
    )
    .await;
    let mut t = gw.terminal(1, Protocol::Http1).await;
    let ride = |id: &str, card: &str, site: &str| {
        json!({"event_id": id, "kind": "tap", "card_no": card, "scenario": "transit",
               "site": site, "occurred_at": "2026-11-28T07:45:12Z"})
    };
    let a = t.authorize(&ride("r-1", OLD, "line-13")).await.unwrap();
    assert_eq!(decision(&a), ("approve".into(), "OK".into()));
    assert_eq!(
        a.json()["amount_fen"],
        200,
        "the old card had no concession"
    );

    // Only the holder's replacement is taken.
    let mut filing = json!({
        "request_id": "hall-yuzhong-3/0002",
        "kind": "replacement",
        "replaces": OLD,
        "personal_id": SON,
        "channel": "service_hall",
        "place": "Yuzhong service hall",
        "functions": ["transit"],
        "instant_card_no": NEW,
    });
    let a = call(
        &gw,
        COUNTER,
        Method::POST,
        "/admin/v1/applications",
        Some(filing.clone()),
    )
    .await;
    assert_eq!(
        a.status,
        StatusCode::CONFLICT,
        "{}",
        String::from_utf8_lossy(&a.body)
    );
    // An agent cannot print a card.
    filing["personal_id"] = json!(ELDER);
    filing["request_id"] = json!("hotline/0001");
    let a = call(
        &gw,
        AGENT,
        Method::POST,
        "/admin/v1/applications",
        Some(filing.clone()),
    )
    .await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);

    filing["request_id"] = json!("hall-yuzhong-3/0003");
    let v = ok(&call(
        &gw,
        COUNTER,
        Method::POST,
        "/admin/v1/applications",
        Some(filing),
    )
    .await);
    assert_eq!(v["state"], "issued");
    assert_eq!(v["card_no"], NEW);
    let steps: Vec<&str> = v["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["step"].as_str().unwrap())
        .collect();
    assert_eq!(steps, ["submit", "instant_issue"]);

    // At once: the new card rides free (elderly), the old one is declined.
    // (On another line: the same line within 30 s would be a double tap,
    // the new card carrying the old one's counters.)
    let a = t.authorize(&ride("r-2", NEW, "line-12")).await.unwrap();
    assert_eq!(decision(&a), ("approve".into(), "OK".into()));
    assert_eq!(a.json()["amount_fen"], 0);
    let a = t.authorize(&ride("r-3", OLD, "line-13")).await.unwrap();
    assert_eq!(decision(&a), ("decline".into(), "CARD_CANCELLED".into()));
    let deny = gw
        .admin_ok(Method::GET, &format!("/admin/v1/denylist/{OLD}"), None)
        .await;
    assert_eq!(deny["reason"], "card replaced");
    let found = ok(&call(
        &gw,
        AGENT,
        Method::POST,
        "/admin/v1/cards/find",
        Some(json!({"personal_id": ELDER})),
    )
    .await);
    assert_eq!(found["card_no"], NEW);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cross_province_application_online_its_status_by_four_digits_and_the_overdue_list() {
    let gw = TestGateway::start(setup).await;
    let filing = json!({
        "request_id": "sichuan-gov/7731",
        "personal_id": YOUNG,
        "channel": "partner_province",
        "place": "sichuan",
        "functions": ["transit", "financial"],
    });
    // The resident's channel files online or through a partner only, and
    // never prints a card.
    let mut at_hall = filing.clone();
    at_hall["channel"] = json!("service_hall");
    let a = call(
        &gw,
        CHANNEL,
        Method::POST,
        "/admin/v1/applications",
        Some(at_hall),
    )
    .await;
    assert_eq!(
        a.status,
        StatusCode::FORBIDDEN,
        "{}",
        String::from_utf8_lossy(&a.body)
    );
    let mut instant = filing.clone();
    instant["instant_card_no"] = json!("500118P00000020");
    let a = call(
        &gw,
        CHANNEL,
        Method::POST,
        "/admin/v1/applications",
        Some(instant),
    )
    .await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    let a = call(
        &gw,
        CHANNEL,
        Method::POST,
        "/admin/v1/applications",
        Some(filing),
    )
    .await;
    no_ids(&a);
    let v = ok(&a);
    let id = v["id"].as_str().unwrap().to_owned();
    assert_eq!(v["priority"], Value::Null);
    assert_eq!(v["concessions"], json!([]));
    // Nothing else is open to the channel.
    let a = call(
        &gw,
        CHANNEL,
        Method::GET,
        &format!("/admin/v1/applications/{id}"),
        None,
    )
    .await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    let a = call(
        &gw,
        CHANNEL,
        Method::POST,
        "/admin/v1/applications/find",
        Some(json!({"personal_id": YOUNG})),
    )
    .await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);

    // The resident asks with the last four ID digits: state only.
    let status = |digits: &str| format!("/admin/v1/applications/{id}/status?last4={digits}");
    let v = ok(&call(&gw, CHANNEL, Method::GET, &status("0015"), None).await);
    assert_eq!(
        v,
        json!({"id": id, "state": "submitted", "since": v["since"].clone()})
    );
    // Wrong digits look like an unknown application, and are limited.
    for _ in 0..5 {
        let a = call(&gw, CHANNEL, Method::GET, &status("0016"), None).await;
        assert_eq!(a.status, StatusCode::NOT_FOUND);
    }
    let a = call(&gw, CHANNEL, Method::GET, &status("0015"), None).await;
    assert_eq!(a.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(error_code(&a), "RATE_LIMITED");
    // Locked until the hour ends, and it says so.
    let after: u32 = a.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=3600).contains(&after), "{after}");
    let a = call(
        &gw,
        CHANNEL,
        Method::GET,
        "/admin/v1/applications/AP0000/status?last4=0015",
        None,
    )
    .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);

    // The partner channel's promise is 15 days: overdue on the 16th, and
    // off the list once it moves.
    let overdue = || async {
        ok(&call(
            &gw,
            AGENT,
            Method::GET,
            "/admin/v1/applications/overdue",
            None,
        )
        .await)
    };
    assert_eq!(overdue().await["count"], 0);
    gw.advance_ms(16 * 86_400_000);
    let v = overdue().await;
    assert_eq!(v["count"], 1);
    assert_eq!(v["applications"][0]["id"], id.as_str());
    assert_eq!(v["applications"][0]["promise_days"], 15);
    assert_eq!(v["applications"][0]["days_waiting"], 16);
    ok(&call(
        &gw,
        COUNTER,
        Method::POST,
        &format!("/admin/v1/applications/{id}/steps"),
        Some(step("approve", json!({}))),
    )
    .await);
    assert_eq!(overdue().await["count"], 0);
    // In a later hour the right digits are answered again.
    gw.advance_ms(3_600_000);
    let v = ok(&call(&gw, CHANNEL, Method::GET, &status("0015"), None).await);
    assert_eq!(v["state"], "approved");
    gw.shutdown().await;
}
