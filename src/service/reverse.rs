//! `POST /v1/reverse`: a terminal that never saw an authorization's answer
//! cancels it. Idempotent: the same reversal again gets the first answer.
//!
//! - An approval that charged: the charge is given back (the card's daily
//!   spend, its transit totals, a capture's deductible), and settlement
//!   either takes the event out of its open batch or, if the batch is
//!   sealed, settles a reversal line in a later one.
//! - A decline or a free approval: nothing to give back; recorded. A hold
//!   is released like a void.
//! - An event the gateway never saw: recorded, and a tombstone under the
//!   event's key makes it a decline `REVERSED` if it arrives later.
//!
//! The path: begin (the reversal's own idempotency) → the event's slot
//! (waiting for the event if it is being decided right now, so a reversal
//! never races its event) → what the event was → the card that carries
//! its counters now → decide and commit under that card's lock → durable.

use serde::Deserialize;

use onecard_core::holds::HoldRecord;
use onecard_core::model::{Card, CardNo, EventKind, Reason, Scenario};
use onecard_core::record::DecisionRecord;
use onecard_core::scenario::medical::{self, Split};
use onecard_core::scenario::transit;
use onecard_core::wire::{ReverseAnswer, ReverseRequest, ReverseStatus};

use crate::service::error::ServiceError;
use crate::service::gateway::Gateway;
use crate::service::pipeline::{Begun, Decided, Remember};
use crate::store::durable::Op;
use crate::store::holds::read_hold_async;
use crate::store::idem::{self, Tail};
use crate::store::Cf;

/// The `409` of a reversal sent again with another body.
const REVERSAL_REUSED: &str = "this event was already reversed with a different body";

/// What a reversal found of the event it reverses.
struct Reversed {
    status: ReverseStatus,
    /// The event's auth_id, when the gateway saw it.
    event_auth_id: Option<String>,
    /// What the event's answer was remembered with.
    approved: bool,
    charged_fen: i64,
    scenario: Option<Scenario>,
    card_no: Option<String>,
    site: Option<String>,
    /// When the event was decided: its charge is given back to that day.
    event_at_ms: i64,
    /// A capture's split, from its answer: given back with it.
    split: Option<Split>,
}

impl Reversed {
    /// Reads the event's remembered answer (`None`: never seen here).
    fn of(stored: Option<&[u8]>, now_ms: i64) -> Result<Reversed, ServiceError> {
        let stored = stored.map(|v| idem::decode(v).expect("checked by the idempotency slot"));
        let mut r = Reversed {
            status: ReverseStatus::UnknownEvent,
            event_auth_id: None,
            approved: false,
            charged_fen: 0,
            scenario: None,
            card_no: None,
            site: None,
            event_at_ms: stored.as_ref().map_or(now_ms, |s| s.created_ms),
            split: None,
        };
        match stored.map(|s| (s.auth_id, s.tail, s.body)) {
            Some((auth_id, Tail::Origin(o), body)) => {
                r.status = if o.approved && o.charged_fen > 0 {
                    ReverseStatus::Reversed
                } else {
                    ReverseStatus::NotCharged
                };
                r.event_auth_id = Some(auth_id.to_owned());
                r.approved = o.approved;
                r.charged_fen = o.charged_fen;
                r.scenario = Some(o.scenario);
                r.card_no = Some(o.card_no.to_owned());
                r.site = o.site.map(str::to_owned);
                r.split = split_of(body);
            }
            // Answers stored before reversals existed carry no origin:
            // nothing here says what to give back.
            Some((_, Tail::Plain, _)) => {
                return Err(ServiceError::already_used(
                    "this event was recorded by an older version and cannot be reversed here",
                ))
            }
            // A tombstone is written only together with this reversal's
            // own answer, which `begin` found missing: it expired with it.
            Some((_, Tail::Tombstone, _)) | None => {}
        }
        Ok(r)
    }

    /// What is given back: the charge of a reversed approval.
    fn given_back(&self) -> i64 {
        if self.status == ReverseStatus::Reversed {
            self.charged_fen
        } else {
            0
        }
    }

    /// The card whose counters change: one that was charged, or a medical
    /// approval's (a hold to release, a deductible to give back) even when
    /// nothing was charged.
    fn card(&self) -> Option<CardNo> {
        let touches =
            self.given_back() > 0 || (self.scenario == Some(Scenario::Medical) && self.approved);
        touches
            .then(|| self.card_no.as_deref().and_then(|c| CardNo::parse(c).ok()))
            .flatten()
    }
}

/// A capture's split, as its answer carried it.
fn split_of(answer: &[u8]) -> Option<Split> {
    #[derive(Deserialize)]
    struct Answered {
        split: Option<Split>,
    }
    serde_json::from_slice::<Answered>(answer)
        .ok()
        .and_then(|a| a.split)
}

impl Gateway {
    /// Reverses one of `terminal`'s events; the answer is durable when
    /// this returns.
    pub async fn reverse(
        &self,
        terminal: &str,
        req: &ReverseRequest,
        now_ms: i64,
    ) -> Result<Vec<u8>, ServiceError> {
        self.retrying(|| self.reverse_once(terminal, req, now_ms))
            .await
    }

    async fn reverse_once(
        &self,
        terminal: &str,
        req: &ReverseRequest,
        now_ms: i64,
    ) -> Result<Vec<u8>, ServiceError> {
        let key = idem::reversal_key(terminal, &req.event_id);
        let ticket = match self
            .begin(key, req.fingerprint(), now_ms, REVERSAL_REUSED)
            .await?
        {
            Begun::Replay(answer) => return Ok(answer),
            Begun::Decide(ticket) => ticket,
        };
        let event_key = idem::key(terminal, &req.event_id);
        let (event_slot, stored) = self.idem.hold(&event_key, now_ms).await?;
        let event = Reversed::of(stored.as_deref(), now_ms)?;
        // A replacement card carries the old one's counters (and its holds'
        // reservations): what is given back goes there.
        let card = match event.card() {
            Some(c) => Some(self.current_card(c).await?),
            None => None,
        };
        let hold = match event.scenario {
            Some(Scenario::Medical) if event.approved && event.charged_fen == 0 => {
                read_hold_async(&self.store, &event_key).await?
            }
            _ => None,
        };
        let ticket = ticket.also_holding(event_slot);
        let locked = card.clone();
        let committed = self
            .decide_and_commit(ticket, locked.as_ref(), now_ms, |snapshot| {
                Ok(self.reversal(
                    terminal, req, &event, &event_key, hold, card, snapshot, now_ms,
                ))
            })
            .await?;
        let durable = committed.pending.durable().await;
        crate::service::timing::mark(crate::service::timing::Phase::Commit);
        durable?;
        metrics::counter!("onecard_reversals_total", "status" => event.status.as_str())
            .increment(1);
        Ok(committed.answer)
    }

    /// What a reversal writes: its record and answer, the tombstone of an
    /// event not seen yet, and the card with its charge given back (to the
    /// day it counted in) and, for a medical event, its hold released or
    /// its deductible given back.
    #[allow(clippy::too_many_arguments)]
    fn reversal(
        &self,
        terminal: &str,
        req: &ReverseRequest,
        event: &Reversed,
        event_key: &[u8],
        hold: Option<HoldRecord>,
        card: Option<CardNo>,
        snapshot: Option<Card>,
        now_ms: i64,
    ) -> Decided<'static> {
        let reversal_id = String::from(self.auth_ids.next());
        let given_back = event.given_back();
        let mut ops = Vec::new();
        if event.status == ReverseStatus::UnknownEvent {
            let tombstone = idem::encode(&[0; 32], now_ms, &reversal_id, Tail::Tombstone, b"");
            ops.push(Op::Put(Cf::Idem, event_key.to_vec(), tombstone));
        }
        let mut split = None;
        let card_after = card.zip(snapshot).and_then(|(card_no, before)| {
            let (after, s) =
                self.given_back_to(event, event_key, hold.as_ref(), before, now_ms, &mut ops);
            split = s;
            (after != before).then_some((card_no, after))
        });
        let answer = ReverseAnswer {
            event_id: &req.event_id,
            reversal_id: &reversal_id,
            status: event.status,
            auth_id: event.event_auth_id.as_deref(),
            amount_fen: given_back,
        }
        .to_vec();
        let mut record = reversal_record(terminal, req, event, reversal_id, now_ms);
        record.split = split;
        Decided {
            record: record.into(),
            answer,
            remember: Remember::Answer,
            ops,
            card_after,
            venue_after: None,
        }
    }

    /// The card with the event's charge given back to the day it counted
    /// in (and its transit totals), and for a medical approval its hold
    /// released or the deductible its capture used given back; with the
    /// capture's split for the reversal's settlement line.
    fn given_back_to(
        &self,
        event: &Reversed,
        event_key: &[u8],
        hold: Option<&HoldRecord>,
        card: Card,
        now_ms: i64,
        ops: &mut Vec<Op>,
    ) -> (Card, Option<Split>) {
        let given_back = event.given_back();
        let day = self.policy.local_day(event.event_at_ms.div_euclid(1000));
        let mut c = card.give_back(day, given_back);
        if event.scenario == Some(Scenario::Transit) {
            c.transit = transit::give_back(c.transit, day, given_back);
        }
        if event.scenario != Some(Scenario::Medical) || !event.approved {
            return (c, None);
        }
        if event.charged_fen == 0 {
            // A hold: released like a void (only the hold this event made).
            let auth_id = event.event_auth_id.as_deref().unwrap_or("");
            return (
                self.release_reversed_hold(event_key, auth_id, hold, c, now_ms, ops),
                None,
            );
        }
        // A capture: the deductible its split used goes back to its year,
        // and the split rides on the reversal's settlement line.
        match event.split {
            Some(s) => {
                let year = medical::local_year(
                    event.event_at_ms.div_euclid(1000),
                    self.policy.day_offset_minutes,
                );
                (medical::unbook_deductible(c, year, &s), Some(s))
            }
            None => (c, None),
        }
    }
}

/// A reversal's record: `decision: "reverse"`, what it gave back, the
/// auth_id of what it reverses (`None` for an event never seen).
fn reversal_record(
    terminal: &str,
    req: &ReverseRequest,
    event: &Reversed,
    reversal_id: String,
    now_ms: i64,
) -> DecisionRecord {
    DecisionRecord {
        at_ms: now_ms,
        terminal: terminal.to_owned(),
        event_id: req.event_id.clone(),
        auth_id: reversal_id,
        kind: EventKind::Tap,
        card_no: event.card_no.as_deref().map(Into::into).unwrap_or_default(),
        scenario: event.scenario,
        decision: "reverse".to_owned(),
        reason: Reason::Ok,
        charged_fen: event.given_back(),
        site: event.site.clone(),
        occurred_at: req.occurred_at.clone(),
        reverses: event.event_auth_id.clone(),
        ..DecisionRecord::default()
    }
}
