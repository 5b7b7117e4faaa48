//! Runs one open-loop load: N terminals, each with its own connection (and
//! client certificate), each sending the requests the schedule assigns it at
//! their due times, whatever the answers do. Bounded by the schedule's
//! length, the run's duration plus a grace period, and loopback addresses.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use onecard::certs;
use onecard::client::{self, Connection, Protocol};
use parking_lot::Mutex;

use crate::mix::Mix;
use crate::profile::{self, Profile};
use crate::report::{self, Percentiles, Summary, Tally};
use crate::rng::Rng;

/// After the schedule's end, how long late requests may still go out.
pub const GRACE: Duration = Duration::from_secs(10);

pub struct Options {
    pub addr: SocketAddr,
    /// Client certificates from `onecard certs`; plaintext with `X-Terminal-Id` without.
    pub certs: Option<PathBuf>,
    pub terminals: u32,
    pub protocol: Protocol,
    pub peak_per_s: f64,
    pub duration: Duration,
    pub requests_max: u64,
    pub profile: Profile,
    pub seed: u64,
    /// Print a progress line every second.
    pub progress: bool,
}

struct Live {
    answered: AtomicU64,
    errors: AtomicU64,
    window: Mutex<Histogram<u64>>,
}

pub struct Outcome {
    pub summary: Summary,
    pub corrected: Histogram<u64>,
}

async fn connect(o: &Options, n: u32) -> anyhow::Result<Connection> {
    Ok(client::connect_terminal(o.addr, o.certs.as_deref(), n, o.protocol).await?)
}

pub async fn run(o: Options, mix: Arc<Mix>) -> anyhow::Result<Outcome> {
    anyhow::ensure!(
        o.addr.ip().is_loopback(),
        "load goes to loopback addresses only"
    );
    anyhow::ensure!(o.terminals >= 1, "at least one terminal");
    let due = profile::schedule(o.profile, o.peak_per_s, o.duration, o.requests_max);
    let scheduled = due.len() as u64;
    let mut per_terminal: Vec<Vec<Duration>> = vec![Vec::new(); o.terminals as usize];
    for (k, d) in due.into_iter().enumerate() {
        per_terminal[k % o.terminals as usize].push(d);
    }
    let mut conns = Vec::with_capacity(o.terminals as usize);
    for n in 1..=o.terminals {
        conns.push(connect(&o, n).await?);
    }
    let live = Arc::new(Live {
        answered: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        window: Mutex::new(report::histogram()),
    });
    let start = Instant::now() + Duration::from_millis(100);
    let hard_stop = start + o.duration + GRACE;
    let run_id = format!("L{}", onecard::clock::now_ms());
    let plaintext = o.certs.is_none();

    let mut tasks = Vec::new();
    for (i, (mut conn, times)) in conns.into_iter().zip(per_terminal).enumerate() {
        let n = i as u32 + 1;
        let mix = mix.clone();
        let live = live.clone();
        let run_id = run_id.clone();
        let mut rng = Rng::new(o.seed ^ (u64::from(n) << 32));
        tasks.push(tokio::spawn(async move {
            let id = certs::terminal_id(n);
            let (mut corrected, mut uncorrected, mut tally) =
                (report::histogram(), report::histogram(), Tally::default());
            let mut last: Option<Vec<u8>> = None;
            let total = times.len() as u64;
            for (seq, at) in times.into_iter().enumerate() {
                let due = start + at;
                if Instant::now() > hard_stop {
                    tally.dropped = total - seq as u64;
                    break;
                }
                tokio::time::sleep_until(due.into()).await;
                let body = match &last {
                    Some(b) if mix.retry(&mut rng) => b.clone(),
                    _ => mix.body(&mut rng, &run_id, n, seq as u64),
                };
                last = Some(body.clone());
                let mut headers = vec![("content-type", "application/json")];
                if plaintext {
                    headers.push(("x-terminal-id", id.as_str()));
                }
                let sent = Instant::now();
                tally.sent += 1;
                match conn
                    .send(http::Method::POST, "/v1/authorize", &headers, body)
                    .await
                {
                    Ok(a) => {
                        let answered = Instant::now();
                        let (c, u) =
                            profile::latencies(due - start, sent - start, answered - start);
                        corrected.saturating_record(c.as_micros() as u64);
                        uncorrected.saturating_record(u.as_micros() as u64);
                        live.window.lock().saturating_record(c.as_micros() as u64);
                        live.answered.fetch_add(1, Ordering::Relaxed);
                        *tally
                            .by_status
                            .entry(a.status.as_str().to_owned())
                            .or_default() += 1;
                        let v = a.json();
                        let reason = v["reason"]
                            .as_str()
                            .or(v["error"]["code"].as_str())
                            .unwrap_or("UNREADABLE");
                        *tally.by_reason.entry(reason.to_owned()).or_default() += 1;
                    }
                    Err(e) => {
                        live.errors.fetch_add(1, Ordering::Relaxed);
                        let kind = if matches!(e, client::ClientError::Http(_)) {
                            "http"
                        } else {
                            "io"
                        };
                        *tally.errors.entry(kind.to_owned()).or_default() += 1;
                        // A broken connection: reconnecting is the next
                        // issue's concern; count the rest as not sent.
                        tally.dropped = total - seq as u64 - 1;
                        break;
                    }
                }
            }
            (corrected, uncorrected, tally)
        }));
    }

    let progress = o.progress.then(|| {
        let live = live.clone();
        tokio::spawn(async move {
            let mut last = 0;
            let mut tick = tokio::time::interval_at(
                (start + Duration::from_secs(1)).into(),
                Duration::from_secs(1),
            );
            loop {
                tick.tick().await;
                let answered = live.answered.load(Ordering::Relaxed);
                let h = std::mem::replace(&mut *live.window.lock(), report::histogram());
                let p = Percentiles::of(&h);
                eprintln!(
                    "t={:>4}s achieved {:>7}/s  p50 {:>7.2} ms  p99 {:>7.2} ms  errors {}",
                    start.elapsed().as_secs(),
                    answered - last,
                    p.p50_ms,
                    p.p99_ms,
                    live.errors.load(Ordering::Relaxed)
                );
                last = answered;
            }
        })
    });

    let (mut corrected, mut uncorrected, mut tally) =
        (report::histogram(), report::histogram(), Tally::default());
    for t in tasks {
        let (c, u, t) = t.await?;
        corrected.add(&c)?;
        uncorrected.add(&u)?;
        tally.merge(&t);
    }
    let elapsed = start.elapsed().as_secs_f64().max(1e-9);
    if let Some(p) = progress {
        p.abort();
    }
    let summary = Summary {
        profile: format!("{:?}", o.profile),
        terminals: o.terminals,
        seconds: elapsed,
        scheduled,
        sent: tally.sent,
        offered_per_s: scheduled as f64 / o.duration.as_secs_f64(),
        achieved_per_s: tally.answered() as f64 / elapsed,
        corrected: Percentiles::of(&corrected),
        uncorrected: Percentiles::of(&uncorrected),
        by_status: tally.by_status.clone(),
        by_reason: tally.by_reason.clone(),
        errors: tally.errors.clone(),
        dropped: tally.dropped,
    };
    Ok(Outcome { summary, corrected })
}
