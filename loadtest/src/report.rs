//! The run's summary: offered against achieved rate, latency percentiles
//! corrected and uncorrected, and counts by HTTP status and by reason.

use std::collections::BTreeMap;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Latency histograms hold microseconds from 1 µs to 60 s, 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds")
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Percentiles {
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

impl Percentiles {
    pub fn of(h: &Histogram<u64>) -> Percentiles {
        let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        Percentiles {
            p50_ms: ms(0.5),
            p90_ms: ms(0.9),
            p99_ms: ms(0.99),
            p999_ms: ms(0.999),
            max_ms: h.max() as f64 / 1000.0,
        }
    }
}

/// One second of a stage, as answers arrived.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Second {
    pub decided: u64,
    pub refused: u64,
    /// Corrected p99 of the decided answers (0 when none).
    pub decided_p99_ms: f64,
}

/// The first second from which every second to the end refuses no larger
/// share of its answers than `refused_share_max` (what the gateway refused
/// at the same rate before the flood) and keeps its decided p99 within
/// `bound_ms`: how long a gateway took to be itself again after a flood.
/// `None`: not by the end.
pub fn recovered_at(seconds: &[Second], bound_ms: f64, refused_share_max: f64) -> Option<usize> {
    let fine = |s: &Second| {
        let answered = (s.decided + s.refused).max(1) as f64;
        s.refused as f64 / answered <= refused_share_max && s.decided_p99_ms <= bound_ms
    };
    let bad_tail = seconds.iter().rposition(|s| !fine(s));
    match bad_tail {
        None => Some(0),
        Some(i) if i + 1 < seconds.len() => Some(i + 1),
        Some(_) => None,
    }
}

/// The least-squares slope of `ys` against `xs` (`None` with fewer than
/// two points or no spread in `xs`): a soak's drift, per unit of `xs`.
pub fn slope(xs: &[f64], ys: &[f64]) -> Option<f64> {
    let n = xs.len().min(ys.len());
    if n < 2 {
        return None;
    }
    let (mx, my) = (
        xs[..n].iter().sum::<f64>() / n as f64,
        ys[..n].iter().sum::<f64>() / n as f64,
    );
    let sxx: f64 = xs[..n].iter().map(|x| (x - mx) * (x - mx)).sum();
    if sxx == 0.0 {
        return None;
    }
    let sxy: f64 = xs[..n]
        .iter()
        .zip(&ys[..n])
        .map(|(x, y)| (x - mx) * (y - my))
        .sum();
    Some(sxy / sxx)
}

/// What one terminal (or the whole run) counted.
#[derive(Debug, Clone, Default)]
pub struct Tally {
    pub sent: u64,
    pub by_status: BTreeMap<String, u64>,
    pub by_reason: BTreeMap<String, u64>,
    /// Requests that got no answer (connection errors), by kind.
    pub errors: BTreeMap<String, u64>,
    /// Requests not sent: due after the stage's grace period, or after the
    /// terminal gave up reconnecting.
    pub dropped: u64,
    /// Connections made again after one broke.
    pub reconnects: u64,
    /// Taps a terminal decided offline: due while it waited out a
    /// refusal's `Retry-After`.
    pub offline: u64,
}

impl Tally {
    pub fn merge(&mut self, other: &Tally) {
        self.sent += other.sent;
        self.dropped += other.dropped;
        self.reconnects += other.reconnects;
        self.offline += other.offline;
        for (into, from) in [
            (&mut self.by_status, &other.by_status),
            (&mut self.by_reason, &other.by_reason),
            (&mut self.errors, &other.errors),
        ] {
            for (k, v) in from {
                *into.entry(k.clone()).or_default() += v;
            }
        }
    }

    pub fn answered(&self) -> u64 {
        self.by_status.values().sum()
    }

    pub fn failed(&self) -> u64 {
        self.errors.values().sum()
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub profile: String,
    pub terminals: u32,
    pub seconds: f64,
    pub scheduled: u64,
    pub sent: u64,
    pub offered_per_s: f64,
    pub achieved_per_s: f64,
    /// Answers that decided (200), and refusals for load (429, 503), per
    /// second of the run.
    pub decided_per_s: f64,
    pub refused_per_s: f64,
    /// Corrected latency of the decided answers, and of the refusals.
    pub decided: Percentiles,
    pub refusals: Percentiles,
    pub corrected: Percentiles,
    pub uncorrected: Percentiles,
    pub by_status: BTreeMap<String, u64>,
    pub by_reason: BTreeMap<String, u64>,
    pub errors: BTreeMap<String, u64>,
    pub dropped: u64,
    pub reconnects: u64,
    pub offline: u64,
    /// How late the generator's own 5 ms timer fired: its CPU starvation,
    /// which every corrected latency of the stage includes.
    pub generator_lag: Percentiles,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slopes_of_flat_rising_and_degenerate_series() {
        let xs = [0.0, 1.0, 2.0, 3.0];
        assert_eq!(slope(&xs, &[5.0, 5.0, 5.0, 5.0]), Some(0.0));
        assert_eq!(slope(&xs, &[1.0, 3.0, 5.0, 7.0]), Some(2.0));
        assert_eq!(slope(&[1.0], &[1.0]), None);
        assert_eq!(slope(&[2.0, 2.0], &[1.0, 3.0]), None);
    }

    #[test]
    fn recovery_is_the_first_second_of_a_clean_tail() {
        let s = |refused, p99| Second {
            decided: 100,
            refused,
            decided_p99_ms: p99,
        };
        let cases: &[(&[Second], Option<usize>)] = &[
            (&[], Some(0)),
            (&[s(0, 10.0), s(0, 10.0)], Some(0)),
            (&[s(5, 10.0), s(0, 90.0), s(0, 10.0), s(0, 10.0)], Some(2)),
            // A relapse later counts: recovered only after it.
            (&[s(0, 10.0), s(3, 10.0), s(0, 10.0)], Some(2)),
            (&[s(0, 10.0), s(0, 80.0)], None),
        ];
        for (seconds, want) in cases {
            assert_eq!(recovered_at(seconds, 50.0, 0.0), *want, "{seconds:?}");
        }
        // Refusing as much as before the flood (2 of 102 answers) is
        // normal; more is not.
        let tail = [s(9, 10.0), s(2, 10.0), s(1, 10.0)];
        assert_eq!(recovered_at(&tail, 50.0, 0.02), Some(1));
        assert_eq!(recovered_at(&tail, 50.0, 0.0), None);
    }

    #[test]
    fn merged_histograms_and_tallies_add_up() {
        let (mut a, mut b) = (histogram(), histogram());
        for v in 1..=500u64 {
            a.record(v * 1000).unwrap();
        }
        for v in 501..=1000u64 {
            b.record(v * 1000).unwrap();
        }
        a.add(&b).unwrap();
        let p = Percentiles::of(&a);
        assert!((p.p50_ms - 500.0).abs() < 1.0, "{p:?}");
        assert!((p.p99_ms - 990.0).abs() < 1.0, "{p:?}");
        assert!((p.max_ms - 1000.0).abs() < 1.0, "{p:?}");

        let mut t = Tally {
            sent: 3,
            ..Tally::default()
        };
        t.by_status.insert("200".into(), 2);
        t.errors.insert("connect".into(), 1);
        let mut u = Tally {
            sent: 2,
            dropped: 1,
            ..Tally::default()
        };
        u.by_status.insert("200".into(), 1);
        u.by_status.insert("429".into(), 1);
        t.merge(&u);
        assert_eq!((t.sent, t.answered(), t.failed(), t.dropped), (5, 4, 1, 1));
        assert_eq!(t.by_status["200"], 3);
    }
}

/// Cumulative bucket counts of `onecard_authorize_latency_seconds` in a
/// Prometheus text page, summed over scenarios: (upper bound s, count).
pub fn server_buckets(metrics_text: &str) -> Vec<(f64, u64)> {
    let mut by_le: BTreeMap<u64, (f64, u64)> = BTreeMap::new();
    for line in metrics_text.lines() {
        let Some(rest) = line.strip_prefix("onecard_authorize_latency_seconds_bucket{") else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once("} ") else {
            continue;
        };
        let Some(le) = labels
            .split(',')
            .find_map(|l| l.strip_prefix("le=\""))
            .and_then(|l| l.strip_suffix('"'))
        else {
            continue;
        };
        let le = if le == "+Inf" {
            f64::INFINITY
        } else {
            le.parse().unwrap_or(f64::NAN)
        };
        let Ok(count) = value.trim().parse::<f64>() else {
            continue;
        };
        if le.is_nan() {
            continue;
        }
        let e = by_le.entry(le.to_bits()).or_insert((le, 0));
        e.1 += count as u64;
    }
    let mut v: Vec<(f64, u64)> = by_le.into_values().collect();
    v.sort_by(|a, b| a.0.total_cmp(&b.0));
    v
}

/// The gateway's own latency over a window: the difference of two scrapes,
/// as upper bounds in ms of the buckets holding p50, p90, p99 and p99.9.
pub fn server_window(before: &[(f64, u64)], after: &[(f64, u64)]) -> Option<BTreeMap<String, f64>> {
    let diff: Vec<(f64, u64)> = after
        .iter()
        .map(|(le, n)| {
            (
                *le,
                n - before
                    .iter()
                    .find(|(l, _)| l == le)
                    .map_or(0, |(_, m)| *m)
                    .min(*n),
            )
        })
        .collect();
    let total = diff.last()?.1;
    if total == 0 {
        return None;
    }
    let mut out = BTreeMap::new();
    for (name, q) in [
        ("p50_ms_at_most", 0.5),
        ("p90_ms_at_most", 0.9),
        ("p99_ms_at_most", 0.99),
        ("p999_ms_at_most", 0.999),
    ] {
        let want = (q * total as f64).ceil() as u64;
        let le = diff
            .iter()
            .find(|(_, n)| *n >= want)
            .map_or(f64::INFINITY, |(le, _)| *le);
        out.insert(name.to_owned(), le * 1000.0);
    }
    out.insert("count".to_owned(), total as f64);
    Some(out)
}

#[cfg(test)]
mod server_tests {
    use super::*;

    #[test]
    fn server_histogram_window() {
        let page = |a: u64, b: u64| {
            format!(
                "# TYPE x histogram\nonecard_authorize_latency_seconds_bucket{{scenario=\"transit\",le=\"0.001\"}} {a}\n\
                 onecard_authorize_latency_seconds_bucket{{scenario=\"transit\",le=\"0.01\"}} {b}\n\
                 onecard_authorize_latency_seconds_bucket{{scenario=\"transit\",le=\"+Inf\"}} {b}\n\
                 onecard_authorize_latency_seconds_bucket{{scenario=\"medical\",le=\"0.001\"}} 1\n\
                 onecard_authorize_latency_seconds_bucket{{scenario=\"medical\",le=\"0.01\"}} 1\n\
                 onecard_authorize_latency_seconds_bucket{{scenario=\"medical\",le=\"+Inf\"}} 1\n"
            )
        };
        let before = server_buckets(&page(10, 10));
        assert_eq!(before, vec![(0.001, 11), (0.01, 11), (f64::INFINITY, 11)]);
        // In the window: 90 answers under 1 ms, 10 between 1 and 10 ms.
        let after = server_buckets(&page(100, 110));
        let w = server_window(&before, &after).unwrap();
        assert_eq!(w["count"], 100.0);
        assert_eq!(w["p50_ms_at_most"], 1.0);
        assert_eq!(w["p90_ms_at_most"], 1.0);
        assert_eq!(w["p99_ms_at_most"], 10.0);
        assert!(server_window(&after, &after).is_none());
    }
}
