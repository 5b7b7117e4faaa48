//! The rules of each scenario of the one card, one module per scenario:
//! what a transit boarding costs, whether a venue has room, whether a door
//! opens now, what an identity check may disclose, which regions' cards
//! are accepted. All of it is pure: the rules are built once from the
//! config, and every function takes the card, the facts the gateway
//! looked up and the time, and returns a value. `authz::decide` calls
//! them after the checks every scenario shares (deny list, card status,
//! function).
//!
//! Never here: I/O, the clock, locks, or a personal ID.

pub mod access;
pub mod culture;
pub mod health;
pub mod identity;
pub mod medical;
pub mod payment;
pub mod region;
pub mod transit;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::model::{Card, Concession};

/// Why a charge came out as it did: the base, then what each rule took
/// off. In the answer and in the journal record, so that a resident at
/// the counter and an auditor later both see the why.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Fare {
    /// The route's (or venue's) tariff, or the amount the terminal asked.
    pub base_fen: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concession: Option<Concession>,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub concession_off_fen: i64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub transfer_off_fen: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cap: Option<Cap>,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub cap_off_fen: i64,
    /// What is charged: the base less everything taken off.
    pub charged_fen: i64,
}

fn is_zero(v: &i64) -> bool {
    *v == 0
}

/// A fare cap that was reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Cap {
    Daily,
    Weekly,
}

/// Per concession, the percentage of the fare its holder pays (0: free,
/// 50: half). A card with several pays the lowest.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConcessionRates([Option<u8>; Concession::ALL.len()]);

impl ConcessionRates {
    /// From a config table `{ elderly = 0, student = 50 }`; `what` names
    /// the table in errors.
    pub fn from_table(
        what: &str,
        table: &BTreeMap<String, u32>,
    ) -> Result<ConcessionRates, crate::Invalid> {
        let mut rates = ConcessionRates::default();
        for (name, pct) in table {
            let c = Concession::parse(name).ok_or_else(|| {
                format!(
                    "{what}: unknown concession `{name}`; expected {}",
                    Concession::expected()
                )
            })?;
            if *pct > 100 {
                return Err(
                    format!("{what}.{name}: the share paid is a percentage, 0 to 100").into(),
                );
            }
            rates.0[c.bit()] = Some(*pct as u8);
        }
        Ok(rates)
    }

    /// The card's best concession and the percentage it pays, if any
    /// concession of the card has a rate.
    pub fn best(&self, card: &Card) -> Option<(Concession, u8)> {
        Concession::ALL
            .iter()
            .filter(|c| card.concessions.contains(c.bit()))
            .filter_map(|c| self.0[c.bit()].map(|p| (*c, p)))
            .min_by_key(|(_, p)| *p)
    }

    /// `base` after the card's best concession: (what is paid, the fare
    /// so far). The share is rounded down, in the resident's favour.
    pub fn apply(&self, card: &Card, base_fen: i64) -> Fare {
        match self.best(card) {
            Some((c, pct)) => {
                let pay = base_fen * i64::from(pct) / 100;
                Fare {
                    base_fen,
                    concession: Some(c),
                    concession_off_fen: base_fen - pay,
                    charged_fen: pay,
                    ..Fare::default()
                }
            }
            None => Fare {
                base_fen,
                charged_fen: base_fen,
                ..Fare::default()
            },
        }
    }
}

/// A stable 64-bit hash of a site (FNV-1a): kept in card state across
/// restarts, so it must not depend on a per-process seed.
pub fn place_hash(site: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in site.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // 0 means "no place yet" in card state.
    h.max(1)
}

/// The minute of the local day (0..1440) at `now_unix`.
#[inline]
pub fn local_minute(now_unix: i64, day_offset_minutes: i32) -> u16 {
    let local = now_unix + i64::from(day_offset_minutes) * 60;
    (local.rem_euclid(86_400) / 60) as u16
}

/// The week a local day falls in, weeks starting on Monday (day 0,
/// 1970-01-01, was a Thursday).
#[inline]
pub fn week_of(day: i32) -> i32 {
    (day + 3).div_euclid(7)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::CardStatus;

    #[test]
    fn the_lowest_rate_of_the_card_wins() {
        let table: BTreeMap<String, u32> = [("elderly".into(), 0), ("student".into(), 50)]
            .into_iter()
            .collect();
        let rates = ConcessionRates::from_table("t", &table).unwrap();
        let card = |c: &[Concession]| Card::new(CardStatus::Active, &[], c);
        let cases: &[(&[Concession], Option<(Concession, u8)>, i64)] = &[
            (&[], None, 200),
            (&[Concession::Student], Some((Concession::Student, 50)), 100),
            (
                &[Concession::Student, Concession::Elderly],
                Some((Concession::Elderly, 0)),
                0,
            ),
            // A concession without a rate counts for nothing here.
            (&[Concession::Veteran], None, 200),
        ];
        for (held, best, pay) in cases {
            assert_eq!(rates.best(&card(held)), *best, "{held:?}");
            let fare = rates.apply(&card(held), 200);
            assert_eq!(fare.charged_fen, *pay, "{held:?}");
            assert_eq!(fare.base_fen - fare.concession_off_fen, *pay);
        }
        // Half of an odd fare is rounded down.
        assert_eq!(
            rates.apply(&card(&[Concession::Student]), 201).charged_fen,
            100
        );
    }

    #[test]
    fn rates_are_validated() {
        let bad: BTreeMap<String, u32> = [("pilot".into(), 0)].into_iter().collect();
        assert!(ConcessionRates::from_table("t", &bad)
            .unwrap_err()
            .0
            .contains("pilot"));
        let over: BTreeMap<String, u32> = [("student".into(), 101)].into_iter().collect();
        assert!(ConcessionRates::from_table("t", &over).is_err());
    }

    #[test]
    fn days_weeks_and_minutes() {
        // 2026-11-28T07:45:12Z is 15:45 in Beijing, a Saturday.
        let now = 1_795_851_912;
        assert_eq!(local_minute(now, 480), 15 * 60 + 45);
        assert_eq!(local_minute(now, 0), 7 * 60 + 45);
        // 1970-01-04 was a Sunday, 1970-01-05 a Monday.
        assert_eq!(week_of(3), 0);
        assert_eq!(week_of(4), 1);
        assert_eq!(week_of(10), 1);
        assert_eq!(week_of(11), 2);
        assert_ne!(place_hash("line-12"), place_hash("line-13"));
        assert_ne!(place_hash(""), 0);
    }
}
