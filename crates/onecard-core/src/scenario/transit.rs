//! Transit: what one boarding costs and what the card remembers of it.
//!
//! In order: anti-passback (the same card at the same site within
//! `passback_s` is `DUPLICATE_TAP`, so a double tap never charges twice),
//! the route's tariff (flat, by stop count or by zones; without a tariff
//! the amount the validator asked), the card's best concession, the
//! transfer discount (a boarding on another route within
//! `transfer_window_s` of the journey's first), then the daily and weekly
//! fare caps (once reached, rides are approved at zero fare). Pure.

use std::collections::{BTreeMap, HashMap};

use serde::Deserialize;

use super::{week_of, Cap, ConcessionRates, Fare};
use crate::model::{Card, Reason, TransitState};

/// How a route's fare is counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FareKind {
    /// One fare, however far.
    Flat,
    /// By the number of stops travelled (the request's `stops`).
    Stops,
    /// By the number of zones travelled (the request's `zones`).
    Zones,
}

impl FareKind {
    /// The request field that carries the distance, if any.
    pub fn field(self) -> Option<&'static str> {
        match self {
            FareKind::Flat => None,
            FareKind::Stops => Some("stops"),
            FareKind::Zones => Some("zones"),
        }
    }
}

/// One route's tariff (`[[transit.routes]]`): `base_fen` covers the first
/// `base_units` stops or zones, then `step_fen` for each `step_units`
/// started, up to `max_fen`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// The `site` validators of this route send.
    pub site: String,
    pub fare: FareKind,
    pub base_fen: i64,
    #[serde(default)]
    pub base_units: u32,
    #[serde(default)]
    pub step_fen: i64,
    #[serde(default = "one")]
    pub step_units: u32,
    #[serde(default)]
    pub max_fen: Option<i64>,
}

fn one() -> u32 {
    1
}

impl Route {
    /// The fare for `units` stops or zones (ignored for a flat fare).
    #[inline]
    pub fn fare_fen(&self, units: u32) -> i64 {
        let mut fen = self.base_fen;
        if self.fare != FareKind::Flat && units > self.base_units {
            let extra = units - self.base_units;
            let steps = extra.div_ceil(self.step_units.max(1));
            fen += i64::from(steps) * self.step_fen;
        }
        match self.max_fen {
            Some(m) => fen.min(m),
            None => fen,
        }
    }
}

/// `[transit]`: the fare rules. Every rule is off (0) unless configured.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TransitConfig {
    /// Anti-passback: seconds during which the same card at the same site
    /// is declined `DUPLICATE_TAP`. 0: off.
    pub passback_s: i64,
    /// Transfers: a boarding on another route within this many seconds of
    /// the journey's first boarding is a transfer. 0: off.
    pub transfer_window_s: i64,
    /// What a transfer takes off the fare (after concessions).
    pub transfer_off_fen: i64,
    /// Transfers per journey that get the discount.
    pub transfers_max: u8,
    /// Transit fares per card per local day and per week (Monday to
    /// Sunday); past them rides are free. 0: no cap.
    pub cap_daily_fen: i64,
    pub cap_weekly_fen: i64,
    /// The percentage of the fare each concession pays.
    pub concessions: BTreeMap<String, u32>,
    pub routes: Vec<Route>,
}

/// Routes at most: a city's bus and metro lines.
pub const ROUTES_MAX: usize = 10_000;

/// The transit rules, built once from `[transit]`.
#[derive(Debug, Clone, Default)]
pub struct Rules {
    pub passback_s: i64,
    pub transfer_window_s: i64,
    pub transfer_off_fen: i64,
    pub transfers_max: u8,
    pub cap_daily_fen: i64,
    pub cap_weekly_fen: i64,
    pub concessions: ConcessionRates,
    routes: HashMap<Box<str>, Route, foldhash::fast::FixedState>,
}

impl Rules {
    pub fn from_config(c: &TransitConfig) -> Result<Rules, crate::Invalid> {
        let negative = [
            ("passback_s", c.passback_s),
            ("transfer_window_s", c.transfer_window_s),
            ("transfer_off_fen", c.transfer_off_fen),
            ("cap_daily_fen", c.cap_daily_fen),
            ("cap_weekly_fen", c.cap_weekly_fen),
        ];
        if let Some((name, _)) = negative.iter().find(|(_, v)| *v < 0) {
            return Err(format!("transit.{name} must not be negative").into());
        }
        if c.routes.len() > ROUTES_MAX {
            return Err(format!("transit.routes: at most {ROUTES_MAX} routes").into());
        }
        let mut routes = HashMap::with_hasher(foldhash::fast::FixedState::default());
        for r in &c.routes {
            let what = format!("transit.routes `{}`", r.site);
            if r.site.is_empty() || r.site.chars().count() > 64 {
                return Err("transit.routes: `site` must be 1 to 64 characters".into());
            }
            if r.base_fen < 0 || r.step_fen < 0 || r.max_fen.is_some_and(|m| m < 0) {
                return Err(format!("{what}: fares must not be negative").into());
            }
            if r.step_units == 0 {
                return Err(format!("{what}: step_units must be at least 1").into());
            }
            if routes
                .insert(r.site.clone().into_boxed_str(), r.clone())
                .is_some()
            {
                return Err(format!("{what} is configured twice").into());
            }
        }
        Ok(Rules {
            passback_s: c.passback_s,
            transfer_window_s: c.transfer_window_s,
            transfer_off_fen: c.transfer_off_fen,
            transfers_max: c.transfers_max,
            cap_daily_fen: c.cap_daily_fen,
            cap_weekly_fen: c.cap_weekly_fen,
            concessions: ConcessionRates::from_table("transit.concessions", &c.concessions)?,
            routes,
        })
    }

    #[inline]
    pub fn route(&self, site: &str) -> Option<&Route> {
        self.routes.get(site)
    }
}

/// One boarding as the rules see it.
#[derive(Debug, Clone, Copy)]
pub struct Boarding {
    /// The route's tariff fare, or the amount the validator asked.
    pub base_fen: i64,
    /// Where (a hash of the site, or of the terminal without one).
    pub place: u64,
    /// The local day.
    pub day: i32,
    pub now_s: i64,
}

/// Prices a boarding: the fare and the card's transit state after it, or
/// `DUPLICATE_TAP`.
#[inline]
pub fn board(rules: &Rules, card: &Card, b: Boarding) -> Result<(Fare, TransitState), Reason> {
    let t = card.transit;
    if rules.passback_s > 0
        && t.tap_s != 0
        && t.place == b.place
        && b.now_s - t.tap_s < rules.passback_s
    {
        return Err(Reason::DuplicateTap);
    }
    let mut fare = rules.concessions.apply(card, b.base_fen);
    let transfer = rules.transfer_window_s > 0
        && t.legs > 0
        && t.place != b.place
        && b.now_s - t.journey_s <= rules.transfer_window_s
        && b.now_s >= t.journey_s
        && t.legs <= rules.transfers_max;
    let (journey_s, legs) = if transfer {
        fare.transfer_off_fen = rules.transfer_off_fen.min(fare.charged_fen);
        fare.charged_fen -= fare.transfer_off_fen;
        (t.journey_s, t.legs.saturating_add(1))
    } else {
        (b.now_s, 1)
    };
    let week = week_of(b.day);
    let day_fen = if t.day == b.day { t.day_fen } else { 0 };
    let week_fen = if t.week == week { t.week_fen } else { 0 };
    let room = |cap: i64, used: i64| (cap > 0).then(|| (cap - used).max(0));
    let rooms = [
        (Cap::Daily, room(rules.cap_daily_fen, day_fen)),
        (Cap::Weekly, room(rules.cap_weekly_fen, week_fen)),
    ];
    if let Some((cap, room)) = rooms
        .iter()
        .filter_map(|(c, r)| r.map(|r| (*c, r)))
        .min_by_key(|(_, r)| *r)
    {
        if fare.charged_fen > room {
            fare.cap = Some(cap);
            fare.cap_off_fen = fare.charged_fen - room;
            fare.charged_fen = room;
        }
    }
    let after = TransitState {
        place: b.place,
        tap_s: b.now_s,
        journey_s,
        legs,
        day: b.day,
        day_fen: day_fen + fare.charged_fen,
        week,
        week_fen: week_fen + fare.charged_fen,
    };
    Ok((fare, after))
}

/// The card's transit fares with a charge of `fen` on local day `day`
/// given back (a reversal).
pub fn give_back(t: TransitState, day: i32, fen: i64) -> TransitState {
    let mut t = t;
    if t.day == day {
        t.day_fen = (t.day_fen - fen).max(0);
    }
    if t.week == week_of(day) {
        t.week_fen = (t.week_fen - fen).max(0);
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{CardStatus, Concession, Function};

    const NOW: i64 = 1_795_851_912;
    const DAY: i32 = 20_785;
    const LINE_12: u64 = 12;
    const LINE_13: u64 = 13;

    fn rules() -> Rules {
        let config: TransitConfig = toml::from_str(
            r#"
            passback_s = 30
            transfer_window_s = 3600
            transfer_off_fen = 100
            transfers_max = 1
            cap_daily_fen = 1000
            cap_weekly_fen = 3000
            concessions = { elderly = 0, disabled = 0, student = 50 }
            [[routes]]
            site = "line-12"
            fare = "flat"
            base_fen = 200
            [[routes]]
            site = "metro-1"
            fare = "stops"
            base_fen = 300
            base_units = 6
            step_fen = 100
            step_units = 4
            max_fen = 900
            [[routes]]
            site = "ferry-2"
            fare = "zones"
            base_fen = 400
            base_units = 1
            step_fen = 200
            "#,
        )
        .unwrap();
        Rules::from_config(&config).unwrap()
    }

    fn card(concessions: &[Concession], transit: TransitState) -> Card {
        Card {
            transit,
            ..Card::new(CardStatus::Active, &[Function::Transit], concessions)
        }
    }

    fn at(place: u64, now_s: i64) -> Boarding {
        Boarding {
            base_fen: 200,
            place,
            day: DAY,
            now_s,
        }
    }

    fn fresh() -> TransitState {
        TransitState::default()
    }

    /// A card that boarded line 12 `ago` seconds before NOW, with `day_fen`
    /// and `week_fen` already paid.
    fn boarded(ago: i64, legs: u8, day_fen: i64, week_fen: i64) -> TransitState {
        TransitState {
            place: LINE_12,
            tap_s: NOW - ago,
            journey_s: NOW - ago,
            legs,
            day: DAY,
            day_fen,
            week: week_of(DAY),
            week_fen,
        }
    }

    #[test]
    fn tariffs() {
        let r = rules();
        let cases = [
            ("line-12", 0, 200),
            ("line-12", 30, 200),
            ("metro-1", 1, 300),
            ("metro-1", 6, 300),
            ("metro-1", 7, 400),
            ("metro-1", 10, 400),
            ("metro-1", 11, 500),
            ("metro-1", 40, 900),
            ("ferry-2", 1, 400),
            ("ferry-2", 3, 800),
        ];
        for (site, units, want) in cases {
            assert_eq!(
                r.route(site).unwrap().fare_fen(units),
                want,
                "{site} {units}"
            );
        }
        assert!(r.route("line-99").is_none());
    }

    #[test]
    fn every_rule() {
        let r = rules();
        struct Case {
            name: &'static str,
            card: Card,
            boarding: Boarding,
            want: Result<(i64, Option<Cap>), Reason>,
        }
        let cases = [
            Case {
                name: "a first boarding pays the fare",
                card: card(&[], fresh()),
                boarding: at(LINE_12, NOW),
                want: Ok((200, None)),
            },
            Case {
                name: "the same site within passback_s is a duplicate",
                card: card(&[], boarded(29, 1, 200, 200)),
                boarding: at(LINE_12, NOW),
                want: Err(Reason::DuplicateTap),
            },
            Case {
                name: "the same site after passback_s is a new journey",
                card: card(&[], boarded(30, 1, 200, 200)),
                boarding: at(LINE_12, NOW),
                want: Ok((200, None)),
            },
            Case {
                name: "elderly ride free",
                card: card(&[Concession::Elderly], fresh()),
                boarding: at(LINE_12, NOW),
                want: Ok((0, None)),
            },
            Case {
                name: "disabled ride free",
                card: card(&[Concession::Disabled], fresh()),
                boarding: at(LINE_12, NOW),
                want: Ok((0, None)),
            },
            Case {
                name: "students pay half",
                card: card(&[Concession::Student], fresh()),
                boarding: at(LINE_12, NOW),
                want: Ok((100, None)),
            },
            Case {
                name: "another route within the window is a transfer",
                card: card(&[], boarded(1800, 1, 200, 200)),
                boarding: at(LINE_13, NOW),
                want: Ok((100, None)),
            },
            Case {
                name: "a transfer never goes below zero",
                card: card(&[Concession::Student], boarded(1800, 1, 100, 100)),
                boarding: at(LINE_13, NOW),
                want: Ok((0, None)),
            },
            Case {
                name: "a second transfer is not discounted (transfers_max 1)",
                card: card(&[], boarded(1800, 2, 300, 300)),
                boarding: at(LINE_13, NOW),
                want: Ok((200, None)),
            },
            Case {
                name: "after the window it is a new journey",
                card: card(&[], boarded(3601, 1, 200, 200)),
                boarding: at(LINE_13, NOW),
                want: Ok((200, None)),
            },
            Case {
                name: "the daily cap takes off what is past it",
                card: card(&[], boarded(7200, 1, 900, 900)),
                boarding: at(LINE_13, NOW),
                want: Ok((100, Some(Cap::Daily))),
            },
            Case {
                name: "once the daily cap is reached, rides are free",
                card: card(&[], boarded(7200, 1, 1000, 1000)),
                boarding: at(LINE_13, NOW),
                want: Ok((0, Some(Cap::Daily))),
            },
            Case {
                name: "the weekly cap binds before the daily one",
                card: card(&[], boarded(7200, 1, 0, 2950)),
                boarding: at(LINE_13, NOW),
                want: Ok((50, Some(Cap::Weekly))),
            },
            Case {
                name: "yesterday's fares do not count today",
                card: card(
                    &[],
                    TransitState {
                        day: DAY - 1,
                        ..boarded(86_400, 1, 1000, 1000)
                    },
                ),
                boarding: at(LINE_13, NOW),
                want: Ok((200, None)),
            },
            Case {
                name: "last week's fares do not count this week",
                card: card(
                    &[],
                    TransitState {
                        day: DAY - 7,
                        week: week_of(DAY) - 1,
                        ..boarded(7 * 86_400, 1, 1000, 3000)
                    },
                ),
                boarding: at(LINE_13, NOW),
                want: Ok((200, None)),
            },
        ];
        for case in cases {
            let got = board(&r, &case.card, case.boarding).map(|(f, _)| (f.charged_fen, f.cap));
            assert_eq!(got, case.want, "{}", case.name);
        }
    }

    #[test]
    fn the_fare_says_why_and_the_state_follows() {
        let r = rules();
        let c = card(&[Concession::Student], boarded(600, 1, 900, 900));
        let (fare, after) = board(&r, &c, at(LINE_13, NOW)).unwrap();
        // 200 → student half 100 → transfer −100 → 0; the cap is not reached.
        assert_eq!(fare.base_fen, 200);
        assert_eq!(fare.concession, Some(Concession::Student));
        assert_eq!(fare.concession_off_fen, 100);
        assert_eq!(fare.transfer_off_fen, 100);
        assert_eq!(fare.charged_fen, 0);
        assert_eq!(after.legs, 2);
        assert_eq!(after.journey_s, NOW - 600);
        assert_eq!(after.place, LINE_13);
        assert_eq!(after.tap_s, NOW);
        assert_eq!(after.day_fen, 900);
        let fresh_journey = board(&r, &card(&[], fresh()), at(LINE_12, NOW)).unwrap().1;
        assert_eq!((fresh_journey.legs, fresh_journey.journey_s), (1, NOW));
        assert_eq!(fresh_journey.day_fen, 200);
        assert_eq!(fresh_journey.week_fen, 200);
    }

    #[test]
    fn rules_off_by_default() {
        let r = Rules::from_config(&TransitConfig::default()).unwrap();
        let c = card(&[Concession::Elderly], boarded(1, 1, 100_000, 100_000));
        let (fare, _) = board(&r, &c, at(LINE_12, NOW)).unwrap();
        assert_eq!(fare.charged_fen, 200);
    }

    #[test]
    fn bad_config_is_named() {
        let cases = [
            ("passback_s = -1", "passback_s"),
            ("[[routes]]\nsite = \"a\"\nfare = \"flat\"\nbase_fen = -1", "negative"),
            (
                "[[routes]]\nsite = \"a\"\nfare = \"stops\"\nbase_fen = 1\nstep_units = 0",
                "step_units",
            ),
            (
                "[[routes]]\nsite = \"a\"\nfare = \"flat\"\nbase_fen = 1\n[[routes]]\nsite = \"a\"\nfare = \"flat\"\nbase_fen = 2",
                "twice",
            ),
            ("concessions = { pilot = 0 }", "pilot"),
        ];
        for (text, want) in cases {
            let c: TransitConfig = toml::from_str(text).unwrap();
            let e = Rules::from_config(&c).unwrap_err();
            assert!(e.0.contains(want), "{text}: {e}");
        }
    }

    #[test]
    fn reversal_gives_the_fare_back_to_its_day_and_week() {
        let t = boarded(0, 1, 600, 1600);
        let back = give_back(t, DAY, 200);
        assert_eq!((back.day_fen, back.week_fen), (400, 1400));
        let other_day = give_back(t, DAY - 1, 200);
        assert_eq!((other_day.day_fen, other_day.week_fen), (600, 1400));
    }
}
