//! `onecard-load`: open-loop load for OneCard Gateway.
//!
//! - `run`: N terminals, each with its own client certificate and
//!   connection, send a transit-heavy mix of taps on a schedule (constant,
//!   rush-hour, or `step`: rising rates until the gateway stops keeping up,
//!   reporting the knee); latency is measured from the intended send time
//!   (corrected for coordinated omission) and from the actual send
//!   (uncorrected), and can be drawn as an SVG.
//! - `seed`: fills a gateway's store through the bulk import, and measures
//!   the time taken, the restart-to-ready time and resident memory.
//!
//! Loopback only; every run is bounded by its duration and a request cap.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use http::{Method, StatusCode};
use onecard::net::client::{self, Protocol};
use onecard_load::mix::{self, Mix, SPECIAL_CARDS};
use onecard_load::profile::Profile;
use onecard_load::runner::{self, Outcome, Stage, Target};
use onecard_load::step::{self, Plan, StageResult};
use onecard_load::{plot, report, seed};
use serde_json::json;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "onecard-load")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Open-loop load against a running gateway.
    Run(RunArgs),
    /// Fill a gateway's store through the bulk import.
    Seed(SeedArgs),
}

#[derive(Args)]
struct RunArgs {
    /// Terminal listener of the gateway (loopback); given once per node
    /// of a cluster, the terminals are spread over them round robin.
    #[arg(long, required = true)]
    addr: Vec<SocketAddr>,
    /// Certificates from `onecard certs` (one per terminal); plaintext with X-Terminal-Id without.
    #[arg(long)]
    certs: Option<PathBuf>,
    #[arg(long, default_value_t = 2_000)]
    terminals: u32,
    /// h1 or h2.
    #[arg(long, default_value = "h1")]
    protocol: String,
    /// Peak offered rate over all terminals, requests per second (the
    /// highest rate tried, for `step`).
    #[arg(long, default_value_t = 5_000.0)]
    rate: f64,
    /// Length of the run (of each stage, for `step`, `overload` and `soak`).
    #[arg(long, default_value_t = 30)]
    seconds: u64,
    /// soak: how many stages of `--seconds` (60 of 60 s: an hour).
    #[arg(long, default_value_t = 60)]
    samples: u64,
    #[arg(long, default_value_t = 10_000_000)]
    requests_max: u64,
    /// constant, rush-hour, step, overload (`--rate` taken as the knee:
    /// the knee, twice it, the knee again) or soak (`--samples` stages at
    /// `--rate`, with the gateway's memory, files and p99 after each).
    #[arg(long, default_value = "constant")]
    profile: String,
    /// step: the first stage's rate.
    #[arg(long, default_value_t = 1_000.0)]
    step_start: f64,
    /// step: how much each stage adds.
    #[arg(long, default_value_t = 1_000.0)]
    step_by: f64,
    /// step: a stage whose corrected p99 passes this no longer keeps up.
    #[arg(long, default_value_t = 20.0)]
    p99_bound_ms: f64,
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
    /// Skip creating cards (they exist from an earlier run or a seed).
    #[arg(long)]
    no_setup: bool,
    /// Write the summary as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Draw latency by percentile into this SVG file.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// No per-second progress line.
    #[arg(long)]
    quiet: bool,
    /// An unrecorded stage first, at the first stage's rate: right after
    /// thousands of connections are set up, the first second shows a tail
    /// of a few hundred ms on a 2-core machine (printed, not hidden).
    #[arg(long, default_value_t = 3)]
    warmup_seconds: u64,
}

impl RunArgs {
    /// A constant stage of `--seconds` at `rate` (the stages of `step`,
    /// `overload` and `soak`).
    fn constant_stage(&self, rate: f64, seed: u64, progress: bool) -> Stage {
        Stage {
            profile: Profile::Constant,
            peak_per_s: rate,
            duration: Duration::from_secs(self.seconds),
            requests_max: self.requests_max,
            seed,
            progress,
        }
    }
}

#[derive(Args)]
struct SeedArgs {
    /// Admin listener of the gateway (loopback).
    #[arg(long)]
    admin: SocketAddr,
    #[arg(long, env = "ONECARD_ADMIN_TOKEN", default_value = "")]
    token: String,
    #[arg(long, default_value_t = 10_000_000)]
    cards: usize,
    #[arg(long, default_value_t = 1_000_000)]
    deny: usize,
    /// Start the gateway from this binary with `--config` (and stop it
    /// again), to measure its restart-to-ready time after the seed. Without
    /// it, a running gateway is seeded and left running.
    #[arg(long, requires = "config")]
    gateway_bin: Option<PathBuf>,
    #[arg(long)]
    config: Option<PathBuf>,
    /// Write the report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Cmd::Run(a) => run(a).await,
        Cmd::Seed(a) => seed_cmd(a).await,
    }
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

/// Creates a small population through the single-entry admin API, 32 calls
/// at a time (large ones: `seed`).
async fn setup(admin: SocketAddr, token: &str, cards: usize) -> anyhow::Result<()> {
    if cards > 100_000 {
        seed::seed(admin, token, cards, SPECIAL_CARDS, false).await?;
        return Ok(());
    }
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

async fn scrape(admin: Option<SocketAddr>) -> anyhow::Result<Option<Vec<(f64, u64)>>> {
    let Some(admin) = admin else {
        return Ok(None);
    };
    let a = client::admin(admin, None, Method::GET, "/metrics", None).await?;
    Ok(Some(report::server_buckets(&String::from_utf8_lossy(
        &a.body,
    ))))
}

fn print_summary(
    o: &Outcome,
    protocol: Protocol,
    server: &Option<std::collections::BTreeMap<String, f64>>,
) {
    let s = &o.summary;
    println!(
        "offered {:.0}/s, achieved {:.0}/s over {:.1} s ({} terminals, {:?})",
        s.offered_per_s, s.achieved_per_s, s.seconds, s.terminals, protocol
    );
    println!(
        "scheduled {}  sent {}  dropped {}  errors {:?}  reconnects {}",
        s.scheduled, s.sent, s.dropped, s.errors, s.reconnects
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
    if let Some(w) = server {
        println!("gateway's own histogram for the window (bucket upper bounds): {w:?}");
    }
}

async fn run(a: RunArgs) -> anyhow::Result<()> {
    let overload = a.profile == "overload";
    let soak = a.profile == "soak";
    let profile = match a.profile.as_str() {
        "step" | "overload" | "soak" => None,
        p => Some(Profile::parse(p).ok_or_else(|| {
            anyhow::anyhow!("--profile must be constant, rush-hour, step, overload or soak")
        })?),
    };
    let protocol = match a.protocol.as_str() {
        "h1" => Protocol::Http1,
        "h2" => Protocol::Http2,
        other => anyhow::bail!("--protocol must be h1 or h2, not {other}"),
    };
    let target = Arc::new(Target {
        addr: a.addr[0],
        others: a.addr[1..].to_vec(),
        certs: a.certs.clone(),
        terminals: a.terminals,
        protocol,
    });
    target.check()?;
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
    anyhow::ensure!(
        a.rate > 0.0 && a.rate.is_finite(),
        "--rate must be a positive number of requests per second"
    );
    let mut conns = runner::connect_all(&target).await?;
    if a.warmup_seconds > 0 {
        let rate = match profile {
            None if overload || soak => a.rate,
            None => a.step_start,
            Some(Profile::RushHour) => a.rate * Profile::RushHour.share(0.0),
            Some(Profile::Constant) => a.rate,
        };
        let warm = Stage {
            profile: Profile::Constant,
            peak_per_s: rate,
            duration: Duration::from_secs(a.warmup_seconds),
            requests_max: a.requests_max,
            seed: a.seed ^ 0x5741_524d,
            progress: false,
        };
        let (o, back) = runner::run_stage(&target, conns, &warm, mix.clone()).await?;
        conns = back;
        let s = &o.summary;
        eprintln!(
            "warm-up (not recorded): {:.0}/s for {} s, corrected p50 {:.2} ms p99 {:.2} ms max {:.2} ms, errors {:?}",
            rate, a.warmup_seconds, s.corrected.p50_ms, s.corrected.p99_ms, s.corrected.max_ms, s.errors
        );
    }
    let stage = |profile, rate| Stage {
        profile,
        peak_per_s: rate,
        duration: Duration::from_secs(a.seconds),
        requests_max: a.requests_max,
        seed: a.seed,
        progress: !a.quiet,
    };
    match profile {
        Some(profile) => {
            let before = scrape(a.admin).await?;
            let (outcome, _conns) =
                runner::run_stage(&target, conns, &stage(profile, a.rate), mix).await?;
            let server = match (before, scrape(a.admin).await?) {
                (Some(b), Some(after)) => report::server_window(&b, &after),
                _ => None,
            };
            print_summary(&outcome, protocol, &server);
            let own = server_route(a.admin, &a.token, "/v1/authorize", a.seconds).await;
            if let Some(f) = &own {
                println!(
                    "gateway's own time for POST /v1/authorize, request received to answer ready, last {} s (HdrHistogram): {} requests, p50 {:.3} ms  p99 {:.3} ms  p99.9 {:.3} ms",
                    f.window_s, f.count, f.p50_ms, f.p99_ms, f.p999_ms
                );
            }
            if let Some(path) = &a.json {
                let own = own.map(|f| {
                    json!({"window_s": f.window_s, "count": f.count, "p50_ms": f.p50_ms, "p99_ms": f.p99_ms, "p999_ms": f.p999_ms})
                });
                let doc = json!({"summary": outcome.summary, "server": server, "server_own": own});
                std::fs::write(path, serde_json::to_vec_pretty(&doc)?)?;
            }
            if let Some(path) = &a.plot {
                let title = format!(
                    "{} terminals, {:.0}/s {:?}, {:?}",
                    a.terminals, a.rate, profile, protocol
                );
                let doc = plot::svg(
                    &title,
                    &[
                        ("corrected".to_owned(), &outcome.corrected),
                        ("uncorrected".to_owned(), &outcome.uncorrected),
                    ],
                );
                std::fs::write(path, doc)?;
            }
        }
        None if overload => overload_run(&a, &target, conns, mix, protocol).await?,
        None if soak => soak_run(&a, &target, conns, mix, protocol).await?,
        None => step_search(&a, &target, conns, mix, protocol).await?,
    }
    Ok(())
}

/// A gauge of the gateway's `/metrics`, summed over its labels.
async fn gauge(admin: Option<SocketAddr>, name: &str) -> Option<f64> {
    sum_samples(&metrics_text(admin).await?, name, None)
}

/// The gateway's `/metrics` page.
async fn metrics_text(admin: Option<SocketAddr>) -> Option<String> {
    let a = client::admin(admin?, None, Method::GET, "/metrics", None)
        .await
        .ok()?;
    Some(String::from_utf8_lossy(&a.body).into_owned())
}

/// The samples of `name` in a Prometheus text exposition whose labels
/// contain `pair` (every sample without), summed; `None` if there is none.
fn sum_samples(text: &str, name: &str, pair: Option<&str>) -> Option<f64> {
    let values: Vec<f64> = text
        .lines()
        .filter(|l| {
            l.strip_prefix(name).is_some_and(|rest| match pair {
                None => rest.starts_with(' ') || rest.starts_with('{'),
                Some(p) => {
                    rest.starts_with('{')
                        && rest
                            .split('}')
                            .next()
                            .is_some_and(|labels| labels.contains(p))
                }
            })
        })
        .filter_map(|l| l.rsplit(' ').next()?.trim().parse::<f64>().ok())
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

/// A route's figures from the gateway's own latency windows.
#[derive(Debug, Clone, serde::Deserialize)]
struct RouteFigures {
    /// The window they cover, in seconds.
    #[serde(skip)]
    window_s: u64,
    count: u64,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
}

/// The gateway's own latency of `route` (from request received to answer
/// ready) over its last 10 s (its last minute for a stage of a minute or
/// more), from the HdrHistogram windows it keeps per route (`GET
/// /admin/v1/stats?window=`): a measured p99, not the bound of a
/// Prometheus bucket. Read right after a stage, so the window holds the
/// stage's end and nothing after it.
async fn server_route(
    admin: Option<SocketAddr>,
    token: &str,
    route: &str,
    stage_s: u64,
) -> Option<RouteFigures> {
    let window_s: u64 = if stage_s < 60 { 10 } else { 60 };
    let a = client::admin(
        admin?,
        Some(token),
        Method::GET,
        &format!("/admin/v1/stats?window={window_s}s"),
        None,
    )
    .await
    .ok()?;
    if a.status != StatusCode::OK {
        return None;
    }
    let doc: serde_json::Value = serde_json::from_slice(&a.body).ok()?;
    let found = doc["routes"]
        .as_array()?
        .iter()
        .find(|r| r["name"] == route)?;
    let mut f: RouteFigures = serde_json::from_value(found.clone()).ok()?;
    f.window_s = window_s;
    (f.count > 0).then_some(f)
}

/// Samples the gauges `names` from the gateway's `/metrics` every 250 ms
/// (all from one scrape) until told to stop; the samples come back from
/// the handle, one list per name.
fn sample_gauges<const N: usize>(
    admin: Option<SocketAddr>,
    names: [&'static str; N],
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<[Vec<f64>; N]>,
) {
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let handle = tokio::spawn(async move {
        let mut samples: [Vec<f64>; N] = std::array::from_fn(|_| Vec::new());
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tokio::select! {
                _ = &mut stopped => return samples,
                _ = tick.tick() => {
                    let Some(text) = metrics_text(admin).await else { continue };
                    for (name, out) in names.iter().zip(samples.iter_mut()) {
                        if let Some(v) = sum_samples(&text, name, None) {
                            out.push(v);
                        }
                    }
                }
            }
        }
    });
    (stop, handle)
}

/// The mean and the largest of `samples` times `scale`, if there are any.
fn mean_max(samples: &[f64], scale: f64) -> Option<(f64, f64)> {
    (!samples.is_empty()).then(|| {
        (
            samples.iter().sum::<f64>() / samples.len() as f64 * scale,
            samples.iter().copied().fold(0.0, f64::max) * scale,
        )
    })
}

/// The gateway's resident memory, from its `/metrics`.
async fn resident_mb(admin: Option<SocketAddr>) -> Option<f64> {
    gauge(admin, "onecard_process_resident_bytes")
        .await
        .map(|b| b / 1_048_576.0)
}

/// `soak`: `--samples` constant stages of `--seconds` each at `--rate`,
/// one after another on the same connections; after each, the decided
/// answers' corrected p99 and the gateway's resident memory and open file
/// descriptors. At the end, each one's least-squares slope per hour: flat
/// is near zero.
async fn soak_run(
    a: &RunArgs,
    target: &Arc<Target>,
    mut conns: Vec<Option<client::Connection>>,
    mix: Arc<Mix>,
    protocol: Protocol,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        a.admin.is_some(),
        "--profile soak reads the gateway's memory and files: give --admin"
    );
    let mut samples = Vec::new();
    let t0 = Instant::now();
    for n in 0..a.samples {
        let st = a.constant_stage(a.rate, a.seed ^ n, false);
        let (o, back) = runner::run_stage(target, conns, &st, mix.clone()).await?;
        conns = back;
        let at_h = t0.elapsed().as_secs_f64() / 3600.0;
        // One scrape per sample: every figure of the same moment.
        let text = metrics_text(a.admin).await;
        let read = |name: &str, pair: Option<&str>| {
            text.as_deref().and_then(|t| sum_samples(t, name, pair))
        };
        let mib = |b: f64| b / 1_048_576.0;
        let rss = read("onecard_process_resident_bytes", None).map(mib);
        let fds = read("onecard_process_open_fds", None);
        let store = read("onecard_store_memory_bytes", None).map(mib);
        let heap_used = read(
            "onecard_process_native_heap_bytes",
            Some("state=\"in_use\""),
        )
        .map(mib);
        let heap_free = read("onecard_process_native_heap_bytes", Some("state=\"free\"")).map(mib);
        let s = &o.summary;
        let mb = |m: Option<f64>| m.map_or("?".to_owned(), |m| format!("{m:.0}"));
        println!(
            "sample {:>3} at {:>6.1} min: decided {:>6.0}/s  p99 {:>7.2} ms  refused {:.0}/s  errors {}  RSS {} MB (RocksDB {} MB; C heap {} MB in use, {} MB free)  open fds {}",
            n + 1,
            at_h * 60.0,
            s.decided_per_s,
            s.decided.p99_ms,
            s.refused_per_s,
            s.errors.values().sum::<u64>() + s.dropped,
            rss.map_or("?".to_owned(), |m| format!("{m:.0}")),
            store.map_or("?".to_owned(), |m| format!("{m:.0}")),
            mb(heap_used),
            mb(heap_free),
            fds.map_or("?".to_owned(), |f| format!("{f:.0}")),
        );
        samples.push(json!({
            "at_hours": at_h,
            "decided_per_s": s.decided_per_s,
            "p99_ms": s.decided.p99_ms,
            "refused_per_s": s.refused_per_s,
            "failed": s.errors.values().sum::<u64>() + s.dropped,
            "resident_mb": rss,
            "store_mb": store,
            "native_heap_in_use_mb": heap_used,
            "native_heap_free_mb": heap_free,
            "open_fds": fds,
        }));
    }
    let col = |k: &str| -> (Vec<f64>, Vec<f64>) {
        samples
            .iter()
            .filter_map(|s| Some((s["at_hours"].as_f64()?, s[k].as_f64()?)))
            .unzip()
    };
    let mut slopes = serde_json::Map::new();
    for (k, unit) in [
        ("resident_mb", "MB"),
        ("store_mb", "MB"),
        ("native_heap_in_use_mb", "MB"),
        ("native_heap_free_mb", "MB"),
        ("open_fds", "fds"),
        ("p99_ms", "ms"),
    ] {
        let (xs, ys) = col(k);
        let sl = report::slope(&xs, &ys);
        // The second half alone: caches fill during the first (RocksDB's
        // block cache and memtables grow towards `[store]`'s bounds), so a
        // bounded process is flat there, where a leak keeps its slope.
        let half = xs.len() / 2;
        let late = report::slope(&xs[half..], &ys[half..]);
        let mean = ys.iter().sum::<f64>() / ys.len().max(1) as f64;
        let per_h = |v: Option<f64>| v.map_or("?".to_owned(), |v| format!("{v:+.2} {unit}"));
        println!(
            "slope of {k}: {} per hour, second half {} per hour (mean {mean:.1} {unit}, {} samples, {} terminals, {:?}, {:.0}/s)",
            per_h(sl),
            per_h(late),
            ys.len(),
            a.terminals,
            protocol,
            a.rate
        );
        slopes.insert(format!("{k}_per_hour"), json!(sl));
        slopes.insert(format!("{k}_per_hour_second_half"), json!(late));
    }
    if let Some(path) = &a.json {
        let doc = json!({"samples": samples, "slopes": slopes, "rate_per_s": a.rate, "terminals": a.terminals});
        std::fs::write(path, serde_json::to_vec_pretty(&doc)?)?;
    }
    Ok(())
}

/// One stage of `overload` and what was read from the gateway after it.
struct OverloadStage {
    name: &'static str,
    outcome: runner::Outcome,
    resident_mb: Option<f64>,
    /// The gateway's own p99 of what it decided, over the stage's end.
    own_p99_ms: Option<f64>,
    /// The runtime lag over the stage: mean and largest sample, in ms.
    lag_ms: Option<(f64, f64)>,
    /// The share of requests the gateway shed over the stage: mean and
    /// largest sample, in percent.
    shed_pct: Option<(f64, f64)>,
}

/// `overload`: `--rate` (the knee), then twice that, then the knee again,
/// each for `--seconds`: what is decided and how fast (goodput, the
/// decided answers' p99), what is refused and how fast, the gateway's
/// memory after each stage, and how many seconds of the last stage pass
/// before its decided p99 is back within `--p99-bound-ms`, refusing no
/// more than the knee did.
async fn overload_run(
    a: &RunArgs,
    target: &Arc<Target>,
    mut conns: Vec<Option<client::Connection>>,
    mix: Arc<Mix>,
    protocol: Protocol,
) -> anyhow::Result<()> {
    let mut stages = Vec::new();
    for (name, rate) in [("knee", a.rate), ("twice", 2.0 * a.rate), ("after", a.rate)] {
        let st = a.constant_stage(rate, a.seed ^ rate as u64 ^ stages.len() as u64, !a.quiet);
        // The gateway's runtime lag (how late it runs a ready task: the
        // queue before a request's head is read, which its own latency
        // cannot see) and the share it sheds to hold that lag, sampled from
        // its /metrics four times a second.
        let (stop_sampling, samples) = sample_gauges(
            a.admin,
            [
                "onecard_runtime_lag_seconds",
                "onecard_admission_shed_share",
            ],
        );
        let (o, back) = runner::run_stage(target, conns, &st, mix.clone()).await?;
        conns = back;
        let _ = stop_sampling.send(());
        let [lag, shed] = samples.await.unwrap_or_default();
        let lag_ms = mean_max(&lag, 1000.0);
        let shed_pct = mean_max(&shed, 100.0);
        // Right after the stage: the gateway's own p99 of the decisions it
        // admitted (request received to answer ready) over the stage's end.
        let own = server_route(a.admin, &a.token, "/v1/authorize", a.seconds).await;
        let rss = resident_mb(a.admin).await;
        let s = &o.summary;
        println!(
            "{name:>5} offered {:>6.0}/s: decided {:>6.0}/s (p99 {:>7.2} ms; the gateway's own p99 {} ms, runtime lag mean {} ms, shedding mean {} %), refused {:>6.0}/s (p99 {:>6.2} ms), offline {:>6.0}/s, errors {:?}, dropped {}, gateway RSS {} MB, generator lag p99 {:.1} ms",
            s.offered_per_s,
            s.decided_per_s,
            s.decided.p99_ms,
            own.as_ref().map_or("?".to_owned(), |f| format!("{:.2}", f.p99_ms)),
            lag_ms.map_or("?".to_owned(), |(mean, max)| format!("{mean:.1}, max {max:.1}")),
            shed_pct.map_or("?".to_owned(), |(mean, max)| format!("{mean:.1}, max {max:.1}")),
            s.refused_per_s,
            s.refusals.p99_ms,
            s.offline as f64 / s.seconds.max(1e-9),
            s.errors,
            s.dropped,
            rss.map_or("?".to_owned(), |m| format!("{m:.0}")),
            s.generator_lag.p99_ms,
        );
        stages.push(OverloadStage {
            name,
            outcome: o,
            resident_mb: rss,
            own_p99_ms: own.map(|f| f.p99_ms),
            lag_ms,
            shed_pct,
        });
    }
    let knee_goodput = stages[0].outcome.summary.decided_per_s;
    let flood_goodput = stages[1].outcome.summary.decided_per_s;
    let ratio = flood_goodput / knee_goodput.max(1e-9);
    // Recovery: the first second of the last stage from which every second
    // keeps its decided p99 within the bound and refuses no more than the
    // knee did before the flood (its share, and half a percentage point of
    // noise).
    let knee = &stages[0].outcome.summary;
    let knee_refused_share =
        knee.refused_per_s / (knee.decided_per_s + knee.refused_per_s).max(1e-9);
    let recovered_at = report::recovered_at(
        &stages[2].outcome.by_second,
        a.p99_bound_ms,
        knee_refused_share + 0.005,
    );
    println!(
        "goodput at twice the rate: {flood_goodput:.0}/s = {:.0}% of the knee stage's {knee_goodput:.0}/s decided, {:.0}% of the knee ({:.0}/s; {} terminals, {:?})",
        ratio * 100.0,
        flood_goodput / a.rate.max(1e-9) * 100.0,
        a.rate,
        a.terminals,
        protocol
    );
    match recovered_at {
        Some(s) => println!(
            "recovery: back within p99 {} ms, refusing no more than the knee did ({:.1} %), {s} s into the stage after the flood",
            a.p99_bound_ms,
            knee_refused_share * 100.0
        ),
        None => println!(
            "recovery: not back within p99 {} ms, refusing no more than the knee did ({:.1} %), by the end of the stage after the flood",
            a.p99_bound_ms,
            knee_refused_share * 100.0
        ),
    }
    if let Some(path) = &a.json {
        let doc = json!({
            "stages": stages.iter().map(|st| json!({
                "stage": st.name,
                "summary": st.outcome.summary,
                "own_p99_ms": st.own_p99_ms,
                "runtime_lag_mean_ms": st.lag_ms.map(|l| l.0),
                "runtime_lag_max_ms": st.lag_ms.map(|l| l.1),
                "shed_share_mean_pct": st.shed_pct.map(|l| l.0),
                "shed_share_max_pct": st.shed_pct.map(|l| l.1),
                "by_second": st.outcome.by_second,
                "resident_mb": st.resident_mb,
            })).collect::<Vec<_>>(),
            "goodput_ratio": ratio,
            "recovered_after_s": recovered_at,
            "p99_bound_ms": a.p99_bound_ms,
        });
        std::fs::write(path, serde_json::to_vec_pretty(&doc)?)?;
    }
    if let Some(path) = &a.plot {
        let series: Vec<(String, &hdrhistogram::Histogram<u64>)> = stages
            .iter()
            .map(|st| (format!("{}: decided", st.name), &st.outcome.admitted))
            .collect();
        let title = format!(
            "overload: decided answers' corrected latency, {} terminals, {:?}",
            a.terminals, protocol
        );
        std::fs::write(path, plot::svg(&title, &series))?;
    }
    Ok(())
}

/// Constant stages at rising rates until one does not keep up.
async fn step_search(
    a: &RunArgs,
    target: &Arc<Target>,
    mut conns: Vec<Option<client::Connection>>,
    mix: Arc<Mix>,
    protocol: Protocol,
) -> anyhow::Result<()> {
    let plan = Plan {
        start_per_s: a.step_start,
        by_per_s: a.step_by,
        max_per_s: a.rate,
    };
    let mut results: Vec<StageResult> = Vec::new();
    let mut curves = Vec::new();
    for rate in plan.rates() {
        let st = a.constant_stage(rate, a.seed ^ rate as u64, false);
        let before = scrape(a.admin).await?;
        let (o, back) = runner::run_stage(target, conns, &st, mix.clone()).await?;
        conns = back;
        let server = match (before, scrape(a.admin).await?) {
            (Some(b), Some(after)) => report::server_window(&b, &after),
            _ => None,
        };
        let own = server_route(a.admin, &a.token, "/v1/authorize", a.seconds).await;
        let s = &o.summary;
        let r = StageResult {
            scheduled: s.scheduled,
            answered: s.by_status.values().sum(),
            offered_per_s: s.offered_per_s,
            achieved_per_s: s.achieved_per_s,
            p99_ms: s.corrected.p99_ms,
            server_p99_ms_at_most: server
                .as_ref()
                .and_then(|w| w.get("p99_ms_at_most").copied()),
            server_p99_ms: own.as_ref().map(|f| f.p99_ms),
            failed: s.errors.values().sum::<u64>() + s.dropped,
        };
        let keeps_up = r.keeps_up(a.p99_bound_ms);
        println!(
            "stage {:>7.0}/s: achieved {:>7.0}/s  p50 {:>7.2} ms  p99 {:>8.2} ms  gateway's own p99 {} ms (last {} s)  failed {}  {}",
            r.offered_per_s,
            r.achieved_per_s,
            s.corrected.p50_ms,
            r.p99_ms,
            own.as_ref().map_or("?".to_owned(), |f| format!("{:.3}", f.p99_ms)),
            own.as_ref().map_or(0, |f| f.window_s),
            r.failed,
            if keeps_up { "keeps up" } else { "falls behind" }
        );
        curves.push((format!("{:.0}/s", rate), o.corrected));
        results.push(r);
        if !keeps_up {
            break;
        }
    }
    let knee = step::knee(&results, a.p99_bound_ms);
    match knee {
        Some(k) => println!(
            "knee: {k:.0}/s ({} terminals, {:?}; a stage keeps up when ≥ {:.0}% of its requests are answered, with corrected p99 ≤ {} ms and no errors)",
            a.terminals,
            protocol,
            step::ANSWERED_SHARE_MIN * 100.0,
            a.p99_bound_ms
        ),
        None => println!("knee: below the first stage ({:.0}/s)", a.step_start),
    }
    if results.last().is_some_and(|r| r.keeps_up(a.p99_bound_ms)) {
        println!("(every stage kept up: the knee is at or above --rate)");
    }
    if let Some(path) = &a.json {
        let doc = json!({"stages": results, "knee_per_s": knee, "p99_bound_ms": a.p99_bound_ms});
        std::fs::write(path, serde_json::to_vec_pretty(&doc)?)?;
    }
    if let Some(path) = &a.plot {
        let series: Vec<(String, &hdrhistogram::Histogram<u64>)> =
            curves.iter().map(|(n, h)| (n.clone(), h)).collect();
        let title = format!(
            "step: corrected latency per stage, {} terminals, {:?}",
            a.terminals, protocol
        );
        std::fs::write(path, plot::svg(&title, &series))?;
    }
    Ok(())
}

/// Starts the gateway binary with the token in its environment.
fn spawn_gateway(bin: &PathBuf, config: &PathBuf, token: &str) -> anyhow::Result<Child> {
    Ok(Command::new(bin)
        .args(["serve", "--config"])
        .arg(config)
        .env("ONECARD_ADMIN_TOKEN", token)
        .env("RUST_LOG", "warn")
        .spawn()?)
}

/// Waits for a gateway this tool started, noticing if it exits instead.
async fn ready(child: &mut Child, admin: SocketAddr) -> anyhow::Result<()> {
    seed::wait_ready(admin, Duration::from_secs(600), || {
        child.try_wait().ok().flatten().map(|s| s.to_string())
    })
    .await
}

/// SIGTERM (a clean stop: the journal is flushed) and wait.
fn stop_gateway(mut child: Child) -> anyhow::Result<()> {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()?;
    anyhow::ensure!(status.success(), "could not signal the gateway");
    let status = child.wait()?;
    anyhow::ensure!(status.success(), "the gateway exited with {status}");
    Ok(())
}

async fn seed_cmd(a: SeedArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        a.cards <= onecard_load::zipf::POPULATION_MAX,
        "--cards is at most {} (the load generator's population)",
        onecard_load::zipf::POPULATION_MAX
    );
    let spawned = match (&a.gateway_bin, &a.config) {
        (Some(bin), Some(config)) => {
            let mut child = spawn_gateway(bin, config, &a.token)?;
            ready(&mut child, a.admin).await?;
            Some((bin, config, child))
        }
        _ => None,
    };
    let mut report = seed::seed(a.admin, &a.token, a.cards, a.deny, true).await?;
    println!(
        "seeded {} cards and {} deny-list entries in {:.1} s ({:.0} cards/s)",
        report.cards, report.deny, report.seconds, report.cards_per_s
    );
    if let Some((bin, config, child)) = spawned {
        stop_gateway(child)?;
        let t = Instant::now();
        let mut child = spawn_gateway(bin, config, &a.token)?;
        ready(&mut child, a.admin).await?;
        report.restart_to_ready_s = Some(t.elapsed().as_secs_f64());
        let status = seed::status(a.admin, &a.token).await?;
        report.startup_seconds = status["process"]["startup_seconds"].as_f64();
        report.resident_bytes = status["process"]["resident_bytes"].as_u64();
        stop_gateway(child)?;
        println!(
            "restart to ready: {:.2} s (the gateway's own start-up: {:.2} s); resident memory after the restart: {} MiB",
            report.restart_to_ready_s.unwrap_or(0.0),
            report.startup_seconds.unwrap_or(0.0),
            report.resident_bytes.unwrap_or(0) / (1024 * 1024)
        );
    } else {
        let status = seed::status(a.admin, &a.token).await?;
        report.resident_bytes = status["process"]["resident_bytes"].as_u64();
        println!(
            "resident memory after the seed: {} MiB (restart not measured: pass --gateway-bin and --config)",
            report.resident_bytes.unwrap_or(0) / (1024 * 1024)
        );
    }
    if let Some(path) = &a.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::sum_samples;

    const TEXT: &str = "# HELP x\nonecard_heap_bytes{state=\"in_use\"} 100\nonecard_heap_bytes{state=\"free\"} 5\nonecard_heap_bytes_total 7\nonecard_fds 2048\n";

    #[test]
    fn samples_are_picked_by_name_and_label() {
        assert_eq!(sum_samples(TEXT, "onecard_heap_bytes", None), Some(105.0));
        assert_eq!(
            sum_samples(TEXT, "onecard_heap_bytes", Some("state=\"free\"")),
            Some(5.0)
        );
        assert_eq!(sum_samples(TEXT, "onecard_fds", None), Some(2048.0));
        assert_eq!(
            sum_samples(TEXT, "onecard_fds", Some("state=\"free\"")),
            None
        );
        assert_eq!(sum_samples(TEXT, "onecard_missing", None), None);
    }
}
