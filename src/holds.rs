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
//!   the bill's split (what settlement takes, once). The hold's whole
//!   reservation leaves its day's spend and the captured amount counts on
//!   the day of the capture (the same day, at a counter); the deductible
//!   the split used is booked on the card for the local year.
//! - Expiry: a capture or void that finds a hold past `expires_at` is
//!   declined `HOLD_EXPIRED` and releases it; the sweep
//!   ([`run_sweep`], every `medical.sweep_interval_s`) releases those
//!   nobody touches, with a record `decision: "expire"`. A due index in
//!   the `holds` cf (0xFF, due time, hold key) finds them without a scan.
//!   Closed holds are deleted by the same sweep once kept for
//!   `idempotency.retention_s`, so the cf stays bounded.
//! - The split's rules (coverage, deductible, the annual deductible) are
//!   those in force when the hold was made, stored with it, so a config
//!   change does not change a bill already at the counter.
//! - Card status is checked when the hold is made, not at capture: a hold
//!   is a promise to the counter for its lifetime.
//! - `POST /v1/reverse` (for a counter that never saw an answer):
//!   - of a capture gives its charge back (daily spend, settlement, with
//!     the split on the reversal's line) and the deductible it used; the
//!     hold stays captured (a new bill needs a new hold);
//!   - of a hold releases it like a void (answered `not_charged`: a hold
//!     charges nothing).

use serde::{Deserialize, Serialize};

use crate::authz::{self, Event};
use crate::credential;
use crate::gateway::{journal_error, storage_error, Begun, Decided, Gateway};
use crate::idempotency::{self, Origin};
use crate::journal::{Commit, DecisionRecord, JournalError, Op};
use crate::model::{Card, CardNo, Reason, Scenario};
use crate::scenario::medical::{self, Category, HoldState, Split};
use crate::scenario::{self, region};
use crate::state::{cards, profiles, Cf, StoreError};
use crate::wire::{self, ApiError, ErrorKind, HoldOp, MedicalAnswer};

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

/// The first byte of the keys of the `holds` cf's due index: 0xFF, when
/// due (ms, big-endian), the hold's key. A hold's key starts with its
/// terminal id (printable ASCII), so the index sorts after every hold, by
/// time. An open hold is due at its expiry (the sweep expires it); a closed
/// one when its record may go (the sweep deletes it).
const DUE: u8 = 0xff;

/// Holds the sweep handles per step at most.
pub const SWEEP_STEP_MAX: usize = 256;

pub fn due_key(due_ms: i64, hold_key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(9 + hold_key.len());
    k.push(DUE);
    k.extend_from_slice(&due_ms.max(0).to_be_bytes());
    k.extend_from_slice(hold_key);
    k
}

fn parse_due(k: &[u8]) -> Option<(i64, &[u8])> {
    let (&first, rest) = k.split_first()?;
    if first != DUE || rest.len() < 8 {
        return None;
    }
    let (at, key) = rest.split_at(8);
    Some((i64::from_be_bytes(at.try_into().ok()?), key))
}

/// The writes of a hold's new state, with its due index: a new open hold
/// is due at its expiry; a hold that closes now stops being due then and
/// is due for deletion after `keep_ms`.
pub(crate) fn hold_ops(
    ops: &mut Vec<Op>,
    key: &[u8],
    before: Option<&HoldRecord>,
    after: &HoldRecord,
    now_ms: i64,
    keep_ms: i64,
) {
    ops.push(Op::Put(
        Cf::Holds,
        key.to_vec(),
        serde_json::to_vec(after).expect("a hold record serializes"),
    ));
    let was_open = before.is_some_and(|b| b.state == HoldState::Open);
    match (before, after.state == HoldState::Open) {
        (None, true) => ops.push(Op::Put(
            Cf::Holds,
            due_key(after.expires_ms, key),
            Vec::new(),
        )),
        (Some(b), false) if was_open => {
            ops.push(Op::Delete(Cf::Holds, due_key(b.expires_ms, key)));
            ops.push(Op::Put(
                Cf::Holds,
                due_key(now_ms.saturating_add(keep_ms), key),
                Vec::new(),
            ));
        }
        _ => {}
    }
}

/// The (terminal, event id) of a hold's key.
fn split_key(key: &[u8]) -> (String, String) {
    let at = key.iter().position(|&b| b == 0).unwrap_or(key.len());
    let event = key.get(at + 1..).unwrap_or_default();
    (
        String::from_utf8_lossy(&key[..at]).into_owned(),
        String::from_utf8_lossy(event).into_owned(),
    )
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
        // After the idempotency step: a retry of a hold whose category has
        // since left the config still gets its first answer.
        let category = *rules.category(&req.category).ok_or_else(|| {
            ApiError::invalid(format!(
                "`category` must be one of the configured categories: {}",
                rules.category_names()
            ))
        })?;
        // An event id reused after its answer's retention must not
        // overwrite the hold it made (and a capture of it charge again).
        if read_hold(&self.store, guard.key())
            .map_err(storage_error)?
            .is_some()
        {
            return Err(ApiError::new(
                ErrorKind::IdempotencyConflict,
                "`event_id` was used by this terminal for an earlier hold; a new hold needs a new event_id",
            ));
        }
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
                _ if reversed_already => authz::Outcome::decline(Reason::Reversed),
                (_, Some(reason)) => authz::Outcome::decline(reason),
                (None, None) => authz::Outcome::decline(Reason::CardNotFound),
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
                        Err(r) if out.decision.is_approve() => authz::Outcome::decline(r),
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
                        annual_deductible_fen: Some(rules.annual_deductible_fen),
                    },
                    split,
                    created_ms: now_ms,
                    expires_ms,
                    day: self.policy.local_day(now_s),
                    state: HoldState::Open,
                    captured_fen: 0,
                    site: req.auth.site.clone(),
                };
                hold_ops(
                    &mut ops,
                    guard.key(),
                    None,
                    &hold,
                    now_ms,
                    self.keep_holds_ms(),
                );
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
        let card_no = match &stored {
            Some(h) => Some(self.holder_card(h)?),
            None => None,
        };
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
                let keep = self.keep_holds_ms();
                hold_ops(&mut ops, &hold_key, stored.as_ref(), h, now_ms, keep);
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

    /// The card that carries a hold's reservation now: the hold's own, or
    /// the card that replaced it (a replacement takes over the old card's
    /// daily spend and deductible, so a step of an older hold must give
    /// back and book there).
    fn holder_card(&self, h: &HoldRecord) -> Result<CardNo, ApiError> {
        let card = CardNo::parse(&h.card_no).map_err(|_| {
            storage_error(StoreError::Corrupt {
                cf: "holds",
                detail: "a hold's card number is not valid".into(),
            })
        })?;
        self.current_card(card)
    }

    /// The card that replaced `card`, through any number of replacements,
    /// or `card` itself.
    pub(crate) fn current_card(&self, card: CardNo) -> Result<CardNo, ApiError> {
        let corrupt = |detail: &str| {
            storage_error(StoreError::Corrupt {
                cf: "profiles",
                detail: detail.into(),
            })
        };
        let mut card = card;
        // A card is replaced a few times in its holder's life; the bound
        // only stops a corrupt loop.
        for _ in 0..16 {
            let next = profiles::profile(&self.store, &card)
                .map_err(storage_error)?
                .replaced_by;
            match next {
                Some(n) => {
                    card = CardNo::parse(&n)
                        .map_err(|_| corrupt("a replacement card number is not valid"))?
                }
                None => return Ok(card),
            }
        }
        Err(corrupt("card replacements form a loop"))
    }

    /// How long a closed hold's record is kept: as long as the answers of
    /// its steps, so a late capture under a new event id still learns the
    /// hold is closed rather than unknown.
    pub(crate) fn keep_holds_ms(&self) -> i64 {
        i64::try_from(self.config.idempotency.retention_s)
            .unwrap_or(i64::MAX)
            .saturating_mul(1000)
    }

    /// One sweep step: expires up to [`SWEEP_STEP_MAX`] open holds past
    /// their expiry (their reservation of the daily spend goes back, and a
    /// record `decision: "expire"` says so) and deletes closed holds kept
    /// long enough. Returns how many due entries it handled.
    pub async fn sweep_holds(&self, now_ms: i64) -> Result<usize, ApiError> {
        let mut due = Vec::new();
        self.store
            .scan(Cf::Holds, &[DUE], |k, _| match parse_due(k) {
                Some((at, key)) if at <= now_ms => {
                    due.push((k.to_vec(), key.to_vec()));
                    due.len() < SWEEP_STEP_MAX
                }
                _ => false,
            })
            .map_err(storage_error)?;
        // One entry that cannot be handled (a corrupt record) must not
        // stop the others: it is logged and tried again next time.
        let mut failed = None;
        for (index, key) in &due {
            if let Err(e) = self.sweep_one(index, key, now_ms).await {
                let (terminal, event_id) = split_key(key);
                tracing::warn!(error = %e, terminal, event_id, "hold sweep: a hold could not be handled");
                failed = Some(e);
            }
        }
        match failed {
            // Waits for the next interval rather than spinning on it.
            Some(e) => Err(e),
            None => Ok(due.len()),
        }
    }

    async fn sweep_one(&self, index: &[u8], key: &[u8], now_ms: i64) -> Result<(), ApiError> {
        // The hold's slot, like a capture: a step of this hold running now
        // finishes first, and the sweep reads what it wrote.
        let (slot, _) = self
            .idem
            .hold(key.to_vec(), now_ms)
            .await
            .map_err(storage_error)?;
        // A step that closed the hold after the index was read has moved
        // its entry: this one is gone, and so is the sweep's business.
        if self
            .store
            .get(Cf::Holds, index)
            .map_err(storage_error)?
            .is_none()
        {
            return Ok(());
        }
        let stored = read_hold(&self.store, key).map_err(storage_error)?;
        let mut ops = vec![Op::Delete(Cf::Holds, index.to_vec())];
        // An open hold's only entry is its expiry, so an open hold found
        // here is due.
        let expired = stored.as_ref().is_some_and(|h| h.state == HoldState::Open);
        let pending = match stored {
            Some(h) if h.state == HoldState::Open => {
                let card_no = self.holder_card(&h)?;
                let _card_lock = self.cards.lock(&card_no);
                let snapshot = self.cards.get(&card_no);
                let after = HoldRecord {
                    state: HoldState::Expired,
                    ..h.clone()
                };
                hold_ops(
                    &mut ops,
                    key,
                    Some(&h),
                    &after,
                    now_ms,
                    self.keep_holds_ms(),
                );
                let card_after = snapshot
                    .map(|c| c.give_back(h.day, h.amount_fen))
                    .filter(|after| Some(*after) != snapshot);
                if let Some(c) = card_after {
                    ops.push(Op::Put(
                        Cf::Cards,
                        card_no.as_str().as_bytes().to_vec(),
                        cards::encode(&c),
                    ));
                }
                let (terminal, event_id) = split_key(key);
                let record = DecisionRecord {
                    at_ms: now_ms,
                    terminal,
                    event_id,
                    auth_id: self.auth_ids.next(),
                    kind: crate::model::EventKind::Tap,
                    card_no: card_no.as_str().to_owned(),
                    scenario: Some(Scenario::Medical),
                    amount_fen: Some(h.amount_fen),
                    decision: "expire".to_owned(),
                    reason: Reason::HoldExpired,
                    charged_fen: 0,
                    site: h.site.clone(),
                    occurred_at: None,
                    reverses: None,
                    scan: None,
                    offline: false,
                    fare: None,
                    bill_ref: None,
                    credit: None,
                    split: None,
                };
                let record =
                    serde_json::to_vec(&record).expect("a decision record always serializes");
                let pending = self.journal.submit(Commit {
                    record: Some(record),
                    ops,
                    hold_until_written: Some(Box::new(slot)),
                    card: Some(card_no.as_str().into()),
                    also: Vec::new(),
                });
                if let (Ok(_), Some(c)) = (&pending, card_after) {
                    self.cards.set(card_no.clone(), c);
                }
                pending
            }
            // Closed and kept long enough, or gone: the record and its
            // index entry go.
            _ => {
                ops.push(Op::Delete(Cf::Holds, key.to_vec()));
                self.journal.submit(Commit {
                    hold_until_written: Some(Box::new(slot)),
                    ..Commit::new(None, ops)
                })
            }
        };
        pending
            .map_err(journal_error)?
            .await
            .unwrap_or(Err(JournalError::Closed))
            .map_err(journal_error)?;
        if expired {
            metrics::counter!("onecard_holds_expired_total").increment(1);
        }
        Ok(())
    }

    /// What a reversal of a medical event changes on its card (`card`, under
    /// its lock) besides the daily spend, and the writes that go with it:
    ///
    /// - the reversal of an open hold releases it, like a void (a counter
    ///   that never saw the hold's answer cancels it so);
    /// - the reversal of a capture gives back the deductible its split used
    ///   (the split is in the capture's stored answer) and returns the
    ///   split, for the reversal's settlement line.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn on_reverse(
        &self,
        event_key: &[u8],
        event_auth_id: &str,
        origin: &Origin<'_>,
        answer: &[u8],
        card: Card,
        event_at_ms: i64,
        now_ms: i64,
        ops: &mut Vec<Op>,
    ) -> Result<(Card, Option<Split>), ApiError> {
        if origin.scenario != Scenario::Medical || !origin.approved {
            return Ok((card, None));
        }
        if origin.charged_fen == 0 {
            let Some(h) = read_hold(&self.store, event_key).map_err(storage_error)? else {
                return Ok((card, None));
            };
            // Only the hold this event made (an event id reused after its
            // answer's retention is another event).
            if h.state != HoldState::Open || h.auth_id != event_auth_id {
                return Ok((card, None));
            }
            let after = HoldRecord {
                state: HoldState::Voided,
                ..h.clone()
            };
            hold_ops(
                ops,
                event_key,
                Some(&h),
                &after,
                now_ms,
                self.keep_holds_ms(),
            );
            return Ok((card.give_back(h.day, h.amount_fen), None));
        }
        #[derive(Deserialize)]
        struct Answered {
            split: Option<Split>,
        }
        let split = serde_json::from_slice::<Answered>(answer)
            .ok()
            .and_then(|a| a.split);
        let year =
            medical::local_year(event_at_ms.div_euclid(1000), self.policy.day_offset_minutes);
        let card = match &split {
            Some(s) => medical::unbook_deductible(card, year, s),
            None => card,
        };
        Ok((card, split))
    }
}

/// Runs sweep steps every `interval` until `stop` fires.
pub async fn run_sweep(
    gateway: std::sync::Arc<Gateway>,
    interval: std::time::Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        loop {
            if *stop.borrow() {
                return;
            }
            match gateway.sweep_holds(crate::clock::now_ms()).await {
                Ok(n) if n == SWEEP_STEP_MAX => continue,
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "hold sweep step failed; will retry");
                    break;
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stop.changed() => return,
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
    fn the_due_index_follows_a_hold() {
        let key = hold_key("term-0001", "h-1");
        let k = due_key(NOW_MS, &key);
        assert_eq!(parse_due(&k), Some((NOW_MS, key.as_slice())));
        // After every hold's own key, ordered by time.
        assert!(k > key && due_key(NOW_MS + 1, b"a") > k);
        assert_eq!(parse_due(&key), None);
        assert_eq!(split_key(&key), ("term-0001".into(), "h-1".into()));

        let due_ops = |ops: &[Op]| -> Vec<(bool, Option<i64>)> {
            ops.iter()
                .filter_map(|op| match op {
                    Op::Put(Cf::Holds, k, _) => Some((true, parse_due(k).map(|d| d.0))),
                    Op::Delete(Cf::Holds, k) => Some((false, parse_due(k).map(|d| d.0))),
                    _ => None,
                })
                .collect()
        };
        let open = hold(HoldState::Open);
        let captured = hold(HoldState::Captured);
        let (keep, now) = (5_000, NOW_MS + 100);
        let mut ops = Vec::new();
        hold_ops(&mut ops, &key, None, &open, now, keep);
        // The hold, and its expiry.
        assert_eq!(due_ops(&ops), [(true, None), (true, Some(open.expires_ms))]);
        let mut ops = Vec::new();
        hold_ops(&mut ops, &key, Some(&open), &captured, now, keep);
        // Closed: no longer due at its expiry, due for deletion later.
        assert_eq!(
            due_ops(&ops),
            [
                (true, None),
                (false, Some(open.expires_ms)),
                (true, Some(now + keep))
            ]
        );
        let mut ops = Vec::new();
        hold_ops(&mut ops, &key, Some(&captured), &captured, now, keep);
        assert_eq!(due_ops(&ops), [(true, None)]);
    }

    #[test]
    fn hold_records_round_trip() {
        let h = hold(HoldState::Captured);
        let v = serde_json::to_vec(&h).unwrap();
        assert_eq!(serde_json::from_slice::<HoldRecord>(&v).unwrap(), h);
        assert_eq!(rfc3339_ms(NOW_MS + 500), "2026-11-28T07:45:12.5Z");
    }
}
