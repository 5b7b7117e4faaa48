//! Load profiles: the offered rate as a share of the peak over the run, and
//! the open-loop schedule of intended send times that follows from it.

use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// The peak rate all the time.
    Constant,
    /// 07:45 on a Monday: ramp from 10 % to 100 % over the first 40 % of the
    /// run, hold, a 150 % spike from 50 % to 60 %, hold, and back down to
    /// 10 % over the last 20 %.
    RushHour,
}

impl Profile {
    pub fn parse(s: &str) -> Option<Profile> {
        match s {
            "constant" => Some(Profile::Constant),
            "rush-hour" => Some(Profile::RushHour),
            _ => None,
        }
    }

    /// The share of the peak rate at `x`, the elapsed fraction of the run.
    pub fn share(self, x: f64) -> f64 {
        let x = x.clamp(0.0, 1.0);
        match self {
            Profile::Constant => 1.0,
            Profile::RushHour => {
                if x < 0.4 {
                    0.1 + 0.9 * x / 0.4
                } else if (0.5..0.6).contains(&x) {
                    1.5
                } else if x < 0.8 {
                    1.0
                } else {
                    1.0 - 0.9 * (x - 0.8) / 0.2
                }
            }
        }
    }
}

/// Intended send times (offsets from the start) for a run of `duration` at
/// `peak_per_s` shaped by `profile`, at most `requests_max` of them. Each
/// request is due `1 / rate(t)` after the previous one, whatever the answers
/// do: that is what makes the load open-loop.
pub fn schedule(
    profile: Profile,
    peak_per_s: f64,
    duration: Duration,
    requests_max: u64,
) -> Vec<Duration> {
    assert!(peak_per_s > 0.0, "the rate must be positive");
    let total = duration.as_secs_f64();
    let mut out = Vec::new();
    let mut t = 0.0;
    while t < total && (out.len() as u64) < requests_max {
        out.push(Duration::from_secs_f64(t));
        let rate = peak_per_s * profile.share(t / total);
        t += 1.0 / rate;
    }
    out
}

/// Coordinated-omission correction (the wrk2 method): latency counts from
/// when the request was *due*, not from when a busy connection got round to
/// sending it. Returns (corrected, uncorrected).
pub fn latencies(due: Duration, sent: Duration, answered: Duration) -> (Duration, Duration) {
    (answered.saturating_sub(due), answered.saturating_sub(sent))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_schedule_is_evenly_spaced_and_capped() {
        let s = schedule(Profile::Constant, 100.0, Duration::from_secs(2), 1_000);
        assert_eq!(s.len(), 200);
        assert_eq!(s[1], Duration::from_millis(10));
        assert!((s[199].as_secs_f64() - 1.99).abs() < 1e-9);
        assert_eq!(
            schedule(Profile::Constant, 100.0, Duration::from_secs(2), 50).len(),
            50
        );
    }

    #[test]
    fn rush_hour_shape() {
        let p = Profile::RushHour;
        assert!((p.share(0.0) - 0.1).abs() < 1e-9);
        assert!((p.share(0.2) - 0.55).abs() < 1e-9);
        assert_eq!(p.share(0.45), 1.0);
        assert_eq!(p.share(0.55), 1.5);
        assert!((p.share(1.0) - 0.1).abs() < 1e-9);
        // Offered load: integral of the share is 0.22 + 0.1 + 0.15 + 0.2 + 0.11 = 0.78 of peak.
        let n = schedule(p, 1_000.0, Duration::from_secs(10), u64::MAX).len() as f64;
        assert!((n / 10_000.0 - 0.78).abs() < 0.01, "{n}");
    }

    #[test]
    fn correction_counts_from_the_due_time() {
        let ms = Duration::from_millis;
        // Due at 10 ms, the connection was busy until 50 ms, answered at 52 ms.
        assert_eq!(latencies(ms(10), ms(50), ms(52)), (ms(42), ms(2)));
        assert_eq!(latencies(ms(10), ms(10), ms(12)), (ms(2), ms(2)));
    }
}
