//! Cluster mode: three real `nats-server` nodes with JetStream (R3) and
//! three gateways on loopback, started by the tests themselves.

use std::time::{Duration, Instant};

use http::Method;
use onecard::config::{ClusterConfig, Config};
use onecard::net::client::Protocol;
use onecard_core::rng::Rng;
use serde_json::{json, Value};

use crate::common::nats::NatsCluster;
use crate::common::{decision, tap, test_config, TestGateway};

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
            tweak(&mut config);
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
        // Each tap goes to a node the seed picks, all at once.
        let mut rng = Rng::new(seed);
        let mut tasks = Vec::new();
        for t in 0..TAPS {
            let node = rng.below(3) as usize;
            let certs = gws[node].certs_dir();
            let addr = gws[node].terminal_addr();
            let card = card.clone();
            let terminal = 1 + (t % 3) as u32;
            tasks.push(tokio::spawn(async move {
                let mut conn =
                    crate::common::connect_terminal(&certs, addr, terminal, Protocol::Http1).await;
                let a = conn
                    .authorize(&tap(&format!("s{seed}-t{t}"), &card, "payment", CHARGE_FEN))
                    .await
                    .unwrap();
                decision(&a)
            }));
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
