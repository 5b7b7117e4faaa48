//! How delivery to a sink backs off and when it stops trying for a while:
//! pure state machines, driven by the caller's clock and random numbers so
//! that a seeded simulation replays exactly.
//!
//! - [`Backoff`]: exponential with full jitter (a random delay up to
//!   `base · 2^attempt`, capped), so that many gateways retrying one
//!   receiver do not arrive in step.
//! - [`Circuit`]: after `failures_to_open` failures in a row the circuit
//!   opens and nothing is sent for `pause_ms`; then one probe goes out
//!   (half open): its success closes the circuit, its failure opens it again.
//!   An open circuit costs the hot path nothing: settlement runs apart.

use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub base_ms: u64,
    pub max_ms: u64,
}

impl Backoff {
    /// The delay before retry number `attempt` (0 for the first retry),
    /// from a uniformly random `random`.
    pub fn delay(&self, attempt: u32, random: u64) -> Duration {
        let ceiling = self
            .base_ms
            .saturating_mul(1u64.checked_shl(attempt.min(32)).unwrap_or(u64::MAX))
            .min(self.max_ms)
            .max(1);
        Duration::from_millis(random % (ceiling + 1))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CircuitState {
    Closed { failures: u32 },
    Open { until_ms: i64 },
    HalfOpen,
}

impl CircuitState {
    /// For the `circuit` metric and the operators' status: 0 closed, 1 half open, 2 open.
    pub fn level(self) -> u8 {
        match self {
            CircuitState::Closed { .. } => 0,
            CircuitState::HalfOpen => 1,
            CircuitState::Open { .. } => 2,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Circuit {
    pub failures_to_open: u32,
    pub pause_ms: i64,
    state: CircuitState,
}

impl Circuit {
    pub fn new(failures_to_open: u32, pause_ms: i64) -> Circuit {
        assert!(
            failures_to_open >= 1,
            "a circuit opens after at least one failure"
        );
        Circuit {
            failures_to_open,
            pause_ms,
            state: CircuitState::Closed { failures: 0 },
        }
    }

    pub fn state(&self) -> CircuitState {
        self.state
    }

    /// Whether a batch may be sent at `now_ms`. An open circuit whose pause
    /// is over lets one probe through (and is half open until it returns).
    pub fn allow(&mut self, now_ms: i64) -> bool {
        match self.state {
            CircuitState::Closed { .. } => true,
            CircuitState::HalfOpen => false,
            CircuitState::Open { until_ms } if now_ms >= until_ms => {
                self.state = CircuitState::HalfOpen;
                true
            }
            CircuitState::Open { .. } => false,
        }
    }

    pub fn success(&mut self) {
        self.state = CircuitState::Closed { failures: 0 };
    }

    pub fn failure(&mut self, now_ms: i64) {
        self.state = match self.state {
            CircuitState::Closed { failures } if failures + 1 < self.failures_to_open => {
                CircuitState::Closed {
                    failures: failures + 1,
                }
            }
            _ => CircuitState::Open {
                until_ms: now_ms + self.pause_ms,
            },
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_cap_with_full_jitter() {
        let b = Backoff {
            base_ms: 100,
            max_ms: 10_000,
        };
        let ms = |attempt, random| b.delay(attempt, random).as_millis() as u64;
        // The ceiling doubles: 100, 200, 400, ... up to 10 s.
        assert!(ms(0, u64::MAX - 1) <= 100);
        assert_eq!(ms(0, 100), 100);
        assert_eq!(ms(1, 200), 200);
        assert_eq!(ms(3, 800), 800);
        assert_eq!(ms(3, 801), 0, "random wraps within [0, ceiling]");
        assert_eq!(ms(20, 10_000), 10_000);
        assert_eq!(ms(200, 10_000), 10_000, "no overflow for huge attempts");
        assert_eq!(ms(5, 0), 0);
        // Spread: over many draws the delays cover the range.
        let draws: Vec<u64> = (0..1_000u64).map(|r| ms(2, r * 7_919)).collect();
        assert!(draws.iter().any(|&d| d < 50) && draws.iter().any(|&d| d > 350));
        assert!(draws.iter().all(|&d| d <= 400));
    }

    #[test]
    fn the_circuit_opens_pauses_probes_and_closes() {
        let mut c = Circuit::new(3, 1_000);
        assert!(c.allow(0));
        c.failure(0);
        c.failure(1);
        assert_eq!(c.state(), CircuitState::Closed { failures: 2 });
        c.success();
        assert_eq!(
            c.state(),
            CircuitState::Closed { failures: 0 },
            "a success resets the count"
        );
        for t in 0..3 {
            c.failure(10 + t);
        }
        assert_eq!(c.state(), CircuitState::Open { until_ms: 1_012 });
        assert!(!c.allow(500));
        assert!(c.allow(1_012), "one probe after the pause");
        assert_eq!(c.state(), CircuitState::HalfOpen);
        assert!(!c.allow(1_013), "only one probe at a time");
        c.failure(1_050);
        assert_eq!(
            c.state(),
            CircuitState::Open { until_ms: 2_050 },
            "a failed probe opens it again"
        );
        assert!(c.allow(2_050));
        c.success();
        assert!(c.allow(2_051));
        assert_eq!(c.state().level(), 0);
    }
}
