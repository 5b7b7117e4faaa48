//! ops/: the Prometheus rules and Grafana dashboards against the real
//! tools (Debian's `prometheus` package: promtool and the server) and the
//! `/metrics` of a real gateway. The cluster rules' metrics are checked on
//! a cluster node in cluster.rs (`ops_rules_find_their_metrics_on_a_cluster_node`).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use onecard::net::client::{self, Connection, Protocol};
use serde_json::{json, Value};

use crate::common::process::{spawn_gateway_full, wait_ready, Children};
use crate::common::qr::{scan, TestKey};
use crate::common::sink::Sink;
use crate::common::{connect_terminal, decision, free_port, put_cards_at, tap, TestGateway};

pub const RECORDING: &str = "prometheus/rules/recording.yml";
pub const ALERTS: &str = "prometheus/rules/alerts.yml";
pub const CLUSTER: &str = "prometheus/rules/cluster.yml";

fn ops() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("ops")
}

/// A file under ops/.
fn read(file: &str) -> String {
    std::fs::read_to_string(ops().join(file)).unwrap()
}

/// The files in `ops/<dir>` ending in `ext`, relative to ops/, sorted.
fn files(dir: &str, ext: &str) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(ops().join(dir))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(ext))
        .map(|n| format!("{dir}/{n}"))
        .collect();
    out.sort();
    assert!(!out.is_empty(), "no {ext} in ops/{dir}");
    out
}

/// Runs a tool to the end; its output if it failed.
fn failure(cmd: &mut Command) -> Option<String> {
    let out = cmd
        .output()
        .expect("promtool runs (scripts/setup-system installs Debian's prometheus)");
    (!out.status.success()).then(|| {
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

#[test]
fn promtool_checks_the_rules_and_passes_their_unit_tests() {
    let rules = files("prometheus/rules", ".yml");
    if let Some(out) = failure(
        Command::new("promtool")
            .args(["check", "rules"])
            .args(rules.iter().map(|f| ops().join(f))),
    ) {
        panic!("promtool check rules: {out}");
    }
    // The test files name their rule files relative to ops/prometheus.
    let tests: Vec<String> = files("prometheus/tests", ".yml")
        .iter()
        .map(|f| f.trim_start_matches("prometheus/").to_owned())
        .collect();
    if let Some(out) = failure(
        Command::new("promtool")
            .current_dir(ops().join("prometheus"))
            .args(["test", "rules"])
            .args(&tests),
    ) {
        panic!("promtool test rules: {out}");
    }
}

/// The values of `key` (`expr`, `record`) in a rules file, block scalars
/// (`expr: |` and the lines indented under it) included. Comments and
/// annotations name metrics too, but only expressions query them.
fn yaml_values(text: &str, key: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        let body = line.trim_start().trim_start_matches("- ");
        let Some(value) = body.strip_prefix(key).and_then(|v| v.strip_prefix(':')) else {
            continue;
        };
        let indent = line.len() - line.trim_start().len();
        let mut value = value.trim().to_owned();
        if value.starts_with(['|', '>']) {
            value.clear();
            while let Some(l) =
                lines.next_if(|l| l.trim().is_empty() || l.len() - l.trim_start().len() > indent)
            {
                value.push_str(l);
                value.push('\n');
            }
        }
        out.push(value);
    }
    out
}

/// The queries of a Grafana dashboard: panels' `expr`, and the
/// templating variables' `query`/`definition`, at any depth (rows nest
/// panels).
fn dashboard_queries(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                match v {
                    Value::String(s) if ["expr", "query", "definition"].contains(&k.as_str()) => {
                        out.push(s.clone())
                    }
                    _ => dashboard_queries(v, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|v| dashboard_queries(v, out)),
        _ => {}
    }
}

/// The OneCard series names in a query or document: metrics
/// (`onecard_[a-z0-9_]+`) and recording rules (`level:onecard_...:ops`,
/// told apart by their colons).
fn names_in(text: &str) -> impl Iterator<Item = &str> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|t| t.starts_with("onecard_") || (t.contains(':') && t.contains(":onecard_")))
}

/// Every name the queries of `files` (relative to ops/: rule files and
/// dashboards) use, each with the files that use it.
pub fn queried(files: &[String]) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in files {
        let text = read(f);
        let queries = if f.ends_with(".json") {
            let mut q = Vec::new();
            dashboard_queries(&serde_json::from_str(&text).unwrap(), &mut q);
            q
        } else {
            yaml_values(&text, "expr")
        };
        for q in &queries {
            for name in names_in(q) {
                out.entry(name.to_owned()).or_default().insert(f.clone());
            }
        }
    }
    out
}

/// Every rule file and dashboard that single gateways are watched with.
fn single_files() -> Vec<String> {
    let mut f = vec![RECORDING.to_owned(), ALERTS.to_owned()];
    f.extend(files("grafana/dashboards", ".json"));
    f
}

/// Metrics only a gateway in cluster mode has: those docs/metrics.md lists
/// under "## Cluster mode".
fn cluster_only() -> BTreeSet<String> {
    let doc =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/metrics.md"))
            .unwrap();
    let section = doc
        .split("\n## ")
        .find(|s| s.starts_with("Cluster mode"))
        .expect("docs/metrics.md has a \"## Cluster mode\" section");
    names_in(section).map(str::to_owned).collect()
}

/// What a cluster node must serve: the metrics cluster.yml queries, and the
/// cluster-only ones the other rules and the dashboards query.
pub fn cluster_queried() -> BTreeMap<String, BTreeSet<String>> {
    let only = cluster_only();
    let mut want = queried(&single_files());
    want.retain(|name, _| only.contains(name));
    for (name, files) in queried(&[CLUSTER.to_owned()]) {
        want.entry(name).or_default().extend(files);
    }
    want.retain(|name, _| !name.contains(':'));
    want
}

/// The series names in a `/metrics` page, and each histogram's own name
/// (its samples are `_bucket`, `_sum` and `_count`; a query may name it
/// bare, as `label_values` may).
fn served(text: &str) -> BTreeSet<String> {
    let mut names: BTreeSet<String> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap().to_owned())
        .collect();
    for l in text.lines() {
        if let Some(h) = l
            .strip_prefix("# TYPE ")
            .and_then(|t| t.strip_suffix(" histogram"))
        {
            if names.contains(&format!("{h}_bucket")) {
                names.insert(h.to_owned());
            }
        }
    }
    names
}

/// Waits (up to `within`) until the gateway at `admin` serves every metric
/// in `want`, and returns all it serves; fails naming those it never
/// served and who queries them.
pub async fn assert_served(
    admin: SocketAddr,
    want: &BTreeMap<String, BTreeSet<String>>,
    within: Duration,
) -> BTreeSet<String> {
    assert!(want.len() > 5, "too few names to mean anything: {want:?}");
    let deadline = Instant::now() + within;
    loop {
        let page = client::admin(admin, None, Method::GET, "/metrics", None)
            .await
            .unwrap();
        assert_eq!(page.status, StatusCode::OK);
        let have = served(&String::from_utf8_lossy(&page.body));
        let missing: Vec<String> = want
            .iter()
            .filter(|(name, _)| !have.contains(*name))
            .map(|(name, files)| format!("{name} (queried by {files:?})"))
            .collect();
        if missing.is_empty() {
            return have;
        }
        assert!(
            Instant::now() < deadline,
            "not on /metrics after {within:?}:\n  {}",
            missing.join("\n  ")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every metric that recording.yml, alerts.yml and the dashboards query is
/// on the `/metrics` of a gateway with a settlement sink, a QR key and a
/// little traffic; every recording rule they read is defined. The gateway
/// is the real binary in a process of its own: the test gateways in this
/// process share one metrics recorder, whose other tests' series would
/// hide a metric this gateway lacks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_rules_and_dashboards_query_is_on_metrics() {
    let defined: BTreeSet<String> = [RECORDING, CLUSTER]
        .iter()
        .flat_map(|f| yaml_values(&read(f), "record"))
        .collect();
    let mut all = single_files();
    all.push(CLUSTER.to_owned());
    let undefined: Vec<_> = queried(&all)
        .into_iter()
        .filter(|(name, _)| name.contains(':') && !defined.contains(name))
        .collect();
    assert!(
        undefined.is_empty(),
        "recording rules not defined: {undefined:?}"
    );
    let mut want = queried(&single_files());
    // Cluster-only metrics: cluster.rs checks them on a cluster node.
    let only = cluster_only();
    want.retain(|name, _| !name.contains(':') && !only.contains(name));

    const KEY: &str = "ops-transport-key";
    let dir = tempfile::tempdir().unwrap();
    let sink = Sink::new(&dir.path().join("sink"), 1);
    let receiver = sink.start_hmac(KEY).await;
    // A QR key, so that a bad code is refused with a reason
    // (onecard_qr_rejects_total); sealed batches delivered at once
    // (onecard_settle_delivery_seconds).
    let qr_key = TestKey::ed25519(31).write_public(dir.path(), "ed-ops");
    let extra = format!(
        "{}age_max_ms = 100\nbackoff_base_ms = 10\nbackoff_max_ms = 100\n[[qr.keys]]\nkid = \"ed-ops\"\nalg = \"ed25519\"\npublic_key = {qr_key:?}\n",
        sink.transport_entry(receiver.addr, KEY),
    );
    let mut children = Children::default();
    let gw_dir = dir.path().join("gw");
    std::fs::create_dir_all(gw_dir.join("data")).unwrap();
    // A CRL, so that its expiry is served (OnecardCrlStale).
    let certs_dir = gw_dir.join("data/certs");
    onecard::net::certs::generate(&certs_dir, 1).unwrap();
    let crl = gw_dir.join("terminals.crl.pem");
    onecard::net::certs::write_crl(&certs_dir, &[], &crl, 1, 7).unwrap();
    children.0.push(spawn_gateway_full(
        &gw_dir,
        1,
        &format!("crl = [{crl:?}]"),
        &extra,
        &[],
    ));
    let addrs = wait_ready(&mut children.0[0], &gw_dir);
    let card = "500118P00000001";
    put_cards_at(addrs.admin, &[card.to_owned()], json!(["transit"])).await;
    let mut t = connect_terminal(
        &gw_dir.join("data/certs"),
        addrs.terminal,
        1,
        Protocol::Http1,
    )
    .await;
    for (event, card, want) in [
        ("ops-1", card, "approve"),
        ("ops-2", card, "approve"),
        ("ops-3", "500118P99999999", "decline"),
    ] {
        let a = t
            .authorize(&tap(event, card, "transit", 200))
            .await
            .unwrap();
        assert_eq!(decision(&a).0, want);
    }
    let a = t
        .authorize(&scan("ops-4", "not-a-code", "transit", 200))
        .await
        .unwrap();
    assert_eq!(decision(&a).0, "decline");
    assert_served(addrs.admin, &want, Duration::from_secs(15)).await;
    drop(children);
}

/// Percent-encodes a query parameter's value.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `GET path` on Prometheus's HTTP API; its JSON `data`, or `None` while
/// it does not answer yet.
async fn prom_get(prom: SocketAddr, path: &str) -> Option<Value> {
    let mut c = Connection::plain(prom, Protocol::Http1).await.ok()?;
    let a = c.send(Method::GET, path, &[], Vec::new()).await.ok()?;
    let v: Value = serde_json::from_slice(&a.body).ok()?;
    (v["status"] == "success").then(|| v["data"].clone())
}

/// An instant query's result: each series' labels and value.
async fn prom_query(prom: SocketAddr, query: &str) -> Vec<(Value, f64)> {
    let data = prom_get(prom, &format!("/api/v1/query?query={}", encode(query))).await;
    data.and_then(|d| d["result"].as_array().cloned())
        .unwrap_or_default()
        .into_iter()
        .map(|r| {
            let v = r["value"][1]
                .as_str()
                .unwrap_or("NaN")
                .parse()
                .unwrap_or(f64::NAN);
            (r["metric"].clone(), v)
        })
        .collect()
}

/// A real Prometheus scrapes a gateway every second with recording.yml
/// and alerts.yml loaded, and the p99 recording rule gives a value for
/// each scenario tapped; no rule fails to evaluate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_records_the_p99_of_each_scenario_from_a_gateway() {
    let gw = TestGateway::start(|_| {}).await;
    let card = "500118P00000002";
    gw.put_card(
        card,
        json!({"status": "active", "functions": ["transit", "financial"]}),
    )
    .await;
    // Declared before the child, so it is removed after Prometheus is killed.
    let dir = tempfile::tempdir().unwrap();
    let rule = |f: &str| format!("{:?}", ops().join(f));
    std::fs::write(
        dir.path().join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\n  - {}\nscrape_configs:\n  - job_name: onecard\n    static_configs:\n      - targets: [\"{}\"]\n",
            rule(RECORDING),
            rule(ALERTS),
            gw.admin_addr()
        ),
    )
    .unwrap();
    let prom: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let log = dir.path().join("prometheus.log");
    let log_file = std::fs::File::create(&log).unwrap();
    let mut children = Children::default();
    children.0.push(
        Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.path().join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={prom}"))
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("prometheus runs (scripts/setup-system installs Debian's prometheus)"),
    );
    let why = |what: &str| {
        format!(
            "{what}\nprometheus log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        )
    };

    // Taps of two scenarios, paced, until the rule answers: the rule's
    // rate needs the counts to grow between two scrapes in its window.
    let stop = Arc::new(AtomicBool::new(false));
    let tapper = {
        let (stop, certs, addr) = (stop.clone(), gw.certs_dir(), gw.terminal_addr());
        tokio::spawn(async move {
            let mut t = connect_terminal(&certs, addr, 1, Protocol::Http1).await;
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                for scenario in ["transit", "payment"] {
                    n += 1;
                    let a = t
                        .authorize(&tap(&format!("pr-{n}"), card, scenario, 1))
                        .await
                        .unwrap();
                    assert_eq!(a.status, StatusCode::OK);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            n
        })
    };

    let started = Instant::now();
    let deadline = started + Duration::from_secs(60);
    // Two successful scrapes of the gateway: some 6 s, as Prometheus
    // applies new scrape targets on a 5 s tick.
    while prom_query(prom, "sum_over_time(up{job=\"onecard\"}[1m])")
        .await
        .first()
        .is_none_or(|(_, v)| *v < 2.0)
    {
        if children.0[0].try_wait().unwrap().is_some() || Instant::now() > deadline {
            panic!("{}", why("Prometheus never scraped the gateway twice"));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let scraped = started.elapsed();
    let rule = "scenario:onecard_authorize_latency_seconds:p99_1m";
    let p99 = loop {
        let r = prom_query(prom, rule).await;
        let p99: BTreeMap<String, f64> = r
            .iter()
            .filter(|(_, v)| v.is_finite() && *v > 0.0)
            .map(|(m, v)| (m["scenario"].as_str().unwrap_or("").to_owned(), *v))
            .collect();
        if p99.contains_key("transit") && p99.contains_key("payment") {
            break p99;
        }
        if Instant::now() > deadline {
            panic!("{}", why(&format!("{rule} answered {r:?}")));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    stop.store(true, Ordering::Relaxed);
    let taps = tapper.await.unwrap();
    // Every group of both files loaded, and no rule failed to evaluate (a
    // many-to-many match, say, fails only on real series).
    let groups = prom_get(prom, "/api/v1/rules").await.unwrap()["groups"].clone();
    let groups = groups.as_array().unwrap();
    let in_files = [RECORDING, ALERTS]
        .iter()
        .map(|f| yaml_values(&read(f), "name").len())
        .sum::<usize>();
    assert_eq!(
        groups.len(),
        in_files,
        "{}",
        why(&format!("rule groups: {groups:?}"))
    );
    for rule in groups.iter().flat_map(|g| g["rules"].as_array().unwrap()) {
        assert_ne!(rule["health"], "err", "{rule}");
    }
    eprintln!(
        "prometheus: scraped twice after {scraped:?}, {rule} {p99:?} after {:?} and {taps} taps",
        started.elapsed()
    );
    drop(children);
}
