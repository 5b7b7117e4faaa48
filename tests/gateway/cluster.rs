//! Cluster mode: three real `nats-server` nodes with JetStream (R3) and
//! three gateways on loopback, started by the tests themselves.

use std::time::{Duration, Instant};

use http::Method;
use onecard::config::{ClusterConfig, Config};
use onecard::net::client::Protocol;
use onecard_core::rng::Rng;
use serde_json::{json, Value};

use crate::common::nats::NatsCluster;
use crate::common::{decision, put_cards_at, tap, test_config, TestGateway};

/// Three gateways on one NATS cluster. They share the development
/// certificates of the first, so any terminal may reach any node.
pub struct Cluster {
    pub nats: NatsCluster,
    pub gateways: Vec<TestGateway>,
}

pub fn cluster_config(dir: &std::path::Path, nats: &NatsCluster, node: &str) -> Config {
    let mut c = test_config(dir);
    c.cluster = Some(ClusterConfig {
        node: node.into(),
        urls: nats.urls(),
        // Quick to give up in tests that cut a node off; quick to notice.
        publish_timeout_ms: 2_000,
        ..ClusterConfig::default()
    });
    c
}

impl Cluster {
    pub async fn start(tweak: impl Fn(&mut Config)) -> Cluster {
        Cluster::start_each(|_, c| tweak(c)).await
    }

    /// As [`Cluster::start`], `tweak` told which node (1 to 3) it sets up.
    pub async fn start_each(tweak: impl Fn(usize, &mut Config)) -> Cluster {
        if std::env::var_os("ONECARD_TEST_LOG").is_some() {
            onecard::app::telemetry::init_tracing();
        }
        let nats = NatsCluster::start(3);
        let mut gateways = Vec::new();
        for i in 1..=3 {
            let dir = tempfile::tempdir().unwrap();
            if let Some(first) = gateways.first() {
                let first: &TestGateway = first;
                copy_dir(&first.certs_dir(), &dir.path().join("certs"));
            }
            let mut config = cluster_config(dir.path(), &nats, &format!("g{i}"));
            tweak(i, &mut config);
            gateways.push(TestGateway::start_in(dir, config).await);
        }
        Cluster { nats, gateways }
    }
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).unwrap();
        }
    }
}

/// Three real gateways (the binary, killable) on `dir`, sharing the
/// development certificates of the first; `extra(i)` is node `i`'s
/// (1 to 3) config besides the listeners.
struct Nodes {
    children: crate::common::process::Children,
    addrs: Vec<onecard::app::server::Addrs>,
    /// The terminals' certificates (every node trusts them).
    certs: std::path::PathBuf,
}

fn spawn_nodes(base: &std::path::Path, extra: impl Fn(usize) -> String) -> Nodes {
    use crate::common::process::{spawn_gateway, wait_ready, Children};
    let mut children = Children::default();
    let mut addrs = Vec::new();
    for i in 1..=3 {
        let dir = base.join(format!("g{i}"));
        std::fs::create_dir_all(dir.join("data")).unwrap();
        if i > 1 {
            copy_dir(&base.join("g1/data/certs"), &dir.join("data/certs"));
        }
        let mut child = spawn_gateway(&dir, 8, &extra(i));
        addrs.push(wait_ready(&mut child, &dir));
        children.0.push(child);
    }
    Nodes {
        children,
        addrs,
        certs: base.join("g1/data/certs"),
    }
}

/// Waits (up to `within`) until the receiver has booked `approved`
/// events for `fen`, checks it booked exactly that, and that nothing more
/// arrives in the `quiet` after: each approval once.
async fn booked_once(
    sink: &crate::common::sink::Sink,
    addr: std::net::SocketAddr,
    (approved, fen): (u64, i64),
    within: Duration,
    quiet: Duration,
) {
    let deadline = Instant::now() + within;
    let ledger = loop {
        let l = sink.ledger(addr).await;
        if l.events >= approved || Instant::now() > deadline {
            break l;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        (ledger.events, ledger.total_fen),
        (approved, fen),
        "{ledger:?}"
    );
    tokio::time::sleep(quiet).await;
    let again = sink.ledger(addr).await;
    assert_eq!(
        (again.events, again.total_fen),
        (approved, fen),
        "{again:?}"
    );
}

/// `body` sent to `gw` by terminal `n` on a task of its own; its
/// (decision, reason).
fn spawn_authorize(
    gw: &TestGateway,
    n: u32,
    body: Value,
) -> tokio::task::JoinHandle<(String, String)> {
    let (certs, addr) = (gw.certs_dir(), gw.terminal_addr());
    tokio::spawn(async move {
        let mut conn = crate::common::connect_terminal(&certs, addr, n, Protocol::Http1).await;
        decision(&conn.authorize(&body).await.unwrap())
    })
}

/// Waits until `check` holds on the card as gateway `gw` shows it.
async fn until_card(gw: &TestGateway, card: &str, check: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let a = gw
            .admin(Method::GET, &format!("/admin/v1/cards/{card}"), None)
            .await;
        if a.status == http::StatusCode::OK {
            let v = a.json();
            if check(&v) {
                return v;
            }
        }
        assert!(
            Instant::now() < deadline,
            "card {card} never matched on this node"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

const DAILY_CAP_FEN: i64 = 1_000;
const CHARGE_FEN: i64 = 100;

/// Concurrent payment taps of the same cards through three nodes, on
/// many seeds: the daily cap holds exactly (never one charge too many,
/// never a charge refused that fitted), and every node ends with the same
/// card state.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_taps_of_one_card_at_three_nodes_never_pass_the_daily_cap() {
    let cluster = Cluster::start(|c| {
        c.policy.card_daily_spend_max_fen = DAILY_CAP_FEN;
    })
    .await;
    let gws = &cluster.gateways;
    const SEEDS: u64 = 6;
    const TAPS: usize = 24;
    for seed in 0..SEEDS {
        let card = format!("500118C{:08}", seed + 1);
        gws[0]
            .put_card(
                &card,
                json!({"status": "active", "functions": ["transit", "financial"]}),
            )
            .await;
        for gw in gws {
            until_card(gw, &card, |_| true).await;
        }
        // Each tap goes to a node the seed picks, all at once; and among
        // them the nightly card file arrives at some node, again and again,
        // with this card in it: an import keeps a card's counters, and
        // must not put back the ones it read before a tap elsewhere.
        let mut rng = Rng::new(seed);
        let mut tasks = Vec::new();
        let mut imports = Vec::new();
        for t in 0..TAPS {
            let node = rng.below(3) as usize;
            let body = tap(&format!("s{seed}-t{t}"), &card, "payment", CHARGE_FEN);
            tasks.push(spawn_authorize(&gws[node], 1 + (t % 3) as u32, body));
            // One import at a time per node (a second is refused), so
            // one at each node.
            if t % 8 == 0 {
                let admin = gws[t / 8].admin_addr();
                let lines = format!(
                    "{{\"card_no\":\"{card}\",\"status\":\"active\",\"functions\":[\"transit\",\"financial\"]}}\n{{\"card_no\":\"500118K{seed:08}\",\"status\":\"active\",\"functions\":[\"transit\"]}}\n"
                );
                imports.push(tokio::spawn(async move {
                    onecard::net::client::admin_raw(
                        admin,
                        Some(crate::common::TOKEN),
                        Method::POST,
                        "/admin/v1/import/cards",
                        "application/x-ndjson",
                        lines.into_bytes(),
                    )
                    .await
                    .unwrap()
                }));
            }
        }
        for i in imports {
            let a = i.await.unwrap();
            assert_eq!(
                a.status,
                http::StatusCode::OK,
                "{}",
                String::from_utf8_lossy(&a.body)
            );
        }
        let mut approved = 0;
        for t in tasks {
            let (d, reason) = t.await.unwrap();
            match d.as_str() {
                "approve" => approved += 1,
                _ => assert_eq!(reason, "LIMIT_EXCEEDED", "seed {seed}"),
            }
        }
        assert_eq!(
            approved as i64,
            DAILY_CAP_FEN / CHARGE_FEN,
            "seed {seed}: the cap allows exactly this many"
        );
        for gw in gws {
            let v = until_card(gw, &card, |v| v["spent_fen"] == json!(DAILY_CAP_FEN)).await;
            assert_eq!(v["spent_fen"], json!(DAILY_CAP_FEN), "seed {seed}");
        }
    }
}

/// A tap of `card` at `gw` as terminal 1, under a new event id.
async fn tap_at(gw: &TestGateway, event: &str, card: &str) -> onecard::net::client::Answer {
    let mut conn = gw.terminal(1, Protocol::Http1).await;
    conn.authorize(&tap(event, card, "transit", 200))
        .await
        .unwrap()
}

/// The deny list as a validator syncing from `gw` sees it (everything
/// from version 0).
async fn deny_sync(gw: &TestGateway) -> Value {
    let mut conn = gw.terminal(1, Protocol::Http1).await;
    let a = conn.denylist(Some(0)).await.unwrap();
    assert_eq!(
        a.status,
        http::StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&a.body)
    );
    a.json()
}

/// A deny-list change made through node 1 declines at node 3; changes made
/// at two nodes at once get one version each, the same on every node, so
/// a validator may sync from any node; a node started empty catches up.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_deny_list_change_through_one_node_declines_at_another_and_an_empty_node_catches_up() {
    let c = Cluster::start(|c| {
        c.offline.terminal_prefixes = vec!["term-".into()];
    })
    .await;
    let g = &c.gateways;
    let cards: Vec<String> = (1..=5).map(|i| format!("500118E{i:08}")).collect();
    for card in &cards {
        g[0].put_card(card, json!({"status": "active", "functions": ["transit"]}))
            .await;
    }
    for card in &cards {
        until_card(&g[2], card, |_| true).await;
    }
    assert_eq!(
        decision(&tap_at(&g[2], "before", &cards[0]).await).0,
        "approve"
    );
    // Through node 1; in effect at node 3.
    let started = Instant::now();
    g[0].deny(&cards[0]).await;
    let mut n = 0;
    loop {
        n += 1;
        let (d, reason) = decision(&tap_at(&g[2], &format!("after-{n}"), &cards[0]).await);
        if d == "decline" {
            assert_eq!(reason, "DENYLISTED");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "never declined at node 3"
        );
    }
    eprintln!(
        "deny list change in effect at another node after {:?}",
        started.elapsed()
    );
    // Two nodes change the list at the same moment: each change gets its
    // own version, and every node numbers them alike.
    let (a, b, d) = tokio::join!(
        g[0].deny(&cards[1]),
        g[1].deny(&cards[2]),
        g[2].deny(&cards[3])
    );
    let _ = (a, b, d);
    let deadline = Instant::now() + Duration::from_secs(10);
    let lists = loop {
        let lists = [
            deny_sync(&g[0]).await,
            deny_sync(&g[1]).await,
            deny_sync(&g[2]).await,
        ];
        if lists.iter().all(|l| l["version"] == json!(4)) || Instant::now() > deadline {
            break lists;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(lists[0]["version"], json!(4), "{}", lists[0]);
    assert_eq!(lists[0], lists[1]);
    assert_eq!(lists[1], lists[2]);
    // A node started on an empty directory reads the stream and serves.
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&g[0].certs_dir(), &dir.path().join("certs"));
    let config = cluster_config(dir.path(), &c.nats, "g4");
    let mut config = config;
    config.offline.terminal_prefixes = vec!["term-".into()];
    let g4 = TestGateway::start_in(dir, config).await;
    assert_eq!(deny_sync(&g4).await, lists[0]);
    for card in &cards[..4] {
        let (d, reason) = decision(&tap_at(&g4, &format!("g4-{card}"), card).await);
        assert_eq!((d.as_str(), reason.as_str()), ("decline", "DENYLISTED"));
    }
    assert_eq!(
        decision(&tap_at(&g4, "g4-ok", &cards[4]).await).0,
        "approve"
    );
    g4.shutdown().await;
}

/// A retry of the same event at another node gets the first answer byte
/// for byte; another body under the same event id is refused there too.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_retry_at_another_node_gets_the_first_answer() {
    let c = Cluster::start(|_| {}).await;
    let g = &c.gateways;
    let card = "500118F00000001";
    g[0].put_card(
        card,
        json!({"status": "active", "functions": ["transit", "financial"]}),
    )
    .await;
    for gw in g {
        until_card(gw, card, |_| true).await;
    }
    let body = tap("retry-1", card, "payment", 300);
    let mut first = g[0].terminal(2, Protocol::Http1).await;
    let a = first.authorize(&body).await.unwrap();
    assert_eq!(decision(&a).0, "approve");
    for gw in &g[1..] {
        let mut conn = gw.terminal(2, Protocol::Http2).await;
        let again = conn.authorize(&body).await.unwrap();
        assert_eq!(again.status, http::StatusCode::OK);
        assert_eq!(again.body, a.body, "the first answer, byte for byte");
        let other = conn
            .authorize(&tap("retry-1", card, "payment", 500))
            .await
            .unwrap();
        assert_eq!(other.status, http::StatusCode::CONFLICT);
        assert_eq!(crate::common::error_code(&other), "IDEMPOTENCY_CONFLICT");
    }
    // Charged once, on every node.
    for gw in g {
        let v = until_card(gw, card, |v| v["spent_fen"] == json!(300)).await;
        assert_eq!(v["spent_fen"], json!(300));
    }
    // The same event sent to two nodes at the same moment: one decision.
    let body = tap("retry-2", card, "payment", 400);
    let (x, y) = tokio::join!(
        async {
            let mut c = g[1].terminal(3, Protocol::Http1).await;
            c.authorize(&body).await.unwrap()
        },
        async {
            let mut c = g[2].terminal(3, Protocol::Http1).await;
            c.authorize(&body).await.unwrap()
        }
    );
    assert_eq!(decision(&x).0, "approve");
    assert_eq!(x.body, y.body);
    for gw in g {
        let v = until_card(gw, card, |v| v["spent_fen"] == json!(700)).await;
        assert_eq!(v["spent_fen"], json!(700));
    }
    // A node restarted on its own data resumes the stream where it left
    // off: it knows the card, but must still learn where the card's
    // subject stands before it decides about it, and then decide at once
    // (not lose a race to its own past until it gives up with a 503).
    let mut g = c.gateways;
    g[1].restart().await;
    let mut conn = g[1].terminal(2, Protocol::Http1).await;
    let a = conn
        .authorize(&tap("after-restart", card, "payment", 50))
        .await
        .unwrap();
    assert_eq!(decision(&a), ("approve".into(), "OK".into()));
    for gw in &g {
        let v = until_card(gw, card, |v| v["spent_fen"] == json!(750)).await;
        assert_eq!(v["spent_fen"], json!(750));
    }
}

/// A node cut off from the NATS quorum answers 503 with Retry-After and
/// says why on /readyz; it never decides alone, and serves again by itself
/// once the quorum is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_without_the_quorum_answers_503_and_recovers_by_itself() {
    let mut c = Cluster::start(|_| {}).await;
    let card = "500118G00000001";
    c.gateways[0]
        .put_card(card, json!({"status": "active", "functions": ["transit"]}))
        .await;
    assert_eq!(
        decision(&tap_at(&c.gateways[0], "q-0", card).await).0,
        "approve"
    );
    // The status page shows the cluster: this node, the stream's leader
    // and its two other servers, and how far this node has applied.
    let deadline = Instant::now() + Duration::from_secs(10);
    let view = loop {
        let s = c.gateways[0]
            .admin_ok(Method::GET, "/admin/v1/status", None)
            .await;
        let v = s["cluster"].clone();
        if v["stream"]["leader"].is_string() && v["apply_lag_messages"] == json!(0) {
            break v;
        }
        assert!(Instant::now() < deadline, "no cluster view: {s}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(view["node"], "g1");
    assert_eq!(view["quorum_reachable"], true);
    assert_eq!(
        view["stream"]["replicas"].as_array().unwrap().len(),
        2,
        "{view}"
    );
    assert!(view["applied_seq"].as_u64().unwrap() >= 2, "{view}");
    // Two of three NATS nodes gone: no quorum.
    c.nats.kill_node(1);
    c.nats.kill_node(2);
    let a = tap_at(&c.gateways[0], "q-1", card).await;
    assert_eq!(
        a.status,
        http::StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        String::from_utf8_lossy(&a.body)
    );
    assert_eq!(crate::common::error_code(&a), "UNAVAILABLE");
    assert!(a.headers.get(http::header::RETRY_AFTER).is_some());
    let deadline = Instant::now() + Duration::from_secs(10);
    let ready = loop {
        let r = c.gateways[0].admin(Method::GET, "/readyz", None).await;
        if r.status != http::StatusCode::OK || Instant::now() > deadline {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(ready.status, http::StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        String::from_utf8_lossy(&ready.body).contains("quorum"),
        "{}",
        String::from_utf8_lossy(&ready.body)
    );
    // Back: it serves again without a restart.
    c.nats.start_node(1);
    c.nats.start_node(2);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut n = 0;
    loop {
        n += 1;
        let a = tap_at(&c.gateways[0], &format!("q-back-{n}"), card).await;
        if a.status == http::StatusCode::OK {
            assert_eq!(decision(&a).0, "approve");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never recovered: {}",
            String::from_utf8_lossy(&a.body)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while c.gateways[0]
        .admin(Method::GET, "/readyz", None)
        .await
        .status
        != http::StatusCode::OK
    {
        assert!(Instant::now() < deadline, "/readyz never turned green");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The retry of the refused event is a new decision, once: q-1 was
    // never recorded.
    assert_eq!(
        decision(&tap_at(&c.gateways[0], "q-1", card).await).0,
        "approve"
    );
}

/// One QR code scanned at three nodes at once is spent once; a venue's
/// daily quota holds across nodes for different cards entering at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_code_is_spent_once_and_a_venue_quota_holds_across_nodes() {
    use crate::common::qr::{now_s, scan, TestKey};
    let keys = tempfile::tempdir().unwrap();
    let key = TestKey::ed25519(21);
    let public_key = key.write_public(keys.path(), "ed-c");
    const QUOTA: usize = 5;
    let c = Cluster::start(|c| {
        c.qr.keys = vec![onecard::config::QrKeyConfig {
            kid: "ed-c".into(),
            alg: key.alg().into(),
            public_key: public_key.clone(),
            valid_from: None,
            valid_until: None,
        }];
        let rules = Config::parse(&format!(
            "[[culture.venues]]\nsite = \"museum-9\"\nquota_daily = {QUOTA}\nfee_fen = 0\n"
        ))
        .unwrap();
        c.culture = rules.culture;
    })
    .await;
    let g = &c.gateways;
    let cards: Vec<String> = (1..=12).map(|i| format!("500118H{i:08}")).collect();
    let active = json!({"status": "active", "functions": ["transit", "financial"]});
    g[0].put_card(&cards[0], active.clone()).await;
    g[0].bind(&cards[0], "essc-c1", "essc").await;
    for card in &cards[1..] {
        g[0].put_card(card, active.clone()).await;
    }
    // Every node applies the stream in order: once it shows the last
    // card, it has the binding made before it.
    for gw in g {
        until_card(gw, &cards[11], |_| true).await;
    }
    for round in 0..4 {
        let code = key.code(
            "ed-c",
            "essc-c1",
            "essc",
            now_s(),
            60,
            &format!("jti-cluster-{round:04}"),
        );
        let mut tasks = Vec::new();
        for (n, gw) in g.iter().enumerate() {
            let body = scan(&format!("scan-{round}-{n}"), &code, "transit", 200);
            tasks.push(spawn_authorize(gw, 1 + n as u32, body));
        }
        let mut approved = 0;
        for t in tasks {
            let (d, reason) = t.await.unwrap();
            if d == "approve" {
                approved += 1;
            } else {
                assert_eq!(reason, "QR_REPLAYED", "round {round}");
            }
        }
        assert_eq!(approved, 1, "round {round}: one code, one approval");
    }
    // Eleven cards enter one venue through three nodes at once.
    let mut tasks = Vec::new();
    for (i, card) in cards[1..].iter().enumerate() {
        let body = json!({"event_id": format!("museum-{i}"), "kind": "tap", "card_no": card,
                          "scenario": "culture", "site": "museum-9"});
        tasks.push(spawn_authorize(&g[i % 3], 1 + (i % 3) as u32, body));
    }
    let mut approved = 0;
    for t in tasks {
        let (d, reason) = t.await.unwrap();
        if d == "approve" {
            approved += 1;
        } else {
            assert_eq!(reason, "QUOTA_EXHAUSTED");
        }
    }
    assert_eq!(approved, QUOTA, "the quota, exactly, across nodes");
    for gw in g {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let v = gw.admin_ok(Method::GET, "/admin/v1/venues", None).await;
            if v.to_string()
                .contains(&format!("\"entries_today\":{QUOTA}"))
            {
                break;
            }
            assert!(Instant::now() < deadline, "venue count on a node: {v}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// One answer a terminal received under load.
struct Answered {
    terminal: u32,
    event: String,
    card: usize,
    approved: bool,
    body: bytes::Bytes,
    node: std::net::SocketAddr,
    at: Instant,
}

/// The real binary as three cluster nodes; kill -9 of one gateway, then of
/// one NATS node, under load from terminals that fail over. Afterwards
/// every answer a terminal received is in the cluster's journal exactly
/// once: replayed byte for byte by a survivor, and each card's spend on
/// every survivor is the sum of its approved charges. The survivors went
/// on deciding.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_of_a_gateway_and_of_a_nats_node_under_load_loses_no_answer() {
    use onecard::net::client::{self, FailoverTerminal};
    let mut nats = NatsCluster::start(3);
    let urls: Vec<String> = nats.urls().iter().map(|u| format!("{u:?}")).collect();
    let base = tempfile::tempdir().unwrap();
    let Nodes {
        mut children,
        addrs,
        certs,
    } = spawn_nodes(base.path(), |i| {
        format!(
            "[cluster]\nnode = \"g{i}\"\nurls = [{}]\npublish_timeout_ms = 2000\n[policy]\ncard_daily_spend_max_fen = 100000000\n",
            urls.join(", ")
        )
    });
    const CARDS: usize = 40;
    let card = |i: usize| format!("500118K{i:08}");
    let cards: Vec<String> = (0..CARDS).map(card).collect();
    put_cards_at(addrs[0].admin, &cards, json!(["transit", "financial"])).await;
    let spent_at = |admin: std::net::SocketAddr, i: usize| async move {
        let a = client::admin(
            admin,
            Some(crate::common::TOKEN),
            Method::GET,
            &format!("/admin/v1/cards/{}", card(i)),
            None,
        )
        .await
        .ok()?;
        (a.status == http::StatusCode::OK).then(|| a.json()["spent_fen"].as_i64().unwrap_or(0))
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while spent_at(addrs[2].admin, CARDS - 1).await.is_none() {
        assert!(Instant::now() < deadline, "cards never reached node 3");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Load: six terminals, each starting at a node of its own.
    let terminal_addrs: Vec<_> = addrs.iter().map(|a| a.terminal).collect();
    let started = Instant::now();
    // Long enough to outlast the stream's leader election after the NATS
    // node's kill (RAFT waits several seconds before electing).
    let stop_at = started + Duration::from_secs(22);
    let mut tasks = Vec::new();
    for n in 1..=6u32 {
        let mut t = FailoverTerminal::new(
            terminal_addrs.clone(),
            Some(&certs),
            n,
            Protocol::Http1,
            n as usize,
        );
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng::new(u64::from(n));
            let mut got = Vec::new();
            let mut i = 0;
            while Instant::now() < stop_at {
                i += 1;
                let c = rng.below(CARDS as u64) as usize;
                let event = format!("k{n}-{i}");
                // As a terminal does: the same event again until some node
                // gives a definite answer (a 503 or a lost connection says
                // nothing about whether it was recorded).
                let give_up = Instant::now() + Duration::from_secs(40);
                loop {
                    let node = t.node();
                    match t.authorize(&tap(&event, &card(c), "payment", 1)).await {
                        Ok(a) if a.status == http::StatusCode::OK => {
                            let approved = a.json()["decision"] == "approve";
                            got.push(Answered {
                                terminal: n,
                                event,
                                card: c,
                                approved,
                                body: a.body,
                                node,
                                at: Instant::now(),
                            });
                            break;
                        }
                        Ok(a) if a.status != http::StatusCode::SERVICE_UNAVAILABLE => {
                            panic!("{event}: {} {}", a.status, String::from_utf8_lossy(&a.body))
                        }
                        _ => {
                            assert!(
                                Instant::now() < give_up,
                                "{event}: no node answered for 40 s"
                            );
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
            }
            (got, t.failovers)
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let killed_gateway = Instant::now();
    let mut g1 = children.0.remove(0);
    g1.kill().unwrap();
    g1.wait().unwrap();
    tokio::time::sleep(Duration::from_millis(3000)).await;
    // The NATS node that leads the journal stream: the worst one to lose.
    let status = client::admin(
        addrs[1].admin,
        Some(crate::common::TOKEN),
        Method::GET,
        "/admin/v1/status",
        None,
    )
    .await
    .unwrap()
    .json();
    let leader = status["cluster"]["stream"]["leader"]
        .as_str()
        .unwrap_or("n1")
        .to_owned();
    let victim = nats
        .nodes
        .iter()
        .position(|n| n.name == leader)
        .unwrap_or(0);
    let killed_nats = Instant::now();
    nats.kill_node(victim);
    let mut answers = Vec::new();
    let mut failovers = 0;
    for t in tasks {
        let (got, f) = t.await.unwrap();
        answers.extend(got);
        failovers += f;
    }
    let after_gateway = answers
        .iter()
        .filter(|a| a.at > killed_gateway + Duration::from_millis(500))
        .count();
    let after_nats = answers
        .iter()
        .filter(|a| a.at > killed_nats + Duration::from_millis(500))
        .count();
    // How long no decision was made after the stream's leader died.
    let resumed = answers
        .iter()
        .filter(|a| a.at > killed_nats)
        .map(|a| a.at - killed_nats)
        .min();
    assert!(failovers > 0, "terminals on the killed node moved");
    assert!(
        after_gateway > 0 && after_nats > 0,
        "the survivors went on deciding ({after_gateway}, {after_nats})"
    );
    // Failover as a terminal sees it: its last answer from the killed node
    // to its first from another.
    let mut gaps = Vec::new();
    for n in 1..=6u32 {
        let mine: Vec<_> = answers.iter().filter(|a| a.terminal == n).collect();
        if let Some(last_g1) = mine.iter().rposition(|a| a.node == terminal_addrs[0]) {
            if let Some(next) = mine.get(last_g1 + 1) {
                gaps.push(next.at - mine[last_g1].at);
            }
        }
    }
    eprintln!(
        "kill -9 under load: {} answers, {after_gateway} after the gateway's kill, {after_nats} after the NATS node's; failovers {failovers}; failover gaps {gaps:?}; first answer after the stream leader's ({leader}) kill {resumed:?}",
        answers.len()
    );
    // Every answer is in the journal once: each card's spend on both
    // survivors is the sum of its approved charges ...
    let mut want = vec![0i64; CARDS];
    for a in &answers {
        if a.approved {
            want[a.card] += 1;
        }
    }
    for admin in [addrs[1].admin, addrs[2].admin] {
        for (i, w) in want.iter().enumerate() {
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                let got = spent_at(admin, i).await;
                if got == Some(*w) {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "card {i}: spent {got:?}, answers say {w}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    // ... and is replayed byte for byte by a survivor: every answer from
    // a second before each kill to two seconds after it, and every fifth
    // of the rest (each terminal's in order, the six at once).
    let near = |at: Instant, kill: Instant| {
        at + Duration::from_secs(1) > kill && at < kill + Duration::from_secs(2)
    };
    let mut by_terminal: std::collections::BTreeMap<u32, Vec<(String, usize, bytes::Bytes)>> =
        Default::default();
    for (i, a) in answers.iter().enumerate() {
        if i % 5 == 0 || near(a.at, killed_gateway) || near(a.at, killed_nats) {
            by_terminal.entry(a.terminal).or_default().push((
                a.event.clone(),
                a.card,
                a.body.clone(),
            ));
        }
    }
    let mut replays = Vec::new();
    for (n, list) in by_terminal {
        let mut t = FailoverTerminal::new(
            vec![terminal_addrs[1], terminal_addrs[2]],
            Some(&certs),
            n,
            Protocol::Http1,
            0,
        );
        replays.push(tokio::spawn(async move {
            for (event, c, body) in list {
                let again = t
                    .authorize(&tap(&event, &card(c), "payment", 1))
                    .await
                    .unwrap();
                assert_eq!(again.status, http::StatusCode::OK);
                assert_eq!(again.body, body, "{event} replayed");
            }
        }));
    }
    for r in replays {
        r.await.unwrap();
    }
    drop(children);
}

/// Settlement in a cluster: the one node with `cluster.settle` delivers
/// the whole cluster's approvals, taken through every node, to a real
/// receiver (`onecard sink-sim`), each booked once. A sink on a node
/// without `cluster.settle` is refused at start.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_settling_node_books_every_nodes_approvals_once() {
    use crate::common::sink::Sink;
    use onecard_core::settle::sign::{Algorithm, Signer};
    const KEY: &str = "cluster-transport-key";
    let sink_dir = tempfile::tempdir().unwrap();
    let sink = Sink::new(sink_dir.path(), 3);
    let receiver = sink
        .start(
            "127.0.0.1:0".parse().unwrap(),
            Signer::new(Algorithm::HmacSha256, KEY.as_bytes().to_vec()),
        )
        .await;
    let sink_config: onecard::config::SinkConfig = toml::from_str(&format!(
        "name = \"transport\"\nurl = \"https://127.0.0.1:{}/v1/batches\"\nca = \"{}\"\nscenarios = [\"transit\"]\nkey = \"{KEY}\"\nage_max_ms = 200\nbackoff_base_ms = 10\nbackoff_max_ms = 100\n",
        receiver.addr.port(),
        sink.certs.join(onecard::net::certs::CA_CERT).display()
    ))
    .unwrap();
    // Refused without cluster.settle.
    let mut refused = test_config(sink_dir.path());
    refused.cluster = Some(ClusterConfig {
        node: "gx".into(),
        ..ClusterConfig::default()
    });
    refused.settlement.sinks = vec![sink_config.clone()];
    let e = refused.validate().unwrap_err().to_string();
    assert!(e.contains("cluster.settle"), "{e}");
    let c = Cluster::start_each(|i, config| {
        if i == 1 {
            config.settlement.sinks = vec![sink_config.clone()];
            config.cluster.as_mut().unwrap().settle = true;
        }
    })
    .await;
    let g = &c.gateways;
    let cards: Vec<String> = (1..=6).map(|i| format!("500118J{i:08}")).collect();
    for card in &cards {
        g[0].put_card(card, json!({"status": "active", "functions": ["transit"]}))
            .await;
    }
    for card in &cards {
        until_card(&g[2], card, |_| true).await;
    }
    let mut approved = 0u64;
    let mut fen = 0i64;
    for (n, gw) in g.iter().enumerate() {
        let mut t = gw.terminal(1 + n as u32, Protocol::Http1).await;
        for (k, card) in cards.iter().enumerate() {
            let a = t
                .authorize(&tap(
                    &format!("settle-{n}-{k}"),
                    card,
                    "transit",
                    100 + k as i64,
                ))
                .await
                .unwrap();
            if decision(&a).0 == "approve" {
                approved += 1;
                fen += a.json()["amount_fen"].as_i64().unwrap();
            }
        }
    }
    assert_eq!(approved, 18);
    booked_once(
        &sink,
        receiver.addr,
        (approved, fen),
        Duration::from_secs(30),
        Duration::from_millis(600),
    )
    .await;
}

/// A validator's offline upload recorded at one node while the same card
/// is tapped online at the two others: an offline event that lost its card
/// to an online tap is recorded again, not failed, and every fare counts
/// once on every node.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_offline_upload_and_online_taps_of_one_card_at_other_nodes_all_count() {
    let c = Cluster::start(|c| {
        c.offline.terminal_prefixes = vec!["term-".into()];
    })
    .await;
    let g = &c.gateways;
    let card = "500118L00000001";
    g[0].put_card(card, json!({"status": "active", "functions": ["transit"]}))
        .await;
    for gw in g {
        until_card(gw, card, |_| true).await;
    }
    const OFFLINE: i64 = 40;
    const ONLINE: usize = 20;
    let at = time::OffsetDateTime::from_unix_timestamp_nanos(
        i128::from(onecard_core::time::wall_ms()) * 1_000_000,
    )
    .unwrap()
    .format(&time::format_description::well_known::Rfc3339)
    .unwrap();
    let events: Vec<Value> = (0..OFFLINE)
        .map(|i| {
            json!({
                "event_id": format!("off-{i}"), "kind": "tap", "card_no": card,
                "scenario": "transit", "amount_fen": 10, "site": "bus-88",
                "occurred_at": at, "decision": "approve",
            })
        })
        .collect();
    let mut online = Vec::new();
    for t in 0..ONLINE {
        let body = tap(&format!("on-{t}"), card, "transit", 100);
        online.push(spawn_authorize(&g[1 + t % 2], 1 + (t % 2) as u32, body));
    }
    let mut validator = g[0].terminal(3, Protocol::Http1).await;
    let a = validator
        .offline_batch(&json!({ "events": events }))
        .await
        .unwrap();
    assert_eq!(
        a.status,
        http::StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&a.body)
    );
    assert_eq!(a.json()["accepted"], json!(OFFLINE), "{}", a.json());
    let mut approved = 0;
    for t in online {
        let (d, reason) = t.await.unwrap();
        assert_eq!(d, "approve", "{reason}");
        approved += 1;
    }
    let spent = OFFLINE * 10 + approved * 100;
    for gw in g {
        let v = until_card(gw, card, |v| v["spent_fen"] == json!(spent)).await;
        assert_eq!(v["spent_fen"], json!(spent));
    }
}

/// Settlement survives its delivering node: two nodes may deliver the
/// sink (`cluster.settle`), one holds its lease; it is killed (-9) while
/// taps go on through the others and batches are on their way. The other
/// takes over where the stream says the sink stands, and the real
/// receiver (`onecard sink-sim`) books every approval once: the same
/// batches with the same ids went out again, none was sealed twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_delivering_node_killed_another_takes_over_and_every_approval_is_booked_once() {
    use crate::common::sink::Sink;
    use onecard::net::client::{self, FailoverTerminal};
    const KEY: &str = "cluster-takeover-key";
    let sink_dir = tempfile::tempdir().unwrap();
    let sink = Sink::new(sink_dir.path(), 3);
    let receiver = sink.start_hmac(KEY).await;
    let nats = NatsCluster::start(3);
    let urls: Vec<String> = nats.urls().iter().map(|u| format!("{u:?}")).collect();
    let base = tempfile::tempdir().unwrap();
    let extra = |i: usize| {
        let (node, settle) = (format!("g{i}"), i <= 2);
        let mut s = format!(
            "[cluster]\nnode = \"{node}\"\nurls = [{}]\npublish_timeout_ms = 2000\nsettle = {settle}\nsettle_lease_ms = 1500\n",
            urls.join(", ")
        );
        if settle {
            // Small batches, sealed quickly: many of them, some on their
            // way when the node dies.
            s.push_str(&sink.transport_entry(receiver.addr, KEY));
            s.push_str(
                "events_max = 7\nage_max_ms = 100\nbackoff_base_ms = 10\nbackoff_max_ms = 200\n",
            );
        }
        s
    };
    let Nodes {
        mut children,
        addrs,
        certs,
    } = spawn_nodes(base.path(), extra);
    eprintln!("takeover: three gateways up");
    const CARDS: usize = 20;
    let card = |i: usize| format!("500118M{i:08}");
    let cards: Vec<String> = (0..CARDS).map(card).collect();
    put_cards_at(addrs[2].admin, &cards, json!(["transit"])).await;
    // The sink as node `i` (0 or 1) shows it.
    let sink_view = |i: usize| {
        let admin = addrs[i].admin;
        async move {
            let a = client::admin(
                admin,
                Some(crate::common::TOKEN),
                Method::GET,
                "/admin/v1/settlement",
                None,
            )
            .await
            .ok()?;
            (a.status == http::StatusCode::OK).then(|| a.json()["sinks"][0].clone())
        }
    };
    // One of the two delivers.
    let deadline = Instant::now() + Duration::from_secs(20);
    let delivering = loop {
        let mut here = Vec::new();
        for i in 0..2 {
            if sink_view(i)
                .await
                .is_some_and(|v| v["delivering_here"] == json!(true))
            {
                here.push(i);
            }
        }
        if here.len() == 1 {
            break here[0];
        }
        assert!(Instant::now() < deadline, "no one node delivers: {here:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let survivor = 1 - delivering;
    eprintln!("takeover: node {} delivers", delivering + 1);
    // Taps through every node (terminals fail over), each event sent
    // again until some node answers it.
    let terminal_addrs: Vec<_> = addrs.iter().map(|a| a.terminal).collect();
    let stop_at = Instant::now() + Duration::from_secs(8);
    let mut tasks = Vec::new();
    for n in 1..=4u32 {
        let mut t = FailoverTerminal::new(
            terminal_addrs.clone(),
            Some(&certs),
            n,
            Protocol::Http1,
            n as usize,
        );
        tasks.push(tokio::spawn(async move {
            let mut approved = (0u64, 0i64);
            let mut i = 0;
            while Instant::now() < stop_at {
                i += 1;
                let event = format!("m{n}-{i}");
                let body = tap(&event, &card(i % CARDS), "transit", 100 + i as i64 % 7);
                let give_up = Instant::now() + Duration::from_secs(30);
                loop {
                    match t.authorize(&body).await {
                        Ok(a) if a.status == http::StatusCode::OK => {
                            let v = a.json();
                            if v["decision"] == "approve" {
                                approved.0 += 1;
                                approved.1 += v["amount_fen"].as_i64().unwrap();
                            }
                            break;
                        }
                        Ok(a) if a.status != http::StatusCode::SERVICE_UNAVAILABLE => {
                            panic!("{event}: {} {}", a.status, String::from_utf8_lossy(&a.body))
                        }
                        _ => {
                            assert!(Instant::now() < give_up, "{event}: no node answered");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            approved
        }));
    }
    // Once the receiver has booked some batches, the delivering node dies.
    let deadline = Instant::now() + Duration::from_secs(20);
    while sink.ledger(receiver.addr).await.events < 30 {
        assert!(Instant::now() < deadline, "nothing booked before the kill");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("takeover: killing the delivering node");
    children.0[delivering].kill().unwrap();
    children.0[delivering].wait().unwrap();
    let killed_at = Instant::now();
    // The survivor takes over by itself, while the taps go on.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if sink_view(survivor)
            .await
            .is_some_and(|v| v["delivering_here"] == json!(true))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the survivor never took the sink over"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "takeover: the survivor delivers {} ms after the kill",
        killed_at.elapsed().as_millis()
    );
    let (mut approved, mut fen) = (0u64, 0i64);
    for t in tasks {
        let (n, f) = t.await.unwrap();
        approved += n;
        fen += f;
    }
    assert!(approved > 60, "too little load to say anything: {approved}");
    booked_once(
        &sink,
        receiver.addr,
        (approved, fen),
        Duration::from_secs(60),
        Duration::from_millis(1_000),
    )
    .await;
    drop(children);
}

/// The metrics cluster.yml queries, and the cluster-only ones that the
/// other rules and the dashboards query (ops.rs checks the rest on a
/// single gateway), are on the `/metrics` of a cluster node that holds a
/// sink's lease and has published a tap.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ops_rules_find_their_metrics_on_a_cluster_node() {
    use crate::common::sink::Sink;
    const KEY: &str = "cluster-ops-signing-key";
    let sink_dir = tempfile::tempdir().unwrap();
    let sink = Sink::new(sink_dir.path(), 1);
    let receiver = sink.start_hmac(KEY).await;
    let nats = NatsCluster::start(3);
    let urls: Vec<String> = nats.urls().iter().map(|u| format!("{u:?}")).collect();
    let base = tempfile::tempdir().unwrap();
    // Node 1 alone settles, so it takes the sink's lease.
    let extra = |i: usize| {
        let mut s = format!(
            "[cluster]\nnode = \"g{i}\"\nurls = [{}]\nsettle = {}\n",
            urls.join(", "),
            i == 1
        );
        if i == 1 {
            s.push_str(&sink.transport_entry(receiver.addr, KEY));
        }
        s
    };
    let Nodes {
        children,
        addrs,
        certs,
    } = spawn_nodes(base.path(), extra);
    let card = "500118N00000001".to_owned();
    put_cards_at(
        addrs[0].admin,
        std::slice::from_ref(&card),
        json!(["transit"]),
    )
    .await;
    let mut t =
        crate::common::connect_terminal(&certs, addrs[0].terminal, 1, Protocol::Http1).await;
    let a = t
        .authorize(&tap("ops-c1", &card, "transit", 200))
        .await
        .unwrap();
    assert_eq!(decision(&a).0, "approve");
    crate::ops::assert_served(
        addrs[0].admin,
        &crate::ops::cluster_queried(),
        Duration::from_secs(20),
    )
    .await;
    drop(children);
}
