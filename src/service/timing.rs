//! Where a terminal request's time went, phase by phase: decode (admission,
//! body, parsing), idempotency, credential, decide (facts, the card's lock,
//! the rules, queuing the commit) and commit (waiting until durable). The
//! answer carries them in a `Server-Timing` header, so a slow tap can be
//! explained from the terminal's side, and a request slower than
//! `log.slow_request_ms` logs them.
//!
//! The pipeline marks the end of each phase on a clock kept in a task-local
//! slot, so the phases' code needs no extra parameter; outside a timed
//! request (tests, benches, admin routes) a mark does nothing. A request
//! decided again after a lost race adds its second run to the same phases.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Decode = 0,
    Idempotency = 1,
    Credential = 2,
    Decide = 3,
    Commit = 4,
}

/// The phases' names, in order, as the header and the log write them.
pub const PHASES: [&str; 5] = ["decode", "idempotency", "credential", "decide", "commit"];

/// One request's phases: nanoseconds in each, and when the last ended.
pub struct PhaseClock {
    started: Instant,
    /// Nanoseconds since `started` at which the last phase ended.
    last: AtomicU64,
    spent: [AtomicU64; 5],
}

tokio::task_local! {
    static CLOCK: Arc<PhaseClock>;
}

impl PhaseClock {
    pub fn new(started: Instant) -> Arc<PhaseClock> {
        Arc::new(PhaseClock {
            started,
            last: AtomicU64::new(0),
            spent: Default::default(),
        })
    }

    fn mark(&self, phase: Phase) {
        let now = self.started.elapsed().as_nanos() as u64;
        let last = self.last.swap(now, Ordering::Relaxed);
        self.spent[phase as usize].fetch_add(now.saturating_sub(last), Ordering::Relaxed);
    }

    /// Time spent in each phase, in [`PHASES`] order.
    pub fn spent(&self) -> [Duration; 5] {
        std::array::from_fn(|i| Duration::from_nanos(self.spent[i].load(Ordering::Relaxed)))
    }

    pub fn total(&self) -> Duration {
        self.started.elapsed()
    }

    /// The `Server-Timing` value: each phase reached and the total, in
    /// milliseconds to the microsecond, e.g.
    /// `decode;dur=0.021, idempotency;dur=0.004, ..., total;dur=0.960`.
    pub fn header(&self) -> String {
        let mut out = String::with_capacity(160);
        let mut put = |name: &str, d: Duration| {
            if !out.is_empty() {
                out.push_str(", ");
            }
            out.push_str(name);
            out.push_str(";dur=");
            push_ms(&mut out, d.as_micros() as u64);
        };
        for (name, d) in PHASES.iter().zip(self.spent()) {
            if !d.is_zero() {
                put(name, d);
            }
        }
        put("total", self.total());
        out
    }
}

/// Writes `us` microseconds as milliseconds with three decimals (`0.931`),
/// without the formatting machinery: this runs for every terminal answer.
fn push_ms(out: &mut String, us: u64) {
    let mut digits = [0u8; 24];
    let mut n = us;
    let mut i = digits.len();
    // At least "0.000": four digits, the point after the first.
    let mut written = 0;
    while n > 0 || written < 4 {
        if written == 3 {
            i -= 1;
            digits[i] = b'.';
        }
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        written += 1;
    }
    out.push_str(std::str::from_utf8(&digits[i..]).expect("ASCII digits"));
}

/// Runs `f` with `clock` as the request's phase clock.
pub async fn timed<F: Future>(clock: Arc<PhaseClock>, f: F) -> F::Output {
    CLOCK.scope(clock, f).await
}

/// Marks the end of `phase` of the request being served, if it is timed.
#[inline]
pub fn mark(phase: Phase) {
    let _ = CLOCK.try_with(|c| c.mark(phase));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn phases_add_up_and_the_header_names_each_one_reached() {
        let clock = PhaseClock::new(Instant::now());
        timed(clock.clone(), async {
            mark(Phase::Decode);
            tokio::time::sleep(Duration::from_millis(3)).await;
            mark(Phase::Idempotency);
            mark(Phase::Decide);
            // A second run after a lost race adds to the same phase.
            tokio::time::sleep(Duration::from_millis(2)).await;
            mark(Phase::Decide);
        })
        .await;
        let spent = clock.spent();
        assert!(spent[1] >= Duration::from_millis(3), "{spent:?}");
        assert!(spent[3] >= Duration::from_millis(2), "{spent:?}");
        assert_eq!(spent[2], Duration::ZERO);
        assert!(spent.iter().sum::<Duration>() <= clock.total());
        let h = clock.header();
        assert!(h.starts_with("decode;dur=0."), "{h}");
        assert!(
            h.contains(", idempotency;dur=") && h.contains(", decide;dur="),
            "{h}"
        );
        assert!(
            !h.contains("credential"),
            "a phase not reached is left out: {h}"
        );
        assert!(h.contains(", total;dur="), "{h}");
        let ms = |us| {
            let mut s = String::new();
            push_ms(&mut s, us);
            s
        };
        assert_eq!(
            [ms(0), ms(7), ms(931), ms(1_000), ms(12_345_678)],
            ["0.000", "0.007", "0.931", "1.000", "12345.678"]
        );
        // Outside a timed request a mark does nothing (and does not panic).
        mark(Phase::Commit);
    }
}
