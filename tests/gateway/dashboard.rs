//! The SRE's live page in a real browser: headless Chromium (Debian's
//! `chromium`, installed by scripts/setup-system) opens `/dashboard` on a
//! running gateway; the page's own script polls its feed and draws the
//! figures, which must appear, and change when more taps come.

use std::path::Path;
use std::time::Duration;

use http::{Method, StatusCode};
use onecard::net::client::{self, Connection, Protocol};
use serde_json::json;

use crate::common::{decision, tap, TestGateway};

const CARD: &str = "500118S00000031";

/// Runs headless Chromium on `url` with `extra` flags (a fresh profile,
/// nothing fetched but the page), bounded in time; its standard output.
async fn chromium(profile: &Path, extra: &[&str], url: &str) -> String {
    let mut cmd = std::process::Command::new("chromium");
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        // Virtual time runs the page's one-second polls without waiting
        // for them in wall time; fetches still go to the real gateway.
        "--virtual-time-budget=4000",
    ])
    .arg(format!("--user-data-dir={}", profile.display()))
    .args(extra)
    .arg(url)
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped());
    let child = cmd
        .spawn()
        .expect("chromium runs (scripts/setup-system installs Debian's chromium)");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = tokio::task::spawn_blocking(move || {
        let out = rx.recv_timeout(Duration::from_secs(90));
        if out.is_err() {
            // Stuck: stopped here rather than left behind.
            let _ = std::process::Command::new("kill")
                .args(["-9", &pid.to_string()])
                .status();
        }
        out
    })
    .await
    .unwrap()
    .expect("chromium finished within 90 s")
    .unwrap();
    assert!(
        out.status.success(),
        "chromium: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The value of attribute `attr` on the element that has `data-key="key"`.
fn attr_of(dom: &str, key: &str, attr: &str) -> Option<String> {
    let at = dom.find(&format!("data-key=\"{key}\""))?;
    let tag_start = dom[..at].rfind('<')?;
    let tag = &dom[tag_start..tag_start + dom[tag_start..].find('>')?];
    let from = tag.find(&format!("{attr}=\""))? + attr.len() + 2;
    Some(tag[from..from + tag[from..].find('"')?].to_owned())
}

/// The texts of the cells of the row with `data-key="key"`.
fn cells_of(dom: &str, key: &str) -> Vec<String> {
    let at = dom.find(&format!("data-key=\"{key}\"")).unwrap();
    let row = &dom[at..at + dom[at..].find("</tr>").unwrap()];
    row.split("<td")
        .skip(1)
        .map(|c| {
            let c = &c[c.find('>').unwrap() + 1..];
            c[..c.find("</td>").unwrap_or(c.len())].to_owned()
        })
        .collect()
}

async fn taps(t: &mut Connection, prefix: &str, n: usize, scenario: &str) {
    for i in 0..n {
        let a = t
            .authorize(&tap(&format!("{prefix}-{i}"), CARD, scenario, 100))
            .await
            .unwrap();
        assert_eq!(decision(&a).0, "approve", "{a:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_live_figures_in_a_real_browser() {
    let gw = TestGateway::start(|_| {}).await;
    gw.put_card(
        CARD,
        json!({"status": "active", "functions": ["transit", "financial"]}),
    )
    .await;
    let mut t = gw.terminal(1, Protocol::Http1).await;
    taps(&mut t, "tr", 30, "transit").await;
    taps(&mut t, "pay", 10, "payment").await;
    for i in 0..2 {
        let a = t
            .authorize(&tap(
                &format!("unknown-{i}"),
                "500118S99999999",
                "transit",
                100,
            ))
            .await
            .unwrap();
        assert_eq!(decision(&a), ("decline".into(), "CARD_NOT_FOUND".into()));
    }
    let url = format!("http://{}/dashboard", gw.admin_addr());
    let profile = tempfile::tempdir().unwrap();

    let dom = chromium(profile.path(), &["--dump-dom"], &url).await;
    let at = dom.find("data-updates=\"").unwrap() + 14;
    let updates: u32 = dom[at..at + dom[at..].find('"').unwrap()].parse().unwrap();
    assert!(
        updates >= 2,
        "the page polled its feed more than once: {updates}"
    );
    assert!(dom.contains(">ready<"), "readiness shown: {dom}");
    // Transit: 32 decisions (30 approvals, 2 declines), with real
    // percentiles in milliseconds.
    assert_eq!(
        attr_of(&dom, "scenario:transit", "data-count60").as_deref(),
        Some("32")
    );
    assert_eq!(
        attr_of(&dom, "scenario:payment", "data-count60").as_deref(),
        Some("10")
    );
    let row = cells_of(&dom, "scenario:transit");
    assert_eq!(row[0], "transit");
    let p99: f64 = row[8].parse().expect("a p99 in ms over 60 s");
    assert!(p99 > 0.0, "{row:?}");
    assert_eq!(
        attr_of(&dom, "route:/v1/authorize", "data-count60").as_deref(),
        Some("42")
    );
    assert_eq!(
        attr_of(&dom, "outcome:approve", "data-count60").as_deref(),
        Some("40")
    );
    assert_eq!(
        attr_of(&dom, "outcome:decline CARD_NOT_FOUND", "data-count60").as_deref(),
        Some("2")
    );
    assert!(dom.contains("terminals connected"), "{dom}");

    // More taps: the figures change.
    taps(&mut t, "tr2", 20, "transit").await;
    let dom = chromium(profile.path(), &["--dump-dom"], &url).await;
    assert_eq!(
        attr_of(&dom, "scenario:transit", "data-count60").as_deref(),
        Some("52")
    );

    // The README's screenshot command works.
    let png = profile.path().join("dashboard.png");
    let shot = format!("--screenshot={}", png.display());
    chromium(profile.path(), &[&shot, "--window-size=1400,1100"], &url).await;
    let size = std::fs::metadata(&png).unwrap().len();
    assert!(size > 10_000, "a screenshot of the page: {size} bytes");
}

/// Who may see the page: anyone who reaches the admin listener, like
/// `/metrics` (docs/dashboard.md); it carries no personal data and
/// nothing from elsewhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_is_open_self_contained_and_free_of_personal_data() {
    let gw = TestGateway::start(|_| {}).await;
    gw.put_card(CARD, json!({"status": "active", "functions": ["transit"]}))
        .await;
    let mut t = gw.terminal(1, Protocol::Http1).await;
    taps(&mut t, "o", 3, "transit").await;
    let page = client::admin(gw.admin_addr(), None, Method::GET, "/dashboard", None)
        .await
        .unwrap();
    assert_eq!(page.status, StatusCode::OK);
    assert_eq!(page.headers["content-type"], "text/html; charset=utf-8");
    let csp = page.headers["content-security-policy"].to_str().unwrap();
    assert!(csp.starts_with("default-src 'none'"), "{csp}");
    let html = String::from_utf8(page.body.to_vec()).unwrap();
    for external in ["http://", "https://", "src=", "@import", "url("] {
        assert!(
            !html.contains(external),
            "the page loads nothing from elsewhere: {external}"
        );
    }
    let data = client::admin(gw.admin_addr(), None, Method::GET, "/dashboard/data", None)
        .await
        .unwrap();
    assert_eq!(data.status, StatusCode::OK);
    let text = String::from_utf8(data.body.to_vec()).unwrap();
    assert!(!text.contains(CARD) && !text.contains("00000031"), "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["ready"], true);
    assert_eq!(v["windows"]["10s"]["scenarios"][0]["count"], 3);
    assert_eq!(v["terminals"]["connected"], 1);
    assert!(v["journal"]["commits_10s"]["groups"].as_u64().unwrap() >= 3);
    assert!(v["tls"]["server_not_after_s"].as_i64().unwrap() > 0);
}
