//! Crash points: named places in the write paths where a test can make the
//! real binary die by SIGKILL, at an exact step rather than at whatever
//! moment a `kill -9` from outside happens to land.
//!
//! `onecard serve` arms one point from the environment,
//! `ONECARD_CRASH_AT=<point>:<n>`: the n-th pass through `<point>` sends
//! SIGKILL to the process itself (no destructors, no flush, no clean-up:
//! what a kill from outside does). Unarmed, a pass costs one atomic load.
//! The seeded settlement simulation (`tests/simulation.rs`) arms a random
//! point at every start to crash between any two journal writes, between
//! the seal and the send of a batch, and between its send and the record
//! of its acknowledgement.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// Every point, and where it is.
pub const POINTS: &[(&str, &str)] = &[
    (
        "journal.before_write",
        "a group of records is packed, not yet written",
    ),
    (
        "journal.after_write",
        "a group is written and synced; its waiters are not answered yet",
    ),
    (
        "settle.after_seal",
        "sealed batches and the cursor are stored; nothing is sent yet",
    ),
    (
        "settle.after_cursor",
        "the cursor moved on its own (unsynced), nothing open",
    ),
    (
        "settle.after_send",
        "the receiver acknowledged a batch; the gateway has not recorded it",
    ),
    (
        "settle.after_ack",
        "an acknowledgement is recorded (batch forgotten, report added)",
    ),
];

struct Armed {
    point: &'static str,
    /// Passes left before the crash.
    left: AtomicU64,
}

static ARMED: OnceLock<Armed> = OnceLock::new();

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ArmError {
    #[error("ONECARD_CRASH_AT must be <point>:<n> with n at least 1, e.g. journal.after_write:3")]
    Shape,
    #[error("ONECARD_CRASH_AT names no crash point; the points are {0}")]
    Unknown(String),
    #[error("a crash point is armed already")]
    Twice,
}

/// Parses `<point>:<n>` into a known point and a count.
pub fn parse(spec: &str) -> Result<(&'static str, u64), ArmError> {
    let (name, n) = spec.rsplit_once(':').ok_or(ArmError::Shape)?;
    let n: u64 = n.parse().map_err(|_| ArmError::Shape)?;
    if n == 0 {
        return Err(ArmError::Shape);
    }
    let point = POINTS
        .iter()
        .map(|(p, _)| *p)
        .find(|p| *p == name)
        .ok_or_else(|| {
            ArmError::Unknown(
                POINTS
                    .iter()
                    .map(|(p, _)| *p)
                    .collect::<Vec<_>>()
                    .join(", "),
            )
        })?;
    Ok((point, n))
}

/// Arms one point for the life of the process.
pub fn arm(spec: &str) -> Result<(), ArmError> {
    let (point, n) = parse(spec)?;
    ARMED
        .set(Armed {
            point,
            left: AtomicU64::new(n),
        })
        .map_err(|_| ArmError::Twice)
}

/// A pass through `point`: dies here if this is the armed pass.
#[inline]
pub fn hit(point: &'static str) {
    let Some(armed) = ARMED.get() else {
        return;
    };
    if armed.point == point && armed.left.fetch_sub(1, Ordering::AcqRel) == 1 {
        eprintln!("crash point {point} reached: SIGKILL");
        let _ =
            rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::KILL);
        // SIGKILL cannot be caught; nothing after this line runs.
        loop {
            std::thread::park();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_or_say_what_is_wrong() {
        assert_eq!(
            parse("journal.after_write:3"),
            Ok(("journal.after_write", 3))
        );
        assert_eq!(parse("settle.after_send:1"), Ok(("settle.after_send", 1)));
        assert_eq!(parse("journal.after_write"), Err(ArmError::Shape));
        assert_eq!(parse("journal.after_write:0"), Err(ArmError::Shape));
        assert_eq!(parse("journal.after_write:x"), Err(ArmError::Shape));
        assert!(matches!(
            parse("journal.nowhere:1"),
            Err(ArmError::Unknown(_))
        ));
    }
}
