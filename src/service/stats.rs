//! Latency as an SRE reads it: real percentiles (p50, p99, p99.9, max) of
//! the last 10 or 60 seconds, per route and per scenario, from
//! HdrHistograms kept in one-second slots. Prometheus's histogram buckets
//! only say "at most 5 ms"; these say 4.37 ms, to 1 %.
//!
//! Each key (a route, a scenario) has a ring of 60 one-second slots; a
//! request records into the slot of its second (the slot is cleared when
//! a new second reaches it), and a query merges the slots of the window.
//! Keys are few and fixed (the routes and scenarios there are), found by a
//! scan under a read lock; recording is one uncontended mutex per key.
//! A slot's histogram grows with the largest latency it has seen (2
//! significant digits: a few kilobytes), so idle keys cost next to nothing.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use parking_lot::{Mutex, RwLock};
use serde::Serialize;

/// Seconds kept: the longest window a query may ask for.
pub const WINDOW_MAX_S: u64 = 60;
/// Significant digits of every histogram: 1 % resolution.
const SIGFIG: u8 = 2;

/// One key's last [`WINDOW_MAX_S`] seconds.
struct Ring {
    /// (the second it holds, its latencies in microseconds).
    slots: Vec<Mutex<(u64, Histogram<u64>)>>,
}

impl Ring {
    fn new() -> Ring {
        Ring {
            slots: (0..WINDOW_MAX_S)
                .map(|_| Mutex::new((u64::MAX, new_histogram())))
                .collect(),
        }
    }

    /// Records `took` into the slot of `second`, clearing a slot left
    /// from a minute before.
    fn record(&self, second: u64, took: Duration) {
        let mut slot = self.slots[(second % WINDOW_MAX_S) as usize].lock();
        if slot.0 != second {
            slot.0 = second;
            slot.1.reset();
        }
        // At least 1 µs (0 is outside the histogram); it grows to fit
        // (`saturating_record` would clamp at its current top instead).
        let us = (took.as_micros() as u64).max(1);
        if slot.1.record(us).is_err() {
            slot.1.saturating_record(us);
        }
    }
}

fn new_histogram() -> Histogram<u64> {
    Histogram::new(SIGFIG).expect("2 significant digits are valid")
}

/// Latency windows of every route and scenario seen so far.
pub struct Stats {
    started: Instant,
    keys: RwLock<Vec<(Kind, &'static str, Arc<Ring>)>>,
}

/// What a key names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Route,
    Scenario,
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
}

impl Default for Stats {
    fn default() -> Self {
        Stats::new()
    }
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
        {
            let keys = self.keys.read();
            if let Some((_, _, ring)) = keys.iter().find(|(k, n, _)| *k == kind && *n == name) {
                ring.record(second, took);
                return;
            }
        }
        self.ring(kind, name).record(second, took);
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

    /// The figures of the last `window_s` seconds (1 to [`WINDOW_MAX_S`]),
    /// the current second included.
    pub fn window(&self, window_s: u64) -> Window {
        let window_s = window_s.clamp(1, WINDOW_MAX_S);
        let now = self.started.elapsed();
        let second = now.as_secs();
        let first = (second + 1).saturating_sub(window_s);
        // The window's length so far: a gateway up for 3 s has 3 s of it.
        let span_s = (now.as_secs_f64() - first as f64).clamp(0.001, window_s as f64);
        let keys: Vec<(Kind, &'static str, Arc<Ring>)> = self.keys.read().clone();
        let mut out = Window {
            window_s,
            routes: Vec::new(),
            scenarios: Vec::new(),
        };
        for (kind, name, ring) in keys {
            let mut merged = new_histogram();
            for slot in &ring.slots {
                let slot = slot.lock();
                if slot.0 != u64::MAX && slot.0 >= first && slot.0 <= second {
                    merged
                        .add(&slot.1)
                        .expect("auto-resizing histograms always merge");
                }
            }
            let ms = |us: u64| us as f64 / 1000.0;
            let f = Figures {
                name,
                count: merged.len(),
                per_s: merged.len() as f64 / span_s,
                p50_ms: ms(merged.value_at_quantile(0.5)),
                p99_ms: ms(merged.value_at_quantile(0.99)),
                p999_ms: ms(merged.value_at_quantile(0.999)),
                max_ms: ms(merged.max()),
            };
            match kind {
                Kind::Route => out.routes.push(f),
                Kind::Scenario => out.scenarios.push(f),
            }
        }
        for list in [&mut out.routes, &mut out.scenarios] {
            list.sort_by(|a, b| b.count.cmp(&a.count).then(a.name.cmp(b.name)));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_the_recorded_ones_to_one_percent() {
        let s = Stats::new();
        // 1,000 requests of 1 to 1,000 µs, and one of 250 ms.
        for us in 1..=1_000u64 {
            s.record(Kind::Scenario, "transit", Duration::from_micros(us));
        }
        s.record(Kind::Scenario, "transit", Duration::from_millis(250));
        s.record(Kind::Route, "/v1/authorize", Duration::from_millis(2));
        let w = s.window(10);
        assert_eq!(w.window_s, 10);
        let t = &w.scenarios[0];
        assert_eq!((t.name, t.count), ("transit", 1_001));
        let near = |got: f64, want: f64| (got - want).abs() <= want * 0.01 + 0.001;
        assert!(near(t.p50_ms, 0.5), "{t:?}");
        assert!(near(t.p99_ms, 0.99), "{t:?}");
        assert!(near(t.p999_ms, 1.0), "{t:?}");
        assert!(near(t.max_ms, 250.0), "{t:?}");
        assert_eq!(w.routes.len(), 1);
        assert_eq!(w.routes[0].count, 1);
        // Windows are clamped to what is kept.
        assert_eq!(s.window(0).window_s, 1);
        assert_eq!(s.window(3_600).window_s, WINDOW_MAX_S);
    }

    #[test]
    fn a_second_that_comes_round_again_starts_empty() {
        let s = Stats::new();
        let ring = s.ring(Kind::Route, "/v1/ping");
        // A slot last written 60 s ago (same index, older second).
        {
            let mut slot = ring.slots[0].lock();
            slot.0 = 0;
            slot.1.record(5_000).unwrap();
        }
        let later = Stats {
            started: s.started - Duration::from_secs(WINDOW_MAX_S),
            keys: RwLock::new(s.keys.read().clone()),
        };
        // Now is second 60 (index 0 again): the old second is outside
        // every window and is cleared by the next record.
        assert_eq!(later.window(60).routes[0].count, 0);
        later.record(Kind::Route, "/v1/ping", Duration::from_micros(100));
        let w = later.window(1);
        assert_eq!(w.routes[0].count, 1);
        assert!(w.routes[0].max_ms < 1.0);
    }
}
