//! Short runs of the real `onecard-load` binary against a real gateway over
//! mTLS: every scheduled request is sent or counted as not sent, every sent
//! one is answered or counted as an error, and the reasons add up to the
//! answers; a terminal whose connection the gateway closed reconnects; a
//! seed through the bulk import lands in the store. No speed is asserted.

use std::process::{Command, Output};

use onecard::app::server::Running;
use onecard::config::Config;
use serde_json::Value;

const TOKEN: &str = "load-test-token";

async fn gateway(dir: &std::path::Path, tweak: impl FnOnce(&mut Config)) -> Running {
    let mut c = Config::default();
    c.data_dir = dir.to_path_buf();
    c.terminal.addr = "127.0.0.1:0".parse().unwrap();
    c.admin.addr = "127.0.0.1:0".parse().unwrap();
    c.terminal.dev_certs = true;
    c.terminal.dev_terminals = 4;
    c.admin.token = Some(TOKEN.to_owned());
    // The generator shares this machine's CPUs with the gateway it tests:
    // the gateway's load shedding is tested in the gateway's own tests.
    c.limits.overload_lag_ms = 0;
    tweak(&mut c);
    c.validate().unwrap();
    onecard::app::server::start(c).await.unwrap()
}

/// Runs `onecard-load` with `args` off the async workers (the gateway runs
/// on them in this process) and returns its output.
async fn load(args: Vec<String>) -> Output {
    let bin = env!("CARGO_BIN_EXE_onecard-load");
    tokio::task::spawn_blocking(move || {
        Command::new(bin)
            .args(&args)
            .env("ONECARD_ADMIN_TOKEN", TOKEN)
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

fn strings(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| (*s).to_owned()).collect()
}

/// `run` arguments that point at `running` (mTLS with its development
/// certificates) and write the summary to `out`.
fn to_gateway(running: &Running, out: &std::path::Path) -> Vec<String> {
    vec![
        "--addr".to_owned(),
        running.addrs.terminal.to_string(),
        "--admin".to_owned(),
        running.addrs.admin.to_string(),
        "--certs".to_owned(),
        running.gateway().config.certs_dir().display().to_string(),
        "--json".to_owned(),
        out.display().to_string(),
    ]
}

fn sum(v: &Value) -> u64 {
    v.as_object()
        .unwrap()
        .values()
        .map(|n| n.as_u64().unwrap())
        .sum::<u64>()
}

/// scheduled = sent + dropped; sent = answered + errors; reasons = answers.
fn assert_accounted(s: &Value) {
    let (scheduled, sent, dropped) = (
        s["scheduled"].as_u64().unwrap(),
        s["sent"].as_u64().unwrap(),
        s["dropped"].as_u64().unwrap(),
    );
    assert_eq!(scheduled, sent + dropped, "{s}");
    assert_eq!(sent, sum(&s["by_status"]) + sum(&s["errors"]), "{s}");
    assert_eq!(sum(&s["by_reason"]), sum(&s["by_status"]), "{s}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_run_accounts_for_every_request() {
    let dir = tempfile::tempdir().unwrap();
    let running = gateway(dir.path(), |_| {}).await;
    let (out, svg) = (dir.path().join("summary.json"), dir.path().join("run.svg"));
    let mut args = strings(&["run", "--terminals", "4", "--rate", "150", "--seconds", "2"]);
    args.extend(strings(&["--warmup-seconds", "0"]));
    args.extend(strings(&[
        "--cards",
        "50",
        "--deny-share",
        "0.1",
        "--lost-share",
        "0.05",
    ]));
    args.extend(strings(&[
        "--unknown-share",
        "0.05",
        "--retry-share",
        "0.1",
    ]));
    args.extend(strings(&[
        "--profile",
        "rush-hour",
        "--quiet",
        "--protocol",
        "h2",
    ]));
    args.extend(to_gateway(&running, &out));
    args.extend(["--plot".to_owned(), svg.display().to_string()]);
    let o = load(args).await;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let doc: Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    let s = &doc["summary"];
    // rush-hour offers 0.78 of the peak: about 234 of 300.
    let scheduled = s["scheduled"].as_u64().unwrap();
    assert!((200..=260).contains(&scheduled), "{scheduled}");
    assert_accounted(s);
    assert!(s["by_reason"]["OK"].as_u64().unwrap() > 0);
    assert!(
        s["by_reason"]["DENYLISTED"].as_u64().unwrap_or(0) > 0,
        "{s}"
    );
    // The gateway's own histogram saw the same window.
    assert!(doc["server"]["count"].as_f64().unwrap() >= 1.0);
    let plot = std::fs::read_to_string(&svg).unwrap();
    assert_eq!(plot.matches("<polyline").count(), 2);
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminals_reconnect_when_the_gateway_closes_their_connection() {
    let dir = tempfile::tempdir().unwrap();
    // Idle connections are closed after 300 ms; each terminal sends every
    // 2.5 s, so every connection is closed between two of its requests.
    let running = gateway(dir.path(), |c| c.limits.idle_timeout_ms = 300).await;
    let out = dir.path().join("summary.json");
    let mut args = strings(&["run", "--terminals", "2", "--rate", "0.8", "--seconds", "6"]);
    args.extend(strings(&["--warmup-seconds", "0"]));
    args.extend(strings(&["--cards", "20", "--quiet", "--protocol", "h1"]));
    args.extend(to_gateway(&running, &out));
    let o = load(args).await;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let doc: Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    let s = &doc["summary"];
    assert_accounted(s);
    // 0.8/s for 6 s: 5 requests over two terminals (at 0, 2.5 and 5 s; at
    // 1.25 and 3.75 s), all answered. Every one after a gap of over a second
    // finds its connection closed and reconnects: at least the four after
    // the first; the first too if the machine was slow to start it.
    assert_eq!(s["scheduled"], 5, "{s}");
    assert_eq!(sum(&s["by_status"]), 5, "{s}");
    let reconnects = s["reconnects"].as_u64().unwrap();
    assert!((4..=5).contains(&reconnects), "{s}");
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_fills_the_store_through_the_bulk_import() {
    let dir = tempfile::tempdir().unwrap();
    let running = gateway(dir.path(), |_| {}).await;
    let out = dir.path().join("seed.json");
    let mut args = strings(&["seed", "--cards", "250000", "--deny", "1000"]);
    args.extend([
        "--admin".to_owned(),
        running.addrs.admin.to_string(),
        "--json".to_owned(),
        out.display().to_string(),
    ]);
    let o = load(args).await;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let report: Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    assert_eq!(report["cards"], 250_000);
    assert!(report["resident_bytes"].as_u64().unwrap() > 0);
    let gw = running.gateway();
    // The population, plus the lost cards the mix draws.
    assert_eq!(gw.cards.len(), 250_000 + onecard_load::mix::SPECIAL_CARDS);
    assert_eq!(gw.deny.len(), 1_000);
    assert_eq!(gw.deny.version(), 1_000);
    running.shutdown().await;
}

/// The soak's short version (the hour-long one is `loadtest/soak`): three
/// samples, each with the decided p99 and the gateway's memory and open
/// files, and a slope of each. The gateway runs in this process, so its
/// memory and files are the test process's: only that they are read and
/// that the connections do not pile up is asserted, not a speed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_soak_samples_memory_files_and_p99_and_gives_their_slopes() {
    let dir = tempfile::tempdir().unwrap();
    let running = gateway(dir.path(), |_| {}).await;
    let out = dir.path().join("soak.json");
    let mut args = strings(&["run", "--terminals", "4", "--rate", "100", "--seconds", "1"]);
    args.extend(strings(&[
        "--samples",
        "3",
        "--profile",
        "soak",
        "--warmup-seconds",
        "0",
        "--cards",
        "50",
    ]));
    args.extend(to_gateway(&running, &out));
    let o = load(args).await;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("slope of open_fds"), "{stdout}");
    let doc: Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    let samples = doc["samples"].as_array().unwrap();
    assert_eq!(samples.len(), 3, "{doc}");
    for s in samples {
        assert!(s["resident_mb"].as_f64().unwrap() > 0.0, "{s}");
        assert!(s["open_fds"].as_f64().unwrap() > 0.0, "{s}");
        // RocksDB's memtables at least (the gauge is summed over kinds).
        assert!(s["store_mb"].as_f64().unwrap() > 0.0, "{s}");
        assert!(s["decided_per_s"].as_f64().unwrap() > 0.0, "{s}");
        assert_eq!(s["failed"], 0, "{s}");
    }
    // The four terminals keep their connections: the files do not pile
    // up from sample to sample (other tests in this process may open a
    // few of their own meanwhile).
    let fds: Vec<f64> = samples
        .iter()
        .map(|s| s["open_fds"].as_f64().unwrap())
        .collect();
    assert!(fds[2] <= fds[0] + 64.0, "{fds:?}");
    for k in [
        "resident_mb_per_hour",
        "store_mb_per_hour",
        "open_fds_per_hour",
        "p99_ms_per_hour",
    ] {
        assert!(doc["slopes"][k].as_f64().is_some(), "{k}: {doc}");
        // Of the last two of the three samples.
        let late = format!("{k}_second_half");
        assert!(doc["slopes"][&late].as_f64().is_some(), "{late}: {doc}");
    }
    running.shutdown().await;
}
