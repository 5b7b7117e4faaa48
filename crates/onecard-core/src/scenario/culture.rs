//! Culture and tourism: libraries, museums, scenic spots, sports venues.
//!
//! Entry is by identity (an active card); a venue may have a fee from
//! config (or the amount the gate asks), reduced or waived by the card's
//! concession, and a daily quota of entries (`QUOTA_EXHAUSTED` when it is
//! used up). Each approved entry counts one visit on the card. Pure: the
//! gateway hands in the venue's entries so far today and stores what
//! comes back.

use std::collections::{BTreeMap, HashMap};

use serde::Deserialize;

use super::{ConcessionRates, Fare};
use crate::model::{Card, Reason};

/// One venue (`[[culture.venues]]`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Venue {
    /// The `site` its gates send.
    pub site: String,
    /// Entries per local day; 0: no quota.
    #[serde(default)]
    pub quota_daily: u32,
    /// The entry fee; absent: the amount the gate asks (0 for free entry).
    #[serde(default)]
    pub fee_fen: Option<i64>,
}

/// `[culture]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CultureConfig {
    /// The percentage of an entry fee each concession pays.
    pub concessions: BTreeMap<String, u32>,
    pub venues: Vec<Venue>,
}

/// Venues at most.
pub const VENUES_MAX: usize = 10_000;

#[derive(Debug, Clone, Default)]
pub struct Rules {
    pub concessions: ConcessionRates,
    venues: HashMap<Box<str>, Venue, foldhash::fast::FixedState>,
}

impl Rules {
    pub fn from_config(c: &CultureConfig) -> Result<Rules, crate::Invalid> {
        if c.venues.len() > VENUES_MAX {
            return Err(format!("culture.venues: at most {VENUES_MAX} venues").into());
        }
        let mut venues = HashMap::with_hasher(foldhash::fast::FixedState::default());
        for v in &c.venues {
            if v.site.is_empty() || v.site.chars().count() > 64 {
                return Err("culture.venues: `site` must be 1 to 64 characters".into());
            }
            if v.fee_fen.is_some_and(|f| f < 0) {
                return Err(
                    format!("culture.venues `{}`: fee_fen must not be negative", v.site).into(),
                );
            }
            if venues
                .insert(v.site.clone().into_boxed_str(), v.clone())
                .is_some()
            {
                return Err(format!("culture.venues `{}` is configured twice", v.site).into());
            }
        }
        Ok(Rules {
            concessions: ConcessionRates::from_table("culture.concessions", &c.concessions)?,
            venues,
        })
    }

    #[inline]
    pub fn venue(&self, site: &str) -> Option<&Venue> {
        self.venues.get(site)
    }

    /// Venues with a quota, whose counts the gateway keeps.
    pub fn quota_venues(&self) -> impl Iterator<Item = &Venue> {
        self.venues.values().filter(|v| v.quota_daily > 0)
    }
}

/// An entry: its fee and the venue's entries today with this one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub fare: Fare,
    pub entries_today: u32,
}

/// Admits one entry: `asked_fen` is the gate's amount, `entries_today`
/// the venue's approved entries so far today.
#[inline]
pub fn enter(
    rules: &Rules,
    card: &Card,
    venue: Option<&Venue>,
    asked_fen: i64,
    entries_today: u32,
) -> Result<Entry, Reason> {
    if let Some(v) = venue {
        if v.quota_daily > 0 && entries_today >= v.quota_daily {
            return Err(Reason::QuotaExhausted);
        }
    }
    let base = venue.and_then(|v| v.fee_fen).unwrap_or(asked_fen);
    Ok(Entry {
        fare: rules.concessions.apply(card, base),
        entries_today: entries_today.saturating_add(1),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{CardStatus, Concession};

    fn rules() -> Rules {
        let c: CultureConfig = toml::from_str(
            r#"
            concessions = { elderly = 0, student = 50, disabled = 0 }
            [[venues]]
            site = "museum-1"
            quota_daily = 2
            fee_fen = 3000
            [[venues]]
            site = "library-1"
            "#,
        )
        .unwrap();
        Rules::from_config(&c).unwrap()
    }

    #[test]
    fn every_rule() {
        let r = rules();
        let museum = r.venue("museum-1");
        let library = r.venue("library-1");
        let card = |c: &[Concession]| Card::new(CardStatus::Active, &[], c);
        let cases: &[(
            &str,
            Option<&Venue>,
            &[Concession],
            i64,
            u32,
            Result<(i64, u32), Reason>,
        )] = &[
            ("the venue's fee", museum, &[], 0, 0, Ok((3000, 1))),
            (
                "the fee, not what the gate asked",
                museum,
                &[],
                100,
                0,
                Ok((3000, 1)),
            ),
            (
                "students pay half",
                museum,
                &[Concession::Student],
                0,
                1,
                Ok((1500, 2)),
            ),
            (
                "the elderly enter free",
                museum,
                &[Concession::Elderly],
                0,
                0,
                Ok((0, 1)),
            ),
            (
                "the quota is used up",
                museum,
                &[],
                0,
                2,
                Err(Reason::QuotaExhausted),
            ),
            (
                "the quota binds concessions too",
                museum,
                &[Concession::Elderly],
                0,
                5,
                Err(Reason::QuotaExhausted),
            ),
            (
                "a free library, no quota",
                library,
                &[],
                0,
                1_000_000,
                Ok((0, 1_000_001)),
            ),
            (
                "a venue without config: the gate's amount",
                None,
                &[],
                500,
                0,
                Ok((500, 1)),
            ),
            (
                "…with the concession",
                None,
                &[Concession::Student],
                500,
                0,
                Ok((250, 1)),
            ),
        ];
        for (name, venue, held, asked, today, want) in cases {
            let got = enter(&r, &card(held), *venue, *asked, *today)
                .map(|e| (e.fare.charged_fen, e.entries_today));
            assert_eq!(got, *want, "{name}");
        }
        assert_eq!(r.quota_venues().count(), 1);
    }

    #[test]
    fn bad_config_is_named() {
        let cases = [
            ("[[venues]]\nsite = \"a\"\nfee_fen = -1", "negative"),
            (
                "[[venues]]\nsite = \"a\"\n[[venues]]\nsite = \"a\"",
                "twice",
            ),
            ("[[venues]]\nsite = \"\"", "site"),
        ];
        for (text, want) in cases {
            let c: CultureConfig = toml::from_str(text).unwrap();
            let e = Rules::from_config(&c).unwrap_err();
            assert!(e.0.contains(want), "{text}: {e}");
        }
    }
}
