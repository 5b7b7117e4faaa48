//! The gateway's state and the life of one authorization.
//!
//! [`Gateway::authorize`] runs the phases of DESIGN.md in order, each with
//! one job: decode and validate → idempotency → credential → decide (pure,
//! under the card's lock) → commit (group commit, durable) → answer.
//! Admission happens before, in the ingress, so that a refused request costs
//! no parsing. Nothing here knows about HTTP or TLS.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use onecard_core::authz::{self, Event, Policy};
use onecard_core::model::{CardNo, Reason, Scenario};
use onecard_core::record::DecisionRecord;
use onecard_core::scenario::{self, access, health, identity, region};
use onecard_core::time::Clock;
use onecard_core::wire::{self, AuthorizeAnswer, ReverseAnswer, ReverseStatus};

use crate::config::Config;
use crate::service::credential;
use crate::service::error::ServiceError;
use crate::service::idempotency::{self, Idempotency, Lookup};
use crate::service::metrics::HotMetrics;
use crate::store::allow::AllowList;
use crate::store::durable::{Commit, Durable, Op, Pending};
use crate::store::idem::{self, Origin, Tail};
use crate::store::journal::Journal;
use crate::store::partners::PartnerLists;
use crate::store::{cards, meta, profiles, venues, CardTable, Cf, DenyList, Store, StoreError};

/// Unique authorization ids: the boot number (persisted, bumped at every
/// start) and a counter within the boot, as 20 hex digits. Unique across
/// restarts without a write per request.
pub struct AuthIds {
    boot: u64,
    next: AtomicU64,
}

impl AuthIds {
    pub fn new(boot: u64) -> AuthIds {
        AuthIds {
            boot,
            next: AtomicU64::new(1),
        }
    }
    pub fn next(&self) -> String {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        format!("{:08x}{:012x}", self.boot & 0xffff_ffff, n)
    }
}

/// What the idempotency step leaves to do.
pub(crate) enum Begun {
    Replay(Vec<u8>),
    Decide(idempotency::InFlight, bool),
}

/// A terminal's decision, ready to be recorded: an authorization, a
/// medical hold, a capture or a void. [`Gateway::commit_decision`] writes
/// all of it in one journal commit.
pub(crate) struct Decided<'a> {
    /// The idempotency slot(s) decided under, released by the writer once
    /// the commit is on disk (even if the client has hung up by then).
    pub slots: Box<dyn Send>,
    /// The event's idempotency key.
    pub key: Vec<u8>,
    pub fingerprint: &'a [u8; 32],
    pub now_ms: i64,
    pub auth_id: &'a str,
    /// What a later reversal of the event needs to know.
    pub origin: Origin<'a>,
    /// The answer, replayed to a retry.
    pub answer: &'a [u8],
    pub record: &'a DecisionRecord,
    /// The decision's other writes: the card, a venue's count, a hold.
    pub ops: Vec<Op>,
    /// The code a scan spent: given back if the journal refuses the
    /// commit, so the terminal's retry is a new attempt, not a replay.
    pub spent: Option<&'a onecard_core::record::ScanRef>,
}

pub struct Gateway {
    pub config: Config,
    pub policy: Policy,
    pub store: Store,
    /// Where every durable write goes (today: RocksDB group commit).
    pub journal: Arc<dyn Durable>,
    /// Where the time comes from: the wall clock, or a test's.
    pub clock: Arc<dyn Clock>,
    pub cards: CardTable,
    pub deny: DenyList,
    pub idem: Idempotency,
    pub metrics: HotMetrics,
    /// Each settlement sink's status, shared by its delivery task and the
    /// admin API.
    pub settlement: crate::service::settle::status::Settlement,
    pub auth_ids: AuthIds,
    ready: AtomicBool,
    /// Scans: issuer keys and replay cache; `None` without keys.
    pub scanner: Option<credential::Scanner>,
    pub audit: crate::store::audit::Audit,
    /// Serializes card-life changes and credential bindings: rare, and
    /// each reads then writes several records.
    pub life: tokio::sync::Mutex<()>,
    /// The key of personal-ID hashes, if personal IDs are used.
    pub id_key: Option<Vec<u8>>,
    /// Serializes offline uploads (their risk counters are read, then
    /// written).
    pub offline: tokio::sync::Mutex<()>,
    /// The last full deny list sent to a validator, by version: after an
    /// outage thousands of validators ask for the same one.
    pub deny_full: parking_lot::Mutex<Option<(u64, bytes::Bytes)>>,
    /// One full deny list built at a time.
    pub deny_full_build: tokio::sync::Mutex<()>,
    /// Culture venues' entries today, for their quotas.
    pub venues: venues::Venues,
    /// Allow-lists of controlled doors and gates.
    pub allow: AllowList,
    /// Partner regions' deny lists.
    pub partners: PartnerLists,
    /// Serializes allow-list changes and partner deny-list imports (rare,
    /// and each reads then writes).
    pub lists: tokio::sync::Mutex<()>,
}

/// The amount an event asks to charge, checked against its scenario:
/// present where the scenario charges (when `required`), 0 or absent where
/// it does not.
pub fn amount_for(
    policy: &Policy,
    scenario: onecard_core::model::Scenario,
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

impl Gateway {
    /// Opens the store, rebuilds memory from it and starts the journal
    /// writer. `clock` is where every request reads the time.
    pub fn open(config: Config, clock: Arc<dyn Clock>) -> Result<Gateway, StoreError> {
        let policy = config.policy().expect("config was validated");
        std::fs::create_dir_all(&config.data_dir).map_err(|e| StoreError::Corrupt {
            cf: "data_dir",
            detail: e.to_string(),
        })?;
        let store = Store::open(&config.data_dir.join("db"))?;
        let boot = store.get_u64(Cf::Meta, meta::BOOT)?.unwrap_or(0) + 1;
        let mut wo = rocksdb::WriteOptions::default();
        wo.set_sync(true);
        store
            .db()
            .put_cf_opt(store.cf(Cf::Meta), meta::BOOT, boot.to_be_bytes(), &wo)?;
        let cards = CardTable::load(&store)?;
        let deny = DenyList::load(&store)?;
        let journal: Arc<dyn Durable> = Arc::new(Journal::start(
            store.clone(),
            config.journal.durability,
            config.journal.batch_events_max,
            config.journal.queue_events_max,
        )?);
        let idem = Idempotency::new(store.clone(), config.idempotency.retention_s);
        tracing::info!(
            cards = cards.len(),
            denylist.entries = deny.len(),
            denylist.version = deny.version(),
            journal.last_seq = journal.last_seq(),
            boot,
            "state rebuilt from RocksDB"
        );
        let settlement = crate::service::settle::status::Settlement::new(&config.settlement.sinks);
        let scanner = credential::Scanner::from_config(&config.qr);
        if let Some(s) = &scanner {
            let refilled = s.refill(&store, clock.now_ms())?;
            tracing::info!(
                codes = refilled,
                "QR replay cache refilled from the journal"
            );
        }
        let audit = crate::store::audit::Audit::load(&store)?;
        let id_key = config.privacy.id_hash_key().expect("config was validated");
        let venues = venues::Venues::load(&store, &policy.culture)?;
        let allow = AllowList::load(&store)?;
        let partner_names: Vec<String> = policy
            .regions
            .partners
            .iter()
            .map(|p| p.name.clone())
            .collect();
        let partners = PartnerLists::load(&store, &partner_names)?;
        Ok(Gateway {
            venues,
            allow,
            partners,
            lists: tokio::sync::Mutex::new(()),
            scanner,
            audit,
            life: tokio::sync::Mutex::new(()),
            id_key,
            offline: tokio::sync::Mutex::new(()),
            deny_full: parking_lot::Mutex::new(None),
            deny_full_build: tokio::sync::Mutex::new(()),
            settlement,
            config,
            policy,
            store,
            journal,
            cards,
            deny,
            idem,
            clock,
            metrics: HotMetrics::new(),
            auth_ids: AuthIds::new(boot),
            ready: AtomicBool::new(false),
        })
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
    }

    /// What an SRE should know that does not stop authorization: each
    /// settlement sink's warnings, named by sink.
    pub fn warnings(&self) -> Vec<String> {
        let now = self.now_ms();
        self.settlement
            .all()
            .iter()
            .flat_map(|s| {
                let v = s.view(now);
                v.warnings
                    .into_iter()
                    .map(move |w| format!("settlement {}: {w}", s.name))
            })
            .collect()
    }

    /// Why the gateway should not take traffic, if it should not.
    pub fn not_ready(&self) -> Option<&'static str> {
        if !self.ready.load(Ordering::Acquire) {
            return Some("starting or shutting down");
        }
        if !self.journal.is_healthy() {
            return Some("the journal cannot write");
        }
        None
    }

    /// Decides one authorization request of `terminal` and returns the
    /// answer body, which is durable (per `journal.durability`) when this
    /// returns.
    pub async fn authorize(
        &self,
        terminal: &str,
        body: &[u8],
        now_ms: i64,
    ) -> Result<Vec<u8>, ServiceError> {
        let started = Instant::now();
        let req = wire::parse_authorize(body)?;
        let priced = self.policy.priced_here(req.scenario, req.site.as_deref());
        let amount_fen = amount_for(&self.policy, req.scenario, req.amount_fen, !priced)?;
        self.check_scenario_fields(&req)?;
        let scanner = self.scanner.as_ref();
        if scanner.is_none() && matches!(req.credential, wire::Credential::Scan(_)) {
            // Refused before anything is recorded: a configuration matter.
            credential::resolve(None, &self.store, &req.credential, now_ms)?;
        }

        let fingerprint = req.fingerprint();
        let (guard, reversed_already) = match self
            .begin(
                idem::key(terminal, &req.event_id),
                &fingerprint,
                now_ms,
                "`event_id` was already used by this terminal with a different body",
            )
            .await?
        {
            Begun::Replay(body) => return Ok(body),
            Begun::Decide(guard, reversed) => (guard, reversed),
        };

        let resolved = credential::resolve(scanner, &self.store, &req.credential, now_ms)?;
        let (card_no, scan, early) = match resolved {
            credential::Resolved::Card(c, scan) => (Some(c), scan, None),
            credential::Resolved::Decline(reason, c, scan) => {
                (c.map(std::borrow::Cow::Owned), scan, Some(reason))
            }
        };
        let now_s = now_ms.div_euclid(1000);
        // What the scenario's rules need besides the card, looked up
        // before the card's lock: none of it is changed by a tap.
        let site = req.site.as_deref();
        let purpose =
            (req.scenario == Scenario::Identity).then(|| self.policy.identity.purpose_of(terminal));
        let name_masked = match (&card_no, purpose) {
            (Some(c), Some(p)) if p.disclose.contains(&identity::Field::Name) => {
                profiles::profile(&self.store, c)
                    .map_err(ServiceError::from)?
                    .name_masked
            }
            _ => None,
        };
        let mut facts = authz::Facts {
            site,
            place: scenario::place_hash(site.unwrap_or(terminal)),
            units: req.stops.or(req.zones),
            purpose,
            ..authz::Facts::default()
        };
        if let Some(c) = &card_no {
            facts.allow = self.allow_fact(req.scenario, site, c);
            if let region::Origin::Partner(p) = self.policy.regions.origin(c) {
                facts.partner_listed = self.partners.contains(p, c);
            }
        }
        let auth_id = self.auth_ids.next();
        let (pending, decision, answer) = {
            // Decide and queue the write under the card's lock: the next tap
            // of this card sees this one's counters, and the journal gets the
            // two in the same order. A venue with a quota is locked after
            // the card (never the other way round).
            let _card_lock = card_no.as_deref().map(|c| self.cards.lock(c));
            let snapshot = card_no.as_deref().and_then(|c| self.cards.get(c));
            let mut venue = match (req.scenario, site) {
                (Scenario::Culture, Some(s)) if card_no.is_some() && early.is_none() => {
                    self.venues.lock(s)
                }
                _ => None,
            };
            let day = self.policy.local_day(now_s);
            facts.venue_entries = venue.as_ref().map_or(0, |v| v.on(day));
            let decide_started = Instant::now();
            let decline = authz::Outcome::decline;
            let outcome = match (&card_no, early) {
                // Reversed by its terminal before it got here: a late copy
                // of a request the terminal gave up on must not charge.
                _ if reversed_already => decline(Reason::Reversed),
                (_, Some(reason)) => decline(reason),
                (None, None) => decline(Reason::CardNotFound),
                (Some(card_no), None) => authz::decide(
                    Event {
                        card_no,
                        scenario: req.scenario,
                        amount_fen,
                    },
                    snapshot.as_ref(),
                    &self.deny,
                    &self.policy,
                    &facts,
                    now_s,
                ),
            };
            let card_str = card_no.as_deref().map_or("", |c| c.as_str());
            self.metrics
                .decide_latency
                .record(decide_started.elapsed().as_secs_f64());
            let d = outcome.decision;
            let approved_card = outcome.card_after.or(snapshot).filter(|_| d.is_approve());
            let disclosure = match (purpose, &card_no, approved_card) {
                (Some(p), Some(c), Some(card)) => {
                    Some(identity::disclose(p, c, &card, name_masked.as_deref()))
                }
                _ => None,
            };
            let health = approved_card
                .filter(|_| req.scenario == Scenario::Health)
                .map(|c| health::attest(&c));
            let answer = AuthorizeAnswer {
                event_id: &req.event_id,
                auth_id: &auth_id,
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
            .to_vec();
            let record = DecisionRecord {
                at_ms: now_ms,
                terminal: terminal.to_owned(),
                event_id: req.event_id.clone(),
                auth_id: auth_id.clone(),
                kind: req.kind(),
                card_no: card_str.into(),
                scenario: Some(req.scenario),
                amount_fen: req.amount_fen,
                decision: if d.is_approve() { "approve" } else { "decline" }.to_owned(),
                reason: d.reason(),
                charged_fen: d.amount_fen(),
                site: req.site.clone(),
                occurred_at: req.occurred_at.clone(),
                reverses: None,
                scan: scan.clone(),
                offline: false,
                fare: outcome.fare.filter(|_| d.is_approve()),
                bill_ref: req.bill_ref.clone(),
                credit: None,
                split: None,
            };
            let mut ops = Vec::with_capacity(3);
            if let Some(after) = outcome.card_after {
                ops.push(Op::Put(
                    Cf::Cards,
                    card_str.as_bytes().to_vec(),
                    cards::encode(&after),
                ));
            }
            if let (Some(entries), Some(site)) = (outcome.venue_entries, site) {
                let count = venues::Count { day, entries };
                ops.push(Op::Put(
                    Cf::Venues,
                    site.as_bytes().to_vec(),
                    count.encode(),
                ));
            }
            let pending = self.commit_decision(Decided {
                key: guard.key().to_vec(),
                slots: Box::new(guard),
                fingerprint: &fingerprint,
                now_ms,
                auth_id: &auth_id,
                origin: Origin {
                    approved: d.is_approve(),
                    charged_fen: d.amount_fen(),
                    scenario: req.scenario,
                    card_no: card_str,
                    site: req.site.as_deref(),
                },
                answer: &answer,
                record: &record,
                ops,
                spent: scan.as_ref(),
            })?;
            if let (Some(after), Some(c)) = (outcome.card_after, &card_no) {
                self.cards.set(c.clone().into_owned(), after);
            }
            if let (Some(entries), Some(v)) = (outcome.venue_entries, venue.as_mut()) {
                **v = venues::Count { day, entries };
            }
            (pending, d, answer)
        };
        self.answered(pending, req.scenario, decision.reason(), started)
            .await?;
        if !decision.is_approve() {
            if let Some(card) = &card_no {
                tracing::debug!(card = %card, reason = decision.reason().code(), "declined");
            }
        }
        Ok(answer)
    }

    /// Queues a decision's one journal commit: its record, its idempotency
    /// record (the answer a retry gets, and what a reversal needs), and
    /// its other writes. Called under the card's lock, so the journal gets
    /// a card's decisions in the order they were decided; the caller then
    /// updates memory and waits with [`Gateway::answered`] outside it.
    pub(crate) fn commit_decision(&self, d: Decided<'_>) -> Result<Pending, ServiceError> {
        let mut ops = d.ops;
        ops.push(Op::Put(
            Cf::Idem,
            d.key,
            idem::encode(
                d.fingerprint,
                d.now_ms,
                d.auth_id,
                Tail::Origin(d.origin),
                d.answer,
            ),
        ));
        let card = d.origin.card_no;
        let commit = Commit {
            record: Some(
                serde_json::to_vec(d.record).expect("a decision record always serializes"),
            ),
            ops,
            hold_until_written: Some(d.slots),
            card: (!card.is_empty()).then(|| card.into()),
            also: Vec::new(),
        };
        self.journal.submit(commit).map_err(|e| {
            if let (Some(s), Some(spent)) = (&self.scanner, d.spent) {
                s.unspend(spent);
            }
            ServiceError::from(e)
        })
    }

    /// Waits until a decision's commit is durable, then counts it.
    pub(crate) async fn answered(
        &self,
        pending: Pending,
        scenario: Scenario,
        reason: Reason,
        started: Instant,
    ) -> Result<(), ServiceError> {
        pending.durable().await.map_err(ServiceError::from)?;
        self.metrics.decision(scenario, reason).increment(1);
        self.metrics
            .latency(scenario)
            .record(started.elapsed().as_secs_f64());
        Ok(())
    }

    /// Request fields a scenario's config makes required or meaningless:
    /// a route charging by stops needs `stops`, a payment may need its
    /// bill reference. Checked before anything is recorded.
    fn check_scenario_fields(&self, req: &wire::AuthorizeRequest) -> Result<(), ServiceError> {
        if req.scenario == Scenario::Transit {
            let kind = req
                .site
                .as_deref()
                .and_then(|s| self.policy.transit.route(s))
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

    /// The idempotency step of a terminal request: the first answer again,
    /// `409` with `conflict` for another body, or the guard to decide under
    /// (and whether a reversal came first).
    pub(crate) async fn begin(
        &self,
        key: Vec<u8>,
        fingerprint: &[u8; 32],
        now_ms: i64,
        conflict: &'static str,
    ) -> Result<Begun, ServiceError> {
        match self
            .idem
            .begin(key, fingerprint, now_ms)
            .await
            .map_err(ServiceError::from)?
        {
            Lookup::Replay(body) => {
                self.metrics.replays.increment(1);
                Ok(Begun::Replay(body))
            }
            Lookup::Conflict => Err(ServiceError::already_used(conflict)),
            Lookup::Fresh(guard) => Ok(Begun::Decide(guard, false)),
            Lookup::Reversed(guard) => Ok(Begun::Decide(guard, true)),
        }
    }

    /// Reverses one of `terminal`'s events (`POST /v1/reverse`): a terminal
    /// that never saw an authorization's answer cancels it. Idempotent: the
    /// same reversal again gets the first answer.
    ///
    /// - An approval that charged: the charge is given back (the card's
    ///   daily spend too, if it is still that day), and settlement either
    ///   takes the event out of its open batch or, if the batch is sealed,
    ///   settles a reversal record in a later one.
    /// - A decline or a free approval: nothing to give back; recorded.
    /// - An event the gateway never saw: recorded, and a tombstone under
    ///   the event's key makes it a decline `REVERSED` if it arrives later.
    ///
    /// Waits for the event itself if it is being decided right now, so a
    /// reversal never races its own event.
    pub async fn reverse(
        &self,
        terminal: &str,
        body: &[u8],
        now_ms: i64,
    ) -> Result<Vec<u8>, ServiceError> {
        let req = wire::parse_reverse(body)?;
        let fingerprint = req.fingerprint();
        let own = match self
            .begin(
                idem::reversal_key(terminal, &req.event_id),
                &fingerprint,
                now_ms,
                "this event was already reversed with a different body",
            )
            .await?
        {
            Begun::Replay(body) => return Ok(body),
            Begun::Decide(guard, _) => guard,
        };
        let (event_guard, stored) = self
            .idem
            .hold(idem::key(terminal, &req.event_id), now_ms)
            .await
            .map_err(ServiceError::from)?;
        let stored = stored
            .as_deref()
            .map(idem::decode)
            .map(|s| s.expect("checked by hold"));
        let reversal_id = self.auth_ids.next();
        let (status, auth_id, origin) = match stored.as_ref().map(|s| (s.auth_id, s.tail)) {
            Some((auth_id, Tail::Origin(o))) if o.approved && o.charged_fen > 0 => {
                (ReverseStatus::Reversed, Some(auth_id), Some(o))
            }
            Some((auth_id, Tail::Origin(o))) => (ReverseStatus::NotCharged, Some(auth_id), Some(o)),
            // Answers stored before reversals existed carry no origin:
            // nothing here says what to give back.
            Some((_, Tail::Plain)) => {
                return Err(ServiceError::already_used(
                    "this event was recorded by an older version and cannot be reversed here",
                ))
            }
            // A tombstone is written only together with this reversal's
            // own answer, which `begin` found missing: it expired with it.
            Some((_, Tail::Tombstone)) | None => (ReverseStatus::UnknownEvent, None, None),
        };
        let given_back = if status == ReverseStatus::Reversed {
            origin.map_or(0, |o| o.charged_fen)
        } else {
            0
        };
        let answer = ReverseAnswer {
            event_id: &req.event_id,
            reversal_id: &reversal_id,
            status,
            auth_id,
            amount_fen: given_back,
        }
        .to_vec();
        let mut record = DecisionRecord {
            at_ms: now_ms,
            terminal: terminal.to_owned(),
            event_id: req.event_id.clone(),
            auth_id: reversal_id.clone(),
            kind: onecard_core::model::EventKind::Tap,
            card_no: origin.map(|o| o.card_no.into()).unwrap_or_default(),
            scenario: origin.map(|o| o.scenario),
            amount_fen: None,
            decision: "reverse".to_owned(),
            reason: Reason::Ok,
            charged_fen: given_back,
            site: origin.and_then(|o| o.site.map(str::to_owned)),
            occurred_at: req.occurred_at.clone(),
            reverses: auth_id.map(str::to_owned),
            scan: None,
            offline: false,
            fare: None,
            bill_ref: None,
            credit: None,
            split: None,
        };
        let mut ops = vec![Op::Put(
            Cf::Idem,
            own.key().to_vec(),
            idem::encode(&fingerprint, now_ms, &reversal_id, Tail::Plain, &answer),
        )];
        if status == ReverseStatus::UnknownEvent {
            ops.push(Op::Put(
                Cf::Idem,
                event_guard.key().to_vec(),
                idem::encode(&[0; 32], now_ms, &reversal_id, Tail::Tombstone, b""),
            ));
        }
        // A medical approval changes more than the spend (a hold, the
        // deductible): its card is looked at even when nothing was charged.
        let card = origin
            .filter(|o| given_back > 0 || (o.scenario == Scenario::Medical && o.approved))
            .and_then(|o| CardNo::parse(o.card_no).ok());
        // A replacement card carries the old one's counters (and its
        // holds' reservations): what is given back goes there.
        let card = card.map(|c| self.current_card(c)).transpose()?;
        let event_at_ms = stored.as_ref().map_or(now_ms, |s| s.created_ms);
        let indexed: Option<Box<str>> = origin.map(|o| o.card_no.into());
        let event_key = event_guard.key().to_vec();
        let hold: Box<dyn Send> = Box::new((own, event_guard));
        let pending = match card {
            Some(card_no) => {
                // Give the charge back to the day it counted in, under the
                // card's lock like a tap.
                let _card_lock = self.cards.lock(&card_no);
                let day = self.policy.local_day(event_at_ms.div_euclid(1000));
                let transit = origin.is_some_and(|o| o.scenario == Scenario::Transit);
                let mut after = None;
                if let Some(before) = self.cards.get(&card_no) {
                    let mut c = before;
                    c = c.give_back(day, given_back);
                    if transit {
                        c.transit = scenario::transit::give_back(c.transit, day, given_back);
                    }
                    if let (Some(o), Some(s)) = (&origin, &stored) {
                        let (medical, split) = self.on_reverse(
                            &event_key,
                            s.auth_id,
                            o,
                            s.body,
                            c,
                            event_at_ms,
                            now_ms,
                            &mut ops,
                        )?;
                        c = medical;
                        record.split = split;
                    }
                    after = (c != before).then_some(c);
                }
                let record =
                    serde_json::to_vec(&record).expect("a decision record always serializes");
                if let Some(after) = after {
                    ops.push(Op::Put(
                        Cf::Cards,
                        card_no.as_str().as_bytes().to_vec(),
                        cards::encode(&after),
                    ));
                }
                let pending = self
                    .journal
                    .submit(Commit {
                        record: Some(record),
                        ops,
                        hold_until_written: Some(hold),
                        card: indexed,
                        also: Vec::new(),
                    })
                    .map_err(ServiceError::from)?;
                if let Some(after) = after {
                    self.cards.set(card_no.clone(), after);
                }
                pending
            }
            None => self
                .journal
                .submit(Commit {
                    record: Some(
                        serde_json::to_vec(&record).expect("a decision record always serializes"),
                    ),
                    ops,
                    hold_until_written: Some(hold),
                    card: indexed,
                    also: Vec::new(),
                })
                .map_err(ServiceError::from)?,
        };
        pending.durable().await.map_err(ServiceError::from)?;
        metrics::counter!("onecard_reversals_total", "status" => status.as_str()).increment(1);
        Ok(answer)
    }

    pub fn now_ms(&self) -> i64 {
        self.clock.now_ms()
    }
}
