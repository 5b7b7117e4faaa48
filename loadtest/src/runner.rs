//! Runs open-loop load: N terminals, each with its own connection (and
//! client certificate), each sending the requests the schedule assigns it at
//! their due times, whatever the answers do. Bounded by the schedule's
//! length, the stage's duration plus a grace period, and loopback addresses.
//!
//! Connections are made once and warmed (each terminal pings the gateway, so
//! that no TLS handshake still being finished on the server is charged to
//! the first requests) and then kept across stages, as validators keep
//! theirs all day. A terminal whose connection breaks counts the request as
//! an error, reconnects and goes on with its schedule.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use http::{Method, StatusCode};
use onecard::net::certs;
use onecard::net::client::{self, ClientError, Connection, Protocol};
use parking_lot::Mutex;

use crate::mix::Mix;
use crate::profile::{self, Profile};
use crate::report::{self, Percentiles, Second, Summary, Tally};
use crate::rng::Rng;

/// After the schedule's end, how long late requests may still go out.
pub const GRACE: Duration = Duration::from_secs(10);
/// Connections being set up at once (TLS handshakes cost the server CPU;
/// more in parallel only queue there).
pub const CONNECT_PARALLEL: usize = 64;
/// Reconnections one terminal attempts in one stage before it gives up and
/// counts the rest of its schedule as not sent.
pub const RECONNECTS_MAX: u32 = 3;

/// Where the terminals connect and as whom.
pub struct Target {
    pub addr: SocketAddr,
    /// Further nodes of a cluster: terminal `n` connects to node
    /// `n % (1 + others.len())`, the first being `addr`.
    pub others: Vec<SocketAddr>,
    /// Client certificates from `onecard certs`; plaintext with `X-Terminal-Id` without.
    pub certs: Option<PathBuf>,
    pub terminals: u32,
    pub protocol: Protocol,
}

impl Target {
    pub fn check(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            std::iter::once(&self.addr)
                .chain(&self.others)
                .all(|a| a.ip().is_loopback()),
            "load goes to loopback addresses only"
        );
        anyhow::ensure!(self.terminals >= 1, "at least one terminal");
        Ok(())
    }

    /// The node terminal `n` sends to.
    fn node(&self, n: u32) -> SocketAddr {
        match n as usize % (1 + self.others.len()) {
            0 => self.addr,
            i => self.others[i - 1],
        }
    }

    fn headers<'a>(&self, id: &'a str) -> Vec<(&'static str, &'a str)> {
        let mut h = vec![("content-type", "application/json")];
        if self.certs.is_none() {
            h.push(("x-terminal-id", id));
        }
        h
    }

    /// Connects terminal `n` and pings once, so that the gateway has
    /// accepted it completely before any timed request.
    pub async fn connect(&self, n: u32) -> Result<Connection, ClientError> {
        let mut conn =
            client::connect_terminal(self.node(n), self.certs.as_deref(), n, self.protocol).await?;
        let id = certs::terminal_id(n);
        let a = conn
            .send(Method::GET, "/v1/ping", &self.headers(&id), Vec::new())
            .await?;
        if a.status != StatusCode::OK {
            warn_ping(n, a.status);
        }
        Ok(conn)
    }
}

/// A warm-up ping refused (say, rate-limited) still proves the connection;
/// it is worth a line, not a failure.
fn warn_ping(n: u32, status: StatusCode) {
    eprintln!("terminal {n}: warm-up ping answered {status}");
}

/// Connects every terminal, [`CONNECT_PARALLEL`] at a time.
pub async fn connect_all(target: &Arc<Target>) -> anyhow::Result<Vec<Option<Connection>>> {
    let started = Instant::now();
    let mut conns = Vec::with_capacity(target.terminals as usize);
    let mut n = 1;
    while n <= target.terminals {
        let last = (n + CONNECT_PARALLEL as u32 - 1).min(target.terminals);
        let batch: Vec<_> = (n..=last)
            .map(|k| {
                let t = target.clone();
                tokio::spawn(async move { t.connect(k).await })
            })
            .collect();
        for (k, b) in (n..).zip(batch) {
            let c = b.await?.map_err(|e| anyhow::anyhow!("terminal {k}: {e}"))?;
            conns.push(Some(c));
        }
        n = last + 1;
    }
    eprintln!(
        "{} terminals connected and warmed in {:.1} s",
        target.terminals,
        started.elapsed().as_secs_f64()
    );
    Ok(conns)
}

/// One stage of load.
pub struct Stage {
    pub profile: Profile,
    pub peak_per_s: f64,
    pub duration: Duration,
    pub requests_max: u64,
    pub seed: u64,
    /// Print a progress line every second.
    pub progress: bool,
}

/// What every terminal records into. One histogram per terminal would be
/// 2 × 140 KB each: 2.8 GB for 10,000 terminals (seen); a lock per answer
/// costs nothing at these rates.
struct Live {
    answered: AtomicU64,
    errors: AtomicU64,
    /// The last second's corrected latencies, for the progress line.
    window: Mutex<Histogram<u64>>,
    corrected: Mutex<Histogram<u64>>,
    uncorrected: Mutex<Histogram<u64>>,
    /// Corrected latencies of the answers that decided (200) and of the
    /// refusals (429, 503): under overload the first must keep their
    /// bound and the second must come fast.
    admitted: Mutex<Histogram<u64>>,
    refused: Mutex<Histogram<u64>>,
    /// By second of the stage (when answered): decided, refused, and the
    /// decided ones' corrected latencies.
    by_second: Mutex<Vec<(u64, u64, Histogram<u64>)>>,
    /// How late this generator's own timer runs ([`GENERATOR_TICK`]): the
    /// part of a corrected latency spent waiting for the generator's CPU,
    /// not the gateway (they share a machine's CPUs in these runs).
    lag: Mutex<Histogram<u64>>,
}

/// The generator's lag probe: a timer of this period, and how late it fires.
const GENERATOR_TICK: Duration = Duration::from_millis(5);

pub struct Outcome {
    pub summary: Summary,
    pub corrected: Histogram<u64>,
    pub uncorrected: Histogram<u64>,
    pub admitted: Histogram<u64>,
    pub refused: Histogram<u64>,
    pub by_second: Vec<Second>,
}

/// The status of an answer that refused the request for load (the
/// terminal may retry after `Retry-After`).
pub fn is_refusal(status: StatusCode) -> bool {
    status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::SERVICE_UNAVAILABLE
}

/// What one terminal counted in a stage, and its connection to keep.
struct TerminalRun {
    tally: Tally,
    conn: Option<Connection>,
}

/// Splits the schedule over the terminals, round robin.
pub fn per_terminal(due: Vec<Duration>, terminals: u32) -> Vec<Vec<Duration>> {
    let mut out: Vec<Vec<Duration>> = vec![Vec::new(); terminals as usize];
    for (k, d) in due.into_iter().enumerate() {
        out[k % terminals as usize].push(d);
    }
    out
}

/// Runs one stage on the given connections (one per terminal, `None` for a
/// terminal to reconnect first) and gives them back for the next stage.
pub async fn run_stage(
    target: &Arc<Target>,
    conns: Vec<Option<Connection>>,
    stage: &Stage,
    mix: Arc<Mix>,
) -> anyhow::Result<(Outcome, Vec<Option<Connection>>)> {
    target.check()?;
    anyhow::ensure!(
        conns.len() == target.terminals as usize,
        "one connection per terminal"
    );
    let due = profile::schedule(
        stage.profile,
        stage.peak_per_s,
        stage.duration,
        stage.requests_max,
    );
    let scheduled = due.len() as u64;
    let live = Arc::new(Live {
        answered: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        window: Mutex::new(report::histogram()),
        corrected: Mutex::new(report::histogram()),
        uncorrected: Mutex::new(report::histogram()),
        admitted: Mutex::new(report::histogram()),
        refused: Mutex::new(report::histogram()),
        by_second: Mutex::new(Vec::new()),
        lag: Mutex::new(report::histogram()),
    });
    let start = Instant::now() + Duration::from_millis(100);
    let hard_stop = start + stage.duration + GRACE;
    let run_id = format!("L{}", onecard_core::time::wall_ms());

    let mut tasks = Vec::with_capacity(conns.len());
    for (i, (conn, times)) in conns
        .into_iter()
        .zip(per_terminal(due, target.terminals))
        .enumerate()
    {
        let n = i as u32 + 1;
        let (mix, live, run_id, target) =
            (mix.clone(), live.clone(), run_id.clone(), target.clone());
        let rng = Rng::new(stage.seed ^ (u64::from(n) << 32));
        tasks.push(tokio::spawn(async move {
            terminal(
                &target, n, conn, times, start, hard_stop, &mix, rng, &run_id, &live,
            )
            .await
        }));
    }

    let lag_probe = {
        let live = live.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(start.into()).await;
            loop {
                let t = Instant::now();
                tokio::time::sleep(GENERATOR_TICK).await;
                let late = t.elapsed().saturating_sub(GENERATOR_TICK);
                live.lag.lock().saturating_record(late.as_micros() as u64);
            }
        })
    };
    let progress = stage.progress.then(|| {
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

    let mut tally = Tally::default();
    let mut back = Vec::with_capacity(tasks.len());
    for t in tasks {
        let r = t.await?;
        tally.merge(&r.tally);
        back.push(r.conn);
    }
    let corrected = std::mem::replace(&mut *live.corrected.lock(), report::histogram());
    let uncorrected = std::mem::replace(&mut *live.uncorrected.lock(), report::histogram());
    let admitted = std::mem::replace(&mut *live.admitted.lock(), report::histogram());
    let refused = std::mem::replace(&mut *live.refused.lock(), report::histogram());
    let by_second: Vec<Second> = std::mem::take(&mut *live.by_second.lock())
        .into_iter()
        .map(|(decided, refused, h)| Second {
            decided,
            refused,
            decided_p99_ms: if decided == 0 {
                0.0
            } else {
                Percentiles::of(&h).p99_ms
            },
        })
        .collect();
    let elapsed = start.elapsed().as_secs_f64().max(1e-9);
    if let Some(p) = progress {
        p.abort();
    }
    lag_probe.abort();
    let generator_lag = Percentiles::of(&live.lag.lock());
    let summary = Summary {
        profile: format!("{:?}", stage.profile),
        terminals: target.terminals,
        seconds: elapsed,
        scheduled,
        sent: tally.sent,
        offered_per_s: scheduled as f64 / stage.duration.as_secs_f64(),
        achieved_per_s: tally.answered() as f64 / elapsed,
        decided_per_s: admitted.len() as f64 / elapsed,
        refused_per_s: refused.len() as f64 / elapsed,
        decided: Percentiles::of(&admitted),
        refusals: Percentiles::of(&refused),
        corrected: Percentiles::of(&corrected),
        uncorrected: Percentiles::of(&uncorrected),
        by_status: tally.by_status.clone(),
        by_reason: tally.by_reason.clone(),
        errors: tally.errors.clone(),
        dropped: tally.dropped,
        reconnects: tally.reconnects,
        offline: tally.offline,
        generator_lag,
    };
    Ok((
        Outcome {
            summary,
            corrected,
            uncorrected,
            admitted,
            refused,
            by_second,
        },
        back,
    ))
}

/// One terminal's part of a stage.
#[allow(clippy::too_many_arguments)]
async fn terminal(
    target: &Target,
    n: u32,
    mut conn: Option<Connection>,
    times: Vec<Duration>,
    start: Instant,
    hard_stop: Instant,
    mix: &Mix,
    mut rng: Rng,
    run_id: &str,
    live: &Live,
) -> TerminalRun {
    let id = certs::terminal_id(n);
    let headers = target.headers(&id);
    let mut tally = Tally::default();
    let mut last: Option<Vec<u8>> = None;
    let mut reconnects_left = RECONNECTS_MAX;
    let total = times.len() as u64;
    // Until when this terminal works offline: a refusal's `Retry-After`
    // (as the API asks of a terminal: its taps are decided by its offline
    // rules meanwhile).
    let mut offline_until: Option<Instant> = None;
    for (seq, at) in times.into_iter().enumerate() {
        let due = start + at;
        if Instant::now() > hard_stop {
            tally.dropped += total - seq as u64;
            break;
        }
        if offline_until.is_some_and(|t| due < t) {
            tally.offline += 1;
            continue;
        }
        tokio::time::sleep_until(due.into()).await;
        if conn.as_ref().is_some_and(Connection::is_closed) {
            // Closed by the server while idle: a terminal notices before it
            // sends, and reconnects.
            conn = None;
        }
        if conn.is_none() {
            if reconnects_left == 0 {
                tally.dropped += total - seq as u64;
                break;
            }
            reconnects_left -= 1;
            tally.reconnects += 1;
            match target.connect(n).await {
                Ok(c) => conn = Some(c),
                Err(_) => {
                    *tally.errors.entry("connect".to_owned()).or_default() += 1;
                    tally.dropped += total - seq as u64;
                    break;
                }
            }
        }
        let c = conn.as_mut().expect("connected above");
        let body = match &last {
            Some(b) if mix.retry(&mut rng) => b.clone(),
            _ => mix.body(&mut rng, run_id, n, seq as u64),
        };
        last = Some(body.clone());
        let sent = Instant::now();
        tally.sent += 1;
        match c.send(Method::POST, "/v1/authorize", &headers, body).await {
            Ok(a) => {
                let answered = Instant::now();
                let (cor, unc) = profile::latencies(due - start, sent - start, answered - start);
                live.corrected
                    .lock()
                    .saturating_record(cor.as_micros() as u64);
                live.uncorrected
                    .lock()
                    .saturating_record(unc.as_micros() as u64);
                live.window.lock().saturating_record(cor.as_micros() as u64);
                live.answered.fetch_add(1, Ordering::Relaxed);
                let decided = a.status == StatusCode::OK;
                if is_refusal(a.status) {
                    let after = a
                        .headers
                        .get(http::header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<u64>().ok());
                    if let Some(s) = after {
                        offline_until = Some(answered + Duration::from_secs(s));
                    }
                }
                if decided || is_refusal(a.status) {
                    let which = if decided {
                        &live.admitted
                    } else {
                        &live.refused
                    };
                    which.lock().saturating_record(cor.as_micros() as u64);
                    let second = (answered - start).as_secs() as usize;
                    let mut by = live.by_second.lock();
                    while by.len() <= second {
                        by.push((0, 0, report::histogram()));
                    }
                    let slot = &mut by[second];
                    if decided {
                        slot.0 += 1;
                        slot.2.saturating_record(cor.as_micros() as u64);
                    } else {
                        slot.1 += 1;
                    }
                }
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
                let kind = if matches!(e, ClientError::Http(_)) {
                    "http"
                } else {
                    "io"
                };
                *tally.errors.entry(kind.to_owned()).or_default() += 1;
                // The connection is gone: the next due request reconnects.
                conn = None;
            }
        }
    }
    TerminalRun { tally, conn }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schedule_is_dealt_round_robin() {
        let ms = Duration::from_millis;
        let due: Vec<Duration> = (0..7).map(ms).collect();
        let split = per_terminal(due, 3);
        assert_eq!(split[0], vec![ms(0), ms(3), ms(6)]);
        assert_eq!(split[1], vec![ms(1), ms(4)]);
        assert_eq!(split[2], vec![ms(2), ms(5)]);
    }
}
