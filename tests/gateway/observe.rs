//! Answers that explain their own latency, and logs an SRE can ship and
//! turn up or down while the gateway runs.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use onecard::net::client::{self, Protocol};
use serde_json::{json, Value};

use crate::common::process::{wait_ready, Children};
use crate::common::{connect_terminal, decision, put_cards_at, tap, TestGateway, TOKEN};

/// The phases named in a `Server-Timing` value, with their milliseconds.
fn phases(header: &str) -> Vec<(String, f64)> {
    header
        .split(", ")
        .map(|p| {
            let (name, dur) = p.split_once(";dur=").expect("name;dur=ms");
            (name.to_owned(), dur.parse().expect("milliseconds"))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_terminal_answer_carries_its_phases_in_server_timing() {
    let gw = TestGateway::start(|_| {}).await;
    let card = "500118S00000041";
    gw.put_card(card, json!({"status": "active", "functions": ["transit"]}))
        .await;
    let mut t = gw.terminal(1, Protocol::Http2).await;
    let a = t
        .authorize(&tap("st-1", card, "transit", 200))
        .await
        .unwrap();
    assert_eq!(decision(&a).0, "approve");
    let p = phases(a.headers["server-timing"].to_str().unwrap());
    let names: Vec<&str> = p.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "decode",
            "idempotency",
            "credential",
            "decide",
            "commit",
            "total"
        ]
    );
    let total = p.last().unwrap().1;
    let sum: f64 = p[..5].iter().map(|(_, d)| d).sum();
    assert!(total > 0.0 && sum <= total + 0.01, "{p:?}");

    // A replay stops after the idempotency phase: nothing decided or
    // committed again.
    let again = t
        .authorize(&tap("st-1", card, "transit", 200))
        .await
        .unwrap();
    let names: Vec<String> = phases(again.headers["server-timing"].to_str().unwrap())
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(names, ["decode", "idempotency", "total"]);

    // A request refused while decoding says so too.
    let bad = t.authorize(&json!({"event_id": "x"})).await.unwrap();
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert!(bad.headers["server-timing"]
        .to_str()
        .unwrap()
        .starts_with("total;dur="));
}

/// The lines written so far that parse as JSON, and whether every line did.
fn json_lines(path: &std::path::Path) -> (Vec<Value>, Vec<String>) {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut ok = Vec::new();
    let mut bad = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        match serde_json::from_str::<Value>(line) {
            Ok(v) => ok.push(v),
            Err(_) => bad.push(line.to_owned()),
        }
    }
    (ok, bad)
}

fn slow_lines(path: &std::path::Path) -> Vec<Value> {
    json_lines(path)
        .0
        .into_iter()
        .filter(|v| v["target"] == "onecard::slow")
        .collect()
}

/// Waits (bounded) until the log has `n` slow-request lines.
fn wait_slow_lines(path: &std::path::Path, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let lines = slow_lines(path);
        if lines.len() >= n || Instant::now() > deadline {
            return lines;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The real binary with `[log] format = "json"` and a slow-request
/// threshold of 0 (every request logs its line): the lines are JSON, the
/// slow line names the phases and the masked card, and the level changes
/// at run time through the admin route.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_name_slow_requests_and_their_level_changes_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {:?}\n[terminal]\naddr = \"127.0.0.1:0\"\ndev_certs = true\ndev_terminals = 1\n[admin]\naddr = \"127.0.0.1:0\"\n[log]\nformat = \"json\"\nlevel = \"warn\"\nslow_request_ms = 0\n",
            dir.path().join("data")
        ),
    )
    .unwrap();
    let log = dir.path().join("stderr.log");
    let mut children = Children::default();
    children.0.push(
        Command::new(env!("CARGO_BIN_EXE_onecard"))
            .args(["serve", "--config"])
            .arg(&config)
            .env("ONECARD_ADMIN_TOKEN", TOKEN)
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let addrs = wait_ready(&mut children.0[0], dir.path());
    let card = "500118S00000042";
    put_cards_at(addrs.admin, &[card.to_owned()], json!(["transit"])).await;
    let certs = dir.path().join("data/certs");
    let mut t = connect_terminal(&certs, addrs.terminal, 1, Protocol::Http1).await;
    let a = t
        .authorize(&tap("j-1", card, "transit", 200))
        .await
        .unwrap();
    assert_eq!(decision(&a).0, "approve");
    let auth_id = a.json()["auth_id"].as_str().unwrap().to_owned();

    let lines = wait_slow_lines(&log, 1);
    let line = lines.first().expect("a slow-request line at threshold 0");
    assert_eq!(line["level"], "WARN", "{line}");
    assert_eq!(line["route"], "/v1/authorize", "{line}");
    assert_eq!(line["terminal"], "term-00001", "{line}");
    assert_eq!(line["scenario"], "transit", "{line}");
    assert_eq!(line["auth_id"], auth_id.as_str(), "{line}");
    assert_eq!(line["card"], "500118*****0042", "{line}");
    for phase in [
        "decode_ms",
        "idempotency_ms",
        "credential_ms",
        "decide_ms",
        "commit_ms",
        "total_ms",
    ] {
        assert!(line[phase].as_f64().is_some(), "{phase} in {line}");
    }
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains(card), "the card is masked in every line");

    // The level now, then turned to `error`: the next slow request is not
    // written; back to `warn`, it is.
    let get = |path: &'static str| client::admin(addrs.admin, Some(TOKEN), Method::GET, path, None);
    assert_eq!(get("/admin/v1/log").await.unwrap().json()["level"], "warn");
    let put = |level: &'static str| async move {
        let body = json!({"level": level});
        client::admin(
            addrs.admin,
            Some(TOKEN),
            Method::PUT,
            "/admin/v1/log",
            Some(&body),
        )
        .await
    };
    let r = put("error").await.unwrap();
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["before"], "warn");
    t.authorize(&tap("j-2", card, "transit", 200))
        .await
        .unwrap();
    let r = put("warn").await.unwrap();
    assert_eq!(r.json()["before"], "error");
    t.authorize(&tap("j-3", card, "transit", 200))
        .await
        .unwrap();
    let lines = wait_slow_lines(&log, 2);
    let ids: Vec<&str> = lines.iter().filter_map(|l| l["auth_id"].as_str()).collect();
    assert_eq!(
        ids.len(),
        2,
        "j-2 was not written at level error: {lines:?}"
    );
    assert_eq!(ids[0], auth_id.as_str());

    // A filter that does not parse: a clear 400, the level unchanged.
    let r = put("warn,[[[").await.unwrap();
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("`level`"));
    assert_eq!(get("/admin/v1/log").await.unwrap().json()["level"], "warn");
    // Operators only.
    let anon = client::admin(addrs.admin, None, Method::GET, "/admin/v1/log", None)
        .await
        .unwrap();
    assert_eq!(anon.status, StatusCode::UNAUTHORIZED);

    let (_, bad) = json_lines(&log);
    assert!(bad.is_empty(), "every line is JSON: {bad:?}");
}
