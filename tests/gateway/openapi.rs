//! `docs/openapi.json` documents exactly what the gateway serves: the same
//! operations as the route table both listeners dispatch through, the same
//! reason, error and scenario codes, and every documented operation answers
//! on a live gateway (not with "no such route").

use std::collections::BTreeSet;

use http::Method;
use onecard::http::routes::{Listener, ROUTES};
use onecard::net::client::{self, Connection, Protocol};
use serde_json::Value;

use onecard_core::model::{Reason, Scenario};
use onecard_core::wire::ErrorCode;

use crate::common::{TestGateway, TOKEN};

fn spec() -> Value {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn documented(spec: &Value) -> BTreeSet<(String, String, String)> {
    let mut out = BTreeSet::new();
    for (path, item) in spec["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            if method == "parameters" {
                continue;
            }
            let listener = op["x-listener"]
                .as_str()
                .unwrap_or_else(|| panic!("{method} {path} lacks x-listener"));
            out.insert((listener.to_owned(), method.to_uppercase(), path.clone()));
        }
    }
    out
}

fn enum_of(spec: &Value, schema: &str) -> BTreeSet<String> {
    spec["components"]["schemas"][schema]["enum"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn the_document_lists_exactly_the_served_routes() {
    let served: BTreeSet<_> = ROUTES
        .iter()
        .map(|r| {
            let l = match r.listener {
                Listener::Terminal => "terminal",
                Listener::Admin => "admin",
            };
            (
                l.to_owned(),
                r.method.as_str().to_owned(),
                r.path.to_owned(),
            )
        })
        .collect();
    assert_eq!(documented(&spec()), served);
}

#[test]
fn the_document_lists_every_code() {
    let s = spec();
    let reasons: BTreeSet<_> = Reason::ALL.iter().map(|r| r.code().to_owned()).collect();
    assert_eq!(enum_of(&s, "Reason"), reasons);
    let errors: BTreeSet<_> = ErrorCode::ALL
        .iter()
        .map(|e| e.as_str().to_owned())
        .collect();
    assert_eq!(enum_of(&s, "ErrorCode"), errors);
    let scenarios: BTreeSet<_> = Scenario::ALL
        .iter()
        .map(|s| s.as_str().to_owned())
        .collect();
    assert_eq!(enum_of(&s, "Scenario"), scenarios);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_operation_is_served() {
    let gw = TestGateway::start(|_| {}).await;
    let mut terminal = gw.terminal(1, Protocol::Http1).await;
    for (listener, method, path) in documented(&spec()) {
        let path = path
            .replace("{card_no}", "500118Z00000001")
            .replace("{sink}", "transport")
            .replace("{day}", "2026-11-28")
            .replace("{credential_id}", "cred-1")
            .replace("{batch_id}", "batch-1")
            .replace("{project}", "bridge-7");
        let method = Method::from_bytes(method.as_bytes()).unwrap();
        let answer = match listener.as_str() {
            "terminal" => {
                terminal
                    .send(
                        method.clone(),
                        &path,
                        &[("content-type", "application/json")],
                        b"{}".to_vec(),
                    )
                    .await
            }
            _ => {
                let mut c = Connection::plain(gw.admin_addr(), Protocol::Http1)
                    .await
                    .unwrap();
                let auth = format!("Bearer {TOKEN}");
                c.send(
                    method.clone(),
                    &path,
                    &[
                        ("authorization", &auth),
                        ("content-type", "application/json"),
                    ],
                    b"{}".to_vec(),
                )
                .await
            }
        }
        .unwrap();
        let text = String::from_utf8_lossy(&answer.body);
        assert!(
            !text.contains("no such route") && !text.contains("takes only"),
            "{method} {path} on {listener}: {text}"
        );
    }
    // And an undocumented path is not served.
    let a = client::admin(
        gw.admin_addr(),
        Some(TOKEN),
        Method::GET,
        "/admin/v1/secret",
        None,
    )
    .await
    .unwrap();
    assert!(String::from_utf8_lossy(&a.body).contains("no such route"));
    drop(terminal);
    gw.shutdown().await;
}
