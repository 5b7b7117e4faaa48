//! `onecard-fsync`: how long this machine's `fdatasync` takes, measured the
//! way a write-ahead log uses it (append a small record, then sync it).
//!
//! It exists because a durable answer cannot beat it: the gateway in `sync`
//! mode, PostgreSQL with `synchronous_commit = on` and Redis with
//! `appendfsync always` all wait for one `fdatasync` before they answer, so
//! its latency is the floor under every synced p50 in a comparison, and group
//! commit (many answers per sync) is the only way past `1 / fdatasync` for
//! throughput. Run it on the filesystem the data directories live on.
//!
//! Bounded: at most `--samples` syncs (capped at `SAMPLES_MAX`) and at most
//! `--seconds` of wall time, whichever ends first; the scratch file is
//! removed at the end.

#![forbid(unsafe_code)]

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Parser;
use hdrhistogram::Histogram;
use serde_json::json;

/// The most syncs one run takes, whatever `--samples` asks for.
const SAMPLES_MAX: u64 = 1_000_000;
/// The largest record appended before each sync.
const RECORD_BYTES_MAX: usize = 1 << 20;
/// Histogram range in microseconds: 1 µs to 60 s.
const LATENCY_US_MAX: u64 = 60_000_000;

#[derive(Parser)]
struct Args {
    /// Directory to write the scratch file in (on the data directory's
    /// filesystem: a tmpfs answers instantly and measures nothing).
    #[arg(long)]
    dir: PathBuf,
    /// Syncs to measure.
    #[arg(long, default_value_t = 2000)]
    samples: u64,
    /// Stop after this much wall time even if samples remain.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Bytes appended before each sync (about one journal record).
    #[arg(long, default_value_t = 128)]
    record_bytes: usize,
    /// Print one JSON object instead of a line of text.
    #[arg(long)]
    json: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        (1..=RECORD_BYTES_MAX).contains(&args.record_bytes),
        "--record-bytes must be 1..={RECORD_BYTES_MAX}"
    );
    let samples_max = args.samples.clamp(1, SAMPLES_MAX);
    let path = args
        .dir
        .join(format!("onecard-fsync-{}.scratch", std::process::id()));
    let result = measure(&path, samples_max, &args);
    // Removed whether or not the measurement worked.
    let _ = fs::remove_file(&path);
    let (h, elapsed) = result?;

    let ms = |us: u64| us as f64 / 1000.0;
    let (p50, p99, max) = (
        ms(h.value_at_quantile(0.5)),
        ms(h.value_at_quantile(0.99)),
        ms(h.max()),
    );
    if args.json {
        println!(
            "{}",
            json!({
                "dir": args.dir,
                "record_bytes": args.record_bytes,
                "samples": h.len(),
                "seconds": elapsed.as_secs_f64(),
                "p50_ms": p50,
                "p99_ms": p99,
                "max_ms": max,
            })
        );
    } else {
        println!(
            "fdatasync p50 {p50:.3} ms p99 {p99:.3} ms max {max:.3} ms ({} samples of {} B appends, {:.1} s)",
            h.len(),
            args.record_bytes,
            elapsed.as_secs_f64()
        );
    }
    Ok(())
}

/// Appends a record and syncs it, `samples_max` times or until the time cap,
/// timing each append + `fdatasync` pair (what a WAL commit waits for).
fn measure(
    path: &std::path::Path,
    samples_max: u64,
    args: &Args,
) -> anyhow::Result<(Histogram<u64>, Duration)> {
    let mut file = OpenOptions::new()
        .create_new(true)
        .append(true)
        .open(path)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let record = vec![b'r'; args.record_bytes];
    let mut h = Histogram::<u64>::new_with_bounds(1, LATENCY_US_MAX, 3)?;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.seconds);
    while h.len() < samples_max && Instant::now() < deadline {
        let t = Instant::now();
        file.write_all(&record)?;
        file.sync_data()?;
        h.saturating_record(t.elapsed().as_micros() as u64);
    }
    anyhow::ensure!(!h.is_empty(), "no sync finished within --seconds");
    Ok((h, started.elapsed()))
}
