//! The binary as a person starts it, from outside the checkout.

use std::path::Path;
use std::process::{Command, Stdio};

use http::{Method, StatusCode};
use onecard::net::client;

use crate::common::process::wait_ready;

/// Issue 15: `onecard serve --config config/dev.toml --data-dir /some/where`
/// from another directory starts: the paths in the file are relative to
/// the file (the dev issuer keys beside it), the development certificates
/// and the CA the settlement sinks trust follow the data directory, and
/// `--data-dir` itself is relative to the working directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dev_config_runs_from_any_directory_on_any_data_directory() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let elsewhere = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_onecard"))
        .current_dir(elsewhere.path())
        .args(["serve", "--config"])
        .arg(root.join("config/dev.toml"))
        .args(["--data-dir", "where/data"])
        .args([
            "--terminal-addr",
            "127.0.0.1:0",
            "--admin-addr",
            "127.0.0.1:0",
        ])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    // Ready means the sinks' CA was read: it is created under where/data.
    let addrs = wait_ready(&mut child, &elsewhere.path().join("where"));
    // Issue 19's soak: transparent huge pages are off for the process
    // (src/main.rs), or its resident memory grows in huge pages that the
    // kernel fills back in. Linux shows the flag in `THP_enabled`.
    let proc_status = std::fs::read_to_string(format!("/proc/{}/status", child.id()));
    let thp = proc_status
        .as_deref()
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("THP_enabled:")))
        .map(|l| l.split_whitespace().last().unwrap_or("").to_owned());
    let status = client::admin(
        addrs.admin,
        Some("dev-admin-token"),
        Method::GET,
        "/admin/v1/settlement",
        None,
    )
    .await
    .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    // (A kernel built without huge pages has no such line.)
    if let Some(thp) = thp {
        assert_eq!(thp, "0", "transparent huge pages are off for the gateway");
    }
    assert_eq!(status.status, StatusCode::OK);
    let sinks: Vec<String> = status.json()["sinks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["sink"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(sinks, ["transport", "medical", "payment", "sichuan"]);
    let certs = elsewhere.path().join("where/data/certs");
    assert!(certs.join(onecard::net::certs::CA_CERT).exists());
    assert!(
        !elsewhere.path().join("data").exists(),
        "nothing under ./data"
    );
}

/// Issue 19: what ships is small: no debug information (Cargo.toml's
/// release profile), under 40 MB.
#[test]
fn the_release_binary_is_under_40_mb() {
    let bytes = std::fs::metadata(env!("CARGO_BIN_EXE_onecard"))
        .unwrap()
        .len();
    assert!(bytes < 40 << 20, "the onecard binary is {} MB", bytes >> 20);
}
