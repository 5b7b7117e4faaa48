//! `onecard-load seed`: fills a gateway's store with the load generator's
//! population through the bulk import (`POST /admin/v1/import/...`), in
//! chunks well under the import's 32 MiB limit: ten million cards in a few
//! hundred requests rather than ten million PUTs.

use std::net::SocketAddr;
use std::ops::Range;
use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use onecard::net::client;
use serde::Serialize;
use serde_json::Value;

use crate::mix::{self, SPECIAL_CARDS};

/// Lines per import request: about 18 MB of card lines.
pub const CHUNK_LINES: usize = 200_000;

/// Card lines for active cards `range` (the ranks the Zipf draw picks).
pub fn card_lines(range: Range<usize>) -> Vec<u8> {
    let mut out = Vec::with_capacity(range.len() * 96);
    for i in range {
        out.extend_from_slice(b"{\"card_no\":\"");
        out.extend_from_slice(mix::active_card(i).as_bytes());
        out.extend_from_slice(
            b"\",\"status\":\"active\",\"functions\":[\"transit\",\"medical\",\"financial\"]}\n",
        );
    }
    out
}

/// The lost cards the mix draws from.
pub fn lost_lines() -> Vec<u8> {
    (0..SPECIAL_CARDS)
        .flat_map(|i| {
            format!(
                "{{\"card_no\":\"{}\",\"status\":\"lost\",\"functions\":[\"transit\"]}}\n",
                mix::lost_card(i)
            )
            .into_bytes()
        })
        .collect()
}

/// Deny-list lines for deny-listed cards `range` (the mix draws from the
/// first [`SPECIAL_CARDS`]).
pub fn deny_lines(range: Range<usize>) -> Vec<u8> {
    let mut out = Vec::with_capacity(range.len() * 56);
    for i in range {
        out.extend_from_slice(b"{\"card_no\":\"");
        out.extend_from_slice(mix::denied_card(i).as_bytes());
        out.extend_from_slice(b"\",\"reason\":\"reported lost\"}\n");
    }
    out
}

/// Sends one chunk and checks that every line was taken.
pub async fn import(
    admin: SocketAddr,
    token: &str,
    kind: &str,
    body: Vec<u8>,
) -> anyhow::Result<Value> {
    let lines = bytecount_lines(&body);
    let a = client::admin_raw(
        admin,
        Some(token),
        Method::POST,
        &format!("/admin/v1/import/{kind}"),
        "application/x-ndjson",
        body,
    )
    .await?;
    anyhow::ensure!(
        a.status == StatusCode::OK,
        "import {kind}: {} {}",
        a.status,
        String::from_utf8_lossy(&a.body)
    );
    let r = a.json();
    anyhow::ensure!(
        r["imported"].as_u64() == Some(lines as u64) && r["rejected"].as_u64() == Some(0),
        "import {kind}: not every line was taken: {r}"
    );
    Ok(r)
}

fn bytecount_lines(body: &[u8]) -> usize {
    body.iter().filter(|&&b| b == b'\n').count()
}

#[derive(Debug, Default, Serialize)]
pub struct SeedReport {
    pub cards: u64,
    pub deny: u64,
    pub seconds: f64,
    pub cards_per_s: f64,
    /// From starting the gateway's process again to `/readyz` answering 200.
    pub restart_to_ready_s: Option<f64>,
    /// The gateway's own account of its last start (RocksDB open + rebuild).
    pub startup_seconds: Option<f64>,
    /// The gateway's resident memory after the seed (or after the restart).
    pub resident_bytes: Option<u64>,
}

/// Imports `cards` active cards, the lost cards and `deny` deny-list
/// entries, one chunk at a time (the gateway runs one import at a time).
pub async fn seed(
    admin: SocketAddr,
    token: &str,
    cards: usize,
    deny: usize,
    progress: bool,
) -> anyhow::Result<SeedReport> {
    anyhow::ensure!(
        admin.ip().is_loopback(),
        "seeding goes to loopback addresses only"
    );
    let started = Instant::now();
    import(admin, token, "cards", lost_lines()).await?;
    for (kind, total) in [("cards", cards), ("denylist", deny)] {
        for from in (0..total).step_by(CHUNK_LINES) {
            let range = from..(from + CHUNK_LINES).min(total);
            let body = if kind == "cards" {
                card_lines(range.clone())
            } else {
                deny_lines(range.clone())
            };
            import(admin, token, kind, body).await?;
            if progress {
                eprintln!(
                    "{kind}: {} of {total} after {:.1} s",
                    range.end,
                    started.elapsed().as_secs_f64()
                );
            }
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(SeedReport {
        cards: cards as u64,
        deny: deny as u64,
        seconds,
        cards_per_s: cards as f64 / seconds.max(1e-9),
        ..SeedReport::default()
    })
}

/// `GET /admin/v1/status`.
pub async fn status(admin: SocketAddr, token: &str) -> anyhow::Result<Value> {
    let a = client::admin(admin, Some(token), Method::GET, "/admin/v1/status", None).await?;
    anyhow::ensure!(a.status == StatusCode::OK, "status: {}", a.status);
    Ok(a.json())
}

/// Polls `/readyz` until it answers 200, for at most `limit`; gives up at
/// once when `gone` says the gateway's process has exited.
pub async fn wait_ready(
    admin: SocketAddr,
    limit: Duration,
    mut gone: impl FnMut() -> Option<String>,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(why) = gone() {
            anyhow::bail!("the gateway exited before it was ready: {why}");
        }
        if let Ok(a) = client::admin(admin, None, Method::GET, "/readyz", None).await {
            if a.status == StatusCode::OK {
                return Ok(());
            }
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the gateway was not ready within {} s",
            limit.as_secs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_what_the_gateway_imports() {
        let cards = card_lines(5..8);
        let lines: Vec<&[u8]> = cards
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .collect();
        assert_eq!(lines.len(), 3);
        for (i, l) in (5..).zip(&lines) {
            let (n, card) = onecard::service::import::card_line(l).expect("a valid card line");
            assert_eq!(n.as_str(), mix::active_card(i));
            assert_eq!(card.status, onecard_core::model::CardStatus::Active);
        }
        for l in deny_lines(0..4)
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
        {
            onecard::service::import::deny_line(l).expect("a valid deny line");
        }
        let lost = lost_lines();
        assert_eq!(bytecount_lines(&lost), SPECIAL_CARDS);
        for l in lost.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            let (_, c) = onecard::service::import::card_line(l).unwrap();
            assert_eq!(c.status, onecard_core::model::CardStatus::Lost);
        }
        // A chunk stays well under the import's body limit.
        assert!(
            card_lines(0..CHUNK_LINES).len()
                < onecard::service::import::IMPORT_BODY_BYTES_MAX * 2 / 3
        );
    }
}
