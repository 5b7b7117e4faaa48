//! Medical holds at hospital and pharmacy counters: the record of a hold
//! and what a capture or a void does to it and to the card (pure; the
//! gateway runs it under the card's lock and the hold's slot).
//!
//! A capture books part or all of the held amount with the bill's split
//! (insurance and self-pay, the annual deductible first); the hold's whole
//! reservation leaves its day's spend and the captured amount counts on
//! the day of the capture. A void releases the reservation. A step that
//! finds the hold past its expiry releases it and is declined
//! `HOLD_EXPIRED`. The split's rules are those in force when the hold was
//! made, stored with it, so a config change does not change a bill already
//! at the counter.

use serde::{Deserialize, Serialize};

use crate::authz;
use crate::model::{Card, Reason, StoredCardNo};
use crate::scenario::medical::{self, Category, HoldState, Split};
use crate::wire::HoldOp;

/// A medical hold as the gateway stores it (JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HoldRecord {
    /// The hold's own auth_id: `hold_id` in answers.
    pub auth_id: String,
    pub card_no: StoredCardNo,
    /// What was held (and reserved against the daily spend of `day`).
    pub amount_fen: i64,
    pub category: String,
    /// The category's rules when the hold was made.
    pub rules: CategoryRules,
    /// The split of the whole amount as it was when held.
    pub split: Split,
    pub created_ms: i64,
    pub expires_ms: i64,
    /// The local day whose spend holds the reservation.
    pub day: i32,
    pub state: HoldState,
    #[serde(default)]
    pub captured_fen: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
}

/// [`Category`] as stored with a hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CategoryRules {
    pub coverage_pct: u8,
    pub deductible: bool,
    /// `medical.annual_deductible_fen` when the hold was made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annual_deductible_fen: Option<i64>,
}

impl From<&CategoryRules> for Category {
    fn from(r: &CategoryRules) -> Category {
        Category {
            coverage_pct: r.coverage_pct,
            deductible: r.deductible,
            amount_max_fen: None,
        }
    }
}

/// What a capture or a void comes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub reason: Reason,
    /// Captured, or released by a void; 0 for a decline.
    pub amount_fen: i64,
    /// What settlement books: a capture's amount.
    pub charged_fen: i64,
    pub split: Option<Split>,
    pub hold_after: Option<HoldRecord>,
    pub card_after: Option<Card>,
}

impl Step {
    pub fn decline(reason: Reason) -> Step {
        Step {
            reason,
            amount_fen: 0,
            charged_fen: 0,
            split: None,
            hold_after: None,
            card_after: None,
        }
    }
}

/// Decides a capture (`amount_fen`) or a void of hold `h` of `card` at
/// `now_ms`. Pure: the caller holds the card's lock and the hold's slot.
pub fn decide_step(
    policy: &authz::Policy,
    op: HoldOp,
    h: &HoldRecord,
    card: Card,
    amount_fen: Option<i64>,
    reversed_already: bool,
    now_ms: i64,
) -> Step {
    if reversed_already {
        return Step::decline(Reason::Reversed);
    }
    match medical::usable(h.state, h.expires_ms, now_ms) {
        Err(Reason::HoldExpired) if h.state == HoldState::Open => {
            // Found expired: its reservation goes back now.
            return Step {
                hold_after: Some(HoldRecord {
                    state: HoldState::Expired,
                    ..h.clone()
                }),
                card_after: Some(card.give_back(h.day, h.amount_fen)),
                ..Step::decline(Reason::HoldExpired)
            };
        }
        Err(r) => return Step::decline(r),
        Ok(()) => {}
    }
    match op {
        HoldOp::Void => Step {
            reason: Reason::Ok,
            amount_fen: h.amount_fen,
            charged_fen: 0,
            split: None,
            hold_after: Some(HoldRecord {
                state: HoldState::Voided,
                ..h.clone()
            }),
            card_after: Some(card.give_back(h.day, h.amount_fen)),
        },
        HoldOp::Capture => {
            let asked = amount_fen.unwrap_or(0);
            let (charge, _) = match medical::capture(h.amount_fen, asked) {
                Ok(c) => c,
                Err(r) => return Step::decline(r),
            };
            let now_s = now_ms.div_euclid(1000);
            let year = medical::local_year(now_s, policy.day_offset_minutes);
            let annual = h
                .rules
                .annual_deductible_fen
                .unwrap_or(policy.medical.annual_deductible_fen);
            let left = medical::deductible_left(annual, &card, year);
            let split = medical::split(&Category::from(&h.rules), charge, left);
            // The reservation leaves the hold's day; the charge counts on
            // the day it is booked, where a reversal of it gives it back.
            let mut after = card.give_back(h.day, h.amount_fen);
            if charge > 0 {
                let today = policy.local_day(now_s);
                after.spent_fen = after.spent_on(today).saturating_add(charge);
                after.spent_day = today;
            }
            let after = medical::book_deductible(after, year, &split);
            Step {
                reason: Reason::Ok,
                amount_fen: charge,
                charged_fen: charge,
                split: Some(split),
                hold_after: Some(HoldRecord {
                    state: HoldState::Captured,
                    captured_fen: charge,
                    ..h.clone()
                }),
                card_after: Some(after),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{CardStatus, Function};

    /// The local day (UTC+8) of `NOW_MS`.
    const DAY: i32 = 20_785;
    const NOW_MS: i64 = 1_795_851_912_000; // 2026-11-28T07:45:12Z

    fn policy() -> authz::Policy {
        let mut p = authz::Policy::with_defaults(1_000_000, 480);
        p.medical = medical::Rules::from_config(
            &toml::from_str("annual_deductible_fen = 1000\n[categories.outpatient]\ncoverage_pct = 70\ndeductible = true").unwrap(),
        )
        .unwrap();
        p
    }

    fn hold(state: HoldState) -> HoldRecord {
        HoldRecord {
            auth_id: "h1".into(),
            card_no: "500118A12345678".into(),
            amount_fen: 10_000,
            category: "outpatient".into(),
            rules: CategoryRules {
                coverage_pct: 70,
                deductible: true,
                annual_deductible_fen: None,
            },
            split: Split::default(),
            created_ms: NOW_MS - 1_000,
            expires_ms: NOW_MS + 1_000,
            day: DAY,
            state,
            captured_fen: 0,
            site: None,
        }
    }

    fn card(spent_day: i32) -> Card {
        Card {
            spent_day,
            spent_fen: 15_000,
            ..Card::new(CardStatus::Active, &[Function::Medical], &[])
        }
    }

    #[test]
    fn every_step() {
        let p = policy();
        let open = hold(HoldState::Open);
        let yesterday = HoldRecord {
            day: DAY - 1,
            ..hold(HoldState::Open)
        };
        let expired = HoldRecord {
            expires_ms: NOW_MS,
            ..open.clone()
        };
        // (case, op, hold, card's spent day, amount, reversed,
        //  want reason, amount, charged, spent after, state after)
        #[allow(clippy::type_complexity)]
        let cases: &[(
            &str,
            HoldOp,
            &HoldRecord,
            i32,
            Option<i64>,
            bool,
            (Reason, i64, i64, i64, Option<HoldState>),
        )] = &[
            (
                "a whole capture",
                HoldOp::Capture,
                &open,
                DAY,
                Some(10_000),
                false,
                (
                    Reason::Ok,
                    10_000,
                    10_000,
                    15_000,
                    Some(HoldState::Captured),
                ),
            ),
            (
                "a partial capture gives back the rest",
                HoldOp::Capture,
                &open,
                DAY,
                Some(6_000),
                false,
                (Reason::Ok, 6_000, 6_000, 11_000, Some(HoldState::Captured)),
            ),
            (
                "a hold of yesterday: the charge counts today",
                HoldOp::Capture,
                &yesterday,
                DAY,
                Some(6_000),
                false,
                (Reason::Ok, 6_000, 6_000, 21_000, Some(HoldState::Captured)),
            ),
            (
                "…and its void gives nothing back to today",
                HoldOp::Void,
                &yesterday,
                DAY,
                None,
                false,
                (Reason::Ok, 10_000, 0, 15_000, Some(HoldState::Voided)),
            ),
            (
                "more than held",
                HoldOp::Capture,
                &open,
                DAY,
                Some(10_001),
                false,
                (Reason::LimitExceeded, 0, 0, 15_000, None),
            ),
            (
                "a void releases it all",
                HoldOp::Void,
                &open,
                DAY,
                None,
                false,
                (Reason::Ok, 10_000, 0, 5_000, Some(HoldState::Voided)),
            ),
            (
                "an expired capture gives the reservation back",
                HoldOp::Capture,
                &expired,
                DAY,
                Some(1),
                false,
                (Reason::HoldExpired, 0, 0, 5_000, Some(HoldState::Expired)),
            ),
            (
                "an expired void too",
                HoldOp::Void,
                &expired,
                DAY,
                None,
                false,
                (Reason::HoldExpired, 0, 0, 5_000, Some(HoldState::Expired)),
            ),
            (
                "already expired",
                HoldOp::Capture,
                &hold(HoldState::Expired),
                DAY,
                Some(1),
                false,
                (Reason::HoldExpired, 0, 0, 15_000, None),
            ),
            (
                "already captured",
                HoldOp::Capture,
                &hold(HoldState::Captured),
                DAY,
                Some(1),
                false,
                (Reason::HoldClosed, 0, 0, 15_000, None),
            ),
            (
                "already voided",
                HoldOp::Void,
                &hold(HoldState::Voided),
                DAY,
                None,
                false,
                (Reason::HoldClosed, 0, 0, 15_000, None),
            ),
            (
                "reversed before it arrived",
                HoldOp::Capture,
                &open,
                DAY,
                Some(1),
                true,
                (Reason::Reversed, 0, 0, 15_000, None),
            ),
        ];
        for (name, op, h, day, amount, reversed, want) in cases {
            let c = card(*day);
            let s = decide_step(&p, *op, h, c, *amount, *reversed, NOW_MS);
            let spent = s.card_after.unwrap_or(c).spent_fen;
            let got = (
                s.reason,
                s.amount_fen,
                s.charged_fen,
                spent,
                s.hold_after.as_ref().map(|h| h.state),
            );
            assert_eq!(got, *want, "{name}");
            assert_eq!(s.split.is_some(), s.charged_fen > 0, "{name}");
        }
    }

    #[test]
    fn a_capture_books_its_split_and_the_deductible() {
        let p = policy();
        let s = decide_step(
            &p,
            HoldOp::Capture,
            &hold(HoldState::Open),
            card(DAY),
            Some(6_000),
            false,
            NOW_MS,
        );
        // 1,000 under the deductible, then 70 % of 5,000.
        assert_eq!(
            s.split,
            Some(Split {
                insurance_fen: 3_500,
                self_pay_fen: 2_500,
                deductible_fen: 1_000
            })
        );
        let after = s.card_after.unwrap();
        assert_eq!(
            (after.medical_year, after.deductible_used_fen),
            (2026, 1_000)
        );
        assert_eq!(s.hold_after.unwrap().captured_fen, 6_000);
        // The next capture finds the deductible used up.
        let s = decide_step(
            &p,
            HoldOp::Capture,
            &hold(HoldState::Open),
            after,
            Some(1_000),
            false,
            NOW_MS,
        );
        assert_eq!(s.split.unwrap().insurance_fen, 700);
        // The deductible is the one in force when the hold was made.
        let mut h = hold(HoldState::Open);
        h.rules.annual_deductible_fen = Some(0);
        let s = decide_step(
            &p,
            HoldOp::Capture,
            &h,
            card(DAY),
            Some(1_000),
            false,
            NOW_MS,
        );
        assert_eq!(s.split.unwrap().deductible_fen, 0);
    }

    #[test]
    fn hold_records_round_trip() {
        let h = hold(HoldState::Captured);
        let v = serde_json::to_vec(&h).unwrap();
        assert_eq!(serde_json::from_slice::<HoldRecord>(&v).unwrap(), h);
    }
}
