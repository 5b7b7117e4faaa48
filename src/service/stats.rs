//! What the SRE's page and `GET /admin/v1/stats` show: real percentiles
//! (p50, p99, p99.9, max) of the last 10 or 60 seconds per terminal route
//! and per scenario, decisions per second by outcome (approve, or the
//! decline's reason), admission refusals (429, 503) and idempotent replays,
//! each a [`Ring`] of one-second HdrHistograms (the core crate's `window`).
//! Prometheus's histogram buckets only say "at most 5 ms"; these say
//! 4.37 ms, to 1 %.
//!
//! Keys are few and fixed (the routes, scenarios, reasons and refusals
//! there are), found by a scan under a read lock; recording takes the
//! mutex of the key's current second for a few nanoseconds (requests of
//! one key in one second share it). Outcomes, refusals and replays are
//! recorded as 0 µs: counted, their one-value histograms stay small.

use std::sync::Arc;
use std::time::{Duration, Instant};

use onecard_core::window::{first_of, Ring, Second, SECONDS};
use parking_lot::RwLock;
use serde::Serialize;

/// Seconds kept: the longest window a query may ask for.
pub const WINDOW_MAX_S: u64 = SECONDS;

/// Latency windows of every route and scenario seen so far, with counts.
pub struct Stats {
    started: Instant,
    keys: RwLock<Vec<(Kind, &'static str, Arc<Ring>)>>,
}

/// What a key names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A terminal route: the time from request to answer.
    Route,
    /// A decision's scenario: the time from request to durable answer.
    Scenario,
    /// A decision's outcome: `approve`, or the decline's reason code
    /// (counted, no latency).
    Outcome,
    /// A request refused by admission: `429` or `503`.
    Refusal,
    /// An answer replayed for a repeated event.
    Replay,
}

/// One key's figures over a window.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Figures {
    pub name: &'static str,
    pub count: u64,
    pub per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

/// Every key's figures over one window, busiest first within each kind.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Window {
    pub window_s: u64,
    pub routes: Vec<Figures>,
    pub scenarios: Vec<Figures>,
    pub outcomes: Vec<Figures>,
    pub refusals: Vec<Figures>,
    pub replays: Vec<Figures>,
}

/// One key's last seconds, for a moving chart: the second counted from
/// the gateway's start, requests, p99 and max in milliseconds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Series {
    pub kind: Kind,
    pub name: &'static str,
    /// `[second, count, p99_ms, max_ms]`, oldest first.
    pub seconds: Vec<(u64, u64, f64, f64)>,
}

impl Default for Stats {
    fn default() -> Self {
        Stats::new()
    }
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

impl Stats {
    pub fn new() -> Stats {
        Stats {
            started: Instant::now(),
            keys: RwLock::new(Vec::new()),
        }
    }

    /// Records one request of `name` that took `took`: under the keys'
    /// read lock, without touching the ring's reference count.
    pub fn record(&self, kind: Kind, name: &'static str, took: Duration) {
        let second = self.started.elapsed().as_secs();
        let us = took.as_micros() as u64;
        {
            let keys = self.keys.read();
            if let Some((_, _, ring)) = keys.iter().find(|(k, n, _)| *k == kind && *n == name) {
                ring.record(second, us);
                return;
            }
        }
        self.ring(kind, name).record(second, us);
    }

    fn ring(&self, kind: Kind, name: &'static str) -> Arc<Ring> {
        let found = |keys: &[(Kind, &'static str, Arc<Ring>)]| {
            keys.iter()
                .find(|(k, n, _)| *k == kind && *n == name)
                .map(|(_, _, r)| r.clone())
        };
        if let Some(r) = found(&self.keys.read()) {
            return r;
        }
        let mut keys = self.keys.write();
        if let Some(r) = found(&keys) {
            return r;
        }
        let r = Arc::new(Ring::new());
        keys.push((kind, name, r.clone()));
        r
    }

    /// Seconds since this gateway started.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// The figures of the last `window_s` seconds (1 to [`WINDOW_MAX_S`]),
    /// the current second included.
    pub fn window(&self, window_s: u64) -> Window {
        let window_s = window_s.clamp(1, WINDOW_MAX_S);
        let now = self.started.elapsed();
        let second = now.as_secs();
        let first = first_of(second, window_s);
        // The window's length so far: a gateway up for 3 s has 3 s of it.
        let span_s = (now.as_secs_f64() - first as f64).clamp(0.001, window_s as f64);
        let keys: Vec<(Kind, &'static str, Arc<Ring>)> = self.keys.read().clone();
        let mut out = Window {
            window_s,
            routes: Vec::new(),
            scenarios: Vec::new(),
            outcomes: Vec::new(),
            refusals: Vec::new(),
            replays: Vec::new(),
        };
        for (kind, name, ring) in keys {
            let s = ring.summary(first, second);
            let f = Figures {
                name,
                count: s.count,
                per_s: s.count as f64 / span_s,
                p50_ms: ms(s.p50),
                p99_ms: ms(s.p99),
                p999_ms: ms(s.p999),
                max_ms: ms(s.max),
            };
            match kind {
                Kind::Route => out.routes.push(f),
                Kind::Scenario => out.scenarios.push(f),
                Kind::Outcome => out.outcomes.push(f),
                Kind::Refusal => out.refusals.push(f),
                Kind::Replay => out.replays.push(f),
            }
        }
        for list in [
            &mut out.routes,
            &mut out.scenarios,
            &mut out.outcomes,
            &mut out.refusals,
            &mut out.replays,
        ] {
            list.sort_by(|a, b| b.count.cmp(&a.count).then(a.name.cmp(b.name)));
        }
        out
    }

    /// Every key's last `len` seconds, second by second (the current one,
    /// still filling, left out), for the page's moving charts.
    pub fn series(&self, len: u64) -> Vec<Series> {
        let last = self.started.elapsed().as_secs().saturating_sub(1);
        let first = first_of(last, len);
        let keys: Vec<(Kind, &'static str, Arc<Ring>)> = self.keys.read().clone();
        keys.into_iter()
            .map(|(kind, name, ring)| Series {
                kind,
                name,
                seconds: ring
                    .seconds(first, last)
                    .into_iter()
                    .map(|Second { s, count, p99, max }| (s, count, ms(p99), ms(max)))
                    .collect(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_gives_each_kind_its_keys_busiest_first() {
        let s = Stats::new();
        for us in 1..=1_000u64 {
            s.record(Kind::Scenario, "transit", Duration::from_micros(us));
        }
        s.record(Kind::Scenario, "medical", Duration::from_millis(250));
        s.record(Kind::Route, "/v1/authorize", Duration::from_millis(2));
        s.record(Kind::Outcome, "approve", Duration::from_millis(1));
        s.record(Kind::Outcome, "DENYLISTED", Duration::from_millis(1));
        s.record(Kind::Outcome, "DENYLISTED", Duration::from_millis(1));
        s.record(Kind::Refusal, "429", Duration::ZERO);
        let w = s.window(10);
        assert_eq!(w.window_s, 10);
        let t = &w.scenarios[0];
        assert_eq!((t.name, t.count), ("transit", 1_000));
        assert!((t.p99_ms - 0.99).abs() < 0.02, "{t:?}");
        assert!((w.scenarios[1].max_ms - 250.0).abs() < 2.5, "{w:?}");
        assert_eq!(w.routes.len(), 1);
        assert_eq!(
            w.outcomes
                .iter()
                .map(|f| (f.name, f.count))
                .collect::<Vec<_>>(),
            [("DENYLISTED", 2), ("approve", 1)]
        );
        assert_eq!(w.refusals[0].count, 1);
        assert!(w.replays.is_empty());
        // Windows are clamped to what is kept.
        assert_eq!(s.window(0).window_s, 1);
        assert_eq!(s.window(3_600).window_s, WINDOW_MAX_S);
        // The series leave out the second still filling.
        assert!(s.series(60).iter().all(|x| x.seconds.len() <= 60));
    }
}
