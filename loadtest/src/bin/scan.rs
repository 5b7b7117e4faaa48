//! `onecard-scan`: figures for scans and loss reports (issue 5).
//!
//! - `raw`: the crypto crate's own verify rate, on N threads, with no
//!   gateway around it: the ceiling a scan cannot beat.
//! - `gateway`: scans per second through a running gateway over mTLS,
//!   closed loop, each with a fresh code (made before the clock starts,
//!   so issuing costs the measurement nothing).
//! - `loss`: terminals tap one card back to back; a loss report goes in
//!   through the admin API; measured is the time from the report's answer
//!   to the first decline any terminal receives, and that no tap sent after
//!   the answer was approved. Repeated, with the loss lifted in between.
//!
//! Loopback only; every mode is bounded in time and count.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use ed25519_dalek::Signer as _;
use onecard::net::client::{self, Protocol};
use serde_json::json;

use onecard_core::qr;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

// The gateway under test (loopback only) and its admin API. (A plain
// comment: a doc comment would become the subcommands' help text.)
#[derive(Args)]
struct Target {
    #[arg(long)]
    addr: SocketAddr,
    #[arg(long)]
    admin: SocketAddr,
    #[arg(long, env = "ONECARD_ADMIN_TOKEN")]
    token: String,
    #[arg(long)]
    certs: PathBuf,
}

impl Target {
    fn checked(self) -> anyhow::Result<Target> {
        for a in [self.addr, self.admin] {
            anyhow::ensure!(a.ip().is_loopback(), "load goes to loopback addresses only");
        }
        Ok(self)
    }
}

#[derive(Subcommand)]
enum Cmd {
    Raw {
        #[arg(long)]
        alg: String,
        #[arg(long, default_value_t = 2)]
        threads: usize,
        #[arg(long, default_value_t = 5)]
        seconds: u64,
    },
    Gateway {
        #[command(flatten)]
        target: Target,
        /// The issuer's private key (PKCS#8 PEM) and its kid in the config.
        #[arg(long)]
        key: PathBuf,
        #[arg(long)]
        kid: String,
        #[arg(long, default_value_t = 32)]
        terminals: u32,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Codes made in advance (the run stops when they are used up).
        #[arg(long, default_value_t = 200_000)]
        codes: usize,
        #[arg(long, default_value_t = 100)]
        cards: u32,
    },
    Loss {
        #[command(flatten)]
        target: Target,
        #[arg(long, default_value_t = 8)]
        terminals: u32,
        #[arg(long, default_value_t = 20)]
        rounds: u32,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Raw {
            alg,
            threads,
            seconds,
        } => raw(&alg, threads.clamp(1, 64), seconds.clamp(1, 600)),
        Cmd::Gateway {
            target,
            key,
            kid,
            terminals,
            seconds,
            codes,
            cards,
        } => {
            let target = target.checked()?;
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(gateway(GatewayRun {
                target,
                key,
                kid,
                terminals: terminals.clamp(1, 1000),
                seconds: seconds.clamp(1, 600),
                codes: codes.clamp(1, 5_000_000),
                cards: cards.clamp(1, 100_000),
            }))
        }
        Cmd::Loss {
            target,
            terminals,
            rounds,
        } => {
            let target = target.checked()?;
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(loss(target, terminals.clamp(1, 100), rounds.clamp(1, 1000)))
        }
    }
}

/// Verifies one signature over and over on each thread, straight with the
/// crate (no token parsing): the verify rate of the hardware and crate.
fn raw(alg: &str, threads: usize, seconds: u64) -> anyhow::Result<()> {
    let msg = b"OC1.bench.eyJzdWIiOiJlc3NjLTAwMDEiLCJ0eXAiOiJlc3NjIiwiaWF0IjoxLCJleHAiOjYxLCJqdGkiOiJhYmNkZWZnaCJ9".to_vec();
    let verify: Arc<dyn Fn() -> bool + Send + Sync> = match alg {
        "ed25519" => {
            let sk = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
            let vk = sk.verifying_key();
            let sig = sk.sign(&msg);
            let msg = msg.clone();
            Arc::new(move || vk.verify_strict(&msg, &sig).is_ok())
        }
        "sm2" => {
            let mut b = [7u8; 32];
            b[0] = 1;
            let secret =
                sm2::SecretKey::from_slice(&b).map_err(|_| anyhow::anyhow!("bad SM2 key"))?;
            let sk = sm2::dsa::SigningKey::new("1234567812345678", &secret)
                .map_err(|_| anyhow::anyhow!("bad SM2 signer id"))?;
            let sig: sm2::dsa::Signature = sk.sign(&msg);
            let vk = sk.verifying_key().clone();
            let msg = msg.clone();
            Arc::new(move || sm2::dsa::signature::Verifier::verify(&vk, &msg, &sig).is_ok())
        }
        other => anyhow::bail!("--alg must be ed25519 or sm2, not {other}"),
    };
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let verify = verify.clone();
            std::thread::spawn(move || {
                let mut n = 0u64;
                while Instant::now() < deadline {
                    for _ in 0..64 {
                        assert!(verify());
                    }
                    n += 64;
                }
                n
            })
        })
        .collect();
    let total: u64 = handles
        .into_iter()
        .map(|h| h.join().expect("no panic"))
        .sum();
    let secs = started.elapsed().as_secs_f64();
    println!(
        "raw {alg}: {:.0} verifies/s on {threads} threads ({total} in {secs:.1} s)",
        total as f64 / secs
    );
    Ok(())
}

struct GatewayRun {
    target: Target,
    key: PathBuf,
    kid: String,
    terminals: u32,
    seconds: u64,
    codes: usize,
    cards: u32,
}

async fn gateway(r: GatewayRun) -> anyhow::Result<()> {
    let key = qr::SigningKey::from_pkcs8_pem(&std::fs::read_to_string(&r.key)?)
        .map_err(anyhow::Error::msg)?;
    let alg = key.alg().as_str();
    // Cards, each with a credential of this run.
    let run = onecard_core::time::wall_ms();
    for c in 0..r.cards {
        let card = format!("500118C{c:08}");
        admin_ok(
            r.target.admin,
            &r.target.token,
            http::Method::PUT,
            &format!("/admin/v1/cards/{card}"),
            Some(&json!({"status": "active", "functions": ["transit"]})),
            "card",
        )
        .await?;
        admin_ok(
            r.target.admin,
            &r.target.token,
            http::Method::POST,
            &format!("/admin/v1/cards/{card}/credentials"),
            Some(&json!({"credential_id": format!("cred-{alg}-{c}"), "typ": "essc"})),
            "bind",
        )
        .await?;
    }
    let now = onecard_core::time::wall_ms() / 1000;
    let made = Instant::now();
    let mut codes = Vec::with_capacity(r.codes);
    for i in 0..r.codes {
        let sub = format!("cred-{alg}-{}", i as u32 % r.cards);
        let jti = format!("j{run:x}x{i:x}");
        codes.push(
            qr::issue(&key, &r.kid, &sub, qr::CredType::Essc, now, 110, &jti)
                .map_err(anyhow::Error::msg)?,
        );
    }
    eprintln!(
        "{} codes made in {:.1} s",
        codes.len(),
        made.elapsed().as_secs_f64()
    );
    let codes = Arc::new(codes);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let deadline = Instant::now() + Duration::from_secs(r.seconds);
    let mut tasks = Vec::new();
    for n in 1..=r.terminals {
        let mut conn =
            client::connect_terminal(r.target.addr, Some(&r.target.certs), n, Protocol::Http1)
                .await?;
        let (codes, next) = (codes.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let (mut approved, mut shed, mut other) = (0u64, 0u64, 0u64);
            while Instant::now() < deadline {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(code) = codes.get(i) else { break };
                let body = json!({"event_id": format!("s{run:x}-{i}"), "kind": "scan", "qr": code,
                                  "scenario": "transit", "amount_fen": 0});
                match conn.authorize(&body).await {
                    Ok(a) if a.status == 200 && a.json()["decision"] == "approve" => approved += 1,
                    // Refused by load shedding (limits.overload_lag_ms):
                    // every terminal sends as fast as it is answered, so
                    // the gateway is at its knee by construction.
                    Ok(a) if a.status == 503 => shed += 1,
                    Ok(_) => other += 1,
                    Err(_) => break,
                }
            }
            (approved, shed, other)
        }));
    }
    let started = Instant::now();
    let (mut approved, mut shed, mut other) = (0, 0, 0);
    for t in tasks {
        let (a, s, o) = t.await?;
        approved += a;
        shed += s;
        other += o;
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "gateway {alg}: {:.0} approved scans/s ({approved} approved, {shed} refused by load shedding, {other} other, {} terminals, {secs:.1} s)",
        approved as f64 / secs,
        r.terminals
    );
    anyhow::ensure!(other == 0, "{other} scans were not approved");
    Ok(())
}

async fn loss(t: Target, terminals: u32, rounds: u32) -> anyhow::Result<()> {
    let (addr, admin, token, certs) = (t.addr, t.admin, t.token.as_str(), t.certs.as_path());
    let card = "500118C99999999";
    admin_ok(
        admin,
        token,
        http::Method::PUT,
        &format!("/admin/v1/cards/{card}"),
        Some(&json!({"status": "active", "functions": ["transit"]})),
        "card",
    )
    .await?;
    let run = onecard_core::time::wall_ms();
    let mut delays = Vec::new();
    let mut late_approvals = 0u64;
    let mut taps = 0u64;
    for round in 0..rounds {
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for n in 1..=terminals {
            let mut conn = client::connect_terminal(addr, Some(certs), n, Protocol::Http1).await?;
            let stop = stop.clone();
            tasks.push(tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut i = 0u64;
                while !stop.load(Ordering::Acquire) && i < 100_000 {
                    let sent = Instant::now();
                    let body = json!({"event_id": format!("l{run:x}-{round}-{n}-{i}"), "kind": "tap",
                                      "card_no": card, "scenario": "transit", "amount_fen": 0});
                    let Ok(a) = conn.authorize(&body).await else { break };
                    let approved = a.status == 200 && a.json()["decision"] == "approve";
                    seen.push((sent, Instant::now(), approved));
                    i += 1;
                }
                seen
            }));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let report = client::admin(
            admin,
            Some(token),
            http::Method::POST,
            &format!("/admin/v1/cards/{card}/loss"),
            None,
        )
        .await?;
        let answered = Instant::now();
        anyhow::ensure!(
            report.status == 200,
            "report: {}",
            String::from_utf8_lossy(&report.body)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        stop.store(true, Ordering::Release);
        let mut first_decline: Option<Duration> = None;
        for t in tasks {
            for (sent, got, approved) in t.await? {
                taps += 1;
                if sent >= answered && approved {
                    late_approvals += 1;
                }
                if !approved && got >= answered {
                    let d = got - answered;
                    first_decline = Some(first_decline.map_or(d, |f| f.min(d)));
                }
            }
        }
        delays.push(
            first_decline.ok_or_else(|| anyhow::anyhow!("no decline seen in round {round}"))?,
        );
        admin_ok(
            admin,
            token,
            http::Method::DELETE,
            &format!("/admin/v1/cards/{card}/loss"),
            None,
            "lift",
        )
        .await?;
    }
    delays.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "loss report to first decline: p50 {:.2} ms, max {:.2} ms over {rounds} rounds ({terminals} terminals tapping, {taps} taps); approvals of taps sent after the answer: {late_approvals}",
        ms(delays[delays.len() / 2]),
        ms(*delays.last().expect("rounds ≥ 1")),
    );
    anyhow::ensure!(
        late_approvals == 0,
        "a tap sent after the loss report's answer was approved"
    );
    Ok(())
}

/// One admin call that must answer `200`; `what` names it in the error.
async fn admin_ok(
    admin: SocketAddr,
    token: &str,
    method: http::Method,
    path: &str,
    body: Option<&serde_json::Value>,
    what: &str,
) -> anyhow::Result<()> {
    let a = client::admin(admin, Some(token), method, path, body).await?;
    anyhow::ensure!(
        a.status == 200,
        "{what}: {}",
        String::from_utf8_lossy(&a.body)
    );
    Ok(())
}
