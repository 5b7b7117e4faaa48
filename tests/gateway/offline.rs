//! Offline validators over real sockets: deny-list deltas that bring a
//! validator to exactly the gateway's list, and uploads of taps decided
//! offline (duplicates ignored, conflicts and bad events named, taps of
//! cards deny-listed before the tap counted as risk).

use std::collections::BTreeSet;

use http::{Method, StatusCode};
use onecard::net::client::{Answer, Connection, Protocol};
use serde_json::{json, Value};

use onecard_core::rng::Rng;

use crate::common::TestGateway;

async fn sync(t: &mut Connection, since: Option<u64>, etag: Option<&str>) -> Answer {
    match etag {
        None => t.denylist(since).await.unwrap(),
        Some(e) => t
            .send(
                Method::GET,
                "/v1/denylist",
                &[("if-none-match", e)],
                Vec::new(),
            )
            .await
            .unwrap(),
    }
}

fn card(i: u64) -> String {
    format!("500118V{i:08}")
}

/// A validator's copy of the list, kept by applying what the gateway sends.
#[derive(Default)]
struct Validator {
    version: Option<u64>,
    list: BTreeSet<String>,
    full_syncs: u32,
}

impl Validator {
    async fn sync(&mut self, t: &mut Connection) {
        let a = sync(t, self.version, None).await;
        if a.status == StatusCode::NOT_MODIFIED {
            assert!(a.body.is_empty());
            return;
        }
        assert_eq!(
            a.status,
            StatusCode::OK,
            "{}",
            String::from_utf8_lossy(&a.body)
        );
        let v = a.json();
        let version = v["version"].as_u64().unwrap();
        assert_eq!(
            a.headers.get("etag").unwrap().to_str().unwrap(),
            format!("\"dl-{version}\"")
        );
        let names = |k: &str| -> Vec<String> {
            v[k].as_array()
                .unwrap()
                .iter()
                .map(|c| c.as_str().unwrap().to_owned())
                .collect()
        };
        if v["full"] == true {
            self.full_syncs += 1;
            self.list = names("add").into_iter().collect();
        } else {
            for c in names("remove") {
                self.list.remove(&c);
            }
            self.list.extend(names("add"));
        }
        self.version = Some(version);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_validator_replaying_deltas_ends_with_exactly_the_gateways_list() {
    let gw = TestGateway::start(|_| {}).await;
    for i in 0..20 {
        gw.put_card(
            &card(i),
            json!({"status": "active", "functions": ["transit"]}),
        )
        .await;
    }
    let mut t = gw.terminal(1, Protocol::Http2).await;
    // Validators that sync at different moments from version 0.
    let mut validators: Vec<Validator> = (0..3)
        .map(|_| Validator {
            version: Some(0),
            ..Validator::default()
        })
        .collect();
    let mut rng = Rng::new(5);
    for step in 0..120 {
        let c = card(rng.below(20));
        // Operators' own entries, and card-life changes that list cards.
        let (m, path) = match rng.below(6) {
            0 | 1 => (Method::PUT, format!("/admin/v1/denylist/{c}")),
            2 => (Method::DELETE, format!("/admin/v1/denylist/{c}")),
            3 => (Method::POST, format!("/admin/v1/cards/{c}/loss")),
            4 => (Method::DELETE, format!("/admin/v1/cards/{c}/loss")),
            _ => (Method::POST, format!("/admin/v1/cards/{c}/freeze")),
        };
        let body = (m == Method::PUT).then(|| json!({"reason": "fraud"}));
        let a = gw.admin(m.clone(), &path, body).await;
        assert!(
            [StatusCode::OK, StatusCode::NOT_FOUND, StatusCode::CONFLICT].contains(&a.status),
            "{m} {path}: {}",
            String::from_utf8_lossy(&a.body)
        );
        let v = &mut validators[(step % 3) as usize];
        if rng.below(4) == 0 {
            v.sync(&mut t).await;
        }
    }
    // Everything the gateway lists, from its own full answer.
    let full = sync(&mut t, None, None).await.json();
    let truth: BTreeSet<String> = full["add"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().to_owned())
        .collect();
    assert!(!truth.is_empty());
    for v in &mut validators {
        v.sync(&mut t).await;
        assert_eq!(v.list, truth);
        assert_eq!(v.version, full["version"].as_u64());
        assert_eq!(v.full_syncs, 0, "deltas sufficed");
    }
    // Current: 304 by version and by ETag.
    let version = full["version"].as_u64().unwrap();
    assert_eq!(
        sync(&mut t, Some(version), None).await.status,
        StatusCode::NOT_MODIFIED
    );
    let tag = format!("\"dl-{version}\"");
    assert_eq!(
        sync(&mut t, None, Some(&tag)).await.status,
        StatusCode::NOT_MODIFIED
    );
    // A version this gateway never had gets the full list.
    let ahead = sync(&mut t, Some(version + 1_000), None).await.json();
    assert_eq!(ahead["full"], true);
    // A bad version is a clear error.
    let bad = t
        .send(Method::GET, "/v1/denylist?since=-1", &[], Vec::new())
        .await
        .unwrap();
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    gw.shutdown().await;
}

fn offline_tap(id: &str, card: &str, fen: i64, at: &str, decision: &str) -> Value {
    let mut v = json!({
        "event_id": id, "kind": "tap", "card_no": card, "scenario": "transit",
        "amount_fen": fen, "site": "bus-88", "occurred_at": at, "decision": decision,
    });
    if decision == "decline" {
        v["reason"] = json!("DENYLISTED");
    }
    v
}

fn rfc3339(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_uploads_are_idempotent_and_count_risk() {
    let gw = TestGateway::start(|c| c.offline.terminal_prefixes = vec!["term-".into()]).await;
    let (good, stolen, later) = (card(1), card(2), card(3));
    for c in [&good, &stolen, &later] {
        gw.put_card(c, json!({"status": "active", "functions": ["transit"]}))
            .await;
    }
    let now = onecard_core::time::wall_ms();
    // `stolen` was listed an hour before its taps; `later` only after its tap.
    gw.deny(&stolen).await;
    let tap_time = rfc3339(now + 1_000);
    let early = rfc3339(now - 3_600_000);
    let mut t = gw.terminal(2, Protocol::Http1).await;
    let upload = |events: Vec<Value>| json!({ "events": events });
    let first = upload(vec![
        offline_tap("o-1", &good, 200, &tap_time, "approve"),
        offline_tap("o-2", &stolen, 200, &tap_time, "approve"),
        offline_tap("o-3", &stolen, 300, &tap_time, "approve"),
        offline_tap("o-4", &later, 200, &early, "approve"),
        offline_tap("o-5", &stolen, 200, &tap_time, "decline"),
        json!({"event_id": "o-6", "kind": "tap", "card_no": good, "scenario": "transit", "amount_fen": 200, "decision": "approve"}),
        offline_tap("o-7", "not-a-card", 200, &tap_time, "approve"),
        offline_tap("o-8", &good, 200, &rfc3339(now + 86_400_000), "approve"),
        offline_tap("o-10", &good, 1_000_000, &tap_time, "approve"),
        json!({"event_id": "o-11", "kind": "tap", "card_no": good, "scenario": "access", "amount_fen": 5,
               "occurred_at": tap_time, "decision": "approve"}),
    ]);
    let a = t.offline_batch(&first).await.unwrap();
    assert_eq!(
        a.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&a.body)
    );
    let v = a.json();
    let status = |v: &Value, i: usize| v["events"][i]["status"].as_str().unwrap().to_owned();
    assert_eq!(
        (
            v["accepted"].as_u64(),
            v["rejected"].as_u64(),
            v["risk"].as_u64()
        ),
        (Some(5), Some(5), Some(2)),
        "{v}"
    );
    assert_eq!(v["events"][1]["risk"], true);
    assert_eq!(v["events"][2]["risk"], true);
    assert!(
        v["events"][3].get("risk").is_none(),
        "listed after the tap: no risk"
    );
    assert!(v["events"][4].get("risk").is_none(), "a decline is no risk");
    for (i, field) in [
        (5, "occurred_at"),
        (6, "card_no"),
        (7, "future"),
        (8, "most"),
        (9, "does not charge"),
    ] {
        assert_eq!(status(&v, i), "rejected");
        let msg = v["events"][i]["error"]["message"].as_str().unwrap();
        assert!(msg.contains(field), "{msg}");
        assert!(!msg.contains("not-a-card"), "input is not echoed");
    }

    // Sent again (the validator never saw the answer): nothing is taken
    // twice; the same event id with other content is a conflict.
    let second = upload(vec![
        offline_tap("o-1", &good, 200, &tap_time, "approve"),
        offline_tap("o-2", &stolen, 200, &tap_time, "approve"),
        offline_tap("o-3", &stolen, 999, &tap_time, "approve"),
        offline_tap("o-9", &good, 200, &tap_time, "approve"),
    ]);
    let a = t.offline_batch(&second).await.unwrap();
    let w = a.json();
    assert_eq!(status(&w, 0), "duplicate");
    assert_eq!(w["events"][0]["auth_id"], v["events"][0]["auth_id"]);
    assert_eq!(status(&w, 1), "duplicate");
    assert_eq!(status(&w, 2), "conflict");
    assert_eq!(status(&w, 3), "accepted");

    // An online request with an offline event's id replays nothing new.
    let a = t
        .authorize(&crate::common::tap("o-9", &good, "transit", 500))
        .await
        .unwrap();
    assert_eq!(a.status, StatusCode::CONFLICT);

    // The risk report: per card and terminal, two taps, 500 fen.
    let risk = gw
        .admin(Method::GET, "/admin/v1/offline-risk", None)
        .await
        .json();
    let risks = risk["risks"].as_array().unwrap();
    assert_eq!(risks.len(), 1, "{risk}");
    assert_eq!(risks[0]["card_no"], stolen.as_str());
    assert_eq!(risks[0]["taps"], 2, "{risk}");
    assert_eq!(risks[0]["amount_fen"], 500);
    let metrics =
        String::from_utf8_lossy(&gw.admin(Method::GET, "/metrics", None).await.body).into_owned();
    assert!(
        metrics.contains("onecard_offline_risk_taps_total 2"),
        "risk metric"
    );

    // Offline fares count toward the card's daily spend.
    let c = gw
        .admin(Method::GET, &format!("/admin/v1/cards/{good}"), None)
        .await
        .json();
    assert_eq!(c["spent_fen"], 400);

    // Bounded: an empty or too large upload is refused whole.
    for events in [
        vec![],
        vec![offline_tap("x", &good, 1, &tap_time, "approve"); 501],
    ] {
        let a = t.offline_batch(&upload(events)).await.unwrap();
        assert_eq!(a.status, StatusCode::BAD_REQUEST);
    }
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_configured_validators_may_upload() {
    let gw = TestGateway::start(|c| c.offline.terminal_prefixes = vec!["term-00002".into()]).await;
    let body = json!({"events": [offline_tap("x-1", &card(1), 200, &rfc3339(onecard_core::time::wall_ms()), "approve")]});
    for (n, want) in [(1, StatusCode::FORBIDDEN), (2, StatusCode::OK)] {
        let mut t = gw.terminal(n, Protocol::Http1).await;
        let a = t.offline_batch(&body).await.unwrap();
        assert_eq!(
            a.status,
            want,
            "terminal {n}: {}",
            String::from_utf8_lossy(&a.body)
        );
    }
    gw.shutdown().await;
}
