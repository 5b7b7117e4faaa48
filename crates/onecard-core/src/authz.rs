//! The decision core: a pure function from an event, a card snapshot, the
//! deny list, the scenario rules and `now` to a decision and a state change.
//!
//! It does no I/O, reads no clock and takes no lock: everything it needs is
//! handed in, which is what makes it table-testable and lets the caller
//! serialize per card around it. A decline is a value ([`Decision::Decline`]),
//! never an error: there is no way for this function to fail.

use crate::model::{Card, CardNo, CardStatus, Function, Reason, Scenario};
use crate::scenario::{self, access, culture, identity, region, transit, Fare};

/// What one scenario requires and allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScenarioRule {
    /// The function the card must have loaded, if any.
    pub function: Option<Function>,
    /// Whether the scenario moves money: then the amount counts against the
    /// daily cap and must not exceed `amount_max_fen`.
    pub charges: bool,
    /// The largest single amount approved in this scenario.
    pub amount_max_fen: i64,
}

/// The scenario rules and card-wide limits, built once from the config.
#[derive(Debug, Clone)]
pub struct Policy {
    rules: [ScenarioRule; Scenario::ALL.len()],
    pub card_daily_spend_max_fen: i64,
    pub day_offset_minutes: i32,
    pub transit: transit::Rules,
    pub culture: culture::Rules,
    pub identity: identity::Rules,
    pub regions: region::Rules,
    pub medical: crate::scenario::medical::Rules,
}

impl Policy {
    pub fn with_defaults(card_daily_spend_max_fen: i64, day_offset_minutes: i32) -> Policy {
        let mut rules = [ScenarioRule {
            function: None,
            charges: false,
            amount_max_fen: 0,
        }; Scenario::ALL.len()];
        for s in Scenario::ALL {
            rules[*s as usize] = scenario_default(*s);
        }
        Policy {
            rules,
            card_daily_spend_max_fen,
            day_offset_minutes,
            transit: transit::Rules::default(),
            culture: culture::Rules::default(),
            identity: identity::Rules::default(),
            regions: region::Rules::default(),
            medical: crate::scenario::medical::Rules::default(),
        }
    }

    #[inline]
    pub fn rule(&self, s: Scenario) -> ScenarioRule {
        self.rules[s as usize]
    }

    pub fn set_rule(&mut self, s: Scenario, rule: ScenarioRule) {
        self.rules[s as usize] = rule;
    }

    /// The local calendar day that `now_unix` falls in, as days since the epoch.
    #[inline]
    pub fn local_day(&self, now_unix: i64) -> i32 {
        crate::time::local_day(now_unix, self.day_offset_minutes)
    }

    /// Whether the scenario's price at this site comes from the config (a
    /// transit route's tariff, a venue's fee), so that the terminal need
    /// not send an amount.
    #[inline]
    pub fn priced_here(&self, scenario: Scenario, site: Option<&str>) -> bool {
        let Some(site) = site else { return false };
        match scenario {
            Scenario::Transit => self.transit.route(site).is_some(),
            Scenario::Culture => self
                .culture
                .venue(site)
                .is_some_and(|v| v.fee_fen.is_some()),
            _ => false,
        }
    }
}

/// Built-in rules: which function each scenario needs and whether it charges.
pub fn scenario_default(s: Scenario) -> ScenarioRule {
    let (function, charges, amount_max_fen) = match s {
        Scenario::Transit => (Some(Function::Transit), true, 2_000),
        Scenario::Medical => (Some(Function::Medical), true, 500_000),
        Scenario::Payment => (Some(Function::Financial), true, 200_000),
        Scenario::Culture => (None, true, 20_000),
        Scenario::Access => (None, false, 0),
        Scenario::Identity => (None, false, 0),
        Scenario::Health => (None, false, 0),
    };
    ScenarioRule {
        function,
        charges,
        amount_max_fen,
    }
}

/// `policy.day_offset_minutes` by default: China Standard Time, +08:00.
pub const DAY_OFFSET_MINUTES_DEFAULT: i32 = 8 * 60;
/// `policy.card_daily_spend_max_fen` by default.
pub const CARD_DAILY_SPEND_MAX_FEN_DEFAULT: i64 = 100_000;

/// `[policy]`: the card-wide limits.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// The offset from UTC of the local day that daily caps count in
    /// (China Standard Time, +08:00, by default).
    pub day_offset_minutes: i32,
    /// What one card may spend per local day over all charging scenarios.
    pub card_daily_spend_max_fen: i64,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            day_offset_minutes: DAY_OFFSET_MINUTES_DEFAULT,
            card_daily_spend_max_fen: CARD_DAILY_SPEND_MAX_FEN_DEFAULT,
        }
    }
}

/// `[scenarios.*]`: one table per scenario; keys left out keep that
/// scenario's default.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScenariosConfig {
    pub transit: ScenarioToml,
    pub medical: ScenarioToml,
    pub culture: ScenarioToml,
    pub access: ScenarioToml,
    pub payment: ScenarioToml,
    pub identity: ScenarioToml,
    pub health: ScenarioToml,
}

#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScenarioToml {
    /// The card function the scenario needs, or `"none"`.
    pub function: Option<String>,
    /// Whether the scenario moves money (then `amount_fen` is required and
    /// counts against the daily cap).
    pub charges: Option<bool>,
    /// The largest single amount approved.
    pub amount_max_fen: Option<i64>,
}

/// The config file's sections the rules are made of; the gateway's config
/// lends them, each under its own key.
#[derive(Debug, Clone, Copy)]
pub struct Sections<'a> {
    pub policy: &'a PolicyConfig,
    pub scenarios: &'a ScenariosConfig,
    pub transit: &'a transit::TransitConfig,
    pub culture: &'a culture::CultureConfig,
    pub identity: &'a identity::IdentityConfig,
    pub regions: &'a region::RegionsConfig,
    pub medical: &'a crate::scenario::medical::MedicalConfig,
}

/// The rule sections on their own, as a test or a tool writes them in
/// TOML (the gateway's config has the same keys among others).
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RulesConfig {
    pub policy: PolicyConfig,
    pub scenarios: ScenariosConfig,
    pub transit: transit::TransitConfig,
    pub culture: culture::CultureConfig,
    pub identity: identity::IdentityConfig,
    pub regions: region::RegionsConfig,
    pub medical: crate::scenario::medical::MedicalConfig,
}

impl RulesConfig {
    pub fn sections(&self) -> Sections<'_> {
        Sections {
            policy: &self.policy,
            scenarios: &self.scenarios,
            transit: &self.transit,
            culture: &self.culture,
            identity: &self.identity,
            regions: &self.regions,
            medical: &self.medical,
        }
    }
}

impl Policy {
    /// The rules a config describes, or what is wrong with it (a message
    /// naming the key).
    pub fn from_config(c: Sections<'_>) -> Result<Policy, crate::Invalid> {
        let s = c.scenarios;
        let tables = [
            (Scenario::Transit, &s.transit),
            (Scenario::Medical, &s.medical),
            (Scenario::Culture, &s.culture),
            (Scenario::Access, &s.access),
            (Scenario::Payment, &s.payment),
            (Scenario::Identity, &s.identity),
            (Scenario::Health, &s.health),
        ];
        let mut policy = Policy::with_defaults(
            c.policy.card_daily_spend_max_fen,
            c.policy.day_offset_minutes,
        );
        for (scenario, table) in tables {
            policy.set_rule(scenario, scenario_rule(scenario, table)?);
        }
        policy.transit = transit::Rules::from_config(c.transit)?;
        policy.culture = culture::Rules::from_config(c.culture)?;
        policy.identity = identity::Rules::from_config(c.identity)?;
        policy.regions = region::Rules::from_config(c.regions)?;
        policy.medical = crate::scenario::medical::Rules::from_config(c.medical)?;
        if !c.medical.categories.is_empty() {
            // A hold reserves the daily spend and needs the medical
            // function; a scenario that neither charges nor checks it
            // could not keep a hold's promises.
            let rule = policy.rule(Scenario::Medical);
            if !rule.charges || rule.function != Some(Function::Medical) {
                return Err("medical.categories need scenarios.medical to charge and to require the medical function (the defaults)".into());
            }
        }
        Ok(policy)
    }
}

/// One `[scenarios.<name>]` table over the scenario's default.
fn scenario_rule(scenario: Scenario, table: &ScenarioToml) -> Result<ScenarioRule, crate::Invalid> {
    let mut rule = scenario_default(scenario);
    if let Some(f) = &table.function {
        rule.function = match f.as_str() {
            "none" | "" => None,
            name => Some(Function::parse(name).ok_or_else(|| {
                format!(
                    "scenarios.{scenario}.function: unknown function `{name}`; expected none or one of {}",
                    Function::expected()
                )
            })?),
        };
    }
    if let Some(c) = table.charges {
        rule.charges = c;
    }
    if let Some(m) = table.amount_max_fen {
        if m < 0 {
            return Err(format!("scenarios.{scenario}.amount_max_fen must not be negative").into());
        }
        rule.amount_max_fen = m;
    }
    Ok(rule)
}

/// The part of a request the decision depends on.
#[derive(Debug, Clone, Copy)]
pub struct Event<'a> {
    pub card_no: &'a CardNo,
    pub scenario: Scenario,
    pub amount_fen: i64,
}

/// What the gateway looked up for the decision besides the card and the
/// deny list; [`Facts::default`] for a scenario that needs none.
#[derive(Debug, Clone, Copy)]
pub struct Facts<'a> {
    pub site: Option<&'a str>,
    /// A hash of the site (of the terminal without one): anti-passback
    /// and transfers compare places.
    pub place: u64,
    /// Stops or zones travelled, on a route that charges by them.
    pub units: Option<u32>,
    /// The venue's approved entries so far today.
    pub venue_entries: u32,
    /// The card's allow-list entry at a door.
    pub allow: access::Allow,
    /// The purpose of the identity counter asking.
    pub purpose: Option<&'a identity::Purpose>,
    /// Whether a partner region's own deny list names the card.
    pub partner_listed: bool,
}

impl Default for Facts<'_> {
    fn default() -> Self {
        Facts {
            site: None,
            place: 0,
            units: None,
            venue_entries: 0,
            allow: access::Allow::Open,
            purpose: None,
            partner_listed: false,
        }
    }
}

/// Membership in the deny list, as the decision needs it.
pub trait DenySet {
    fn contains(&self, card: &CardNo) -> bool;

    /// Who listed the card. By default every entry is an operator's.
    fn listing(&self, card: &CardNo) -> Listing {
        if self.contains(card) {
            Listing::Operator
        } else {
            Listing::No
        }
    }
}

/// Why a card is on the deny list, as far as the answer's reason goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listing {
    No,
    /// By an operator, for reasons of their own (fraud, say): the answer
    /// says `DENYLISTED` whatever the card's status.
    Operator,
    /// By a card-life change (loss, freeze, cancellation, replacement),
    /// so that offline validators stop the card too: the card's own
    /// status names the reason.
    CardLife,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Approve { amount_fen: i64 },
    Decline(Reason),
}

impl Decision {
    #[inline]
    pub fn reason(self) -> Reason {
        match self {
            Decision::Approve { .. } => Reason::Ok,
            Decision::Decline(r) => r,
        }
    }
    #[inline]
    pub fn is_approve(self) -> bool {
        matches!(self, Decision::Approve { .. })
    }
    /// The amount charged: zero for a decline.
    #[inline]
    pub fn amount_fen(self) -> i64 {
        match self {
            Decision::Approve { amount_fen } => amount_fen,
            Decision::Decline(_) => 0,
        }
    }
}

/// A decision and the state to store with it (`None`: unchanged).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub decision: Decision,
    pub card_after: Option<Card>,
    /// How the charge was worked out, where a tariff applied (transit,
    /// culture).
    pub fare: Option<Fare>,
    /// The venue's entries today with this one, where the venue has a
    /// quota.
    pub venue_entries: Option<u32>,
}

impl Outcome {
    #[inline]
    pub fn decline(reason: Reason) -> Outcome {
        Outcome {
            decision: Decision::Decline(reason),
            card_after: None,
            fare: None,
            venue_entries: None,
        }
    }
}

/// Decides one event. The checks run in a fixed order and the first that
/// fails names the reason: the deny list first where an operator listed the
/// card (their "stop everywhere" switch, which may list cards this gateway
/// holds no state for), then a stopped card's status (its card-life deny
/// entry says less), the issuing region (a partner's card: the agreement's
/// scenarios and the partner's deny list), existence, the scenario's
/// function, the scenario's own rules, and the amount limits.
pub fn decide(
    event: Event<'_>,
    card: Option<&Card>,
    deny: &impl DenySet,
    policy: &Policy,
    facts: &Facts<'_>,
    now_unix: i64,
) -> Outcome {
    // A partner's card this gateway has not seen yet starts from a blank
    // active card: its transit state (anti-passback, caps) is kept here.
    let blank = Card::new(CardStatus::Active, &[], &[]);
    let card = match admit_card(event, card, &blank, deny, policy, facts) {
        Ok(c) => c,
        Err(r) => return Outcome::decline(r),
    };
    let day = policy.local_day(now_unix);
    let rule = policy.rule(event.scenario);
    let mut o = match scenario_rules(event, card, rule, policy, facts, now_unix) {
        Ok(o) => o,
        Err(r) => return Outcome::decline(r),
    };
    let charge = if rule.charges { o.charge } else { 0 };
    if charge > 0 {
        match card.spent_on(day).checked_add(charge) {
            Some(total) if total <= policy.card_daily_spend_max_fen => {
                o.after.spent_day = day;
                o.after.spent_fen = total;
                o.changed = true;
            }
            _ => return Outcome::decline(Reason::LimitExceeded),
        }
    }
    Outcome {
        decision: Decision::Approve { amount_fen: charge },
        card_after: o.changed.then_some(o.after),
        fare: o.fare,
        venue_entries: o.venue_entries,
    }
}

/// The checks every scenario shares, in order: an operator's deny entry,
/// the card's status, a card-life deny entry, the issuing region, the
/// card's existence and the scenario's function. Returns the card to
/// decide on (`blank` for a partner's card seen here the first time).
#[inline]
fn admit_card<'c>(
    event: Event<'_>,
    card: Option<&'c Card>,
    blank: &'c Card,
    deny: &impl DenySet,
    policy: &Policy,
    facts: &Facts<'_>,
) -> Result<&'c Card, Reason> {
    let listing = deny.listing(event.card_no);
    if listing == Listing::Operator {
        return Err(Reason::Denylisted);
    }
    // A card stopped by a card-life change is also listed (for offline
    // validators); its own status says more: CARD_LOST tells the counter
    // what to do.
    match card.map(|c| c.status) {
        Some(CardStatus::Lost) => return Err(Reason::CardLost),
        Some(CardStatus::Frozen) => return Err(Reason::CardFrozen),
        Some(CardStatus::Cancelled) => return Err(Reason::CardCancelled),
        Some(CardStatus::Active) | None => {}
    }
    if listing == Listing::CardLife {
        return Err(Reason::Denylisted);
    }
    let origin = policy.regions.origin(event.card_no);
    let card = match (origin, card) {
        (region::Origin::Foreign, _) => return Err(Reason::RegionNotAccepted),
        (region::Origin::Partner(p), c) => {
            if !policy.regions.covers(p, event.scenario) {
                return Err(Reason::RegionNotAccepted);
            }
            if facts.partner_listed {
                return Err(Reason::Denylisted);
            }
            c.unwrap_or(blank)
        }
        (region::Origin::Home, Some(c)) => c,
        (region::Origin::Home, None) => return Err(Reason::CardNotFound),
    };
    // A partner's cards carry the partner's functions, which this gateway
    // does not know: the agreement covering the scenario stands for them.
    if let (Some(f), region::Origin::Home) = (policy.rule(event.scenario).function, origin) {
        if !card.has_function(f) {
            return Err(Reason::FunctionNotEnabled);
        }
    }
    Ok(card)
}

/// What a scenario's own rules made of an admitted card: the charge
/// before the daily cap, and the state that changes with it.
struct Ruled {
    charge: i64,
    after: Card,
    changed: bool,
    fare: Option<Fare>,
    venue_entries: Option<u32>,
}

/// The scenario's own rules (`scenario::*`) and its per-transaction
/// maximum.
#[inline]
fn scenario_rules(
    event: Event<'_>,
    card: &Card,
    rule: ScenarioRule,
    policy: &Policy,
    facts: &Facts<'_>,
    now_unix: i64,
) -> Result<Ruled, Reason> {
    let mut r = Ruled {
        charge: 0,
        after: *card,
        changed: false,
        fare: None,
        venue_entries: None,
    };
    let over_max = |amount: i64| rule.charges && amount > rule.amount_max_fen;
    match event.scenario {
        Scenario::Transit => {
            let base = match facts.site.and_then(|s| policy.transit.route(s)) {
                Some(route) => route.fare_fen(facts.units.unwrap_or(0)),
                None => event.amount_fen,
            };
            if over_max(base) {
                return Err(Reason::LimitExceeded);
            }
            let boarding = transit::Boarding {
                base_fen: base,
                place: facts.place,
                day: policy.local_day(now_unix),
                now_s: now_unix,
            };
            let (f, t) = transit::board(&policy.transit, card, boarding)?;
            r.after.transit = t;
            r.changed = true;
            r.fare = Some(f);
            r.charge = f.charged_fen;
        }
        Scenario::Culture => {
            let venue = facts.site.and_then(|s| policy.culture.venue(s));
            if over_max(event.amount_fen) {
                return Err(Reason::LimitExceeded);
            }
            let e = culture::enter(
                &policy.culture,
                card,
                venue,
                event.amount_fen,
                facts.venue_entries,
            )?;
            r.after.visits = r.after.visits.saturating_add(1);
            r.changed = true;
            r.fare = Some(e.fare);
            r.venue_entries = venue.filter(|v| v.quota_daily > 0).map(|_| e.entries_today);
            r.charge = e.fare.charged_fen;
        }
        Scenario::Access => {
            let minute = scenario::local_minute(now_unix, policy.day_offset_minutes);
            access::admit(facts.allow, minute)?;
        }
        Scenario::Identity => {
            if let Some(purpose) = facts.purpose {
                identity::check(purpose, card)?;
            }
        }
        _ => {
            if over_max(event.amount_fen) {
                return Err(Reason::LimitExceeded);
            }
            r.charge = event.amount_fen;
        }
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;
    use crate::model::Concession;

    impl DenySet for HashSet<CardNo> {
        fn contains(&self, card: &CardNo) -> bool {
            HashSet::contains(self, card)
        }
    }

    const NOW: i64 = 1_795_851_912; // 2026-11-28T07:45:12Z
    const CARD: &str = "500118A12345678";
    const DENIED: &str = "500118D00000001";

    fn policy() -> Policy {
        Policy::with_defaults(1_000, 480)
    }

    fn active(functions: &[Function]) -> Card {
        Card::new(CardStatus::Active, functions, &[Concession::Elderly])
    }

    struct Case {
        name: &'static str,
        card_no: &'static str,
        card: Option<Card>,
        scenario: Scenario,
        amount_fen: i64,
        want: Decision,
    }

    fn check(case: &Case) {
        let deny: HashSet<CardNo> = [CardNo::parse(DENIED).unwrap()].into_iter().collect();
        let card_no = CardNo::parse(case.card_no).unwrap();
        let event = Event {
            card_no: &card_no,
            scenario: case.scenario,
            amount_fen: case.amount_fen,
        };
        let out = decide(
            event,
            case.card.as_ref(),
            &deny,
            &policy(),
            &Facts::default(),
            NOW,
        );
        assert_eq!(out.decision, case.want, "case {}", case.name);
        if !out.decision.is_approve() {
            assert_eq!(
                out.card_after, None,
                "a decline changes nothing: {}",
                case.name
            );
        }
    }

    #[test]
    fn every_reason_code() {
        let day = policy().local_day(NOW);
        let spent = |fen| Card {
            spent_day: day,
            spent_fen: fen,
            ..active(&[Function::Transit, Function::Financial])
        };
        let spent_yesterday = Card {
            spent_day: day - 1,
            spent_fen: 1_000,
            ..active(&[Function::Transit])
        };
        let status = |s| Card {
            status: s,
            ..active(&[Function::Transit])
        };
        let cases = [
            Case {
                name: "approve",
                card_no: CARD,
                card: Some(active(&[Function::Transit])),
                scenario: Scenario::Transit,
                amount_fen: 200,
                want: Decision::Approve { amount_fen: 200 },
            },
            Case {
                name: "unknown card",
                card_no: CARD,
                card: None,
                scenario: Scenario::Transit,
                amount_fen: 200,
                want: Decision::Decline(Reason::CardNotFound),
            },
            Case {
                name: "deny-listed wins over a good card",
                card_no: DENIED,
                card: Some(active(&[Function::Transit])),
                scenario: Scenario::Transit,
                amount_fen: 200,
                want: Decision::Decline(Reason::Denylisted),
            },
            Case {
                name: "deny-listed without state",
                card_no: DENIED,
                card: None,
                scenario: Scenario::Transit,
                amount_fen: 200,
                want: Decision::Decline(Reason::Denylisted),
            },
            Case {
                name: "an operator's deny entry wins over a lost status",
                card_no: DENIED,
                card: Some(status(CardStatus::Lost)),
                scenario: Scenario::Transit,
                amount_fen: 200,
                want: Decision::Decline(Reason::Denylisted),
            },
            Case {
                name: "lost",
                card_no: CARD,
                card: Some(status(CardStatus::Lost)),
                scenario: Scenario::Transit,
                amount_fen: 200,
                want: Decision::Decline(Reason::CardLost),
            },
            Case {
                name: "frozen",
                card_no: CARD,
                card: Some(status(CardStatus::Frozen)),
                scenario: Scenario::Transit,
                amount_fen: 200,
                want: Decision::Decline(Reason::CardFrozen),
            },
            Case {
                name: "cancelled",
                card_no: CARD,
                card: Some(status(CardStatus::Cancelled)),
                scenario: Scenario::Transit,
                amount_fen: 200,
                want: Decision::Decline(Reason::CardCancelled),
            },
            Case {
                name: "medical needs medical",
                card_no: CARD,
                card: Some(active(&[Function::Transit])),
                scenario: Scenario::Medical,
                amount_fen: 200,
                want: Decision::Decline(Reason::FunctionNotEnabled),
            },
            Case {
                name: "payment needs financial",
                card_no: CARD,
                card: Some(active(&[Function::Medical])),
                scenario: Scenario::Payment,
                amount_fen: 200,
                want: Decision::Decline(Reason::FunctionNotEnabled),
            },
            Case {
                name: "transit needs transit",
                card_no: CARD,
                card: Some(active(&[Function::Financial])),
                scenario: Scenario::Transit,
                amount_fen: 200,
                want: Decision::Decline(Reason::FunctionNotEnabled),
            },
            Case {
                name: "access needs no function",
                card_no: CARD,
                card: Some(active(&[])),
                scenario: Scenario::Access,
                amount_fen: 0,
                want: Decision::Approve { amount_fen: 0 },
            },
            Case {
                name: "over the per-transaction maximum",
                card_no: CARD,
                card: Some(active(&[Function::Transit])),
                scenario: Scenario::Transit,
                amount_fen: 2_001,
                want: Decision::Decline(Reason::LimitExceeded),
            },
            Case {
                name: "at the per-transaction maximum, over the cap",
                card_no: CARD,
                card: Some(active(&[Function::Transit])),
                scenario: Scenario::Transit,
                amount_fen: 2_000,
                want: Decision::Decline(Reason::LimitExceeded),
            },
            Case {
                name: "exactly reaches the daily cap",
                card_no: CARD,
                card: Some(spent(800)),
                scenario: Scenario::Transit,
                amount_fen: 200,
                want: Decision::Approve { amount_fen: 200 },
            },
            Case {
                name: "one fen over the daily cap",
                card_no: CARD,
                card: Some(spent(801)),
                scenario: Scenario::Transit,
                amount_fen: 200,
                want: Decision::Decline(Reason::LimitExceeded),
            },
            Case {
                name: "the cap counts across scenarios",
                card_no: CARD,
                card: Some(spent(900)),
                scenario: Scenario::Payment,
                amount_fen: 200,
                want: Decision::Decline(Reason::LimitExceeded),
            },
            Case {
                name: "yesterday's spending does not count",
                card_no: CARD,
                card: Some(spent_yesterday),
                scenario: Scenario::Transit,
                amount_fen: 200,
                want: Decision::Approve { amount_fen: 200 },
            },
            Case {
                name: "zero fare at the cap",
                card_no: CARD,
                card: Some(spent(1_000)),
                scenario: Scenario::Transit,
                amount_fen: 0,
                want: Decision::Approve { amount_fen: 0 },
            },
            Case {
                name: "non-charging scenario at the cap",
                card_no: CARD,
                card: Some(spent(1_000)),
                scenario: Scenario::Identity,
                amount_fen: 0,
                want: Decision::Approve { amount_fen: 0 },
            },
        ];
        for case in &cases {
            check(case);
        }
        // Every reason the core can produce is covered by the table (QR
        // and credential reasons come from the credential step, `REVERSED`
        // from the idempotency step, the hold reasons from a capture or
        // void of a medical hold (`scenario::medical` and `holds` tables,
        // `tests/medical.rs`), not from here).
        let covered: HashSet<Reason> = cases.iter().map(|c| c.want.reason()).collect();
        for r in Reason::ALL {
            let elsewhere = matches!(
                r,
                Reason::QrInvalid
                    | Reason::QrExpired
                    | Reason::QrReplayed
                    | Reason::Reversed
                    | Reason::CredentialUnbound
                    | Reason::HoldNotFound
                    | Reason::HoldExpired
                    | Reason::HoldClosed
            );
            // The scenarios' own reasons have their table below.
            let scenario = SCENARIO_REASONS.contains(r);
            assert!(
                elsewhere || scenario || covered.contains(r),
                "no case for {r:?}"
            );
        }
    }

    const SCENARIO_REASONS: &[Reason] = &[
        Reason::DuplicateTap,
        Reason::QuotaExhausted,
        Reason::RegionNotAccepted,
        Reason::NotAllowed,
        Reason::OutsideHours,
    ];

    /// The pilot's rules, as `config/dev.toml` has them.
    fn scenario_policy() -> Policy {
        toml::from_str::<RulesConfig>(
            r#"
            [policy]
            card_daily_spend_max_fen = 5000
            [transit]
            passback_s = 30
            transfer_window_s = 3600
            transfer_off_fen = 100
            transfers_max = 1
            cap_daily_fen = 1000
            concessions = { elderly = 0, student = 50 }
            [[transit.routes]]
            site = "line-12"
            fare = "flat"
            base_fen = 200
            [[transit.routes]]
            site = "metro-1"
            fare = "stops"
            base_fen = 300
            base_units = 6
            step_fen = 100
            step_units = 4
            [[transit.routes]]
            site = "express-9"
            fare = "flat"
            base_fen = 5000
            [culture]
            concessions = { student = 50 }
            [[culture.venues]]
            site = "museum-1"
            quota_daily = 100
            fee_fen = 3000
            [identity.purposes.hr]
            disclose = ["name"]
            require_functions = ["medical"]
            [regions]
            home = ["50"]
            [[regions.partners]]
            name = "sichuan"
            prefixes = ["51"]
            scenarios = ["transit", "culture"]
            "#,
        )
        .map(|c| Policy::from_config(c.sections()))
        .unwrap()
        .unwrap()
    }

    #[test]
    fn every_scenario_rule_through_decide() {
        use crate::scenario::{access::Windows, identity, place_hash};
        let p = scenario_policy();
        let hr = p.identity.purpose_of("x").clone();
        let hr = identity::Purpose {
            name: "hr".into(),
            require: vec![Function::Medical],
            ..hr
        };
        let line_12 = place_hash("line-12");
        let day = p.local_day(NOW);
        let card = |concessions: &[Concession]| {
            Card::new(CardStatus::Active, &[Function::Transit], concessions)
        };
        let just_tapped = Card {
            transit: crate::model::TransitState {
                place: line_12,
                tap_s: NOW - 5,
                journey_s: NOW - 5,
                legs: 1,
                day,
                day_fen: 200,
                week: crate::scenario::week_of(day),
                week_fen: 200,
            },
            ..card(&[])
        };
        let at = |site: &'static str| Facts {
            site: Some(site),
            place: place_hash(site),
            ..Facts::default()
        };
        let open_day = Windows::parse(&["07:00-22:00"]).unwrap();
        let night = Windows::parse(&["22:00-06:00"]).unwrap();
        struct Case<'a> {
            name: &'static str,
            card_no: &'static str,
            card: Option<Card>,
            scenario: Scenario,
            amount_fen: i64,
            facts: Facts<'a>,
            want: Decision,
        }
        let cases = [
            Case {
                name: "the route's tariff, not the validator's amount",
                card_no: CARD,
                card: Some(card(&[])),
                scenario: Scenario::Transit,
                amount_fen: 0,
                facts: at("line-12"),
                want: Decision::Approve { amount_fen: 200 },
            },
            Case {
                name: "by stops travelled",
                card_no: CARD,
                card: Some(card(&[])),
                scenario: Scenario::Transit,
                amount_fen: 0,
                facts: Facts {
                    units: Some(10),
                    ..at("metro-1")
                },
                want: Decision::Approve { amount_fen: 400 },
            },
            Case {
                name: "a double tap",
                card_no: CARD,
                card: Some(just_tapped),
                scenario: Scenario::Transit,
                amount_fen: 0,
                facts: at("line-12"),
                want: Decision::Decline(Reason::DuplicateTap),
            },
            Case {
                name: "a transfer right after, on another route",
                card_no: CARD,
                card: Some(just_tapped),
                scenario: Scenario::Transit,
                amount_fen: 200,
                facts: at("line-13"),
                want: Decision::Approve { amount_fen: 100 },
            },
            Case {
                name: "elderly ride free",
                card_no: CARD,
                card: Some(card(&[Concession::Elderly])),
                scenario: Scenario::Transit,
                amount_fen: 0,
                facts: at("line-12"),
                want: Decision::Approve { amount_fen: 0 },
            },
            Case {
                name: "a tariff above the scenario's maximum",
                card_no: CARD,
                card: Some(card(&[])),
                scenario: Scenario::Transit,
                amount_fen: 0,
                facts: at("express-9"),
                want: Decision::Decline(Reason::LimitExceeded),
            },
            Case {
                name: "a venue's fee with a student's half",
                card_no: CARD,
                card: Some(card(&[Concession::Student])),
                scenario: Scenario::Culture,
                amount_fen: 0,
                facts: at("museum-1"),
                want: Decision::Approve { amount_fen: 1500 },
            },
            Case {
                name: "a full venue",
                card_no: CARD,
                card: Some(card(&[])),
                scenario: Scenario::Culture,
                amount_fen: 0,
                facts: Facts {
                    venue_entries: 100,
                    ..at("museum-1")
                },
                want: Decision::Decline(Reason::QuotaExhausted),
            },
            Case {
                name: "a door not on the card's list",
                card_no: CARD,
                card: Some(card(&[])),
                scenario: Scenario::Access,
                amount_fen: 0,
                facts: Facts {
                    allow: access::Allow::NotListed,
                    ..at("community-1")
                },
                want: Decision::Decline(Reason::NotAllowed),
            },
            Case {
                name: "a door on the list, within its hours (15:45 local)",
                card_no: CARD,
                card: Some(card(&[])),
                scenario: Scenario::Access,
                amount_fen: 0,
                facts: Facts {
                    allow: access::Allow::Listed(open_day),
                    ..at("community-1")
                },
                want: Decision::Approve { amount_fen: 0 },
            },
            Case {
                name: "a door on the list, outside its hours",
                card_no: CARD,
                card: Some(card(&[])),
                scenario: Scenario::Access,
                amount_fen: 0,
                facts: Facts {
                    allow: access::Allow::Listed(night),
                    ..at("community-1")
                },
                want: Decision::Decline(Reason::OutsideHours),
            },
            Case {
                name: "an HR counter serving the insured only",
                card_no: CARD,
                card: Some(card(&[])),
                scenario: Scenario::Identity,
                amount_fen: 0,
                facts: Facts {
                    purpose: Some(&hr),
                    ..Facts::default()
                },
                want: Decision::Decline(Reason::FunctionNotEnabled),
            },
            Case {
                name: "a card of a region with no agreement",
                card_no: "110101A12345678",
                card: None,
                scenario: Scenario::Transit,
                amount_fen: 200,
                facts: at("line-12"),
                want: Decision::Decline(Reason::RegionNotAccepted),
            },
            Case {
                name: "a partner's card outside the agreement",
                card_no: "510104A12345678",
                card: None,
                scenario: Scenario::Medical,
                amount_fen: 200,
                facts: Facts::default(),
                want: Decision::Decline(Reason::RegionNotAccepted),
            },
            Case {
                name: "a partner's card on the bus, never seen here",
                card_no: "510104A12345678",
                card: None,
                scenario: Scenario::Transit,
                amount_fen: 0,
                facts: at("line-12"),
                want: Decision::Approve { amount_fen: 200 },
            },
            Case {
                name: "a partner's card on the partner's deny list",
                card_no: "510104A12345678",
                card: None,
                scenario: Scenario::Transit,
                amount_fen: 0,
                facts: Facts {
                    partner_listed: true,
                    ..at("line-12")
                },
                want: Decision::Decline(Reason::Denylisted),
            },
        ];
        let deny: HashSet<CardNo> = HashSet::new();
        for case in &cases {
            let card_no = CardNo::parse(case.card_no).unwrap();
            let event = Event {
                card_no: &card_no,
                scenario: case.scenario,
                amount_fen: case.amount_fen,
            };
            let out = decide(event, case.card.as_ref(), &deny, &p, &case.facts, NOW);
            assert_eq!(out.decision, case.want, "{}", case.name);
            if !out.decision.is_approve() {
                assert_eq!(out.card_after, None, "{}", case.name);
            }
        }
        let covered: HashSet<Reason> = cases.iter().map(|c| c.want.reason()).collect();
        for r in SCENARIO_REASONS {
            assert!(covered.contains(r), "no case for {r:?}");
        }
    }

    #[test]
    fn approvals_carry_their_state_changes() {
        let p = scenario_policy();
        let deny: HashSet<CardNo> = HashSet::new();
        let card_no = CardNo::parse(CARD).unwrap();
        let card = Card::new(
            CardStatus::Active,
            &[Function::Transit],
            &[Concession::Student],
        );
        let facts = Facts {
            site: Some("museum-1"),
            venue_entries: 7,
            ..Facts::default()
        };
        let event = Event {
            card_no: &card_no,
            scenario: Scenario::Culture,
            amount_fen: 0,
        };
        let out = decide(event, Some(&card), &deny, &p, &facts, NOW);
        let after = out.card_after.unwrap();
        assert_eq!(after.visits, 1);
        assert_eq!(after.spent_fen, 1500);
        assert_eq!(out.venue_entries, Some(8));
        let fare = out.fare.unwrap();
        assert_eq!((fare.base_fen, fare.concession_off_fen), (3000, 1500));
        // A boarding remembers where and when, even when it is free.
        let elderly = Card::new(
            CardStatus::Active,
            &[Function::Transit],
            &[Concession::Elderly],
        );
        let ride = Event {
            scenario: Scenario::Transit,
            ..event
        };
        let bus = Facts {
            site: Some("line-12"),
            place: crate::scenario::place_hash("line-12"),
            ..Facts::default()
        };
        let out = decide(ride, Some(&elderly), &deny, &p, &bus, NOW);
        assert_eq!(out.decision, Decision::Approve { amount_fen: 0 });
        let t = out.card_after.unwrap().transit;
        assert_eq!((t.place, t.tap_s), (bus.place, NOW));
        let again = decide(ride, out.card_after.as_ref(), &deny, &p, &bus, NOW + 1);
        assert_eq!(again.decision, Decision::Decline(Reason::DuplicateTap));
        // The daily transit cap: rides past it are approved at zero fare
        // (from 07:45 local, more than an hour apart: no transfers).
        let morning = NOW - 8 * 3600;
        let mut c = Card::new(CardStatus::Active, &[Function::Transit], &[]);
        let mut charged = Vec::new();
        for i in 0..7 {
            let site = if i % 2 == 0 { "line-12" } else { "metro-1" };
            let f = Facts {
                site: Some(site),
                place: crate::scenario::place_hash(site),
                units: Some(1),
                ..Facts::default()
            };
            let out = decide(ride, Some(&c), &deny, &p, &f, morning + i * 4000);
            charged.push(out.decision.amount_fen());
            c = out.card_after.unwrap();
        }
        assert_eq!(charged, [200, 300, 200, 300, 0, 0, 0]);
    }

    #[test]
    fn a_card_life_entry_lets_the_status_speak() {
        struct Life;
        impl DenySet for Life {
            fn contains(&self, _: &CardNo) -> bool {
                true
            }
            fn listing(&self, _: &CardNo) -> Listing {
                Listing::CardLife
            }
        }
        let card_no = CardNo::parse(CARD).unwrap();
        let event = Event {
            card_no: &card_no,
            scenario: Scenario::Transit,
            amount_fen: 200,
        };
        let cases = [
            (Some(CardStatus::Lost), Reason::CardLost),
            (Some(CardStatus::Frozen), Reason::CardFrozen),
            (Some(CardStatus::Cancelled), Reason::CardCancelled),
            (Some(CardStatus::Active), Reason::Denylisted),
            (None, Reason::Denylisted),
        ];
        for (st, want) in cases {
            let card = st.map(|s| Card {
                status: s,
                ..active(&[Function::Transit])
            });
            let got = decide(
                event,
                card.as_ref(),
                &Life,
                &policy(),
                &Facts::default(),
                NOW,
            )
            .decision;
            assert_eq!(got, Decision::Decline(want), "{st:?}");
        }
    }

    #[test]
    fn approval_updates_the_daily_counter() {
        let card_no = CardNo::parse(CARD).unwrap();
        let p = policy();
        let deny = HashSet::new();
        let mut card = active(&[Function::Transit]);
        for expected in [200, 400, 600, 800, 1_000] {
            let out = decide(
                Event {
                    card_no: &card_no,
                    scenario: Scenario::Transit,
                    amount_fen: 200,
                },
                Some(&card),
                &deny,
                &p,
                &Facts::default(),
                NOW,
            );
            card = out.card_after.expect("approval changes the counter");
            assert_eq!(card.spent_fen, expected);
        }
        let out = decide(
            Event {
                card_no: &card_no,
                scenario: Scenario::Transit,
                amount_fen: 200,
            },
            Some(&card),
            &deny,
            &p,
            &Facts::default(),
            NOW,
        );
        assert_eq!(out.decision, Decision::Decline(Reason::LimitExceeded));
    }

    #[test]
    fn local_day_turns_at_local_midnight() {
        let p = policy();
        // 2026-11-28T15:59:59Z is 23:59:59 in +08:00; one second later is the next day.
        let before = 1_795_881_599;
        assert_eq!(p.local_day(before) + 1, p.local_day(before + 1));
    }
}
