//! Time as the rules see it: handed in, never read. [`Clock`] is how the
//! gateway reads it (once per request) so that tests can move it; the
//! rules themselves only ever receive a number.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Where the gateway reads the time. Production uses [`SystemClock`];
/// tests use [`ManualClock`] (a time that moves only when told) or
/// [`ShiftedClock`] (the wall clock plus an offset they can advance).
pub trait Clock: Send + Sync + 'static {
    /// Unix time in milliseconds.
    fn now_ms(&self) -> i64;
}

/// The wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        wall_ms()
    }
}

/// The wall clock's Unix time in milliseconds (0 before 1970).
pub fn wall_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A time that moves only when told: for table tests and simulations.
#[derive(Debug, Default)]
pub struct ManualClock(AtomicI64);

impl ManualClock {
    pub fn at(ms: i64) -> ManualClock {
        ManualClock(AtomicI64::new(ms))
    }
    pub fn set(&self, ms: i64) {
        self.0.store(ms, Ordering::Release);
    }
    pub fn advance(&self, ms: i64) {
        self.0.fetch_add(ms, Ordering::AcqRel);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> i64 {
        self.0.load(Ordering::Acquire)
    }
}

/// The wall clock moved forward by an offset that only grows: time passes
/// as usual (batches age, timers fire), and a test can skip an expiry or a
/// retention without waiting for it.
#[derive(Debug, Default)]
pub struct ShiftedClock(AtomicI64);

impl ShiftedClock {
    pub fn new() -> ShiftedClock {
        ShiftedClock::default()
    }
    /// Moves the time `ms` milliseconds ahead of where it would be.
    pub fn advance(&self, ms: i64) {
        assert!(ms >= 0, "time does not go back");
        self.0.fetch_add(ms, Ordering::AcqRel);
    }
}

impl Clock for ShiftedClock {
    fn now_ms(&self) -> i64 {
        wall_ms() + self.0.load(Ordering::Acquire)
    }
}

/// RFC 3339 UTC with milliseconds, for answers and logs.
pub fn rfc3339_ms(ms: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// RFC 3339 to Unix milliseconds; `None` for anything else.
pub fn parse_rfc3339_ms(s: &str) -> Option<i64> {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()?;
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).ok()
}

/// The local calendar day that `unix_s` falls in, `offset_minutes` east
/// of UTC, as days since the epoch: the one day of every daily figure
/// (spend limits, venue quotas, settlement's and the rollout's reports).
#[inline]
pub fn local_day(unix_s: i64, offset_minutes: i32) -> i32 {
    let local = unix_s + i64::from(offset_minutes) * 60;
    local.div_euclid(86_400) as i32
}

/// Julian day number of 1970-01-01.
const EPOCH_JULIAN: i32 = 2_440_588;

/// A day such as `2026-12-07` as days since the epoch; `None` for
/// anything else.
pub fn parse_day(s: &str) -> Option<i32> {
    let format = time::macros::format_description!("[year]-[month]-[day]");
    let date = time::Date::parse(s, &format).ok()?;
    Some(date.to_julian_day() - EPOCH_JULIAN)
}

/// The calendar date of `day` (days since the epoch); `None` out of range.
pub fn date_of_day(day: i32) -> Option<time::Date> {
    time::Date::from_julian_day(EPOCH_JULIAN.saturating_add(day)).ok()
}

/// Days since the epoch as `2026-12-07`.
pub fn day_name(day: i32) -> String {
    match date_of_day(day) {
        Some(d) => format!("{:04}-{:02}-{:02}", d.year(), u8::from(d.month()), d.day()),
        None => day.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clocks() {
        let m = ManualClock::at(1_000);
        m.advance(500);
        assert_eq!(m.now_ms(), 1_500);
        let s = ShiftedClock::new();
        let before = wall_ms();
        s.advance(60_000);
        assert!(s.now_ms() >= before + 60_000);
        assert_eq!(rfc3339_ms(1_795_851_912_000), "2026-11-28T07:45:12Z");
        assert_eq!(rfc3339_ms(1_795_851_912_500), "2026-11-28T07:45:12.5Z");
        assert_eq!(
            parse_rfc3339_ms("2026-11-28T15:45:12.5+08:00"),
            Some(1_795_851_912_500)
        );
        assert_eq!(parse_rfc3339_ms("yesterday"), None);
    }

    #[test]
    fn days_turn_at_local_midnight_and_read_both_ways() {
        // 2026-11-28T07:45:12Z is 15:45 in Beijing, 02:45 in New York.
        let s = 1_795_851_912;
        assert_eq!(day_name(local_day(s, 480)), "2026-11-28");
        assert_eq!(day_name(local_day(s, -300)), "2026-11-28");
        assert_eq!(day_name(local_day(s, -480)), "2026-11-27");
        assert_eq!(parse_day("2026-11-28"), Some(local_day(s, 0)));
        assert_eq!(parse_day("1970-01-01"), Some(0));
        assert_eq!(day_name(-1), "1969-12-31");
        for bad in [
            "2026-13-01",
            "2026-11-31",
            "28.11.2026",
            "",
            "2026-11-28T00:00:00Z",
        ] {
            assert_eq!(parse_day(bad), None, "{bad}");
        }
    }
}
