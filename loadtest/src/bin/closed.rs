//! `onecard-closed`: a closed-loop driver for quick figures over mTLS, where
//! wrk and h2load cannot go (neither presents a client certificate). Each of
//! N terminals holds one connection with its own certificate and sends taps
//! back to back for a fixed time; latency goes into an HdrHistogram.
//!
//! Closed loop measures capacity, not the latency a terminal sees under a
//! fixed arrival rate (coordinated omission): the open-loop load generator
//! (`onecard-load`, issue 3) is for that.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Parser;
use hdrhistogram::Histogram;
use onecard::net::certs;
use onecard::net::client::{self, Protocol};
use serde_json::json;

#[derive(Parser)]
struct Args {
    /// Gateway (or onecard-bare) terminal address; loopback only. Give it
    /// once per node of a cluster: each terminal starts at one node (round
    /// robin) and moves to the next after a connection error or a 503.
    #[arg(long, required = true)]
    addr: Vec<SocketAddr>,
    /// Certificates from `onecard certs`; plaintext with X-Terminal-Id without.
    #[arg(long)]
    certs: Option<PathBuf>,
    /// Terminals, one connection each (at most the certificates in --certs).
    #[arg(long, default_value_t = 64)]
    terminals: u32,
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Request cap over the whole run.
    #[arg(long, default_value_t = 5_000_000)]
    requests_max: u64,
    #[arg(long, default_value = "h1")]
    protocol: String,
    /// Cards to tap, `500118B00000000` onwards (seed them first).
    #[arg(long, default_value_t = 1000)]
    cards: u32,
    /// Admin address: when given, the cards are created first.
    #[arg(long)]
    admin: Option<SocketAddr>,
    #[arg(long, env = "ONECARD_ADMIN_TOKEN", default_value = "")]
    token: String,
    /// Only create the cards (needs --admin), send no load.
    #[arg(long)]
    seed_only: bool,
    /// Tap a Zipf-skewed mix of the cards with this exponent (e.g. 1.0: a
    /// few hot cards) instead of walking them evenly.
    #[arg(long)]
    zipf: Option<f64>,
    /// A label for the output line.
    #[arg(long, default_value = "run")]
    label: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.addr.iter().all(|a| a.ip().is_loopback()),
        "load goes to loopback addresses only"
    );
    let protocol = if args.protocol == "h2" {
        Protocol::Http2
    } else {
        Protocol::Http1
    };
    if let Some(admin) = args.admin {
        seed(admin, &args.token, args.cards).await?;
    }
    if args.seed_only {
        return Ok(());
    }
    let run = onecard_core::time::wall_ms();
    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    let per_terminal_max = args.requests_max / u64::from(args.terminals.max(1));
    let zipf = args
        .zipf
        .map(|s| std::sync::Arc::new(onecard_load::zipf::Zipf::new(args.cards as usize, s)));
    let mut tasks = Vec::new();
    for n in 1..=args.terminals {
        let zipf = zipf.clone();
        let id = certs::terminal_id(n);
        let mut conn = if args.addr.len() == 1 {
            Term::One(
                client::connect_terminal(args.addr[0], args.certs.as_deref(), n, protocol).await?,
            )
        } else {
            Term::Many(client::FailoverTerminal::new(
                args.addr.clone(),
                args.certs.as_deref(),
                n,
                protocol,
                n as usize,
            ))
        };
        let cards = args.cards;
        let plaintext = args.certs.is_none();
        tasks.push(tokio::spawn(async move {
            let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid bounds");
            let (mut ok, mut other) = (0u64, 0u64);
            let mut i = 0u64;
            let mut rng = onecard_load::rng::Rng::new(u64::from(n));
            while Instant::now() < deadline && i < per_terminal_max {
                let index = match &zipf {
                    Some(z) => z.sample(&mut rng) as u64,
                    None => (u64::from(n) * 7919 + i * 104_729) % u64::from(cards),
                };
                let card = format!("500118B{index:08}");
                let body = json!({"event_id": format!("c{run}-{i}"), "kind": "tap", "card_no": card,
                                  "scenario": "transit", "amount_fen": 1, "site": "bench"});
                let bytes = serde_json::to_vec(&body).expect("serializes");
                let mut headers = vec![("content-type", "application/json")];
                if plaintext {
                    headers.push(("x-terminal-id", id.as_str()));
                }
                let t = Instant::now();
                match conn
                    .send(http::Method::POST, "/v1/authorize", &headers, bytes)
                    .await
                {
                    Ok(a) if a.status == http::StatusCode::OK => ok += 1,
                    Ok(_) => other += 1,
                    // One node: the connection is gone, and so is this
                    // terminal. Several: every node failed this request.
                    Err(_) if matches!(conn, Term::One(_)) => break,
                    Err(_) => other += 1,
                }
                h.saturating_record(t.elapsed().as_micros() as u64);
                i += 1;
            }
            (h, ok, other, conn.failovers())
        }));
    }
    let started = Instant::now();
    let mut all = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let (mut ok, mut other, mut failovers) = (0, 0, 0);
    for t in tasks {
        let (h, o, x, f) = t.await?;
        all.add(h)?;
        ok += o;
        other += x;
        failovers += f;
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{}: {:.0} req/s  ok {}  non-200 {}  failovers {}  p50 {:.2} ms  p99 {:.2} ms  p99.9 {:.2} ms  max {:.2} ms  ({} terminals, {:?}, {:.1} s)",
        args.label,
        (ok + other) as f64 / secs,
        ok,
        other,
        failovers,
        all.value_at_quantile(0.5) as f64 / 1000.0,
        all.value_at_quantile(0.99) as f64 / 1000.0,
        all.value_at_quantile(0.999) as f64 / 1000.0,
        all.max() as f64 / 1000.0,
        args.terminals,
        protocol,
        secs
    );
    Ok(())
}

/// A terminal's connection: to one node, or to a cluster's nodes with
/// failover.
enum Term {
    One(client::Connection),
    Many(client::FailoverTerminal),
}

impl Term {
    async fn send(
        &mut self,
        method: http::Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> Result<client::Answer, client::ClientError> {
        match self {
            Term::One(c) => c.send(method, path, headers, body).await,
            Term::Many(f) => f.send(method, path, headers, body).await,
        }
    }

    fn failovers(&self) -> u64 {
        match self {
            Term::One(_) => 0,
            Term::Many(f) => f.failovers,
        }
    }
}

/// Creates the cards through the admin API, 16 at a time.
async fn seed(admin: SocketAddr, token: &str, cards: u32) -> anyhow::Result<()> {
    let body = json!({"status": "active", "functions": ["transit", "medical", "financial"]});
    let mut pending = Vec::new();
    for c in 0..cards {
        let token = token.to_owned();
        let body = body.clone();
        pending.push(tokio::spawn(async move {
            client::admin(
                admin,
                Some(&token),
                http::Method::PUT,
                &format!("/admin/v1/cards/500118B{c:08}"),
                Some(&body),
            )
            .await
        }));
        if pending.len() == 16 || c + 1 == cards {
            for p in pending.drain(..) {
                let a = p.await??;
                anyhow::ensure!(
                    a.status == http::StatusCode::OK,
                    "seeding a card: {}",
                    a.status
                );
            }
        }
    }
    Ok(())
}
