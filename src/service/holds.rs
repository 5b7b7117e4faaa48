//! Medical payments at hospital and pharmacy counters: a hold reserves an
//! amount (`POST /v1/hold`), a capture books part or all of it
//! (`POST /v1/capture`), a void releases it (`POST /v1/void`). The rules
//! are the core crate's (`scenario::medical`, `holds`); this module runs
//! them through the pipeline's phases.
//!
//! - A hold goes through `authz::decide` with scenario `medical` (deny
//!   list, status, the `medical` function, the scenario's maximum, the
//!   daily cap), then the category's own maximum; an approved hold adds
//!   its amount to the card's daily spend (the reservation) and stores the
//!   hold in the commit of its decision record (`decision: "hold"`, which
//!   settlement does not take).
//! - A capture or a void takes, besides its own event's slot, the hold
//!   event's slot (both in key order, so two steps can never wait for each
//!   other), which it keeps until its commit is durable: the steps of one
//!   hold are serialized, and the second of two captures under different
//!   event ids reads the first one's result and is declined `HOLD_CLOSED`.
//!   Never a second charge. A capture records `decision: "approve"` with
//!   the captured amount and the bill's split (what settlement takes).
//! - Expiry: a step that finds a hold past `expires_at` is declined
//!   `HOLD_EXPIRED` and releases it; the sweep ([`run_sweep`], every
//!   `medical.sweep_interval_s`) releases those nobody touches, with a
//!   record `decision: "expire"`, and deletes closed holds once kept for
//!   `idempotency.retention_s`, so the `holds` cf stays bounded.
//! - Card status is checked when the hold is made, not at capture: a hold
//!   is a promise to the counter for its lifetime.
//! - `POST /v1/reverse` of a hold releases it like a void
//!   ([`Gateway::release_reversed_hold`]); of a capture gives back its
//!   charge and deductible (`reverse`).

use std::time::{Duration, Instant};

use onecard_core::authz::{self, Event, Facts, Outcome};
use onecard_core::holds::{decide_step, CategoryRules, HoldRecord, Step};
use onecard_core::model::{Card, CardNo, EventKind, Reason, Scenario};
use onecard_core::record::DecisionRecord;
use onecard_core::scenario::medical::{self, Category, HoldState, Split};
use onecard_core::scenario::{self, region};
use onecard_core::time::rfc3339_ms;
use onecard_core::wire::{HoldOp, HoldRequest, HoldStepRequest, MedicalAnswer};

use crate::service::authorize::EVENT_REUSED;
use crate::service::credential::Resolved;
use crate::service::error::ServiceError;
use crate::service::gateway::Gateway;
use crate::service::pipeline::{Begun, Decided, Remember};
use crate::store::durable::{Commit, Op};
use crate::store::holds::{hold_key, hold_ops, parse_due, read_hold_async, split_key, DUE};
use crate::store::{cards, idem, Cf};

/// Holds the sweep handles per step at most.
pub const SWEEP_STEP_MAX: usize = 256;

impl Gateway {
    /// `POST /v1/hold`: reserves an amount of a medical bill on a card.
    pub async fn hold(
        &self,
        terminal: &str,
        req: &HoldRequest,
        now_ms: i64,
    ) -> Result<Vec<u8>, ServiceError> {
        self.retrying(|| self.hold_once(terminal, req, now_ms))
            .await
    }

    async fn hold_once(
        &self,
        terminal: &str,
        req: &HoldRequest,
        now_ms: i64,
    ) -> Result<Vec<u8>, ServiceError> {
        let started = Instant::now();
        if self.scanner.is_none() && req.auth.kind() == EventKind::Scan {
            return Err(crate::service::credential::not_configured());
        }
        let key = idem::key(terminal, &req.auth.event_id);
        let ticket = match self
            .begin(key, req.fingerprint(), now_ms, EVENT_REUSED)
            .await?
        {
            Begun::Replay(answer) => return Ok(answer),
            Begun::Decide(ticket) => ticket,
        };
        // After the idempotency step: a retry of a hold whose category has
        // since left the config still gets its first answer.
        let category = self.hold_category(&req.category)?;
        // An event id reused after its answer's retention must not
        // overwrite the hold it made (and a capture of it charge again).
        if read_hold_async(&self.store, ticket.key()).await?.is_some() {
            return Err(ServiceError::already_used(
                "`event_id` was used by this terminal for an earlier hold; a new hold needs a new event_id",
            ));
        }
        let resolved = self.resolve(&req.auth.credential, now_ms).await?;
        let card = resolved.card.as_deref();
        let committed = self
            .decide_and_commit(ticket, card, now_ms, |snapshot| {
                Ok(self.decide_hold(terminal, req, category, &resolved, snapshot, now_ms))
            })
            .await?;
        self.answered(committed, Scenario::Medical, started).await
    }

    /// A configured category, or `400` naming the configured ones.
    fn hold_category(&self, name: &str) -> Result<Category, ServiceError> {
        let rules = &self.policy.medical;
        rules.category(name).copied().ok_or_else(|| {
            ServiceError::invalid(format!(
                "`category` must be one of the configured categories: {}",
                rules.category_names()
            ))
        })
    }

    /// A hold's decision: the shared rules in scenario `medical`, then the
    /// category's own maximum (after them, so a lost card says
    /// `CARD_LOST`); for an approval, the split and the hold record.
    fn decide_hold(
        &self,
        terminal: &str,
        req: &HoldRequest,
        category: Category,
        resolved: &Resolved<'_>,
        snapshot: Option<Card>,
        now_ms: i64,
    ) -> Decided<'static> {
        let amount_fen = req.auth.amount_fen.expect("checked by parse_hold");
        let outcome = match (resolved.card.as_deref(), resolved.early) {
            (_, Some(reason)) => Outcome::decline(reason),
            (None, None) => Outcome::decline(Reason::CardNotFound),
            (Some(c), None) => {
                let site = req.auth.site.as_deref();
                let mut facts = Facts {
                    site,
                    place: scenario::place_hash(site.unwrap_or(terminal)),
                    ..Facts::default()
                };
                if let region::Origin::Partner(p) = self.policy.regions.origin(c) {
                    facts.partner_listed = self.partners.contains(p, c);
                }
                let event = Event {
                    card_no: c,
                    scenario: Scenario::Medical,
                    amount_fen,
                };
                let now_s = now_ms.div_euclid(1000);
                let out = authz::decide(
                    event,
                    snapshot.as_ref(),
                    &*self.deny,
                    &self.policy,
                    &facts,
                    now_s,
                );
                match medical::check_amount(&category, amount_fen) {
                    Err(r) if out.decision.is_approve() => Outcome::decline(r),
                    _ => out,
                }
            }
        };
        self.held(terminal, req, category, resolved, outcome, snapshot, now_ms)
    }

    /// What a hold writes: its answer (with the split as it would be if
    /// captured whole now), its record, the card's reservation and the
    /// hold with its due index.
    #[allow(clippy::too_many_arguments)]
    fn held(
        &self,
        terminal: &str,
        req: &HoldRequest,
        category: Category,
        resolved: &Resolved<'_>,
        outcome: Outcome,
        snapshot: Option<Card>,
        now_ms: i64,
    ) -> Decided<'static> {
        let rules = &self.policy.medical;
        let approved = outcome.decision.is_approve();
        let auth_id = String::from(self.auth_ids.next());
        let expires_ms = now_ms.saturating_add(rules.hold_ttl_s.saturating_mul(1000));
        let year = medical::local_year(now_ms.div_euclid(1000), self.policy.day_offset_minutes);
        let amount_fen = req.auth.amount_fen.expect("checked by parse_hold");
        let split = outcome
            .card_after
            .or(snapshot)
            .filter(|_| approved)
            .map(|c| medical::split(&category, amount_fen, rules.deductible_left(&c, year)));
        let expires_at = approved.then(|| rfc3339_ms(expires_ms));
        let answer = MedicalAnswer {
            event_id: &req.auth.event_id,
            auth_id: &auth_id,
            decision: if approved { "approve" } else { "decline" },
            reason: outcome.decision.reason().code(),
            amount_fen: outcome.decision.amount_fen(),
            hold_id: approved.then_some(auth_id.as_str()),
            expires_at: expires_at.as_deref(),
            split,
        }
        .to_vec();
        let card_no = resolved.card.as_deref();
        let mut ops = Vec::new();
        if let (Some(split), Some(c)) = (split, card_no) {
            let hold = self.new_hold(req, category, c, &auth_id, split, now_ms, expires_ms);
            let key = hold_key(terminal, &req.auth.event_id);
            hold_ops(&mut ops, &key, None, &hold, now_ms, self.keep_holds_ms());
        }
        let mut record = hold_record(terminal, req, resolved, &outcome, auth_id, now_ms);
        record.split = split;
        Decided {
            record: record.into(),
            answer,
            remember: Remember::Event { approved },
            ops,
            card_after: card_no
                .cloned()
                .zip(outcome.card_after.filter(|_| approved)),
            venue_after: None,
        }
    }

    /// An approved hold as stored: the category's rules of today go with
    /// it, so a config change does not change a bill already at the
    /// counter.
    #[allow(clippy::too_many_arguments)]
    fn new_hold(
        &self,
        req: &HoldRequest,
        category: Category,
        card_no: &CardNo,
        auth_id: &str,
        split: Split,
        now_ms: i64,
        expires_ms: i64,
    ) -> HoldRecord {
        HoldRecord {
            auth_id: auth_id.to_owned(),
            card_no: card_no.into(),
            amount_fen: req.auth.amount_fen.expect("checked by parse_hold"),
            category: req.category.clone(),
            rules: CategoryRules {
                coverage_pct: category.coverage_pct,
                deductible: category.deductible,
                annual_deductible_fen: Some(self.policy.medical.annual_deductible_fen),
            },
            split,
            created_ms: now_ms,
            expires_ms,
            day: self.policy.local_day(now_ms.div_euclid(1000)),
            state: HoldState::Open,
            captured_fen: 0,
            site: req.auth.site.clone(),
        }
    }

    /// `POST /v1/capture` and `POST /v1/void`: books or releases one of
    /// `terminal`'s holds.
    pub async fn hold_step(
        &self,
        terminal: &str,
        req: &HoldStepRequest,
        now_ms: i64,
    ) -> Result<Vec<u8>, ServiceError> {
        self.retrying(|| self.hold_step_once(terminal, req, now_ms))
            .await
    }

    async fn hold_step_once(
        &self,
        terminal: &str,
        req: &HoldStepRequest,
        now_ms: i64,
    ) -> Result<Vec<u8>, ServiceError> {
        let started = Instant::now();
        let hold_key = hold_key(terminal, &req.hold_event_id);
        let ticket = match self.begin_step(terminal, req, &hold_key, now_ms).await? {
            Begun::Replay(answer) => return Ok(answer),
            Begun::Decide(ticket) => ticket,
        };
        let stored = read_hold_async(&self.store, &hold_key).await?;
        let card = match &stored {
            Some(h) => Some(self.holder_card(h).await?),
            None => None,
        };
        let reversed = ticket.reversed;
        let committed = self
            .decide_and_commit(ticket, card.as_ref(), now_ms, |snapshot| {
                let step = match (&stored, snapshot) {
                    _ if reversed => Step::decline(Reason::Reversed),
                    (Some(h), Some(c)) => {
                        decide_step(&self.policy, req.op, h, c, req.amount_fen, false, now_ms)
                    }
                    _ => Step::decline(Reason::HoldNotFound),
                };
                Ok(self.stepped(
                    terminal,
                    req,
                    &hold_key,
                    stored.as_ref(),
                    card.clone(),
                    step,
                    snapshot,
                    now_ms,
                ))
            })
            .await?;
        self.answered(committed, Scenario::Medical, started).await
    }

    /// The idempotency phase of a step: its own event's slot and the hold
    /// event's, taken in key order (a step holds two event ids' slots, and
    /// two steps taking them in opposite orders could wait for each other
    /// for ever). The hold's slot rides on the ticket.
    async fn begin_step(
        &self,
        terminal: &str,
        req: &HoldStepRequest,
        hold_key: &[u8],
        now_ms: i64,
    ) -> Result<Begun, ServiceError> {
        let own_key = idem::key(terminal, &req.event_id);
        let fingerprint = req.fingerprint();
        if own_key.as_slice() < hold_key {
            match self
                .begin(own_key, fingerprint, now_ms, EVENT_REUSED)
                .await?
            {
                Begun::Decide(ticket) => {
                    let (slot, _) = self.idem.hold(hold_key, now_ms).await?;
                    Ok(Begun::Decide(ticket.also_holding(slot)))
                }
                replay => Ok(replay),
            }
        } else {
            let (slot, _) = self.idem.hold(hold_key, now_ms).await?;
            Ok(
                match self
                    .begin(own_key, fingerprint, now_ms, EVENT_REUSED)
                    .await?
                {
                    Begun::Decide(ticket) => Begun::Decide(ticket.also_holding(slot)),
                    replay => replay,
                },
            )
        }
    }

    /// What a step writes: its answer and record (a capture is the
    /// `approve` record settlement takes), the hold's new state and the
    /// card's.
    #[allow(clippy::too_many_arguments)]
    fn stepped(
        &self,
        terminal: &str,
        req: &HoldStepRequest,
        hold_key: &[u8],
        stored: Option<&HoldRecord>,
        card: Option<CardNo>,
        step: Step,
        snapshot: Option<Card>,
        now_ms: i64,
    ) -> Decided<'static> {
        let step_id = String::from(self.auth_ids.next());
        let approved = step.reason == Reason::Ok;
        let answer = step_answer(req, &step_id, stored, &step);
        let mut ops = Vec::new();
        if let (Some(after), Some(before)) = (&step.hold_after, stored) {
            hold_ops(
                &mut ops,
                hold_key,
                Some(before),
                after,
                now_ms,
                self.keep_holds_ms(),
            );
        }
        let record = DecisionRecord {
            at_ms: now_ms,
            terminal: terminal.to_owned(),
            event_id: req.event_id.clone(),
            auth_id: step_id,
            kind: EventKind::Tap,
            card_no: card.as_ref().map(Into::into).unwrap_or_default(),
            scenario: Some(Scenario::Medical),
            amount_fen: req.amount_fen,
            decision: match (approved, req.op) {
                (false, _) => "decline",
                (true, HoldOp::Capture) => "approve",
                (true, HoldOp::Void) => "void",
            }
            .to_owned(),
            reason: step.reason,
            charged_fen: step.charged_fen,
            site: stored.and_then(|h| h.site.clone()),
            occurred_at: req.occurred_at.clone(),
            split: step.split,
            hold_event_id: Some(req.hold_event_id.clone()),
            ..DecisionRecord::default()
        };
        let card_after = step.card_after.filter(|after| Some(*after) != snapshot);
        Decided {
            record: record.into(),
            answer,
            remember: Remember::Event { approved },
            ops,
            card_after: card.zip(card_after),
            venue_after: None,
        }
    }

    /// The card that carries a hold's reservation now: the hold's own, or
    /// the card that replaced it (a replacement takes over the old card's
    /// daily spend and deductible, so a step of an older hold must give
    /// back and book there).
    async fn holder_card(&self, h: &HoldRecord) -> Result<CardNo, ServiceError> {
        let card = h.card_no.card_no().ok_or_else(|| {
            ServiceError::from(crate::store::StoreError::Corrupt {
                cf: "holds",
                detail: "a hold's card number is not valid".into(),
            })
        })?;
        self.current_card(card).await
    }

    /// How long a closed hold's record is kept: as long as the answers of
    /// its steps, so a late capture under a new event id still learns the
    /// hold is closed rather than unknown.
    pub(crate) fn keep_holds_ms(&self) -> i64 {
        i64::try_from(self.config.idempotency.retention_s)
            .unwrap_or(i64::MAX)
            .saturating_mul(1000)
    }

    /// A reversal of a hold (a counter that never saw the hold's answer
    /// cancels it) releases it like a void: the hold's reservation goes
    /// back to its day. Only the hold this event made (an event id reused
    /// after its answer's retention is another event), and only while it
    /// is open. Runs under the card's lock, with the hold event's slot.
    pub(crate) fn release_reversed_hold(
        &self,
        event_key: &[u8],
        event_auth_id: &str,
        hold: Option<&HoldRecord>,
        card: Card,
        now_ms: i64,
        ops: &mut Vec<Op>,
    ) -> Card {
        let Some(h) = hold.filter(|h| h.state == HoldState::Open && h.auth_id == event_auth_id)
        else {
            return card;
        };
        let after = HoldRecord {
            state: HoldState::Voided,
            ..h.clone()
        };
        hold_ops(
            ops,
            event_key,
            Some(h),
            &after,
            now_ms,
            self.keep_holds_ms(),
        );
        card.give_back(h.day, h.amount_fen)
    }

    /// One sweep step: expires up to [`SWEEP_STEP_MAX`] open holds past
    /// their expiry (their reservation of the daily spend goes back, and a
    /// record `decision: "expire"` says so) and deletes closed holds kept
    /// long enough. Returns how many due entries it handled.
    pub async fn sweep_holds(&self, now_ms: i64) -> Result<usize, ServiceError> {
        let store = self.store.clone();
        let due = tokio::task::spawn_blocking(move || {
            let mut due = Vec::new();
            store
                .scan(Cf::Holds, &[DUE], |k, _| match parse_due(k) {
                    Some((at, key)) if at <= now_ms => {
                        due.push((k.to_vec(), key.to_vec()));
                        due.len() < SWEEP_STEP_MAX
                    }
                    _ => false,
                })
                .map(|()| due)
        })
        .await
        .map_err(|_| ServiceError::unavailable("the hold sweep was interrupted"))??;
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

    /// Expires one open hold, or deletes one closed hold kept long enough.
    async fn sweep_one(&self, index: &[u8], key: &[u8], now_ms: i64) -> Result<(), ServiceError> {
        // The hold's slot, like a capture: a step of this hold running now
        // finishes first, and the sweep reads what it wrote.
        let (slot, _) = self.idem.hold(key, now_ms).await?;
        // A step that closed the hold after the index was read has moved
        // its entry: this one is gone, and so is the sweep's business.
        if self.store.read(Cf::Holds, index).await?.is_none() {
            return Ok(());
        }
        let mut ops = vec![Op::Delete(Cf::Holds, index.to_vec())];
        let stored = read_hold_async(&self.store, key).await?;
        let expired = stored.as_ref().is_some_and(|h| h.state == HoldState::Open);
        let pending = match stored {
            // An open hold's only entry is its expiry, so an open hold
            // found here is due.
            Some(h) if h.state == HoldState::Open => {
                let card_no = self.holder_card(&h).await?;
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
                let record = expiry_record(
                    key,
                    &h,
                    &card_no,
                    String::from(self.auth_ids.next()),
                    now_ms,
                );
                let pending = self.journal.submit(Commit {
                    record: Some(record.to_json()),
                    ops,
                    hold_until_written: Some(Box::new(slot)),
                    card: Some(card_no.as_str().into()),
                    also: Vec::new(),
                    fences: Vec::new(),
                })?;
                if let Some(c) = card_after {
                    self.card_follows(card_no.clone(), c);
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
                })?
            }
        };
        pending.durable().await?;
        if expired {
            metrics::counter!("onecard_holds_expired_total").increment(1);
        }
        Ok(())
    }
}

/// A hold's record (`decision: "hold"`, which settlement does not take).
fn hold_record(
    terminal: &str,
    req: &HoldRequest,
    resolved: &Resolved<'_>,
    outcome: &Outcome,
    auth_id: String,
    now_ms: i64,
) -> DecisionRecord {
    let approved = outcome.decision.is_approve();
    DecisionRecord {
        at_ms: now_ms,
        terminal: terminal.to_owned(),
        event_id: req.auth.event_id.clone(),
        auth_id,
        kind: req.auth.kind(),
        card_no: resolved.card.as_deref().map(Into::into).unwrap_or_default(),
        scenario: Some(Scenario::Medical),
        amount_fen: req.auth.amount_fen,
        decision: if approved { "hold" } else { "decline" }.to_owned(),
        reason: outcome.decision.reason(),
        // A hold charges nothing: the capture does (and a reversal of a
        // hold gives nothing back; it releases the hold).
        charged_fen: 0,
        site: req.auth.site.clone(),
        occurred_at: req.auth.occurred_at.clone(),
        scan: resolved.scan.clone(),
        ..DecisionRecord::default()
    }
}

/// A capture's or a void's answer: like an authorization's, with the
/// hold's id and expiry and, for a capture, the bill's split as booked.
fn step_answer(
    req: &HoldStepRequest,
    step_id: &str,
    stored: Option<&HoldRecord>,
    step: &Step,
) -> Vec<u8> {
    let expires_at = stored.map(|h| rfc3339_ms(h.expires_ms));
    MedicalAnswer {
        event_id: &req.event_id,
        auth_id: step_id,
        decision: if step.reason == Reason::Ok {
            "approve"
        } else {
            "decline"
        },
        reason: step.reason.code(),
        amount_fen: step.amount_fen,
        hold_id: stored.map(|h| h.auth_id.as_str()),
        expires_at: expires_at.as_deref(),
        split: step.split,
    }
    .to_vec()
}

/// The record of a hold the sweep expired (`decision: "expire"`, which
/// settlement does not take).
fn expiry_record(
    key: &[u8],
    h: &HoldRecord,
    card_no: &CardNo,
    auth_id: String,
    now_ms: i64,
) -> DecisionRecord {
    let (terminal, event_id) = split_key(key);
    DecisionRecord {
        at_ms: now_ms,
        terminal,
        event_id,
        auth_id,
        kind: EventKind::Tap,
        card_no: card_no.into(),
        scenario: Some(Scenario::Medical),
        amount_fen: Some(h.amount_fen),
        decision: "expire".to_owned(),
        reason: Reason::HoldExpired,
        site: h.site.clone(),
        ..DecisionRecord::default()
    }
}

/// Runs sweep steps every `interval` until `stop` fires.
pub async fn run_sweep(
    gateway: std::sync::Arc<Gateway>,
    interval: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        loop {
            if *stop.borrow() {
                return;
            }
            match gateway.sweep_holds(gateway.now_ms()).await {
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
