//! Shared harness for the black-box tests: a real gateway on ephemeral
//! loopback ports with real development certificates, talked to as
//! terminals and operators do.
#![allow(dead_code)]

pub mod faultfs;
pub mod nats;
pub mod process;
pub mod qr;
pub mod sink;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use onecard_core::time::ShiftedClock;

use http::{Method, StatusCode};
use onecard::app::server::{self, Running};
use onecard::config::Config;
use onecard::net::client::{self, Answer, Connection, Protocol};
use serde_json::{json, Value};

pub const TOKEN: &str = "test-admin-token";

pub struct TestGateway {
    pub running: Option<Running>,
    pub dir: tempfile::TempDir,
    pub config: Config,
    /// The gateway's clock: the wall clock, which a test moves ahead
    /// instead of waiting for an expiry or a retention to pass.
    pub clock: Arc<ShiftedClock>,
}

/// A config for tests: loopback ports chosen by the OS, development
/// certificates, generous rate limits unless a test tightens them.
pub fn test_config(dir: &Path) -> Config {
    let mut c = Config::default();
    c.data_dir = dir.to_path_buf();
    c.terminal.addr = "127.0.0.1:0".parse().unwrap();
    c.admin.addr = "127.0.0.1:0".parse().unwrap();
    c.terminal.dev_certs = true;
    c.terminal.dev_terminals = 3;
    c.admin.token = Some(TOKEN.to_owned());
    c.limits.terminal_rate_per_s = 100_000;
    c.limits.terminal_burst = 100_000;
    // Tests share two CPUs with each other: a runtime lagging because of
    // another test must not shed this one's requests, nor a test's burst
    // of requests meet a cap sized for one gateway per machine. The tests
    // of shedding set their own (limits.rs).
    c.limits.overload_lag_ms = 0;
    c.limits.requests_in_flight_max = 4096;
    c
}

impl TestGateway {
    pub async fn start(tweak: impl FnOnce(&mut Config)) -> TestGateway {
        let dir = tempfile::tempdir().unwrap();
        let mut config = test_config(dir.path());
        tweak(&mut config);
        TestGateway::start_in(dir, config).await
    }

    /// Starts a gateway on `config`, whose data directory is `dir` (a
    /// test that prepares files there first).
    pub async fn start_in(dir: tempfile::TempDir, config: Config) -> TestGateway {
        config.validate().unwrap();
        let clock = Arc::new(ShiftedClock::new());
        let running = server::start_with_clock(config.clone(), clock.clone())
            .await
            .expect("gateway starts");
        TestGateway {
            running: Some(running),
            dir,
            config,
            clock,
        }
    }

    /// The gateway's time now, in Unix milliseconds.
    pub fn clock_ms(&self) -> i64 {
        use onecard_core::time::Clock;
        self.clock.now_ms()
    }

    /// Moves the gateway's clock to the next local noon and answers that
    /// local day (days since the epoch): a test of daily figures then has
    /// hours before a midnight comes between its steps.
    pub fn to_next_noon(&self) -> i32 {
        let offset = self.config.policy.day_offset_minutes;
        let local = self.clock_ms() + i64::from(offset) * 60_000;
        let noon = (local.div_euclid(86_400_000) + 1) * 86_400_000 + 43_200_000;
        self.advance_ms(noon - local);
        onecard_core::time::local_day(self.clock_ms().div_euclid(1000), offset)
    }

    /// Moves the gateway's clock `ms` ahead: what takes that long to
    /// expire has expired at the next request.
    pub fn advance_ms(&self, ms: i64) {
        self.clock.advance(ms);
    }

    pub fn running(&self) -> &Running {
        self.running.as_ref().unwrap()
    }

    /// Stops the gateway and starts a new one on the same data directory.
    pub async fn restart(&mut self) {
        self.running.take().unwrap().shutdown().await;
        self.running = Some(
            server::start_with_clock(self.config.clone(), self.clock.clone())
                .await
                .expect("gateway restarts"),
        );
    }

    pub fn certs_dir(&self) -> PathBuf {
        self.config.certs_dir()
    }

    pub fn terminal_addr(&self) -> SocketAddr {
        self.running().addrs.terminal
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.running().addrs.admin
    }

    /// A connection as development terminal `n` (1-based).
    pub async fn terminal(&self, n: u32, protocol: Protocol) -> Connection {
        connect_terminal(&self.certs_dir(), self.terminal_addr(), n, protocol).await
    }

    pub async fn admin(&self, method: Method, path: &str, body: Option<Value>) -> Answer {
        client::admin(self.admin_addr(), Some(TOKEN), method, path, body.as_ref())
            .await
            .unwrap()
    }

    /// An admin call that must answer `200`; its JSON answer.
    pub async fn admin_ok(&self, method: Method, path: &str, body: Option<Value>) -> Value {
        let a = self.admin(method, path, body).await;
        assert_eq!(
            a.status,
            StatusCode::OK,
            "{path}: {}",
            String::from_utf8_lossy(&a.body)
        );
        a.json()
    }

    pub async fn put_card(&self, card: &str, body: Value) {
        self.admin_ok(Method::PUT, &format!("/admin/v1/cards/{card}"), Some(body))
            .await;
    }

    /// Binds a credential id of type `typ` (`essc`, `ykm`) to a card.
    pub async fn bind(&self, card: &str, credential_id: &str, typ: &str) {
        self.admin_ok(
            Method::POST,
            &format!("/admin/v1/cards/{card}/credentials"),
            Some(json!({"credential_id": credential_id, "typ": typ})),
        )
        .await;
    }

    pub async fn deny(&self, card: &str) {
        self.admin_ok(
            Method::PUT,
            &format!("/admin/v1/denylist/{card}"),
            Some(json!({"reason": "lost"})),
        )
        .await;
    }

    pub async fn shutdown(mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown().await;
        }
    }
}

pub async fn connect_terminal(
    certs_dir: &Path,
    addr: SocketAddr,
    n: u32,
    protocol: Protocol,
) -> Connection {
    client::connect_terminal(addr, Some(certs_dir), n, protocol)
        .await
        .expect("terminal connects")
}

/// A free loopback port, chosen by the OS (for servers that must be told
/// their port: nats-server, Prometheus).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Registers `cards` through the admin API at `admin` (a gateway known
/// only by its address, such as the real binary), active with `functions`.
pub async fn put_cards_at(admin: SocketAddr, cards: &[String], functions: Value) {
    for card in cards {
        let a = client::admin(
            admin,
            Some(TOKEN),
            Method::PUT,
            &format!("/admin/v1/cards/{card}"),
            Some(&json!({"status": "active", "functions": functions})),
        )
        .await
        .unwrap();
        assert_eq!(a.status, StatusCode::OK);
    }
}

pub fn tap(event_id: &str, card: &str, scenario: &str, amount: i64) -> Value {
    json!({
        "event_id": event_id,
        "kind": "tap",
        "card_no": card,
        "scenario": scenario,
        "amount_fen": amount,
        "site": "line-12",
        "occurred_at": "2026-11-28T07:45:12Z",
    })
}

/// (decision, reason) of a 200 answer; panics with the body otherwise.
pub fn decision(a: &Answer) -> (String, String) {
    assert_eq!(
        a.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&a.body)
    );
    let v = a.json();
    (
        v["decision"].as_str().unwrap().to_owned(),
        v["reason"].as_str().unwrap().to_owned(),
    )
}

/// The error code of a non-200 answer.
pub fn error_code(a: &Answer) -> String {
    a.json()["error"]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("no error code in {}", String::from_utf8_lossy(&a.body)))
        .to_owned()
}
