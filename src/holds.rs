//! Medical payments at hospital and pharmacy counters: a hold reserves an
//! amount (`POST /v1/hold`), a capture books part or all of it
//! (`POST /v1/capture`), a void releases it (`POST /v1/void`).
//!
//! The phases are those of an authorization (wire → idempotency →
//! credential → decide under the card's lock → one journal commit →
//! answer), and each step is idempotent by (terminal, event_id) in the same
//! key space as authorizations:
//!
//! - A hold goes through [`authz::decide`] with scenario `medical` (deny
//!   list, status, the `medical` function, the scenario's maximum, the
//!   daily cap), then the category's own maximum; an approved hold adds
//!   its amount to the card's daily spend (the reservation) and stores the
//!   hold (`holds` cf, key terminal 0x00 hold event_id) in the commit of
//!   its decision record (`decision: "hold"`, which settlement does not
//!   take) and its idempotency record.
//! - A capture or a void takes, besides its own event's slot, the hold
//!   event's slot (both in key order, so two steps can never wait for each
//!   other), which it keeps until its commit is on disk: the steps of one
//!   hold are serialized, and the second of two captures under different
//!   event ids reads the first one's result and is declined `HOLD_CLOSED`.
//!   Never a second charge.
//! - A capture records `decision: "approve"` with the captured amount and
//!   the bill's split (what settlement takes, once); the part not captured
//!   goes back to the daily spend of the hold's day, and the deductible
//!   the split used is booked on the card for the local year.
//! - Expiry is lazy: a hold is expired when a capture or void finds it past
//!   `expires_at` (`HOLD_EXPIRED`), and its reservation goes back then.
//!   There is no sweep: a hold nobody touches again keeps its reservation
//!   on its day's spend (a daily counter, so at most until local midnight).
//! - The split's rules (coverage, deductible) are those of the category
//!   when the hold was made, stored with it, so a config change does not
//!   change a bill already at the counter.
//! - Card status is checked when the hold is made, not at capture: a hold
//!   is a promise to the counter for its lifetime.
//! - A `POST /v1/reverse` of a capture gives its charge back (daily spend,
//!   settlement) like any approval; the hold stays captured and the
//!   deductible stays used. A reversal of a hold's event gives back
//!   nothing (`not_charged`): a hold is released with a void.

use serde::{Deserialize, Serialize};

use crate::authz::{self, Event};
use crate::credential;
use crate::gateway::{storage_error, Begun, Decided, Gateway};
use crate::idempotency::{self, Origin};
use crate::journal::{DecisionRecord, Op};
use crate::model::{Card, CardNo, Reason, Scenario};
use crate::scenario::medical::{self, Category, HoldState, Split};
use crate::scenario::{self, region};
use crate::state::{cards, Cf, StoreError};
use crate::wire::{self, ApiError, HoldOp, MedicalAnswer};

/// A hold as stored in the `holds` column family (JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HoldRecord {
    /// The hold's own auth_id: `hold_id` in answers.
    pub auth_id: String,
    pub card_no: String,
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

/// The key of a hold: the hold event's idempotency key.
pub fn hold_key(terminal: &str, hold_event_id: &str) -> Vec<u8> {
    idempotency::key(terminal, hold_event_id)
}

pub fn read_hold(
    store: &crate::state::Store,
    key: &[u8],
) -> Result<Option<HoldRecord>, StoreError> {
    match store.get(Cf::Holds, key)? {
        None => Ok(None),
        Some(v) => serde_json::from_slice(&v)
            .map(Some)
            .map_err(|e| StoreError::Corrupt {
                cf: "holds",
                detail: e.to_string(),
            }),
    }
}

/// RFC 3339 UTC of a unix time in milliseconds.
fn rfc3339_ms(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

/// The card's daily spend with `fen` given back to `day`, if the counter
/// still counts that day (an earlier day's spend no longer limits).
fn give_back(card: Card, day: i32, fen: i64) -> Card {
    let mut c = card;
    if fen > 0 && c.spent_day == day {
        c.spent_fen = (c.spent_fen - fen).max(0);
    }
    c
}

fn decline(r: Reason) -> authz::Outcome {
    authz::Outcome {
        decision: authz::Decision::Decline(r),
        card_after: None,
        fare: None,
        venue_entries: None,
    }
}

impl Gateway {
    /// `POST /v1/hold`: reserves an amount of a medical bill on a card.
    pub async fn hold(
        &self,
        terminal: &str,
        body: &[u8],
        now_ms: i64,
    ) -> Result<Vec<u8>, ApiError> {
        let started = std::time::Instant::now();
        let req = wire::parse_hold(body)?;
        let rules = &self.policy.medical;
        let category = *rules.category(&req.category).ok_or_else(|| {
            ApiError::invalid(format!(
                "`category` must be one of the configured categories: {}",
                rules.category_names()
            ))
        })?;
        let amount_fen = req.auth.amount_fen.expect("checked by parse_hold");
        let scanner = self.scanner.as_ref();
        if scanner.is_none() && matches!(req.auth.credential, wire::Credential::Scan(_)) {
            credential::resolve(None, &self.store, &req.auth.credential, now_ms)?;
        }
        let fingerprint = req.fingerprint();
        let (guard, reversed_already) = match self
            .begin(
                idempotency::key(terminal, &req.auth.event_id),
                &fingerprint,
                now_ms,
                "`event_id` was already used by this terminal with a different body",
            )
            .await?
        {
            Begun::Replay(body) => return Ok(body),
            Begun::Decide(guard, reversed) => (guard, reversed),
        };
        let resolved = credential::resolve(scanner, &self.store, &req.auth.credential, now_ms)?;
        let (card_no, scan, early) = match resolved {
            credential::Resolved::Card(c, scan) => (Some(c), scan, None),
            credential::Resolved::Decline(reason, c, scan) => {
                (c.map(std::borrow::Cow::Owned), scan, Some(reason))
            }
        };
        let now_s = now_ms.div_euclid(1000);
        let site = req.auth.site.as_deref();
        let mut facts = authz::Facts {
            site,
            place: scenario::place_hash(site.unwrap_or(terminal)),
            ..authz::Facts::default()
        };
        if let Some(c) = &card_no {
            if let region::Origin::Partner(p) = self.policy.regions.origin(c) {
                facts.partner_listed = self.partners.contains(p, c);
            }
        }
        let auth_id = self.auth_ids.next();
        let expires_ms = now_ms.saturating_add(rules.hold_ttl_s.saturating_mul(1000));
        let expires_at = rfc3339_ms(expires_ms);
        let (pending, reason, answer) = {
            let _card_lock = card_no.as_deref().map(|c| self.cards.lock(c));
            let snapshot = card_no.as_deref().and_then(|c| self.cards.get(c));
            let outcome = match (&card_no, early) {
                _ if reversed_already => decline(Reason::Reversed),
                (_, Some(reason)) => decline(reason),
                (None, None) => decline(Reason::CardNotFound),
                (Some(c), None) => {
                    let out = authz::decide(
                        Event {
                            card_no: c,
                            scenario: Scenario::Medical,
                            amount_fen,
                        },
                        snapshot.as_ref(),
                        &self.deny,
                        &self.policy,
                        &facts,
                        now_s,
                    );
                    // The category's own limit, after the checks every
                    // scenario shares (so a lost card says CARD_LOST).
                    match medical::check_amount(&category, amount_fen) {
                        Err(r) if out.decision.is_approve() => decline(r),
                        _ => out,
                    }
                }
            };
            let d = outcome.decision;
            let approved = d.is_approve();
            let card_str = card_no.as_deref().map_or("", |c| c.as_str());
            let year = medical::local_year(now_s, self.policy.day_offset_minutes);
            let split = outcome
                .card_after
                .or(snapshot)
                .filter(|_| approved)
                .map(|c| medical::split(&category, amount_fen, rules.deductible_left(&c, year)));
            let answer = MedicalAnswer {
                event_id: &req.auth.event_id,
                auth_id: &auth_id,
                decision: if approved { "approve" } else { "decline" },
                reason: d.reason().code(),
                amount_fen: d.amount_fen(),
                hold_id: approved.then_some(auth_id.as_str()),
                expires_at: approved.then_some(expires_at.as_str()),
                split,
            }
            .to_vec();
            let record = DecisionRecord {
                at_ms: now_ms,
                terminal: terminal.to_owned(),
                event_id: req.auth.event_id.clone(),
                auth_id: auth_id.clone(),
                kind: req.auth.kind(),
                card_no: card_str.to_owned(),
                scenario: Some(Scenario::Medical),
                amount_fen: req.auth.amount_fen,
                decision: if approved { "hold" } else { "decline" }.to_owned(),
                reason: d.reason(),
                // A hold charges nothing: the capture does.
                charged_fen: 0,
                site: req.auth.site.clone(),
                occurred_at: req.auth.occurred_at.clone(),
                reverses: None,
                scan: scan.clone(),
                offline: false,
                fare: None,
                bill_ref: None,
                credit: None,
                split,
            };
            let mut ops = Vec::with_capacity(3);
            let card_after = outcome.card_after.filter(|_| approved);
            if let Some(after) = card_after {
                ops.push(Op::Put(
                    Cf::Cards,
                    card_str.as_bytes().to_vec(),
                    cards::encode(&after),
                ));
            }
            if let Some(split) = split {
                let hold = HoldRecord {
                    auth_id: auth_id.clone(),
                    card_no: card_str.to_owned(),
                    amount_fen,
                    category: req.category.clone(),
                    rules: CategoryRules {
                        coverage_pct: category.coverage_pct,
                        deductible: category.deductible,
                    },
                    split,
                    created_ms: now_ms,
                    expires_ms,
                    day: self.policy.local_day(now_s),
                    state: HoldState::Open,
                    captured_fen: 0,
                    site: req.auth.site.clone(),
                };
                ops.push(Op::Put(
                    Cf::Holds,
                    guard.key().to_vec(),
                    serde_json::to_vec(&hold).expect("a hold record serializes"),
                ));
            }
            let pending = self.commit_decision(Decided {
                key: guard.key().to_vec(),
                slots: Box::new(guard),
                fingerprint: &fingerprint,
                now_ms,
                auth_id: &auth_id,
                origin: Origin {
                    approved,
                    // A hold charges nothing: a reversal of it gives back
                    // nothing (a void releases it).
                    charged_fen: 0,
                    scenario: Scenario::Medical,
                    card_no: card_str,
                    site,
                },
                answer: &answer,
                record: &record,
                ops,
                spent: scan.as_ref(),
            })?;
            if let (Some(after), Some(c)) = (card_after, &card_no) {
                self.cards.set(c.clone().into_owned(), after);
            }
            (pending, d.reason(), answer)
        };
        self.answered(pending, Scenario::Medical, reason, started)
            .await?;
        Ok(answer)
    }

    /// `POST /v1/capture` and `POST /v1/void`: books or releases one of
    /// `terminal`'s holds.
    pub async fn hold_step(
        &self,
        op: HoldOp,
        terminal: &str,
        body: &[u8],
        now_ms: i64,
    ) -> Result<Vec<u8>, ApiError> {
        let started = std::time::Instant::now();
        let req = wire::parse_hold_step(op, body)?;
        let fingerprint = req.fingerprint();
        let own_key = idempotency::key(terminal, &req.event_id);
        let hold_key = hold_key(terminal, &req.hold_event_id);
        let conflict = "`event_id` was already used by this terminal with a different body";
        // Both slots, in key order: a step holds two event ids' slots, and
        // two steps taking them in opposite orders could wait for each
        // other for ever.
        let (own, hold_slot) = if own_key < hold_key {
            let own = self.begin(own_key, &fingerprint, now_ms, conflict).await?;
            if let Begun::Replay(body) = own {
                return Ok(body);
            }
            let (slot, _) = self
                .idem
                .hold(hold_key.clone(), now_ms)
                .await
                .map_err(storage_error)?;
            (own, slot)
        } else {
            let (slot, _) = self
                .idem
                .hold(hold_key.clone(), now_ms)
                .await
                .map_err(storage_error)?;
            let own = self.begin(own_key, &fingerprint, now_ms, conflict).await?;
            (own, slot)
        };
        let (guard, reversed_already) = match own {
            Begun::Replay(body) => return Ok(body),
            Begun::Decide(guard, reversed) => (guard, reversed),
        };
        let stored = read_hold(&self.store, &hold_key).map_err(storage_error)?;
        let step_id = self.auth_ids.next();
        let card_no = stored
            .as_ref()
            .map(|h| CardNo::parse(&h.card_no))
            .transpose()
            .map_err(|_| {
                storage_error(StoreError::Corrupt {
                    cf: "holds",
                    detail: "a hold's card number is not valid".into(),
                })
            })?;
        let (pending, reason, answer) = {
            let _card_lock = card_no.as_ref().map(|c| self.cards.lock(c));
            let snapshot = card_no.as_ref().and_then(|c| self.cards.get(c));
            let mut step = Step::decline(Reason::HoldNotFound);
            if let (Some(h), Some(card)) = (&stored, snapshot) {
                step = decide_step(
                    &self.policy,
                    op,
                    h,
                    card,
                    req.amount_fen,
                    reversed_already,
                    now_ms,
                );
            } else if reversed_already {
                step = Step::decline(Reason::Reversed);
            }
            let approved = step.reason == Reason::Ok;
            let expires_at = stored.as_ref().map(|h| rfc3339_ms(h.expires_ms));
            let answer = MedicalAnswer {
                event_id: &req.event_id,
                auth_id: &step_id,
                decision: if approved { "approve" } else { "decline" },
                reason: step.reason.code(),
                amount_fen: step.amount_fen,
                hold_id: stored.as_ref().map(|h| h.auth_id.as_str()),
                expires_at: expires_at.as_deref(),
                split: step.split,
            }
            .to_vec();
            let card_str = card_no.as_ref().map_or("", |c| c.as_str());
            let site = stored.as_ref().and_then(|h| h.site.as_deref());
            let record = DecisionRecord {
                at_ms: now_ms,
                terminal: terminal.to_owned(),
                event_id: req.event_id.clone(),
                auth_id: step_id.clone(),
                kind: crate::model::EventKind::Tap,
                card_no: card_str.to_owned(),
                scenario: Some(Scenario::Medical),
                amount_fen: req.amount_fen,
                decision: match (approved, op) {
                    (false, _) => "decline",
                    (true, HoldOp::Capture) => "approve",
                    (true, HoldOp::Void) => "void",
                }
                .to_owned(),
                reason: step.reason,
                charged_fen: step.charged_fen,
                site: site.map(str::to_owned),
                occurred_at: req.occurred_at.clone(),
                reverses: None,
                scan: None,
                offline: false,
                fare: None,
                bill_ref: None,
                credit: None,
                split: step.split,
            };
            let mut ops = Vec::with_capacity(2);
            if let Some(h) = &step.hold_after {
                ops.push(Op::Put(
                    Cf::Holds,
                    hold_key.clone(),
                    serde_json::to_vec(h).expect("a hold record serializes"),
                ));
            }
            let card_after = step.card_after.filter(|after| Some(*after) != snapshot);
            if let Some(after) = card_after {
                ops.push(Op::Put(
                    Cf::Cards,
                    card_str.as_bytes().to_vec(),
                    cards::encode(&after),
                ));
            }
            let pending = self.commit_decision(Decided {
                key: guard.key().to_vec(),
                // Both slots travel with the commit: the next step of this
                // hold reads what this one wrote.
                slots: Box::new((guard, hold_slot)),
                fingerprint: &fingerprint,
                now_ms,
                auth_id: &step_id,
                origin: Origin {
                    approved,
                    charged_fen: step.charged_fen,
                    scenario: Scenario::Medical,
                    card_no: card_str,
                    site,
                },
                answer: &answer,
                record: &record,
                ops,
                spent: None,
            })?;
            if let (Some(after), Some(c)) = (card_after, &card_no) {
                self.cards.set(c.clone(), after);
            }
            (pending, step.reason, answer)
        };
        self.answered(pending, Scenario::Medical, reason, started)
            .await?;
        Ok(answer)
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
    fn decline(reason: Reason) -> Step {
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
                card_after: Some(give_back(card, h.day, h.amount_fen)),
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
            card_after: Some(give_back(card, h.day, h.amount_fen)),
        },
        HoldOp::Capture => {
            let asked = amount_fen.unwrap_or(0);
            let (charge, back) = match medical::capture(h.amount_fen, asked) {
                Ok(c) => c,
                Err(r) => return Step::decline(r),
            };
            let year = medical::local_year(now_ms.div_euclid(1000), policy.day_offset_minutes);
            let left = policy.medical.deductible_left(&card, year);
            let split = medical::split(&Category::from(&h.rules), charge, left);
            let after = medical::book_deductible(give_back(card, h.day, back), year, &split);
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

    const DAY: i32 = 20_000;
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
                "…to the hold's day only",
                HoldOp::Capture,
                &open,
                DAY + 1,
                Some(6_000),
                false,
                (Reason::Ok, 6_000, 6_000, 15_000, Some(HoldState::Captured)),
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
    }

    #[test]
    fn hold_records_round_trip() {
        let h = hold(HoldState::Captured);
        let v = serde_json::to_vec(&h).unwrap();
        assert_eq!(serde_json::from_slice::<HoldRecord>(&v).unwrap(), h);
        assert_eq!(rfc3339_ms(NOW_MS + 500), "2026-11-28T07:45:12.5Z");
    }
}
