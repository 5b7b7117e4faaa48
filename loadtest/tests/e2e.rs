//! One short open-loop run of the real `onecard-load` binary against a real
//! gateway over mTLS: every scheduled request is sent or counted as not
//! sent, every sent one is answered or counted as an error, and the reasons
//! add up to the answers. No speed is asserted.

use std::process::Command;

use onecard::config::Config;
use serde_json::Value;

const TOKEN: &str = "load-test-token";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_run_accounts_for_every_request() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Config::default();
    c.data_dir = dir.path().to_path_buf();
    c.terminal.addr = "127.0.0.1:0".parse().unwrap();
    c.admin.addr = "127.0.0.1:0".parse().unwrap();
    c.terminal.dev_certs = true;
    c.terminal.dev_terminals = 4;
    c.admin.token = Some(TOKEN.to_owned());
    let certs = c.certs_dir();
    let running = onecard::server::start(c).await.unwrap();
    let out = dir.path().join("summary.json");
    let (terminal, admin) = (
        running.addrs.terminal.to_string(),
        running.addrs.admin.to_string(),
    );
    let bin = env!("CARGO_BIN_EXE_onecard-load");
    let status = tokio::task::spawn_blocking({
        let out = out.clone();
        move || {
            Command::new(bin)
                .args([
                    "--addr",
                    &terminal,
                    "--admin",
                    &admin,
                    "--terminals",
                    "4",
                    "--rate",
                    "150",
                    "--seconds",
                    "2",
                ])
                .args([
                    "--cards",
                    "50",
                    "--deny-share",
                    "0.1",
                    "--lost-share",
                    "0.05",
                    "--unknown-share",
                    "0.05",
                ])
                .args([
                    "--retry-share",
                    "0.1",
                    "--profile",
                    "rush-hour",
                    "--quiet",
                    "--protocol",
                    "h2",
                ])
                .arg("--certs")
                .arg(&certs)
                .arg("--json")
                .arg(&out)
                .env("ONECARD_ADMIN_TOKEN", TOKEN)
                .status()
                .unwrap()
        }
    })
    .await
    .unwrap();
    assert!(status.success());
    let doc: Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    let s = &doc["summary"];
    let sum = |v: &Value| {
        v.as_object()
            .unwrap()
            .values()
            .map(|n| n.as_u64().unwrap())
            .sum::<u64>()
    };
    let (scheduled, sent, dropped) = (
        s["scheduled"].as_u64().unwrap(),
        s["sent"].as_u64().unwrap(),
        s["dropped"].as_u64().unwrap(),
    );
    // rush-hour offers 0.78 of the peak: about 234 of 300.
    assert!((200..=260).contains(&scheduled), "{scheduled}");
    assert_eq!(scheduled, sent + dropped);
    assert_eq!(sent, sum(&s["by_status"]) + sum(&s["errors"]));
    assert_eq!(sum(&s["by_reason"]), sum(&s["by_status"]));
    assert!(s["by_reason"]["OK"].as_u64().unwrap() > 0);
    assert!(
        s["by_reason"]["DENYLISTED"].as_u64().unwrap_or(0) > 0,
        "{s}"
    );
    // The gateway's own histogram saw the same window.
    assert!(doc["server"]["count"].as_f64().unwrap() >= 1.0);
    running.shutdown().await;
}
