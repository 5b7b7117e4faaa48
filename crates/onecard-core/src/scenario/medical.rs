//! Medical payments at designated hospitals and pharmacies: a counter
//! holds an amount (`POST /v1/hold`), captures part or all of it
//! (`POST /v1/capture`) or voids it (`POST /v1/void`); an open hold
//! expires `hold_ttl_s` after it was made.
//!
//! The bill is split between medical insurance and self-pay by the rules
//! of its category (`[medical.categories.<name>]`): the part of the bill
//! still under the card's annual deductible is self-paid, the rest is
//! split by the category's coverage percentage, self-pay rounded up so
//! that insurance never pays more than its share.
//!
//! Pure: the gateway hands in the card, the hold as stored and the time,
//! and stores what comes back. Never here: I/O, the clock, locks.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::model::{Card, Reason};

/// `medical.hold_ttl_s` by default: half an hour at the counter.
pub const HOLD_TTL_S_DEFAULT: u64 = 1_800;
/// `medical.hold_ttl_s` at most: a week.
pub const HOLD_TTL_S_MAX: u64 = 7 * 86_400;
/// `medical.sweep_interval_s` by default.
pub const SWEEP_INTERVAL_S_DEFAULT: u64 = 60;
/// Categories at most.
pub const CATEGORIES_MAX: usize = 256;

/// `[medical.categories.<name>]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CategoryConfig {
    /// The insurance share, in percent, of the bill above the deductible.
    pub coverage_pct: u32,
    /// Whether the card's annual deductible applies to this category.
    #[serde(default)]
    pub deductible: bool,
    /// The largest single hold of this category (besides the scenario's
    /// own `scenarios.medical.amount_max_fen`).
    #[serde(default)]
    pub amount_max_fen: Option<i64>,
}

/// `[medical]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MedicalConfig {
    pub hold_ttl_s: u64,
    /// How often open holds past their expiry are released, and closed
    /// ones past their keeping deleted.
    pub sweep_interval_s: u64,
    /// Per card and local calendar year: what the card holder pays alone
    /// before insurance shares the bill (of categories with `deductible`).
    pub annual_deductible_fen: i64,
    pub categories: BTreeMap<String, CategoryConfig>,
}

impl Default for MedicalConfig {
    fn default() -> Self {
        MedicalConfig {
            hold_ttl_s: HOLD_TTL_S_DEFAULT,
            sweep_interval_s: SWEEP_INTERVAL_S_DEFAULT,
            annual_deductible_fen: 0,
            categories: BTreeMap::new(),
        }
    }
}

/// One category's rules, validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Category {
    pub coverage_pct: u8,
    pub deductible: bool,
    pub amount_max_fen: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rules {
    pub hold_ttl_s: i64,
    pub annual_deductible_fen: i64,
    categories: BTreeMap<String, Category>,
}

impl Default for Rules {
    fn default() -> Self {
        Rules::from_config(&MedicalConfig::default()).expect("the defaults are valid")
    }
}

/// A category name: 1 to 32 of `a-z0-9_`.
pub fn valid_category_name(s: &str) -> bool {
    (1..=32).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

impl Rules {
    pub fn from_config(c: &MedicalConfig) -> Result<Rules, crate::Invalid> {
        if !(1..=HOLD_TTL_S_MAX).contains(&c.hold_ttl_s) {
            return Err(format!("medical.hold_ttl_s must be 1 to {HOLD_TTL_S_MAX} seconds").into());
        }
        if !(1..=3_600).contains(&c.sweep_interval_s) {
            return Err("medical.sweep_interval_s must be 1 to 3600 seconds".into());
        }
        if c.annual_deductible_fen < 0 {
            return Err("medical.annual_deductible_fen must not be negative".into());
        }
        if c.categories.len() > CATEGORIES_MAX {
            return Err(format!("medical.categories: at most {CATEGORIES_MAX} categories").into());
        }
        let mut categories = BTreeMap::new();
        for (name, k) in &c.categories {
            if !valid_category_name(name) {
                return Err(format!(
                    "medical.categories: a name is 1 to 32 of a-z, 0-9, '_' (`{name}`)"
                )
                .into());
            }
            if k.coverage_pct > 100 {
                return Err(format!(
                    "medical.categories.{name}.coverage_pct is a percentage, 0 to 100"
                )
                .into());
            }
            if k.amount_max_fen.is_some_and(|m| m < 0) {
                return Err(format!(
                    "medical.categories.{name}.amount_max_fen must not be negative"
                )
                .into());
            }
            categories.insert(
                name.clone(),
                Category {
                    coverage_pct: k.coverage_pct as u8,
                    deductible: k.deductible,
                    amount_max_fen: k.amount_max_fen,
                },
            );
        }
        Ok(Rules {
            hold_ttl_s: c.hold_ttl_s as i64,
            annual_deductible_fen: c.annual_deductible_fen,
            categories,
        })
    }

    pub fn category(&self, name: &str) -> Option<&Category> {
        self.categories.get(name)
    }

    /// The configured names, for error messages.
    pub fn category_names(&self) -> String {
        let names: Vec<&str> = self.categories.keys().map(String::as_str).collect();
        if names.is_empty() {
            "(none configured)".into()
        } else {
            names.join(", ")
        }
    }

    /// What is left of the card's annual deductible in `year`.
    pub fn deductible_left(&self, card: &Card, year: i32) -> i64 {
        deductible_left(self.annual_deductible_fen, card, year)
    }
}

/// What is left of an annual deductible of `annual_fen` in `year`. A year
/// before the one the card counts (a step decided just after another
/// crossed new year's midnight) has nothing left: its total is gone, and
/// guessing would let insurance pay a deductible twice.
pub fn deductible_left(annual_fen: i64, card: &Card, year: i32) -> i64 {
    let used = match year.cmp(&card.medical_year) {
        std::cmp::Ordering::Equal => card.deductible_used_fen,
        std::cmp::Ordering::Greater => 0,
        std::cmp::Ordering::Less => return 0,
    };
    (annual_fen - used).max(0)
}

/// A bill split between insurance and self-pay. `deductible_fen` is the
/// part of `self_pay_fen` that counted against the annual deductible.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Split {
    pub insurance_fen: i64,
    pub self_pay_fen: i64,
    pub deductible_fen: i64,
}

/// Splits a bill: what is under the remaining deductible (where the
/// category has one) is self-paid; insurance pays `coverage_pct` of the
/// rest, rounded down, so self-pay is rounded up.
pub fn split(cat: &Category, bill_fen: i64, deductible_left_fen: i64) -> Split {
    let bill = bill_fen.max(0);
    let deductible_fen = if cat.deductible {
        bill.min(deductible_left_fen.max(0))
    } else {
        0
    };
    let rest = bill - deductible_fen;
    let insurance_fen = rest * i64::from(cat.coverage_pct) / 100;
    Split {
        insurance_fen,
        self_pay_fen: bill - insurance_fen,
        deductible_fen,
    }
}

/// The local calendar year of a unix time, for the annual deductible.
pub fn local_year(now_unix: i64, day_offset_minutes: i32) -> i32 {
    let local = now_unix + i64::from(day_offset_minutes) * 60;
    time::OffsetDateTime::from_unix_timestamp(local).map_or(1970, |t| t.year())
}

/// The card after a capture's split is booked: the deductible it used
/// counts for `year` (a new year starts from nothing). The counter never
/// goes back to an earlier year.
pub fn book_deductible(card: Card, year: i32, s: &Split) -> Card {
    let used = match year.cmp(&card.medical_year) {
        std::cmp::Ordering::Equal => card.deductible_used_fen,
        std::cmp::Ordering::Greater => 0,
        std::cmp::Ordering::Less => return card,
    };
    Card {
        medical_year: year,
        deductible_used_fen: used.saturating_add(s.deductible_fen),
        ..card
    }
}

/// The card after a capture of `year` is reversed: the deductible its
/// split used is given back, if the card still counts that year.
pub fn unbook_deductible(card: Card, year: i32, s: &Split) -> Card {
    if card.medical_year != year {
        return card;
    }
    Card {
        deductible_used_fen: (card.deductible_used_fen - s.deductible_fen).max(0),
        ..card
    }
}

/// Where a hold stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HoldState {
    Open,
    Captured,
    Voided,
    /// Found past its expiry by a capture or a void: its reservation was
    /// given back then.
    Expired,
}

/// What a capture or a void may do with a hold, at `now_ms`: `Ok` when
/// the hold is open and not yet expired; otherwise the reason to decline
/// (and for an open hold found expired, the caller gives back its
/// reservation and stores it as expired).
pub fn usable(state: HoldState, expires_ms: i64, now_ms: i64) -> Result<(), Reason> {
    match state {
        HoldState::Open if now_ms >= expires_ms => Err(Reason::HoldExpired),
        HoldState::Open => Ok(()),
        HoldState::Expired => Err(Reason::HoldExpired),
        HoldState::Captured | HoldState::Voided => Err(Reason::HoldClosed),
    }
}

/// What a capture of `amount_fen` from a hold of `held_fen` does: the
/// charge, and what goes back to the card's daily spend (the part not
/// captured). More than was held is declined `LIMIT_EXCEEDED`, the hold
/// staying open.
pub fn capture(held_fen: i64, amount_fen: i64) -> Result<(i64, i64), Reason> {
    if amount_fen > held_fen || amount_fen < 0 {
        return Err(Reason::LimitExceeded);
    }
    Ok((amount_fen, held_fen - amount_fen))
}

/// A category's own amount limit for a hold.
pub fn check_amount(cat: &Category, amount_fen: i64) -> Result<(), Reason> {
    match cat.amount_max_fen {
        Some(m) if amount_fen > m => Err(Reason::LimitExceeded),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::CardStatus;

    fn rules() -> Rules {
        let c: MedicalConfig = toml::from_str(
            r#"
            hold_ttl_s = 600
            annual_deductible_fen = 80000
            [categories.outpatient]
            coverage_pct = 70
            deductible = true
            [categories.inpatient]
            coverage_pct = 85
            deductible = true
            amount_max_fen = 5000000
            [categories.pharmacy]
            coverage_pct = 60
            [categories.cosmetic]
            coverage_pct = 0
            [categories.full]
            coverage_pct = 100
            "#,
        )
        .unwrap();
        Rules::from_config(&c).unwrap()
    }

    #[test]
    fn split_every_rule() {
        let r = rules();
        let cat = |n: &str| *r.category(n).unwrap();
        // (case, category, bill, deductible left, want insurance, self-pay, deductible)
        let cases: &[(&str, &str, i64, i64, (i64, i64, i64))] = &[
            (
                "no deductible left",
                "outpatient",
                10_000,
                0,
                (7_000, 3_000, 0),
            ),
            (
                "all under the deductible",
                "outpatient",
                10_000,
                80_000,
                (0, 10_000, 10_000),
            ),
            (
                "a deductible crossing",
                "outpatient",
                10_000,
                4_000,
                (4_200, 5_800, 4_000),
            ),
            (
                "exactly the deductible",
                "outpatient",
                4_000,
                4_000,
                (0, 4_000, 4_000),
            ),
            ("self-pay rounded up", "outpatient", 1_001, 0, (700, 301, 0)),
            ("one fen", "outpatient", 1, 0, (0, 1, 0)),
            ("one fen at 85 %", "inpatient", 1, 0, (0, 1, 0)),
            ("85 % rounded", "inpatient", 999, 0, (849, 150, 0)),
            (
                "a category without deductible ignores it",
                "pharmacy",
                10_000,
                80_000,
                (6_000, 4_000, 0),
            ),
            ("nothing covered", "cosmetic", 10_000, 0, (0, 10_000, 0)),
            ("all covered", "full", 10_000, 0, (10_000, 0, 0)),
            ("a zero bill", "outpatient", 0, 80_000, (0, 0, 0)),
            (
                "a negative deductible left counts as none",
                "outpatient",
                100,
                -5,
                (70, 30, 0),
            ),
        ];
        for (name, c, bill, left, (ins, own, ded)) in cases {
            let s = split(&cat(c), *bill, *left);
            assert_eq!(
                s,
                Split {
                    insurance_fen: *ins,
                    self_pay_fen: *own,
                    deductible_fen: *ded
                },
                "{name}"
            );
            assert_eq!(s.insurance_fen + s.self_pay_fen, *bill, "{name}: sums");
            assert!(s.deductible_fen <= s.self_pay_fen, "{name}");
            // Insurance never pays more than its share of the bill.
            assert!(
                s.insurance_fen * 100 <= *bill * i64::from(cat(c).coverage_pct),
                "{name}"
            );
        }
    }

    #[test]
    fn the_deductible_is_per_card_and_year() {
        let r = rules();
        let mut card = Card::new(CardStatus::Active, &[], &[]);
        assert_eq!(r.deductible_left(&card, 2026), 80_000);
        let s = split(r.category("outpatient").unwrap(), 50_000, 80_000);
        card = book_deductible(card, 2026, &s);
        assert_eq!(card.deductible_used_fen, 50_000);
        assert_eq!(r.deductible_left(&card, 2026), 30_000);
        // Crossing it: 30,000 more self-paid, then 70 % of the rest.
        let s = split(r.category("outpatient").unwrap(), 50_000, 30_000);
        assert_eq!(s.deductible_fen, 30_000);
        assert_eq!(s.insurance_fen, 14_000);
        card = book_deductible(card, 2026, &s);
        assert_eq!(r.deductible_left(&card, 2026), 0);
        // A new year starts again.
        assert_eq!(r.deductible_left(&card, 2027), 80_000);
        let card = book_deductible(card, 2027, &Split::default());
        assert_eq!((card.medical_year, card.deductible_used_fen), (2027, 0));
        // A step of the old year decided after one of the new year: it has
        // no deductible left and does not take the counter back.
        assert_eq!(r.deductible_left(&card, 2026), 0);
        let late = split(r.category("outpatient").unwrap(), 10_000, 0);
        assert_eq!(book_deductible(card, 2026, &late), card);
    }

    #[test]
    fn a_reversed_capture_gives_its_deductible_back_in_its_year() {
        let r = rules();
        let s = split(r.category("outpatient").unwrap(), 50_000, 80_000);
        let card = book_deductible(Card::new(CardStatus::Active, &[], &[]), 2026, &s);
        let back = unbook_deductible(card, 2026, &s);
        assert_eq!(r.deductible_left(&back, 2026), 80_000);
        // Never below nothing; another year's counter is not touched.
        let twice = unbook_deductible(back, 2026, &s);
        assert_eq!(twice.deductible_used_fen, 0);
        assert_eq!(unbook_deductible(card, 2025, &s), card);
    }

    #[test]
    fn local_years_turn_at_local_midnight() {
        // 2026-12-31T16:00:00Z is 2027-01-01 00:00 in Beijing.
        let t = 1_798_732_800;
        assert_eq!(local_year(t, 480), 2027);
        assert_eq!(local_year(t - 1, 480), 2026);
        assert_eq!(local_year(t, 0), 2026);
    }

    #[test]
    fn holds_every_state() {
        let cases: &[(&str, HoldState, i64, i64, Result<(), Reason>)] = &[
            ("open", HoldState::Open, 1_000, 999, Ok(())),
            (
                "open at its expiry",
                HoldState::Open,
                1_000,
                1_000,
                Err(Reason::HoldExpired),
            ),
            (
                "expired before",
                HoldState::Expired,
                1_000,
                0,
                Err(Reason::HoldExpired),
            ),
            (
                "captured",
                HoldState::Captured,
                1_000,
                0,
                Err(Reason::HoldClosed),
            ),
            (
                "voided",
                HoldState::Voided,
                1_000,
                0,
                Err(Reason::HoldClosed),
            ),
            (
                "captured, and past its expiry",
                HoldState::Captured,
                1_000,
                5_000,
                Err(Reason::HoldClosed),
            ),
        ];
        for (name, state, expires, now, want) in cases {
            assert_eq!(usable(*state, *expires, *now), *want, "{name}");
        }
    }

    #[test]
    fn captures_and_amount_limits() {
        assert_eq!(capture(10_000, 10_000), Ok((10_000, 0)));
        assert_eq!(capture(10_000, 6_000), Ok((6_000, 4_000)));
        assert_eq!(capture(10_000, 0), Ok((0, 10_000)));
        assert_eq!(capture(10_000, 10_001), Err(Reason::LimitExceeded));
        let r = rules();
        let inpatient = r.category("inpatient").unwrap();
        assert_eq!(check_amount(inpatient, 5_000_000), Ok(()));
        assert_eq!(
            check_amount(inpatient, 5_000_001),
            Err(Reason::LimitExceeded)
        );
        assert_eq!(
            check_amount(r.category("pharmacy").unwrap(), i64::MAX),
            Ok(())
        );
    }

    #[test]
    fn bad_config_is_named() {
        let cases = [
            ("hold_ttl_s = 0", "hold_ttl_s"),
            ("annual_deductible_fen = -1", "negative"),
            ("[categories.a]\ncoverage_pct = 101", "percentage"),
            ("[categories.Bad]\ncoverage_pct = 1", "a-z"),
            (
                "[categories.a]\ncoverage_pct = 1\namount_max_fen = -1",
                "negative",
            ),
        ];
        for (text, want) in cases {
            let c: MedicalConfig = toml::from_str(text).unwrap();
            let e = Rules::from_config(&c).unwrap_err();
            assert!(e.0.contains(want), "{text}: {e}");
        }
        assert!(toml::from_str::<MedicalConfig>("[categories.a]\ncoverage = 1").is_err());
        assert_eq!(Rules::default().hold_ttl_s, 1_800);
        assert_eq!(
            rules().category_names(),
            "cosmetic, full, inpatient, outpatient, pharmacy"
        );
    }
}
