//! `POST /v1/authorize`: a tap or a scan, decided by the core crate's
//! `authz::decide` and made durable before it is answered.
//!
//! The path is the pipeline's phases (`pipeline`) in order:
//! check the request against the config → begin (idempotency) → resolve
//! (credential) → gather (facts) → decide and commit under the card's lock
//! → answered.

use std::time::Instant;

use onecard_core::authz::{self, Event, Facts, Outcome, Policy};
use onecard_core::model::{Card, CardNo, Reason, Scenario};
use onecard_core::record::RecordView;
use onecard_core::scenario::{self, access, health, identity, region};
use onecard_core::wire::{AuthorizeAnswer, AuthorizeRequest, Credential};

use crate::service::credential::Resolved;
use crate::service::error::ServiceError;
use crate::service::gateway::{AuthId, Gateway};
use crate::service::pipeline::{Begun, Decided, Record, Remember};
use crate::store::venues::Count;
use crate::store::{idem, profiles};

/// The `409` of an event id used before with another body.
pub(crate) const EVENT_REUSED: &str =
    "`event_id` was already used by this terminal with a different body";

/// What the rules need besides the card, looked up before the card's lock
/// (none of it is changed by a tap).
pub(crate) struct Gathered<'a> {
    pub facts: Facts<'a>,
    pub purpose: Option<&'a identity::Purpose>,
    /// The holder's masked name, where the counter's purpose shows it.
    pub name_masked: Option<String>,
}

impl Gateway {
    /// Decides one authorization of `terminal` and returns the answer's
    /// bytes, durable (per `journal.durability`) when this returns.
    pub async fn authorize(
        &self,
        terminal: &str,
        req: &AuthorizeRequest,
        now_ms: i64,
    ) -> Result<Vec<u8>, ServiceError> {
        self.retrying(|| self.authorize_once(terminal, req, now_ms))
            .await
    }

    async fn authorize_once(
        &self,
        terminal: &str,
        req: &AuthorizeRequest,
        now_ms: i64,
    ) -> Result<Vec<u8>, ServiceError> {
        let started = Instant::now();
        let amount_fen = self.check_authorize(req)?;
        let key = idem::key(terminal, &req.event_id);
        let ticket = match self
            .begin(key, req.fingerprint(), now_ms, EVENT_REUSED)
            .await?
        {
            Begun::Replay(answer) => return Ok(answer),
            Begun::Decide(ticket) => ticket,
        };
        let resolved = self.resolve(&req.credential, now_ms).await?;
        let gathered = self.gather(terminal, req, &resolved).await?;
        let reversed = ticket.reversed;
        let card = resolved.card.as_deref();
        // Made here, not in the decision step, so that the record can
        // borrow it like the request's fields.
        let auth_id = self.auth_ids.next();
        let committed = self
            .decide_and_commit(ticket, card, now_ms, |snapshot| {
                let outcome = match (card, resolved.early) {
                    // Reversed by its terminal before it got here: a late copy
                    // of a request the terminal gave up on must not charge.
                    _ if reversed => Outcome::decline(Reason::Reversed),
                    (_, Some(reason)) => Outcome::decline(reason),
                    (None, None) => Outcome::decline(Reason::CardNotFound),
                    (Some(card_no), None) => {
                        let event = Event {
                            card_no,
                            scenario: req.scenario,
                            amount_fen,
                        };
                        return self.decide_authorize(
                            terminal, req, &auth_id, event, snapshot, gathered, &resolved, now_ms,
                        );
                    }
                };
                Ok(self.authorized(
                    terminal, req, &auth_id, &resolved, outcome, None, &gathered, snapshot, now_ms,
                ))
            })
            .await?;
        self.answered(committed, req.scenario, started).await
    }

    /// The request against the config, before anything is recorded: the
    /// amount where the scenario charges (optional where a tariff prices
    /// it), the fields a scenario's rules make required or meaningless, and
    /// a scan where scanning is not configured. Returns the amount.
    fn check_authorize(&self, req: &AuthorizeRequest) -> Result<i64, ServiceError> {
        let priced = self.policy.priced_here(req.scenario, req.site.as_deref());
        let amount_fen = amount_for(&self.policy, req.scenario, req.amount_fen, !priced)?;
        self.check_scenario_fields(req)?;
        if self.scanner.is_none() && matches!(req.credential, Credential::Scan(_)) {
            return Err(crate::service::credential::not_configured());
        }
        Ok(amount_fen)
    }

    /// Phase 3 of an authorization: the site, the place, stops or zones,
    /// the door's allow-list entry, the partner's deny list, the counter's
    /// purpose and what it may show of the holder.
    async fn gather<'a>(
        &'a self,
        terminal: &str,
        req: &'a AuthorizeRequest,
        resolved: &Resolved<'_>,
    ) -> Result<Gathered<'a>, ServiceError> {
        let site = req.site.as_deref();
        let purpose =
            (req.scenario == Scenario::Identity).then(|| self.policy.identity.purpose_of(terminal));
        let mut facts = Facts {
            site,
            place: scenario::place_hash(site.unwrap_or(terminal)),
            units: req.stops.or(req.zones),
            purpose,
            ..Facts::default()
        };
        let mut name_masked = None;
        if let Some(c) = resolved.card.as_deref() {
            facts.allow = self.allow_fact(req.scenario, site, c);
            if let region::Origin::Partner(p) = self.policy.regions.origin(c) {
                facts.partner_listed = self.partners.contains(p, c);
            }
            if purpose.is_some_and(|p| p.disclose.contains(&identity::Field::Name)) {
                name_masked = profiles::profile_async(&self.store, c).await?.name_masked;
            }
        }
        Ok(Gathered {
            facts,
            purpose,
            name_masked,
        })
    }

    /// Phase 4 of an authorization of a known card: the rules (with the
    /// venue's count under its lock, where it has a quota), then what the
    /// decision writes.
    #[allow(clippy::too_many_arguments)]
    fn decide_authorize<'g>(
        &'g self,
        terminal: &'g str,
        req: &'g AuthorizeRequest,
        auth_id: &'g AuthId,
        event: Event<'_>,
        snapshot: Option<Card>,
        mut gathered: Gathered<'_>,
        resolved: &'g Resolved<'_>,
        now_ms: i64,
    ) -> Result<Decided<'g>, ServiceError> {
        let now_s = now_ms.div_euclid(1000);
        let day = self.policy.local_day(now_s);
        // A venue with a quota is locked after the card (never the other
        // way round), until its new count is set.
        let venue = match (req.scenario, req.site.as_deref()) {
            (Scenario::Culture, Some(s)) => self.venues.lock(s).map(|g| (g, s)),
            _ => None,
        };
        gathered.facts.venue_entries = venue.as_ref().map_or(0, |(v, _)| v.on(day));
        let decide_started = Instant::now();
        let outcome = authz::decide(
            event,
            snapshot.as_ref(),
            &*self.deny,
            &self.policy,
            &gathered.facts,
            now_s,
        );
        self.metrics
            .decide_latency
            .record(decide_started.elapsed().as_secs_f64());
        let venue_after = match (outcome.venue_entries, venue) {
            (Some(entries), Some((guard, site))) => {
                Some((guard, site.to_owned(), Count { day, entries }))
            }
            _ => None,
        };
        Ok(self.authorized(
            terminal,
            req,
            auth_id,
            resolved,
            outcome,
            venue_after,
            &gathered,
            snapshot,
            now_ms,
        ))
    }

    /// What an authorization writes: its answer, its record, the card's new
    /// state and the venue's count.
    #[allow(clippy::too_many_arguments)]
    fn authorized<'g>(
        &self,
        terminal: &'g str,
        req: &'g AuthorizeRequest,
        auth_id: &'g AuthId,
        resolved: &'g Resolved<'_>,
        outcome: Outcome,
        venue_after: Option<(parking_lot::MutexGuard<'g, Count>, String, Count)>,
        gathered: &Gathered<'_>,
        snapshot: Option<Card>,
        now_ms: i64,
    ) -> Decided<'g> {
        let d = outcome.decision;
        let card_no = resolved.card.as_deref();
        let approved_card = outcome.card_after.or(snapshot).filter(|_| d.is_approve());
        let answer = authorize_answer(req, auth_id, &outcome, card_no, approved_card, gathered);
        if !d.is_approve() {
            if let Some(card) = card_no {
                tracing::debug!(card = %card, reason = d.reason().code(), "declined");
            }
        }
        let view = RecordView {
            at_ms: now_ms,
            terminal,
            event_id: &req.event_id,
            auth_id: auth_id.as_str(),
            kind: req.kind(),
            card_no: card_no.map_or("", |c| c.as_str()),
            scenario: Some(req.scenario),
            amount_fen: req.amount_fen,
            decision: if d.is_approve() { "approve" } else { "decline" },
            reason: d.reason(),
            charged_fen: d.amount_fen(),
            site: req.site.as_deref(),
            occurred_at: req.occurred_at.as_deref(),
            reverses: None,
            scan: resolved.scan.as_ref(),
            offline: false,
            fare: outcome.fare.filter(|_| d.is_approve()),
            bill_ref: req.bill_ref.as_deref(),
            credit: None,
            split: None,
            hold_event_id: None,
        };
        Decided {
            record: Record::Borrowed(view),
            answer,
            remember: Remember::Event {
                approved: d.is_approve(),
            },
            ops: Vec::new(),
            card_after: card_no.cloned().zip(outcome.card_after),
            venue_after,
        }
    }

    /// Request fields a scenario's config makes required or meaningless:
    /// a route charging by stops needs `stops`, a payment may need its
    /// bill reference, a controlled door its site.
    fn check_scenario_fields(&self, req: &AuthorizeRequest) -> Result<(), ServiceError> {
        if req.scenario == Scenario::Transit {
            check_units(&self.policy, req)?;
        }
        if req.scenario == Scenario::Payment
            && self.config.payment.bill_ref_required
            && req.bill_ref.is_none()
        {
            return Err(ServiceError::invalid(
                "missing field `bill_ref` (a public payment names the bill it pays)",
            ));
        }
        if req.scenario == Scenario::Access
            && req.site.is_none()
            && !self.config.access.controlled_site_prefixes.is_empty()
        {
            return Err(ServiceError::invalid(
                "missing field `site` (doors and gates name themselves: allow-lists are per site)",
            ));
        }
        Ok(())
    }

    /// The card's allow-list entry at a door, where the site is controlled.
    fn allow_fact(&self, scenario: Scenario, site: Option<&str>, card: &CardNo) -> access::Allow {
        match site {
            Some(s) if scenario == Scenario::Access && self.config.access.controls(s) => {
                match self.allow.get(s, card) {
                    Some(w) => access::Allow::Listed(w),
                    None => access::Allow::NotListed,
                }
            }
            _ => access::Allow::Open,
        }
    }
}

/// `stops` or `zones`: required on a route that charges by them, refused
/// elsewhere.
fn check_units(policy: &Policy, req: &AuthorizeRequest) -> Result<(), ServiceError> {
    let kind = req
        .site
        .as_deref()
        .and_then(|s| policy.transit.route(s))
        .map(|r| r.fare);
    let needed = kind.and_then(|k| k.field());
    for (name, v) in [("stops", req.stops), ("zones", req.zones)] {
        match (v, needed) {
            (None, Some(n)) if n == name => {
                return Err(ServiceError::invalid(format!(
                    "missing field `{name}` (this route charges by {name} travelled)"
                )))
            }
            (Some(_), n) if n != Some(name) => {
                return Err(ServiceError::invalid(format!(
                    "`{name}` is not used on this route (its fare is {})",
                    match n {
                        Some(other) => format!("by {other}"),
                        None if kind.is_some() => "flat".to_owned(),
                        None => "the amount the validator sends".to_owned(),
                    }
                )))
            }
            _ => {}
        }
    }
    Ok(())
}

/// The answer's bytes: the decision, and for an approval what the
/// scenario shows (the fare, the visits, what the counter may see of the
/// holder, the health status).
fn authorize_answer(
    req: &AuthorizeRequest,
    auth_id: &str,
    outcome: &Outcome,
    card_no: Option<&CardNo>,
    approved_card: Option<Card>,
    gathered: &Gathered<'_>,
) -> Vec<u8> {
    let d = outcome.decision;
    let disclosure = match (gathered.purpose, card_no, approved_card) {
        (Some(p), Some(c), Some(card)) => Some(identity::disclose(
            p,
            c,
            &card,
            gathered.name_masked.as_deref(),
        )),
        _ => None,
    };
    let health = approved_card
        .filter(|_| req.scenario == Scenario::Health)
        .map(|c| health::attest(&c));
    AuthorizeAnswer {
        event_id: &req.event_id,
        auth_id,
        decision: if d.is_approve() { "approve" } else { "decline" },
        reason: d.reason().code(),
        amount_fen: d.amount_fen(),
        fare: outcome.fare.as_ref().filter(|_| d.is_approve()),
        visits: approved_card
            .filter(|_| req.scenario == Scenario::Culture)
            .map(|c| c.visits),
        identity: disclosure.as_ref(),
        health: health.as_ref(),
    }
    .to_vec()
}

/// The amount an event asks to charge, checked against its scenario:
/// present where the scenario charges (when `required`), 0 or absent where
/// it does not.
pub fn amount_for(
    policy: &Policy,
    scenario: Scenario,
    amount_fen: Option<i64>,
    required: bool,
) -> Result<i64, ServiceError> {
    match (policy.rule(scenario).charges, amount_fen) {
        (true, None) if required => Err(ServiceError::invalid(format!(
            "missing field `amount_fen` (required for scenario {scenario})"
        ))),
        (false, Some(a)) if a > 0 => Err(ServiceError::invalid(format!(
            "`amount_fen` must be 0 or absent for scenario {scenario}, which does not charge"
        ))),
        (_, a) => Ok(a.unwrap_or(0)),
    }
}
