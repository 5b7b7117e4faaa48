//! Card life over real sockets: a loss report through the hotline stops the
//! card on every terminal from its answer on, while taps run; roles keep
//! agents to what they may do; replacement carries credentials, holder and
//! counters over; every change and look-up is audited.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use onecard::config::{QrKeyConfig, Role, TokenConfig};
use onecard::net::client::{self, Answer, Protocol};
use serde_json::{json, Value};

use crate::common::qr::{now_s, scan, TestKey};
use crate::common::{decision, error_code, tap, TestGateway};

const CARD: &str = "500118L00000001";
const NEW: &str = "500118L00000002";
const AGENT: &str = "hotline-agent-token-0001";
const ID: &str = "11010519491231002X";

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loss_report_stops_the_card_on_every_terminal_from_its_answer_on() {
    let keys = tempfile::tempdir().unwrap();
    let issuer = TestKey::ed25519(21);
    let key_file = issuer.write_public(keys.path(), "ed-1");
    let gw = TestGateway::start(|c| {
        c.admin.tokens.push(TokenConfig {
            name: "hotline-12345".into(),
            role: Role::Agent,
            token: Some(AGENT.into()),
            token_env: None,
        });
        c.privacy.id_hash_key = Some("test-id-hash-key-0123456789".into());
        c.qr.keys.push(QrKeyConfig {
            kid: "ed-1".into(),
            alg: "ed25519".into(),
            public_key: key_file,
            valid_from: None,
            valid_until: None,
        });
    })
    .await;
    gw.put_card(
        CARD,
        json!({"status": "active", "functions": ["transit"], "concessions": ["student"]}),
    )
    .await;
    gw.bind(CARD, "essc-L1", "essc").await;
    ok(&gw
        .admin(
            Method::PUT,
            &format!("/admin/v1/cards/{CARD}/holder"),
            Some(json!({"personal_id": ID})),
        )
        .await);

    // Three terminals tap the card without pause; each answer is kept with
    // the moment its request was sent.
    let stop = Arc::new(AtomicBool::new(false));
    let answers = Arc::new(AtomicUsize::new(0));
    let mut tappers = Vec::new();
    for n in 1..=3u32 {
        let mut t = gw.terminal(n, Protocol::Http2).await;
        let (stop, answers) = (stop.clone(), answers.clone());
        tappers.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            let mut i = 0u64;
            while !stop.load(Ordering::Acquire) {
                let sent = Instant::now();
                let a = t
                    .authorize(&tap(&format!("t{n}-{i}"), CARD, "transit", 0))
                    .await
                    .unwrap();
                seen.push((sent, decision(&a)));
                answers.fetch_add(1, Ordering::Release);
                i += 1;
            }
            seen
        }));
    }
    // Taps on both sides of the report: wait for answers, not for time.
    let answered_at_least = |n: usize| {
        let answers = answers.clone();
        async move {
            while answers.load(Ordering::Acquire) < n {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    };
    answered_at_least(30).await;

    // The hotline agent finds the card by the caller's ID and reports it lost.
    let found = ok(&as_agent(
        &gw,
        Method::POST,
        "/admin/v1/cards/find",
        Some(json!({"personal_id": ID})),
    )
    .await);
    assert_eq!(found["card_no"], CARD);
    let report = as_agent(
        &gw,
        Method::POST,
        &format!("/admin/v1/cards/{CARD}/loss"),
        Some(json!({"note": "caller lost wallet on line 3"})),
    )
    .await;
    let answered = Instant::now();
    let v = ok(&report);
    assert_eq!(v["status"], "lost");
    assert_eq!(v["denylisted"], true);
    answered_at_least(answers.load(Ordering::Acquire) + 30).await;
    stop.store(true, Ordering::Release);
    let mut before = 0;
    let mut after = 0;
    for t in tappers {
        for (sent, d) in t.await.unwrap() {
            if sent >= answered {
                after += 1;
                assert_eq!(
                    d,
                    ("decline".into(), "CARD_LOST".into()),
                    "a tap sent after the report's answer"
                );
            } else if d.0 == "approve" {
                before += 1;
            }
        }
    }
    assert!(
        before > 0 && after > 0,
        "taps ran on both sides: {before} before, {after} after"
    );

    // A scan of the lost card's code is declined too.
    let mut t = gw.terminal(1, Protocol::Http1).await;
    let code = issuer.code("ed-1", "essc-L1", "essc", now_s(), 60, "jti-L-000001");
    let a = t
        .authorize(&scan("sc-1", &code, "transit", 0))
        .await
        .unwrap();
    assert_eq!(decision(&a), ("decline".into(), "CARD_LOST".into()));

    // The agent may not change anything else.
    for (m, path, body) in [
        (Method::DELETE, format!("/admin/v1/cards/{CARD}/loss"), None),
        (Method::POST, format!("/admin/v1/cards/{CARD}/freeze"), None),
        (
            Method::POST,
            format!("/admin/v1/cards/{CARD}/replace"),
            Some(json!({"new_card_no": NEW})),
        ),
        (
            Method::PUT,
            format!("/admin/v1/cards/{CARD}"),
            Some(json!({"status": "active"})),
        ),
        (Method::GET, "/admin/v1/audit".to_owned(), None),
        (Method::GET, format!("/admin/v1/cards/{CARD}"), None),
    ] {
        let a = as_agent(&gw, m.clone(), &path, body).await;
        assert_eq!(a.status, StatusCode::FORBIDDEN, "{m} {path}");
        assert_eq!(error_code(&a), "FORBIDDEN");
    }
    // An unknown token is refused outright.
    let a = client::admin(
        gw.admin_addr(),
        Some("not-a-token"),
        Method::GET,
        &format!("/admin/v1/cards/{CARD}"),
        None,
    )
    .await
    .unwrap();
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);

    // The operator replaces the card: the new one takes the credentials,
    // the holder, the functions and concessions; the old one is cancelled.
    let v = ok(&gw
        .admin(
            Method::POST,
            &format!("/admin/v1/cards/{CARD}/replace"),
            Some(json!({"new_card_no": NEW})),
        )
        .await);
    assert_eq!(v["status"], "cancelled");
    assert_eq!(v["replaced_by"], NEW);
    let card = ok(&gw
        .admin(Method::GET, &format!("/admin/v1/cards/{NEW}"), None)
        .await);
    assert_eq!(card["status"], "active");
    assert_eq!(card["concessions"], json!(["student"]));
    let creds = ok(&gw
        .admin(
            Method::GET,
            &format!("/admin/v1/cards/{NEW}/credentials"),
            None,
        )
        .await);
    assert_eq!(
        creds["credentials"],
        json!([{"credential_id": "essc-L1", "typ": "essc"}])
    );
    assert_eq!(creds["replaces"], CARD);
    let a = t
        .authorize(&tap("old-1", CARD, "transit", 0))
        .await
        .unwrap();
    assert_eq!(decision(&a), ("decline".into(), "CARD_CANCELLED".into()));
    let code = issuer.code("ed-1", "essc-L1", "essc", now_s(), 60, "jti-L-000002");
    let a = t
        .authorize(&scan("sc-2", &code, "transit", 0))
        .await
        .unwrap();
    assert_eq!(
        decision(&a),
        ("approve".into(), "OK".into()),
        "the code now leads to the new card"
    );
    let found = ok(&as_agent(
        &gw,
        Method::POST,
        "/admin/v1/cards/find",
        Some(json!({"personal_id": ID})),
    )
    .await);
    assert_eq!(found["card_no"], NEW);

    // Replacing again, or into an existing card, is a conflict.
    let a = gw
        .admin(
            Method::POST,
            &format!("/admin/v1/cards/{CARD}/replace"),
            Some(json!({"new_card_no": "500118L00000003"})),
        )
        .await;
    assert_eq!(a.status, StatusCode::CONFLICT);

    // Freeze and unfreeze, and a lift of a loss report that is not there.
    // As `curl -X POST` sends it: no body, no Content-Type.
    let mut raw = client::Connection::plain(gw.admin_addr(), Protocol::Http1)
        .await
        .unwrap();
    let auth = format!("Bearer {}", crate::common::TOKEN);
    ok(&raw
        .send(
            Method::POST,
            &format!("/admin/v1/cards/{NEW}/freeze"),
            &[("authorization", auth.as_str())],
            Vec::new(),
        )
        .await
        .unwrap());
    let a = t.authorize(&tap("new-1", NEW, "transit", 0)).await.unwrap();
    assert_eq!(decision(&a), ("decline".into(), "CARD_FROZEN".into()));
    ok(&gw
        .admin(
            Method::DELETE,
            &format!("/admin/v1/cards/{NEW}/freeze"),
            None,
        )
        .await);
    let a = t.authorize(&tap("new-2", NEW, "transit", 0)).await.unwrap();
    assert_eq!(decision(&a), ("approve".into(), "OK".into()));
    let a = gw
        .admin(Method::DELETE, &format!("/admin/v1/cards/{NEW}/loss"), None)
        .await;
    assert_eq!(a.status, StatusCode::CONFLICT);
    let deny = gw
        .admin(Method::GET, &format!("/admin/v1/denylist/{NEW}"), None)
        .await;
    assert_eq!(
        deny.status,
        StatusCode::NOT_FOUND,
        "unfreezing lifted the freeze's deny entry"
    );

    // The hotline look-up of the new card shows the old card's taps too,
    // masked, with their settlement state; it is audited.
    let look = ok(&as_agent(
        &gw,
        Method::GET,
        &format!("/admin/v1/cards/{NEW}/transactions?limit=500"),
        None,
    )
    .await);
    let txs = look["transactions"].as_array().unwrap();
    assert!(txs.iter().any(|t| t["card_no"] == NEW));
    let old: Vec<&Value> = txs.iter().filter(|t| t["card_no"] != NEW).collect();
    assert!(!old.is_empty());
    assert!(
        old.iter().all(|t| t["card_no"] == "500118*****0001"),
        "{:?}",
        old[0]
    );
    assert!(
        txs.iter().all(|t| t["settlement"] == "none"),
        "free rides are not settled"
    );
    let bad = as_agent(
        &gw,
        Method::GET,
        &format!("/admin/v1/cards/{NEW}/transactions?from=yesterday"),
        None,
    )
    .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);

    let audit = ok(&gw
        .admin(Method::GET, "/admin/v1/audit?limit=100", None)
        .await);
    let entries = audit["entries"].as_array().unwrap();
    let who = |action: &str| -> Vec<String> {
        entries
            .iter()
            .filter(|e| e["action"] == action)
            .map(|e| e["who"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(who("report_loss"), ["hotline-12345"]);
    assert_eq!(who("replace"), ["admin"]);
    assert_eq!(who("transactions"), ["hotline-12345"]);
    assert_eq!(who("find").len(), 2);
    let text = serde_json::to_string(&audit).unwrap();
    assert!(
        !text.contains(ID) && !text.contains("19491231"),
        "no personal ID in the audit"
    );
    gw.shutdown().await;
}
