//! Figures of the last minute, second by second: the ring that the
//! gateway's latency windows (per route, per scenario), its decision and
//! refusal counts and its journal's commit times are kept in.
//!
//! A ring has one slot per second for [`SECONDS`] seconds; a value
//! recorded at second `s` goes into slot `s % SECONDS`, which is cleared
//! first if it still holds an older second. Time is a value here (the
//! caller says which second it is), so the ring is pure and its tests need
//! no clock. Each slot holds an HdrHistogram of 2 significant digits (1 %
//! resolution: a p99.9 of 4.37 ms, where Prometheus buckets say "≤ 5 ms"),
//! which grows with the largest value it has seen: an idle ring costs a few
//! kilobytes.

use hdrhistogram::Histogram;
use parking_lot::Mutex;
use serde::Serialize;

/// Seconds kept: the longest window there is.
pub const SECONDS: u64 = 60;
/// Significant digits of every histogram: 1 % resolution.
const SIGFIG: u8 = 2;
/// A slot that has never held a second.
const NEVER: u64 = u64::MAX;

/// One series' last [`SECONDS`] seconds.
pub struct Ring {
    /// (the second it holds, its values).
    slots: Vec<Mutex<(u64, Histogram<u64>)>>,
}

/// The figures of a ring over a window of seconds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    pub count: u64,
    pub p50: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
    pub mean: f64,
}

/// One second's figures, for a moving chart.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Second {
    /// The second, counted by the ring's owner (e.g. since its start).
    pub s: u64,
    pub count: u64,
    pub p99: u64,
    pub max: u64,
}

impl Default for Ring {
    fn default() -> Self {
        Ring::new()
    }
}

impl Ring {
    pub fn new() -> Ring {
        Ring {
            slots: (0..SECONDS)
                .map(|_| Mutex::new((NEVER, new_histogram())))
                .collect(),
        }
    }

    /// Records `value` (at least 1: 0 is outside the histogram) at `second`.
    pub fn record(&self, second: u64, value: u64) {
        let mut slot = self.slots[(second % SECONDS) as usize].lock();
        if slot.0 != second {
            slot.0 = second;
            slot.1.reset();
        }
        let v = value.max(1);
        // It grows to fit (`saturating_record` alone would clamp at its
        // current top).
        if slot.1.record(v).is_err() {
            slot.1.saturating_record(v);
        }
    }

    /// The values recorded from second `first` to `last` (inclusive),
    /// merged.
    pub fn merged(&self, first: u64, last: u64) -> Histogram<u64> {
        let mut merged = new_histogram();
        for slot in &self.slots {
            let slot = slot.lock();
            if slot.0 != NEVER && slot.0 >= first && slot.0 <= last {
                merged
                    .add(&slot.1)
                    .expect("auto-resizing histograms always merge");
            }
        }
        merged
    }

    /// Count, percentiles, max and mean from `first` to `last`.
    pub fn summary(&self, first: u64, last: u64) -> Summary {
        let h = self.merged(first, last);
        Summary {
            count: h.len(),
            p50: h.value_at_quantile(0.5),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
            mean: if h.is_empty() { 0.0 } else { h.mean() },
        }
    }

    /// Each second from `first` to `last`, oldest first; a second with
    /// nothing recorded has count 0.
    pub fn seconds(&self, first: u64, last: u64) -> Vec<Second> {
        (first..=last)
            .map(|s| {
                let slot = self.slots[(s % SECONDS) as usize].lock();
                if slot.0 == s {
                    Second {
                        s,
                        count: slot.1.len(),
                        p99: slot.1.value_at_quantile(0.99),
                        max: slot.1.max(),
                    }
                } else {
                    Second {
                        s,
                        count: 0,
                        p99: 0,
                        max: 0,
                    }
                }
            })
            .collect()
    }
}

/// Auto-resizing: it grows to the largest value recorded.
fn new_histogram() -> Histogram<u64> {
    Histogram::new(SIGFIG).expect("2 significant digits are valid")
}

/// The first second of a window of `len` seconds ending at `last`.
pub fn first_of(last: u64, len: u64) -> u64 {
    (last + 1).saturating_sub(len.clamp(1, SECONDS))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_the_recorded_ones_to_one_percent() {
        let r = Ring::new();
        for v in 1..=1_000u64 {
            r.record(5, v);
        }
        r.record(6, 250_000);
        let s = r.summary(first_of(9, 10), 9);
        assert_eq!(s.count, 1_001);
        let near =
            |got: u64, want: u64| (got as f64 - want as f64).abs() <= want as f64 * 0.01 + 1.0;
        assert!(near(s.p50, 500), "{s:?}");
        assert!(near(s.p99, 990), "{s:?}");
        assert!(near(s.p999, 1_000), "{s:?}");
        assert!(near(s.max, 250_000), "{s:?}");
        // Only second 5 in a one-second window ending there.
        assert_eq!(r.summary(5, 5).count, 1_000);
        assert_eq!(r.summary(7, 9).count, 0);
    }

    #[test]
    fn a_second_that_comes_round_again_starts_empty() {
        let r = Ring::new();
        r.record(0, 5_000);
        // Second 60 uses slot 0 again: the old second is outside every
        // window that ends at 60, and the next record clears it.
        assert_eq!(r.summary(first_of(60, 60), 60).count, 0);
        r.record(60, 100);
        let s = r.summary(60, 60);
        assert_eq!((s.count, s.max), (1, 100));
    }

    #[test]
    fn seconds_give_a_moving_chart_with_gaps_as_zero() {
        let r = Ring::new();
        r.record(10, 300);
        r.record(10, 100);
        r.record(12, 7);
        let s = r.seconds(10, 12);
        assert_eq!(s.iter().map(|x| x.count).collect::<Vec<_>>(), [2, 0, 1]);
        assert!((300..=303).contains(&s[0].max), "{s:?}");
        assert_eq!(s[2].s, 12);
        // Windows are clamped to what is kept.
        assert_eq!(first_of(100, 0), 100);
        assert_eq!(first_of(100, 3_600), 41);
    }
}
