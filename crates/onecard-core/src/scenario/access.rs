//! Doors and gates: community doors, campus entry, industrial parks, bus
//! stations and docks.
//!
//! A *controlled* site (its name starts with one of
//! `access.controlled_site_prefixes`) opens only for cards on its
//! allow-list (`NOT_ALLOWED` otherwise), and only within the entry's
//! time-of-day windows (`OUTSIDE_HOURS`), local time. Other sites (a bus
//! station's public gate) open for any active card. The allow-lists are
//! kept by `state::allow` and managed through the admin API; this module
//! only decides, from the entry the gateway looked up. Pure.

use serde::Deserialize;

use crate::model::Reason;

/// `[access]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AccessConfig {
    /// Sites whose name starts with one of these are controlled by an
    /// allow-list; empty: none is.
    pub controlled_site_prefixes: Vec<String>,
    /// Allow-list entries over all sites, at most (they are kept in
    /// memory).
    pub allow_entries_max: usize,
}

pub const ALLOW_ENTRIES_MAX_DEFAULT: usize = 5_000_000;

impl Default for AccessConfig {
    fn default() -> Self {
        AccessConfig {
            controlled_site_prefixes: Vec::new(),
            allow_entries_max: ALLOW_ENTRIES_MAX_DEFAULT,
        }
    }
}

impl AccessConfig {
    pub fn validate(&self) -> Result<(), crate::Invalid> {
        if self.controlled_site_prefixes.iter().any(String::is_empty) {
            return Err(
                "access.controlled_site_prefixes: an empty prefix would control every site; list the prefixes, or none"
                    .into(),
            );
        }
        Ok(())
    }

    pub fn controls(&self, site: &str) -> bool {
        self.controlled_site_prefixes
            .iter()
            .any(|p| site.starts_with(p.as_str()))
    }
}

/// Time-of-day windows per allow-list entry, at most.
pub const WINDOWS_MAX: usize = 4;

/// When an entry opens its door: up to four windows of local time, each
/// `[from, to)` in minutes of the day; one that ends before it starts runs
/// past midnight. No window: all day.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Windows {
    n: u8,
    w: [(u16, u16); WINDOWS_MAX],
}

impl Windows {
    pub const ALL_DAY: Windows = Windows {
        n: 0,
        w: [(0, 0); WINDOWS_MAX],
    };

    /// From `["07:00-22:00", ...]`; the error names the bad window by its
    /// position only.
    pub fn parse<S: AsRef<str>>(list: &[S]) -> Result<Windows, crate::Invalid> {
        if list.len() > WINDOWS_MAX {
            return Err(format!("at most {WINDOWS_MAX} windows per entry").into());
        }
        let mut out = Windows::ALL_DAY;
        for (i, s) in list.iter().enumerate() {
            let bad = || {
                format!(
                    "window {} must be `HH:MM-HH:MM` (24-hour, local time)",
                    i + 1
                )
            };
            let (a, b) = s.as_ref().split_once('-').ok_or_else(bad)?;
            let from = minute(a).ok_or_else(bad)?;
            let to = minute(b).ok_or_else(bad)?;
            if from == to {
                return Err(format!("window {} is empty (it starts where it ends)", i + 1).into());
            }
            out.w[i] = (from, to);
            out.n += 1;
        }
        Ok(out)
    }

    pub fn is_all_day(&self) -> bool {
        self.n == 0
    }

    /// Whether `minute` (of the local day) is inside a window.
    pub fn open_at(&self, minute: u16) -> bool {
        self.n == 0
            || self.w[..self.n as usize].iter().any(|&(from, to)| {
                if from < to {
                    (from..to).contains(&minute)
                } else {
                    minute >= from || minute < to
                }
            })
    }

    /// Back to `["HH:MM-HH:MM", ...]`.
    pub fn to_strings(&self) -> Vec<String> {
        let hm = |m: u16| format!("{:02}:{:02}", m / 60, m % 60);
        self.w[..self.n as usize]
            .iter()
            .map(|&(a, b)| format!("{}-{}", hm(a), hm(b)))
            .collect()
    }
}

/// `HH:MM` (00:00 to 24:00) as minutes of the day.
fn minute(s: &str) -> Option<u16> {
    let (h, m) = s.split_once(':')?;
    if h.len() != 2 || m.len() != 2 {
        return None;
    }
    let h: u16 = h.parse().ok()?;
    let m: u16 = m.parse().ok()?;
    match (h, m) {
        (24, 0) => Some(1440),
        (0..=23, 0..=59) => Some(h * 60 + m),
        _ => None,
    }
}

/// What the gateway found for the card at the site.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allow {
    /// The site is not controlled: any active card.
    Open,
    /// Controlled, and the card is not on its list.
    NotListed,
    /// Controlled, and the card's entry has these windows.
    Listed(Windows),
}

#[inline]
pub fn admit(allow: Allow, minute_of_day: u16) -> Result<(), Reason> {
    match allow {
        Allow::Open => Ok(()),
        Allow::NotListed => Err(Reason::NotAllowed),
        Allow::Listed(w) if w.open_at(minute_of_day) => Ok(()),
        Allow::Listed(_) => Err(Reason::OutsideHours),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows() {
        let day = Windows::parse(&["07:00-22:00"]).unwrap();
        let night = Windows::parse(&["22:00-06:00"]).unwrap();
        let split = Windows::parse(&["06:30-09:00", "17:00-24:00"]).unwrap();
        let cases = [
            (day, 7 * 60, true),
            (day, 7 * 60 - 1, false),
            (day, 22 * 60 - 1, true),
            (day, 22 * 60, false),
            (night, 23 * 60, true),
            (night, 0, true),
            (night, 6 * 60 - 1, true),
            (night, 6 * 60, false),
            (night, 12 * 60, false),
            (split, 8 * 60, true),
            (split, 12 * 60, false),
            (split, 23 * 60 + 59, true),
            (Windows::ALL_DAY, 3 * 60, true),
        ];
        for (w, m, want) in cases {
            assert_eq!(w.open_at(m), want, "{:?} at {m}", w.to_strings());
        }
        assert_eq!(split.to_strings(), ["06:30-09:00", "17:00-24:00"]);
    }

    #[test]
    fn bad_windows_are_named() {
        let cases: &[(&[&str], &str)] = &[
            (&["7:00-22:00"], "window 1"),
            (&["07:00-25:00"], "window 1"),
            (&["07:00-07:60"], "window 1"),
            (&["07:00"], "window 1"),
            (&["07:00-22:00", "10:00-10:00"], "window 2 is empty"),
            (
                &[
                    "01:00-02:00",
                    "03:00-04:00",
                    "05:00-06:00",
                    "07:00-08:00",
                    "09:00-10:00",
                ],
                "at most 4",
            ),
        ];
        for (list, want) in cases {
            let e = Windows::parse(list).unwrap_err();
            assert!(e.0.contains(want), "{list:?}: {e}");
        }
    }

    #[test]
    fn every_reason() {
        let day = Windows::parse(&["07:00-22:00"]).unwrap();
        let cases = [
            (Allow::Open, 3 * 60, Ok(())),
            (Allow::NotListed, 12 * 60, Err(Reason::NotAllowed)),
            (Allow::Listed(day), 12 * 60, Ok(())),
            (Allow::Listed(day), 23 * 60, Err(Reason::OutsideHours)),
            (Allow::Listed(Windows::ALL_DAY), 23 * 60, Ok(())),
        ];
        for (allow, m, want) in cases {
            assert_eq!(admit(allow, m), want, "{allow:?} at {m}");
        }
        let c = AccessConfig {
            controlled_site_prefixes: vec!["community-".into(), "campus-".into()],
            ..AccessConfig::default()
        };
        assert!(c.controls("community-12-east"));
        assert!(!c.controls("bus-station-3"));
        assert!(AccessConfig {
            controlled_site_prefixes: vec![String::new()],
            ..AccessConfig::default()
        }
        .validate()
        .is_err());
    }
}
