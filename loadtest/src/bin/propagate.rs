//! `onecard-propagate`: how long a change made through one node of a
//! cluster takes to be in effect at the others. Alternately creates a card
//! and deny-lists it through `--from`, and after each answer asks every
//! `--to` node (admin API, one request after another) until it shows the
//! change. Prints p50, p99 and max over all changes and nodes, from the
//! answer at `--from` to the first answer at a `--to` showing the change
//! (the polling adds up to one admin round trip, a fraction of a
//! millisecond on loopback).
//!
//! Loopback only; bounded by `--changes` and a 10 s wait per change.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use clap::Parser;
use http::{Method, StatusCode};
use onecard::net::client;
use serde_json::json;

#[derive(Parser)]
#[command(name = "onecard-propagate")]
struct Args {
    /// Admin listener of the node the changes are made through.
    #[arg(long)]
    from: SocketAddr,
    /// Admin listeners of the nodes that must see them.
    #[arg(long, required = true)]
    to: Vec<SocketAddr>,
    #[arg(long)]
    token: String,
    /// Changes made (half new cards, half deny-list entries).
    #[arg(long, default_value_t = 200)]
    changes: u32,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    anyhow::ensure!(
        std::iter::once(&a.from)
            .chain(&a.to)
            .all(|x| x.ip().is_loopback()),
        "loopback addresses only"
    );
    anyhow::ensure!((1..=100_000).contains(&a.changes), "--changes: 1 to 100000");
    let token = Some(a.token.as_str());
    let mut delays_us: Vec<u64> = Vec::new();
    for i in 0..a.changes {
        let card = format!("500118Q{:08}", i / 2);
        let (method, path, body, check) = if i % 2 == 0 {
            (
                Method::PUT,
                format!("/admin/v1/cards/{card}"),
                json!({"status": "active", "functions": ["transit"]}),
                format!("/admin/v1/cards/{card}"),
            )
        } else {
            (
                Method::PUT,
                format!("/admin/v1/denylist/{card}"),
                json!({"reason": "lost"}),
                format!("/admin/v1/denylist/{card}"),
            )
        };
        let made = client::admin(a.from, token, method, &path, Some(&body)).await?;
        anyhow::ensure!(
            made.status.is_success(),
            "{path}: {} {}",
            made.status,
            String::from_utf8_lossy(&made.body)
        );
        let answered = Instant::now();
        for to in &a.to {
            let give_up = answered + Duration::from_secs(10);
            loop {
                let seen = client::admin(*to, token, Method::GET, &check, None).await?;
                if seen.status == StatusCode::OK {
                    delays_us.push(answered.elapsed().as_micros() as u64);
                    break;
                }
                anyhow::ensure!(
                    Instant::now() < give_up,
                    "{check} not in effect at {to} after 10 s"
                );
            }
        }
    }
    delays_us.sort_unstable();
    let at =
        |q: f64| delays_us[((delays_us.len() - 1) as f64 * q).round() as usize] as f64 / 1000.0;
    println!(
        "propagation over {} changes x {} nodes: p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms",
        a.changes,
        a.to.len(),
        at(0.5),
        at(0.99),
        at(1.0)
    );
    Ok(())
}
