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

use serde::Deserialize;

use onecard_core::authz::{self, Event};
use onecard_core::holds::{decide_step, CategoryRules, HoldRecord, Step};
use onecard_core::model::{Card, CardNo, Reason, Scenario};
use onecard_core::record::DecisionRecord;
use onecard_core::scenario::medical::{self, HoldState, Split};
use onecard_core::scenario::{self, region};
use onecard_core::time::rfc3339_ms;
use onecard_core::wire::{self, HoldOp, MedicalAnswer};

use crate::service::credential;
use crate::service::error::ServiceError;
use crate::service::gateway::{Begun, Decided, Gateway};
use crate::store::durable::{Commit, Op};
use crate::store::holds::{hold_key, hold_ops, parse_due, read_hold, split_key, DUE};
use crate::store::idem::{self, Origin};
use crate::store::{cards, profiles, Cf, StoreError};

/// Holds the sweep handles per step at most.
pub const SWEEP_STEP_MAX: usize = 256;

impl Gateway {
    /// `POST /v1/hold`: reserves an amount of a medical bill on a card.
    pub async fn hold(
        &self,
        terminal: &str,
        body: &[u8],
        now_ms: i64,
    ) -> Result<Vec<u8>, ServiceError> {
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
                idem::key(terminal, &req.auth.event_id),
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
            ServiceError::invalid(format!(
                "`category` must be one of the configured categories: {}",
                rules.category_names()
            ))
        })?;
        // An event id reused after its answer's retention must not
        // overwrite the hold it made (and a capture of it charge again).
        if read_hold(&self.store, guard.key())
            .map_err(ServiceError::from)?
            .is_some()
        {
            return Err(ServiceError::already_used("`event_id` was used by this terminal for an earlier hold; a new hold needs a new event_id",
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
                card_no: card_str.into(),
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
                    card_no: card_str.into(),
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
    ) -> Result<Vec<u8>, ServiceError> {
        let started = std::time::Instant::now();
        let req = wire::parse_hold_step(op, body)?;
        let fingerprint = req.fingerprint();
        let own_key = idem::key(terminal, &req.event_id);
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
                .map_err(ServiceError::from)?;
            (own, slot)
        } else {
            let (slot, _) = self
                .idem
                .hold(hold_key.clone(), now_ms)
                .await
                .map_err(ServiceError::from)?;
            let own = self.begin(own_key, &fingerprint, now_ms, conflict).await?;
            (own, slot)
        };
        let (guard, reversed_already) = match own {
            Begun::Replay(body) => return Ok(body),
            Begun::Decide(guard, reversed) => (guard, reversed),
        };
        let stored = read_hold(&self.store, &hold_key).map_err(ServiceError::from)?;
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
                kind: onecard_core::model::EventKind::Tap,
                card_no: card_str.into(),
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
    fn holder_card(&self, h: &HoldRecord) -> Result<CardNo, ServiceError> {
        let card = CardNo::parse(&h.card_no).map_err(|_| {
            ServiceError::from(StoreError::Corrupt {
                cf: "holds",
                detail: "a hold's card number is not valid".into(),
            })
        })?;
        self.current_card(card)
    }

    /// The card that replaced `card`, through any number of replacements,
    /// or `card` itself.
    pub(crate) fn current_card(&self, card: CardNo) -> Result<CardNo, ServiceError> {
        let corrupt = |detail: &str| {
            ServiceError::from(StoreError::Corrupt {
                cf: "profiles",
                detail: detail.into(),
            })
        };
        let mut card = card;
        // A card is replaced a few times in its holder's life; the bound
        // only stops a corrupt loop.
        for _ in 0..16 {
            let next = profiles::profile(&self.store, &card)
                .map_err(ServiceError::from)?
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
    pub async fn sweep_holds(&self, now_ms: i64) -> Result<usize, ServiceError> {
        let mut due = Vec::new();
        self.store
            .scan(Cf::Holds, &[DUE], |k, _| match parse_due(k) {
                Some((at, key)) if at <= now_ms => {
                    due.push((k.to_vec(), key.to_vec()));
                    due.len() < SWEEP_STEP_MAX
                }
                _ => false,
            })
            .map_err(ServiceError::from)?;
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

    async fn sweep_one(&self, index: &[u8], key: &[u8], now_ms: i64) -> Result<(), ServiceError> {
        // The hold's slot, like a capture: a step of this hold running now
        // finishes first, and the sweep reads what it wrote.
        let (slot, _) = self
            .idem
            .hold(key.to_vec(), now_ms)
            .await
            .map_err(ServiceError::from)?;
        // A step that closed the hold after the index was read has moved
        // its entry: this one is gone, and so is the sweep's business.
        if self
            .store
            .get(Cf::Holds, index)
            .map_err(ServiceError::from)?
            .is_none()
        {
            return Ok(());
        }
        let stored = read_hold(&self.store, key).map_err(ServiceError::from)?;
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
                    kind: onecard_core::model::EventKind::Tap,
                    card_no: card_no.as_str().into(),
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
            .map_err(ServiceError::from)?
            .durable()
            .await
            .map_err(ServiceError::from)?;
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
    ) -> Result<(Card, Option<Split>), ServiceError> {
        if origin.scenario != Scenario::Medical || !origin.approved {
            return Ok((card, None));
        }
        if origin.charged_fen == 0 {
            let Some(h) = read_hold(&self.store, event_key).map_err(ServiceError::from)? else {
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
            match gateway.sweep_holds(onecard_core::time::wall_ms()).await {
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
