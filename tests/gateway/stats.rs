//! `GET /admin/v1/stats`: the real percentiles of the last seconds, per
//! route and scenario, as an SRE's page reads them.

use http::{Method, StatusCode};
use onecard::net::client::{self, Protocol};
use serde_json::{json, Value};

use crate::common::{decision, error_code, tap, TestGateway};

fn named<'a>(list: &'a Value, name: &str) -> &'a Value {
    list.as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == name)
        .unwrap_or_else(|| panic!("{name} not in {list}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_give_each_route_and_scenario_its_count_and_percentiles() {
    let gw = TestGateway::start(|_| {}).await;
    let card = "500118S00000001";
    gw.put_card(
        card,
        json!({"status": "active", "functions": ["transit", "financial"]}),
    )
    .await;
    let mut t = gw.terminal(1, Protocol::Http1).await;
    for i in 0..20 {
        let a = t
            .authorize(&tap(&format!("st-{i}"), card, "transit", 200))
            .await
            .unwrap();
        assert_eq!(decision(&a).0, "approve");
    }
    for i in 0..5 {
        t.authorize(&tap(&format!("sp-{i}"), card, "payment", 100))
            .await
            .unwrap();
    }
    let v = gw.admin_ok(Method::GET, "/admin/v1/stats", None).await;
    assert_eq!(v["window_s"], 10);
    let authorize = named(&v["routes"], "/v1/authorize");
    assert_eq!(authorize["count"], 25, "{v}");
    assert_eq!(named(&v["scenarios"], "transit")["count"], 20, "{v}");
    assert_eq!(named(&v["scenarios"], "payment")["count"], 5, "{v}");
    // Busiest first; percentiles in order and positive.
    assert_eq!(v["scenarios"][0]["name"], "transit");
    let f = |k: &str| authorize[k].as_f64().unwrap();
    assert!(
        f("p50_ms") > 0.0 && f("p50_ms") <= f("p99_ms"),
        "{authorize}"
    );
    assert!(
        f("p99_ms") <= f("p999_ms") && f("p999_ms") <= f("max_ms") * 1.01,
        "{authorize}"
    );
    assert!(f("per_s") > 0.0);
    let v = gw
        .admin_ok(Method::GET, "/admin/v1/stats?window=60s", None)
        .await;
    assert_eq!(v["window_s"], 60);
    assert_eq!(named(&v["routes"], "/v1/authorize")["count"], 25);
    // A window it does not keep: a clear 400.
    let a = gw
        .admin(Method::GET, "/admin/v1/stats?window=5m", None)
        .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    assert_eq!(error_code(&a), "INVALID_REQUEST");
    assert!(a.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("10s or 60s"));
    // Operators only, like the rest of /admin/v1.
    let anon = client::admin(gw.admin_addr(), None, Method::GET, "/admin/v1/stats", None)
        .await
        .unwrap();
    assert_eq!(anon.status, StatusCode::UNAUTHORIZED);
}
