//! `onecard-load`: open-loop load for OneCard Gateway. N terminals, each with
//! its own client certificate and connection, send a transit-heavy mix of
//! taps on a schedule (constant or rush-hour); latency is measured from the
//! intended send time (corrected for coordinated omission) and from the
//! actual send (uncorrected). Loopback only; bounded by duration and a
//! request cap.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use http::{Method, StatusCode};
use onecard::client::{self, Protocol};
use onecard_load::mix::{self, Mix, SPECIAL_CARDS};
use onecard_load::profile::Profile;
use onecard_load::report;
use onecard_load::runner::{self, Options};
use serde_json::json;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "onecard-load")]
struct Args {
    /// Terminal listener of the gateway (loopback).
    #[arg(long)]
    addr: SocketAddr,
    /// Certificates from `onecard certs` (one per terminal); plaintext with X-Terminal-Id without.
    #[arg(long)]
    certs: Option<PathBuf>,
    #[arg(long, default_value_t = 2_000)]
    terminals: u32,
    /// h1 or h2.
    #[arg(long, default_value = "h1")]
    protocol: String,
    /// Peak offered rate over all terminals, requests per second.
    #[arg(long, default_value_t = 5_000.0)]
    rate: f64,
    #[arg(long, default_value_t = 30)]
    seconds: u64,
    #[arg(long, default_value_t = 10_000_000)]
    requests_max: u64,
    /// constant or rush-hour.
    #[arg(long, default_value = "constant")]
    profile: String,
    /// Active cards (500118B00000000 ...), drawn Zipf-distributed.
    #[arg(long, default_value_t = 10_000)]
    cards: usize,
    #[arg(long, default_value_t = 1.0)]
    zipf: f64,
    #[arg(long, default_value_t = 0.01)]
    deny_share: f64,
    #[arg(long, default_value_t = 0.005)]
    lost_share: f64,
    #[arg(long, default_value_t = 0.005)]
    unknown_share: f64,
    #[arg(long, default_value_t = 0.01)]
    retry_share: f64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Admin listener: creates the cards first and scrapes /metrics around the run.
    #[arg(long)]
    admin: Option<SocketAddr>,
    #[arg(long, env = "ONECARD_ADMIN_TOKEN", default_value = "")]
    token: String,
    /// Skip creating cards (they exist from an earlier run).
    #[arg(long)]
    no_setup: bool,
    /// Write the summary as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// No per-second progress line.
    #[arg(long)]
    quiet: bool,
}

async fn put(
    admin: SocketAddr,
    token: &str,
    path: String,
    body: serde_json::Value,
) -> anyhow::Result<()> {
    let a = client::admin(admin, Some(token), Method::PUT, &path, Some(&body)).await?;
    anyhow::ensure!(a.status == StatusCode::OK, "{path}: {}", a.status);
    Ok(())
}

/// Creates the population through the admin API, 32 calls at a time.
async fn setup(admin: SocketAddr, token: &str, cards: usize) -> anyhow::Result<()> {
    let active = json!({"status": "active", "functions": ["transit", "medical", "financial"]});
    let lost = json!({"status": "lost", "functions": ["transit"]});
    let mut calls: Vec<(String, serde_json::Value)> = (0..cards)
        .map(|i| {
            (
                format!("/admin/v1/cards/{}", mix::active_card(i)),
                active.clone(),
            )
        })
        .collect();
    for i in 0..SPECIAL_CARDS {
        calls.push((
            format!("/admin/v1/cards/{}", mix::lost_card(i)),
            lost.clone(),
        ));
        calls.push((
            format!("/admin/v1/cards/{}", mix::denied_card(i)),
            active.clone(),
        ));
        calls.push((
            format!("/admin/v1/denylist/{}", mix::denied_card(i)),
            json!({"reason": "load test"}),
        ));
    }
    for chunk in calls.chunks(32) {
        let mut pending = Vec::new();
        for (path, body) in chunk.iter().cloned() {
            let token = token.to_owned();
            pending.push(tokio::spawn(
                async move { put(admin, &token, path, body).await },
            ));
        }
        for p in pending {
            p.await??;
        }
    }
    Ok(())
}

async fn scrape(admin: SocketAddr) -> anyhow::Result<Vec<(f64, u64)>> {
    let a = client::admin(admin, None, Method::GET, "/metrics", None).await?;
    Ok(report::server_buckets(&String::from_utf8_lossy(&a.body)))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let profile = Profile::parse(&a.profile)
        .ok_or_else(|| anyhow::anyhow!("--profile must be constant or rush-hour"))?;
    let protocol = match a.protocol.as_str() {
        "h1" => Protocol::Http1,
        "h2" => Protocol::Http2,
        other => anyhow::bail!("--protocol must be h1 or h2, not {other}"),
    };
    let mix = Arc::new(Mix::new(
        a.cards,
        a.zipf,
        a.deny_share,
        a.lost_share,
        a.unknown_share,
        a.retry_share,
    ));
    if let (Some(admin), false) = (a.admin, a.no_setup) {
        setup(admin, &a.token, a.cards).await?;
    }
    let before = match a.admin {
        Some(admin) => Some(scrape(admin).await?),
        None => None,
    };
    let opts = Options {
        addr: a.addr,
        certs: a.certs,
        terminals: a.terminals,
        protocol,
        peak_per_s: a.rate,
        duration: Duration::from_secs(a.seconds),
        requests_max: a.requests_max,
        profile,
        seed: a.seed,
        progress: !a.quiet,
    };
    let outcome = runner::run(opts, mix).await?;
    let server = match (a.admin, before) {
        (Some(admin), Some(before)) => report::server_window(&before, &scrape(admin).await?),
        _ => None,
    };
    let s = &outcome.summary;
    println!(
        "offered {:.0}/s, achieved {:.0}/s over {:.1} s ({} terminals, {:?})",
        s.offered_per_s, s.achieved_per_s, s.seconds, s.terminals, protocol
    );
    println!(
        "scheduled {}  sent {}  dropped {}  errors {:?}",
        s.scheduled, s.sent, s.dropped, s.errors
    );
    for (name, p) in [
        ("corrected  ", &s.corrected),
        ("uncorrected", &s.uncorrected),
    ] {
        println!(
            "{name} p50 {:.2} ms  p90 {:.2} ms  p99 {:.2} ms  p99.9 {:.2} ms  max {:.2} ms",
            p.p50_ms, p.p90_ms, p.p99_ms, p.p999_ms, p.max_ms
        );
    }
    println!("by status {:?}", s.by_status);
    println!("by reason {:?}", s.by_reason);
    if let Some(w) = &server {
        println!("gateway's own histogram for the window (bucket upper bounds): {w:?}");
    }
    if let Some(path) = a.json {
        let doc = json!({"summary": s, "server": server});
        std::fs::write(&path, serde_json::to_vec_pretty(&doc)?)?;
    }
    Ok(())
}
