//! Bulk imports over the real admin listener, and the terminal's ping: what
//! an operator loading the nightly card file and a terminal starting up see.

use http::{Method, StatusCode};
use onecard::net::certs::terminal_id;
use onecard::net::client::{self, Answer, Protocol};
use serde_json::Value;

use crate::common::{decision, error_code, tap, TestGateway, TOKEN};

async fn import(gw: &TestGateway, kind: &str, body: String) -> Answer {
    client::admin_raw(
        gw.admin_addr(),
        Some(TOKEN),
        Method::POST,
        &format!("/admin/v1/import/{kind}"),
        "application/x-ndjson",
        body.into_bytes(),
    )
    .await
    .unwrap()
}

fn report(a: &Answer) -> Value {
    assert_eq!(
        a.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&a.body)
    );
    a.json()
}

fn card_lines(from: u32, to: u32) -> String {
    (from..to)
        .map(|i| {
            format!(
                "{{\"card_no\":\"500118I{i:08}\",\"status\":\"active\",\"functions\":[\"transit\",\"medical\"]}}\n"
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cards_import_in_bulk_keep_counters_and_survive_a_restart() {
    let mut gw = TestGateway::start(|_| {}).await;
    // 2,500 lines: more than two batches, with three bad lines among them.
    let mut body = card_lines(0, 1_200);
    body.push_str("{\"card_no\":\"500118I99999999\",\"status\":\"misplaced\"}\n");
    body.push_str("\n   \n");
    body.push_str("not json\n");
    body.push_str(&card_lines(1_200, 2_500));
    body.push_str("{\"card_no\":\"12\",\"status\":\"active\"}");
    let r = report(&import(&gw, "cards", body).await);
    assert_eq!(r["lines"], 2_503);
    assert_eq!(r["imported"], 2_500);
    assert_eq!(r["rejected"], 3);
    assert_eq!(r["total"], 2_500);
    let errors = r["errors"].as_array().unwrap();
    let lines: Vec<u64> = errors.iter().map(|e| e["line"].as_u64().unwrap()).collect();
    assert_eq!(lines, vec![1_201, 1_204, 2_505]);
    assert!(errors[0]["message"]
        .as_str()
        .unwrap()
        .contains("`status` must be one of"));
    assert_eq!(errors[2]["code"], "INVALID_REQUEST");
    assert!(!r.to_string().contains("500118I99999999"), "{r}");

    // An imported card is authorized at once; spending is kept when the
    // same file is imported again (as after a lost answer).
    let mut t = gw.terminal(1, Protocol::Http2).await;
    let a = t
        .authorize(&tap("imp-1", "500118I00000007", "transit", 200))
        .await
        .unwrap();
    assert_eq!(decision(&a), ("approve".to_owned(), "OK".to_owned()));
    let r = report(&import(&gw, "cards", card_lines(0, 10)).await);
    assert_eq!(
        (r["imported"].as_u64(), r["total"].as_u64()),
        (Some(10), Some(2_500))
    );
    let card = gw
        .admin(Method::GET, "/admin/v1/cards/500118I00000007", None)
        .await;
    assert_eq!(
        card.json()["spent_fen"],
        200,
        "{}",
        String::from_utf8_lossy(&card.body)
    );

    drop(t);
    gw.restart().await;
    let status = gw.admin(Method::GET, "/admin/v1/status", None).await.json();
    assert_eq!(status["cards"], 2_500);
    let card = gw
        .admin(Method::GET, "/admin/v1/cards/500118I00002499", None)
        .await;
    assert_eq!(
        card.json()["functions"],
        serde_json::json!(["transit", "medical"])
    );
    assert_eq!(
        gw.admin(Method::GET, "/admin/v1/cards/500118I00000007", None)
            .await
            .json()["spent_fen"],
        200
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denylist_import_versions_every_entry_and_declines_at_once() {
    let mut gw = TestGateway::start(|_| {}).await;
    gw.put_card(
        "500118I00000003",
        serde_json::json!({"status": "active", "functions": ["transit"]}),
    )
    .await;
    let body: String = (0..1_500)
        .map(|i| format!("{{\"card_no\":\"500118I{i:08}\",\"reason\":\"reported lost\"}}\n"))
        .chain(std::iter::once(
            "{\"card_no\":\"500118I00000001\",\"reason\":\"\"}\n".to_owned(),
        ))
        .collect();
    let r = report(&import(&gw, "denylist", body).await);
    assert_eq!(
        (r["imported"].as_u64(), r["rejected"].as_u64()),
        (Some(1_500), Some(1))
    );
    assert_eq!(r["denylist_version"], 1_500);
    assert_eq!(r["total"], 1_500);

    let mut t = gw.terminal(2, Protocol::Http1).await;
    let a = t
        .authorize(&tap("imp-d", "500118I00000003", "transit", 200))
        .await
        .unwrap();
    assert_eq!(
        decision(&a),
        ("decline".to_owned(), "DENYLISTED".to_owned())
    );
    let entry = gw
        .admin(Method::GET, "/admin/v1/denylist/500118I00001499", None)
        .await
        .json();
    assert_eq!(entry["version"], 1_500);

    drop(t);
    gw.restart().await;
    let status = gw.admin(Method::GET, "/admin/v1/status", None).await.json();
    assert_eq!(status["denylist"]["entries"], 1_500);
    assert_eq!(status["denylist"]["version"], 1_500);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imports_refuse_what_they_cannot_take_with_a_clear_error() {
    let gw = TestGateway::start(|_| {}).await;
    let a = client::admin_raw(
        gw.admin_addr(),
        Some(TOKEN),
        Method::POST,
        "/admin/v1/import/cards",
        "application/json",
        card_lines(0, 1).into_bytes(),
    )
    .await
    .unwrap();
    assert_eq!(a.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert!(String::from_utf8_lossy(&a.body).contains("application/x-ndjson"));
    let a = client::admin_raw(
        gw.admin_addr(),
        Some("wrong"),
        Method::POST,
        "/admin/v1/import/denylist",
        "application/x-ndjson",
        Vec::new(),
    )
    .await
    .unwrap();
    assert_eq!(
        (a.status, error_code(&a)),
        (StatusCode::UNAUTHORIZED, "UNAUTHENTICATED".to_owned())
    );
    // An empty body is an import of nothing, not an error.
    let r = report(&import(&gw, "cards", String::new()).await);
    assert_eq!(
        (r["lines"].as_u64(), r["imported"].as_u64()),
        (Some(0), Some(0))
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminal_pings_and_an_sre_reads_memory_and_start_up_time() {
    let gw = TestGateway::start(|_| {}).await;
    gw.deny("500118I00000009").await;
    for protocol in [Protocol::Http1, Protocol::Http2] {
        let mut t = gw.terminal(3, protocol).await;
        let a = t
            .send(Method::GET, "/v1/ping", &[], Vec::new())
            .await
            .unwrap();
        assert_eq!(
            a.status,
            StatusCode::OK,
            "{}",
            String::from_utf8_lossy(&a.body)
        );
        let v = a.json();
        assert_eq!(v["terminal_id"], terminal_id(3));
        assert_eq!(v["denylist_version"], 1);
        let skew = v["time_ms"].as_i64().unwrap() - onecard_core::time::wall_ms();
        assert!(skew.abs() < 60_000, "{skew}");
    }
    let status = gw.admin(Method::GET, "/admin/v1/status", None).await.json();
    assert!(
        status["process"]["resident_bytes"].as_u64().unwrap() > 1_000_000,
        "{status}"
    );
    assert!(
        status["process"]["startup_seconds"].as_f64().unwrap() > 0.0,
        "{status}"
    );
    let metrics = gw.admin(Method::GET, "/metrics", None).await;
    let text = String::from_utf8_lossy(&metrics.body);
    assert!(text.contains("onecard_process_resident_bytes "), "{text}");
    assert!(text.contains("onecard_startup_seconds "), "{text}");
    gw.shutdown().await;
}
