//! The `step` profile: constant-rate stages at rising rates until the
//! gateway no longer keeps up (achieved below offered, or the corrected p99
//! past a bound). The knee is the last rate it kept up with; "half the knee"
//! is where the latency goals are read.

/// A stage keeps up when at least this share of its scheduled requests was
/// answered (and its corrected p99 stays within the bound: a gateway that
/// falls behind still answers everything within the grace period, but late).
pub const ANSWERED_SHARE_MIN: f64 = 0.97;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Plan {
    pub start_per_s: f64,
    pub by_per_s: f64,
    pub max_per_s: f64,
}

impl Plan {
    /// The stage rates: start, start + by, … up to max.
    pub fn rates(&self) -> Vec<f64> {
        assert!(
            self.start_per_s > 0.0 && self.by_per_s > 0.0,
            "rates must be positive"
        );
        let mut out = Vec::new();
        let mut r = self.start_per_s;
        while r <= self.max_per_s * (1.0 + 1e-9) && out.len() < 1_000 {
            out.push(r);
            r += self.by_per_s;
        }
        out
    }
}

#[derive(Debug, Clone, serde::Serialize, PartialEq)]
pub struct StageResult {
    pub scheduled: u64,
    pub answered: u64,
    pub offered_per_s: f64,
    pub achieved_per_s: f64,
    /// Corrected (from the due time), as a terminal sees it.
    pub p99_ms: f64,
    /// The bucket bound holding the gateway's own p99 over the stage
    /// (its Prometheus histogram).
    pub server_p99_ms_at_most: Option<f64>,
    /// The gateway's own p99 of `POST /v1/authorize`, from request received
    /// to answer ready, from its HdrHistogram window of the stage's last
    /// seconds (`GET /admin/v1/stats`): a measured value, not a bound.
    pub server_p99_ms: Option<f64>,
    /// Requests with no answer or not sent.
    pub failed: u64,
}

impl StageResult {
    pub fn keeps_up(&self, p99_bound_ms: f64) -> bool {
        self.answered as f64 >= ANSWERED_SHARE_MIN * self.scheduled as f64
            && self.p99_ms <= p99_bound_ms
            && self.failed == 0
    }
}

/// The offered rate of the last stage in the leading run of stages that
/// kept up; `None` if even the first did not.
pub fn knee(results: &[StageResult], p99_bound_ms: f64) -> Option<f64> {
    results
        .iter()
        .take_while(|r| r.keeps_up(p99_bound_ms))
        .last()
        .map(|r| r.offered_per_s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stage(offered: f64, achieved: f64, p99: f64) -> StageResult {
        StageResult {
            scheduled: offered as u64 * 10,
            answered: achieved as u64 * 10,
            offered_per_s: offered,
            achieved_per_s: achieved,
            p99_ms: p99,
            server_p99_ms_at_most: None,
            server_p99_ms: None,
            failed: 0,
        }
    }

    #[test]
    fn rates_rise_by_the_step_up_to_the_maximum() {
        let p = Plan {
            start_per_s: 1_000.0,
            by_per_s: 1_500.0,
            max_per_s: 5_500.0,
        };
        assert_eq!(p.rates(), vec![1_000.0, 2_500.0, 4_000.0, 5_500.0]);
    }

    #[test]
    fn the_knee_is_the_last_stage_that_kept_up() {
        let r = [
            stage(1_000.0, 1_000.0, 2.0),
            stage(2_000.0, 1_990.0, 5.0),
            stage(3_000.0, 2_500.0, 8.0), // a sixth of the requests unanswered
            stage(4_000.0, 4_000.0, 3.0), // does not count: after a failure
        ];
        assert_eq!(knee(&r, 50.0), Some(2_000.0));
        // A p99 past the bound is a failure too.
        assert_eq!(knee(&r, 4.0), Some(1_000.0));
        assert_eq!(knee(&r, 1.0), None);
        let mut errors = stage(1_000.0, 1_000.0, 1.0);
        errors.failed = 3;
        assert_eq!(knee(&[errors], 50.0), None);
    }
}
