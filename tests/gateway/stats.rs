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

/// What `/metrics` serves on a gateway with traffic (taps, declines, a
/// replay, a 400, a settlement sink) is what Prometheus's own `promtool
/// check metrics` accepts: well-formed, conventional names and units.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_pass_promtool_check_metrics() {
    let gw = TestGateway::start(|_| {}).await;
    let card = "500118S00000002";
    gw.put_card(card, json!({"status": "active", "functions": ["transit"]}))
        .await;
    let mut t = gw.terminal(1, Protocol::Http1).await;
    for i in 0..10 {
        t.authorize(&tap(&format!("pm-{i}"), card, "transit", 200))
            .await
            .unwrap();
    }
    t.authorize(&tap("pm-0", card, "transit", 200))
        .await
        .unwrap();
    t.authorize(&tap("pm-x", "500118S99999999", "transit", 200))
        .await
        .unwrap();
    t.authorize(&json!({"event_id": "pm-bad"})).await.unwrap();
    let m = client::admin(gw.admin_addr(), None, Method::GET, "/metrics", None)
        .await
        .unwrap();
    assert_eq!(m.status, StatusCode::OK);
    let text = String::from_utf8(m.body.to_vec()).unwrap();
    assert!(text.contains("onecard_authorize_latency_seconds"), "{text}");
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool runs (scripts/setup-system installs Debian's prometheus)");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The first string literal after each `macro!(` in `text`.
fn names_after(text: &str, macros: &[&str]) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    for m in macros {
        for (at, _) in text.match_indices(m) {
            let rest = text[at + m.len()..].trim_start();
            if let Some(rest) = rest.strip_prefix('"') {
                if let Some(end) = rest.find('"') {
                    out.insert(rest[..end].to_owned());
                }
            }
        }
    }
    out
}

/// Every metric the code records has help text (a series without it is
/// what `promtool check metrics` flags, and cluster-mode series only show
/// up on a cluster) and a line in docs/metrics.md for the SRE.
#[test]
fn every_recorded_metric_is_described_and_documented() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut sources = String::new();
    let mut dirs = vec![root.join("src")];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                sources.push_str(&std::fs::read_to_string(p).unwrap());
            }
        }
    }
    let recorded = names_after(&sources, &["counter!(", "gauge!(", "histogram!("]);
    let described = names_after(
        &sources,
        &[
            "describe_counter!(",
            "describe_gauge!(",
            "describe_histogram!(",
        ],
    );
    let docs = std::fs::read_to_string(root.join("docs/metrics.md")).unwrap();
    assert!(recorded.len() > 30, "{recorded:?}");
    for name in recorded.iter().filter(|n| n.starts_with("onecard_")) {
        assert!(
            described.contains(name),
            "{name} has no help text (app/telemetry.rs)"
        );
        assert!(docs.contains(name), "{name} is not in docs/metrics.md");
    }
}
