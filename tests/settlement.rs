//! Settlement end to end over real sockets: taps approved by a real gateway
//! are delivered in signed batches over HTTPS to a real receiver, which
//! books each event once, through receiver failures and a gateway restart;
//! an acknowledgement that does not match parks the batch.

mod common;

use std::time::{Duration, Instant};

use common::sink::Sink;
use common::{decision, tap, TestGateway};
use onecard::client::Protocol;
use onecard::config::SinkConfig;
use onecard::settle::deliver;
use onecard::settle::receiver::Ledger;
use onecard::settle::sign::{Algorithm, Signer};
use serde_json::json;

const KEY: &str = "transport-signing-key-0001";

/// Waits (up to 60 s: far beyond what a loaded machine needs) until the
/// receiver's ledger holds `events`.
async fn booked(sink: &Sink, addr: std::net::SocketAddr, events: u64) -> Ledger {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let l = sink.ledger(addr).await;
        if l.events >= events || Instant::now() > deadline {
            return l;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn taps(gw: &TestGateway, from: u32, n: u32, card: &str, scenario: &str, fen: i64) {
    let mut t = gw.terminal(1, Protocol::Http1).await;
    for i in from..from + n {
        let a = t
            .authorize(&tap(&format!("s-{i}"), card, scenario, fen))
            .await
            .unwrap();
        decision(&a);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approved_events_are_booked_once_through_failures_and_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let sink = Sink::new(dir.path(), 3);
    let r = sink
        .start(
            "127.0.0.1:0".parse().unwrap(),
            Signer::new(Algorithm::HmacSha256, KEY.as_bytes().to_vec()),
        )
        .await;
    let raddr = r.addr;

    let mut config = common::test_config(dir.path());
    let sink_config: SinkConfig = toml::from_str(&format!(
        r#"
        name = "transport"
        url = "https://127.0.0.1:{}/v1/batches"
        ca = "{}"
        scenarios = ["transit"]
        key = "{KEY}"
        events_max = 7
        age_max_ms = 100
        backoff_base_ms = 10
        backoff_max_ms = 100
        circuit_failures = 100
        "#,
        raddr.port(),
        sink.certs.join(onecard::certs::CA_CERT).display()
    ))
    .unwrap();
    config.settlement.sinks = vec![sink_config];
    config.validate().unwrap();
    let mut gw = TestGateway {
        running: Some(onecard::server::start(config.clone()).await.unwrap()),
        dir,
        config,
    };
    let card = "500118S00000001";
    gw.put_card(
        card,
        json!({"status": "active", "functions": ["transit", "medical"]}),
    )
    .await;

    // 30 bus fares (settled), 5 hospital bills (another sink's), and a
    // receiver that fails its first two batches.
    sink.misbehave(raddr, json!({"fail": 2})).await;
    taps(&gw, 0, 30, card, "transit", 200).await;
    taps(&gw, 100, 5, card, "medical", 1_000).await;
    let l = booked(&sink, raddr, 30).await;
    assert_eq!((l.events, l.total_fen), (30, 6_000), "{l:?}");

    // A restart, then more fares: still each exactly once.
    gw.restart().await;
    taps(&gw, 200, 10, card, "transit", 200).await;
    let l = booked(&sink, raddr, 40).await;
    assert_eq!((l.events, l.total_fen), (40, 8_000), "{l:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(sink.ledger(raddr).await.events, 40, "nothing booked twice");

    // An acknowledgement with a wrong total: the batch is parked, not
    // retried blindly (the receiver did book it).
    sink.misbehave(raddr, json!({"wrong_total": 1})).await;
    taps(&gw, 300, 3, card, "transit", 200).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let store = gw.running().gateway().store.clone();
    let parked = loop {
        let p = deliver::list(&store, &deliver::parked_prefix("transport"), 10).unwrap();
        if !p.is_empty() || Instant::now() > deadline {
            break p;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(parked.len(), 1, "{parked:?}");
    assert_eq!(parked[0].count, 3);
    assert!(parked[0]
        .parked
        .as_deref()
        .unwrap()
        .contains("acknowledged 3 events, 601 fen"));
    assert!(
        deliver::list(&store, &deliver::batch_prefix("transport"), 10)
            .unwrap()
            .is_empty()
    );
    gw.shutdown().await;
    r.stop().await;
}
